//! Kafka consumer groups, read-only: state, members and lag.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::{ApiError, ApiResult, AppState};

/// `GET /v1/groups`: every consumer group with its state, members, committed offsets and lag.
pub async fn list(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let c = s.groups.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "groups-unavailable",
            "consumer groups are not running on this server",
        )
    })?;
    let groups: Vec<Value> = c
        .list()
        .into_iter()
        .map(|g| {
            let positions = c.positions(&s.broker, &g.group_id);
            let lag: u64 = positions.iter().map(|p| p.lag()).sum();
            json!({
                "group": g.group_id,
                "state": g.state.name(),
                "protocol": g.protocol,
                "members": g.members.len(),
                "lag": lag,
                "offsets": positions.iter().map(|p| json!({
                    "topic": p.topic, "partition": p.partition, "committed": p.committed,
                    "end": p.end, "lag": p.lag(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "groups": groups })))
}
