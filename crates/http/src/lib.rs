//! Spate's HTTP front end: the v1 API (topics, publish, read) with problem+json errors.
//!
//! [`router`] builds the axum app over a [`spate_broker::Broker`]; [`serve`] runs it on a listener the
//! caller bound, with a cap on connections and a graceful shutdown. Handlers parse and check input,
//! call the broker, and map results to JSON; they know nothing of files.

mod auth;
mod consume;
mod detectors;
mod error;
mod events;
mod groups;
mod listener;
mod projections;
pub mod push;
mod streams;
pub mod subscriptions;
mod topics;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use spate_broker::Broker;
use tokio::net::TcpListener;

pub use error::{ApiError, ApiResult};
pub use listener::{LimitedListener, LimitedStream, SseListener};

/// Limits of the HTTP front end.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// The largest request body accepted; larger ones get 413 before they are read.
    pub max_request_bytes: u64,
    /// Open connections at most; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_request_bytes: 16 << 20,
            max_connections: 10_000,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub limits: HttpLimits,
    pub push: push::PushLimits,
    /// Renders the process's metrics in Prometheus text format (`GET /metrics`); the log's
    /// per-partition gauges are added to it.
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Projections; their endpoints answer 503 without them.
    pub projections: Option<Arc<spate_broker::projections::Projections>>,
    /// Kafka consumer groups, shown read-only; 503 without them.
    pub groups: Option<Arc<spate_broker::groups::Coordinator>>,
    /// Detectors; their endpoints answer 503 without them.
    pub detectors: Option<Arc<spate_broker::detectors::Detectors>>,
    /// Durable subscriptions; their endpoints answer 503 without them.
    pub subscriptions: Option<Arc<spate_broker::subscriptions::Subscriptions>>,
    /// Set when the server stops: push streams end so that shutdown does not wait on them.
    pub stopping: Option<tokio::sync::watch::Receiver<bool>>,
    /// The access tokens requests must present; `None`: no authentication.
    pub auth: Option<Arc<spate_broker::auth::Tokens>>,
    /// Where push deliveries run; `None`: on the server's runtime.
    pub deliveries: Option<Arc<push::DeliveryRuntime>>,
}

/// A response whose body is JSON text written by hand.
pub(crate) fn json_text(body: String) -> axum::response::Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The v1 API.
pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/topics", get(topics::list).post(topics::create))
        .route(
            "/v1/topics/{topic}",
            get(topics::describe)
                .patch(topics::alter)
                .delete(topics::delete),
        )
        .route(
            "/v1/topics/{topic}/events",
            get(events::read).post(events::publish),
        )
        .route("/v1/topics/{topic}/sse", get(push::sse))
        .route("/v1/topics/{topic}/truncate", post(topics::truncate))
        .route(
            "/v1/topics/{topic}/streams/{stream}/events",
            get(streams::read).post(streams::append),
        )
        .route("/v1/topics/{topic}/streams", get(streams::list))
        .route(
            "/v1/topics/{topic}/streams/{stream}",
            get(streams::info).delete(streams::delete),
        )
        .route("/v1/detectors", get(detectors::list))
        .route(
            "/v1/detectors/{name}",
            get(detectors::describe)
                .put(detectors::put)
                .delete(detectors::delete),
        )
        .route("/v1/detectors/{name}/series", get(detectors::series))
        .route(
            "/v1/detectors/{name}/series/{series}",
            get(detectors::points),
        )
        .route("/v1/groups", get(groups::list))
        .route("/v1/topics/{topic}/preview", post(topics::preview))
        .route("/v1/projections", get(projections::list))
        .route(
            "/v1/projections/{name}",
            get(projections::describe)
                .put(projections::put)
                .delete(projections::delete),
        )
        .route("/v1/projections/{name}/rebuild", post(projections::rebuild))
        .route("/v1/projections/{name}/rows", get(projections::rows))
        .route("/v1/projections/{name}/sse", get(projections::sse))
        .route("/v1/projections/{name}/rows/{key}", get(projections::row))
        .route("/v1/subscriptions", get(subscriptions::list))
        .route(
            "/v1/subscriptions/{name}",
            get(subscriptions::describe)
                .put(subscriptions::put)
                .delete(subscriptions::delete),
        )
        .route("/v1/subscriptions/{name}/pull", post(subscriptions::pull))
        .route("/v1/subscriptions/{name}/ack", post(subscriptions::ack))
        .route("/v1/subscriptions/{name}/nack", post(subscriptions::nack))
        .route(
            "/v1/subscriptions/{name}/extend",
            post(subscriptions::extend),
        )
        .route(
            "/v1/subscriptions/{name}/dead-letters",
            get(subscriptions::dead_letters),
        )
        .route(
            "/v1/subscriptions/{name}/redrive",
            post(subscriptions::redrive),
        )
        .route("/v1/subscriptions/{name}/seek", post(subscriptions::seek))
        .route("/v1/ws", get(push::ws))
        .route("/", get(console_page))
        .route("/console/console.js", get(console_js))
        .route("/console/console.css", get(console_css))
        .route(
            "/examples/live",
            get(|| async { axum::response::Html(include_str!("live.html")) }),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not-found",
                "no such endpoint",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::disable());
    // Without tokens, requests pass no check at all.
    let router = match &state.auth {
        Some(tokens) => router.layer(axum::middleware::from_fn_with_state(
            tokens.clone(),
            auth::require_token,
        )),
        None => router,
    };
    router
        .layer(axum::middleware::map_response(error::problem_details))
        .with_state(state)
}

/// The web console: one page and its script and styles, embedded in the binary.
async fn console_page() -> impl IntoResponse {
    asset(
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    )
}

async fn console_js() -> impl IntoResponse {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../console/console.js"),
    )
}

async fn console_css() -> impl IntoResponse {
    asset(
        "text/css; charset=utf-8",
        include_str!("../console/console.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> axum::response::Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(axum::extract::State(s): axum::extract::State<AppState>) -> impl IntoResponse {
    let mut out = s
        .metrics
        .as_ref()
        .map(|render| render())
        .unwrap_or_default();
    let topics = s.broker.log().topics();
    type Gauge = (&'static str, &'static str, fn(&spate_log::Partition) -> u64);
    let gauges: [Gauge; 2] = [
        (
            "spate_log_end_offset",
            "The offset after the last durable record of a partition.",
            spate_log::Partition::high_watermark,
        ),
        (
            "spate_log_start_offset",
            "The first retained offset of a partition.",
            spate_log::Partition::log_start_offset,
        ),
    ];
    for (name, help, value) in gauges {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for t in &topics {
            for (i, p) in t.partitions.iter().enumerate() {
                out.push_str(&format!(
                    "{name}{{topic=\"{}\",partition=\"{i}\"}} {}\n",
                    t.name,
                    value(p)
                ));
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_tls(listener, state, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (HTTPS, and WSS for WebSockets).
pub async fn serve_with_tls(
    listener: TcpListener,
    mut state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let mut listener = LimitedListener::new(listener, state.limits.max_connections);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    state.stopping = Some(stop_rx.clone());
    // Connections that open an SSE stream are served on the delivery runtime.
    let sse_server = match &state.deliveries {
        Some(deliveries) => {
            let (sse_listener, streams) = SseListener::new(addr);
            listener = listener.with_streams(streams);
            let mut stop = stop_rx;
            let app = router(state.clone());
            Some(deliveries.spawn(async move {
                axum::serve(sse_listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        None => None,
    };
    if let Some(acceptor) = tls {
        listener = listener.with_tls(acceptor);
    }
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    if let Some(sse_server) = sse_server {
        sse_server.await.map_err(std::io::Error::other)??;
    }
    served
}
