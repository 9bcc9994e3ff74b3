//! HTTP errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every error the API returns goes through [`ApiError`], and every broker error is mapped to a status
//! here and nowhere else. Client errors say what was wrong; server errors say what failed without
//! exposing internals, and are logged in full.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use spate_broker::BrokerError;
use spate_broker::streams::StreamError;
use spate_log::Error as LogError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A short slug naming the problem type, e.g. `topic-not-found`.
    pub kind: &'static str,
    pub detail: String,
    /// Extension members added to the problem object.
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            detail: detail.into(),
            extra: Map::new(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, kind = self.kind, detail = %self.detail, "request failed");
        }
        let mut body = json!({
            "type": format!("urn:spate:problem:{}", self.kind),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(m) = &mut body {
            m.extend(self.extra);
        }
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        use StatusCode as S;
        match e {
            BrokerError::Log(e) => match e {
                LogError::UnknownTopic(_) => {
                    ApiError::new(S::NOT_FOUND, "topic-not-found", e.to_string())
                }
                LogError::UnknownPartition { .. } => {
                    ApiError::new(S::NOT_FOUND, "partition-not-found", e.to_string())
                }
                LogError::TopicExists(_) => {
                    ApiError::new(S::CONFLICT, "topic-exists", e.to_string())
                }
                LogError::InvalidTopicName { .. } => {
                    ApiError::new(S::BAD_REQUEST, "invalid-topic-name", e.to_string())
                }
                LogError::InvalidConfig(_) => {
                    ApiError::new(S::BAD_REQUEST, "invalid-topic-config", e.to_string())
                }
                LogError::OffsetOutOfRange {
                    log_start_offset,
                    high_watermark,
                    ..
                } => ApiError::new(S::BAD_REQUEST, "offset-out-of-range", e.to_string())
                    .with("log_start_offset", log_start_offset)
                    .with("log_end_offset", high_watermark),
                LogError::BatchTooLarge { .. } => {
                    ApiError::new(S::PAYLOAD_TOO_LARGE, "too-large", e.to_string())
                }
                // Handled by the stream append loop; reaching here is a bug.
                LogError::NotAtOffset { .. } => {
                    tracing::error!(error = %e, "unexpected conditional append failure");
                    ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
                }
                LogError::InvalidBatch(_) => ApiError::bad_request(e.to_string()),
                LogError::Poisoned { .. } => ApiError::new(
                    S::SERVICE_UNAVAILABLE,
                    "partition-unavailable",
                    e.to_string(),
                ),
                LogError::Io { action, .. } => {
                    tracing::error!(error = %e, "storage error");
                    ApiError::new(
                        S::INTERNAL_SERVER_ERROR,
                        "storage-error",
                        format!("storage failed to {action}; the write is not acknowledged"),
                    )
                }
                LogError::OutOfOrderSequence { .. } | LogError::InvalidProducerEpoch { .. } => {
                    ApiError::new(S::CONFLICT, "producer-sequence", e.to_string())
                }
                LogError::Corrupt { .. } | LogError::Metadata { .. } => {
                    ApiError::new(S::INTERNAL_SERVER_ERROR, "corrupt-data", e.to_string())
                }
            },
            BrokerError::InvalidEvent { index, .. } => {
                ApiError::new(S::BAD_REQUEST, "invalid-event", e.to_string()).with("index", index)
            }
            BrokerError::EventTooLarge { index, max, .. } => {
                ApiError::new(S::PAYLOAD_TOO_LARGE, "too-large", e.to_string())
                    .with("index", index)
                    .with("max_event_bytes", max)
            }
            BrokerError::InternalTopic(_) => {
                ApiError::new(S::FORBIDDEN, "internal-topic", e.to_string())
            }
            BrokerError::Unsupported(_) => {
                ApiError::new(S::NOT_IMPLEMENTED, "unsupported", e.to_string())
            }
            BrokerError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
            BrokerError::Stream(ref se) => match se {
                StreamError::WrongVersion { current } => {
                    let current = *current;
                    ApiError::new(S::CONFLICT, "wrong-expected-version", e.to_string())
                        .with("current_version", current.map_or(Value::Null, Value::from))
                }
                StreamError::InvalidStream(_) => {
                    ApiError::new(S::BAD_REQUEST, "invalid-stream-append", e.to_string())
                }
                StreamError::Unavailable => {
                    ApiError::new(S::SERVICE_UNAVAILABLE, "index-unavailable", e.to_string())
                }
            },
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Client errors raised before a handler runs (a path segment that is not UTF-8, a method a route
/// does not take, a WebSocket request without its upgrade) come from the framework as plain
/// text; this turns them into problem details like every other error, keeping their headers
/// (`Allow` of a 405).
pub async fn problem_details(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        s if s.is_server_error() => "internal",
        _ => "bad-request",
    };
    let mut out = ApiError::new(status, kind, detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
