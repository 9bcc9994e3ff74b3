//! Detectors: anomaly detection and alert rules over series read from a topic.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use spate_broker::detectors::{Definition, DetectorError, Detectors};

use crate::events::{number, parse_json, read_body};
use crate::{ApiError, ApiResult, AppState};

/// Series one listing returns by default and at most.
const SERIES_LIST_DEFAULT: usize = 100;
const SERIES_LIST_MAX: usize = 10_000;

impl From<DetectorError> for ApiError {
    fn from(e: DetectorError) -> Self {
        match e {
            DetectorError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "detector-not-found", e.to_string())
            }
            DetectorError::SeriesNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "series-not-found", e.to_string())
            }
            DetectorError::Invalid(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid-detector", e.to_string())
            }
            DetectorError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "detector-conflict", e.to_string())
            }
            DetectorError::Store(_) => {
                tracing::error!(error = %e, "detector store failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "detector-store",
                    "the detector store failed",
                )
            }
            DetectorError::Broker(e) => e.into(),
        }
    }
}

fn detectors(s: &AppState) -> ApiResult<&Arc<Detectors>> {
    s.detectors.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "detectors-unavailable",
            "detectors are not running on this server",
        )
    })
}

/// `PUT /v1/detectors/{name}`: 201 when created, 200 when replaced (state starts over) or
/// unchanged.
pub async fn put(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bytes = read_body(&headers, raw, s.limits.max_request_bytes).await?;
    let definition: Definition = parse_json(&bytes)?;
    let (created, status) = detectors(&s)?.put(&name, definition).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(json!(status))))
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "detectors": detectors(&s)?.list() })))
}

pub async fn describe(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(detectors(&s)?.status(&name)?)))
}

pub async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    detectors(&s)?.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/detectors/{name}/series?limit=`: the series tracked, most recently seen first.
pub async fn series(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(key) = q.keys().find(|k| k.as_str() != "limit") {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{key}`"
        )));
    }
    let limit = number::<usize>(&q, "limit")?.unwrap_or(SERIES_LIST_DEFAULT);
    if !(1..=SERIES_LIST_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be between 1 and {SERIES_LIST_MAX}"
        )));
    }
    Ok(Json(
        json!({ "series": detectors(&s)?.series(&name, limit)? }),
    ))
}

/// `GET /v1/detectors/{name}/series/{series}`: the series' recent points (value, score, expected
/// band, alert), oldest first.
pub async fn points(
    State(s): State<AppState>,
    Path((name, series)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "series": series, "points": detectors(&s)?.points(&name, &series)? }),
    ))
}
