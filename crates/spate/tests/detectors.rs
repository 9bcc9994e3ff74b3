//! Detectors against the real binary: state survives a restart (only the tail is replayed), a
//! kill -9 never duplicates or loses an alert, the server's own metrics feed detectors, and
//! `spate nab` scores the auto detector on NAB's data.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;

fn at(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Publishes readings `(sensor, time ms, value)` in one request.
async fn readings(c: &reqwest::Client, url: &str, topic: &str, points: &[(String, i64, f64)]) {
    for chunk in points.chunks(1000) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|(s, t, v)| {
                json!({"specversion": "1.0", "id": format!("{s}-{t}"), "source": "/sensors",
                    "type": "sensor.reading", "time": at(*t), "partitionkey": s,
                    "data": {"sensor": s, "value": v}})
            })
            .collect();
        let r = c
            .post(format!("{url}/v1/topics/{topic}/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&batch).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
}

async fn put_detector(c: &reqwest::Client, url: &str, name: &str, definition: Value) {
    let r = c
        .put(format!("{url}/v1/detectors/{name}"))
        .json(&definition)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
}

async fn status(c: &reqwest::Client, url: &str, name: &str) -> Value {
    c.get(format!("{url}/v1/detectors/{name}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The status once the detector has nothing left to read.
async fn caught_up(c: &reqwest::Client, url: &str, name: &str, points: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(c, url, name).await;
        if s["points"] == points && s["lag_records"] == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A daily rhythm every 5 minutes with a little wobble.
fn rhythm(sensor: &str, from: i64, to: i64) -> Vec<(String, i64, f64)> {
    (from..to)
        .map(|i| {
            let phase = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
            let wobble = ((i * 7919) % 13) as f64 / 13.0 - 0.5;
            (
                sensor.to_string(),
                T0 + i * 300_000,
                20.0 + 5.0 * phase.sin() + wobble,
            )
        })
        .collect()
}

#[tokio::test]
async fn detector_state_survives_a_restart_and_only_the_tail_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    common::create_topic(&c, &url, "telemetry", 1).await;
    put_detector(
        &c,
        &url,
        "auto",
        json!({"topic": "telemetry", "series": "data.sensor", "value": "data.value",
            "alert_topic": "alerts", "algorithm": {"kind": "auto"}}),
    )
    .await;
    // Three days of normal rhythm: learnt, no alerts.
    readings(&c, &url, "telemetry", &rhythm("s1", 0, 3 * 288)).await;
    let before = caught_up(&c, &url, "auto", 3 * 288).await;
    assert_eq!(before["alerts"], 0, "{before}");
    assert_eq!(before["position"], "telemetry:0.864");
    assert!(server.terminate().success());

    let server = common::start(dir.path(), &[]);
    let url = server.url.clone();
    let after = status(&c, &url, "auto").await;
    // Resumed from the checkpoint written at shutdown: nothing to replay, nothing relearnt.
    assert_eq!(after["restored"], "telemetry:0.864", "{after}");
    assert_eq!(after["points"], 3 * 288);
    assert_eq!(after["series"], 1);
    // A fresh detector would still be warming up (150 points); the restored one knows the
    // rhythm and flags a spike at once.
    let mut next = rhythm("s1", 3 * 288, 3 * 288 + 20);
    next[10].2 += 30.0;
    readings(&c, &url, "telemetry", &next).await;
    let s = caught_up(&c, &url, "auto", 3 * 288 + 20).await;
    assert!(s["alerts"].as_u64().unwrap() >= 1, "{s}");
    let alerts = common::read_topic(&c, &url, "alerts", 1).await;
    let first = &alerts[0].2;
    assert_eq!(first["type"], "spate.alert.anomaly");
    assert_eq!(first["data"]["time"], at(next[10].1));
    drop(server);
}

#[tokio::test]
async fn kill_9_neither_loses_nor_duplicates_alerts() {
    let cycles: u64 = std::env::var("SPATE_DETECTOR_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed = common::seed();
    println!("seed {seed} (SPATE_CRASH_SEED reproduces), {cycles} cycles");
    let mut rng = common::Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let mut server = common::start(dir.path(), &[]);
    common::create_topic(&c, &server.url, "telemetry", 3).await;
    common::create_topic(&c, &server.url, "alerts", 2).await;
    // Every reading of a sensor crosses the range one way or the other: every reading raises
    // an alert or clears one.
    put_detector(
        &c,
        &server.url,
        "fever",
        json!({"topic": "telemetry", "series": "data.sensor", "value": "data.value",
            "alert_topic": "alerts", "cooldown_ms": 0,
            "algorithm": {"kind": "threshold", "max": 39.5, "for_ms": 0}}),
    )
    .await;
    let mut published = 0u64;
    let mut tick = 0i64;
    for cycle in 0..cycles {
        let batch: Vec<(String, i64, f64)> = (0..400)
            .map(|i| {
                tick += 1;
                let sensor = format!("s{}", i % 20);
                // Per sensor, readings alternate high and low.
                let high = (tick - 1) / 20 % 2 == 0;
                (sensor, T0 + tick * 1000, if high { 41.0 } else { 37.0 })
            })
            .collect();
        readings(&c, &server.url, "telemetry", &batch).await;
        published += batch.len() as u64;
        // Kill while the detector works through the batch or soon after.
        let wait = rng.next() % 400;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill9();
        server = common::start(dir.path(), &[]);
        println!("cycle {cycle}: killed after {wait} ms");
    }
    let s = caught_up(&c, &server.url, "fever", published).await;
    let alerts = common::read_topic(&c, &server.url, "alerts", 2).await;
    let mut seen: BTreeMap<(u64, u64, String), usize> = BTreeMap::new();
    for (_, _, e) in &alerts {
        let d = &e["data"]["source"];
        let key = (
            d["partition"].as_u64().unwrap(),
            d["offset"].as_u64().unwrap(),
            e["type"].as_str().unwrap().to_string(),
        );
        *seen.entry(key).or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "{} alerts written more than once, e.g. {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)]
    );
    // Every reading raised or cleared exactly one alert.
    let sources: BTreeSet<(u64, u64)> = seen.keys().map(|(p, o, _)| (*p, *o)).collect();
    assert_eq!(alerts.len() as u64, published, "{s}");
    assert_eq!(sources.len() as u64, published);
    let raised = seen
        .keys()
        .filter(|k| k.2 == "spate.alert.threshold")
        .count() as u64;
    assert_eq!(raised, published / 2);
    drop(server);
}

#[tokio::test]
async fn the_servers_own_metrics_feed_detectors() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = common::start_env(dir.path(), &[], &[("SPATE_METRICS_INTERVAL_MS", "200")]);
    let url = server.url.clone();
    common::create_topic(&c, &url, "orders", 1).await;
    // A rule on the server's own produce rate: anything above 0 events/s on `orders`.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .get(format!("{url}/v1/topics/__metrics"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "no __metrics topic");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put_detector(
        &c,
        &url,
        "busy",
        json!({"topic": "__metrics", "filter": "data.name == 'produce_rate'",
            "series": "data.series", "value": "data.value", "alert_topic": "ops",
            "from": "latest", "cooldown_ms": 0,
            "algorithm": {"kind": "threshold", "max": 0.0}}),
    )
    .await;
    let points: Vec<(String, i64, f64)> = (0..100).map(|i| ("o".into(), T0 + i, 1.0)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let alert = loop {
        readings(&c, &url, "orders", &points).await;
        let r = c
            .get(format!("{url}/v1/topics/ops/events?partition=0&offset=0"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let page: Value = r.json().await.unwrap();
            if let Some(e) = page["events"].as_array().and_then(|a| a.first()) {
                break e["event"].clone();
            }
        }
        assert!(Instant::now() < deadline, "no alert on the produce rate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alert["type"], "spate.alert.threshold");
    assert_eq!(alert["subject"], "produce_rate:orders");
    assert!(alert["data"]["value"].as_f64().unwrap() > 0.0);
    // The metrics carry fsync latency and the detector's own lag too.
    let metrics = common::read_topic(&c, &url, "__metrics", 1).await;
    let names: BTreeSet<&str> = metrics
        .iter()
        .map(|(_, _, e)| e["data"]["name"].as_str().unwrap())
        .collect();
    for name in ["produce_rate", "fsync_ms", "fsync_max_ms", "detector_lag"] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    assert!(
        metrics
            .iter()
            .all(|(_, _, e)| e["type"] == "spate.metric" && e["source"] == "/spate")
    );
    // Nobody else writes there.
    let r = c
        .post(format!("{url}/v1/topics/__metrics/events"))
        .json(&json!({"specversion": "1.0", "id": "x", "source": "/me", "type": "spate.metric"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    drop(server);
}

fn nab_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/nab");
    assert!(
        dir.join("data").is_dir(),
        "NAB data expected at {} (the shared folder beside the repository)",
        dir.display()
    );
    dir
}

#[test]
fn spate_nab_scores_the_auto_detector_on_nab() {
    let nab = nab_dir();
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("nab")
        .arg("--data")
        .arg(&nab)
        .arg("--out")
        .arg(out.path())
        .arg("--labels")
        .arg(nab.join("labels/combined_windows.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{stdout}");
    // One output per input, same rows in the same order, scores in 0..1.
    let mut files = 0;
    for category in std::fs::read_dir(nab.join("data")).unwrap() {
        let category = category.unwrap().path();
        for input in std::fs::read_dir(&category).unwrap() {
            let input = input.unwrap().path();
            let rel = input.strip_prefix(nab.join("data")).unwrap();
            let output = std::fs::read_to_string(out.path().join(rel)).unwrap();
            let input = std::fs::read_to_string(&input).unwrap();
            let mut out_lines = output.lines();
            assert_eq!(out_lines.next(), Some("timestamp,value,anomaly_score"));
            let mut rows = 0;
            for (a, b) in input.lines().skip(1).zip(out_lines.by_ref()) {
                let (prefix, score) = b.rsplit_once(',').unwrap();
                assert_eq!(prefix, a, "{}", rel.display());
                let score: f64 = score.parse().unwrap();
                assert!((0.0..=1.0).contains(&score), "{b}");
                rows += 1;
            }
            assert_eq!(rows, input.lines().count() - 1);
            assert_eq!(out_lines.next(), None);
            files += 1;
        }
    }
    assert_eq!(files, 25);
    // The scores, as NAB defines them, on the three profiles.
    let score = |profile: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(profile))
            .unwrap_or_else(|| panic!("no {profile} line in {stdout}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(score("standard") >= 75.0, "{stdout}");
    assert!(score("reward_low_FP_rate") > 0.0);
    assert!(score("reward_low_FN_rate") > 0.0);
}
