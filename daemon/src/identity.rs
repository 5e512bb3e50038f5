//! Who is calling: taken from the kernel (SO_PEERCRED) when the connection
//! is accepted, never from anything the client sends. The uid's name and
//! supplementary groups come from the system's user database (NSS:
//! `/etc/passwd`, `/etc/group`, …) at that moment; the executable path and
//! the control group are read from `/proc/PID/exe` and `/proc/PID/cgroup`
//! where the daemon may, for `whoami` and the audit only.
//!
//! SO_PEERCRED gives the credentials of the process that called
//! `connect()`, as they were then: whoever holds the connected socket
//! later (a process it was passed to with SCM_RIGHTS, a child across
//! fork/exec, the same process after dropping privileges) is served as
//! that identity (docs/POLICY.md §1.1).

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};
use serde::Serialize;

/// The peer process of a connection, as the policy and the audit see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id, where the kernel gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The uid's user name, when the user database has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every group of the caller: the peer's gid, then the supplementary
    /// groups the user database gives the uid, without repeats.
    pub groups: Vec<GroupId>,
    /// The peer's executable (best effort; not used for decisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    /// The peer's control group, read at connect time (best effort, at
    /// most [`MAX_CGROUP_LEN`] bytes; not used for decisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// Longest control-group path kept; a longer one is cut and ends in `…`.
pub const MAX_CGROUP_LEN: usize = 512;

/// A group id and, when the user database knows it, its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupId {
    /// Group id.
    pub gid: u32,
    /// Group name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What the user database says of a uid and gid: the user name and the
/// groups, looked up once per [`Identities::TTL`] and shared by every
/// connection of that uid and gid in that time.
#[derive(Debug)]
struct Looked {
    at: Instant,
    user: Option<String>,
    groups: Vec<GroupId>,
}

/// Recent user-database answers, by uid and gid. Short-lived callers (a CLI,
/// a CGI script) open a connection per request: without this, each
/// connection cost several file reads (`/etc/passwd`, `/etc/group`) on a
/// blocking thread. A group change reaches new connections within
/// [`Identities::TTL`], or at once after a policy reload (SIGHUP or `admin
/// reload`), which empties this.
#[derive(Default)]
pub struct Identities {
    seen: Mutex<HashMap<(u32, u32), Arc<Looked>>>,
}

impl Identities {
    /// How long a lookup is used for.
    pub const TTL: Duration = Duration::from_secs(10);

    /// Entries kept at most; past it, the cache is emptied.
    const MAX: usize = 4096;

    /// The identity of a peer from its SO_PEERCRED credentials, from the
    /// cache when it holds a recent lookup; else `None` (use
    /// [`Identities::resolve`] off the async threads).
    pub fn cached(&self, uid: u32, gid: u32, pid: Option<i32>) -> Option<Caller> {
        let looked = self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(&(uid, gid)).cloned()?;
        if looked.at.elapsed() >= Self::TTL {
            return None;
        }
        Some(Caller {
            uid,
            gid,
            pid,
            user: looked.user.clone(),
            groups: looked.groups.clone(),
            exe: exe_of(pid),
            cgroup: cgroup_of(pid),
        })
    }

    /// Looks the peer up in the user database and keeps the answer. Blocks
    /// (see [`Caller::resolve`]).
    pub fn resolve(&self, uid: u32, gid: u32, pid: Option<i32>) -> Caller {
        let caller = Caller::resolve(uid, gid, pid);
        let looked =
            Arc::new(Looked { at: Instant::now(), user: caller.user.clone(), groups: caller.groups.clone() });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::MAX {
            seen.clear();
        }
        seen.insert((uid, gid), looked);
        caller
    }

    /// Forgets every lookup.
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The executable of process `pid`, best effort (procfs: no disk access).
fn exe_of(pid: Option<i32>) -> Option<PathBuf> {
    pid.and_then(|p| std::fs::read_link(format!("/proc/{p}/exe")).ok())
}

/// The control group of process `pid`, best effort (procfs: no disk
/// access; the first 4 KiB of `/proc/PID/cgroup`).
fn cgroup_of(pid: Option<i32>) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(format!("/proc/{}/cgroup", pid?)).ok()?;
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).ok()?;
    cgroup_path(&text)
}

/// The path of the unified (v2) hierarchy (`0::/…`) in the text of a
/// `/proc/PID/cgroup`, else that of systemd's v1 hierarchy
/// (`N:name=systemd:/…`); at most [`MAX_CGROUP_LEN`] bytes.
fn cgroup_path(text: &str) -> Option<String> {
    let path_of = |line: &str| line.splitn(3, ':').nth(2).map(str::to_owned);
    let path =
        text.lines().find(|l| l.starts_with("0::")).and_then(path_of).or_else(|| {
            text.lines().find(|l| l.split(':').nth(1) == Some("name=systemd")).and_then(path_of)
        })?;
    if path.is_empty() {
        return None;
    }
    if path.len() <= MAX_CGROUP_LEN {
        return Some(path);
    }
    let mut end = MAX_CGROUP_LEN - '…'.len_utf8();
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}…", &path[..end]))
}

impl Caller {
    /// Builds the identity of a peer from its SO_PEERCRED credentials
    /// (`uid`, `gid`, `pid`) and the user database. The lookups block
    /// (they may read files or ask a directory service): call this off the
    /// async threads.
    pub fn resolve(uid: u32, gid: u32, pid: Option<i32>) -> Caller {
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let mut gids = vec![gid];
        if let Some(u) = &user {
            if let Ok(name) = CString::new(u.name.as_bytes()) {
                if let Ok(list) = nix::unistd::getgrouplist(&name, Gid::from_raw(gid)) {
                    gids.extend(list.into_iter().map(Gid::as_raw));
                }
            }
        }
        let mut groups: Vec<GroupId> = Vec::with_capacity(gids.len());
        for g in gids {
            if groups.iter().all(|x| x.gid != g) {
                let name = Group::from_gid(Gid::from_raw(g)).ok().flatten().map(|g| g.name);
                groups.push(GroupId { gid: g, name });
            }
        }
        Caller { uid, gid, pid, user: user.map(|u| u.name), groups, exe: exe_of(pid), cgroup: cgroup_of(pid) }
    }

    /// Whether the caller is in group `gid` (primary or supplementary).
    pub fn in_gid(&self, gid: u32) -> bool {
        self.groups.iter().any(|g| g.gid == gid)
    }

    /// Whether the caller is in the group named `name`.
    pub fn in_group(&self, name: &str) -> bool {
        self.groups.iter().any(|g| g.name.as_deref() == Some(name))
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={}", self.uid)?;
        if let Some(u) = &self.user {
            write!(f, "({u})")?;
        }
        write!(f, " gid={}", self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_with_its_groups() {
        let c = Caller::resolve(0, 0, None);
        assert_eq!(c.user.as_deref(), Some("root"));
        assert!(c.in_gid(0));
        assert!(c.in_group("root"));
        assert_eq!(c.groups.iter().filter(|g| g.gid == 0).count(), 1, "no repeats");
    }

    #[test]
    fn lookups_are_reused_until_cleared() {
        let ids = Identities::default();
        assert_eq!(ids.cached(0, 0, None), None);
        let first = ids.resolve(0, 0, None);
        assert_eq!(ids.cached(0, 0, None), Some(first));
        assert_eq!(ids.cached(0, 1, None), None, "by uid and gid");
        ids.clear();
        assert_eq!(ids.cached(0, 0, None), None);
    }

    #[test]
    fn the_cgroup_is_the_unified_path_or_systemds_and_bounded() {
        assert_eq!(
            cgroup_path("0::/system.slice/billing.service\n").as_deref(),
            Some("/system.slice/billing.service")
        );
        let v1 = "12:pids:/user.slice\n1:name=systemd:/system.slice/cron.service\n";
        assert_eq!(cgroup_path(v1).as_deref(), Some("/system.slice/cron.service"));
        assert_eq!(cgroup_path("4:memory:/x\n"), None);
        let long = format!("0::/{}\n", "é".repeat(400));
        let cut = cgroup_path(&long).unwrap();
        assert!(cut.len() <= MAX_CGROUP_LEN && cut.ends_with('…'), "{}", cut.len());
        let me = Caller::resolve(0, 0, Some(std::process::id() as i32));
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(me.cgroup, cgroup_path(&own));
    }

    #[test]
    fn an_unknown_uid_keeps_only_its_gid() {
        let c = Caller::resolve(4_000_000_001, 4_000_000_002, None);
        assert_eq!(c.user, None);
        assert_eq!(c.groups, vec![GroupId { gid: 4_000_000_002, name: None }]);
    }
}
