//! The pure core of a subscription: which messages are pending, in flight, waiting for a retry or
//! on their way to the dead-letter topic, and what each journal operation does to them.
//!
//! Every change that must survive a crash is an [`Op`]: the shell decides on one, writes it to the
//! journal and applies it here with [`Sub::apply`]; recovery applies the same operations in the
//! same order, so the state after a restart is the state before it. Two changes are not journaled
//! because time alone decides them: a retry falling due and an ack deadline passing. Recovery
//! treats every message that was in flight as timed out, which is what the clock would have done.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Event;

/// Where a subscription read a message from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Source {
    /// The subscription's topic.
    #[serde(rename = "t")]
    Topic,
    /// The dead-letter topic, for dead letters redriven to the subscription.
    #[serde(rename = "d")]
    DeadLetters,
}

/// A message of a subscription: source, partition, offset.
pub type MsgId = (Source, u32, u64);

/// How messages of one key relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// Any number of messages in flight, in any order.
    #[default]
    None,
    /// A message waits until the previous one of its key is acked or dead-lettered.
    Key,
}

/// Retry delays after a nack: `initial_ms * multiplier^(attempt - 1)`, at most `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 1000,
            max_ms: 60_000,
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt after attempt `attempt` (1-based) failed.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let d = self.initial_ms as f64 * self.multiplier.powi(exp);
        if d.is_finite() {
            (d as u64).min(self.max_ms)
        } else {
            self.max_ms
        }
    }
}

/// Webhook delivery. Its `Debug` form leaves the secret out, so that no log shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    pub url: String,
    #[serde(default = "default_push_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_push_in_flight")]
    pub max_in_flight: u32,
    /// Headers sent with every request, e.g. `authorization` for an endpoint that wants a key.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// A Standard Webhooks signing secret, `whsec_` followed by the key in base64: each request
    /// then carries `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("url", &self.url)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_in_flight", &self.max_in_flight)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("secret", &self.secret.as_ref().map(|_| SECRET_SHOWN))
            .finish()
    }
}

/// What a subscription's definition shows instead of its signing secret.
pub const SECRET_SHOWN: &str = "(set; not shown)";

/// The key of a Standard Webhooks signing secret: `whsec_` followed by 24 to 64 bytes in base64.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let why = "push.secret must be \"whsec_\" followed by a key of 24 to 64 bytes in base64";
    let encoded = secret.strip_prefix("whsec_").ok_or(why)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| why)?;
    if !(24..=64).contains(&key.len()) {
        return Err(why.into());
    }
    Ok(key)
}

/// Header names a subscription cannot set on its webhook requests: Spate sets them.
fn reserved_header(lower: &str) -> bool {
    matches!(
        lower,
        "content-type" | "content-length" | "host" | "transfer-encoding" | "connection"
    ) || ["ce-", "spate-", "webhook-"]
        .iter()
        .any(|p| lower.starts_with(p))
}

impl PushConfig {
    /// Checks the headers and the secret (the URL and limits are checked with the definition).
    pub fn check_headers_and_secret(&self) -> Result<(), String> {
        if self.headers.len() > 16 {
            return Err(format!(
                "push.headers holds at most 16 headers, got {}",
                self.headers.len()
            ));
        }
        let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        for (name, value) in &self.headers {
            if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
                return Err(format!("push.headers: {name:?} is not a header name"));
            }
            if reserved_header(&name.to_ascii_lowercase()) {
                return Err(format!(
                    "push.headers: {name} is set by Spate (content-type, content-length, host, \
                     transfer-encoding, connection, ce-*, spate-*, webhook-*)"
                ));
            }
            let visible = |c: u8| c == b'\t' || (0x20..0x7f).contains(&c);
            if value.len() > 4096 || !value.bytes().all(visible) {
                return Err(format!(
                    "push.headers: the value of {name} must be at most 4096 visible ASCII characters"
                ));
            }
        }
        if let Some(secret) = &self.secret {
            signing_key(secret)?;
        }
        Ok(())
    }
}

fn default_push_timeout() -> u64 {
    10_000
}

fn default_push_in_flight() -> u32 {
    16
}

/// A subscription's definition, as given to `PUT /v1/subscriptions/{name}` with defaults filled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub topic: String,
    pub filter: Option<String>,
    pub types: Option<String>,
    pub from: String,
    pub ack_timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub dead_letter_topic: String,
    pub ordering: Ordering,
    pub push: Option<PushConfig>,
}

/// Counters of a subscription's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub expired: u64,
    pub dead_lettered: u64,
}

/// Where a message is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum State {
    /// May be delivered (when first of its key under key ordering).
    Ready,
    /// Delivered; redelivered unless acked by the deadline (ms since the epoch).
    InFlight { deadline: i64 },
    /// Nacked or timed out; ready again at `until`.
    Waiting { until: i64 },
    /// Out of attempts; the dead-letter write has not been announced in the journal yet.
    Doomed { reason: String },
    /// Out of attempts; the journal says it is being written to partition `partition` of the
    /// dead-letter topic, at or after offset `from`.
    DeadLettering {
        reason: String,
        partition: u32,
        from: u64,
    },
}

/// One pending message.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Deliveries so far.
    pub attempt: u32,
    /// The subscription's [`Sub::epoch`] when the message was read: with the attempt, it tells
    /// a delivery of the message apart from one made before a seek dropped it and read it again.
    pub epoch: u32,
    pub state: State,
    /// Hash of the record key, for key ordering.
    pub key: Option<u64>,
    /// The record's timestamp (ms), for the age of the oldest unacked message.
    pub timestamp_ms: i64,
    /// The event, when loaded.
    pub event: Option<HeldEvent>,
    /// Position in the ready queue while queued.
    ready_seq: Option<u64>,
    /// Due time in the timer set while there.
    timer: Option<i64>,
}

/// A message's event as a subscription holds it in memory.
#[derive(Debug, Clone)]
pub enum HeldEvent {
    /// Only its structured JSON, written once when it was read: what pulls and WebSocket
    /// consumers are sent, without decoding the record into an event first.
    Json(Arc<String>),
    /// The decoded event, for subscriptions that need its attributes (a filter judged it, or
    /// webhooks get it in binary mode), and for events read back from the log.
    Decoded(Arc<Event>),
}

impl HeldEvent {
    /// Appends the event's structured JSON form to `out`.
    pub fn write_json(&self, out: &mut String) {
        match self {
            HeldEvent::Json(json) => out.push_str(json),
            HeldEvent::Decoded(e) => e.write_json(out),
        }
    }

    /// The event itself (parsed back from its JSON when only that is held).
    pub fn decoded(&self) -> Result<Arc<Event>, crate::event::EventError> {
        match self {
            HeldEvent::Decoded(e) => Ok(e.clone()),
            HeldEvent::Json(json) => {
                let value: serde_json::Value = serde_json::from_str(json)
                    .map_err(|_| crate::event::EventError::NotAnObject)?;
                Event::from_json(value).map(Arc::new)
            }
        }
    }
}

/// A message the reader found matching: offset, record timestamp, key hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found(pub u64, pub i64, pub Option<u64>);

/// A journal operation. Applying the journal from a snapshot rebuilds the state exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Creates (with `start`, one read position per partition) or updates a subscription.
    Define {
        /// Boxed: the other operations, written for every read and settlement, are small.
        config: Box<Config>,
        start: Option<Vec<u64>>,
        created_ms: i64,
        /// At creation: the creation time of the topic `start` points into.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic_created_ms: Option<i64>,
    },
    Delete,
    /// The reader went through partition `partition` up to (not including) `to`; `found` are the
    /// messages that passed the filter.
    Read {
        partition: u32,
        to: u64,
        found: Vec<Found>,
    },
    Deliver {
        #[serde(with = "id_runs")]
        ids: Vec<MsgId>,
        deadline: i64,
    },
    Ack {
        #[serde(with = "id_runs")]
        ids: Vec<MsgId>,
    },
    /// Each message waits until the given time, or is doomed when out of attempts.
    Nack {
        items: Vec<(MsgId, i64)>,
    },
    Extend {
        #[serde(with = "id_runs")]
        ids: Vec<MsgId>,
        deadline: i64,
    },
    /// A dead-letter write is about to happen to `partition`, whose end was `from`.
    DeadIntent {
        id: MsgId,
        reason: String,
        partition: u32,
        from: u64,
    },
    /// The dead letter is durable at `partition`/`offset` of the dead-letter topic.
    Dead {
        id: MsgId,
        partition: u32,
        offset: u64,
    },
    /// Dead letters given back to this subscription with fresh attempts.
    Redrive {
        letters: Vec<(u32, Found)>,
        /// The creation time of the dead-letter topic they were read from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dlq_created_ms: Option<i64>,
        /// The first offset each partition of that topic still holds: letters redriven before
        /// it are gone with retention and are forgotten, so the record of what was redriven
        /// does not grow for ever.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        retained_from: Vec<u64>,
    },
    /// Read positions move; pending messages of the topic are dropped.
    Seek {
        positions: Vec<u64>,
        /// The creation time of the topic `positions` point into.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic_created_ms: Option<i64>,
    },
    /// The topic read is the one created at `topic_created_ms` (recorded for subscriptions
    /// created before the topic's creation time was kept).
    Reading {
        topic_created_ms: i64,
    },
    /// The topic was deleted and created again: every message of the topic read before is
    /// dropped, whatever its state, and reading starts over at `positions` of the new topic.
    TopicReplaced {
        topic_created_ms: i64,
        positions: Vec<u64>,
    },
    /// The whole state of every subscription at this point of the journal.
    Snapshot {
        subscriptions: Vec<Snapshot>,
    },
}

/// Message ids in journal records, as runs: consecutive offsets of one partition (what a pull
/// delivers and its ack settles) are one element `[source, partition, first, count]`, a lone id
/// `[source, partition, offset]` as records have always held them. The order and every id of the
/// list are kept.
mod id_runs {
    use serde::de::{Deserializer, Error as _};
    use serde::ser::{SerializeSeq, Serializer};
    use serde::{Deserialize, Serialize};

    use super::{MsgId, Source};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Run {
        Many(Source, u32, u64, u64),
        One(Source, u32, u64),
    }

    /// The ids of a run-length list can reach at most this many; a record claiming more is
    /// corrupt (a request settles at most a few thousand).
    const IDS_MAX: u64 = 1 << 24;

    pub fn serialize<S: Serializer>(ids: &[MsgId], s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<(MsgId, u64)> = Vec::new();
        for &id in ids {
            match runs.last_mut() {
                Some(((source, partition, first), count))
                    if *source == id.0
                        && *partition == id.1
                        && first.checked_add(*count) == Some(id.2) =>
                {
                    *count += 1;
                }
                _ => runs.push((id, 1)),
            }
        }
        let mut seq = s.serialize_seq(Some(runs.len()))?;
        for ((source, partition, first), count) in runs {
            if count == 1 {
                seq.serialize_element(&Run::One(source, partition, first))?;
            } else {
                seq.serialize_element(&Run::Many(source, partition, first, count))?;
            }
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<MsgId>, D::Error> {
        let runs = Vec::<Run>::deserialize(d)?;
        let mut ids = Vec::new();
        for run in runs {
            match run {
                Run::One(source, partition, offset) => ids.push((source, partition, offset)),
                Run::Many(source, partition, first, count) => {
                    let total = ids.len() as u64 + count;
                    if count == 0 || total > IDS_MAX || first.checked_add(count).is_none() {
                        return Err(D::Error::custom("invalid run of message ids"));
                    }
                    ids.extend((first..first + count).map(|o| (source, partition, o)));
                }
            }
        }
        Ok(ids)
    }
}

/// A subscription as stored in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub uid: u64,
    pub config: Config,
    pub created_ms: i64,
    pub positions: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_created_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_created_ms: Option<i64>,
    pub msgs: Vec<(MsgId, u32, State, Found)>,
    /// See [`Sub::epoch`]; absent (0) in snapshots written before it was kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
    /// The epoch of each message of `msgs` read in an epoch other than 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<(MsgId, u32)>,
    pub redriven: Vec<(u32, u64)>,
    pub stats: Stats,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What an ack, nack or extend found for one ack id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ok,
    /// Not pending: acked, dead-lettered, dropped by a seek, or never delivered.
    Unknown,
    /// Delivered again since, or on its way to the dead-letter topic.
    Expired,
}

/// One subscription's state.
#[derive(Debug)]
pub struct Sub {
    /// The journal offset of the definition that created it: a subscription deleted and created
    /// again under the same name is another one.
    pub uid: u64,
    pub config: Config,
    pub created_ms: i64,
    /// Next offset the reader looks at, per partition of the topic.
    pub positions: Vec<u64>,
    /// The creation time of the topic read (see [`spate_log::Topic::created_ms`]): a topic
    /// deleted and created again under the name is another log. `None` until known for a
    /// subscription created before it was recorded.
    pub topic_created_ms: Option<i64>,
    /// The creation time of the dead-letter topic that `redriven` and the redriven messages
    /// refer to; `None` before a redrive recorded it.
    pub dlq_created_ms: Option<i64>,
    /// Seeks and topic replacements so far. Each drops pending messages that reading the log
    /// again brings back with attempts from 0: ack ids carry the epoch a message was read in,
    /// so that one handed out before cannot settle the delivery made after.
    pub epoch: u32,
    /// Unsettled messages. Unordered: what needs them in offset order sorts their ids.
    pub msgs: IdMap<MsgId, Msg>,
    /// Dead letters (partition, offset) already given back.
    pub redriven: BTreeSet<(u32, u64)>,
    pub stats: Stats,
    /// Messages that may go out now, in the order they became ready. An entry counts while its
    /// message's `ready_seq` still matches; entries of messages that left the queue are dropped
    /// lazily, so leaving it costs no search.
    ready: VecDeque<(u64, MsgId)>,
    /// Messages whose `ready_seq` is set: the live entries of `ready`.
    ready_count: usize,
    next_seq: u64,
    /// Due times, earliest first; like `ready`, an entry counts while its message's `timer`
    /// still matches.
    timers: BinaryHeap<Reverse<(i64, MsgId)>>,
    /// Messages whose `timer` is set.
    timer_count: usize,
    /// Pending messages of each key, in order, under key ordering.
    /// (SipHash here: the key hashes come from record keys, which producers choose.)
    keys: HashMap<(Source, u32, u64), VecDeque<u64>>,
}

/// A hash map keyed by message ids, with the Fx hash (a multiply per word), where the standard
/// SipHash costs several times more on every pull, ack and read. Only for keys the server makes
/// (partitions and the offsets it assigned): SipHash is there against chosen keys that all land
/// in one bucket, which these cannot be.
pub type IdMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

/// The messages of `msgs` that pass `keep`, in offset order.
fn in_order(msgs: &IdMap<MsgId, Msg>, keep: impl Fn(&MsgId, &Msg) -> bool) -> Vec<(MsgId, &Msg)> {
    let mut v: Vec<(MsgId, &Msg)> = msgs
        .iter()
        .filter(|(id, m)| keep(id, m))
        .map(|(id, m)| (*id, m))
        .collect();
    v.sort_unstable_by_key(|(id, _)| *id);
    v
}

/// The ids of `msgs` that pass `keep`, in offset order.
fn sorted_ids(msgs: &IdMap<MsgId, Msg>, keep: impl Fn(&MsgId, &Msg) -> bool) -> Vec<MsgId> {
    in_order(msgs, keep).into_iter().map(|(id, _)| id).collect()
}

/// Hash of a record key (FNV-1a): stable across restarts, for key ordering.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Sub {
    pub fn new(uid: u64, config: Config, created_ms: i64, positions: Vec<u64>) -> Sub {
        Sub {
            uid,
            config,
            created_ms,
            positions,
            topic_created_ms: None,
            dlq_created_ms: None,
            epoch: 0,
            msgs: IdMap::default(),
            redriven: BTreeSet::new(),
            stats: Stats::default(),
            ready: VecDeque::new(),
            ready_count: 0,
            next_seq: 0,
            timers: BinaryHeap::new(),
            timer_count: 0,
            keys: HashMap::new(),
        }
    }

    pub fn from_snapshot(s: Snapshot) -> Sub {
        let mut sub = Sub::new(s.uid, s.config, s.created_ms, s.positions);
        sub.topic_created_ms = s.topic_created_ms;
        sub.dlq_created_ms = s.dlq_created_ms;
        sub.stats = s.stats;
        sub.redriven = s.redriven.into_iter().collect();
        for (id, attempt, state, found) in s.msgs {
            sub.insert(id, found, attempt, state);
        }
        for (id, epoch) in s.epochs {
            if let Some(m) = sub.msgs.get_mut(&id) {
                m.epoch = epoch;
            }
        }
        sub.epoch = s.epoch;
        sub
    }

    pub fn snapshot(&self, name: &str) -> Snapshot {
        Snapshot {
            name: name.to_string(),
            uid: self.uid,
            config: self.config.clone(),
            created_ms: self.created_ms,
            positions: self.positions.clone(),
            topic_created_ms: self.topic_created_ms,
            dlq_created_ms: self.dlq_created_ms,
            epoch: self.epoch,
            epochs: in_order(&self.msgs, |_, m| m.epoch != 0)
                .into_iter()
                .map(|(id, m)| (id, m.epoch))
                .collect(),
            msgs: in_order(&self.msgs, |_, _| true)
                .into_iter()
                .map(|(id, m)| {
                    (
                        id,
                        m.attempt,
                        m.state.clone(),
                        Found(id.2, m.timestamp_ms, m.key),
                    )
                })
                .collect(),
            redriven: self.redriven.iter().copied().collect(),
            stats: self.stats,
        }
    }

    /// Messages waiting for delivery (not in flight), queued or not.
    pub fn waiting(&self) -> usize {
        self.msgs
            .values()
            .filter(|m| matches!(m.state, State::Ready | State::Waiting { .. }))
            .count()
    }

    pub fn in_flight(&self) -> usize {
        self.msgs
            .values()
            .filter(|m| matches!(m.state, State::InFlight { .. }))
            .count()
    }

    /// The record time of the oldest unsettled message.
    pub fn oldest_timestamp(&self) -> Option<i64> {
        self.msgs.values().map(|m| m.timestamp_ms).min()
    }

    /// Messages that may be delivered now.
    pub fn ready_len(&self) -> usize {
        self.ready_count
    }

    /// Messages doomed to the dead-letter topic whose write has not been announced.
    pub fn doomed(&self) -> Vec<MsgId> {
        sorted_ids(&self.msgs, |_, m| matches!(m.state, State::Doomed { .. }))
    }

    /// Messages whose dead-letter write was announced but not confirmed.
    pub fn dead_lettering(&self) -> Vec<MsgId> {
        sorted_ids(&self.msgs, |_, m| {
            matches!(m.state, State::DeadLettering { .. })
        })
    }

    fn group(&self, id: MsgId, key: Option<u64>) -> Option<(Source, u32, u64)> {
        match self.config.ordering {
            Ordering::Key => key.map(|k| (id.0, id.1, k)),
            Ordering::None => None,
        }
    }

    /// Whether `id` may go out now as far as key order is concerned.
    fn first_of_key(&self, id: MsgId, key: Option<u64>) -> bool {
        match self.group(id, key) {
            None => true,
            Some(g) => self.keys.get(&g).and_then(|q| q.front()) == Some(&id.2),
        }
    }

    fn insert(&mut self, id: MsgId, found: Found, attempt: u32, state: State) {
        if self.msgs.contains_key(&id) {
            return;
        }
        let Found(_, timestamp_ms, key) = found;
        if let Some(g) = self.group(id, key) {
            let q = self.keys.entry(g).or_default();
            // Offsets of a key arrive in order; keep the queue sorted if they do not.
            let at = q.partition_point(|o| *o < id.2);
            q.insert(at, id.2);
        }
        self.msgs.insert(
            id,
            Msg {
                attempt,
                epoch: self.epoch,
                state: State::Ready,
                key,
                timestamp_ms,
                event: None,
                ready_seq: None,
                timer: None,
            },
        );
        self.set_state(id, state);
    }

    /// Moves a message to `state`, keeping the ready queue and the timers in step.
    fn set_state(&mut self, id: MsgId, state: State) {
        let Some(m) = self.msgs.get_mut(&id) else {
            return;
        };
        self.ready_count -= usize::from(m.ready_seq.is_some());
        self.timer_count -= usize::from(m.timer.is_some());
        if let Some(seq) = m.ready_seq.take()
            && self.ready.front() == Some(&(seq, id))
        {
            self.ready.pop_front();
        }
        m.timer = None;
        let due = match &state {
            State::InFlight { deadline } => Some(*deadline),
            State::Waiting { until } => Some(*until),
            _ => None,
        };
        if let Some(t) = due {
            m.timer = Some(t);
            self.timer_count += 1;
            self.timers.push(Reverse((t, id)));
        }
        let ready = state == State::Ready;
        let key = m.key;
        m.state = state;
        if ready && self.first_of_key(id, key) {
            self.queue(id);
        }
        self.compact();
    }

    fn queue(&mut self, id: MsgId) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(m) = self.msgs.get_mut(&id) {
            if m.ready_seq.is_none() {
                self.ready_count += 1;
            }
            m.ready_seq = Some(seq);
            self.ready.push_back((seq, id));
        }
    }

    /// Drops stale entries of the ready queue and the timers once they outnumber the live ones.
    fn compact(&mut self) {
        if self.ready.len() > 2 * self.ready_count + 1024 {
            let msgs = &self.msgs;
            self.ready
                .retain(|(seq, id)| msgs.get(id).is_some_and(|m| m.ready_seq == Some(*seq)));
        }
        if self.timers.len() > 2 * self.timer_count + 1024 {
            let mut live: Vec<(i64, MsgId)> = std::mem::take(&mut self.timers)
                .into_iter()
                .map(|Reverse(t)| t)
                .filter(|(t, id)| self.msgs.get(id).is_some_and(|m| m.timer == Some(*t)))
                .collect();
            live.sort_unstable();
            live.dedup();
            self.timers = live.into_iter().map(Reverse).collect();
        }
    }

    /// Removes a settled message and lets the next one of its key go.
    fn settle(&mut self, id: MsgId) {
        let Some(m) = self.msgs.remove(&id) else {
            return;
        };
        self.ready_count -= usize::from(m.ready_seq.is_some());
        self.timer_count -= usize::from(m.timer.is_some());
        if let Some(seq) = m.ready_seq
            && self.ready.front() == Some(&(seq, id))
        {
            self.ready.pop_front();
        }
        self.compact();
        let Some(g) = self.group(id, m.key) else {
            return;
        };
        let Some(q) = self.keys.get_mut(&g) else {
            return;
        };
        if let Some(at) = q.iter().position(|o| *o == id.2) {
            q.remove(at);
        }
        let next = q.front().copied();
        if q.is_empty() {
            self.keys.remove(&g);
        }
        if let Some(o) = next {
            let next_id = (id.0, id.1, o);
            if self
                .msgs
                .get(&next_id)
                .is_some_and(|m| m.state == State::Ready && m.ready_seq.is_none())
            {
                self.queue(next_id);
            }
        }
    }

    /// Rebuilds the key queues and the ready queue, after the ordering changed.
    fn reorder(&mut self) {
        self.keys.clear();
        self.ready.clear();
        self.ready_count = 0;
        let ids: Vec<(MsgId, Option<u64>)> = in_order(&self.msgs, |_, _| true)
            .into_iter()
            .map(|(id, m)| (id, m.key))
            .collect();
        for (id, key) in &ids {
            if let Some(g) = self.group(*id, *key) {
                self.keys.entry(g).or_default().push_back(id.2);
            }
        }
        for (id, key) in ids {
            let first = self.first_of_key(id, key);
            let Some(m) = self.msgs.get_mut(&id) else {
                continue;
            };
            m.ready_seq = None;
            if m.state == State::Ready && first {
                self.queue(id);
            }
        }
    }

    /// The first `max` messages that may go out now, in the order they became ready.
    pub fn next_ready(&mut self, max: usize) -> Vec<MsgId> {
        let current = |msgs: &IdMap<MsgId, Msg>, (seq, id): &(u64, MsgId)| {
            msgs.get(id).is_some_and(|m| m.ready_seq == Some(*seq))
        };
        while let Some(front) = self.ready.front() {
            if current(&self.msgs, front) {
                break;
            }
            self.ready.pop_front();
        }
        if self.ready.len() == self.ready_count {
            // No stale entries: every one is current.
            return self.ready.iter().take(max).map(|(_, id)| *id).collect();
        }
        self.ready
            .iter()
            .filter(|e| current(&self.msgs, e))
            .take(max)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Whether `attempt` is the current delivery of `id`, which may still be settled by its
    /// consumer (in flight, or timed out and not yet delivered again).
    pub fn check(&self, id: MsgId, attempt: u32, epoch: u32) -> Settle {
        match self.msgs.get(&id) {
            None => Settle::Unknown,
            Some(m) if m.attempt != attempt || m.epoch != epoch => Settle::Expired,
            Some(m) => match m.state {
                State::InFlight { .. } | State::Waiting { .. } | State::Ready => Settle::Ok,
                State::Doomed { .. } | State::DeadLettering { .. } => Settle::Expired,
            },
        }
    }

    /// Whether `id` is in flight under `attempt` (for extends).
    pub fn check_in_flight(&self, id: MsgId, attempt: u32, epoch: u32) -> Settle {
        match self.check(id, attempt, epoch) {
            Settle::Ok => match self.msgs.get(&id).map(|m| &m.state) {
                Some(State::InFlight { .. }) => Settle::Ok,
                _ => Settle::Expired,
            },
            other => other,
        }
    }

    /// The delay before the next attempt of `id` after a nack without an explicit delay.
    pub fn backoff_ms(&self, id: MsgId) -> u64 {
        let attempt = self.msgs.get(&id).map_or(1, |m| m.attempt);
        self.config.backoff.delay_ms(attempt)
    }

    /// Applies one journal operation.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Define { config, .. } => {
                let reorder = config.ordering != self.config.ordering;
                self.config = Config::clone(config);
                if reorder {
                    self.reorder();
                }
            }
            Op::Delete | Op::Snapshot { .. } => {}
            Op::Read {
                partition,
                to,
                found,
            } => {
                for f in found {
                    self.insert((Source::Topic, *partition, f.0), *f, 0, State::Ready);
                }
                if let Some(p) = self.positions.get_mut(*partition as usize) {
                    *p = (*p).max(*to);
                }
            }
            Op::Deliver { ids, deadline } => {
                for id in ids {
                    let Some(m) = self.msgs.get_mut(id) else {
                        continue;
                    };
                    if matches!(m.state, State::Doomed { .. } | State::DeadLettering { .. }) {
                        continue;
                    }
                    m.attempt += 1;
                    self.stats.delivered += 1;
                    if m.attempt > 1 {
                        self.stats.redelivered += 1;
                    }
                    self.set_state(
                        *id,
                        State::InFlight {
                            deadline: *deadline,
                        },
                    );
                }
            }
            Op::Ack { ids } => {
                for id in ids {
                    if self.msgs.contains_key(id) {
                        self.stats.acked += 1;
                        self.settle(*id);
                    }
                }
            }
            Op::Nack { items } => {
                for (id, until) in items {
                    let Some(m) = self.msgs.get(id) else {
                        continue;
                    };
                    self.stats.nacked += 1;
                    let state = if m.attempt >= self.config.max_attempts {
                        State::Doomed {
                            reason: format!("nacked on attempt {}", m.attempt),
                        }
                    } else {
                        State::Waiting { until: *until }
                    };
                    self.set_state(*id, state);
                }
            }
            Op::Extend { ids, deadline } => {
                for id in ids {
                    if matches!(
                        self.msgs.get(id).map(|m| &m.state),
                        Some(State::InFlight { .. })
                    ) {
                        self.set_state(
                            *id,
                            State::InFlight {
                                deadline: *deadline,
                            },
                        );
                    }
                }
            }
            Op::DeadIntent {
                id,
                reason,
                partition,
                from,
            } => {
                if self.msgs.contains_key(id) {
                    self.set_state(
                        *id,
                        State::DeadLettering {
                            reason: reason.clone(),
                            partition: *partition,
                            from: *from,
                        },
                    );
                }
            }
            Op::Dead { id, .. } => {
                if self.msgs.contains_key(id) {
                    self.stats.dead_lettered += 1;
                    self.settle(*id);
                }
            }
            Op::Redrive {
                letters,
                dlq_created_ms,
                retained_from,
            } => {
                if !retained_from.is_empty() {
                    self.redriven.retain(|(p, o)| {
                        retained_from
                            .get(*p as usize)
                            .is_none_or(|start| o >= start)
                    });
                }
                if let Some(c) = *dlq_created_ms {
                    // The dead-letter topic was deleted and created again: what was redriven
                    // from the old one names nothing in the new one, and the redriven messages
                    // still pending are gone with it.
                    if self.dlq_created_ms.is_some_and(|d| d != c) {
                        self.redriven.clear();
                        for id in sorted_ids(&self.msgs, |id, _| id.0 == Source::DeadLetters) {
                            self.settle(id);
                        }
                    }
                    self.dlq_created_ms = Some(c);
                }
                for (partition, f) in letters {
                    if self.redriven.insert((*partition, f.0)) {
                        self.insert((Source::DeadLetters, *partition, f.0), *f, 0, State::Ready);
                    }
                }
            }
            Op::Seek {
                positions,
                topic_created_ms,
            } => {
                let dropped = sorted_ids(&self.msgs, |id, m| {
                    id.0 == Source::Topic
                        && !matches!(m.state, State::Doomed { .. } | State::DeadLettering { .. })
                });
                for id in dropped {
                    self.settle(id);
                }
                self.positions = positions.clone();
                if topic_created_ms.is_some() {
                    self.topic_created_ms = *topic_created_ms;
                }
                self.epoch = self.epoch.wrapping_add(1);
            }
            Op::Reading { topic_created_ms } => self.topic_created_ms = Some(*topic_created_ms),
            Op::TopicReplaced {
                topic_created_ms,
                positions,
            } => {
                // Their events are gone with the old topic: the new one holds others at the
                // same offsets. Dead-letter moves under way are dropped too.
                for id in sorted_ids(&self.msgs, |id, _| id.0 == Source::Topic) {
                    self.settle(id);
                }
                self.positions = positions.clone();
                self.topic_created_ms = Some(*topic_created_ms);
                self.epoch = self.epoch.wrapping_add(1);
            }
        }
    }

    /// Moves messages whose time came: retries become ready, expired deliveries are delivered
    /// again or, out of attempts, doomed. Returns the messages doomed now.
    pub fn tick(&mut self, now_ms: i64) -> Vec<MsgId> {
        let mut doomed = Vec::new();
        while let Some(&Reverse((due, id))) = self.timers.peek() {
            if due > now_ms {
                break;
            }
            self.timers.pop();
            let Some(m) = self.msgs.get_mut(&id) else {
                continue;
            };
            if m.timer != Some(due) {
                continue;
            }
            m.timer = None;
            self.timer_count -= 1;
            let state = match m.state {
                State::InFlight { .. } => {
                    self.stats.expired += 1;
                    if m.attempt >= self.config.max_attempts {
                        doomed.push(id);
                        State::Doomed {
                            reason: format!("ack timeout on attempt {}", m.attempt),
                        }
                    } else {
                        State::Ready
                    }
                }
                State::Waiting { .. } => State::Ready,
                _ => continue,
            };
            self.set_state(id, state);
        }
        doomed
    }

    /// After recovery: every delivery in flight before the crash has timed out.
    pub fn recover(&mut self, now_ms: i64) -> Vec<MsgId> {
        let in_flight = sorted_ids(&self.msgs, |_, m| matches!(m.state, State::InFlight { .. }));
        for id in in_flight {
            self.set_state(id, State::InFlight { deadline: now_ms });
        }
        self.tick(now_ms)
    }

    /// The next due time of a retry or deadline.
    pub fn next_due(&self) -> Option<i64> {
        // The earliest entry may be stale: then `tick` finds nothing due and drops it.
        self.timers.peek().map(|Reverse((t, _))| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ordering: Ordering, max_attempts: u32) -> Config {
        Config {
            topic: "orders".into(),
            filter: None,
            types: None,
            from: "earliest".into(),
            ack_timeout_ms: 1000,
            max_attempts,
            backoff: Backoff::default(),
            dead_letter_topic: "orders.dlq".into(),
            ordering,
            push: None,
        }
    }

    fn read(sub: &mut Sub, partition: u32, keys: &[(u64, Option<u64>)]) {
        let to = keys.iter().map(|(o, _)| o + 1).max().unwrap_or(0);
        sub.apply(&Op::Read {
            partition,
            to,
            found: keys.iter().map(|(o, k)| Found(*o, 0, *k)).collect(),
        });
    }

    fn t(p: u32, o: u64) -> MsgId {
        (Source::Topic, p, o)
    }

    #[test]
    fn webhook_secrets_and_header_values_stay_out_of_debug_output() {
        let push = PushConfig {
            url: "http://h/hook".into(),
            timeout_ms: 1000,
            max_in_flight: 1,
            headers: [("authorization".to_string(), "Bearer hunter2".to_string())].into(),
            secret: Some("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0".into()),
        };
        assert!(push.check_headers_and_secret().is_ok());
        let shown = format!("{push:?}");
        assert!(shown.contains("authorization") && shown.contains("http://h/hook"));
        assert!(
            !shown.contains("hunter2") && !shown.contains("c2VjcmV0"),
            "{shown}"
        );
    }

    #[test]
    fn journal_records_hold_consecutive_ids_as_runs_and_read_the_old_form() {
        let ids: Vec<MsgId> = (10..110)
            .map(|o| t(0, o))
            .chain([
                t(1, 5),
                t(0, 110),
                (Source::DeadLetters, 0, 111),
                t(0, 112),
                t(0, 113),
            ])
            .collect();
        let op = Op::Ack { ids: ids.clone() };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(
            json,
            r#"{"op":"ack","ids":[["t",0,10,100],["t",1,5],["t",0,110],["d",0,111],["t",0,112,2]]}"#
        );
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), op);
        // Records written one id per element, as before runs, read the same.
        let old = r#"{"op":"deliver","ids":[["t",0,7],["t",0,8],["d",2,1]],"deadline":5}"#;
        assert_eq!(
            serde_json::from_str::<Op>(old).unwrap(),
            Op::Deliver {
                ids: vec![t(0, 7), t(0, 8), (Source::DeadLetters, 2, 1)],
                deadline: 5
            }
        );
        for bad in [
            r#"{"op":"ack","ids":[["t",0,7,0]]}"#,
            r#"{"op":"ack","ids":[["t",0,18446744073709551615,2]]}"#,
            r#"{"op":"ack","ids":[["t",0,0,100000000]]}"#,
            r#"{"op":"ack","ids":[["t",0]]}"#,
        ] {
            assert!(serde_json::from_str::<Op>(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_list_of_ids_survives_the_journal_unchanged(
            ids in proptest::collection::vec(
                (proptest::bool::ANY, 0u32..3, 0u64..40),
                0..200,
            )
        ) {
            let ids: Vec<MsgId> = ids
                .into_iter()
                .map(|(dead, p, o)| {
                    (if dead { Source::DeadLetters } else { Source::Topic }, p, o)
                })
                .collect();
            let op = Op::Extend { ids, deadline: 1 };
            let json = serde_json::to_vec(&op).unwrap();
            proptest::prop_assert_eq!(serde_json::from_slice::<Op>(&json).unwrap(), op);
        }
    }

    #[test]
    fn a_window_of_consecutive_ids_spreads_over_the_hash_buckets() {
        use std::hash::BuildHasher;
        let build = *IdMap::<MsgId, ()>::default().hasher();
        // A full window read from four partitions, and dead letters beside them: the bucket a
        // hash map picks (low bits) and its control byte (top bits) both spread evenly.
        let ids = (0..4u32).flat_map(|p| (1_000_000..1_002_500u64).map(move |o| t(p, o)));
        let ids: Vec<MsgId> = ids
            .chain((0..500).map(|o| (Source::DeadLetters, 0, o)))
            .collect();
        let mut low = vec![0u32; 1024];
        let mut top = vec![0u32; 128];
        let mut hashes = BTreeSet::new();
        for id in &ids {
            let h = build.hash_one(id);
            low[(h & 1023) as usize] += 1;
            top[(h >> 57) as usize] += 1;
            hashes.insert(h);
        }
        assert_eq!(hashes.len(), ids.len(), "no two ids share a hash");
        let per_bucket = ids.len() as u32 / 1024;
        assert!(
            low.iter().all(|n| *n <= 4 * per_bucket),
            "low bits crowd: {:?}",
            low.iter().max()
        );
        let per_tag = ids.len() as u32 / 128;
        assert!(
            top.iter().all(|n| *n >= per_tag / 4 && *n <= 4 * per_tag),
            "top bits crowd: {top:?}"
        );
    }

    #[test]
    fn key_order_lets_one_message_of_a_key_out_at_a_time() {
        let mut sub = Sub::new(0, config(Ordering::Key, 5), 0, vec![0]);
        read(
            &mut sub,
            0,
            &[(0, Some(1)), (1, Some(1)), (2, Some(2)), (3, None)],
        );
        assert_eq!(sub.next_ready(10), vec![t(0, 0), t(0, 2), t(0, 3)]);
        sub.apply(&Op::Deliver {
            ids: vec![t(0, 0)],
            deadline: 100,
        });
        sub.apply(&Op::Nack {
            items: vec![(t(0, 0), 50)],
        });
        // The retry of key 1 holds back its second message.
        assert_eq!(sub.next_ready(10), vec![t(0, 2), t(0, 3)]);
        assert!(sub.tick(49).is_empty());
        assert_eq!(sub.next_ready(10), vec![t(0, 2), t(0, 3)]);
        sub.tick(50);
        assert_eq!(sub.next_ready(10), vec![t(0, 2), t(0, 3), t(0, 0)]);
        sub.apply(&Op::Deliver {
            ids: vec![t(0, 0)],
            deadline: 200,
        });
        sub.apply(&Op::Ack { ids: vec![t(0, 0)] });
        assert_eq!(sub.next_ready(10), vec![t(0, 2), t(0, 3), t(0, 1)]);
        assert_eq!(sub.stats.acked, 1);
        assert_eq!(sub.stats.redelivered, 1);
    }

    #[test]
    fn out_of_attempts_a_message_is_doomed_by_nack_or_timeout() {
        let mut sub = Sub::new(0, config(Ordering::None, 2), 0, vec![0]);
        read(&mut sub, 0, &[(0, None), (1, None)]);
        for (round, deadline) in [(1, 10), (2, 20)] {
            sub.apply(&Op::Deliver {
                ids: vec![t(0, 0), t(0, 1)],
                deadline,
            });
            assert_eq!(sub.check(t(0, 0), round, 0), Settle::Ok);
            if round == 1 {
                assert_eq!(sub.tick(deadline).len(), 0);
            }
        }
        assert_eq!(sub.check(t(0, 0), 1, 0), Settle::Expired);
        sub.apply(&Op::Nack {
            items: vec![(t(0, 0), 0)],
        });
        assert_eq!(sub.tick(20), vec![t(0, 1)]);
        assert_eq!(sub.doomed(), vec![t(0, 0), t(0, 1)]);
        assert_eq!(sub.next_ready(10), vec![]);
        sub.apply(&Op::DeadIntent {
            id: t(0, 0),
            reason: "x".into(),
            partition: 0,
            from: 7,
        });
        assert_eq!(sub.dead_lettering(), vec![t(0, 0)]);
        sub.apply(&Op::Dead {
            id: t(0, 0),
            partition: 0,
            offset: 7,
        });
        assert_eq!(sub.stats.dead_lettered, 1);
        assert_eq!(sub.check(t(0, 0), 2, 0), Settle::Unknown);
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let mut sub = Sub::new(3, config(Ordering::Key, 5), 9, vec![0, 0]);
        read(&mut sub, 0, &[(0, Some(1)), (1, Some(1))]);
        read(&mut sub, 1, &[(4, None)]);
        sub.apply(&Op::Deliver {
            ids: vec![t(0, 0), t(1, 4)],
            deadline: 100,
        });
        sub.apply(&Op::Nack {
            items: vec![(t(1, 4), 300)],
        });
        let snap = sub.snapshot("s");
        let mut copy = Sub::from_snapshot(snap.clone());
        assert_eq!(copy.snapshot("s"), snap);
        assert_eq!(copy.next_ready(10), sub.next_ready(10));
        assert_eq!(copy.tick(300), sub.tick(300));
        assert_eq!(copy.next_ready(10), sub.next_ready(10));
    }

    #[test]
    fn seek_drops_pending_topic_messages_and_moves_positions() {
        let mut sub = Sub::new(0, config(Ordering::None, 5), 0, vec![0]);
        read(&mut sub, 0, &[(0, None), (1, None)]);
        sub.apply(&Op::Redrive {
            letters: vec![(0, Found(5, 0, None))],
            dlq_created_ms: None,
            retained_from: Vec::new(),
        });
        sub.apply(&Op::Seek {
            positions: vec![0],
            topic_created_ms: None,
        });
        assert_eq!(sub.next_ready(10), vec![(Source::DeadLetters, 0, 5)]);
        assert_eq!(sub.positions, vec![0]);
        // A dead letter goes back once.
        sub.apply(&Op::Redrive {
            letters: vec![(0, Found(5, 0, None))],
            dlq_created_ms: None,
            retained_from: Vec::new(),
        });
        assert_eq!(sub.msgs.len(), 1);
    }

    #[test]
    fn a_replaced_topic_drops_every_message_of_the_old_one_and_epochs_tell_reads_apart() {
        let mut sub = Sub::new(0, config(Ordering::Key, 1), 0, vec![0]);
        sub.topic_created_ms = Some(100);
        read(&mut sub, 0, &[(0, Some(1)), (1, Some(2)), (2, None)]);
        sub.apply(&Op::Redrive {
            letters: vec![(0, Found(5, 0, None))],
            dlq_created_ms: None,
            retained_from: Vec::new(),
        });
        // One in flight, one doomed (out of its one attempt), one on its way to the DLQ.
        sub.apply(&Op::Deliver {
            ids: vec![t(0, 0), t(0, 1), t(0, 2)],
            deadline: 10,
        });
        sub.apply(&Op::Nack {
            items: vec![(t(0, 1), 0), (t(0, 2), 0)],
        });
        sub.apply(&Op::DeadIntent {
            id: t(0, 2),
            reason: "x".into(),
            partition: 0,
            from: 0,
        });
        sub.apply(&Op::TopicReplaced {
            topic_created_ms: 200,
            positions: vec![0, 0],
        });
        // What is left is the redriven dead letter, which the old topic did not hold.
        let left: Vec<MsgId> = sub.msgs.keys().copied().collect();
        assert_eq!(left, vec![(Source::DeadLetters, 0, 5)]);
        assert_eq!(
            (sub.positions.clone(), sub.topic_created_ms, sub.epoch),
            (vec![0, 0], Some(200), 1)
        );
        // Offset 0 read again is another message: the old delivery's ack id does not settle it.
        read(&mut sub, 0, &[(0, Some(1))]);
        sub.apply(&Op::Deliver {
            ids: vec![t(0, 0)],
            deadline: 20,
        });
        assert_eq!(sub.check(t(0, 0), 1, 0), Settle::Expired);
        assert_eq!(sub.check(t(0, 0), 1, 1), Settle::Ok);
        assert_eq!(sub.check((Source::DeadLetters, 0, 5), 0, 0), Settle::Ok);
        // Epochs and the topic's creation time survive a snapshot.
        let snap = sub.snapshot("s");
        let copy = Sub::from_snapshot(snap.clone());
        assert_eq!(copy.snapshot("s"), snap);
        assert_eq!((copy.epoch, copy.topic_created_ms), (1, Some(200)));
        assert_eq!(copy.check(t(0, 0), 1, 1), Settle::Ok);
        // A snapshot written before either was kept reads with epoch 0 and no creation time.
        let mut old = serde_json::to_value(&snap).unwrap();
        let o = old.as_object_mut().unwrap();
        for k in ["epoch", "epochs", "topic_created_ms"] {
            o.remove(k);
        }
        let copy = Sub::from_snapshot(serde_json::from_value(old).unwrap());
        assert_eq!((copy.epoch, copy.topic_created_ms), (0, None));
    }

    #[test]
    fn redriven_letters_that_retention_removed_are_forgotten() {
        let mut sub = Sub::new(0, config(Ordering::None, 5), 0, vec![0]);
        let redrive = |letters: Vec<(u32, u64)>, retained_from: Vec<u64>| Op::Redrive {
            letters: letters
                .into_iter()
                .map(|(p, o)| (p, Found(o, 0, None)))
                .collect(),
            dlq_created_ms: Some(7),
            retained_from,
        };
        sub.apply(&redrive(vec![(0, 1), (0, 5), (1, 2)], vec![0, 0]));
        assert_eq!(sub.redriven.len(), 3);
        // Partition 0 now starts at offset 4: (0, 1) is gone from the topic, and from the record.
        sub.apply(&redrive(vec![(0, 9)], vec![4, 0]));
        let kept: Vec<(u32, u64)> = sub.redriven.iter().copied().collect();
        assert_eq!(kept, vec![(0, 5), (0, 9), (1, 2)]);
        // A snapshot keeps what is left.
        let copy = Sub::from_snapshot(sub.snapshot("s"));
        assert_eq!(copy.redriven, sub.redriven);
    }

    #[test]
    fn queues_stay_consistent_and_bounded_under_churn() {
        let mut sub = Sub::new(0, config(Ordering::Key, 3), 0, vec![0, 0]);
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut offsets = [0u64; 2];
        for round in 0..2_000i64 {
            let p = next(2) as u32;
            let found: Vec<Found> = (0..next(8))
                .map(|_| {
                    offsets[p as usize] += 1;
                    Found(offsets[p as usize], 0, Some(next(5)).filter(|k| *k > 0))
                })
                .collect();
            sub.apply(&Op::Read {
                partition: p,
                to: offsets[p as usize] + 1,
                found,
            });
            let ids = sub.next_ready(next(6) as usize);
            sub.apply(&Op::Deliver {
                ids: ids.clone(),
                deadline: round + next(20) as i64,
            });
            for id in ids {
                match next(4) {
                    0 => sub.apply(&Op::Ack { ids: vec![id] }),
                    1 => sub.apply(&Op::Nack {
                        items: vec![(id, round + next(10) as i64)],
                    }),
                    2 => sub.apply(&Op::Extend {
                        ids: vec![id],
                        deadline: round + 5,
                    }),
                    _ => {}
                }
            }
            for id in sub.tick(round) {
                sub.apply(&Op::Dead {
                    id,
                    partition: 0,
                    offset: 0,
                });
            }
            // The queue holds exactly the ready messages that head their key, each once.
            let ready = sub.next_ready(usize::MAX);
            assert_eq!(ready.len(), sub.ready_len());
            let mut seen = BTreeSet::new();
            for id in &ready {
                assert!(seen.insert(*id));
                let m = &sub.msgs[id];
                assert_eq!(m.state, State::Ready);
                assert!(sub.first_of_key(*id, m.key));
            }
            let expected = sub
                .msgs
                .iter()
                .filter(|(id, m)| m.state == State::Ready && sub.first_of_key(**id, m.key))
                .count();
            assert_eq!(ready.len(), expected);
            let timed = sub.msgs.values().filter(|m| m.timer.is_some()).count();
            assert_eq!(timed, sub.timer_count);
            // Stale entries never pile up beyond twice the live ones.
            assert!(sub.ready.len() <= 2 * sub.ready_count + 1024);
            assert!(sub.timers.len() <= 2 * sub.timer_count + 1024);
        }
        assert!(sub.stats.acked > 100 && sub.stats.dead_lettered > 10);
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 3.0,
        };
        assert_eq!(
            (1..=5).map(|a| b.delay_ms(a)).collect::<Vec<_>>(),
            vec![100, 300, 900, 1000, 1000]
        );
    }
}
