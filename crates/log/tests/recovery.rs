//! Recovery: torn tails are truncated, corruption elsewhere is refused, crashes at any sync point
//! lose nothing acknowledged, and a failed fsync poisons the partition.

mod common;

use std::path::Path;

use common::*;
use spate_log::mem::{MemStorage, Unsynced};
use spate_log::{Error, LogConfig, TopicConfig};

const SEGMENT: &str = "/data/topics/t/0/00000000000000000000.log";

fn values(n: usize, tag: u8) -> Vec<Vec<u8>> {
    (0..n).map(|i| vec![tag, i as u8, 7, 7, 7]).collect()
}

/// Appends `batches` batches of three records to a fresh log; returns the disk and the byte
/// position where each batch ends.
fn log_with_batches(batches: usize) -> (MemStorage, Vec<u64>) {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = TopicConfig::default();
    log.create_topic("t", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let mut ends = Vec::new();
    let mut end = 0;
    for i in 0..batches {
        let mut b = batch_of(&values(3, i as u8), 1000 + i as i64);
        end += b.len() as u64;
        p.append(&mut b, 0, &config).unwrap();
        ends.push(end);
    }
    (disk, ends)
}

#[test]
fn torn_tail_is_truncated_at_every_byte_of_the_last_three_batches() {
    let (disk, ends) = log_with_batches(6);
    let total = *ends.last().unwrap();
    let first_cut = ends[ends.len() - 4];
    for cut in first_cut..total {
        let copy = disk.restart(Unsynced::Drop);
        copy.edit_file(Path::new(SEGMENT), |b| b.truncate(cut as usize))
            .unwrap();
        let log = open(&copy, LogConfig::default()).unwrap();
        let p = log.topic("t").unwrap().partition(0).unwrap().clone();
        // The recovered log ends at the last batch that is whole.
        let whole = ends.iter().filter(|e| **e <= cut).count() as u64;
        assert_eq!(p.high_watermark(), whole * 3, "cut at byte {cut}");
        let records = read_all(&log, "t", 0);
        assert_eq!(records.len() as u64, whole * 3);
        // The next append succeeds and lands right after.
        let mut b = batch_of(&values(1, 99), 5000);
        let appended = p.append(&mut b, 0, &TopicConfig::default()).unwrap();
        assert_eq!(appended.base_offset, whole * 3);
        drop(log);
        let log = open(&copy, LogConfig::default()).unwrap();
        assert_eq!(
            read_all(&log, "t", 0).last().unwrap().1,
            vec![99, 0, 7, 7, 7]
        );
    }
}

#[test]
fn garbage_after_the_last_batch_is_a_torn_tail() {
    let (disk, ends) = log_with_batches(3);
    for fill in [0u8, 0xff, 0x02] {
        let copy = disk.restart(Unsynced::Drop);
        copy.edit_file(Path::new(SEGMENT), |b| {
            b.extend(std::iter::repeat_n(fill, 500))
        })
        .unwrap();
        let log = open(&copy, LogConfig::default()).unwrap();
        let p = log.topic("t").unwrap().partition(0).unwrap().clone();
        assert_eq!(p.high_watermark(), 9);
        assert_eq!(p.info().size_bytes, *ends.last().unwrap());
    }
}

#[test]
fn corruption_before_the_tail_of_the_active_segment_is_refused_not_truncated() {
    let (disk, ends) = log_with_batches(4);
    let copy = disk.restart(Unsynced::Drop);
    // Flip a bit inside the second batch; valid batches follow it.
    let at = (ends[0] + 70) as usize;
    copy.edit_file(Path::new(SEGMENT), |b| b[at] ^= 0x01)
        .unwrap();
    let before = copy.open_file_len(Path::new(SEGMENT)).unwrap();
    assert!(before >= *ends.last().unwrap());
    match open(&copy, LogConfig::default()) {
        Err(Error::Corrupt {
            position, reason, ..
        }) => {
            assert_eq!(position, ends[0]);
            assert!(reason.contains("valid batches follow"), "{reason}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a corrupt log opened without complaint"),
    }
    // The data is still there for an operator to inspect.
    let len = copy
        .open_file_len(Path::new(SEGMENT))
        .expect("segment still exists");
    assert_eq!(len, before);
    // With repair the log opens, truncated at the damage.
    let log = open(
        &copy,
        LogConfig {
            repair: true,
            ..LogConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        log.topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .high_watermark(),
        3
    );
}

#[test]
fn a_bit_flipped_in_a_sealed_segment_is_detected_and_reported() {
    let disk = MemStorage::new();
    // Index entries every 256 bytes: opening scans only a sealed segment's last few batches.
    let sparse = LogConfig {
        index_interval_bytes: 256,
        ..LogConfig::default()
    };
    let log = open(&disk, sparse.clone()).unwrap();
    let config = small_topic();
    log.create_topic("t", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    for i in 0..80 {
        let mut b = batch_of(&values(4, i), 1000);
        p.append(&mut b, 0, &config).unwrap();
    }
    assert!(p.info().segments >= 3);
    drop(log);
    // Damage the middle of the first (sealed) segment: a record's value, not a header.
    disk.edit_file(Path::new(SEGMENT), |b| b[200] ^= 0x40)
        .unwrap();
    // Opening checks only the tail of sealed segments, so reading the damaged range reports it.
    let log = open(&disk, sparse.clone()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    match p.read(0, 1 << 20) {
        Err(Error::Corrupt { path, reason, .. }) => {
            assert!(path.ends_with("00000000000000000000.log"));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!(
            "expected a corruption error, got {other:?}",
            other = other.map(|b| b.len())
        ),
    }
    // Data after the damaged segment is still served.
    let later = p.info().log_end_offset - 1;
    assert!(!p.read(later, 1 << 20).unwrap().is_empty());

    // Damage at the tail of a sealed segment is found on open.
    drop(log);
    disk.edit_file(Path::new(SEGMENT), |b| {
        let n = b.len();
        b[n - 3] ^= 0x40;
    })
    .unwrap();
    assert!(matches!(
        open(&disk, sparse.clone()),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn missing_indexes_of_a_sealed_segment_are_rebuilt() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = small_topic();
    log.create_topic("t", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    for i in 0..80 {
        let mut b = batch_of(&values(4, i), 1000 + i as i64);
        p.append(&mut b, 0, &config).unwrap();
    }
    assert!(p.info().segments >= 3);
    let before = read_all(&log, "t", 0);
    drop(log);
    disk.remove_file_for_test(Path::new("/data/topics/t/0/00000000000000000000.index"));
    disk.edit_file(
        Path::new("/data/topics/t/0/00000000000000000000.timeindex"),
        |b| b.truncate(5),
    )
    .unwrap();
    let log = open(&disk, LogConfig::default()).unwrap();
    assert_eq!(read_all(&log, "t", 0), before);
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(
        p.offset_for_timestamp(1010).unwrap().map(|(o, _)| o),
        Some(40)
    );
}

/// A deterministic workload: creates two topics, appends (rolling segments), applies retention and
/// deletes a topic. Records what was acknowledged; stops at the first error.
fn workload(disk: &MemStorage, acked: &mut Vec<(u64, Vec<u8>)>) -> spate_log::Result<()> {
    let log = open(disk, LogConfig::default())?;
    let config = TopicConfig {
        retention_bytes: Some(6000),
        ..small_topic()
    };
    log.create_topic("gone", config, 0)?;
    log.create_topic("t", config, 0)?;
    let p = log.topic("t")?.partition(0)?.clone();
    for i in 0..24u8 {
        let vals: Vec<Vec<u8>> = (0..3)
            .map(|j| vec![i, j, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .collect();
        let mut b = batch_of(&vals, 1000 + i64::from(i));
        let pad: Vec<Vec<u8>> = vals.iter().map(|v| v.repeat(40)).collect();
        if i % 3 == 0 {
            b = batch_of(&pad, 1000 + i64::from(i));
        }
        let values = if i % 3 == 0 { pad } else { vals };
        let a = p.append(&mut b, 0, &config)?;
        for (k, v) in values.into_iter().enumerate() {
            acked.push((a.base_offset + k as u64, v));
        }
        if i == 12 {
            log.delete_topic("gone")?;
        }
        if i % 8 == 7 {
            p.apply_retention(0, &config)?;
        }
    }
    Ok(())
}

#[test]
fn crash_at_every_sync_point_loses_nothing_acknowledged() {
    let disk = MemStorage::new();
    workload(&disk, &mut Vec::new()).unwrap();
    let sync_points = disk.syncs();
    assert!(
        sync_points > 30,
        "the workload should sync often, it synced {sync_points} times"
    );
    for crash_at in 1..=sync_points {
        for (k, unsynced) in [Unsynced::Drop, Unsynced::KeepRandomPrefix(crash_at)]
            .into_iter()
            .enumerate()
        {
            let disk = MemStorage::new();
            disk.crash_at_sync(crash_at);
            let mut acked = Vec::new();
            let result = workload(&disk, &mut acked);
            assert!(
                result.is_err(),
                "the crash at sync point {crash_at} must surface as an error"
            );
            let after = disk.restart(unsynced);
            let log = open(&after, LogConfig::default()).unwrap_or_else(|e| {
                panic!("reopen after a crash at sync point {crash_at} ({k}): {e}")
            });
            let Ok(topic) = log.topic("t") else {
                assert!(
                    acked.is_empty(),
                    "acknowledged records of a topic that vanished"
                );
                continue;
            };
            let p = topic.partition(0).unwrap().clone();
            let start = p.log_start_offset();
            let survived = read_all(&log, "t", start);
            for (offset, value) in acked.iter().filter(|(o, _)| *o >= start) {
                let found = survived.iter().find(|(o, _)| o == offset);
                assert_eq!(
                    found.map(|f| &f.1),
                    Some(value),
                    "offset {offset} lost after crash at sync {crash_at}"
                );
            }
            // Offsets stay dense and the log stays writable after recovery.
            for w in survived.windows(2) {
                assert_eq!(w[0].0 + 1, w[1].0);
            }
            let mut b = batch_of(&values(1, 1), 0);
            p.append(&mut b, 0, &small_topic()).unwrap();
        }
    }
}

#[test]
fn a_failed_fsync_poisons_the_partition() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = TopicConfig::default();
    log.create_topic("t", config, 0).unwrap();
    log.create_topic("other", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let mut b = batch_of(&values(2, 1), 0);
    p.append(&mut b, 0, &config).unwrap();
    disk.fail_sync_at(1);
    let mut b = batch_of(&values(2, 2), 0);
    let err = p.append(&mut b, 0, &config).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    // The batch whose fsync failed is never made visible, and no later write is acknowledged.
    assert_eq!(p.high_watermark(), 2);
    for _ in 0..3 {
        let mut b = batch_of(&values(1, 3), 0);
        let err = p.append(&mut b, 0, &config).unwrap_err();
        assert!(matches!(err, Error::Poisoned { .. }), "{err}");
        assert!(err.to_string().contains("refuses writes"));
    }
    assert_eq!(p.high_watermark(), 2);
    // Other partitions keep working; reads of the poisoned one still work.
    let q = log.topic("other").unwrap().partition(0).unwrap().clone();
    let mut b = batch_of(&values(1, 4), 0);
    q.append(&mut b, 0, &config).unwrap();
    assert_eq!(read_all(&log, "t", 0).len(), 2);
}

#[test]
fn a_reopened_log_keeps_topics_configs_and_offsets() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = TopicConfig {
        partitions: 3,
        retention_ms: None,
        retention_bytes: Some(1 << 30),
        ..TopicConfig::default()
    };
    log.create_topic("orders", config, 42).unwrap();
    let p = log.topic("orders").unwrap().partition(2).unwrap().clone();
    let mut b = batch_of(&values(5, 1), 0);
    p.append(&mut b, 0, &config).unwrap();
    assert!(matches!(
        log.create_topic("orders", config, 0),
        Err(Error::TopicExists(_))
    ));
    drop(log);
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, LogConfig::default()).unwrap();
    let topic = log.topic("orders").unwrap();
    assert_eq!(topic.config(), config);
    assert_eq!(topic.created_ms, 42);
    assert_eq!(topic.partition(2).unwrap().high_watermark(), 5);
    assert_eq!(topic.partition(0).unwrap().high_watermark(), 0);
    log.delete_topic("orders").unwrap();
    assert!(matches!(log.topic("orders"), Err(Error::UnknownTopic(_))));
    let log = open(&disk, LogConfig::default()).unwrap();
    assert!(log.topics().is_empty());
}

#[test]
fn a_topic_config_change_is_durable_seen_by_holders_and_a_bad_one_changes_nothing() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let before = TopicConfig {
        partitions: 2,
        ..TopicConfig::default()
    };
    log.create_topic("t", before, 7).unwrap();
    let held = log.topic("t").unwrap();
    let after = TopicConfig {
        retention_ms: None,
        segment_bytes: 1 << 20,
        max_message_bytes: 1 << 19,
        ..before
    };
    let changed = log
        .alter_topic_config(
            "t",
            |c| {
                Ok(TopicConfig {
                    retention_ms: None,
                    segment_bytes: 1 << 20,
                    max_message_bytes: 1 << 19,
                    ..*c
                })
            },
            false,
        )
        .unwrap();
    assert_eq!(changed, after);
    // Whoever holds the topic sees the change; the topic is the same one.
    assert_eq!(held.config(), after);
    assert_eq!(held.created_ms, 7);

    // Refused changes leave the configuration as it was.
    let refused: [fn(&TopicConfig) -> TopicConfig; 4] = [
        |c| TopicConfig {
            partitions: 3,
            ..*c
        },
        |c| TopicConfig {
            max_message_bytes: c.segment_bytes + 1,
            ..*c
        },
        |c| TopicConfig {
            segment_bytes: 10,
            ..*c
        },
        |c| TopicConfig {
            retention_bytes: Some(0),
            ..*c
        },
    ];
    for change in refused {
        let err = log
            .alter_topic_config("t", |c| Ok(change(c)), false)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert_eq!(held.config(), after);
    }
    // Validation alone changes nothing either.
    let checked = log
        .alter_topic_config(
            "t",
            |c| {
                Ok(TopicConfig {
                    retention_ms: Some(1000),
                    ..*c
                })
            },
            true,
        )
        .unwrap();
    assert_eq!(checked.retention_ms, Some(1000));
    assert_eq!(held.config(), after);
    assert!(matches!(
        log.alter_topic_config("missing", |c| Ok(*c), false),
        Err(Error::UnknownTopic(_))
    ));

    // The change was durable before it was answered.
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, LogConfig::default()).unwrap();
    assert_eq!(log.topic("t").unwrap().config(), after);
    assert_eq!(log.topic("t").unwrap().created_ms, 7);
}

#[test]
fn deleted_records_stay_deleted_across_a_restart_and_their_segments_go() {
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = small_topic();
    log.create_topic("t", config, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    // Batches of 3 records of 200 B: several segments of 4 KiB.
    for i in 0..30u8 {
        let values: Vec<Vec<u8>> = (0..3).map(|j| [i, j, 7, 7].repeat(50)).collect();
        p.append(&mut batch_of(&values, 1000 + i as i64), 0, &config)
            .unwrap();
    }
    let segments = p.info().segments;
    assert!(segments > 3, "{segments}");
    assert_eq!(p.delete_records(40).unwrap(), 40);
    assert_eq!(p.log_start_offset(), 40);
    assert_eq!(p.info().log_start_offset, 40);
    assert!(p.info().segments < segments);
    assert!(matches!(
        p.read(39, 4096),
        Err(Error::OffsetOutOfRange { .. })
    ));
    assert_eq!(read_all(&log, "t", 40)[0].0, 40);
    // Timestamps before the start find the first record kept.
    assert_eq!(p.offset_for_timestamp(0).unwrap().map(|(o, _)| o), Some(40));
    // An offset before the start changes nothing; one past the end is refused.
    assert_eq!(p.delete_records(10).unwrap(), 40);
    assert!(matches!(
        p.delete_records(91),
        Err(Error::OffsetOutOfRange { .. })
    ));
    drop((p, log));
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, LogConfig::default()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.log_start_offset(), 40);
    assert_eq!(p.high_watermark(), 90);
    assert!(matches!(
        p.read(39, 4096),
        Err(Error::OffsetOutOfRange { .. })
    ));
    // Up to the end: nothing is left to read, and appends go on after it.
    assert_eq!(p.delete_records(90).unwrap(), 90);
    assert_eq!(p.offset_for_timestamp(0).unwrap(), None);
    let appended = p
        .append(&mut batch_of(&values(1, 9), 5000), 0, &config)
        .unwrap();
    assert_eq!(appended.base_offset, 90);
    assert_eq!(read_all(&log, "t", 90), [(90, values(1, 9)[0].clone())]);
}

#[test]
fn a_crash_while_records_are_deleted_keeps_the_old_or_the_new_start() {
    let mut crash_at = 1;
    loop {
        let disk = MemStorage::new();
        let log = open(&disk, LogConfig::default()).unwrap();
        let config = small_topic();
        log.create_topic("t", config, 0).unwrap();
        let p = log.topic("t").unwrap().partition(0).unwrap().clone();
        for i in 0..20u8 {
            let values: Vec<Vec<u8>> = (0..3).map(|j| [i, j].repeat(100)).collect();
            p.append(&mut batch_of(&values, 0), 0, &config).unwrap();
        }
        disk.crash_at_sync(crash_at);
        let answered = p.delete_records(31).is_ok();
        for unsynced in [Unsynced::Drop, Unsynced::KeepRandomPrefix(crash_at)] {
            let log = open(&disk.restart(unsynced), LogConfig::default()).unwrap();
            let p = log.topic("t").unwrap().partition(0).unwrap().clone();
            let start = p.log_start_offset();
            if answered {
                assert_eq!(start, 31, "crash at sync {crash_at}");
            } else {
                assert!(
                    start == 31 || start <= 30,
                    "crash at sync {crash_at}: {start}"
                );
            }
            // Whatever the start, the records from it on are all there.
            let got = read_all(&log, "t", start);
            assert_eq!(got.len() as u64, 60 - start, "crash at sync {crash_at}");
        }
        if answered {
            break;
        }
        crash_at += 1;
    }
    assert!(crash_at > 1, "deleting records takes sync points");
}

#[test]
fn a_crash_during_a_topic_config_change_keeps_the_old_or_the_new_config() {
    let before = TopicConfig::default();
    let after = TopicConfig {
        retention_ms: Some(60_000),
        ..before
    };
    let mut crash_at = 1;
    loop {
        let disk = MemStorage::new();
        let log = open(&disk, LogConfig::default()).unwrap();
        log.create_topic("t", before, 0).unwrap();
        disk.crash_at_sync(crash_at);
        let answered = log
            .alter_topic_config(
                "t",
                |c| {
                    Ok(TopicConfig {
                        retention_ms: Some(60_000),
                        ..*c
                    })
                },
                false,
            )
            .is_ok();
        for unsynced in [Unsynced::Drop, Unsynced::KeepRandomPrefix(crash_at)] {
            let log = open(&disk.restart(unsynced), LogConfig::default()).unwrap();
            let config = log.topic("t").unwrap().config();
            if answered {
                assert_eq!(config, after, "crash at sync {crash_at}");
            } else {
                assert!(
                    config == before || config == after,
                    "crash at sync {crash_at}: {config:?}"
                );
            }
        }
        if answered {
            break;
        }
        crash_at += 1;
    }
    assert!(crash_at > 1, "the change takes sync points");
}

#[test]
fn a_topic_created_again_under_its_name_gets_a_later_creation_time() {
    // What is derived from a topic records the creation time of the topic it read, so a topic
    // deleted and created again within the same millisecond (or under a clock that stepped
    // back) must still differ from the one before.
    let disk = MemStorage::new();
    let log = open(&disk, LogConfig::default()).unwrap();
    let config = TopicConfig::default();
    log.create_topic("orders", config, 1_000).unwrap();
    log.delete_topic("orders").unwrap();
    log.create_topic("orders", config, 1_000).unwrap();
    assert_eq!(log.topic("orders").unwrap().created_ms, 1_001);
    log.delete_topic("orders").unwrap();
    log.create_topic("orders", config, 900).unwrap();
    assert_eq!(log.topic("orders").unwrap().created_ms, 1_002);
    // Also after a restart, from the topics on disk.
    drop(log);
    let log = open(&disk, LogConfig::default()).unwrap();
    log.create_topic("other", config, 5).unwrap();
    assert_eq!(log.topic("other").unwrap().created_ms, 1_003);
    // A clock ahead of every topic is used as it is.
    log.create_topic("later", config, 2_000).unwrap();
    assert_eq!(log.topic("later").unwrap().created_ms, 2_000);
}

#[test]
fn reads_outside_the_log_are_refused() {
    let (disk, _) = log_with_batches(2);
    let log = open(&disk, LogConfig::default()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert!(p.read(6, 100).unwrap().is_empty());
    assert!(matches!(
        p.read(7, 100),
        Err(Error::OffsetOutOfRange {
            high_watermark: 6,
            ..
        })
    ));
    assert_eq!(p.offset_for_timestamp(5000).unwrap().map(|(o, _)| o), None);
    assert_eq!(p.offset_for_timestamp(0).unwrap().map(|(o, _)| o), Some(0));
    assert_eq!(
        p.offset_for_timestamp(1001).unwrap().map(|(o, _)| o),
        Some(3)
    );
}

#[test]
fn invalid_batches_are_refused_and_change_nothing() {
    let (disk, _) = log_with_batches(1);
    let log = open(&disk, LogConfig::default()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let config = TopicConfig {
        max_message_bytes: 200,
        ..TopicConfig::default()
    };
    let mut bad_crc = batch_of(&values(1, 1), 0);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 1;
    assert!(matches!(
        p.append(&mut bad_crc, 0, &config),
        Err(Error::InvalidBatch(_))
    ));
    let mut short = batch_of(&values(1, 1), 0);
    short.pop();
    assert!(matches!(
        p.append(&mut short, 0, &config),
        Err(Error::InvalidBatch(_))
    ));
    assert!(matches!(
        p.append(&mut [], 0, &config),
        Err(Error::InvalidBatch(_))
    ));
    let mut big = batch_of(&[vec![0; 300]], 0);
    assert!(matches!(
        p.append(&mut big, 0, &config),
        Err(Error::BatchTooLarge { .. })
    ));
    assert_eq!(p.high_watermark(), 3);
    assert_eq!(read_all(&log, "t", 0).len(), 3);
}

#[test]
fn zeros_written_ahead_of_appends_are_dropped_on_open_and_at_a_roll() {
    let disk = MemStorage::new();
    let config = LogConfig {
        preallocate_bytes: 4096,
        ..LogConfig::default()
    };
    let topic = TopicConfig {
        segment_bytes: 6000,
        max_message_bytes: 1000,
        ..TopicConfig::default()
    };
    let log = open(&disk, config.clone()).unwrap();
    log.create_topic("t", topic, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let mut b = batch_of(&values(3, 1), 1000);
    let size = b.len() as u64;
    p.append(&mut b, 0, &topic).unwrap();
    // The file runs ahead of the data in whole chunks.
    assert_eq!(disk.open_file_len(Path::new(SEGMENT)).unwrap(), 4096);
    assert_eq!(p.info().size_bytes, size);
    // Reopened after a crash, the log ends at its last batch and appends go on from there.
    drop(log);
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, config.clone()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.high_watermark(), 3);
    assert_eq!(disk.open_file_len(Path::new(SEGMENT)).unwrap(), size);
    let mut appended = 3;
    while p.info().segments == 1 {
        let mut b = batch_of(&values(3, 2), 2000);
        p.append(&mut b, 0, &topic).unwrap();
        appended += 3;
    }
    // The sealed segment ends with its last batch; every record reads back.
    let sealed = p.info().size_bytes
        - disk
            .open_file_len(Path::new("/data/topics/t/0/00000000000000000000.log"))
            .unwrap();
    let last = batch_of(&values(3, 2), 2000).len() as u64;
    assert_eq!(
        sealed, last,
        "only the new segment's batch is beyond the sealed one"
    );
    assert_eq!(read_all(&log, "t", 0).len() as u64, appended);
    drop(log);
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, config).unwrap();
    assert_eq!(read_all(&log, "t", 0).len() as u64, appended);
}

#[test]
fn small_appends_get_the_space_ahead_written_with_zeros_and_recover_from_it() {
    let disk = MemStorage::new();
    let config = LogConfig {
        preallocate_bytes: 4096,
        ..LogConfig::default()
    };
    let topic = TopicConfig::default();
    let log = open(&disk, config.clone()).unwrap();
    log.create_topic("t", topic, 0).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    let mut b = batch_of(&values(1, 1), 1000);
    let size = b.len() as u64;
    assert!(size < 4096 / 16, "a small append: {size} bytes");
    p.append(&mut b, 0, &topic).unwrap();
    assert_eq!(disk.open_file_len(Path::new(SEGMENT)).unwrap(), 4096);
    // Enough small appends to cross several chunks, then a crash that drops what was not synced
    // (nothing: every append was synced) and a reopen that ends the log at its last batch.
    let mut appended = 1;
    while p.info().size_bytes < 3 * 4096 + 100 {
        let mut b = batch_of(&values(1, 2), 2000);
        p.append(&mut b, 0, &topic).unwrap();
        appended += 1;
    }
    let end = p.info().size_bytes;
    assert_eq!(
        disk.open_file_len(Path::new(SEGMENT)).unwrap(),
        end.div_ceil(4096) * 4096
    );
    drop(log);
    let disk = disk.restart(Unsynced::Drop);
    let log = open(&disk, config).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.high_watermark(), appended);
    assert_eq!(p.info().size_bytes, end);
    assert_eq!(read_all(&log, "t", 0).len() as u64, appended);
    let mut b = batch_of(&values(1, 3), 3000);
    assert_eq!(p.append(&mut b, 0, &topic).unwrap().base_offset, appended);
}
