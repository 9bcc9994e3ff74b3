//! Streams for event sourcing: all events of a topic with the same key form a stream, whose version
//! is the 0-based index of an event within it. Appends can require an expected version (optimistic
//! concurrency) and are idempotent by event id; reads of one stream go through an index.
//!
//! The index (stream → version → offset) lives in an embedded store (`<data>/streams`), one entry
//! per event, kept per partition by a follower of the log: it reads the records' keys as they
//! become durable and writes their entries together with the offset it has applied up to, in one
//! atomic batch. After a restart or a crash it goes on from that checkpoint, so the index always
//! equals one built from the log up to the checkpoint. Records appended by any door (Kafka, plain
//! publishes) join their stream in offset order.
//!
//! Appends through [`Broker::append_to_stream`] are serialized per partition. Their version check
//! reads the stream's length from memory for hot streams (from the store otherwise) plus the
//! stream's appends written but not yet applied by the follower, which are held in memory until
//! it has. A check first makes sure the index covers everything appended to the partition by
//! other doors (waiting for the follower when needed), so it never misses a version.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fjall::Readable;
use spate_log::batch::NewRecord;
use spate_log::{Appended, Partition, Topic};
use tokio::sync::watch;

use crate::{Broker, BrokerError, Event, Result, batch, blocking, now_ms, partitioner};

/// How long a version check waits for the index to cover records written by other doors.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// How long the follower lets appends gather when nobody waits for it.
const FOLLOW_DELAY: Duration = Duration::from_millis(5);
/// Bytes of record batches the follower reads per step.
const FOLLOW_PAGE_BYTES: u64 = 1 << 20;
/// Streams per partition whose length is kept in memory (the most recently used, roughly).
const HOT_STREAMS: usize = 65_536;

/// The type of the event that deletes a stream (soft delete): it takes no version; the stream's
/// events before it are no longer read, and events appended after it continue the versions.
pub const STREAM_DELETED_TYPE: &str = "spate.stream.deleted";

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

impl Expected {
    /// Whether a stream of `len` versions, read from version `start` on (it was deleted at
    /// `start`; 0 when never), is as expected. A deleted stream with no event since does not exist.
    fn fits(self, len: u64, start: u64) -> bool {
        let exists = len > start;
        match self {
            Expected::Any => true,
            Expected::NoStream => !exists,
            Expected::Exists => exists,
            Expected::Version(v) => exists && len == v + 1,
        }
    }
}

impl std::str::FromStr for Expected {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Expected::Any),
            "no_stream" => Ok(Expected::NoStream),
            "exists" => Ok(Expected::Exists),
            // A stream holds at most as many events as a partition has offsets (2^63).
            n => n
                .parse::<u64>()
                .ok()
                .filter(|v| *v < i64::MAX as u64)
                .map(Expected::Version)
                .ok_or_else(|| {
                    format!(
                        "expected_version must be a version number (below 2^63 - 1), any, \
                         no_stream or exists, got {n:?}"
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

/// Where a stream deletion went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamDeleted {
    /// The last version deleted; the next event appended gets the one after it.
    pub version: u64,
    pub partition: u32,
    /// The offset of the deletion event.
    pub offset: u64,
}

/// A stream in a listing of a topic's streams.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamListed {
    pub stream: String,
    /// Its last version.
    pub version: u64,
    pub partition: u32,
}

/// Streams a listing looks at per request at most (deleted ones are passed over), so that a
/// topic of deleted streams does not make one request long.
const LIST_LOOKS_MAX: usize = 10_000;

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
pub struct StreamEvent<T = Event> {
    pub version: u64,
    pub partition: u32,
    pub offset: u64,
    pub event: T,
}

/// The embedded store of the stream indexes.
struct Store {
    db: fjall::Database,
    /// `partition prefix | stream length (u32) | stream | version (u64)` → offset (u64), all big
    /// endian, so that one stream's entries are adjacent and in version order.
    entries: fjall::Keyspace,
    /// `partition prefix` → the offset (u64) up to which the partition's entries reflect the log.
    checkpoints: fjall::Keyspace,
    /// `partition prefix | stream length (u32) | stream` → the first version still read (u64),
    /// for streams that were deleted: the stream's length at its last deletion.
    starts: fjall::Keyspace,
}

fn store_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(format!("stream index: {e}"))
}

/// Names a partition of one incarnation of a topic (a topic deleted and created again under the
/// same name gets a fresh index): `name length (u16) | name | created_ms (i64) | partition (u32)`.
fn partition_prefix(topic: &Topic, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.name.len() + 14);
    k.extend_from_slice(&(topic.name.len() as u16).to_be_bytes());
    k.extend_from_slice(topic.name.as_bytes());
    k.extend_from_slice(&topic.created_ms.to_be_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The topic name and creation time a partition prefix names.
fn parse_partition_prefix(k: &[u8]) -> Option<(&str, i64)> {
    let len = u16::from_be_bytes(k.get(..2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(k.get(2..2 + len)?).ok()?;
    let created = i64::from_be_bytes(k.get(2 + len..10 + len)?.try_into().ok()?);
    Some((name, created))
}

/// The longest stream id, in bytes. Index keys hold the id, and the store takes keys of at most
/// 64 KiB; a record produced over Kafka with a longer key joins no stream (see also
/// [`check_stream_id`]).
pub const STREAM_ID_BYTES_MAX: usize = 4096;

/// Refuses an empty stream id, one over [`STREAM_ID_BYTES_MAX`], or one holding U+FFFD.
///
/// A record key that is not UTF-8 reads as text with U+FFFD in place of its bad bytes, so two
/// different binary keys can read as the same text: such keys join no stream, and ids holding
/// U+FFFD, which could only name them, are refused.
fn check_stream_id(stream: &str) -> Result<()> {
    if stream.is_empty() {
        return Err(BrokerError::Stream(StreamError::InvalidStream(
            "the stream id is empty".into(),
        )));
    }
    if stream.contains(char::REPLACEMENT_CHARACTER) {
        return Err(BrokerError::Stream(StreamError::InvalidStream(
            "the stream id holds U+FFFD, which stands for bytes of a record key that are not UTF-8"
                .into(),
        )));
    }
    if stream.len() > STREAM_ID_BYTES_MAX {
        return Err(BrokerError::Stream(StreamError::InvalidStream(format!(
            "the stream id takes {} bytes, over the limit of {STREAM_ID_BYTES_MAX}",
            stream.len()
        ))));
    }
    Ok(())
}

fn stream_prefix(partition: &[u8], stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(partition.len() + 4 + stream.len() + 8);
    k.extend_from_slice(partition);
    k.extend_from_slice(&(stream.len() as u32).to_be_bytes());
    k.extend_from_slice(stream.as_bytes());
    k
}

fn entry_key(stream_prefix: &[u8], version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream_prefix.len() + 8);
    k.extend_from_slice(stream_prefix);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

impl Store {
    fn open(dir: &std::path::Path) -> Result<Store> {
        let db = fjall::Database::builder(dir).open().map_err(store_err)?;
        let entries = db
            .keyspace("entries", fjall::KeyspaceCreateOptions::default)
            .map_err(store_err)?;
        let checkpoints = db
            .keyspace("checkpoints", fjall::KeyspaceCreateOptions::default)
            .map_err(store_err)?;
        let starts = db
            .keyspace("starts", fjall::KeyspaceCreateOptions::default)
            .map_err(store_err)?;
        Ok(Store {
            db,
            entries,
            checkpoints,
            starts,
        })
    }

    /// Removes the indexes of topics that no longer exist (or were created again since).
    fn purge(&self, log: &spate_log::Log) -> Result<()> {
        let mut stale = Vec::new();
        for item in self.checkpoints.iter() {
            let k = item.key().map_err(store_err)?;
            let alive = parse_partition_prefix(&k).is_some_and(|(name, created)| {
                log.topic(name).is_ok_and(|t| t.created_ms == created)
            });
            if !alive {
                stale.push(k);
            }
        }
        for prefix in stale {
            self.remove_partition(&prefix)?;
        }
        Ok(())
    }

    /// Removes a partition's index: its entries, stream starts and checkpoint (the checkpoint
    /// last, so that an interrupted removal is found again).
    fn remove_partition(&self, prefix: &[u8]) -> Result<()> {
        let mut batch = self.db.batch();
        for keyspace in [&self.entries, &self.starts] {
            for item in keyspace.prefix(prefix) {
                batch.remove(keyspace, item.key().map_err(store_err)?);
                if batch.len() >= 10_000 {
                    std::mem::replace(&mut batch, self.db.batch())
                        .commit()
                        .map_err(store_err)?;
                }
            }
        }
        batch.remove(&self.checkpoints, prefix.to_vec());
        batch.commit().map_err(store_err)
    }

    /// The first version of a stream still read: 0, or its length when it was last deleted.
    fn start(&self, reader: &impl Readable, stream_prefix: &[u8]) -> Result<u64> {
        Ok(reader
            .get(&self.starts, stream_prefix)
            .map_err(store_err)?
            .and_then(|v| be_u64(&v))
            .unwrap_or(0))
    }

    /// The number of versions of a stream in the store.
    fn len(&self, reader: &impl Readable, stream_prefix: &[u8]) -> Result<u64> {
        match reader.prefix(&self.entries, stream_prefix).next_back() {
            None => Ok(0),
            Some(item) => {
                let k = item.key().map_err(store_err)?;
                let version = be_u64(&k[stream_prefix.len()..])
                    .ok_or_else(|| store_err("an entry key has no version"))?;
                Ok(version + 1)
            }
        }
    }

    /// The (version, offset) entries of a stream within `versions`, in version order.
    fn offsets(
        &self,
        reader: &impl Readable,
        stream_prefix: &[u8],
        versions: Range<u64>,
    ) -> Result<Vec<(u64, u64)>> {
        if versions.is_empty() {
            return Ok(Vec::new());
        }
        let from = entry_key(stream_prefix, versions.start);
        let to = entry_key(stream_prefix, versions.end);
        reader
            .range(&self.entries, from..to)
            .map(|item| {
                let (k, v) = item.into_inner().map_err(store_err)?;
                let version = be_u64(&k[stream_prefix.len()..]);
                match (version, be_u64(&v)) {
                    (Some(version), Some(offset)) => Ok((version, offset)),
                    _ => Err(store_err("malformed entry")),
                }
            })
            .collect()
    }
}

/// Lengths of recently used streams as of the follower's checkpoint, in two generations: a full
/// current generation becomes the previous one and the older is dropped.
#[derive(Default)]
struct Hot {
    current: HashMap<String, Stored>,
    previous: HashMap<String, Stored>,
}

/// A stream as the store holds it: its number of versions, and the first still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    len: u64,
    start: u64,
}

impl Stored {
    fn read(store: &Store, reader: &impl Readable, stream_prefix: &[u8]) -> Result<Stored> {
        Ok(Stored {
            len: store.len(reader, stream_prefix)?,
            start: store.start(reader, stream_prefix)?,
        })
    }
}

impl Hot {
    fn get(&self, stream: &str) -> Option<Stored> {
        self.current
            .get(stream)
            .or_else(|| self.previous.get(stream))
            .copied()
    }

    fn put(&mut self, stream: String, stored: Stored) {
        if self.current.len() >= HOT_STREAMS / 2 && !self.current.contains_key(&stream) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(stream, stored);
    }
}

/// What a partition's index holds in memory, changed under one lock with the store's checkpoint.
struct Mem {
    /// The store reflects the log below this offset.
    applied: u64,
    hot: Hot,
    /// Offsets (at or after `applied`) of stream appends the follower has not applied yet, per
    /// stream: their versions follow the stored ones.
    pending: HashMap<String, Vec<u64>>,
}

struct PartitionStreams {
    partition: Arc<Partition>,
    prefix: Vec<u8>,
    mem: RwLock<Mem>,
    /// The offset up to which the follower has applied the log.
    applied: watch::Sender<u64>,
    /// Wakes the follower at once when someone waits for it (it otherwise lets appends gather).
    kick: tokio::sync::Notify,
    /// Serializes stream appends; holds the log end after the last one.
    writer: tokio::sync::Mutex<u64>,
}

pub(crate) struct TopicStreams {
    topic: Arc<Topic>,
    store: Arc<Store>,
    parts: Vec<PartitionStreams>,
}

impl TopicStreams {
    /// The partition of a stream (its key's), and its index.
    fn part_of(&self, stream: &str) -> (u32, &PartitionStreams) {
        let index = partitioner::partition_for_key(stream.as_bytes(), self.parts.len() as u32);
        (index, &self.parts[index as usize])
    }
}

/// The stream indexes of the topics in use.
pub(crate) struct Streams {
    dir: PathBuf,
    store: tokio::sync::Mutex<Option<Arc<Store>>>,
    topics: Mutex<HashMap<String, Arc<TopicStreams>>>,
    followers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl Streams {
    pub(crate) fn new(dir: PathBuf) -> Streams {
        Streams {
            dir,
            store: Default::default(),
            topics: Default::default(),
            followers: Default::default(),
            stop: watch::channel(false).0,
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl PartitionStreams {
    /// The stream's length including appends not yet applied by the follower and its first
    /// version still read (for version checks), and its offsets at the versions `versions` gives
    /// for that first version (for retries), from memory for hot streams.
    fn current(
        &self,
        store: &Store,
        stream: &str,
        versions: impl FnOnce(u64) -> Option<Range<u64>>,
    ) -> Result<(u64, u64, Vec<u64>)> {
        let sp = stream_prefix(&self.prefix, stream);
        // The write lock keeps the follower from committing between the store and memory.
        let mut mem = write(&self.mem);
        let Stored { len: stored, start } = match mem.hot.get(stream) {
            Some(s) => s,
            None => {
                let s = Stored::read(store, &store.db.snapshot(), &sp)?;
                mem.hot.put(stream.to_string(), s);
                s
            }
        };
        let pending = mem.pending.get(stream).map_or(&[][..], Vec::as_slice);
        let len = stored + pending.len() as u64;
        let mut offsets = Vec::new();
        // Only a retry (versions below the stream's length) needs them.
        if let Some(v) = versions(start).filter(|v| v.start < len) {
            let end = v.end.min(len);
            let v = v.start..end;
            offsets.extend(
                store
                    .offsets(&store.db.snapshot(), &sp, v.start..v.end.min(stored))?
                    .into_iter()
                    .map(|(_, o)| o),
            );
            offsets.extend(
                pending[(v.start.max(stored) - stored) as usize
                    ..(v.end.max(stored) - stored) as usize]
                    .iter()
                    .copied(),
            );
        }
        Ok((len, start, offsets))
    }

    /// The conditional append of the stream endpoints. Takes the partition's writer (returned:
    /// it holds the log end after the last append made through it) and, once the index covers
    /// what other doors appended, reads the stream (see [`PartitionStreams::current`]); when
    /// `fits` accepts its length and first version read, appends `encoded`, provided nothing
    /// else was appended since the check, or else checks again.
    async fn append_if(
        &self,
        ts: &TopicStreams,
        stream: &str,
        encoded: &[u8],
        now: i64,
        mut versions: impl FnMut(u64) -> Option<Range<u64>>,
        fits: impl Fn(u64, u64) -> bool,
    ) -> Result<(tokio::sync::MutexGuard<'_, u64>, Checked)> {
        let mut writer_end = self.writer.lock().await;
        loop {
            // Everything other doors appended must be in the index before the check.
            let end = self.partition.log_end_offset();
            if end > *writer_end {
                wait_applied(self, end).await?;
            }
            let (len, start, at) = self.current(&ts.store, stream, &mut versions)?;
            if !fits(len, start) {
                return Ok((writer_end, Checked::Refused { len, start, at }));
            }
            // A write to the page cache, done in place: handing it to a blocking thread costs
            // two thread switches, more than the write (a segment roll's fsync may stall it).
            let mut buf = encoded.to_vec();
            match self
                .partition
                .append_unsynced_at(&mut buf, now, &ts.topic.config(), Some(end))
            {
                Ok(appended) => {
                    *writer_end = appended.last_offset + 1;
                    return Ok((writer_end, Checked::Appended { len, appended }));
                }
                Err(spate_log::Error::NotAtOffset { .. }) => *writer_end = (*writer_end).min(end),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What [`PartitionStreams::append_if`] did.
enum Checked {
    /// Appended, the stream then holding `len` versions.
    Appended { len: u64, appended: Appended },
    /// Not appended: the stream as checked (its length, first version read, and the offsets
    /// asked for).
    Refused { len: u64, start: u64, at: Vec<u64> },
}

/// The refusal of a stream that is not at the expected version.
fn wrong_version(len: u64, start: u64) -> BrokerError {
    BrokerError::Stream(StreamError::WrongVersion {
        current: (len > start).then(|| len - 1),
    })
}

impl Broker {
    /// The streams of `topic`, opening the index store and starting the topic's followers on
    /// first use.
    async fn topic_streams(self: &Arc<Self>, name: &str) -> Result<Arc<TopicStreams>> {
        let topic = self.topic(name)?;
        if crate::is_internal(&topic.name) {
            return Err(BrokerError::InternalTopic(topic.name.clone()));
        }
        if let Some(t) = self.streams_of(name, &topic) {
            return Ok(t);
        }
        let mut store = self.streams.store.lock().await;
        if *self.streams.stop.borrow() {
            return Err(BrokerError::Stream(StreamError::Unavailable));
        }
        if let Some(t) = self.streams_of(name, &topic) {
            return Ok(t);
        }
        let st = match &*store {
            Some(s) => s.clone(),
            None => {
                let (dir, log) = (self.streams.dir.clone(), self.log.clone());
                let s = blocking(move || {
                    let s = Store::open(&dir)?;
                    s.purge(&log)?;
                    Ok(Arc::new(s))
                })
                .await?;
                *store = Some(s.clone());
                s
            }
        };
        let (t2, st2) = (topic.clone(), st.clone());
        let parts = blocking(move || {
            t2.partitions
                .iter()
                .map(|p| {
                    let prefix = partition_prefix(&t2, p.id);
                    let checkpoint = st2
                        .checkpoints
                        .get(&prefix)
                        .map_err(store_err)?
                        .and_then(|v| be_u64(&v));
                    let start = p.log_start_offset();
                    let applied = match checkpoint {
                        // The log lost what the index had seen (a repair truncated it): rebuild.
                        Some(c) if c > p.high_watermark() => {
                            tracing::warn!(topic = %t2.name, partition = p.id, checkpoint = c, "the stream index is ahead of the log; rebuilding it");
                            st2.remove_partition(&prefix)?;
                            start
                        }
                        Some(c) => c.max(start),
                        None => start,
                    };
                    Ok(PartitionStreams {
                        partition: p.clone(),
                        prefix,
                        mem: RwLock::new(Mem {
                            applied,
                            hot: Hot::default(),
                            pending: HashMap::new(),
                        }),
                        applied: watch::channel(applied).0,
                        kick: tokio::sync::Notify::new(),
                        writer: tokio::sync::Mutex::new(0),
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let t = Arc::new(TopicStreams {
            topic,
            store: st,
            parts,
        });
        self.streams
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), t.clone());
        let mut followers = self
            .streams
            .followers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        followers.retain(|f| !f.is_finished());
        for i in 0..t.parts.len() {
            followers.push(tokio::spawn(follow(
                self.clone(),
                t.clone(),
                i,
                self.streams.stop.subscribe(),
            )));
        }
        Ok(t)
    }

    fn streams_of(&self, name: &str, topic: &Arc<Topic>) -> Option<Arc<TopicStreams>> {
        let topics = self
            .streams
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        topics
            .get(name)
            .filter(|t| Arc::ptr_eq(&t.topic, topic))
            .cloned()
    }

    /// Stops the stream index followers and closes the index store, synced: for shutdown.
    /// Stream requests after this fail as unavailable.
    pub async fn close_streams(&self) -> Result<()> {
        let mut store = self.streams.store.lock().await;
        self.streams.stop.send_replace(true);
        let followers: Vec<_> = std::mem::take(
            &mut *self
                .streams
                .followers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for f in followers {
            let _ = f.await;
        }
        self.streams
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some(s) = store.take() {
            blocking(move || s.db.persist(fjall::PersistMode::SyncAll).map_err(store_err)).await?;
        }
        Ok(())
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
        let started = std::time::Instant::now();
        check_stream_id(stream)?;
        if events.is_empty() {
            return Err(BrokerError::Stream(StreamError::InvalidStream(
                "no events to append".into(),
            )));
        }
        let ts = self.topic_streams(topic).await?;
        let now = now_ms();
        let mut size = 0;
        for (index, e) in events.iter_mut().enumerate() {
            if e.event_type == STREAM_DELETED_TYPE {
                return Err(BrokerError::Stream(StreamError::InvalidStream(format!(
                    "event {index} has type {STREAM_DELETED_TYPE}, which deletes a stream: \
                     delete it with DELETE instead"
                ))));
            }
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
        let max = ts.topic.config().max_message_bytes.saturating_sub(256);
        if size > max {
            return Err(BrokerError::EventTooLarge {
                index: 0,
                size,
                max,
            });
        }
        let (index, part) = ts.part_of(stream);
        let records: Vec<NewRecord> = events.iter().map(|e| e.to_record(now)).collect();
        let encoded = batch::encode(&records).expect("events are not empty");
        let n = events.len() as u64;
        let mut first = None;
        let (writer, checked) = part
            .append_if(
                &ts,
                stream,
                &encoded,
                now,
                |start| {
                    first = match expected {
                        Expected::NoStream => Some(start),
                        Expected::Version(v) => Some(v + 1),
                        Expected::Any | Expected::Exists => None,
                    };
                    first.map(|f| f..f + n)
                },
                |len, start| expected.fits(len, start),
            )
            .await?;
        let (current, appended) = match checked {
            Checked::Appended { len, appended } => (len, appended),
            Checked::Refused {
                len: current,
                start,
                at,
            } => {
                // Whether this is a retry of an append already made is checked without holding
                // the writer: events at versions below `current` never change, and reading them
                // must not hold up the appends of other streams of the partition.
                drop(writer);
                if let Some(first) = first
                    && first + n <= current
                    && same_ids(self, &part.partition, &ts.topic.name, index, &at, &events).await?
                {
                    return Ok(StreamAppend {
                        first_version: first,
                        last_version: first + n - 1,
                        partition: index,
                        offsets: at,
                    });
                }
                return Err(wrong_version(current, start));
            }
        };
        {
            let mut mem = write(&part.mem);
            // The follower may have applied these already, if another writer's fsync made them
            // durable first.
            let applied = mem.applied;
            let pending = mem.pending.entry(stream.to_string()).or_default();
            pending.extend((appended.base_offset..=appended.last_offset).filter(|&o| o >= applied));
            if pending.is_empty() {
                mem.pending.remove(stream);
            }
        }
        drop(writer);
        self.acknowledgeable(&part.partition, appended).await?;
        metrics::histogram!("spate_publish_to_durable_seconds", "protocol" => "http")
            .record(started.elapsed().as_secs_f64());
        Ok(StreamAppend {
            first_version: current,
            last_version: current + n - 1,
            partition: index,
            offsets: (appended.base_offset..=appended.last_offset).collect(),
        })
    }

    /// Deletes a stream if it is at `expected` (soft delete, as EventStoreDB's): appends a
    /// [`STREAM_DELETED_TYPE`] event, after which reads leave out the stream's earlier events
    /// and the stream does not exist until an event is appended again, at the next version. The
    /// events stay in the topic (Kafka consumers and topic reads see them) until retention
    /// removes them. `None` when the stream has no event to delete.
    pub async fn delete_stream(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        expected: Expected,
    ) -> Result<Option<StreamDeleted>> {
        check_stream_id(stream)?;
        let ts = self.topic_streams(topic).await?;
        let now = now_ms();
        let mut marker = Event {
            event_type: STREAM_DELETED_TYPE.into(),
            source: Some(format!("/spate/topics/{topic}/streams")),
            ..Event::default()
        };
        marker
            .extensions
            .insert("partitionkey".into(), stream.to_string());
        marker.fill_defaults(now);
        let (index, part) = ts.part_of(stream);
        let encoded = batch::encode(&[marker.to_record(now)]).expect("one record");
        // The writer is held until the index has applied the deletion, so that no append checks
        // its version against the stream as it was before.
        let (writer, checked) = part
            .append_if(
                &ts,
                stream,
                &encoded,
                now,
                |_| None,
                // A stream without events since its last deletion has nothing to delete.
                |len, start| expected.fits(len, start) && len > start,
            )
            .await?;
        let (len, appended) = match checked {
            Checked::Appended { len, appended } => (len, appended),
            Checked::Refused { len, start, .. } if expected.fits(len, start) => return Ok(None),
            Checked::Refused { len, start, .. } => return Err(wrong_version(len, start)),
        };
        self.acknowledgeable(&part.partition, appended).await?;
        wait_applied(part, appended.last_offset + 1).await?;
        drop(writer);
        Ok(Some(StreamDeleted {
            version: len - 1,
            partition: index,
            offset: appended.base_offset,
        }))
    }

    /// Up to `limit` streams of `topic` that exist (have an event since their last deletion),
    /// after the stream `after` names (partition, stream id), in the index's order: by partition,
    /// then by the length of the id, then by its bytes. Also returns where the next page starts
    /// (`None` at the end).
    pub async fn list_streams(
        self: &Arc<Self>,
        topic: &str,
        after: Option<(u32, String)>,
        limit: usize,
    ) -> Result<(Vec<StreamListed>, Option<(u32, String)>)> {
        if let Some((_, stream)) = &after {
            check_stream_id(stream)?;
        }
        let ts = self.topic_streams(topic).await?;
        let first = after.as_ref().map_or(0, |a| a.0);
        if first as usize >= ts.parts.len() {
            return Err(BrokerError::Stream(StreamError::InvalidStream(format!(
                "the cursor names partition {first}; topic {topic} has {}",
                ts.parts.len()
            ))));
        }
        for part in &ts.parts[first as usize..] {
            wait_applied(part, part.partition.high_watermark()).await?;
        }
        let ts2 = ts.clone();
        blocking(move || {
            let snapshot = ts2.store.db.snapshot();
            let mut out = Vec::new();
            let mut looked = 0;
            let mut after = after;
            for index in first..ts2.parts.len() as u32 {
                let prefix = &ts2.parts[index as usize].prefix;
                // Past every entry of the stream the cursor names, or from the partition's start.
                let mut from = match after.take() {
                    Some((p, stream)) if p == index => {
                        let mut k = stream_prefix(prefix, &stream);
                        k.extend_from_slice(&[0xff; 8]);
                        std::ops::Bound::Excluded(k)
                    }
                    _ => std::ops::Bound::Included(prefix.clone()),
                };
                loop {
                    let next = snapshot
                        .range(&ts2.store.entries, (from, std::ops::Bound::Unbounded))
                        .next();
                    let Some(item) = next else { break };
                    let k = item.key().map_err(store_err)?;
                    if !k.starts_with(prefix) {
                        break;
                    }
                    let rest = &k[prefix.len()..];
                    let id_len = rest
                        .get(..4)
                        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
                        .ok_or_else(|| store_err("an entry key has no stream"))?;
                    let id = rest
                        .get(4..4 + id_len)
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .ok_or_else(|| store_err("an entry key has no stream"))?
                        .to_string();
                    let sp = stream_prefix(prefix, &id);
                    let Stored { len, start } = Stored::read(&ts2.store, &snapshot, &sp)?;
                    let mut past = sp;
                    past.extend_from_slice(&[0xff; 8]);
                    from = std::ops::Bound::Excluded(past);
                    looked += 1;
                    if len > start {
                        out.push(StreamListed {
                            stream: id.clone(),
                            version: len - 1,
                            partition: index,
                        });
                    }
                    if out.len() >= limit || looked >= LIST_LOOKS_MAX {
                        return Ok((out, Some((index, id))));
                    }
                }
            }
            Ok((out, None))
        })
        .await
    }

    /// Where a stream stands; `None` when it has no durable event.
    pub async fn stream_info(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
    ) -> Result<Option<StreamInfo>> {
        let (_, index, info) = self
            .with_durable_stream(topic, stream, |v| {
                if v.len == v.start {
                    return Ok(None);
                }
                let first = v.offsets(v.start..v.start + 1)?;
                let last = v.offsets(v.len - 1..v.len)?;
                Ok(first
                    .first()
                    .zip(last.first())
                    .map(|(f, l)| (v.len, f.1, l.1)))
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
    /// stream has no durable event. Each event is made by `make` from its record and origin
    /// (topic, partition): [`Event::from_record_ref`], or
    /// [`crate::event::record_json`] for its JSON.
    pub async fn read_stream<T: Send + 'static>(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        from_version: Option<u64>,
        limit: usize,
        backward: bool,
        make: fn(&batch::RecordRef<'_>, (&str, u32)) -> T,
    ) -> Result<Option<Vec<StreamEvent<T>>>> {
        // One blocking step: the wanted (version, offset) pairs, then the events, read in
        // windows of nearby batches (events removed by retention are left out).
        let (_, _, events) = self
            .with_durable_stream(topic, stream, move |v| {
                if v.len == v.start {
                    return Ok(None);
                }
                // Versions before the stream's last deletion are not read.
                let range = if backward {
                    let top = from_version.unwrap_or(u64::MAX).min(v.len - 1) + 1;
                    top.saturating_sub(limit as u64).max(v.start)..top.max(v.start)
                } else {
                    let from = from_version.unwrap_or(0).clamp(v.start, v.len);
                    from..(from + limit as u64).min(v.len)
                };
                let wanted = v.offsets(range)?;
                let offsets: Vec<u64> = wanted.iter().map(|&(_, o)| o).collect();
                let found = crate::read_offsets_with(v.partition, &offsets, 64 << 10, |r| {
                    make(r, (v.topic, v.index))
                })?;
                let mut versions = wanted.iter();
                let mut out: Vec<StreamEvent<T>> = found
                    .into_iter()
                    .filter_map(|(offset, event)| {
                        let &(version, _) = versions.find(|&&(_, o)| o == offset)?;
                        Some(StreamEvent {
                            version,
                            partition: v.index,
                            offset,
                            event,
                        })
                    })
                    .collect();
                if backward {
                    out.reverse();
                }
                Ok(Some(out))
            })
            .await?;
        let Some(events) = events else {
            return Ok(None);
        };
        Ok(Some(events))
    }

    /// Runs `f` (blocking) on a consistent view of a stream's durable versions, once the index
    /// covers the partition's log up to its high watermark at the call.
    async fn with_durable_stream<T: Send + 'static>(
        self: &Arc<Self>,
        topic: &str,
        stream: &str,
        f: impl FnOnce(&DurableStream) -> Result<T> + Send + 'static,
    ) -> Result<(Arc<TopicStreams>, u32, T)> {
        check_stream_id(stream)?;
        let ts = self.topic_streams(topic).await?;
        let (index, part) = ts.part_of(stream);
        wait_applied(part, part.partition.high_watermark()).await?;
        let (ts2, stream) = (ts.clone(), stream.to_string());
        let result = blocking(move || {
            let part = &ts2.parts[index as usize];
            // Everything the follower applied is durable: it reads only below the high
            // watermark. Appends not yet applied are not served.
            // The follower commits and moves `applied` under the write lock: the snapshot is of
            // the store as of `applied`.
            let (snapshot, applied) = {
                let mem = read(&part.mem);
                (ts2.store.db.snapshot(), mem.applied)
            };
            let sp = stream_prefix(&part.prefix, &stream);
            let Stored { len, start } = Stored::read(&ts2.store, &snapshot, &sp)?;
            f(&DurableStream {
                store: &ts2.store,
                partition: &part.partition,
                topic: &ts2.topic.name,
                index,
                snapshot,
                prefix: sp,
                len,
                start,
                applied,
            })
        })
        .await?;
        Ok((ts, index, result))
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
        let (_, index, (len, from_version, at)) = self
            .with_durable_stream(topic, stream, move |v| {
                // Versions before the stream's last deletion are not delivered.
                let from_version = from_version.max(v.start);
                let at = v.offsets(from_version..from_version.saturating_add(1))?;
                Ok((
                    v.len,
                    from_version,
                    at.first().map(|&(_, o)| o).unwrap_or(v.applied),
                ))
            })
            .await?;
        // Past the stream's end, the feed starts where the snapshot's view of the log ends.
        let (offset, version) = if from_version < len {
            (at, from_version)
        } else {
            (at, len)
        };
        feed.scope_to_stream(index, offset, stream.to_string(), version, from_version);
        Ok(feed)
    }
}

/// One stream as of a snapshot of the index, all of it durable.
struct DurableStream<'a> {
    store: &'a Store,
    partition: &'a Arc<Partition>,
    topic: &'a str,
    index: u32,
    snapshot: fjall::Snapshot,
    prefix: Vec<u8>,
    /// Its number of versions.
    len: u64,
    /// The first version still read (the length at its last deletion; 0 when never deleted).
    start: u64,
    /// The log offset the snapshot reflects the partition up to.
    applied: u64,
}

impl DurableStream<'_> {
    /// The (version, offset) entries within `versions`.
    fn offsets(&self, versions: Range<u64>) -> Result<Vec<(u64, u64)>> {
        self.store.offsets(&self.snapshot, &self.prefix, versions)
    }
}

/// Events this close to a partition's end are read without leaving the runtime's thread.
const INLINE_READ_EVENTS: u64 = 4096;

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
    let Some(&last) = offsets.last() else {
        return Ok(false);
    };
    if offsets.len() != events.len() {
        return Ok(false);
    }
    let mut hw = broker.watch(partition);
    let waited = tokio::time::timeout(CATCH_UP_WAIT, hw.wait_for(|&h| h > last))
        .await
        .is_ok_and(|r| r.is_ok());
    if !waited {
        return Err(BrokerError::Stream(StreamError::Unavailable));
    }
    let (p, name, offsets) = (partition.clone(), topic.to_string(), offsets.to_vec());
    let recent = partition.high_watermark() - offsets[0] <= INLINE_READ_EVENTS;
    let read = move || {
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
            .collect::<Result<Vec<Option<String>>>>()
    };
    // A conflict is nearly always with events just appended: they are in the page cache, and
    // reading them here costs less than handing the read to a thread and back.
    let ids = if recent {
        read()?
    } else {
        blocking(read).await?
    };
    Ok(ids
        .iter()
        .zip(events)
        .all(|(have, e)| have.is_some() && *have == e.id))
}

async fn wait_applied(part: &PartitionStreams, offset: u64) -> Result<()> {
    let mut rx = part.applied.subscribe();
    if *rx.borrow() < offset {
        part.kick.notify_one();
    }
    match tokio::time::timeout(CATCH_UP_WAIT, rx.wait_for(|&a| a >= offset)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(BrokerError::Stream(StreamError::Unavailable)),
    }
}

/// A keyed record the stream index follower read: its offset, its stream, and whether it
/// deletes the stream.
type KeyedRecord = (u64, String, bool);

/// The keyed records of the batches read from `from` (at most about `FOLLOW_PAGE_BYTES`), and
/// the offset after them.
fn read_keys(p: &Partition, from: u64) -> Result<(Vec<KeyedRecord>, u64)> {
    let bytes = p.read(from, FOLLOW_PAGE_BYTES)?;
    let mut keys = Vec::new();
    let mut next = from;
    // The read checked each batch's CRC.
    for (at, h) in batch::headers(&bytes).map_err(spate_log::Error::from)? {
        crate::for_each_record(&h, &bytes[at..at + h.total_bytes() as usize], |r| {
            let offset = r.offset as u64;
            if offset >= from
                && let Some(key) = Event::record_partition_key(r)
                && key.len() <= STREAM_ID_BYTES_MAX
                && !key.contains(char::REPLACEMENT_CHARACTER)
            {
                let deletes = r.headers.iter().any(|(name, value)| {
                    *name == "ce_type" && *value == Some(STREAM_DELETED_TYPE.as_bytes())
                });
                keys.push((offset, key, deletes));
            }
            Ok(())
        })?;
        next = next.max(h.base_offset as u64 + h.offset_count());
    }
    Ok((keys, next))
}

/// Applies the durable records from `from` to a partition's index: their entries and the new
/// checkpoint in one atomic batch, then memory, under the lock. Returns the offset applied up to.
fn apply_page(ts: &TopicStreams, i: usize, from: u64) -> Result<u64> {
    let part = &ts.parts[i];
    let store = &ts.store;
    // Records removed by retention are skipped: versions go on from the stored ones.
    let from = from.max(part.partition.log_start_offset());
    let (keys, next) = if from < part.partition.high_watermark() {
        read_keys(&part.partition, from)?
    } else {
        (Vec::new(), from)
    };
    // The follower is the only writer of entries and starts: what is read here stays true until
    // it commits.
    let mut lens: HashMap<&str, Stored> = HashMap::new();
    let mut batch = store.db.batch();
    let snapshot = store.db.snapshot();
    for (offset, stream, deletes) in &keys {
        let sp = stream_prefix(&part.prefix, stream);
        let stored = match lens.get_mut(stream.as_str()) {
            Some(s) => s,
            None => {
                let hot = read(&part.mem).hot.get(stream);
                let s = match hot {
                    Some(s) => s,
                    None => Stored::read(store, &snapshot, &sp)?,
                };
                lens.entry(stream.as_str()).or_insert(s)
            }
        };
        if *deletes {
            // A deletion takes no version: the stream is read from its current length on.
            stored.start = stored.len;
            batch.insert(&store.starts, sp, stored.len.to_be_bytes().to_vec());
            continue;
        }
        batch.insert(
            &store.entries,
            entry_key(&sp, stored.len),
            offset.to_be_bytes().to_vec(),
        );
        stored.len += 1;
    }
    batch.insert(
        &store.checkpoints,
        part.prefix.clone(),
        next.to_be_bytes().to_vec(),
    );
    let mut mem = write(&part.mem);
    batch.commit().map_err(store_err)?;
    mem.applied = next;
    for (stream, stored) in lens {
        if let Some(pending) = mem.pending.get_mut(stream) {
            pending.retain(|&o| o >= next);
            if pending.is_empty() {
                mem.pending.remove(stream);
            }
        }
        mem.hot.put(stream.to_string(), stored);
    }
    Ok(next)
}

/// Applies a partition's durable records to its stream index, from its checkpoint, then as the
/// high watermark moves; ends when the topic is deleted or the streams are closed.
async fn follow(
    broker: Arc<Broker>,
    ts: Arc<TopicStreams>,
    i: usize,
    mut stop: watch::Receiver<bool>,
) {
    let part = &ts.parts[i];
    let mut hw = broker.watch(&part.partition);
    drop(broker);
    let mut next = *part.applied.borrow();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        while next < part.partition.high_watermark() {
            let ts2 = ts.clone();
            match blocking(move || apply_page(&ts2, i, next)).await {
                Ok(applied) => {
                    let moved = applied > next;
                    next = next.max(applied);
                    part.applied.send_replace(next);
                    if !moved {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %ts.topic.name, partition = i, error = %e, "stream index follower failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        tokio::select! {
            r = hw.changed() => if r.is_err() { return },
            _ = stop.changed() => continue,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                // A deleted topic's partition stops advancing; its index is purged at the next
                // start.
                if part.partition.is_closed() {
                    return;
                }
                continue;
            }
        }
        // Let more appends gather before the next step, unless a reader or a version check
        // waits: stream appends do not need the follower for their checks (their own appends
        // are held in memory), so under load one step covers many fsyncs.
        tokio::select! {
            _ = part.kick.notified() => {}
            _ = stop.changed() => {}
            _ = tokio::time::sleep(FOLLOW_DELAY) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_versions_parse_within_what_a_partition_can_hold() {
        assert_eq!("any".parse(), Ok(Expected::Any));
        assert_eq!("no_stream".parse(), Ok(Expected::NoStream));
        assert_eq!("exists".parse(), Ok(Expected::Exists));
        assert_eq!("0".parse(), Ok(Expected::Version(0)));
        let top = i64::MAX as u64 - 1;
        assert_eq!(top.to_string().parse(), Ok(Expected::Version(top)));
        for bad in [
            "",
            "-1",
            "1.5",
            "latest",
            "9223372036854775807",
            "18446744073709551615",
            "18446744073709551616",
        ] {
            assert!(bad.parse::<Expected>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn entry_keys_keep_streams_apart_and_versions_in_order() {
        let topic = Topic::new(
            "orders".into(),
            spate_log::TopicConfig::default(),
            1_700_000_000_000,
            Vec::new(),
        );
        let p = partition_prefix(&topic, 3);
        assert_eq!(
            parse_partition_prefix(&p),
            Some(("orders", 1_700_000_000_000))
        );
        // A stream whose id is a prefix of another's does not share its key range.
        let a = stream_prefix(&p, "order-4");
        let b = stream_prefix(&p, "order-42");
        assert!(!entry_key(&b, 0).starts_with(&a));
        let mut keys: Vec<Vec<u8>> = [10u64, 2, 255, 256, 1]
            .iter()
            .map(|&v| entry_key(&a, v))
            .collect();
        keys.sort();
        let versions: Vec<u64> = keys
            .iter()
            .map(|k| be_u64(&k[a.len()..]).unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 10, 255, 256]);
    }

    #[test]
    fn the_hot_map_keeps_recent_streams_and_stays_bounded() {
        let mut hot = Hot::default();
        let stored = |len| Stored { len, start: 0 };
        for i in 0..HOT_STREAMS as u64 * 3 {
            hot.put(format!("s{i}"), stored(i));
        }
        assert!(hot.current.len() + hot.previous.len() <= HOT_STREAMS);
        let last = HOT_STREAMS as u64 * 3 - 1;
        assert_eq!(hot.get(&format!("s{last}")), Some(stored(last)));
        assert_eq!(hot.get("s0"), None);
        // An update wins over the older generation's value.
        let older = hot.previous.keys().next().unwrap().clone();
        hot.put(older.clone(), Stored { len: 7, start: 7 });
        assert_eq!(hot.get(&older), Some(Stored { len: 7, start: 7 }));
    }
}
