//! The HTTP API, driven through the router: every success and every error case of the v1 surface.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use spate_broker::{Broker, Limits};
use spate_http::{AppState, HttpLimits, router};
use spate_log::mem::MemStorage;
use spate_log::{Log, LogConfig};
use tower::ServiceExt;

struct App {
    router: axum::Router,
    disk: MemStorage,
}

fn app_with(limits: HttpLimits, max_event_bytes: u64) -> App {
    let disk = MemStorage::new();
    let log = Log::open(
        Arc::new(disk.clone()),
        Path::new("/data"),
        LogConfig::default(),
    )
    .unwrap();
    let broker = Arc::new(Broker::new(
        Arc::new(log),
        Limits {
            max_event_bytes,
            ..Limits::default()
        },
    ));
    App {
        router: router(AppState {
            broker,
            limits,
            push: Default::default(),
            metrics: None,
            projections: None,
            detectors: None,
            groups: None,
            subscriptions: None,
            stopping: None,
            auth: None,
            deliveries: None,
        }),
        disk,
    }
}

fn app() -> App {
    app_with(HttpLimits::default(), 1 << 20)
}

struct Reply {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl App {
    async fn send(&self, req: Request<Body>) -> Reply {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Reply {
            status,
            content_type,
            body,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        content_type: &str,
        body: impl Into<Body>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if !content_type.is_empty() {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        self.send(req.body(body.into()).unwrap()).await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call("GET", uri, "", Body::empty()).await
    }

    async fn create(&self, body: Value) -> Reply {
        self.call("POST", "/v1/topics", "application/json", body.to_string())
            .await
    }

    async fn publish(&self, topic: &str, content_type: &str, body: Value) -> Reply {
        self.call(
            "POST",
            &format!("/v1/topics/{topic}/events"),
            content_type,
            body.to_string(),
        )
        .await
    }

    async fn alter(&self, topic: &str, body: Value) -> Reply {
        self.call(
            "PATCH",
            &format!("/v1/topics/{topic}"),
            "application/json",
            body.to_string(),
        )
        .await
    }

    async fn end_offsets(&self, topic: &str) -> Vec<u64> {
        let r = self.get(&format!("/v1/topics/{topic}")).await;
        r.body["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["log_end_offset"].as_u64().unwrap())
            .collect()
    }
}

/// Asserts a problem+json reply with this status whose detail mentions `needle`.
fn assert_problem(r: &Reply, status: StatusCode, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["status"], status.as_u16());
    assert!(
        r.body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:spate:problem:")
    );
    assert!(r.body["title"].is_string());
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(needle),
        "detail {detail:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let app = app();
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_problem(
        &app.get("/v1/nothing").await,
        StatusCode::NOT_FOUND,
        "no such endpoint",
    );
    // Refused before any handler runs: problem details too.
    assert_problem(
        &app.call("PATCH", "/v1/topics", "", Body::empty()).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
    );
    assert_problem(
        &app.get("/v1/topics/t/streams/%FF%FE/events").await,
        StatusCode::BAD_REQUEST,
        "UTF-8",
    );
    assert_problem(&app.get("/v1/ws").await, StatusCode::BAD_REQUEST, "upgrade");
}

#[tokio::test]
async fn topics_are_created_listed_described_and_deleted() {
    let app = app();
    let r = app
        .create(json!({"name": "orders", "partitions": 3, "retention_ms": 604800000, "retention_bytes": null}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["name"], "orders");
    assert_eq!(r.body["config"]["partitions"], 3);
    assert_eq!(r.body["config"]["retention_ms"], 604800000);
    assert_eq!(r.body["config"]["retention_bytes"], Value::Null);
    assert_eq!(r.body["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(
        r.body["partitions"][2],
        json!({"partition": 2, "log_start_offset": 0, "log_end_offset": 0, "size_bytes": 0, "segments": 1})
    );

    let r = app
        .create(json!({"name": "audit", "retention_ms": null}))
        .await;
    assert_eq!(r.body["config"]["partitions"], 1);
    assert_eq!(r.body["config"]["retention_ms"], Value::Null);

    let r = app.get("/v1/topics").await;
    let names: Vec<&str> = r.body["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit", "orders"]);
    assert_eq!(
        app.get("/v1/topics/orders").await.body["config"]["partitions"],
        3
    );

    let r = app
        .call("DELETE", "/v1/topics/orders", "", Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_problem(
        &app.get("/v1/topics/orders").await,
        StatusCode::NOT_FOUND,
        "orders",
    );
    assert_problem(
        &app.call("DELETE", "/v1/topics/orders", "", Body::empty())
            .await,
        StatusCode::NOT_FOUND,
        "orders",
    );
}

#[tokio::test]
async fn bad_topic_requests_are_refused_and_change_nothing() {
    let app = app();
    assert_eq!(
        app.create(json!({"name": "orders"})).await.status,
        StatusCode::CREATED
    );
    assert_problem(
        &app.create(json!({"name": "orders", "partitions": 2})).await,
        StatusCode::CONFLICT,
        "already exists",
    );
    assert_problem(
        &app.create(json!({"name": "bad name"})).await,
        StatusCode::BAD_REQUEST,
        "invalid topic name",
    );
    assert_problem(
        &app.create(json!({"name": "a".repeat(250)})).await,
        StatusCode::BAD_REQUEST,
        "249",
    );
    assert_problem(
        &app.create(json!({"name": ""})).await,
        StatusCode::BAD_REQUEST,
        "empty",
    );
    assert_problem(
        &app.create(json!({"name": "x", "partitions": 0})).await,
        StatusCode::BAD_REQUEST,
        "1..=1024",
    );
    assert_problem(
        &app.create(json!({"name": "x", "partitions": 1025})).await,
        StatusCode::BAD_REQUEST,
        "1..=1024",
    );
    assert_problem(
        &app.create(json!({"name": "x", "partitions": -1})).await,
        StatusCode::BAD_REQUEST,
        "invalid",
    );
    assert_problem(
        &app.create(json!({"name": "x", "color": "red"})).await,
        StatusCode::BAD_REQUEST,
        "unknown field",
    );
    assert_problem(
        &app.create(json!({"partitions": 1})).await,
        StatusCode::BAD_REQUEST,
        "missing field `name`",
    );
    assert_problem(
        &app.create(json!({"name": "x", "retention_ms": 0})).await,
        StatusCode::BAD_REQUEST,
        "retention_ms",
    );
    let r = app
        .call("POST", "/v1/topics", "application/json", "{not json")
        .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "invalid JSON");
    let names: Vec<Value> = app.get("/v1/topics").await.body["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(names, [json!("orders")]);
    assert_eq!(app.end_offsets("orders").await, [0]);
}

#[tokio::test]
async fn a_topics_settings_change_with_patch_take_effect_and_bad_changes_change_nothing() {
    let app = app();
    let r = app.create(json!({"name": "orders", "partitions": 2})).await;
    let before = r.body["config"].clone();
    let r = app
        .alter(
            "orders",
            json!({"retention_ms": null, "retention_bytes": 1073741824, "max_message_bytes": 4096}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut after = before.clone();
    after["retention_ms"] = Value::Null;
    after["retention_bytes"] = json!(1073741824);
    after["max_message_bytes"] = json!(4096);
    assert_eq!(r.body["config"], after);
    assert_eq!(app.get("/v1/topics/orders").await.body["config"], after);
    // The new limit applies to the next publish.
    let big = json!({"specversion": "1.0", "id": "1", "source": "/t", "type": "t", "data": "x".repeat(5000)});
    let r = app
        .publish("orders", "application/cloudevents+json", big.clone())
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    // Nothing given, nothing changed; the current partition count may be repeated.
    let r = app.alter("orders", json!({"partitions": 2})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["config"], after);

    for (body, needle) in [
        (json!({"partitions": 3}), "partition count"),
        (json!({"retention_ms": 0}), "retention_ms"),
        (json!({"segment_bytes": 100}), "segment_bytes"),
        (json!({"max_message_bytes": 200000000}), "max_message_bytes"),
        (
            json!({"retention_ms": 1000, "segment_bytes": 1}),
            "segment_bytes",
        ),
        (json!({"retention_ms": "soon"}), "invalid"),
        (json!({"name": "other"}), "unknown field"),
    ] {
        assert_problem(
            &app.alter("orders", body.clone()).await,
            StatusCode::BAD_REQUEST,
            needle,
        );
        assert_eq!(
            app.get("/v1/topics/orders").await.body["config"],
            after,
            "{body}"
        );
    }
    let r = app
        .call(
            "PATCH",
            "/v1/topics/orders",
            "application/json",
            "{not json",
        )
        .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "invalid JSON");
    let r = app
        .call(
            "PATCH",
            "/v1/topics/missing",
            "application/json",
            "{}".to_string(),
        )
        .await;
    assert_problem(&r, StatusCode::NOT_FOUND, "missing");

    let r = app
        .alter("orders", json!({"max_message_bytes": 1048576}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app
        .publish("orders", "application/cloudevents+json", big)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

#[tokio::test]
async fn a_topic_truncated_reads_from_its_new_start_and_bad_truncations_change_nothing() {
    let app = app();
    app.create(json!({"name": "orders", "partitions": 2})).await;
    for i in 0..10 {
        let e = json!({"type": "t", "partitionkey": format!("k{i}"), "data": i});
        let r = app
            .publish("orders", "application/cloudevents+json", e)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let ends = app.end_offsets("orders").await;
    assert!(ends.iter().all(|e| *e >= 2), "{ends:?}");
    let truncate = |body: Value| {
        app.call(
            "POST",
            "/v1/topics/orders/truncate",
            "application/json",
            body.to_string(),
        )
    };
    // Refused as a whole: nothing is deleted when one partition is wrong.
    for (body, status, needle) in [
        (
            json!({"before": {"0": 1, "1": ends[1] + 1}}),
            StatusCode::BAD_REQUEST,
            "offset",
        ),
        (
            json!({"before": {"0": 1, "5": 0}}),
            StatusCode::NOT_FOUND,
            "partition",
        ),
        (
            json!({"before": {"0": 1, "x": 0}}),
            StatusCode::BAD_REQUEST,
            "not a number",
        ),
        (
            json!({"before": {"0": -1}}),
            StatusCode::BAD_REQUEST,
            "non-negative",
        ),
        (
            json!({"before": {"0": "start"}}),
            StatusCode::BAD_REQUEST,
            "end",
        ),
        (
            json!({"before": {}}),
            StatusCode::BAD_REQUEST,
            "no partition",
        ),
        (
            json!({"offsets": {"0": 1}}),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
    ] {
        assert_problem(&truncate(body.clone()).await, status, needle);
        let starts: Vec<Value> = app.get("/v1/topics/orders").await.body["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["log_start_offset"].clone())
            .collect();
        assert_eq!(starts, [json!(0), json!(0)], "{body}");
    }
    let r = truncate(json!({"before": {"0": 1, "1": "end"}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["log_start_offsets"], json!({"0": 1, "1": ends[1]}));
    let described = app.get("/v1/topics/orders").await.body;
    assert_eq!(described["partitions"][0]["log_start_offset"], 1);
    assert_eq!(described["partitions"][1]["log_start_offset"], ends[1]);
    // Reading from the start gives what is left; before it is out of range.
    let r = app
        .get("/v1/topics/orders/events?partition=0&offset=1&limit=100")
        .await;
    assert_eq!(
        r.body["events"].as_array().unwrap().len() as u64,
        ends[0] - 1,
        "{}",
        r.body
    );
    assert_eq!(r.body["events"][0]["offset"], 1);
    assert_problem(
        &app.get("/v1/topics/orders/events?partition=0&offset=0")
            .await,
        StatusCode::BAD_REQUEST,
        "out of range",
    );
    // Without an offset, reads start at the first event still stored.
    let r = app.get("/v1/topics/orders/events?partition=0").await;
    assert_eq!(r.body["events"][0]["offset"], 1, "{}", r.body);
}

#[tokio::test]
async fn events_are_published_in_all_three_modes_and_read_back() {
    let app = app();
    app.create(json!({"name": "orders"})).await;

    // Structured.
    let r = app
        .publish(
            "orders",
            "application/cloudevents+json",
            json!({"type": "order.created", "source": "/shop", "id": "e1", "data": {"amount": 10}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"offsets": [{"partition": 0, "offset": 0}], "position": "orders:0.1"})
    );

    // Batched, offsets in request order.
    let r = app
        .publish(
            "orders",
            "application/cloudevents-batch+json",
            json!([{"type": "a", "data": [1, 2]}, {"type": "b", "datacontenttype": "text/plain", "data": "plain text"}, {"type": "c"}]),
        )
        .await;
    assert_eq!(
        r.body,
        json!({"offsets": [{"partition": 0, "offset": 1}, {"partition": 0, "offset": 2}, {"partition": 0, "offset": 3}],
            "position": "orders:0.4"})
    );

    // Binary: attributes in ce- headers (percent-encoded), data in the body.
    let req = Request::post("/v1/topics/orders/events")
        .header("ce-specversion", "1.0")
        .header("ce-type", "sensor.reading")
        .header("ce-source", "/sensors/7")
        .header("ce-subject", "caf%C3%A9")
        .header("ce-region", "eu")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(vec![0u8, 1, 2, 255]))
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(
        r.body,
        json!({"offsets": [{"partition": 0, "offset": 4}], "position": "orders:0.5"})
    );

    let r = app
        .get("/v1/topics/orders/events?partition=0&offset=0&limit=100")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let events = r.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 5);
    assert_eq!(r.body["next_offset"], 5);
    let e0 = &events[0];
    assert_eq!(
        (e0["partition"].as_u64(), e0["offset"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(e0["event"]["specversion"], "1.0");
    assert_eq!(e0["event"]["id"], "e1");
    assert_eq!(e0["event"]["source"], "/shop");
    assert_eq!(e0["event"]["type"], "order.created");
    assert_eq!(e0["event"]["data"], json!({"amount": 10}));
    assert_eq!(e0["event"]["datacontenttype"], "application/json");
    // The server filled id (UUIDv7), source and time.
    let e3 = &events[3]["event"];
    assert_eq!(e3["source"], "/spate");
    assert_eq!(uuid_version(e3["id"].as_str().unwrap()), 7);
    assert!(
        time::OffsetDateTime::parse(
            e3["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );
    assert!(e3.get("data").is_none() && e3.get("data_base64").is_none());
    // JSON stays JSON, anything else comes back as base64.
    assert_eq!(events[1]["event"]["data"], json!([1, 2]));
    assert_eq!(events[2]["event"]["data_base64"], "cGxhaW4gdGV4dA==");
    let bin = &events[4]["event"];
    assert_eq!(bin["data_base64"], "AAEC/w==");
    assert_eq!(bin["subject"], "café");
    assert_eq!(bin["region"], "eu");
    assert_eq!(bin["datacontenttype"], "application/octet-stream");

    // Paging.
    let r = app.get("/v1/topics/orders/events?offset=1&limit=2").await;
    let offsets: Vec<u64> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2]);
    assert_eq!(r.body["next_offset"], 3);
    let r = app.get("/v1/topics/orders/events?offset=5").await;
    assert_eq!(r.body, json!({"events": [], "next_offset": 5}));
}

fn uuid_version(id: &str) -> u32 {
    id.chars().nth(14).and_then(|c| c.to_digit(16)).unwrap()
}

#[tokio::test]
async fn partition_key_picks_the_partition_with_kafkas_partitioner() {
    let app = app();
    app.create(json!({"name": "orders", "partitions": 3})).await;
    let expected = spate_broker::partitioner::partition_for_key(b"order-42", 3);
    for _ in 0..3 {
        let r = app
            .publish(
                "orders",
                "application/cloudevents+json",
                json!({"type": "t", "partitionkey": "order-42"}),
            )
            .await;
        assert_eq!(r.body["offsets"][0]["partition"], expected);
    }
    let r = app
        .get(&format!("/v1/topics/orders/events?partition={expected}"))
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 3);
    assert_eq!(r.body["events"][0]["event"]["partitionkey"], "order-42");
    // Unkeyed events spread over partitions.
    let mut used = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = app
            .publish(
                "orders",
                "application/cloudevents+json",
                json!({"type": "t"}),
            )
            .await;
        used.insert(r.body["offsets"][0]["partition"].as_u64().unwrap());
    }
    assert_eq!(used.len(), 3);
}

#[tokio::test]
async fn bad_events_are_refused_and_change_nothing() {
    let app = app_with(
        HttpLimits {
            max_request_bytes: 256 * 1024,
            ..HttpLimits::default()
        },
        4096,
    );
    app.create(json!({"name": "orders", "partitions": 2})).await;
    let ce = "application/cloudevents+json";
    assert_problem(
        &app.publish("orders", ce, json!({"data": 1})).await,
        StatusCode::BAD_REQUEST,
        "`type` is missing",
    );
    assert_problem(
        &app.publish("orders", ce, json!({"type": "t", "specversion": "0.3"}))
            .await,
        StatusCode::BAD_REQUEST,
        "specversion",
    );
    assert_problem(
        &app.publish("orders", ce, json!({"type": "t", "time": "noon"}))
            .await,
        StatusCode::BAD_REQUEST,
        "RFC 3339",
    );
    assert_problem(
        &app.publish("orders", ce, json!({"type": "t", "Upper": "x"}))
            .await,
        StatusCode::BAD_REQUEST,
        "attribute name",
    );
    assert_problem(
        &app.publish("orders", ce, json!([1])).await,
        StatusCode::BAD_REQUEST,
        "JSON object",
    );
    assert_problem(
        &app.call("POST", "/v1/topics/orders/events", ce, "{\"type\":")
            .await,
        StatusCode::BAD_REQUEST,
        "invalid JSON",
    );
    // One bad event spoils the batch: nothing is written.
    let batch = json!([{"type": "ok"}, {"type": "ok"}, {"nope": 1}]);
    let r = app
        .publish("orders", "application/cloudevents-batch+json", batch)
        .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "event 2");
    assert_eq!(r.body["index"], 2);
    assert_problem(
        &app.publish(
            "orders",
            "application/cloudevents-batch+json",
            json!({"type": "t"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "array",
    );
    assert_problem(
        &app.publish("orders", "application/cloudevents-batch+json", json!([]))
            .await,
        StatusCode::BAD_REQUEST,
        "no event",
    );
    // An event over max_event_bytes, alone or in a batch.
    let big = "x".repeat(5000);
    let r = app
        .publish("orders", ce, json!({"type": "t", "data": big}))
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "over the limit");
    assert_eq!(r.body["max_event_bytes"], 4096);
    let r = app
        .publish(
            "orders",
            "application/cloudevents-batch+json",
            json!([{"type": "t"}, {"type": "t", "data": big}]),
        )
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "event 1");
    // A request over max_request_bytes, with and without a Content-Length.
    let huge: Vec<Value> = (0..300)
        .map(|_| json!({"type": "t", "data": "y".repeat(1000)}))
        .collect();
    let r = app
        .publish(
            "orders",
            "application/cloudevents-batch+json",
            Value::Array(huge.clone()),
        )
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "request body exceeds");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(Value::Array(huge).to_string().into_bytes())];
    let req = Request::post("/v1/topics/orders/events")
        .header(header::CONTENT_TYPE, "application/cloudevents-batch+json")
        .body(Body::from_stream(futures_stream(chunks)))
        .unwrap();
    assert_problem(
        &app.send(req).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body exceeds",
    );
    // More events than one request may carry.
    let many: Vec<Value> = (0..10_001).map(|_| json!({"type": "t"})).collect();
    let r = app
        .publish(
            "orders",
            "application/cloudevents-batch+json",
            Value::Array(many),
        )
        .await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "10001 events");
    // Wrong media type, unknown topic.
    assert_eq!(
        app.call("POST", "/v1/topics/orders/events", "text/plain", "hi")
            .await
            .status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_problem(
        &app.publish("nope", ce, json!({"type": "t"})).await,
        StatusCode::NOT_FOUND,
        "nope",
    );
    // Invalid percent-encoding in binary mode.
    let req = Request::post("/v1/topics/orders/events")
        .header("ce-type", "t%zz")
        .body(Body::empty())
        .unwrap();
    assert_problem(&app.send(req).await, StatusCode::BAD_REQUEST, "percent");
    // Binary mode whose body is declared JSON but is not.
    for ct in [
        "application/json",
        "application/vnd.order+json; charset=utf-8",
    ] {
        let req = Request::post("/v1/topics/orders/events")
            .header("ce-type", "t")
            .header("content-type", ct)
            .body(Body::from("{\"amount\": 5"))
            .unwrap();
        assert_problem(
            &app.send(req).await,
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        );
    }
    assert_eq!(app.end_offsets("orders").await, [0, 0]);
    // An empty body is an event without data; other media types are opaque bytes.
    let req = Request::post("/v1/topics/orders/events")
        .header("ce-type", "t")
        .header("content-type", "application/json")
        .body(Body::empty())
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let at = &r.body["offsets"][0];
    let read = app
        .get(&format!(
            "/v1/topics/orders/events?partition={}&offset={}&limit=1",
            at["partition"], at["offset"]
        ))
        .await;
    let event = &read.body["events"][0]["event"];
    assert_eq!(event["type"], "t", "{}", read.body);
    assert!(
        event.get("data").is_none() && event.get("data_base64").is_none(),
        "{event}"
    );
    let req = Request::post("/v1/topics/orders/events")
        .header("ce-type", "t")
        .header("content-type", "text/plain")
        .body(Body::from("{\"amount\": 5"))
        .unwrap();
    assert_eq!(app.send(req).await.status, StatusCode::CREATED);
}

fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core_stream::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_core_stream::iter(chunks)
}

/// A minimal stream over a vector, so the body has no Content-Length.
mod futures_core_stream {
    pub use tokio_stream::{Stream, iter};
}

#[tokio::test]
async fn bad_reads_are_refused() {
    let app = app();
    app.create(json!({"name": "orders", "partitions": 2})).await;
    app.publish(
        "orders",
        "application/cloudevents+json",
        json!({"type": "t", "partitionkey": "k"}),
    )
    .await;
    assert_problem(
        &app.get("/v1/topics/nope/events").await,
        StatusCode::NOT_FOUND,
        "nope",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?partition=2").await,
        StatusCode::NOT_FOUND,
        "partition 2",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?partition=-1").await,
        StatusCode::BAD_REQUEST,
        "partition",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?offset=abc").await,
        StatusCode::BAD_REQUEST,
        "offset",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?limit=0").await,
        StatusCode::BAD_REQUEST,
        "limit",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?limit=1001").await,
        StatusCode::BAD_REQUEST,
        "limit",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?time=yesterday").await,
        StatusCode::BAD_REQUEST,
        "RFC 3339",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?offset=0&time=2020-01-01T00:00:00Z")
            .await,
        StatusCode::BAD_REQUEST,
        "either",
    );
    assert_problem(
        &app.get("/v1/topics/orders/events?color=red").await,
        StatusCode::BAD_REQUEST,
        "unknown query parameter",
    );
    let p = spate_broker::partitioner::partition_for_key(b"k", 2);
    let r = app
        .get(&format!("/v1/topics/orders/events?partition={p}&offset=7"))
        .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "out of range");
    assert_eq!(r.body["log_end_offset"], 1);
}

#[tokio::test]
async fn reads_by_time_start_at_the_first_event_at_or_after_it() {
    let app = app();
    app.create(json!({"name": "t"})).await;
    let before = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    app.publish("t", "application/cloudevents+json", json!({"type": "a"}))
        .await;
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let r = app
        .get(&format!("/v1/topics/t/events?time={}", fmt(before)))
        .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let r = app
        .get(&format!("/v1/topics/t/events?time={}", fmt(later)))
        .await;
    assert_eq!(r.body, json!({"events": [], "next_offset": 1}));
}

#[tokio::test]
async fn a_failed_fsync_gives_clear_errors_and_no_more_acks() {
    let app = app();
    app.create(json!({"name": "t"})).await;
    let ce = "application/cloudevents+json";
    assert_eq!(
        app.publish("t", ce, json!({"type": "a"})).await.status,
        StatusCode::CREATED
    );
    app.disk.fail_sync_at(1);
    assert_problem(
        &app.publish("t", ce, json!({"type": "b"})).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        "not acknowledged",
    );
    for _ in 0..2 {
        let r = app.publish("t", ce, json!({"type": "c"})).await;
        assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE, "refuses writes");
    }
    // Reads still work and show only the acknowledged event.
    let r = app.get("/v1/topics/t/events").await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_internal_offsets_topic_can_be_read_but_not_written_or_deleted() {
    let disk = MemStorage::new();
    let log = Arc::new(
        Log::open(
            Arc::new(disk.clone()),
            Path::new("/data"),
            LogConfig::default(),
        )
        .unwrap(),
    );
    spate_broker::groups::Coordinator::open(log.clone(), std::time::Duration::ZERO, 0).unwrap();
    let broker = Arc::new(Broker::new(log, Limits::default()));
    let app = App {
        router: router(AppState {
            broker,
            limits: HttpLimits::default(),
            push: Default::default(),
            metrics: None,
            projections: None,
            detectors: None,
            groups: None,
            subscriptions: None,
            stopping: None,
            auth: None,
            deliveries: None,
        }),
        disk,
    };
    let r = app.get("/v1/topics/__consumer_offsets").await;
    assert_eq!(r.body["internal"], true);
    let r = app
        .publish(
            "__consumer_offsets",
            "application/cloudevents+json",
            json!({"type": "t"}),
        )
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN, "internal");
    let r = app
        .call("DELETE", "/v1/topics/__consumer_offsets", "", Body::empty())
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN, "cannot be deleted");
    let r = app
        .call(
            "PATCH",
            "/v1/topics/__consumer_offsets",
            "application/json",
            r#"{"retention_ms": 1000}"#,
        )
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN, "reconfigured");
    let r = app
        .call(
            "POST",
            "/v1/topics/__consumer_offsets/truncate",
            "application/json",
            r#"{"before": {"0": "end"}}"#,
        )
        .await;
    assert_problem(&r, StatusCode::FORBIDDEN, "internal");
    assert_eq!(app.end_offsets("__consumer_offsets").await, [0]);
    assert_eq!(
        app.get("/v1/topics/__consumer_offsets/events").await.status,
        StatusCode::OK
    );
}
