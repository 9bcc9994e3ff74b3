//! kill -9 loop for projections: a producer publishes sales to a 3-partition topic while two
//! projections (an aggregate and a merge) fold it; the server (`--fsync batch`) is killed with
//! SIGKILL at a random moment and restarted. After every restart, once the projections have
//! caught up, every row equals a fold of the log computed here from scratch, and at the end equals
//! what a rebuild of the projection gives. Every third cycle a rebuild is running when the kill
//! comes.
//!
//! Cycles: `SPATE_PROJECTION_CRASH_CYCLES` (default 20); seed: `SPATE_CRASH_SEED`.

mod common;

use common::Rng;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOPIC: &str = "sales";
const KEYS: u64 = 50;

async fn producer(client: reqwest::Client, url: String, cycle: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    for batch in 0.. {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let key = format!("k{}", rng.next() % KEYS);
                json!({"specversion": "1.0", "id": format!("c{cycle}-b{batch}-{i}"), "source": "/crash",
                    "type": "sale.made", "partitionkey": key,
                    "data": {"amount": rng.next() % 1000, "tag": format!("t{}", rng.next() % 5), "n": batch}})
            })
            .collect();
        let r = client
            .post(format!("{url}/v1/topics/{TOPIC}/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await;
        if !matches!(r, Ok(r) if r.status().as_u16() == 201) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every row of a projection, by key.
async fn rows(client: &reqwest::Client, url: &str, name: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut u = format!("{url}/v1/projections/{name}/rows?limit=1000");
        if let Some(a) = &after {
            u.push_str(&format!("&after={a}"));
        }
        let page: Value = client.get(u).send().await.unwrap().json().await.unwrap();
        for r in page["rows"].as_array().unwrap() {
            out.insert(r["key"].as_str().unwrap().to_string(), r["value"].clone());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return out,
        }
    }
}

async fn caught_up(client: &reqwest::Client, url: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s: Value = client
            .get(format!("{url}/v1/projections/{name}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["lag_records"] == 0 && s["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "{name} does not catch up: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The two projections folded here from the whole log.
async fn expected(
    client: &reqwest::Client,
    url: &str,
) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    for (_, _, e) in common::read_topic(client, url, TOPIC, 3).await {
        let key = e["partitionkey"].as_str().unwrap().to_string();
        let t = totals.entry(key.clone()).or_default();
        t.0 += 1;
        t.1 += e["data"]["amount"].as_u64().unwrap();
        latest.insert(key, e["data"].clone());
    }
    let totals = totals
        .into_iter()
        .map(|(k, (n, sum))| (k, json!({"count": n, "sum": sum})))
        .collect();
    (totals, latest)
}

async fn verify(client: &reqwest::Client, url: &str, seed: u64, cycle: usize) -> usize {
    caught_up(client, url, "totals").await;
    caught_up(client, url, "latest").await;
    let (totals, latest) = expected(client, url).await;
    assert_eq!(
        rows(client, url, "totals").await,
        totals,
        "seed {seed}, cycle {cycle}: totals differ from a fold of the log"
    );
    assert_eq!(
        rows(client, url, "latest").await,
        latest,
        "seed {seed}, cycle {cycle}: latest differs from a fold of the log"
    );
    totals.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_projections_equal_to_a_fresh_fold() {
    let common::CrashLoop {
        cycles,
        seed,
        mut rng,
        data,
        client,
        dir: _dir,
    } = common::CrashLoop::new("SPATE_PROJECTION_CRASH_CYCLES", "projection");
    for cycle in 0..cycles {
        let server = common::start(&data, &["--fsync", "batch"]);
        if cycle == 0 {
            common::create_topic(&client, &server.url, TOPIC, 3).await;
            for (name, reduce) in [
                (
                    "totals",
                    json!({"aggregate": {"count": "count()", "sum": "sum(data.amount)"}}),
                ),
                ("latest", json!({"merge": true})),
            ] {
                let r = client
                    .put(format!("{}/v1/projections/{name}", server.url))
                    .json(&json!({"topic": TOPIC, "reduce": reduce}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
            }
        }
        verify(&client, &server.url, seed, cycle).await;
        if cycle % 3 == 1 {
            // Killed while a rebuild runs beside the serving rows: it resumes after the restart.
            let r = client
                .post(format!("{}/v1/projections/totals/rebuild", server.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        let task = tokio::spawn(producer(
            client.clone(),
            server.url.clone(),
            cycle,
            rng.next(),
        ));
        tokio::time::sleep(Duration::from_millis(100 + rng.next() % 400)).await;
        server.kill9();
        task.await.unwrap();
    }
    let server = common::start(&data, &[]);
    let keys = verify(&client, &server.url, seed, cycles).await;
    // A rebuild from scratch gives the same rows.
    let before = rows(&client, &server.url, "totals").await;
    let r = client
        .post(format!("{}/v1/projections/totals/rebuild", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    caught_up(&client, &server.url, "totals").await;
    assert_eq!(rows(&client, &server.url, "totals").await, before);
    let events: u64 = before.values().map(|v| v["count"].as_u64().unwrap()).sum();
    println!("{events} events in {keys} rows verified after {cycles} kills and a rebuild");
    assert!(events > 1000, "too little work to exercise the crash path");
    assert_eq!(server.terminate().code(), Some(0));
}
