//! The operations, one module per family. Each operation is declared once,
//! in its family's module, as an [`Op`]: its wire type (the params type,
//! whose `OP` is its name), the permission it needs, whether it is audited,
//! and its handler, which notes the audit subject, names the policy target
//! ([`Cx::allow`]) before any store or HSM work, and runs. Each family lists
//! its operations in an `OPS` table; [`dispatch`] finds the declaration by
//! name, parses the params (refusing unknown fields) and runs it for a
//! caller, and counts it in [`crate::metrics`] by its place in the table.
//! Adding an operation touches its family's module only.
//!
//! Every handler returns its response already serialised, in a zeroizing
//! buffer, because some responses carry plaintext.

mod admin;
mod alias;
mod audit;
mod datakey;
mod encrypt;
mod health;
mod import;
mod keys;
mod lifecycle;
mod mac;
pub mod master;
mod metrics;
mod revoke;
mod sign;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use keyhaven::revocation::Scope;
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
use crate::text::printable;
use crate::usage::UsageBook;
use crate::wraps::WrapBudget;

/// The operations' clock (it lives in [`crate::clock`]).
pub use crate::clock::now_unix;
pub use admin::{reload_pin, reload_policy};
pub use lifecycle::{delete_if_due, notify_versions, rotate_key, settings_json, unload};

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
    pub revocations: Arc<revocation::Index>,
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
    /// Outstanding BYOK import tokens (memory only: `ops::import`).
    imports: import::PendingImports,
}

impl Daemon {
    /// Puts the parts together, opens the audit log and loads the
    /// revocations.
    pub fn new(hsm: Arc<Hsm>, store: Store, config: Config) -> Result<Daemon, StoreError> {
        let wraps = WrapBudget::new(store.clone(), config.limits.wraps_per_key_version);
        let audit = Audit::open(store.clone(), hsm.clone(), &config.audit, &config.store.path)?;
        let policy = RwLock::new(Arc::new(config.access.clone()));
        let revocations = Arc::new(revocation::Index::new(store.revocations()?));
        if let Some(all) = revocations.all(crate::clock::now_unix()) {
            // Said at every start, so that an operator who restarts a
            // daemon that refuses everything sees why in its log.
            tracing::warn!(
                "{}: every key operation is refused until it is lifted (`keyhaven revoke lift all`) or expires",
                revocation::describe(&all)
            );
        }
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
            imports: Default::default(),
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

/// One operation, declared once in its family's module: the params type
/// (`Self`, whose [`Operation::OP`] is the operation's name on the wire),
/// what the policy must grant, whether it is audited, and the handler.
trait Op: Operation + Send + 'static {
    /// What the operation needs from the policy.
    const ACCESS: Access;
    /// Whether requests are recorded in the audit log (see [`audited`]).
    const AUDITED: bool = true;

    /// Runs a parsed request: notes what it names in `cx.s` (the audit
    /// subject), asks [`Cx::allow`] for its policy target before any store
    /// or HSM work, so that a refusal says nothing about whether the key
    /// exists, and then does the work.
    fn handle(self, cx: Cx<'_>) -> impl Future<Output = Result<Reply, Error>> + Send;
}

/// What a handler runs with.
struct Cx<'a> {
    /// The daemon.
    d: &'a Arc<Daemon>,
    /// Who asked.
    caller: &'a Caller,
    /// What the audit record will name.
    s: &'a mut Subject,
    /// The operation's name.
    op: &'static str,
    /// What the operation needs.
    access: Access,
    /// The name the request gave when it was an alias ([`Cx::key_path`]):
    /// a refusal names it, not the key it resolved to.
    via_alias: Option<KeyPath>,
}

impl Cx<'_> {
    /// Refuses unless the policy grants the caller what the operation needs
    /// on `target`.
    fn allow(&mut self, target: Target) -> Result<(), Error> {
        self.s.checked = true;
        match self.access {
            Access::Open => Ok(()),
            Access::Needs(p) => self.allow_perm(p, target),
        }
    }

    /// Refuses unless the policy grants the caller `perm` on `target`
    /// (beyond the permission the operation itself needs).
    fn allow_perm(&self, perm: policy::Permission, target: Target) -> Result<(), Error> {
        if self.d.policy().allows(self.caller, perm, &target) {
            Ok(())
        } else {
            // Through an alias, the refusal names what the caller asked
            // for, word for word as for a key of that name: it tells
            // nothing of the alias, nor of the key behind it.
            let shown =
                self.via_alias.as_ref().map_or_else(|| target.to_string(), |p| key_target(p).to_string());
            Err(Error::PermissionDenied(format!(
                "`{}` on {shown} needs `{perm}`, which the policy does not grant to {}",
                self.op, self.caller
            )))
        }
    }

    /// The key a key-use request names by `tenant` and `key`: the key of
    /// that name, or else the key that the alias of that name names
    /// (PROTOCOL.md §3.37). Resolved before the policy check, so that the
    /// policy is asked about the real key; noted in the audit subject (the
    /// real key, and the alias in `detail`).
    async fn key_path(&mut self, tenant: &str, key: &str) -> Result<KeyPath, Error> {
        let asked = KeyPath::new(tenant, key)?;
        let path = match resolve_alias(self.d, &asked).await? {
            Some(real) => {
                self.s.change.detail = Some(format!("through alias `{asked}`"));
                self.via_alias = Some(asked);
                real
            }
            None => asked,
        };
        self.s.key(&path);
        Ok(path)
    }
}

/// The key that `path` names when it is an alias rather than a key: a key
/// of that name wins (a key and an alias never share a name, but a key
/// made in a race with an alias of the same name would). On PostgreSQL,
/// answered from the node's caches (docs/CLUSTER.md §4).
pub(crate) async fn resolve_alias(d: &Daemon, path: &KeyPath) -> Result<Option<KeyPath>, Error> {
    match d.store.backend().alias_target(path).await? {
        Some(key) => Ok(Some(KeyPath::new(path.tenant(), &key)?)),
        None => Ok(None),
    }
}

/// A handler's future.
type Handling<'a> = Pin<Box<dyn Future<Output = Result<Reply, Error>> + Send + 'a>>;

/// An entry of a family's `OPS` table: an [`Op`] with its type erased.
struct Route {
    name: &'static str,
    access: Access,
    audited: bool,
    run: for<'a> fn(Cx<'a>, &'a str) -> Handling<'a>,
    /// Parses the params only, as `run` does first (for the fuzz target
    /// of [`crate::fuzzing`]).
    parse: fn(&str) -> Result<(), Error>,
}

/// The table entry of operation `T`.
const fn route<T: Op>() -> Route {
    Route {
        name: T::OP,
        access: T::ACCESS,
        audited: T::AUDITED,
        run: parse_and_handle::<T>,
        parse: parse_only::<T>,
    }
}

fn parse_only<T: Op>(params: &str) -> Result<(), Error> {
    parse::<T>(T::OP, params).map(drop)
}

fn parse_and_handle<'a, T: Op>(cx: Cx<'a>, params: &'a str) -> Handling<'a> {
    Box::pin(async move { parse::<T>(T::OP, params)?.handle(cx).await })
}

/// Every family's operations.
const FAMILIES: [&[Route]; 14] = [
    health::OPS,
    admin::OPS,
    keys::OPS,
    encrypt::OPS,
    datakey::OPS,
    lifecycle::OPS,
    master::OPS,
    revoke::OPS,
    audit::OPS,
    mac::OPS,
    sign::OPS,
    metrics::OPS,
    import::OPS,
    alias::OPS,
];

/// The declaration of operation `op`, if there is one.
fn find(op: &str) -> Option<&'static Route> {
    find_numbered(op).map(|(_, r)| r)
}

/// The declaration of operation `op` and its number (its place in the
/// table, which the metrics count by).
fn find_numbered(op: &str) -> Option<(usize, &'static Route)> {
    FAMILIES.iter().flat_map(|f| f.iter()).enumerate().find(|(_, r)| r.name == op)
}

/// Every operation's name, in the order of their numbers.
fn names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.iter()).map(|r| r.name)
}

/// The metrics in the Prometheus text format (for `[metrics] listen`).
pub async fn metrics_text(d: &Arc<Daemon>) -> String {
    metrics::render(d).await
}

/// What operation `op` needs from the policy; `None` for an unknown
/// operation.
pub fn access_for(op: &str) -> Option<Access> {
    find(op).map(|r| r.access)
}

/// Runs operation `op` with raw JSON `params` for `caller`, and records it
/// in the audit log before returning: when the record cannot be made
/// durable, the result is withheld and the call fails.
pub async fn dispatch(d: &Arc<Daemon>, caller: &Caller, op: &str, params: &str) -> Result<Reply, Error> {
    let started = crate::metrics::request_started();
    let mut subject = Subject::default();
    let (number, route) = find_numbered(op).map_or((crate::metrics::MAX_OPS, None), |(n, r)| (n, Some(r)));
    // While the audit log cannot be written (a full disk), a request that
    // needs a record is refused before it runs, and not recorded: its
    // record could not be written either (docs/AUDIT.md §4).
    if route.is_none_or(|r| r.audited) {
        // A node of a cluster without a valid lease (cut off from
        // PostgreSQL, or paused) refuses at once, unrecorded but counted,
        // rather than make each refusal wait for a record it cannot make
        // durable (docs/CLUSTER.md §5).
        match d.store.backend().serving() {
            Err(why) => {
                let e = d.audit.refuse_unserved(why);
                crate::metrics::request_done(number, started, Some(e.code()));
                return Err(e);
            }
            Ok(()) => d.audit.serving_again(),
        }
        if let Err(e) = d.audit.refuse_while_failing() {
            crate::metrics::request_done(number, started, Some(e.code()));
            return Err(e);
        }
    }
    // A sink with `on_lag = "wait"` that is too far behind holds requests
    // back, and then refuses them (docs/AUDIT.md §11).
    let admitted = match route.is_none_or(|r| r.audited) {
        true => d.audit.admit().await,
        false => Ok(()),
    };
    let mut result = match (admitted, route) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(r)) => {
            (r.run)(Cx { d, caller, s: &mut subject, op: r.name, access: r.access, via_alias: None }, params)
                .await
        }
        (Ok(()), None) => Err(Error::UnknownOperation(printable(op))),
    };
    // SoftHSM2 says only CKR_FUNCTION_FAILED or CKR_GENERAL_ERROR when its token directory is
    // full (a master-key rotation's new key): name the cause. The look at
    // the directory reads files, so off the runtime's threads, and only for
    // the return values a full directory gives.
    if let Err(Error::Hsm(crate::hsm::HsmError::Pkcs11 { rv, .. })) = &result {
        use cryptoki::error::RvError;
        if matches!(
            rv,
            RvError::FunctionFailed | RvError::GeneralError | RvError::DeviceMemory | RvError::DeviceError
        ) {
            let config = d.config.clone();
            let problem = tokio::task::spawn_blocking(move || crate::softhsm::token_room_problem(&config))
                .await
                .ok()
                .flatten();
            if let Some(problem) = problem {
                if let Err(Error::Hsm(e)) = result {
                    result =
                        Err(Error::Hsm(crate::hsm::HsmError::TokenFull { problem, source: Box::new(e) }));
                }
            }
        }
    }
    if result.is_ok() && !subject.checked && route.is_some_and(|r| r.access != Access::Open) {
        // A handler that forgot its policy check: fail closed, loudly.
        tracing::error!(op = %printable(op), "operation ran without a policy check; result withheld");
        result = Err(Error::Internal(format!("`{}` has no policy check", printable(op))));
    }
    if route.is_none_or(|r| r.audited) {
        let recorded = until_recorded(d, d.audit.record(caller, op, subject, &result)).await;
        if let Err(e) = recorded {
            crate::metrics::request_done(number, started, Some(e.code()));
            return Err(e);
        }
    }
    crate::metrics::request_done(number, started, result.as_ref().err().map(Error::code));
    result
}

/// Waits for a request's audit record to be durable. On a cluster the wait
/// ends when this node stops serving (its lease lapsed by its own clock):
/// the database the record would be durable in may be out of reach for
/// good, and the result is withheld either way (the record may still be
/// written later, as after a failed flush; docs/CLUSTER.md §5).
async fn until_recorded(
    d: &Daemon,
    record: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<(), Error> {
    if !d.store.is_cluster() {
        // No lease to lapse on the embedded store.
        return record.await;
    }
    tokio::select! {
        biased;
        r = record => r,
        () = d.store.backend().until_not_serving() => {
            let why = d.store.backend().serving().err();
            let why = why.map_or_else(|| "this node's lease ended".to_owned(), |e| e.to_string());
            Err(Error::Store(crate::store::StoreError::Backend(format!(
                "{why}; the request's audit record could not be made durable before the lease ended, so its \
                 result is withheld (docs/CLUSTER.md §5)"
            ))))
        }
    }
}

/// What [`dispatch`] does with a request before any daemon state is
/// asked: finds the operation (`unknown_operation`) and parses its params
/// into the operation's type (`bad_request`); returns what the operation
/// needs from the policy. For [`crate::fuzzing`]; `dispatch` itself goes
/// on to the audit log's state and the handler, whose first checks (names,
/// an alias through the store) come before its policy check.
pub(crate) fn parse_request_params(op: &str, params: &str) -> Result<Access, Error> {
    let route = find(op).ok_or_else(|| Error::UnknownOperation(printable(op)))?;
    (route.parse)(params)?;
    Ok(route.access)
}

/// What the daemon computes from a key record it reads (listing, details,
/// the rotation schedule): for [`crate::fuzzing`], on records a database
/// writer made.
pub(crate) fn key_record_views(rec: &crate::store::KeyRecord) -> Result<(), Error> {
    let details = lifecycle::details(rec, &revocation::Index::new(Vec::new()));
    serde_json::to_vec(&details).map_err(|e| Error::Internal(format!("serialising key details: {e}")))?;
    let _ = lifecycle::next_rotation_at(rec);
    let _ = lifecycle::settings_json(rec);
    Ok(())
}

/// Whether requests of `op` are recorded in the audit log: all but `hello`
/// and `health` (docs/AUDIT.md §1), which every caller may send, name no
/// key, change nothing and return no secret; a monitor or a short-lived
/// client sends them all the time, and their records would only bury the
/// ones that matter and slow everyone down. Unknown operations are
/// recorded.
pub fn audited(op: &str) -> bool {
    find(op).is_none_or(|r| r.audited)
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

/// The revocation event for `scope` as `caller` may see it (PROTOCOL.md
/// §6): the scope itself when it names nothing (a data key's random id, the
/// whole system) or when the policy grants the caller a key-use permission
/// (`encrypt`, `decrypt`, `datakey`, `mac`, `mac-verify`, `sign`, `verify`) on it; otherwise no scope, which the
/// client reads as "everything", so that names the caller may not learn
/// stay hidden and no cached key is missed.
pub fn revocation_event(d: &Daemon, caller: &Caller, scope: &Scope) -> wire::EventFrame {
    use policy::Permission::{Datakey, Decrypt, Encrypt, Mac, MacVerify, Sign, Verify};
    let policy = d.policy();
    let shown = match scope {
        Scope::Datakey { .. } | Scope::All => true,
        _ => {
            let target = scope_target(scope);
            [Encrypt, Decrypt, Datakey, Mac, MacVerify, Sign, Verify]
                .into_iter()
                .any(|p| policy.allows(caller, p, &target))
        }
    };
    wire::EventFrame { event: "revoked".into(), scope: shown.then(|| scope.clone()) }
}

/// Refuses with `wrong_key_type` unless the key at `path` is of type
/// `want` (what operation `op` needs).
fn require_type(
    rec: &crate::store::KeyRecord,
    path: &KeyPath,
    want: keyhaven::KeyType,
    op: &str,
) -> Result<(), Error> {
    if rec.key_type == want {
        Ok(())
    } else {
        Err(Error::WrongKeyType(format!(
            "key `{path}` is of type `{}`; `{op}` needs a key of type `{want}`",
            rec.key_type
        )))
    }
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
        .map_err(|e| Error::BadRequest(format!("params of `{op}`: {}", crate::text::describe(&e))))?;
    de.end().map_err(|e| Error::BadRequest(format!("params of `{op}`: {e}")))?;
    Ok(value)
}

/// The most bytes of entries a list page holds, whatever their number: far
/// under the 1 MiB frame limit (PROTOCOL.md §1), so that no list answer
/// can break it (a key with thousands of versions has a long entry).
const LIST_PAGE_BYTES: usize = 512 << 10;

/// Takes entries for one page: at most `limit`, and no more than
/// [`LIST_PAGE_BYTES`] of them (but always one, when there is one).
/// Returns the page and whether entries are left over.
fn page<T: Serialize>(entries: impl IntoIterator<Item = T>, limit: usize) -> (Vec<T>, bool) {
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut entries = entries.into_iter().peekable();
    while let Some(entry) = entries.peek() {
        let size = serde_json::to_vec(entry).map(|v| v.len() + 1).unwrap_or(0);
        if page.len() == limit || (!page.is_empty() && bytes + size > LIST_PAGE_BYTES) {
            break;
        }
        bytes += size;
        page.extend(entries.next());
    }
    let more = entries.peek().is_some();
    (page, more)
}

/// A list's page size: `limit` when given (1 to
/// [`wire::MAX_LIST_PAGE`]), else the most.
fn page_limit(limit: Option<u32>) -> Result<usize, Error> {
    match limit {
        None => Ok(wire::MAX_LIST_PAGE as usize),
        Some(n @ 1..=wire::MAX_LIST_PAGE) => Ok(n as usize),
        Some(n) => {
            Err(Error::BadRequest(format!("`limit` {n} is out of range: from 1 to {}", wire::MAX_LIST_PAGE)))
        }
    }
}

/// Serialises a response into a zeroizing buffer sized up front (`hint`),
/// so that growing it does not leave copies of a secret behind.
fn reply<T: Serialize>(value: &T, hint: usize) -> Result<Reply, Error> {
    let mut out = Zeroizing::new(Vec::with_capacity(hint + 256));
    serde_json::to_writer(&mut *out, value)
        .map_err(|e| Error::Internal(format!("serialising a response: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Permission;

    #[test]
    fn every_operation_is_declared_once() {
        let mut names: Vec<&str> = FAMILIES.iter().flat_map(|f| f.iter()).map(|r| r.name).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "an operation is declared twice");
    }

    #[test]
    fn every_operation_has_a_metrics_slot() {
        assert!(names().count() < crate::metrics::MAX_OPS, "raise metrics::MAX_OPS");
        assert_eq!(find_numbered("metrics").map(|(n, _)| names().nth(n)), Some(Some("metrics")));
        assert_eq!(access_for("metrics"), Some(Access::Needs(Permission::Metrics)));
    }

    #[test]
    fn operations_map_to_permissions() {
        for op in ["hello", "health", "whoami", "subscribe_revocations"] {
            assert_eq!(access_for(op), Some(Access::Open));
        }
        assert_eq!(access_for("datakey_decrypt"), Some(Access::Needs(Permission::Decrypt)));
        assert_eq!(access_for("rewrap"), Some(Access::Needs(Permission::Decrypt)));
        assert_eq!(access_for("key_list"), Some(Access::Needs(Permission::KeyAdmin)));
        assert_eq!(access_for("admin_reload"), Some(Access::Needs(Permission::Admin)));
        assert_eq!(access_for("nope"), None);
        assert!(!audited("hello") && !audited("health") && audited("whoami") && audited("nope"));
    }
}
