//! `spate bench detect`: the `auto` detector's cost per point on one core, and the rate events go
//! through a detector in a running server.
//!
//! Core: `--series` series of `--points` points each (a daily rhythm every 5 minutes with noise
//! and rare spikes) are scored one point at a time on one thread, series interleaved as a broker
//! would see them; `--runs` repetitions, median reported, with a threshold rule over the same
//! points as the reference measured in the same run.
//!
//! Server: `--events` readings over `--server-series` series are published to a topic of a
//! server it starts (`--fsync batch`); then a detector is defined and reads them from the start;
//! the rate runs from the definition until it has taken every point. In the same run, a projection
//! counting the same events per series is timed the same way, as the reference follower.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use spate_detect::detector::{Algorithm, AutoConfig, Detector};
use spate_detect::threshold::Rule;

#[derive(clap::Args, Debug, Clone)]
pub struct DetectBenchArgs {
    /// Series scored by the core benchmark.
    #[arg(long, default_value_t = 1000)]
    series: usize,
    /// Points per series in the core benchmark.
    #[arg(long, default_value_t = 2000)]
    points: usize,
    /// Repetitions of the core benchmark; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Events published for the server benchmark (0 skips it).
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Series among the server benchmark's events.
    #[arg(long, default_value_t = 1000)]
    server_series: u64,
    /// Partitions of the server benchmark's topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
}

/// A reading of series `s` at step `i`: a daily rhythm with noise, and a spike now and then.
fn reading(s: u64, i: u64) -> (i64, f64) {
    let mut x = (s << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    let noise = (x % 1000) as f64 / 500.0 - 1.0;
    let phase = ((i + s * 17) % 288) as f64 / 288.0 * std::f64::consts::TAU;
    let spike = if x.is_multiple_of(5000) { 40.0 } else { 0.0 };
    (
        1_767_225_600_000 + i as i64 * 300_000,
        50.0 + 10.0 * phase.sin() + 2.0 * noise + spike,
    )
}

/// Points per second through a detector on this thread, and the alerts raised.
fn core_run(algorithm: Algorithm, series: usize, points: usize) -> (f64, u64) {
    let names: Vec<String> = (0..series).map(|s| format!("s{s}")).collect();
    let mut d = Detector::new(algorithm, 0, series);
    let started = Instant::now();
    for i in 0..points as u64 {
        for (s, name) in names.iter().enumerate() {
            let (t, v) = reading(s as u64, i);
            d.observe(name, t, v);
        }
    }
    let rate = (series * points) as f64 / started.elapsed().as_secs_f64();
    (rate, d.totals.alerts)
}

pub async fn run(a: DetectBenchArgs) -> Result<()> {
    ensure!(
        a.series > 0 && a.points > 0 && a.runs > 0,
        "--series, --points and --runs must be positive"
    );
    println!(
        "# spate bench detect: {} series x {} points on one core, {} runs (median)",
        a.series, a.points, a.runs
    );
    println!();
    println!("| detector | points/s | ns/point | alerts |");
    println!("|---|---|---|---|");
    let threshold = Algorithm::Threshold(Rule {
        min: Some(20.0),
        max: Some(80.0),
        for_ms: 600_000,
        hysteresis: None,
    });
    let auto = Algorithm::Auto(AutoConfig { sensitivity: 0.5 });
    let mut rates = Vec::new();
    for (name, algorithm) in [("auto", auto), ("threshold", threshold)] {
        let (series, points) = (a.series, a.points);
        let runs: Vec<(f64, u64)> = tokio::task::spawn_blocking(move || {
            (0..a.runs)
                .map(|_| core_run(algorithm.clone(), series, points))
                .collect()
        })
        .await?;
        let alerts = runs[0].1;
        let rate = crate::bench::median(&mut runs.into_iter().map(|r| r.0).collect::<Vec<_>>());
        println!(
            "| {name} | {rate:.0} | {:.0} | {alerts} |",
            1e9 / rate.max(1e-9)
        );
        rates.push(rate);
    }
    println!();
    println!(
        "auto / threshold cost per point: {:.1}x",
        rates[1] / rates[0].max(1e-9)
    );
    if a.events > 0 {
        server(&a).await?;
    }
    Ok(())
}

async fn server(a: &DetectBenchArgs) -> Result<()> {
    let server = crate::bench_push::start_server()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let base = format!("http://{}", server.addr);
    server
        .create_topic(&http, "telemetry", a.partitions)
        .await?;
    let mut i = 0;
    while i < a.events {
        let n = 1000.min(a.events - i);
        let batch: Vec<Value> = (i..i + n)
            .map(|k| {
                let s = k % a.server_series;
                let (t, v) = reading(s, k / a.server_series);
                let time =
                    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t) * 1_000_000)
                        .map(|t| t.format(&time::format_description::well_known::Rfc3339))
                        .expect("valid time")
                        .expect("formats");
                json!({"specversion": "1.0", "id": format!("e{k}"), "source": "/bench",
                    "type": "sensor.reading", "time": time, "partitionkey": format!("s{s}"),
                    "data": {"sensor": format!("s{s}"), "value": v}})
            })
            .collect();
        let r = http
            .post(format!("{base}/v1/topics/telemetry/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&batch)?)
            .send()
            .await?;
        ensure!(r.status() == 201, "publish: {}", r.status());
        i += n;
    }
    println!();
    println!(
        "# in a server (fsync batch): {} events over {} series, {} partitions, read from the start",
        a.events, a.server_series, a.partitions
    );
    println!();
    println!("| follower | events/s |");
    println!("|---|---|");
    let detector = follow(
        &http,
        &base,
        "/v1/detectors/auto",
        json!({"topic": "telemetry", "series": "data.sensor", "value": "data.value",
            "alert_topic": "alerts", "algorithm": {"kind": "auto"},
            "max_series": a.server_series}),
        |s| s["points"] == a.events && s["lag_records"] == 0,
    )
    .await?;
    println!("| detector (auto) | {:.0} |", a.events as f64 / detector);
    let projection = follow(
        &http,
        &base,
        "/v1/projections/per_sensor",
        json!({"topic": "telemetry", "key": "data.sensor",
            "reduce": {"aggregate": {"n": "count()"}}}),
        |s| s["lag_records"] == 0 && s["status"] == "running",
    )
    .await?;
    println!(
        "| projection (count per series) | {:.0} |",
        a.events as f64 / projection
    );
    println!();
    println!("detector / projection rate: {:.2}x", projection / detector);
    drop(server);
    Ok(())
}

/// Defines a follower and returns the seconds until `done` holds for its status.
async fn follow(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    definition: Value,
    done: impl Fn(&Value) -> bool,
) -> Result<f64> {
    let started = Instant::now();
    let r = http
        .put(format!("{base}{path}"))
        .json(&definition)
        .send()
        .await?;
    ensure!(r.status() == 201, "define {path}: {}", r.status());
    loop {
        let s: Value = http
            .get(format!("{base}{path}"))
            .send()
            .await?
            .json()
            .await?;
        if done(&s) {
            return Ok(started.elapsed().as_secs_f64());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "{path} takes too long: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
