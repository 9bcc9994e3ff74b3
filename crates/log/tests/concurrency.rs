//! Concurrent appenders on the real file system: offsets are unique and dense, every acknowledged
//! batch reads back, and group commit lets appenders share fsyncs.

mod common;

use std::sync::Arc;

use common::batch_of;
use spate_log::batch;
use spate_log::io::FsStorage;
use spate_log::{Log, LogConfig, TopicConfig};

#[test]
fn concurrent_appenders_get_dense_unique_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(Arc::new(FsStorage), dir.path(), LogConfig::default()).unwrap());
    let config = TopicConfig {
        segment_bytes: 64 * 1024,
        max_message_bytes: 4096,
        ..TopicConfig::default()
    };
    log.create_topic("t", config, 0).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || {
                let p = log.topic("t").unwrap().partition(0).unwrap().clone();
                (0..100u8)
                    .map(|i| {
                        let mut b = batch_of(&[vec![w, i], vec![w, i, 1]], 0);
                        (p.append(&mut b, 0, &config).unwrap(), w, i)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    acked.sort_by_key(|(a, _, _)| a.base_offset);
    for (k, (a, _, _)) in acked.iter().enumerate() {
        assert_eq!(a.base_offset, 2 * k as u64);
        assert_eq!(a.last_offset, 2 * k as u64 + 1);
    }
    drop(log);
    let log = Log::open(Arc::new(FsStorage), dir.path(), LogConfig::default()).unwrap();
    let p = log.topic("t").unwrap().partition(0).unwrap().clone();
    assert_eq!(p.high_watermark(), 1600);
    assert!(p.info().segments > 1);
    for (a, w, i) in acked {
        let bytes = p.read(a.base_offset, 1).unwrap();
        let (_, h) = batch::split(&bytes).unwrap()[0];
        let records = batch::decode(&bytes[..h.total_bytes() as usize]).unwrap();
        assert_eq!(records[0].value.as_deref(), Some(&[w, i][..]));
    }
}
