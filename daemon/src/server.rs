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

/// File descriptors kept for everything but connections: the token
/// (SoftHSM2 opens its token files for each session and operation), the
/// store, the audit log, the listening socket, the runtime, and
/// [`REFUSING`] connections being told `busy`.
pub const RESERVED_FDS: u64 = 256;

/// Connections over a cap being told `busy` at once; further ones are
/// closed at once, so that a flood cannot spend the reserve.
const REFUSING: usize = 64;

/// The open-file limit could not be read, or the configured connection
/// cap leaves no reserve under it.
#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    /// `getrlimit` failed.
    #[error("cannot read the open-file limit (RLIMIT_NOFILE): {0}")]
    Read(nix::Error),
    /// `max_connections` plus the reserve is over the hard limit.
    #[error(
        "[limits] max_connections = {max_connections} needs {need} open files ({max_connections} connections + \
         {RESERVED_FDS} kept for the token, the store and the audit log), but the open-file limit is {hard} \
         (hard limit); lower max_connections to at most {fit} or raise LimitNOFILE"
    )]
    NoReserve {
        /// Configured cap.
        max_connections: usize,
        /// Descriptors it needs with the reserve.
        need: u64,
        /// The hard limit.
        hard: u64,
        /// The largest cap that fits.
        fit: u64,
    },
}

/// Raises the soft open-file limit so that `max_connections` connections
/// and [`RESERVED_FDS`] fit, and returns the connection cap: the
/// configured one, or fewer if the soft limit could not be raised (said in
/// the log). Refuses a configured cap that leaves no reserve under the
/// hard limit.
pub fn raise_open_file_limit(limits: &crate::config::Limits) -> Result<usize, FdLimitError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let max_connections = limits.max_connections;
    let want = max_connections as u64 + RESERVED_FDS;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(FdLimitError::Read)?;
    if want > hard {
        return Err(FdLimitError::NoReserve {
            max_connections,
            need: want,
            hard,
            fit: hard.saturating_sub(RESERVED_FDS),
        });
    }
    let mut limit = soft;
    if soft < want {
        match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            Ok(()) => limit = want,
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {want}: {e}"),
        }
    }
    let cap = (limit.saturating_sub(RESERVED_FDS) as usize).min(max_connections);
    if cap < max_connections {
        tracing::warn!(
            "serving at most {cap} connections, not [limits] max_connections = {max_connections}: \
             the open-file limit is {limit} and {RESERVED_FDS} are kept for the token, the store and the audit log"
        );
    }
    Ok(cap.max(1))
}

/// Connections open per uid, so that one user cannot take every slot.
#[derive(Default)]
struct PerUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// A connection counted against its uid, uncounted when dropped.
struct UidSlot(Arc<PerUid>, u32);

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32, max: usize) -> Option<UidSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UidSlot(self.clone(), uid))
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Answers a connection over the cap with a `busy` error (no request id:
/// it concerns the connection) and closes it.
async fn refuse(mut stream: tokio::net::UnixStream, message: String) {
    use tokio::io::AsyncWriteExt;
    let frame = keyhaven::wire::ResponseFrame {
        id: None,
        ok: None,
        error: Some(keyhaven::wire::WireError { code: keyhaven::ErrorCode::Busy, message }),
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
/// the connection cap, or over its uid's `max_connections_per_uid`, is
/// accepted, told `busy`, and closed; at most [`REFUSING`] are being told
/// at once, others are closed at once. When accept fails for want of file
/// descriptors, the loop backs off (10 ms, doubling to 1 s) instead of
/// spinning.
pub async fn run(daemon: Arc<Daemon>, listener: UnixListener, shutdown: CancellationToken) {
    let limits = daemon.config.limits.clone();
    let cap = match raise_open_file_limit(&limits) {
        Ok(cap) => cap,
        Err(e) => {
            // `daemon::run` checked this before listening; the limit changed since.
            tracing::warn!("{e}");
            limits.max_connections
        }
    };
    let per_uid_max = limits.max_connections_per_uid.min(cap);
    let slots = Arc::new(Semaphore::new(cap));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let per_uid = Arc::new(PerUid::default());
    let tracker = TaskTracker::new();
    let budget = Arc::new(keyhaven::frame::FrameBudget::new(limits.request_buffer_bytes));
    let mut refused_at: Option<std::time::Instant> = None;
    let mut backoff = Duration::ZERO;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    backoff = Duration::ZERO;
                    s
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
                    let out_of_fds = matches!(errno, Some(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE));
                    backoff = match out_of_fds {
                        true => (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1)),
                        false => Duration::from_millis(100),
                    };
                    if refused_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!("accept failed: {e}; waiting {} ms before the next", backoff.as_millis());
                        refused_at = Some(std::time::Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let admitted = match slots.clone().try_acquire_owned() {
            Err(_) => {
                crate::metrics::connection_refused(crate::metrics::Refusal::MaxConnections);
                Err(format!(
                    "the daemon holds its maximum of {cap} connections ([limits] max_connections); try again later"
                ))
            }
            Ok(permit) => match uid.map(|u| per_uid.take(u, per_uid_max)) {
                Some(Some(slot)) => Ok((permit, slot)),
                Some(None) => Err({
                    crate::metrics::connection_refused(crate::metrics::Refusal::MaxConnectionsPerUid);
                    format!(
                    "uid {} holds its maximum of {per_uid_max} connections ([limits] max_connections_per_uid); \
                     try again later",
                    uid.unwrap_or_default()
                    )
                }),
                // No peer credentials: `serve` logs and closes it.
                None => match per_uid.take(u32::MAX, per_uid_max) {
                    Some(slot) => Ok((permit, slot)),
                    None => Err("too many connections without peer credentials".to_owned()),
                },
            },
        };
        let (permit, uid_slot) = match admitted {
            Ok(a) => a,
            Err(message) => {
                if refused_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!("refusing connections: {message}");
                    refused_at = Some(std::time::Instant::now());
                }
                // Telling takes a descriptor for up to a second: only a few at once.
                if let Ok(telling) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, message).await;
                        drop(telling);
                    });
                }
                continue;
            }
        };
        let (d, s, b) = (daemon.clone(), shutdown.clone(), budget.clone());
        tracker.spawn(async move {
            let _open = crate::metrics::OpenConnection::new();
            connection::serve(d, stream, s, b).await;
            drop((permit, uid_slot));
        });
    }
    drop(listener);
    tracker.close();
    let drain = Duration::from_secs(limits.drain_seconds);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("requests still running after {}s; exiting anyway", limits.drain_seconds);
    }
}
