//! Process-wide counters for the server's self-monitoring ([`crate::monitor`]): events delivered
//! to consumers and open client connections.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
