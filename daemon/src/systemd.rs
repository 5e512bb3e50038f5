//! The two things the daemon says to or takes from systemd, without libsystemd:
//! the listening socket of `keyhavend.socket` (socket activation:
//! `LISTEN_FDS`/`LISTEN_PID`, sd_listen_fds(3)) and state notifications
//! for `Type=notify` (`READY=1`, `RELOADING=1`, `STOPPING=1` as datagrams
//! to `$NOTIFY_SOCKET`, sd_notify(3)). Both do nothing outside systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The listening socket systemd passed, if it passed one to this process.
/// Reads and clears `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`, so
/// must run before any thread is started.
pub fn take_listener() -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let for_us =
        std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count: usize = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if !for_us || count == 0 {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        return Ok(None);
    }
    if count > 1 {
        return Err(std::io::Error::other(format!(
            "systemd passed {count} sockets; keyhavend.socket must have exactly one ListenStream="
        )));
    }
    std::env::remove_var("LISTEN_FDNAMES");
    let mut fds = listenfd::ListenFd::from_env();
    let listener = fds.take_unix_listener(0).map_err(|e| {
        std::io::Error::other(format!("the socket systemd passed is not a listening Unix stream socket: {e}"))
    })?;
    Ok(listener)
}

/// Sends `state` (e.g. `READY=1\nSTATUS=listening`) to systemd when
/// `$NOTIFY_SOCKET` is set; failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("cannot notify systemd ({}): {e}", state.lines().next().unwrap_or_default());
    }
}

/// `RELOADING=1` with the monotonic time systemd asks for since v253.
pub fn notify_reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
