//! Threshold rules: a value that stays outside `[min, max]` for `for_ms` raises an alert; the
//! alert clears once the value is back inside the range by the hysteresis margin.

use serde::{Deserialize, Serialize};

/// A rule's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// How long the value must stay outside before the alert is raised (0: at once).
    #[serde(default)]
    pub for_ms: u64,
    /// How far back inside the range the value must come for the alert to clear; by default 2 %
    /// of the range when both bounds are set, otherwise 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<f64>,
}

impl Rule {
    /// Checks the definition; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.min.is_none() && self.max.is_none() {
            return Err("a threshold rule needs min, max or both".into());
        }
        for (name, v) in [
            ("min", self.min),
            ("max", self.max),
            ("hysteresis", self.hysteresis),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("{name} must be a finite number"));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            return Err(format!("min ({lo}) is above max ({hi})"));
        }
        if self.hysteresis.is_some_and(|h| h < 0.0) {
            return Err("hysteresis must not be negative".into());
        }
        if let (Some(lo), Some(hi), Some(h)) = (self.min, self.max, self.hysteresis)
            && 2.0 * h > hi - lo
        {
            return Err(format!(
                "hysteresis ({h}) must be at most half the range ({})",
                hi - lo
            ));
        }
        Ok(())
    }

    fn margin(&self) -> f64 {
        match (self.hysteresis, self.min, self.max) {
            (Some(h), _, _) => h,
            (None, Some(lo), Some(hi)) => 0.02 * (hi - lo),
            _ => 0.0,
        }
    }

    fn outside(&self, v: f64) -> bool {
        self.min.is_some_and(|lo| v < lo) || self.max.is_some_and(|hi| v > hi)
    }

    /// Back inside by the hysteresis margin.
    fn cleared(&self, v: f64) -> bool {
        let m = self.margin();
        self.min.is_none_or(|lo| v >= lo + m) && self.max.is_none_or(|hi| v <= hi - m)
    }
}

/// What a point did to a rule's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Raised,
    Cleared,
}

/// A rule's state for one series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    /// When the current run of points outside the range began.
    outside_since: Option<i64>,
    /// Whether the alert is raised.
    pub raised: bool,
}

impl RuleState {
    /// Takes one point at time `t_ms` (ms since the epoch, not decreasing).
    pub fn step(&mut self, rule: &Rule, t_ms: i64, value: f64) -> Transition {
        if self.raised {
            if rule.cleared(value) {
                self.raised = false;
                self.outside_since = None;
                return Transition::Cleared;
            }
            return Transition::None;
        }
        if !rule.outside(value) {
            self.outside_since = None;
            return Transition::None;
        }
        let since = *self.outside_since.get_or_insert(t_ms);
        // Durations past i64::MAX (u64 in the definition) mean never.
        if t_ms.saturating_sub(since) >= i64::try_from(rule.for_ms).unwrap_or(i64::MAX) {
            self.raised = true;
            return Transition::Raised;
        }
        Transition::None
    }

    /// The band a value is expected in.
    pub fn expected(rule: &Rule) -> (Option<f64>, Option<f64>) {
        (rule.min, rule.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(for_ms: u64) -> Rule {
        Rule {
            min: Some(35.0),
            max: Some(39.5),
            for_ms,
            hysteresis: Some(0.5),
        }
    }

    #[test]
    fn raises_only_after_staying_outside_for_the_duration() {
        let r = rule(30_000);
        let mut s = RuleState::default();
        assert_eq!(s.step(&r, 0, 37.0), Transition::None);
        assert_eq!(s.step(&r, 10_000, 40.0), Transition::None);
        assert_eq!(s.step(&r, 20_000, 40.2), Transition::None);
        // Back inside: the run starts over.
        assert_eq!(s.step(&r, 30_000, 39.0), Transition::None);
        assert_eq!(s.step(&r, 40_000, 40.0), Transition::None);
        assert_eq!(s.step(&r, 69_999, 41.0), Transition::None);
        assert_eq!(s.step(&r, 70_000, 41.0), Transition::Raised);
        assert_eq!(s.step(&r, 80_000, 41.0), Transition::None);
        // Below the range counts as outside as well.
        let mut low = RuleState::default();
        assert_eq!(low.step(&r, 0, 34.0), Transition::None);
        assert_eq!(low.step(&r, 30_000, 33.0), Transition::Raised);
    }

    #[test]
    fn a_duration_past_i64_max_never_elapses() {
        let r = rule(u64::MAX);
        let mut s = RuleState::default();
        assert_eq!(s.step(&r, 0, 40.0), Transition::None);
        assert_eq!(s.step(&r, i64::MAX - 1, 41.0), Transition::None);
        assert!(!s.raised);
    }

    #[test]
    fn clears_with_hysteresis() {
        let r = rule(0);
        let mut s = RuleState::default();
        assert_eq!(s.step(&r, 0, 39.6), Transition::Raised);
        // Inside the range but within the margin: still raised.
        assert_eq!(s.step(&r, 1, 39.4), Transition::None);
        assert_eq!(s.step(&r, 2, 39.1), Transition::None);
        assert!(s.raised);
        assert_eq!(s.step(&r, 3, 39.0), Transition::Cleared);
        assert_eq!(s.step(&r, 4, 39.4), Transition::None);
        assert_eq!(s.step(&r, 5, 39.6), Transition::Raised);
    }

    #[test]
    fn one_sided_rules_and_validation() {
        let r = Rule {
            min: None,
            max: Some(100.0),
            for_ms: 0,
            hysteresis: None,
        };
        let mut s = RuleState::default();
        assert_eq!(s.step(&r, 0, -1e9), Transition::None);
        assert_eq!(s.step(&r, 1, 100.5), Transition::Raised);
        assert_eq!(s.step(&r, 2, 100.0), Transition::Cleared);
        assert!(r.validate().is_ok());
        let bad = |min, max, h| {
            Rule {
                min,
                max,
                for_ms: 0,
                hysteresis: h,
            }
            .validate()
            .unwrap_err()
        };
        assert!(bad(None, None, None).contains("min, max"));
        assert!(bad(Some(2.0), Some(1.0), None).contains("above max"));
        assert!(bad(Some(0.0), Some(1.0), Some(0.8)).contains("half the range"));
        assert!(bad(Some(f64::NAN), None, None).contains("finite"));
        assert!(bad(Some(0.0), None, Some(-1.0)).contains("negative"));
    }
}
