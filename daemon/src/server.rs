//! The accept loop: binds the socket (configured mode and group), caps concurrent
//! connections, hands each to [`connection::serve`], and on shutdown stops
//! accepting and waits (bounded) for in-flight requests to be answered.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connection;
use crate::ops::Daemon;

/// Binds the listening socket at `config.socket` with `socket_mode` and
/// `socket_group`. A socket file left by a daemon that died is replaced;
/// one that a live daemon answers on is not.
pub fn bind(config: &Config) -> std::io::Result<UnixListener> {
    let path = config.socket.as_path();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Who may connect at all; what a connection may do is the policy's call.
    if let Some(name) = &config.socket_group {
        let group = nix::unistd::Group::from_name(name)
            .map_err(std::io::Error::from)?
            .ok_or_else(|| std::io::Error::other(format!("socket_group `{name}` is not a known group")))?;
        nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::from)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))?;
    Ok(listener)
}

/// File descriptors kept for everything but connections (store, token,
/// log, listening socket).
const SPARE_FDS: u64 = 256;

/// Raises the soft open-file limit so that `max_connections` connections
/// fit (up to the hard limit); says so when they cannot.
pub fn raise_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = max_connections as u64 + SPARE_FDS;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < want => {
            let new = want.min(hard);
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {new}: {e}");
            } else if new < want {
                tracing::warn!(
                    "the open-file limit is {new} (hard limit): fewer than [limits] max_connections = {max_connections} \
                     connections fit; raise LimitNOFILE"
                );
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// Answers a connection over the cap with a `busy` error (no request id:
/// it concerns the connection) and closes it.
async fn refuse(mut stream: tokio::net::UnixStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let frame = keyhaven::wire::ResponseFrame {
        id: None,
        ok: None,
        error: Some(keyhaven::wire::WireError {
            code: keyhaven::ErrorCode::Busy,
            message: format!(
                "the daemon holds its maximum of {max} connections ([limits] max_connections); try again later"
            ),
        }),
    };
    let Ok(bytes) = keyhaven::frame::encode_frame(&frame) else { return };
    // Wait for the client's first bytes (its `hello`), answer, then read
    // (and drop) what it sends until it closes, for at most a second in all:
    // an answer before its first request could reach a client that has not
    // started waiting for one yet, and closing at once would make its first
    // write fail with a broken pipe before it reads why.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        use tokio::io::AsyncReadExt;
        let mut sink = [0u8; 512];
        let first = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut sink)).await;
        if matches!(first, Ok(Ok(0))) {
            return Ok(());
        }
        stream.write_all(&bytes).await?;
        stream.shutdown().await?;
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Serves until `shutdown` is cancelled, then drains. A connection over
/// `max_connections` is accepted, told `busy`, and closed.
pub async fn run(daemon: Arc<Daemon>, listener: UnixListener, shutdown: CancellationToken) {
    let limits = daemon.config.limits.clone();
    raise_open_file_limit(limits.max_connections);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let budget = Arc::new(keyhaven::frame::FrameBudget::new(limits.request_buffer_bytes));
    let mut refused_at: Option<std::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if refused_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                tracing::warn!(
                    "refusing connections: {} open ([limits] max_connections)",
                    limits.max_connections
                );
                refused_at = Some(std::time::Instant::now());
            }
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let (d, s, b) = (daemon.clone(), shutdown.clone(), budget.clone());
        tracker.spawn(async move {
            connection::serve(d, stream, s, b).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    let drain = Duration::from_secs(limits.drain_seconds);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("requests still running after {}s; exiting anyway", limits.drain_seconds);
    }
}
