//! `spate bench subs`: pull-and-ack throughput and end-to-end latency of a durable subscription
//! on a Spate server it starts (`--fsync batch` unless told otherwise: acks are durable before they
//! are answered), and, side by side in the same run, of a Redis Streams consumer group
//! (XREADGROUP + XACK) when given a Redis address.
//!
//! Throughput: `--messages` events of `--message-bytes` are stored first, then `--consumers`
//! consumers each pull `--batch` messages and ack them, until all are acked. Latency: a producer
//! publishes at `--rate` events/s for `--latency-seconds`; consumers long-poll, and the time from
//! the publish request to the message's arrival at a consumer is recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct SubsBenchArgs {
    /// Messages stored and then consumed in the throughput run.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Bytes of each message's payload.
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    /// Concurrent consumers.
    #[arg(long, default_value_t = 4)]
    consumers: usize,
    /// Messages per pull (XREADGROUP COUNT).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Partitions of Spate's topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Repetitions of the throughput run; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events per second published in the latency run.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10.0)]
    latency_seconds: f64,
    /// A Redis server (`host:port`) to run the same workload against with Streams.
    #[arg(long)]
    redis: Option<String>,
    /// Spate's fsync policy. Under `batch` (the default) an ack is durable before it is
    /// answered; `interval:<ms>` and `never` show what that durability costs on this disk.
    #[arg(long, default_value = "batch")]
    fsync: String,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

/// Nanoseconds since `base`, stamped into messages.
fn stamp(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// How far a throughput run is: messages received and settled, and when the last was settled.
struct Progress {
    total: u64,
    received: AtomicU64,
    settled: AtomicU64,
    started: Instant,
    finished: std::sync::Mutex<Option<Instant>>,
}

impl Progress {
    fn new(total: u64) -> Arc<Progress> {
        Arc::new(Progress {
            total,
            received: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            started: Instant::now(),
            finished: std::sync::Mutex::new(None),
        })
    }

    fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn all_received(&self) -> bool {
        self.received.load(Ordering::Relaxed) >= self.total
    }

    fn settled(&self, n: usize) {
        if n > 0 && self.settled.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= self.total {
            let mut f = self.finished.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert_with(Instant::now);
        }
    }

    /// Messages per second from the start to the last ack.
    fn rate(&self) -> f64 {
        let end = self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(Instant::now);
        self.total as f64 / (end - self.started).as_secs_f64()
    }
}

fn mode(combined: bool) -> &'static str {
    if combined { "combined" } else { "separate" }
}

struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    received: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50: h.value_at_quantile(0.5) as f64 / 1e6,
            p99: h.value_at_quantile(0.99) as f64 / 1e6,
            max: h.max() as f64 / 1e6,
            received: h.len(),
        }
    }
}

pub async fn run(a: SubsBenchArgs) -> Result<()> {
    ensure!(
        a.messages > 0 && a.consumers > 0 && a.batch > 0,
        "sizes must be positive"
    );
    ensure!(
        a.rate > 0 && a.latency_seconds > 0.0,
        "--rate and --latency-seconds must be positive"
    );
    a.fsync
        .parse::<spate_log::FsyncPolicy>()
        .map_err(|e| anyhow::anyhow!("--fsync: {e}"))?;
    let server = crate::bench_push::start_server_with(&a.fsync)?;
    let spate = Spate {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        base: format!("http://{}", server.addr),
        pid: server.child.id(),
    };
    let redis = a.redis.clone();
    println!(
        "durable subscription: {} messages of {} B, {} consumers pulling {} at a time; Spate --fsync {}{}",
        a.messages,
        a.message_bytes,
        a.consumers,
        a.batch,
        a.fsync,
        if redis.is_some() {
            ", Redis Streams (XREADGROUP + XACK) as configured"
        } else {
            ""
        }
    );
    for combined in [false, true] {
        let mut spate_rates = Vec::new();
        let mut redis_rates = Vec::new();
        for run in 0..a.runs {
            let r = spate.throughput(&a, run, combined).await?;
            println!("  run {run}: spate {r:>10.0} msg/s");
            spate_rates.push(r);
            if let Some(addr) = &redis {
                let r = redis_throughput(addr, &a, run, combined).await?;
                println!("  run {run}: redis {r:>10.0} msg/s");
                redis_rates.push(r);
            }
        }
        let s = crate::bench::median(&mut spate_rates);
        println!(
            "pull + ack throughput, {} (ack {}), median of {} runs:",
            mode(combined),
            if combined {
                "sent with the next pull; Redis pipelines XACK with the next XREADGROUP"
            } else {
                "in its own request after each pull"
            },
            a.runs
        );
        println!("  spate  {s:>10.0} msg/s");
        if !redis_rates.is_empty() {
            let r = crate::bench::median(&mut redis_rates);
            println!("  redis  {r:>10.0} msg/s");
            println!("  ratio spate/redis {:.2}x", s / r);
        }
    }
    println!(
        "end-to-end latency at {} msg/s for {} s (publish request to arrival at a consumer):",
        a.rate, a.latency_seconds
    );
    let l = spate.latency(&a).await?;
    print_latency("spate", &l);
    if let Some(addr) = &redis {
        let l = redis_latency(addr, &a).await?;
        print_latency("redis", &l);
    }
    drop(server);
    Ok(())
}

fn print_latency(name: &str, l: &Latency) {
    println!(
        "  {name:<6} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  ({} received)",
        l.p50, l.p99, l.max, l.received
    );
}

/// A pull response, read as a consumer would: ack ids kept, events parsed and dropped.
#[derive(serde::Deserialize)]
struct Pulled {
    messages: Vec<PulledMessage>,
    /// What the acks sent with the pull did.
    #[serde(default)]
    results: Vec<AckResult>,
}

#[derive(serde::Deserialize)]
struct Acked {
    results: Vec<AckResult>,
}

#[derive(serde::Deserialize)]
struct AckResult {
    result: String,
}

/// Checks that every one of `n` acks was applied, as the Redis clients check XACK's count.
fn all_acked(results: &[AckResult], n: usize) -> Result<()> {
    let ok = results.iter().filter(|r| r.result == "ok").count();
    ensure!(
        results.len() == n && ok == n,
        "{ok} of {n} acks applied ({} results)",
        results.len()
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct PulledMessage {
    ack_id: String,
    #[allow(dead_code)]
    event: serde::de::IgnoredAny,
}

struct Spate {
    http: reqwest::Client,
    base: String,
    /// The server's process, for its CPU time.
    pid: u32,
}

impl Spate {
    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        ensure!(status.is_success(), "{path}: {status} {v}");
        Ok(v)
    }

    async fn post_raw(&self, path: &str, body: &Value) -> Result<bytes::Bytes> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await?;
        let status = r.status();
        let b = r.bytes().await?;
        ensure!(status.is_success(), "{path}: {status}");
        Ok(b)
    }

    /// The server's fsync count and total seconds so far.
    async fn fsyncs(&self) -> Result<(f64, f64)> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((
            value("spate_fsync_seconds_count "),
            value("spate_fsync_seconds_sum "),
        ))
    }

    async fn setup(&self, a: &SubsBenchArgs, name: &str) -> Result<()> {
        self.post(
            "/v1/topics",
            &json!({"name": name, "partitions": a.partitions}),
        )
        .await?;
        Ok(())
    }

    async fn subscribe(&self, name: &str, from: &str) -> Result<()> {
        let r = self
            .http
            .put(format!("{}/v1/subscriptions/{name}", self.base))
            .json(&json!({"topic": name, "from": from, "ack_timeout_ms": 60000}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "subscribe: {}", r.status());
        Ok(())
    }

    async fn publish(&self, topic: &str, events: &[Value]) -> Result<()> {
        let r = self
            .http
            .post(format!("{}/v1/topics/{topic}/events", self.base))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(events)?)
            .send()
            .await?;
        ensure!(r.status() == 201, "publish: {}", r.status());
        Ok(())
    }

    fn event(i: usize, t: u64, pad: &str) -> Value {
        json!({"specversion": "1.0", "id": format!("m{i}"), "source": "/bench", "type": "bench.msg",
            "data": {"t": t, "pad": pad}})
    }

    async fn throughput(&self, a: &SubsBenchArgs, run: usize, combined: bool) -> Result<f64> {
        let name = format!("subs-{run}-{}", mode(combined));
        self.setup(a, &name).await?;
        let pad = "x".repeat(a.message_bytes.saturating_sub(24));
        let mut i = 0;
        while i < a.messages {
            let n = 500.min(a.messages - i);
            let events: Vec<Value> = (i..i + n).map(|k| Self::event(k, 0, &pad)).collect();
            self.publish(&name, &events).await?;
            i += n;
        }
        self.subscribe(&name, "earliest").await?;
        let fsyncs_before = self.fsyncs().await?;
        let cpu_before = CpuUse::now(self.pid)?;
        let progress = Progress::new(a.messages as u64);
        let mut tasks = Vec::new();
        for _ in 0..a.consumers {
            let (http, base, name, progress) = (
                self.http.clone(),
                self.base.clone(),
                name.clone(),
                progress.clone(),
            );
            let (batch, pid) = (a.batch, self.pid);
            tasks.push(tokio::spawn(async move {
                let me = Spate { http, base, pid };
                let mut times = (histogram(), histogram());
                let pull = format!("/v1/subscriptions/{name}/pull");
                let ack = format!("/v1/subscriptions/{name}/ack");
                let mut pending: Vec<String> = Vec::new();
                loop {
                    if progress.all_received() {
                        if !pending.is_empty() {
                            let body = me.post_raw(&ack, &json!({ "ack_ids": pending })).await?;
                            all_acked(
                                &serde_json::from_slice::<Acked>(&body)?.results,
                                pending.len(),
                            )?;
                            progress.settled(pending.len());
                        }
                        break;
                    }
                    let t0 = Instant::now();
                    let mut body = json!({"max_messages": batch, "wait_ms": 200});
                    if combined {
                        body["ack_ids"] = json!(pending);
                    }
                    let got: Pulled = serde_json::from_slice(&me.post_raw(&pull, &body).await?)?;
                    times.0.record(t0.elapsed().as_nanos() as u64)?;
                    if combined {
                        all_acked(&got.results, pending.len())?;
                        progress.settled(pending.len());
                    }
                    pending = got.messages.into_iter().map(|m| m.ack_id).collect();
                    progress.received(pending.len());
                    if combined || pending.is_empty() {
                        continue;
                    }
                    let t1 = Instant::now();
                    let body = me.post_raw(&ack, &json!({ "ack_ids": pending })).await?;
                    all_acked(
                        &serde_json::from_slice::<Acked>(&body)?.results,
                        pending.len(),
                    )?;
                    times.1.record(t1.elapsed().as_nanos() as u64)?;
                    progress.settled(pending.len());
                    pending.clear();
                }
                Ok::<_, anyhow::Error>(times)
            }));
        }
        let (mut pulls, mut acks) = (histogram(), histogram());
        for t in tasks {
            let (p, k) = t.await??;
            pulls.add(p)?;
            acks.add(k)?;
        }
        let rate = progress.rate();
        let cpu = CpuUse::now(self.pid)?.since(&cpu_before, a.messages);
        let fsyncs_after = self.fsyncs().await?;
        let (n, secs) = (
            fsyncs_after.0 - fsyncs_before.0,
            fsyncs_after.1 - fsyncs_before.1,
        );
        println!(
            "    spate {}: pull p50 {:.2} ms, ack p50 {:.2} ms; {n:.0} fsyncs, mean {:.2} ms; {cpu}",
            mode(combined),
            pulls.value_at_quantile(0.5) as f64 / 1e6,
            acks.value_at_quantile(0.5) as f64 / 1e6,
            if n > 0.0 { secs / n * 1e3 } else { 0.0 }
        );
        Ok(rate)
    }

    async fn latency(&self, a: &SubsBenchArgs) -> Result<Latency> {
        let name = "subs-latency".to_string();
        self.setup(a, &name).await?;
        self.subscribe(&name, "latest").await?;
        let base = Instant::now();
        let total = (a.rate as f64 * a.latency_seconds) as u64;
        let seen = Arc::new(AtomicU64::new(0));
        let hist = Arc::new(std::sync::Mutex::new(histogram()));
        let mut tasks = Vec::new();
        for _ in 0..a.consumers {
            let me = Spate {
                http: self.http.clone(),
                base: self.base.clone(),
                pid: self.pid,
            };
            let (name, seen, hist, batch) = (name.clone(), seen.clone(), hist.clone(), a.batch);
            tasks.push(tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(600);
                while seen.load(Ordering::Relaxed) < total && Instant::now() < until {
                    let got = me
                        .post(
                            &format!("/v1/subscriptions/{name}/pull"),
                            &json!({"max_messages": batch, "wait_ms": 500}),
                        )
                        .await?;
                    let now = stamp(base);
                    let messages = got["messages"].as_array().cloned().unwrap_or_default();
                    if messages.is_empty() {
                        continue;
                    }
                    {
                        let mut h = hist.lock().unwrap_or_else(|e| e.into_inner());
                        for m in &messages {
                            let t = m["event"]["data"]["t"].as_u64().unwrap_or(now);
                            h.record(now.saturating_sub(t).max(1))?;
                        }
                    }
                    let ids: Vec<&Value> = messages.iter().map(|m| &m["ack_id"]).collect();
                    me.post(
                        &format!("/v1/subscriptions/{name}/ack"),
                        &json!({ "ack_ids": ids }),
                    )
                    .await?;
                    seen.fetch_add(messages.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        let pad = "x".repeat(a.message_bytes.saturating_sub(24));
        let every = Duration::from_secs_f64(1.0 / a.rate as f64);
        let start = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(start + every * i as u32).await;
            self.publish(&name, &[Self::event(i as usize, stamp(base), &pad)])
                .await?;
        }
        for t in tasks {
            t.await??;
        }
        let h = hist.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Latency::of(&h))
    }
}

/// A RESP2 value.
#[derive(Debug)]
enum Resp {
    Simple,
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// Parses one value from the start of `buf`; `None` when incomplete.
fn parse(buf: &[u8]) -> Result<Option<(Resp, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    if buf.is_empty() {
        return Ok(None);
    }
    let line = std::str::from_utf8(&buf[1..end])?;
    let next = end + 2;
    Ok(Some(match buf[0] {
        b'+' => (Resp::Simple, next),
        b'-' => (Resp::Error(line.into()), next),
        b':' => (Resp::Int(line.parse()?), next),
        b'$' => {
            let n: i64 = line.parse()?;
            if n < 0 {
                (Resp::Bulk(None), next)
            } else {
                let n = n as usize;
                if buf.len() < next + n + 2 {
                    return Ok(None);
                }
                (Resp::Bulk(Some(buf[next..next + n].to_vec())), next + n + 2)
            }
        }
        b'*' => {
            let n: i64 = line.parse()?;
            if n < 0 {
                (Resp::Array(None), next)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                let mut at = next;
                for _ in 0..n {
                    let Some((v, used)) = parse(&buf[at..])? else {
                        return Ok(None);
                    };
                    items.push(v);
                    at += used;
                }
                (Resp::Array(Some(items)), at)
            }
        }
        b => bail!("unexpected RESP type byte {b}"),
    }))
}

struct Redis {
    conn: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Redis {
    async fn connect(addr: &str) -> Result<Redis> {
        let conn = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to Redis at {addr}"))?;
        conn.set_nodelay(true)?;
        Ok(Redis {
            conn,
            buf: Vec::new(),
        })
    }

    fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }

    async fn read(&mut self) -> Result<Resp> {
        loop {
            if let Some((v, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                if let Resp::Error(e) = &v {
                    bail!("redis: {e}");
                }
                return Ok(v);
            }
            let mut chunk = [0u8; 65536];
            let n = self.conn.read(&mut chunk).await?;
            ensure!(n > 0, "redis closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends commands in one write and reads their replies.
    async fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Resp>> {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(Vec::as_slice).collect();
            Self::encode(&mut out, &args);
        }
        self.conn.write_all(&out).await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(self.read().await?);
        }
        Ok(replies)
    }

    async fn cmd(&mut self, args: &[&[u8]]) -> Result<Resp> {
        let owned: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        Ok(self.pipeline(&[owned]).await?.remove(0))
    }
}

/// The Redis server's process id (`INFO server`), to read its CPU time: the server runs on
/// this machine for the comparison.
async fn redis_pid(r: &mut Redis) -> Result<u32> {
    let Resp::Bulk(Some(info)) = r.cmd(&[b"INFO", b"server"]).await? else {
        bail!("INFO server: unexpected reply");
    };
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO server gives no process_id")
}

/// CPU time of the server and of this benchmark process (the clients), at one moment.
struct CpuUse {
    server: f64,
    clients: f64,
}

impl CpuUse {
    fn now(server_pid: u32) -> Result<CpuUse> {
        Ok(CpuUse {
            server: crate::bench::cpu_seconds(server_pid)?,
            clients: crate::bench::cpu_seconds(std::process::id())?,
        })
    }

    /// CPU per message since `before`, as text.
    fn since(&self, before: &CpuUse, messages: usize) -> String {
        let per = |a: f64, b: f64| (a - b) / messages as f64 * 1e6;
        format!(
            "CPU per message: server {:.2} µs, clients {:.2} µs",
            per(self.server, before.server),
            per(self.clients, before.clients)
        )
    }
}

/// Entries of an XREADGROUP reply: (id, payload).
fn entries(reply: Resp) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let Resp::Array(Some(streams)) = reply else {
        return out;
    };
    for s in streams {
        let Resp::Array(Some(mut parts)) = s else {
            continue;
        };
        let Some(Resp::Array(Some(items))) = parts.pop() else {
            continue;
        };
        for item in items {
            let Resp::Array(Some(mut kv)) = item else {
                continue;
            };
            let fields = kv.pop();
            let id = kv.pop();
            if let (Some(Resp::Bulk(Some(id))), Some(Resp::Array(Some(mut f)))) = (id, fields) {
                let payload = match f.pop() {
                    Some(Resp::Bulk(Some(p))) => p,
                    _ => Vec::new(),
                };
                out.push((id, payload));
            }
        }
    }
    out
}

fn xadd(stream: &str, payload: Vec<u8>) -> Vec<Vec<u8>> {
    vec![
        b"XADD".to_vec(),
        stream.as_bytes().to_vec(),
        b"*".to_vec(),
        b"d".to_vec(),
        payload,
    ]
}

async fn redis_group(r: &mut Redis, stream: &str, from: &str) -> Result<()> {
    r.cmd(&[b"DEL", stream.as_bytes()]).await?;
    r.cmd(&[
        b"XGROUP",
        b"CREATE",
        stream.as_bytes(),
        b"g",
        from.as_bytes(),
        b"MKSTREAM",
    ])
    .await?;
    Ok(())
}

async fn redis_throughput(
    addr: &str,
    a: &SubsBenchArgs,
    run: usize,
    combined: bool,
) -> Result<f64> {
    let stream = format!("subs-{run}-{}", mode(combined));
    let mut r = Redis::connect(addr).await?;
    r.cmd(&[b"DEL", stream.as_bytes()]).await?;
    let payload = vec![b'x'; a.message_bytes];
    let mut i = 0;
    while i < a.messages {
        let n = 500.min(a.messages - i);
        let cmds: Vec<Vec<Vec<u8>>> = (0..n).map(|_| xadd(&stream, payload.clone())).collect();
        r.pipeline(&cmds).await?;
        i += n;
    }
    r.cmd(&[b"XGROUP", b"CREATE", stream.as_bytes(), b"g", b"0"])
        .await?;
    let pid = redis_pid(&mut r).await?;
    let cpu_before = CpuUse::now(pid)?;
    let progress = Progress::new(a.messages as u64);
    let mut tasks = Vec::new();
    for c in 0..a.consumers {
        let (addr, stream, progress) = (addr.to_string(), stream.clone(), progress.clone());
        let batch = a.batch.to_string();
        tasks.push(tokio::spawn(async move {
            let mut r = Redis::connect(&addr).await?;
            let consumer = format!("c{c}");
            let read = |stream: &str| -> Vec<Vec<u8>> {
                [
                    "XREADGROUP",
                    "GROUP",
                    "g",
                    &consumer,
                    "COUNT",
                    &batch,
                    "BLOCK",
                    "200",
                    "STREAMS",
                    stream,
                    ">",
                ]
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect()
            };
            let ack = |ids: &[Vec<u8>]| -> Vec<Vec<u8>> {
                let mut c = vec![b"XACK".to_vec(), stream.as_bytes().to_vec(), b"g".to_vec()];
                c.extend(ids.iter().cloned());
                c
            };
            let mut pending: Vec<Vec<u8>> = Vec::new();
            loop {
                if progress.all_received() {
                    if !pending.is_empty() {
                        r.pipeline(&[ack(&pending)]).await?;
                        progress.settled(pending.len());
                    }
                    break;
                }
                // Combined: the previous batch's XACK and the next XREADGROUP in one round trip.
                let mut cmds = Vec::new();
                if combined && !pending.is_empty() {
                    cmds.push(ack(&pending));
                }
                cmds.push(read(&stream));
                let mut replies = r.pipeline(&cmds).await?;
                let reply = replies.pop().expect("one reply per command");
                if let Some(acked) = replies.pop() {
                    ensure!(
                        matches!(acked, Resp::Int(n) if n == pending.len() as i64),
                        "XACK answered {acked:?}"
                    );
                    progress.settled(pending.len());
                }
                pending = entries(reply).into_iter().map(|(id, _)| id).collect();
                progress.received(pending.len());
                if combined || pending.is_empty() {
                    continue;
                }
                let acked = r.pipeline(&[ack(&pending)]).await?.remove(0);
                ensure!(
                    matches!(acked, Resp::Int(n) if n == pending.len() as i64),
                    "XACK answered {acked:?}"
                );
                progress.settled(pending.len());
                pending.clear();
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = progress.rate();
    let cpu = CpuUse::now(pid)?.since(&cpu_before, a.messages);
    println!("    redis {}: {cpu}", mode(combined));
    r.cmd(&[b"DEL", stream.as_bytes()]).await?;
    Ok(rate)
}

async fn redis_latency(addr: &str, a: &SubsBenchArgs) -> Result<Latency> {
    let stream = "subs-latency";
    let mut r = Redis::connect(addr).await?;
    redis_group(&mut r, stream, "$").await?;
    let base = Instant::now();
    let total = (a.rate as f64 * a.latency_seconds) as u64;
    let seen = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(std::sync::Mutex::new(histogram()));
    let mut tasks = Vec::new();
    for c in 0..a.consumers {
        let (addr, seen, hist) = (addr.to_string(), seen.clone(), hist.clone());
        let batch = a.batch.to_string();
        tasks.push(tokio::spawn(async move {
            let mut r = Redis::connect(&addr).await?;
            let consumer = format!("c{c}");
            let until = Instant::now() + Duration::from_secs(600);
            while seen.load(Ordering::Relaxed) < total && Instant::now() < until {
                let reply = r
                    .cmd(&[
                        b"XREADGROUP",
                        b"GROUP",
                        b"g",
                        consumer.as_bytes(),
                        b"COUNT",
                        batch.as_bytes(),
                        b"BLOCK",
                        b"500",
                        b"STREAMS",
                        stream.as_bytes(),
                        b">",
                    ])
                    .await?;
                let now = stamp(base);
                let got = entries(reply);
                if got.is_empty() {
                    continue;
                }
                {
                    let mut h = hist.lock().unwrap_or_else(|e| e.into_inner());
                    for (_, p) in &got {
                        let t: u64 = std::str::from_utf8(&p[..p.len().min(20)])
                            .ok()
                            .and_then(|s| s.split(';').next())
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(now);
                        h.record(now.saturating_sub(t).max(1))?;
                    }
                }
                let mut ack: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), b"g"];
                ack.extend(got.iter().map(|(id, _)| id.as_slice()));
                r.cmd(&ack).await?;
                seen.fetch_add(got.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let every = Duration::from_secs_f64(1.0 / a.rate as f64);
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let mut payload = format!("{};", stamp(base)).into_bytes();
        payload.resize(a.message_bytes.max(payload.len()), b'x');
        r.pipeline(&[xadd(stream, payload)]).await?;
    }
    for t in tasks {
        t.await??;
    }
    r.cmd(&[b"DEL", stream.as_bytes()]).await?;
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Latency::of(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_replies_parse_whole_or_not_at_all() {
        let reply =
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$2\r\nhi\r\n";
        let (v, used) = parse(reply).unwrap().unwrap();
        assert_eq!(used, reply.len());
        assert_eq!(entries(v), vec![(b"1-0".to_vec(), b"hi".to_vec())]);
        assert!(parse(&reply[..reply.len() - 3]).unwrap().is_none());
        assert!(matches!(
            parse(b"*-1\r\n").unwrap(),
            Some((Resp::Array(None), 5))
        ));
        assert!(matches!(
            parse(b":12\r\n").unwrap(),
            Some((Resp::Int(12), 5))
        ));
    }
}
