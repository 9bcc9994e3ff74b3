//! Spate's storage engine.
//!
//! A [`Log`] is a data directory of topics; a topic has partitions; a [`Partition`] is a directory of
//! segments, each a file of Kafka v2 record batches with a sparse offset index and a time index. The
//! engine is synchronous and knows nothing of sockets or async runtimes: callers run appends (which
//! block until durable under the fsync policy) on threads of their choosing. All file IO goes through
//! [`io::Storage`], so tests can run it on [`mem::MemStorage`] and crash it at any sync point.
//!
//! The byte layouts and recovery rules are written down in `docs/storage.md`.

pub mod batch;
pub mod config;
mod error;
pub mod io;
pub mod mem;
mod partition;
pub mod producers;
mod segment;
pub mod stats;
mod topics;

pub use config::{FsyncPolicy, LogConfig, TopicConfig};
pub use error::{Error, Result};
pub use partition::{
    APPEND_BYTES_MAX, Appended, Listener, Partition, PartitionInfo, sync_together,
};
pub use topics::{Log, Topic};
