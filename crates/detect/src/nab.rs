//! The Numenta Anomaly Benchmark: its data files, its label windows and its scoring.
//!
//! Scoring follows NAB's definition (Lavin & Ahmad 2015): every row after the probationary period
//! that a detector flags is weighed by where it falls. Inside a label window the earliest flag
//! counts, worth `A_TP` at the window's start and less towards its end (a scaled sigmoid of the
//! relative position); a window without a flag costs `A_FN`; a flag outside every window costs
//! up to `A_FP`, less when it comes soon after a window. One threshold per profile is tuned over
//! the whole corpus; here the sweep is exact (every distinct score is tried), where NAB's own
//! optimiser searches locally. The total is rescaled so that flagging nothing scores 0 and a
//! perfect detector 100.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A scoring profile: the weights of a true positive, a false positive and a false negative.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

/// NAB's three profiles.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "standard",
        tp: 1.0,
        fp: 0.11,
        fn_: 1.0,
    },
    Profile {
        name: "reward_low_FP_rate",
        tp: 1.0,
        fp: 0.22,
        fn_: 1.0,
    },
    Profile {
        name: "reward_low_FN_rate",
        tp: 1.0,
        fp: 0.11,
        fn_: 2.0,
    },
];

/// Milliseconds since the epoch of `YYYY-MM-DD HH:MM:SS` (optionally with a fraction), read as UTC.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || (b[10] != b' ' && b[10] != b'T') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut ms = 0;
    if b.len() > 19 {
        let frac = s.get(20..)?;
        if b[19] != b'.' || frac.is_empty() || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        ms = digits.parse().ok()?;
    }
    let days = days_from_civil(y, mo, d);
    Some(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One data file: its rows in file order, as written and parsed.
#[derive(Clone, Debug)]
pub struct DataFile {
    /// The path relative to the data directory, with `/` separators (`realTraffic/x.csv`).
    pub key: String,
    pub timestamps: Vec<String>,
    pub times_ms: Vec<i64>,
    pub values: Vec<f64>,
    /// The values as written in the file.
    pub value_texts: Vec<String>,
}

/// Every `*.csv` under `data_dir`, sorted by key.
pub fn read_corpus(data_dir: &Path) -> Result<Vec<DataFile>, String> {
    let mut paths = Vec::new();
    collect_csv(data_dir, &mut paths)?;
    paths.sort();
    let mut files = Vec::new();
    for path in paths {
        let rel = path
            .strip_prefix(data_dir)
            .expect("under the data directory");
        let key = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        files.push(parse_csv(&key, &text)?);
    }
    if files.is_empty() {
        return Err(format!("no CSV files under {}", data_dir.display()));
    }
    Ok(files)
}

fn collect_csv(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            collect_csv(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "csv") {
            out.push(path);
        }
    }
    Ok(())
}

/// Parses one NAB CSV (`timestamp,value` header, then one row per record).
pub fn parse_csv(key: &str, text: &str) -> Result<DataFile, String> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if header.trim() != "timestamp,value" {
        return Err(format!("{key}: the header is not `timestamp,value`"));
    }
    let mut file = DataFile {
        key: key.to_string(),
        timestamps: Vec::new(),
        times_ms: Vec::new(),
        values: Vec::new(),
        value_texts: Vec::new(),
    };
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("{key}: row {} is not `timestamp,value`: {line:?}", n + 2);
        let (ts, value) = line.split_once(',').ok_or_else(bad)?;
        let t = parse_timestamp(ts).ok_or_else(bad)?;
        let v: f64 = value.trim().parse().map_err(|_| bad())?;
        if !v.is_finite() {
            return Err(bad());
        }
        file.timestamps.push(ts.trim().to_string());
        file.times_ms.push(t);
        file.values.push(v);
        file.value_texts.push(value.trim().to_string());
    }
    Ok(file)
}

/// The label windows of each file: `[start, end]` timestamps, both inclusive.
pub type Windows = BTreeMap<String, Vec<(i64, i64)>>;

/// Reads NAB's `combined_windows.json`.
pub fn read_windows(path: &Path) -> Result<Windows, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let raw: BTreeMap<String, Vec<(String, String)>> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not NAB label windows: {e}", path.display()))?;
    let mut windows = Windows::new();
    for (key, list) in raw {
        let mut parsed = Vec::new();
        for (a, b) in list {
            let bad = || format!("{}: bad window [{a}, {b}] for {key}", path.display());
            let (a, b) = (
                parse_timestamp(&a).ok_or_else(bad)?,
                parse_timestamp(&b).ok_or_else(bad)?,
            );
            parsed.push((a, b));
        }
        windows.insert(key, parsed);
    }
    Ok(windows)
}

/// The number of leading rows NAB never scores.
pub fn probationary_rows(rows: usize) -> usize {
    ((rows as f64 * 0.15).floor() as usize).min(750)
}

/// NAB's scaled sigmoid: +1 far before the end of a window, 0 at its end, down to -1 well after.
fn scaled_sigmoid(position: f64) -> f64 {
    if position > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * position).exp()) - 1.0
    }
}

/// How one row would count if flagged.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Row {
    Probation,
    /// Inside window `w` (index within the file); the value is the unweighted, normalised reward.
    Window(usize, f64),
    /// Outside every window; the value is the unweighted sigmoid (negative).
    Outside(f64),
}

/// The labels of one file laid over its rows.
#[derive(Clone, Debug)]
pub struct Labelled {
    pub key: String,
    rows: Vec<Row>,
    /// The rows each window spans, inclusive.
    pub spans: Vec<(usize, usize)>,
    pub windows: usize,
}

impl Labelled {
    pub fn new(file: &DataFile, windows: &[(i64, i64)]) -> Result<Labelled, String> {
        let index_of = |t: i64| {
            file.times_ms
                .iter()
                .position(|&x| x == t)
                .ok_or_else(|| format!("{}: no row at a window edge", file.key))
        };
        let mut spans = Vec::new();
        for &(a, b) in windows {
            spans.push((index_of(a)?, index_of(b)?));
        }
        let probation = probationary_rows(file.values.len());
        let max_tp = scaled_sigmoid(-1.0);
        let mut rows = Vec::with_capacity(file.values.len());
        let mut previous: Option<(usize, f64)> = None;
        for i in 0..file.values.len() {
            let inside = spans.iter().position(|&(a, b)| a <= i && i <= b);
            let row = match inside {
                Some(w) => {
                    let (a, b) = spans[w];
                    let width = (b - a + 1) as f64;
                    let position = -((b as f64 - i as f64 + 1.0) / width);
                    Row::Window(w, scaled_sigmoid(position) / max_tp)
                }
                None => match previous {
                    None => Row::Outside(-1.0),
                    Some((end, width)) => {
                        let past = (i - end) as f64 / (width - 1.0);
                        Row::Outside(scaled_sigmoid(past))
                    }
                },
            };
            if let Some(w) = inside
                && spans[w].1 == i
            {
                previous = Some((i, (spans[w].1 - spans[w].0 + 1) as f64));
            }
            rows.push(if i < probation { Row::Probation } else { row });
        }
        Ok(Labelled {
            key: file.key.clone(),
            rows,
            windows: spans.len(),
            spans,
        })
    }
}

/// The outcome of one profile over a corpus.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub profile: Profile,
    pub threshold: f64,
    /// 0 = no detections, 100 = perfect.
    pub score: f64,
    pub raw: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

/// Scores a corpus under `profile` with the best single threshold: `scores[i]` are the detector's
/// outputs for the rows of `files[i]`.
pub fn score(files: &[Labelled], scores: &[Vec<f64>], profile: Profile) -> Outcome {
    assert_eq!(files.len(), scores.len());
    // Window ids across the corpus.
    let mut first_window = Vec::new();
    let mut total_windows = 0;
    for f in files {
        first_window.push(total_windows);
        total_windows += f.windows;
    }
    let mut points: Vec<(f64, Row, usize)> = Vec::new();
    for (i, (f, s)) in files.iter().zip(scores).enumerate() {
        assert_eq!(f.rows.len(), s.len(), "{}: one score per row", f.key);
        for (row, &v) in f.rows.iter().zip(s) {
            if *row != Row::Probation {
                points.push((v, *row, i));
            }
        }
    }
    points.sort_by(|a, b| b.0.total_cmp(&a.0));
    let null = -profile.fn_ * total_windows as f64;
    let mut best_window = vec![None::<f64>; total_windows];
    let (mut fp_sum, mut tp_sum, mut detected, mut fps) = (0.0, 0.0, 0usize, 0usize);
    let mut best = (null, f64::INFINITY, 0usize, 0usize);
    let mut i = 0;
    while i < points.len() {
        let threshold = points[i].0;
        while i < points.len() && points[i].0 == threshold {
            let (_, row, file) = points[i];
            match row {
                Row::Outside(v) => {
                    fp_sum += v * profile.fp;
                    fps += 1;
                }
                Row::Window(w, v) => {
                    let slot = &mut best_window[first_window[file] + w];
                    let v = v * profile.tp;
                    match slot {
                        None => {
                            tp_sum += v;
                            detected += 1;
                            *slot = Some(v);
                        }
                        Some(old) if v > *old => {
                            tp_sum += v - *old;
                            *old = v;
                        }
                        Some(_) => {}
                    }
                }
                Row::Probation => unreachable!("skipped above"),
            }
            i += 1;
        }
        let raw = tp_sum + fp_sum - profile.fn_ * (total_windows - detected) as f64;
        if raw > best.0 {
            best = (raw, threshold, detected, fps);
        }
    }
    let (raw, threshold, tp, fp) = best;
    let perfect = profile.tp * total_windows as f64;
    Outcome {
        profile,
        threshold,
        score: if total_windows == 0 {
            0.0
        } else {
            100.0 * (raw - null) / (perfect - null)
        },
        raw,
        true_positives: tp,
        false_positives: fp,
        false_negatives: total_windows - tp,
    }
}

/// One file's counts at a given threshold: true positives, false positives, false negatives and
/// its raw score.
pub fn score_at(
    file: &Labelled,
    scores: &[f64],
    profile: Profile,
    threshold: f64,
) -> (usize, usize, usize, f64) {
    let mut best = vec![None::<f64>; file.windows];
    let (mut fps, mut raw) = (0, 0.0);
    for (row, &v) in file.rows.iter().zip(scores) {
        if v < threshold {
            continue;
        }
        match *row {
            Row::Outside(u) => {
                fps += 1;
                raw += u * profile.fp;
            }
            Row::Window(w, u) => {
                let u = u * profile.tp;
                best[w] = Some(best[w].map_or(u, |b: f64| b.max(u)));
            }
            Row::Probation => {}
        }
    }
    let tp = best.iter().flatten().count();
    raw += best.iter().flatten().sum::<f64>() - profile.fn_ * (file.windows - tp) as f64;
    (tp, fps, file.windows - tp, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_utc() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2014-07-01 00:30:00"),
            Some(1_404_174_600_000)
        );
        assert_eq!(
            parse_timestamp("2014-07-01 00:30:00.250000"),
            Some(1_404_174_600_250)
        );
        assert_eq!(parse_timestamp("2014-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("2014-07-01"), None);
    }

    fn file(rows: usize) -> DataFile {
        let mut text = String::from("timestamp,value\n");
        for i in 0..rows {
            let t = i * 60;
            text += &format!("1970-01-01 {:02}:{:02}:00,{i}\n", t / 3600, t / 60 % 60);
        }
        parse_csv("f.csv", &text).unwrap()
    }

    fn minute(i: i64) -> i64 {
        i * 60_000
    }

    #[test]
    fn scores_follow_nab_rules() {
        // 100 rows: probation 15; one window over rows 40..=49.
        let f = file(100);
        let l = Labelled::new(&f, &[(minute(40), minute(49))]).unwrap();
        let standard = PROFILES[0];
        let at = |rows: &[usize]| {
            let mut s = vec![0.0; 100];
            for &r in rows {
                s[r] = 1.0;
            }
            score(std::slice::from_ref(&l), &[s], standard)
        };
        // Nothing flagged: the null detector, 0.
        let none = at(&[]);
        assert_eq!(none.score, 0.0);
        assert_eq!(none.false_negatives, 1);
        // Flagging the window's first row is perfect.
        let perfect = at(&[40]);
        assert!((perfect.score - 100.0).abs() < 1e-9, "{perfect:?}");
        // Later in the window earns less; only the earliest counts.
        let late = at(&[47]);
        assert!(late.score < perfect.score && late.score > 50.0);
        assert_eq!(at(&[47, 48]).score, late.score);
        assert_eq!(at(&[45, 47]).score, at(&[45]).score);
        // A flag far from any window costs A_FP (0.11 of the 2 points between null and perfect).
        let fp = at(&[40, 20]);
        assert!(
            (fp.score - (100.0 - 100.0 * 0.11 / 2.0)).abs() < 1e-9,
            "{fp:?}"
        );
        assert_eq!(fp.false_positives, 1);
        // Right after a window a false positive costs little.
        let after = at(&[40, 50]);
        assert!(after.score > fp.score && after.score < 100.0);
        // Probationary rows are never scored.
        assert_eq!(at(&[40, 3]).score, perfect.score);
    }

    #[test]
    fn the_threshold_is_the_best_one() {
        let f = file(100);
        let l = Labelled::new(&f, &[(minute(40), minute(49))]).unwrap();
        let mut s = vec![0.1; 100];
        s[42] = 0.7; // in the window
        s[80] = 0.9; // a false positive above it
        s[20] = 0.5; // a false positive below it
        let out = score(&[l], &[s], PROFILES[0]);
        assert_eq!(out.threshold, 0.7);
        assert_eq!((out.true_positives, out.false_positives), (1, 1));
    }
}
