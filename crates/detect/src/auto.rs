//! The unsupervised `auto` detector: online, per series, no lookahead, bounded memory.
//!
//! Each point goes through four stages.
//!
//! 1. **Forecast.** Four small models predict the value: the last value (random walk), an
//!    exponentially weighted level, a daily profile and a weekly profile (per time-of-day and
//!    time-of-week bin, an exponentially weighted mean, plus a shared offset that follows level
//!    shifts). Each model tracks its mean absolute error; the model with the smallest error so far
//!    is trusted, and the point's surprise is its error in units of that model's typical error
//!    (`z`), with a floor proportional to the series' spread so flat series do not divide by zero.
//! 2. **Likelihood.** As in Numenta's anomaly likelihood (Ahmad et al., 2017), the surprise is not
//!    used raw: the average of the last few capped surprises, and a slower moving average of them,
//!    are compared with their own long-run mean and variance, and the Gaussian tail probability of
//!    each becomes a score (`-log10(tail) / 12`). A series that is always noisy stops looking
//!    anomalous; a quiet series that starts to move does.
//! 3. **Novelty gate.** The recent shape of the series (a few smoothed, range-normalised values
//!    a stride apart) is matched against prototypes learnt so far, as in adaptive resonance
//!    (ARTime): a shape unlike any seen opens the gate fully; a familiar shape lets through only
//!    part of the score, so recurring excursions stop raising alerts once they are known.
//! 4. **One alert per episode.** Only a rising score counts, and after an alert the detector
//!    stays quiet for a refractory period.
//!
//! The parameters were chosen by searching for the best NAB standard score on its labelled data
//! (`spate nab`), one configuration for every series. Work per point is constant (the prototype
//! set is capped) and the state of a series takes at most about 17 KB.

use serde::{Deserialize, Serialize};

/// The detector's parameters; [`Params::default`] is the tuned configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Points before any score is given.
    pub warmup: u64,
    /// Weight of a new point in the level model.
    pub level_alpha: f64,
    /// Weight of a new point in the slow level the spread is measured around.
    pub slow_alpha: f64,
    /// Weight of a new error in each model's mean absolute error (and in the spread).
    pub scale_alpha: f64,
    /// Smallest weight of a new point in a seasonal bin's mean.
    pub season_alpha: f64,
    /// Weight of a new point in the seasonal profiles' level offset.
    pub bias_alpha: f64,
    /// Bins per day and per week.
    pub day_bins: usize,
    pub week_bins: usize,
    /// Visits a seasonal bin needs before its model forecasts.
    pub min_visits: u32,
    /// Errors count at most this many typical errors when a model's error is updated.
    pub clip: f64,
    /// The error floor, as a fraction of the series' spread.
    pub floor: f64,
    /// Surprise at which a point counts fully (the raw score is `min(z, zcap) / zcap`).
    pub zcap: f64,
    /// Points in the short average of raw scores.
    pub short: usize,
    /// Weight of a new point in the long-run statistics of the short average.
    pub long_alpha: f64,
    /// Weight of a new raw score in the slower moving average, and of that average in its
    /// long-run statistics.
    pub slow_avg_alpha: f64,
    pub slow_stats_alpha: f64,
    /// How much the slower average's score counts against the short one's.
    pub slow_weight: f64,
    /// Points before the likelihood gives scores.
    pub likelihood_warmup: u64,
    /// Novelty: points learnt before the value range is fixed (it still widens later), and the
    /// margin added on each side.
    pub shape_warmup: usize,
    pub shape_pad: f64,
    /// Novelty: smoothing of the normalised value, stride between the values of a shape, and
    /// values per shape.
    pub shape_smooth: f64,
    pub shape_stride: u64,
    pub shape_len: usize,
    /// Novelty: the largest distance (max norm) at which a shape matches a prototype.
    pub vigilance: f64,
    /// Novelty: how much a new shape counts less for each new shape seen recently (their count
    /// decays by `novelty_decay` per point), so a series that keeps changing shape stops alarming.
    pub novelty_damping: f64,
    pub novelty_decay: f64,
    /// Novelty: prototypes kept (the least used is replaced), and how far a matched prototype
    /// moves towards the shape.
    pub prototypes: usize,
    pub learn_rate: f64,
    /// The share of the score a familiar shape lets through, and how fast the gate closes again
    /// after a new shape (per point).
    pub gate_floor: f64,
    pub gate_decay: f64,
    /// Points of silence after an alert.
    pub refractory: u64,
    /// Internal score (before calibration) at which an alert is raised at sensitivity 0.5.
    pub tau: f64,
    /// The internal score that raises an alert, for the sensitivity asked for.
    pub alert_at: f64,
    /// A seasonal bin moves at most this many typical errors of its model per point.
    pub season_clip: f64,
    /// Width of the expected band reported with an alert, in typical errors on each side.
    pub band: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            warmup: 150,
            level_alpha: 0.1,
            slow_alpha: 0.05,
            scale_alpha: 0.005,
            season_alpha: 0.2,
            bias_alpha: 0.2,
            day_bins: 96,
            week_bins: 336,
            min_visits: 5,
            clip: 3.0,
            floor: 0.01,
            zcap: 20.0,
            short: 3,
            long_alpha: 0.004,
            slow_avg_alpha: 0.1,
            slow_stats_alpha: 0.0005,
            slow_weight: 0.6,
            likelihood_warmup: 50,
            shape_warmup: 150,
            shape_pad: 0.1,
            shape_smooth: 0.3,
            shape_stride: 12,
            shape_len: 4,
            vigilance: 0.05,
            novelty_damping: 0.1,
            novelty_decay: 0.999,
            prototypes: 256,
            learn_rate: 0.05,
            gate_floor: 0.6,
            gate_decay: 0.95,
            refractory: 12,
            tau: 0.2,
            alert_at: 0.2,
            band: 4.0,
            season_clip: 10.0,
        }
    }
}

impl Params {
    /// The tuned configuration, raising alerts at a calibrated score of `1 - sensitivity`.
    pub fn with_sensitivity(sensitivity: f64) -> Params {
        let p = Params::default();
        let target = (1.0 - sensitivity).clamp(0.0, 1.0);
        Params {
            alert_at: p.uncalibrate(target),
            ..p
        }
    }

    /// Maps the internal score to the reported one: `tau` becomes 0.5, 0 and 1 stay.
    pub fn calibrate(&self, s: f64) -> f64 {
        if s <= self.tau {
            0.5 * s / self.tau
        } else {
            0.5 + 0.5 * (s - self.tau) / (1.0 - self.tau)
        }
    }

    fn uncalibrate(&self, c: f64) -> f64 {
        if c <= 0.5 {
            2.0 * c * self.tau
        } else {
            self.tau + (2.0 * c - 1.0) * (1.0 - self.tau)
        }
    }
}

const MODELS: usize = 4;
/// A model forecasts once it has seen this many errors.
const MODEL_WARMUP: u64 = 20;
const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Bin {
    mean: f64,
    visits: u32,
}

/// A seasonal profile: a mean per bin of the period, and an offset for level shifts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Profile {
    bins: Vec<Bin>,
    offset: f64,
}

impl Profile {
    fn new(bins: usize) -> Profile {
        Profile {
            bins: vec![Bin::default(); bins.max(1)],
            offset: 0.0,
        }
    }

    fn bin(&self, t: i64, period: i64) -> usize {
        (t.rem_euclid(period) as i128 * self.bins.len() as i128 / period as i128) as usize
    }

    fn forecast(&self, i: usize, min_visits: u32) -> Option<f64> {
        let b = &self.bins[i];
        (b.visits >= min_visits).then_some(self.offset + b.mean)
    }

    /// Learns `x` in bin `i`; once the bin is known, a step counts at most `limit`.
    fn learn(&mut self, i: usize, x: f64, p: &Params, limit: f64) {
        let b = &mut self.bins[i];
        if b.visits > 0 {
            self.offset += p.bias_alpha * ((x - b.mean) - self.offset);
        }
        let a = p.season_alpha.max(1.0 / f64::from(b.visits + 1));
        let mut step = (x - self.offset) - b.mean;
        if b.visits >= p.min_visits {
            step = step.clamp(-limit, limit);
        }
        b.mean += a * step;
        b.visits = b.visits.saturating_add(1);
    }
}

/// Prototypes of the shapes seen so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Shapes {
    /// The first values, until the range is fixed.
    warm: Vec<f64>,
    ready: bool,
    lo: f64,
    hi: f64,
    smooth: f64,
    tick: u64,
    recent: Vec<f64>,
    /// The prototypes' values, `shape_len` each, one after another (one allocation).
    prototypes: Vec<f64>,
    /// How often each prototype matched.
    uses: Vec<f64>,
    /// New shapes seen lately (decaying).
    created: f64,
}

impl Shapes {
    /// How new the current shape is: 0 when it matches a prototype, otherwise its distance to
    /// the nearest in units of the vigilance (so above 1).
    fn novelty(&mut self, p: &Params, x: f64) -> f64 {
        if !self.ready {
            self.warm.push(x);
            if self.warm.len() >= p.shape_warmup {
                let (lo, hi) = self
                    .warm
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let r = (hi - lo).max(1e-9 * (1.0 + hi.abs()));
                self.lo = lo - p.shape_pad * r;
                self.hi = hi + p.shape_pad * r;
                self.smooth = x;
                self.warm = Vec::new();
                self.ready = true;
            }
            return 0.0;
        }
        self.lo = self.lo.min(x);
        self.hi = self.hi.max(x);
        let u = (x - self.lo) / (self.hi - self.lo);
        self.smooth += p.shape_smooth * (u - self.smooth);
        self.tick += 1;
        if self.tick.is_multiple_of(p.shape_stride.max(1)) {
            self.recent.push(self.smooth);
            if self.recent.len() > p.shape_len {
                self.recent.remove(0);
            }
        }
        if self.recent.len() < p.shape_len {
            return 0.0;
        }
        let len = p.shape_len;
        let mut shape = self.recent.clone();
        *shape.last_mut().expect("shape_len values") = self.smooth;
        let mut nearest = (f64::INFINITY, 0);
        for (i, q) in self.prototypes.chunks_exact(len).enumerate() {
            let d = q
                .iter()
                .zip(&shape)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            if d < nearest.0 {
                nearest = (d, i);
            }
        }
        self.created *= p.novelty_decay;
        if nearest.0 > p.vigilance {
            if self.uses.len() < p.prototypes {
                self.prototypes.extend_from_slice(&shape);
                self.uses.push(1.0);
            } else if let Some(i) =
                (0..self.uses.len()).min_by(|&a, &b| self.uses[a].total_cmp(&self.uses[b]))
            {
                self.prototypes[i * len..(i + 1) * len].copy_from_slice(&shape);
                self.uses[i] = 1.0;
            }
            self.created += 1.0;
            let d = if nearest.0.is_finite() {
                nearest.0
            } else {
                1.0
            };
            d / p.vigilance / (1.0 + p.novelty_damping * (self.created - 1.0))
        } else {
            let i = nearest.1;
            self.uses[i] += 1.0;
            for (a, b) in self.prototypes[i * len..(i + 1) * len]
                .iter_mut()
                .zip(&shape)
            {
                *a += p.learn_rate * (b - *a);
            }
            0.0
        }
    }
}

/// The outcome of one point.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scored {
    /// 0..1, calibrated so that 0.5 is where an alert is raised at sensitivity 0.5.
    pub score: f64,
    /// Whether the point raises an alert at the configured sensitivity.
    pub alert: bool,
    /// The band the trusted model expected the value in (low, high), once it has one.
    pub band: Option<(f64, f64)>,
}

/// The state of one series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Series {
    n: u64,
    last: f64,
    level: f64,
    slow: f64,
    spread: f64,
    error: [f64; MODELS],
    fitted: [u64; MODELS],
    day: Profile,
    week: Profile,
    raw: Vec<f64>,
    slow_avg: f64,
    stats: [(f64, f64); 2],
    likelihood_n: u64,
    shapes: Shapes,
    gate: f64,
    previous: f64,
    quiet: u64,
}

fn normal_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit, error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

impl Series {
    pub fn new(p: &Params) -> Series {
        Series {
            n: 0,
            last: 0.0,
            level: 0.0,
            slow: 0.0,
            spread: 0.0,
            error: [0.0; MODELS],
            fitted: [0; MODELS],
            day: Profile::new(p.day_bins),
            week: Profile::new(p.week_bins),
            raw: Vec::with_capacity(p.short),
            slow_avg: 0.0,
            stats: [(0.0, 0.0); 2],
            likelihood_n: 0,
            shapes: Shapes::default(),
            gate: 0.0,
            previous: 0.0,
            quiet: 0,
        }
    }

    /// Points seen.
    pub fn points(&self) -> u64 {
        self.n
    }

    /// Scores one point at time `t` (ms since the epoch) and learns from it.
    pub fn score(&mut self, p: &Params, t: i64, x: f64) -> Scored {
        if self.n == 0 {
            (self.last, self.level, self.slow) = (x, x, x);
        }
        self.n += 1;
        let novelty = self.shapes.novelty(p, x);

        // 1. Forecasts, and the surprise under the model that has erred least.
        let (db, wb) = (self.day.bin(t, DAY_MS), self.week.bin(t, WEEK_MS));
        let forecasts = [
            Some(self.last),
            Some(self.level),
            self.day.forecast(db, p.min_visits),
            self.week.forecast(wb, p.min_visits),
        ];
        let floor = 1e-9 + p.floor * self.spread;
        let mut trusted: Option<(f64, f64, f64)> = None; // typical error, z, forecast
        for (m, f) in forecasts.iter().enumerate() {
            let Some(e) = *f else { continue };
            if self.fitted[m] < MODEL_WARMUP {
                continue;
            }
            let s = self.error[m] + floor;
            if trusted.is_none_or(|b| s < b.0) {
                trusted = Some((s, (x - e).abs() / s, e));
            }
        }
        for (m, f) in forecasts.iter().enumerate() {
            let Some(e) = *f else { continue };
            let mut r = (x - e).abs();
            if self.fitted[m] >= MODEL_WARMUP {
                r = r.min(p.clip * (self.error[m] + floor));
            }
            let a = p.scale_alpha.max(1.0 / (self.fitted[m] + 1) as f64);
            self.error[m] += a * (r - self.error[m]);
            self.fitted[m] += 1;
        }
        self.last = x;
        self.level += p.level_alpha * (x - self.level);
        self.slow += p.slow_alpha * (x - self.slow);
        self.spread +=
            p.scale_alpha.max(1.0 / self.n as f64) * ((x - self.slow).abs() - self.spread);
        let limit = |m: usize| p.season_clip * (self.error[m] + floor);
        let (dl, wl) = (limit(2), limit(3));
        self.day.learn(db, x, p, dl);
        self.week.learn(wb, x, p, wl);
        let Some((s, z, e)) = trusted else {
            return Scored::default();
        };

        // 2. Likelihood of the recent surprises.
        let raw = z.min(p.zcap) / p.zcap;
        if self.raw.len() == p.short.max(1) {
            self.raw.remove(0);
        }
        self.raw.push(raw);
        let short = self.raw.iter().sum::<f64>() / self.raw.len() as f64;
        self.slow_avg += p.slow_avg_alpha * (raw - self.slow_avg);
        let mut score = 0.0f64;
        let first = 1.0 / (self.likelihood_n + 1) as f64;
        for (k, (avg, alpha, observed, weight)) in [
            (short, p.long_alpha, raw, 1.0),
            (
                self.slow_avg,
                p.slow_stats_alpha,
                self.slow_avg,
                p.slow_weight,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let a = alpha.max(first);
            let (mean, var) = &mut self.stats[k];
            let zz = (avg - *mean) / var.sqrt().max(1e-4);
            let d = observed - *mean;
            *mean += a * d;
            *var = (1.0 - a) * (*var + a * d * d);
            let tail = normal_tail(zz).max(1e-300);
            score = score.max(weight * (-tail.log10() / 12.0).min(1.0));
        }
        self.likelihood_n += 1;
        if self.likelihood_n < p.likelihood_warmup {
            score = 0.0;
        }

        // 3. The novelty gate.
        self.gate = (self.gate * p.gate_decay).max(novelty);
        score *= p.gate_floor + (1.0 - p.gate_floor) * self.gate.min(1.0);
        if self.n < p.warmup {
            return Scored::default();
        }

        // 4. One alert per episode.
        let previous = std::mem::replace(&mut self.previous, score);
        if score <= previous {
            score = 0.0;
        }
        let mut alert = false;
        if self.quiet > 0 {
            self.quiet -= 1;
            score = 0.0;
        } else if score >= p.alert_at {
            self.quiet = p.refractory;
            alert = true;
        }
        Scored {
            score: p.calibrate(score),
            alert,
            band: Some((e - p.band * s, e + p.band * s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    /// Scores a series of (time, value) points; returns the indexes that raised alerts.
    fn alerts(values: impl Iterator<Item = (i64, f64)>) -> Vec<usize> {
        let p = Params::default();
        let mut s = Series::new(&p);
        values
            .enumerate()
            .filter_map(|(i, (t, v))| s.score(&p, t, v).alert.then_some(i))
            .collect()
    }

    /// A deterministic pseudo-random noise in [-1, 1].
    fn noise(i: usize) -> f64 {
        let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Ten days of a daily rhythm every 5 minutes, with noise.
    fn daily(i: usize) -> (i64, f64) {
        let t = i as i64 * 5 * MINUTE;
        let phase = (t % DAY_MS) as f64 / DAY_MS as f64 * std::f64::consts::TAU;
        (t, 50.0 + 20.0 * phase.sin() + 1.5 * noise(i))
    }

    const DAYS: usize = 14 * 288;

    #[test]
    fn a_clean_series_raises_nothing() {
        assert_eq!(alerts((0..DAYS).map(daily)), Vec::<usize>::new());
        assert_eq!(
            alerts((0..DAYS).map(|i| (i as i64 * MINUTE, 7.0))),
            Vec::<usize>::new()
        );
        assert_eq!(
            alerts((0..DAYS).map(|i| (i as i64 * MINUTE, 100.0 + 3.0 * noise(i)))),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn a_spike_is_flagged_where_it_happens() {
        let at = 10 * 288 + 50;
        let got = alerts((0..DAYS).map(|i| {
            let (t, v) = daily(i);
            (t, if i == at { v + 60.0 } else { v })
        }));
        assert!(got.contains(&at) || got.contains(&(at + 1)), "{got:?}");
        assert!(got.len() <= 2, "{got:?}");
    }

    #[test]
    fn a_level_shift_is_flagged_soon_after_it_starts() {
        let at = 9 * 288;
        let got = alerts((0..DAYS).map(|i| {
            let (t, v) = daily(i);
            (t, if i >= at { v + 25.0 } else { v })
        }));
        assert!(
            got.iter().any(|&i| (at..at + 12).contains(&i)),
            "no alert within an hour of the shift: {got:?}"
        );
        assert!(got.iter().all(|&i| i >= at), "{got:?}");
    }

    #[test]
    fn a_broken_daily_rhythm_is_flagged() {
        // On day 10 the rhythm stops: the value stays flat at its mean for half a day.
        let from = 10 * 288 + 36;
        let got = alerts((0..DAYS).map(|i| {
            let (t, v) = daily(i);
            (
                t,
                if (from..from + 144).contains(&i) {
                    50.0 + 1.5 * noise(i)
                } else {
                    v
                },
            )
        }));
        assert!(
            got.iter().any(|&i| (from..from + 144).contains(&i)),
            "the flat stretch was not flagged: {got:?}"
        );
        assert!(got.iter().all(|&i| i >= from), "{got:?}");
    }

    #[test]
    fn sensitivity_moves_the_alert_level_and_calibration_keeps_tau_at_half() {
        let p = Params::default();
        assert!((p.calibrate(p.tau) - 0.5).abs() < 1e-12);
        assert_eq!(p.calibrate(0.0), 0.0);
        assert!((p.calibrate(1.0) - 1.0).abs() < 1e-12);
        assert!((Params::with_sensitivity(0.5).alert_at - p.tau).abs() < 1e-12);
        assert!(Params::with_sensitivity(0.9).alert_at < p.tau);
        assert!(Params::with_sensitivity(0.1).alert_at > p.tau);
    }

    #[test]
    fn no_lookahead_and_a_copy_scores_the_same() {
        let p = Params::default();
        let mut a = Series::new(&p);
        for i in 0..2000 {
            let (t, v) = daily(i);
            a.score(&p, t, v);
        }
        let mut b = a.clone();
        for i in 2000..2500 {
            let (t, v) = daily(i);
            assert_eq!(a.score(&p, t, v), b.score(&p, t, v));
        }
    }
}
