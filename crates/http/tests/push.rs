//! Push channels against a real server on loopback: a WebSocket client (tokio-tungstenite) and an
//! SSE client (reqwest reading the event stream), with resume, filters, restarts and slow consumers.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::start;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spate_broker::Event;
use spate_http::push::PushLimits;
use tokio_tungstenite::tungstenite::Message;

fn numbers(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["event"]["data"]["n"].as_u64().unwrap())
        .collect()
}

/// Checks offsets rise within each partition, and returns the next offset per partition.
fn check_order(events: &[Value], mut next: HashMap<String, u64>) -> HashMap<String, u64> {
    for e in events {
        let p = e["partition"].to_string();
        let o = e["offset"].as_u64().unwrap();
        let n = next.entry(p.clone()).or_insert(0);
        assert!(o >= *n, "partition {p}: offset {o} after {n}");
        *n = o + 1;
    }
    next
}

#[tokio::test]
async fn websocket_subscribe_publish_and_receive() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s1", "topic": "orders", "from": "latest"}))
        .await;
    let m = ws.recv().await;
    assert_eq!(m["op"], "subscribed");
    assert_eq!(m["from"], json!({"0": 0, "1": 0}));
    ws.send(json!({"op": "publish", "topic": "orders", "ref": "r1", "event": {
        "specversion": "1.0", "id": "x1", "source": "/t", "type": "order.created", "data": {"a": 1}
    }}))
    .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(ws.recv().await);
    }
    let published = got.iter().find(|m| m["op"] == "published").unwrap();
    let event = got.iter().find(|m| m["op"] == "event").unwrap();
    assert_eq!(published["ref"], "r1");
    assert_eq!(event["sub"], "s1");
    assert_eq!(event["partition"], published["partition"]);
    assert_eq!(event["offset"], published["offset"]);
    assert_eq!(event["event"]["id"], "x1");
    assert_eq!(event["event"]["data"], json!({"a": 1}));

    // Two subscriptions on one connection, then one of them closed.
    ws.send(json!({"op": "subscribe", "id": "s2", "topic": "orders", "from": "earliest"}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let replay = ws.events(1).await;
    assert_eq!(replay[0]["sub"], "s2");
    assert_eq!(replay[0]["event"]["id"], "x1");
    ws.send(json!({"op": "unsubscribe", "id": "s2"})).await;
    assert_eq!(ws.recv().await, json!({"op": "unsubscribed", "id": "s2"}));
    server.publish("orders", 0, 3).await;
    let live = ws.events(3).await;
    assert!(live.iter().all(|e| e["sub"] == "s1"));
    assert!(ws.recv_within(Duration::from_millis(300)).await.is_none());
    server.stop().await;
}

#[tokio::test]
async fn nothing_of_a_subscription_follows_its_unsubscribed_reply() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    server.publish("orders", 0, 3000).await;
    let mut ws = server.ws().await;
    // Unsubscribed while it still streams its backlog, a few times over.
    for round in 0..5 {
        let id = format!("s{round}");
        ws.send(json!({"op": "subscribe", "id": id, "topic": "orders", "from": "earliest"}))
            .await;
        assert_eq!(ws.recv().await["op"], "subscribed");
        let first = ws.recv().await;
        assert_eq!((&first["op"], &first["sub"]), (&json!("event"), &json!(id)));
        ws.send(json!({"op": "unsubscribe", "id": id})).await;
        loop {
            let m = ws.recv().await;
            if m["op"] == "unsubscribed" {
                assert_eq!(m["id"], id);
                break;
            }
            assert_eq!(m["sub"], id, "{m}");
        }
        if let Some(m) = ws.recv_within(Duration::from_millis(200)).await {
            panic!("{m} after the unsubscribed reply of {id}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn websocket_errors_are_replies_not_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let mut ws = server.ws().await;
    let cases = [
        (json!("not an object"), "malformed"),
        (json!({"op": "dance"}), "unknown-op"),
        (json!({"op": "subscribe", "topic": "orders"}), "malformed"),
        (
            json!({"op": "subscribe", "id": "a", "topic": "nope"}),
            "topic-not-found",
        ),
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders", "filter": "type =="}),
            "invalid-filter",
        ),
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders", "types": "order.>.x"}),
            "invalid-filter",
        ),
        // Quadratic in the event's size: refused before any event is judged.
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders",
                   "filter": "data.items.all(x, data.items.exists(y, y == x))"}),
            "invalid-filter",
        ),
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders", "from": "yesterday"}),
            "malformed",
        ),
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders", "from": {"5": 0}}),
            "partition-not-found",
        ),
        (
            json!({"op": "unsubscribe", "id": "zzz"}),
            "unknown-subscription",
        ),
        // A misspelt field is refused rather than ignored (here: no filter at all).
        (
            json!({"op": "subscribe", "id": "a", "topic": "orders", "fliter": "data.n > 1"}),
            "malformed",
        ),
        (
            json!({"op": "publish", "topic": "orders", "ref": "r", "partition": 0, "event": {
            "specversion": "1.0", "id": "1", "source": "/s", "type": "t"}}),
            "malformed",
        ),
        (
            json!({"op": "ack", "ack_id": "x", "delay_ms": 5}),
            "malformed",
        ),
        (
            json!({"op": "publish", "topic": "orders", "ref": "r", "event": {"id": "1"}}),
            "invalid-event",
        ),
        (
            json!({"op": "publish", "topic": "nope", "ref": "r", "event": {
            "specversion": "1.0", "id": "1", "source": "/s", "type": "t"}}),
            "topic-not-found",
        ),
    ];
    for (msg, code) in cases {
        ws.send(msg.clone()).await;
        let reply = ws.recv().await;
        assert_eq!(reply["op"], "error", "{msg} -> {reply}");
        assert_eq!(reply["code"], code, "{msg} -> {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    ws.socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    assert_eq!(ws.recv().await["code"], "malformed-json");
    // The connection still works, and a filter's reason names the problem.
    ws.send(json!({"op": "subscribe", "id": "a", "topic": "orders", "filter": "data.n >"}))
        .await;
    let reply = ws.recv().await;
    assert!(
        reply["message"].as_str().unwrap().starts_with("filter:"),
        "{reply}"
    );
    ws.send(json!({"op": "subscribe", "id": "a", "topic": "orders"}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    ws.send(json!({"op": "subscribe", "id": "a", "topic": "orders"}))
        .await;
    assert_eq!(ws.recv().await["code"], "duplicate-id");
    server.stop().await;
}

#[tokio::test]
async fn filters_and_type_patterns_select_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("pay", 3).await;
    let mut ws = server.ws().await;
    ws.send(
        json!({"op": "subscribe", "id": "big", "topic": "pay", "from": "earliest",
        "filter": "type == \"payment.created\" && data.amount > 1000"}),
    )
    .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    ws.send(
        json!({"op": "subscribe", "id": "any", "topic": "pay", "from": "earliest",
        "types": "payment.>"}),
    )
    .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let events: Vec<Event> = [
        ("payment.created", json!({"amount": 1500})),
        ("payment.created", json!({"amount": 10})),
        ("payment.refund.done", json!({"amount": 5000})),
        ("order.created", json!({"amount": 9000})),
        ("payment.created", json!({"other": 1})),
        ("payment.created", json!({"amount": 2000.5})),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (t, d))| {
        Event::from_json(
            json!({"specversion": "1.0", "id": format!("p{i}"), "source": "/s",
            "type": t, "data": d}),
        )
        .unwrap()
    })
    .collect();
    server.broker.publish("pay", events).await.unwrap();
    let mut by_sub: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(m) = ws.recv_within(Duration::from_millis(500)).await {
        by_sub
            .entry(m["sub"].as_str().unwrap().to_string())
            .or_default()
            .push(m["event"]["id"].as_str().unwrap().to_string());
    }
    let mut big = by_sub.remove("big").unwrap();
    big.sort();
    assert_eq!(big, ["p0", "p5"]);
    let mut any = by_sub.remove("any").unwrap();
    any.sort();
    assert_eq!(any, ["p0", "p1", "p2", "p4", "p5"]);
    server.stop().await;
}

#[tokio::test]
async fn websocket_resumes_exactly_after_the_last_event_seen() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 3).await;
    server.publish("t", 0, 50).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "t", "from": "earliest"}))
        .await;
    let sub = ws.recv().await;
    let start: HashMap<String, u64> = sub["from"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    let first = ws.events(50).await;
    let next = check_order(&first, start);
    drop(ws);
    server.publish("t", 50, 1000).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "t", "from": next}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let rest = ws.events(1000).await;
    check_order(&rest, next);
    let mut got = numbers(&rest);
    got.sort();
    assert_eq!(got, (50..1050).collect::<Vec<_>>());
    assert!(ws.recv_within(Duration::from_millis(300)).await.is_none());
    server.stop().await;
}

/// Reads SSE messages from a response body.
struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

#[derive(Debug)]
struct SseMessage {
    id: Option<String>,
    event: Option<String>,
    data: Value,
}

impl Sse {
    async fn open(addr: std::net::SocketAddr, query: &str, last_id: Option<&str>) -> Sse {
        let mut req = reqwest::Client::new().get(format!("http://{addr}/v1/topics/t/sse?{query}"));
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Sse {
            body: Box::pin(res.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a heartbeat comment
                }
                return Some(SseMessage {
                    id,
                    event,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            match tokio::time::timeout(Duration::from_secs(10), self.body.next()).await {
                Ok(Some(Ok(b))) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                _ => return None,
            }
        }
    }

    async fn take(&mut self, n: usize) -> (Vec<Value>, String) {
        let mut out = Vec::new();
        let mut last = String::new();
        while out.len() < n {
            let m = self.next().await.expect("an SSE message");
            assert_eq!(m.event, None, "{m:?}");
            last = m.id.unwrap();
            out.push(m.data);
        }
        (out, last)
    }
}

#[tokio::test]
async fn sse_resumes_with_last_event_id_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 3).await;
    server.publish("t", 0, 30).await;
    let mut sse = Sse::open(server.addr, "from=earliest", None).await;
    let (first, last) = sse.take(30).await;
    assert_eq!(numbers(&first).len(), 30);
    // The cursor names every partition: "0:a,1:b,2:c".
    assert_eq!(last.split(',').count(), 3, "{last}");
    drop(sse);
    server.publish("t", 30, 1000).await;
    let mut sse = Sse::open(server.addr, "from=earliest", Some(&last)).await;
    let (rest, last) = sse.take(1000).await;
    let mut got = numbers(&rest);
    got.sort();
    assert_eq!(got, (30..1030).collect::<Vec<_>>());
    drop(sse);

    // Restart the server on the same data; the cursor still resumes exactly.
    server.stop().await;
    let server = start(dir.path(), PushLimits::default()).await;
    server.publish("t", 1030, 200).await;
    let mut sse = Sse::open(server.addr, "", Some(&last)).await;
    let (after, _) = sse.take(200).await;
    let mut got = numbers(&after);
    got.sort();
    assert_eq!(got, (1030..1230).collect::<Vec<_>>());

    // Filtered streams and bad input.
    let mut sse = Sse::open(
        server.addr,
        "from=earliest&filter=data.n%20%3E%3D%201200",
        None,
    )
    .await;
    let (big, _) = sse.take(30).await;
    assert!(numbers(&big).iter().all(|n| *n >= 1200));
    let client = reqwest::Client::new();
    for (q, code) in [
        ("filter=data.n%20%3E", 400),
        ("types=a..b", 400),
        ("from=yesterday", 400),
        ("bogus=1", 400),
    ] {
        let r = client
            .get(format!("http://{}/v1/topics/t/sse?{q}", server.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code, "{q}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = client
        .get(format!("http://{}/v1/topics/t/sse", server.addr))
        .header("Last-Event-ID", "garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .get(format!("http://{}/v1/topics/none/sse", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn an_idle_sse_stream_gets_heartbeats_and_ends_when_its_client_goes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        PushLimits {
            heartbeat: Duration::from_millis(100),
            ..PushLimits::default()
        },
    )
    .await;
    server.topic("t", 1).await;
    let res = reqwest::Client::new()
        .get(format!("http://{}/v1/topics/t/sse", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-cache");
    let mut body = Box::pin(res.bytes_stream());
    let mut text = String::new();
    // Nothing is published: all that comes is comments, one per heartbeat interval.
    let until = tokio::time::Instant::now() + Duration::from_millis(650);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(until, body.next()).await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let blocks: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(text.ends_with("\n\n"), "{text:?}");
    assert!(blocks.iter().all(|b| b.starts_with(':')), "{text:?}");
    assert!(
        (3..=7).contains(&blocks.len()),
        "{} comments in {text:?}",
        blocks.len()
    );
    assert_eq!(server.broker.live_feeds("t"), 1);

    // An event still comes through after the comments.
    server.publish("t", 0, 1).await;
    let mut text = String::new();
    while !text.contains("data:") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the event")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("id: 0:0@"), "{text:?}");
    drop(body);
    server.stop().await;

    // A client that goes while the topic is idle and no heartbeat is due (the default interval,
    // 15 s): its stream ends at once and leaves the live ring.
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 1).await;
    let sse = Sse::open(server.addr, "", None).await;
    assert_eq!(server.broker.live_feeds("t"), 1);
    drop(sse);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while server.broker.live_feeds("t") != 0 {
        assert!(
            std::time::Instant::now() < until,
            "the stream outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn an_sse_message_stays_on_one_data_line_when_the_event_data_has_line_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 1).await;
    // JSON data is stored as sent, line breaks and all.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/topics/t/events", server.addr))
        .header("ce-type", "pretty")
        .header("ce-source", "/test")
        .header("ce-id", "p1")
        .header("content-type", "application/json")
        .body("{\r\n  \"n\": 1,\n  \"s\": \"a\\nb\"\n}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    server.publish("t", 2, 1).await;
    let mut sse = Sse::open(server.addr, "from=earliest", None).await;
    let (events, _) = sse.take(2).await;
    assert_eq!(events[0]["event"]["data"], json!({"n": 1, "s": "a\nb"}));
    assert_eq!(events[1]["event"]["data"], json!({"n": 2}));
    server.stop().await;
}

#[tokio::test]
async fn a_slow_websocket_consumer_is_cut_off_while_others_get_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        PushLimits {
            max_behind: Duration::from_millis(1500),
            send_queue: 16,
            ..PushLimits::default()
        },
    )
    .await;
    server.topic("t", 1).await;
    let mut slow = server.ws().await;
    slow.send(json!({"op": "subscribe", "id": "s", "topic": "t"}))
        .await;
    assert_eq!(slow.recv().await["op"], "subscribed");
    let mut normal = server.ws().await;
    normal
        .send(json!({"op": "subscribe", "id": "n", "topic": "t"}))
        .await;
    assert_eq!(normal.recv().await["op"], "subscribed");
    // 12,000 events of about 1 KiB: more than the live ring, the queue and the socket buffers.
    let total = 12_000u64;
    let publisher = {
        let broker = server.broker.clone();
        tokio::spawn(async move {
            let pad = "x".repeat(1000);
            for chunk in 0..(total / 500) {
                let events: Vec<Event> = (chunk * 500..(chunk + 1) * 500)
                    .map(|i| {
                        Event::from_json(json!({"specversion": "1.0", "id": format!("e{i}"),
                            "source": "/s", "type": "t", "data": {"n": i, "pad": pad}}))
                        .unwrap()
                    })
                    .collect();
                broker.publish("t", events).await.unwrap();
            }
        })
    };
    let normal_events = normal.events(total as usize).await;
    assert_eq!(numbers(&normal_events), (0..total).collect::<Vec<_>>());
    publisher.await.unwrap();
    // The slow one has read nothing so far; it now reads about 1 KiB per 100 ms for 2 s, then as
    // fast as it can: it finds itself disconnected with 4008 long before the end.
    let mut seen = 0u64;
    let slow_until = std::time::Instant::now() + Duration::from_secs(2);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.socket.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => {
                seen += 1;
                if std::time::Instant::now() < slow_until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?} after {seen} events"),
        }
    };
    let frame = close.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4008);
    assert!(frame.reason.contains("slow consumer"), "{}", frame.reason);
    assert!(seen < total, "{seen}");
    server.stop().await;
}

#[tokio::test]
async fn a_position_in_a_deleted_topic_resumes_the_topic_created_again_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 1).await;
    server.publish("t", 0, 5).await;
    let mut sse = Sse::open(server.addr, "from=earliest", None).await;
    let (_, cursor) = sse.take(5).await;
    drop(sse);
    // One stream's cursor: the version of its last event seen (n = 2 is stream k2's first).
    let mut sse = Sse::open(server.addr, "stream=k2", None).await;
    let (events, stream_cursor) = sse.take(1).await;
    assert_eq!(numbers(&events), [2]);
    drop(sse);
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "t", "from": "earliest"}))
        .await;
    let created = ws.recv().await["topic_created_ms"].clone();
    assert!(created.is_i64(), "{created}");
    assert_eq!(numbers(&ws.events(5).await), (0..5).collect::<Vec<_>>());
    drop(ws);
    assert!(cursor.ends_with(&format!("@{created}")), "{cursor}");

    // The topic is deleted and created again; it grows past the old positions.
    server.broker.delete_topic("t".into()).await.unwrap();
    server.topic("t", 1).await;
    server.publish("t", 100, 8).await;
    // Positions in the old topic read the new one from its start: nothing of it is skipped.
    let mut sse = Sse::open(server.addr, "", Some(&cursor)).await;
    let (events, new_cursor) = sse.take(8).await;
    assert_eq!(numbers(&events), (100..108).collect::<Vec<_>>());
    assert!(
        !new_cursor.ends_with(&format!("@{created}")),
        "{new_cursor}"
    );
    drop(sse);
    // Stream k2 of the new topic holds n = 100 and 107; an old cursor reads both.
    let mut sse = Sse::open(server.addr, "stream=k2", Some(&stream_cursor)).await;
    let (events, _) = sse.take(2).await;
    assert_eq!(numbers(&events), [100, 107]);
    drop(sse);
    let mut ws = server.ws().await;
    ws.send(
        json!({"op": "subscribe", "id": "s", "topic": "t", "from": {"0": 5},
        "topic_created_ms": created}),
    )
    .await;
    let reply = ws.recv().await;
    assert_eq!(reply["from"], json!({"0": 0}), "{reply}");
    assert_ne!(reply["topic_created_ms"], created);
    assert_eq!(numbers(&ws.events(8).await), (100..108).collect::<Vec<_>>());
    // Positions that name no topic are taken as they are; so are those of the current topic.
    let now = reply["topic_created_ms"].clone();
    for (id, extra) in [("a", json!(null)), ("b", now)] {
        ws.send(
            json!({"op": "subscribe", "id": id, "topic": "t", "from": {"0": 5},
            "topic_created_ms": extra}),
        )
        .await;
        assert_eq!(ws.recv().await["from"], json!({"0": 5}));
        assert_eq!(numbers(&ws.events(3).await), (105..108).collect::<Vec<_>>());
    }
    let mut sse = Sse::open(server.addr, "", Some("0:4")).await;
    let (events, _) = sse.take(3).await;
    assert_eq!(numbers(&events), (105..108).collect::<Vec<_>>());
    // A creation time that is not a number is refused.
    ws.send(
        json!({"op": "subscribe", "id": "c", "topic": "t", "from": "earliest",
        "topic_created_ms": 1}),
    )
    .await;
    assert_eq!(ws.recv().await["code"], "malformed");
    ws.send(
        json!({"op": "subscribe", "id": "c", "topic": "t", "from": {"0": 1},
        "topic_created_ms": "x"}),
    )
    .await;
    assert_eq!(ws.recv().await["code"], "malformed");
    let r = reqwest::Client::new()
        .get(format!("http://{}/v1/topics/t/sse", server.addr))
        .header("Last-Event-ID", "0:4@soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    server.stop().await;
}

#[tokio::test]
async fn a_position_past_the_end_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("t", 2).await;
    server.publish("t", 0, 4).await;
    let described = common::Http::new(server.addr).get("/v1/topics/t").await;
    let ends: Vec<u64> = (0..2)
        .map(|p| {
            described.body["partitions"][p]["log_end_offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut ws = server.ws().await;
    for from in [
        json!({"0": u64::MAX}),
        json!({"1": ends[1] + 1}),
        json!({"0": ends[0], "1": 1000}),
    ] {
        ws.send(json!({"op": "subscribe", "id": "s", "topic": "t", "from": from}))
            .await;
        let reply = ws.recv().await;
        assert_eq!(reply["op"], "error", "{from}: {reply}");
        assert_eq!(reply["code"], "offset-out-of-range", "{from}: {reply}");
    }
    // At the end exactly is where a consumer that saw everything resumes.
    let at_end = json!({"0": ends[0], "1": ends[1]});
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "t", "from": at_end}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    server.publish("t", 4, 3).await;
    assert_eq!(numbers(&ws.events(3).await).len(), 3);
    // SSE: a cursor past the end (and one whose next offset would overflow) is a 400.
    let client = reqwest::Client::new();
    for cursor in [
        format!("0:{},1:{}", ends[0] + 5, ends[1]),
        "0:9223372036854775807".to_string(),
    ] {
        let r = client
            .get(format!("http://{}/v1/topics/t/sse", server.addr))
            .header("Last-Event-ID", &cursor)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{cursor}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_message_over_the_limit_closes_with_1009_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        PushLimits {
            max_message_bytes: 4096,
            ..PushLimits::default()
        },
    )
    .await;
    server.topic("t", 1).await;
    let mut ws = server.ws().await;
    // Within the limit: an answer. Over it: a close frame saying why.
    ws.send(json!({"op": "subscribe", "id": "s", "topic": "t"}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let big = json!({"op": "publish", "topic": "t", "ref": "r", "event": {"specversion": "1.0",
        "id": "e", "source": "/s", "type": "t", "data": "x".repeat(8000)}});
    ws.socket
        .send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.socket.next())
            .await
            .expect("the server answers")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a code"),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1009);
    assert!(close.reason.contains("4096 bytes"), "{}", close.reason);
    // Nothing of it was published.
    let r = reqwest::get(format!(
        "http://{}/v1/topics/t/events?partition=0&offset=0",
        server.addr
    ))
    .await
    .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["events"], json!([]));
    server.stop().await;
}
