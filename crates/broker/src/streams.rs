//! Streams for event sourcing: all events of a topic with the same key form a stream, whose version
//! is the 0-based index of an event within it. Appends can require an expected version (optimistic
//! concurrency) and are idempotent by event id; reads of one stream go through an index.
//!
//! The index (stream → the offsets of its events, in version order) is kept per partition, in
//! memory, by a follower of the log that starts from the beginning of the log the first time a
//! topic's streams are used; records appended by any door (Kafka, plain publishes) join their
//! stream in offset order. Appends through [`Broker::append_to_stream`] are serialized per
//! partition and enter the index as soon as they are written, before they are durable, so the next
//! version check sees them. A check first makes sure the index covers everything appended to the
//! partition by other doors (waiting for the follower when needed), so it never misses a version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use spate_log::batch::NewRecord;
use spate_log::{Partition, Topic};
use tokio::sync::watch;

use crate::{
    Broker, BrokerError, Event, Result, batch, blocking, now_ms, partitioner, read_events,
};

/// How long a version check waits for the index to cover records written by other doors.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// Records the follower reads per step.
const FOLLOW_PAGE_EVENTS: usize = 1000;

/// What an append expects of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist.
    Exists,
    /// The stream's last event must have this version.
    Version(u64),
}

impl std::str::FromStr for Expected {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Expected::Any),
            "no_stream" => Ok(Expected::NoStream),
            "exists" => Ok(Expected::Exists),
            n => n.parse().map(Expected::Version).map_err(|_| {
                format!(
                    "expected_version must be a version number, any, no_stream or exists, got {n:?}"
                )
            }),
        }
    }
}

/// Where an append went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamAppend {
    pub first_version: u64,
    pub last_version: u64,
    pub partition: u32,
    pub offsets: Vec<u64>,
}

/// A stream's position.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamInfo {
    pub version: u64,
    pub partition: u32,
    pub first_offset: u64,
    pub last_offset: u64,
}

/// An event read from a stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub version: u64,
    pub partition: u32,
    pub offset: u64,
    pub event: Event,
}

#[derive(Default)]
struct Index {
    /// Offsets of each stream's events, in version order.
    streams: HashMap<String, Vec<u64>>,
}

struct PartitionStreams {
    partition: Arc<Partition>,
    index: RwLock<Index>,
    /// The offset up to which the follower has applied the log.
    applied: watch::Sender<u64>,
    /// Serializes stream appends; holds the log end after the last one.
    writer: tokio::sync::Mutex<u64>,
}

pub(crate) struct TopicStreams {
    topic: Arc<Topic>,
    parts: Vec<PartitionStreams>,
}

/// The stream indexes of the topics in use.
#[derive(Default)]
pub(crate) struct Streams {
    topics: Mutex<HashMap<String, Arc<TopicStreams>>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// The streams of `topic`, starting its index follower on first use.
    fn topic_streams(self: &Arc<Self>, name: &str) -> Result<Arc<TopicStreams>> {
        let topic = self.topic(name)?;
        if crate::is_internal(&topic.name) {
            return Err(BrokerError::InternalTopic(topic.name.clone()));
        }
        let mut topics = self
            .streams
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name)
            && Arc::ptr_eq(&t.topic, &topic)
        {
            return Ok(t.clone());
        }
        let t = Arc::new(TopicStreams {
            parts: topic
                .partitions
                .iter()
                .map(|p| PartitionStreams {
                    partition: p.clone(),
                    index: RwLock::new(Index::default()),
                    applied: watch::channel(p.log_start_offset()).0,
                    writer: tokio::sync::Mutex::new(0),
                })
                .collect(),
            topic,
        });
        topics.insert(name.to_string(), t.clone());
        for i in 0..t.parts.len() {
            tokio::spawn(follow(self.clone(), t.clone(), i));
        }
        Ok(t)
    }

    /// Appends `events` to `stream` of `topic` if the stream is at `expected`: all or nothing, with
    /// consecutive versions, acknowledged once durable. Events whose ids equal those already at
    /// the expected versions are a retry: the original placement is returned, nothing appended.
    pub async fn append_to_stream(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        expected: Expected,
        mut events: Vec<Event>,
    ) -> Result<StreamAppend> {
        if stream.is_empty() {
            return Err(BrokerError::Stream(StreamError::InvalidStream(
                "the stream id is empty".into(),
            )));
        }
        if events.is_empty() {
            return Err(BrokerError::Stream(StreamError::InvalidStream(
                "no events to append".into(),
            )));
        }
        let ts = self.topic_streams(topic)?;
        let now = now_ms();
        let mut size = 0;
        for (index, e) in events.iter_mut().enumerate() {
            match e.partition_key() {
                Some(k) if k != stream => {
                    return Err(BrokerError::Stream(StreamError::InvalidStream(format!(
                        "event {index} has partitionkey {k:?}, not the stream id"
                    ))));
                }
                _ => {}
            }
            e.extensions
                .insert("partitionkey".into(), stream.to_string());
            e.fill_defaults(now);
            let bytes = e.record_bytes();
            if bytes > self.limits.max_event_bytes {
                return Err(BrokerError::EventTooLarge {
                    index,
                    size: bytes,
                    max: self.limits.max_event_bytes,
                });
            }
            size += bytes;
        }
        // One batch, so that the append is all or nothing across a crash too.
        let max = ts.topic.config.max_message_bytes.saturating_sub(256);
        if size > max {
            return Err(BrokerError::EventTooLarge {
                index: 0,
                size,
                max,
            });
        }
        let index = partitioner::partition_for_key(stream.as_bytes(), ts.parts.len() as u32);
        let part = &ts.parts[index as usize];
        let records: Vec<NewRecord> = events.iter().map(|e| e.to_record(now)).collect();
        let encoded = batch::encode(&records).expect("events are not empty");
        let mut writer_end = part.writer.lock().await;
        let (current, appended) = loop {
            // Everything other doors appended must be in the index before the check.
            let end = part.partition.log_end_offset();
            if end > *writer_end {
                wait_applied(part, end).await?;
            }
            let current = read(&part.index).streams.get(stream).map_or(0, Vec::len) as u64;
            let fits = match expected {
                Expected::Any => true,
                Expected::NoStream => current == 0,
                Expected::Exists => current > 0,
                Expected::Version(v) => current == v + 1,
            };
            if !fits {
                let first = match expected {
                    Expected::NoStream => Some(0),
                    Expected::Version(v) => Some(v + 1),
                    Expected::Any | Expected::Exists => None,
                };
                if let Some(first) = first
                    && first + events.len() as u64 <= current
                {
                    let at: Vec<u64> = read(&part.index)
                        .streams
                        .get(stream)
                        .map_or(Vec::new(), |o| {
                            o[first as usize..first as usize + events.len()].to_vec()
                        });
                    if same_ids(self, &part.partition, &ts.topic.name, index, &at, &events).await? {
                        return Ok(StreamAppend {
                            first_version: first,
                            last_version: first + events.len() as u64 - 1,
                            partition: index,
                            offsets: at,
                        });
                    }
                }
                return Err(BrokerError::Stream(StreamError::WrongVersion {
                    current: current.checked_sub(1),
                }));
            }
            // Append only if nothing else was appended since the check.
            let (p, config, mut buf) = (
                part.partition.clone(),
                ts.topic.config.clone(),
                encoded.clone(),
            );
            let appended =
                blocking(move || Ok(p.append_unsynced_at(&mut buf, now, &config, Some(end))?))
                    .await;
            match appended {
                Ok(a) => break (current, a),
                Err(BrokerError::Log(spate_log::Error::NotAtOffset { .. })) => {
                    *writer_end = (*writer_end).min(end);
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        {
            let mut index = write(&part.index);
            let offsets = index.streams.entry(stream.to_string()).or_default();
            // The follower may have seen these already, if another writer's fsync made them
            // durable first.
            let last = offsets.last().copied();
            offsets.extend(
                (appended.base_offset..=appended.last_offset)
                    .filter(|&o| last.is_none_or(|l| o > l)),
            );
        }
        *writer_end = appended.last_offset + 1;
        drop(writer_end);
        let p = part.partition.clone();
        blocking(move || Ok(p.wait_acknowledgeable(appended)?)).await?;
        Ok(StreamAppend {
            first_version: current,
            last_version: current + events.len() as u64 - 1,
            partition: index,
            offsets: (appended.base_offset..=appended.last_offset).collect(),
        })
    }

    /// Where a stream stands; `None` when it has no durable event.
    pub async fn stream_info(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
    ) -> Result<Option<StreamInfo>> {
        let (_, index, _, info) = self
            .with_durable_offsets(topic, stream, |offsets| {
                Some((offsets.len() as u64, *offsets.first()?, *offsets.last()?))
            })
            .await?;
        Ok(info.map(|(len, first, last)| StreamInfo {
            version: len - 1,
            partition: index,
            first_offset: first,
            last_offset: last,
        }))
    }

    /// Up to `limit` events of a stream from `from_version`, forward or backward; `None` when the
    /// stream has no durable event.
    pub async fn read_stream(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        from_version: Option<u64>,
        limit: usize,
        backward: bool,
    ) -> Result<Option<Vec<StreamEvent>>> {
        // The wanted (version, offset) pairs, in ascending order.
        let (ts, index, _, wanted) = self
            .with_durable_offsets(topic, stream, |offsets| {
                if offsets.is_empty() {
                    return None;
                }
                let len = offsets.len() as u64;
                let range = if backward {
                    let top = from_version.unwrap_or(u64::MAX).min(len - 1) + 1;
                    top.saturating_sub(limit as u64)..top
                } else {
                    let from = from_version.unwrap_or(0).min(len);
                    from..(from + limit as u64).min(len)
                };
                Some(
                    range
                        .map(|v| (v, offsets[v as usize]))
                        .collect::<Vec<(u64, u64)>>(),
                )
            })
            .await?;
        let Some(wanted) = wanted else {
            return Ok(None);
        };
        let part = ts.parts[index as usize].partition.clone();
        let name = ts.topic.name.clone();
        let events = blocking(move || {
            // Read in windows of nearby batches; events removed by retention are left out.
            let offsets: Vec<u64> = wanted.iter().map(|&(_, o)| o).collect();
            let found = crate::read_offsets(&part, &name, index, &offsets, 64 << 10)?;
            let mut versions = wanted.iter();
            let mut out: Vec<StreamEvent> = found
                .into_iter()
                .filter_map(|e| {
                    let &(version, _) = versions.find(|&&(_, o)| o == e.offset)?;
                    Some(StreamEvent {
                        version,
                        partition: index,
                        offset: e.offset,
                        event: e.event,
                    })
                })
                .collect();
            if backward {
                out.reverse();
            }
            Ok(out)
        })
        .await?;
        Ok(Some(events))
    }

    /// Runs `f` on a stream's durable offsets, in version order, once the index covers the
    /// partition's log up to the high watermark returned beside `f`'s result.
    async fn with_durable_offsets<T>(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        f: impl FnOnce(&[u64]) -> T,
    ) -> Result<(Arc<TopicStreams>, u32, u64, T)> {
        let ts = self.topic_streams(topic)?;
        let index = partitioner::partition_for_key(stream.as_bytes(), ts.parts.len() as u32);
        let part = &ts.parts[index as usize];
        let hw = part.partition.high_watermark();
        wait_applied(part, hw).await?;
        let result = {
            let guard = read(&part.index);
            let all = guard.streams.get(stream).map_or(&[][..], Vec::as_slice);
            // Appends not yet durable are in the index already (offsets ascend); they are not
            // served.
            f(&all[..all.partition_point(|&o| o < hw)])
        };
        Ok((ts, index, hw, result))
    }

    /// A live feed of one stream from `from_version`: the events already stored, then new ones as
    /// they become durable, each once, in version order ([`Feed::version`] gives each one's).
    pub async fn stream_feed(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        from_version: u64,
        filter: Arc<crate::filter::Filter>,
        max_behind: Duration,
    ) -> Result<crate::push::Feed> {
        // Join the live path first; the feed then starts from the index's snapshot.
        let mut feed = self
            .feed(topic, crate::push::FeedStart::Latest, filter, max_behind)
            .await?;
        let (_, index, hw, (len, at)) = self
            .with_durable_offsets(topic, stream, |offsets| {
                (
                    offsets.len() as u64,
                    offsets.get(from_version as usize).copied(),
                )
            })
            .await?;
        let (offset, version) = match at {
            Some(o) => (o, from_version),
            None => (hw, len),
        };
        feed.scope_to_stream(index, offset, stream.to_string(), version, from_version);
        Ok(feed)
    }
}

/// Whether the events at `offsets` have the ids of `events`, in order (waiting for them to be
/// durable, as a retry may come before the original append's fsync).
async fn same_ids(
    broker: &Arc<Broker>,
    partition: &Arc<Partition>,
    topic: &str,
    index: u32,
    offsets: &[u64],
    events: &[Event],
) -> Result<bool> {
    let last = *offsets.last().expect("not empty");
    let mut hw = broker.watch(partition);
    let waited = tokio::time::timeout(CATCH_UP_WAIT, hw.wait_for(|&h| h > last))
        .await
        .is_ok_and(|r| r.is_ok());
    if !waited {
        return Err(BrokerError::Stream(StreamError::Unavailable));
    }
    let (p, name, offsets) = (partition.clone(), topic.to_string(), offsets.to_vec());
    let ids: Vec<Option<String>> = blocking(move || {
        offsets
            .iter()
            .map(|&o| {
                let page = crate::read_events_within(&p, &name, index, o, 1, 1, 1)?;
                Ok(page
                    .events
                    .into_iter()
                    .next()
                    .filter(|e| e.offset == o)
                    .and_then(|e| e.event.id))
            })
            .collect()
    })
    .await?;
    Ok(ids
        .iter()
        .zip(events)
        .all(|(have, e)| have.is_some() && *have == e.id))
}

async fn wait_applied(part: &PartitionStreams, offset: u64) -> Result<()> {
    let mut rx = part.applied.subscribe();
    match tokio::time::timeout(CATCH_UP_WAIT, rx.wait_for(|&a| a >= offset)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(BrokerError::Stream(StreamError::Unavailable)),
    }
}

/// Applies a partition's durable records to its stream index, from the log start, then as the
/// high watermark moves; ends when the topic is deleted.
async fn follow(broker: Arc<Broker>, ts: Arc<TopicStreams>, i: usize) {
    let part = &ts.parts[i];
    let mut hw = broker.watch(&part.partition);
    let mut next = *part.applied.borrow();
    loop {
        let high = part.partition.high_watermark();
        while next < high {
            let (p, name, from) = (part.partition.clone(), ts.topic.name.clone(), next);
            let page =
                blocking(move || read_events(&p, &name, i as u32, from, FOLLOW_PAGE_EVENTS)).await;
            match page {
                Ok(page) => {
                    {
                        let mut index = write(&part.index);
                        for e in &page.events {
                            let Some(key) = e.event.partition_key() else {
                                continue;
                            };
                            let offsets = index.streams.entry(key.to_string()).or_default();
                            // Appends through the stream path are in already.
                            if offsets.last().is_none_or(|&last| last < e.offset) {
                                offsets.push(e.offset);
                            }
                        }
                    }
                    if page.next_offset <= next {
                        break;
                    }
                    next = page.next_offset;
                    part.applied.send_replace(next);
                }
                Err(BrokerError::Log(spate_log::Error::OffsetOutOfRange {
                    log_start_offset,
                    ..
                })) if log_start_offset > next => {
                    next = log_start_offset;
                }
                Err(e) => {
                    tracing::warn!(topic = %ts.topic.name, error = %e, "stream index follower failed to read");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        tokio::select! {
            r = hw.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let alive = broker.topic(&ts.topic.name).is_ok_and(|t| Arc::ptr_eq(&t, &ts.topic));
                if !alive {
                    return;
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("wrong expected version: the stream is at {}", current.map_or("no stream".to_string(), |v| format!("version {v}")))]
    WrongVersion { current: Option<u64> },
    #[error("{0}")]
    InvalidStream(String),
    #[error("the stream index did not catch up with the log in time; retry")]
    Unavailable,
}
