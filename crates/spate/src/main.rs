//! The `spate` binary: the server (`serve`), a CLI client for the HTTP API (`topics`, `publish`,
//! `tail`) and benchmarks (`bench`).

mod bench;
mod bench_detect;
mod bench_kafka;
mod bench_projections;
mod bench_push;
mod bench_streams;
mod bench_subs;
mod client;
mod config;
mod detector_cli;
mod loadgen_http;
mod nab;
mod projection_cli;
mod serve;
mod sub_cli;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Large allocations reserve address space without committing memory, so a Kafka request that
/// declares a huge array cannot abort the process (see `spate_kafka::alloc`).
#[global_allocator]
static ALLOC: spate_kafka::alloc::ReservingAlloc = spate_kafka::alloc::ReservingAlloc;

#[derive(Parser)]
#[command(
    name = "spate",
    version,
    about = "An event platform in one binary: durable log, pub/sub, event sourcing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Manage topics.
    Topics {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Publish events: DATA as one event, or one JSON document per stdin line.
    Publish {
        #[command(flatten)]
        server: ServerArg,
        topic: String,
        /// The CloudEvents `type`.
        #[arg(long = "type")]
        event_type: String,
        /// The partition key (CloudEvents `partitionkey`).
        #[arg(long)]
        key: Option<String>,
        /// The CloudEvents `source` (default `/spate`).
        #[arg(long)]
        source: Option<String>,
        /// The event data: JSON, or text sent as text/plain.
        data: Option<String>,
    },
    /// Projections: create, list, get (status or a row), rebuild, delete.
    Projection {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: projection_cli::ProjectionCommand,
    },
    /// Detectors: create, list, get (status or a series' recent points), delete.
    Detector {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: detector_cli::DetectorCommand,
    },
    /// Durable subscriptions: create, list, describe, pull, redrive.
    Sub {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: sub_cli::SubCommand,
    },
    /// Event-sourcing streams: append with an expected version, read.
    Stream {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// Print a topic's events as JSON lines.
    Tail {
        #[command(flatten)]
        server: ServerArg,
        topic: String,
        /// earliest, latest or an offset.
        #[arg(long, default_value = "earliest")]
        from: String,
        #[arg(long)]
        partition: Option<u32>,
        /// Keep printing new events as they arrive.
        #[arg(long)]
        follow: bool,
    },
    /// Score the auto anomaly detector on NAB (Numenta Anomaly Benchmark) data.
    Nab(nab::NabArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(clap::Subcommand)]
enum StreamCommand {
    /// Append DATA as one event, or one JSON document per stdin line, all or nothing.
    Append {
        topic: String,
        stream: String,
        /// The CloudEvents `type`.
        #[arg(long = "type")]
        event_type: String,
        /// A version number, any, no_stream or exists.
        #[arg(long, default_value = "any")]
        expected_version: String,
        /// The event data: JSON, or text sent as text/plain.
        data: Option<String>,
    },
    /// Print a stream's events as JSON lines.
    Read {
        topic: String,
        stream: String,
        #[arg(long, default_value_t = 0)]
        from_version: u64,
        /// Newest first.
        #[arg(long)]
        backward: bool,
    },
    /// Print a topic's streams (those with events) as JSON lines.
    List { topic: String },
    /// Delete a stream (soft delete: reads leave out its events; appending starts it again at
    /// the next version).
    Delete {
        topic: String,
        stream: String,
        /// A version number, any or exists.
        #[arg(long, default_value = "any")]
        expected_version: String,
    },
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's HTTP address.
    #[arg(
        long,
        env = "SPATE_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    server: String,
    /// An access token, for a server started with `--auth-tokens-file`.
    #[arg(long, env = "SPATE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl ServerArg {
    fn client(&self) -> client::Client {
        client::Client::new(&self.server, self.token.as_deref())
    }
}

#[derive(Subcommand)]
enum TopicsCommand {
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    List,
    Describe {
        name: String,
    },
    /// Change a topic's settings; those not given keep their value.
    Alter {
        name: String,
        /// Milliseconds, or `none` for no time limit.
        #[arg(long)]
        retention_ms: Option<Limit>,
        /// Bytes per partition, or `none` for no size limit.
        #[arg(long)]
        retention_bytes: Option<Limit>,
        #[arg(long)]
        segment_bytes: Option<u64>,
        #[arg(long)]
        segment_ms: Option<u64>,
        #[arg(long)]
        max_message_bytes: Option<u64>,
    },
    /// Delete records from the start of partitions, e.g. `--before 0:120,1:end`.
    Truncate {
        name: String,
        /// `partition:offset` pairs, the new first offset of each partition (`end`: every record).
        #[arg(long)]
        before: String,
    },
    Delete {
        name: String,
    },
}

/// A retention limit on the command line: a number, or `none`.
#[derive(Clone, Copy, Debug)]
struct Limit(Option<u64>);

impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(Limit(None));
        }
        s.parse()
            .map(|n| Limit(Some(n)))
            .map_err(|_| format!("expected a number or none, got {s:?}"))
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML file with settings (same names as the flags, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the log lives [default: ./spate-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:7070].
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Kafka listen address [default: 127.0.0.1:9092].
    #[arg(long)]
    kafka_addr: Option<SocketAddr>,
    /// host:port that Kafka clients are told to connect to [default: the listen address].
    #[arg(long)]
    kafka_advertised_addr: Option<String>,
    /// Create unknown topics when Kafka clients ask for them.
    #[arg(long)]
    auto_create_topics: bool,
    /// batch (group commit, default), interval:<ms> or never.
    #[arg(long)]
    fsync: Option<String>,
    /// The largest event accepted [default: 1048576].
    #[arg(long)]
    max_event_bytes: Option<u64>,
    /// The largest HTTP request body accepted [default: 16777216].
    #[arg(long)]
    max_request_bytes: Option<u64>,
    /// Open HTTP connections at most [default: 10000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Truncate corrupt data found on start (losing what follows it) instead of refusing to start.
    #[arg(long)]
    repair: bool,
    /// Require an access token from this file (one per line) on HTTP and Kafka (SASL/PLAIN).
    #[arg(long)]
    auth_tokens_file: Option<PathBuf>,
    /// Serve TLS on both listeners with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_key_file: Option<PathBuf>,
    /// With TLS, require client certificates issued by a CA in this PEM file (mutual TLS).
    #[arg(long = "tls-client-ca", value_name = "FILE")]
    tls_client_ca_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(cli.command, Command::Serve(_)) {
        serve::disable_transparent_huge_pages();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => {
                let overrides = config::Overrides {
                    data_dir: a.data_dir,
                    http_addr: a.http_addr,
                    kafka_addr: a.kafka_addr,
                    kafka_advertised_addr: a.kafka_advertised_addr,
                    auto_create_topics: a.auto_create_topics,
                    fsync: a.fsync,
                    max_event_bytes: a.max_event_bytes,
                    max_request_bytes: a.max_request_bytes,
                    max_connections: a.max_connections,
                    repair: a.repair,
                    auth_tokens_file: a.auth_tokens_file,
                    tls_cert_file: a.tls_cert_file,
                    tls_key_file: a.tls_key_file,
                    tls_client_ca_file: a.tls_client_ca_file,
                };
                let config = config::ServeConfig::load(a.config.as_deref(), &overrides)?;
                serve::run(config).await
            }
            Command::Topics { server, command } => {
                let c = server.client();
                match command {
                    TopicsCommand::Create {
                        name,
                        partitions,
                        retention_ms,
                        retention_bytes,
                    } => {
                        c.create_topic(&name, partitions, retention_ms, retention_bytes)
                            .await
                    }
                    TopicsCommand::List => c.list_topics().await,
                    TopicsCommand::Describe { name } => c.describe_topic(&name).await,
                    TopicsCommand::Alter {
                        name,
                        retention_ms,
                        retention_bytes,
                        segment_bytes,
                        segment_ms,
                        max_message_bytes,
                    } => {
                        let mut body = serde_json::Map::new();
                        if let Some(Limit(v)) = retention_ms {
                            body.insert("retention_ms".into(), v.into());
                        }
                        if let Some(Limit(v)) = retention_bytes {
                            body.insert("retention_bytes".into(), v.into());
                        }
                        for (key, v) in [
                            ("segment_bytes", segment_bytes),
                            ("segment_ms", segment_ms),
                            ("max_message_bytes", max_message_bytes),
                        ] {
                            if let Some(v) = v {
                                body.insert(key.into(), v.into());
                            }
                        }
                        c.alter_topic(&name, body.into()).await
                    }
                    TopicsCommand::Truncate { name, before } => {
                        let mut offsets = serde_json::Map::new();
                        for pair in before.split(',') {
                            let (p, o) = pair.trim().split_once(':').ok_or_else(|| {
                                anyhow::anyhow!("expected partition:offset pairs, got {pair:?}")
                            })?;
                            let o = if o == "end" {
                                serde_json::Value::from("end")
                            } else {
                                o.parse::<u64>()
                                    .map_err(|_| anyhow::anyhow!("offset {o:?} is not a number"))?
                                    .into()
                            };
                            offsets.insert(p.to_string(), o);
                        }
                        c.truncate_topic(&name, serde_json::json!({ "before": offsets }))
                            .await
                    }
                    TopicsCommand::Delete { name } => c.delete_topic(&name).await,
                }
            }
            Command::Publish {
                server,
                topic,
                event_type,
                key,
                source,
                data,
            } => {
                server
                    .client()
                    .publish(
                        &topic,
                        &event_type,
                        key.as_deref(),
                        source.as_deref(),
                        data.as_deref(),
                    )
                    .await
            }
            Command::Stream { server, command } => {
                let c = server.client();
                match command {
                    StreamCommand::Append {
                        topic,
                        stream,
                        event_type,
                        expected_version,
                        data,
                    } => {
                        c.stream_append(
                            &topic,
                            &stream,
                            &event_type,
                            &expected_version,
                            data.as_deref(),
                        )
                        .await
                    }
                    StreamCommand::Read {
                        topic,
                        stream,
                        from_version,
                        backward,
                    } => c.stream_read(&topic, &stream, from_version, backward).await,
                    StreamCommand::List { topic } => c.stream_list(&topic).await,
                    StreamCommand::Delete {
                        topic,
                        stream,
                        expected_version,
                    } => c.stream_delete(&topic, &stream, &expected_version).await,
                }
            }
            Command::Tail {
                server,
                topic,
                from,
                partition,
                follow,
            } => server.client().tail(&topic, &from, partition, follow).await,
            Command::Detector { server, command } => {
                detector_cli::run(&server.client(), command).await
            }
            Command::Projection { server, command } => {
                projection_cli::run(&server.client(), command).await
            }
            Command::Sub { server, command } => sub_cli::run(&server.client(), command).await,
            Command::Nab(args) => nab::run(args),
            Command::Bench { command } => bench::run(command).await,
        }
    })
}
