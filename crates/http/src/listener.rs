//! A TCP listener that holds at most N connections open: a connection takes a permit when accepted
//! and returns it when dropped, so a flood of clients waits in the accept queue instead of
//! exhausting file descriptors and memory. With TLS, connections are handed over once their
//! handshake is done; handshakes run side by side, so a client that stalls in one holds up no other.
//!
//! With a place to send them ([`LimitedListener::with_streams`]), connections whose first request
//! opens an SSE stream are handed over there instead (see [`SseListener`]): they are served on the
//! delivery runtime, so thousands of them do not hold up the server's other work.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The longest a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
    /// TLS handshakes under way, each holding its connection's permit.
    handshakes: JoinSet<Option<(LimitedStream, SocketAddr)>>,
    /// Where connections that open an SSE stream go, when somewhere.
    streams: Option<mpsc::UnboundedSender<(LimitedStream, SocketAddr)>>,
    /// Plain connections whose first request is being looked at, when `streams` is set (TLS ones
    /// are looked at in their handshake's task).
    sniffs: JoinSet<Option<(LimitedStream, SocketAddr)>>,
}

/// How long a new connection may stay silent before it is served where it was accepted.
const SNIFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl LimitedListener {
    pub fn new(inner: TcpListener, max_connections: usize) -> Self {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            tls: None,
            handshakes: JoinSet::new(),
            streams: None,
            sniffs: JoinSet::new(),
        }
    }

    /// Hands connections whose first request is `GET /v1/topics/{topic}/sse` to `streams`
    /// (an [`SseListener`]'s sender) rather than accepting them here.
    pub fn with_streams(
        mut self,
        streams: mpsc::UnboundedSender<(LimitedStream, SocketAddr)>,
    ) -> Self {
        self.streams = Some(streams);
        self
    }

    /// Serves TLS with `acceptor` on every connection.
    pub fn with_tls(mut self, acceptor: TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }
}

/// A connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection and its permit.
pub struct LimitedStream {
    stream: Conn,
    _permit: OwnedSemaphorePermit,
    /// An answer of hyper's own given a problem+json body (see [`with_problem_body`]), and how
    /// much of it was written.
    rewritten: Option<(Vec<u8>, usize)>,
    /// Bytes read from a TLS connection to look at its first request, and how many of them
    /// have been read again since.
    replay: Option<(Vec<u8>, usize)>,
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let LimitedListener {
                inner,
                permits,
                tls,
                handshakes,
                streams,
                sniffs,
            } = self;
            tokio::select! {
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    if let Ok(Some(accepted)) = done {
                        return accepted;
                    }
                }
                Some(done) = sniffs.join_next(), if !sniffs.is_empty() => {
                    if let Ok(Some(accepted)) = done {
                        return accepted;
                    }
                }
                (stream, addr, permit) = accept_tcp(inner, permits) => {
                    let Some(acceptor) = tls.clone() else {
                        let conn = LimitedStream::new(Conn::Plain(stream), permit);
                        let Some(streams) = streams.clone() else {
                            return (conn, addr);
                        };
                        sniffs.spawn(hand_over_sse(conn, addr, streams));
                        continue;
                    };
                    let streams = streams.clone();
                    handshakes.spawn(async move {
                        let handshake = acceptor.accept(stream);
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(Ok(tls)) => {
                                let conn = LimitedStream::new(Conn::Tls(Box::new(tls)), permit);
                                match streams {
                                    Some(streams) => hand_over_sse(conn, addr, streams).await,
                                    None => Some((conn, addr)),
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%addr, error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%addr, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Sends `conn` to `streams` if its first request opens an SSE stream; otherwise gives it back
/// (also when the other side is gone: the server stops).
async fn hand_over_sse(
    mut conn: LimitedStream,
    addr: SocketAddr,
    streams: mpsc::UnboundedSender<(LimitedStream, SocketAddr)>,
) -> Option<(LimitedStream, SocketAddr)> {
    if opens_sse(&mut conn).await {
        return streams.send((conn, addr)).err().map(|e| e.0);
    }
    Some((conn, addr))
}

/// Whether a connection's first request, as far as it has arrived, is
/// `GET /v1/topics/{topic}/sse`: looked at without being taken off a plain socket, read and kept
/// for the connection's first reads on a TLS one.
async fn opens_sse(conn: &mut LimitedStream) -> bool {
    let mut buf = [0u8; 512];
    match &mut conn.stream {
        Conn::Plain(stream) => {
            match tokio::time::timeout(SNIFF_TIMEOUT, stream.peek(&mut buf)).await {
                Ok(Ok(n)) => is_sse_request(&buf[..n]),
                _ => false,
            }
        }
        // A TLS stream cannot be peeked at: what is read is given back by the first reads.
        Conn::Tls(stream) => {
            use tokio::io::AsyncReadExt;
            match tokio::time::timeout(SNIFF_TIMEOUT, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    conn.replay = Some((buf[..n].to_vec(), 0));
                    is_sse_request(&buf[..n])
                }
                _ => false,
            }
        }
    }
}

/// Whether `head` begins a request line `GET /v1/topics/<topic>/sse[?...] `.
fn is_sse_request(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"GET /v1/topics/") else {
        return false;
    };
    let Some(end) = rest.iter().position(|&b| b == b' ' || b == b'?') else {
        return false;
    };
    let path = &rest[..end];
    path.len() > b"/sse".len() && path.ends_with(b"/sse") && !path[..path.len() - 4].contains(&b'/')
}

/// The connections a [`LimitedListener`] handed over because they open an SSE stream, as a
/// listener of their own (served by a second `axum::serve` on the delivery runtime).
pub struct SseListener {
    rx: mpsc::UnboundedReceiver<(LimitedStream, SocketAddr)>,
    addr: SocketAddr,
}

impl SseListener {
    /// A listener and the sender to give [`LimitedListener::with_streams`]; `addr` is the
    /// address the connections were accepted on.
    pub fn new(
        addr: SocketAddr,
    ) -> (
        SseListener,
        mpsc::UnboundedSender<(LimitedStream, SocketAddr)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (SseListener { rx, addr }, tx)
    }
}

impl axum::serve::Listener for SseListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The main listener is gone: nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// Takes a permit, then a TCP connection.
async fn accept_tcp(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                return (stream, addr, permit);
            }
            Err(e) => {
                // Errors such as EMFILE are transient; back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

impl LimitedStream {
    fn new(stream: Conn, permit: OwnedSemaphorePermit) -> Self {
        LimitedStream {
            stream,
            _permit: permit,
            rewritten: None,
            replay: None,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some((bytes, at)) = &mut self.replay {
            let n = (bytes.len() - *at).min(buf.remaining());
            buf.put_slice(&bytes[*at..*at + n]);
            *at += n;
            if *at == bytes.len() {
                self.replay = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

/// hyper answers a request it cannot parse by itself, before any handler runs: a head over its
/// size limits (`431`), a URI too long for it (`414`) or a malformed request (`400`), each with an
/// empty body and the connection closed. Such an answer, written as one response head, is given
/// the problem+json body every other error of the API has; `None` for anything else.
fn with_problem_body(head: &[u8]) -> Option<Vec<u8>> {
    let (status, kind, detail) = match head.get(..13)? {
        b"HTTP/1.1 400 " => (400, "bad-request", "the request is not valid HTTP/1.1"),
        b"HTTP/1.1 414 " => (414, "uri-too-long", "the request's URI is too long"),
        b"HTTP/1.1 431 " => (
            431,
            "headers-too-large",
            "the request's headers are too large or too many",
        ),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let lines: Vec<&str> = text.strip_suffix("\r\n\r\n")?.split("\r\n").collect();
    let has = |line: &str| lines.iter().any(|l| l.eq_ignore_ascii_case(line));
    if !has("content-length: 0") || !has("connection: close") {
        return None;
    }
    let code = axum::http::StatusCode::from_u16(status).expect("a valid status");
    let body = serde_json::json!({
        "type": format!("urn:spate:problem:{kind}"),
        "title": code.canonical_reason().unwrap_or("Error"),
        "status": status,
        "detail": detail,
    })
    .to_string();
    let mut out = String::with_capacity(text.len() + body.len() + 64);
    for line in lines {
        if line.eq_ignore_ascii_case("content-length: 0") {
            out.push_str(&format!(
                "content-type: application/problem+json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl LimitedStream {
    /// Writes what is left of a rewritten answer.
    fn poll_rewritten(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, at)) = &mut self.rewritten {
            let n = std::task::ready!(Pin::new(&mut self.stream).poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *at += n;
            if *at == bytes.len() {
                self.rewritten = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `head` as written when it is one of hyper's own answers, writing the rewritten one
    /// in its place (the rest of it on later writes, flushes or the shutdown).
    fn take_rewritten(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Option<io::Result<usize>> {
        let bytes = with_problem_body(head)?;
        self.rewritten = Some((bytes, 0));
        match self.poll_rewritten(cx) {
            Poll::Ready(Err(e)) => Some(Err(e)),
            _ => Some(Ok(head.len())),
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        if let Some(r) = self.take_rewritten(cx, buf) {
            return Poll::Ready(r);
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        // hyper's own answers are a response head alone, in one slice.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(head), None) = (filled.next(), filled.next())
            && let Some(r) = self.take_rewritten(cx, head)
        {
            return Poll::Ready(r);
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::{is_sse_request, with_problem_body};

    #[test]
    fn only_a_get_of_a_topics_sse_path_is_an_sse_request() {
        for yes in [
            "GET /v1/topics/orders/sse HTTP/1.1\r\n",
            "GET /v1/topics/orders/sse?from=earliest&filter=x HTTP/1.1\r\nhost: a\r\n",
            "GET /v1/topics/a.b-c/sse ",
        ] {
            assert!(is_sse_request(yes.as_bytes()), "{yes}");
        }
        for no in [
            "GET /v1/topics/orders/sse",
            "GET /v1/topics//sse HTTP/1.1\r\n",
            "GET /v1/topics/sse HTTP/1.1\r\n",
            "GET /v1/topics/orders/events HTTP/1.1\r\n",
            "GET /v1/topics/a/b/sse HTTP/1.1\r\n",
            "POST /v1/topics/orders/sse HTTP/1.1\r\n",
            "GET /v1/ws HTTP/1.1\r\n",
            "",
        ] {
            assert!(!is_sse_request(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn only_hypers_own_empty_answers_get_a_problem_body() {
        let head = "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 29 Nov 2026 14:13:18 GMT\r\n\r\n";
        let out = String::from_utf8(with_problem_body(head.as_bytes()).unwrap()).unwrap();
        let (new_head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(new_head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(new_head.contains("\r\ncontent-type: application/problem+json\r\n"));
        assert!(new_head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
        assert!(new_head.contains("\r\nconnection: close\r\n"));
        assert!(new_head.ends_with("date: Sun, 29 Nov 2026 14:13:18 GMT"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["status"], 431);
        assert_eq!(v["type"], "urn:spate:problem:headers-too-large");
        // Answers with a body, kept connections, other statuses and partial heads are left alone.
        for other in [
            "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 12\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\n",
        ] {
            assert!(with_problem_body(other.as_bytes()).is_none(), "{other}");
        }
    }
}
