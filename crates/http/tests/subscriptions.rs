//! Durable subscriptions over HTTP against a real server on loopback: ack timeouts, nack backoff,
//! dead-lettering, key ordering without head-of-line blocking, redrive, seek and bad input.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{Http, start};
use serde_json::{Value, json};
use spate_broker::subscriptions::{DELAY_MS_MAX, PULL_MAX, PULL_WAIT_MAX, SUBSCRIPTIONS_MAX};
use spate_http::push::PushLimits;

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

    /// Publishes one event with an id, optional key and JSON data.
    async fn publish(&self, topic: &str, id: &str, key: Option<&str>, data: Value) {
        let mut e = json!({"specversion": "1.0", "id": id, "source": "/test",
            "type": "order.created", "data": data});
        if let Some(k) = key {
            e["partitionkey"] = json!(k);
        }
        let r = self.post(&format!("/v1/topics/{topic}/events"), e).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    async fn subscribe(&self, name: &str, spec: Value) {
        let r = self.put(&format!("/v1/subscriptions/{name}"), spec).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }

    async fn pull(&self, name: &str, max: usize, wait_ms: u64) -> Vec<Value> {
        let r = self
            .post(
                &format!("/v1/subscriptions/{name}/pull"),
                json!({"max_messages": max, "wait_ms": wait_ms}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["messages"].as_array().unwrap().clone()
    }

    /// Pulls until `n` messages came or `wait_ms` passed: the subscription reads the topic a
    /// moment behind the publishes, so one pull may hold fewer.
    async fn pull_n(&self, name: &str, n: usize, wait_ms: u64) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            let max = (n - got.len()).min(spate_broker::subscriptions::PULL_MAX);
            got.extend(self.pull(name, max, 500).await);
        }
        got
    }

    async fn settle(&self, name: &str, op: &str, ids: &[&str], extra: Value) -> Vec<String> {
        let mut body = json!({ "ack_ids": ids });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                body[k] = v;
            }
        }
        let r = self
            .post(&format!("/v1/subscriptions/{name}/{op}"), body)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["result"].as_str().unwrap().to_string())
            .collect()
    }

    /// Acks `messages`, each of which must be acked.
    async fn ack_all(&self, name: &str, messages: &[Value]) {
        let ids: Vec<&str> = messages.iter().map(ack_id).collect();
        let results = self.settle(name, "ack", &ids, json!({})).await;
        assert!(results.iter().all(|r| r == "ok"), "{results:?}");
    }

    /// Waits until `n` messages of the subscription went to its dead-letter topic in all.
    async fn until_dead_lettered(&self, name: &str, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let stats = self.stats(name).await;
            if stats["dead_lettered"] == n {
                return;
            }
            assert!(Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stats(&self, name: &str) -> Value {
        let r = self.get(&format!("/v1/subscriptions/{name}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["stats"].clone()
    }
}

fn ack_id(m: &Value) -> &str {
    m["ack_id"].as_str().unwrap()
}

fn event_id(m: &Value) -> &str {
    m["event"]["id"].as_str().unwrap()
}

#[tokio::test]
async fn an_unacked_message_comes_back_after_the_ack_timeout_and_not_after_an_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "timeouts",
        json!({"topic": "orders", "from": "earliest", "ack_timeout_ms": 2000}),
    )
    .await;
    c.publish("orders", "o1", None, json!({"n": 1})).await;

    let sent = Instant::now();
    let first = c.pull("timeouts", 10, 5000).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["attempt"], 1);
    assert_eq!(event_id(&first[0]), "o1");
    let stats = c.stats("timeouts").await;
    assert_eq!(stats["in_flight"], 1);

    let second = c.pull("timeouts", 10, 5000).await;
    let elapsed = sent.elapsed();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0]["attempt"], 2);
    assert_eq!(event_id(&second[0]), "o1");
    // Redelivered once the 2 s timeout ran out, within 10 %.
    assert!(
        elapsed >= Duration::from_millis(2000) && elapsed <= Duration::from_millis(2200),
        "redelivered after {elapsed:?}"
    );
    // The first delivery's ack id is stale now; the second one settles it.
    assert_eq!(
        c.settle(
            "timeouts",
            "ack",
            &[ack_id(&first[0]), ack_id(&second[0]), "t.0.x.1"],
            json!({})
        )
        .await,
        vec!["expired", "ok", "malformed"]
    );
    assert_eq!(
        c.settle("timeouts", "ack", &[ack_id(&second[0])], json!({}))
            .await,
        vec!["unknown"]
    );
    assert!(c.pull("timeouts", 10, 2500).await.is_empty());
    let stats = c.stats("timeouts").await;
    assert_eq!(stats["acked"], 1);
    assert_eq!(stats["delivered"], 2);
    assert_eq!(stats["redelivered"], 1);
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["backlog"], 0);

    // Extending the deadline keeps a message from coming back.
    c.publish("orders", "o2", None, json!({"n": 2})).await;
    let m = c.pull("timeouts", 10, 5000).await;
    assert_eq!(m.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        c.settle(
            "timeouts",
            "extend",
            &[ack_id(&m[0])],
            json!({"ack_timeout_ms": 3000})
        )
        .await,
        vec!["ok"]
    );
    assert!(c.pull("timeouts", 10, 2000).await.is_empty());
    assert_eq!(
        c.settle("timeouts", "ack", &[ack_id(&m[0])], json!({}))
            .await,
        vec!["ok"]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_nack_waits_out_the_backoff_or_the_given_delay() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "retries",
        json!({"topic": "orders", "from": "earliest", "max_attempts": 10,
            "backoff": {"initial_ms": 500, "max_ms": 1500, "multiplier": 2.0}}),
    )
    .await;
    c.publish("orders", "o1", None, json!({})).await;
    let mut m = c.pull("retries", 1, 5000).await.remove(0);
    // Backoff 500, 1000, then capped at 1500; then an explicit delay of 700.
    for (attempt, delay) in [(1, 500u64), (2, 1000), (3, 1500), (4, 700)] {
        assert_eq!(m["attempt"], attempt);
        let nacked = Instant::now();
        let extra = if attempt == 4 {
            json!({"delay_ms": 700})
        } else {
            json!({})
        };
        assert_eq!(
            c.settle("retries", "nack", &[ack_id(&m)], extra).await,
            vec!["ok"]
        );
        m = c.pull("retries", 1, 5000).await.remove(0);
        let waited = nacked.elapsed().as_millis() as u64;
        assert!(
            waited >= delay * 9 / 10 && waited <= delay * 11 / 10,
            "attempt {attempt}: waited {waited} ms for a {delay} ms backoff"
        );
    }
    assert_eq!(c.stats("retries").await["nacked"], 4);
    server.stop().await;
}

#[tokio::test]
async fn out_of_attempts_a_message_moves_to_the_dead_letter_topic_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("payments", 3).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "billing",
        json!({"topic": "payments", "from": "earliest", "max_attempts": 3, "ack_timeout_ms": 300,
            "backoff": {"initial_ms": 10, "max_ms": 10}}),
    )
    .await;
    c.publish("payments", "poison", Some("acct-7"), json!({"amount": 12}))
        .await;
    c.publish("payments", "fine", Some("acct-8"), json!({"amount": 5}))
        .await;
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for m in c.pull("billing", 10, 500).await {
            if event_id(&m) == "fine" {
                assert_eq!(
                    c.settle("billing", "ack", &[ack_id(&m)], json!({})).await,
                    vec!["ok"]
                );
                continue;
            }
            attempts += 1;
            assert_eq!(m["attempt"], attempts);
            // The first failure is a nack, the others time out.
            if attempts == 1 {
                c.settle("billing", "nack", &[ack_id(&m)], json!({})).await;
            }
        }
        if c.stats("billing").await["dead_lettered"] == 1 {
            break;
        }
    }
    assert_eq!(attempts, 3);
    let stats = c.stats("billing").await;
    assert_eq!(stats["dead_lettered"], 1);
    assert_eq!(stats["acked"], 1);
    assert_eq!(stats["backlog"], 0);
    assert!(c.pull("billing", 10, 700).await.is_empty());

    // Exactly one dead letter in the topic, with the original event and the extensions.
    let mut found = Vec::new();
    for p in 0..3 {
        let r = c
            .get(&format!(
                "/v1/topics/payments.dlq/events?partition={p}&offset=0"
            ))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        found.extend(r.body["events"].as_array().unwrap().clone());
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let letters = c.get("/v1/subscriptions/billing/dead-letters").await;
    assert_eq!(letters.status, 200);
    let list = letters.body["dead_letters"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    let e = &list[0]["event"];
    assert_eq!(e["id"], "poison");
    assert_eq!(e["type"], "order.created");
    assert_eq!(e["data"], json!({"amount": 12}));
    assert_eq!(e["partitionkey"], "acct-7");
    assert_eq!(e["spatesubscription"], "billing");
    assert_eq!(e["spatesourcetopic"], "payments");
    assert_eq!(e["spateattempts"], "3");
    assert!(e["spatedlqreason"].as_str().unwrap().contains("attempt 3"));
    let source = c
        .get(&format!(
            "/v1/topics/payments/events?partition={}&offset={}&limit=1",
            e["spatesourcepartition"].as_str().unwrap(),
            e["spatesourceoffset"].as_str().unwrap()
        ))
        .await;
    assert_eq!(source.body["events"][0]["event"]["id"], "poison");
    assert_eq!(letters.body["next"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn a_poison_message_never_blocks_other_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    for ordering in ["key", "none"] {
        let name = format!("hol-{ordering}");
        c.subscribe(
            &name,
            json!({"topic": "orders", "from": "latest", "ordering": ordering, "max_attempts": 100,
                "backoff": {"initial_ms": 60000, "max_ms": 60000}}),
        )
        .await;
    }
    c.publish("orders", "bad", Some("poison"), json!({})).await;
    for i in 0..20 {
        c.publish(
            "orders",
            &format!("ok{i}"),
            Some(&format!("k{}", i % 4)),
            json!({}),
        )
        .await;
    }
    for ordering in ["key", "none"] {
        let name = format!("hol-{ordering}");
        let started = Instant::now();
        let mut acked = 0;
        while acked < 20 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name}: blocked at {acked}"
            );
            for m in c.pull(&name, 100, 1000).await {
                if event_id(&m) == "bad" {
                    // Failing with a minute of backoff; the other keys go on.
                    c.settle(&name, "nack", &[ack_id(&m)], json!({})).await;
                } else {
                    c.settle(&name, "ack", &[ack_id(&m)], json!({})).await;
                    acked += 1;
                }
            }
        }
        let stats = c.stats(&name).await;
        assert_eq!(stats["acked"], 20);
        assert_eq!(stats["backlog"], 1, "{name}: the poison message waits");
    }
    server.stop().await;
}

#[tokio::test]
async fn key_ordering_keeps_each_keys_order_through_retries() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "ordered",
        json!({"topic": "orders", "from": "earliest", "ordering": "key", "max_attempts": 1000,
            "ack_timeout_ms": 5000, "backoff": {"initial_ms": 5, "max_ms": 20}}),
    )
    .await;
    let keys = ["a", "b", "c", "d", "e"];
    for i in 0..30 {
        for k in keys {
            c.publish("orders", &format!("{k}-{i}"), Some(k), json!({"i": i}))
                .await;
        }
    }
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut nacks = 0;
    let started = Instant::now();
    while next.values().sum::<u64>() < 150 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {next:?}"
        );
        let batch = c.pull("ordered", 100, 1000).await;
        // At most one message of a key is out at a time.
        let mut seen = std::collections::HashSet::new();
        for m in &batch {
            assert!(seen.insert(m["event"]["partitionkey"].as_str().unwrap().to_string()));
        }
        for m in batch {
            let key = m["event"]["partitionkey"].as_str().unwrap().to_string();
            let i = m["event"]["data"]["i"].as_u64().unwrap();
            let expected = next.get(&key).copied().unwrap_or(0);
            assert_eq!(i, expected, "key {key} out of order");
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng % 10 < 3 {
                nacks += 1;
                assert_eq!(
                    c.settle("ordered", "nack", &[ack_id(&m)], json!({})).await,
                    vec!["ok"]
                );
            } else {
                assert_eq!(
                    c.settle("ordered", "ack", &[ack_id(&m)], json!({})).await,
                    vec!["ok"]
                );
                next.insert(key, expected + 1);
            }
        }
    }
    assert!(nacks > 10, "only {nacks} retries");
    assert_eq!(c.stats("ordered").await["acked"], 150);
    server.stop().await;
}

#[tokio::test]
async fn redrive_gives_dead_letters_back_to_their_subscription_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("jobs", 1).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "fragile",
        json!({"topic": "jobs", "from": "earliest", "max_attempts": 1}),
    )
    .await;
    c.subscribe("sturdy", json!({"topic": "jobs", "from": "earliest"}))
        .await;
    for (id, n) in [("j1", 1), ("j2", 2), ("j3", 3)] {
        c.publish("jobs", id, None, json!({"n": n})).await;
    }
    for m in c.pull_n("fragile", 3, 5000).await {
        c.settle("fragile", "nack", &[ack_id(&m)], json!({})).await;
    }
    for m in c.pull_n("sturdy", 3, 5000).await {
        c.settle("sturdy", "ack", &[ack_id(&m)], json!({})).await;
    }
    c.until_dead_lettered("fragile", 3, Duration::from_secs(5))
        .await;
    // Pages of dead letters.
    let page = c
        .get("/v1/subscriptions/fragile/dead-letters?limit=2")
        .await;
    assert_eq!(page.body["dead_letters"].as_array().unwrap().len(), 2);
    let next = page.body["next"].as_str().unwrap().to_string();
    let rest = c
        .get(&format!(
            "/v1/subscriptions/fragile/dead-letters?limit=2&after={next}"
        ))
        .await;
    assert_eq!(rest.body["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(
        c.get("/v1/subscriptions/sturdy/dead-letters").await.body["dead_letters"],
        json!([])
    );

    // Redrive the letters with n >= 2: they come back to `fragile` with fresh attempts.
    let r = c
        .post(
            "/v1/subscriptions/fragile/redrive",
            json!({"filter": "data.n >= 2", "limit": 10}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["redriven"], 2);
    let again = c.pull_n("fragile", 2, 5000).await;
    let mut ids: Vec<&str> = again.iter().map(event_id).collect();
    ids.sort();
    assert_eq!(ids, vec!["j2", "j3"]);
    for m in &again {
        assert_eq!(m["attempt"], 1);
        assert_eq!(m["topic"], "jobs.dlq");
        assert_eq!(
            c.settle("fragile", "ack", &[ack_id(m)], json!({})).await,
            vec!["ok"]
        );
    }
    assert!(c.pull("sturdy", 10, 500).await.is_empty());
    // Redriven letters are no longer parked; the other one still is, and goes once.
    let parked = c.get("/v1/subscriptions/fragile/dead-letters").await;
    let parked = parked.body["dead_letters"].as_array().unwrap().clone();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["event"]["id"], "j1");
    let r = c.post("/v1/subscriptions/fragile/redrive", json!({})).await;
    assert_eq!(r.body["redriven"], 1);
    let r = c.post("/v1/subscriptions/fragile/redrive", json!({})).await;
    assert_eq!(r.body["redriven"], 0);
    assert_eq!(c.pull("fragile", 10, 2000).await.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn seek_replays_and_definitions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "replay",
        json!({"topic": "orders", "from": "earliest", "types": "order.*"}),
    )
    .await;
    for i in 0..10 {
        c.publish(
            "orders",
            &format!("o{i}"),
            Some(&format!("k{i}")),
            json!({}),
        )
        .await;
    }
    let mut got = BTreeMap::new();
    while got.len() < 10 {
        for m in c.pull("replay", 100, 2000).await {
            got.insert(event_id(&m).to_string(), ack_id(&m).to_string());
        }
    }
    let ids: Vec<&str> = got.values().map(String::as_str).collect();
    assert!(
        c.settle("replay", "ack", &ids, json!({}))
            .await
            .iter()
            .all(|r| r == "ok")
    );
    let r = c
        .post("/v1/subscriptions/replay/seek", json!({"to": "earliest"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut again = 0;
    while again < 10 {
        again += c.pull("replay", 100, 2000).await.len();
    }
    assert_eq!(again, 10);

    // Updates apply; the topic cannot change.
    let r = c
        .put(
            "/v1/subscriptions/replay",
            json!({"topic": "orders", "max_attempts": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["max_attempts"], 2);
    assert_eq!(r.body["dead_letter_topic"], "orders.dlq");
    server.topic("other", 1).await;
    let r = c
        .put("/v1/subscriptions/replay", json!({"topic": "other"}))
        .await;
    assert_eq!(r.status, 409);

    // Bad input: a clear 4xx, and nothing created.
    for (spec, needle) in [
        (
            json!({"topic": "orders", "filter": "data.amount >"}),
            "filter",
        ),
        (json!({"topic": "orders", "types": "a..b"}), "filter"),
        (
            json!({"topic": "orders", "ack_timeout_ms": 0}),
            "ack_timeout_ms",
        ),
        (
            json!({"topic": "orders", "max_attempts": 0}),
            "max_attempts",
        ),
        (json!({"topic": "orders", "from": "yesterday"}), "position"),
        (
            json!({"topic": "orders", "backoff": {"initial_ms": 10, "max_ms": 5}}),
            "backoff",
        ),
        (
            json!({"topic": "orders", "dead_letter_topic": "orders"}),
            "dead_letter_topic",
        ),
        (
            json!({"topic": "orders", "push": {"url": "ftp://x"}}),
            "push.url",
        ),
        (json!({"topic": "orders", "colour": "red"}), "colour"),
        (json!({"topic": "__subscriptions"}), "internal"),
        (
            json!({"topic": "orders", "backoff": {"initial_ms": 10, "max_ms": DELAY_MS_MAX + 1}}),
            "backoff",
        ),
        (
            json!({"topic": "orders", "filter": "data.l.all(x, x in data.l)"}),
            "`in` takes only",
        ),
    ] {
        let r = c.put("/v1/subscriptions/bad", spec.clone()).await;
        assert_eq!(r.status, 400, "{spec}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains(needle),
            "{spec}: {:?}",
            r.body
        );
    }
    assert_eq!(
        c.put("/v1/subscriptions/bad", json!({"topic": "nope"}))
            .await
            .status,
        404
    );
    assert_eq!(
        c.put("/v1/subscriptions/b%20d", json!({"topic": "orders"}))
            .await
            .status,
        400
    );
    assert_eq!(c.get("/v1/subscriptions/bad").await.status, 404);
    assert_eq!(
        c.post("/v1/subscriptions/bad/pull", json!({})).await.status,
        404
    );
    for body in [
        json!({"max_messages": 0}),
        json!({"max_messages": PULL_MAX + 1}),
        json!({"wait_ms": PULL_WAIT_MAX.as_millis() as u64 + 1}),
    ] {
        let r = c.post("/v1/subscriptions/replay/pull", body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
    }
    let r = c
        .post(
            "/v1/subscriptions/replay/nack",
            json!({"ack_ids": ["x"], "delay_ms": DELAY_MS_MAX + 1}),
        )
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("delay_ms"));
    assert_eq!(
        c.post("/v1/subscriptions/replay/ack", json!({"ack_ids": "x"}))
            .await
            .status,
        400
    );
    assert_eq!(
        c.post("/v1/subscriptions/replay/seek", json!({"to": "soon"}))
            .await
            .status,
        400
    );
    let list = c.get("/v1/subscriptions").await;
    let names: Vec<&str> = list.body["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["replay"]);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/subscriptions/replay", None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(c.get("/v1/subscriptions/replay").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_server_holds_at_most_the_subscription_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    for i in 0..SUBSCRIPTIONS_MAX {
        c.subscribe(&format!("s{i}"), json!({"topic": "orders"}))
            .await;
    }
    let r = c
        .put("/v1/subscriptions/one-more", json!({"topic": "orders"}))
        .await;
    r.assert_refused(400, &format!("at most {SUBSCRIPTIONS_MAX}"));
    assert_eq!(c.get("/v1/subscriptions/one-more").await.status, 404);
    // An existing subscription still updates; a deleted one frees its place.
    let r = c
        .put(
            "/v1/subscriptions/s0",
            json!({"topic": "orders", "max_attempts": 3}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/subscriptions/s1", None)
        .await;
    assert_eq!(r.status, 204);
    let r = c
        .put("/v1/subscriptions/one-more", json!({"topic": "orders"}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let list = c.get("/v1/subscriptions").await;
    assert_eq!(
        list.body["subscriptions"].as_array().unwrap().len(),
        SUBSCRIPTIONS_MAX
    );
    server.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart_from_the_journal_and_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "durable",
        json!({"topic": "orders", "from": "earliest", "ordering": "key", "max_attempts": 5,
            "ack_timeout_ms": 600000, "backoff": {"initial_ms": 300000, "max_ms": 300000}}),
    )
    .await;
    for i in 0..40 {
        c.publish(
            "orders",
            &format!("o{i}"),
            Some(&format!("k{}", i % 8)),
            json!({"i": i}),
        )
        .await;
    }
    // Ack some, nack some (they wait five minutes), leave some in flight.
    let mut outstanding = Vec::new();
    let mut acked = Vec::new();
    let mut nacked = Vec::new();
    let mut round = 0;
    loop {
        round += 1;
        let got = c.pull("durable", 8, 500).await;
        if got.is_empty() {
            break;
        }
        for (k, m) in got.into_iter().enumerate() {
            let id = event_id(&m).to_string();
            match (round + k) % 4 {
                0 if nacked.len() < 3 => {
                    c.settle("durable", "nack", &[ack_id(&m)], json!({})).await;
                    nacked.push(id);
                }
                1 if outstanding.len() < 2 => outstanding.push(id),
                _ => {
                    c.settle("durable", "ack", &[ack_id(&m)], json!({})).await;
                    acked.push(id);
                }
            }
        }
        if round == 3 {
            // Half the history goes into a snapshot; the rest stays in the journal after it.
            server.subscriptions.snapshot().await.unwrap();
        }
    }
    assert!(
        round > 4 && acked.len() >= 10,
        "{round} rounds, {} acked",
        acked.len()
    );
    assert_eq!((nacked.len(), outstanding.len()), (3, 2));
    let before = c.stats("durable").await;
    assert_eq!(before["in_flight"], 2);
    server.stop().await;

    let server = start(dir.path(), PushLimits::default()).await;
    let c = Client::new(server.addr);
    let after = c.stats("durable").await;
    for field in [
        "acked",
        "nacked",
        "delivered",
        "redelivered",
        "dead_lettered",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    // In-flight messages came back; the nacked ones wait out their backoff, holding their keys.
    assert_eq!(after["in_flight"], 0);
    assert_eq!(
        after["backlog"].as_u64().unwrap(),
        before["backlog"].as_u64().unwrap() + before["in_flight"].as_u64().unwrap()
    );
    let mut rest = Vec::new();
    loop {
        let got = c.pull("durable", 100, 1000).await;
        if got.is_empty() {
            break;
        }
        for m in got {
            rest.push(event_id(&m).to_string());
            c.settle("durable", "ack", &[ack_id(&m)], json!({})).await;
        }
    }
    for id in &acked {
        assert!(!rest.contains(id), "{id} was acked before the restart");
    }
    for id in &outstanding {
        assert!(rest.contains(id), "{id} was in flight at the restart");
    }
    for id in &nacked {
        assert!(
            !rest.contains(id),
            "{id} is still in its five-minute backoff"
        );
    }
    // Everything not acked and not held behind a nacked key came back.
    let held: std::collections::HashSet<u64> = nacked
        .iter()
        .map(|id| id[1..].parse::<u64>().unwrap() % 8)
        .collect();
    for i in 0..40u64 {
        let id = format!("o{i}");
        let expected = !acked.contains(&id) && !nacked.contains(&id) && !held.contains(&(i % 8));
        assert_eq!(rest.contains(&id), expected, "{id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_consumer_gets_at_most_max_in_flight_and_settles_on_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "live",
        json!({"topic": "orders", "from": "earliest", "backoff": {"initial_ms": 50, "max_ms": 50}}),
    )
    .await;
    server.publish("orders", 0, 30).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "consume", "subscription": "nope"}))
        .await;
    let m = ws.recv().await;
    assert_eq!(
        (&m["op"], &m["code"]),
        (&json!("error"), &json!("subscription-not-found"))
    );
    ws.send(json!({"op": "consume", "subscription": "live", "max_in_flight": 5}))
        .await;
    assert_eq!(ws.recv().await["op"], "consuming");
    // Five arrive, then nothing until one is settled.
    let mut held = Vec::new();
    for _ in 0..5 {
        let m = ws.recv().await;
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!(m["subscription"], "live");
        held.push(m);
    }
    assert!(ws.recv_within(Duration::from_millis(500)).await.is_none());
    let mut acked = std::collections::HashSet::new();
    let mut nacked_once = false;
    while acked.len() < 30 {
        let m = held.remove(0);
        let id = m["event"]["id"].as_str().unwrap().to_string();
        if !nacked_once {
            nacked_once = true;
            ws.send(json!({"op": "nack", "ack_id": m["ack_id"]})).await;
        } else {
            ws.send(json!({"op": "ack", "ack_id": m["ack_id"]})).await;
            acked.insert(id);
        }
        // Replies and new messages arrive in any order.
        loop {
            let r = ws.recv().await;
            match r["op"].as_str().unwrap() {
                "acked" | "nacked" => {
                    assert_eq!(r["result"], "ok", "{r}");
                    break;
                }
                "message" => held.push(r),
                _ => panic!("{r}"),
            }
        }
        while let Some(r) = ws.recv_within(Duration::from_millis(100)).await {
            assert_eq!(r["op"], "message", "{r}");
            held.push(r);
        }
        assert!(held.len() <= 5, "{} in flight", held.len());
        if acked.len() < 30 {
            assert!(!held.is_empty());
        }
    }
    let stats = c.stats("live").await;
    assert_eq!(stats["acked"], 30);
    assert_eq!(stats["nacked"], 1);
    ws.send(json!({"op": "ack", "ack_id": "t.0.0.9"})).await;
    assert_eq!(ws.recv().await["code"], "unknown-ack-id");
    server.stop().await;
}

#[tokio::test]
async fn webhooks_get_binary_cloudevents_and_failures_are_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Hook {
        calls: Mutex<HashMap<String, u32>>,
        headers: Mutex<Vec<HashMap<String, String>>>,
        bodies: Mutex<Vec<Value>>,
        now: AtomicUsize,
        peak: AtomicUsize,
    }
    let hook = Arc::new(Hook::default());
    let h = hook.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let h = h.clone();
                async move {
                    let now = h.now.fetch_add(1, Ordering::SeqCst) + 1;
                    h.peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let id = headers["ce-id"].to_str().unwrap().to_string();
                    let n = {
                        let mut calls = h.calls.lock().unwrap();
                        let n = calls.entry(id).or_default();
                        *n += 1;
                        *n
                    };
                    h.headers.lock().unwrap().push(
                        headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                            .collect(),
                    );
                    h.bodies
                        .lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    h.now.fetch_sub(1, Ordering::SeqCst);
                    // The first two attempts of every event fail.
                    if n <= 2 {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    let hook_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 2).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "hooked",
        json!({"topic": "orders", "from": "earliest", "max_attempts": 5,
            "backoff": {"initial_ms": 20, "max_ms": 50},
            "push": {"url": format!("http://{hook_addr}/hook"), "timeout_ms": 2000, "max_in_flight": 4}}),
    )
    .await;
    for i in 0..20 {
        c.publish(
            "orders",
            &format!("w{i}"),
            Some(&format!("k{i}")),
            json!({"i": i}),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.stats("hooked").await["acked"] != 20 {
        assert!(Instant::now() < deadline, "{:?}", c.stats("hooked").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = c.stats("hooked").await;
    assert_eq!(stats["nacked"], 40);
    assert_eq!(stats["dead_lettered"], 0);
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 20);
    assert!(calls.values().all(|n| *n == 3), "{calls:?}");
    let peak = hook.peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "{peak} requests at once");
    let first = hook.headers.lock().unwrap()[0].clone();
    assert_eq!(first["ce-specversion"], "1.0");
    assert_eq!(first["ce-type"], "order.created");
    assert_eq!(first["ce-source"], "/test");
    assert!(first["ce-partitionkey"].starts_with('k'));
    assert_eq!(first["content-type"], "application/json");
    assert!(hook.bodies.lock().unwrap().iter().all(|b| b["i"].is_u64()));
    server.stop().await;
    hook_server.abort();
}

#[tokio::test]
async fn webhooks_carry_their_headers_and_a_standard_webhooks_signature() {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let s = s.clone();
                async move {
                    let headers: HashMap<String, String> = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                        .collect();
                    let authorized =
                        headers.get("authorization").map(String::as_str) == Some("Bearer t0ken");
                    let mut seen = s.lock().unwrap();
                    seen.push((headers, body.to_vec()));
                    // Unauthorized requests fail, and so does the first attempt of each message.
                    let id = &seen.last().unwrap().0["ce-id"];
                    let attempt = seen.iter().filter(|(h, _)| &h["ce-id"] == id).count();
                    if authorized && attempt > 1 {
                        axum::http::StatusCode::NO_CONTENT
                    } else {
                        axum::http::StatusCode::UNAUTHORIZED
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    let hook_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    let key: Vec<u8> = (0u8..32).collect();
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(&key)
    );
    let url = format!("http://{hook_addr}/hook");
    let spec = |push: Value| {
        json!({"topic": "orders", "from": "earliest", "backoff": {"initial_ms": 20, "max_ms": 50},
            "push": push})
    };
    // Bad headers and secrets are refused and create nothing.
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    for push in [
        json!({"url": url, "headers": {"Content-Type": "text/plain"}}),
        json!({"url": url, "headers": {"ce-id": "forged"}}),
        json!({"url": url, "headers": {"webhook-signature": "v1,forged"}}),
        json!({"url": url, "headers": {"bad name": "v"}}),
        json!({"url": url, "headers": {"x-ok": "line\nbreak"}}),
        json!({"url": url, "headers": many}),
        json!({"url": url, "secret": "plain-text"}),
        json!({"url": url, "secret": "whsec_c2hvcnQ="}),
        json!({"url": url, "secret": "whsec_not base64!"}),
    ] {
        let r = c.put("/v1/subscriptions/signed", spec(push.clone())).await;
        assert_eq!(r.status, 400, "{push}: {:?}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains("push."),
            "{:?}",
            r.body
        );
        assert_eq!(c.get("/v1/subscriptions/signed").await.status, 404);
    }
    c.subscribe(
        "signed",
        spec(json!({"url": url, "headers": {"Authorization": "Bearer t0ken"}, "secret": secret})),
    )
    .await;
    // The definition shows the headers, not the secret.
    let shown = c.get("/v1/subscriptions/signed").await.body;
    assert_eq!(shown["push"]["headers"]["Authorization"], "Bearer t0ken");
    assert_eq!(shown["push"]["secret"], "(set; not shown)");
    for i in 0..3 {
        c.publish("orders", &format!("s{i}"), None, json!({"i": i}))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.stats("signed").await["acked"] != 3 {
        assert!(Instant::now() < deadline, "{:?}", c.stats("signed").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "two attempts per message");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut ids: HashMap<String, String> = HashMap::new();
    for (headers, body) in &seen {
        assert_eq!(headers["authorization"], "Bearer t0ken");
        // Standard Webhooks: v1, base64 HMAC-SHA256 of "<id>.<timestamp>.<body>".
        let (id, timestamp) = (&headers["webhook-id"], &headers["webhook-timestamp"]);
        let ts: u64 = timestamp.parse().unwrap();
        assert!(ts.abs_diff(now) < 60, "timestamp {ts}, now {now}");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(headers["webhook-signature"], expected);
        // One id per message, the same on its retry.
        let earlier = ids.insert(headers["ce-id"].clone(), id.clone());
        assert!(
            earlier.as_ref().is_none_or(|e| e == id),
            "{earlier:?} then {id}"
        );
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(
        ids.values().collect::<std::collections::HashSet<_>>().len(),
        3
    );
    server.stop().await;
    hook_server.abort();
}

#[tokio::test]
async fn a_pull_acks_the_previous_batch_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "chained",
        json!({"topic": "orders", "from": "earliest", "ack_timeout_ms": 500}),
    )
    .await;
    for i in 0..6 {
        c.publish("orders", &format!("o{i}"), None, json!({})).await;
    }
    let first = c.pull_n("chained", 3, 5000).await;
    let ids: Vec<&str> = first.iter().map(ack_id).collect();
    let r = c
        .post(
            "/v1/subscriptions/chained/pull",
            json!({"max_messages": 3, "wait_ms": 2000, "ack_ids": [ids[0], ids[1], ids[2], "t.0.99.1"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let results: Vec<&str> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, vec!["ok", "ok", "ok", "unknown"]);
    let mut second = r.body["messages"].as_array().unwrap().clone();
    assert!(!second.is_empty());
    second.extend(c.pull_n("chained", 3 - second.len(), 5000).await);
    let second: Vec<&str> = second.iter().map(event_id).collect();
    assert_eq!(second, vec!["o3", "o4", "o5"]);
    // The first batch is settled; the second comes back after its timeout.
    let again = c.pull_n("chained", 3, 5000).await;
    let again: Vec<&str> = again.iter().map(event_id).collect();
    assert_eq!(again, vec!["o3", "o4", "o5"]);
    assert!(c.pull("chained", 10, 200).await.is_empty());
    assert_eq!(c.stats("chained").await["acked"], 3);
    server.stop().await;
}

#[tokio::test]
async fn an_ack_id_given_twice_in_one_request_settles_once_and_escapes_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe("twice", json!({"topic": "orders", "from": "earliest"}))
        .await;
    for i in 0..30 {
        c.publish("orders", &format!("o{i}"), None, json!({})).await;
    }
    let got = c.pull_n("twice", 30, 5000).await;
    assert_eq!(got.len(), 30);
    // A small request and a large one (ack ids written with JSON escapes in the second).
    let (a, b) = (ack_id(&got[0]), ack_id(&got[1]));
    assert_eq!(
        c.settle("twice", "ack", &[a, b, a], json!({})).await,
        vec!["ok", "ok", "unknown"]
    );
    let rest: Vec<String> = got[2..].iter().map(|m| ack_id(m).to_string()).collect();
    let mut body = String::from("{\"ack_ids\":[");
    for id in rest.iter().chain([&rest[0]]) {
        body.push('"');
        body.push_str(&id.replace('.', "\\u002e"));
        body.push_str("\",");
    }
    body.pop();
    body.push_str("]}");
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/subscriptions/twice/ack", server.addr))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let results: Vec<(&str, &str)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["ack_id"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    let mut want: Vec<(&str, &str)> = rest.iter().map(|id| (id.as_str(), "ok")).collect();
    want.push((rest[0].as_str(), "unknown"));
    assert_eq!(results, want);
    assert_eq!(c.stats("twice").await["acked"], 30);
    server.stop().await;
}

#[tokio::test]
async fn a_webhook_that_cannot_be_reached_nacks_until_the_dead_letter_topic() {
    // A plain-HTTP listener behind an https:// URL: every TLS handshake fails.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    let hook = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "unreachable",
        json!({"topic": "orders", "from": "earliest", "max_attempts": 2,
            "backoff": {"initial_ms": 10, "max_ms": 10},
            "push": {"url": format!("https://{addr}/hook"), "timeout_ms": 1000}}),
    )
    .await;
    c.publish("orders", "o1", None, json!({})).await;
    c.until_dead_lettered("unreachable", 1, Duration::from_secs(10))
        .await;
    let stats = c.stats("unreachable").await;
    assert_eq!(
        (stats["nacked"].clone(), stats["acked"].clone()),
        (json!(2), json!(0))
    );
    server.stop().await;
    hook.abort();
}

#[tokio::test]
async fn a_full_window_refills_while_consumers_hold_most_of_it() {
    use spate_broker::subscriptions::WINDOW_MAX;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    let total = WINDOW_MAX + 700;
    for start in (0..total).step_by(1000) {
        let batch: Vec<Value> = (start..total.min(start + 1000))
            .map(|i| {
                json!({"specversion": "1.0", "id": format!("o{i}"), "source": "/test",
                    "type": "order.created", "data": {"n": i}})
            })
            .collect();
        let r = c.post("/v1/topics/orders/events", json!(batch)).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    c.subscribe(
        "window",
        json!({"topic": "orders", "from": "earliest", "ack_timeout_ms": 600_000}),
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    let take = |seen: &mut std::collections::HashSet<String>, got: &[Value]| {
        for m in got {
            assert!(seen.insert(event_id(m).to_string()), "{m} delivered twice");
        }
    };
    // Hold all but 200 of the window; the reader stops at WINDOW_MAX pending messages.
    let held = c.pull_n("window", WINDOW_MAX - 200, 10_000).await;
    assert_eq!(held.len(), WINDOW_MAX - 200);
    take(&mut seen, &held);
    // Acking 100 leaves room for 100: too little to read more while 200 are ready to go out...
    c.ack_all("window", &held[..100]).await;
    let ready = c.pull_n("window", 200, 5000).await;
    assert_eq!(ready.len(), 200);
    take(&mut seen, &ready);
    // ...but once nothing is ready the reader fills the room at once (well before its 1 s
    // fallback), and again after each ack while nothing is ready.
    let refill = c.pull("window", 1000, 800).await;
    assert_eq!(refill.len(), 100, "the reader did not refill the window");
    take(&mut seen, &refill);
    c.ack_all("window", &held[100..400]).await;
    let refill = c.pull("window", 1000, 800).await;
    assert_eq!(refill.len(), 300, "the reader did not refill after an ack");
    take(&mut seen, &refill);
    // Settling the rest lets every remaining message through, each once.
    c.ack_all("window", &held[400..]).await;
    let rest = c.pull_n("window", total - seen.len(), 10_000).await;
    take(&mut seen, &rest);
    assert_eq!(seen.len(), total);
    assert!(c.pull("window", 10, 200).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_ack_id_from_before_a_seek_does_not_settle_the_delivery_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe("replay", json!({"topic": "orders", "from": "earliest"}))
        .await;
    c.publish("orders", "o1", None, json!({})).await;
    let before = c.pull_n("replay", 1, 5000).await;
    assert_eq!(before.len(), 1);
    let r = c
        .post("/v1/subscriptions/replay/seek", json!({"to": "earliest"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The replay delivers the message again as its first attempt, under another ack id.
    let after = c.pull_n("replay", 1, 5000).await;
    assert_eq!(after.len(), 1);
    assert_eq!(
        (event_id(&after[0]), &after[0]["attempt"]),
        ("o1", &json!(1))
    );
    assert_ne!(ack_id(&after[0]), ack_id(&before[0]));
    // A consumer still holding the id from before cannot settle the delivery made since.
    let results = c
        .settle("replay", "ack", &[ack_id(&before[0])], json!({}))
        .await;
    assert_eq!(results, ["expired"]);
    assert_eq!(c.stats("replay").await["in_flight"], 1);
    c.ack_all("replay", &after).await;
    // Ack ids of the forms handed out parse; a zero or bad epoch does not.
    for bad in ["t.0.0.1.0", "t.0.0.1.x", "t.0.0.1.1.1"] {
        assert_eq!(
            c.settle("replay", "ack", &[bad], json!({})).await,
            ["malformed"],
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_topic_created_again_is_read_from_its_start_and_old_ack_ids_settle_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("orders", 1).await;
    let c = Client::new(server.addr);
    c.subscribe("s", json!({"topic": "orders", "from": "earliest"}))
        .await;
    for i in 0..3 {
        c.publish("orders", &format!("old{i}"), None, json!({}))
            .await;
    }
    let old = c.pull_n("s", 3, 5000).await;
    assert_eq!(old.len(), 3);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/topics/orders", None)
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    // Created again, with more partitions: the same offsets hold other events now.
    server.topic("orders", 2).await;
    for i in 0..4 {
        c.publish(
            "orders",
            &format!("new{i}"),
            Some(&format!("k{i}")),
            json!({}),
        )
        .await;
    }
    let new = c.pull_n("s", 4, 10_000).await;
    let mut ids: Vec<&str> = new.iter().map(event_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["new0", "new1", "new2", "new3"]);
    assert!(new.iter().all(|m| m["attempt"] == 1), "{new:?}");
    // The old topic's messages are gone from the subscription; their ack ids settle nothing.
    let old_ids: Vec<&str> = old.iter().map(ack_id).collect();
    let results = c.settle("s", "ack", &old_ids, json!({})).await;
    assert!(results.iter().all(|r| r != "ok"), "{results:?}");
    assert_eq!(c.stats("s").await["in_flight"], 4);
    c.ack_all("s", &new).await;

    // After a restart the subscription keeps reading the new topic where it was.
    server.stop().await;
    let server = start(dir.path(), PushLimits::default()).await;
    let c = Client::new(server.addr);
    c.publish("orders", "new4", Some("k4"), json!({})).await;
    let more = c.pull_n("s", 2, 3000).await;
    let ids: Vec<&str> = more.iter().map(event_id).collect();
    assert_eq!(ids, ["new4"]);
    assert_eq!(c.stats("s").await["in_flight"], 1);
}

#[tokio::test]
async fn a_dead_letter_topic_deleted_and_created_again_parks_its_new_letters() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    server.topic("jobs", 1).await;
    let c = Client::new(server.addr);
    c.subscribe(
        "fragile",
        json!({"topic": "jobs", "from": "earliest", "max_attempts": 1}),
    )
    .await;
    // Dead-letters `ids`: each is nacked on its one attempt.
    let fail = async |ids: &[&str]| {
        let before = c.stats("fragile").await["dead_lettered"].as_u64().unwrap();
        for id in ids {
            c.publish("jobs", id, None, json!({})).await;
        }
        for m in c.pull_n("fragile", ids.len(), 5000).await {
            c.settle("fragile", "nack", &[ack_id(&m)], json!({})).await;
        }
        c.until_dead_lettered("fragile", before + ids.len() as u64, Duration::from_secs(5))
            .await;
    };
    let parked = async || {
        let r = c.get("/v1/subscriptions/fragile/dead-letters").await;
        let mut ids: Vec<String> = r.body["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["event"]["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    fail(&["a1", "a2"]).await;
    let r = c.post("/v1/subscriptions/fragile/redrive", json!({})).await;
    assert_eq!(r.body["redriven"], 2);
    c.ack_all("fragile", &c.pull_n("fragile", 2, 5000).await)
        .await;
    assert!(parked().await.is_empty());

    // The operator empties the dead-letter topic; new letters land at the same offsets.
    let r = c
        .send(reqwest::Method::DELETE, "/v1/topics/jobs.dlq", None)
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    fail(&["b1", "b2"]).await;
    assert_eq!(parked().await, ["b1", "b2"]);
    let r = c.post("/v1/subscriptions/fragile/redrive", json!({})).await;
    assert_eq!(r.body["redriven"], 2);
    let again = c.pull_n("fragile", 2, 5000).await;
    let mut ids: Vec<&str> = again.iter().map(event_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["b1", "b2"]);
    c.ack_all("fragile", &again).await;
    assert!(parked().await.is_empty());
    server.stop().await;
}
