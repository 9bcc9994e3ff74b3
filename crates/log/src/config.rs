//! Configuration of the log and of its topics, with defaults and limits.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// When appended data is made durable, and so what an acknowledgement promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Group commit: an append returns once an fsync covering it has completed; appends that arrive
    /// while one fsync runs share the next one. Loss window: none for acknowledged writes.
    #[default]
    Batch,
    /// Appends return once written to the OS; a timer fsyncs every interval. Loss window on power
    /// failure or kernel crash: up to one interval of acknowledged writes (a process crash loses
    /// nothing, the OS still holds the data).
    Interval(Duration),
    /// Appends return once written to the OS, which flushes when it likes (typically within 30 s on
    /// Linux). Loss window on power failure: whatever the OS had not flushed.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("unknown fsync policy {s:?}: use batch, interval:<ms> or never")
                })?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("invalid fsync interval {ms:?}: expected milliseconds"))?;
                if ms == 0 || ms > 60_000 {
                    return Err("fsync interval must be within 1..=60000 ms".into());
                }
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Batch => f.write_str("batch"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// Partitions per topic: beyond this a topic's files and writers become a burden on one machine.
pub const PARTITIONS_MAX: u32 = 1024;
/// Kafka's limit on topic name length.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Segment size bounds: positions in the offset index are u32, so a segment stays below 4 GiB.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;
const _: () = assert!(SEGMENT_BYTES_MAX <= u32::MAX as u64);
/// The largest batch a topic may accept; a batch must fit in a segment with room to spare.
pub const MESSAGE_BYTES_MAX: u64 = 64 << 20;
const _: () = assert!(MESSAGE_BYTES_MAX < SEGMENT_BYTES_MAX);

/// A topic's configuration, stored in its `topic.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub partitions: u32,
    /// Sealed segments whose newest record is older than this are deleted; `None` keeps them.
    pub retention_ms: Option<u64>,
    /// Oldest sealed segments are deleted while the partition exceeds this; `None` for no limit.
    pub retention_bytes: Option<u64>,
    /// A segment is sealed and a new one started when an append would grow it past this.
    pub segment_bytes: u64,
    /// A segment is sealed when it is older than this at the next append.
    pub segment_ms: u64,
    /// The largest record batch the topic accepts.
    pub max_message_bytes: u64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            segment_bytes: 128 << 20,
            segment_ms: 7 * 24 * 3600 * 1000,
            max_message_bytes: (1 << 20) + 4096,
        }
    }
}

impl TopicConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if !(1..=PARTITIONS_MAX).contains(&self.partitions) {
            return bad(format!(
                "partitions must be within 1..={PARTITIONS_MAX}, got {}",
                self.partitions
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return bad(format!(
                "segment_bytes must be within {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}, got {}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be positive".into());
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > MESSAGE_BYTES_MAX {
            return bad(format!(
                "max_message_bytes must be within 1..={MESSAGE_BYTES_MAX}, got {}",
                self.max_message_bytes
            ));
        }
        if self.retention_ms == Some(0) {
            return bad("retention_ms must be positive or null".into());
        }
        if self.retention_bytes == Some(0) {
            return bad("retention_bytes must be positive or null".into());
        }
        if self.max_message_bytes > self.segment_bytes {
            return bad(format!(
                "max_message_bytes ({}) must not exceed segment_bytes ({})",
                self.max_message_bytes, self.segment_bytes
            ));
        }
        Ok(())
    }
}

/// Kafka's topic name rule: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidTopicName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return bad("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Settings of the whole log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub fsync: FsyncPolicy,
    /// An offset index entry is added every this many bytes of a segment.
    pub index_interval_bytes: u64,
    /// Truncate corruption found on open (losing the data after it) instead of refusing to open.
    pub repair: bool,
    /// The active segment's file is allocated this many bytes at a time ahead of the appends (0:
    /// not at all), reading as zeros. An fsync then writes data into space the file already has,
    /// without also committing a new file size, which makes the fsyncs of small appends cheaper.
    /// The space after the last batch is cut when the segment is sealed or the log opened.
    pub preallocate_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            fsync: FsyncPolicy::Batch,
            index_interval_bytes: 4096,
            repair: false,
            preallocate_bytes: 1 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policies_parse_and_print() {
        for s in ["batch", "never", "interval:250"] {
            assert_eq!(s.parse::<FsyncPolicy>().unwrap().to_string(), s);
        }
        assert!("interval:0".parse::<FsyncPolicy>().is_err());
        assert!("interval:x".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
    }

    #[test]
    fn topic_names_follow_kafkas_rule() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name(&"a".repeat(249)).is_ok());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
        for bad in ["", ".", "..", "a b", "a/b", "ü"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }
}
