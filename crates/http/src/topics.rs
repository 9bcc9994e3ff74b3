//! Topic endpoints: create, list, describe, change settings, truncate, delete.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use spate_log::{Topic, TopicConfig};

use crate::error::ApiError;
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

/// `PATCH /v1/topics/{topic}`: the settings to change; absent ones keep their value, `null`
/// retention means "no limit". `partitions` may be given only with the current count.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlterTopic {
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
    let c = topic.config();
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

pub async fn alter(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let bytes = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let req: AlterTopic = parse_json(&bytes)?;
    s.broker
        .alter_topic_config(
            topic.clone(),
            move |c| {
                Ok(TopicConfig {
                    partitions: req.partitions.unwrap_or(c.partitions),
                    retention_ms: req.retention_ms.unwrap_or(c.retention_ms),
                    retention_bytes: req.retention_bytes.unwrap_or(c.retention_bytes),
                    segment_bytes: req.segment_bytes.unwrap_or(c.segment_bytes),
                    segment_ms: req.segment_ms.unwrap_or(c.segment_ms),
                    max_message_bytes: req.max_message_bytes.unwrap_or(c.max_message_bytes),
                })
            },
            false,
        )
        .await?;
    Ok(Json(describe_topic(&*s.broker.topic(&topic)?)))
}

/// `POST /v1/topics/{topic}/truncate`: `{"before": {"0": 120, "1": "end"}}` deletes each named
/// partition's records before the offset (`"end"`: all of them), as Kafka's DeleteRecords.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Truncate {
    before: std::collections::BTreeMap<String, Value>,
}

pub async fn truncate(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let bytes = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let req: Truncate = parse_json(&bytes)?;
    if req.before.is_empty() {
        return Err(ApiError::bad_request("`before` names no partition"));
    }
    let t = s.broker.topic(&topic)?;
    // Everything is checked before anything is deleted.
    let mut plan = Vec::with_capacity(req.before.len());
    for (p, offset) in &req.before {
        let id: u32 = p
            .parse()
            .map_err(|_| ApiError::bad_request(format!("partition {p:?} is not a number")))?;
        let partition = t.partition(id).map_err(spate_broker::BrokerError::from)?;
        let offset = match offset {
            Value::String(e) if e == "end" => None,
            v => Some(v.as_u64().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "offset of partition {id} must be a non-negative integer or \"end\""
                ))
            })?),
        };
        if let Some(o) = offset
            && o > partition.high_watermark()
        {
            return Err(
                spate_broker::BrokerError::from(spate_log::Error::OffsetOutOfRange {
                    offset: o,
                    log_start_offset: partition.log_start_offset(),
                    high_watermark: partition.high_watermark(),
                })
                .into(),
            );
        }
        plan.push((id, offset));
    }
    let mut starts = serde_json::Map::new();
    for (id, offset) in plan {
        let start = s.broker.delete_records(&topic, id, offset).await?;
        starts.insert(id.to_string(), start.into());
    }
    Ok(Json(json!({ "log_start_offsets": starts })))
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

/// Events a preview looks at, at most.
const PREVIEW_MAX: usize = 1000;

/// `POST /v1/topics/{topic}/preview`: what a filter (and a series and value expression) would make
/// of a topic's recent events, for builders and filter boxes. Nothing is created.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    filter: Option<String>,
    types: Option<String>,
    series: Option<String>,
    value: Option<String>,
    limit: Option<usize>,
}

/// The JSON paths of a value's object fields, as `prefix.a`, `prefix.a.b`, down to `depth`.
fn paths(v: &Value, prefix: &str, depth: usize, out: &mut std::collections::BTreeSet<String>) {
    let Value::Object(map) = v else { return };
    for (k, child) in map {
        let simple = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let path = if simple {
            format!("{prefix}.{k}")
        } else {
            format!("{prefix}[{}]", Value::from(k.as_str()))
        };
        if depth > 1 && child.is_object() {
            paths(child, &path, depth - 1, out);
        } else {
            out.insert(path);
        }
    }
}

pub async fn preview(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    use spate_broker::filter::{Expression, Filter, FilterInput, Verdict, to_json};
    let bytes = read_body(&headers, body, s.limits.max_request_bytes).await?;
    let req: PreviewRequest = parse_json(&bytes)?;
    let limit = req.limit.unwrap_or(100);
    if !(1..=PREVIEW_MAX).contains(&limit) {
        return Err(crate::ApiError::bad_request(format!(
            "`limit` must be within 1..={PREVIEW_MAX}"
        )));
    }
    let filter = Filter::new(req.filter.as_deref(), req.types.as_deref())
        .map_err(|e| crate::ApiError::bad_request(format!("invalid filter: {e}")))?;
    let compile = |what: &str, src: &Option<String>| {
        src.as_deref()
            .map(Expression::compile)
            .transpose()
            .map_err(|e| crate::ApiError::bad_request(format!("invalid {what}: {e}")))
    };
    let series = compile("series", &req.series)?;
    let value = compile("value", &req.value)?;
    let t = s.broker.topic(&topic)?;
    let mut recent = Vec::new();
    for p in &t.partitions {
        let from = p
            .high_watermark()
            .saturating_sub(limit as u64)
            .max(p.log_start_offset());
        let page = s
            .broker
            .read(&topic, p.id, spate_broker::Start::Offset(from), limit)
            .await?;
        recent.extend(page.events);
    }
    // The most recent `limit` events over all partitions, oldest first.
    recent.sort_by_key(|r| spate_broker::projections::reduce::event_ms(&r.event));
    let recent = &recent[recent.len().saturating_sub(limit)..];
    let mut fields = std::collections::BTreeSet::new();
    let mut matched = Vec::new();
    let mut errors = 0;
    for r in recent {
        let json = r.event.to_json();
        for attr in ["type", "subject", "source", "partitionkey"] {
            if json.get(attr).is_some() {
                fields.insert(attr.to_string());
            }
        }
        if let Some(data) = json.get("data") {
            paths(data, "data", 3, &mut fields);
        }
        let input = std::cell::OnceCell::new();
        let get = || input.get_or_init(|| FilterInput::new(&r.event));
        match filter.judge(&r.event, get) {
            Verdict::Match => {}
            Verdict::NoMatch => continue,
            Verdict::Error => {
                errors += 1;
                continue;
            }
        }
        let mut eval = |e: &Option<Expression>| match e {
            None => Value::Null,
            Some(e) => match e
                .evaluate(get())
                .map_err(|_| ())
                .and_then(|v| to_json(&v).map_err(|_| ()))
            {
                Ok(v) => v,
                Err(()) => {
                    errors += 1;
                    Value::Null
                }
            },
        };
        let (sv, vv) = (eval(&series), eval(&value));
        matched.push(json!({
            "partition": r.partition, "offset": r.offset, "event": json, "series": sv, "value": vv,
        }));
    }
    Ok(Json(json!({
        "scanned": recent.len(),
        "matched": matched,
        "errors": errors,
        "fields": fields,
    })))
}
