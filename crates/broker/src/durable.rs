//! Waiting for appends to become durable without holding a thread per waiter.
//!
//! Under the `batch` fsync policy an append is acknowledged once its partition's fsync covers it.
//! Rather than parking a blocking thread per request on the log's condition variable, each
//! partition has at most one blocking task running fsyncs while anyone waits (group commit: one
//! fsync covers every append written before it started), and waiters are tasks woken through the
//! partition's high watermark channel.

use std::sync::{Arc, Mutex};

use spate_log::{Appended, Partition};

use crate::{Broker, BrokerError, Result};

/// The fsync runner of one partition.
#[derive(Default)]
pub(crate) struct Syncer {
    state: Mutex<SyncerState>,
}

#[derive(Default)]
struct SyncerState {
    /// The highest offset (exclusive) someone waits to see durable.
    wanted: u64,
    /// Whether a task is running fsyncs.
    running: bool,
}

impl Syncer {
    /// Makes sure everything below `end` becomes durable: starts the fsync task unless one runs,
    /// which then keeps going until no waiter is left behind.
    fn request(self: &Arc<Self>, p: &Arc<Partition>, end: u64) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.wanted = s.wanted.max(end);
            if s.running {
                return;
            }
            s.running = true;
        }
        let (syncer, p) = (self.clone(), p.clone());
        tokio::task::spawn_blocking(move || {
            spate_log::io::with_raised_priority(|| {
                loop {
                    // An fsync covers the whole log end at the time it starts; a failure poisons
                    // the partition, which wakes the waiters.
                    let failed = p.flush().is_err();
                    let mut s = syncer.state.lock().unwrap_or_else(|e| e.into_inner());
                    if failed || p.high_watermark() >= s.wanted {
                        s.running = false;
                        return;
                    }
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
            self.watched(p, |w| w.syncer.clone()).request(p, end);
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
        let (mut hw, syncer) = self.watched(p, |w| (w.hw.clone(), w.syncer.clone()));
        syncer.request(p, end);
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
