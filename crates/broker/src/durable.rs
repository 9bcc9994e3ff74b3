//! Waiting for appends to become durable without holding a thread per waiter.
//!
//! Under the `batch` fsync policy an append is acknowledged once an fsync covers it. Rather than
//! parking a blocking thread per request on the log's condition variable, the broker has one
//! committer: at most one blocking task runs syncs while anyone waits, and waiters are tasks woken
//! through their partition's high watermark channel. Each round of the committer covers every
//! partition with appends waiting (group commit across partitions: their writes go to the device
//! together and share one flush of its write cache, see [`spate_log::sync_together`]); appends
//! that arrive during a round wait for the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spate_log::{Appended, Partition};

use crate::{Broker, BrokerError, Result};

/// The broker's fsync runner.
#[derive(Default)]
pub(crate) struct Committer {
    state: Mutex<CommitterState>,
}

#[derive(Default)]
struct CommitterState {
    /// Partitions someone waits on, by identity, with the highest offset (exclusive) someone
    /// waits to see durable.
    wanted: HashMap<usize, (Arc<Partition>, u64)>,
    /// Whether a task is running rounds.
    running: bool,
}

impl Committer {
    /// Makes sure everything below `end` in `p` becomes durable: starts the committer's task
    /// unless it runs, which then keeps going until no waiter is left behind.
    fn request(self: &Arc<Self>, p: &Arc<Partition>, end: u64) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let entry = s
                .wanted
                .entry(Arc::as_ptr(p) as usize)
                .or_insert_with(|| (p.clone(), end));
            entry.1 = entry.1.max(end);
            if s.running {
                return;
            }
            s.running = true;
        }
        let committer = self.clone();
        tokio::task::spawn_blocking(move || {
            spate_log::io::with_raised_priority(|| {
                loop {
                    let round: Vec<Arc<Partition>> = {
                        let mut s = committer.state.lock().unwrap_or_else(|e| e.into_inner());
                        // Covered, or never to be: a failed fsync poisons its partition, which
                        // wakes its waiters. (A partition closed by its topic's deletion is still
                        // synced: appends made before the deletion wait for it.)
                        s.wanted
                            .retain(|_, (p, end)| p.high_watermark() < *end && !p.is_poisoned());
                        if s.wanted.is_empty() {
                            s.running = false;
                            return;
                        }
                        s.wanted.values().map(|(p, _)| p.clone()).collect()
                    };
                    // Errors poison their partitions; the loop above then lets them go.
                    let _ = spate_log::sync_together(&round);
                }
            })
        });
    }
}

impl Broker {
    /// Starts the fsync that will cover `appended`, without waiting for it: callers with appends in
    /// several partitions start them all, then wait with [`Broker::acknowledgeable`].
    pub fn sync_soon(&self, p: &Arc<Partition>, appended: Appended) {
        let end = appended.last_offset + 1;
        if p.acks_wait_for_fsync() && p.high_watermark() < end {
            self.committer.request(p, end);
        }
    }

    /// Waits until `appended` may be acknowledged under the fsync policy: under `batch`, until an
    /// fsync covers it (shared with every other append waiting on the same partition); under the
    /// relaxed policies at once.
    pub async fn acknowledgeable(&self, p: &Arc<Partition>, appended: Appended) -> Result<()> {
        if !p.acks_wait_for_fsync() {
            return Ok(());
        }
        let end = appended.last_offset + 1;
        if p.high_watermark() >= end {
            return Ok(());
        }
        // Watch before asking, so that the fsync's advance is not missed.
        let mut hw = self.watch(p);
        self.committer.request(p, end);
        loop {
            if *hw.borrow_and_update() >= end {
                return Ok(());
            }
            if p.is_poisoned() {
                // Written, but the fsync that was to cover it failed.
                return Err(BrokerError::Log(spate_log::Error::Io {
                    action: "sync the partition of",
                    path: format!("{}/{}", p.topic, p.id).into(),
                    source: std::io::Error::other("an fsync failed; the partition refuses writes"),
                }));
            }
            if hw.changed().await.is_err() {
                return Err(BrokerError::Internal(
                    "the partition was closed while an append waited for its fsync".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spate_log::batch::{self, NewRecord};
    use spate_log::mem::MemStorage;
    use spate_log::{Log, LogConfig, TopicConfig};

    use super::*;

    fn broker() -> (MemStorage, Arc<Broker>) {
        let disk = MemStorage::new();
        let log = Log::open(
            Arc::new(disk.clone()),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .unwrap();
        let topic = TopicConfig {
            partitions: 3,
            ..TopicConfig::default()
        };
        log.create_topic("t", topic, 0).unwrap();
        (
            disk,
            Arc::new(Broker::new(Arc::new(log), Default::default())),
        )
    }

    fn append(p: &Partition) -> Appended {
        let record = NewRecord {
            timestamp_ms: 0,
            key: None,
            value: Some(b"v".to_vec()),
            headers: Vec::new(),
        };
        let mut b = batch::encode(&[record]).unwrap();
        p.append_unsynced(&mut b, 0, &TopicConfig::default())
            .unwrap()
    }

    #[tokio::test]
    async fn appends_to_several_partitions_are_acknowledged_together_once_durable() {
        let (disk, broker) = broker();
        let parts = broker.topic("t").unwrap().partitions.clone();
        let appended: Vec<Appended> = parts.iter().map(|p| append(p)).collect();
        for (p, a) in parts.iter().zip(&appended) {
            broker.sync_soon(p, *a);
        }
        for (p, a) in parts.iter().zip(&appended) {
            broker.acknowledgeable(p, *a).await.unwrap();
        }
        // What was acknowledged survives a crash.
        let after = Log::open(
            Arc::new(disk.restart(spate_log::mem::Unsynced::Drop)),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .unwrap();
        for p in &after.topic("t").unwrap().partitions {
            assert_eq!(p.high_watermark(), 1, "partition {}", p.id);
        }
    }

    #[tokio::test]
    async fn an_append_made_before_its_topic_was_deleted_is_still_acknowledged() {
        let (_disk, broker) = broker();
        let p = broker.topic("t").unwrap().partitions[0].clone();
        let a = append(&p);
        broker.log().delete_topic("t").unwrap();
        assert!(p.is_closed());
        tokio::time::timeout(Duration::from_secs(10), broker.acknowledgeable(&p, a))
            .await
            .expect("the append's fsync must not be dropped with its topic")
            .unwrap();
    }
}
