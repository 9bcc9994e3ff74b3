//! The CLI client: topics, publish and tail, over the HTTP API.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Events per publish request when reading stdin.
const STDIN_BATCH_EVENTS: usize = 500;
/// Bytes per publish request when reading stdin, below the server's default request limit.
const STDIN_BATCH_BYTES: usize = 4 << 20;
/// Pause between polls when following a topic.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// Sets on a JSON object the fields that were given (`Some`), leaving the others to the server's
/// defaults: for definitions built from command-line flags.
pub fn set_given<'a>(
    object: &mut Value,
    fields: impl IntoIterator<Item = (&'a str, Option<Value>)>,
) {
    for (k, v) in fields {
        if let Some(v) = v {
            object[k] = v;
        }
    }
}

impl Client {
    /// A client of the server at `server`, sending `token` as a bearer token when given.
    pub fn new(server: &str, token: Option<&str>) -> Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token
            && let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
        {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        Client {
            base: server.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .unwrap_or_default(),
        }
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let res = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = res.status();
        let bytes = res.bytes().await.context("failed to read the response")?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if !status.is_success() {
            let detail = body["detail"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            bail!("{} {}", status.as_u16(), detail);
        }
        Ok(body)
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        retention_ms: Option<u64>,
        retention_bytes: Option<u64>,
    ) -> Result<()> {
        let mut body = json!({"name": name, "partitions": partitions});
        if let Some(ms) = retention_ms {
            body["retention_ms"] = json!(ms);
        }
        if let Some(b) = retention_bytes {
            body["retention_bytes"] = json!(b);
        }
        let t = self
            .send(self.http.post(self.url("/v1/topics")).json(&body))
            .await?;
        println!(
            "created topic {} with {} partitions",
            t["name"].as_str().unwrap_or(name),
            t["config"]["partitions"]
        );
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<()> {
        let body = self.send(self.http.get(self.url("/v1/topics"))).await?;
        println!(
            "{:<40} {:>10} {:>14} {:>14}",
            "TOPIC", "PARTITIONS", "EVENTS", "BYTES"
        );
        for t in body["topics"].as_array().into_iter().flatten() {
            let parts = t["partitions"].as_array().cloned().unwrap_or_default();
            let events: u64 = parts
                .iter()
                .map(|p| {
                    p["log_end_offset"].as_u64().unwrap_or(0)
                        - p["log_start_offset"].as_u64().unwrap_or(0)
                })
                .sum();
            let bytes: u64 = parts
                .iter()
                .map(|p| p["size_bytes"].as_u64().unwrap_or(0))
                .sum();
            println!(
                "{:<40} {:>10} {:>14} {:>14}",
                t["name"].as_str().unwrap_or("?"),
                parts.len(),
                events,
                bytes
            );
        }
        Ok(())
    }

    pub async fn alter_topic(&self, name: &str, body: Value) -> Result<()> {
        let t = self
            .send(
                self.http
                    .patch(self.url(&format!("/v1/topics/{name}")))
                    .json(&body),
            )
            .await?;
        println!("{}", serde_json::to_string_pretty(&t["config"])?);
        Ok(())
    }

    pub async fn truncate_topic(&self, name: &str, body: Value) -> Result<()> {
        let r = self
            .send(
                self.http
                    .post(self.url(&format!("/v1/topics/{name}/truncate")))
                    .json(&body),
            )
            .await?;
        println!("{}", serde_json::to_string_pretty(&r["log_start_offsets"])?);
        Ok(())
    }

    pub async fn describe_topic(&self, name: &str) -> Result<()> {
        let body = self
            .send(self.http.get(self.url(&format!("/v1/topics/{name}"))))
            .await?;
        println!("{}", serde_json::to_string_pretty(&body)?);
        Ok(())
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.send(self.http.delete(self.url(&format!("/v1/topics/{name}"))))
            .await?;
        println!("deleted topic {name}");
        Ok(())
    }

    fn event(event_type: &str, key: Option<&str>, source: Option<&str>, data: &str) -> Value {
        let mut e = json!({"type": event_type});
        match serde_json::from_str::<Value>(data) {
            Ok(v) => e["data"] = v,
            Err(_) => {
                e["datacontenttype"] = json!("text/plain");
                e["data"] = json!(data);
            }
        }
        if let Some(k) = key {
            e["partitionkey"] = json!(k);
        }
        if let Some(s) = source {
            e["source"] = json!(s);
        }
        e
    }

    /// Appends DATA (or stdin lines) to a stream in one all-or-nothing request.
    pub async fn stream_append(
        &self,
        topic: &str,
        stream: &str,
        event_type: &str,
        expected_version: &str,
        data: Option<&str>,
    ) -> Result<()> {
        let events: Vec<Value> = match data {
            Some(d) => vec![Self::event(event_type, None, None, d)],
            None => {
                let lines: Vec<String> = std::io::stdin().lines().collect::<Result<_, _>>()?;
                lines
                    .iter()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| Self::event(event_type, None, None, l))
                    .collect()
            }
        };
        anyhow::ensure!(!events.is_empty(), "no events to append");
        let body = self
            .send(
                self.http
                    .post(self.url(&format!(
                        "/v1/topics/{topic}/streams/{stream}/events?expected_version={expected_version}"
                    )))
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(serde_json::to_vec(&events)?),
            )
            .await?;
        println!("{body}");
        Ok(())
    }

    /// Prints a topic's streams as JSON lines, page by page.
    pub async fn stream_list(&self, topic: &str) -> Result<()> {
        let mut after: Option<String> = None;
        loop {
            let mut req = self
                .http
                .get(self.url(&format!("/v1/topics/{topic}/streams")))
                .query(&[("limit", "1000")]);
            if let Some(a) = &after {
                req = req.query(&[("after", a)]);
            }
            let page = self.send(req).await?;
            for s in page["streams"].as_array().into_iter().flatten() {
                println!("{s}");
            }
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => return Ok(()),
            }
        }
    }

    /// Deletes a stream and says up to which version.
    pub async fn stream_delete(&self, topic: &str, stream: &str, expected: &str) -> Result<()> {
        let url = format!("/v1/topics/{topic}/streams/{stream}?expected_version={expected}");
        let d = self.send(self.http.delete(self.url(&url))).await?;
        println!(
            "deleted stream {stream} up to version {} (partition {}, offset {})",
            d["version"], d["partition"], d["offset"]
        );
        Ok(())
    }

    /// Prints a stream's events as JSON lines, page by page.
    pub async fn stream_read(
        &self,
        topic: &str,
        stream: &str,
        from_version: u64,
        backward: bool,
    ) -> Result<()> {
        let direction = if backward { "backward" } else { "forward" };
        let mut from = Some(from_version).filter(|_| !backward);
        loop {
            let mut url = format!(
                "/v1/topics/{topic}/streams/{stream}/events?limit=1000&direction={direction}"
            );
            if let Some(f) = from {
                url.push_str(&format!("&from_version={f}"));
            }
            let page = self.send(self.http.get(self.url(&url))).await?;
            let events = page["events"].as_array().cloned().unwrap_or_default();
            for e in &events {
                println!("{e}");
            }
            let Some(last) = events.last().and_then(|e| e["version"].as_u64()) else {
                return Ok(());
            };
            from = match (backward, last) {
                (true, 0) => return Ok(()),
                (true, v) => Some(v - 1),
                (false, v) => Some(v + 1),
            };
        }
    }

    async fn publish_batch(&self, topic: &str, events: &[Value]) -> Result<Value> {
        self.send(
            self.http
                .post(self.url(&format!("/v1/topics/{topic}/events")))
                .header("content-type", "application/cloudevents-batch+json")
                .body(serde_json::to_vec(events)?),
        )
        .await
    }

    pub async fn publish(
        &self,
        topic: &str,
        event_type: &str,
        key: Option<&str>,
        source: Option<&str>,
        data: Option<&str>,
    ) -> Result<()> {
        if let Some(data) = data {
            let r = self
                .publish_batch(topic, &[Self::event(event_type, key, source, data)])
                .await?;
            let o = &r["offsets"][0];
            println!("partition {} offset {}", o["partition"], o["offset"]);
            return Ok(());
        }
        // One JSON document per stdin line, sent in batches.
        let stdin = std::io::stdin();
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos} events published ({per_sec})",
                )
                .expect("the template is valid"),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut total = 0u64;
        for (n, line) in stdin.lock().lines().enumerate() {
            let line = line.context("failed to read stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            serde_json::from_str::<Value>(&line)
                .with_context(|| format!("line {} is not JSON", n + 1))?;
            batch_bytes += line.len();
            batch.push(Self::event(event_type, key, source, &line));
            if batch.len() >= STDIN_BATCH_EVENTS || batch_bytes >= STDIN_BATCH_BYTES {
                self.publish_batch(topic, &batch).await?;
                total += batch.len() as u64;
                bar.set_position(total);
                batch.clear();
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.publish_batch(topic, &batch).await?;
            total += batch.len() as u64;
        }
        bar.finish_and_clear();
        eprintln!("published {total} events to {topic}");
        Ok(())
    }

    pub async fn tail(
        &self,
        topic: &str,
        from: &str,
        partition: Option<u32>,
        follow: bool,
    ) -> Result<()> {
        let t = self
            .send(self.http.get(self.url(&format!("/v1/topics/{topic}"))))
            .await?;
        let parts = t["partitions"].as_array().cloned().unwrap_or_default();
        let mut cursors: Vec<(u32, u64)> = Vec::new();
        for p in &parts {
            let id = p["partition"].as_u64().unwrap_or(0) as u32;
            if partition.is_some_and(|want| want != id) {
                continue;
            }
            let start = p["log_start_offset"].as_u64().unwrap_or(0);
            let end = p["log_end_offset"].as_u64().unwrap_or(0);
            let offset = match from {
                "earliest" => start,
                "latest" => end,
                n => n
                    .parse::<u64>()
                    .map_err(|_| anyhow::anyhow!("--from must be earliest, latest or an offset"))?,
            };
            cursors.push((id, offset));
        }
        if let Some(p) = partition
            && cursors.is_empty()
        {
            bail!("topic {topic} has no partition {p}");
        }
        let mut out = std::io::stdout().lock();
        loop {
            let mut got = 0;
            for (id, offset) in cursors.iter_mut() {
                let url = self.url(&format!(
                    "/v1/topics/{topic}/events?partition={id}&offset={offset}&limit=1000"
                ));
                let page = self.send(self.http.get(url)).await?;
                for e in page["events"].as_array().into_iter().flatten() {
                    writeln!(out, "{e}")?;
                    got += 1;
                }
                *offset = page["next_offset"].as_u64().unwrap_or(*offset);
            }
            out.flush()?;
            if got == 0 {
                if !follow {
                    return Ok(());
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        }
    }
}
