//! A lean HTTP/1.1 client for the benchmarks' load generators: keep-alive connections from a pool,
//! requests written in one system call, responses read whole (status, `content-length` body).
//! A general client spends more CPU per request than a small server does to answer it; on a
//! machine the client shares with the server, that CPU is taken from the server measured.

use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Response heads larger than this are refused.
const HEAD_MAX: usize = 16 * 1024;

/// Keep-alive connections to one server.
pub struct HttpPool {
    /// `host:port`.
    addr: String,
    idle: Mutex<Vec<Conn>>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

/// A response: status and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpPool {
    /// A pool for `addr` (`host:port`); connections open on first use.
    pub fn new(addr: &str) -> HttpPool {
        HttpPool {
            addr: addr.to_string(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn give_back(&self, c: Conn) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// Sends one request on an idle connection (or a new one) and reads its response whole.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response> {
        let mut conn = match self.take() {
            Some(c) => c,
            None => Conn::open(&self.addr).await?,
        };
        let req = request_bytes(method, &self.addr, path, content_type, body);
        conn.stream.write_all(&req).await?;
        let (response, keep) = read_response(&mut conn).await?;
        if keep {
            self.give_back(conn);
        }
        Ok(response)
    }
}

/// Sends `GET path` to `addr` on a connection of its own and reads the response head: for a
/// response that streams (SSE). The connection and the bytes read past the head.
pub async fn open_stream(addr: &str, path: &str) -> Result<(TcpStream, Vec<u8>)> {
    let mut c = Conn::open(addr).await?;
    c.stream
        .write_all(&request_bytes("GET", addr, path, None, b""))
        .await?;
    let head_end = read_head(&mut c).await?;
    let (status, _) = status_of(&c.buf[..head_end])?;
    ensure!(
        status == 200,
        "GET {path}: {}",
        String::from_utf8_lossy(&c.buf[..head_end])
    );
    c.buf.drain(..head_end);
    Ok((c.stream, c.buf))
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }
}

/// A request, written whole.
fn request_bytes(
    method: &str,
    host: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let mut req = Vec::with_capacity(body.len() + 160);
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    req.extend_from_slice(host.as_bytes());
    if let Some(ct) = content_type {
        req.extend_from_slice(b"\r\ncontent-type: ");
        req.extend_from_slice(ct.as_bytes());
    }
    req.extend_from_slice(b"\r\ncontent-length: ");
    req.extend_from_slice(body.len().to_string().as_bytes());
    req.extend_from_slice(b"\r\n\r\n");
    req.extend_from_slice(body);
    req
}

/// Reads until a whole response head is buffered; where it ends.
async fn read_head(c: &mut Conn) -> Result<usize> {
    loop {
        if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        ensure!(
            c.buf.len() <= HEAD_MAX,
            "response head over {HEAD_MAX} bytes"
        );
        fill(c).await?;
    }
}

/// A response head's status and text.
fn status_of(head: &[u8]) -> Result<(u16, &str)> {
    let head = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    Ok((status, head))
}

/// Reads one response; `true` when the connection may carry another.
async fn read_response(c: &mut Conn) -> Result<(Response, bool)> {
    let head_end = read_head(c).await?;
    let (status, head) = status_of(&c.buf[..head_end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut length = None;
    let mut keep = status_line.starts_with("HTTP/1.1");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("transfer-encoding {value} is not supported here");
        } else if name.eq_ignore_ascii_case("connection") {
            keep = !value.eq_ignore_ascii_case("close");
        }
    }
    let length = length.context("response without content-length")?;
    while c.buf.len() < head_end + length {
        fill(c).await?;
    }
    let body = c.buf[head_end..head_end + length].to_vec();
    c.buf.drain(..head_end + length);
    Ok((Response { status, body }, keep))
}

async fn fill(c: &mut Conn) -> Result<()> {
    let len = c.buf.len();
    c.buf.reserve(8192);
    let n = c.stream.read_buf(&mut c.buf).await?;
    ensure!(
        n > 0,
        "connection closed by the server after {len} bytes of a response"
    );
    Ok(())
}
