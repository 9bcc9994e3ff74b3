//! Spate's broker: what the front ends ask of the log, without sockets.
//!
//! It turns CloudEvents into records (and back), places them on partitions with Kafka's partitioner,
//! runs the log's blocking calls on the runtime's blocking pool, and keeps the log's housekeeping
//! (interval fsyncs, retention) running. Later features (consumer groups, subscriptions, streams,
//! projections, detectors) live here too.

pub mod auth;
pub mod compressed;
pub mod detectors;
mod durable;
pub mod event;
pub mod filter;
pub mod groups;
pub mod monitor;
pub mod partitioner;
pub mod projections;
pub mod push;
pub mod stats;
pub mod streams;
pub mod subscriptions;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spate_log::batch::{self, NewRecord};
use spate_log::{FsyncPolicy, Log, Topic, TopicConfig};
use thiserror::Error;

pub use event::{Event, EventError};

/// Broker-wide limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest event (data, key and attributes) accepted.
    pub max_event_bytes: u64,
    /// Events returned by one read at most.
    pub read_events_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 1 << 20,
            read_events_max: 1000,
        }
    }
}

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error(transparent)]
    Log(#[from] spate_log::Error),
    #[error("event {index}: {error}")]
    InvalidEvent { index: usize, error: EventError },
    #[error("event {index} takes {size} bytes, over the limit of {max} bytes")]
    EventTooLarge { index: usize, size: u64, max: u64 },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "topic {0} is internal: it is written by the server only and cannot be deleted or reconfigured"
    )]
    InternalTopic(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Stream(#[from] streams::StreamError),
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// Where an event was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub partition: u32,
    pub offset: u64,
}

/// Where a read starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The first record still stored (after retention and deleted records).
    Earliest,
    Offset(u64),
    /// The first event stored at or after this time (ms since the epoch).
    Time(i64),
}

/// An event read from the log.
#[derive(Debug, Clone)]
pub struct ReadEvent {
    pub partition: u32,
    pub offset: u64,
    pub event: Event,
}

/// A page of events and where the next page starts.
#[derive(Debug, Clone)]
pub struct ReadPage {
    pub events: Vec<ReadEvent>,
    pub next_offset: u64,
}

/// The events of one partition from (offset, event) pairs.
fn read_events_of(partition: u32, events: Vec<(u64, Event)>) -> Vec<ReadEvent> {
    events
        .into_iter()
        .map(|(offset, event)| ReadEvent {
            partition,
            offset,
            event,
        })
        .collect()
}

/// Whether a topic is one the server keeps for itself (committed offsets, the subscription
/// journal): clients may read it but not write to or delete it.
pub fn is_internal(topic: &str) -> bool {
    topic == groups::OFFSETS_TOPIC
        || topic == subscriptions::JOURNAL_TOPIC
        || topic == monitor::METRICS_TOPIC
}

/// The high watermarks of a topic's partitions, as seen when it was taken.
pub struct TopicWatch(Vec<tokio::sync::watch::Receiver<u64>>);

impl TopicWatch {
    /// Resolves once any partition's high watermark moves on (never for a topic without
    /// partitions).
    pub async fn changed(&mut self) {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let changes: Vec<_> = self
            .0
            .iter_mut()
            .map(|rx| {
                Box::pin(async move {
                    let _ = rx.changed().await;
                })
            })
            .collect();
        futures_util::future::select_all(changes).await;
    }
}

/// How far a follower whose next offsets are `positions` (per partition) is behind `topic`:
/// records left to read, and the `time` (ms since the epoch) of the oldest event among them.
pub(crate) fn follower_lag(topic: &Topic, positions: &[u64]) -> (u64, Option<i64>) {
    let mut lag = 0;
    let mut oldest: Option<i64> = None;
    for (i, part) in topic.partitions.iter().enumerate() {
        let pos = positions.get(i).copied().unwrap_or(0);
        let hw = part.high_watermark();
        lag += hw.saturating_sub(pos);
        if pos < hw
            && let Ok(page) = read_events(part, &topic.name, i as u32, pos, 1)
            && let Some(e) = page.events.first()
        {
            let ms = e.event.time_ms();
            oldest = match (oldest, ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    (lag, oldest)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(format!("blocking task failed: {e}")))?
}

/// Reads up to `limit` events of one partition from `offset` (blocking): the batches are decoded
/// (decompressed when needed) and records before `offset` in the first batch skipped.
pub fn read_events(
    p: &spate_log::Partition,
    topic: &str,
    partition: u32,
    offset: u64,
    limit: usize,
) -> Result<ReadPage> {
    read_events_within(
        p,
        topic,
        partition,
        offset,
        limit,
        read_budget(p, limit),
        usize::MAX,
    )
}

/// Bytes to read at a time for about `limit` records of `p`, from the partition's average record
/// size, between 64 KiB and 1 MiB: reading a fixed megabyte for a few hundred records would read
/// (and check) most bytes twice.
pub(crate) fn read_budget(p: &spate_log::Partition, limit: usize) -> u64 {
    let info = p.info();
    let offsets = info
        .log_end_offset
        .saturating_sub(info.log_start_offset)
        .max(1);
    let per_record = info.size_bytes.div_ceil(offsets);
    per_record
        .saturating_mul(limit as u64)
        .saturating_add(per_record)
        .clamp(64 << 10, 1 << 20)
}

/// As [`read_events`], reading at most `max_bytes` of batches per read (the batch holding
/// `offset` is read whole however small the budget) and at most `max_reads` times: a budget of 1
/// byte and 1 read returns the events of the one batch holding `offset`.
pub fn read_events_within(
    p: &spate_log::Partition,
    topic: &str,
    partition: u32,
    offset: u64,
    limit: usize,
    max_bytes: u64,
    max_reads: usize,
) -> Result<ReadPage> {
    let (records, next_offset) =
        read_records_within(p, offset, limit, max_bytes, max_reads, |r| {
            Event::from_record_ref(r, (topic, partition))
        })?;
    Ok(ReadPage {
        events: read_events_of(partition, records),
        next_offset,
    })
}

/// Reads up to `limit` records of one partition from `offset` (blocking), each turned into a `T`
/// by `f` while borrowed from the batch read; returns them by offset, and where the next read
/// starts. Budgets as [`read_events_within`].
pub fn read_records_within<T>(
    p: &spate_log::Partition,
    mut offset: u64,
    limit: usize,
    max_bytes: u64,
    max_reads: usize,
    mut f: impl FnMut(&batch::RecordRef<'_>) -> T,
) -> Result<(Vec<(u64, T)>, u64)> {
    let mut out = Vec::new();
    let mut reads = 0;
    'outer: while out.len() < limit && reads < max_reads {
        reads += 1;
        let bytes = p.read(offset, max_bytes)?;
        if bytes.is_empty() {
            break;
        }
        // The read checked each batch's CRC.
        let batches = batch::headers(&bytes).map_err(spate_log::Error::from)?;
        for (at, h) in batches {
            let mut full = false;
            for_each_record(&h, &bytes[at..at + h.total_bytes() as usize], |r| {
                if full || (r.offset as u64) < offset {
                    return Ok(());
                }
                let at = r.offset as u64;
                out.push((at, f(r)));
                offset = at + 1;
                full = out.len() == limit;
                Ok(())
            })?;
            if full {
                break 'outer;
            }
            offset = offset.max(h.base_offset as u64 + h.offset_count());
        }
    }
    Ok((out, offset))
}

/// Walks the records of one stored batch (header `h`, as listed by [`batch::headers`] from bytes
/// [`spate_log::Partition::read`] returned, which checked every batch's CRC), decompressing it
/// when needed; each record is borrowed from the batch (see [`batch::for_each_record`]).
fn for_each_record(
    h: &batch::BatchHeader,
    whole: &[u8],
    mut f: impl FnMut(&batch::RecordRef<'_>) -> Result<()>,
) -> Result<()> {
    let undecodable = |e: &dyn std::fmt::Display| {
        BrokerError::Unsupported(format!(
            "cannot decompress the batch at offset {}: {e}",
            h.base_offset
        ))
    };
    let Some(section) = compressed::section(h, whole).map_err(|e| undecodable(&e))? else {
        return Ok(());
    };
    batch::for_each_record(h, &section, |r| f(r).map_err(Walk::Stop)).map_err(|e| match e {
        Walk::Stop(e) => e,
        Walk::Batch(e) if h.compression() == 0 => spate_log::Error::from(e).into(),
        Walk::Batch(e) => undecodable(&e),
    })
}

/// Why a walk over a batch's records ended early: the batch, or the caller.
enum Walk {
    Batch(batch::BatchError),
    Stop(BrokerError),
}

impl From<batch::BatchError> for Walk {
    fn from(e: batch::BatchError) -> Walk {
        Walk::Batch(e)
    }
}

/// Reads the events at `offsets` (ascending) of one partition: nearby batches are read together,
/// `window` bytes at a time, and only the batches holding a wanted offset are decoded. Offsets no
/// longer stored (removed by retention) are left out.
pub fn read_offsets(
    p: &spate_log::Partition,
    topic: &str,
    partition: u32,
    offsets: &[u64],
    window: u64,
) -> Result<Vec<ReadEvent>> {
    let events = read_offsets_with(p, offsets, window, |r| {
        Event::from_record_ref(r, (topic, partition))
    })?;
    Ok(read_events_of(partition, events))
}

/// As [`read_offsets`], each record turned into a `T` by `f` while borrowed from its batch;
/// returns them by offset.
pub fn read_offsets_with<T>(
    p: &spate_log::Partition,
    offsets: &[u64],
    window: u64,
    mut f: impl FnMut(&batch::RecordRef<'_>) -> T,
) -> Result<Vec<(u64, T)>> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut i = 0;
    // Bytes per offset seen so far, to read no further than the wanted offsets reach.
    let (mut seen_bytes, mut seen_offsets) = (0u64, 0u64);
    while i < offsets.len() {
        let before = i;
        let budget = if seen_offsets == 0 {
            1
        } else {
            let per_offset = seen_bytes.div_ceil(seen_offsets).max(1);
            let reach = offsets[i] + window / per_offset;
            let last = offsets[i..].partition_point(|&o| o < reach).max(1);
            (offsets[i + last - 1] - offsets[i] + 1) * per_offset
        };
        let bytes = match p.read(offsets[i], budget.min(window)) {
            Ok(b) => b,
            Err(spate_log::Error::OffsetOutOfRange {
                log_start_offset, ..
            }) if offsets[i] < log_start_offset => {
                while i < offsets.len() && offsets[i] < log_start_offset {
                    i += 1;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if bytes.is_empty() {
            break;
        }
        for (at, h) in batch::headers(&bytes).map_err(spate_log::Error::from)? {
            let (first, end) = (
                h.base_offset as u64,
                h.base_offset as u64 + h.offset_count(),
            );
            seen_bytes += h.total_bytes();
            seen_offsets += h.offset_count();
            while i < offsets.len() && offsets[i] < first {
                i += 1;
            }
            if i == offsets.len() {
                break;
            }
            if offsets[i] >= end {
                continue;
            }
            for_each_record(&h, &bytes[at..at + h.total_bytes() as usize], |r| {
                let o = r.offset as u64;
                while i < offsets.len() && offsets[i] < o {
                    i += 1;
                }
                if i < offsets.len() && offsets[i] == o {
                    out.push((o, f(r)));
                    i += 1;
                }
                Ok(())
            })?;
        }
        if i == before {
            // The batch read holds nothing wanted: the offset is gone.
            i += 1;
        }
    }
    Ok(out)
}

/// Bytes a batch may carry beyond its records' estimated sizes (header and varints).
const BATCH_SLACK_BYTES: u64 = 256;

pub struct Broker {
    log: Arc<Log>,
    limits: Limits,
    /// Partitions that someone waits on (their high watermark channel), keyed by partition
    /// identity.
    watches: std::sync::Mutex<std::collections::HashMap<usize, tokio::sync::watch::Receiver<u64>>>,
    /// Runs the fsyncs that appends wait for, across partitions.
    committer: Arc<durable::Committer>,
    /// Picks the partition of unkeyed events, one request at a time.
    spread: AtomicU32,
    /// The next idempotent producer id.
    producer_ids: std::sync::atomic::AtomicI64,
    /// The live paths of topics with push subscribers.
    hubs: push::Hubs,
    /// The stream indexes of topics used for event sourcing.
    streams: streams::Streams,
}

impl Broker {
    pub fn new(log: Arc<Log>, limits: Limits) -> Broker {
        Broker {
            streams: streams::Streams::new(log.dir().join("streams")),
            log,
            limits,
            watches: Default::default(),
            committer: Default::default(),
            spread: AtomicU32::new(0),
            // Ids start from the clock (1024 per millisecond), so ids stay unique across restarts
            // without storing a counter.
            producer_ids: std::sync::atomic::AtomicI64::new(now_ms().max(0) << 10),
            hubs: push::Hubs::default(),
        }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A new idempotent producer id.
    pub fn next_producer_id(&self) -> i64 {
        self.producer_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn create_topic(&self, name: String, config: TopicConfig) -> Result<Arc<Topic>> {
        let log = self.log.clone();
        blocking(move || Ok(log.create_topic(&name, config, now_ms())?)).await
    }

    /// The topic `name`, created with `config` when missing: for the server's own writers (dead
    /// letters, alerts, metrics). A creation of the same topic under way elsewhere is waited for.
    pub async fn topic_or_create(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        for _ in 0..1000 {
            match self.topic(name) {
                Ok(t) => return Ok(t),
                Err(BrokerError::Log(spate_log::Error::UnknownTopic(_))) => {}
                Err(e) => return Err(e),
            }
            match self.create_topic(name.to_string(), config).await {
                Ok(t) => return Ok(t),
                // Someone else is creating it: it appears once its files are in place.
                Err(BrokerError::Log(spate_log::Error::TopicExists(_))) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.topic(name)
    }

    pub async fn delete_topic(&self, name: String) -> Result<()> {
        let topic = self.topic(&name)?;
        if is_internal(&name) {
            return Err(BrokerError::InternalTopic(name));
        }
        let log = self.log.clone();
        blocking(move || Ok(log.delete_topic(&name)?)).await?;
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        for p in &topic.partitions {
            watches.remove(&(Arc::as_ptr(p) as usize));
        }
        Ok(())
    }

    /// Changes a topic's configuration (see [`Log::alter_topic_config`]). The server's own
    /// topics keep the configuration it gives them.
    pub async fn alter_topic_config(
        &self,
        name: String,
        change: impl FnOnce(&TopicConfig) -> spate_log::Result<TopicConfig> + Send + 'static,
        validate_only: bool,
    ) -> Result<TopicConfig> {
        self.topic(&name)?;
        if is_internal(&name) {
            return Err(BrokerError::InternalTopic(name));
        }
        let log = self.log.clone();
        blocking(move || Ok(log.alter_topic_config(&name, change, validate_only)?)).await
    }

    /// Deletes a partition's records before `offset` (before the high watermark when `None`),
    /// durably (see [`Partition::delete_records`]); returns the new log start. The server's own
    /// topics keep their records.
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        offset: Option<u64>,
    ) -> Result<u64> {
        let t = self.topic(topic)?;
        if is_internal(topic) {
            return Err(BrokerError::InternalTopic(topic.to_string()));
        }
        let p = t.partition(partition)?.clone();
        blocking(move || Ok(p.delete_records(offset.unwrap_or_else(|| p.high_watermark()))?)).await
    }

    /// A channel holding the partition's high watermark, updated as it advances: readers at the
    /// end of the log wait on it instead of polling.
    pub fn watch(
        &self,
        partition: &Arc<spate_log::Partition>,
    ) -> tokio::sync::watch::Receiver<u64> {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        watches
            .entry(Arc::as_ptr(partition) as usize)
            .or_insert_with(|| {
                let (tx, rx) = tokio::sync::watch::channel(0);
                let tx = Arc::new(tx);
                let sender = tx.clone();
                // Keeps the highest value: listeners may be called out of order. A call with the
                // same value (a poisoned partition) still wakes the receivers.
                partition.add_listener(Box::new(move |hw| {
                    sender.send_modify(|v| *v = (*v).max(hw));
                }));
                // Read after the listener is in place, so that an advance in between is not lost.
                tx.send_modify(|v| *v = (*v).max(partition.high_watermark()));
                rx
            })
            .clone()
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        Ok(self.log.topic(name)?)
    }

    /// Watches every partition of `topic` from now: take it before looking at the partitions'
    /// ends, so that no append goes unnoticed, then wait on [`TopicWatch::changed`].
    pub fn watch_topic(&self, topic: &Topic) -> TopicWatch {
        TopicWatch(
            topic
                .partitions
                .iter()
                .map(|p| {
                    let mut rx = self.watch(p);
                    rx.borrow_and_update();
                    rx
                })
                .collect(),
        )
    }

    /// Stores events, returning where each went, in order. Nothing is written unless every event
    /// is valid; returns once all are durable under the fsync policy.
    pub async fn publish(&self, topic: &str, events: Vec<Event>) -> Result<Vec<Placement>> {
        if is_internal(topic) {
            self.topic(topic)?;
            return Err(BrokerError::InternalTopic(topic.to_string()));
        }
        self.publish_any(topic, events).await
    }

    /// As [`Broker::publish`], to internal topics too: for the server's own writers.
    pub(crate) async fn publish_any(
        &self,
        topic: &str,
        mut events: Vec<Event>,
    ) -> Result<Vec<Placement>> {
        let started = std::time::Instant::now();
        let topic = self.topic(topic)?;
        for (index, e) in events.iter().enumerate() {
            let size = e.record_bytes();
            if size > self.limits.max_event_bytes {
                return Err(BrokerError::EventTooLarge {
                    index,
                    size,
                    max: self.limits.max_event_bytes,
                });
            }
        }
        let now = now_ms();
        let n = topic.config().partitions;
        let sticky = self.spread.fetch_add(1, Ordering::Relaxed) % n;
        let mut by_partition: BTreeMap<u32, Vec<(usize, NewRecord)>> = BTreeMap::new();
        for (index, e) in events.iter_mut().enumerate() {
            e.fill_defaults(now);
            let partition = match e.partition_key() {
                Some(key) => partitioner::partition_for_key(key.as_bytes(), n),
                None => sticky,
            };
            by_partition
                .entry(partition)
                .or_default()
                .push((index, e.to_record(now)));
        }
        let mut placements = vec![
            Placement {
                partition: 0,
                offset: 0
            };
            events.len()
        ];
        let mut tasks = Vec::new();
        for (partition, records) in by_partition {
            let p = topic.partition(partition)?.clone();
            let config = topic.config();
            let limit = config.max_message_bytes.saturating_sub(BATCH_SLACK_BYTES);
            let sizes: Vec<u64> = records
                .iter()
                .map(|(i, _)| events[*i].record_bytes())
                .collect();
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                let mut chunk: Vec<NewRecord> = Vec::new();
                let mut chunk_bytes = 0;
                let indexes: Vec<usize> = records.iter().map(|(i, _)| *i).collect();
                for ((_, record), size) in records.into_iter().zip(sizes) {
                    if !chunk.is_empty() && chunk_bytes + size > limit {
                        buf.extend(batch::encode(&chunk).expect("chunk is not empty"));
                        chunk.clear();
                        chunk_bytes = 0;
                    }
                    chunk_bytes += size;
                    chunk.push(record);
                }
                buf.extend(batch::encode(&chunk).expect("every partition has a record"));
                let appended = p.append_unsynced(&mut buf, now, &config)?;
                Ok::<_, BrokerError>((p, partition, appended, indexes))
            }));
        }
        let mut written = Vec::new();
        for task in tasks {
            written.push(
                task.await
                    .map_err(|e| BrokerError::Internal(format!("append task failed: {e}")))?,
            );
        }
        // Every partition's fsync at once; a failed append leaves the others to finish first.
        for (p, _, appended, _) in written.iter().flatten() {
            self.sync_soon(p, *appended);
        }
        let mut first_error = None;
        for w in written {
            let (p, partition, appended, indexes) = match w {
                Ok(w) => w,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            if let Err(e) = self.acknowledgeable(&p, appended).await {
                first_error.get_or_insert(e);
                continue;
            }
            let base_offset = appended.base_offset;
            for (k, index) in indexes.into_iter().enumerate() {
                placements[index] = Placement {
                    partition,
                    offset: base_offset + k as u64,
                };
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        metrics::histogram!("spate_publish_to_durable_seconds", "protocol" => "http")
            .record(started.elapsed().as_secs_f64());
        Ok(placements)
    }

    /// Reads up to `limit` events of one partition.
    pub async fn read(
        &self,
        topic: &str,
        partition: u32,
        start: Start,
        limit: usize,
    ) -> Result<ReadPage> {
        let (events, next_offset) = self
            .read_with(topic, partition, start, limit, Event::from_record_ref)
            .await?;
        Ok(ReadPage {
            events: read_events_of(partition, events),
            next_offset,
        })
    }

    /// As [`Broker::read`], each event as its structured JSON written straight from its record:
    /// (offset, JSON) pairs and where the next page starts.
    pub async fn read_json(
        &self,
        topic: &str,
        partition: u32,
        start: Start,
        limit: usize,
    ) -> Result<(Vec<(u64, String)>, u64)> {
        self.read_with(topic, partition, start, limit, event::record_json)
            .await
    }

    /// As [`Broker::read`], each record made into a `T` by `make` (given the record and its topic
    /// and partition).
    async fn read_with<T: Send + 'static>(
        &self,
        topic: &str,
        partition: u32,
        start: Start,
        limit: usize,
        make: fn(&batch::RecordRef<'_>, (&str, u32)) -> T,
    ) -> Result<(Vec<(u64, T)>, u64)> {
        let topic = self.topic(topic)?;
        let p = topic.partition(partition)?.clone();
        let limit = limit.clamp(1, self.limits.read_events_max);
        let name = topic.name.clone();
        blocking(move || {
            let offset = match start {
                Start::Earliest => p.log_start_offset(),
                Start::Offset(o) => o,
                Start::Time(t) => p
                    .offset_for_timestamp(t)?
                    .map_or_else(|| p.high_watermark(), |(o, _)| o),
            };
            read_records_within(&p, offset, limit, read_budget(&p, limit), usize::MAX, |r| {
                make(r, (&name, partition))
            })
        })
        .await
    }

    /// Runs the log's housekeeping until `shutdown` resolves: interval fsyncs under
    /// `FsyncPolicy::Interval`, and retention every `retention_check`.
    pub async fn maintain(
        self: Arc<Self>,
        retention_check: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let flush_every = match self.log.config().fsync {
            FsyncPolicy::Interval(d) => d,
            // Not used: the branch below is disabled for the other policies.
            FsyncPolicy::Batch | FsyncPolicy::Never => Duration::from_secs(3600),
        };
        let flushing = matches!(self.log.config().fsync, FsyncPolicy::Interval(_));
        let mut flush = tokio::time::interval(flush_every);
        let mut retention = tokio::time::interval(retention_check);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = flush.tick(), if flushing => {
                    let log = self.log.clone();
                    if let Err(e) = blocking(move || Ok(log.flush()?)).await {
                        tracing::error!(error = %e, "interval fsync failed");
                    }
                }
                _ = retention.tick() => {
                    let log = self.log.clone();
                    match blocking(move || Ok(log.apply_retention(now_ms())?)).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(segments = n, "retention deleted segments"),
                        Err(e) => tracing::error!(error = %e, "retention failed"),
                    }
                }
            }
        }
    }

    /// Makes everything durable; called on shutdown.
    pub async fn flush(&self) -> Result<()> {
        let log = self.log.clone();
        blocking(move || Ok(log.flush()?)).await
    }
}
