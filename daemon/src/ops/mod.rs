//! The operations, one module per family. [`dispatch`] parses an operation's
//! params (refusing unknown fields) and runs it for a caller. Each returns
//! its response already serialised, in a zeroizing buffer, because some
//! responses carry plaintext.

mod admin;
mod audit;
mod datakey;
mod encrypt;
mod health;
mod keys;
mod lifecycle;
pub mod master;
mod revoke;

use std::sync::{Arc, RwLock};

use keyhaven::envelope::{Ciphertext, Envelope};
use keyhaven::lifecycle::{
    AdminRetireMaster, AdminRotateMaster, KeyCancelDeletion, KeyRotate, KeyScheduleDeletion, KeySet, KeyShow,
    KeyTrim, Rewrap,
};
use keyhaven::revocation::{Destroy, Revoke, RevokeLift, RevokeList, Scope};
use keyhaven::wire::{self, Operation};
use keyhaven::KeyPath;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::audit::{Audit, Subject};
use crate::config::Config;
use crate::error::Error;
use crate::hsm::Hsm;
use crate::identity::Caller;
use crate::policy::{self, Access, Policy, Target};
use crate::revocation;
use crate::store::{Store, StoreError};
use crate::usage::UsageBook;
use crate::wraps::WrapBudget;

pub use admin::{reload_pin, reload_policy};
pub use lifecycle::{delete_if_due, notify_versions, rotate_key, unload};

/// What every request may use.
pub struct Daemon {
    /// The HSM worker pool.
    pub hsm: Arc<Hsm>,
    /// The store.
    pub store: Store,
    /// The configuration the daemon started with (its policy may have been
    /// reloaded since: see [`Daemon::policy`]).
    pub config: Config,
    /// Data-key wraps counted per KEK version.
    pub wraps: WrapBudget,
    /// The policy in force.
    policy: RwLock<Arc<Policy>>,
    /// The audit log.
    pub audit: Audit,
    /// Revocations in force.
    pub revocations: revocation::Index,
    /// Usage counts not yet in the store.
    pub usage: UsageBook,
    /// One master-key rotation step at a time.
    pub master_lock: tokio::sync::Mutex<()>,
    /// Each revocation's scope, sent the moment it is durable, to every
    /// subscribed connection (PROTOCOL.md §6; `crate::connection`).
    pub revocation_events: tokio::sync::broadcast::Sender<Scope>,
    /// Token probes shared by concurrent `health` calls.
    health_probe: health::ProbeGate,
    /// Recent user-database lookups of connecting callers.
    pub identities: crate::identity::Identities,
}

impl Daemon {
    /// Puts the parts together, opens the audit log and loads the
    /// revocations.
    pub fn new(hsm: Arc<Hsm>, store: Store, config: Config) -> Result<Daemon, StoreError> {
        let wraps = WrapBudget::new(store.clone(), config.limits.wraps_per_key_version);
        let audit = Audit::open(store.clone(), hsm.clone(), &config.audit)?;
        let policy = RwLock::new(Arc::new(config.access.clone()));
        let revocations = revocation::Index::new(store.revocations()?);
        let (revocation_events, _) = tokio::sync::broadcast::channel(REVOCATION_EVENTS_BUFFER);
        Ok(Daemon {
            hsm,
            store,
            config,
            wraps,
            policy,
            audit,
            revocations,
            usage: UsageBook::default(),
            master_lock: Default::default(),
            revocation_events,
            health_probe: Default::default(),
            identities: Default::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_policy(&self, p: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }
}

/// Runs a store change off the async threads (it waits for a flush).
pub(crate) async fn blocking<T: Send + 'static>(
    d: &Arc<Daemon>,
    f: impl FnOnce(&Store) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let store = d.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Error::Internal(format!("store task: {e}")))?
}

/// Revocation events a slow subscriber may fall behind by before it is
/// sent `lagged` (PROTOCOL.md §6).
pub const REVOCATION_EVENTS_BUFFER: usize = 1024;

/// A serialised `ok` body.
pub type Reply = Zeroizing<Vec<u8>>;

/// Runs operation `op` with raw JSON `params` for `caller`, and records it
/// in the audit log before returning: when the record cannot be made
/// durable, the result is withheld and the call fails.
pub async fn dispatch(d: &Arc<Daemon>, caller: &Caller, op: &str, params: &str) -> Result<Reply, Error> {
    let mut subject = Subject::default();
    let mut result = route(d, caller, op, params, &mut subject).await;
    if result.is_ok() && !subject.checked && policy::permission_for(op) != Some(Access::Open) {
        // A route that forgot its policy check: fail closed, loudly.
        tracing::error!(op = %printable(op), "operation ran without a policy check; result withheld");
        result = Err(Error::Internal(format!("`{}` has no policy check", printable(op))));
    }
    if audited(op) {
        d.audit.record(caller, op, subject, &result).await?;
    }
    result
}

/// Whether requests of `op` are recorded in the audit log: all but `hello`
/// and `health` (docs/AUDIT.md §1), which every caller may send, name no
/// key, change nothing and return no secret; a monitor or a short-lived
/// client sends them all the time, and their records would only bury the
/// ones that matter and slow everyone down.
pub fn audited(op: &str) -> bool {
    op != wire::Hello::OP && op != wire::Health::OP
}

/// Refuses unless the policy grants `caller` what `op` needs on `target`.
/// Runs before any store or HSM work, so that a refusal says nothing about
/// whether the key exists.
fn allow(d: &Daemon, caller: &Caller, op: &str, target: Target, s: &mut Subject) -> Result<(), Error> {
    s.checked = true;
    let perm = match policy::permission_for(op) {
        Some(Access::Open) => return Ok(()),
        Some(Access::Needs(p)) => p,
        None => return Err(Error::UnknownOperation(printable(op))),
    };
    allow_perm(d, caller, op, perm, target)
}

/// What a revocation scope acts on, for the policy. A data key's tenant is
/// not known from its id, so revoking one needs `revoke` on every tenant.
pub(crate) fn scope_target(scope: &Scope) -> Target<'_> {
    match scope {
        Scope::Key { tenant, key, .. } => Target::Key { tenant, key },
        Scope::Tenant { tenant } => Target::Tenant(tenant),
        Scope::Datakey { .. } | Scope::All => Target::All,
    }
}

/// Notes a revocation scope in the audit record.
fn scope_subject(scope: &Scope, s: &mut Subject) {
    match scope {
        Scope::Key { tenant, key, version } => {
            s.tenant = Some(tenant.clone());
            s.key = Some(key.clone());
            s.version = *version;
        }
        Scope::Tenant { tenant } => s.tenant = Some(tenant.clone()),
        Scope::Datakey { envelope_id } => s.envelope_id = Some(printable(envelope_id)),
        Scope::All => {}
    }
}

/// Refuses unless the policy grants `caller` the permission `perm` on
/// `target` (beyond the one `op` itself needs).
fn allow_perm(
    d: &Daemon,
    caller: &Caller,
    op: &str,
    perm: policy::Permission,
    target: Target,
) -> Result<(), Error> {
    if d.policy().allows(caller, perm, &target) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "`{op}` on {target} needs `{perm}`, which the policy does not grant to {caller}"
        )))
    }
}

/// The revocation event for `scope` as `caller` may see it (PROTOCOL.md
/// §6): the scope itself when it names nothing (a data key's random id, the
/// whole system) or when the policy grants the caller a key-use permission
/// (`encrypt`, `decrypt`, `datakey`) on it; otherwise no scope, which the
/// client reads as "everything", so that names the caller may not learn
/// stay hidden and no cached key is missed.
pub fn revocation_event(d: &Daemon, caller: &Caller, scope: &Scope) -> wire::EventFrame {
    use policy::Permission::{Datakey, Decrypt, Encrypt};
    let policy = d.policy();
    let shown = match scope {
        Scope::Datakey { .. } | Scope::All => true,
        _ => {
            let target = scope_target(scope);
            [Encrypt, Decrypt, Datakey].into_iter().any(|p| policy.allows(caller, p, &target))
        }
    };
    wire::EventFrame { event: "revoked".into(), scope: shown.then(|| scope.clone()) }
}

fn key_target(path: &KeyPath) -> Target<'_> {
    Target::Key { tenant: path.tenant(), key: path.key() }
}

fn tenant_target<'a>(tenant: Option<&'a str>, s: &mut Subject) -> Result<Target<'a>, Error> {
    match tenant {
        Some(t) => {
            keyhaven::names::validate_name("tenant", t)?;
            s.tenant = Some(t.to_owned());
            Ok(Target::Tenant(t))
        }
        None => Ok(Target::All),
    }
}

/// A lifecycle operation on one named key: parse, note, check, run.
async fn key_admin<R, F, Fut>(
    d: &Arc<Daemon>,
    caller: &Caller,
    op: &str,
    params: &str,
    s: &mut Subject,
    run: F,
) -> Result<Reply, Error>
where
    R: DeserializeOwned + lifecycle::NamesKey,
    F: FnOnce(Arc<Daemon>, R) -> Fut,
    Fut: std::future::Future<Output = Result<Reply, Error>>,
{
    let req: R = parse(op, params)?;
    let path = KeyPath::new(req.tenant(), req.key())?;
    s.key(&path);
    allow(d, caller, op, key_target(&path), s)?;
    run(d.clone(), req).await
}

/// Parses params, notes the request's subject, checks the policy, runs.
async fn route(
    d: &Arc<Daemon>,
    caller: &Caller,
    op: &str,
    params: &str,
    s: &mut Subject,
) -> Result<Reply, Error> {
    match op {
        wire::Hello::OP => health::hello(parse(op, params)?),
        wire::Health::OP => health::health(d, parse::<wire::Health>(op, params)?).await,
        wire::Whoami::OP => admin::whoami(d, caller, parse(op, params)?),
        // The subscription itself is made by the connection once this
        // answers (`crate::connection`); events are filtered per caller.
        wire::SubscribeRevocations::OP => {
            let _: wire::SubscribeRevocations = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            reply(&wire::SubscribeResponse { subscribed: true }, 0)
        }
        wire::KeyCreate::OP => {
            let req: wire::KeyCreate = parse(op, params)?;
            let path = KeyPath::new(&req.tenant, &req.key)?;
            s.key(&path);
            allow(d, caller, op, key_target(&path), s)?;
            let r = keys::create(d, req).await?;
            s.version = Some(1);
            Ok(r)
        }
        wire::KeyList::OP => {
            let req: wire::KeyList = parse(op, params)?;
            let target = tenant_target(req.tenant.as_deref(), s)?;
            allow(d, caller, op, target, s)?;
            keys::list(d, req).await
        }
        wire::Encrypt::OP => {
            let req: wire::Encrypt = parse(op, params)?;
            let path = KeyPath::new(&req.tenant, &req.key)?;
            s.key(&path);
            s.context(&req.context);
            allow(d, caller, op, key_target(&path), s)?;
            encrypt::encrypt(d, path, req, s).await
        }
        wire::Decrypt::OP => {
            let req: wire::Decrypt = parse(op, params)?;
            s.context(&req.context);
            let ct: Ciphertext = req.ciphertext.parse()?;
            s.envelope(ct.envelope());
            allow(d, caller, op, key_target(ct.envelope().path()), s)?;
            d.audit.watch_decrypt(caller, ct.envelope().path().tenant()).await?;
            encrypt::decrypt(d, ct, req.context).await
        }
        wire::Datakey::OP => {
            let req: wire::Datakey = parse(op, params)?;
            let path = KeyPath::new(&req.tenant, &req.key)?;
            s.key(&path);
            s.context(&req.context);
            allow(d, caller, op, key_target(&path), s)?;
            datakey::generate(d, path, req, s).await
        }
        wire::DatakeyDecrypt::OP => {
            let req: wire::DatakeyDecrypt = parse(op, params)?;
            s.context(&req.context);
            let env: Envelope = req.envelope.parse()?;
            s.envelope(&env);
            allow(d, caller, op, key_target(env.path()), s)?;
            d.audit.watch_decrypt(caller, env.path().tenant()).await?;
            datakey::decrypt(d, env, req.context).await
        }
        wire::AuditRead::OP => {
            let req: wire::AuditRead = parse(op, params)?;
            let target = tenant_target(req.tenant.as_deref(), s)?;
            allow(d, caller, op, target, s)?;
            audit::read(d, req).await
        }
        wire::AuditVerify::OP => {
            let _: wire::AuditVerify = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            audit::verify(d).await
        }
        wire::AuditExport::OP => {
            let req: wire::AuditExport = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            audit::export(d, req).await
        }
        wire::AuditPublicKey::OP => {
            let _: wire::AuditPublicKey = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            audit::public_key(d).await
        }
        Revoke::OP => {
            let req: Revoke = parse(op, params)?;
            scope_subject(&req.scope, s);
            allow(d, caller, op, scope_target(&req.scope), s)?;
            revoke::revoke(d, caller, req).await
        }
        RevokeLift::OP => {
            let req: RevokeLift = parse(op, params)?;
            scope_subject(&req.scope, s);
            allow(d, caller, op, scope_target(&req.scope), s)?;
            if req.scope == Scope::All {
                // Lifting everything is break-glass.
                allow_perm(d, caller, op, policy::Permission::BreakGlass, Target::All)?;
            }
            revoke::lift(d, caller, req).await
        }
        RevokeList::OP => {
            let req: RevokeList = parse(op, params)?;
            let target = tenant_target(req.tenant.as_deref(), s)?;
            allow(d, caller, op, target, s)?;
            revoke::list(d, req)
        }
        Destroy::OP => {
            let req: Destroy = parse(op, params)?;
            scope_subject(&req.scope, s);
            allow(d, caller, op, scope_target(&req.scope), s)?;
            revoke::destroy(d, caller, req).await
        }
        KeyRotate::OP => key_admin(d, caller, op, params, s, |d, r: KeyRotate| lifecycle::rotate(d, r)).await,
        KeyShow::OP => key_admin(d, caller, op, params, s, |d, r: KeyShow| lifecycle::show(d, r)).await,
        KeySet::OP => key_admin(d, caller, op, params, s, |d, r: KeySet| lifecycle::set(d, r)).await,
        KeyTrim::OP => key_admin(d, caller, op, params, s, |d, r: KeyTrim| lifecycle::trim(d, r)).await,
        KeyScheduleDeletion::OP => {
            key_admin(d, caller, op, params, s, |d, r: KeyScheduleDeletion| {
                lifecycle::schedule_deletion(d, r)
            })
            .await
        }
        KeyCancelDeletion::OP => {
            key_admin(d, caller, op, params, s, |d, r: KeyCancelDeletion| lifecycle::cancel_deletion(d, r))
                .await
        }
        Rewrap::OP => {
            let req: Rewrap = parse(op, params)?;
            s.context(&req.context);
            let env: Envelope = if req.text.starts_with(keyhaven::envelope::CIPHERTEXT_PREFIX) {
                req.text.parse::<Ciphertext>()?.envelope().clone()
            } else {
                req.text.parse()?
            };
            s.envelope(&env);
            allow(d, caller, op, key_target(env.path()), s)?;
            // Rewrap opens a data key: it counts as a decryption.
            d.audit.watch_decrypt(caller, env.path().tenant()).await?;
            lifecycle::rewrap(d, req).await
        }
        AdminRotateMaster::OP => {
            let req: AdminRotateMaster = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            master::rotate(d, req).await
        }
        AdminRetireMaster::OP => {
            let req: AdminRetireMaster = parse(op, params)?;
            allow(d, caller, op, Target::All, s)?;
            master::retire(d, req).await
        }
        wire::AdminReload::OP => {
            let _: wire::AdminReload = parse(op, params)?;
            // The daemon's own user may reload, as it may send SIGHUP: the
            // unit's `ExecReload=keyhaven admin reload` runs as that user
            // and waits for the answer (docs/POLICY.md §1).
            if caller.uid == nix::unistd::geteuid().as_raw() {
                s.checked = true;
            } else {
                allow(d, caller, op, Target::All, s)?;
            }
            admin::reload(d).await
        }
        other => Err(Error::UnknownOperation(printable(other))),
    }
}

/// Parses `params` for `op`; the message names the field at fault, with any
/// name from the request shortened and escaped and no string value quoted.
fn parse<T: DeserializeOwned>(op: &str, params: &str) -> Result<T, Error> {
    // The common case without the path tracking; it is only needed to name
    // the field of an error, so a refused params is parsed again for that.
    if let Ok(value) = serde_json::from_str(params) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_str(params);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Error::BadRequest(format!("params of `{op}`: {}", crate::connection::describe(&e))))?;
    de.end().map_err(|e| Error::BadRequest(format!("params of `{op}`: {e}")))?;
    Ok(value)
}

/// serde quotes a mistyped string value in its message (`invalid type:
/// string "…"`); that value might be a secret sent in the wrong field, so
/// it is cut out.
pub(crate) fn scrub(msg: &str) -> String {
    match (msg.find("string \""), msg.rfind("\", expected")) {
        (Some(a), Some(b)) if b > a + 8 => format!("{}string \"…{}", &msg[..a], &msg[b..]),
        _ => msg.to_owned(),
    }
}

/// Shortens hostile input before it goes into a message.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Serialises a response into a zeroizing buffer sized up front (`hint`),
/// so that growing it does not leave copies of a secret behind.
fn reply<T: Serialize>(value: &T, hint: usize) -> Result<Reply, Error> {
    let mut out = Zeroizing::new(Vec::with_capacity(hint + 256));
    serde_json::to_writer(&mut *out, value)
        .map_err(|e| Error::Internal(format!("serialising a response: {e}")))?;
    Ok(out)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_cuts_quoted_values() {
        let e = serde_json::from_str::<wire::Datakey>(
            r#"{"tenant":"a","key":"b","include_plaintext":"hunter2"}"#,
        )
        .unwrap_err();
        let s = scrub(&e.to_string());
        assert!(!s.contains("hunter2") && s.contains("expected"), "{s}");
    }
}
