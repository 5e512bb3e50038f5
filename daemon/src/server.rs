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

/// Serves until `shutdown` is cancelled, then drains.
pub async fn run(daemon: Arc<Daemon>, listener: UnixListener, shutdown: CancellationToken) {
    let limits = daemon.config.limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.cancelled() => break,
        };
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
        let (d, s) = (daemon.clone(), shutdown.clone());
        tracker.spawn(async move {
            connection::serve(d, stream, s).await;
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
