//! A segment: one `.log` file of record batches with a sparse offset index and a time index.
//!
//! Files are named by the segment's base offset, zero-padded to 20 digits: `00000000000000000042.log`,
//! `.index` and `.timeindex` beside it. The active (last) segment keeps its indexes in memory only; they
//! are rebuilt by scanning it on open. When a segment is sealed its indexes are written next to it
//! (temp file, fsync, rename), so opening a large log reads only the small index files and the tail of
//! each sealed segment after its last index entry. See `docs/storage.md` for the byte layouts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::batch::{self, BatchHeader, HEADER_BYTES};
use crate::error::{Error, IoContext, Result};
use crate::io::{File, Storage, write_atomically};
use crate::producers::{ProducerBatch, last_sequence};

/// One offset index entry: the batch whose base offset is `base_offset + relative_offset` starts at
/// byte `position` of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// One time index entry: every batch up to and including the one at `relative_offset` holds only
/// timestamps at or below `timestamp_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp_ms: i64,
    pub relative_offset: u32,
}

const INDEX_ENTRY_BYTES: usize = 8;
const TIME_ENTRY_BYTES: usize = 12;
/// Reads during scans are done in chunks of this size.
const SCAN_CHUNK_BYTES: usize = 1 << 20;
/// Bytes read at a time while walking batch headers to the one a read starts with.
const HEADER_WINDOW_BYTES: u64 = 8 << 10;

#[derive(Debug, Clone)]
pub(crate) struct SegmentState {
    /// Bytes of complete batches in the file.
    pub size: u64,
    /// The offset after the last batch.
    pub next_offset: u64,
    /// The largest record timestamp in the segment (`i64::MIN` when empty).
    pub max_timestamp_ms: i64,
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeEntry>,
    bytes_since_index: u64,
}

impl SegmentState {
    fn empty(base_offset: u64) -> Self {
        SegmentState {
            size: 0,
            next_offset: base_offset,
            max_timestamp_ms: i64::MIN,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
        }
    }

    /// Accounts for a batch appended at `position`.
    pub fn add_batch(
        &mut self,
        base_offset: u64,
        h: &BatchHeader,
        position: u64,
        index_interval_bytes: u64,
    ) {
        let relative_offset =
            u32::try_from(h.base_offset as u64 - base_offset).expect("segment offsets fit in u32");
        let position_u32 = u32::try_from(position).expect("segment positions fit in u32");
        let first = self.index.is_empty();
        if first || self.bytes_since_index >= index_interval_bytes {
            self.index.push(IndexEntry {
                relative_offset,
                position: position_u32,
            });
            self.bytes_since_index = 0;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(h.max_timestamp);
        // Record the new maximum timestamp with the batch that reached it (at most once per index
        // interval, plus whenever the maximum grows at the first batch).
        let grew = self
            .time_index
            .last()
            .is_none_or(|t| self.max_timestamp_ms > t.timestamp_ms);
        if grew && (first || self.bytes_since_index == 0) {
            self.time_index.push(TimeEntry {
                timestamp_ms: self.max_timestamp_ms,
                relative_offset,
            });
        }
        self.bytes_since_index += h.total_bytes();
        self.size = position + h.total_bytes();
        self.next_offset = h.base_offset as u64 + h.offset_count();
    }

    /// The index entry at or before a relative offset.
    fn floor(&self, relative_offset: u64) -> (u64, u64) {
        let i = self
            .index
            .partition_point(|e| u64::from(e.relative_offset) <= relative_offset);
        match i {
            0 => (0, 0),
            _ => {
                let e = self.index[i - 1];
                (u64::from(e.relative_offset), u64::from(e.position))
            }
        }
    }
}

pub(crate) struct Segment {
    pub base_offset: u64,
    pub log_path: PathBuf,
    pub file: Arc<dyn File>,
    state: RwLock<SegmentState>,
}

/// Where and why a scan stopped before the end of the file.
#[derive(Debug)]
pub(crate) struct Stop {
    pub position: u64,
    pub reason: String,
}

/// What scanning a segment found.
pub(crate) struct Scan {
    pub state: SegmentState,
    pub stop: Option<Stop>,
    pub file_len: u64,
    /// Batches of idempotent producers, in log order, to rebuild their state.
    pub producer_batches: Vec<ProducerBatch>,
}

/// Buffered positional reads over a file, for scans.
struct ChunkReader<'a> {
    file: &'a dyn File,
    len: u64,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> ChunkReader<'a> {
    fn new(file: &'a dyn File, len: u64) -> Self {
        ChunkReader {
            file,
            len,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// The bytes `[position, position + n)`, or `None` when the file is shorter.
    fn get(&mut self, position: u64, n: usize) -> std::io::Result<Option<&[u8]>> {
        let end = position + n as u64;
        if end > self.len {
            return Ok(None);
        }
        let buffered = position >= self.start && end <= self.start + self.buf.len() as u64;
        if !buffered {
            let want = (n.max(SCAN_CHUNK_BYTES) as u64).min(self.len - position) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, position)?;
            self.start = position;
        }
        let at = (position - self.start) as usize;
        Ok(Some(&self.buf[at..at + n]))
    }
}

pub(crate) fn file_name(base_offset: u64, ext: &str) -> String {
    format!("{base_offset:020}.{ext}")
}

impl Segment {
    pub fn state(&self) -> RwLockReadGuard<'_, SegmentState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state_mut(&self) -> RwLockWriteGuard<'_, SegmentState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn index_path(&self, ext: &str) -> PathBuf {
        self.log_path
            .with_file_name(file_name(self.base_offset, ext))
    }

    /// Creates an empty segment file. The caller syncs the directory.
    pub fn create(storage: &dyn Storage, dir: &Path, base_offset: u64) -> Result<Segment> {
        let log_path = dir.join(file_name(base_offset, "log"));
        let file = storage
            .open_file(&log_path, true)
            .ctx("create segment", &log_path)?;
        Ok(Segment {
            base_offset,
            log_path,
            file,
            state: RwLock::new(SegmentState::empty(base_offset)),
        })
    }

    /// Opens an existing segment file and scans it from `from` (a position and the state up to it).
    pub fn open(storage: &dyn Storage, dir: &Path, base_offset: u64) -> Result<Segment> {
        let log_path = dir.join(file_name(base_offset, "log"));
        let file = storage
            .open_file(&log_path, false)
            .ctx("open segment", &log_path)?;
        Ok(Segment {
            base_offset,
            log_path,
            file,
            state: RwLock::new(SegmentState::empty(base_offset)),
        })
    }

    pub fn set_state(&self, state: SegmentState) {
        *self.state_mut() = state;
    }

    /// Scans batches from a known-good starting state to the end of the file, checking each batch's
    /// structure, CRC and offset continuity. Stops at the first problem.
    pub fn scan(&self, from: SegmentState, index_interval_bytes: u64) -> Result<Scan> {
        let file_len = self.file.len().ctx("read the length of", &self.log_path)?;
        let mut state = from;
        let mut reader = ChunkReader::new(&*self.file, file_len);
        let mut position = state.size;
        let mut producer_batches = Vec::new();
        let stop = loop {
            if position == file_len {
                break None;
            }
            let header = match reader
                .get(position, HEADER_BYTES)
                .ctx("read", &self.log_path)?
            {
                None => {
                    break Some(Stop {
                        position,
                        reason: format!(
                            "{} trailing bytes are shorter than a batch header",
                            file_len - position
                        ),
                    });
                }
                Some(b) => BatchHeader::parse(b),
            };
            let h = match header {
                Ok(h) => h,
                Err(e) => {
                    break Some(Stop {
                        position,
                        reason: e.to_string(),
                    });
                }
            };
            if h.base_offset < 0 || h.base_offset as u64 != state.next_offset {
                break Some(Stop {
                    position,
                    reason: format!(
                        "batch has base offset {}, expected {}",
                        h.base_offset, state.next_offset
                    ),
                });
            }
            let total = h.total_bytes();
            if total > (file_len - position) {
                break Some(Stop {
                    position,
                    reason: format!("batch of {total} bytes runs past the end of the file"),
                });
            }
            let bytes = reader
                .get(position, total as usize)
                .ctx("read", &self.log_path)?
                .expect("length checked above");
            if let Err(e) = batch::check(bytes) {
                break Some(Stop {
                    position,
                    reason: e.to_string(),
                });
            }
            if state.next_offset + h.offset_count() - self.base_offset > u64::from(u32::MAX) {
                break Some(Stop {
                    position,
                    reason: "batch offsets exceed the segment's range".into(),
                });
            }
            state.add_batch(self.base_offset, &h, position, index_interval_bytes);
            if h.producer_id >= 0 {
                producer_batches.push(ProducerBatch {
                    producer_id: h.producer_id,
                    epoch: h.producer_epoch,
                    first_sequence: h.base_sequence,
                    last_sequence: last_sequence(&h),
                    base_offset: h.base_offset as u64,
                    last_offset: h.base_offset as u64 + h.last_offset_delta as u64,
                });
            }
            position += total;
        };
        Ok(Scan {
            state,
            stop,
            file_len,
            producer_batches,
        })
    }

    /// Whether a valid batch with an offset at or after `min_offset` starts anywhere after `from`:
    /// this tells corruption in the middle of a segment (valid data follows) from a torn tail.
    pub fn valid_batch_after(&self, from: u64, min_offset: u64) -> Result<Option<u64>> {
        let file_len = self.file.len().ctx("read the length of", &self.log_path)?;
        let mut reader = ChunkReader::new(&*self.file, file_len);
        let mut position = from + 1;
        while position + HEADER_BYTES as u64 <= file_len {
            let b = reader
                .get(position, HEADER_BYTES)
                .ctx("read", &self.log_path)?
                .expect("length checked by the loop");
            if let Ok(h) = BatchHeader::parse(b)
                && h.base_offset >= 0
                && h.base_offset as u64 >= min_offset
                && h.base_offset as u64 - min_offset <= file_len
                && h.total_bytes() <= file_len - position
            {
                let bytes = reader
                    .get(position, h.total_bytes() as usize)
                    .ctx("read", &self.log_path)?
                    .expect("length checked above");
                if batch::check(bytes).is_ok() {
                    return Ok(Some(position));
                }
            }
            position += 1;
        }
        Ok(None)
    }

    /// Whether the file holds only zeros from `from` to its end (space allocated ahead of appends).
    pub fn zeros_from(&self, from: u64) -> Result<bool> {
        let file_len = self.file.len().ctx("read the length of", &self.log_path)?;
        let mut buf = vec![0u8; 64 << 10];
        let mut position = from;
        while position < file_len {
            let n = (file_len - position).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], position)
                .ctx("read segment", &self.log_path)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            position += n as u64;
        }
        Ok(true)
    }

    /// Truncates the file to `size` bytes and makes that durable.
    pub fn truncate(&self, size: u64) -> Result<()> {
        self.file
            .set_len(size)
            .ctx("truncate segment", &self.log_path)?;
        self.file.sync().ctx("sync segment", &self.log_path)
    }

    /// Loads the index files of a sealed segment; `None` when they are missing or inconsistent.
    pub fn load_indexes(
        &self,
        storage: &dyn Storage,
        file_len: u64,
    ) -> Option<(Vec<IndexEntry>, Vec<TimeEntry>)> {
        let index = crate::io::read_all(storage, &self.index_path("index")).ok()?;
        let time = crate::io::read_all(storage, &self.index_path("timeindex")).ok()?;
        if index.len() % INDEX_ENTRY_BYTES != 0 || time.len() % TIME_ENTRY_BYTES != 0 {
            return None;
        }
        let index: Vec<IndexEntry> = index
            .chunks_exact(INDEX_ENTRY_BYTES)
            .map(|c| IndexEntry {
                relative_offset: u32::from_be_bytes(c[0..4].try_into().expect("4 bytes")),
                position: u32::from_be_bytes(c[4..8].try_into().expect("4 bytes")),
            })
            .collect();
        let time: Vec<TimeEntry> = time
            .chunks_exact(TIME_ENTRY_BYTES)
            .map(|c| TimeEntry {
                timestamp_ms: i64::from_be_bytes(c[0..8].try_into().expect("8 bytes")),
                relative_offset: u32::from_be_bytes(c[8..12].try_into().expect("4 bytes")),
            })
            .collect();
        let ordered = index
            .windows(2)
            .all(|w| w[0].relative_offset < w[1].relative_offset && w[0].position < w[1].position);
        let time_ordered = time.windows(2).all(|w| {
            w[0].relative_offset <= w[1].relative_offset && w[0].timestamp_ms < w[1].timestamp_ms
        });
        let in_file = index
            .last()
            .is_none_or(|e| u64::from(e.position) < file_len);
        let starts_at_zero = index
            .first()
            .is_none_or(|e| e.position == 0 && e.relative_offset == 0);
        (ordered && time_ordered && in_file && starts_at_zero).then_some((index, time))
    }

    /// Writes the index files of this (now sealed) segment.
    pub fn write_indexes(&self, storage: &dyn Storage) -> Result<()> {
        let state = self.state().clone();
        let mut index = Vec::with_capacity(state.index.len() * INDEX_ENTRY_BYTES);
        for e in &state.index {
            index.extend_from_slice(&e.relative_offset.to_be_bytes());
            index.extend_from_slice(&e.position.to_be_bytes());
        }
        let mut time = Vec::with_capacity(state.time_index.len() * TIME_ENTRY_BYTES);
        for e in &state.time_index {
            time.extend_from_slice(&e.timestamp_ms.to_be_bytes());
            time.extend_from_slice(&e.relative_offset.to_be_bytes());
        }
        let path = self.index_path("index");
        write_atomically(storage, &path, &index).ctx("write index", &path)?;
        let path = self.index_path("timeindex");
        write_atomically(storage, &path, &time).ctx("write time index", &path)
    }

    /// The state up to the last index entry of loaded indexes: where a tail scan starts.
    pub fn state_at_last_entry(
        &self,
        index: Vec<IndexEntry>,
        time_index: Vec<TimeEntry>,
    ) -> SegmentState {
        let mut s = SegmentState::empty(self.base_offset);
        if let Some(last) = index.last().copied() {
            s.size = u64::from(last.position);
            s.next_offset = self.base_offset + u64::from(last.relative_offset);
            // The batch at the last entry is rescanned and re-adds that entry.
            s.index = index[..index.len() - 1].to_vec();
            s.time_index = time_index
                .into_iter()
                .filter(|t| t.relative_offset < last.relative_offset)
                .collect();
            s.max_timestamp_ms = s.time_index.last().map_or(i64::MIN, |t| t.timestamp_ms);
            // Force the rescanned batch to get an index entry.
            s.bytes_since_index = u64::MAX / 2;
        }
        s
    }

    /// Deletes the segment's files (the log first, so a crash leaves at worst orphan indexes).
    pub fn delete_files(&self, storage: &dyn Storage) -> Result<()> {
        storage
            .remove_file(&self.log_path)
            .ctx("delete segment", &self.log_path)?;
        for ext in ["index", "timeindex"] {
            let p = self.index_path(ext);
            if storage.exists(&p).ctx("check", &p)? {
                storage.remove_file(&p).ctx("delete index", &p)?;
            }
        }
        Ok(())
    }

    /// Reads whole batches starting with the one that holds `offset`, stopping before `limit_offset`,
    /// at most `max_bytes` (but always the first batch whole). Every batch's CRC is checked.
    /// Returns empty when the segment has no batch at or after `offset` below `limit_offset`.
    pub fn read(&self, offset: u64, limit_offset: u64, max_bytes: u64) -> Result<Vec<u8>> {
        let (mut position, size) = {
            let st = self.state();
            let (_, position) = st.floor(offset.saturating_sub(self.base_offset));
            (position, st.size)
        };
        let corrupt = |position: u64, reason: String| Error::Corrupt {
            path: self.log_path.clone(),
            position,
            reason,
        };
        // Find the batch that holds `offset` by walking headers from the index entry, reading
        // the file a window at a time rather than a header at a time (index entries are
        // `index_interval_bytes` apart, so a walk passes several small batches).
        let mut window = Vec::new();
        let mut window_at = position;
        let first = loop {
            if position + HEADER_BYTES as u64 > size {
                return Ok(Vec::new());
            }
            if position + HEADER_BYTES as u64 > window_at + window.len() as u64 {
                let n = (size - position).min(HEADER_WINDOW_BYTES);
                window.clear();
                self.file
                    .read_exact_appending(&mut window, n as usize, position)
                    .ctx("read segment", &self.log_path)?;
                window_at = position;
            }
            let h = BatchHeader::parse(&window[(position - window_at) as usize..])
                .map_err(|e| corrupt(position, e.to_string()))?;
            if h.base_offset as u64 >= limit_offset {
                return Ok(Vec::new());
            }
            if h.base_offset as u64 + h.offset_count() > offset {
                break h;
            }
            position += h.total_bytes();
        };
        let want = max_bytes.max(first.total_bytes()).min(size - position);
        let mut buf = Vec::new();
        let from = (position - window_at) as usize;
        if let Some(held) = window.get(from..from + want as usize) {
            // Small reads are in the window already.
            buf.extend_from_slice(held);
        } else {
            self.file
                .read_exact_appending(&mut buf, want as usize, position)
                .ctx("read segment", &self.log_path)?;
        }
        let mut end = 0usize;
        while end + HEADER_BYTES <= buf.len() {
            let h = BatchHeader::parse(&buf[end..])
                .map_err(|e| corrupt(position + end as u64, e.to_string()))?;
            let total = h.total_bytes() as usize;
            if h.base_offset as u64 >= limit_offset || end + total > buf.len() {
                break;
            }
            batch::check(&buf[end..end + total])
                .map_err(|e| corrupt(position + end as u64, e.to_string()))?;
            end += total;
        }
        buf.truncate(end);
        Ok(buf)
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, below `limit_offset`,
    /// with that record's timestamp.
    pub fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
        limit_offset: u64,
    ) -> Result<Option<(u64, i64)>> {
        let start_offset = {
            let st = self.state();
            if st.max_timestamp_ms < timestamp_ms {
                return Ok(None);
            }
            let i = st
                .time_index
                .partition_point(|t| t.timestamp_ms < timestamp_ms);
            match i {
                0 => self.base_offset,
                _ => self.base_offset + u64::from(st.time_index[i - 1].relative_offset),
            }
        };
        let mut offset = start_offset;
        loop {
            let bytes = self.read(offset, limit_offset, 1 << 20)?;
            if bytes.is_empty() {
                return Ok(None);
            }
            for (at, h) in batch::split(&bytes).map_err(|e| Error::Corrupt {
                path: self.log_path.clone(),
                position: 0,
                reason: e.to_string(),
            })? {
                if h.max_timestamp >= timestamp_ms {
                    let whole = &bytes[at..at + h.total_bytes() as usize];
                    return Ok(Some(match batch::decode(whole) {
                        Ok(records) => records
                            .iter()
                            .find(|r| r.timestamp_ms >= timestamp_ms)
                            .map_or((h.base_offset as u64, h.max_timestamp), |r| {
                                (r.offset as u64, r.timestamp_ms)
                            }),
                        // Compressed batches are not decoded here: the batch is the answer.
                        Err(_) => (h.base_offset as u64, h.max_timestamp),
                    }));
                }
                offset = h.base_offset as u64 + h.offset_count();
            }
        }
    }
}
