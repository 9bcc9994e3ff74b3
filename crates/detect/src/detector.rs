//! A detector: one algorithm applied to many series, each with its own state, with a cap on the
//! number of series (the least recently seen is evicted) and a cooldown between alerts.
//!
//! Pure: the caller hands in each point with its series name and time, and gets back the alert
//! it raises, if any. Time is the points' own (event time), so replaying the same points from the
//! same state raises the same alerts.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::auto;
use crate::threshold::{Rule, RuleState, Transition};

/// The algorithm of a detector, as defined by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Algorithm {
    /// A rule on the value's range.
    Threshold(Rule),
    /// Unsupervised: learns each series and scores each point 0..1.
    Auto(AutoConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoConfig {
    /// 0..1: higher raises more alerts. An alert is raised at a score of `1 - sensitivity`.
    #[serde(default = "default_sensitivity")]
    pub sensitivity: f64,
}

fn default_sensitivity() -> f64 {
    0.5
}

impl Algorithm {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Algorithm::Threshold(rule) => rule.validate(),
            Algorithm::Auto(a) => {
                if !(0.0..=1.0).contains(&a.sensitivity) {
                    return Err(format!(
                        "sensitivity must be between 0 and 1, not {}",
                        a.sensitivity
                    ));
                }
                Ok(())
            }
        }
    }
}

/// What kind of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertKind {
    Threshold,
    ThresholdCleared,
    Anomaly,
}

impl AlertKind {
    /// The CloudEvents type of the alert.
    pub fn event_type(self) -> &'static str {
        match self {
            AlertKind::Threshold => "spate.alert.threshold",
            AlertKind::ThresholdCleared => "spate.alert.threshold.cleared",
            AlertKind::Anomaly => "spate.alert.anomaly",
        }
    }
}

/// An alert raised by a point.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub value: f64,
    /// 0..1: 1 for a threshold rule, the anomaly score for `auto`.
    pub score: f64,
    /// The band the value was expected in (either side may be open).
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub time_ms: i64,
}

/// A point's outcome: its score, the band it was expected in (either side may be open) and the
/// alert it raised, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub score: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub alert: Option<Alert>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum State {
    Threshold {
        rule: RuleState,
        /// The raise was announced (not held back by the cooldown): its clear is announced too.
        announced: bool,
    },
    Auto(Box<auto::Series>),
}

/// One series' state, as checkpointed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesState {
    state: State,
    last_ms: i64,
    last_alert_ms: Option<i64>,
    points: u64,
}

struct Entry {
    state: SeriesState,
    /// Its place in the least-recently-seen order.
    seen: u64,
}

/// Totals of a detector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub points: u64,
    pub alerts: u64,
    pub evicted: u64,
}

/// A detector's state over all its series.
pub struct Detector {
    algorithm: Algorithm,
    params: auto::Params,
    cooldown_ms: u64,
    max_series: usize,
    series: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    clock: u64,
    pub totals: Totals,
    dirty: HashSet<String>,
    evicted: HashSet<String>,
}

impl Detector {
    pub fn new(algorithm: Algorithm, cooldown_ms: u64, max_series: usize) -> Detector {
        let params = match &algorithm {
            Algorithm::Auto(a) => auto::Params::with_sensitivity(a.sensitivity),
            Algorithm::Threshold(_) => auto::Params::default(),
        };
        Detector {
            algorithm,
            params,
            cooldown_ms,
            max_series: max_series.max(1),
            series: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            totals: Totals::default(),
            dirty: HashSet::new(),
            evicted: HashSet::new(),
        }
    }

    /// Series tracked now.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    pub fn max_series(&self) -> usize {
        self.max_series
    }

    fn fresh(&self, t_ms: i64) -> SeriesState {
        let state = match &self.algorithm {
            Algorithm::Threshold(_) => State::Threshold {
                rule: RuleState::default(),
                announced: false,
            },
            Algorithm::Auto(_) => State::Auto(Box::new(auto::Series::new(&self.params))),
        };
        SeriesState {
            state,
            last_ms: t_ms,
            last_alert_ms: None,
            points: 0,
        }
    }

    /// Marks a series as just seen, evicting the least recently seen one when it is new and the
    /// cap is reached.
    fn touch(&mut self, series: &str, t_ms: i64) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.series.get_mut(series) {
            self.order.remove(&e.seen);
            e.seen = clock;
            self.order.insert(clock, series.to_string());
            return;
        }
        if self.series.len() >= self.max_series
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.series.remove(&oldest);
            self.dirty.remove(&oldest);
            self.evicted.insert(oldest);
            self.totals.evicted += 1;
        }
        let state = self.fresh(t_ms);
        self.evicted.remove(series);
        self.series
            .insert(series.to_string(), Entry { state, seen: clock });
        self.order.insert(clock, series.to_string());
    }

    /// Takes one point of a series.
    pub fn observe(&mut self, series: &str, t_ms: i64, value: f64) -> Observed {
        self.touch(series, t_ms);
        self.dirty.insert(series.to_string());
        self.totals.points += 1;
        // A cooldown past i64::MAX (u64 in the definition) never ends.
        let cooldown = i64::try_from(self.cooldown_ms).unwrap_or(i64::MAX);
        let params = &self.params;
        let entry = self.series.get_mut(series).expect("touched");
        let s = &mut entry.state;
        let t = t_ms.max(s.last_ms);
        s.last_ms = t;
        s.points += 1;
        let cooled = s
            .last_alert_ms
            .is_none_or(|last| t.saturating_sub(last) >= cooldown);
        let (score, (low, high), alert) = match (&mut s.state, &self.algorithm) {
            (State::Threshold { rule, announced }, Algorithm::Threshold(def)) => {
                let (low, high) = RuleState::expected(def);
                let make = |kind| Alert {
                    kind,
                    value,
                    score: 1.0,
                    low,
                    high,
                    time_ms: t,
                };
                let alert = match rule.step(def, t, value) {
                    Transition::Raised if cooled => {
                        *announced = true;
                        Some(make(AlertKind::Threshold))
                    }
                    Transition::Raised => None,
                    Transition::Cleared if *announced => {
                        *announced = false;
                        Some(make(AlertKind::ThresholdCleared))
                    }
                    Transition::Cleared | Transition::None => None,
                };
                (if rule.raised { 1.0 } else { 0.0 }, (low, high), alert)
            }
            (State::Auto(a), Algorithm::Auto(_)) => {
                let scored = a.score(params, t, value);
                let (low, high) = (scored.band.map(|b| b.0), scored.band.map(|b| b.1));
                let alert = (scored.alert && cooled).then_some(Alert {
                    kind: AlertKind::Anomaly,
                    value,
                    score: scored.score,
                    low,
                    high,
                    time_ms: t,
                });
                (scored.score, (low, high), alert)
            }
            _ => unreachable!("a series' state matches its detector's algorithm"),
        };
        if let Some(a) = &alert
            && a.kind != AlertKind::ThresholdCleared
        {
            s.last_alert_ms = Some(t);
        }
        if alert.is_some() {
            self.totals.alerts += 1;
        }
        Observed {
            score,
            low,
            high,
            alert,
        }
    }

    /// The series changed since the last call, each with its place in the least-recently-seen
    /// order and its state encoded, and the series evicted since then (whose stored state
    /// should go).
    #[allow(clippy::type_complexity)]
    pub fn take_changes(&mut self) -> (Vec<(String, u64, Vec<u8>)>, Vec<String>) {
        let dirty: Vec<String> = self.dirty.drain().collect();
        let changed = dirty
            .into_iter()
            .filter_map(|name| {
                let e = self.series.get(&name)?;
                let bytes = postcard::to_allocvec(&e.state).expect("series state encodes");
                Some((name, e.seen, bytes))
            })
            .collect();
        (changed, self.evicted.drain().collect())
    }

    /// Restores a series from what [`Detector::take_changes`] gave. Returns false when the bytes
    /// do not decode or do not fit the algorithm.
    pub fn restore(&mut self, series: &str, seen: u64, bytes: &[u8]) -> bool {
        let Ok(state) = postcard::from_bytes::<SeriesState>(bytes) else {
            return false;
        };
        let fits = matches!(
            (&state.state, &self.algorithm),
            (State::Threshold { .. }, Algorithm::Threshold(_))
                | (State::Auto(_), Algorithm::Auto(_))
        );
        if !fits {
            return false;
        }
        if let Some(old) = self.series.remove(series) {
            self.order.remove(&old.seen);
        }
        while self.series.len() >= self.max_series {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.series.remove(&oldest);
        }
        self.clock = self.clock.max(seen);
        self.order.insert(seen, series.to_string());
        self.series
            .insert(series.to_string(), Entry { state, seen });
        true
    }

    /// Series names with the time each was last seen (ms), most recent first, at most `limit`.
    pub fn recent_series(&self, limit: usize) -> Vec<(String, i64)> {
        self.order
            .values()
            .rev()
            .take(limit)
            .filter_map(|n| self.series.get(n).map(|e| (n.clone(), e.state.last_ms)))
            .collect()
    }

    /// Whether a series is tracked.
    pub fn tracks(&self, series: &str) -> bool {
        self.series.contains_key(series)
    }

    /// Series in least-recently-seen order, oldest first.
    pub fn series_in_order(&self) -> Vec<String> {
        self.order.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threshold() -> Algorithm {
        Algorithm::Threshold(Rule {
            min: None,
            max: Some(10.0),
            for_ms: 0,
            hysteresis: Some(1.0),
        })
    }

    #[test]
    fn definitions_parse_and_validate() {
        let a: Algorithm =
            serde_json::from_str(r#"{"kind":"threshold","min":35.0,"max":39.5,"for_ms":30000}"#)
                .unwrap();
        assert!(a.validate().is_ok());
        let a: Algorithm = serde_json::from_str(r#"{"kind":"auto"}"#).unwrap();
        assert_eq!(a, Algorithm::Auto(AutoConfig { sensitivity: 0.5 }));
        let a: Algorithm = serde_json::from_str(r#"{"kind":"auto","sensitivity":1.5}"#).unwrap();
        assert!(a.validate().unwrap_err().contains("between 0 and 1"));
        assert!(serde_json::from_str::<Algorithm>(r#"{"kind":"magic"}"#).is_err());
        assert!(serde_json::from_str::<Algorithm>(r#"{"kind":"auto","sensitivty":0.2}"#).is_err());
        assert!(
            serde_json::from_str::<Algorithm>(r#"{"kind":"threshold","max":1,"for":3}"#).is_err()
        );
    }

    #[test]
    fn cooldown_holds_back_repeats_and_their_clears() {
        let mut d = Detector::new(threshold(), 60_000, 10);
        let kinds = |d: &mut Detector, t: i64, v: f64| d.observe("s", t, v).alert.map(|a| a.kind);
        assert_eq!(kinds(&mut d, 0, 11.0), Some(AlertKind::Threshold));
        assert_eq!(kinds(&mut d, 1_000, 8.0), Some(AlertKind::ThresholdCleared));
        // Raised again within the cooldown: neither the raise nor its clear is announced.
        assert_eq!(kinds(&mut d, 2_000, 12.0), None);
        assert_eq!(kinds(&mut d, 3_000, 5.0), None);
        assert_eq!(kinds(&mut d, 61_000, 12.0), Some(AlertKind::Threshold));
        // Another series has its own cooldown.
        assert!(d.observe("t", 61_500, 12.0).alert.is_some());
        assert_eq!(d.totals.alerts, 4);
        assert_eq!(d.totals.points, 6);
    }

    #[test]
    fn a_cooldown_past_i64_max_never_ends() {
        let mut d = Detector::new(threshold(), u64::MAX, 10);
        assert!(d.observe("s", 0, 11.0).alert.is_some());
        // The clear of an announced raise is announced; no later raise is.
        assert!(d.observe("s", 1, 8.0).alert.is_some());
        assert!(d.observe("s", 2, 12.0).alert.is_none());
        assert!(d.observe("s", 3, 8.0).alert.is_none());
        assert!(d.observe("s", i64::MAX - 1, 12.0).alert.is_none());
    }

    #[test]
    fn the_least_recently_seen_series_is_evicted_at_the_cap() {
        let mut d = Detector::new(threshold(), 0, 3);
        for (i, s) in ["a", "b", "c"].iter().enumerate() {
            d.observe(s, i as i64, 1.0);
        }
        d.observe("a", 10, 1.0);
        d.observe("d", 11, 1.0);
        assert_eq!(d.len(), 3);
        assert_eq!(d.totals.evicted, 1);
        assert_eq!(d.series_in_order(), vec!["c", "a", "d"]);
        let (changed, evicted) = d.take_changes();
        assert_eq!(evicted, vec!["b".to_string()]);
        assert_eq!(changed.len(), 3);
    }

    #[test]
    fn restored_state_carries_on_where_it_was() {
        let mut d = Detector::new(Algorithm::Auto(AutoConfig { sensitivity: 0.5 }), 0, 10);
        let mut copy = Detector::new(Algorithm::Auto(AutoConfig { sensitivity: 0.5 }), 0, 10);
        for i in 0..500 {
            let v = (i as f64 / 20.0).sin() * 10.0;
            d.observe("x", i * 60_000, v);
        }
        let (changed, _) = d.take_changes();
        for (name, seen, bytes) in &changed {
            assert!(copy.restore(name, *seen, bytes));
        }
        for i in 500..700 {
            let v = (i as f64 / 20.0).sin() * 10.0 + if i == 650 { 50.0 } else { 0.0 };
            let a = d.observe("x", i * 60_000, v);
            let b = copy.observe("x", i * 60_000, v);
            assert_eq!(a, b);
        }
        // A threshold detector's state does not restore into an auto detector.
        let mut t = Detector::new(threshold(), 0, 10);
        t.observe("x", 0, 1.0);
        let (changed, _) = t.take_changes();
        assert!(!copy.restore("y", 1, &changed[0].2));
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    #[test]
    fn an_auto_series_state_stays_bounded_however_long_it_runs() {
        let mut d = Detector::new(Algorithm::Auto(AutoConfig { sensitivity: 0.5 }), 0, 1);
        let mut x = 0u64;
        let mut level = 0.0;
        let mut sizes = Vec::new();
        for i in 0..60_000i64 {
            // A wandering random walk with jumps: new shapes keep coming.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let step = ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 4.0;
            level += step + if x.is_multiple_of(997) { 50.0 } else { 0.0 };
            d.observe("s", i * 60_000, level);
            if i % 20_000 == 19_999 {
                let (changed, _) = d.take_changes();
                sizes.push(changed[0].2.len());
            }
        }
        // Seasonal bins, at most 256 prototypes and fixed buffers: the state is bounded (its
        // largest possible encoding is about 16 KB).
        assert!(sizes.iter().all(|&s| s < 24 * 1024), "{sizes:?}");
    }
}
