//! `[metrics] listen`: `GET /metrics` over HTTP/1.1 for a scraper.
//!
//! A responder, not a web server: one request per connection (answered
//! with `Connection: close`), a request head of at most
//! [`MAX_REQUEST_BYTES`] that must arrive whole within [`READ_TIMEOUT`], an
//! answer written within [`WRITE_TIMEOUT`], at most [`MAX_CONNECTIONS`]
//! connections at once (more are closed at once), `404` for any other path,
//! `405` for any other method, `400` for what is not HTTP. It runs as tasks
//! of its own on the daemon's runtime, apart from the socket server: a
//! scraper, or anyone else who can reach the address, holds at most a few
//! sockets and a few KiB, and the text it gets is made from atomics and a
//! shared `health` probe (at most one token probe per 100 ms, however many
//! scrape).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ops::Daemon;

/// The largest request head read; a longer one is answered `431`.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;

/// The time a request head has to arrive whole; then `408`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The time the scraper has to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` (checked by the configuration: loopback, or
/// `allow_remote`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown`.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!("metrics listener: accept failed: {e}");
                        warned = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Over the cap: dropped, closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let d = daemon.clone();
        tokio::spawn(async move {
            answer(&d, stream).await;
            drop(slot);
        });
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `GET /metrics`.
    Metrics,
    /// An answer other than the metrics: status line and text.
    Other(&'static str, &'static str),
}

async fn answer(d: &Arc<Daemon>, mut stream: TcpStream) {
    let asked = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => parse(&head),
        Ok(Ok(None)) => Asked::Other("431 Request Header Fields Too Large", "request too large\n"),
        // The peer went away or reset: nobody to answer.
        Ok(Err(_)) => return,
        Err(_) => Asked::Other("408 Request Timeout", "request not received in time\n"),
    };
    let (status, body) = match asked {
        Asked::Metrics => ("200 OK", crate::ops::metrics_text(d).await),
        Asked::Other(status, text) => (status, text.to_owned()),
    };
    let allow = if status.starts_with("405") { "Allow: GET\r\n" } else { "" };
    let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads a request head up to its blank line: `Ok(None)` when it is longer
/// than [`MAX_REQUEST_BYTES`]; an error when the peer closes first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
    }
}

/// Where the head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Reads the request line.
fn parse(head: &[u8]) -> Asked {
    let bad = Asked::Other("400 Bad Request", "not an HTTP/1.1 request\n");
    let Ok(text) = std::str::from_utf8(head) else { return bad };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad;
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") || method.is_empty() || !target.starts_with('/') {
        return bad;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Asked::Other("404 Not Found", "not found: the metrics are at /metrics\n");
    }
    if method != "GET" {
        return Asked::Other("405 Method Not Allowed", "only GET\n");
    }
    Asked::Metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_strictly() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Asked::Metrics);
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Asked::Metrics);
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n\r\n"), Asked::Other(s, _) if s.starts_with("404")));
        assert!(
            matches!(parse(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::Other(s, _) if s.starts_with("405"))
        );
        for bad in
            [&b"\x16\x03\x01\x02\x00\r\n\r\n"[..], b"GET /metrics\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n"]
        {
            assert!(matches!(parse(bad), Asked::Other(s, _) if s.starts_with("400")), "{bad:?}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
