//! Who is calling: taken from the kernel (SO_PEERCRED) when the connection
//! is accepted, never from anything the client sends.

use std::fmt;

use tokio::net::UnixStream;

/// The peer process of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id, where the kernel gives one.
    pub pid: Option<i32>,
}

impl Caller {
    /// Reads the peer credentials of an accepted connection.
    pub fn of(stream: &UnixStream) -> std::io::Result<Caller> {
        let cred = stream.peer_cred()?;
        Ok(Caller { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() })
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        Ok(())
    }
}
