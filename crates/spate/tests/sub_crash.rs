//! kill -9 loop for durable subscriptions: a producer publishes events (one in ten is poison and is
//! always nacked), two consumers pull and ack, nack or ignore (letting the ack timeout run out) at
//! random, the server (`--fsync batch`) is killed with SIGKILL at a random moment and restarted.
//!
//! - Throughout: no message whose ack was answered `ok` is delivered again.
//! - At the end, after draining: every published event is in exactly one place: acked (answered
//!   `ok`, or an ack sent whose answer the kill cut off) or in the dead-letter topic, once. Every
//!   poison event is in the dead-letter topic exactly once.
//!
//! Cycles: `SPATE_SUB_CRASH_CYCLES` (default 20); seed: `SPATE_CRASH_SEED`.

mod common;

use common::Rng;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOPIC: &str = "work";
const SUB: &str = "crashy";
const CONSUMERS: usize = 2;

#[derive(Default)]
struct Oracle {
    /// Events whose publish was acknowledged: id → poison.
    published: HashMap<String, bool>,
    /// Messages whose ack was answered `ok`, with the acked attempt.
    acked: HashMap<String, u64>,
    /// Messages with an ack sent whose answer never came.
    maybe_acked: HashSet<String>,
    deliveries: u64,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Oracle>>;

async fn producer(client: reqwest::Client, url: String, cycle: usize, seed: u64, oracle: Shared) {
    let mut rng = Rng(seed | 1);
    for batch in 0.. {
        let events: Vec<(String, bool)> = (0..10)
            .map(|i| {
                (
                    format!("c{cycle}-b{batch}-{i}"),
                    rng.next().is_multiple_of(10),
                )
            })
            .collect();
        let body: Vec<Value> = events
            .iter()
            .map(|(id, poison)| {
                json!({"specversion": "1.0", "id": id, "source": "/crash", "type": "job.created",
                    "partitionkey": id, "data": {"poison": poison}})
            })
            .collect();
        let r = client
            .post(format!("{url}/v1/topics/{TOPIC}/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => {
                let mut o = oracle.lock().unwrap();
                for (id, poison) in events {
                    o.published.insert(id, poison);
                }
            }
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Pulls and settles until the server goes away (or, when `drain`, until told to stop).
/// Records the answer to acks: an "ok" means the message must never come back.
fn acks_answered(oracle: &Shared, acks: &[(String, String, u64)], results: &Value) {
    let mut o = oracle.lock().unwrap();
    let results = results.as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), acks.len(), "one result per ack id");
    for ((_, id, attempt), result) in acks.iter().zip(results) {
        if result["result"] == "ok" {
            o.acked.insert(id.clone(), *attempt);
        }
        // Otherwise expired (redelivered meanwhile) or unknown: not acked by this request.
        o.maybe_acked.remove(id);
    }
}

/// A consumer that pulls, nacks some messages, ignores some and acks the rest: in an ack request
/// of its own, or (`combined`) with its next pull.
async fn consumer(
    client: reqwest::Client,
    url: String,
    seed: u64,
    oracle: Shared,
    drain: bool,
    combined: bool,
) {
    let mut rng = Rng(seed | 1);
    // Acks to send with the next pull (combined).
    let mut carried: Vec<(String, String, u64)> = Vec::new();
    loop {
        let mut body = json!({"max_messages": 50, "wait_ms": 200});
        if !carried.is_empty() {
            body["ack_ids"] = json!(carried.iter().map(|(a, _, _)| a).collect::<Vec<_>>());
            let mut o = oracle.lock().unwrap();
            for (_, id, _) in &carried {
                o.maybe_acked.insert(id.clone());
            }
        }
        let r = client
            .post(format!("{url}/v1/subscriptions/{SUB}/pull"))
            .json(&body)
            .send()
            .await;
        let Ok(r) = r else { return };
        if r.status().as_u16() != 200 {
            return;
        }
        let Ok(body) = r.json::<Value>().await else {
            return;
        };
        if !carried.is_empty() {
            acks_answered(&oracle, &carried, &body["results"]);
            carried.clear();
        }
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        if drain && messages.is_empty() {
            return;
        }
        let mut acks = Vec::new();
        let mut nacks = Vec::new();
        {
            let mut o = oracle.lock().unwrap();
            for m in &messages {
                o.deliveries += 1;
                let id = m["event"]["id"].as_str().unwrap().to_string();
                let attempt = m["attempt"].as_u64().unwrap();
                if let Some(a) = o.acked.get(&id) {
                    let v = format!(
                        "{id} delivered again (attempt {attempt}) after its ack of attempt {a} was answered ok"
                    );
                    o.violations.push(v);
                }
                let poison = m["event"]["data"]["poison"] == true;
                let roll = rng.next() % 100;
                let ack_id = m["ack_id"].as_str().unwrap().to_string();
                if poison || (!drain && roll < 15) {
                    nacks.push(ack_id);
                } else if drain || roll >= 30 {
                    acks.push((ack_id, id, attempt));
                }
                // Otherwise ignored: the ack timeout brings it back.
            }
        }
        if !nacks.is_empty() {
            let r = client
                .post(format!("{url}/v1/subscriptions/{SUB}/nack"))
                .json(&json!({ "ack_ids": nacks }))
                .send()
                .await;
            if r.is_err() {
                return;
            }
        }
        if acks.is_empty() {
            continue;
        }
        if combined {
            carried = acks;
            continue;
        }
        let ids: Vec<&str> = acks.iter().map(|(a, _, _)| a.as_str()).collect();
        {
            let mut o = oracle.lock().unwrap();
            for (_, id, _) in &acks {
                o.maybe_acked.insert(id.clone());
            }
        }
        let r = client
            .post(format!("{url}/v1/subscriptions/{SUB}/ack"))
            .json(&json!({ "ack_ids": ids }))
            .send()
            .await;
        let Ok(r) = r else { return };
        let Ok(body) = r.json::<Value>().await else {
            return;
        };
        acks_answered(&oracle, &acks, &body["results"]);
    }
}

async fn dead_letters(client: &reqwest::Client, url: &str) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    let exists = client
        .get(format!("{url}/v1/topics/{TOPIC}.dlq"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
        == 200;
    if !exists {
        return out;
    }
    for (_, _, e) in common::read_topic(client, url, &format!("{TOPIC}.dlq"), 3).await {
        assert_eq!(e["spatesubscription"], SUB);
        *out.entry(e["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    out
}

async fn stats(client: &reqwest::Client, url: &str) -> Value {
    let r = client
        .get(format!("{url}/v1/subscriptions/{SUB}"))
        .send()
        .await
        .unwrap();
    r.json::<Value>().await.unwrap()["stats"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_message_and_redelivers_no_acked_one() {
    let common::CrashLoop {
        cycles,
        seed,
        mut rng,
        data,
        client,
        dir: _dir,
    } = common::CrashLoop::new("SPATE_SUB_CRASH_CYCLES", "subscription");
    let oracle: Shared = Arc::default();
    for cycle in 0..cycles {
        let server = common::start(&data, &["--fsync", "batch"]);
        if cycle == 0 {
            common::create_topic(&client, &server.url, TOPIC, 3).await;
            let r = client
                .put(format!("{}/v1/subscriptions/{SUB}", server.url))
                .json(
                    &json!({"topic": TOPIC, "from": "earliest", "max_attempts": 3,
                    "ack_timeout_ms": 300, "backoff": {"initial_ms": 10, "max_ms": 50}}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
        // A dead letter is never written twice, whatever the kill interrupted.
        for (id, n) in dead_letters(&client, &server.url).await {
            assert_eq!(
                n, 1,
                "seed {seed}, cycle {cycle}: {id} dead-lettered {n} times"
            );
        }
        let mut tasks = vec![tokio::spawn(producer(
            client.clone(),
            server.url.clone(),
            cycle,
            rng.next(),
            oracle.clone(),
        ))];
        for c in 0..CONSUMERS {
            tasks.push(tokio::spawn(consumer(
                client.clone(),
                server.url.clone(),
                rng.next(),
                oracle.clone(),
                false,
                c % 2 == 1,
            )));
        }
        tokio::time::sleep(Duration::from_millis(200 + rng.next() % 600)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        let o = oracle.lock().unwrap();
        assert!(o.violations.is_empty(), "seed {seed}: {:?}", o.violations);
    }

    // Drain: a well-behaved consumer settles everything left.
    let server = common::start(&data, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = usize::MAX;
    loop {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the backlog does not drain"
        );
        consumer(
            client.clone(),
            server.url.clone(),
            rng.next(),
            oracle.clone(),
            true,
            false,
        )
        .await;
        let s = stats(&client, &server.url).await;
        let letters = dead_letters(&client, &server.url).await.len();
        // Settled, and no dead-letter move still under way.
        if s["backlog"] == 0 && s["in_flight"] == 0 && letters == last {
            break;
        }
        last = letters;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let letters = dead_letters(&client, &server.url).await;
    let o = oracle.lock().unwrap();
    assert!(o.violations.is_empty(), "seed {seed}: {:?}", o.violations);
    let mut poison = 0;
    for (id, is_poison) in &o.published {
        let dead = letters.get(id).copied().unwrap_or(0);
        assert!(dead <= 1, "seed {seed}: {id} dead-lettered {dead} times");
        if *is_poison {
            poison += 1;
            assert_eq!(
                dead, 1,
                "seed {seed}: poison {id} is not in the dead-letter topic"
            );
        } else if o.acked.contains_key(id) {
            assert_eq!(dead, 0, "seed {seed}: {id} acked and dead-lettered");
        } else {
            assert!(
                dead == 1 || o.maybe_acked.contains(id),
                "seed {seed}: {id} was published, never acked and is not a dead letter: lost"
            );
        }
    }
    println!(
        "{} published events, {} deliveries, {} acked, {} dead letters ({poison} poison) verified after {cycles} kills",
        o.published.len(),
        o.deliveries,
        o.acked.len(),
        letters.len()
    );
    assert!(
        o.acked.len() > 100,
        "too little work to exercise the crash path"
    );
    drop(o);
    assert_eq!(server.terminate().code(), Some(0));
}
