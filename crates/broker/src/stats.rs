//! Process-wide counters for the server's self-monitoring ([`crate::monitor`]): events delivered
//! to consumers and open client connections.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Upper bounds (seconds) of the buckets of every latency histogram the server exports: 50 µs to
/// 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

static DELIVERED: AtomicU64 = AtomicU64::new(0);
static CONNECTIONS: AtomicI64 = AtomicI64::new(0);

/// Counts `n` events handed to consumers (push subscribers, subscription deliveries).
pub fn delivered(n: u64) {
    DELIVERED.fetch_add(n, Ordering::Relaxed);
}

/// Events delivered so far.
pub fn delivered_total() -> u64 {
    DELIVERED.load(Ordering::Relaxed)
}

/// A connection opened (`+1`) or closed (`-1`).
pub fn connections(delta: i64) {
    CONNECTIONS.fetch_add(delta, Ordering::Relaxed);
}

/// Connections open now.
pub fn connections_open() -> i64 {
    CONNECTIONS.load(Ordering::Relaxed)
}
