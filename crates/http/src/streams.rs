//! Stream endpoints for event sourcing: append with an expected version, read one stream, and its
//! position.

use std::collections::HashMap;
use std::fmt::Write;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use spate_broker::streams::Expected;

use crate::events::{number, parse_events, read_body};
use crate::{ApiError, ApiResult, AppState};

fn query(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    allowed: &[&str],
) -> ApiResult<HashMap<String, String>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(key) = q.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{key}`"
        )));
    }
    Ok(q)
}

/// `POST /v1/topics/{topic}/streams/{stream}/events?expected_version=<n>|any|no_stream|exists`
pub async fn append(
    State(s): State<AppState>,
    Path((topic, stream)): Path<(String, String)>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let q = query(q, &["expected_version"])?;
    let expected: Expected = match q.get("expected_version") {
        Some(v) => v.parse().map_err(ApiError::bad_request)?,
        None => Expected::Any,
    };
    s.broker.topic(&topic)?;
    let body = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let events = parse_events(&headers, body)?;
    let placed = s
        .broker
        .append_to_stream(&topic, &stream, expected, events)
        .await?;
    let mut body = json!(placed);
    body["position"] = json!(crate::events::position_after(
        &topic,
        placed.offsets.iter().map(|o| (placed.partition, *o)),
    ));
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /v1/topics/{topic}/streams/{stream}/events?from_version=&limit=&direction=forward|backward`
pub async fn read(
    State(s): State<AppState>,
    Path((topic, stream)): Path<(String, String)>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let q = query(q, &["from_version", "limit", "direction"])?;
    let max = s.broker.limits().read_events_max;
    let limit: usize = number(&q, "limit")?.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be within 1..={max}"
        )));
    }
    let backward = match q.get("direction").map(String::as_str) {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(d) => {
            return Err(ApiError::bad_request(format!(
                "`direction` must be forward or backward, got {d:?}"
            )));
        }
    };
    let from: Option<u64> = number(&q, "from_version")?;
    let events = s
        .broker
        .read_stream(
            &topic,
            &stream,
            from,
            limit,
            backward,
            spate_broker::event::record_json,
        )
        .await?
        .ok_or_else(|| not_found(&stream))?;
    // Written directly: events are copied as JSON text rather than built into a tree.
    let mut out = String::with_capacity(events.len() * 700 + 16);
    out.push_str("{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"version\":{},\"partition\":{},\"offset\":{},\"event\":",
            e.version, e.partition, e.offset
        );
        out.push_str(&e.event);
        out.push('}');
    }
    out.push_str("]}");
    Ok(crate::json_text(out))
}

/// `DELETE /v1/topics/{topic}/streams/{stream}?expected_version=<n>|any|exists`: a soft
/// delete (see docs/streams.md).
pub async fn delete(
    State(s): State<AppState>,
    Path((topic, stream)): Path<(String, String)>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q, &["expected_version"])?;
    let expected: Expected = match q.get("expected_version") {
        Some(v) => v.parse().map_err(ApiError::bad_request)?,
        None => Expected::Any,
    };
    if expected == Expected::NoStream {
        return Err(ApiError::bad_request(
            "expected_version=no_stream cannot delete anything: give a version, any or exists",
        ));
    }
    let deleted = s
        .broker
        .delete_stream(&topic, &stream, expected)
        .await?
        .ok_or_else(|| not_found(&stream))?;
    Ok(Json(json!(deleted)))
}

/// `GET /v1/topics/{topic}/streams?limit=&after=`: the topic's streams, a page at a time.
pub async fn list(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q, &["limit", "after"])?;
    let limit: usize = number(&q, "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("`limit` must be within 1..=1000"));
    }
    // The cursor is `<partition>:<stream id>`, as `next` gives it.
    let after = match q.get("after") {
        None => None,
        Some(c) => {
            let parsed = c
                .split_once(':')
                .and_then(|(p, stream)| Some((p.parse::<u32>().ok()?, stream.to_string())));
            Some(parsed.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`after` must be a cursor from `next` (<partition>:<stream>), got {c:?}"
                ))
            })?)
        }
    };
    s.broker.topic(&topic)?;
    let (streams, next) = s.broker.list_streams(&topic, after, limit).await?;
    Ok(Json(json!({
        "streams": streams,
        "next": next.map(|(p, stream)| format!("{p}:{stream}")),
    })))
}

/// `GET /v1/topics/{topic}/streams/{stream}`
pub async fn info(
    State(s): State<AppState>,
    Path((topic, stream)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let info = s
        .broker
        .stream_info(&topic, &stream)
        .await?
        .ok_or_else(|| not_found(&stream))?;
    Ok(Json(json!(info)))
}

fn not_found(stream: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "stream-not-found",
        format!("stream {stream:?} has no events"),
    )
}
