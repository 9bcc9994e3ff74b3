//! `spate serve`: opens the data directory, binds the listeners, runs until SIGINT or SIGTERM, then
//! stops accepting, finishes in-flight requests, syncs the log and returns.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use spate_broker::{Broker, Limits};
use spate_http::{AppState, HttpLimits};
use spate_log::io::FsStorage;
use spate_log::{Log, LogConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ServeConfig;

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing to do). The memory
/// allocator gives freed memory back to the kernel a few milliseconds after it is freed, and with
/// huge pages each later fault on that memory clears a whole 2 MiB page: under a pull-and-ack load
/// of 1 KiB events that was about 7% of the server's CPU. Redis and most databases advise the same.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        #[allow(unsafe_code)]
        // SAFETY: PR_SET_THP_DISABLE takes integers only and reads or writes no memory of ours.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if r != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "transparent huge pages stay as the system has them"
            );
        }
    }
}

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves on the first SIGINT or SIGTERM received after it was called: the handlers are in place
/// from the call on, so a signal that comes while the server is still starting is kept until the
/// future is awaited.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// On every SIGHUP, reads the TLS certificate and key files again (new handshakes get them); a
/// server without TLS has nothing to reload. Either way SIGHUP no longer ends the process.
fn reload_on_sighup(certificate: Option<Arc<crate::tls::Certificate>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &certificate {
                None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                Some(c) => match c.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "SIGHUP: TLS certificate not reloaded; the current one stays"
                    ),
                },
            }
        }
    });
    Ok(())
}

pub async fn run(config: ServeConfig) -> Result<()> {
    // Before anything is announced: a SIGTERM from then on is a graceful stop.
    let shutdown = shutdown_signal()?;
    let fsync = config.fsync_policy()?;
    let auth = match &config.auth_tokens_file {
        Some(path) => Some(Arc::new(
            spate_broker::auth::Tokens::load(path).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(crate::tls::load(
            cert,
            key,
            config.tls_client_ca_file.as_deref(),
        )?),
        _ => None,
    };
    reload_on_sighup(tls.as_ref().map(|t| t.certificate.clone()))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    // One server per data directory: a second one would corrupt the log.
    let lock_path = config.data_dir.join("LOCK");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data directory {} is in use by another spate process",
            config.data_dir.display()
        )
    })?;
    let log_config = LogConfig {
        fsync,
        repair: config.repair,
        preallocate_bytes: config.preallocate_bytes,
        ..LogConfig::default()
    };
    let dir = config.data_dir.clone();
    // Before the log opens: partitions register their metric handles when they open.
    let prometheus = install_metrics()?;
    let log = tokio::task::spawn_blocking(move || Log::open(Arc::new(FsStorage), &dir, log_config))
        .await
        .context("log recovery task failed")?
        .with_context(|| format!("cannot open the log in {}", config.data_dir.display()))?;
    let broker = Arc::new(Broker::new(
        Arc::new(log),
        Limits {
            max_event_bytes: config.max_event_bytes,
            ..Limits::default()
        },
    ));
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    let http_addr = http.local_addr()?;
    println!(
        "spate {} serving {} (fsync {fsync})",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display()
    );
    let kafka = TcpListener::bind(config.kafka_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.kafka_addr))?;
    let kafka_addr = kafka.local_addr()?;
    let (advertised_host, advertised_port) = match &config.kafka_advertised_addr {
        Some(a) => {
            let (h, p) = a
                .rsplit_once(':')
                .with_context(|| format!("--kafka-advertised-addr {a:?} must be host:port"))?;
            (
                h.to_string(),
                p.parse::<u16>()
                    .with_context(|| format!("invalid port in {a:?}"))?,
            )
        }
        None => (kafka_addr.ip().to_string(), kafka_addr.port()),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("http: {scheme}://{http_addr}");
    println!("kafka: {kafka_addr}");
    if let Some(cert) = &config.tls_cert_file {
        match &config.tls_client_ca_file {
            Some(ca) => println!(
                "tls: both listeners, certificate {}, client certificates from {}",
                cert.display(),
                ca.display()
            ),
            None => println!("tls: both listeners, certificate {}", cert.display()),
        }
    }
    let (http_tls, kafka_tls) = match tls {
        Some(t) => (Some(t.http), Some(spate_kafka::Tls(t.kafka))),
        None => (None, None),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let subs_broker = broker.clone();
    let subscriptions = tokio::task::spawn_blocking(move || {
        spate_broker::subscriptions::Subscriptions::open(subs_broker)
    })
    .await
    .context("subscription recovery task failed")?
    .context("cannot load subscriptions")?;
    subscriptions.start(stopped(stop_rx.clone()));
    tokio::spawn(spate_http::webhooks::run(
        subscriptions.clone(),
        stopped(stop_rx.clone()),
    ));
    let proj_broker = broker.clone();
    let proj_dir = config.data_dir.join("projections");
    let projections = tokio::task::spawn_blocking(move || {
        spate_broker::projections::Projections::open(proj_broker, &proj_dir)
    })
    .await
    .context("projection store task failed")?
    .context("cannot open the projection store")?;
    projections.start();
    let det_broker = broker.clone();
    let det_dir = config.data_dir.join("detectors");
    let detectors = tokio::task::spawn_blocking(move || {
        spate_broker::detectors::Detectors::open(det_broker, &det_dir)
    })
    .await
    .context("detector store task failed")?
    .context("cannot open the detector store")?;
    detectors.start();
    let log_for_groups = broker.log().clone();
    let group_delay = Duration::from_millis(config.group_initial_rebalance_delay_ms);
    let coordinator = Arc::new(
        tokio::task::spawn_blocking(move || {
            spate_broker::groups::Coordinator::open(
                log_for_groups,
                group_delay,
                spate_broker::now_ms(),
            )
        })
        .await
        .context("group coordinator task failed")?
        .context("cannot load consumer group offsets")?,
    );
    let render = prometheus.clone();
    let upkeep = tokio::spawn(async move {
        // Histograms are summarized on upkeep; scrapes also render fresh data.
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            prometheus.run_upkeep();
        }
    });
    let state = AppState {
        broker: broker.clone(),
        limits: HttpLimits {
            max_request_bytes: config.max_request_bytes,
            max_connections: config.max_connections,
        },
        push: spate_http::push::PushLimits {
            max_behind: std::time::Duration::from_millis(config.push_max_behind_ms),
            ..Default::default()
        },
        metrics: Some(Arc::new(move || render.render())),
        projections: Some(projections.clone()),
        detectors: Some(detectors.clone()),
        groups: Some(coordinator.clone()),
        subscriptions: Some(subscriptions.clone()),
        stopping: None,
        auth: auth.clone(),
        deliveries: Some(spate_http::push::DeliveryRuntime::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )?),
    };
    let mut server = tokio::spawn(spate_http::serve_with_tls(
        http,
        state,
        http_tls,
        stopped(stop_rx.clone()),
    ));
    let kafka_config = spate_kafka::KafkaConfig {
        advertised_host,
        advertised_port: i32::from(advertised_port),
        auto_create_topics: config.auto_create_topics,
        max_connections: config.max_connections,
        auth,
        tls: kafka_tls,
        ..spate_kafka::KafkaConfig::default()
    };
    tokio::spawn(spate_kafka::run_coordinator_clock(
        coordinator.clone(),
        stopped(stop_rx.clone()),
    ));
    if config.metrics_interval_ms > 0 {
        tokio::spawn(spate_broker::monitor::run(
            broker.clone(),
            spate_broker::monitor::Sources {
                subscriptions: Some(subscriptions.clone()),
                groups: Some(coordinator.clone()),
                projections: Some(projections.clone()),
                detectors: Some(detectors.clone()),
            },
            Duration::from_millis(config.metrics_interval_ms),
            stopped(stop_rx.clone()),
        ));
    }
    let kafka_server = tokio::spawn(spate_kafka::serve(
        kafka,
        broker.clone(),
        coordinator,
        kafka_config,
        stopped(stop_rx.clone()),
    ));
    let maintenance = tokio::spawn(broker.clone().maintain(
        Duration::from_millis(config.retention_check_ms),
        stopped(stop_rx.clone()),
    ));

    tokio::select! {
        _ = shutdown => {}
        result = &mut server => {
            result.context("http server task failed")?.context("http server failed")?;
            anyhow::bail!("http server stopped unexpectedly");
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
        Ok(result) => result
            .context("http server task failed")?
            .context("http server failed")?,
        Err(_) => tracing::warn!("in-flight requests did not finish in time"),
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, kafka_server).await {
        Ok(result) => result
            .context("kafka server task failed")?
            .context("kafka server failed")?,
        Err(_) => tracing::warn!("kafka connections did not finish in time"),
    }
    let _ = maintenance.await;
    upkeep.abort();
    broker.flush().await.context("final sync failed")?;
    broker
        .close_streams()
        .await
        .context("final sync of the stream index failed")?;
    projections
        .stop()
        .await
        .context("final sync of the projection store failed")?;
    detectors
        .stop()
        .await
        .context("final checkpoint of the detectors failed")?;
    tracing::info!("stopped");
    drop(lock);
    Ok(())
}

/// Installs the Prometheus recorder: histograms get buckets from 50 µs to 10 s.
fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    const BUCKETS: [f64; 16] = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 10.0,
    ];
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe_metrics();
    Ok(handle)
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "spate_records_appended_total",
        "Records appended to the log, per topic."
    );
    describe_counter!(
        "spate_bytes_appended_total",
        Unit::Bytes,
        "Record batch bytes appended to the log, per topic."
    );
    describe_histogram!(
        "spate_fsync_seconds",
        Unit::Seconds,
        "Duration of each sync of a partition (a round that syncs several together counts once for each)."
    );
    describe_histogram!(
        "spate_publish_to_durable_seconds",
        Unit::Seconds,
        "From a publish, stream append or produce request's arrival to its records being durable."
    );
    describe_histogram!(
        "spate_durable_to_delivered_seconds",
        Unit::Seconds,
        format!(
            "From an event being seen durable to its delivery to a push subscriber (one delivery in {} of each subscription sampled, the first always).",
            spate_http::push::LATENCY_SAMPLE_EVERY
        )
    );
    describe_gauge!("spate_connections", "Open connections, per protocol.");
    describe_counter!(
        "spate_deliveries_total",
        "Events delivered to push subscribers, per protocol."
    );
    describe_counter!(
        "spate_filter_errors_total",
        "Filter evaluations that failed on an event (counted as no match)."
    );
    describe_gauge!(
        "spate_subscription_backlog",
        "Messages of a subscription waiting for delivery, including unread records of its topic."
    );
    describe_gauge!(
        "spate_subscription_oldest_unacked_seconds",
        Unit::Seconds,
        "Age of a subscription's oldest unsettled message."
    );
    describe_counter!(
        "spate_subscription_redeliveries_total",
        "Deliveries of a subscription's messages beyond the first."
    );
    describe_counter!(
        "spate_subscription_dead_letters_total",
        "Messages a subscription moved to its dead-letter topic."
    );
    describe_counter!(
        "spate_projection_records_applied_total",
        "Log records a projection went through (applied or left out by its filter)."
    );
    describe_counter!(
        "spate_projection_errors_total",
        "Events a projection's definition failed on."
    );
    describe_gauge!(
        "spate_projection_lag_records",
        "Records of a projection's topic not applied yet."
    );
    describe_gauge!(
        "spate_projection_lag_seconds",
        Unit::Seconds,
        "Age of the oldest record a projection has not applied yet."
    );
    describe_counter!(
        "spate_slow_consumers_total",
        "Push connections closed because they fell too far behind."
    );
    describe_gauge!(
        "spate_consumer_group_lag_records",
        "Records of a partition after a Kafka consumer group's committed offset."
    );
    describe_gauge!(
        "spate_consumer_group_lag_seconds",
        Unit::Seconds,
        "Age of the oldest record a Kafka consumer group has not committed past."
    );
    describe_gauge!(
        "spate_consumer_group_members",
        "Members of a Kafka consumer group."
    );
}
