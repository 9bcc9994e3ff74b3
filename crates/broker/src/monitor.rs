//! Self-monitoring: every few seconds the server writes its own vital signs as events to the
//! internal topic `__metrics`, so detectors (and any reader) can watch them like any other series.
//!
//! Each event has type `spate.metric`, subject `<name>` or `<name>:<label>` and data
//! `{"name", "series", "labels", "value"}`: produce rate per topic (events/s), bytes appended
//! and events delivered per second, open connections, consumer lag per group (records and
//! seconds), backlog and in-flight messages per subscription, lag per projection and detector
//! (records), and fsync latency (mean and max over the interval, ms).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use spate_log::TopicConfig;

use crate::event::{Event, now_rfc3339};
use crate::{Broker, now_ms};

/// The internal topic of the server's own metrics.
pub const METRICS_TOPIC: &str = "__metrics";
/// How long metric events are kept.
const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Where the metrics come from beside the log.
#[derive(Default, Clone)]
pub struct Sources {
    pub subscriptions: Option<Arc<crate::subscriptions::Subscriptions>>,
    pub groups: Option<Arc<crate::groups::Coordinator>>,
    pub projections: Option<Arc<crate::projections::Projections>>,
    pub detectors: Option<Arc<crate::detectors::Detectors>>,
}

/// One metric sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub label: Option<(&'static str, String)>,
    pub value: f64,
}

struct Previous {
    at: Instant,
    ends: HashMap<String, u64>,
    fsyncs: (u64, u64),
    bytes: u64,
    delivered: u64,
}

/// Computes the samples of one interval.
fn sample(broker: &Broker, sources: &Sources, prev: &mut Option<Previous>) -> Vec<Sample> {
    let mut out = Vec::new();
    let now = Instant::now();
    let mut ends = HashMap::new();
    for t in broker.log().topics() {
        if crate::is_internal(&t.name) {
            continue;
        }
        let end = t.partitions.iter().map(|p| p.log_end_offset()).sum::<u64>();
        ends.insert(t.name.clone(), end);
    }
    let fsyncs = spate_log::stats::fsyncs();
    let max_fsync = spate_log::stats::take_max_fsync_micros();
    let bytes = spate_log::stats::bytes_appended();
    let delivered = crate::stats::delivered_total();
    if let Some(p) = prev.as_ref() {
        let secs = now.duration_since(p.at).as_secs_f64().max(1e-3);
        for (name, end) in &ends {
            // A topic created since the last sample counts from its start.
            let before = p.ends.get(name).copied().unwrap_or(0);
            out.push(Sample {
                name: "produce_rate",
                label: Some(("topic", name.clone())),
                value: end.saturating_sub(before) as f64 / secs,
            });
        }
        let (n, us) = (fsyncs.0 - p.fsyncs.0, fsyncs.1 - p.fsyncs.1);
        out.push(Sample {
            name: "fsync_ms",
            label: None,
            value: if n == 0 {
                0.0
            } else {
                us as f64 / n as f64 / 1000.0
            },
        });
        out.push(Sample {
            name: "fsync_max_ms",
            label: None,
            value: max_fsync as f64 / 1000.0,
        });
        out.push(Sample {
            name: "fsync_rate",
            label: None,
            value: n as f64 / secs,
        });
        out.push(Sample {
            name: "bytes_in_rate",
            label: None,
            value: bytes.saturating_sub(p.bytes) as f64 / secs,
        });
        out.push(Sample {
            name: "delivery_rate",
            label: None,
            value: delivered.saturating_sub(p.delivered) as f64 / secs,
        });
    }
    out.push(Sample {
        name: "connections",
        label: None,
        value: crate::stats::connections_open().max(0) as f64,
    });
    *prev = Some(Previous {
        at: now,
        ends,
        fsyncs,
        bytes,
        delivered,
    });
    if let Some(groups) = &sources.groups {
        for g in groups.list() {
            let positions = groups.positions(broker, &g.group_id);
            let lag = positions.iter().map(|p| p.lag()).sum::<u64>();
            // On /metrics too, per partition, as Kafka's lag exporters give it.
            for p in &positions {
                metrics::gauge!(
                    "spate_consumer_group_lag_records",
                    "group" => g.group_id.clone(),
                    "topic" => p.topic.clone(),
                    "partition" => p.partition.to_string()
                )
                .set(p.lag() as f64);
            }
            metrics::gauge!("spate_consumer_group_members", "group" => g.group_id.clone())
                .set(g.members.len() as f64);
            // In seconds: the age of the oldest record the group has not consumed.
            let oldest = positions
                .iter()
                .filter(|p| p.lag() > 0)
                .filter_map(|p| {
                    let t = broker.topic(&p.topic).ok()?;
                    let part = t.partition(p.partition).ok()?;
                    let page =
                        crate::read_events(part, &p.topic, p.partition, p.committed, 1).ok()?;
                    page.events
                        .first()
                        .map(|e| crate::projections::reduce::event_ms(&e.event))
                })
                .min();
            out.push(Sample {
                name: "consumer_lag",
                label: Some(("group", g.group_id.clone())),
                value: lag as f64,
            });
            let lag_seconds = oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
            metrics::gauge!("spate_consumer_group_lag_seconds", "group" => g.group_id.clone())
                .set(lag_seconds);
            out.push(Sample {
                name: "consumer_lag_seconds",
                label: Some(("group", g.group_id)),
                value: lag_seconds,
            });
        }
    }
    if let Some(subs) = &sources.subscriptions {
        for s in subs.list() {
            out.push(Sample {
                name: "subscription_backlog",
                label: Some(("subscription", s.name.clone())),
                value: s.stats.backlog as f64,
            });
            out.push(Sample {
                name: "subscription_in_flight",
                label: Some(("subscription", s.name.clone())),
                value: s.stats.in_flight as f64,
            });
            out.push(Sample {
                name: "subscription_oldest_unacked_ms",
                label: Some(("subscription", s.name)),
                value: s.stats.oldest_unacked_age_ms as f64,
            });
        }
    }
    if let Some(projections) = &sources.projections {
        for s in projections.list() {
            out.push(Sample {
                name: "projection_lag",
                label: Some(("projection", s.name)),
                value: s.lag_records as f64,
            });
        }
    }
    if let Some(detectors) = &sources.detectors {
        for s in detectors.list() {
            out.push(Sample {
                name: "detector_lag",
                label: Some(("detector", s.name)),
                value: s.lag_records as f64,
            });
        }
    }
    out
}

fn to_event(s: &Sample, now: i64) -> Event {
    let series = match &s.label {
        Some((_, v)) => format!("{}:{v}", s.name),
        None => s.name.to_string(),
    };
    let labels: BTreeMap<&str, &str> = s.label.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let data = json!({"name": s.name, "series": series, "labels": labels, "value": s.value});
    let mut extensions = BTreeMap::new();
    extensions.insert("partitionkey".to_string(), series.clone());
    Event {
        id: None,
        source: Some("/spate".into()),
        event_type: "spate.metric".into(),
        subject: Some(series),
        time: Some(now_rfc3339(now)),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        extensions,
        data: Some(serde_json::to_vec(&data).expect("metric serializes")),
    }
}

async fn ensure_topic(broker: &Broker) -> crate::Result<()> {
    let config = TopicConfig {
        partitions: 1,
        retention_ms: Some(RETENTION_MS),
        ..TopicConfig::default()
    };
    broker
        .topic_or_create(METRICS_TOPIC, config)
        .await
        .map(|_| ())
}

/// Writes the server's metrics to [`METRICS_TOPIC`] every `every` until `stop` resolves.
pub async fn run(
    broker: Arc<Broker>,
    sources: Sources,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let samples = sample(&broker, &sources, &mut prev);
        if samples.is_empty() {
            continue;
        }
        let now = now_ms();
        let events: Vec<Event> = samples.iter().map(|s| to_event(s, now)).collect();
        let result = match ensure_topic(&broker).await {
            Ok(()) => broker.publish_any(METRICS_TOPIC, events).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot write the server's metrics");
        }
    }
}
