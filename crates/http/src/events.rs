//! Event endpoints: publish CloudEvents (structured, batched and binary modes) and read them back.

use std::collections::HashMap;
use std::fmt::Write;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use spate_broker::{BrokerError, Event, Start};

use crate::{ApiError, ApiResult, AppState};

/// Reads a request body of at most `limit` bytes; a larger one gets 413 (before reading it when
/// `Content-Length` tells).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("request body exceeds the limit of {limit} bytes"),
        )
        .with("max_request_bytes", limit)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                too_large()
            } else {
                ApiError::bad_request(format!("failed to read the request body: {e}"))
            }
        })
}

/// Parses a JSON request body; `T` may borrow its strings from `bytes`.
pub fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            format!("invalid JSON body: {e}"),
        )
    })
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Decodes the percent-encoding the CloudEvents HTTP binding uses for header values.
fn percent_decode(v: &[u8]) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request("invalid percent-encoding in a ce- header"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("a ce- header is not UTF-8"))
}

fn invalid(index: usize, error: spate_broker::EventError) -> ApiError {
    BrokerError::InvalidEvent { index, error }.into()
}

/// Events in one publish request at most: bounds the memory one request can hold while it is parsed
/// and encoded (a 16 MiB body of tiny events would otherwise expand to millions of structures).
pub const EVENTS_PER_REQUEST_MAX: usize = 10_000;

fn check_count(n: usize) -> ApiResult<()> {
    if n > EVENTS_PER_REQUEST_MAX {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the batch holds {n} events, over the limit of {EVENTS_PER_REQUEST_MAX}"),
        )
        .with("max_events", EVENTS_PER_REQUEST_MAX));
    }
    Ok(())
}

/// Parses a batch: a non-empty array of structured events, within the count limit.
fn parse_batch(items: Vec<Value>) -> ApiResult<Vec<Event>> {
    if items.is_empty() {
        return Err(ApiError::bad_request("the batch holds no event"));
    }
    check_count(items.len())?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| Event::from_json(v).map_err(|e| invalid(i, e)))
        .collect()
}

/// Parses the events of a publish request according to its mode.
pub(crate) fn parse_events(headers: &HeaderMap, body: Bytes) -> ApiResult<Vec<Event>> {
    let ct = content_type(headers);
    let mut attributes = Vec::new();
    for (name, value) in headers {
        if let Some(attr) = name.as_str().strip_prefix("ce-") {
            attributes.push((attr.to_string(), percent_decode(value.as_bytes())?));
        }
    }
    let mt = ct.as_deref().map(media_type);
    match mt.as_deref() {
        Some("application/cloudevents+json") => {
            let v: Value = parse_json(&body)?;
            Ok(vec![Event::from_json(v).map_err(|e| invalid(0, e))?])
        }
        Some("application/cloudevents-batch+json") => {
            let v: Value = parse_json(&body)?;
            let Value::Array(items) = v else {
                return Err(ApiError::bad_request(
                    "a cloudevents batch must be a JSON array",
                ));
            };
            parse_batch(items)
        }
        _ if !attributes.is_empty() => Ok(vec![
            Event::from_binary(attributes, ct, body.to_vec()).map_err(|e| invalid(0, e))?,
        ]),
        Some("application/json") => {
            // Convenience: a plain JSON object or array of structured events.
            match parse_json::<Value>(&body)? {
                Value::Array(items) => parse_batch(items),
                v => Ok(vec![Event::from_json(v).map_err(|e| invalid(0, e))?]),
            }
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send application/cloudevents+json, application/cloudevents-batch+json, \
             or binary mode with ce- headers",
        )),
    }
}

pub async fn publish(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    s.broker.topic(&topic)?;
    let body = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let events = parse_events(&headers, body)?;
    let placements = s.broker.publish(&topic, events).await?;
    let position = position_after(&topic, placements.iter().map(|p| (p.partition, p.offset)));
    Ok((
        StatusCode::CREATED,
        Json(json!({ "offsets": placements, "position": position })),
    ))
}

/// The read-your-writes token after writes at (partition, offset): projections that reached it
/// have applied them.
pub(crate) fn position_after(topic: &str, written: impl Iterator<Item = (u32, u64)>) -> String {
    let mut next = std::collections::BTreeMap::new();
    for (p, o) in written {
        let e = next.entry(p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    spate_broker::projections::position_token(topic, &next)
}

pub(crate) fn number<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
) -> ApiResult<Option<T>> {
    q.get(name)
        .map(|v| {
            v.parse::<T>().map_err(|_| {
                ApiError::bad_request(format!(
                    "query parameter `{name}` must be a non-negative integer, got {v:?}"
                ))
            })
        })
        .transpose()
}

pub async fn read(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    for key in q.keys() {
        if !matches!(key.as_str(), "partition" | "offset" | "time" | "limit") {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}`"
            )));
        }
    }
    let partition: u32 = number(&q, "partition")?.unwrap_or(0);
    let max = s.broker.limits().read_events_max;
    let limit: usize = number(&q, "limit")?.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be within 1..={max}"
        )));
    }
    let start = match (number::<u64>(&q, "offset")?, q.get("time")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either `offset` or `time`, not both",
            ));
        }
        (Some(o), None) => Start::Offset(o),
        (None, Some(t)) => {
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "`time` must be an RFC 3339 timestamp, got {t:?}"
                    ))
                })?;
            Start::Time((t.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        (None, None) => Start::Earliest,
    };
    let (events, next_offset) = s.broker.read_json(&topic, partition, start, limit).await?;
    let mut out =
        String::with_capacity(events.iter().map(|(_, e)| e.len() + 48).sum::<usize>() + 32);
    out.push_str("{\"events\":[");
    for (i, (offset, event)) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"partition\":{partition},\"offset\":{offset},\"event\":"
        );
        out.push_str(event);
        out.push('}');
    }
    let _ = write!(out, "],\"next_offset\":{next_offset}}}");
    Ok(crate::json_text(out))
}
