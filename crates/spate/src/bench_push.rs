//! `spate bench push`: WebSocket push measured against a Spate server it starts itself (loopback,
//! `--fsync batch`, a temporary data directory).
//!
//! - Latency: one publisher sends events at a fixed rate over a WebSocket (`publish` ops, each
//!   stamped with its send time); subscribers measure send-to-delivery. Publish-to-ack (durable)
//!   is measured beside it, and, per event, how long after its ack the first subscriber got it:
//!   the part of delivery beyond the fsync.
//! - Fan-out: the same with many subscribers, each on its own connection (WebSocket, or SSE with
//!   `--protocol sse`).
//! - Memory: the server's resident memory before and after opening idle connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args, Debug, Clone)]
pub struct PushBenchArgs {
    /// Publish rates to measure latency at (events/s), with `--subscribers` subscribers.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<u64>,
    /// Subscriber counts for the fan-out runs (at `--fanout-rate`).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    fanout: Vec<usize>,
    #[arg(long, default_value_t = 1000)]
    fanout_rate: u64,
    /// Subscribers in the latency runs.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Idle connections for the memory measurement.
    #[arg(long, default_value_t = 10000)]
    idle: usize,
    /// Also measure a normal subscriber beside one reading 1 KiB/s.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    slow_consumer: bool,
    /// How the subscribers of the latency and fan-out runs connect: `websocket` or `sse` (the
    /// publisher always uses a WebSocket).
    #[arg(long, value_enum, default_value_t = Protocol::Websocket)]
    protocol: Protocol,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Websocket,
    Sse,
}

pub(crate) struct Server {
    pub(crate) child: std::process::Child,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub(crate) async fn create_topic(
        &self,
        http: &reqwest::Client,
        name: &str,
        partitions: u32,
    ) -> Result<()> {
        let r = http
            .post(format!("http://{}/v1/topics", self.addr))
            .json(&json!({"name": name, "partitions": partitions}))
            .send()
            .await?;
        ensure!(r.status() == 201, "create topic {name}: {}", r.status());
        Ok(())
    }
}

pub(crate) fn start_server() -> Result<Server> {
    start_server_with("batch")
}

/// A server with fsync policy `fsync` (`batch`, `interval:<ms>` or `never`).
pub(crate) fn start_server_with(fsync: &str) -> Result<Server> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--kafka-addr",
            "127.0.0.1:0",
        ])
        .args(["--fsync", fsync, "--max-connections", "30000"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start the server")?;
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = std::io::BufReader::new(out).lines();
    let addr = loop {
        let line = lines.next().context("server exited")??;
        if let Some(url) = line.strip_prefix("http: http://") {
            break url.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Server {
        child,
        addr,
        _dir: dir,
    })
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: &str) -> Result<Socket> {
    // tungstenite zero-fills its whole read buffer before each read: the default 128 KiB cost the
    // client more than the messages it read.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024);
    let (s, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{addr}/v1/ws"),
        Some(config),
        false,
    )
    .await
    .context("websocket connect")?;
    Ok(s)
}

async fn expect_op(s: &mut Socket, op: &str) -> Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["op"] == op {
                    return Ok(v);
                }
                bail!("expected {op}, got {v}");
            }
            Ok(Some(Ok(_))) => continue,
            other => bail!("expected {op}, got {other:?}"),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

/// A quantile of a histogram of nanoseconds, in milliseconds.
fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e6
}

/// The send time stamped in an event message (`"t":<ns>`), without parsing the whole message.
fn stamp(msg: &str) -> Option<u64> {
    number_after(msg, "\"t\":")
}

/// The number of a published event (its id is `b<k>`), without parsing the whole message.
fn event_number(msg: &str) -> Option<u64> {
    number_after(msg, "\"id\":\"b")
}

fn number_after(msg: &str, prefix: &str) -> Option<u64> {
    let at = msg.find(prefix)? + prefix.len();
    let rest = &msg[at..];
    let end = rest
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

pub async fn run(a: PushBenchArgs) -> Result<()> {
    ensure!(a.seconds > 0.0, "--seconds must be positive");
    let server = start_server()?;
    let http = reqwest::Client::new();
    println!(
        "# spate bench push: {} s per run, {} CPUs, server with --fsync batch, subscribers over {}",
        a.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match a.protocol {
            Protocol::Websocket => "WebSocket",
            Protocol::Sse => "SSE",
        }
    );
    // Memory per idle connection, first, on the fresh server (later runs leave freed memory in
    // the allocator that new connections would reuse).
    let pid = server.child.id();
    let before = rss_kib(pid)?;
    let mut idle = Vec::with_capacity(a.idle);
    for _ in 0..a.idle {
        idle.push(connect(&server.addr).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid)?;
    println!(
        "idle WebSocket connections: {}, server RSS {before} KiB -> {after} KiB, {:.2} KiB per connection",
        a.idle,
        (after.saturating_sub(before)) as f64 / a.idle as f64
    );
    drop(idle);
    if a.slow_consumer {
        slow_consumer(&server, &http, a.seconds).await?;
    }
    println!();
    println!(
        "| events/s | subscribers | deliveries/s | delivered | publish→durable p50 / p99 ms | publish→delivered p50 / p99 / p99.9 ms | durable→delivered p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    // Latency runs, then fan-out runs (these leave the machine busiest, so they come last).
    let mut runs: Vec<(u64, usize)> = a.rates.iter().map(|&r| (r, a.subscribers)).collect();
    runs.extend(a.fanout.iter().map(|&n| (a.fanout_rate, n)));
    for (i, (rate, subscribers)) in runs.into_iter().enumerate() {
        let topic = format!("push{i}");
        server.create_topic(&http, &topic, 1).await?;
        let o = one_run(
            &server.addr,
            &topic,
            rate,
            subscribers,
            a.seconds,
            Extra {
                protocol: a.protocol,
                ..Extra::default()
            },
        )
        .await?;
        println!(
            "| {rate} | {subscribers} | {:.0} | {:.1}% | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} |",
            o.deliveries_per_s,
            o.delivered_fraction * 100.0,
            ms(&o.ack, 0.5),
            ms(&o.ack, 0.99),
            ms(&o.delivery, 0.5),
            ms(&o.delivery, 0.99),
            ms(&o.delivery, 0.999),
            ms(&o.beyond, 0.5),
            ms(&o.beyond, 0.99),
        );
    }
    Ok(())
}

/// One normal subscriber at 1,000 events/s of about 1 KiB, alone and then beside a subscriber that
/// reads about 1 KiB/s; the server's peak memory in both.
async fn slow_consumer(server: &Server, http: &reqwest::Client, seconds: f64) -> Result<()> {
    println!();
    println!(
        "| 1 KiB events/s | slow subscriber | normal p50 / p99 / p99.9 ms | normal durable→delivered p50 / p99 ms | server peak RSS MiB |"
    );
    println!("|---|---|---|---|---|");
    let pid = server.child.id();
    let (mut base, mut beside) = (Vec::new(), Vec::new());
    // The same for the part beyond the fsync, which the disk's stalls do not move.
    let (mut base_beyond, mut beside_beyond) = (Vec::new(), Vec::new());
    // Alternating pairs; the medians are compared.
    let order = [false, true, true, false, false, true];
    for (i, slow) in order.into_iter().enumerate() {
        let topic = format!("slow{i}");
        server.create_topic(http, &topic, 1).await?;
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)?));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let o = one_run(
            &server.addr,
            &topic,
            1000,
            1,
            seconds,
            Extra {
                pad: 1000,
                slow,
                protocol: Protocol::Websocket,
            },
        )
        .await?;
        sampler.abort();
        if slow {
            beside.push(ms(&o.delivery, 0.99));
            beside_beyond.push(ms(&o.beyond, 0.99));
        } else {
            base.push(ms(&o.delivery, 0.99));
            base_beyond.push(ms(&o.beyond, 0.99));
        }
        println!(
            "| 1000 | {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} | {:.1} |",
            if slow { "yes" } else { "no" },
            ms(&o.delivery, 0.5),
            ms(&o.delivery, 0.99),
            ms(&o.delivery, 0.999),
            ms(&o.beyond, 0.5),
            ms(&o.beyond, 0.99),
            peak.load(Ordering::Relaxed) as f64 / 1024.0
        );
    }
    let (base, beside) = (
        crate::bench::median(&mut base),
        crate::bench::median(&mut beside),
    );
    println!();
    println!(
        "normal subscriber p99, median of 3 runs each: {base:.2} ms alone, {beside:.2} ms beside a slow one: {:.2}x",
        beside / base
    );
    let (base_beyond, beside_beyond) = (
        crate::bench::median(&mut base_beyond),
        crate::bench::median(&mut beside_beyond),
    );
    println!(
        "normal subscriber durable→delivered p99, median of 3 runs each: {base_beyond:.2} ms alone, {beside_beyond:.2} ms beside a slow one: {:.2}x",
        beside_beyond / base_beyond
    );
    Ok(())
}

struct Outcome {
    deliveries_per_s: f64,
    delivered_fraction: f64,
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
    /// Per event, from its ack reaching the publisher to its delivery to the first subscriber;
    /// an event delivered before its ack arrived counts as 1 ns.
    beyond: Histogram<u64>,
}

/// Extra load in a run: padding per event, and a subscriber reading about 1 KiB/s beside the
/// measured ones.
#[derive(Clone, Copy)]
struct Extra {
    pad: usize,
    slow: bool,
    protocol: Protocol,
}

impl Default for Extra {
    fn default() -> Self {
        Extra {
            pad: 0,
            slow: false,
            protocol: Protocol::Websocket,
        }
    }
}

/// A subscriber's connection.
enum Subscriber {
    Ws(Box<Socket>),
    Sse(SseReader),
}

/// An SSE stream read over a plain HTTP/1.1 connection, line by line.
struct SseReader {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
    at: usize,
}

impl SseReader {
    /// Opens `GET /v1/topics/{topic}/sse` (from the latest position) and reads the response head:
    /// the stream is live when it returns.
    async fn open(addr: &str, topic: &str) -> Result<SseReader> {
        let path = format!("/v1/topics/{topic}/sse");
        let (s, buf) = tokio::time::timeout(
            Duration::from_secs(30),
            crate::loadgen_http::open_stream(addr, &path),
        )
        .await
        .context("no SSE response head within 30 s")??;
        Ok(SseReader { s, buf, at: 0 })
    }

    /// The next `data:` line's text (an event message); `None` when the stream ends.
    async fn next_data(&mut self) -> Option<String> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(nl) = self.buf[self.at..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[self.at..self.at + nl];
                self.at += nl + 1;
                if let Some(data) = line.strip_prefix(b"data: ") {
                    return Some(String::from_utf8_lossy(data).into_owned());
                }
                continue;
            }
            self.buf.drain(..self.at);
            self.at = 0;
            let len = self.buf.len();
            self.buf.resize(len + 16 * 1024, 0);
            let n = self.s.read(&mut self.buf[len..]).await.unwrap_or(0);
            self.buf.truncate(len + n);
            if n == 0 {
                return None;
            }
        }
    }
}

/// What a subscriber saw: its deliveries, latency samples (sampled subscribers) and arrival
/// times per event (the first subscriber).
struct Tally {
    n: u64,
    local: Option<Histogram<u64>>,
    arrivals: Option<Vec<(u64, u64)>>,
}

impl Tally {
    fn seen(&mut self, msg: &str, epoch: Instant) {
        // Only the sampled subscribers read the clock and the stamp.
        if (self.local.is_some() || self.arrivals.is_some())
            && let Some(sent) = stamp(msg)
        {
            let now = epoch.elapsed().as_nanos() as u64;
            if let Some(h) = &mut self.local {
                h.saturating_record(now.saturating_sub(sent).max(1));
            }
            if let Some(arrivals) = &mut self.arrivals
                && let Some(k) = event_number(msg)
            {
                arrivals.push((k, now));
            }
        }
        self.n += 1;
    }
}

async fn one_run(
    addr: &str,
    topic: &str,
    rate: u64,
    subscribers: usize,
    seconds: f64,
    extra: Extra,
) -> Result<Outcome> {
    let delivery = Arc::new(Mutex::new(new_histogram()));
    let delivered = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let total = (rate as f64 * seconds) as u64;
    // Subscribers give up 5 s after the last publish: a server that cannot keep up shows as a
    // delivered fraction under 100%.
    // Subscribers wait on it rather than on a timer per message.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    // Latency is recorded by a sample of at most about 1,000 subscribers (each histogram takes
    // hundreds of KiB); every subscriber counts its deliveries.
    let sample_every = subscribers.div_ceil(1000).max(1);
    let mut subs = tokio::task::JoinSet::new();
    for i in 0..subscribers {
        let conn = match extra.protocol {
            Protocol::Websocket => {
                let mut s = connect(addr).await?;
                s.send(Message::Text(
                    json!({"op": "subscribe", "id": format!("s{i}"), "topic": topic})
                        .to_string()
                        .into(),
                ))
                .await?;
                expect_op(&mut s, "subscribed").await?;
                Subscriber::Ws(Box::new(s))
            }
            Protocol::Sse => Subscriber::Sse(SseReader::open(addr, topic).await?),
        };
        let (delivery, delivered) = (delivery.clone(), delivered.clone());
        let mut stop = stop_rx.clone();
        let sampled = i % sample_every == 0;
        // Each task gives back when its events arrived; only the first subscriber keeps them.
        subs.spawn(async move {
            let mut tally = Tally {
                n: 0,
                local: sampled.then(new_histogram),
                arrivals: (i == 0).then(Vec::new),
            };
            match conn {
                Subscriber::Ws(mut s) => {
                    while tally.n < total {
                        let msg = tokio::select! {
                            biased;
                            m = s.next() => match m {
                                Some(Ok(Message::Text(t))) => t,
                                Some(Ok(_)) => continue,
                                _ => break,
                            },
                            _ = stop.wait_for(|stopped| *stopped) => break,
                        };
                        // Stopped (or the run is gone) while messages still come.
                        if stop.has_changed().unwrap_or(true) {
                            break;
                        }
                        if msg.starts_with("{\"op\":\"event\",") {
                            tally.seen(&msg, epoch);
                        }
                    }
                }
                Subscriber::Sse(mut r) => {
                    while tally.n < total {
                        let msg = tokio::select! {
                            biased;
                            m = r.next_data() => match m {
                                Some(t) => t,
                                None => break,
                            },
                            _ = stop.wait_for(|stopped| *stopped) => break,
                        };
                        if stop.has_changed().unwrap_or(true) {
                            break;
                        }
                        tally.seen(&msg, epoch);
                    }
                }
            }
            delivered.fetch_add(tally.n, Ordering::Relaxed);
            if let Some(h) = tally.local {
                delivery.lock().await.add(&h).expect("same bounds");
            }
            tally.arrivals.unwrap_or_default()
        });
    }
    // The publisher: `publish` ops at a fixed rate, acks read on the same socket.
    let (mut tx, mut rx) = connect(addr).await?.split();
    let sent_at: Arc<Mutex<std::collections::HashMap<u64, u64>>> = Default::default();
    let acks = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut h = new_histogram();
            let mut acked_at = vec![0u64; total as usize];
            let mut n = 0;
            while n < total {
                let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout(Duration::from_secs(30), rx.next()).await
                else {
                    break;
                };
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                if v["op"] == "published" {
                    let r: u64 = v["ref"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0);
                    if let Some(at) = sent_at.lock().await.remove(&r) {
                        let now = epoch.elapsed().as_nanos() as u64;
                        h.saturating_record(now.saturating_sub(at).max(1));
                        if let Some(slot) = acked_at.get_mut(r as usize) {
                            *slot = now;
                        }
                    }
                    n += 1;
                }
            }
            (h, acked_at)
        })
    };
    // The slow subscriber: one message (about 1 KiB) per second.
    let slow = if extra.slow {
        let mut s = connect(addr).await?;
        s.send(Message::Text(
            json!({"op": "subscribe", "id": "slow", "topic": topic})
                .to_string()
                .into(),
        ))
        .await?;
        expect_op(&mut s, "subscribed").await?;
        let stop = stop_rx.clone();
        Some(tokio::spawn(async move {
            let mut n = 0u64;
            while !*stop.borrow() {
                match tokio::time::timeout(Duration::from_secs(1), s.next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => n += 1,
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(None) | Ok(Some(Err(_))) => break,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            n
        }))
    } else {
        None
    };
    let pad = "x".repeat(extra.pad);
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for k in 0..total {
        // Fixed schedule: send when due, so a slow moment does not hide latency (no coordinated
        // omission); the stamp is the scheduled time.
        let due = start + interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        let t = due.duration_since(epoch).as_nanos() as u64;
        sent_at.lock().await.insert(k, t);
        let msg = json!({"op": "publish", "topic": topic, "ref": k.to_string(), "event": {
            "specversion": "1.0", "id": format!("b{k}"), "source": "/bench", "type": "bench",
            "data": {"t": t, "pad": pad}}});
        tx.send(Message::Text(msg.to_string().into())).await?;
    }
    let (ack, acked_at) = acks.await?;
    let stopper = {
        let stop = stop_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.send_replace(true);
        })
    };
    let mut first_arrivals = Vec::new();
    while let Some(arrivals) = subs.join_next().await {
        if let Ok(arrivals) = arrivals
            && !arrivals.is_empty()
        {
            first_arrivals = arrivals;
        }
    }
    stop_tx.send_replace(true);
    stopper.abort();
    if let Some(slow) = slow {
        slow.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let delivery = Arc::try_unwrap(delivery)
        .map_err(|_| anyhow::anyhow!("subscribers still running"))?
        .into_inner();
    let mut beyond = new_histogram();
    for (k, at) in first_arrivals {
        if let Some(&acked) = acked_at.get(k as usize).filter(|t| **t > 0) {
            beyond.saturating_record(at.saturating_sub(acked).max(1));
        }
    }
    Ok(Outcome {
        beyond,
        deliveries_per_s: delivered.load(Ordering::Relaxed) as f64 / elapsed,
        delivered_fraction: delivered.load(Ordering::Relaxed) as f64
            / (total as f64 * subscribers as f64),
        ack,
        delivery,
    })
}
