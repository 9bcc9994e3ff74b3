//! `spate nab`: runs the `auto` detector over NAB data files and, with labels, scores it as NAB
//! does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use spate_detect::{auto, nab};

#[derive(clap::Args)]
pub struct NabArgs {
    /// The NAB directory: every CSV under DIR/data is scored.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the scores: OUT/<category>/<file>.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// NAB's label windows (combined_windows.json): print the NAB scores.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Fail unless the standard score is at least this (needs --labels).
    #[arg(long)]
    pub require_standard: Option<f64>,
}

pub fn run(args: NabArgs) -> Result<()> {
    let files = nab::read_corpus(&args.data.join("data")).map_err(anyhow::Error::msg)?;
    let params = auto::Params::default();
    let started = Instant::now();
    let scores: Vec<Vec<f64>> = files
        .iter()
        .map(|f| {
            let mut series = auto::Series::new(&params);
            f.times_ms
                .iter()
                .zip(&f.values)
                .map(|(&t, &v)| series.score(&params, t, v).score)
                .collect()
        })
        .collect();
    let took = started.elapsed();
    let rows: usize = files.iter().map(|f| f.values.len()).sum();
    for (f, s) in files.iter().zip(&scores) {
        write_scores(&args.out, f, s)?;
    }
    println!(
        "spate nab: {} files, {rows} rows scored by the auto detector in {:.3} s ({:.0} points/s); scores in {}",
        files.len(),
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64().max(1e-9),
        args.out.display()
    );
    let Some(labels) = &args.labels else {
        anyhow::ensure!(
            args.require_standard.is_none(),
            "--require-standard needs --labels"
        );
        return Ok(());
    };
    let windows = nab::read_windows(labels).map_err(anyhow::Error::msg)?;
    let mut labelled = Vec::new();
    for f in &files {
        let w = windows
            .get(&f.key)
            .with_context(|| format!("{} has no labels in {}", f.key, labels.display()))?;
        labelled.push(nab::Labelled::new(f, w).map_err(anyhow::Error::msg)?);
    }
    let total: usize = labelled.iter().map(|l| l.windows).sum();
    println!("{} label windows; thresholds tuned over all files", total);
    println!(
        "{:<20} {:>7} {:>10} {:>4} {:>4} {:>4}",
        "profile", "score", "threshold", "TP", "FP", "FN"
    );
    let mut standard = None;
    for profile in nab::PROFILES {
        let o = nab::score(&labelled, &scores, profile);
        println!(
            "{:<20} {:>7.2} {:>10.4} {:>4} {:>4} {:>4}",
            profile.name,
            o.score,
            o.threshold,
            o.true_positives,
            o.false_positives,
            o.false_negatives
        );
        if profile.name == "standard" {
            standard = Some(o.score);
        }
    }
    if let (Some(min), Some(got)) = (args.require_standard, standard) {
        anyhow::ensure!(
            got >= min,
            "the standard score {got:.2} is below the required {min}"
        );
    }
    Ok(())
}

fn write_scores(out: &Path, f: &nab::DataFile, scores: &[f64]) -> Result<()> {
    let path = out.join(&f.key);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    writeln!(w, "timestamp,value,anomaly_score")?;
    for ((ts, v), s) in f.timestamps.iter().zip(&f.value_texts).zip(scores) {
        writeln!(w, "{ts},{v},{s}")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
