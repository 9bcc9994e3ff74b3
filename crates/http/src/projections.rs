//! Projections: define read models over a topic and query their rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use spate_broker::projections::{AsOf, Definition, ProjectionError, Projections, Row};

use crate::events::{number, parse_json, read_body};
use crate::{ApiError, ApiResult, AppState};

/// How long a read waits for `after_position` by default, and at most.
const WAIT_DEFAULT: Duration = Duration::from_secs(5);
const WAIT_MAX: Duration = Duration::from_secs(60);

impl From<ProjectionError> for ApiError {
    fn from(e: ProjectionError) -> Self {
        match e {
            ProjectionError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "projection-not-found", e.to_string())
            }
            ProjectionError::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid-projection", e.to_string())
            }
            ProjectionError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "projection-conflict", e.to_string())
            }
            ProjectionError::Timeout(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "position-not-reached",
                e.to_string(),
            ),
            ProjectionError::Store(_) => {
                tracing::error!(error = %e, "projection store failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "projection-store",
                    "the projection store failed",
                )
            }
            ProjectionError::Broker(e) => e.into(),
        }
    }
}

fn projections(s: &AppState) -> ApiResult<&Arc<Projections>> {
    s.projections.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "projections-unavailable",
            "projections are not running on this server",
        )
    })
}

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

/// Waits for `after_position` when given (`timeout_ms` bounds the wait).
async fn read_your_writes(
    p: &Projections,
    name: &str,
    q: &HashMap<String, String>,
) -> ApiResult<()> {
    let wait = match number::<u64>(q, "timeout_ms")? {
        Some(ms) => Duration::from_millis(ms),
        None => WAIT_DEFAULT,
    };
    if wait > WAIT_MAX {
        return Err(ApiError::bad_request(format!(
            "`timeout_ms` must be at most {}",
            WAIT_MAX.as_millis()
        )));
    }
    if let Some(token) = q.get("after_position") {
        p.wait_for(name, token, wait).await?;
    }
    Ok(())
}

fn row_json(key: &str, row: &Row) -> Value {
    json!({"key": key, "value": row.value, "partition": row.partition, "offset": row.offset})
}

/// `PUT /v1/projections/{name}`: 201 when created, 200 when changed (and rebuilt) or unchanged.
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bytes = read_body(&headers, raw, s.limits.max_request_bytes).await?;
    let definition: Definition = parse_json(&bytes)?;
    let (created, status) = projections(&s)?.put(&name, definition).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(json!(status))))
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "projections": projections(&s)?.list() })))
}

pub async fn describe(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(projections(&s)?.status(&name)?)))
}

pub async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    projections(&s)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/projections/{name}/rebuild`
pub async fn rebuild(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(projections(&s)?.rebuild(&name).await?)))
}

/// `GET /v1/projections/{name}/rows/{key}?after_position=&timeout_ms=&as_of=`
pub async fn row(
    State(s): State<AppState>,
    Path((name, key)): Path<(String, String)>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q, &["after_position", "timeout_ms", "as_of"])?;
    let p = projections(&s)?;
    read_your_writes(p, &name, &q).await?;
    let row = match q.get("as_of") {
        None => p.row(&name, &key).await?,
        Some(a) => {
            let as_of = match a.parse::<u64>() {
                Ok(o) => AsOf::Offset(o),
                Err(_) => AsOf::Time(
                    time::OffsetDateTime::parse(a, &time::format_description::well_known::Rfc3339)
                        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                        .map_err(|_| {
                            ApiError::bad_request(format!(
                                "`as_of` must be an offset or an RFC 3339 time, got {a:?}"
                            ))
                        })?,
                ),
            };
            p.row_as_of(&name, &key, as_of).await?
        }
    };
    match row {
        Some(row) => Ok(Json(row_json(&key, &row))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "row-not-found",
            format!("projection {name} has no row {key:?}"),
        )),
    }
}

/// `GET /v1/projections/{name}/rows?prefix=&after=&limit=&after_position=`
pub async fn rows(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(
        q,
        &["prefix", "after", "limit", "after_position", "timeout_ms"],
    )?;
    let max = spate_broker::projections::LIST_MAX;
    let limit: usize = number(&q, "limit")?.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be within 1..={max}"
        )));
    }
    let p = projections(&s)?;
    read_your_writes(p, &name, &q).await?;
    let prefix = q.get("prefix").map_or("", String::as_str);
    let (rows, more) = p
        .rows(&name, prefix, q.get("after").map(String::as_str), limit)
        .await?;
    let next = if more {
        rows.last().map(|(k, _)| Value::from(k.as_str()))
    } else {
        None
    };
    let rows: Vec<Value> = rows.iter().map(|(k, r)| row_json(k, r)).collect();
    Ok(Json(
        json!({ "rows": rows, "next": next.unwrap_or(Value::Null) }),
    ))
}

/// `GET /v1/projections/{name}/sse?key=|prefix=`: row changes as Server-Sent Events (`row`
/// events with `{"key", "value", "partition", "offset"}`), as the WebSocket `watch` gives them.
pub async fn sse(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let q = query(q, &["key", "prefix"])?;
    let (key, prefix) = (q.get("key").cloned(), q.get("prefix").cloned());
    if key.is_some() && prefix.is_some() {
        return Err(ApiError::bad_request("give `key` or `prefix`, not both"));
    }
    let changes = projections(&s)?.watch(&name)?;
    let stopping = s.stopping.clone();
    let stream = futures_util::stream::unfold(Some((changes, stopping)), move |state| {
        let (key, prefix) = (key.clone(), prefix.clone());
        async move {
            let (mut changes, mut stopping) = state?;
            loop {
                let next = tokio::select! {
                    n = changes.recv() => n,
                    _ = crate::push::stopped(&mut stopping) => return None,
                };
                let event = match next {
                    Ok(c) => {
                        let wanted = match (&key, &prefix) {
                            (Some(k), _) => &c.key == k,
                            (_, Some(p)) => c.key.starts_with(p.as_str()),
                            _ => true,
                        };
                        if !wanted {
                            continue;
                        }
                        SseEvent::default()
                            .event("row")
                            .data(row_json(&c.key, &c.row).to_string())
                    }
                    Err(e) => {
                        let code = match e {
                            tokio::sync::broadcast::error::RecvError::Lagged(_) => "slow-consumer",
                            tokio::sync::broadcast::error::RecvError::Closed => {
                                "projection-changed"
                            }
                        };
                        let event = SseEvent::default()
                            .event("error")
                            .data(json!({"code": code, "message": e.to_string()}).to_string());
                        return Some((Ok::<_, std::convert::Infallible>(event), None));
                    }
                };
                return Some((Ok(event), Some((changes, stopping))));
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
