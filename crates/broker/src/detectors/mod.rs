//! Detectors: anomaly detection and alert rules over numeric series read from a topic.
//!
//! Each detector has a follower that reads its topic, picks the events its filter passes, takes
//! a series name and a value from each (CEL, with a fast path for `data.x`), steps that series'
//! state ([`spate_detect::detector`]) and writes the alerts it raises, as CloudEvents, to the
//! alert topic — durably, before it moves on. Every few seconds the state of the series that
//! changed is checkpointed in an embedded store (fjall) together with the offsets it reflects;
//! after a restart the follower loads it and replays only the records after those offsets.
//! Replay raises the same alerts as before (time is the events' own), so alerts already in the
//! alert topic past the checkpoint are recognised and not written twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use spate_detect::detector::{Alert, Algorithm, Detector, Totals};
use spate_log::TopicConfig;
use thiserror::Error;
use tokio::sync::watch;

use crate::event::{Event, now_rfc3339};
use crate::filter::{Expression, Filter, FilterInput, to_json};
use crate::projections::position_token;
use crate::projections::reduce::event_ms as event_ms_of;
use crate::{Broker, BrokerError, blocking, now_ms, read_events};

/// Detectors a server holds at most.
pub const DETECTORS_MAX: usize = 256;
/// The longest series name, in bytes: a point whose series is longer counts as an error.
pub const SERIES_NAME_BYTES_MAX: usize = 4096;
/// The highest series cap a detector may ask for.
pub const SERIES_MAX: usize = 100_000;
/// The series cap when a definition gives none.
pub const SERIES_DEFAULT: usize = 10_000;
/// Events a follower takes per step.
const APPLY_CHUNK: usize = 2000;
/// How often changed series are checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Recent points kept per series for charts (in memory only).
pub const RECENT_POINTS: usize = 120;

#[derive(Debug, Error)]
pub enum DetectorError {
    #[error("detector {0} does not exist")]
    NotFound(String),
    #[error("{0}")]
    SeriesNotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Another change to the detector ran at the same time.
    #[error("{0}")]
    Conflict(String),
    #[error("detector store: {0}")]
    Store(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<fjall::Error> for DetectorError {
    fn from(e: fjall::Error) -> Self {
        DetectorError::Store(e.to_string())
    }
}

impl From<spate_log::Error> for DetectorError {
    fn from(e: spate_log::Error) -> Self {
        DetectorError::Broker(e.into())
    }
}

pub type Result<T, E = DetectorError> = std::result::Result<T, E>;

fn default_alert_topic() -> String {
    "alerts".into()
}

fn default_cooldown() -> u64 {
    60_000
}

fn default_max_series() -> usize {
    SERIES_DEFAULT
}

/// Where a new detector starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

/// A detector as defined by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<String>,
    /// CEL giving the series name; without it all points form one series, `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    /// CEL giving the value (a number).
    pub value: String,
    pub algorithm: Algorithm,
    #[serde(default = "default_alert_topic")]
    pub alert_topic: String,
    #[serde(default = "default_cooldown")]
    pub cooldown_ms: u64,
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    #[serde(default)]
    pub from: StartFrom,
}

/// How a series name or a value is taken from an event.
#[derive(Debug)]
enum Extract {
    /// `data.a.b`: read straight from the JSON data.
    Path(Vec<String>),
    Cel(Expression),
}

impl Extract {
    fn compile(what: &str, source: &str) -> Result<Extract, String> {
        if let Some(path) = crate::projections::reduce::data_path(source) {
            return Ok(Extract::Path(path));
        }
        Expression::compile(source)
            .map(Extract::Cel)
            .map_err(|e| format!("{what}: {e}"))
    }

    fn eval<'a>(
        &self,
        data: impl FnOnce() -> Option<&'a Json>,
        input: impl FnOnce() -> &'a FilterInput,
    ) -> Result<Json, String> {
        match self {
            Extract::Path(path) => crate::projections::reduce::data_at(data(), path).cloned(),
            Extract::Cel(e) => to_json(&e.evaluate(input())?),
        }
    }
}

/// A definition, checked and compiled.
struct Compiled {
    definition: Definition,
    filter: Filter,
    series: Option<Extract>,
    value: Extract,
}

impl Definition {
    fn compile(self) -> Result<Compiled, String> {
        for (what, name) in [("topic", &self.topic), ("alert_topic", &self.alert_topic)] {
            spate_log::config::validate_topic_name(name)
                .map_err(|e| format!("invalid {what}: {e}"))?;
        }
        if crate::is_internal(&self.alert_topic) || self.alert_topic == self.topic {
            return Err(format!(
                "alert_topic {} must be another, non-internal topic",
                self.alert_topic
            ));
        }
        if self.max_series == 0 || self.max_series > SERIES_MAX {
            return Err(format!(
                "max_series must be between 1 and {SERIES_MAX}, not {}",
                self.max_series
            ));
        }
        self.algorithm
            .validate()
            .map_err(|e| format!("invalid algorithm: {e}"))?;
        let filter = Filter::new(self.filter.as_deref(), self.types.as_deref())
            .map_err(|e| format!("invalid filter: {e}"))?;
        let series = self
            .series
            .as_deref()
            .map(|s| Extract::compile("series", s))
            .transpose()?;
        let value = Extract::compile("value", &self.value)?;
        Ok(Compiled {
            definition: self,
            filter,
            series,
            value,
        })
    }
}

/// What the store keeps of a detector beside its series.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    definition: Definition,
    generation: u64,
    /// Next offset to read, per partition of the topic, as of the checkpoint.
    positions: Vec<u64>,
    totals: Totals,
    errors: u64,
    last_error: Option<String>,
    /// The alert topic's end offsets at the checkpoint: alerts after them may be written again
    /// by the replay.
    alert_ends: Vec<u64>,
    /// The creation time of the topic read (see [`spate_log::Topic::created_ms`]): a topic
    /// deleted and created again under the name is another log. Absent in checkpoints written
    /// before it was recorded; the topic found then is taken for the one read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic_created_ms: Option<i64>,
}

/// A detector's status, as shown by the API.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub definition: Definition,
    pub status: &'static str,
    /// Series tracked now.
    pub series: usize,
    pub points: u64,
    pub alerts: u64,
    /// Series dropped (least recently seen first) to stay within `max_series`.
    pub evicted: u64,
    pub position: String,
    pub lag_records: u64,
    pub lag_seconds: f64,
    /// Events whose series or value could not be taken.
    pub errors: u64,
    pub last_error: Option<String>,
    /// What needs attention, e.g. the series cap reached.
    pub error: Option<String>,
    /// The positions the follower resumed from at start (the last checkpoint).
    pub restored: String,
}

/// A recent point of a series, for charts.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub time: String,
    pub value: f64,
    pub score: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// Whether it raised an alert.
    pub alert: bool,
}

/// Kept small (the score and band as f32, NaN for an open side): one ring per series.
#[derive(Debug, Clone, Copy)]
struct RecentPoint {
    t: i64,
    value: f64,
    score: f32,
    low: f32,
    high: f32,
    alert: bool,
}

/// A series tracked, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesInfo {
    pub series: String,
    pub last_seen: String,
}

struct Live {
    detector: Detector,
    positions: Vec<u64>,
    /// See [`Meta::topic_created_ms`].
    topic_created_ms: Option<i64>,
    errors: u64,
    last_error: Option<String>,
    /// Alerts written before the last crash that the replay must not write again: (source
    /// partition, source offset, type).
    already: HashSet<(u32, u64, String)>,
    checkpointed: Instant,
    /// The last [`RECENT_POINTS`] points of each series, since the server started.
    recent: std::collections::HashMap<String, std::collections::VecDeque<RecentPoint>>,
}

struct Det {
    compiled: Arc<Compiled>,
    generation: u64,
    live: Mutex<Live>,
    restored: Vec<u64>,
    retired: std::sync::atomic::AtomicBool,
    /// Held while a step changes the state and until its position follows, and while a
    /// checkpoint is taken, so a checkpoint never holds state ahead of its position.
    step: tokio::sync::Mutex<()>,
}

impl Det {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The detectors of a server.
pub struct Detectors {
    broker: Arc<Broker>,
    db: fjall::Database,
    metas: fjall::Keyspace,
    series: fjall::Keyspace,
    dets: Mutex<BTreeMap<String, Arc<Det>>>,
    /// Held while a checkpoint is written and while a detector is replaced or deleted.
    commit: Arc<Mutex<()>>,
    stopped: watch::Sender<bool>,
}

fn series_prefix(name: &str, generation: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 10);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

fn series_key(name: &str, generation: u64, series: &str) -> Vec<u8> {
    let mut k = series_prefix(name, generation);
    k.extend_from_slice(series.as_bytes());
    k
}

fn store_err(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(format!("detector store: {e}"))
}

impl Detectors {
    /// Opens (or creates) the store in `dir` and loads every detector with its checkpointed
    /// series (blocking). Call [`Detectors::start`] next.
    pub fn open(broker: Arc<Broker>, dir: &std::path::Path) -> Result<Arc<Detectors>> {
        let db = fjall::Database::builder(dir).open()?;
        let metas = db.keyspace("detectors", fjall::KeyspaceCreateOptions::default)?;
        let series = db.keyspace("series", fjall::KeyspaceCreateOptions::default)?;
        let me = Detectors {
            broker,
            db,
            metas,
            series,
            dets: Mutex::default(),
            commit: Arc::default(),
            stopped: watch::channel(false).0,
        };
        let mut loaded = BTreeMap::new();
        for item in me.metas.iter() {
            let (k, v) = item.into_inner()?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let meta: Meta = serde_json::from_slice(&v)
                .map_err(|e| DetectorError::Store(format!("detector {name}: {e}")))?;
            let det = me.load(&name, meta)?;
            loaded.insert(name, det);
        }
        tracing::info!(detectors = loaded.len(), "detectors loaded");
        *me.dets() = loaded;
        Ok(Arc::new(me))
    }

    /// Rebuilds a detector from its checkpoint.
    fn load(&self, name: &str, meta: Meta) -> Result<Arc<Det>> {
        let (compiled, live) = self.load_live(name, &meta)?;
        Ok(Arc::new(Det {
            compiled: Arc::new(compiled),
            generation: meta.generation,
            restored: meta.positions.clone(),
            live: Mutex::new(live),
            retired: Default::default(),
            step: Default::default(),
        }))
    }

    /// A detector's state as of its checkpoint.
    fn load_live(&self, name: &str, meta: &Meta) -> Result<(Compiled, Live)> {
        let compiled = crate::filter::stored(|| meta.definition.clone().compile())
            .map_err(|e| DetectorError::Store(format!("detector {name}: {e}")))?;
        let d = compiled.definition.clone();
        let mut detector = Detector::new(d.algorithm.clone(), d.cooldown_ms, d.max_series);
        let prefix = series_prefix(name, meta.generation);
        for item in self.series.prefix(&prefix) {
            let (k, v) = item.into_inner()?;
            let series = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            // Stored as its place in the least-recently-seen order, then its state.
            let restored = v.len() >= 8
                && detector.restore(
                    &series,
                    u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                    &v[8..],
                );
            if !restored {
                tracing::warn!(detector = %name, %series, "series state does not decode; starting it afresh");
            }
        }
        detector.totals = meta.totals;
        let already = self.alerts_since(name, meta.generation, &d.alert_topic, &meta.alert_ends);
        let live = Live {
            detector,
            positions: meta.positions.clone(),
            topic_created_ms: meta.topic_created_ms,
            errors: meta.errors,
            last_error: meta.last_error.clone(),
            already,
            checkpointed: Instant::now(),
            recent: Default::default(),
        };
        Ok((compiled, live))
    }

    /// After a failed step (its state may have moved past its position), goes back to the
    /// last checkpoint; the replay raises the same alerts.
    async fn reload(&self, name: &str, d: &Arc<Det>) -> Result<()> {
        let _step = d.step.lock().await;
        let Some(bytes) = self.metas.get(name)? else {
            return Ok(());
        };
        let meta: Meta = serde_json::from_slice(&bytes)
            .map_err(|e| DetectorError::Store(format!("detector {name}: {e}")))?;
        if meta.generation != d.generation {
            return Ok(());
        }
        let (_, live) = self.load_live(name, &meta)?;
        *d.live() = live;
        Ok(())
    }

    /// Alerts of this detector's generation written after `ends` in the alert topic.
    fn alerts_since(
        &self,
        name: &str,
        generation: u64,
        alert_topic: &str,
        ends: &[u64],
    ) -> HashSet<(u32, u64, String)> {
        let mut found = HashSet::new();
        let Ok(topic) = self.broker.topic(alert_topic) else {
            return found;
        };
        let generation = generation.to_string();
        for (i, part) in topic.partitions.iter().enumerate() {
            let mut at = ends
                .get(i)
                .copied()
                .unwrap_or(0)
                .max(part.log_start_offset());
            while at < part.high_watermark() {
                let Ok(page) = read_events(part, alert_topic, i as u32, at, APPLY_CHUNK) else {
                    break;
                };
                for r in &page.events {
                    let e = &r.event;
                    if e.extensions.get("spatedetector").map(String::as_str) != Some(name)
                        || e.extensions.get("spategeneration") != Some(&generation)
                    {
                        continue;
                    }
                    let source = (
                        e.extensions.get("spatesourcepartition"),
                        e.extensions.get("spatesourceoffset"),
                    );
                    if let (Some(p), Some(o)) = source
                        && let (Ok(p), Ok(o)) = (p.parse(), o.parse())
                    {
                        found.insert((p, o, e.event_type.clone()));
                    }
                }
                if page.next_offset <= at {
                    break;
                }
                at = page.next_offset;
            }
        }
        found
    }

    fn dets(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Det>>> {
        self.dets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the followers and the export of each detector's lag as metrics.
    pub fn start(self: &Arc<Self>) {
        let all: Vec<(String, Arc<Det>)> = self
            .dets()
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, d) in all {
            tokio::spawn(self.clone().follow(name, d));
        }
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
                    metrics::gauge!("spate_detector_lag_records", "detector" => s.name.clone())
                        .set(s.lag_records as f64);
                    metrics::gauge!("spate_detector_series", "detector" => s.name.clone())
                        .set(s.series as f64);
                    metrics::counter!("spate_detector_alerts_total", "detector" => s.name)
                        .absolute(s.alerts);
                }
            }
        });
    }

    /// Creates or replaces a detector; `true` when created. A changed definition starts over
    /// with fresh state.
    pub async fn put(
        self: &Arc<Self>,
        name: &str,
        definition: Definition,
    ) -> Result<(bool, Status)> {
        spate_log::config::validate_topic_name(name)
            .map_err(|e| DetectorError::Invalid(format!("invalid detector name: {e}")))?;
        let compiled = definition
            .clone()
            .compile()
            .map_err(DetectorError::Invalid)?;
        let topic = self.broker.topic(&definition.topic)?;
        let existing = self.dets().get(name).cloned();
        if let Some(d) = &existing
            && d.compiled.definition == definition
        {
            return Ok((false, self.status(name)?));
        }
        if existing.is_none() && self.dets().len() >= DETECTORS_MAX {
            return Err(DetectorError::Invalid(format!(
                "a server holds at most {DETECTORS_MAX} detectors"
            )));
        }
        self.begin(name, compiled, &topic, existing).await
    }

    /// Starts a new generation of a detector over `topic`, with fresh state, retiring the one
    /// before it; `true` when there was none.
    async fn begin(
        self: &Arc<Self>,
        name: &str,
        compiled: Compiled,
        topic: &spate_log::Topic,
        existing: Option<Arc<Det>>,
    ) -> Result<(bool, Status)> {
        let definition = &compiled.definition;
        let generation = existing.as_ref().map_or(0, |d| d.generation + 1);
        let positions: Vec<u64> = topic
            .partitions
            .iter()
            .map(|p| match definition.from {
                StartFrom::Earliest => p.log_start_offset(),
                StartFrom::Latest => p.high_watermark(),
            })
            .collect();
        let d = &compiled.definition;
        let alert_ends = self.alert_ends(&d.alert_topic);
        let meta = Meta {
            definition: d.clone(),
            generation,
            positions: positions.clone(),
            totals: Totals::default(),
            errors: 0,
            last_error: None,
            alert_ends,
            topic_created_ms: Some(topic.created_ms),
        };
        let det = Arc::new(Det {
            generation,
            restored: positions.clone(),
            live: Mutex::new(Live {
                detector: Detector::new(d.algorithm.clone(), d.cooldown_ms, d.max_series),
                positions,
                topic_created_ms: Some(topic.created_ms),
                errors: 0,
                last_error: None,
                already: HashSet::new(),
                checkpointed: Instant::now(),
                recent: Default::default(),
            }),
            compiled: Arc::new(compiled),
            retired: Default::default(),
            step: Default::default(),
        });
        let (metas, commit, key, bytes) = (
            self.metas.clone(),
            self.commit.clone(),
            name.to_string(),
            serde_json::to_vec(&meta).expect("detector meta serializes"),
        );
        let old = existing.clone();
        let took_over = blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            // Replaced or deleted since it was looked up: that change stands.
            if let Some(o) = &old
                && o.retired.swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                return Ok(false);
            }
            metas.insert(key, bytes).map_err(store_err)?;
            Ok(true)
        })
        .await?;
        if !took_over {
            return Err(DetectorError::Conflict(format!(
                "detector {name} changed while this request ran"
            )));
        }
        if let Some(o) = &existing {
            self.drop_series(name, o.generation);
        }
        self.dets().insert(name.to_string(), det.clone());
        tokio::spawn(self.clone().follow(name.to_string(), det));
        Ok((existing.is_none(), self.status(name)?))
    }

    /// Deletes a detector and its state (its alerts stay in the alert topic).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let d = self
            .dets()
            .get(name)
            .cloned()
            .ok_or_else(|| DetectorError::NotFound(name.to_string()))?;
        let (metas, commit, key) = (self.metas.clone(), self.commit.clone(), name.to_string());
        let q = d.clone();
        blocking(move || {
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            q.retired.store(true, std::sync::atomic::Ordering::Release);
            metas.remove(key).map_err(store_err)
        })
        .await?;
        self.dets().remove(name);
        self.drop_series(name, d.generation);
        Ok(())
    }

    /// Deletes the stored series of a retired generation, in the background.
    fn drop_series(&self, name: &str, generation: u64) {
        let (series, prefix) = (self.series.clone(), series_prefix(name, generation));
        tokio::task::spawn_blocking(move || {
            let keys: Vec<_> = series
                .prefix(&prefix)
                .filter_map(|i| i.key().ok())
                .collect();
            for k in keys {
                if let Err(e) = series.remove(k) {
                    tracing::warn!(error = %e, "cannot delete a retired detector's series");
                    return;
                }
            }
        });
    }

    fn alert_ends(&self, alert_topic: &str) -> Vec<u64> {
        self.broker.topic(alert_topic).map_or_else(
            |_| Vec::new(),
            |t| t.partitions.iter().map(|p| p.high_watermark()).collect(),
        )
    }

    pub fn list(&self) -> Vec<Status> {
        let names: Vec<String> = self.dets().keys().cloned().collect();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    pub fn status(&self, name: &str) -> Result<Status> {
        let d = self
            .dets()
            .get(name)
            .cloned()
            .ok_or_else(|| DetectorError::NotFound(name.to_string()))?;
        let def = &d.compiled.definition;
        let (positions, series, totals, errors, last_error, max_series) = {
            let l = d.live();
            (
                l.positions.clone(),
                l.detector.len(),
                l.detector.totals,
                l.errors,
                l.last_error.clone(),
                l.detector.max_series(),
            )
        };
        let (lag, oldest) = self
            .broker
            .topic(&def.topic)
            .map_or((0, None), |t| crate::follower_lag(&t, &positions));
        let token = |p: &[u64]| {
            let next: BTreeMap<u32, u64> =
                p.iter().enumerate().map(|(i, o)| (i as u32, *o)).collect();
            position_token(&def.topic, &next)
        };
        let error = (totals.evicted > 0).then(|| {
            format!(
                "series cap reached: at most {max_series} series are tracked and the least recently \
                 seen are evicted ({} so far); raise max_series or narrow the filter",
                totals.evicted
            )
        });
        Ok(Status {
            name: name.to_string(),
            definition: def.clone(),
            status: if lag == 0 { "running" } else { "catching_up" },
            series,
            points: totals.points,
            alerts: totals.alerts,
            evicted: totals.evicted,
            position: token(&positions),
            lag_records: lag,
            lag_seconds: oldest.map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0),
            errors,
            last_error,
            error,
            restored: token(&d.restored),
        })
    }

    /// The series a detector tracks, most recently seen first.
    pub fn series(&self, name: &str, limit: usize) -> Result<Vec<SeriesInfo>> {
        let d = self
            .dets()
            .get(name)
            .cloned()
            .ok_or_else(|| DetectorError::NotFound(name.to_string()))?;
        let list = d.live().detector.recent_series(limit);
        Ok(list
            .into_iter()
            .map(|(series, ms)| SeriesInfo {
                series,
                last_seen: now_rfc3339(ms),
            })
            .collect())
    }

    /// The recent points of one series, oldest first.
    pub fn points(&self, name: &str, series: &str) -> Result<Vec<Point>> {
        let d = self
            .dets()
            .get(name)
            .cloned()
            .ok_or_else(|| DetectorError::NotFound(name.to_string()))?;
        let l = d.live();
        if !l.detector.tracks(series) {
            return Err(DetectorError::SeriesNotFound(format!(
                "detector {name} tracks no series {series:?}"
            )));
        }
        Ok(l.recent.get(series).map_or_else(Vec::new, |ring| {
            ring.iter()
                .map(|p| {
                    let side = |v: f32| (!v.is_nan()).then_some(f64::from(v));
                    Point {
                        time: now_rfc3339(p.t),
                        value: p.value,
                        score: f64::from(p.score),
                        low: side(p.low),
                        high: side(p.high),
                        alert: p.alert,
                    }
                })
                .collect()
        }))
    }

    /// Checkpoints every detector and stops the followers.
    pub async fn stop(&self) -> Result<()> {
        self.stopped.send_replace(true);
        let all: Vec<(String, Arc<Det>)> = self
            .dets()
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, d) in all {
            self.checkpoint(&name, &d).await?;
        }
        let db = self.db.clone();
        blocking(move || db.persist(fjall::PersistMode::SyncAll).map_err(store_err)).await?;
        Ok(())
    }

    fn current(&self, d: &Arc<Det>) -> bool {
        !*self.stopped.borrow() && !d.retired()
    }

    async fn follow(self: Arc<Self>, name: String, d: Arc<Det>) {
        let mut backoff = Duration::from_millis(100);
        while self.current(&d) {
            if let Some(topic) = self.topic_replaced(&d) {
                // The state describes a log that is gone: the detector starts over on the new
                // topic, as after a changed definition (its alerts stay in the alert topic).
                tracing::info!(detector = %name, "topic created again; starting over");
                let compiled = crate::filter::stored(|| d.compiled.definition.clone().compile());
                let restarted = match compiled {
                    Ok(c) => self.begin_from_follower(&name, c, topic, d.clone()).await,
                    Err(e) => Err(DetectorError::Store(e)),
                };
                if let Err(e) = restarted {
                    tracing::warn!(detector = %name, error = %e, "starting over after the topic was created again failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                continue;
            }
            match self.follow_step(&name, &d).await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(detector = %name, error = %e, "detector follower failed; retrying");
                    if let Err(e) = self.reload(&name, &d).await {
                        tracing::warn!(detector = %name, error = %e, "cannot reload the detector's checkpoint");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if d.live().checkpointed.elapsed() >= CHECKPOINT_EVERY
                && let Err(e) = self.checkpoint(&name, &d).await
            {
                tracing::warn!(detector = %name, error = %e, "detector checkpoint failed");
            }
        }
    }

    /// The detector's topic when it is no longer the one read: deleted and created again under
    /// its name. A checkpoint written before creation times were recorded takes the topic found
    /// for its own (kept with the next checkpoint).
    fn topic_replaced(&self, d: &Det) -> Option<Arc<spate_log::Topic>> {
        let topic = self.broker.topic(&d.compiled.definition.topic).ok()?;
        let mut l = d.live();
        (*l.topic_created_ms.get_or_insert(topic.created_ms) != topic.created_ms).then_some(topic)
    }

    /// [`Detectors::begin`] for a follower, which `begin` itself spawns: the boxed future breaks
    /// the cycle in the futures' types.
    fn begin_from_follower<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
        compiled: Compiled,
        topic: Arc<spate_log::Topic>,
        existing: Arc<Det>,
    ) -> futures_util::future::BoxFuture<'a, Result<(bool, Status)>> {
        Box::pin(async move { self.begin(name, compiled, &topic, Some(existing)).await })
    }

    /// Processes what there is, or waits for news.
    async fn follow_step(&self, name: &str, d: &Arc<Det>) -> Result<()> {
        let topic = self.broker.topic(&d.compiled.definition.topic)?;
        let mut news = self.broker.watch_topic(&topic);
        let mut progressed = false;
        for (index, part) in topic.partitions.iter().enumerate() {
            let from = d.live().positions.get(index).copied().unwrap_or(0);
            if from >= part.high_watermark() {
                continue;
            }
            self.apply_chunk(name, d, &topic, index as u32, from)
                .await?;
            progressed = true;
        }
        if progressed {
            return Ok(());
        }
        let mut stopped = self.stopped.subscribe();
        tokio::select! {
            _ = news.changed() => {}
            _ = stopped.wait_for(|s| *s) => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        Ok(())
    }

    /// Steps the series with up to [`APPLY_CHUNK`] events of one partition, writes the alerts
    /// they raise and only then moves the position on.
    async fn apply_chunk(
        &self,
        name: &str,
        d: &Arc<Det>,
        topic: &Arc<spate_log::Topic>,
        partition: u32,
        from: u64,
    ) -> Result<()> {
        let _step = d.step.lock().await;
        let part = topic.partition(partition)?.clone();
        let (tname, det, dname) = (topic.name.clone(), d.clone(), name.to_string());
        let (alerts, next) = blocking(move || {
            let start = from.max(part.log_start_offset());
            let page = read_events(&part, &tname, partition, start, APPLY_CHUNK)?;
            let c = &det.compiled;
            let mut live = det.live();
            let mut alerts = Vec::new();
            for r in &page.events {
                match point(c, &r.event) {
                    Ok(None) => {}
                    Ok(Some((series, value))) => {
                        let t = event_ms_of(&r.event);
                        let seen = live.detector.observe(&series, t, value);
                        if !live.recent.contains_key(&series) {
                            live.recent.insert(series.clone(), Default::default());
                        }
                        let ring = live.recent.get_mut(&series).expect("inserted");
                        if ring.len() == RECENT_POINTS {
                            ring.pop_front();
                        }
                        ring.push_back(RecentPoint {
                            t,
                            value,
                            score: seen.score as f32,
                            low: seen.low.map_or(f32::NAN, |v| v as f32),
                            high: seen.high.map_or(f32::NAN, |v| v as f32),
                            alert: seen.alert.is_some(),
                        });
                        if let Some(alert) = seen.alert {
                            let kind = alert.kind.event_type().to_string();
                            if !live.already.remove(&(partition, r.offset, kind)) {
                                alerts.push(alert_event(
                                    &dname,
                                    det.generation,
                                    c,
                                    &series,
                                    &alert,
                                    (partition, r.offset),
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        live.errors += 1;
                        live.last_error = Some(format!("offset {partition}:{}: {e}", r.offset));
                    }
                }
            }
            Ok((alerts, page.next_offset.max(start)))
        })
        .await?;
        if !alerts.is_empty() {
            self.write_alerts(&d.compiled.definition.alert_topic, alerts)
                .await?;
        }
        if let Some(p) = d.live().positions.get_mut(partition as usize) {
            *p = next;
        }
        Ok(())
    }

    async fn write_alerts(&self, alert_topic: &str, alerts: Vec<Event>) -> Result<()> {
        self.broker
            .topic_or_create(alert_topic, TopicConfig::default())
            .await?;
        self.broker.publish(alert_topic, alerts).await?;
        Ok(())
    }

    /// Writes the changed series and the positions they reflect in one atomic batch.
    async fn checkpoint(&self, name: &str, d: &Arc<Det>) -> Result<()> {
        let _step = d.step.lock().await;
        let alert_ends = self.alert_ends(&d.compiled.definition.alert_topic);
        let (changed, evicted, meta) = {
            let mut l = d.live();
            l.checkpointed = Instant::now();
            let (changed, evicted) = l.detector.take_changes();
            for s in &evicted {
                l.recent.remove(s);
            }
            let meta = Meta {
                definition: d.compiled.definition.clone(),
                generation: d.generation,
                positions: l.positions.clone(),
                totals: l.detector.totals,
                errors: l.errors,
                last_error: l.last_error.clone(),
                alert_ends,
                topic_created_ms: l.topic_created_ms,
            };
            (changed, evicted, meta)
        };
        let (db, metas, series, commit) = (
            self.db.clone(),
            self.metas.clone(),
            self.series.clone(),
            self.commit.clone(),
        );
        let (dname, det) = (name.to_string(), d.clone());
        blocking(move || {
            let mut batch = db.batch();
            for (s, seen, bytes) in changed {
                let mut v = seen.to_be_bytes().to_vec();
                v.extend_from_slice(&bytes);
                batch.insert(&series, series_key(&dname, det.generation, &s), v);
            }
            for s in evicted {
                batch.remove(&series, series_key(&dname, det.generation, &s));
            }
            batch.insert(
                &metas,
                dname.as_bytes(),
                serde_json::to_vec(&meta).expect("detector meta serializes"),
            );
            let _held = commit.lock().unwrap_or_else(|e| e.into_inner());
            if det.retired() {
                return Ok(());
            }
            batch.commit().map_err(store_err)
        })
        .await?;
        Ok(())
    }
}

/// The series and value of an event, or `None` when the filter leaves it out.
fn point(c: &Compiled, event: &Event) -> Result<Option<(String, f64)>, String> {
    let cel_input = std::cell::OnceCell::new();
    let input = || cel_input.get_or_init(|| FilterInput::new(event));
    if !c.filter.is_empty() && c.filter.judge(event, input) != crate::filter::Verdict::Match {
        return Ok(None);
    }
    let parsed = std::cell::OnceCell::new();
    let data = || {
        parsed
            .get_or_init(|| {
                event
                    .data
                    .as_deref()
                    .and_then(|d| serde_json::from_slice::<Json>(d).ok())
            })
            .as_ref()
    };
    let series = match &c.series {
        None => "default".to_string(),
        Some(x) => match x.eval(data, input).map_err(|e| format!("series: {e}"))? {
            Json::String(s) => s,
            Json::Number(n) => n.to_string(),
            Json::Bool(b) => b.to_string(),
            other => return Err(format!("series: {other} is not a string")),
        },
    };
    if series.len() > SERIES_NAME_BYTES_MAX {
        return Err(format!(
            "series: the name takes {} bytes, over the limit of {SERIES_NAME_BYTES_MAX}",
            series.len()
        ));
    }
    let value = c
        .value
        .eval(data, input)
        .map_err(|e| format!("value: {e}"))?;
    let value = match &value {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|v| v.is_finite())
    .ok_or_else(|| format!("value: {value} is not a number"))?;
    Ok(Some((series, value)))
}

fn alert_event(
    detector: &str,
    generation: u64,
    c: &Compiled,
    series: &str,
    alert: &Alert,
    (partition, offset): (u32, u64),
) -> Event {
    let time = now_rfc3339(alert.time_ms);
    let data = json!({
        "detector": detector,
        "series": series,
        "value": alert.value,
        "score": alert.score,
        "expected": {"low": alert.low, "high": alert.high},
        "source": {"topic": c.definition.topic, "partition": partition, "offset": offset},
        "time": time,
    });
    let kind = alert.kind.event_type();
    let mut extensions = BTreeMap::new();
    extensions.insert("spatedetector".to_string(), detector.to_string());
    extensions.insert("spategeneration".to_string(), generation.to_string());
    extensions.insert("spatesourcepartition".to_string(), partition.to_string());
    extensions.insert("spatesourceoffset".to_string(), offset.to_string());
    extensions.insert("partitionkey".to_string(), series.to_string());
    Event {
        id: Some(format!(
            "{detector}.{generation}.{partition}.{offset}.{}",
            kind.rsplit('.').next().unwrap_or(kind)
        )),
        source: Some(format!("/spate/detectors/{detector}")),
        event_type: kind.to_string(),
        subject: Some(series.to_string()),
        time: Some(time),
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        extensions,
        data: Some(serde_json::to_vec(&data).expect("alert data serializes")),
    }
}
