//! `spate bench streams`: event-sourcing appends with expected versions and stream reads, against
//! a Spate server it starts (`--fsync batch`) and, side by side in the same run, PostgreSQL used
//! as an event store the usual way (a table with a unique `(stream_id, version)`, one INSERT per
//! append in its own transaction, `synchronous_commit=on`).
//!
//! Appends: `--clients` concurrent clients, one `--event-bytes` event per append, streams chosen
//! from `--streams` with a Zipf distribution; each client appends at the version it believes is
//! next and learns the current one from a conflict. Reads: streams of exactly 100 events, read
//! whole, one at a time per client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

#[derive(clap::Args, Debug, Clone)]
pub struct StreamsBenchArgs {
    /// Streams the appends go to.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Zipf exponent of the stream popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of appends, and of reads.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bytes of each event's data.
    #[arg(long, default_value_t = 500)]
    event_bytes: usize,
    /// Events of other streams (10 per stream, 100 B of data) published to Spate's topic in
    /// batches before the read phase, so that the streams read are a few among many.
    #[arg(long, default_value_t = 0)]
    others: u64,
    /// Partitions of Spate's topic.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// A PostgreSQL connection string (e.g. `host=127.0.0.1 port=55432 user=postgres`) to run the
    /// same workload against, in the same run.
    #[arg(long)]
    postgres: Option<String>,
}

/// Samples 0..n with probability proportional to 1 / (rank + 1)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (0..n)
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, u: f64) -> usize {
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An event store under test.
trait Store: Send + Sync + 'static {
    /// Appends one event at `version`; `Ok(false)` on a version conflict.
    fn append(
        &self,
        stream: String,
        version: u64,
        data: Arc<String>,
    ) -> impl std::future::Future<Output = Result<bool>> + Send;
    /// Reads a whole stream; returns its number of events.
    fn read(&self, stream: String) -> impl std::future::Future<Output = Result<usize>> + Send;
}

struct SpateStore {
    /// For setting up (publishing other streams' events).
    http: reqwest::Client,
    base: String,
    /// For the measured requests: keep-alive connections, one per client at a time.
    pool: crate::loadgen_http::HttpPool,
    /// Makes every attempt's event id unique, so that a conflict is not taken for a retry.
    attempts: AtomicU64,
}

impl Store for SpateStore {
    async fn append(&self, stream: String, version: u64, data: Arc<String>) -> Result<bool> {
        let expected = match version {
            0 => "no_stream".to_string(),
            v => (v - 1).to_string(),
        };
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed);
        let event = format!(
            "{{\"specversion\":\"1.0\",\"id\":\"{stream}-{version}-{attempt}\",\"source\":\"/bench\",\"type\":\"bench.appended\",\"data\":{{\"pad\":\"{data}\"}}}}"
        );
        let r = self
            .pool
            .request(
                "POST",
                &format!("/v1/topics/es/streams/{stream}/events?expected_version={expected}"),
                Some("application/cloudevents+json"),
                event.as_bytes(),
            )
            .await?;
        match r.status {
            201 => Ok(true),
            409 => Ok(false),
            s => anyhow::bail!("append: {s} {}", String::from_utf8_lossy(&r.body)),
        }
    }

    async fn read(&self, stream: String) -> Result<usize> {
        // Count the events without parsing the whole body (the PostgreSQL side does not parse
        // its rows either).
        let r = self
            .pool
            .request(
                "GET",
                &format!("/v1/topics/es/streams/{stream}/events?limit=1000"),
                None,
                b"",
            )
            .await?;
        ensure!(r.status == 200, "read: {}", r.status);
        let body = std::str::from_utf8(&r.body)?;
        Ok(body.matches("\"version\":").count())
    }
}

struct PgStore {
    /// Connections, each with its statements prepared once (as a driver's statement cache
    /// would): an append is then one round trip.
    clients: Vec<PgClient>,
    next: AtomicU64,
}

struct PgClient {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    select: tokio_postgres::Statement,
}

impl PgStore {
    async fn connect(conn: &str, n: usize) -> Result<PgStore> {
        let mut clients = Vec::new();
        for _ in 0..n {
            let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
                .await
                .context("cannot connect to PostgreSQL")?;
            tokio::spawn(connection);
            clients.push(client);
        }
        let c = &clients[0];
        c.batch_execute(
            "DROP TABLE IF EXISTS events;
             CREATE TABLE events (stream_id text NOT NULL, version bigint NOT NULL,
               event_id text NOT NULL, type text NOT NULL, data jsonb NOT NULL,
               created timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (stream_id, version));",
        )
        .await?;
        let mut prepared = Vec::new();
        for client in clients {
            client.batch_execute("SET synchronous_commit = on").await?;
            let insert = client
                .prepare(
                    "INSERT INTO events (stream_id, version, event_id, type, data)
                     VALUES ($1, $2, $3, 'bench.appended', $4::text::jsonb)",
                )
                .await?;
            let select = client
                .prepare(
                    "SELECT version, event_id, type, data::text FROM events
                     WHERE stream_id = $1 ORDER BY version",
                )
                .await?;
            prepared.push(PgClient {
                client,
                insert,
                select,
            });
        }
        Ok(PgStore {
            clients: prepared,
            next: AtomicU64::new(0),
        })
    }

    fn client(&self) -> &PgClient {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.clients.len();
        &self.clients[i]
    }
}

impl Store for PgStore {
    async fn append(&self, stream: String, version: u64, data: Arc<String>) -> Result<bool> {
        let data = format!("{{\"pad\":\"{data}\"}}");
        let c = self.client();
        let r = c
            .client
            .execute(
                &c.insert,
                &[
                    &stream,
                    &(version as i64),
                    &format!("{stream}-{version}"),
                    &data,
                ],
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&self, stream: String) -> Result<usize> {
        let c = self.client();
        let rows = c.client.query(&c.select, &[&stream]).await?;
        Ok(rows.len())
    }
}

/// Publishes `n` events of other streams (10 each) in batches of 1,000, then waits until the
/// stream index has applied them; reports both times on stderr.
async fn fill_others(spate: &SpateStore, n: u64) -> Result<()> {
    let started = Instant::now();
    let streams = (n / 10).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (http, base, next) = (spate.http.clone(), spate.base.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(1000, Ordering::Relaxed);
                if from >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut body = String::from("[");
                for i in from..(from + 1000).min(n) {
                    if i > from {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        "{{\"specversion\":\"1.0\",\"id\":\"o{i}\",\"source\":\"/bench\",\"type\":\"bench.other\",\"partitionkey\":\"o{}\",\"data\":{{\"pad\":\"{}\"}}}}",
                        i % streams,
                        "y".repeat(90)
                    ));
                }
                body.push(']');
                let r = http
                    .post(format!("{base}/v1/topics/es/events"))
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "publish: {}", r.status());
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let published = started.elapsed().as_secs_f64();
    // A stream read answers once the index covers the log (503 while it catches up).
    loop {
        let r = spate
            .http
            .get(format!("{}/v1/topics/es/streams/o0", spate.base))
            .send()
            .await?;
        if r.status().is_success() {
            break;
        }
        ensure!(r.status().as_u16() == 503, "stream info: {}", r.status());
    }
    eprintln!(
        "{n} other events published in {published:.1} s; the stream index had applied them {:.1} s later",
        started.elapsed().as_secs_f64() - published
    );
    Ok(())
}

struct AppendOutcome {
    appends_per_s: f64,
    conflicts: u64,
    hist: Histogram<u64>,
}

async fn append_load<S: Store>(store: Arc<S>, a: &StreamsBenchArgs) -> Result<AppendOutcome> {
    let zipf = Arc::new(Zipf::new(a.streams, a.zipf));
    // What clients believe each stream's next version is.
    let known: Arc<Vec<AtomicU64>> = Arc::new((0..a.streams).map(|_| AtomicU64::new(0)).collect());
    let data = Arc::new("x".repeat(a.event_bytes));
    let done = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..a.clients {
        let (store, zipf, known, data, done, conflicts, hist) = (
            store.clone(),
            zipf.clone(),
            known.clone(),
            data.clone(),
            done.clone(),
            conflicts.clone(),
            hist.clone(),
        );
        tasks.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1).wrapping_mul(0x1234_5678));
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while Instant::now() < deadline {
                let s = zipf.sample(rng.unit());
                let version = known[s].load(Ordering::Relaxed);
                let t = Instant::now();
                if store.append(format!("s{s}"), version, data.clone()).await? {
                    local.saturating_record(t.elapsed().as_micros() as u64);
                    known[s].fetch_max(version + 1, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    conflicts.fetch_add(1, Ordering::Relaxed);
                    // Someone else appended: look again from the next version.
                    known[s].fetch_max(version + 1, Ordering::Relaxed);
                }
            }
            hist.lock().await.add(&local).expect("same bounds");
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hist = Arc::try_unwrap(hist)
        .map_err(|_| anyhow::anyhow!("clients still running"))?
        .into_inner();
    Ok(AppendOutcome {
        appends_per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
        conflicts: conflicts.load(Ordering::Relaxed),
        hist,
    })
}

/// Fills `n` streams with 100 events each, then reads random ones whole for `seconds`.
async fn read_load<S: Store>(
    store: Arc<S>,
    a: &StreamsBenchArgs,
    n: usize,
    name: &'static str,
) -> Result<Histogram<u64>> {
    let data = Arc::new("x".repeat(a.event_bytes));
    let mut fill = tokio::task::JoinSet::new();
    for c in 0..a.clients {
        let (store, data) = (store.clone(), data.clone());
        let clients = a.clients;
        fill.spawn(async move {
            for s in (c..n).step_by(clients) {
                for v in 0..100 {
                    ensure!(
                        store.append(format!("{name}{s}"), v, data.clone()).await?,
                        "conflict while filling"
                    );
                }
            }
            Ok(())
        });
    }
    while let Some(r) = fill.join_next().await {
        r??;
    }
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..a.clients {
        let (store, hist) = (store.clone(), hist.clone());
        tasks.spawn(async move {
            let mut rng = Rng(0xDEAD_BEEF ^ (c as u64 + 7));
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while Instant::now() < deadline {
                let s = (rng.unit() * n as f64) as usize % n;
                let t = Instant::now();
                let got = store.read(format!("{name}{s}")).await?;
                ensure!(got == 100, "stream {name}{s} has {got} events");
                local.saturating_record(t.elapsed().as_micros() as u64);
            }
            hist.lock().await.add(&local).expect("same bounds");
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(Arc::try_unwrap(hist)
        .map_err(|_| anyhow::anyhow!("clients still running"))?
        .into_inner())
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// CPU seconds used so far by a store's server processes.
type ServerCpu = Box<dyn Fn() -> Result<f64>>;

async fn run_store<S: Store>(
    name: &str,
    store: Arc<S>,
    a: &StreamsBenchArgs,
    server_cpu: &ServerCpu,
    cpu_notes: &mut Vec<String>,
) -> Result<(f64, f64)> {
    let (server_before, clients_before) = (
        server_cpu()?,
        crate::bench::cpu_seconds(std::process::id())?,
    );
    let o = append_load(store.clone(), a).await?;
    let requests = (o.appends_per_s * a.seconds) as u64 + o.conflicts;
    let per = |after: f64, before: f64| (after - before) / requests.max(1) as f64 * 1e6;
    cpu_notes.push(format!(
        "{name}: CPU per append request (appends and conflicts): server {:.1} µs, clients {:.1} µs",
        per(server_cpu()?, server_before),
        per(
            crate::bench::cpu_seconds(std::process::id())?,
            clients_before
        ),
    ));
    let reads = read_load(store, a, 200, "r").await?;
    println!(
        "| {name} | {:.0} | {:.2} / {:.2} / {:.2} | {} | {:.2} / {:.2} | {:.0} |",
        o.appends_per_s,
        ms(&o.hist, 0.5),
        ms(&o.hist, 0.99),
        ms(&o.hist, 0.999),
        o.conflicts,
        ms(&reads, 0.5),
        ms(&reads, 0.99),
        reads.len() as f64 / a.seconds,
    );
    Ok((o.appends_per_s, ms(&o.hist, 0.99)))
}

fn client(a: &StreamsBenchArgs) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(a.clients)
        .build()?)
}

pub async fn run(a: StreamsBenchArgs) -> Result<()> {
    ensure!(
        a.streams > 0 && a.clients > 0,
        "--streams and --clients must be positive"
    );
    let server = crate::bench_push::start_server()?;
    let http = client(&a)?;
    server.create_topic(&http, "es", a.partitions).await?;
    println!(
        "# spate bench streams: {} streams (Zipf s={}), {} clients, {} B events, {} s per phase, {} CPUs",
        a.streams,
        a.zipf,
        a.clients,
        a.event_bytes,
        a.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| store | appends/s | append p50 / p99 / p99.9 ms | conflicts | read 100-event stream p50 / p99 ms | reads/s |"
    );
    println!("|---|---|---|---|---|---|");
    let spate = Arc::new(SpateStore {
        http,
        base: format!("http://{}", server.addr),
        pool: crate::loadgen_http::HttpPool::new(&server.addr),
        attempts: AtomicU64::new(0),
    });
    let mut cpu_notes = Vec::new();
    let pid = server.child.id();
    let spate_cpu: ServerCpu = Box::new(move || crate::bench::cpu_seconds(pid));
    let (spate_rate, spate_p99) =
        run_store("spate (fsync batch)", spate, &a, &spate_cpu, &mut cpu_notes).await?;
    if a.others > 0 {
        println!();
        println!("with {} events of other streams in the topic:", a.others);
        println!();
        println!("| store | read 100-event stream p50 / p99 ms | reads/s |");
        println!("|---|---|---|");
        let spate = Arc::new(SpateStore {
            http: client(&a)?,
            base: format!("http://{}", server.addr),
            pool: crate::loadgen_http::HttpPool::new(&server.addr),
            attempts: AtomicU64::new(1 << 40),
        });
        fill_others(&spate, a.others).await?;
        let reads = read_load(spate, &a, 200, "q").await?;
        println!(
            "| spate (fsync batch) | {:.2} / {:.2} | {:.0} |",
            ms(&reads, 0.5),
            ms(&reads, 0.99),
            reads.len() as f64 / a.seconds,
        );
    }
    if let Some(conn) = &a.postgres {
        let pg = Arc::new(PgStore::connect(conn, a.clients).await?);
        // Every process of the cluster: the server runs on this machine for the comparison.
        let pg_cpu: ServerCpu = Box::new(|| crate::bench::cpu_seconds_of("postgres"));
        let (pg_rate, pg_p99) = run_store(
            "postgresql (synchronous_commit=on)",
            pg,
            &a,
            &pg_cpu,
            &mut cpu_notes,
        )
        .await?;
        println!();
        println!(
            "appends/s ratio spate/postgresql: {:.2}x; append p99 {:.2} ms vs {:.2} ms",
            spate_rate / pg_rate,
            spate_p99,
            pg_p99
        );
    }
    println!();
    for note in cpu_notes {
        println!("{note}");
    }
    Ok(())
}
