//! Spate's HTTP front end: the v1 API (topics, publish, read) with problem+json errors.
//!
//! [`router`] builds the axum app over a [`spate_broker::Broker`]; [`serve`] runs it on a listener the
//! caller bound, with a cap on connections and a graceful shutdown. Handlers parse and check input,
//! call the broker, and map results to JSON; they know nothing of files.

mod error;
mod events;
mod listener;
pub mod push;
mod topics;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use spate_broker::Broker;
use tokio::net::TcpListener;

pub use error::{ApiError, ApiResult};
pub use listener::LimitedListener;

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
}

/// The v1 API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/topics", get(topics::list).post(topics::create))
        .route(
            "/v1/topics/{topic}",
            get(topics::describe).delete(topics::delete),
        )
        .route(
            "/v1/topics/{topic}/events",
            get(events::read).post(events::publish),
        )
        .route("/v1/topics/{topic}/sse", get(push::sse))
        .route("/v1/ws", get(push::ws))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not-found",
                "no such endpoint",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = LimitedListener::new(listener, state.limits.max_connections);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
