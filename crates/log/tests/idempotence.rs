//! Idempotent producers: a retried batch is not written twice, also after a crash and reopen; a
//! sequence gap and a fenced epoch are refused.

mod common;

use common::*;
use spate_log::batch::{NewRecord, encode_idempotent};
use spate_log::mem::{MemStorage, Unsynced};
use spate_log::{Error, LogConfig, TopicConfig};

fn batch(pid: i64, epoch: i16, seq: i32, n: usize) -> Vec<u8> {
    let records: Vec<NewRecord> = (0..n)
        .map(|i| NewRecord {
            timestamp_ms: 1,
            value: Some(vec![seq as u8, i as u8]),
            ..Default::default()
        })
        .collect();
    encode_idempotent(&records, pid, epoch, seq).unwrap()
}

#[test]
fn retried_batches_keep_their_offsets_across_a_crash() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = TopicConfig::default();
    log.create_topic("t", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let a = p.append(&mut batch(42, 0, 0, 3), 0, &config).unwrap();
    let b = p.append(&mut batch(42, 0, 3, 2), 0, &config).unwrap();
    p.append(&mut batch(7, 0, 0, 1), 0, &config).unwrap();
    // A retry of either batch gets the original offsets and writes nothing.
    assert_eq!(p.append(&mut batch(42, 0, 0, 3), 0, &config).unwrap(), a);
    assert_eq!(p.append(&mut batch(42, 0, 3, 2), 0, &config).unwrap(), b);
    assert_eq!(p.high_watermark(), 6);
    drop(log);

    // After a crash the state is rebuilt from the log: retries are still recognised.
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, LogConfig::default()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.append(&mut batch(42, 0, 3, 2), 0, &config).unwrap(), b);
    assert_eq!(p.high_watermark(), 6);
    // The next batch in sequence is appended; a gap is refused and changes nothing.
    let c = p.append(&mut batch(42, 0, 5, 1), 0, &config).unwrap();
    assert_eq!(c.base_offset, 6);
    match p.append(&mut batch(42, 0, 9, 1), 0, &config) {
        Err(Error::OutOfOrderSequence {
            expected: 6,
            got: 9,
            ..
        }) => {}
        other => panic!("expected an out-of-order error, got {other:?}"),
    }
    // A newer epoch fences the older one.
    p.append(&mut batch(42, 1, 0, 1), 0, &config).unwrap();
    assert!(matches!(
        p.append(&mut batch(42, 0, 6, 1), 0, &config),
        Err(Error::InvalidProducerEpoch {
            epoch: 0,
            current: 1,
            ..
        })
    ));
    assert_eq!(p.high_watermark(), 8);
    assert_eq!(read_all(&log, "t", 0).len(), 8);
}
