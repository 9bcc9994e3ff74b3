//! Projections over HTTP against a real server on loopback: aggregates, merge patches and folds
//! queried by key and range, read-your-writes, errors halting or skipped, and rebuilds.

mod common;

use std::time::{Duration, Instant};

use common::{Http, start_with_projections};
use serde_json::{Value, json};

/// The API client with this file's helpers.
struct Client(Http);

impl std::ops::Deref for Client {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.0
    }
}

impl Client {
    fn new(addr: std::net::SocketAddr) -> Client {
        Client(Http::new(addr))
    }

    /// Publishes events (key, data) in one request; returns the position token.
    async fn publish(&self, topic: &str, events: &[(&str, Value)]) -> String {
        let batch: Vec<Value> = events
            .iter()
            .enumerate()
            .map(|(i, (k, d))| {
                json!({"specversion": "1.0", "id": format!("{k}-{i}"), "source": "/t",
                    "type": "order.created", "partitionkey": k, "data": d})
            })
            .collect();
        let r = self
            .http
            .post(format!("{}/v1/topics/{topic}/events", self.base))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&batch).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let body: Value = r.json().await.unwrap();
        body["position"].as_str().unwrap().to_string()
    }

    /// Creates a projection, expecting 201.
    async fn define(&self, name: &str, definition: Value) {
        let r = self
            .put(&format!("/v1/projections/{name}"), definition)
            .await;
        assert_eq!(r.status, 201, "{name}: {:?}", r.body);
    }

    /// All rows of a projection (up to 1,000) once it has applied everything before
    /// `position`, as (key, value).
    async fn rows_after(&self, name: &str, position: &str) -> Vec<(Value, Value)> {
        let r = self
            .get(&format!(
                "/v1/projections/{name}/rows?limit=1000&after_position={position}"
            ))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].clone(), r["value"].clone()))
            .collect()
    }

    async fn status_until(&self, name: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.get(&format!("/v1/projections/{name}")).await.body;
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A server with projections and a topic `orders` of `partitions`, and a client.
async fn setup(partitions: u32) -> (tempfile::TempDir, common::Server, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_projections(dir.path()).await;
    server.topic("orders", partitions).await;
    let c = Client::new(server.addr);
    (dir, server, c)
}

#[tokio::test]
async fn aggregates_are_queried_by_key_and_range_with_read_your_writes() {
    let (_dir, server, c) = setup(3).await;
    c.define(
        "revenue",
        json!({"topic": "orders", "types": "order.*",
                "reduce": {"aggregate": {"orders": "count()", "revenue": "sum(data.amount)"}}}),
    )
    .await;
    let mut events = Vec::new();
    for i in 0..30u64 {
        events.push((
            ["cust-a", "cust-b", "cust-c", "other"][(i % 4) as usize],
            json!({"amount": i}),
        ));
    }
    let position = c.publish("orders", &events).await;
    // Read-your-writes: the rows reflect the publish when asked after its position.
    let row = c
        .get(&format!(
            "/v1/projections/revenue/rows/cust-a?after_position={position}"
        ))
        .await;
    assert_eq!(row.status, 200, "{:?}", row.body);
    let amounts_a: u64 = (0..30u64).filter(|i| i % 4 == 0).sum();
    assert_eq!(
        row.body["value"],
        json!({"orders": 8, "revenue": amounts_a})
    );
    assert_eq!(row.body["key"], "cust-a");
    // Range queries in key order, paginated.
    let page = c
        .get("/v1/projections/revenue/rows?prefix=cust-&limit=2")
        .await;
    let keys: Vec<&str> = page.body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["cust-a", "cust-b"]);
    assert_eq!(page.body["next"], "cust-b");
    let rest = c
        .get("/v1/projections/revenue/rows?prefix=cust-&limit=2&after=cust-b")
        .await;
    assert_eq!(rest.body["rows"][0]["key"], "cust-c");
    assert_eq!(rest.body["next"], Value::Null);
    assert_eq!(
        c.get("/v1/projections/revenue/rows/nobody").await.status,
        404
    );
    let status = c.status_until("revenue", |s| s["lag_records"] == 0).await;
    assert_eq!(status["status"], "running");
    assert_eq!(status["errors"], 0);

    // A new definition folds again from the start.
    let r = c
        .put(
            "/v1/projections/revenue",
            json!({"topic": "orders", "reduce": {"aggregate": {"largest": "max(data.amount)"}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let row = c
        .get(&format!(
            "/v1/projections/revenue/rows/other?after_position={position}"
        ))
        .await;
    assert_eq!(row.body["value"], json!({"largest": 27}));
    let r = c
        .send(
            reqwest::Method::POST,
            "/v1/projections/revenue/rebuild",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let row = c
        .get(&format!(
            "/v1/projections/revenue/rows/other?after_position={position}"
        ))
        .await;
    assert_eq!(row.body["value"], json!({"largest": 27}));
    server.stop().await;
}

#[tokio::test]
async fn merge_patches_and_folds_keep_entity_state() {
    let (_dir, server, c) = setup(2).await;
    for (name, reduce) in [
        ("state", json!({"merge": true})),
        (
            "totals",
            json!({"init": "{'count': 0, 'total': 0}",
                "apply": "{'count': state.count + 1, 'total': state.total + data.amount}"}),
        ),
    ] {
        c.define(name, json!({"topic": "orders", "reduce": reduce}))
            .await;
    }
    let position = c
        .publish(
            "orders",
            &[
                ("o-1", json!({"status": "new", "amount": 5, "note": "gift"})),
                ("o-1", json!({"status": "paid", "amount": 7, "note": null})),
            ],
        )
        .await;
    let state = c
        .get(&format!(
            "/v1/projections/state/rows/o-1?after_position={position}"
        ))
        .await;
    assert_eq!(state.body["value"], json!({"status": "paid", "amount": 7}));
    let totals = c
        .get(&format!(
            "/v1/projections/totals/rows/o-1?after_position={position}"
        ))
        .await;
    assert_eq!(totals.body["value"], json!({"count": 2, "total": 12}));
    server.stop().await;
}

#[tokio::test]
async fn a_failing_event_halts_or_is_skipped_as_defined() {
    let (_dir, server, c) = setup(1).await;
    for (name, on_error) in [("strict", "halt"), ("lenient", "skip")] {
        c.define(
            name,
            json!({"topic": "orders", "on_error": on_error,
                    "reduce": {"aggregate": {"revenue": "sum(data.amount)"}}}),
        )
        .await;
    }
    let position = c
        .publish(
            "orders",
            &[
                ("k", json!({"amount": 1})),
                ("k", json!({"amount": "two"})),
                ("k", json!({"amount": 3})),
            ],
        )
        .await;
    let lenient = c
        .get(&format!(
            "/v1/projections/lenient/rows/k?after_position={position}"
        ))
        .await;
    assert_eq!(lenient.body["value"], json!({"revenue": 4}));
    let s = c.status_until("lenient", |s| s["errors"] == 1).await;
    assert!(
        s["last_error"].as_str().unwrap().contains("offset 0:1"),
        "{s}"
    );
    assert_eq!(s["status"], "running");

    let s = c.status_until("strict", |s| s["status"] == "halted").await;
    assert!(
        s["last_error"].as_str().unwrap().contains("offset 0:1"),
        "{s}"
    );
    assert!(
        s["last_error"].as_str().unwrap().contains("not a number"),
        "{s}"
    );
    assert_eq!(s["lag_records"], 2);
    // It stopped before the offending event; a read after the publish times out.
    let r = c
        .get(&format!(
            "/v1/projections/strict/rows/k?after_position={position}&timeout_ms=300"
        ))
        .await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert_eq!(
        c.get("/v1/projections/strict/rows/k").await.body["value"],
        json!({"revenue": 1})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_row_key_past_the_limit_fails_its_event_only() {
    use spate_broker::projections::reduce::ROW_KEY_BYTES_MAX;
    let (_dir, server, c) = setup(1).await;
    c.define(
        "by_name",
        json!({"topic": "orders", "key": "data.name", "on_error": "skip",
                "reduce": {"aggregate": {"n": "count()"}}}),
    )
    .await;
    let long = "n".repeat(ROW_KEY_BYTES_MAX + 1);
    let position = c
        .publish(
            "orders",
            &[
                ("k", json!({"name": "a"})),
                ("k", json!({"name": long})),
                ("k", json!({"name": "a"})),
            ],
        )
        .await;
    let r = c
        .get(&format!(
            "/v1/projections/by_name/rows/a?after_position={position}"
        ))
        .await;
    assert_eq!(r.body["value"], json!({"n": 2}), "{:?}", r.body);
    let s = c.status_until("by_name", |s| s["errors"] == 1).await;
    assert!(s["last_error"].as_str().unwrap().contains("row key"), "{s}");
    assert_eq!(s["status"], "running");
    server.stop().await;
}

#[tokio::test]
async fn invalid_definitions_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_projections(dir.path()).await;
    server.topic("orders", 1).await;
    server.topic("other", 1).await;
    let c = Client::new(server.addr);
    for (body, needle) in [
        (json!({"topic": "orders", "reduce": {}}), "exactly one"),
        (
            json!({"topic": "orders", "reduce": {"aggregate": {"n": "median(x)"}}}),
            "unknown function",
        ),
        (
            json!({"topic": "orders", "reduce": {"merge": true}, "filter": "data.x >"}),
            "filter",
        ),
        (
            json!({"topic": "orders", "reduce": {"merge": true}, "key": "("}),
            "key",
        ),
        (
            json!({"topic": "orders", "reduce": {"merge": true}, "colour": 1}),
            "colour",
        ),
        (
            json!({"topic": "__subscriptions", "reduce": {"merge": true}}),
            "internal",
        ),
        (
            json!({"topic": "orders", "reduce": {"merge": true},
                   "filter": "data.l.all(x, data.l.exists(y, y == x))"}),
            "must range over a part",
        ),
    ] {
        let r = c.put("/v1/projections/p", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(needle),
            "{body}: {:?}",
            r.body
        );
    }
    let r = c
        .put(
            "/v1/projections/p",
            json!({"topic": "nope", "reduce": {"merge": true}}),
        )
        .await;
    assert_eq!(r.status, 404);
    c.define("p", json!({"topic": "orders", "reduce": {"merge": true}}))
        .await;
    let r = c
        .put(
            "/v1/projections/p",
            json!({"topic": "other", "reduce": {"merge": true}}),
        )
        .await;
    assert_eq!(r.status, 409);
    let r = c
        .get("/v1/projections/p/rows/x?after_position=other:0.1")
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = c
        .get("/v1/projections/p/rows/x?after_position=garbage")
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(c.get("/v1/projections/p/rows?limit=0").await.status, 400);
    assert_eq!(
        c.get("/v1/projections").await.body["projections"][0]["name"],
        "p"
    );
    let r = c
        .send(reqwest::Method::DELETE, "/v1/projections/p", None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(c.get("/v1/projections/p").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_server_holds_at_most_the_projection_limit() {
    let max = spate_broker::projections::PROJECTIONS_MAX;
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_projections(dir.path()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    let merge = json!({"topic": "orders", "reduce": {"merge": true}});
    for i in 0..max {
        c.define(&format!("p{i}"), merge.clone()).await;
    }
    let r = c.put("/v1/projections/one-more", merge.clone()).await;
    r.assert_refused(400, &format!("at most {max}"));
    assert_eq!(c.get("/v1/projections/one-more").await.status, 404);
    // A replacement is not a new projection; a delete frees a place.
    assert_eq!(c.put("/v1/projections/p0", merge.clone()).await.status, 200);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/projections/p1", None)
        .await;
    assert_eq!(r.status, 204);
    c.define("one-more", merge).await;
    server.stop().await;
}

#[tokio::test]
async fn a_watch_pushes_each_row_change_once_in_order() {
    let (_dir, server, c) = setup(2).await;
    c.define(
        "sums",
        json!({"topic": "orders", "reduce": {"aggregate": {"sum": "sum(data.amount)"}}}),
    )
    .await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "watch", "id": "w1", "projection": "sums", "key": "a"}))
        .await;
    assert_eq!(ws.recv().await["op"], "watching");
    ws.send(json!({"op": "watch", "id": "w2", "projection": "sums", "prefix": "b"}))
        .await;
    assert_eq!(ws.recv().await["op"], "watching");
    ws.send(json!({"op": "watch", "projection": "nope"})).await;
    assert_eq!(ws.recv().await["code"], "projection-not-found");
    let mut events = Vec::new();
    for i in 1..=5u64 {
        events.push(("a", json!({"amount": i})));
        events.push(("b1", json!({"amount": 10 * i})));
        events.push(("c", json!({"amount": 100})));
    }
    c.publish("orders", &events).await;
    let mut a = Vec::new();
    let mut b = Vec::new();
    while a.len() < 5 || b.len() < 5 {
        let m = ws.recv().await;
        assert_eq!(m["op"], "row", "{m}");
        assert_eq!(m["projection"], "sums");
        match m["id"].as_str().unwrap() {
            "w1" => {
                assert_eq!(m["key"], "a");
                a.push(m["value"]["sum"].as_u64().unwrap());
            }
            "w2" => {
                assert_eq!(m["key"], "b1");
                b.push(m["value"]["sum"].as_u64().unwrap());
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(a, [1, 3, 6, 10, 15]);
    assert_eq!(b, [10, 30, 60, 100, 150]);
    // Nothing else: no change of `c`, no repeats.
    assert!(ws.recv_within(Duration::from_millis(300)).await.is_none());
    // A redefinition ends the watch.
    let r = c
        .put(
            "/v1/projections/sums",
            json!({"topic": "orders", "reduce": {"aggregate": {"n": "count()"}}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let m = ws.recv().await;
    assert_eq!(m["code"], "projection-changed", "{m}");
    server.stop().await;
}

#[tokio::test]
async fn as_of_folds_the_stream_up_to_that_point() {
    let (_dir, server, c) = setup(2).await;
    // Keyed by stream: the record key, named as the CEL variable `key`.
    c.define(
        "state",
        json!({"topic": "orders", "key": "key", "reduce": {"merge": true}}),
    )
    .await;
    c.define(
        "by-status",
        json!({"topic": "orders", "key": "data.status", "reduce": {"aggregate": {"n": "count()"}}}),
    )
    .await;
    // Stream o-1 changes three times, with another stream's events in between.
    let changes = [
        json!({"status": "new", "items": 1}),
        json!({"status": "paid"}),
        json!({"status": "sent", "items": null}),
    ];
    let mut offsets = Vec::new();
    let mut position = String::new();
    for (i, change) in changes.iter().enumerate() {
        let r = c
            .post(
                "/v1/topics/orders/events",
                json!({"specversion": "1.0", "id": format!("o1-{i}"), "source": "/t",
                    "type": "order.changed", "partitionkey": "o-1",
                    "time": format!("2026-01-01T00:0{i}:00Z"), "data": change}),
            )
            .await;
        assert_eq!(r.status, 201);
        offsets.push(r.body["offsets"][0]["offset"].as_u64().unwrap());
        position = r.body["position"].as_str().unwrap().to_string();
        c.publish("orders", &[("o-2", json!({"status": "new"}))])
            .await;
    }
    let mut expected = json!(null);
    for (i, change) in changes.iter().enumerate() {
        // A merge patch fold of the prefix, computed here.
        if let (Some(e), Some(p)) = (expected.as_object_mut(), change.as_object()) {
            for (k, v) in p {
                if v.is_null() {
                    e.remove(k);
                } else {
                    e.insert(k.clone(), v.clone());
                }
            }
        } else {
            expected = change.clone();
        }
        let by_offset = c
            .get(&format!(
                "/v1/projections/state/rows/o-1?as_of={}",
                offsets[i]
            ))
            .await;
        assert_eq!(by_offset.status, 200, "{:?}", by_offset.body);
        assert_eq!(
            by_offset.body["value"], expected,
            "as of offset {}",
            offsets[i]
        );
        let by_time = c
            .get(&format!(
                "/v1/projections/state/rows/o-1?as_of=2026-01-01T00:0{i}:30Z"
            ))
            .await;
        assert_eq!(by_time.body["value"], expected, "as of minute {i}");
    }
    // Today's row is the last state.
    let now = c
        .get(&format!(
            "/v1/projections/state/rows/o-1?after_position={position}"
        ))
        .await;
    assert_eq!(now.body["value"], expected);
    // Before the stream's first event there is no row.
    let before = c
        .get("/v1/projections/state/rows/o-1?as_of=2025-12-31T00:00:00Z")
        .await;
    assert_eq!(before.status, 404);
    // Only projections keyed by stream travel in time.
    let r = c.get("/v1/projections/by-status/rows/new?as_of=3").await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = c
        .get("/v1/projections/state/rows/o-1?as_of=yesterday")
        .await;
    assert_eq!(r.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn a_rebuild_during_ingestion_ends_equal_to_a_fold_from_scratch() {
    let (_dir, server, c) = setup(3).await;
    let reduce = json!({"aggregate": {"n": "count()", "total": "sum(data.amount)", "top": "max(data.amount)"}});
    c.define("live", json!({"topic": "orders", "reduce": reduce}))
        .await;
    let count = |rows: &[(Value, Value)]| -> u64 {
        rows.iter().map(|(_, v)| v["n"].as_u64().unwrap()).sum()
    };
    let writer = {
        let c = Client::new(server.addr);
        tokio::spawn(async move {
            let mut position = String::new();
            for batch in 0..40u64 {
                let events: Vec<(String, Value)> = (0..50u64)
                    .map(|i| {
                        (
                            format!("k{}", (batch * 7 + i) % 37),
                            json!({"amount": batch * 50 + i}),
                        )
                    })
                    .collect();
                let refs: Vec<(&str, Value)> = events
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                position = c.publish("orders", &refs).await;
                // Read-your-writes holds through the rebuilds: the rows read count every event
                // published so far, never fewer (a generation taking over behind its
                // predecessor would show fewer).
                let rows = c.rows_after("live", &position).await;
                assert_eq!(rows.len(), 37, "after batch {batch}");
                assert_eq!(count(&rows), (batch + 1) * 50, "after batch {batch}");
            }
            position
        })
    };
    // Rebuild four times while the writer runs.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let r = c
            .send(reqwest::Method::POST, "/v1/projections/live/rebuild", None)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let position = writer.await.unwrap();
    // A projection defined after the fact folds the whole log from scratch.
    c.define("fresh", json!({"topic": "orders", "reduce": reduce}))
        .await;
    let live = c.rows_after("live", &position).await;
    assert_eq!(live.len(), 37);
    assert_eq!(live, c.rows_after("fresh", &position).await);
    assert_eq!(count(&live), 2000);
    server.stop().await;
}

#[tokio::test]
async fn a_rebuild_serves_the_old_rows_until_it_takes_over() {
    let (_dir, server, c) = setup(1).await;
    c.define(
        "counts",
        json!({"topic": "orders", "reduce": {"aggregate": {"n": "count()"}}}),
    )
    .await;
    let mut position = String::new();
    for _ in 0..20 {
        let events: Vec<(&str, Value)> = (0..500).map(|_| ("k", json!({}))).collect();
        position = c.publish("orders", &events).await;
    }
    let before = c
        .get(&format!(
            "/v1/projections/counts/rows/k?after_position={position}"
        ))
        .await;
    assert_eq!(before.body["value"]["n"], 10_000);
    let r = c
        .send(
            reqwest::Method::POST,
            "/v1/projections/counts/rebuild",
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    // While the rebuild folds 10,000 events, reads see the whole old row, never a partial one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = c.get("/v1/projections/counts/rows/k").await;
        assert_eq!(row.body["value"]["n"], 10_000, "{:?}", row.body);
        let s = c.get("/v1/projections/counts").await.body;
        match s["status"].as_str().unwrap() {
            "rebuilding" => {}
            "running" => break,
            other => panic!("{other}"),
        }
        assert!(Instant::now() < deadline);
    }
    assert_eq!(
        c.get("/v1/projections/counts/rows/k").await.body["value"]["n"],
        10_000
    );
    server.stop().await;
}

#[tokio::test]
async fn row_changes_stream_over_sse_too() {
    let (_dir, server, c) = setup(1).await;
    c.define(
        "sums",
        json!({"topic": "orders", "reduce": {"aggregate": {"sum": "sum(data.amount)"}}}),
    )
    .await;
    let mut sse = c
        .http
        .get(format!("{}/v1/projections/sums/sse?prefix=a", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 200);
    c.publish(
        "orders",
        &[
            ("a1", json!({"amount": 1})),
            ("b", json!({"amount": 5})),
            ("a1", json!({"amount": 2})),
            ("a2", json!({"amount": 4})),
        ],
    )
    .await;
    let mut text = String::new();
    while text.matches("event: row").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
            .await
            .expect("SSE data within 10 s")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let seen: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap(),
                r["value"]["sum"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("a1", 1), ("a1", 3), ("a2", 4)]);
    let r = c.get("/v1/projections/sums/sse?key=a&prefix=b").await;
    assert_eq!(r.status, 400);
    assert_eq!(c.get("/v1/projections/nope/sse").await.status, 404);
    drop(sse);
    server.stop().await;
}

#[tokio::test]
async fn a_topic_created_again_is_folded_from_its_start() {
    let (_dir, server, c) = setup(1).await;
    c.define(
        "totals",
        json!({"topic": "orders", "reduce": {"aggregate": {"n": "count()", "sum": "sum(data.v)"}}}),
    )
    .await;
    c.publish(
        "orders",
        &[
            ("k", json!({"v": 1})),
            ("k", json!({"v": 2})),
            ("k", json!({"v": 3})),
        ],
    )
    .await;
    c.status_until("totals", |s| s["position"] == "orders:0.3")
        .await;
    let r = c.get("/v1/projections/totals/rows/k").await;
    assert_eq!(r.body["value"], json!({"n": 3, "sum": 6}), "{:?}", r.body);

    let r = c
        .send(reqwest::Method::DELETE, "/v1/topics/orders", None)
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    server.topic("orders", 2).await;
    c.publish(
        "orders",
        &[("k", json!({"v": 10})), ("j", json!({"v": 20}))],
    )
    .await;
    // The rows describe the new topic only: neither kept from the old one nor added to them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = c.get("/v1/projections/totals/rows").await.body;
        let values: Vec<(Value, Value)> = rows["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].clone(), r["value"].clone()))
            .collect();
        let want = vec![
            (json!("j"), json!({"n": 1, "sum": 20})),
            (json!("k"), json!({"n": 1, "sum": 10})),
        ];
        if values == want {
            break;
        }
        assert!(Instant::now() < deadline, "{rows}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = c.get("/v1/projections/totals").await.body;
    assert_eq!(s["status"], "running", "{s}");
}
