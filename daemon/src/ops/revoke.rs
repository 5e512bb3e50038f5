//! Emergency revocation: `revoke`, `revoke_lift`, `revoke_list` and
//! `destroy` (docs/PROTOCOL.md §3.13–3.16, runbook in docs/OPERATIONS.md).
//!
//! Each change is written to the store durably, then to the in-memory index
//! that every key use checks, then the KEK copies it covers are destroyed in
//! every HSM worker's session; only then does the call answer. So a request
//! that starts after the answer is refused, whatever was cached. Right after
//! the index, the scope is sent to every connection subscribed to
//! revocation events (PROTOCOL.md §6), so that clients drop the data keys
//! they cache before the revoker gets its answer.

use std::sync::Arc;

use keyhaven::revocation::{
    Destroy, DestroyResponse, LiftResponse, Revocation, RevocationKind, Revoke, RevokeLift, RevokeList,
    RevokeListResponse, Scope,
};
use keyhaven::wire;
use keyhaven::KeyPath;

use super::{
    blocking, reply, route, scope_subject, scope_target, tenant_target, Cx, Daemon, Op, Reply, Route,
};
use crate::audit::Change;
use crate::clock::now_unix;
use crate::error::Error;
use crate::hsm::KekId;
use crate::identity::Caller;
use crate::policy::{Access, Permission, Target};
use crate::revocation::{describe, rfc3339};
use crate::store::Store;

/// Refuses a scope that names a key, version or tenant that does not exist:
/// a typo must not leave a suspension that protects nothing. Asks the
/// store through its async calls: a PostgreSQL round trip must not hold a
/// runtime thread.
async fn must_exist(d: &Daemon, scope: &Scope) -> Result<(), Error> {
    let store = d.store.backend();
    match scope {
        Scope::Key { tenant, key, version } => {
            let path = KeyPath::new(tenant, key)?;
            let Some(rec) = store.key(&path).await? else {
                // An alias is no scope: a suspension of its name would
                // cover nothing, since uses through it resolve to the key.
                let alias = store
                    .meta()
                    .await?
                    .is_some_and(|m| m.aliases.get(tenant).is_some_and(|t| t.contains_key(key)));
                return Err(Error::NotFound(match alias {
                    true => format!(
                        "`{path}` is an alias, not a key: revoke the key it names (`keyhaven alias list {tenant}`)"
                    ),
                    false => format!("unknown key `{path}`"),
                }));
            };
            if let Some(v) = version {
                rec.version(*v).ok_or_else(|| Error::NotFound(format!("key `{path}` has no version {v}")))?;
            }
            Ok(())
        }
        Scope::Tenant { tenant } if store.keys(Some(tenant)).await?.is_empty() => {
            Err(Error::NotFound(format!("tenant `{tenant}` has no keys")))
        }
        _ => Ok(()),
    }
}

/// The scopes that contain `scope`, itself first, `all` last.
fn enclosing(scope: &Scope) -> Vec<Scope> {
    let mut out = vec![scope.clone()];
    if let Scope::Key { tenant, key, version: Some(_) } = scope {
        out.push(Scope::Key { tenant: tenant.clone(), key: key.clone(), version: None });
    }
    if let Scope::Key { tenant, .. } = scope {
        out.push(Scope::Tenant { tenant: tenant.clone() });
    }
    if *scope != Scope::All {
        out.push(Scope::All);
    }
    out
}

/// Whether a loaded KEK lies in `scope`.
fn covers(scope: &Scope, kek: &KekId) -> bool {
    match scope {
        Scope::All => true,
        Scope::Tenant { tenant } => kek.path.tenant() == tenant,
        Scope::Key { tenant, key, version } => {
            kek.path.tenant() == tenant && kek.path.key() == key && version.is_none_or(|v| v == kek.version)
        }
        Scope::Datakey { .. } => false,
    }
}

/// Destroys, in every worker's session, the loaded KEK copies in `scope`.
async fn evict(d: &Daemon, scope: &Scope) {
    if matches!(scope, Scope::Datakey { .. }) {
        return; // a data key has no KEK of its own; the index refuses it
    }
    let s = scope.clone();
    let evicted = std::sync::atomic::AtomicUsize::new(0);
    let evicted = Arc::new(evicted);
    let count = evicted.clone();
    let r = d
        .hsm
        .on_every_worker(move |w| {
            count.fetch_add(w.evict(&|id| covers(&s, id)), std::sync::atomic::Ordering::Relaxed);
        })
        .await;
    match r {
        Ok(()) => {
            tracing::info!(scope = %scope, loaded_keks = evicted.load(std::sync::atomic::Ordering::Relaxed), "revoked KEKs unloaded from the HSM")
        }
        // The index refuses every use already; a stopped pool holds no keys.
        Err(e) => tracing::warn!(scope = %scope, error = %e, "could not unload revoked KEKs"),
    }
}

/// `revoke`: suspends a scope. Suspending it again replaces the reason and
/// expiry and keeps the original time.
pub async fn revoke(
    d: &Arc<Daemon>,
    caller: &Caller,
    req: Revoke,
    change: &mut Change,
) -> Result<Reply, Error> {
    req.scope.validate().map_err(|e| Error::BadRequest(e.to_string()))?;
    let now = now_unix();
    if let Some(t) = req.expires_at.filter(|t| *t <= now) {
        return Err(Error::BadRequest(format!("expiry {} is not in the future", rfc3339(t))));
    }
    must_exist(d, &req.scope).await?;
    let old = d.revocations.get(&req.scope);
    if let Some(old) = old.as_ref().filter(|o| o.kind == RevocationKind::Destroyed) {
        return Err(Error::AlreadyExists(describe(old)));
    }
    change.before = old.as_ref().map(revocation_json);
    let since = old.filter(|o| o.expires_at.is_none_or(|t| now < t)).map_or(now, |o| o.since);
    let r = Revocation {
        scope: req.scope,
        kind: RevocationKind::Suspended,
        reason: req.reason,
        since,
        expires_at: req.expires_at,
        by_uid: caller.uid,
        envelope_seen: None,
    };
    let stored = r.clone();
    blocking(d, move |s| Ok(s.put_revocation(&stored)?)).await?;
    d.revocations.put(r.clone());
    // Durable and in force: tell subscribed clients to drop cached keys.
    let _ = d.revocation_events.send(r.scope.clone());
    evict(d, &r.scope).await;
    change.after = Some(revocation_json(&r));
    change.detail = Some(describe(&r));
    tracing::warn!(scope = %r.scope, reason = %r.reason, uid = caller.uid, pid = ?caller.pid, "suspended");
    let mut answer = r;
    if let Scope::Datakey { envelope_id } = &answer.scope {
        // In force already: now look for a typo, within a bounded time.
        let chains = d.store.backend().audit_chains().await.unwrap_or_default();
        let id = envelope_id.clone();
        answer.envelope_seen =
            blocking(d, move |s| Ok(crate::audit::envelope_seen(s, &chains, &id, ENVELOPE_SEARCH)))
                .await
                .unwrap_or(None);
    }
    reply(&answer, 0)
}

/// How long `revoke` of a data key looks through the audit log for its id.
const ENVELOPE_SEARCH: std::time::Duration = std::time::Duration::from_secs(2);

/// `revoke_lift`: ends a suspension. Lifting the whole-system suspension is
/// break-glass (the policy check in `ops::dispatch` asks for it), and it is
/// logged as a warning.
pub async fn lift(
    d: &Arc<Daemon>,
    caller: &Caller,
    req: RevokeLift,
    change: &mut Change,
) -> Result<Reply, Error> {
    req.scope.validate().map_err(|e| Error::BadRequest(e.to_string()))?;
    let Some(old) = d.revocations.get(&req.scope) else {
        return Err(Error::NotFound(format!("{} is not suspended", req.scope)));
    };
    if old.kind == RevocationKind::Destroyed {
        return Err(Error::BadRequest(format!("{}; a destruction cannot be lifted", describe(&old))));
    }
    let scope = req.scope.clone();
    blocking(d, move |s| Ok(s.remove_revocation(&scope)?)).await?;
    d.revocations.remove(&req.scope);
    change.before = Some(revocation_json(&old));
    change.detail = Some(if req.scope == Scope::All {
        format!("BREAK-GLASS: the whole-system suspension is lifted (it was: {})", describe(&old))
    } else {
        format!("lifted: {}", describe(&old))
    });
    if req.scope == Scope::All {
        tracing::warn!(reason = %req.reason, uid = caller.uid, pid = ?caller.pid, "BREAK-GLASS: whole-system suspension lifted");
    } else {
        tracing::warn!(scope = %req.scope, reason = %req.reason, uid = caller.uid, pid = ?caller.pid, "suspension lifted");
    }
    reply(&LiftResponse { lifted: old }, 0)
}

/// `revoke_list`: the revocations in force, broadest first.
pub fn list(d: &Arc<Daemon>, req: RevokeList) -> Result<Reply, Error> {
    if let Some(t) = &req.tenant {
        keyhaven::names::validate_name("tenant", t)?;
    }
    let limit = super::page_limit(req.limit)?;
    if let Some(after) = &req.after {
        after.validate().map_err(|e| Error::BadRequest(format!("`after`: {e}")))?;
    }
    let mut all = d.revocations.list(now_unix());
    if let Some(t) = &req.tenant {
        all.retain(|r| match &r.scope {
            Scope::All => true,
            Scope::Tenant { tenant } | Scope::Key { tenant, .. } => tenant == t,
            Scope::Datakey { .. } => false,
        });
    }
    all.sort_by(|a, b| a.scope.list_order().cmp(&b.scope.list_order()));
    let start = match &req.after {
        Some(after) => all.partition_point(|r| r.scope.list_order() <= after.list_order()),
        None => 0,
    };
    let (page, more) = super::page(all.drain(start..), limit);
    let next = more.then(|| page.last().map(|r| r.scope.clone())).flatten();
    reply(&RevokeListResponse { revocations: page, next }, 0)
}

/// `destroy`: erases the wrapped KEK material of a suspended key version,
/// key or tenant, for good, and unloads it from the HSM.
pub async fn destroy(
    d: &Arc<Daemon>,
    caller: &Caller,
    req: Destroy,
    change: &mut Change,
) -> Result<Reply, Error> {
    req.scope.validate().map_err(|e| Error::BadRequest(e.to_string()))?;
    let name = match &req.scope {
        Scope::Key { tenant, key, .. } => format!("{tenant}/{key}"),
        Scope::Tenant { tenant } => tenant.clone(),
        Scope::All => {
            return Err(Error::BadRequest(
                "the whole system cannot be destroyed here: the master key is the HSM's business".into(),
            ))
        }
        Scope::Datakey { .. } => {
            return Err(Error::BadRequest(
                "a single data key has no material in the store to destroy; suspend it with `revoke`".into(),
            ))
        }
    };
    if req.confirm != name {
        return Err(Error::BadRequest(format!(
            "the confirmation `{}` does not repeat the name `{name}`",
            super::printable(&req.confirm)
        )));
    }
    must_exist(d, &req.scope).await?;
    let now = now_unix();
    let suspension = enclosing(&req.scope)
        .iter()
        .filter_map(|s| d.revocations.get(s))
        .find(|r| r.kind == RevocationKind::Destroyed || r.expires_at.is_none_or(|t| now < t))
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "{} must be suspended before it is destroyed (`keyhaven revoke`)",
                req.scope
            ))
        })?;
    change.reason = Some(suspension.reason.as_str().to_owned());
    change.before = Some(revocation_json(&suspension));
    let r = Revocation {
        scope: req.scope.clone(),
        kind: RevocationKind::Destroyed,
        reason: suspension.reason,
        since: now,
        expires_at: None,
        by_uid: caller.uid,
        envelope_seen: None,
    };
    // The destruction record first: if the erasure below is cut short, the
    // scope stays refused and `destroy` can be run again to finish it.
    let (stored, scope) = (r.clone(), req.scope.clone());
    let erased = blocking(d, move |s| {
        s.put_revocation(&stored)?;
        erase(s, &scope, now)
    })
    .await?;
    d.revocations.put(r.clone());
    let _ = d.revocation_events.send(r.scope.clone());
    evict(d, &r.scope).await;
    tracing::warn!(scope = %r.scope, erased = erased.len(), uid = caller.uid, pid = ?caller.pid, "destroyed");
    let mut after = revocation_json(&r);
    after["erased"] = serde_json::json!(erased);
    change.after = Some(after);
    change.detail = Some(describe(&r));
    reply(&DestroyResponse { revocation: r, erased }, 0)
}

/// A revocation as an audit record's `before`/`after`: its fields, and
/// its scope as text (`scope_text`), which a SIEM can match as it is.
fn revocation_json(r: &Revocation) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["scope_text"] = serde_json::Value::String(r.scope.to_string());
    v
}

/// Erases the wrapped KEK of every version in `scope`; returns them as
/// `tenant/key@N`.
fn erase(s: &Store, scope: &Scope, now: u64) -> Result<Vec<String>, Error> {
    let (records, only) = match scope {
        Scope::Tenant { tenant } => (s.keys(Some(tenant))?, None),
        Scope::Key { tenant, key, version } => {
            let path = KeyPath::new(tenant, key)?;
            (s.key(&path)?.map(|r| (*r).clone()).into_iter().collect(), *version)
        }
        _ => return Ok(Vec::new()),
    };
    let mut erased = Vec::new();
    for rec in records {
        let path = rec.path()?;
        let mut done = Vec::new();
        s.update_key(&path, &mut |rec| {
            done.clear();
            for v in rec.versions.iter_mut().filter(|v| only.is_none_or(|o| o == v.version)) {
                v.wrapped_kek.clear();
                v.destroyed_at.get_or_insert(now);
                done.push(format!("{path}@{}", v.version));
            }
        })?;
        erased.extend(done);
    }
    Ok(erased)
}

/// The revocation operations (`revoke`; lifting everything needs
/// `break-glass` too), and the subscription to revocation events (open:
/// events are filtered per caller, `super::revocation_event`).
pub(super) const OPS: &[Route] = &[
    route::<Revoke>(),
    route::<RevokeLift>(),
    route::<RevokeList>(),
    route::<Destroy>(),
    route::<wire::SubscribeRevocations>(),
];

impl Op for Revoke {
    const ACCESS: Access = Access::Needs(Permission::Revoke);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        scope_subject(&self.scope, cx.s);
        cx.s.change.reason = Some(self.reason.as_str().to_owned());
        cx.allow(scope_target(&self.scope))?;
        revoke(cx.d, cx.caller, self, &mut cx.s.change).await
    }
}

impl Op for RevokeLift {
    const ACCESS: Access = Access::Needs(Permission::Revoke);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        scope_subject(&self.scope, cx.s);
        cx.s.change.reason = Some(self.reason.as_str().to_owned());
        cx.allow(scope_target(&self.scope))?;
        if self.scope == Scope::All {
            // Lifting everything is break-glass.
            cx.allow_perm(Permission::BreakGlass, Target::All)?;
        }
        lift(cx.d, cx.caller, self, &mut cx.s.change).await
    }
}

impl Op for RevokeList {
    const ACCESS: Access = Access::Needs(Permission::Revoke);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let target = tenant_target(self.tenant.as_deref(), cx.s)?;
        cx.allow(target)?;
        list(cx.d, self)
    }
}

impl Op for Destroy {
    const ACCESS: Access = Access::Needs(Permission::Revoke);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        scope_subject(&self.scope, cx.s);
        cx.allow(scope_target(&self.scope))?;
        destroy(cx.d, cx.caller, self, &mut cx.s.change).await
    }
}

// The subscription itself is made by the connection once this answers
// (`crate::connection`).
impl Op for wire::SubscribeRevocations {
    const ACCESS: Access = Access::Open;
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        reply(&wire::SubscribeResponse { subscribed: true }, 0)
    }
}
