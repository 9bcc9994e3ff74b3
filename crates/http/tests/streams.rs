//! Event-sourcing streams over HTTP against a real server on loopback: optimistic concurrency under
//! racing writers, expected-version semantics, idempotent retries, reads, records from other doors
//! joining their stream, and the index rebuilt after a restart.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::start;
use serde_json::{Value, json};
use spate_http::push::PushLimits;

struct Client {
    http: reqwest::Client,
    base: String,
}

struct Reply {
    status: u16,
    body: Value,
}

async fn reply(r: reqwest::Response) -> Reply {
    Reply {
        status: r.status().as_u16(),
        body: r.json().await.unwrap_or(Value::Null),
    }
}

impl Client {
    fn new(addr: std::net::SocketAddr) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn append(&self, stream: &str, expected: &str, ids: &[&str]) -> Reply {
        let events: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({"specversion": "1.0", "id": id, "source": "/es", "type": "order.changed",
                    "data": {"id": id}})
            })
            .collect();
        let r = self
            .http
            .post(format!(
                "{}/v1/topics/es/streams/{stream}/events?expected_version={expected}",
                self.base
            ))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await
            .unwrap();
        reply(r).await
    }

    async fn get(&self, path: &str) -> Reply {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        reply(r).await
    }

    async fn ids(&self, stream: &str) -> Vec<String> {
        let r = self
            .get(&format!("/v1/topics/es/streams/{stream}/events?limit=1000"))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(e["version"], i as u64);
                e["event"]["id"].as_str().unwrap().to_string()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_exactly_one_winner_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 3).await;
    let client = Arc::new(Client::new(server.addr));
    const WRITERS: usize = 64;
    const TARGET: u64 = 200;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            // Each writer appends at the version it believes is next, learning the current version
            // from every 409, until the stream reaches TARGET events.
            let (mut next, mut won, mut conflicts) = (0u64, Vec::new(), 0);
            let mut attempt = 0;
            while next < TARGET {
                attempt += 1;
                let id = format!("w{w}-a{attempt}");
                let expected = if next == 0 {
                    "no_stream".to_string()
                } else {
                    (next - 1).to_string()
                };
                let r = client.append("order-1", &expected, &[&id]).await;
                match r.status {
                    201 => {
                        assert_eq!(r.body["first_version"], next, "{}", r.body);
                        won.push((next, id));
                        next += 1;
                    }
                    409 => {
                        conflicts += 1;
                        assert_eq!(r.body["type"], "urn:spate:problem:wrong-expected-version");
                        let current = r.body["current_version"]
                            .as_u64()
                            .expect("a current version");
                        assert!(current + 1 > next, "409 at {next} but current is {current}");
                        next = current + 1;
                    }
                    s => panic!("unexpected {s}: {}", r.body),
                }
            }
            (won, conflicts)
        }));
    }
    let mut winners: BTreeMap<u64, String> = BTreeMap::new();
    let mut conflicts = 0;
    for t in tasks {
        let (won, c) = t.await.unwrap();
        conflicts += c;
        for (v, id) in won {
            assert!(
                winners.insert(v, id).is_none(),
                "two winners for version {v}"
            );
        }
    }
    assert!(conflicts > 0, "writers never raced");
    // Exactly one winner per version, gapless, and the stream holds the winners in version order.
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (0..TARGET).collect::<Vec<_>>()
    );
    let ids = client.ids("order-1").await;
    assert_eq!(ids, winners.values().cloned().collect::<Vec<_>>());
    let info = client.get("/v1/topics/es/streams/order-1").await;
    assert_eq!(info.body["version"], TARGET - 1);
    server.stop().await;
}

#[tokio::test]
async fn expected_version_semantics_idempotent_retries_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 2).await;
    let c = Client::new(server.addr);

    // exists on a missing stream; a version on a missing stream.
    let r = c.append("s", "exists", &["x"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["current_version"], Value::Null);
    let r = c.append("s", "0", &["x"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(c.get("/v1/topics/es/streams/s").await.status, 404);
    assert_eq!(c.get("/v1/topics/es/streams/s/events").await.status, 404);

    // no_stream creates; a batch gets consecutive versions.
    let r = c.append("s", "no_stream", &["a", "b", "c"]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["first_version"], 0);
    assert_eq!(r.body["last_version"], 2);
    let first = r.body.clone();
    assert_eq!(first["offsets"].as_array().unwrap().len(), 3);
    // The same append again (a retry after a lost response) returns the original result.
    let r = c.append("s", "no_stream", &["a", "b", "c"]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body, first);
    // A prefix retried is a retry too; different ids are a conflict.
    let r = c.append("s", "no_stream", &["a"]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["last_version"], 0);
    let r = c.append("s", "no_stream", &["z"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["current_version"], 2);
    let r = c.append("s", "0", &["b", "c"]).await;
    assert_eq!(r.status, 201, "retry at version 1");
    assert_eq!(r.body["first_version"], 1);
    assert_eq!(c.ids("s").await, ["a", "b", "c"]);

    // exists, any, an exact version.
    assert_eq!(
        c.append("s", "exists", &["d"]).await.body["first_version"],
        3
    );
    assert_eq!(c.append("s", "any", &["e"]).await.body["first_version"], 4);
    assert_eq!(c.append("s", "4", &["f"]).await.body["first_version"], 5);
    let r = c.append("s", "4", &["g"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["current_version"], 5);
    assert_eq!(r.body["status"], 409);

    // Reads: forward from a version, backward, limits; the position.
    let r = c
        .get("/v1/topics/es/streams/s/events?from_version=2&limit=2")
        .await;
    let got: Vec<(u64, String)> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().unwrap(),
                e["event"]["id"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(got, [(2, "c".to_string()), (3, "d".to_string())]);
    let r = c
        .get("/v1/topics/es/streams/s/events?direction=backward&limit=3")
        .await;
    let versions: Vec<u64> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [5, 4, 3]);
    let info = c.get("/v1/topics/es/streams/s").await;
    assert_eq!(info.body["version"], 5);
    assert!(info.body["last_offset"].as_u64() >= info.body["first_offset"].as_u64());

    // Bad input.
    for (q, code) in [
        ("expected_version=soon", 400),
        ("expected_version=-1", 400),
        ("bogus=1", 400),
    ] {
        let r = c
            .http
            .post(format!("{}/v1/topics/es/streams/s/events?{q}", c.base))
            .header("content-type", "application/cloudevents+json")
            .body(r#"{"specversion":"1.0","id":"q","source":"/s","type":"t"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), code, "{q}");
    }
    for q in ["direction=up", "limit=0", "from_version=x"] {
        assert_eq!(
            c.get(&format!("/v1/topics/es/streams/s/events?{q}"))
                .await
                .status,
            400,
            "{q}"
        );
    }
    let r = c
        .http
        .post(format!("{}/v1/topics/es/streams/s/events", c.base))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"q","source":"/s","type":"t","partitionkey":"other"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(c.get("/v1/topics/nope/streams/s").await.status, 404);
    assert_eq!(c.ids("s").await, ["a", "b", "c", "d", "e", "f"]);

    // A retry recognized long after: thousands of events of another stream of the partition
    // later (the original events are then read from the log away from its end).
    let mut other = None;
    for i in 0..64 {
        let id = format!("o{i}");
        let r = c.append(&id, "no_stream", &["probe"]).await;
        assert_eq!(r.status, 201, "{}", r.body);
        if r.body["partition"] == first["partition"] {
            other = Some(id);
            break;
        }
    }
    let other = other.expect("a stream in the same partition");
    let ids: Vec<String> = (0..1100).map(|i| format!("p{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    for _ in 0..4 {
        let r = c.append(&other, "any", &ids).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = c.append("s", "no_stream", &["a", "b", "c"]).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body, first);
    let r = c.append("s", "no_stream", &["a", "x"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["current_version"], 5);
    server.stop().await;
}

#[tokio::test]
async fn records_from_other_doors_join_their_stream_and_the_index_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 3).await;
    let c = Client::new(server.addr);
    assert_eq!(c.append("k", "no_stream", &["s0"]).await.status, 201);
    // A plain publish with the stream id as partition key joins the stream at the next version.
    let r = c
        .http
        .post(format!("{}/v1/topics/es/events", c.base))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"p1","source":"/s","type":"t","partitionkey":"k"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The version check sees it at once.
    let r = c.append("k", "0", &["s2"]).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["current_version"], 1);
    assert_eq!(c.append("k", "1", &["s2"]).await.status, 201);
    // Many other streams around it.
    for i in 0..50 {
        assert_eq!(
            c.append(&format!("other-{i}"), "no_stream", &["o"])
                .await
                .status,
            201
        );
    }
    let before: Vec<Vec<String>> = {
        let mut v = vec![c.ids("k").await];
        for i in 0..50 {
            v.push(c.ids(&format!("other-{i}")).await);
        }
        v
    };
    assert_eq!(before[0], ["s0", "p1", "s2"]);
    server.stop().await;

    // After a restart the index is rebuilt from the log, equal to what it was.
    let server = start(dir.path(), PushLimits::default()).await;
    let c = Client::new(server.addr);
    let mut after = vec![c.ids("k").await];
    for i in 0..50 {
        after.push(c.ids(&format!("other-{i}")).await);
    }
    assert_eq!(after, before);
    let r = c.append("k", "2", &["s3"]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body["first_version"], 3);
    let distinct: HashSet<String> = c.ids("k").await.into_iter().collect();
    assert_eq!(distinct.len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_stream_is_gone_until_appended_to_again_also_after_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 2).await;
    let c = Client::new(server.addr);
    let delete = |expected: &'static str| {
        let (http, base) = (c.http.clone(), c.base.clone());
        async move {
            let r = http
                .delete(format!(
                    "{base}/v1/topics/es/streams/d?expected_version={expected}"
                ))
                .send()
                .await
                .unwrap();
            reply(r).await
        }
    };
    assert_eq!(
        c.append("d", "no_stream", &["a0", "a1", "a2"]).await.status,
        201
    );
    assert_eq!(c.append("other", "no_stream", &["o0"]).await.status, 201);
    // A deletion checks the expected version like an append; nothing to delete is a 404.
    let r = delete("1").await;
    assert_eq!((r.status, &r.body["current_version"]), (409, &json!(2)));
    assert_eq!(delete("no_stream").await.status, 400);
    let r = delete("2").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["version"], 2);
    let marker = r.body["offset"].as_u64().unwrap();
    let partition = r.body["partition"].as_u64().unwrap();
    assert_eq!(delete("any").await.status, 404);
    // The stream does not exist any more: reads, its position and version checks say so.
    assert_eq!(c.get("/v1/topics/es/streams/d").await.status, 404);
    assert_eq!(c.get("/v1/topics/es/streams/d/events").await.status, 404);
    for expected in ["exists", "2"] {
        let r = c.append("d", expected, &["x"]).await;
        assert_eq!(r.status, 409, "{expected}: {}", r.body);
        assert_eq!(r.body["current_version"], Value::Null);
    }
    // Only a deletion writes the deletion type.
    let r = c
        .http
        .post(format!("{}/v1/topics/es/streams/d/events", c.base))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"z","source":"/s","type":"spate.stream.deleted"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Appending starts the stream again at the next version; a retry is recognized.
    let r = c.append("d", "no_stream", &["b3"]).await;
    assert_eq!((r.status, &r.body["first_version"]), (201, &json!(3)));
    let retry = c.append("d", "no_stream", &["b3"]).await;
    assert_eq!(
        (retry.status, &retry.body["offsets"]),
        (201, &r.body["offsets"])
    );
    assert_eq!(c.append("d", "3", &["b4"]).await.status, 201);
    let read = |q: &'static str| {
        let path = format!("/v1/topics/es/streams/d/events{q}");
        let c = &c;
        async move { c.get(&path).await }
    };
    let versions = |r: &Reply| -> Vec<(u64, String)> {
        r.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["version"].as_u64().unwrap(),
                    e["event"]["id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let want = vec![(3, "b3".to_string()), (4, "b4".to_string())];
    assert_eq!(versions(&read("").await), want);
    assert_eq!(versions(&read("?from_version=0").await), want);
    assert!(versions(&read("?direction=backward&from_version=2").await).is_empty());
    let info = c.get("/v1/topics/es/streams/d").await.body;
    assert_eq!(info["version"], 4);
    assert_eq!(info["first_offset"], r.body["offsets"][0]);
    // The topic still holds the deleted events and the deletion, as a Kafka consumer sees them.
    let page = c
        .get(&format!(
            "/v1/topics/es/events?partition={partition}&offset={marker}&limit=1"
        ))
        .await
        .body;
    let e = &page["events"][0];
    assert_eq!(e["offset"], marker, "{page}");
    assert_eq!(e["event"]["type"], "spate.stream.deleted");
    assert_eq!(e["event"]["partitionkey"], "d");
    // A stream subscription from version 0 starts after the deletion.
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "es", "stream": "d", "from_version": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let got: Vec<u64> = ws
        .events(2)
        .await
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![3, 4]);
    // Another door can delete too: a plain publish of the deletion type for the stream.
    let r = c
        .http
        .post(format!("{}/v1/topics/es/events", c.base))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"z","source":"/s","type":"spate.stream.deleted","partitionkey":"d"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c.append("d", "exists", &["x"]).await;
    assert_eq!((r.status, &r.body["current_version"]), (409, &Value::Null));
    let r = c.append("d", "no_stream", &["c5"]).await;
    assert_eq!((r.status, &r.body["first_version"]), (201, &json!(5)));
    // The live subscription goes on with the new version, leaving the deletion out.
    let got = ws.events(1).await;
    assert_eq!(
        (&got[0]["version"], &got[0]["event"]["id"]),
        (&json!(5), &json!("c5"))
    );
    drop(ws);
    let before = (
        read("").await.body,
        c.get("/v1/topics/es/streams/d").await.body,
    );
    assert_eq!(versions(&read("").await), vec![(5, "c5".to_string())]);
    server.stop().await;

    // The index rebuilt from the log (its directory removed while stopped) agrees.
    std::fs::remove_dir_all(dir.path().join("streams")).unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    let c = Client::new(server.addr);
    let after = (
        c.get("/v1/topics/es/streams/d/events").await.body,
        c.get("/v1/topics/es/streams/d").await.body,
    );
    assert_eq!(after, before);
    assert_eq!(c.ids("other").await, ["o0"]);
    let r = c.append("d", "5", &["c6"]).await;
    assert_eq!((r.status, &r.body["first_version"]), (201, &json!(6)));
    server.stop().await;
}

#[tokio::test]
async fn a_topics_streams_are_listed_page_by_page_without_deleted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 3).await;
    let c = Client::new(server.addr);
    let mut want = BTreeMap::new();
    for i in 0..40u64 {
        // Ids of several lengths, some with a colon, streams of 1 to 3 events.
        let stream = format!("s:{}{}", "x".repeat((i % 4) as usize), i);
        let n = 1 + i % 3;
        let ids: Vec<String> = (0..n).map(|k| format!("{stream}-{k}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(c.append(&stream, "no_stream", &ids).await.status, 201);
        want.insert(stream, n - 1);
    }
    // Deleted streams are not listed; one appended to again after its deletion is.
    for stream in ["s:0", "s:x1", "s:xx2"] {
        let r = c
            .http
            .delete(format!("{}/v1/topics/es/streams/{stream}", c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        want.remove(stream);
    }
    assert_eq!(c.append("s:xx2", "no_stream", &["again"]).await.status, 201);
    want.insert("s:xx2".into(), 3);
    let mut got = BTreeMap::new();
    let mut pages = 0;
    let mut after: Option<String> = None;
    loop {
        let mut path = "/v1/topics/es/streams?limit=7".to_string();
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", urlencode(a)));
        }
        let r = c.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.body);
        pages += 1;
        for s in r.body["streams"].as_array().unwrap() {
            let stream = s["stream"].as_str().unwrap().to_string();
            let info = c
                .get(&format!("/v1/topics/es/streams/{}", urlencode(&stream)))
                .await
                .body;
            assert_eq!(s["partition"], info["partition"], "{stream}");
            let earlier = got.insert(stream, s["version"].as_u64().unwrap());
            assert!(earlier.is_none(), "listed twice: {s}");
        }
        match r.body["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 20, "the listing does not end");
    }
    assert_eq!(got, want);
    assert!(pages >= 6, "{pages} pages of 7 for 38 streams");
    // Bad requests.
    for q in [
        "limit=0",
        "limit=1001",
        "after=nocolon",
        "after=x:s",
        "after=9:s",
        "what=1",
    ] {
        let r = c.get(&format!("/v1/topics/es/streams?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
    }
    assert_eq!(c.get("/v1/topics/nope/streams").await.status, 404);
    server.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn records_keyed_past_the_limit_or_not_in_utf8_join_no_stream() {
    use spate_broker::streams::STREAM_ID_BYTES_MAX;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 1).await;
    let c = Client::new(server.addr);
    assert_eq!(c.append("k", "no_stream", &["s0"]).await.status, 201);
    // As a Kafka producer may write it: a key of 100 KB, more than the index's store takes.
    let partition = server.broker.topic("es").unwrap().partitions[0].clone();
    let mut batch = spate_log::batch::encode(&[spate_log::batch::NewRecord {
        timestamp_ms: 1,
        key: Some(vec![b'x'; 100_000]),
        value: Some(b"{}".to_vec()),
        headers: Vec::new(),
    }])
    .unwrap();
    // And binary keys that are not UTF-8: both read as the text "\u{FFFD}\u{FFFD}k".
    let mut binary = spate_log::batch::encode(
        &[b"\x80\x81k".as_slice(), b"\x90\x91k".as_slice()].map(|key| {
            spate_log::batch::NewRecord {
                timestamp_ms: 1,
                key: Some(key.to_vec()),
                value: Some(b"{}".to_vec()),
                headers: Vec::new(),
            }
        }),
    )
    .unwrap();
    let config = server.broker.topic("es").unwrap().config();
    tokio::task::spawn_blocking(move || {
        partition.append(&mut batch, 1, &config).unwrap();
        partition.append(&mut binary, 1, &config).unwrap();
    })
    .await
    .unwrap();
    // The index goes on past it: streams are appended to and read as before.
    let r = c.append("k", "0", &["s1"]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(c.ids("k").await, ["s0", "s1"]);
    // Stream ids past the limit are refused, at it accepted.
    let long = "y".repeat(STREAM_ID_BYTES_MAX + 1);
    let r = c.append(&long, "any", &["l"]).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("limit"));
    let r = c
        .http
        .get(format!("{}/v1/topics/es/streams/{long}", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // An id holding U+FFFD could only name such binary keys, merged: refused.
    let r = c.append("%EF%BF%BD%EF%BF%BDk", "any", &["b"]).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("U+FFFD"));
    let at_limit = "y".repeat(STREAM_ID_BYTES_MAX);
    assert_eq!(c.append(&at_limit, "no_stream", &["m"]).await.status, 201);
    assert_eq!(c.ids(&at_limit).await, ["m"]);
    server.stop().await;
}

#[tokio::test]
async fn a_stream_subscription_catches_up_then_follows_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("es", 3).await;
    let c = Arc::new(Client::new(server.addr));
    // Ten events in the stream, and other streams' events around them.
    for v in 0..10u64 {
        let expected = if v == 0 {
            "no_stream".to_string()
        } else {
            (v - 1).to_string()
        };
        assert_eq!(
            c.append("order-42", &expected, &[&format!("v{v}")])
                .await
                .status,
            201
        );
        assert_eq!(
            c.append(&format!("noise-{v}"), "any", &["n"]).await.status,
            201
        );
    }
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "es", "stream": "order-42", "from_version": 7}))
        .await;
    let r = ws.recv().await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["from_version"], 7);
    // While the subscription catches up, a writer keeps appending: the switch to the live tail
    // must neither skip nor repeat a version.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for v in 10..60u64 {
                let r = c
                    .append("order-42", &(v - 1).to_string(), &[&format!("v{v}")])
                    .await;
                assert_eq!(r.status, 201, "{}", r.body);
                c.append("noise-x", "any", &["n"]).await;
            }
        })
    };
    let events = ws.events(53).await;
    writer.await.unwrap();
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (7..60).collect::<Vec<_>>());
    for e in &events {
        assert_eq!(e["event"]["id"], format!("v{}", e["version"]));
    }
    assert!(
        ws.recv_within(std::time::Duration::from_millis(300))
            .await
            .is_none()
    );

    // SSE too, with the version as the event id, resuming from it.
    let r = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/topics/es/sse?stream=order-42",
            server.addr
        ))
        .header("Last-Event-ID", "57")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    use futures_util::StreamExt;
    let mut text = String::new();
    while text.matches("\n\n").count() < 2 {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // The id is the version, then the topic's creation time.
    let created = server.broker.topic("es").unwrap().created_ms;
    assert!(text.contains(&format!("id: 58@{created}\n")), "{text}");
    assert!(text.contains(&format!("id: 59@{created}\n")), "{text}");
    assert!(text.contains("\"version\":58"), "{text}");
    assert!(!text.contains("id: 57@"), "{text}");
    server.stop().await;
}
