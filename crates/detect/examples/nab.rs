//! Scores the auto detector on NAB: `cargo run --release -p spate-detect --example nab -- DIR`.
use spate_detect::{auto, nab};
use std::path::Path;

fn main() {
    let root = std::env::args().nth(1).expect("the NAB directory");
    let root = Path::new(&root);
    let p = auto::Params::default();
    let files = nab::read_corpus(&root.join("data")).unwrap();
    let windows = nab::read_windows(&root.join("labels/combined_windows.json")).unwrap();
    let mut labelled = Vec::new();
    let mut scores = Vec::new();
    for f in &files {
        labelled.push(nab::Labelled::new(f, &windows[&f.key]).unwrap());
        let mut s = auto::Series::new(&p);
        scores.push(
            f.times_ms
                .iter()
                .zip(&f.values)
                .map(|(&t, &x)| s.score(&p, t, x).score)
                .collect::<Vec<f64>>(),
        );
    }
    for prof in nab::PROFILES {
        let o = nab::score(&labelled, &scores, prof);
        println!(
            "{:20} {:6.2} thr={:.6} tp={} fp={} fn={}",
            prof.name, o.score, o.threshold, o.true_positives, o.false_positives, o.false_negatives
        );
    }
}
