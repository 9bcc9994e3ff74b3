//! kill -9 loop for event-sourcing streams: writers append batches of 1-5 events with expected
//! versions to their own streams of the real server (`--fsync batch`), and now and then delete
//! one (with its expected version); the server is killed with SIGKILL at a random moment and
//! restarted. After every restart:
//!
//! - every acknowledged append is in the topic, and in its stream at its acknowledged versions
//!   unless a deletion after it hides it; every acknowledged deletion holds;
//! - every batch is all or nothing: a batch found in a stream is whole, at consecutive versions;
//! - the stream index, which goes on from its checkpoint after each kill, agrees with a scan of the
//!   whole topic (versions counted over the stream's events, deletions taking none).
//!
//! At the end the index store is removed and rebuilt from the log: it equals the index before.
//!
//! Cycles: `SPATE_STREAM_CRASH_CYCLES` (default 20); seed: `SPATE_CRASH_SEED`.

mod common;

use common::Rng;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

const TOPIC: &str = "ledger";
const WRITERS: usize = 4;
const STREAMS_PER_WRITER: usize = 5;

/// What the server acknowledged.
#[derive(Default, Clone)]
struct Oracle {
    /// Appends: (stream, first version) → ids.
    appends: HashMap<(String, u64), Vec<String>>,
    /// Deletions: stream → the first version still read after the latest acknowledged one.
    deleted: HashMap<String, u64>,
}

type Acked = Arc<Mutex<Oracle>>;

/// Where a writer's stream stands: the version of its next event, if known (a stream that reads
/// as not existing may have been deleted with versions after it), and whether it exists.
#[derive(Clone, Copy)]
struct Next {
    version: Option<u64>,
    exists: bool,
}

/// A stream's state on the server; `None` when it cannot be reached.
async fn next_of(client: &reqwest::Client, url: &str, stream: &str) -> Option<Next> {
    let r = client
        .get(format!("{url}/v1/topics/{TOPIC}/streams/{stream}"))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() == 404 {
        return Some(Next {
            version: None,
            exists: false,
        });
    }
    let v = r.json::<Value>().await.ok()?["version"].as_u64()?;
    Some(Next {
        version: Some(v + 1),
        exists: true,
    })
}

async fn writer(
    client: reqwest::Client,
    url: String,
    w: usize,
    cycle: usize,
    seed: u64,
    acked: Acked,
) {
    let mut rng = Rng(seed | 1);
    let streams: Vec<String> = (0..STREAMS_PER_WRITER)
        .map(|i| format!("acct-{w}-{i}"))
        .collect();
    // What the server holds now (an unacknowledged append or deletion may or may not have
    // landed).
    let mut next: HashMap<String, Next> = HashMap::new();
    for s in &streams {
        let Some(n) = next_of(&client, &url, s).await else {
            return;
        };
        next.insert(s.clone(), n);
    }
    for seq in 0.. {
        let stream = &streams[(rng.next() % STREAMS_PER_WRITER as u64) as usize];
        let at = next[stream];
        if at.exists && rng.next().is_multiple_of(12) {
            let last = at.version.expect("an existing stream's version is known") - 1;
            let Ok(res) = client
                .delete(format!(
                    "{url}/v1/topics/{TOPIC}/streams/{stream}?expected_version={last}"
                ))
                .send()
                .await
            else {
                return;
            };
            match res.status().as_u16() {
                200 => {
                    let Ok(body) = res.json::<Value>().await else {
                        return;
                    };
                    assert_eq!(body["version"], last, "{body}");
                    acked
                        .lock()
                        .unwrap()
                        .deleted
                        .insert(stream.clone(), last + 1);
                    next.insert(
                        stream.clone(),
                        Next {
                            version: Some(last + 1),
                            exists: false,
                        },
                    );
                }
                409 => panic!(
                    "conflict deleting {stream} at {last}: {}",
                    res.text().await.unwrap_or_default()
                ),
                _ => return,
            }
            continue;
        }
        let n = 1 + (rng.next() % 5) as usize;
        let batch = format!("c{cycle}-w{w}-q{seq}");
        let ids: Vec<String> = (0..n).map(|k| format!("{batch}-{k}")).collect();
        let events: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(k, id)| {
                json!({"specversion": "1.0", "id": id, "source": "/crash", "type": "ledger.entry",
                    "data": {"batch": batch, "k": k, "n": n, "pad": "x".repeat((rng.next() % 4000) as usize)}})
            })
            .collect();
        let expected = match at {
            Next { exists: false, .. } => "no_stream".to_string(),
            Next {
                version: Some(v), ..
            } => (v - 1).to_string(),
            Next { version: None, .. } => unreachable!("an existing stream's version is known"),
        };
        let res = client
            .post(format!(
                "{url}/v1/topics/{TOPIC}/streams/{stream}/events?expected_version={expected}"
            ))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&events).unwrap())
            .send()
            .await;
        let Ok(res) = res else { return };
        match res.status().as_u16() {
            201 => {
                let Ok(body) = res.json::<Value>().await else {
                    return;
                };
                let first = body["first_version"].as_u64().unwrap();
                if let Some(v) = at.version {
                    assert_eq!(first, v, "{body}");
                }
                assert_eq!(body["last_version"], first + n as u64 - 1, "{body}");
                acked
                    .lock()
                    .unwrap()
                    .appends
                    .insert((stream.clone(), first), ids.clone());
                next.insert(
                    stream.clone(),
                    Next {
                        version: Some(first + n as u64),
                        exists: true,
                    },
                );
            }
            // Only this writer writes its streams: a conflict is a bug.
            409 => panic!(
                "conflict on {stream} at {:?}: {}",
                at.version,
                res.text().await.unwrap_or_default()
            ),
            _ => return,
        }
    }
}

/// A stream's whole content through the index, page by page.
async fn read_stream(client: &reqwest::Client, url: &str, stream: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let from = all.last().map_or(0, |e| e["version"].as_u64().unwrap() + 1);
        let r = client
            .get(format!(
                "{url}/v1/topics/{TOPIC}/streams/{stream}/events?from_version={from}&limit=1000"
            ))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 404 {
            return all;
        }
        let body: Value = r.json().await.unwrap();
        let page = body["events"].as_array().unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page.iter().cloned());
    }
}

/// A stream as a scan of the whole topic shows it.
#[derive(Default)]
struct Scanned {
    /// Every event id in offset order, deleted or not (deletions left out).
    all: Vec<String>,
    /// The first version read: the number of events before the last deletion.
    start: u64,
}

/// Every stream, from a scan of the whole topic: versions count the stream's events, a deletion
/// takes none and hides the events before it.
async fn scan(client: &reqwest::Client, url: &str, partitions: u64) -> HashMap<String, Scanned> {
    let mut out: HashMap<String, Scanned> = HashMap::new();
    for (_, _, e) in common::read_topic(client, url, TOPIC, partitions).await {
        let s = out
            .entry(e["partitionkey"].as_str().unwrap().to_string())
            .or_default();
        if e["type"] == "spate.stream.deleted" {
            s.start = s.all.len() as u64;
        } else {
            s.all.push(e["id"].as_str().unwrap().to_string());
        }
    }
    out
}

/// Every writer stream's (version, partition, offset, id), through the index.
async fn all_streams(
    client: &reqwest::Client,
    url: &str,
) -> HashMap<String, Vec<(u64, u64, u64, String)>> {
    let mut out = HashMap::new();
    for w in 0..WRITERS {
        for i in 0..STREAMS_PER_WRITER {
            let stream = format!("acct-{w}-{i}");
            let events = read_stream(client, url, &stream).await;
            let rows = events
                .iter()
                .map(|e| {
                    (
                        e["version"].as_u64().unwrap(),
                        e["partition"].as_u64().unwrap(),
                        e["offset"].as_u64().unwrap(),
                        e["event"]["id"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            out.insert(stream, rows);
        }
    }
    out
}

async fn verify(client: &reqwest::Client, url: &str, acked: &Acked, cycle: usize, seed: u64) {
    let scanned = scan(client, url, 3).await;
    let acked = acked.lock().unwrap().clone();
    let mut streams: HashMap<String, Vec<Value>> = HashMap::new();
    let empty = Scanned::default();
    for w in 0..WRITERS {
        for i in 0..STREAMS_PER_WRITER {
            let stream = format!("acct-{w}-{i}");
            let events = read_stream(client, url, &stream).await;
            streams.insert(stream.clone(), events.clone());
            let log = scanned.get(&stream).unwrap_or(&empty);
            let ids: Vec<String> = events
                .iter()
                .enumerate()
                .map(|(v, e)| {
                    assert_eq!(
                        e["version"],
                        log.start + v as u64,
                        "seed {seed}: gap in {stream}"
                    );
                    e["event"]["id"].as_str().unwrap().to_string()
                })
                .collect();
            // The index agrees with the log.
            assert_eq!(
                ids,
                log.all[log.start as usize..],
                "seed {seed}, cycle {cycle}: index and log disagree on {stream}"
            );
            // An acknowledged deletion holds (a later one, unacknowledged, may have landed too).
            if let Some(&start) = acked.deleted.get(&stream) {
                assert!(
                    log.start >= start,
                    "seed {seed}, cycle {cycle}: {stream} deleted before {start} reads from {}",
                    log.start
                );
            }
            // All or nothing: each batch found is whole and consecutive.
            let mut v = 0;
            while v < events.len() {
                let d = &events[v]["event"]["data"];
                let n = d["n"].as_u64().unwrap() as usize;
                assert_eq!(
                    d["k"], 0,
                    "seed {seed}: {stream} v{v} starts inside a batch"
                );
                for k in 0..n {
                    let e = events.get(v + k).unwrap_or_else(|| {
                        panic!("seed {seed}, cycle {cycle}: {stream}: batch at v{v} is cut")
                    });
                    assert_eq!(e["event"]["data"]["batch"], d["batch"]);
                    assert_eq!(e["event"]["data"]["k"], k);
                }
                v += n;
            }
        }
    }
    // Every acknowledged append is in the topic at its version, and read in its stream there
    // unless deleted since.
    for ((stream, first), ids) in &acked.appends {
        let log = &scanned[stream];
        let events = &streams[stream];
        for (k, id) in ids.iter().enumerate() {
            let version = *first + k as u64;
            assert_eq!(
                log.all.get(version as usize),
                Some(id),
                "seed {seed}, cycle {cycle}: acknowledged {id} lost from {stream}"
            );
            if version < log.start {
                continue;
            }
            let got = events
                .get((version - log.start) as usize)
                .unwrap_or_else(|| {
                    panic!("seed {seed}, cycle {cycle}: acknowledged {id} not read in {stream}")
                });
            assert_eq!(got["event"]["id"], *id, "seed {seed}: {stream} v{version}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_stream_appends_whole_and_acknowledged() {
    let common::CrashLoop {
        cycles,
        seed,
        mut rng,
        data,
        client,
        dir: _dir,
    } = common::CrashLoop::new("SPATE_STREAM_CRASH_CYCLES", "stream");
    let acked: Acked = Arc::default();
    let mut killed_with_writes = 0;
    for cycle in 0..cycles {
        let server = common::start(&data, &["--fsync", "batch"]);
        if cycle == 0 {
            common::create_topic(&client, &server.url, TOPIC, 3).await;
        }
        verify(&client, &server.url, &acked, cycle, seed).await;
        let before = acked.lock().unwrap().appends.len();
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    client.clone(),
                    server.url.clone(),
                    w,
                    cycle,
                    rng.next(),
                    acked.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50 + rng.next() % 300)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        if acked.lock().unwrap().appends.len() > before {
            killed_with_writes += 1;
        }
    }
    let server = common::start(&data, &[]);
    verify(&client, &server.url, &acked, cycles, seed).await;
    let before = all_streams(&client, &server.url).await;
    assert_eq!(server.terminate().code(), Some(0));
    std::fs::remove_dir_all(data.join("streams")).unwrap();
    let server = common::start(&data, &[]);
    let rebuilt = all_streams(&client, &server.url).await;
    assert!(before.values().map(Vec::len).sum::<usize>() > 0);
    assert_eq!(
        rebuilt, before,
        "seed {seed}: the index rebuilt from the log differs from the one kept across the kills"
    );
    let (appends, deleted) = {
        let a = acked.lock().unwrap();
        (a.appends.len(), a.deleted.len())
    };
    println!(
        "{appends} acknowledged appends and deletions of {deleted} streams verified after {cycles} kills ({killed_with_writes} cycles acknowledged appends before the kill)"
    );
    assert!(
        deleted > 0,
        "no deletion was acknowledged: the test did not exercise them"
    );
    assert!(
        killed_with_writes * 2 >= cycles,
        "too few cycles had appends in flight: the test did not exercise the crash path"
    );
    assert_eq!(server.terminate().code(), Some(0));
}
