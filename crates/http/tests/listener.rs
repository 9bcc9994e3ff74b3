//! Requests the HTTP server refuses before any handler runs, over raw loopback TCP: they get
//! problem details like every other error, and the server goes on serving.

mod common;

use common::start;
use serde_json::Value;
use spate_http::push::PushLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads the answer until the server closes it.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, Value) {
    let (mut rx, mut tx) = TcpStream::connect(addr).await.unwrap().into_split();
    // The server may answer (and close) before it has read all of an oversized request: the
    // request goes out while the answer is read, and the sending side is closed once sent.
    let request = request.to_vec();
    let sender = tokio::spawn(async move {
        let _ = tx.write_all(&request).await;
        let _ = tx.shutdown().await;
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), rx.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    sender.abort();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "{head}");
    (status, content_type, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn requests_the_http_layer_refuses_get_problem_details() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), PushLimits::default()).await;
    let many_headers = format!(
        "GET /v1/topics HTTP/1.1\r\nhost: x\r\n{}\r\n",
        (0..200)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    let long_uri = format!(
        "GET /v1/topics/{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    let bad_length =
        "GET /v1/topics HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_string();
    // (Headers over hyper's size limit get the same 431 answer, rewritten the same way. They are
    // left out here: the server closes with the rest of them unread, and the reset that sends can
    // destroy the answer before the client reads it.)
    for (request, status, kind) in [
        (many_headers, 431, "headers-too-large"),
        (long_uri, 414, "uri-too-long"),
        (bad_length, 400, "bad-request"),
    ] {
        let (got, content_type, body) = exchange(server.addr, request.as_bytes()).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["status"], status);
        assert_eq!(body["type"], format!("urn:spate:problem:{kind}"));
        assert!(
            body["detail"].as_str().unwrap().contains("request"),
            "{body}"
        );
    }
    // Errors of handlers are untouched, and the server still serves.
    let (got, content_type, body) = exchange(
        server.addr,
        b"GET /v1/topics/nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (got, content_type.as_str()),
        (404, "application/problem+json")
    );
    assert_eq!(body["type"], "urn:spate:problem:topic-not-found");
    let (got, _, body) = exchange(
        server.addr,
        b"GET /v1/topics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, 200, "{body}");
}

/// Reads what the client sent first on an accepted connection.
async fn first_line(conn: &mut spate_http::LimitedStream) -> String {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn connections_that_open_an_sse_stream_are_handed_over_with_their_request_unread() {
    use axum::serve::Listener;
    use spate_http::{LimitedListener, SseListener};
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let (mut sse, streams) = SseListener::new(addr);
    let mut main = LimitedListener::new(tcp, 16).with_streams(streams);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tokio::spawn(async move {
        loop {
            let (conn, _) = main.accept().await;
            if accepted_tx.send(conn).is_err() {
                return;
            }
        }
    });
    let wait = std::time::Duration::from_secs(10);

    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(b"GET /v1/topics/orders/sse?from=earliest HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (mut conn, _) = tokio::time::timeout(wait, sse.accept()).await.unwrap();
    assert_eq!(
        first_line(&mut conn).await,
        "GET /v1/topics/orders/sse?from=earliest HTTP/1.1"
    );

    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(b"GET /v1/topics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut conn = tokio::time::timeout(wait, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_line(&mut conn).await, "GET /v1/topics HTTP/1.1");

    // A client that says nothing at first is served where it was accepted, after a second.
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut conn = tokio::time::timeout(wait, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    c.write_all(b"GET /v1/topics/orders/sse HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        first_line(&mut conn).await,
        "GET /v1/topics/orders/sse HTTP/1.1"
    );
    // Nothing else reached the SSE side.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), sse.accept())
            .await
            .is_err()
    );
    acceptor.abort();
}
