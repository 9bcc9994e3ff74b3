//! Projections: read models folded from a topic, stored in an embedded LSM store (fjall),
//! queryable by key or key range, with read-your-writes through position tokens.
//!
//! Each projection has a follower that reads its topic from the beginning, applies each event to
//! the row it belongs to ([`reduce`]), and writes the changed rows together with the offsets it
//! reached, per partition, in one atomic batch: after a crash the store holds a prefix of the
//! applied events and its offsets say which, so the follower goes on from there and the state
//! equals a fresh fold. Only durable records are applied. A changed definition (or a rebuild)
//! starts a new generation of rows, folded from the start; the old generation is deleted.

pub mod reduce;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;

use crate::{Broker, BrokerError, Event, blocking, now_ms, read_events};
pub use reduce::{Compiled, Definition, OnError, Outcome, Row};

/// Projections a server holds at most.
pub const PROJECTIONS_MAX: usize = 256;
/// Rows one list request returns at most.
pub const LIST_MAX: usize = 1000;
/// Events the follower applies per batch.
const APPLY_CHUNK: usize = 2000;
/// Rows a follower keeps decoded in memory (cleared when full); the store stays the truth.
const ROW_CACHE_MAX: usize = 500_000;

#[derive(Debug, Error)]
pub enum ProjectionError {
    #[error("projection {0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the projection did not reach the position within {0:?}")]
    Timeout(Duration),
    #[error("projection store: {0}")]
    Store(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<spate_log::Error> for ProjectionError {
    fn from(e: spate_log::Error) -> Self {
        ProjectionError::Broker(e.into())
    }
}

impl From<fjall::Error> for ProjectionError {
    fn from(e: fjall::Error) -> Self {
        ProjectionError::Store(e.to_string())
    }
}

pub type Result<T, E = ProjectionError> = std::result::Result<T, E>;

/// A read-your-writes token: the offsets after a write, per partition of a topic, as
/// `<topic>:<partition>.<next offset>,...`. Opaque to clients.
pub fn position_token(topic: &str, next: &BTreeMap<u32, u64>) -> String {
    let parts: Vec<String> = next.iter().map(|(p, o)| format!("{p}.{o}")).collect();
    format!("{topic}:{}", parts.join(","))
}

/// Parses a position token.
pub fn parse_position(token: &str) -> Result<(String, BTreeMap<u32, u64>)> {
    let bad = || ProjectionError::Invalid(format!("{token:?} is not a position token"));
    let (topic, rest) = token.split_once(':').ok_or_else(bad)?;
    let mut out = BTreeMap::new();
    for part in rest.split(',').filter(|p| !p.is_empty()) {
        let (p, o) = part.split_once('.').ok_or_else(bad)?;
        out.insert(p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?);
    }
    Ok((topic.to_string(), out))
}

/// A point in a stream's history: a log offset, or a time (ms since the epoch) compared with
/// the events' `time`.
#[derive(Debug, Clone, Copy)]
pub enum AsOf {
    Offset(u64),
    Time(i64),
}

/// What the store keeps of a projection beside its rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    definition: Definition,
    generation: u64,
    /// Next offset to apply, per partition of the topic.
    positions: Vec<u64>,
    errors: u64,
    last_error: Option<String>,
    halted: bool,
    /// The topic's end when the generation started: caught up once past it.
    rebuild_until: Vec<u64>,
    /// The creation time of the topic folded (see [`spate_log::Topic::created_ms`]): a topic
    /// deleted and created again under the name is another log. Absent in state stored before
    /// it was recorded; the topic found then is taken for the one folded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic_created_ms: Option<i64>,
}

/// A projection's status, as shown by the API.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub definition: Definition,
    pub status: &'static str,
    pub position: String,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub errors: u64,
    pub last_error: Option<String>,
}

struct Proj {
    compiled: Arc<Compiled>,
    meta: Mutex<Meta>,
    /// Positions applied, for read-your-writes waits.
    applied: watch::Sender<Vec<u64>>,
    /// Set (under the commit lock) once replaced or deleted: its follower writes nothing more.
    retired: std::sync::atomic::AtomicBool,
    /// Rows as last committed, so the follower need not read and decode them again.
    cache: Arc<Mutex<HashMap<String, Row>>>,
    /// Each row change, in order, once committed: for watchers.
    changes: tokio::sync::broadcast::Sender<Arc<Change>>,
    /// A rebuild not yet caught up: its state is stored under [`pending_key`] and queries are
    /// served by the generation before it until it takes over.
    pending: std::sync::atomic::AtomicBool,
}

/// Where the state of a projection's rebuild in progress is stored.
fn pending_key(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.extend_from_slice(b"\0next");
    k
}

/// A row change pushed to watchers.
#[derive(Debug, Clone)]
pub struct Change {
    pub key: String,
    pub row: Row,
}

/// Changes a watcher may fall behind by before it is cut off.
pub const WATCH_BUFFER: usize = 8192;

impl Proj {
    fn new(compiled: Compiled, meta: Meta, pending: bool) -> Arc<Proj> {
        let (applied, _) = watch::channel(meta.positions.clone());
        Arc::new(Proj {
            compiled: Arc::new(compiled),
            meta: Mutex::new(meta),
            applied,
            retired: Default::default(),
            cache: Arc::default(),
            changes: tokio::sync::broadcast::channel(WATCH_BUFFER).0,
            pending: std::sync::atomic::AtomicBool::new(pending),
        })
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_pending(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks it replaced or deleted (under the commit lock) and wakes whoever waits for its
    /// positions, so that they turn to its successor.
    fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        self.applied.send_modify(|_| {});
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where its state is stored.
    fn meta_key(&self, name: &str) -> Vec<u8> {
        if self.is_pending() {
            pending_key(name)
        } else {
            name.as_bytes().to_vec()
        }
    }

    /// Whether it has applied everything its topic held when it started.
    fn caught_up(&self) -> bool {
        let m = self.meta();
        m.positions
            .iter()
            .zip(&m.rebuild_until)
            .all(|(p, e)| p >= e)
    }
}

/// The projections of a server.
pub struct Projections {
    broker: Arc<Broker>,
    db: fjall::Database,
    metas: fjall::Keyspace,
    rows: fjall::Keyspace,
    projs: Mutex<BTreeMap<String, Arc<Proj>>>,
    /// Rebuilds in progress, by name.
    pending: Mutex<BTreeMap<String, Arc<Proj>>>,
    /// Held while a follower commits and while a projection is replaced or deleted, so that a
    /// retired follower never overwrites its successor's state.
    commit: Arc<Mutex<()>>,
    /// Set when the server stops: followers end.
    stopped: watch::Sender<bool>,
}

fn row_prefix(name: &str, generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 10);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn row_key(name: &str, generation: u64, key: &str) -> Vec<u8> {
    let mut k = row_prefix(name, generation);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The state of a new generation: from the start of the topic, caught up once past its end now.
fn fresh_meta(topic: &spate_log::Topic, compiled: &Compiled, generation: u64) -> Meta {
    Meta {
        definition: compiled.definition.clone(),
        generation,
        positions: topic
            .partitions
            .iter()
            .map(|p| p.log_start_offset())
            .collect(),
        errors: 0,
        last_error: None,
        halted: false,
        rebuild_until: topic
            .partitions
            .iter()
            .map(|p| p.high_watermark())
            .collect(),
        topic_created_ms: Some(topic.created_ms),
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("projection state serializes")
}

impl Projections {
    /// Opens (or creates) the store in `dir` and loads every projection (blocking). Call
    /// [`Projections::start`] next.
    pub fn open(broker: Arc<Broker>, dir: &std::path::Path) -> Result<Arc<Projections>> {
        let db = fjall::Database::builder(dir).open()?;
        let metas = db.keyspace("projections", fjall::KeyspaceCreateOptions::default)?;
        let rows = db.keyspace("rows", fjall::KeyspaceCreateOptions::default)?;
        let mut projs = BTreeMap::new();
        let mut pending = BTreeMap::new();
        for item in metas.iter() {
            let (k, v) = item.into_inner()?;
            let (name, is_pending) = match k.strip_suffix(b"\0next".as_slice()) {
                Some(n) => (String::from_utf8_lossy(n).into_owned(), true),
                None => (String::from_utf8_lossy(&k).into_owned(), false),
            };
            let meta: Meta = serde_json::from_slice(&v)
                .map_err(|e| ProjectionError::Store(format!("projection {name}: {e}")))?;
            let compiled = crate::filter::stored(|| meta.definition.clone().compile())
                .map_err(|e| ProjectionError::Store(format!("projection {name}: {e}")))?;
            let p = Proj::new(compiled, meta, is_pending);
            if is_pending {
                pending.insert(name, p);
            } else {
                projs.insert(name, p);
            }
        }
        tracing::info!(projections = projs.len(), "projections loaded");
        Ok(Arc::new(Projections {
            broker,
            db,
            metas,
            rows,
            projs: Mutex::new(projs),
            pending: Mutex::new(pending),
            commit: Arc::default(),
            stopped: watch::channel(false).0,
        }))
    }

    fn projs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Proj>>> {
        self.projs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending_map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Proj>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Abandons a rebuild in progress, if any.
    async fn abandon_rebuild(&self, name: &str) -> Result<()> {
        let Some(p) = self.pending_map().remove(name) else {
            return Ok(());
        };
        let (metas, commit, key) = (self.metas.clone(), self.commit.clone(), pending_key(name));
        let q = p.clone();
        blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            q.retire();
            metas
                .remove(key)
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))
        })
        .await?;
        self.drop_rows(name, p.meta().generation);
        Ok(())
    }

    /// Starts the followers, and the export of each projection's lag as metrics every second.
    pub fn start(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let Some(me) = me.upgrade() else { return };
                if *me.stopped.borrow() {
                    return;
                }
                for s in me.list() {
                    metrics::gauge!("spate_projection_lag_records", "projection" => s.name.clone())
                        .set(s.lag_records as f64);
                    metrics::gauge!("spate_projection_lag_seconds", "projection" => s.name)
                        .set(s.lag_seconds);
                }
            }
        });
        let mut all: Vec<(String, Arc<Proj>)> = self
            .projs()
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        all.extend(
            self.pending_map()
                .iter()
                .map(|(n, p)| (n.clone(), p.clone())),
        );
        for (name, p) in all {
            tokio::spawn(self.clone().follow(name, p));
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Proj>> {
        self.projs()
            .get(name)
            .cloned()
            .ok_or_else(|| ProjectionError::NotFound(name.to_string()))
    }

    /// Creates or updates a projection; `true` when created. A changed definition folds a new
    /// generation of rows from the start of the topic.
    pub async fn put(
        self: &Arc<Self>,
        name: &str,
        definition: Definition,
    ) -> Result<(bool, Status)> {
        spate_log::config::validate_topic_name(name)
            .map_err(|e| ProjectionError::Invalid(format!("invalid projection name: {e}")))?;
        if crate::is_internal(&definition.topic) {
            return Err(ProjectionError::Invalid(format!(
                "topic {} is internal",
                definition.topic
            )));
        }
        let compiled = definition
            .clone()
            .compile()
            .map_err(ProjectionError::Invalid)?;
        self.broker.topic(&definition.topic)?;
        let existing = self.projs().get(name).cloned();
        let created = existing.is_none();
        if let Some(p) = &existing {
            if p.compiled.definition == definition {
                return Ok((false, self.status(name)?));
            }
            if p.compiled.definition.topic != definition.topic {
                return Err(ProjectionError::Conflict(format!(
                    "projection {name} reads topic {}; delete it to read another",
                    p.compiled.definition.topic
                )));
            }
        } else if self.projs().len() >= PROJECTIONS_MAX {
            return Err(ProjectionError::Invalid(format!(
                "a server holds at most {PROJECTIONS_MAX} projections"
            )));
        }
        self.abandon_rebuild(name).await?;
        let generation = existing.as_ref().map_or(0, |p| p.meta().generation + 1);
        self.begin(name, compiled, generation).await?;
        if let Some(old) = existing {
            self.drop_rows(name, old.meta().generation);
        }
        Ok((created, self.status(name)?))
    }

    /// Starts generation `generation` of a projection, from the start of its topic.
    async fn begin(
        self: &Arc<Self>,
        name: &str,
        compiled: Compiled,
        generation: u64,
    ) -> Result<()> {
        let topic = self.broker.topic(&compiled.definition.topic)?;
        let meta = fresh_meta(&topic, &compiled, generation);
        let metas = self.metas.clone();
        let (key, value) = (name.as_bytes().to_vec(), encode(&meta));
        let db = self.db.clone();
        let previous = self.projs().get(name).cloned();
        let commit = self.commit.clone();
        blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = previous {
                old.retire();
            }
            metas
                .insert(key, value)
                .and_then(|_| db.persist(fjall::PersistMode::SyncAll))
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))
        })
        .await?;
        let p = Proj::new(compiled, meta, false);
        self.projs().insert(name.to_string(), p.clone());
        tokio::spawn(self.clone().follow(name.to_string(), p));
        Ok(())
    }

    /// Folds the projection again from the start into a new generation of rows, serving the
    /// current rows until the new ones have caught up, then switching over at once.
    pub async fn rebuild(self: &Arc<Self>, name: &str) -> Result<Status> {
        let current = self.get(name)?;
        self.abandon_rebuild(name).await?;
        let compiled = current
            .compiled
            .definition
            .clone()
            .compile()
            .map_err(ProjectionError::Invalid)?;
        let topic = self.broker.topic(&compiled.definition.topic)?;
        let meta = fresh_meta(&topic, &compiled, current.meta().generation + 1);
        let (metas, db, key, value) = (
            self.metas.clone(),
            self.db.clone(),
            pending_key(name),
            encode(&meta),
        );
        blocking(move || {
            metas
                .insert(key, value)
                .and_then(|_| db.persist(fjall::PersistMode::SyncAll))
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))
        })
        .await?;
        let p = Proj::new(compiled, meta, true);
        self.pending_map().insert(name.to_string(), p.clone());
        tokio::spawn(self.clone().follow(name.to_string(), p));
        self.status(name)
    }

    /// [`Projections::rebuild`] for a follower, which the rebuild itself spawns: the boxed future
    /// breaks the cycle in the futures' types.
    fn rebuild_from_follower<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<Status>> {
        Box::pin(self.rebuild(name))
    }

    /// Makes a caught-up rebuild the projection: its state moves to the projection's key in one
    /// atomic batch, the generation before it retires and its rows are deleted. Not before it
    /// has applied at least what that generation has (on the same topic): a reader never sees
    /// the projection go back, and a position reached stays reached. `false` when it did not
    /// take over (not yet, or abandoned).
    async fn promote(&self, name: &str, p: &Arc<Proj>) -> Result<bool> {
        let old = self.projs().get(name).cloned();
        let (db, metas, commit) = (self.db.clone(), self.metas.clone(), self.commit.clone());
        let (q, old_q, key) = (p.clone(), old.clone(), name.to_string());
        let promoted = blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            if q.is_retired() {
                return Ok(false);
            }
            if let Some(o) = &old_q {
                let (new, old) = (q.meta(), o.meta());
                let behind = new.topic_created_ms == old.topic_created_ms
                    && old
                        .positions
                        .iter()
                        .enumerate()
                        .any(|(i, at)| new.positions.get(i).is_none_or(|n| n < at));
                if behind {
                    return Ok(false);
                }
            }
            let mut batch = db.batch();
            batch.insert(&metas, key.as_bytes().to_vec(), encode(&*q.meta()));
            batch.remove(&metas, pending_key(&key));
            batch
                .commit()
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))?;
            q.pending.store(false, std::sync::atomic::Ordering::Release);
            if let Some(o) = old_q {
                o.retire();
            }
            Ok(true)
        })
        .await?;
        if !promoted {
            return Ok(false);
        }
        self.projs().insert(name.to_string(), p.clone());
        self.pending_map().remove(name);
        if let Some(o) = old {
            self.drop_rows(name, o.meta().generation);
        }
        tracing::info!(projection = name, "rebuild caught up and took over");
        Ok(true)
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.get(name)?;
        self.abandon_rebuild(name).await?;
        let p = self
            .projs()
            .remove(name)
            .ok_or_else(|| ProjectionError::NotFound(name.to_string()))?;
        let metas = self.metas.clone();
        let key = name.as_bytes().to_vec();
        let (commit, q) = (self.commit.clone(), p.clone());
        blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            q.retire();
            metas
                .remove(key)
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))
        })
        .await?;
        self.drop_rows(name, p.meta().generation);
        Ok(())
    }

    /// Deletes the rows of a generation, in the background.
    fn drop_rows(&self, name: &str, generation: u64) {
        let (db, rows, prefix) = (
            self.db.clone(),
            self.rows.clone(),
            row_prefix(name, generation),
        );
        tokio::task::spawn_blocking(move || {
            let mut batch = db.batch();
            for item in rows.prefix(&prefix) {
                let Ok(k) = item.key() else { break };
                batch.remove(&rows, k);
                if batch.len() >= 10_000 {
                    let full = std::mem::replace(&mut batch, db.batch());
                    if let Err(e) = full.commit() {
                        tracing::warn!(error = %e, "dropping old projection rows failed");
                        return;
                    }
                }
            }
            if let Err(e) = batch.commit() {
                tracing::warn!(error = %e, "dropping old projection rows failed");
            }
        });
    }

    pub fn list(&self) -> Vec<Status> {
        let names: Vec<String> = self.projs().keys().cloned().collect();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    pub fn status(&self, name: &str) -> Result<Status> {
        let p = self.get(name)?;
        let meta = p.meta().clone();
        let topic = self.broker.topic(&meta.definition.topic).ok();
        let (lag, oldest) = topic
            .as_ref()
            .map_or((0, None), |t| crate::follower_lag(t, &meta.positions));
        let caught_up = meta
            .positions
            .iter()
            .zip(&meta.rebuild_until)
            .all(|(p, e)| p >= e)
            && !self.pending_map().contains_key(name);
        let next: BTreeMap<u32, u64> = meta
            .positions
            .iter()
            .enumerate()
            .map(|(i, o)| (i as u32, *o))
            .collect();
        Ok(Status {
            name: name.to_string(),
            status: if meta.halted {
                "halted"
            } else if caught_up {
                "running"
            } else {
                "rebuilding"
            },
            position: position_token(&meta.definition.topic, &next),
            lag_records: lag,
            lag_seconds: oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0),
            errors: meta.errors,
            last_error: meta.last_error.clone(),
            definition: meta.definition,
        })
    }

    /// Waits (at most `wait`) until the projection has applied everything before `token`. A
    /// generation replaced meanwhile hands the wait on to its successor.
    pub async fn wait_for(&self, name: &str, token: &str, wait: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let (topic, want) = parse_position(token)?;
        let reached = |v: &Vec<u64>| {
            want.iter()
                .all(|(part, o)| v.get(*part as usize).is_some_and(|a| a >= o))
        };
        loop {
            let p = self.get(name)?;
            if topic != p.compiled.definition.topic {
                return Err(ProjectionError::Invalid(format!(
                    "the position is on topic {topic}; projection {name} reads {}",
                    p.compiled.definition.topic
                )));
            }
            let mut rx = p.applied.subscribe();
            let done = rx.wait_for(|v| reached(v) || p.is_retired());
            let now = match tokio::time::timeout_at(deadline, done).await {
                Ok(Ok(v)) => reached(&v),
                Ok(Err(_)) => return Err(ProjectionError::NotFound(name.to_string())),
                Err(_) => return Err(ProjectionError::Timeout(wait)),
            };
            if now {
                return Ok(());
            }
            // Retired: its successor is put in its place just after.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Row changes of a projection from now on, in order (each event's change once). The
    /// receiver ends when the projection is redefined, rebuilt or deleted.
    pub fn watch(&self, name: &str) -> Result<tokio::sync::broadcast::Receiver<Arc<Change>>> {
        Ok(self.get(name)?.changes.subscribe())
    }

    /// The row of stream `key` as it was after the events up to `as_of`: the stream's events
    /// are read through the stream index and folded again, from its first. Only for projections
    /// keyed by stream (no `key` expression, no window).
    pub async fn row_as_of(&self, name: &str, key: &str, as_of: AsOf) -> Result<Option<Row>> {
        let p = self.get(name)?;
        let def = &p.compiled.definition;
        if !def.keyed_by_record() || def.reduce.window.is_some() {
            return Err(ProjectionError::Invalid(format!(
                "as_of needs a projection keyed by stream (key absent, `key` or `partitionkey`; no window); {name} is not"
            )));
        }
        let mut row: Option<Row> = None;
        let mut from = 0;
        loop {
            let page = self
                .broker
                .read_stream(
                    &def.topic,
                    key,
                    Some(from),
                    1000,
                    false,
                    Event::from_record_ref,
                )
                .await?;
            let Some(events) = page.filter(|e| !e.is_empty()) else {
                return Ok(row);
            };
            for e in &events {
                let past = match as_of {
                    AsOf::Offset(o) => e.offset > o,
                    AsOf::Time(t) => reduce::event_ms(&e.event) > t,
                };
                if past {
                    return Ok(row);
                }
                match p
                    .compiled
                    .apply(&e.event, e.partition, e.offset, |_| row.clone())
                {
                    Ok(Outcome::Row { row: r, .. }) => row = Some(r),
                    Ok(Outcome::Skipped) => {}
                    Err(_) if def.on_error == OnError::Skip => {}
                    // Where the projection halts, the state stays as it was.
                    Err(_) => return Ok(row),
                }
                from = e.version + 1;
            }
        }
    }

    /// One row, or `None`.
    pub async fn row(&self, name: &str, key: &str) -> Result<Option<Row>> {
        loop {
            let p = self.get(name)?;
            let k = row_key(name, p.meta().generation, key);
            // A point read is served from the store's memory or page cache in microseconds: it
            // runs on the request's task rather than paying for a hop to the blocking pool.
            let v = self.rows.get(k)?;
            // A generation replaced meanwhile may have lost the row to the deletion of its rows:
            // read its successor's.
            if p.is_retired() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            return v
                .map(|v| {
                    serde_json::from_slice(&v).map_err(|e| ProjectionError::Store(e.to_string()))
                })
                .transpose();
        }
    }

    /// Rows whose key starts with `prefix`, in key order, after key `after`, at most `limit`; and
    /// whether more follow.
    pub async fn rows(
        &self,
        name: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, Row)>, bool)> {
        loop {
            let p = self.get(name)?;
            let found = self.rows_of(name, &p, prefix, after, limit).await?;
            // A generation replaced meanwhile may have lost rows to the deletion of its rows:
            // read its successor's.
            if !p.is_retired() {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn rows_of(
        &self,
        name: &str,
        p: &Proj,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, Row)>, bool)> {
        let base = row_prefix(name, p.meta().generation);
        let start = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => {
                let mut k = base.clone();
                k.extend_from_slice(a.as_bytes());
                k.push(0);
                k
            }
            _ => {
                let mut k = base.clone();
                k.extend_from_slice(prefix.as_bytes());
                k
            }
        };
        let mut scope = base.clone();
        scope.extend_from_slice(prefix.as_bytes());
        let rows = self.rows.clone();
        let limit = limit.clamp(1, LIST_MAX);
        blocking(move || {
            let mut out = Vec::new();
            for item in rows.range(start..) {
                let (k, v) = item
                    .into_inner()
                    .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))?;
                if !k.starts_with(&scope) {
                    break;
                }
                if out.len() == limit {
                    return Ok((out, true));
                }
                let key = String::from_utf8_lossy(&k[base.len()..]).into_owned();
                let row: Row = serde_json::from_slice(&v)
                    .map_err(|e| BrokerError::Internal(format!("projection row: {e}")))?;
                out.push((key, row));
            }
            Ok((out, false))
        })
        .await
        .map_err(ProjectionError::from)
    }

    /// Stops the followers and makes the store durable.
    pub async fn stop(&self) -> Result<()> {
        self.stopped.send_replace(true);
        let db = self.db.clone();
        blocking(move || {
            db.persist(fjall::PersistMode::SyncAll)
                .map_err(|e| BrokerError::Internal(format!("projection store: {e}")))
        })
        .await?;
        Ok(())
    }

    fn current(&self, name: &str, p: &Arc<Proj>) -> bool {
        !*self.stopped.borrow()
            && !p.is_retired()
            && (self.projs().get(name).is_some_and(|c| Arc::ptr_eq(c, p))
                || self
                    .pending_map()
                    .get(name)
                    .is_some_and(|c| Arc::ptr_eq(c, p)))
    }

    /// Follows the topic for one generation of a projection until it is replaced or deleted.
    async fn follow(self: Arc<Self>, name: String, p: Arc<Proj>) {
        let mut backoff = Duration::from_millis(100);
        while self.current(&name, &p) {
            if self.topic_replaced(&p) {
                // The rows describe a log that is gone: the new topic is folded from its start,
                // as a rebuild does (the rows so far are served until the new ones caught up). A
                // rebuild under way for the old topic starts again; the projection's follower
                // leaves the work to a rebuild under way and applies nothing meanwhile.
                let rebuilding = self.pending_map().contains_key(&name);
                if p.is_pending() || !rebuilding {
                    tracing::info!(projection = %name, "topic created again; folding it from the start");
                    if let Err(e) = self.rebuild_from_follower(&name).await {
                        tracing::warn!(projection = %name, error = %e, "rebuilding after the topic was created again failed; retrying");
                    }
                }
                let mut stopped = self.stopped.subscribe();
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            if p.is_pending() && p.caught_up() {
                match self.promote(&name, &p).await {
                    Ok(true) => continue,
                    // Still behind the generation it replaces: it follows on.
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(projection = %name, error = %e, "switching to a rebuild failed; retrying");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
            match self.follow_step(&name, &p).await {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(projection = %name, error = %e, "projection follower failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Whether the projection's topic is no longer the one it folded: deleted and created
    /// again under its name. State stored before creation times were recorded takes the topic
    /// found for its own (kept with the next commit).
    fn topic_replaced(&self, p: &Proj) -> bool {
        let Ok(topic) = self.broker.topic(&p.compiled.definition.topic) else {
            return false;
        };
        let mut m = p.meta();
        *m.topic_created_ms.get_or_insert(topic.created_ms) != topic.created_ms
    }

    /// Applies what is there to apply, or waits for news. `true` when it applied something.
    async fn follow_step(&self, name: &str, p: &Arc<Proj>) -> Result<bool> {
        let topic = self.broker.topic(&p.compiled.definition.topic)?;
        let mut news = self.broker.watch_topic(&topic);
        let halted = p.meta().halted;
        let mut progressed = false;
        if !halted {
            for (index, part) in topic.partitions.iter().enumerate() {
                let from = p.meta().positions.get(index).copied().unwrap_or(0);
                if from >= part.high_watermark() {
                    continue;
                }
                if self
                    .apply_chunk(name, p, &topic, index as u32, from)
                    .await?
                {
                    progressed = true;
                }
                if p.meta().halted {
                    break;
                }
            }
        }
        if progressed {
            return Ok(true);
        }
        let mut stopped = self.stopped.subscribe();
        tokio::select! {
            _ = news.changed(), if !halted => {}
            _ = stopped.wait_for(|s| *s) => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        Ok(false)
    }

    /// Applies up to [`APPLY_CHUNK`] events of one partition from `from`, in one atomic batch.
    async fn apply_chunk(
        &self,
        name: &str,
        p: &Arc<Proj>,
        topic: &Arc<spate_log::Topic>,
        partition: u32,
        from: u64,
    ) -> Result<bool> {
        let part = topic.partition(partition)?.clone();
        let (tname, compiled) = (topic.name.clone(), p.compiled.clone());
        let mut meta = p.meta().clone();
        let generation = meta.generation;
        let (rows, db, metas) = (self.rows.clone(), self.db.clone(), self.metas.clone());
        let key_name = name.to_string();
        let meta_key = p.meta_key(name);
        let (commit, q, cache) = (self.commit.clone(), p.clone(), p.cache.clone());
        // Every change is kept, in order, only while someone watches.
        let watched = p.changes.receiver_count() > 0;
        let outcome = blocking(move || {
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            let start = from.max(part.log_start_offset());
            let page = read_events(&part, &tname, partition, start, APPLY_CHUNK)?;
            let mut touched: HashMap<String, Row> = HashMap::new();
            let mut changes: Vec<Change> = Vec::new();
            let mut next = page.next_offset.max(start);
            for r in &page.events {
                // Rows move out of the cache into this batch and back once it is committed (the
                // cache is cleared if the commit fails).
                let result = compiled.apply(&r.event, partition, r.offset, |k| {
                    touched
                        .get(k)
                        .cloned()
                        .or_else(|| cache.remove(k))
                        .or_else(|| {
                            rows.get(row_key(&key_name, generation, k))
                                .ok()
                                .flatten()
                                .and_then(|v| serde_json::from_slice(&v).ok())
                        })
                });
                match result {
                    Ok(Outcome::Row { key, row }) => {
                        if watched {
                            changes.push(Change {
                                key: key.clone(),
                                row: row.clone(),
                            });
                        }
                        touched.insert(key, row);
                    }
                    Ok(Outcome::Skipped) => {}
                    Err(e) => {
                        meta.errors += 1;
                        meta.last_error = Some(format!("offset {partition}:{}: {e}", r.offset));
                        if compiled.definition.on_error == OnError::Halt {
                            meta.halted = true;
                            next = r.offset;
                            break;
                        }
                    }
                }
            }
            if let Some(pos) = meta.positions.get_mut(partition as usize) {
                *pos = next;
            }
            let mut batch = db.batch();
            for (k, row) in &touched {
                batch.insert(&rows, row_key(&key_name, generation, k), encode(row));
            }
            batch.insert(&metas, meta_key, encode(&meta));
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            if q.is_retired() {
                return Ok((meta, false, Vec::new()));
            }
            if let Err(e) = batch.commit() {
                cache.clear();
                return Err(BrokerError::Internal(format!("projection store: {e}")));
            }
            // What is committed is its state from now on, also for a rebuild's promotion, which
            // compares under the lock.
            *q.meta() = meta.clone();
            if cache.len() + touched.len() > ROW_CACHE_MAX {
                cache.clear();
            }
            cache.extend(touched);
            Ok((meta, next > from, changes))
        })
        .await?;
        let (meta, progressed, changes) = outcome;
        if !self.current(name, p) {
            return Ok(false);
        }
        let next = meta
            .positions
            .get(partition as usize)
            .copied()
            .unwrap_or(from);
        metrics::counter!("spate_projection_records_applied_total", "projection" => name.to_string())
            .increment(next.saturating_sub(from));
        metrics::counter!("spate_projection_errors_total", "projection" => name.to_string())
            .absolute(meta.errors);
        // The state itself was stored with the commit.
        p.applied.send_replace(meta.positions);
        for c in changes {
            let _ = p.changes.send(Arc::new(c));
        }
        Ok(progressed)
    }
}
