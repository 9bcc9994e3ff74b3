//! A partition: an ordered, append-only sequence of record batches in a directory of segments.
//!
//! One writer appends at a time (the `writer` mutex): it assigns offsets, writes to the active
//! segment and rolls segments. Durability is group commit: after writing, an appender waits until an
//! fsync covering its batch has completed; the first waiter runs the fsync outside the writer lock
//! while later appenders keep writing, and the next fsync covers all of them. Readers never take the
//! writer lock: they read the high watermark (an atomic), take a snapshot of the segment list and read
//! the files with positional reads.
//!
//! The high watermark is the end of what readers may see. Under `FsyncPolicy::Batch` it moves only
//! after the fsync, so nothing unsynced is ever served; under the relaxed policies it moves on write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::batch;
use crate::config::{FsyncPolicy, LogConfig, TopicConfig};
use crate::error::{Error, IoContext, Result};
use crate::io::Storage;
use crate::producers::{ProducerBatch, Producers, Verdict, last_sequence};
use crate::segment::Segment;

/// Appends smaller than this fraction of `LogConfig::preallocate_bytes` get the space ahead of them
/// written with zeros rather than reserved (see `Partition::append_unsynced_at`).
const ZERO_FILL_APPEND_FRACTION: u64 = 16;

/// The largest input of one append. Keeps a segment below 4 GiB (positions are u32) whatever the
/// segment size, and bounds the memory an append holds.
pub const APPEND_BYTES_MAX: u64 = 256 << 20;

/// The file of a partition that holds its log start when records were deleted
/// ([`Partition::delete_records`]).
const START_FILE: &str = "log-start";
const _: () = assert!(APPEND_BYTES_MAX + crate::config::SEGMENT_BYTES_MAX <= u32::MAX as u64);

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
}

/// Offsets and sizes of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub high_watermark: u64,
    pub size_bytes: u64,
    pub segments: u64,
}

struct Writer {
    active: Arc<Segment>,
    next_offset: u64,
    /// When the active segment received its first batch (for roll by age).
    active_since_ms: Option<i64>,
    /// Idempotent producers' recent batches.
    producers: Producers,
    /// The active segment's file length: its batches, then space allocated ahead of them.
    allocated: u64,
    /// Where the active segment's written blocks end (its batches, then zeros written ahead of
    /// them): an append below it overwrites blocks the file system has allocated and written, and
    /// needs no metadata commit to be durable.
    written: u64,
    /// Counts the changes to the active segment's metadata (its length, its extents) that a sync
    /// must commit; `SyncState::metadata_synced` says how many are durable.
    metadata_changes: u64,
}

struct SyncState {
    /// Everything below this offset is durable.
    durable_offset: u64,
    syncing: bool,
    /// The `Writer::metadata_changes` that the last full sync covered: while it is behind, only a
    /// full sync (not a writeback shared with other partitions) makes new appends durable.
    metadata_synced: u64,
}

/// A sync in progress (its partition's `SyncState::syncing` is set): what it covers.
struct Ticket {
    file: Arc<dyn crate::io::File>,
    path: PathBuf,
    end: u64,
    metadata_changes: u64,
}

/// Called with the new high watermark whenever it advances, and with the unchanged one when the
/// partition is poisoned (so that waiters look again and see it).
pub type Listener = Box<dyn Fn(u64) + Send + Sync>;

pub struct Partition {
    pub topic: String,
    pub id: u32,
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    config: LogConfig,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    high_watermark: AtomicU64,
    /// The first offset records may be read from when records were deleted ahead of the first
    /// segment's end (Kafka's DeleteRecords); 0 when none were. Stored in `log-start`.
    start: AtomicU64,
    /// Held while `start` is moved.
    moving_start: Mutex<()>,
    poisoned: AtomicBool,
    closed: AtomicBool,
    sync: Mutex<SyncState>,
    synced: Condvar,
    listeners: RwLock<Vec<Listener>>,
    /// Metric handles, registered once rather than looked up on every append and fsync.
    metrics: PartitionMetrics,
}

struct PartitionMetrics {
    records: metrics::Counter,
    bytes: metrics::Counter,
    fsync: metrics::Histogram,
}

impl PartitionMetrics {
    fn new(topic: &str) -> PartitionMetrics {
        PartitionMetrics {
            records: metrics::counter!("spate_records_appended_total", "topic" => topic.to_string()),
            bytes: metrics::counter!("spate_bytes_appended_total", "topic" => topic.to_string()),
            fsync: metrics::histogram!("spate_fsync_seconds"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

impl Partition {
    /// Creates the directory of a new, empty partition (the caller syncs the parent directory).
    pub(crate) fn create(
        storage: Arc<dyn Storage>,
        dir: &Path,
        topic: &str,
        id: u32,
        config: LogConfig,
    ) -> Result<Partition> {
        storage
            .create_dir(dir)
            .ctx("create partition directory", dir)?;
        let segment = Self::first_segment(&*storage, dir)?;
        Ok(Self::assemble(
            storage,
            dir,
            topic,
            id,
            config,
            vec![Arc::new(segment)],
            Vec::new(),
        ))
    }

    /// Creates the empty segment at offset 0 of a partition, durable with its directory entry.
    fn first_segment(storage: &dyn Storage, dir: &Path) -> Result<Segment> {
        let segment = Segment::create(storage, dir, 0)?;
        segment.file.sync().ctx("sync segment", &segment.log_path)?;
        storage.sync_dir(dir).ctx("sync partition directory", dir)?;
        Ok(segment)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        dir: &Path,
        topic: &str,
        id: u32,
        config: LogConfig,
        segments: Vec<Arc<Segment>>,
        producer_batches: Vec<ProducerBatch>,
    ) -> Partition {
        let mut producers = Producers::default();
        for b in producer_batches {
            producers.record(b);
        }
        let active = segments
            .last()
            .expect("a partition has at least one segment")
            .clone();
        let next_offset = active.state().next_offset;
        let allocated = active.state().size;
        Partition {
            topic: topic.to_string(),
            id,
            dir: dir.to_path_buf(),
            storage,
            config,
            segments: RwLock::new(segments),
            writer: Mutex::new(Writer {
                active,
                next_offset,
                active_since_ms: None,
                producers,
                allocated,
                written: allocated,
                metadata_changes: 0,
            }),
            high_watermark: AtomicU64::new(next_offset),
            start: AtomicU64::new(0),
            moving_start: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            sync: Mutex::new(SyncState {
                durable_offset: next_offset,
                syncing: false,
                metadata_synced: 0,
            }),
            synced: Condvar::new(),
            listeners: RwLock::new(Vec::new()),
            metrics: PartitionMetrics::new(topic),
        }
    }

    /// Opens a partition directory, recovering the tail of the last segment.
    pub(crate) fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        topic: &str,
        id: u32,
        config: LogConfig,
    ) -> Result<Partition> {
        let names = storage.read_dir(dir).ctx("list partition directory", dir)?;
        let mut bases = Vec::new();
        for name in &names {
            let path = dir.join(name);
            if name.ends_with(".tmp") {
                storage.remove_file(&path).ctx("remove temp file", &path)?;
            } else if let Some(stem) = name.strip_suffix(".log") {
                let base: u64 = stem.parse().map_err(|_| Error::Metadata {
                    path: path.clone(),
                    reason: "segment file name is not an offset".into(),
                })?;
                bases.push(base);
            }
        }
        // Index files whose segment is gone (a crash during retention) are removed.
        for name in &names {
            if let Some((stem, ext)) = name.rsplit_once('.')
                && (ext == "index" || ext == "timeindex")
                && !names.contains(&format!("{stem}.log"))
            {
                let path = dir.join(name);
                storage
                    .remove_file(&path)
                    .ctx("remove orphan index", &path)?;
            }
        }
        bases.sort_unstable();
        if bases.is_empty() {
            tracing::warn!(dir = %dir.display(), "partition has no segment; starting an empty one at offset 0");
            let segment = Self::first_segment(&*storage, dir)?;
            return Ok(Self::assemble(
                storage,
                dir,
                topic,
                id,
                config,
                vec![Arc::new(segment)],
                Vec::new(),
            ));
        }
        let mut segments = Vec::with_capacity(bases.len());
        let mut producer_batches = Vec::new();
        let last = bases.len() - 1;
        for (i, base) in bases.iter().enumerate() {
            let segment = Segment::open(&*storage, dir, *base)?;
            // Producer state comes from the batches scanned: the active segment whole, the tails
            // of sealed ones. A producer idle for longer starts afresh (any sequence is accepted).
            producer_batches.extend(if i == last {
                Self::recover_active(&segment, &config)?
            } else {
                Self::open_sealed(&*storage, &segment, &config)?
            });
            segments.push(Arc::new(segment));
        }
        // Segments must follow each other; a later one may start after a gap (left by a repair).
        for w in segments.windows(2) {
            let end = w[0].state().next_offset;
            if end > w[1].base_offset {
                return Err(Error::Corrupt {
                    path: w[1].log_path.clone(),
                    position: 0,
                    reason: format!(
                        "segment starts at offset {} but the previous one ends at {end}",
                        w[1].base_offset
                    ),
                });
            }
        }
        let start = Self::read_start(&*storage, dir)?;
        let partition = Self::assemble(storage, dir, topic, id, config, segments, producer_batches);
        // A start past the recovered end (data lost to a repair) is the end.
        let end = partition.log_end_offset();
        if start > end {
            tracing::warn!(dir = %dir.display(), start, end, "log start is past the log end; starting at the end");
        }
        partition.start.store(start.min(end), Ordering::Release);
        Ok(partition)
    }

    /// The log start stored by [`Partition::delete_records`]; 0 without one.
    fn read_start(storage: &dyn Storage, dir: &Path) -> Result<u64> {
        let path = dir.join(START_FILE);
        if !storage.exists(&path).ctx("check", &path)? {
            return Ok(0);
        }
        let bytes = crate::io::read_all(storage, &path).ctx("read log start", &path)?;
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Metadata {
                path,
                reason: "log start is not an offset".into(),
            })
    }

    /// Loads a sealed segment's indexes (rebuilding them when missing) and checks its tail.
    fn open_sealed(
        storage: &dyn Storage,
        segment: &Segment,
        config: &LogConfig,
    ) -> Result<Vec<ProducerBatch>> {
        let file_len = segment
            .file
            .len()
            .ctx("read the length of", &segment.log_path)?;
        let loaded = segment.load_indexes(storage, file_len);
        let rebuilt = loaded.is_none();
        let start = match loaded {
            Some((index, time)) => segment.state_at_last_entry(index, time),
            None => segment.state_at_last_entry(Vec::new(), Vec::new()),
        };
        let mut scan = segment.scan(start, config.index_interval_bytes)?;
        if let Some(stop) = scan.stop.take() {
            if !config.repair {
                return Err(Error::Corrupt {
                    path: segment.log_path.clone(),
                    position: stop.position,
                    reason: format!(
                        "{} (start with --repair to truncate the segment there)",
                        stop.reason
                    ),
                });
            }
            tracing::error!(
                segment = %segment.log_path.display(),
                position = stop.position,
                lost_bytes = scan.file_len - stop.position,
                reason = %stop.reason,
                "repair: truncating a corrupt sealed segment"
            );
            // Rebuild from the start so the indexes cover exactly what stays.
            let full = segment.scan(
                segment.state_at_last_entry(Vec::new(), Vec::new()),
                config.index_interval_bytes,
            )?;
            segment.truncate(full.state.size)?;
            segment.set_state(full.state);
            segment.write_indexes(storage)?;
            return Ok(full.producer_batches);
        }
        segment.set_state(scan.state);
        if rebuilt {
            segment.write_indexes(storage)?;
        }
        Ok(scan.producer_batches)
    }

    /// Scans the active segment, truncating a torn tail and refusing corruption before it.
    fn recover_active(segment: &Segment, config: &LogConfig) -> Result<Vec<ProducerBatch>> {
        let empty = segment.state_at_last_entry(Vec::new(), Vec::new());
        let scan = segment.scan(empty, config.index_interval_bytes)?;
        if let Some(stop) = &scan.stop
            && segment.zeros_from(stop.position)?
        {
            // Space allocated ahead of appends (see `LogConfig::preallocate_bytes`), or an append
            // torn before any of its bytes reached the disk.
            tracing::debug!(
                segment = %segment.log_path.display(),
                position = stop.position,
                "dropping the zeros after the last batch"
            );
        } else if let Some(stop) = &scan.stop {
            let follows = segment.valid_batch_after(stop.position, scan.state.next_offset)?;
            if let Some(valid_at) = follows {
                if !config.repair {
                    return Err(Error::Corrupt {
                        path: segment.log_path.clone(),
                        position: stop.position,
                        reason: format!(
                            "{}; valid batches follow at byte {valid_at}, so this is not a torn tail \
                             (start with --repair to truncate the segment there)",
                            stop.reason
                        ),
                    });
                }
                tracing::error!(
                    segment = %segment.log_path.display(),
                    position = stop.position,
                    lost_bytes = scan.file_len - stop.position,
                    reason = %stop.reason,
                    "repair: truncating corrupt data in the active segment"
                );
            } else {
                tracing::warn!(
                    segment = %segment.log_path.display(),
                    position = stop.position,
                    truncated_bytes = scan.file_len - stop.position,
                    reason = %stop.reason,
                    "truncating the torn tail of the log"
                );
            }
        }
        // The recovered tail is made durable before anything is served from it.
        segment.truncate(scan.state.size)?;
        segment.set_state(scan.state);
        Ok(scan.producer_batches)
    }

    /// Registers a function called with the new high watermark each time it advances.
    pub fn add_listener(&self, listener: Listener) {
        write_lock(&self.listeners).push(listener);
    }

    fn advance_high_watermark(&self, offset: u64) {
        let before = self.high_watermark.fetch_max(offset, Ordering::AcqRel);
        if offset > before {
            self.notify_listeners(offset);
        }
    }

    fn notify_listeners(&self, high_watermark: u64) {
        for l in read_lock(&self.listeners).iter() {
            l(high_watermark);
        }
    }

    fn poisoned_error(&self) -> Error {
        Error::Poisoned {
            topic: self.topic.clone(),
            partition: self.id,
        }
    }

    fn poison(&self, e: Error) -> Error {
        tracing::error!(topic = %self.topic, partition = self.id, error = %e, "partition poisoned");
        self.poisoned.store(true, Ordering::Release);
        // Taking the lock orders the flag before any waiter's next check, so no wakeup is lost.
        drop(lock(&self.sync));
        self.synced.notify_all();
        self.notify_listeners(self.high_watermark());
        e
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Appends one or more whole record batches, assigning offsets. Returns once the batches are
    /// durable under the fsync policy.
    pub fn append(
        &self,
        batches: &mut [u8],
        now_ms: i64,
        topic_config: &TopicConfig,
    ) -> Result<Appended> {
        let appended = self.append_unsynced(batches, now_ms, topic_config)?;
        self.wait_acknowledgeable(appended)?;
        Ok(appended)
    }

    /// Whether appends wait for their fsync before they are acknowledged (the `Batch` policy); under
    /// the relaxed policies they are acknowledgeable at once.
    pub fn acks_wait_for_fsync(&self) -> bool {
        self.config.fsync == FsyncPolicy::Batch
    }

    /// Waits until an append may be acknowledged under the fsync policy: under `Batch`, until it is
    /// durable; under the relaxed policies at once.
    pub fn wait_acknowledgeable(&self, appended: Appended) -> Result<()> {
        match self.config.fsync {
            FsyncPolicy::Batch => self.wait_durable(appended.last_offset + 1),
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => Ok(()),
        }
    }

    /// Writes batches and assigns their offsets without waiting for durability: front ends that
    /// pipeline requests write in order, then wait with [`Partition::wait_acknowledgeable`] before
    /// they acknowledge.
    pub fn append_unsynced(
        &self,
        batches: &mut [u8],
        now_ms: i64,
        topic_config: &TopicConfig,
    ) -> Result<Appended> {
        self.append_unsynced_at(batches, now_ms, topic_config, None)
    }

    /// As [`Partition::append_unsynced`], but only if the next offset is `at` (when given): a
    /// caller that decided on what the log held up to `at` appends nothing when another writer
    /// came first, and gets [`Error::NotAtOffset`] with the offset to try again from.
    pub fn append_unsynced_at(
        &self,
        batches: &mut [u8],
        now_ms: i64,
        topic_config: &TopicConfig,
        at: Option<u64>,
    ) -> Result<Appended> {
        if batches.len() as u64 > APPEND_BYTES_MAX {
            return Err(Error::BatchTooLarge {
                size: batches.len() as u64,
                max: APPEND_BYTES_MAX,
            });
        }
        let headers = batch::split(batches)?;
        if headers.is_empty() {
            return Err(Error::InvalidBatch(batch::BatchError::Invalid(
                "no record batch",
            )));
        }
        for (_, h) in &headers {
            if h.total_bytes() > topic_config.max_message_bytes {
                return Err(Error::BatchTooLarge {
                    size: h.total_bytes(),
                    max: topic_config.max_message_bytes,
                });
            }
        }
        let appended = {
            let mut w = lock(&self.writer);
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::UnknownTopic(self.topic.clone()));
            }
            if self.is_poisoned() {
                return Err(self.poisoned_error());
            }
            if let Some(at) = at
                && at != w.next_offset
            {
                return Err(Error::NotAtOffset {
                    expected: at,
                    next: w.next_offset,
                });
            }
            // Idempotent producers: a retried batch gets its original offsets; a gap is refused.
            for (_, h) in headers.iter().filter(|(_, h)| h.producer_id >= 0) {
                if let Verdict::Duplicate(b) = w.producers.check(h, &self.topic, self.id)? {
                    if headers.len() > 1 {
                        return Err(Error::InvalidBatch(batch::BatchError::Invalid(
                            "a retried idempotent batch must be sent alone",
                        )));
                    }
                    tracing::debug!(
                        producer_id = h.producer_id,
                        base_offset = b.base_offset,
                        "a retried idempotent batch is answered with its original offsets"
                    );
                    return Ok(Appended {
                        base_offset: b.base_offset,
                        last_offset: b.last_offset,
                    });
                }
            }
            let size = w.active.state().size;
            let too_big = size > 0 && size + batches.len() as u64 > topic_config.segment_bytes;
            let too_old = w.active_since_ms.is_some_and(|since| {
                now_ms.saturating_sub(since) >= topic_config.segment_ms as i64
            });
            let offsets_full = w.next_offset
                + headers.iter().map(|(_, h)| h.offset_count()).sum::<u64>()
                - w.active.base_offset
                > u64::from(u32::MAX);
            if size > 0 && (too_big || too_old || offsets_full) {
                self.roll(&mut w)?;
            }
            let base_offset = w.next_offset;
            let mut next = base_offset;
            for (at, h) in &headers {
                batch::set_base_offset(&mut batches[*at..], next as i64);
                next += h.offset_count();
            }
            let position = size_of_active(&w);
            let active = w.active.clone();
            let end = position + batches.len() as u64;
            let chunk = self.config.preallocate_bytes;
            if chunk > 0 && end > w.allocated {
                // Space up to the next whole chunk past the append, reading as zeros: the next
                // fsync makes it and the new length durable, and the fsyncs after it need not
                // commit a new length. Small appends get the space written with zeros: space only
                // reserved (fallocate) is marked unwritten, and every fsync of an append into it
                // also commits that extent's change to the file system's journal, a large part of
                // a small append's fsync; large appends cover the space at once and would pay
                // twice for the zeros.
                let to = end.div_ceil(chunk) * chunk;
                let zeros = (batches.len() as u64) < chunk / ZERO_FILL_APPEND_FRACTION;
                let result = if zeros {
                    active.file.write_zeros(w.allocated.max(end), to)
                } else {
                    active.file.allocate(to)
                };
                w.metadata_changes += 1;
                if zeros && result.is_ok() {
                    w.written = to;
                }
                if let Err(e) = result {
                    return Err(self.poison(Error::Io {
                        action: "extend segment",
                        path: active.log_path.clone(),
                        source: e,
                    }));
                }
                w.allocated = to;
            }
            if let Err(e) = active.file.write_all_at(batches, position) {
                return Err(self.poison(Error::Io {
                    action: "append to segment",
                    path: active.log_path.clone(),
                    source: e,
                }));
            }
            if end > w.written {
                // Past the written blocks: the file grew, or reserved space became written.
                w.metadata_changes += 1;
                w.written = end;
            }
            {
                let mut st = active.state_mut();
                let mut next = base_offset;
                for (at, h) in &headers {
                    let mut h = *h;
                    h.base_offset = next as i64;
                    st.add_batch(
                        active.base_offset,
                        &h,
                        position + *at as u64,
                        self.config.index_interval_bytes,
                    );
                    next += h.offset_count();
                }
                debug_assert_eq!(st.next_offset, next);
            }
            w.next_offset = next;
            w.active_since_ms.get_or_insert(now_ms);
            let mut offset = base_offset;
            for (_, h) in &headers {
                if h.producer_id >= 0 {
                    w.producers.record(ProducerBatch {
                        producer_id: h.producer_id,
                        epoch: h.producer_epoch,
                        first_sequence: h.base_sequence,
                        last_sequence: last_sequence(h),
                        base_offset: offset,
                        last_offset: offset + h.offset_count() - 1,
                    });
                }
                offset += h.offset_count();
            }
            Appended {
                base_offset,
                last_offset: next - 1,
            }
        };
        if self.config.fsync != FsyncPolicy::Batch {
            self.advance_high_watermark(appended.last_offset + 1);
        }
        self.metrics
            .records
            .increment(appended.last_offset + 1 - appended.base_offset);
        self.metrics.bytes.increment(batches.len() as u64);
        crate::stats::record_append(batches.len() as u64);
        Ok(appended)
    }

    /// Seals the active segment (sync, write its indexes) and starts a new one. Writer lock held.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        let old = w.active.clone();
        // A sealed segment ends with its last batch.
        let size = old.state().size;
        if w.allocated > size
            && let Err(e) = old.file.set_len(size)
        {
            return Err(self.poison(Error::Io {
                action: "trim segment",
                path: old.log_path.clone(),
                source: e,
            }));
        }
        let sync = self.config.fsync != FsyncPolicy::Never;
        if sync && let Err(e) = old.file.sync() {
            return Err(self.poison(Error::Io {
                action: "sync segment",
                path: old.log_path.clone(),
                source: e,
            }));
        }
        let new = old
            .write_indexes(&*self.storage)
            .and_then(|()| Segment::create(&*self.storage, &self.dir, w.next_offset))
            .and_then(|s| {
                self.storage
                    .sync_dir(&self.dir)
                    .ctx("sync partition directory", &self.dir)
                    .map(|()| s)
            })
            .map_err(|e| self.poison(e))?;
        let new = Arc::new(new);
        write_lock(&self.segments).push(new.clone());
        w.active = new;
        w.allocated = 0;
        w.written = 0;
        w.active_since_ms = None;
        if sync {
            // Everything before the new segment is durable now.
            let mut s = lock(&self.sync);
            s.durable_offset = s.durable_offset.max(w.next_offset);
            drop(s);
            if self.config.fsync == FsyncPolicy::Batch {
                self.advance_high_watermark(w.next_offset);
            }
            self.synced.notify_all();
        }
        Ok(())
    }

    /// Waits until everything below `offset` is durable, running the fsync if nobody else is.
    fn wait_durable(&self, offset: u64) -> Result<()> {
        let mut s = lock(&self.sync);
        loop {
            if self.is_poisoned() {
                return Err(self.poisoned_error());
            }
            if s.durable_offset >= offset {
                return Ok(());
            }
            if s.syncing {
                s = self.synced.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            s.syncing = true;
            drop(s);
            let t = self.ticket();
            let started = std::time::Instant::now();
            let result = t.file.sync();
            self.finish_sync(&t, true, result, started.elapsed())?;
            s = lock(&self.sync);
        }
    }

    /// What a sync starting now covers: everything written so far.
    fn ticket(&self) -> Ticket {
        let w = lock(&self.writer);
        Ticket {
            file: w.active.file.clone(),
            path: w.active.log_path.clone(),
            end: w.next_offset,
            metadata_changes: w.metadata_changes,
        }
    }

    /// Ends the sync of `t`: on success everything below its end is durable (and, after a `full`
    /// sync, the metadata changes it counted); a failure poisons the partition.
    fn finish_sync(
        &self,
        t: &Ticket,
        full: bool,
        result: std::io::Result<()>,
        took: std::time::Duration,
    ) -> Result<()> {
        self.metrics.fsync.record(took.as_secs_f64());
        crate::stats::record_fsync(took);
        let mut s = lock(&self.sync);
        s.syncing = false;
        match result {
            Ok(()) => {
                s.durable_offset = s.durable_offset.max(t.end);
                if full {
                    s.metadata_synced = s.metadata_synced.max(t.metadata_changes);
                }
                if self.config.fsync == FsyncPolicy::Batch {
                    self.advance_high_watermark(t.end);
                }
                self.synced.notify_all();
                Ok(())
            }
            Err(e) => {
                drop(s);
                Err(self.poison(Error::Io {
                    action: "sync segment",
                    path: t.path.clone(),
                    source: e,
                }))
            }
        }
    }

    /// Starts a sync of everything written so far for [`sync_together`]: `None` when it is
    /// durable already, or when another sync runs (`busy` is then set). The bool says whether
    /// it must be a full sync (metadata changes are pending).
    fn claim_sync(&self, busy: &mut bool) -> Option<(Ticket, bool)> {
        let t = self.ticket();
        let mut s = lock(&self.sync);
        if self.is_poisoned() || s.durable_offset >= t.end {
            return None;
        }
        if s.syncing {
            *busy = true;
            return None;
        }
        s.syncing = true;
        let full = t.metadata_changes > s.metadata_synced;
        Some((t, full))
    }

    /// Makes everything written so far durable (the interval flusher and shutdown use this).
    pub fn flush(&self) -> Result<()> {
        let end = lock(&self.writer).next_offset;
        self.wait_durable(end)
    }

    /// Stops accepting appends (the topic is being deleted or the log closed).
    pub(crate) fn close(&self) {
        let _w = lock(&self.writer);
        self.closed.store(true, Ordering::Release);
    }

    /// Whether the partition was closed (its topic deleted, or the log closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn high_watermark(&self) -> u64 {
        self.high_watermark.load(Ordering::Acquire)
    }

    /// The offset the next append gets: the end of the log, durable or not.
    pub fn log_end_offset(&self) -> u64 {
        lock(&self.writer).next_offset
    }

    fn snapshot(&self) -> Vec<Arc<Segment>> {
        read_lock(&self.segments).clone()
    }

    pub fn log_start_offset(&self) -> u64 {
        Self::start_of(&read_lock(&self.segments), &self.start)
    }

    /// The first readable offset: the first segment's base, or the start records were deleted
    /// to when that is later.
    fn start_of(segments: &[Arc<Segment>], start: &AtomicU64) -> u64 {
        segments[0].base_offset.max(start.load(Ordering::Acquire))
    }

    /// Deletes the records before `offset` (at most the high watermark), as Kafka's DeleteRecords:
    /// the log start moves there, durably, before this returns, and the segments holding only
    /// records before it are removed. Returns the log start, which stays where it is when it is
    /// already past `offset`.
    pub fn delete_records(&self, offset: u64) -> Result<u64> {
        let _moving = lock(&self.moving_start);
        let high_watermark = self.high_watermark();
        let current = self.log_start_offset();
        if offset > high_watermark {
            return Err(Error::OffsetOutOfRange {
                offset,
                log_start_offset: current,
                high_watermark,
            });
        }
        if offset <= current {
            return Ok(current);
        }
        if self.is_poisoned() {
            return Err(self.poisoned_error());
        }
        let path = self.dir.join(START_FILE);
        crate::io::write_atomically(&*self.storage, &path, offset.to_string().as_bytes())
            .ctx("write log start", &path)?;
        self.start.store(offset, Ordering::Release);
        self.delete_before(offset)?;
        Ok(offset)
    }

    pub fn info(&self) -> PartitionInfo {
        let segments = self.snapshot();
        PartitionInfo {
            log_start_offset: Self::start_of(&segments, &self.start),
            log_end_offset: self.high_watermark(),
            high_watermark: self.high_watermark(),
            size_bytes: segments.iter().map(|s| s.state().size).sum(),
            segments: segments.len() as u64,
        }
    }

    /// Reads whole record batches from the one holding `offset`, up to `max_bytes` (the first batch
    /// is returned whole even when larger). Empty at the high watermark.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<Vec<u8>> {
        let high_watermark = self.high_watermark();
        let segments = self.snapshot();
        let log_start_offset = Self::start_of(&segments, &self.start);
        if offset < log_start_offset || offset > high_watermark {
            return Err(Error::OffsetOutOfRange {
                offset,
                log_start_offset,
                high_watermark,
            });
        }
        let first = segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for segment in &segments[first..] {
            if segment.base_offset >= high_watermark {
                break;
            }
            let bytes = segment.read(offset, high_watermark, max_bytes)?;
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
        Ok(Vec::new())
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, with that record's
    /// timestamp; `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(u64, i64)>> {
        let high_watermark = self.high_watermark();
        let start = self.start.load(Ordering::Acquire);
        for segment in self.snapshot() {
            if segment.base_offset >= high_watermark {
                break;
            }
            if let Some((offset, ts)) =
                segment.offset_for_timestamp(timestamp_ms, high_watermark)?
            {
                // Deleted records are not found: the first one kept comes after them.
                if offset < start {
                    return Ok((start < high_watermark).then_some((start, ts)));
                }
                return Ok(Some((offset, ts)));
            }
        }
        Ok(None)
    }

    /// Deletes the sealed segments that hold only offsets below `offset`: a reader that keeps its
    /// own checkpoint of a log drops what the checkpoint covers. Returns how many were deleted.
    pub fn delete_before(&self, offset: u64) -> Result<usize> {
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = write_lock(&self.segments);
            let mut n = 0;
            while n + 1 < segments.len() && segments[n + 1].base_offset <= offset {
                n += 1;
            }
            segments.drain(..n).collect()
        };
        self.delete_segments(&doomed)
    }

    fn delete_segments(&self, doomed: &[Arc<Segment>]) -> Result<usize> {
        if doomed.is_empty() {
            return Ok(0);
        }
        for segment in doomed {
            tracing::info!(
                topic = %self.topic,
                partition = self.id,
                base_offset = segment.base_offset,
                "deleting segment"
            );
            segment.delete_files(&*self.storage)?;
        }
        self.storage
            .sync_dir(&self.dir)
            .ctx("sync partition directory", &self.dir)?;
        Ok(doomed.len())
    }

    /// Deletes sealed segments past the retention limits. Returns how many were deleted.
    pub fn apply_retention(&self, now_ms: i64, config: &TopicConfig) -> Result<usize> {
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = write_lock(&self.segments);
            let sealed = segments.len() - 1;
            let mut total: u64 = segments.iter().map(|s| s.state().size).sum();
            let mut n = 0;
            while n < sealed {
                let st = segments[n].state();
                let too_old = config
                    .retention_ms
                    .is_some_and(|ms| st.max_timestamp_ms < now_ms.saturating_sub(ms as i64));
                let too_big = config
                    .retention_bytes
                    .is_some_and(|max| total - st.size >= max);
                if !(too_old || too_big) {
                    break;
                }
                total -= st.size;
                n += 1;
            }
            segments.drain(..n).collect()
        };
        self.delete_segments(&doomed)
    }
}

/// Makes everything written to `partitions` so far durable, as [`Partition::flush`] on each
/// would, but with one flush of the device's write cache for all of them rather than one per
/// partition: the partitions' appends are written back to the device together
/// ([`crate::io::File::wait_writeback`]), then one full sync flushes the cache. A partition whose
/// segment changed its metadata since its last full sync (a longer file, newly written space, a
/// new segment) gets a full sync of its own, which flushes the cache too. Returns the first error;
/// a partition whose sync failed is poisoned.
pub fn sync_together(partitions: &[Arc<Partition>]) -> Result<()> {
    if let [p] = partitions {
        return p.flush();
    }
    let mut busy = Vec::new();
    let mut claims = Vec::new();
    for p in partitions {
        let mut is_busy = false;
        if let Some((t, full)) = p.claim_sync(&mut is_busy) {
            claims.push(Claim {
                p,
                domain: t.file.cache_domain(),
                t,
                full,
                result: None,
            });
        }
        if is_busy {
            busy.push(p);
        }
    }
    let started = std::time::Instant::now();
    // The writes of every partition go to the device side by side; the syncs below wait for them.
    let mut starts: Vec<_> = claims.iter().map(|c| c.t.file.start_writeback()).collect();
    // Partitions that can share a flush, by cache domain; the rest sync alone.
    let mut domains: Vec<u64> = claims.iter().filter_map(|c| c.domain).collect();
    domains.sort_unstable();
    domains.dedup();
    for d in domains {
        let members: Vec<usize> = (0..claims.len())
            .filter(|&i| claims[i].domain == Some(d))
            .collect();
        let shared: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| !claims[i].full)
            .collect();
        let mut flushers: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| claims[i].full)
            .collect();
        if shared.len() + flushers.len() < 2 || flushers.len() == members.len() {
            continue;
        }
        // The last one's full sync flushes the cache when nobody else's does.
        let shared = if flushers.is_empty() {
            let (&last, rest) = shared.split_last().expect("two members or more");
            claims[last].full = true;
            flushers.push(last);
            rest
        } else {
            &shared[..]
        };
        for &i in shared {
            let started = std::mem::replace(&mut starts[i], Ok(()));
            claims[i].result = Some(started.and_then(|()| claims[i].t.file.wait_writeback()));
        }
        // Each full sync starts after every writeback above ended, so its cache flush covers them.
        let mut flushed = false;
        for &i in &flushers {
            let r = claims[i].t.file.sync();
            flushed |= r.is_ok();
            claims[i].result = Some(r);
        }
        for &i in shared {
            if !flushed && let Some(Ok(())) = claims[i].result {
                claims[i].result = Some(Err(std::io::Error::other(
                    "the device's write cache was not flushed",
                )));
            }
        }
    }
    let mut first_error = None;
    for c in &mut claims {
        let result = match c.result.take() {
            Some(r) => r,
            None => {
                c.full = true;
                c.t.file.sync()
            }
        };
        if let Err(e) = c.p.finish_sync(&c.t, c.full, result, started.elapsed()) {
            first_error.get_or_insert(e);
        }
    }
    for p in busy {
        if let Err(e) = p.flush() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A partition's part in [`sync_together`].
struct Claim<'a> {
    p: &'a Arc<Partition>,
    t: Ticket,
    domain: Option<u64>,
    /// Whether the sync must be (or was) a full one.
    full: bool,
    result: Option<std::io::Result<()>>,
}

fn size_of_active(w: &Writer) -> u64 {
    w.active.state().size
}
