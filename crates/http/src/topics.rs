//! Topic endpoints: create, list, describe, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use spate_log::{Topic, TopicConfig};

use crate::events::{parse_json, read_body};
use crate::{ApiResult, AppState};

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /v1/topics`. Absent fields take defaults; `null` retention means "no limit".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    name: String,
    partitions: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    retention_ms: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    retention_bytes: Option<Option<u64>>,
    segment_bytes: Option<u64>,
    segment_ms: Option<u64>,
    max_message_bytes: Option<u64>,
}

pub fn describe_topic(topic: &Topic) -> Value {
    let partitions: Vec<Value> = topic
        .partitions
        .iter()
        .map(|p| {
            let info = p.info();
            json!({
                "partition": p.id,
                "log_start_offset": info.log_start_offset,
                "log_end_offset": info.log_end_offset,
                "size_bytes": info.size_bytes,
                "segments": info.segments,
            })
        })
        .collect();
    let c = &topic.config;
    json!({
        "name": topic.name,
        "config": {
            "partitions": c.partitions,
            "retention_ms": c.retention_ms,
            "retention_bytes": c.retention_bytes,
            "segment_bytes": c.segment_bytes,
            "segment_ms": c.segment_ms,
            "max_message_bytes": c.max_message_bytes,
        },
        "created": spate_broker::event::now_rfc3339(topic.created_ms),
        "internal": spate_broker::is_internal(&topic.name),
        "partitions": partitions,
    })
}

pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bytes = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let req: CreateTopic = parse_json(&bytes)?;
    let d = TopicConfig::default();
    let config = TopicConfig {
        partitions: req.partitions.unwrap_or(1),
        retention_ms: req.retention_ms.unwrap_or(d.retention_ms),
        retention_bytes: req.retention_bytes.unwrap_or(d.retention_bytes),
        segment_bytes: req.segment_bytes.unwrap_or(d.segment_bytes),
        segment_ms: req.segment_ms.unwrap_or(d.segment_ms),
        max_message_bytes: req.max_message_bytes.unwrap_or(d.max_message_bytes),
    };
    let topic = s.broker.create_topic(req.name, config).await?;
    Ok((StatusCode::CREATED, Json(describe_topic(&topic))))
}

pub async fn list(State(s): State<AppState>) -> Json<Value> {
    let topics: Vec<Value> = s
        .broker
        .log()
        .topics()
        .iter()
        .map(|t| describe_topic(t))
        .collect();
    Json(json!({ "topics": topics }))
}

pub async fn describe(
    State(s): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    let topic = s.broker.topic(&topic)?;
    Ok(Json(describe_topic(&topic)))
}

pub async fn delete(State(s): State<AppState>, Path(topic): Path<String>) -> ApiResult<StatusCode> {
    s.broker.delete_topic(topic).await?;
    Ok(StatusCode::NO_CONTENT)
}
