//! The in-memory index of revocations in force, kept in step with the store's
//! `revocations` tree. Every request that uses a key asks [`Index::check`]
//! before it reads the keyring or calls the HSM, so the check costs no store
//! read and no token call: a few hash lookups under a read lock, and none at
//! all while nothing is revoked.
//!
//! Writers (the `revoke`, `revoke_lift` and `destroy` operations) change the
//! store first, durably, then the index, then answer: a request that starts
//! after the answer sees the change.

use std::collections::HashMap;
use std::sync::RwLock;

use keyhaven::revocation::{Revocation, RevocationKind, Scope};
use keyhaven::{EnvelopeId, KeyPath};

use crate::error::Error;

/// Revocations by scope, nested so that lookups borrow the request's names.
#[derive(Default)]
struct Scopes {
    all: Option<Revocation>,
    tenants: HashMap<String, TenantScopes>,
    /// By envelope id, as bytes: the request path looks them up without
    /// formatting the id.
    datakeys: HashMap<[u8; 16], Revocation>,
}

#[derive(Default)]
struct TenantScopes {
    tenant: Option<Revocation>,
    keys: HashMap<String, KeyScopes>,
}

#[derive(Default)]
struct KeyScopes {
    key: Option<Revocation>,
    versions: HashMap<u32, Revocation>,
}

impl Scopes {
    fn key_mut(&mut self, tenant: &str, key: &str) -> &mut KeyScopes {
        self.tenants.entry(tenant.to_owned()).or_default().keys.entry(key.to_owned()).or_default()
    }

    fn put(&mut self, r: Revocation) {
        match r.scope.clone() {
            Scope::All => self.all = Some(r),
            Scope::Tenant { tenant } => self.tenants.entry(tenant).or_default().tenant = Some(r),
            Scope::Key { tenant, key, version: None } => self.key_mut(&tenant, &key).key = Some(r),
            Scope::Key { tenant, key, version: Some(v) } => {
                self.key_mut(&tenant, &key).versions.insert(v, r);
            }
            Scope::Datakey { envelope_id } => {
                // Ids were checked when the revocation was made.
                if let Ok(id) = envelope_id.parse::<EnvelopeId>() {
                    self.datakeys.insert(id.0, r);
                }
            }
        }
    }

    fn remove(&mut self, scope: &Scope) {
        match scope {
            Scope::All => self.all = None,
            Scope::Tenant { tenant } => {
                if let Some(t) = self.tenants.get_mut(tenant) {
                    t.tenant = None;
                }
            }
            Scope::Key { tenant, key, version } => {
                if let Some(k) = self.tenants.get_mut(tenant).and_then(|t| t.keys.get_mut(key)) {
                    match version {
                        None => k.key = None,
                        Some(v) => {
                            k.versions.remove(v);
                        }
                    }
                }
            }
            Scope::Datakey { envelope_id } => {
                if let Ok(id) = envelope_id.parse::<EnvelopeId>() {
                    self.datakeys.remove(&id.0);
                }
            }
        }
    }

    fn get(&self, scope: &Scope) -> Option<&Revocation> {
        match scope {
            Scope::All => self.all.as_ref(),
            Scope::Tenant { tenant } => self.tenants.get(tenant)?.tenant.as_ref(),
            Scope::Key { tenant, key, version } => {
                let k = self.tenants.get(tenant)?.keys.get(key)?;
                match version {
                    None => k.key.as_ref(),
                    Some(v) => k.versions.get(v),
                }
            }
            Scope::Datakey { envelope_id } => self.datakeys.get(&envelope_id.parse::<EnvelopeId>().ok()?.0),
        }
    }
}

/// The index.
pub struct Index {
    scopes: RwLock<Scopes>,
    /// Number of records, for the fast path.
    count: std::sync::atomic::AtomicUsize,
    /// The store, asked whether this node may serve at all (a node of a
    /// cluster only while its lease is valid: docs/CLUSTER.md).
    gate: std::sync::OnceLock<crate::store::Store>,
}

/// Whether a record is in force at `now`: destructions always, suspensions
/// until they expire.
fn in_force(r: &Revocation, now: u64) -> bool {
    r.kind == RevocationKind::Destroyed || r.expires_at.is_none_or(|t| now < t)
}

impl Index {
    /// An index of `records` (as the store holds them).
    pub fn new(records: Vec<Revocation>) -> Index {
        let index =
            Index { scopes: RwLock::new(Scopes::default()), count: 0.into(), gate: Default::default() };
        for r in records {
            index.put(r);
        }
        index
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Scopes> {
        self.scopes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Scopes> {
        self.scopes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every [`Index::check`] ask `store` first whether this node
    /// may serve (its lease).
    pub fn gate_on(&self, store: crate::store::Store) {
        let _ = self.gate.set(store);
    }

    /// Adds or replaces the record of a scope.
    pub fn put(&self, r: Revocation) {
        let mut s = self.write();
        let new = s.get(&r.scope).is_none();
        s.put(r);
        if new {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Replaces every record with `records` (as the store holds them: one
    /// per scope), in one step: a node of a cluster that reloads the
    /// revocations afresh (docs/CLUSTER.md §4).
    pub fn replace_all(&self, records: Vec<Revocation>) {
        let (mut fresh, mut n) = (Scopes::default(), 0);
        for r in records {
            n += usize::from(fresh.get(&r.scope).is_none());
            fresh.put(r);
        }
        let mut s = self.write();
        *s = fresh;
        self.count.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Removes the record of exactly `scope`.
    pub fn remove(&self, scope: &Scope) {
        let mut s = self.write();
        if s.get(scope).is_some() {
            s.remove(scope);
            self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The record of exactly `scope`, in force or not.
    pub fn get(&self, scope: &Scope) -> Option<Revocation> {
        self.read().get(scope).cloned()
    }

    /// Every record in force, broadest scope first.
    pub fn list(&self, now: u64) -> Vec<Revocation> {
        let s = self.read();
        let mut out: Vec<Revocation> = s.all.iter().cloned().collect();
        let mut tenants: Vec<_> = s.tenants.iter().collect();
        tenants.sort_by(|a, b| a.0.cmp(b.0));
        for (_, t) in tenants {
            out.extend(t.tenant.iter().cloned());
            let mut keys: Vec<_> = t.keys.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (_, k) in keys {
                out.extend(k.key.iter().cloned());
                let mut versions: Vec<_> = k.versions.values().cloned().collect();
                versions.sort_by_key(|r| match r.scope {
                    Scope::Key { version, .. } => version,
                    _ => None,
                });
                out.extend(versions);
            }
        }
        let mut datakeys: Vec<_> = s.datakeys.values().cloned().collect();
        datakeys.sort_by_key(|r| r.since);
        out.extend(datakeys);
        out.retain(|r| in_force(r, now));
        out
    }

    /// The whole-system revocation, when one is in force.
    pub fn all(&self, now: u64) -> Option<Revocation> {
        self.read().all.clone().filter(|r| in_force(r, now))
    }

    /// The broadest revocation in force that covers a use of `path` (at
    /// `version`, for the data key `id`, where known).
    pub fn covering(
        &self,
        path: &KeyPath,
        version: Option<u32>,
        id: Option<&EnvelopeId>,
        now: u64,
    ) -> Option<Revocation> {
        let s = self.read();
        let ok = |r: &&Revocation| in_force(r, now);
        if let Some(r) = s.all.as_ref().filter(ok) {
            return Some(r.clone());
        }
        if let Some(t) = s.tenants.get(path.tenant()) {
            if let Some(r) = t.tenant.as_ref().filter(ok) {
                return Some(r.clone());
            }
            if let Some(k) = t.keys.get(path.key()) {
                if let Some(r) = k.key.as_ref().filter(ok) {
                    return Some(r.clone());
                }
                if let Some(r) = version.and_then(|v| k.versions.get(&v)).filter(ok) {
                    return Some(r.clone());
                }
            }
        }
        if let Some(id) = id.filter(|_| !s.datakeys.is_empty()) {
            if let Some(r) = s.datakeys.get(&id.0).filter(ok) {
                return Some(r.clone());
            }
        }
        None
    }

    /// Refuses a use of `path` that a revocation in force covers. Costs an
    /// atomic load while nothing is revoked.
    pub fn check(&self, path: &KeyPath, version: Option<u32>, id: Option<&EnvelopeId>) -> Result<(), Error> {
        if let Some(store) = self.gate.get() {
            store.backend().serving()?;
        }
        if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return Ok(());
        }
        match self.covering(path, version, id, crate::clock::now_unix()) {
            None => Ok(()),
            Some(r) => Err(Error::Revoked(describe(&r))),
        }
    }
}

/// `key `acme/pii` is suspended since 2026-11-23T18:00:00Z (reason:
/// key-compromise, until …)`: the scope, the reason and when; nothing else.
pub fn describe(r: &Revocation) -> String {
    let since = rfc3339(r.since);
    match r.kind {
        RevocationKind::Destroyed => {
            format!("{} was destroyed at {since} (reason: {})", r.scope, r.reason)
        }
        RevocationKind::Suspended => match r.expires_at {
            Some(until) => format!(
                "{} is suspended since {since} until {} (reason: {})",
                r.scope,
                rfc3339(until),
                r.reason
            ),
            None => format!("{} is suspended since {since} (reason: {})", r.scope, r.reason),
        },
    }
}

/// Unix seconds as an RFC 3339 UTC time.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
