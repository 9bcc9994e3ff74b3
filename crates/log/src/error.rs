//! Errors of the log engine.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::batch::BatchError;

#[derive(Debug, Error)]
pub enum Error {
    #[error("failed to {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A sync failed earlier; the partition refuses writes until the process restarts and recovers.
    #[error(
        "partition {topic}/{partition} refuses writes after a failed fsync; restart to recover"
    )]
    Poisoned { topic: String, partition: u32 },
    /// Stored bytes fail their checks somewhere other than a torn tail.
    #[error("corrupt data in segment {} at byte {position}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("record batch of {size} bytes exceeds the limit of {max} bytes")]
    BatchTooLarge { size: u64, max: u64 },
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic} does not exist")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    #[error("invalid topic config: {0}")]
    InvalidConfig(String),
    #[error("the log moved on: the next offset is {next}, not {expected}")]
    NotAtOffset { expected: u64, next: u64 },
    #[error("offset {offset} is out of range [{log_start_offset}, {high_watermark}]")]
    OffsetOutOfRange {
        offset: u64,
        log_start_offset: u64,
        high_watermark: u64,
    },
    #[error(
        "producer {producer_id} sent sequence {got} to {topic}/{partition}, expected {expected}: a batch is missing"
    )]
    OutOfOrderSequence {
        topic: String,
        partition: u32,
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {producer_id} epoch {epoch} is fenced by epoch {current}")]
    InvalidProducerEpoch {
        producer_id: i64,
        epoch: i16,
        current: i16,
    },
    #[error("corrupt metadata file {}: {reason}", path.display())]
    Metadata { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the action and path to an IO error.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}
