//! Durable subscriptions: define them, pull and settle messages, browse and redrive dead letters.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use spate_broker::subscriptions::{
    Delivery, Position, SettleResult, Spec, SubError, Subscriptions,
};

use crate::events::{number, parse_json, read_body};
use crate::{ApiError, ApiResult, AppState};

impl From<SubError> for ApiError {
    fn from(e: SubError) -> Self {
        match e {
            SubError::NotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "subscription-not-found",
                e.to_string(),
            ),
            SubError::Invalid(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-subscription",
                e.to_string(),
            ),
            SubError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "subscription-conflict", e.to_string())
            }
            SubError::Stopping => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", e.to_string())
            }
            SubError::Broker(e) => e.into(),
        }
    }
}

fn subs(s: &AppState) -> ApiResult<&Arc<Subscriptions>> {
    s.subscriptions.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "subscriptions-unavailable",
            "subscriptions are not running on this server",
        )
    })
}

async fn body<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<T> {
    let bytes = read_body(headers, body, s.limits.max_request_bytes).await?;
    borrowed(&bytes)
}

/// A request body that may borrow its strings from the bytes (`{}` when empty).
fn borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> ApiResult<T> {
    parse_json(if bytes.is_empty() { b"{}" } else { bytes })
}

/// `{"results":[{"ack_id":...,"result":...},...]}` members (without braces) for ack ids and
/// their results, in request order.
fn write_results(out: &mut String, ack_ids: &[Cow<'_, str>], results: &[SettleResult]) {
    use spate_broker::event::push_json_str;
    out.push_str("\"results\":[");
    for (i, (id, r)) in ack_ids.iter().zip(results).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"ack_id\":");
        push_json_str(out, id);
        out.push_str(",\"result\":\"");
        out.push_str(r);
        out.push_str("\"}");
    }
    out.push(']');
}

/// The JSON members of a delivered message (without braces), after `prefix` members.
pub fn write_delivery(out: &mut String, prefix: &str, d: &Delivery) {
    use spate_broker::event::push_json_str;
    use std::fmt::Write;
    out.push_str(prefix);
    out.push_str("\"ack_id\":");
    push_json_str(out, &d.ack_id);
    let _ = write!(out, ",\"attempt\":{},\"topic\":", d.attempt);
    push_json_str(out, &d.topic);
    let _ = write!(
        out,
        ",\"partition\":{},\"offset\":{},\"event\":",
        d.partition, d.offset
    );
    d.event.write_json(out);
}

/// `PUT /v1/subscriptions/{name}`: 201 when created, 200 when updated or unchanged.
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let spec: Spec = body(&s, &headers, raw).await?;
    let (created, info) = subs(&s)?.put(&name, spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!(info))))
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "subscriptions": subs(&s)?.list() })))
}

pub async fn describe(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(subs(&s)?.info(&name)?)))
}

pub async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    subs(&s)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullRequest<'a> {
    #[serde(default = "default_max")]
    max_messages: usize,
    #[serde(default)]
    wait_ms: u64,
    /// Messages to ack before pulling: one round trip per batch for a consumer that acks what it
    /// processed as it asks for more.
    #[serde(default, borrow)]
    ack_ids: Vec<Cow<'a, str>>,
}

fn default_max() -> usize {
    100
}

/// `POST /v1/subscriptions/{name}/pull`: long poll for up to `max_messages`.
pub async fn pull(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Response> {
    let bytes = read_body(&headers, raw, s.limits.max_request_bytes).await?;
    let req: PullRequest = borrowed(&bytes)?;
    let max = spate_broker::subscriptions::PULL_MAX;
    if !(1..=max).contains(&req.max_messages) {
        return Err(ApiError::bad_request(format!(
            "`max_messages` must be within 1..={max}"
        )));
    }
    let wait_max = spate_broker::subscriptions::PULL_WAIT_MAX.as_millis() as u64;
    if req.wait_ms > wait_max {
        return Err(ApiError::bad_request(format!(
            "`wait_ms` must be at most {wait_max}"
        )));
    }
    let subs = subs(&s)?;
    // Acks first, so that a message they release (the next one of its key) can be pulled now;
    // the pull runs while the acks' journal write syncs, and the answer waits for both.
    let acks = if req.ack_ids.is_empty() {
        None
    } else {
        Some(subs.ack_unsynced(&name, &req.ack_ids)?)
    };
    let acked = async {
        match acks {
            Some(acks) => subs.acks_durable(&name, acks).await.map(Some),
            None => Ok(None),
        }
    };
    let pulled = async {
        let pulled = subs.pull(&name, req.max_messages, Duration::from_millis(req.wait_ms));
        match s.stopping.clone() {
            Some(mut stop) => tokio::select! {
                r = pulled => r,
                // Shutting down: answer the long poll empty rather than hold the drain.
                _ = stop.wait_for(|s| *s) => Ok(Vec::new()),
            },
            None => pulled.await,
        }
    };
    let (acked, messages) = tokio::join!(acked, pulled);
    let (acked, messages) = (acked?, messages?);
    // Written directly: events are copied as JSON text rather than built into a tree.
    let mut out = String::with_capacity(messages.len() * 1500 + 16);
    out.push_str("{\"messages\":[");
    for (i, d) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        write_delivery(&mut out, "", d);
        out.push('}');
    }
    out.push(']');
    if let Some(results) = acked {
        out.push(',');
        write_results(&mut out, &req.ack_ids, &results);
    }
    out.push('}');
    Ok(crate::json_text(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleRequest<'a> {
    #[serde(borrow)]
    ack_ids: Vec<Cow<'a, str>>,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    ack_timeout_ms: Option<u64>,
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack,
    Extend,
}

async fn settle(
    s: AppState,
    name: String,
    headers: HeaderMap,
    raw: Body,
    how: Settle,
) -> ApiResult<Response> {
    let bytes = read_body(&headers, raw, s.limits.max_request_bytes).await?;
    let req: SettleRequest = borrowed(&bytes)?;
    let subs = subs(&s)?;
    let check = |field: &str, given: bool| {
        if given {
            Err(ApiError::bad_request(format!(
                "`{field}` does not apply to this request"
            )))
        } else {
            Ok(())
        }
    };
    let results = match how {
        Settle::Ack => {
            check("delay_ms", req.delay_ms.is_some())?;
            check("ack_timeout_ms", req.ack_timeout_ms.is_some())?;
            subs.ack(&name, &req.ack_ids).await?
        }
        Settle::Nack => {
            check("ack_timeout_ms", req.ack_timeout_ms.is_some())?;
            subs.nack(&name, &req.ack_ids, req.delay_ms).await?
        }
        Settle::Extend => {
            check("delay_ms", req.delay_ms.is_some())?;
            subs.extend(&name, &req.ack_ids, req.ack_timeout_ms).await?
        }
    };
    let mut out = String::with_capacity(16 + req.ack_ids.len() * 48);
    out.push('{');
    write_results(&mut out, &req.ack_ids, &results);
    out.push('}');
    Ok(crate::json_text(out))
}

/// `POST /v1/subscriptions/{name}/ack {"ack_ids": [...]}`
pub async fn ack(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Response> {
    settle(s, name, headers, raw, Settle::Ack).await
}

/// `POST /v1/subscriptions/{name}/nack {"ack_ids": [...], "delay_ms": optional}`
pub async fn nack(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Response> {
    settle(s, name, headers, raw, Settle::Nack).await
}

/// `POST /v1/subscriptions/{name}/extend {"ack_ids": [...], "ack_timeout_ms": optional}`
pub async fn extend(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Response> {
    settle(s, name, headers, raw, Settle::Extend).await
}

/// Parses a dead-letter position `<partition>:<offset>`.
fn position(s: &str) -> ApiResult<(u32, u64)> {
    s.split_once(':')
        .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`after` must be <partition>:<offset> as given by `next`, got {s:?}"
            ))
        })
}

/// `GET /v1/subscriptions/{name}/dead-letters?limit=&after=`
pub async fn dead_letters(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(key) = q.keys().find(|k| !matches!(k.as_str(), "limit" | "after")) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{key}`"
        )));
    }
    let max = s.broker.limits().read_events_max;
    let limit: usize = number(&q, "limit")?.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be within 1..={max}"
        )));
    }
    let after = q.get("after").map(|a| position(a)).transpose()?;
    let (letters, next) = subs(&s)?.dead_letters(&name, after, limit, None).await?;
    let letters: Vec<Value> = letters
        .iter()
        .map(|l| json!({"partition": l.partition, "offset": l.offset, "event": l.event.to_json()}))
        .collect();
    Ok(Json(json!({
        "dead_letters": letters,
        "next": next.map(|(p, o)| format!("{p}:{o}")),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    #[serde(default)]
    filter: Option<String>,
    #[serde(default = "default_redrive_limit")]
    limit: usize,
}

fn default_redrive_limit() -> usize {
    1000
}

/// Dead letters one redrive request gives back at most.
pub const REDRIVE_MAX: usize = 10_000;

/// `POST /v1/subscriptions/{name}/redrive {"filter": "<CEL>", "limit": N}`
pub async fn redrive(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Json<Value>> {
    let req: RedriveRequest = body(&s, &headers, raw).await?;
    if !(1..=REDRIVE_MAX).contains(&req.limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be within 1..={REDRIVE_MAX}"
        )));
    }
    let n = subs(&s)?
        .redrive(&name, req.filter.as_deref(), req.limit)
        .await?;
    Ok(Json(json!({ "redriven": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeekRequest {
    to: String,
}

/// `POST /v1/subscriptions/{name}/seek {"to": "earliest"|"latest"|"<RFC 3339>"}`
pub async fn seek(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Json<Value>> {
    let req: SeekRequest = body(&s, &headers, raw).await?;
    let to = Position::parse(&req.to)?;
    let subs = subs(&s)?;
    subs.seek(&name, to).await?;
    Ok(Json(json!(subs.info(&name)?)))
}
