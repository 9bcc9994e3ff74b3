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
                        // wakes its waiters.
                        s.wanted.retain(|_, (p, end)| {
                            p.high_watermark() < *end && !p.is_poisoned() && !p.is_closed()
                        });
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
