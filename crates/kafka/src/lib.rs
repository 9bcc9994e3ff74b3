//! Spate's Kafka front end: existing Kafka clients and tools produce to and fetch from Spate's log.
//!
//! [`serve`] accepts connections on a listener the caller bound. Each connection reads frames
//! ([`frame`]), decodes them with the `kafka-protocol` crate and handles them one at a time, in
//! order, as a Kafka broker does; a produce request's wait for durability runs off the connection's
//! path, so several produce requests of one connection share an fsync. Responses leave in request
//! order; at most `max_in_flight` are pending per connection. Mapping to Kafka error codes happens
//! in [`handler`] only.

pub mod alloc;
pub mod frame;
pub mod handler;
pub mod out;

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use spate_broker::Broker;
use spate_broker::groups::Coordinator;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// Settings of the Kafka listener.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// The host and port Metadata tells clients to connect to.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// The largest request accepted (Kafka's `socket.request.max.bytes` default is 100 MiB).
    pub max_request_bytes: u32,
    /// Responses pending per connection before the connection stops reading requests.
    pub max_in_flight: usize,
    /// Open connections at most; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Create unknown topics on Metadata and Produce, as Kafka's `auto.create.topics.enable`.
    pub auto_create_topics: bool,
    /// Partitions of topics created without a count (CreateTopics with -1, auto-creation).
    pub default_partitions: u32,
    /// Access tokens: when set, a connection must authenticate with SASL/PLAIN, a token as the
    /// password, before any request but ApiVersions and the SASL ones.
    pub auth: Option<Arc<spate_broker::auth::Tokens>>,
    /// TLS on every connection (Kafka's `SSL` and `SASL_SSL` security protocols).
    pub tls: Option<Tls>,
}

/// The TLS side of the listener.
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// The longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            advertised_host: "127.0.0.1".into(),
            advertised_port: 9092,
            max_request_bytes: 100 << 20,
            max_in_flight: 32,
            max_connections: 10_000,
            auto_create_topics: false,
            default_partitions: 1,
            auth: None,
            tls: None,
        }
    }
}

/// A response on its way: ready, pending (produce waiting for durability), or none (acks=0).
pub enum Reply {
    Ready(Vec<Bytes>),
    Pending(JoinHandle<Option<Vec<Bytes>>>),
    None,
}

/// Runs the group coordinator's clock (rebalance deadlines, session expiry) until `shutdown`.
pub async fn run_coordinator_clock(
    coordinator: Arc<Coordinator>,
    shutdown: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Committed offsets are written again when due (see `Coordinator::maintain`).
    let mut upkeep = tokio::time::interval(std::time::Duration::from_secs(60));
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => coordinator.tick(std::time::Instant::now()),
            _ = upkeep.tick() => {
                if let Err(e) = coordinator.maintain(spate_broker::now_ms(), false).await {
                    tracing::warn!(error = %e, "writing committed offsets again failed");
                }
            }
        }
    }
}

/// Serves the Kafka protocol on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    coordinator: Arc<Coordinator>,
    config: KafkaConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = handler::Context {
            broker: broker.clone(),
            coordinator: coordinator.clone(),
            config: config.clone(),
            peer: peer.ip().to_string(),
            sasl: Default::default(),
        };
        let stop = stop_rx.clone();
        connections.spawn(async move {
            metrics::gauge!("spate_connections", "protocol" => "kafka").increment(1.0);
            spate_broker::stats::connections(1);
            let result = match &ctx.config.tls {
                None => {
                    let (rd, wr) = stream.into_split();
                    connection(rd, wr, ctx, stop).await
                }
                Some(Tls(acceptor)) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let mut stopping = stop.clone();
                    // A stop does not wait for handshakes, which have started nothing.
                    let done = tokio::select! {
                        done = handshake => Some(done),
                        _ = stopping.wait_for(|s| *s) => None,
                    };
                    match done {
                        Some(Ok(Ok(tls))) => {
                            let (rd, wr) = tokio::io::split(tls);
                            connection(rd, wr, ctx, stop).await
                        }
                        Some(Ok(Err(e))) => Err(anyhow::anyhow!("TLS handshake failed: {e}")),
                        Some(Err(_)) => Err(anyhow::anyhow!("TLS handshake timed out")),
                        None => Ok(()),
                    }
                }
            };
            metrics::gauge!("spate_connections", "protocol" => "kafka").decrement(1.0);
            spate_broker::stats::connections(-1);
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "kafka connection closed");
            }
            drop(permit);
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    // Stop reading new requests; connections finish what they started and close.
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves one connection, given as its two halves: a plain one's own (no lock between the
/// reader and the writer), a TLS one's from `tokio::io::split`.
async fn connection<R, W>(
    mut rd: R,
    mut wr: W,
    ctx: handler::Context,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Reply>(ctx.config.max_in_flight.max(1));
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let bytes = match reply {
                Reply::Ready(b) => Some(b),
                Reply::Pending(h) => h.await.ok().flatten(),
                Reply::None => None,
            };
            if let Some(mut chunks) = bytes {
                out::write_chunks(&mut wr, &mut chunks).await?;
                // TLS holds back what the socket did not take until the next write or a flush;
                // the next write may never come. (A TCP socket's flush does nothing.)
                wr.flush().await?;
            }
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let result = loop {
        match frame::take_frame(&mut buf, ctx.config.max_request_bytes) {
            Ok(Some(request)) => match handler::handle(&ctx, request).await {
                Ok(reply) => {
                    if tx.send(reply).await.is_err() {
                        break Ok(());
                    }
                    // A failed authentication is answered, then the connection closes.
                    if ctx.sasl.failed() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            },
            Ok(None) => {
                let read = tokio::select! {
                    r = rd.read_buf(&mut buf) => r?,
                    _ = stop.wait_for(|s| *s) => 0,
                };
                if read == 0 {
                    break Ok(());
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    drop(tx);
    writer.await??;
    result
}
