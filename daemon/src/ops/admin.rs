//! `whoami` and `admin_reload`.

use std::sync::Arc;

use keyhaven::wire::{self, AdminReloadResponse, GrantInfo, GroupInfo, WhoamiResponse};

use super::{reply, route, Cx, Daemon, Op, Reply, Route};
use crate::config::Config;
use crate::error::Error;
use crate::identity::Caller;
use crate::policy::{Access, Permission, Target};

/// The caller as the daemon sees it, and the rules that name it.
pub fn whoami(d: &Daemon, caller: &Caller, _req: wire::Whoami) -> Result<Reply, Error> {
    let grants = d
        .policy()
        .grants(caller)
        .into_iter()
        .map(|g| GrantInfo {
            rule: g.rule,
            operations: g.operations.into_iter().map(str::to_owned).collect(),
            keys: g.keys,
        })
        .collect();
    let resp = WhoamiResponse {
        uid: caller.uid,
        gid: caller.gid,
        user: caller.user.clone(),
        pid: caller.pid,
        groups: caller.groups.iter().map(|g| GroupInfo { gid: g.gid, name: g.name.clone() }).collect(),
        exe: caller.exe.as_ref().map(|p| p.display().to_string()),
        cgroup: caller.cgroup.clone(),
        grants,
    };
    reply(&resp, 0)
}

/// `admin_reload`.
pub async fn reload(d: &Arc<Daemon>) -> Result<Reply, Error> {
    let d2 = d.clone();
    let rules = tokio::task::spawn_blocking(move || {
        let rules = reload_policy(&d2);
        reload_pin(&d2);
        rules
    })
    .await
    .map_err(|e| Error::Internal(format!("reload task: {e}")))??;
    reply(&AdminReloadResponse { rules }, 0)
}

/// Reads the PIN again and lifts a refused login, so that the HSM workers
/// try it once more (SIGHUP and `admin_reload`). A PIN that cannot be read
/// leaves the one in force.
pub fn reload_pin(d: &Daemon) {
    match d.config.read_pin() {
        Ok(pin) => {
            if d.hsm.set_pin(pin) {
                tracing::info!("PIN re-read: the HSM workers will try to log in once more");
            }
        }
        Err(e) => tracing::warn!("PIN not reloaded: {e}"),
    }
}

/// Reads the config file again and puts its policy in force; returns the
/// number of rules. A file that does not load is refused, with the line
/// and reason, and the policy in force stays. Only `[policy]` is taken from
/// the file; other changes wait for a restart. Blocking (reads the file).
pub fn reload_policy(d: &Daemon) -> Result<usize, Error> {
    let path = d
        .config
        .source
        .as_ref()
        .ok_or_else(|| Error::InvalidConfig("the daemon was not started from a config file".into()))?;
    let fresh = Config::load(path).map_err(|e| {
        tracing::warn!("policy reload refused, the policy in force stays: {e}");
        Error::InvalidConfig(format!("{e}; the policy in force is unchanged"))
    })?;
    for name in fresh.access.unknown_names() {
        tracing::warn!("the policy names `{name}`, which the user database does not know");
    }
    let rules = fresh.access.len();
    d.set_policy(fresh.access);
    // Group changes made for the new policy count from the next connection.
    d.identities.clear();
    tracing::info!(rules, "policy reloaded");
    Ok(rules)
}

/// `whoami` (open) and `admin_reload` (`admin`).
pub(super) const OPS: &[Route] = &[route::<wire::Whoami>(), route::<wire::AdminReload>()];

impl Op for wire::Whoami {
    const ACCESS: Access = Access::Open;
    async fn handle(self, cx: Cx<'_>) -> Result<Reply, Error> {
        whoami(cx.d, cx.caller, self)
    }
}

impl Op for wire::AdminReload {
    const ACCESS: Access = Access::Needs(Permission::Admin);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        // The daemon's own user may reload, as it may send SIGHUP: the
        // unit's `ExecReload=keyhaven admin reload` runs as that user
        // and waits for the answer (docs/POLICY.md §1).
        if cx.caller.uid == nix::unistd::geteuid().as_raw() {
            cx.s.checked = true;
        } else {
            cx.allow(Target::All)?;
        }
        let before = cx.d.policy().len();
        cx.s.change.before = Some(serde_json::json!({ "policy_rules": before }));
        let r = reload(cx.d).await?;
        cx.s.change.after = Some(serde_json::json!({ "policy_rules": cx.d.policy().len() }));
        Ok(r)
    }
}
