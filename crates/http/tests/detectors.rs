//! Detectors over HTTP against a real server on loopback: threshold rules with `for_ms` and
//! hysteresis, the `auto` detector on a live topic, alerts pushed to a WebSocket subscriber, the
//! series cap, and definitions refused with the reason.

mod common;

use std::time::{Duration, Instant};

use common::{Http, start_with_detectors};
use serde_json::{Value, json};

struct Client(Http);

impl std::ops::Deref for Client {
    type Target = Http;
    fn deref(&self) -> &Http {
        &self.0
    }
}

/// RFC 3339 time of `ms` since the epoch.
fn at(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;

impl Client {
    /// Publishes readings `(sensor, time ms, temperature)` in one request.
    async fn readings(&self, topic: &str, points: &[(&str, i64, f64)]) {
        let batch: Vec<Value> = points
            .iter()
            .enumerate()
            .map(|(i, (s, t, v))| {
                json!({"specversion": "1.0", "id": format!("{s}-{t}-{i}"), "source": "/sensors",
                    "type": "sensor.reading", "time": at(*t), "partitionkey": s,
                    "data": {"sensor_id": s, "temperature": v}})
            })
            .collect();
        for chunk in batch.chunks(1000) {
            let r = self
                .http
                .post(format!("{}/v1/topics/{topic}/events", self.base))
                .header("content-type", "application/cloudevents-batch+json")
                .body(serde_json::to_vec(chunk).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
    }

    async fn define(&self, name: &str, definition: Value) -> Value {
        let r = self.put(&format!("/v1/detectors/{name}"), definition).await;
        assert_eq!(r.status, 201, "{name}: {:?}", r.body);
        r.body
    }

    /// The detector's status once it has taken `points` points.
    async fn caught_up(&self, name: &str, points: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.get(&format!("/v1/detectors/{name}")).await.body;
            if s["points"] == points && s["lag_records"] == 0 {
                return s;
            }
            assert!(Instant::now() < deadline, "{s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every event of a topic's partition 0.
    async fn events(&self, topic: &str) -> Vec<Value> {
        let r = self
            .get(&format!(
                "/v1/topics/{topic}/events?partition=0&offset=0&limit=1000"
            ))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["events"].as_array().unwrap().clone()
    }
}

async fn setup() -> (tempfile::TempDir, common::Server, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with_detectors(dir.path()).await;
    server.topic("telemetry", 2).await;
    server.topic("alerts", 1).await;
    let c = Client(Http::new(server.addr));
    (dir, server, c)
}

fn fever_rule() -> Value {
    json!({"topic": "telemetry", "types": "sensor.*", "series": "data.sensor_id",
        "value": "data.temperature", "alert_topic": "alerts", "cooldown_ms": 0,
        "algorithm": {"kind": "threshold", "min": 35.0, "max": 39.5, "for_ms": 30000,
            "hysteresis": 0.5}})
}

#[tokio::test]
async fn a_threshold_rule_waits_out_for_ms_and_clears_with_hysteresis() {
    let (_dir, server, c) = setup().await;
    let status = c.define("fever", fever_rule()).await;
    assert_eq!(status["status"], "running");
    let s = 1000;
    c.readings(
        "telemetry",
        &[
            ("p1", T0, 37.0),
            // Outside, but back inside before 30 s: no alert.
            ("p1", T0 + 10 * s, 40.0),
            ("p1", T0 + 30 * s, 39.0),
            // Outside from 40 s; at 69 s not yet 30 s, at 70 s it is.
            ("p1", T0 + 40 * s, 40.2),
            ("p1", T0 + 69 * s, 40.4),
            ("p1", T0 + 70 * s, 40.6),
            ("p1", T0 + 80 * s, 41.0),
            // Back in range but within the 0.5 margin: still raised.
            ("p1", T0 + 90 * s, 39.3),
            ("p1", T0 + 100 * s, 38.9),
            // Another patient, low, never for long enough.
            ("p2", T0, 34.0),
            ("p2", T0 + 29 * s, 34.5),
            ("p2", T0 + 31 * s, 36.0),
        ],
    )
    .await;
    let status = c.caught_up("fever", 12).await;
    assert_eq!(status["series"], 2);
    assert_eq!(status["alerts"], 2);
    assert_eq!(status["errors"], 0);
    let alerts = c.events("alerts").await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let raised = &alerts[0]["event"];
    assert_eq!(raised["type"], "spate.alert.threshold");
    assert_eq!(raised["subject"], "p1");
    assert_eq!(raised["source"], "/spate/detectors/fever");
    let data = &raised["data"];
    assert_eq!(data["detector"], "fever");
    assert_eq!(data["series"], "p1");
    assert_eq!(data["value"], 40.6);
    assert_eq!(data["score"], 1.0);
    assert_eq!(data["expected"], json!({"low": 35.0, "high": 39.5}));
    assert_eq!(data["time"], at(T0 + 70 * s));
    assert_eq!(raised["time"], at(T0 + 70 * s));
    assert_eq!(data["source"]["topic"], "telemetry");
    // The source offset points at the reading that raised it.
    let (p, o) = (
        data["source"]["partition"].as_u64().unwrap(),
        data["source"]["offset"].as_u64().unwrap(),
    );
    let source = c
        .get(&format!(
            "/v1/topics/telemetry/events?partition={p}&offset={o}&limit=1"
        ))
        .await;
    assert_eq!(
        source.body["events"][0]["event"]["data"]["temperature"],
        40.6
    );
    let cleared = &alerts[1]["event"];
    assert_eq!(cleared["type"], "spate.alert.threshold.cleared");
    assert_eq!(cleared["data"]["value"], 38.9);
    server.stop().await;
}

#[tokio::test]
async fn the_cooldown_limits_repeats_per_series() {
    let (_dir, server, c) = setup().await;
    let mut rule = fever_rule();
    rule["cooldown_ms"] = json!(600_000);
    rule["algorithm"]["for_ms"] = json!(0);
    c.define("fever", rule).await;
    let m = 60_000;
    let mut points = Vec::new();
    // Ten fevers a minute apart; only the first and the one after 10 minutes are announced.
    for i in 0..12 {
        points.push(("p1", T0 + 2 * i * m, 41.0));
        points.push(("p1", T0 + (2 * i + 1) * m, 37.0));
    }
    c.readings("telemetry", &points).await;
    c.caught_up("fever", 24).await;
    let alerts = c.events("alerts").await;
    let kinds: Vec<(&str, &str)> = alerts
        .iter()
        .map(|a| {
            (
                a["event"]["type"].as_str().unwrap(),
                a["event"]["data"]["time"].as_str().unwrap(),
            )
        })
        .collect();
    let (t0, t1) = (at(T0), at(T0 + m));
    let (t10, t11) = (at(T0 + 10 * m), at(T0 + 11 * m));
    let (t20, t21) = (at(T0 + 20 * m), at(T0 + 21 * m));
    assert_eq!(
        kinds,
        [
            ("spate.alert.threshold", t0.as_str()),
            ("spate.alert.threshold.cleared", t1.as_str()),
            ("spate.alert.threshold", t10.as_str()),
            ("spate.alert.threshold.cleared", t11.as_str()),
            ("spate.alert.threshold", t20.as_str()),
            ("spate.alert.threshold.cleared", t21.as_str()),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn alerts_reach_a_websocket_subscriber() {
    let (_dir, server, c) = setup().await;
    let mut rule = fever_rule();
    rule["algorithm"]["for_ms"] = json!(0);
    c.define("fever", rule).await;
    let mut ws = server.ws().await;
    ws.send(
        json!({"op": "subscribe", "id": "a", "topic": "alerts", "from": "latest",
        "types": "spate.alert.>"}),
    )
    .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    c.readings("telemetry", &[("p9", T0, 36.0), ("p9", T0 + 1000, 42.5)])
        .await;
    let m = ws.recv().await;
    assert_eq!(m["op"], "event", "{m}");
    assert_eq!(m["sub"], "a");
    assert_eq!(m["event"]["type"], "spate.alert.threshold");
    assert_eq!(m["event"]["subject"], "p9");
    assert_eq!(m["event"]["data"]["value"], 42.5);
    server.stop().await;
}

/// Five days of a daily rhythm, one reading every 5 minutes.
fn rhythm(sensor: &'static str, days: i64, spike_at: Option<i64>) -> Vec<(&'static str, i64, f64)> {
    (0..days * 288)
        .map(|i| {
            let t = T0 + i * 300_000;
            let phase = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
            let wobble = ((i * 7919) % 13) as f64 / 13.0 - 0.5;
            let v = 20.0 + 5.0 * phase.sin() + wobble;
            (sensor, t, if Some(i) == spike_at { v + 30.0 } else { v })
        })
        .collect()
}

#[tokio::test]
async fn the_auto_detector_flags_a_spike_and_not_the_rhythm() {
    let (_dir, server, c) = setup().await;
    c.define(
        "auto",
        json!({"topic": "telemetry", "series": "data.sensor_id", "value": "data.temperature",
            "alert_topic": "alerts", "algorithm": {"kind": "auto", "sensitivity": 0.5}}),
    )
    .await;
    let spike = 4 * 288 + 100;
    let mut points = rhythm("calm", 5, None);
    points.extend(rhythm("spiky", 5, Some(spike)));
    c.readings("telemetry", &points).await;
    let status = c.caught_up("auto", points.len() as u64).await;
    assert_eq!(status["series"], 2);
    let alerts = c.events("alerts").await;
    assert!(!alerts.is_empty());
    for a in &alerts {
        let e = &a["event"];
        assert_eq!(e["type"], "spate.alert.anomaly");
        assert_eq!(e["subject"], "spiky", "{e}");
    }
    let first = &alerts[0]["event"]["data"];
    assert_eq!(first["time"], at(T0 + spike * 300_000));
    let score = first["score"].as_f64().unwrap();
    assert!((0.5..=1.0).contains(&score), "{first}");
    let (low, high) = (
        first["expected"]["low"].as_f64().unwrap(),
        first["expected"]["high"].as_f64().unwrap(),
    );
    assert!(
        low < 25.0 && high < first["value"].as_f64().unwrap(),
        "{first}"
    );
    assert_eq!(status["alerts"], alerts.len());
    let series = c.get("/v1/detectors/auto/series?limit=10").await;
    assert_eq!(series.body["series"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn the_series_cap_evicts_the_least_recently_seen_and_says_so() {
    let (_dir, server, c) = setup().await;
    // One partition, so the series are seen in the order they are published.
    server.topic("ward", 1).await;
    let mut rule = fever_rule();
    rule["max_series"] = json!(3);
    rule["topic"] = json!("ward");
    c.define("capped", rule).await;
    let points: Vec<(&str, i64, f64)> = ["a", "b", "c", "d", "e", "a"]
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, T0 + i as i64, 37.0))
        .collect();
    c.readings("ward", &points).await;
    let status = c.caught_up("capped", 6).await;
    assert_eq!(status["series"], 3);
    assert_eq!(status["evicted"], 3, "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("series cap reached"), "{error}");
    assert!(error.contains("at most 3"), "{error}");
    let listed = c.get("/v1/detectors").await.body;
    assert_eq!(listed["detectors"][0]["error"], status["error"]);
    let listed = c.get("/v1/detectors/capped/series").await.body;
    let series: Vec<&str> = listed["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["series"].as_str().unwrap())
        .collect();
    assert_eq!(series, ["a", "e", "d"]);
    server.stop().await;
}

#[tokio::test]
async fn bad_values_are_counted_not_fatal() {
    let (_dir, server, c) = setup().await;
    // A series name past the limit is an error of its point too.
    let long = "s".repeat(spate_broker::detectors::SERIES_NAME_BYTES_MAX + 1);
    c.define("fever", fever_rule()).await;
    let r = c
        .http
        .post(format!("{}/v1/topics/telemetry/events", c.base))
        .header("content-type", "application/cloudevents-batch+json")
        .body(
            json!([
                {"specversion": "1.0", "id": "1", "source": "/s", "type": "sensor.reading",
                    "data": {"sensor_id": "x", "temperature": "hot"}},
                {"specversion": "1.0", "id": "2", "source": "/s", "type": "sensor.reading",
                    "data": {"sensor_id": "x"}},
                {"specversion": "1.0", "id": "3", "source": "/s", "type": "other.kind",
                    "data": {"sensor_id": "x"}},
                {"specversion": "1.0", "id": "4", "source": "/s", "type": "sensor.reading",
                    "data": {"sensor_id": long, "temperature": 37}},
                {"specversion": "1.0", "id": "5", "source": "/s", "type": "sensor.reading",
                    "data": {"sensor_id": "x", "temperature": 37}}
            ])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let status = c.caught_up("fever", 1).await;
    assert_eq!(status["errors"], 3, "{status}");
    let last = status["last_error"].as_str().unwrap();
    assert!(last.contains("series") && last.contains("limit"), "{last}");
    server.stop().await;
}

#[tokio::test]
async fn a_server_holds_at_most_the_detector_limit() {
    let max = spate_broker::detectors::DETECTORS_MAX;
    let (_dir, server, c) = setup().await;
    for i in 0..max {
        c.define(&format!("d{i}"), fever_rule()).await;
    }
    let r = c.put("/v1/detectors/one-more", fever_rule()).await;
    r.assert_refused(400, &format!("at most {max}"));
    assert_eq!(c.get("/v1/detectors/one-more").await.status, 404);
    // A replacement is not a new detector; a delete frees a place.
    assert_eq!(c.put("/v1/detectors/d0", fever_rule()).await.status, 200);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/detectors/d1", None)
        .await;
    assert_eq!(r.status, 204);
    c.define("one-more", fever_rule()).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_definitions_are_refused_with_the_reason_and_change_nothing() {
    let (_dir, server, c) = setup().await;
    let base = fever_rule();
    let with = |path: &[&str], v: Value| {
        let mut d = base.clone();
        let mut at = &mut d;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = v;
        d
    };
    let cases = [
        (with(&["value"], json!("data.temperature +")), 400, "value"),
        (with(&["series"], json!("data.(")), 400, "series"),
        (with(&["filter"], json!("type ==")), 400, "filter"),
        (with(&["types"], json!("a..b")), 400, "filter"),
        (with(&["algorithm", "min"], json!(40.0)), 400, "above max"),
        (with(&["algorithm", "kind"], json!("magic")), 400, "magic"),
        (
            with(&["algorithm"], json!({"kind": "auto", "sensitivity": 1.5})),
            400,
            "between 0 and 1",
        ),
        (with(&["max_series"], json!(0)), 400, "max_series"),
        (with(&["max_series"], json!(1_000_000)), 400, "max_series"),
        (with(&["alert_topic"], json!("telemetry")), 400, "another"),
        (
            with(&["alert_topic"], json!("__metrics")),
            400,
            "non-internal",
        ),
        (
            with(&["alert_topic"], json!("bad name!")),
            400,
            "alert_topic",
        ),
        (with(&["colour"], json!("red")), 400, "colour"),
        (
            with(&["value"], json!("data.l.map(x, x in data.l).size()")),
            400,
            "`in` takes only",
        ),
        (with(&["topic"], json!("nowhere")), 404, "nowhere"),
    ];
    for (definition, status, reason) in cases {
        let r = c.put("/v1/detectors/d1", definition.clone()).await;
        assert_eq!(r.status, status, "{definition}: {:?}", r.body);
        let detail = r.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(reason), "{definition}: {detail}");
    }
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("value");
    assert_eq!(c.put("/v1/detectors/d1", missing).await.status, 400);
    assert_eq!(
        c.put("/v1/detectors/bad%20name", base.clone()).await.status,
        400
    );
    let r = c.send(reqwest::Method::PUT, "/v1/detectors/d1", None).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(c.get("/v1/detectors").await.body["detectors"], json!([]));
    assert_eq!(c.get("/v1/detectors/d1").await.status, 404);
    // A good one, then a replacement and a delete.
    c.define("d1", base.clone()).await;
    assert_eq!(c.put("/v1/detectors/d1", base.clone()).await.status, 200);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/detectors/d1", None)
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(c.get("/v1/detectors/d1").await.status, 404);
    let r = c
        .send(reqwest::Method::DELETE, "/v1/detectors/d1", None)
        .await;
    assert_eq!(r.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_preview_shows_what_a_filter_and_expressions_make_of_recent_events() {
    let (_dir, server, c) = setup().await;
    let points: Vec<(&str, i64, f64)> = (0..10)
        .map(|i| ("p1", T0 + i * 1000, 30.0 + i as f64))
        .collect();
    c.readings("telemetry", &points).await;
    let r = c
        .post(
            "/v1/topics/telemetry/preview",
            json!({"filter": "data.temperature >= 35.0", "series": "data.sensor_id",
                "value": "data.temperature", "limit": 8}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The 8 most recent readings (32..39), of which 35..39 pass.
    assert_eq!(r.body["scanned"], 8);
    let values: Vec<f64> = r.body["matched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [35.0, 36.0, 37.0, 38.0, 39.0]);
    assert_eq!(r.body["matched"][0]["series"], "p1");
    assert_eq!(r.body["errors"], 0);
    let fields: Vec<&str> = r.body["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in ["data.sensor_id", "data.temperature", "type", "source"] {
        assert!(fields.contains(&f), "{fields:?}");
    }
    // Bad expressions are refused with the reason; nothing is created either way.
    for (body, reason) in [
        (json!({"filter": "data.temperature >"}), "invalid filter"),
        (json!({"value": "data.("}), "invalid value"),
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 5000}), "limit"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let r = c.post("/v1/topics/telemetry/preview", body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(reason),
            "{body}: {:?}",
            r.body
        );
    }
    assert_eq!(
        c.post("/v1/topics/nowhere/preview", json!({})).await.status,
        404
    );
    server.stop().await;
}

#[tokio::test]
async fn a_topic_created_again_starts_the_detector_over() {
    let (_dir, server, c) = setup().await;
    c.define("fever", fever_rule()).await;
    c.readings(
        "telemetry",
        &[("a", T0, 37.0), ("b", T0, 37.5), ("a", T0 + 1000, 36.9)],
    )
    .await;
    let s = c.caught_up("fever", 3).await;
    assert_eq!(s["series"], 2, "{s}");

    let r = c
        .send(reqwest::Method::DELETE, "/v1/topics/telemetry", None)
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    server.topic("telemetry", 1).await;
    c.readings("telemetry", &[("c", T0 + 5000, 37.1)]).await;
    // Fresh state over the new topic: its one point and series, none of the old ones.
    let s = c.caught_up("fever", 1).await;
    assert_eq!(s["series"], 1, "{s}");
    let r = c.get("/v1/detectors/fever/series").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let names: Vec<&str> = r.body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["series"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c"], "{:?}", r.body);
}
