//! Push channels: Server-Sent Events (`GET /v1/topics/{topic}/sse`) and a WebSocket JSON protocol
//! (`GET /v1/ws`, documented in `docs/push.md`). Both deliver from [`spate_broker::push::Feed`]s,
//! so a client resumes from a cursor for as long as retention keeps the data.
//!
//! Backpressure: a WebSocket connection has one bounded queue of outgoing messages; a subscription
//! whose messages do not fit waits, stops taking events from the live ring, and later reads what it
//! missed from the log. An SSE stream is pulled by the connection as it drains, with the same
//! effect. A subscriber that stays behind past `max_behind` is disconnected (WebSocket close code
//! 4008); so is a socket that accepts nothing for that long.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use spate_broker::event::push_u64;
use spate_broker::filter::Filter;
use spate_broker::push::{Feed, FeedError, FeedStart, LiveEvent};
use spate_broker::{BrokerError, Event};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::{ApiError, ApiResult, AppState, consume};

/// A runtime of its own for push deliveries: WebSocket subscriptions, projection watches,
/// subscription consumers and the connections' writers. With thousands of subscribers their
/// tasks would otherwise fill the server runtime's run queues, and every other piece of work (a
/// publish and its reply, an append, a Kafka request) would wait behind a pass over all of them;
/// on their own runtime the operating system shares the CPU between the two. Dropped, it stops
/// at once without waiting for its tasks.
pub struct DeliveryRuntime {
    handle: tokio::runtime::Handle,
    /// Taken on drop only.
    rt: Option<tokio::runtime::Runtime>,
}

impl DeliveryRuntime {
    /// A runtime with `workers` threads.
    pub fn new(workers: usize) -> std::io::Result<Arc<DeliveryRuntime>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("spate-push")
            .enable_all()
            .build()?;
        Ok(Arc::new(DeliveryRuntime {
            handle: rt.handle().clone(),
            rt: Some(rt),
        }))
    }

    /// Runs `f` on the delivery runtime.
    pub fn spawn<F>(&self, f: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Spawns delivery work on the server's delivery runtime (the current one without it).
fn spawn_delivery<F>(s: &AppState, f: F) -> JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match &s.deliveries {
        Some(d) => d.spawn(f),
        None => tokio::spawn(f),
    }
}

/// The sending half of a WebSocket, shared by the connection's writer and the tasks that reply
/// to publishes and acks.
type Sink = Arc<tokio::sync::Mutex<SplitSink<WebSocket, Message>>>;

/// Writes a reply to the socket at once, beside the queue of deliveries: a reply to a publish or
/// an ack does not wait behind queued events, nor for the writer's turn on the delivery runtime.
/// A socket that takes nothing for `stall` is the writer's to close.
async fn reply_now(sink: &Sink, stall: Duration, v: Value) {
    let _ = tokio::time::timeout(stall, async {
        sink.lock()
            .await
            .send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
    })
    .await;
}

/// Settings of the push channels.
#[derive(Debug, Clone)]
pub struct PushLimits {
    /// A subscriber behind the live tail for longer than this is disconnected.
    pub max_behind: Duration,
    /// Messages queued per WebSocket connection before subscriptions wait.
    pub send_queue: usize,
    /// Subscriptions per WebSocket connection at most.
    pub subscriptions_per_connection: usize,
    /// The largest WebSocket message accepted from a client.
    pub max_message_bytes: usize,
    /// Interval of SSE comment heartbeats.
    pub heartbeat: Duration,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_behind: Duration::from_secs(60),
            send_queue: 256,
            subscriptions_per_connection: 256,
            max_message_bytes: 1 << 20,
            heartbeat: Duration::from_secs(15),
        }
    }
}

/// WebSocket close code for a subscriber that fell too far behind (application range 4000-4999).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// Parses `from`: `latest`, `earliest`, or an RFC 3339 time.
fn parse_from(from: &str) -> Result<FeedStart, String> {
    match from {
        "latest" => Ok(FeedStart::Latest),
        "earliest" => Ok(FeedStart::Earliest),
        t => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map(|t| FeedStart::Time((t.unix_timestamp_nanos() / 1_000_000) as i64))
            .map_err(|_| format!("`from` must be latest, earliest or an RFC 3339 time, got {t:?}")),
    }
}

/// Parses a cursor `p:o,p:o` (the last offset seen per partition, -1 for none) into the next
/// offset per partition.
fn parse_cursor(cursor: &str) -> Result<HashMap<u32, u64>, String> {
    let bad =
        || format!("invalid cursor {cursor:?}: expected partition:offset pairs, like 0:41,1:7");
    let mut out = HashMap::new();
    for pair in cursor.split(',') {
        let (p, o) = pair.trim().split_once(':').ok_or_else(bad)?;
        let p: u32 = p.parse().map_err(|_| bad())?;
        let o: i64 = o.parse().map_err(|_| bad())?;
        // The next offset: -1 (nothing seen) gives 0; i64::MAX has no next.
        let next = o.checked_add(1).filter(|n| *n >= 0).ok_or_else(bad)?;
        if out.insert(p, next as u64).is_some() {
            return Err(bad());
        }
    }
    Ok(out)
}

/// Appends the cursor after an event: the last offset delivered per partition, then `@` and the
/// creation time of the topic that handed them out.
fn push_cursor(out: &mut String, position: &[u64], topic_created_ms: i64) {
    for (p, next) in position.iter().enumerate() {
        if p > 0 {
            out.push(',');
        }
        let _ = write!(out, "{p}:{}", *next as i64 - 1);
    }
    let _ = write!(out, "@{topic_created_ms}");
}

/// Splits the topic's creation time off a cursor (`...@<ms>`); cursors without one are taken
/// as they are.
fn split_cursor(cursor: &str) -> Result<(&str, Option<i64>), String> {
    match cursor.split_once('@') {
        None => Ok((cursor, None)),
        Some((c, t)) => t
            .parse()
            .map(|t| (c, Some(t)))
            .map_err(|_| format!("invalid cursor {cursor:?}: the part after @ is not a number")),
    }
}

fn feed_error(e: BrokerError) -> ApiError {
    e.into()
}

/// `GET /v1/topics/{topic}/sse?from=&filter=&types=`; `Last-Event-ID` resumes after a cursor.
pub async fn sse(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    for key in q.keys() {
        if !matches!(
            key.as_str(),
            "from" | "filter" | "types" | "cursor" | "stream" | "from_version"
        ) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{key}`"
            )));
        }
    }
    let filter = Filter::new(
        q.get("filter").map(String::as_str),
        q.get("types").map(String::as_str),
    )
    .map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid-filter",
            e.to_string(),
        )
    })?;
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::to_string))
        .transpose()
        .map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))?;
    // `cursor` in the query does what `Last-Event-ID` does, for pages that keep their own cursor
    // (an `EventSource` cannot set the header); the header, newer on a reconnect, wins.
    let cursor = last_id
        .filter(|id| !id.is_empty())
        .or_else(|| q.get("cursor").cloned());
    let feed = if let Some(stream) = q.get("stream") {
        // One stream: the cursor is the version of the last event seen (then the topic's
        // creation time: a stream of a topic created again is read from its start).
        let from_version = match (cursor, q.get("from_version")) {
            (Some(id), _) => {
                let (version, created) = split_cursor(&id).map_err(ApiError::bad_request)?;
                let next = version
                    .parse::<u64>()
                    .ok()
                    .and_then(|v| v.checked_add(1))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("invalid stream cursor {id:?}"))
                    })?;
                match created {
                    Some(c) if c != s.broker.topic(&topic)?.created_ms => 0,
                    _ => next,
                }
            }
            (None, Some(v)) => v.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "`from_version` must be a version number, got {v:?}"
                ))
            })?,
            (None, None) => 0,
        };
        if q.contains_key("from") {
            return Err(ApiError::bad_request(
                "give `from_version` with `stream`, not `from`",
            ));
        }
        s.broker
            .stream_feed(
                &topic,
                stream,
                from_version,
                Arc::new(filter),
                s.push.max_behind,
            )
            .await
            .map_err(feed_error)?
    } else {
        if q.contains_key("from_version") {
            return Err(ApiError::bad_request("`from_version` needs `stream`"));
        }
        let start = match (cursor, q.get("from")) {
            (Some(id), _) => {
                let (cursor, created) = split_cursor(&id).map_err(ApiError::bad_request)?;
                let offsets = parse_cursor(cursor).map_err(ApiError::bad_request)?;
                match created {
                    Some(topic_created_ms) => FeedStart::Resume {
                        offsets,
                        topic_created_ms,
                    },
                    None => FeedStart::Offsets(offsets),
                }
            }
            (_, Some(from)) => parse_from(from).map_err(ApiError::bad_request)?,
            (_, None) => FeedStart::Latest,
        };
        s.broker
            .feed(&topic, start, Arc::new(filter), s.push.max_behind)
            .await
            .map_err(feed_error)?
    };
    let guard = ConnectionGauge::new("sse");
    let stream = sse_stream(feed, guard, s.stopping.clone(), s.push.heartbeat);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Resolves when the server stops (never without a signal).
pub(crate) async fn stopped(stopping: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match stopping {
        Some(rx) => {
            let _ = rx.wait_for(|s| *s).await;
        }
        None => std::future::pending().await,
    }
}

/// Events written to an SSE stream in one chunk at most, when more than one is at hand.
const SSE_CHUNK_EVENTS: usize = 64;
/// Bytes after which a chunk takes no further event.
const SSE_CHUNK_BYTES: usize = 32 << 10;

struct SseState {
    feed: Feed,
    _guard: ConnectionGauge,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    deliveries: Deliveries,
    /// One timer for the stream's life (resetting one per event cost more than the event).
    tick: tokio::time::Interval,
    /// Nothing sent since the last tick.
    quiet: bool,
    done: bool,
}

/// The chunks of an SSE stream: events (as many as are at hand, up to a limit, in one chunk), a
/// comment (`:`) at each heartbeat tick with nothing sent since the one before, and a last
/// `error` event when the feed ends.
fn sse_stream(
    feed: Feed,
    guard: ConnectionGauge,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    heartbeat: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let heartbeat = heartbeat.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = SseState {
        feed,
        _guard: guard,
        stopping,
        deliveries: Deliveries::of("sse"),
        tick,
        quiet: true,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = stopped(&mut st.stopping) => return None,
                _ = st.tick.tick() => {
                    if st.quiet {
                        return Some((Ok(Bytes::from_static(b":\n\n")), st));
                    }
                    st.quiet = true;
                    continue;
                }
                next = st.feed.next() => next,
            };
            let chunk = match next {
                Ok(e) => {
                    let mut out = String::with_capacity(e.json.len() + 128);
                    push_sse_event(&mut out, &st.feed, &e);
                    st.deliveries.delivered(e.seen_at);
                    let mut n = 1;
                    while n < SSE_CHUNK_EVENTS
                        && out.len() < SSE_CHUNK_BYTES
                        && let Some(e) = st.feed.try_next()
                    {
                        push_sse_event(&mut out, &st.feed, &e);
                        st.deliveries.delivered(e.seen_at);
                        n += 1;
                    }
                    st.quiet = false;
                    out
                }
                Err(err) => {
                    st.done = true;
                    let data = json!({"code": error_code(&err), "message": err.to_string()});
                    format!("event: error\ndata: {data}\n\n")
                }
            };
            return Some((Ok(Bytes::from(chunk)), st));
        }
    })
}

/// Appends one event as an SSE message: `id:` its cursor, `data:` the event message on one line.
fn push_sse_event(out: &mut String, feed: &Feed, e: &LiveEvent) {
    out.push_str("id: ");
    match feed.version() {
        Some(v) => {
            push_u64(out, v);
            let _ = write!(out, "@{}", feed.topic_created_ms());
        }
        None => push_cursor(out, feed.position(), feed.topic_created_ms()),
    }
    out.push_str("\ndata: {");
    let data = out.len() - 1;
    push_event_end(out, feed.version(), e);
    // Line breaks in the JSON can only be whitespace between its tokens (inside strings they are
    // escaped): as spaces they keep the message on one `data:` line and mean the same JSON.
    if e.json_has_line_breaks() {
        let flat = out[data..].replace(['\n', '\r'], " ");
        out.truncate(data);
        out.push_str(&flat);
    }
    out.push_str("\n\n");
}

fn error_code(e: &FeedError) -> &'static str {
    match e {
        FeedError::SlowConsumer(_) => "slow-consumer",
        FeedError::TopicDeleted(_) => "topic-deleted",
        FeedError::Broker(_) => "read-failed",
    }
}

/// The delivery metrics of one protocol, looked up once per subscription rather than per
/// delivery (a lookup clones labels and hashes them: at fan-out rates, more than the delivery).
struct Deliveries {
    count: metrics::Counter,
    latency: metrics::Histogram,
    /// Deliveries so far, for sampling the latency.
    n: u64,
}

/// One delivery in this many has its durable→delivered latency recorded (the first always):
/// reading the clock and recording a sample for each delivery cost about a tenth of the server's
/// CPU at fan-out rates. Deliveries are all counted.
pub const LATENCY_SAMPLE_EVERY: u64 = 8;

impl Deliveries {
    fn of(protocol: &'static str) -> Deliveries {
        Deliveries {
            count: metrics::counter!("spate_deliveries_total", "protocol" => protocol),
            latency: metrics::histogram!("spate_durable_to_delivered_seconds", "protocol" => protocol),
            n: 0,
        }
    }

    /// One delivery of an event seen durable at `seen_at`.
    fn delivered(&mut self, seen_at: std::time::Instant) {
        self.count.increment(1);
        spate_broker::stats::delivered(1);
        if self.n.is_multiple_of(LATENCY_SAMPLE_EVERY) {
            self.latency.record(seen_at.elapsed().as_secs_f64());
        }
        self.n += 1;
    }
}

/// Appends the end of an event message, the same on both protocols:
/// `"version":…,` (stream feeds only), then `"partition":…,"offset":…,"event":…}`.
fn push_event_end(out: &mut String, version: Option<u64>, e: &LiveEvent) {
    if let Some(v) = version {
        out.push_str("\"version\":");
        push_u64(out, v);
        out.push(',');
    }
    out.push_str("\"partition\":");
    push_u64(out, u64::from(e.partition));
    out.push_str(",\"offset\":");
    push_u64(out, e.offset);
    out.push_str(",\"event\":");
    out.push_str(&e.json);
    out.push('}');
}

/// Counts open push connections per protocol while alive.
struct ConnectionGauge(&'static str);

impl ConnectionGauge {
    fn new(protocol: &'static str) -> Self {
        metrics::gauge!("spate_connections", "protocol" => protocol).increment(1.0);
        spate_broker::stats::connections(1);
        ConnectionGauge(protocol)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!("spate_connections", "protocol" => self.0).decrement(1.0);
        spate_broker::stats::connections(-1);
    }
}

/// `GET /v1/ws`.
pub async fn ws(
    State(s): State<AppState>,
    access: Option<axum::Extension<spate_broker::auth::Access>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let read_only = access.is_some_and(|a| a.0 == spate_broker::auth::Access::ReadOnly);
    upgrade
        .max_message_size(s.push.max_message_bytes)
        .max_frame_size(s.push.max_message_bytes)
        // Clients send small ops: a small read buffer (it grows to fit a larger frame) keeps idle
        // connections cheap.
        .read_buffer_size(512)
        // Messages are written in batches, flushed when the queue is empty.
        .write_buffer_size(8192)
        .on_upgrade(move |socket| {
            // Split here rather than in the task: the task's future would otherwise keep room
            // for the whole socket it splits.
            let (sink, stream) = socket.split();
            connection(s, sink, stream, read_only)
        })
}

/// A message for the writer task.
pub(crate) enum Out {
    Text(String),
}

/// Asks the writer to close the connection with a code and reason, ahead of queued messages.
type Closer = Arc<tokio::sync::Mutex<Option<tokio::sync::oneshot::Sender<(u16, String)>>>>;

async fn close_with(closer: &Closer, code: u16, mut reason: String) {
    // A close frame's reason holds at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    if let Some(tx) = closer.lock().await.take() {
        let _ = tx.send((code, reason));
    }
}

async fn connection(
    s: AppState,
    sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    read_only: bool,
) {
    let sink: Sink = Arc::new(tokio::sync::Mutex::new(sink));
    let _guard = ConnectionGauge::new("websocket");
    let (tx, mut rx) = mpsc::channel::<Out>(s.push.send_queue.max(1));
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<(u16, String)>();
    let closer: Closer = Arc::new(tokio::sync::Mutex::new(Some(close_tx)));
    let stall = s.push.max_behind;
    let out = sink.clone();
    let writer = async move {
        let sink = out;
        let close = loop {
            let out = tokio::select! {
                biased;
                c = &mut close_rx => break c.ok(),
                out = rx.recv() => out,
            };
            let Some(Out::Text(first)) = out else {
                break None;
            };
            // Write what is queued in one go (fewer system calls when many events are due).
            let mut batch = vec![first];
            while batch.len() < 64
                && let Ok(Out::Text(t)) = rx.try_recv()
            {
                batch.push(t);
            }
            let write = async {
                let mut sink = sink.lock().await;
                for t in batch {
                    sink.feed(Message::Text(Utf8Bytes::from(t))).await?;
                }
                sink.flush().await
            };
            // A socket that takes nothing for as long as a subscriber may stay behind is cut off.
            tokio::select! {
                biased;
                c = &mut close_rx => break c.ok(),
                sent = tokio::time::timeout(stall, write) => {
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break None,
                        Err(_) => break Some((
                            CLOSE_SLOW_CONSUMER,
                            format!("slow consumer: the connection took nothing for {stall:?}"),
                        )),
                    }
                }
            }
        };
        if let Some((code, reason)) = close {
            if code == CLOSE_SLOW_CONSUMER {
                metrics::counter!("spate_slow_consumers_total", "protocol" => "websocket")
                    .increment(1);
            }
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }));
            // Queued bytes go first; a client still reading gets the frame within a few seconds.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                sink.lock().await.send(frame).await
            })
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            sink.lock().await.close().await
        })
        .await;
    };
    let writer = spawn_delivery(&s, writer);
    let mut conn = Connection {
        s: s.clone(),
        sink,
        tx: tx.clone(),
        closer,
        subs: HashMap::new(),
        consumers: HashMap::new(),
        publishes: Arc::new(Semaphore::new(64)),
        read_only,
    };
    let mut stopping = s.stopping.clone();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = conn.closed() => break,
            _ = stopped(&mut stopping) => {
                Box::pin(close_with(&conn.closer, 1001, "server stopping".into())).await;
                break;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                Box::pin(conn.reply(error(None, "unsupported", "send JSON text messages"))).await;
                continue;
            }
            Some(Err(e)) => {
                if message_too_big(&e) {
                    let reason = format!(
                        "a message may take at most {} bytes",
                        s.push.max_message_bytes
                    );
                    Box::pin(close_with(&conn.closer, 1009, reason)).await;
                }
                break;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
        };
        // Boxed: the futures of the ops are large, and an idle connection should not carry
        // room for them.
        Box::pin(conn.handle(text.as_str())).await;
    }
    for (_, h) in conn.subs.drain() {
        h.abort();
    }
    for (_, (_, h)) in conn.consumers.drain() {
        h.abort();
    }
    drop(conn);
    drop(tx);
    let _ = writer.await;
}

/// Whether a read failed on a message or frame over the size limit: the connection closes with
/// 1009 (message too big) and the limit, where other read errors just end it.
fn message_too_big(e: &axum::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

fn error(id: Option<(&str, &str)>, code: &str, message: impl Into<String>) -> Value {
    let mut v = json!({"op": "error", "code": code, "message": message.into()});
    if let Some((k, id)) = id {
        v[k] = Value::String(id.to_string());
    }
    v
}

/// Refuses fields an op does not take, as the HTTP API refuses unknown fields: a misspelt
/// `filter` must not subscribe to everything. Unknown ops are left to the dispatch.
fn known_fields(op: &str, v: &Value) -> Result<(), String> {
    let fields: &[&str] = match op {
        "subscribe" => &[
            "topic",
            "id",
            "from",
            "filter",
            "types",
            "stream",
            "from_version",
            "topic_created_ms",
        ],
        "unsubscribe" => &["id", "subscription"],
        "publish" => &["topic", "event", "ref"],
        "consume" => &["subscription", "max_in_flight"],
        "watch" => &["projection", "id", "key", "prefix"],
        "ack" => &["ack_id", "subscription"],
        "nack" => &["ack_id", "subscription", "delay_ms"],
        _ => return Ok(()),
    };
    let Some(unknown) = v.as_object().and_then(|m| {
        m.keys()
            .find(|k| *k != "op" && !fields.contains(&k.as_str()))
    }) else {
        return Ok(());
    };
    Err(format!(
        "unknown field `{unknown}` in a {op} message; it takes {}",
        fields
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

struct Connection {
    s: AppState,
    sink: Sink,
    tx: mpsc::Sender<Out>,
    closer: Closer,
    subs: HashMap<String, JoinHandle<()>>,
    /// Subscription consumers by subscription name.
    consumers: HashMap<String, (Arc<consume::Credit>, JoinHandle<()>)>,
    publishes: Arc<Semaphore>,
    /// Opened with a read-only access token: no `publish`.
    read_only: bool,
}

impl Connection {
    /// Resolves once the connection is being closed.
    async fn closed(&self) {
        self.tx.closed().await;
    }

    async fn reply(&self, v: Value) {
        let _ = self.tx.send(Out::Text(v.to_string())).await;
    }

    async fn handle(&mut self, text: &str) {
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return self
                    .reply(error(None, "malformed", "a message is a JSON object"))
                    .await;
            }
            Err(e) => {
                return self
                    .reply(error(None, "malformed-json", format!("invalid JSON: {e}")))
                    .await;
            }
        };
        self.subs.retain(|_, h| !h.is_finished());
        if let Some(op) = v.get("op").and_then(Value::as_str)
            && let Err(e) = known_fields(op, &v)
        {
            let tag = ["id", "ref", "ack_id", "subscription"]
                .into_iter()
                .find_map(|k| Some((k, v.get(k)?.as_str()?)));
            return self.reply(error(tag, "malformed", e)).await;
        }
        match v.get("op").and_then(Value::as_str) {
            Some("subscribe") => self.subscribe(&v).await,
            Some("unsubscribe") => self.unsubscribe(&v).await,
            Some("publish") if self.read_only => {
                let tag = v.get("ref").and_then(Value::as_str).map(|r| ("ref", r));
                self.reply(error(
                    tag,
                    "forbidden",
                    "this access token is read-only: it may not publish",
                ))
                .await
            }
            Some("publish") => self.publish(v).await,
            Some("consume") => self.consume(&v).await,
            Some("watch") => self.watch(&v).await,
            Some("ack") => self.settle(&v, false).await,
            Some("nack") => self.settle(&v, true).await,
            Some(op) => {
                self.reply(error(None, "unknown-op", format!("unknown op {op:?}")))
                    .await
            }
            None => {
                self.reply(error(None, "malformed", "a message needs an `op`"))
                    .await
            }
        }
    }

    async fn subscribe(&mut self, v: &Value) {
        let Some(id) = v.get("id").and_then(Value::as_str) else {
            return self
                .reply(error(None, "malformed", "subscribe needs a string `id`"))
                .await;
        };
        let id = id.to_string();
        let tag = Some(("id", id.as_str()));
        if self.subs.contains_key(&id) {
            return self
                .reply(error(
                    tag,
                    "duplicate-id",
                    "a subscription with this id is open",
                ))
                .await;
        }
        if self.subs.len() >= self.s.push.subscriptions_per_connection {
            return self
                .reply(error(
                    tag,
                    "too-many-subscriptions",
                    format!(
                        "at most {} subscriptions per connection",
                        self.s.push.subscriptions_per_connection
                    ),
                ))
                .await;
        }
        let Some(topic) = v.get("topic").and_then(Value::as_str) else {
            return self
                .reply(error(tag, "malformed", "subscribe needs a string `topic`"))
                .await;
        };
        let text_field = |name: &str| -> Result<Option<&str>, String> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(format!("`{name}` must be a string")),
            }
        };
        let (filter, types) = match (text_field("filter"), text_field("types")) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return self.reply(error(tag, "malformed", e)).await,
        };
        let filter = match Filter::new(filter, types) {
            Ok(f) => f,
            Err(e) => {
                return self
                    .reply(error(tag, "invalid-filter", e.to_string()))
                    .await;
            }
        };
        let start = match v.get("from") {
            None | Some(Value::Null) => Ok(FeedStart::Latest),
            Some(Value::String(s)) => parse_from(s),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(p, o)| {
                    let p: u32 = p
                        .parse()
                        .map_err(|_| format!("partition {p:?} is not a number"))?;
                    let o = o.as_u64().ok_or_else(|| {
                        format!("offset of partition {p} must be a non-negative integer")
                    })?;
                    Ok((p, o))
                })
                .collect::<Result<HashMap<u32, u64>, String>>()
                .map(FeedStart::Offsets),
            Some(_) => Err("`from` must be a string or an object of partition offsets".into()),
        };
        // Positions handed out by an earlier topic of the name do not count for this one.
        let created = match v.get("topic_created_ms") {
            None | Some(Value::Null) => None,
            Some(c) => match c.as_i64() {
                Some(c) => Some(c),
                None => {
                    return self
                        .reply(error(
                            tag,
                            "malformed",
                            "`topic_created_ms` must be an integer",
                        ))
                        .await;
                }
            },
        };
        let start = match (start, created) {
            (Ok(FeedStart::Offsets(offsets)), Some(topic_created_ms)) => Ok(FeedStart::Resume {
                offsets,
                topic_created_ms,
            }),
            (Ok(_), Some(_)) if v.get("stream").is_none() => {
                Err("`topic_created_ms` goes with `from` offsets or with `stream`".to_string())
            }
            (start, _) => start,
        };
        let start = match start {
            Ok(s) => s,
            Err(e) => return self.reply(error(tag, "malformed", e)).await,
        };
        let stream = match (v.get("stream"), v.get("from_version")) {
            (None | Some(Value::Null), None | Some(Value::Null)) => None,
            (Some(Value::String(st)), fv) if v.get("from").is_none() => {
                match fv.map_or(Some(0), Value::as_u64) {
                    Some(fv) => Some((st.clone(), fv)),
                    None => {
                        return self
                            .reply(error(
                                tag,
                                "malformed",
                                "`from_version` must be a version number",
                            ))
                            .await;
                    }
                }
            }
            _ => {
                return self
                    .reply(error(
                        tag,
                        "malformed",
                        "`stream` (a string) goes with `from_version`, not with `from`",
                    ))
                    .await;
            }
        };
        // A stream of a topic created again since `topic_created_ms` is read from its start.
        let stream = match (stream, created) {
            (Some((st, _)), Some(c))
                if self.s.broker.topic(topic).is_ok_and(|t| t.created_ms != c) =>
            {
                Some((st, 0))
            }
            (stream, _) => stream,
        };
        let feed = match &stream {
            Some((st, fv)) => {
                self.s
                    .broker
                    .stream_feed(topic, st, *fv, Arc::new(filter), self.s.push.max_behind)
                    .await
            }
            None => {
                self.s
                    .broker
                    .feed(topic, start, Arc::new(filter), self.s.push.max_behind)
                    .await
            }
        };
        let feed = match feed {
            Ok(f) => f,
            Err(e) => {
                let api: ApiError = e.into();
                return self.reply(error(tag, api.kind, api.detail.clone())).await;
            }
        };
        let from: serde_json::Map<String, Value> = feed
            .position()
            .iter()
            .enumerate()
            .map(|(p, o)| (p.to_string(), json!(o)))
            .collect();
        let created = feed.topic_created_ms();
        let reply = match &stream {
            Some((st, fv)) => json!({"op": "subscribed", "id": id, "topic": topic, "stream": st,
                "from_version": fv, "topic_created_ms": created}),
            None => json!({"op": "subscribed", "id": id, "topic": topic, "from": from,
                "topic_created_ms": created}),
        };
        self.reply(reply).await;
        let handle = spawn_delivery(
            &self.s,
            run_subscription(
                id.clone(),
                feed,
                self.tx.clone(),
                self.closer.clone(),
                self.s.push.max_behind,
            ),
        );
        self.subs.insert(id, handle);
    }

    async fn watch(&mut self, v: &Value) {
        let Some(projection) = v.get("projection").and_then(Value::as_str) else {
            return self
                .reply(error(
                    None,
                    "malformed",
                    "watch needs a string `projection`",
                ))
                .await;
        };
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or(projection)
            .to_string();
        let tag = Some(("id", id.as_str()));
        let key = v.get("key").and_then(Value::as_str).map(str::to_string);
        let prefix = v.get("prefix").and_then(Value::as_str).map(str::to_string);
        if key.is_some() && prefix.is_some() {
            return self
                .reply(error(tag, "malformed", "give `key` or `prefix`, not both"))
                .await;
        }
        if self.subs.contains_key(&id) {
            return self
                .reply(error(
                    tag,
                    "duplicate-id",
                    "an open subscription or watch has this id",
                ))
                .await;
        }
        let Some(projections) = self.s.projections.clone() else {
            return self
                .reply(error(
                    tag,
                    "projections-unavailable",
                    "projections are not running",
                ))
                .await;
        };
        let mut changes = match projections.watch(projection) {
            Ok(rx) => rx,
            Err(e) => {
                let api: ApiError = e.into();
                return self.reply(error(tag, api.kind, api.detail.clone())).await;
            }
        };
        self.reply(json!({"op": "watching", "id": id, "projection": projection}))
            .await;
        let (tx, projection) = (self.tx.clone(), projection.to_string());
        let watch_id = id.clone();
        let handle = spawn_delivery(&self.s, async move {
            let head = format!(
                "{{\"op\":\"row\",\"id\":{},\"projection\":{},",
                Value::from(id.as_str()),
                Value::from(projection.as_str())
            );
            loop {
                let reason = match changes.recv().await {
                    Ok(c) => {
                        let wanted = match (&key, &prefix) {
                            (Some(k), _) => &c.key == k,
                            (_, Some(p)) => c.key.starts_with(p.as_str()),
                            _ => true,
                        };
                        if !wanted {
                            continue;
                        }
                        let msg = format!(
                            "{head}\"key\":{},\"value\":{},\"partition\":{},\"offset\":{}}}",
                            Value::from(c.key.as_str()),
                            c.row.value,
                            c.row.partition,
                            c.row.offset
                        );
                        if tx.send(Out::Text(msg)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => (
                        "slow-consumer",
                        format!("the watch fell {n} changes behind; read the rows and watch again"),
                    ),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => (
                        "projection-changed",
                        "the projection was redefined, rebuilt or deleted; read the rows and watch again"
                            .to_string(),
                    ),
                };
                let v = error(Some(("id", &id)), reason.0, reason.1);
                let _ = tx.send(Out::Text(v.to_string())).await;
                return;
            }
        });
        self.subs.insert(watch_id, handle);
    }

    async fn consume(&mut self, v: &Value) {
        let Some(name) = v.get("subscription").and_then(Value::as_str) else {
            return self
                .reply(error(
                    None,
                    "malformed",
                    "consume needs a string `subscription`",
                ))
                .await;
        };
        let tag = Some(("subscription", name));
        let max = match v.get("max_in_flight") {
            None => 100,
            Some(n) => match n.as_u64() {
                Some(n) if (1..=consume::MAX_IN_FLIGHT as u64).contains(&n) => n as usize,
                _ => {
                    return self
                        .reply(error(
                            tag,
                            "malformed",
                            format!(
                                "`max_in_flight` must be within 1..={}",
                                consume::MAX_IN_FLIGHT
                            ),
                        ))
                        .await;
                }
            },
        };
        let Some(subs) = self.s.subscriptions.clone() else {
            return self
                .reply(error(
                    tag,
                    "subscriptions-unavailable",
                    "subscriptions are not running",
                ))
                .await;
        };
        self.consumers.retain(|_, (_, h)| !h.is_finished());
        if self.consumers.contains_key(name) {
            return self
                .reply(error(
                    tag,
                    "duplicate-consumer",
                    "this connection already consumes this subscription",
                ))
                .await;
        }
        if let Err(e) = subs.info(name) {
            let api: ApiError = e.into();
            return self.reply(error(tag, api.kind, api.detail.clone())).await;
        }
        // The reply goes first: the consumer's messages may be queued as soon as it runs.
        self.reply(json!({"op": "consuming", "subscription": name}))
            .await;
        let credit = consume::Credit::new(name.to_string(), max);
        let handle = spawn_delivery(&self.s, consume::run(subs, credit.clone(), self.tx.clone()));
        self.consumers.insert(name.to_string(), (credit, handle));
    }

    async fn settle(&mut self, v: &Value, nack: bool) {
        let op = if nack { "nack" } else { "ack" };
        let Some(ack_id) = v.get("ack_id").and_then(Value::as_str).map(str::to_string) else {
            return self
                .reply(error(
                    None,
                    "malformed",
                    format!("{op} needs a string `ack_id`"),
                ))
                .await;
        };
        let tag = Some(("ack_id", ack_id.as_str()));
        let delay_ms = match v.get("delay_ms") {
            None => None,
            Some(d) if nack => match d.as_u64() {
                Some(d) => Some(d),
                None => {
                    return self
                        .reply(error(
                            tag,
                            "malformed",
                            "`delay_ms` must be a non-negative integer",
                        ))
                        .await;
                }
            },
            Some(_) => {
                return self
                    .reply(error(tag, "malformed", "`delay_ms` applies to nack only"))
                    .await;
            }
        };
        let credit = self
            .consumers
            .values()
            .find(|(c, _)| c.holds(&ack_id))
            .map(|(c, _)| c.clone());
        let name = match (&credit, v.get("subscription").and_then(Value::as_str)) {
            (Some(c), _) => c.subscription.clone(),
            (None, Some(n)) => n.to_string(),
            (None, None) => {
                return self
                    .reply(error(
                        tag,
                        "unknown-ack-id",
                        "no consumer of this connection holds this ack id; name the `subscription`",
                    ))
                    .await;
            }
        };
        let Some(subs) = self.s.subscriptions.clone() else {
            return self
                .reply(error(
                    tag,
                    "subscriptions-unavailable",
                    "subscriptions are not running",
                ))
                .await;
        };
        let Ok(permit) = self.publishes.clone().acquire_owned().await else {
            return;
        };
        // The queue's sender keeps the writer from closing the socket before the reply is out.
        let (tx, sink, stall) = (self.tx.clone(), self.sink.clone(), self.s.push.max_behind);
        tokio::spawn(async move {
            let ids = [ack_id.clone()];
            let result = if nack {
                subs.nack(&name, &ids, delay_ms).await
            } else {
                subs.ack(&name, &ids).await
            };
            let reply = match result {
                Ok(results) => {
                    if let Some(c) = &credit {
                        c.release(&ack_id);
                    }
                    consume::settled(
                        if nack { "nacked" } else { "acked" },
                        &name,
                        &ack_id,
                        results.first().copied().unwrap_or("unknown"),
                    )
                }
                Err(e) => {
                    let api: ApiError = e.into();
                    error(Some(("ack_id", &ack_id)), api.kind, api.detail.clone())
                }
            };
            reply_now(&sink, stall, reply).await;
            drop((tx, permit));
        });
    }

    async fn unsubscribe(&mut self, v: &Value) {
        if let Some(name) = v.get("subscription").and_then(Value::as_str) {
            return match self.consumers.remove(name) {
                Some((_, h)) => {
                    // Ended before the reply: nothing of it follows `unsubscribed`.
                    h.abort();
                    let _ = h.await;
                    self.reply(json!({"op": "unsubscribed", "subscription": name}))
                        .await
                }
                None => {
                    self.reply(error(
                        Some(("subscription", name)),
                        "unknown-subscription",
                        "this connection does not consume this subscription",
                    ))
                    .await
                }
            };
        }
        let Some(id) = v.get("id").and_then(Value::as_str) else {
            return self
                .reply(error(None, "malformed", "unsubscribe needs a string `id`"))
                .await;
        };
        match self.subs.remove(id) {
            Some(h) => {
                // Ended before the reply: no event of it follows `unsubscribed`.
                h.abort();
                let _ = h.await;
                self.reply(json!({"op": "unsubscribed", "id": id})).await;
            }
            None => {
                self.reply(error(
                    Some(("id", id)),
                    "unknown-subscription",
                    "no open subscription has this id",
                ))
                .await
            }
        }
    }

    async fn publish(&mut self, v: Value) {
        let reference = v.get("ref").and_then(Value::as_str).map(str::to_string);
        let tag = reference.as_deref().map(|r| ("ref", r));
        let Some(topic) = v.get("topic").and_then(Value::as_str).map(str::to_string) else {
            return self
                .reply(error(tag, "malformed", "publish needs a string `topic`"))
                .await;
        };
        let Some(event) = v.get("event").cloned() else {
            return self
                .reply(error(tag, "malformed", "publish needs an `event`"))
                .await;
        };
        let event = match Event::from_json(event) {
            Ok(e) => e,
            Err(e) => {
                let api: ApiError = BrokerError::InvalidEvent { index: 0, error: e }.into();
                return self.reply(error(tag, api.kind, api.detail.clone())).await;
            }
        };
        // Publishes run beside the reading of further messages, a bounded number at a time.
        let Ok(permit) = self.publishes.clone().acquire_owned().await else {
            return;
        };
        // The queue's sender keeps the writer from closing the socket before the reply is out.
        let (broker, tx) = (self.s.broker.clone(), self.tx.clone());
        let (sink, stall) = (self.sink.clone(), self.s.push.max_behind);
        tokio::spawn(async move {
            let reply = match broker.publish(&topic, vec![event]).await {
                Ok(placed) => {
                    let mut v = json!({
                        "op": "published",
                        "partition": placed[0].partition,
                        "offset": placed[0].offset,
                    });
                    if let Some(r) = &reference {
                        v["ref"] = json!(r);
                    }
                    v
                }
                Err(e) => {
                    let api: ApiError = e.into();
                    error(
                        reference.as_deref().map(|r| ("ref", r)),
                        api.kind,
                        api.detail.clone(),
                    )
                }
            };
            reply_now(&sink, stall, reply).await;
            drop((tx, permit));
        });
    }
}

/// Feeds one subscription's events into the connection's queue until it ends.
async fn run_subscription(
    id: String,
    mut feed: Feed,
    tx: mpsc::Sender<Out>,
    closer: Closer,
    max_behind: Duration,
) {
    let sub = serde_json::to_string(&id).unwrap_or_default();
    let mut deliveries = Deliveries::of("websocket");
    // The events at hand are queued together (one reservation of room in the queue for all).
    let most = WS_BATCH_EVENTS.min(tx.max_capacity()).max(1);
    let mut batch: Vec<(String, std::time::Instant)> = Vec::with_capacity(most);
    loop {
        let reason = match feed.next().await {
            Ok(e) => {
                batch.push((event_message(&sub, &feed, &e), e.seen_at));
                while batch.len() < most
                    && let Some(e) = feed.try_next()
                {
                    batch.push((event_message(&sub, &feed, &e), e.seen_at));
                }
                let n = batch.len();
                // Queued at once when there is room; only a full queue starts the clock (a timer
                // per delivery costs more than the delivery at fan-out rates).
                let room = match tx.try_reserve_many(n) {
                    Ok(permits) => Ok(Ok(permits)),
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                    Err(mpsc::error::TrySendError::Full(())) => {
                        tokio::time::timeout(max_behind, tx.reserve_many(n)).await
                    }
                };
                match room {
                    Ok(Ok(permits)) => {
                        for (permit, (msg, seen_at)) in permits.zip(batch.drain(..)) {
                            permit.send(Out::Text(msg));
                            deliveries.delivered(seen_at);
                        }
                        continue;
                    }
                    Ok(Err(_)) => return,
                    Err(_) => format!(
                        "slow consumer: subscription {id} could not queue an event for {max_behind:?}"
                    ),
                }
            }
            Err(FeedError::SlowConsumer(d)) => {
                format!("slow consumer: subscription {id} behind the live tail for more than {d:?}")
            }
            Err(e) => {
                let v = error(Some(("id", &id)), error_code(&e), e.to_string());
                let _ = tx.send(Out::Text(v.to_string())).await;
                return;
            }
        };
        close_with(&closer, CLOSE_SLOW_CONSUMER, reason).await;
        return;
    }
}

/// Events of a subscription queued together at most.
const WS_BATCH_EVENTS: usize = 64;

/// A subscription's `event` message.
fn event_message(sub: &str, feed: &Feed, e: &LiveEvent) -> String {
    let mut msg = String::with_capacity(e.json.len() + sub.len() + 96);
    msg.push_str("{\"op\":\"event\",\"sub\":");
    msg.push_str(sub);
    msg.push(',');
    push_event_end(&mut msg, feed.version(), e);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_give_the_next_offset_per_partition_and_refuse_the_rest() {
        assert_eq!(
            parse_cursor("0:41, 1:-1,7:0"),
            Ok(HashMap::from([(0, 42), (1, 0), (7, 1)]))
        );
        let last = i64::MAX - 1;
        assert_eq!(
            parse_cursor(&format!("0:{last}")),
            Ok(HashMap::from([(0, i64::MAX as u64)]))
        );
        for bad in [
            "",
            "0",
            "0:",
            ":1",
            "0:-2",
            "0:1,0:2",
            "-1:0",
            "4294967296:0",
            "0:9223372036854775807",
            "0:9223372036854775808",
            "0:1;1:2",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
        // What an event's cursor says reads back as the position after it, in the topic
        // created then.
        let mut cursor = String::new();
        push_cursor(&mut cursor, &[42, 0, 1], 1_700_000_000_123);
        assert_eq!(cursor, "0:41,1:-1,2:0@1700000000123");
        let (offsets, created) = split_cursor(&cursor).unwrap();
        assert_eq!(created, Some(1_700_000_000_123));
        assert_eq!(
            parse_cursor(offsets),
            Ok(HashMap::from([(0, 42), (1, 0), (2, 1)]))
        );
        // Cursors of earlier versions have no creation time.
        assert_eq!(split_cursor("0:41"), Ok(("0:41", None)));
        for bad in ["0:41@", "0:41@x", "0:41@1@2"] {
            assert!(split_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
