//! kill -9 loop: concurrent HTTP publishers write to the real server under `--fsync batch`, the
//! server is killed with SIGKILL at a random moment, restarted, and every event it acknowledged
//! must be found at its acknowledged partition and offset with identical content.
//!
//! Cycles: `SPATE_CRASH_CYCLES` (default 50). The seed (`SPATE_CRASH_SEED`, default from the clock)
//! is printed and decides the kill moments and event sizes.

mod common;

use common::Rng;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

const TOPIC: &str = "crash";
const PARTITIONS: u64 = 3;
const PUBLISHERS: usize = 4;

/// xorshift64*: a small seeded generator, so a seed reproduces a run.
type Acked = Arc<Mutex<HashMap<(u64, u64), Value>>>;

async fn publisher(
    client: reqwest::Client,
    url: String,
    id: usize,
    cycle: usize,
    seed: u64,
    acked: Acked,
) {
    let mut rng = Rng(seed | 1);
    for seq in 0.. {
        let n = 1 + (rng.next() % 20) as usize;
        let events: Vec<Value> = (0..n)
            .map(|k| {
                let pad = "x".repeat((rng.next() % 2000) as usize);
                let mut e = json!({
                    "type": "crash.test",
                    "id": format!("c{cycle}-p{id}-s{seq}-{k}"),
                    "data": {"cycle": cycle, "publisher": id, "seq": seq, "k": k, "pad": pad},
                });
                if rng.next().is_multiple_of(2) {
                    e["partitionkey"] = json!(format!("key-{}", rng.next() % 50));
                }
                e
            })
            .collect();
        let res = client
            .post(format!("{url}/v1/topics/{TOPIC}/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await;
        let Ok(res) = res else { return };
        if res.status().as_u16() != 201 {
            return;
        }
        let Ok(body) = res.json::<Value>().await else {
            return;
        };
        let mut acked = acked.lock().unwrap();
        for (e, o) in events.into_iter().zip(body["offsets"].as_array().unwrap()) {
            let key = (
                o["partition"].as_u64().unwrap(),
                o["offset"].as_u64().unwrap(),
            );
            assert!(
                acked.insert(key, e).is_none(),
                "offset {key:?} acknowledged twice"
            );
        }
    }
}

/// Reads every event of every partition.
async fn read_all(client: &reqwest::Client, url: &str) -> HashMap<(u64, u64), Value> {
    common::read_topic(client, url, TOPIC, PARTITIONS)
        .await
        .into_iter()
        .map(|(p, o, e)| ((p, o), e))
        .collect()
}

fn verify(
    acked: &HashMap<(u64, u64), Value>,
    stored: &HashMap<(u64, u64), Value>,
    cycle: usize,
    seed: u64,
) {
    for (at, sent) in acked {
        let got = stored.get(at).unwrap_or_else(|| {
            panic!(
                "seed {seed}, cycle {cycle}: acknowledged event {} lost at {at:?}",
                sent["id"]
            )
        });
        assert_eq!(got["id"], sent["id"], "seed {seed}: wrong event at {at:?}");
        assert_eq!(got["type"], sent["type"]);
        assert_eq!(
            got["data"], sent["data"],
            "seed {seed}: data differs at {at:?}"
        );
        assert_eq!(got.get("partitionkey"), sent.get("partitionkey"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    let cycles: usize = std::env::var("SPATE_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed = common::seed();
    println!("kill -9 loop: {cycles} cycles, seed {seed} (SPATE_CRASH_SEED={seed} reproduces)");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let acked: Acked = Arc::default();
    let mut killed_with_writes = 0;
    for cycle in 0..cycles {
        let server = common::start(&data, &["--fsync", "batch"]);
        if cycle == 0 {
            let r = client
                .post(format!("{}/v1/topics", server.url))
                .json(&json!({"name": TOPIC, "partitions": PARTITIONS}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
        // Everything acknowledged before the last kill is still there, with the same content.
        let stored = read_all(&client, &server.url).await;
        verify(&acked.lock().unwrap(), &stored, cycle, seed);
        let before = acked.lock().unwrap().len();
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|id| {
                tokio::spawn(publisher(
                    client.clone(),
                    server.url.clone(),
                    id,
                    cycle,
                    rng.next(),
                    acked.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30 + rng.next() % 250)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        if acked.lock().unwrap().len() > before {
            killed_with_writes += 1;
        }
    }
    let server = common::start(&data, &[]);
    let stored = read_all(&client, &server.url).await;
    let acked = acked.lock().unwrap();
    verify(&acked, &stored, cycles, seed);
    println!(
        "{} acknowledged events verified after {cycles} kills ({killed_with_writes} cycles acknowledged writes before the kill)",
        acked.len()
    );
    assert!(
        killed_with_writes * 2 >= cycles,
        "too few cycles had writes in flight: the test did not exercise the crash path"
    );
    assert_eq!(server.terminate().code(), Some(0));
}
