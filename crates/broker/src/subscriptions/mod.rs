//! Durable subscriptions: server-side cursors over a topic with per-message ack, retry with
//! backoff, a dead-letter topic and redrive.
//!
//! State lives in memory ([`state::Sub`]) and every change to it is first written to the internal
//! topic `__subscriptions`, the journal (key: subscription name, value: a JSON [`Op`]). Changes are
//! journaled and applied under one lock, so the journal's order is the order of the changes; a
//! request is answered once its journal record is durable. On start the journal is read back from
//! its last snapshot (a record holding every subscription's state, written every few seconds while
//! things change); segments before a durable snapshot are deleted.
//!
//! A reader task per subscription follows the topic's durable end, filters events and journals
//! which offsets it went through and which matched, keeping at most [`WINDOW_MAX`] messages
//! pending. A ticker moves retries and ack deadlines. Dead-lettering is a move: an intent record
//! names the dead-letter partition and its end, the dead letter is written and made durable, then a
//! `dead` record settles the message; after a crash between the two, the dead-letter partition is
//! searched from the intent's offset, so each message ends up in exactly one place.

pub mod state;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spate_log::batch::{self, NewRecord};
use spate_log::{Appended, Partition, TopicConfig};
use thiserror::Error;
use tokio::sync::Notify;

use crate::event::write_record_json;
use crate::filter::{Filter, FilterInput, Verdict};
use crate::{
    Broker, BrokerError, Event, blocking, now_ms, read_budget, read_events, read_offsets,
    read_records_within,
};
pub use state::HeldEvent;
pub use state::{
    Backoff, Config, MsgId, Op, Ordering, PushConfig, SECRET_SHOWN, Settle, Source, Stats,
    signing_key,
};
use state::{Found, State, Sub, key_hash};

/// The internal topic holding the journal of every subscription.
pub const JOURNAL_TOPIC: &str = "__subscriptions";
/// Messages a subscription holds pending (read ahead, in flight, waiting for a retry) at most; the
/// reader stops while the window is full.
pub const WINDOW_MAX: usize = 10_000;
/// Messages one pull returns at most.
pub const PULL_MAX: usize = 1000;
/// The longest a pull waits for messages.
pub const PULL_WAIT_MAX: Duration = Duration::from_secs(30);
/// Ack ids one ack, nack or extend request carries at most.
pub const ACK_IDS_MAX: usize = 10_000;
/// Subscriptions a server holds at most.
pub const SUBSCRIPTIONS_MAX: usize = 1000;
/// Ack timeouts and extensions allowed: 100 ms to 1 hour.
pub const ACK_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// Attempts allowed before dead-lettering.
pub const MAX_ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=1000;
/// Nack delays and backoff times allowed: up to a day.
pub const DELAY_MS_MAX: u64 = 86_400_000;
/// Records the reader takes from one partition per step.
const READ_CHUNK: usize = 500;

/// Room the reader waits for in a full window before reading again, unless nothing is ready to
/// go out: refilling a few messages at a time would read and check a whole stored batch for each.
const REFILL_ROOM: usize = READ_CHUNK;

/// How many more messages the reader of `sub` should take now: nothing while the window is nearly
/// full (see [`REFILL_ROOM`]), except when consumers would otherwise find nothing to pull.
fn reader_room(sub: &Sub) -> usize {
    if window_nearly_full(sub) && sub.ready_len() > 0 {
        0
    } else {
        WINDOW_MAX.saturating_sub(sub.msgs.len())
    }
}

/// Whether the window has less than [`REFILL_ROOM`] free, so that the reader waits while
/// messages are ready.
fn window_nearly_full(sub: &Sub) -> bool {
    WINDOW_MAX.saturating_sub(sub.msgs.len()) < REFILL_ROOM
}
/// How often retries and deadlines are checked.
const TICK: Duration = Duration::from_millis(5);
/// Journal bytes after which a snapshot is written.
const SNAPSHOT_AFTER_BYTES: u64 = 4 << 20;
/// Journal records nobody waits for (deliveries, reads) are synced at least this often.
const JOURNAL_SYNC_EVERY: Duration = Duration::from_millis(100);
/// A snapshot is also written this often while anything changed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum SubError {
    #[error("subscription {0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the server is stopping")]
    Stopping,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<spate_log::Error> for SubError {
    fn from(e: spate_log::Error) -> Self {
        SubError::Broker(e.into())
    }
}

pub type Result<T, E = SubError> = std::result::Result<T, E>;

/// The body of `PUT /v1/subscriptions/{name}`: everything but `topic` is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub topic: String,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub types: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub ack_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<Backoff>,
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    #[serde(default)]
    pub ordering: Option<Ordering>,
    #[serde(default)]
    pub push: Option<PushConfig>,
}

/// Where a read position goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Earliest,
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Time(i64),
}

impl Position {
    pub fn parse(s: &str) -> Result<Position> {
        match s {
            "earliest" => Ok(Position::Earliest),
            "latest" => Ok(Position::Latest),
            t => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|t| Position::Time((t.unix_timestamp_nanos() / 1_000_000) as i64))
                .map_err(|_| {
                    SubError::Invalid(format!(
                        "position {t:?} is not \"earliest\", \"latest\" or an RFC 3339 time"
                    ))
                }),
        }
    }
}

fn validate_name(kind: &str, name: &str) -> Result<()> {
    spate_log::config::validate_topic_name(name)
        .map_err(|e| SubError::Invalid(format!("invalid {kind} name: {e}")))
}

impl Spec {
    /// Checks the definition and fills defaults.
    pub fn validate(self) -> Result<Config> {
        let bad = |m: String| Err(SubError::Invalid(m));
        validate_name("topic", &self.topic)?;
        if crate::is_internal(&self.topic) {
            return bad(format!("topic {} is internal", self.topic));
        }
        Filter::new(self.filter.as_deref(), self.types.as_deref())
            .map_err(|e| SubError::Invalid(format!("invalid filter: {e}")))?;
        let from = self.from.unwrap_or_else(|| "latest".into());
        Position::parse(&from)?;
        let ack_timeout_ms = self.ack_timeout_ms.unwrap_or(30_000);
        if !ACK_TIMEOUT_MS.contains(&ack_timeout_ms) {
            return bad(format!(
                "ack_timeout_ms must be within {}..={}, got {ack_timeout_ms}",
                ACK_TIMEOUT_MS.start(),
                ACK_TIMEOUT_MS.end()
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(5);
        if !MAX_ATTEMPTS.contains(&max_attempts) {
            return bad(format!(
                "max_attempts must be within {}..={}, got {max_attempts}",
                MAX_ATTEMPTS.start(),
                MAX_ATTEMPTS.end()
            ));
        }
        let backoff = self.backoff.unwrap_or_default();
        if backoff.max_ms > DELAY_MS_MAX || backoff.initial_ms > backoff.max_ms {
            return bad(format!(
                "backoff needs initial_ms <= max_ms <= {DELAY_MS_MAX}, got {} and {}",
                backoff.initial_ms, backoff.max_ms
            ));
        }
        if !(1.0..=100.0).contains(&backoff.multiplier) {
            return bad(format!(
                "backoff.multiplier must be within 1.0..=100.0, got {}",
                backoff.multiplier
            ));
        }
        let dead_letter_topic = self
            .dead_letter_topic
            .unwrap_or_else(|| format!("{}.dlq", self.topic));
        validate_name("dead_letter_topic", &dead_letter_topic)?;
        if dead_letter_topic == self.topic || crate::is_internal(&dead_letter_topic) {
            return bad(format!(
                "dead_letter_topic {dead_letter_topic} must be another, non-internal topic"
            ));
        }
        if let Some(push) = &self.push {
            let rest = push
                .url
                .strip_prefix("http://")
                .or_else(|| push.url.strip_prefix("https://"))
                .ok_or_else(|| {
                    SubError::Invalid(format!(
                        "push.url must be an http:// or https:// URL, got {:?}",
                        push.url
                    ))
                })?;
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() || push.url.len() > 2048 || push.url.contains(char::is_whitespace) {
                return bad(format!("push.url {:?} is not a valid URL", push.url));
            }
            if !(1..=300_000).contains(&push.timeout_ms) {
                return bad("push.timeout_ms must be within 1..=300000".into());
            }
            if !(1..=1000).contains(&push.max_in_flight) {
                return bad("push.max_in_flight must be within 1..=1000".into());
            }
            push.check_headers_and_secret().map_err(SubError::Invalid)?;
        }
        Ok(Config {
            topic: self.topic,
            filter: self.filter,
            types: self.types,
            from,
            ack_timeout_ms,
            max_attempts,
            backoff,
            dead_letter_topic,
            ordering: self.ordering.unwrap_or_default(),
            push: self.push,
        })
    }
}

/// An ack id: the message and the delivery it belongs to, as `t.<partition>.<offset>.<attempt>`
/// (`d.` for redriven dead letters), followed by `.<epoch>` for a message read after a seek (see
/// [`state::Sub::epoch`]).
pub fn ack_id(id: MsgId, attempt: u32, epoch: u32) -> String {
    let s = match id.0 {
        Source::Topic => 't',
        Source::DeadLetters => 'd',
    };
    let mut out = String::with_capacity(32);
    out.push(s);
    for n in [u64::from(id.1), id.2, u64::from(attempt)] {
        out.push('.');
        crate::event::push_u64(&mut out, n);
    }
    // Epoch 0 (no seek yet) keeps the form ack ids always had.
    if epoch != 0 {
        out.push('.');
        crate::event::push_u64(&mut out, u64::from(epoch));
    }
    out
}

/// Parses an ack id into the message, the attempt and the epoch; `None` when malformed.
pub fn parse_ack_id(s: &str) -> Option<(MsgId, u32, u32)> {
    let mut it = s.split('.');
    let source = match it.next()? {
        "t" => Source::Topic,
        "d" => Source::DeadLetters,
        _ => return None,
    };
    let partition = it.next()?.parse().ok()?;
    let offset = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    let epoch = match it.next() {
        None => 0,
        Some(e) => e.parse().ok().filter(|e| *e != 0)?,
    };
    if it.next().is_some() {
        return None;
    }
    Some(((source, partition, offset), attempt, epoch))
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub ack_id: String,
    pub attempt: u32,
    /// The topic it was read from: the subscription's, or the dead-letter topic for redriven
    /// dead letters.
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub event: HeldEvent,
}

/// Acks applied and journaled whose journal write may not be durable yet.
pub struct UnsyncedAcks(Outcome);

/// What an ack, nack or extend did with one ack id: `ok`, `unknown`, `expired` or `malformed`.
/// Results come one per ack id, in request order.
pub type SettleResult = &'static str;

fn settle_name(s: Settle) -> &'static str {
    match s {
        Settle::Ok => "ok",
        Settle::Unknown => "unknown",
        Settle::Expired => "expired",
    }
}

/// A subscription as shown by the API: its definition and live counts.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub name: String,
    #[serde(flatten)]
    pub config: Config,
    pub created: String,
    pub stats: LiveStats,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LiveStats {
    /// Messages waiting for delivery: pending ones not in flight, plus records of the topic not
    /// yet read (counted before filtering, so an upper bound).
    pub backlog: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub redelivered: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    /// Age of the oldest unsettled message (from its record time); 0 when none.
    pub oldest_unacked_age_ms: u64,
}

/// A dead letter of a subscription.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: u32,
    pub offset: u64,
    pub event: Event,
}

/// What settling ack ids did: per-id results, the journal record to wait for, messages now
/// doomed, and the subscription's uid.
struct Outcome {
    results: Vec<SettleResult>,
    appended: Option<Appended>,
    doomed: Vec<MsgId>,
    uid: u64,
}

struct Entry {
    sub: Sub,
    filter: Arc<Filter>,
    /// Wakes pulls when messages become ready.
    ready: Arc<Notify>,
    /// Wakes the reader when the window has room or the positions moved.
    wake: Arc<Notify>,
    /// Bumped when the positions or the definition change under the reader.
    generation: u64,
}

struct Inner {
    subs: BTreeMap<String, Entry>,
    /// Journal bytes written since the last snapshot.
    since_snapshot: u64,
}

/// The subscriptions of a server.
pub struct Subscriptions {
    broker: Arc<Broker>,
    journal: Arc<Partition>,
    journal_config: TopicConfig,
    inner: Mutex<Inner>,
    /// Set once the server stops: nothing more is written to the journal.
    stopped: std::sync::atomic::AtomicBool,
}

fn compile(config: &Config) -> Arc<Filter> {
    // Definitions were validated before they were journaled.
    let filter =
        crate::filter::stored(|| Filter::new(config.filter.as_deref(), config.types.as_deref()));
    Arc::new(filter.unwrap_or_default())
}

fn entry(sub: Sub) -> Entry {
    Entry {
        filter: compile(&sub.config),
        sub,
        ready: Arc::new(Notify::new()),
        wake: Arc::new(Notify::new()),
        generation: 0,
    }
}

impl Subscriptions {
    /// Opens the journal (creating it when absent) and rebuilds every subscription from it
    /// (blocking). Call [`Subscriptions::start`] next.
    pub fn open(broker: Arc<Broker>) -> Result<Arc<Subscriptions>> {
        let log = broker.log().clone();
        let topic = match log.topic(JOURNAL_TOPIC) {
            Ok(t) => t,
            Err(spate_log::Error::UnknownTopic(_)) => {
                let config = TopicConfig {
                    partitions: 1,
                    // The journal shrinks by snapshots, never by age.
                    retention_ms: None,
                    // Snapshots are single records: as large as a record may be.
                    segment_bytes: spate_log::config::MESSAGE_BYTES_MAX,
                    max_message_bytes: spate_log::config::MESSAGE_BYTES_MAX,
                    ..TopicConfig::default()
                };
                log.create_topic(JOURNAL_TOPIC, config, now_ms())?
            }
            Err(e) => return Err(e.into()),
        };
        let journal = topic.partition(0)?.clone();
        let mut subs: BTreeMap<String, Sub> = BTreeMap::new();
        let mut offset = journal.log_start_offset();
        let mut records = 0u64;
        while offset < journal.high_watermark() {
            let bytes = journal.read(offset, 1 << 20)?;
            if bytes.is_empty() {
                break;
            }
            for (at, h) in batch::headers(&bytes).map_err(spate_log::Error::from)? {
                let whole = &bytes[at..at + h.total_bytes() as usize];
                for r in batch::decode(whole).map_err(spate_log::Error::from)? {
                    records += 1;
                    let name = r
                        .key
                        .as_deref()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default();
                    let op: Op = match r.value.as_deref().map(serde_json::from_slice) {
                        Some(Ok(op)) => op,
                        _ => {
                            return Err(SubError::Broker(BrokerError::Internal(format!(
                                "unreadable subscription journal record at offset {}",
                                r.offset
                            ))));
                        }
                    };
                    replay(&mut subs, &name, r.offset as u64, op);
                }
                offset = h.base_offset as u64 + h.offset_count();
            }
        }
        let now = now_ms();
        let mut inner = Inner {
            subs: BTreeMap::new(),
            since_snapshot: 0,
        };
        for (name, mut sub) in subs {
            sub.recover(now);
            inner.subs.insert(name, entry(sub));
        }
        tracing::info!(
            subscriptions = inner.subs.len(),
            journal_records = records,
            "subscriptions loaded"
        );
        Ok(Arc::new(Subscriptions {
            broker,
            journal,
            journal_config: topic.config(),
            inner: Mutex::new(inner),
            stopped: Default::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the readers, the dead-letter moves left over from before a restart, and the ticker
    /// that runs until `shutdown` resolves.
    pub fn start(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let work: Vec<(String, u64, Vec<MsgId>)> = {
            let inner = self.lock();
            inner
                .subs
                .iter()
                .map(|(name, e)| {
                    let mut ids = e.sub.doomed();
                    ids.extend(e.sub.dead_lettering());
                    (name.clone(), e.sub.uid, ids)
                })
                .collect()
        };
        for (name, uid, ids) in work {
            tokio::spawn(self.clone().reader(name.clone(), uid));
            for id in ids {
                tokio::spawn(self.clone().dead_letter(name.clone(), uid, id));
            }
        }
        tokio::spawn(self.clone().ticker(shutdown));
    }

    /// Appends one journal record, under the lock, without waiting for it to be durable.
    fn write(&self, inner: &mut Inner, name: &str, op: &Op) -> Result<Appended> {
        let mut bytes = encode(name, op)?;
        self.append(inner, &mut bytes)
    }

    /// Appends an encoded journal record (see [`encode`]), under the lock.
    fn append(&self, inner: &mut Inner, bytes: &mut [u8]) -> Result<Appended> {
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Err(SubError::Stopping);
        }
        inner.since_snapshot += bytes.len() as u64;
        Ok(self
            .journal
            .append_unsynced(bytes, now_ms(), &self.journal_config)?)
    }

    async fn durable(&self, appended: Appended) -> Result<()> {
        self.broker
            .acknowledgeable(&self.journal, appended)
            .await
            .map_err(SubError::from)
    }

    /// Creates or updates a subscription; `true` when created.
    pub async fn put(self: &Arc<Self>, name: &str, spec: Spec) -> Result<(bool, Info)> {
        validate_name("subscription", name)?;
        let config = spec.validate()?;
        let topic = self.broker.topic(&config.topic)?;
        let exists = self.lock().subs.contains_key(name);
        let start = if exists {
            None
        } else {
            Some(resolve(&topic, Position::parse(&config.from)?).await?)
        };
        let (appended, created, uid) = {
            let mut inner = self.lock();
            match inner.subs.get(name) {
                Some(e) => {
                    if e.sub.config.topic != config.topic {
                        return Err(SubError::Conflict(format!(
                            "subscription {name} reads topic {}; delete it to read another",
                            e.sub.config.topic
                        )));
                    }
                    if e.sub.config == config {
                        let info = self.info_of(name, e);
                        return Ok((false, info));
                    }
                    let op = Op::Define {
                        config: Box::new(config.clone()),
                        start: None,
                        created_ms: e.sub.created_ms,
                        topic_created_ms: None,
                    };
                    let a = self.write(&mut inner, name, &op)?;
                    let e = inner.subs.get_mut(name).expect("checked above");
                    e.sub.apply(&op);
                    e.filter = compile(&config);
                    e.generation += 1;
                    e.wake.notify_one();
                    e.ready.notify_waiters();
                    (a, false, e.sub.uid)
                }
                None => {
                    if inner.subs.len() >= SUBSCRIPTIONS_MAX {
                        return Err(SubError::Invalid(format!(
                            "a server holds at most {SUBSCRIPTIONS_MAX} subscriptions"
                        )));
                    }
                    let created_ms = now_ms();
                    let positions = start.clone().unwrap_or_default();
                    let op = Op::Define {
                        config: Box::new(config.clone()),
                        start: Some(positions.clone()),
                        created_ms,
                        topic_created_ms: Some(topic.created_ms),
                    };
                    let a = self.write(&mut inner, name, &op)?;
                    let mut sub = Sub::new(a.base_offset, config, created_ms, positions);
                    sub.topic_created_ms = Some(topic.created_ms);
                    inner.subs.insert(name.to_string(), entry(sub));
                    (a, true, a.base_offset)
                }
            }
        };
        self.durable(appended).await?;
        if created {
            tokio::spawn(self.clone().reader(name.to_string(), uid));
        }
        Ok((created, self.info(name)?))
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let appended = {
            let mut inner = self.lock();
            if !inner.subs.contains_key(name) {
                return Err(SubError::NotFound(name.to_string()));
            }
            let a = self.write(&mut inner, name, &Op::Delete)?;
            let e = inner.subs.remove(name).expect("checked above");
            e.wake.notify_one();
            e.ready.notify_waiters();
            a
        };
        self.durable(appended).await?;
        for gauge in [
            "spate_subscription_backlog",
            "spate_subscription_oldest_unacked_seconds",
        ] {
            metrics::gauge!(gauge, "subscription" => name.to_string()).set(0.0);
        }
        Ok(())
    }

    pub fn info(&self, name: &str) -> Result<Info> {
        let inner = self.lock();
        let e = inner
            .subs
            .get(name)
            .ok_or_else(|| SubError::NotFound(name.to_string()))?;
        Ok(self.info_of(name, e))
    }

    pub fn list(&self) -> Vec<Info> {
        let inner = self.lock();
        inner
            .subs
            .iter()
            .map(|(name, e)| self.info_of(name, e))
            .collect()
    }

    /// Names of the subscriptions with webhook delivery, with their definitions.
    pub fn pushing(&self) -> Vec<(String, u64, PushConfig)> {
        let inner = self.lock();
        inner
            .subs
            .iter()
            .filter_map(|(name, e)| {
                e.sub
                    .config
                    .push
                    .clone()
                    .map(|p| (name.clone(), e.sub.uid, p))
            })
            .collect()
    }

    /// Which of `ack_ids` are deliveries still in flight, for consumers that count their credit.
    pub fn still_in_flight(&self, name: &str, ack_ids: &[String]) -> Vec<bool> {
        let inner = self.lock();
        let Some(e) = inner.subs.get(name) else {
            return vec![false; ack_ids.len()];
        };
        ack_ids
            .iter()
            .map(|a| {
                parse_ack_id(a).is_some_and(|(id, attempt, epoch)| {
                    e.sub.check_in_flight(id, attempt, epoch) == Settle::Ok
                })
            })
            .collect()
    }

    /// The uid and webhook definition of subscription `name`, while it exists.
    pub fn push_config(&self, name: &str) -> Option<(u64, Option<PushConfig>)> {
        self.lock()
            .subs
            .get(name)
            .map(|e| (e.sub.uid, e.sub.config.push.clone()))
    }

    /// Whether subscription `name` is still the one created as `uid`.
    pub fn is_current(&self, name: &str, uid: u64) -> bool {
        self.lock().subs.get(name).is_some_and(|e| e.sub.uid == uid)
    }

    fn info_of(&self, name: &str, e: &Entry) -> Info {
        let sub = &e.sub;
        let unread: u64 = self
            .broker
            .topic(&sub.config.topic)
            .map(|t| {
                t.partitions
                    .iter()
                    .zip(&sub.positions)
                    .map(|(p, pos)| p.high_watermark().saturating_sub(*pos))
                    .sum()
            })
            .unwrap_or(0);
        let now = now_ms();
        let mut config = sub.config.clone();
        if let Some(secret) = config.push.as_mut().and_then(|p| p.secret.as_mut()) {
            *secret = state::SECRET_SHOWN.into();
        }
        Info {
            name: name.to_string(),
            config,
            created: crate::event::now_rfc3339(sub.created_ms),
            stats: LiveStats {
                backlog: sub.waiting() as u64 + unread,
                in_flight: sub.in_flight() as u64,
                delivered: sub.stats.delivered,
                acked: sub.stats.acked,
                nacked: sub.stats.nacked,
                redelivered: sub.stats.redelivered,
                expired: sub.stats.expired,
                dead_lettered: sub.stats.dead_lettered,
                oldest_unacked_age_ms: sub
                    .oldest_timestamp()
                    .map_or(0, |t| now.saturating_sub(t).max(0) as u64),
            },
        }
    }

    /// Delivers up to `max` messages, waiting up to `wait` for the first. Each delivery is
    /// journaled (it counts an attempt) before it is returned.
    pub async fn pull(&self, name: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let max = max.clamp(1, PULL_MAX);
        let deadline = tokio::time::Instant::now() + wait.min(PULL_WAIT_MAX);
        loop {
            if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(Vec::new());
            }
            let ready = {
                let inner = self.lock();
                inner
                    .subs
                    .get(name)
                    .ok_or_else(|| SubError::NotFound(name.to_string()))?
                    .ready
                    .clone()
            };
            let notified = ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = {
                let mut inner = self.lock();
                let e = inner
                    .subs
                    .get_mut(name)
                    .ok_or_else(|| SubError::NotFound(name.to_string()))?;
                let ids = e.sub.next_ready(max);
                if ids.is_empty() {
                    None
                } else {
                    let op = Op::Deliver {
                        ids: ids.clone(),
                        deadline: now_ms() + e.sub.config.ack_timeout_ms as i64,
                    };
                    let a = self.write(&mut inner, name, &op)?;
                    let e = inner.subs.get_mut(name).expect("checked above");
                    e.sub.apply(&op);
                    if e.sub.ready_len() == 0 && window_nearly_full(&e.sub) {
                        // The reader waits for more room (see `reader_room`) unless nothing is
                        // ready, as now: it may fill what is left of the window.
                        e.wake.notify_one();
                    }
                    let topic = (e.sub.config.topic.clone(), e.sub.topic_created_ms);
                    let dlq = (e.sub.config.dead_letter_topic.clone(), e.sub.dlq_created_ms);
                    // Webhooks send events in binary mode: one held only as JSON is read again.
                    let decoded = e.sub.config.push.is_some();
                    let out: Vec<(MsgId, (u32, u32), Option<HeldEvent>)> = ids
                        .iter()
                        .filter_map(|id| {
                            e.sub.msgs.get(id).map(|m| {
                                let event = m.event.clone().filter(|held| {
                                    !decoded || matches!(held, HeldEvent::Decoded(_))
                                });
                                (*id, (m.attempt, m.epoch), event)
                            })
                        })
                        .collect();
                    Some((a, out, topic, dlq))
                }
            };
            if let Some((_, out, topic, dlq)) = taken {
                // The delivery is journaled but not waited for: the ack that follows waits for it
                // (the journal is synced in order), and the ticker syncs what is left within
                // JOURNAL_SYNC_EVERY. A process crash loses nothing; a power loss may forget that a
                // delivery just made counted as an attempt.
                return self
                    .deliveries(name, out, &topic.0, topic.1, (&dlq.0, dlq.1))
                    .await;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// Turns delivered messages into deliveries, reading events not held in memory.
    async fn deliveries(
        &self,
        name: &str,
        out: Vec<(MsgId, (u32, u32), Option<HeldEvent>)>,
        topic: &str,
        topic_created_ms: Option<i64>,
        dlq: (&str, Option<i64>),
    ) -> Result<Vec<Delivery>> {
        let missing: Vec<MsgId> = out
            .iter()
            .filter(|(_, _, e)| e.is_none())
            .map(|(id, _, _)| *id)
            .collect();
        let loaded = if missing.is_empty() {
            BTreeMap::new()
        } else {
            self.load(&missing, (topic, topic_created_ms), dlq).await?
        };
        let mut lost = Vec::new();
        let mut deliveries = Vec::with_capacity(out.len());
        let (topic, dlq): (Arc<str>, Arc<str>) = (topic.into(), dlq.0.into());
        for (id, (attempt, epoch), event) in out {
            let Some(event) =
                event.or_else(|| loaded.get(&id).map(|e| HeldEvent::Decoded(e.clone())))
            else {
                lost.push(id);
                continue;
            };
            deliveries.push(Delivery {
                ack_id: ack_id(id, attempt, epoch),
                attempt,
                topic: match id.0 {
                    Source::Topic => topic.clone(),
                    Source::DeadLetters => dlq.clone(),
                },
                partition: id.1,
                offset: id.2,
                event,
            });
        }
        crate::stats::delivered(deliveries.len() as u64);
        if !lost.is_empty() {
            // Retention removed them from the log: nothing is left to deliver.
            tracing::warn!(
                subscription = name,
                messages = lost.len(),
                "pending messages no longer in the log"
            );
            let mut inner = self.lock();
            if inner.subs.contains_key(name) {
                let op = Op::Ack { ids: lost };
                if self.write(&mut inner, name, &op).is_ok()
                    && let Some(e) = inner.subs.get_mut(name)
                {
                    e.sub.apply(&op);
                }
            }
        }
        Ok(deliveries)
    }

    /// Reads the events of messages from the log.
    /// Messages of the subscription's topic are read only from the topic created at
    /// `topic_created_ms` (when known): one created again since holds other events.
    async fn load(
        &self,
        ids: &[MsgId],
        (topic, topic_created_ms): (&str, Option<i64>),
        (dlq, dlq_created_ms): (&str, Option<i64>),
    ) -> Result<BTreeMap<MsgId, Arc<Event>>> {
        let mut by_part: BTreeMap<(Source, u32), Vec<u64>> = BTreeMap::new();
        for id in ids {
            by_part.entry((id.0, id.1)).or_default().push(id.2);
        }
        let mut out = BTreeMap::new();
        for ((source, partition), mut offsets) in by_part {
            offsets.sort_unstable();
            let name = match source {
                Source::Topic => topic,
                Source::DeadLetters => dlq,
            };
            let Ok(t) = self.broker.topic(name) else {
                continue;
            };
            let created = match source {
                Source::Topic => topic_created_ms,
                Source::DeadLetters => dlq_created_ms,
            };
            if created.is_some_and(|c| c != t.created_ms) {
                continue;
            }
            let Ok(p) = t.partition(partition).cloned() else {
                continue;
            };
            let name = name.to_string();
            let events =
                blocking(move || read_offsets(&p, &name, partition, &offsets, 1 << 20)).await?;
            for e in events {
                out.insert((source, partition, e.offset), Arc::new(e.event));
            }
        }
        Ok(out)
    }

    /// Settles messages: `op` builds the journal operation from the accepted ids.
    fn settle(
        &self,
        name: &str,
        ack_ids: &[impl AsRef<str>],
        in_flight_only: bool,
        op: impl FnOnce(&Sub, Vec<MsgId>) -> Op,
    ) -> Result<Outcome> {
        if ack_ids.len() > ACK_IDS_MAX {
            return Err(SubError::Invalid(format!(
                "at most {ACK_IDS_MAX} ack ids per request"
            )));
        }
        let mut inner = self.lock();
        let e = inner
            .subs
            .get(name)
            .ok_or_else(|| SubError::NotFound(name.to_string()))?;
        let mut results = Vec::with_capacity(ack_ids.len());
        let mut ok = Vec::with_capacity(ack_ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ack_ids.len());
        for s in ack_ids {
            let verdict = match parse_ack_id(s.as_ref()) {
                None => "malformed",
                Some((id, attempt, epoch)) => {
                    let v = if in_flight_only {
                        e.sub.check_in_flight(id, attempt, epoch)
                    } else {
                        e.sub.check(id, attempt, epoch)
                    };
                    if v == Settle::Ok {
                        if !seen.insert(id) {
                            // Twice in one request: settled by the first.
                            "unknown"
                        } else {
                            ok.push(id);
                            "ok"
                        }
                    } else {
                        settle_name(v)
                    }
                }
            };
            results.push(verdict);
        }
        if ok.is_empty() {
            return Ok(Outcome {
                results,
                appended: None,
                doomed: Vec::new(),
                uid: e.sub.uid,
            });
        }
        let op = op(&e.sub, ok.clone());
        let a = self.write(&mut inner, name, &op)?;
        let e = inner.subs.get_mut(name).expect("checked above");
        e.sub.apply(&op);
        let doomed: Vec<MsgId> = ok
            .into_iter()
            .filter(|id| {
                matches!(
                    e.sub.msgs.get(id).map(|m| &m.state),
                    Some(State::Doomed { .. })
                )
            })
            .collect();
        if e.sub.ready_len() > 0 {
            e.ready.notify_waiters();
        }
        if reader_room(&e.sub) > 0 {
            e.wake.notify_one();
        }
        Ok(Outcome {
            results,
            appended: Some(a),
            doomed,
            uid: e.sub.uid,
        })
    }

    async fn settled(self: &Arc<Self>, name: &str, outcome: Outcome) -> Result<Vec<SettleResult>> {
        let Outcome {
            results,
            appended,
            doomed,
            uid,
        } = outcome;
        if let Some(a) = appended {
            self.durable(a).await?;
        }
        for id in doomed {
            tokio::spawn(self.clone().dead_letter(name.to_string(), uid, id));
        }
        Ok(results)
    }

    /// Acks: once this returns, the acked messages are never delivered again.
    pub async fn ack(
        self: &Arc<Self>,
        name: &str,
        ack_ids: &[impl AsRef<str>],
    ) -> Result<Vec<SettleResult>> {
        let outcome = self.settle(name, ack_ids, false, |_, ids| Op::Ack { ids })?;
        self.settled(name, outcome).await
    }

    /// Applies and journals acks without waiting for the journal to be durable, so that other
    /// work (a pull answered together with the acks) overlaps the fsync. Nothing may be told
    /// about the acks until [`Subscriptions::acks_durable`] returns.
    pub fn ack_unsynced(&self, name: &str, ack_ids: &[impl AsRef<str>]) -> Result<UnsyncedAcks> {
        Ok(UnsyncedAcks(self.settle(
            name,
            ack_ids,
            false,
            |_, ids| Op::Ack { ids },
        )?))
    }

    /// Waits until acks from [`Subscriptions::ack_unsynced`] are durable; then they hold as if
    /// [`Subscriptions::ack`] had returned.
    pub async fn acks_durable(
        self: &Arc<Self>,
        name: &str,
        acks: UnsyncedAcks,
    ) -> Result<Vec<SettleResult>> {
        self.settled(name, acks.0).await
    }

    /// Nacks: each message is delivered again after `delay_ms`, or its backoff when not given;
    /// a message out of attempts goes to the dead-letter topic.
    pub async fn nack(
        self: &Arc<Self>,
        name: &str,
        ack_ids: &[impl AsRef<str>],
        delay_ms: Option<u64>,
    ) -> Result<Vec<SettleResult>> {
        if delay_ms.is_some_and(|d| d > DELAY_MS_MAX) {
            return Err(SubError::Invalid(format!(
                "delay_ms must be at most {DELAY_MS_MAX}"
            )));
        }
        let now = now_ms();
        let outcome = self.settle(name, ack_ids, false, |sub, ids| Op::Nack {
            items: ids
                .into_iter()
                .map(|id| {
                    let d = delay_ms.unwrap_or_else(|| sub.backoff_ms(id));
                    (id, now + d as i64)
                })
                .collect(),
        })?;
        self.settled(name, outcome).await
    }

    /// Extends the ack deadline of messages in flight to `ack_timeout_ms` from now.
    pub async fn extend(
        self: &Arc<Self>,
        name: &str,
        ack_ids: &[impl AsRef<str>],
        ack_timeout_ms: Option<u64>,
    ) -> Result<Vec<SettleResult>> {
        if let Some(t) = ack_timeout_ms
            && !ACK_TIMEOUT_MS.contains(&t)
        {
            return Err(SubError::Invalid(format!(
                "ack_timeout_ms must be within {}..={}, got {t}",
                ACK_TIMEOUT_MS.start(),
                ACK_TIMEOUT_MS.end()
            )));
        }
        let now = now_ms();
        let outcome = self.settle(name, ack_ids, true, |sub, ids| Op::Extend {
            ids,
            deadline: now + ack_timeout_ms.unwrap_or(sub.config.ack_timeout_ms) as i64,
        })?;
        self.settled(name, outcome).await
    }

    /// Moves every read position (`earliest`, `latest` or a time) and drops the pending messages
    /// of the topic: they are delivered again if the new positions are before them.
    pub async fn seek(&self, name: &str, to: Position) -> Result<()> {
        let topic_name = {
            let inner = self.lock();
            inner
                .subs
                .get(name)
                .ok_or_else(|| SubError::NotFound(name.to_string()))?
                .sub
                .config
                .topic
                .clone()
        };
        let topic = self.broker.topic(&topic_name)?;
        let positions = resolve(&topic, to).await?;
        let appended = {
            let mut inner = self.lock();
            if !inner.subs.contains_key(name) {
                return Err(SubError::NotFound(name.to_string()));
            }
            let op = Op::Seek {
                positions,
                topic_created_ms: Some(topic.created_ms),
            };
            let a = self.write(&mut inner, name, &op)?;
            let e = inner.subs.get_mut(name).expect("checked above");
            e.sub.apply(&op);
            e.generation += 1;
            e.wake.notify_one();
            e.ready.notify_waiters();
            a
        };
        self.durable(appended).await
    }

    /// Dead letters of this subscription still parked (not redriven), in order of partition and
    /// offset, after `after` (partition, offset), at most `limit`; with the position to continue
    /// from when more may follow.
    pub async fn dead_letters(
        &self,
        name: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        filter: Option<Arc<Filter>>,
    ) -> Result<(Vec<DeadLetter>, Option<(u32, u64)>)> {
        let (dlq, redriven, redriven_from) = {
            let inner = self.lock();
            let e = inner
                .subs
                .get(name)
                .ok_or_else(|| SubError::NotFound(name.to_string()))?;
            (
                e.sub.config.dead_letter_topic.clone(),
                e.sub.redriven.clone(),
                e.sub.dlq_created_ms,
            )
        };
        let Ok(topic) = self.broker.topic(&dlq) else {
            return Ok((Vec::new(), None));
        };
        // Redriven from a dead-letter topic deleted since: nothing of this one was.
        let redriven = if redriven_from.is_some_and(|c| c != topic.created_ms) {
            std::collections::BTreeSet::new()
        } else {
            redriven
        };
        let name = name.to_string();
        blocking(move || {
            let mut out = Vec::new();
            for (index, p) in topic.partitions.iter().enumerate() {
                let partition = index as u32;
                let mut offset = match after {
                    Some((ap, _)) if ap > partition => continue,
                    Some((ap, ao)) if ap == partition => ao + 1,
                    _ => 0,
                }
                .max(p.log_start_offset());
                while offset < p.high_watermark() {
                    let page = read_events(p, &topic.name, partition, offset, 1000)?;
                    if page.events.is_empty() {
                        break;
                    }
                    for r in page.events {
                        let letter = r.event.extensions.get("spatesubscription") == Some(&name)
                            && !redriven.contains(&(partition, r.offset));
                        if !letter {
                            continue;
                        }
                        if let Some(f) = &filter {
                            let input = FilterInput::new(&r.event);
                            if f.judge(&r.event, || &input) != Verdict::Match {
                                continue;
                            }
                        }
                        out.push(DeadLetter {
                            partition,
                            offset: r.offset,
                            event: r.event,
                        });
                        if out.len() == limit {
                            return Ok((out, Some((partition, r.offset))));
                        }
                    }
                    offset = page.next_offset;
                }
            }
            Ok((out, None))
        })
        .await
        .map_err(SubError::from)
    }

    /// Gives parked dead letters matching `filter` (at most `limit`) back to this subscription
    /// with fresh attempts. Returns how many.
    pub async fn redrive(&self, name: &str, filter: Option<&str>, limit: usize) -> Result<usize> {
        let filter = filter
            .map(|f| Filter::new(Some(f), None))
            .transpose()
            .map_err(|e| SubError::Invalid(format!("invalid filter: {e}")))?
            .map(Arc::new);
        let (letters, _) = self.dead_letters(name, None, limit, filter).await?;
        if letters.is_empty() {
            return Ok(0);
        }
        let appended = {
            let mut inner = self.lock();
            let e = inner
                .subs
                .get(name)
                .ok_or_else(|| SubError::NotFound(name.to_string()))?;
            // The dead-letter topic the letters were read from, unless it went meanwhile.
            let dlq = self
                .broker
                .topic(&e.sub.config.dead_letter_topic)
                .map_err(|_| SubError::Conflict("the dead-letter topic was deleted".into()))?;
            let dlq_created_ms = dlq.created_ms;
            let retained_from: Vec<u64> = dlq
                .partitions
                .iter()
                .map(|p| p.log_start_offset())
                .collect();
            let replaced = e.sub.dlq_created_ms.is_some_and(|c| c != dlq_created_ms);
            let fresh: Vec<&DeadLetter> = letters
                .iter()
                .filter(|l| replaced || !e.sub.redriven.contains(&(l.partition, l.offset)))
                .collect();
            let op = Op::Redrive {
                dlq_created_ms: Some(dlq_created_ms),
                retained_from,
                letters: fresh
                    .iter()
                    .map(|l| {
                        let key = l.event.partition_key().map(|k| key_hash(k.as_bytes()));
                        (l.partition, Found(l.offset, now_ms(), key))
                    })
                    .collect(),
            };
            let n = fresh.len();
            let a = self.write(&mut inner, name, &op)?;
            let e = inner.subs.get_mut(name).expect("checked above");
            e.sub.apply(&op);
            for l in &letters {
                if let Some(m) = e
                    .sub
                    .msgs
                    .get_mut(&(Source::DeadLetters, l.partition, l.offset))
                {
                    m.event = Some(HeldEvent::Decoded(Arc::new(l.event.clone())));
                }
            }
            e.ready.notify_waiters();
            (a, n)
        };
        self.durable(appended.0).await?;
        Ok(appended.1)
    }

    /// Follows the topic for one subscription until it is deleted.
    async fn reader(self: Arc<Self>, name: String, uid: u64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            match self.read_step(&name, uid).await {
                Ok(Some(true)) => backoff = Duration::from_millis(100),
                Ok(Some(false)) => {}
                Ok(None) | Err(SubError::Stopping) => return,
                Err(e) => {
                    tracing::warn!(subscription = %name, error = %e, "subscription reader failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One step of a reader: reads what it can, or waits for news. `None` when the subscription
    /// is gone; `Some(true)` when it read something.
    async fn read_step(&self, name: &str, uid: u64) -> Result<Option<bool>> {
        let (topic_name, incarnation, positions, room, generation, filter, decode, wake) = {
            let inner = self.lock();
            let Some(e) = inner.subs.get(name).filter(|e| e.sub.uid == uid) else {
                return Ok(None);
            };
            (
                e.sub.config.topic.clone(),
                e.sub.topic_created_ms,
                e.sub.positions.clone(),
                reader_room(&e.sub),
                e.generation,
                e.filter.clone(),
                // Filters judge decoded events and webhooks send them in binary mode; the rest
                // only ever needs the JSON.
                !e.filter.is_empty() || e.sub.config.push.is_some(),
                e.wake.clone(),
            )
        };
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let topic = match self.broker.topic(&topic_name) {
            Ok(t) => t,
            Err(_) => {
                // The topic is gone (or not yet back): look again later.
                let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
                return Ok(Some(false));
            }
        };
        if incarnation != Some(topic.created_ms) {
            self.topic_changed(name, uid, generation, &topic)?;
            return Ok(Some(true));
        }
        // Watch the ends before looking at them, so no append goes unnoticed.
        let mut news = self.broker.watch_topic(&topic);
        let mut progressed = false;
        if room > 0 {
            for (index, p) in topic.partitions.iter().enumerate() {
                let partition = index as u32;
                let Some(&from) = positions.get(index) else {
                    break;
                };
                if from >= p.high_watermark() {
                    continue;
                }
                let part = p.clone();
                let tname = topic.name.clone();
                let limit = room.min(READ_CHUNK);
                let filter = filter.clone();
                let (to, found) = blocking(move || {
                    let start = from.max(part.log_start_offset());
                    let mut found = Vec::new();
                    if !decode {
                        let (records, next) = read_records_within(
                            &part,
                            start,
                            limit,
                            read_budget(&part, limit),
                            usize::MAX,
                            |r| {
                                let mut json =
                                    String::with_capacity(r.value.map_or(0, <[u8]>::len) + 256);
                                let facts = write_record_json(r, (&tname, partition), &mut json);
                                (json, facts)
                            },
                        )?;
                        for (offset, (json, facts)) in records {
                            let ts = facts.time_ms.unwrap_or_else(now_ms);
                            let key = facts.partition_key.map(|k| key_hash(k.as_bytes()));
                            found.push((Found(offset, ts, key), HeldEvent::Json(Arc::new(json))));
                        }
                        return Ok((next.max(start), found));
                    }
                    let page = read_events(&part, &tname, partition, start, limit)?;
                    for r in page.events {
                        let input;
                        let verdict = if filter.is_empty() {
                            Verdict::Match
                        } else {
                            input = FilterInput::new(&r.event);
                            filter.judge(&r.event, || &input)
                        };
                        if verdict == Verdict::Match {
                            let ts = event_time(&r.event);
                            let key = r.event.partition_key().map(|k| key_hash(k.as_bytes()));
                            let held = HeldEvent::Decoded(Arc::new(r.event));
                            found.push((Found(r.offset, ts, key), held));
                        }
                    }
                    Ok((page.next_offset.max(start), found))
                })
                .await?;
                if to <= from {
                    continue;
                }
                // Encoded before taking the lock, which other requests wait on.
                let op = Op::Read {
                    partition,
                    to,
                    found: found.iter().map(|(f, _)| *f).collect(),
                };
                let mut record = encode(name, &op)?;
                let mut inner = self.lock();
                let Some(e) = inner.subs.get(name).filter(|e| e.sub.uid == uid) else {
                    return Ok(None);
                };
                if e.generation != generation || e.sub.positions.get(index) != Some(&from) {
                    return Ok(Some(true));
                }
                self.append(&mut inner, &mut record)?;
                let e = inner.subs.get_mut(name).expect("checked above");
                e.sub.apply(&op);
                for (f, held) in found {
                    if let Some(m) = e.sub.msgs.get_mut(&(Source::Topic, partition, f.0)) {
                        m.event = Some(held);
                    }
                }
                if e.sub.ready_len() > 0 {
                    e.ready.notify_waiters();
                }
                progressed = true;
            }
        }
        if progressed {
            return Ok(Some(true));
        }
        // Nothing to read: wait for new records, room in the window or a change.
        tokio::select! {
            _ = news.changed(), if room > 0 => {}
            _ = woken => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        Ok(Some(false))
    }

    /// Records the topic the subscription reads when it is not the one recorded: the first time
    /// for a subscription created before topics' creation times were kept, or after its topic
    /// was deleted and created again, when it starts over at the start of the new topic and
    /// drops every message of the old one (their events are gone; the new topic holds others
    /// at the same offsets).
    fn topic_changed(
        &self,
        name: &str,
        uid: u64,
        generation: u64,
        topic: &spate_log::Topic,
    ) -> Result<()> {
        let mut inner = self.lock();
        let Some(e) = inner.subs.get(name).filter(|e| e.sub.uid == uid) else {
            return Ok(());
        };
        // A seek or a new definition came first: the reader looks again.
        if e.generation != generation {
            return Ok(());
        }
        let op = match e.sub.topic_created_ms {
            None => Op::Reading {
                topic_created_ms: topic.created_ms,
            },
            Some(c) if c == topic.created_ms => return Ok(()),
            Some(_) => Op::TopicReplaced {
                topic_created_ms: topic.created_ms,
                positions: topic
                    .partitions
                    .iter()
                    .map(|p| p.log_start_offset())
                    .collect(),
            },
        };
        self.write(&mut inner, name, &op)?;
        let e = inner.subs.get_mut(name).expect("checked above");
        e.sub.apply(&op);
        if matches!(op, Op::TopicReplaced { .. }) {
            tracing::info!(subscription = name, topic = %topic.name, "topic created again; reading it from the start");
            e.generation += 1;
            e.wake.notify_one();
            e.ready.notify_waiters();
        }
        Ok(())
    }

    /// Moves one doomed message to the dead-letter topic (see the module docs).
    async fn dead_letter(self: Arc<Self>, name: String, uid: u64, id: MsgId) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.dead_letter_step(&name, uid, id).await {
                Ok(true) | Err(SubError::Stopping) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(subscription = %name, error = %e, "dead-letter move failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One step of a dead-letter move; `true` when done (or moot).
    async fn dead_letter_step(&self, name: &str, uid: u64, id: MsgId) -> Result<bool> {
        let (config, incarnation, dlq_incarnation, state, attempt, event, partitions) = {
            let inner = self.lock();
            let Some(e) = inner.subs.get(name).filter(|e| e.sub.uid == uid) else {
                return Ok(true);
            };
            let Some(m) = e.sub.msgs.get(&id) else {
                return Ok(true);
            };
            let partitions = e.sub.positions.len() as u32;
            (
                e.sub.config.clone(),
                e.sub.topic_created_ms,
                e.sub.dlq_created_ms,
                m.state.clone(),
                m.attempt,
                // The original record, not its JSON, goes to the dead-letter topic.
                m.event.clone().and_then(|held| match held {
                    HeldEvent::Decoded(e) => Some(e),
                    HeldEvent::Json(_) => None,
                }),
                partitions,
            )
        };
        match state {
            State::Doomed { reason } => {
                let dlq = self
                    .broker
                    .topic_or_create(
                        &config.dead_letter_topic,
                        TopicConfig {
                            partitions: partitions.max(1),
                            ..TopicConfig::default()
                        },
                    )
                    .await?;
                let event = match event {
                    Some(e) => e,
                    None => {
                        let loaded = self
                            .load(
                                &[id],
                                (&config.topic, incarnation),
                                (&config.dead_letter_topic, dlq_incarnation),
                            )
                            .await?;
                        match loaded.get(&id) {
                            Some(e) => e.clone(),
                            None => {
                                self.finish(name, uid, Op::Ack { ids: vec![id] })?;
                                return Ok(true);
                            }
                        }
                    }
                };
                let n = dlq.config().partitions;
                let partition = match event.partition_key() {
                    Some(k) => crate::partitioner::partition_for_key(k.as_bytes(), n),
                    None => id.1 % n,
                };
                let appended = {
                    let mut inner = self.lock();
                    let Some(e) = inner.subs.get(name).filter(|e| e.sub.uid == uid) else {
                        return Ok(true);
                    };
                    if !matches!(
                        e.sub.msgs.get(&id).map(|m| &m.state),
                        Some(State::Doomed { .. })
                    ) {
                        return Ok(false);
                    }
                    let from = dlq.partition(partition)?.log_end_offset();
                    let op = Op::DeadIntent {
                        id,
                        reason,
                        partition,
                        from,
                    };
                    let a = self.write(&mut inner, name, &op)?;
                    let e = inner.subs.get_mut(name).expect("checked above");
                    e.sub.apply(&op);
                    if let Some(m) = e.sub.msgs.get_mut(&id) {
                        m.event = Some(HeldEvent::Decoded(event));
                    }
                    a
                };
                self.durable(appended).await?;
                Ok(false)
            }
            State::DeadLettering {
                reason,
                partition,
                from,
            } => {
                let dlq = self.broker.topic(&config.dead_letter_topic)?;
                let p = dlq.partition(partition)?.clone();
                let source_topic = match id.0 {
                    Source::Topic => config.topic.clone(),
                    Source::DeadLetters => config.dead_letter_topic.clone(),
                };
                // Written before a crash? Then it only needs settling.
                let found = {
                    let p = p.clone();
                    let (dname, sname, sub) =
                        (dlq.name.clone(), source_topic.clone(), name.to_string());
                    blocking(move || {
                        find_dead_letter(&p, &dname, partition, from, &sub, &sname, id)
                    })
                    .await?
                };
                let offset = match found {
                    Some(o) => o,
                    None => {
                        let event = match event {
                            Some(e) => e,
                            None => {
                                let loaded = self
                                    .load(
                                        &[id],
                                        (&config.topic, incarnation),
                                        (&config.dead_letter_topic, dlq_incarnation),
                                    )
                                    .await?;
                                match loaded.get(&id) {
                                    Some(e) => e.clone(),
                                    None => {
                                        self.finish(name, uid, Op::Ack { ids: vec![id] })?;
                                        return Ok(true);
                                    }
                                }
                            }
                        };
                        let mut letter = (*event).clone();
                        let ext = &mut letter.extensions;
                        ext.insert("spatedlqreason".into(), reason);
                        ext.insert("spateattempts".into(), attempt.to_string());
                        ext.insert("spatesourcetopic".into(), source_topic);
                        ext.insert("spatesourcepartition".into(), id.1.to_string());
                        ext.insert("spatesourceoffset".into(), id.2.to_string());
                        ext.insert("spatesubscription".into(), name.to_string());
                        let now = now_ms();
                        let mut bytes =
                            batch::encode(&[letter.to_record(now)]).expect("one record");
                        let config = dlq.config();
                        blocking(move || Ok(p.append(&mut bytes, now, &config)?.base_offset))
                            .await?
                    }
                };
                self.finish(
                    name,
                    uid,
                    Op::Dead {
                        id,
                        partition,
                        offset,
                    },
                )?;
                Ok(true)
            }
            // Acked or redelivered meanwhile (a late ack of the same attempt wins the race).
            _ => Ok(true),
        }
    }

    /// Journals and applies a closing operation of a dead-letter move (no need to wait: if it is
    /// lost, recovery finds the dead letter again).
    fn finish(&self, name: &str, uid: u64, op: Op) -> Result<()> {
        let mut inner = self.lock();
        if inner.subs.get(name).is_none_or(|e| e.sub.uid != uid) {
            return Ok(());
        }
        self.write(&mut inner, name, &op)?;
        let e = inner.subs.get_mut(name).expect("checked above");
        e.sub.apply(&op);
        if e.sub.ready_len() > 0 {
            e.ready.notify_waiters();
        }
        e.wake.notify_one();
        Ok(())
    }

    /// Moves retries and deadlines, updates metrics and writes snapshots until `shutdown`.
    async fn ticker(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics_every = tokio::time::interval(Duration::from_secs(1));
        let mut sync_every = tokio::time::interval(JOURNAL_SYNC_EVERY);
        let mut snapshot_every = tokio::time::interval(Duration::from_secs(2));
        let mut last_snapshot = tokio::time::Instant::now();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    self.stopped.store(true, std::sync::atomic::Ordering::Release);
                    // Wake readers and pulls so that they see it.
                    for e in self.lock().subs.values() {
                        e.wake.notify_one();
                        e.ready.notify_waiters();
                    }
                    return;
                }
                _ = tick.tick() => {
                    // Times are whole milliseconds, read truncated: millisecond `t` has
                    // passed once the clock reads `t + 1`, so no timer fires early.
                    let now = now_ms() - 1;
                    let mut doomed = Vec::new();
                    {
                        let mut inner = self.lock();
                        for (name, e) in inner.subs.iter_mut() {
                            if e.sub.next_due().is_none_or(|t| t > now) {
                                continue;
                            }
                            let before = e.sub.ready_len();
                            for id in e.sub.tick(now) {
                                doomed.push((name.clone(), e.sub.uid, id));
                            }
                            if e.sub.ready_len() > before {
                                e.ready.notify_waiters();
                            }
                        }
                    }
                    for (name, uid, id) in doomed {
                        tokio::spawn(self.clone().dead_letter(name, uid, id));
                    }
                }
                _ = sync_every.tick() => {
                    if self.journal.log_end_offset() > self.journal.high_watermark() {
                        let journal = self.journal.clone();
                        if let Err(e) = blocking(move || Ok(journal.flush()?)).await {
                            tracing::warn!(error = %e, "subscription journal sync failed");
                        }
                    }
                }
                _ = metrics_every.tick() => self.export_metrics(),
                _ = snapshot_every.tick() => {
                    let since = self.lock().since_snapshot;
                    let due = since >= SNAPSHOT_AFTER_BYTES
                        || (since > 0 && last_snapshot.elapsed() >= SNAPSHOT_EVERY);
                    if due {
                        match self.snapshot().await {
                            Ok(()) => last_snapshot = tokio::time::Instant::now(),
                            Err(e) => tracing::warn!(error = %e, "subscription snapshot failed"),
                        }
                    }
                }
            }
        }
    }

    fn export_metrics(&self) {
        for info in self.list() {
            let s = info.stats;
            let label = info.name;
            metrics::gauge!("spate_subscription_backlog", "subscription" => label.clone())
                .set(s.backlog as f64);
            metrics::gauge!("spate_subscription_oldest_unacked_seconds", "subscription" => label.clone())
                .set(s.oldest_unacked_age_ms as f64 / 1000.0);
            metrics::counter!("spate_subscription_redeliveries_total", "subscription" => label.clone())
                .absolute(s.redelivered);
            metrics::counter!("spate_subscription_dead_letters_total", "subscription" => label)
                .absolute(s.dead_lettered);
        }
    }

    /// Writes every subscription's state to the journal and, once durable, drops the journal
    /// segments before it.
    pub async fn snapshot(&self) -> Result<()> {
        let appended = {
            let mut inner = self.lock();
            let op = Op::Snapshot {
                subscriptions: inner
                    .subs
                    .iter()
                    .map(|(name, e)| e.sub.snapshot(name))
                    .collect(),
            };
            let a = self.write(&mut inner, "", &op)?;
            inner.since_snapshot = 0;
            a
        };
        self.durable(appended).await?;
        let journal = self.journal.clone();
        let deleted = blocking(move || Ok(journal.delete_before(appended.base_offset)?)).await?;
        if deleted > 0 {
            tracing::debug!(segments = deleted, "subscription journal compacted");
        }
        Ok(())
    }
}

/// A journal record batch holding one operation.
fn encode(name: &str, op: &Op) -> Result<Vec<u8>> {
    let value = serde_json::to_vec(op)
        .map_err(|e| BrokerError::Internal(format!("journal record: {e}")))?;
    let record = NewRecord {
        timestamp_ms: now_ms(),
        key: Some(name.as_bytes().to_vec()),
        value: Some(value),
        headers: Vec::new(),
    };
    Ok(batch::encode(std::slice::from_ref(&record)).expect("one record"))
}

/// The record time of an event (its `time` attribute, which records without CloudEvents headers
/// take from the record timestamp).
fn event_time(event: &Event) -> i64 {
    event.time_ms().unwrap_or_else(now_ms)
}

/// Applies one journal record during recovery.
fn replay(subs: &mut BTreeMap<String, Sub>, name: &str, offset: u64, op: Op) {
    match op {
        Op::Snapshot { subscriptions } => {
            subs.clear();
            for s in subscriptions {
                subs.insert(s.name.clone(), Sub::from_snapshot(s));
            }
        }
        Op::Define {
            config,
            start: Some(positions),
            created_ms,
            topic_created_ms,
        } => {
            let mut sub = Sub::new(offset, *config, created_ms, positions);
            sub.topic_created_ms = topic_created_ms;
            subs.insert(name.to_string(), sub);
        }
        Op::Delete => {
            subs.remove(name);
        }
        op => {
            if let Some(sub) = subs.get_mut(name) {
                sub.apply(&op);
            }
        }
    }
}

/// Read positions per partition for `to`.
async fn resolve(topic: &Arc<spate_log::Topic>, to: Position) -> Result<Vec<u64>> {
    let topic = topic.clone();
    Ok(blocking(move || {
        topic
            .partitions
            .iter()
            .map(|p| {
                Ok(match to {
                    Position::Earliest => p.log_start_offset(),
                    Position::Latest => p.high_watermark(),
                    Position::Time(t) => p
                        .offset_for_timestamp(t)?
                        .map_or_else(|| p.high_watermark(), |(o, _)| o),
                })
            })
            .collect::<crate::Result<Vec<u64>>>()
    })
    .await?)
}

/// Searches a dead-letter partition from `from` for the dead letter of message `id` of
/// subscription `sub` (read from `source_topic`).
fn find_dead_letter(
    p: &Partition,
    dlq: &str,
    partition: u32,
    from: u64,
    sub: &str,
    source_topic: &str,
    id: MsgId,
) -> crate::Result<Option<u64>> {
    let mut offset = from.max(p.log_start_offset());
    let (sp, so) = (id.1.to_string(), id.2.to_string());
    while offset < p.high_watermark() {
        let page = read_events(p, dlq, partition, offset, 1000)?;
        if page.events.is_empty() {
            break;
        }
        for r in &page.events {
            let x = &r.event.extensions;
            if x.get("spatesubscription").map(String::as_str) == Some(sub)
                && x.get("spatesourcetopic").map(String::as_str) == Some(source_topic)
                && x.get("spatesourcepartition") == Some(&sp)
                && x.get("spatesourceoffset") == Some(&so)
            {
                return Ok(Some(r.offset));
            }
        }
        offset = page.next_offset;
    }
    Ok(None)
}
