//! `spate bench`: benchmarks that print medians and a ratio against a ceiling measured in the same
//! run. `spate bench log` measures the log engine's append throughput and append latency for each
//! fsync policy, record size and number of concurrent writers, next to the disk's own sequential
//! write bandwidth with an fsync per MiB.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use spate_log::batch::{self, NewRecord};
use spate_log::io::FsStorage;
use spate_log::{FsyncPolicy, Log, LogConfig, TopicConfig};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Append throughput and latency of the log engine against the disk's ceiling.
    Log(LogBenchArgs),
    /// Produce and fetch throughput of a Kafka listener (Spate's or a Kafka broker's), with a load
    /// generator light enough not to be the bottleneck.
    Kafka(crate::bench_kafka::KafkaBenchArgs),
    /// WebSocket push: publish-to-delivery latency, fan-out to many subscribers, and memory per
    /// idle connection, against a server it starts.
    Push(crate::bench_push::PushBenchArgs),
    /// Event-sourcing appends with expected versions and stream reads, beside PostgreSQL as an
    /// event store when given one.
    Streams(crate::bench_streams::StreamsBenchArgs),
    /// Durable subscriptions: pull + ack throughput and end-to-end latency, beside Redis Streams
    /// consumer groups when given a Redis server.
    Subs(crate::bench_subs::SubsBenchArgs),
    /// Projections: the rate a count + sum aggregate is folded and point reads meanwhile, beside
    /// PostgreSQL doing the same with upserts when given one.
    Projections(crate::bench_projections::ProjectionsBenchArgs),
    /// Detectors: the auto detector's points/s on one core, and events/s through a detector in a
    /// server beside a projection over the same events.
    Detect(crate::bench_detect::DetectBenchArgs),
}

#[derive(clap::Args)]
pub struct LogBenchArgs {
    /// Directory on the disk to measure (a temporary directory is made and removed inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Repetitions of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Record value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    sizes: Vec<usize>,
    /// Concurrent writers (threads appending to one partition).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    writers: Vec<usize>,
    /// Fsync policies.
    #[arg(long, value_delimiter = ',', default_value = "batch,interval:10,never")]
    fsync: Vec<String>,
    /// Bytes of records per append: 1 means one record per append; 65536 models a producer that
    /// batches 64 KiB per request, as Kafka clients do.
    #[arg(long, value_delimiter = ',', default_value = "1,65536")]
    append_bytes: Vec<usize>,
    /// Bytes the segment file is extended with zeros ahead of appends (0: off).
    #[arg(long, value_delimiter = ',', default_value = "1048576")]
    preallocate: Vec<u64>,
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Log(args) => tokio::task::spawn_blocking(move || log_bench(&args)).await?,
        BenchCommand::Kafka(args) => crate::bench_kafka::run(args).await,
        BenchCommand::Push(args) => crate::bench_push::run(args).await,
        BenchCommand::Streams(args) => crate::bench_streams::run(args).await,
        BenchCommand::Subs(args) => crate::bench_subs::run(args).await,
        BenchCommand::Projections(args) => crate::bench_projections::run(args).await,
        BenchCommand::Detect(args) => crate::bench_detect::run(args).await,
    }
}

/// The median of `v` (sorted in place; the upper one of an even count).
/// CPU time (user and system, all threads) a process has used so far, in seconds, from
/// `/proc/<pid>/stat` (in clock ticks of 1/100 s, Linux's fixed `USER_HZ`).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start with the state, field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

/// CPU time (as [`cpu_seconds`]) of every process whose command name is `comm` (e.g. all of a
/// PostgreSQL cluster's processes), in seconds.
pub(crate) fn cpu_seconds_of(comm: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if name.trim_end() == comm {
            // A process that ended in between counts nothing.
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Sequential 1 MiB writes, each followed by an fsync: the most a log can get from this disk while
/// syncing at a coarse grain. MB/s (10^6 bytes).
fn disk_ceiling(dir: &Path, seconds: f64) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("ceiling.bin");
    let mut f = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0xA5u8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        f.write_all(&block)?;
        f.sync_data()?;
        bytes += block.len() as u64;
    }
    let mbps = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(mbps)
}

struct Outcome {
    records_per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn one_run(
    dir: &Path,
    policy: FsyncPolicy,
    size: usize,
    writers: usize,
    per_append: usize,
    seconds: f64,
    preallocate_bytes: u64,
) -> Result<Outcome> {
    let tmp = tempfile::tempdir_in(dir).context("cannot create a temporary directory")?;
    let log = Arc::new(Log::open(
        Arc::new(FsStorage),
        tmp.path(),
        LogConfig {
            fsync: policy,
            preallocate_bytes,
            ..LogConfig::default()
        },
    )?);
    let config = TopicConfig {
        max_message_bytes: 4 << 20,
        ..TopicConfig::default()
    };
    let topic = log.create_topic("bench", config, 0)?;
    let partition = topic.partition(0)?.clone();
    let done = Arc::new(AtomicBool::new(false));
    let flusher = match policy {
        FsyncPolicy::Interval(every) => {
            let log = log.clone();
            let done = done.clone();
            Some(std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let _ = log.flush();
                }
            }))
        }
        FsyncPolicy::Batch | FsyncPolicy::Never => None,
    };
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let partition = partition.clone();
            std::thread::spawn(move || -> Result<(u64, u64, Histogram<u64>)> {
                let records: Vec<NewRecord> = (0..per_append)
                    .map(|i| NewRecord {
                        timestamp_ms: 0,
                        key: Some(format!("w{w}-{i}").into_bytes()),
                        value: Some(vec![(i % 251) as u8; size]),
                        headers: Vec::new(),
                    })
                    .collect();
                let template = batch::encode(&records).expect("records are not empty");
                let mut buf = template.clone();
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let (mut n, mut bytes) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    partition.append(&mut buf, 0, &config)?;
                    hist.saturating_record(t.elapsed().as_micros() as u64);
                    n += per_append as u64;
                    bytes += buf.len() as u64;
                }
                Ok((n, bytes, hist))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let (mut n, mut bytes) = (0u64, 0u64);
    for h in handles {
        let (hn, hb, hh) = h
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        n += hn;
        bytes += hb;
        hist.add(hh).expect("same bounds");
    }
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    if let Some(f) = flusher {
        let _ = f.join();
    }
    Ok(Outcome {
        records_per_s: n as f64 / elapsed,
        mb_per_s: bytes as f64 / elapsed / 1e6,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
        p999_us: hist.value_at_quantile(0.999) as f64,
    })
}

fn log_bench(a: &LogBenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.runs > 0 && a.seconds > 0.0,
        "--runs and --seconds must be positive"
    );
    let policies: Vec<FsyncPolicy> = a
        .fsync
        .iter()
        .map(|s| s.parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&a.dir)?;
    println!(
        "# spate bench log: {} s per run, median of {} runs, {} CPUs",
        a.seconds,
        a.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut ceilings: Vec<f64> = (0..a.runs)
        .map(|_| disk_ceiling(&a.dir, a.seconds))
        .collect::<Result<_>>()?;
    let ceiling = median(&mut ceilings);
    println!("disk ceiling (sequential 1 MiB writes, fsync each): {ceiling:.1} MB/s\n");
    println!(
        "| fsync | preallocate B | record B | writers | records/append | records/s | MB/s | % of ceiling | ack p50 µs | ack p99 µs | ack p99.9 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for policy in &policies {
        for &prealloc in &a.preallocate {
            for &size in &a.sizes {
                for &writers in &a.writers {
                    for &append_bytes in &a.append_bytes {
                        let per_append = (append_bytes / size).max(1);
                        let mut outcomes = Vec::new();
                        for _ in 0..a.runs {
                            outcomes.push(one_run(
                                &a.dir, *policy, size, writers, per_append, a.seconds, prealloc,
                            )?);
                        }
                        let pick = |f: fn(&Outcome) -> f64| {
                            median(&mut outcomes.iter().map(f).collect::<Vec<_>>())
                        };
                        let mbps = pick(|o| o.mb_per_s);
                        println!(
                            "| {policy} | {prealloc} | {size} | {writers} | {per_append} | {:.0} | {mbps:.1} | {:.0}% | {:.0} | {:.0} | {:.0} |",
                            pick(|o| o.records_per_s),
                            100.0 * mbps / ceiling,
                            pick(|o| o.p50_us),
                            pick(|o| o.p99_us),
                            pick(|o| o.p999_us),
                        );
                    }
                }
            }
        }
    }
    println!(
        "\nMB/s counts record batch bytes written to the log (10^6 bytes). Ack latency is append call to"
    );
    println!(
        "return: under `batch` that is append-to-durable; under `interval` and `never` the ack precedes the fsync."
    );
    Ok(())
}
