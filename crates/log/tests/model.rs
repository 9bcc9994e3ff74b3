//! Random sequences of appends, rolls, retention, reopens, crashes and reads agree with a simple
//! in-memory model of the log: a vector of records, of which retention removes a prefix.

mod common;

use common::*;
use proptest::prelude::*;
use spate_log::batch;
use spate_log::mem::{MemStorage, Unsynced};
use spate_log::{LogConfig, TopicConfig};

#[derive(Debug, Clone)]
enum Op {
    /// Append one batch of records with these value sizes, at the current clock.
    Append(Vec<usize>),
    /// Move the clock forward (rolls segments by age at the next append).
    Tick(i64),
    Retention {
        ms: Option<u64>,
        bytes: Option<u64>,
    },
    /// Delete the segments wholly before the record at this index.
    DeleteBefore(prop::sample::Index),
    Reopen,
    Crash(u64),
    Read {
        at: prop::sample::Index,
        max_bytes: u64,
    },
    ReadByTime(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(0usize..600, 1..8).prop_map(Op::Append),
        1 => (1i64..5000).prop_map(Op::Tick),
        1 => (proptest::option::of(1u64..20_000), proptest::option::of(2000u64..20_000))
            .prop_map(|(ms, bytes)| Op::Retention { ms, bytes }),
        1 => any::<prop::sample::Index>().prop_map(Op::DeleteBefore),
        1 => Just(Op::Reopen),
        1 => any::<u64>().prop_map(Op::Crash),
        2 => (any::<prop::sample::Index>(), 1u64..6000).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => any::<prop::sample::Index>().prop_map(Op::ReadByTime),
    ]
}

struct Model {
    /// (offset, timestamp, value) of every retained record, in offset order.
    records: Vec<(u64, i64, Vec<u8>)>,
    next_offset: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn log_agrees_with_a_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut disk = MemStorage::new();
        let mut log = open(&disk, LogConfig::default()).unwrap();
        let mut config = TopicConfig { segment_ms: 3000, ..small_topic() };
        log.create_topic("t", config, 0).unwrap();
        let mut model = Model { records: Vec::new(), next_offset: 0 };
        let mut now: i64 = 1_000_000;
        let mut counter = 0u32;
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let values: Vec<Vec<u8>> = sizes
                        .iter()
                        .map(|n| {
                            counter += 1;
                            let mut v = counter.to_be_bytes().to_vec();
                            v.resize(4 + n, (counter % 251) as u8);
                            v
                        })
                        .collect();
                    // Timestamps wander around the clock so time lookups see disorder too.
                    let ts = now - (counter as i64 % 7) * 100;
                    let mut b = batch_of(&values, ts);
                    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                    let appended = p.append(&mut b, now, &config).unwrap();
                    prop_assert_eq!(appended.base_offset, model.next_offset);
                    for v in values {
                        model.records.push((model.next_offset, ts, v));
                        model.next_offset += 1;
                    }
                    prop_assert_eq!(appended.last_offset + 1, model.next_offset);
                }
                Op::Tick(ms) => now += ms,
                Op::Retention { ms, bytes } => {
                    config.retention_ms = ms;
                    config.retention_bytes = bytes;
                    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                    p.apply_retention(now, &config).unwrap();
                    let start = p.log_start_offset();
                    let info = p.info();
                    // Only whole prefixes go, and only records past the age limit.
                    for (offset, ts, _) in model.records.iter().filter(|r| r.0 < start) {
                        if bytes.is_none() {
                            let ms = ms.expect("something was deleted, so a limit was set");
                            prop_assert!(*ts < now - ms as i64, "offset {} deleted too early", offset);
                        }
                    }
                    if let Some(max) = bytes && ms.is_none() {
                        prop_assert!(info.segments == 1 || info.size_bytes <= max + config.segment_bytes + 4096,
                            "size {} left above the limit {}", info.size_bytes, max);
                    }
                    model.records.retain(|r| r.0 >= start);
                }
                Op::DeleteBefore(at) => {
                    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                    let before = if model.records.is_empty() {
                        model.next_offset
                    } else {
                        model.records[at.index(model.records.len())].0
                    };
                    let old_start = p.log_start_offset();
                    p.delete_before(before).unwrap();
                    let start = p.log_start_offset();
                    // Whole segments before the offset go; nothing at or after it.
                    prop_assert!(start <= before.max(old_start), "start {} past {}", start, before);
                    model.records.retain(|r| r.0 >= start);
                }
                Op::Reopen => {
                    drop(log);
                    log = open(&disk, LogConfig::default()).unwrap();
                }
                Op::Crash(seed) => {
                    drop(log);
                    disk = disk.restart(Unsynced::KeepRandomPrefix(seed));
                    log = open(&disk, LogConfig::default()).unwrap();
                }
                Op::Read { at, max_bytes } => {
                    if model.records.is_empty() { continue; }
                    let first = &model.records[at.index(model.records.len())];
                    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                    let bytes = p.read(first.0, max_bytes).unwrap();
                    prop_assert!(!bytes.is_empty());
                    let mut got = Vec::new();
                    for (i, (pos, h)) in batch::split(&bytes).unwrap().into_iter().enumerate() {
                        prop_assert!(i == 0 || pos as u64 + h.total_bytes() <= max_bytes, "read past max_bytes");
                        for r in batch::decode(&bytes[pos..pos + h.total_bytes() as usize]).unwrap() {
                            got.push((r.offset as u64, r.timestamp_ms, r.value.unwrap()));
                        }
                    }
                    let from = model.records.iter().position(|r| r.0 == got[0].0).expect("first record is retained");
                    prop_assert!(got[0].0 <= first.0 && got.last().unwrap().0 >= first.0);
                    prop_assert_eq!(&got[..], &model.records[from..from + got.len()]);
                }
                Op::ReadByTime(at) => {
                    if model.records.is_empty() { continue; }
                    let t = model.records[at.index(model.records.len())].1 + 50;
                    let expected = model.records.iter().find(|r| r.1 >= t).map(|r| r.0);
                    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                    prop_assert_eq!(p.offset_for_timestamp(t).unwrap().map(|(o, _)| o), expected);
                }
            }
            // After every step the whole retained log reads back as the model says.
            let p = log.topic("t").unwrap().partition(0).unwrap().clone();
            prop_assert_eq!(p.high_watermark(), model.next_offset);
            let start = p.log_start_offset();
            prop_assert_eq!(model.records.first().map_or(model.next_offset, |r| r.0), start);
            let all = read_all(&log, "t", start);
            let expected: Vec<(u64, Vec<u8>)> = model.records.iter().map(|r| (r.0, r.2.clone())).collect();
            prop_assert_eq!(all, expected);
        }
    }
}
