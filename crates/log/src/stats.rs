//! Process-wide counters of the log's fsyncs, for the server's self-monitoring.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static COUNT: AtomicU64 = AtomicU64::new(0);
static MICROS: AtomicU64 = AtomicU64::new(0);
static MAX_MICROS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

pub(crate) fn record_append(bytes: u64) {
    BYTES.fetch_add(bytes, Ordering::Relaxed);
}

/// Record batch bytes appended so far, over all partitions.
pub fn bytes_appended() -> u64 {
    BYTES.load(Ordering::Relaxed)
}

pub(crate) fn record_fsync(took: Duration) {
    let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
    COUNT.fetch_add(1, Ordering::Relaxed);
    MICROS.fetch_add(us, Ordering::Relaxed);
    MAX_MICROS.fetch_max(us, Ordering::Relaxed);
}

/// Fsyncs so far and their total time in microseconds.
pub fn fsyncs() -> (u64, u64) {
    (
        COUNT.load(Ordering::Relaxed),
        MICROS.load(Ordering::Relaxed),
    )
}

/// The longest fsync since the last call, in microseconds.
pub fn take_max_fsync_micros() -> u64 {
    MAX_MICROS.swap(0, Ordering::Relaxed)
}
