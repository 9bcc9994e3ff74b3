//! `spate bench projections`: the rate at which a count + sum aggregate is folded from events, and
//! point-read latency meanwhile, on a Spate server it starts (`--fsync batch`) and, side by side in
//! the same run, PostgreSQL doing the same aggregate the usual way (`INSERT ... ON CONFLICT DO
//! UPDATE` per event, in transactions of `--pg-batch`, `synchronous_commit=on`).
//!
//! Spate: `--events` events over `--keys` keys are published to a topic first; then a projection
//! is defined and folds them from the start; the rate runs from the definition until the
//! projection has caught up. PostgreSQL: the same events are upserted by `--pg-clients`
//! connections, each taking every `--pg-clients`-th key (so no two transactions touch the same
//! row). Meanwhile `--readers` clients read rows by random key, one at a time. `--runs`
//! repetitions, each a Spate run then a PostgreSQL one; medians are reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(clap::Args, Debug, Clone)]
pub struct ProjectionsBenchArgs {
    /// Events folded.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Distinct keys (rows).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Partitions of Spate's topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Concurrent point readers.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Events per PostgreSQL transaction.
    #[arg(long, default_value_t = 1000)]
    pg_batch: usize,
    /// PostgreSQL connections upserting.
    #[arg(long, default_value_t = 4)]
    pg_clients: u64,
    /// A PostgreSQL connection string to run the same aggregate against, in the same run.
    #[arg(long)]
    postgres: Option<String>,
    /// Repetitions (each store in turn); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Event `i`: its key and amount (the same for both stores).
fn event(i: u64, keys: u64) -> (String, u64) {
    let mut r = Rng(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (format!("k{}", r.next() % keys), r.next() % 1000)
}

struct Outcome {
    rate: f64,
    reads: Histogram<u64>,
}

impl Outcome {
    fn read_ms(&self, q: f64) -> f64 {
        self.reads.value_at_quantile(q) as f64 / 1e6
    }
}

fn report(run: usize, name: &str, o: &Outcome) {
    println!(
        "| {run} | {name} | {:.0} | {:.3} / {:.3} / {:.3} | {} |",
        o.rate,
        o.read_ms(0.5),
        o.read_ms(0.99),
        o.reads.max() as f64 / 1e6,
        o.reads.len()
    );
}

/// Prints the medians over the runs of one store: fold rate, read p50 and p99 (ms).
fn medians(name: &str, runs: &[Outcome]) {
    let of = |f: &dyn Fn(&Outcome) -> f64| {
        crate::bench::median(&mut runs.iter().map(f).collect::<Vec<_>>())
    };
    let (rate, p50, p99) = (
        of(&|o| o.rate),
        of(&|o| o.read_ms(0.5)),
        of(&|o| o.read_ms(0.99)),
    );
    println!("| median | {name} | {rate:.0} | {p50:.3} / {p99:.3} / - | - |");
}

pub async fn run(a: ProjectionsBenchArgs) -> Result<()> {
    ensure!(
        a.events > 0 && a.keys > 0,
        "--events and --keys must be positive"
    );
    ensure!(a.runs > 0, "--runs must be positive");
    println!(
        "# spate bench projections: count + sum over {} events, {} keys, {} point readers, {} runs",
        a.events, a.keys, a.readers, a.runs
    );
    println!();
    println!("| run | store | events folded/s | point read p50 / p99 / max ms | reads |");
    println!("|---|---|---|---|---|");
    let (mut spates, mut pgs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=a.runs {
        let s = spate(&a).await?;
        report(run, "spate (fsync batch)", &s);
        if let Some(conn) = &a.postgres {
            let pg = postgres(conn, &a).await?;
            report(run, "postgresql (synchronous_commit=on)", &pg);
            ratios.push(s.rate / pg.rate);
            pgs.push(pg);
        }
        spates.push(s);
    }
    medians("spate (fsync batch)", &spates);
    if !pgs.is_empty() {
        medians("postgresql (synchronous_commit=on)", &pgs);
        println!();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        println!(
            "fold rate ratio spate/postgresql per run: {}; median {:.2}x",
            each.join(", "),
            crate::bench::median(&mut ratios)
        );
    }
    Ok(())
}

async fn spate(a: &ProjectionsBenchArgs) -> Result<Outcome> {
    let server = crate::bench_push::start_server()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let base = format!("http://{}", server.addr);
    server.create_topic(&http, "sales", a.partitions).await?;
    let mut i = 0;
    while i < a.events {
        let n = 1000.min(a.events - i);
        let batch: Vec<Value> = (i..i + n)
            .map(|k| {
                let (key, amount) = event(k, a.keys);
                json!({"specversion": "1.0", "id": format!("e{k}"), "source": "/bench",
                    "type": "sale", "partitionkey": key, "data": {"amount": amount}})
            })
            .collect();
        let r = http
            .post(format!("{base}/v1/topics/sales/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(&batch)?)
            .send()
            .await?;
        ensure!(r.status() == 201, "publish: {}", r.status());
        i += n;
    }
    let started = Instant::now();
    let r = http
        .put(format!("{base}/v1/projections/totals"))
        .json(&json!({"topic": "sales",
            "reduce": {"aggregate": {"count": "count()", "sum": "sum(data.amount)"}}}))
        .send()
        .await?;
    ensure!(r.status() == 201, "define: {}", r.status());
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..a.readers)
        .map(|r| {
            let (http, base, done, keys) = (http.clone(), base.clone(), done.clone(), a.keys);
            tokio::spawn(async move {
                let mut h = histogram();
                let mut rng = Rng(0x5EED + r as u64);
                while !done.load(Ordering::Relaxed) {
                    let key = format!("k{}", rng.next() % keys);
                    let t = Instant::now();
                    let r = http
                        .get(format!("{base}/v1/projections/totals/rows/{key}"))
                        .send()
                        .await?;
                    let status = r.status().as_u16();
                    let _ = r.bytes().await?;
                    ensure!(status == 200 || status == 404, "read: {status}");
                    h.record(t.elapsed().as_nanos() as u64)?;
                }
                Ok::<_, anyhow::Error>(h)
            })
        })
        .collect();
    loop {
        let s: Value = http
            .get(format!("{base}/v1/projections/totals"))
            .send()
            .await?
            .json()
            .await?;
        if s["lag_records"] == 0 && s["status"] == "running" {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the fold takes too long"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut reads = histogram();
    for r in readers {
        reads.add(r.await??)?;
    }
    // Spot check: the rows hold every event.
    let mut counted = 0;
    let mut after: Option<String> = None;
    loop {
        let mut u = format!("{base}/v1/projections/totals/rows?limit=1000");
        if let Some(k) = &after {
            u.push_str(&format!("&after={k}"));
        }
        let page: Value = http.get(u).send().await?.json().await?;
        for r in page["rows"].as_array().context("rows")? {
            counted += r["value"]["count"].as_u64().unwrap_or(0);
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    ensure!(
        counted == a.events,
        "rows count {counted} events, not {}",
        a.events
    );
    drop(server);
    Ok(Outcome {
        rate: a.events as f64 / elapsed.as_secs_f64(),
        reads,
    })
}

async fn postgres(conn: &str, a: &ProjectionsBenchArgs) -> Result<Outcome> {
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
            .await
            .context("cannot connect to PostgreSQL")?;
        tokio::spawn(connection);
        Ok::<_, anyhow::Error>(client)
    };
    let admin = connect().await?;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS totals;
             CREATE TABLE totals (key text PRIMARY KEY, count bigint NOT NULL, sum bigint NOT NULL);
             SET synchronous_commit = on;",
        )
        .await?;
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..a.readers)
        .map(|r| {
            let (done, keys) = (done.clone(), a.keys);
            let conn = conn.to_string();
            tokio::spawn(async move {
                let (client, connection) =
                    tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                let stmt = client
                    .prepare("SELECT count, sum FROM totals WHERE key = $1")
                    .await?;
                let mut h = histogram();
                let mut rng = Rng(0x5EED + r as u64);
                while !done.load(Ordering::Relaxed) {
                    let key = format!("k{}", rng.next() % keys);
                    let t = Instant::now();
                    client.query_opt(&stmt, &[&key]).await?;
                    h.record(t.elapsed().as_nanos() as u64)?;
                }
                Ok::<_, anyhow::Error>(h)
            })
        })
        .collect();
    let writers: Vec<_> = (0..a.pg_clients)
        .map(|w| {
            let conn = conn.to_string();
            let (events, keys, batch, clients) = (a.events, a.keys, a.pg_batch, a.pg_clients);
            tokio::spawn(async move {
                let (mut client, connection) =
                    tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client.batch_execute("SET synchronous_commit = on").await?;
                let stmt = client
                    .prepare(
                        "INSERT INTO totals (key, count, sum) VALUES ($1, 1, $2)
                         ON CONFLICT (key) DO UPDATE
                         SET count = totals.count + 1, sum = totals.sum + EXCLUDED.sum",
                    )
                    .await?;
                let mine: Vec<(String, i64)> = (0..events)
                    .map(|i| event(i, keys))
                    .filter(|(k, _)| k[1..].parse::<u64>().map_or(0, |n| n % clients) == w)
                    .map(|(k, v)| (k, v as i64))
                    .collect();
                for chunk in mine.chunks(batch) {
                    let tx = client.transaction().await?;
                    for (k, v) in chunk {
                        tx.execute(&stmt, &[k, v]).await?;
                    }
                    tx.commit().await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut reads = histogram();
    for r in readers {
        reads.add(r.await??)?;
    }
    let row = admin
        .query_one("SELECT sum(count)::bigint FROM totals", &[])
        .await?;
    let counted: i64 = row.get(0);
    ensure!(
        counted as u64 == a.events,
        "rows count {counted} events, not {}",
        a.events
    );
    Ok(Outcome {
        rate: a.events as f64 / elapsed.as_secs_f64(),
        reads,
    })
}
