//! Named keys: `key_create`, `key_list`.

use std::sync::Arc;

use keyhaven::lifecycle::{KeyState, KeyStatus};
use keyhaven::revocation::{Revocation, RevocationKind};
use keyhaven::wire::{self, KeyInfo, KeyListResponse};
use keyhaven::KeyPath;

use super::{key_target, reply, route, tenant_target, Cx, Daemon, Op, Reply, Route};
use crate::clock::now_unix;
use crate::error::Error;
use crate::policy::{Access, Permission};
use crate::revocation::Index;
use crate::store::KeyRecord;

/// The public view of a key record, with its status under the
/// revocations in force.
pub fn info(rec: &KeyRecord, revocations: &Index) -> KeyInfo {
    let (state, revocation) = status(rec, revocations);
    KeyInfo {
        tenant: rec.tenant.clone(),
        key: rec.key.clone(),
        current_version: rec.current_version,
        versions: rec.versions.iter().map(|v| v.version).collect(),
        created_at: rec.created_at,
        key_type: rec.key_type,
        state: Some(state),
        revocation,
        rotate_every_secs: rec.rotate_every_secs,
        next_rotation_at: super::lifecycle::next_rotation_at(rec),
        min_decryption_version: Some(rec.min_decryption_version),
        deletion_at: rec.deletion_at,
        description: rec.description.clone(),
        tags: rec.tags.clone(),
        origin: rec.origin,
    }
}

/// Whether a key may be used, as answers say it (PROTOCOL.md §3.17): a
/// revocation in force that covers the whole key (the broadest: the whole
/// system, its tenant, the key) takes precedence over its lifecycle state.
pub fn status(rec: &KeyRecord, revocations: &Index) -> (KeyStatus, Option<Revocation>) {
    let covering = KeyPath::new(&rec.tenant, &rec.key)
        .ok()
        .and_then(|path| revocations.covering(&path, None, None, now_unix()));
    match covering {
        Some(r) if r.kind == RevocationKind::Destroyed => (KeyStatus::Destroyed, Some(r)),
        Some(r) => (KeyStatus::Suspended, Some(r)),
        None => (rec.state.into(), None),
    }
}

/// Generates version 1 of a new key of the requested type in the HSM and
/// stores it wrapped.
pub async fn create(
    d: &Arc<Daemon>,
    req: wire::KeyCreate,
    change: &mut crate::audit::Change,
) -> Result<Reply, Error> {
    let path = KeyPath::new(&req.tenant, &req.key)?;
    // A name in use is `already_exists` whatever covers it (a destroyed
    // key's name is never reused), then: no new key under a suspended or
    // destroyed tenant (or the whole system).
    if let Some(k) = &req.idempotency_key {
        keyhaven::names::validate_idempotency_key(k).map_err(Error::BadRequest)?;
    }
    if let Some(text) = &req.description {
        crate::labels::check_description("description", text)?;
    }
    crate::labels::check_tags("tags", &req.tags)?;
    if let Some(rec) = d.store.backend().key(&path).await? {
        // A retry of the request that made it: the same answer.
        if req.idempotency_key.is_some()
            && rec.created_with == req.idempotency_key
            && rec.key_type == req.key_type
        {
            change.after = Some(super::lifecycle::settings_json(&rec));
            return reply(&info(&rec, &d.revocations), 0);
        }
        return Err(Error::AlreadyExists(format!("key `{path}` exists already")));
    }
    if super::alias::find(d, &path).await?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "`{path}` is an alias; a key cannot have an alias's name (see `keyhaven alias list`)"
        )));
    }
    d.revocations.check(&path, None, None)?;
    // 0, as in `key_set`, is no period.
    let rotate_every_secs = req.rotate_every_secs.filter(|p| *p != 0);
    if let Some(period) = rotate_every_secs.filter(|p| !super::lifecycle::ROTATE_EVERY_SECS.contains(p)) {
        return Err(Error::BadRequest(format!(
            "field `rotate_every_secs`: {period} is out of range: an automatic rotation period is from 1 s to {} \
             s (100 years), or 0 for none",
            super::lifecycle::ROTATE_EVERY_SECS.end()
        )));
    }
    let kind = req.key_type;
    let (generated, master_key_version) = d.hsm.run_for(path.tenant(), move |w| w.generate_kek(kind)).await?;
    let now = now_unix();
    let rec = KeyRecord {
        tenant: path.tenant().into(),
        key: path.key().into(),
        created_at: now,
        current_version: 1,
        versions: vec![super::lifecycle::new_version(1, now, master_key_version, generated)],
        state: KeyState::Enabled,
        min_decryption_version: 1,
        rotate_every_secs,
        deletion_at: None,
        key_type: kind,
        created_with: req.idempotency_key.clone(),
        description: req.description.clone().filter(|t| !t.is_empty()),
        tags: req.tags.clone(),
        origin: Default::default(),
    };
    // The flush makes it durable before we answer; it blocks, so it runs
    // off the async threads (key creation is rare, not a hot path).
    let store = d.store.clone();
    let stored = rec.clone();
    tokio::task::spawn_blocking(move || store.create_key(&stored))
        .await
        .map_err(|e| Error::Internal(format!("store task: {e}")))??;
    tracing::info!(key = %path, key_type = %kind, "key created");
    change.after = Some(super::lifecycle::settings_json(&rec));
    reply(&info(&rec, &d.revocations), 0)
}

/// Lists keys, all or one tenant's, one page at a time (PROTOCOL.md §3.4).
pub async fn list(d: &Arc<Daemon>, req: wire::KeyList) -> Result<Reply, Error> {
    if let Some(t) = &req.tenant {
        keyhaven::names::validate_name("tenant", t)?;
    }
    let limit = super::page_limit(req.limit)?;
    let after = match &req.after {
        Some(text) => Some(text.parse::<KeyPath>().map_err(|e| {
            Error::BadRequest(format!(
                "`after` must be a key as TENANT/KEY, the `next` of the previous page: {e}"
            ))
        })?),
        None => None,
    };
    crate::labels::check_tags("tags", &req.tags)?;
    let mut keys = d.store.backend().keys(req.tenant.as_deref()).await?;
    if !req.tags.is_empty() {
        keys.retain(|k| crate::labels::matches(&k.tags, &req.tags));
    }
    let start = match &after {
        Some(a) => keys.partition_point(|k| (k.tenant.as_str(), k.key.as_str()) <= (a.tenant(), a.key())),
        None => 0,
    };
    let (keys, more) = super::page(keys[start..].iter().map(|k| info(k, &d.revocations)), limit);
    let next = more.then(|| keys.last().map(|k| format!("{}/{}", k.tenant, k.key))).flatten();
    reply(&KeyListResponse { keys, next }, 0)
}

/// `key_create` and `key_list` (`key-admin`).
pub(super) const OPS: &[Route] = &[route::<wire::KeyCreate>(), route::<wire::KeyList>()];

impl Op for wire::KeyCreate {
    const ACCESS: Access = Access::Needs(Permission::KeyAdmin);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = KeyPath::new(&self.tenant, &self.key)?;
        cx.s.key(&path);
        cx.allow(key_target(&path))?;
        let r = create(cx.d, self, &mut cx.s.change).await?;
        cx.s.version = Some(1);
        Ok(r)
    }
}

impl Op for wire::KeyList {
    const ACCESS: Access = Access::Needs(Permission::KeyAdmin);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let target = tenant_target(self.tenant.as_deref(), cx.s)?;
        cx.allow(target)?;
        list(cx.d, self).await
    }
}
