//! Helpers shared by the log's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use spate_log::batch::{self, NewRecord};
use spate_log::mem::MemStorage;
use spate_log::{Log, LogConfig, TopicConfig};

pub const DIR: &str = "/data";

/// One batch holding the given values, all with the given timestamp.
pub fn batch_of(values: &[Vec<u8>], timestamp_ms: i64) -> Vec<u8> {
    let records: Vec<NewRecord> = values
        .iter()
        .map(|v| NewRecord {
            timestamp_ms,
            key: None,
            value: Some(v.clone()),
            headers: vec![("h".into(), Some(b"x".to_vec()))],
        })
        .collect();
    batch::encode(&records).expect("non-empty")
}

pub fn open(disk: &MemStorage, config: LogConfig) -> spate_log::Result<Log> {
    Log::open(Arc::new(disk.clone()), Path::new(DIR), config)
}

pub fn small_topic() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        segment_bytes: 4096,
        max_message_bytes: 4096,
        ..TopicConfig::default()
    }
}

/// Every record of partition 0 from `from` to its high watermark, as (offset, value).
pub fn read_all(log: &Log, topic: &str, from: u64) -> Vec<(u64, Vec<u8>)> {
    read_partition(log, topic, 0, from)
}

/// Every record of a partition from `from` to its high watermark, as (offset, value).
pub fn read_partition(log: &Log, topic: &str, partition: u32, from: u64) -> Vec<(u64, Vec<u8>)> {
    let p = log
        .topic(topic)
        .unwrap()
        .partition(partition)
        .unwrap()
        .clone();
    let mut out = Vec::new();
    let mut offset = from;
    while offset < p.high_watermark() {
        let bytes = p.read(offset, 64 * 1024).unwrap();
        assert!(
            !bytes.is_empty(),
            "no batch at offset {offset} below the high watermark"
        );
        for (at, h) in batch::split(&bytes).unwrap() {
            for r in batch::decode(&bytes[at..at + h.total_bytes() as usize]).unwrap() {
                if r.offset as u64 >= offset {
                    out.push((r.offset as u64, r.value.unwrap()));
                }
            }
            offset = h.base_offset as u64 + h.offset_count();
        }
    }
    out
}
