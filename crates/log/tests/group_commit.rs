//! Syncing several partitions together ([`spate_log::sync_together`]): their appends share one
//! flush of the device's write cache, and a crash at any point of a round loses nothing that the
//! round made visible (below a partition's high watermark).

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use spate_log::mem::{MemStorage, Unsynced};
use spate_log::{Log, LogConfig, Partition, TopicConfig, sync_together};

const PARTITIONS: u32 = 4;

fn config() -> LogConfig {
    // Appends under 256 B get the space ahead written with zeros, larger ones only reserve it
    // (see `LogConfig::preallocate_bytes`): both kinds of metadata change happen often.
    LogConfig {
        preallocate_bytes: 4096,
        ..LogConfig::default()
    }
}

fn topic() -> TopicConfig {
    TopicConfig {
        partitions: PARTITIONS,
        segment_bytes: 8192,
        max_message_bytes: 8192,
        ..TopicConfig::default()
    }
}

fn partitions(log: &Log) -> Vec<Arc<Partition>> {
    log.topic("t").unwrap().partitions.clone()
}

/// Appends one batch of one record to `p`; returns its offset.
fn try_append(p: &Partition, value: &[u8]) -> spate_log::Result<u64> {
    let mut b = batch_of(&[value.to_vec()], 0);
    Ok(p.append_unsynced(&mut b, 0, &topic())?.base_offset)
}

fn append(p: &Partition, value: &[u8]) -> u64 {
    try_append(p, value).unwrap()
}

/// Moves what a partition made visible from `pending` to `acked`.
fn settle(ps: &[Arc<Partition>], pending: &mut [Vec<Record>], acked: &mut [Vec<Record>]) {
    for (i, p) in ps.iter().enumerate() {
        let hw = p.high_watermark();
        let (now, later) = pending[i].drain(..).partition(|(o, _)| *o < hw);
        acked[i].extend::<Vec<_>>(now);
        pending[i] = later;
    }
}

type Record = (u64, Vec<u8>);

fn assert_high_watermarks(ps: &[Arc<Partition>], hw: u64) {
    for p in ps {
        assert_eq!(p.high_watermark(), hw, "partition {}", p.id);
    }
}

/// A log whose topic got one append per partition, synced together; with the full syncs that
/// round made.
fn after_first_round(disk: &MemStorage) -> (Log, Vec<Arc<Partition>>, u64) {
    let log = open(disk, config()).unwrap();
    log.create_topic("t", topic(), 0).unwrap();
    let ps = partitions(&log);
    for p in &ps {
        append(p, b"first");
    }
    let before = disk.file_syncs();
    sync_together(&ps).unwrap();
    let syncs = disk.file_syncs() - before;
    for p in &ps {
        append(p, b"second");
    }
    (log, ps, syncs)
}

#[test]
fn small_appends_to_several_partitions_share_one_flush() {
    let disk = MemStorage::new();
    let (_log, ps, first_round) = after_first_round(&disk);
    // The first appends grew each segment file: every partition needed a full sync of its own.
    assert_eq!(first_round, u64::from(PARTITIONS));
    // Appends into space already written: one full sync flushes them all.
    let before = disk.file_syncs();
    sync_together(&ps).unwrap();
    assert_eq!(disk.file_syncs() - before, 1);
    assert_high_watermarks(&ps, 2);
    let after = open(&disk.restart(Unsynced::Drop), config()).unwrap();
    assert_high_watermarks(&partitions(&after), 2);
}

#[test]
fn a_crash_before_the_flush_keeps_the_round_invisible() {
    let disk = MemStorage::new();
    let (_log, ps, _) = after_first_round(&disk);
    // Three writebacks, then the flush: the crash takes the flush.
    disk.crash_at_sync(u64::from(PARTITIONS));
    assert!(sync_together(&ps).is_err());
    assert_high_watermarks(&ps, 1);
    // Written back but never flushed: gone, as from a disk's volatile cache.
    let after = open(&disk.restart(Unsynced::Drop), config()).unwrap();
    assert_high_watermarks(&partitions(&after), 1);
}

#[test]
fn a_failed_flush_fails_every_partition_that_waited_for_it() {
    let disk = MemStorage::new();
    let (_log, ps, _) = after_first_round(&disk);
    // Three writebacks, then the flush, which fails.
    disk.fail_sync_at(u64::from(PARTITIONS));
    assert!(sync_together(&ps).is_err());
    assert_high_watermarks(&ps, 1);
    for p in &ps {
        assert!(p.is_poisoned(), "partition {}", p.id);
    }
}

#[derive(Debug, Clone)]
struct Round {
    /// (partition, value size) of each append in the round.
    appends: Vec<(u32, usize)>,
    /// Crash at this sync point of the round (1-based), if any.
    crash_at: Option<u64>,
}

fn round() -> impl Strategy<Value = Round> {
    let size = prop_oneof![4 => 1usize..120, 1 => 200usize..3000];
    (
        proptest::collection::vec((0..PARTITIONS, size), 0..10),
        proptest::option::weighted(0.2, 1u64..8),
    )
        .prop_map(|(appends, crash_at)| Round { appends, crash_at })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Rounds of appends to random partitions (small and large, rolling segments), each made
    /// durable with `sync_together`, with a crash at a random sync point: whatever a round made
    /// visible survives the crash.
    #[test]
    fn nothing_made_visible_is_lost_in_a_crash(
        rounds in proptest::collection::vec(round(), 1..30),
        keep_prefix in any::<bool>(),
    ) {
        let disk = MemStorage::new();
        let log = open(&disk, config()).unwrap();
        log.create_topic("t", topic(), 0).unwrap();
        let ps = partitions(&log);
        // What each partition made visible: (offset, value).
        let mut acked: Vec<Vec<Record>> = vec![Vec::new(); PARTITIONS as usize];
        let mut pending: Vec<Vec<Record>> = vec![Vec::new(); PARTITIONS as usize];
        let mut counter = 0u32;
        'rounds: for r in rounds {
            if let Some(n) = r.crash_at {
                disk.crash_at_sync(n);
            }
            for (p, size) in r.appends {
                counter += 1;
                let mut value = counter.to_be_bytes().to_vec();
                value.resize(4 + size, (counter % 251) as u8);
                // An append that rolls a segment syncs the old one: the crash may come here.
                let appended = try_append(&ps[p as usize], &value);
                settle(&ps, &mut pending, &mut acked);
                match appended {
                    Ok(offset) => pending[p as usize].push((offset, value)),
                    Err(_) => {
                        prop_assert!(disk.crashed());
                        break 'rounds;
                    }
                }
            }
            let result = sync_together(&ps);
            settle(&ps, &mut pending, &mut acked);
            if disk.crashed() {
                prop_assert!(result.is_err());
                break 'rounds;
            }
            prop_assert!(result.is_ok(), "{:?}", result);
            prop_assert!(pending.iter().all(|p| p.is_empty()), "a round left appends behind");
        }
        let unsynced = if keep_prefix { Unsynced::KeepRandomPrefix(u64::from(counter)) } else { Unsynced::Drop };
        let after = open(&disk.restart(unsynced), config()).unwrap();
        for (i, want) in acked.iter().enumerate() {
            let got = read_partition(&after, "t", i as u32, 0);
            for (offset, value) in want {
                let found = got.iter().find(|(o, _)| o == offset).map(|(_, v)| v);
                prop_assert_eq!(found, Some(value), "partition {} offset {}", i, offset);
            }
        }
    }
}
