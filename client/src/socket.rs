//! A Unix stream socket watched for reading only.
//!
//! tokio's `UnixStream` asks the kernel (epoll, edge-triggered) for both
//! readable and writable readiness. On a request-answer socket, which is
//! almost never full, every time the peer reads what this side wrote the
//! kernel reports "writable" once more: a parked runtime thread wakes for
//! an event nobody waits for, and the peer pays that wake-up inside its own
//! `recv` (`unix_write_space`). Under load that is about a tenth of the
//! daemon's I/O threads' time (PERFORMANCE.md, "Wake-ups for writability").
//!
//! [`split`] registers the socket for reading only. A write goes straight
//! to the socket; only one that finds it full (a peer that does not read)
//! registers a second descriptor of the same socket for writability and
//! waits on it, and gives that registration up again once a write goes
//! through.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected stream into halves that share one socket watched for
/// reading only (module doc). Must be called inside a tokio runtime.
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let std = stream.into_std()?;
    std.set_nonblocking(true)?;
    let fd = Arc::new(watch(std, Interest::READABLE)?);
    Ok((ReadHalf { fd: fd.clone() }, WriteHalf { fd, writable: None }))
}

/// Registers `stream` with the runtime for `interest`.
///
/// tokio 1.54 deprecated the safe `AsyncFd::with_interest` in favour of an
/// `unsafe` constructor whose contract is that the descriptor stays open
/// and the same for the `AsyncFd`'s whole life, which a type's `as_raw_fd`
/// cannot promise in general. A `std` `UnixStream` owns its descriptor,
/// never changes it and closes it only when dropped, and the `AsyncFd`
/// owns the stream: the contract holds, so the safe call is kept (the
/// workspace forbids `unsafe`).
#[allow(deprecated)]
fn watch(stream: StdStream, interest: Interest) -> io::Result<AsyncFd<StdStream>> {
    AsyncFd::with_interest(stream, interest)
}

/// The reading half of [`split`].
#[derive(Debug)]
pub struct ReadHalf {
    fd: Arc<AsyncFd<StdStream>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block: readiness cleared, poll again (registers the waker).
                Err(_) => continue,
            }
        }
    }
}

/// The writing half of [`split`]. Dropping it shuts the socket down for
/// writing (the peer reads the end of the stream), as tokio's own write
/// half does.
#[derive(Debug)]
pub struct WriteHalf {
    fd: Arc<AsyncFd<StdStream>>,
    /// A second descriptor of the socket, watched for writability, while a
    /// write waits for room.
    writable: Option<AsyncFd<StdStream>>,
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.fd.get_ref().write(buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => {
                    // Room again: stop watching for it.
                    this.writable = None;
                    return Poll::Ready(done);
                }
            }
            if this.writable.is_none() {
                let again = this.fd.get_ref().try_clone()?;
                this.writable = Some(watch(again, Interest::WRITABLE)?);
            }
            let watch = this.writable.as_ref().expect("just set");
            let mut ready = ready!(watch.poll_write_ready(cx))?;
            match ready.try_io(|_| this.fd.get_ref().write(buf)) {
                Ok(done) => {
                    drop(ready);
                    this.writable = None;
                    return Poll::Ready(done);
                }
                // Still full: readiness cleared; write again, then wait.
                Err(_) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(Shutdown::Write))
    }
}

impl Drop for WriteHalf {
    fn drop(&mut self) {
        let _ = self.fd.get_ref().shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_go_both_ways_and_dropping_the_writer_ends_the_peers_stream() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut ar, mut aw) = split(a).unwrap();
        let (mut br, mut bw) = split(b).unwrap();
        aw.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        bw.write_all(b"pong").await.unwrap();
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(aw);
        let mut rest = Vec::new();
        assert_eq!(br.read_to_end(&mut rest).await.unwrap(), 0, "the end of the stream after the drop");
    }

    /// A write larger than the socket's buffer waits for room, and goes
    /// on once the peer reads: the writability registration wakes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_into_a_full_socket_waits_until_the_peer_reads() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, mut aw) = split(a).unwrap();
        let (mut br, _bw) = split(b).unwrap();
        let big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&big).await.unwrap();
            assert!(aw.writable.is_none(), "the writability registration is given up after the write");
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "8 MiB cannot fit in a socket buffer");
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), br.read_exact(&mut got))
            .await
            .expect("the writer went on as the reader read")
            .unwrap();
        assert!(got == expected);
        writer.await.unwrap();
    }
}
