//! A real server on loopback for the HTTP front end's tests, and a WebSocket client for it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spate_broker::{Broker, Event, Limits};
use spate_http::push::PushLimits;
use spate_http::{AppState, HttpLimits};
use spate_log::io::FsStorage;
use spate_log::{Log, LogConfig, TopicConfig};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub broker: Arc<Broker>,
    pub subscriptions: Arc<spate_broker::subscriptions::Subscriptions>,
    pub projections: Option<Arc<spate_broker::projections::Projections>>,
    pub detectors: Option<Arc<spate_broker::detectors::Detectors>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub async fn start(dir: &Path, push: PushLimits) -> Server {
    start_with(dir, push, false, false).await
}

/// A server with detectors too (not restarted in-process either: their store locks its
/// directory as the projections' does).
pub async fn start_with_detectors(dir: &Path) -> Server {
    start_with(dir, PushLimits::default(), false, true).await
}

/// A server with projections too. Their store locks its directory until the process ends, so
/// such a server is not restarted in-process (whole-binary tests cover restarts).
pub async fn start_with_projections(dir: &Path) -> Server {
    start_with(dir, PushLimits::default(), true, false).await
}

async fn start_with(
    dir: &Path,
    push: PushLimits,
    with_projections: bool,
    with_detectors: bool,
) -> Server {
    let log = Log::open(Arc::new(FsStorage), dir, LogConfig::default()).unwrap();
    let broker = Arc::new(Broker::new(Arc::new(log), Limits::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let subs_broker = broker.clone();
    let subscriptions = tokio::task::spawn_blocking(move || {
        spate_broker::subscriptions::Subscriptions::open(subs_broker)
    })
    .await
    .unwrap()
    .unwrap();
    let projections = if with_projections {
        let proj_broker = broker.clone();
        let proj_dir = dir.join("projections");
        let p = tokio::task::spawn_blocking(move || {
            spate_broker::projections::Projections::open(proj_broker, &proj_dir)
        })
        .await
        .unwrap()
        .unwrap();
        p.start();
        Some(p)
    } else {
        None
    };
    let detectors = if with_detectors {
        let det_broker = broker.clone();
        let det_dir = dir.join("detectors");
        let d = tokio::task::spawn_blocking(move || {
            spate_broker::detectors::Detectors::open(det_broker, &det_dir)
        })
        .await
        .unwrap()
        .unwrap();
        d.start();
        Some(d)
    } else {
        None
    };
    let (stop_subs, stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    subscriptions.start(stopped());
    tokio::spawn(spate_http::webhooks::run(subscriptions.clone(), stopped()));
    let state = AppState {
        broker: broker.clone(),
        limits: HttpLimits::default(),
        push,
        metrics: None,
        projections: projections.clone(),
        detectors: detectors.clone(),
        groups: None,
        subscriptions: Some(subscriptions.clone()),
        stopping: None,
        auth: None,
        deliveries: Some(spate_http::push::DeliveryRuntime::new(2).unwrap()),
    };
    let task = tokio::spawn(async move {
        spate_http::serve(listener, state, async move {
            let _ = rx.await;
            let _ = stop_subs.send(true);
        })
        .await
        .unwrap();
    });
    Server {
        addr,
        broker,
        subscriptions,
        projections,
        detectors,
        stop: Some(tx),
        task,
    }
}

impl Server {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        // Open push streams end with the runtime's tasks; do not wait for them.
        self.task.abort();
        let _ = self.task.await;
        self.broker.flush().await.unwrap();
        self.broker.close_streams().await.unwrap();
        if let Some(p) = self.projections.take() {
            p.stop().await.unwrap();
        }
        if let Some(d) = self.detectors.take() {
            d.stop().await.unwrap();
        }
    }

    pub async fn topic(&self, name: &str, partitions: u32) {
        self.broker
            .create_topic(
                name.into(),
                TopicConfig {
                    partitions,
                    ..TopicConfig::default()
                },
            )
            .await
            .unwrap();
    }

    /// Publishes `n` events numbered from `first`, with keys spreading them over partitions.
    pub async fn publish(&self, topic: &str, first: u64, n: u64) {
        let events: Vec<Event> = (first..first + n)
            .map(|i| {
                Event::from_json(json!({
                    "specversion": "1.0", "id": format!("e{i}"), "source": "/test",
                    "type": "test.n", "partitionkey": format!("k{}", i % 7),
                    "data": {"n": i}
                }))
                .unwrap()
            })
            .collect();
        for chunk in events.chunks(500) {
            self.broker.publish(topic, chunk.to_vec()).await.unwrap();
        }
    }

    pub async fn ws(&self) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", self.addr))
            .await
            .unwrap();
        Ws { socket }
    }
}

/// A JSON client for the API.
pub struct Http {
    pub http: reqwest::Client,
    pub base: String,
}

/// A response: status and JSON body (`null` when there is none).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// Asserts a refusal with this status whose problem detail mentions `needle`.
    pub fn assert_refused(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "{:?}", self.body);
        let detail = self.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(needle), "{needle:?} not in {:?}", self.body);
    }
}

impl Http {
    pub fn new(addr: std::net::SocketAddr) -> Http {
        Http {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        Reply {
            status,
            body: r.json().await.unwrap_or(Value::Null),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
}

pub struct Ws {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.socket
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON message, or `None` after `wait` of silence or on close.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None;
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("a message within 10 s")
    }

    /// Collects `n` event messages.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.recv().await;
            assert_eq!(m["op"], "event", "{m}");
            out.push(m);
        }
        out
    }
}
