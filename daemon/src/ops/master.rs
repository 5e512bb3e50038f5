//! The master keys: their pins, checked at every start, and their rotation
//! (`admin_rotate_master`, `admin_retire_master`; docs/PROTOCOL.md, runbook
//! in docs/OPERATIONS.md, threat model in docs/SECURITY.md).
//!
//! Pins. Each master key version is recorded in the store's meta record when
//! it is made: its `CKA_ID` and a canary (a random key wrapped under it). At
//! start every pinned version must carry that id and unwrap its canary, and
//! a rotation adopts a key already under the new label only when the store
//! recorded that it was making it. A key planted or swapped under a label by
//! someone with the PIN is a `master_key_mismatch`, never used.
//!
//! Rotation. The token confines every KEK to the master key that unwraps it
//! (`hsm::confine`), so a KEK cannot be rewrapped under another master key.
//! A rotation instead gives every key a new version under the new master key:
//! 1. the new version is recorded as pending (with the `CKA_ID` it will
//!    get), made in the token, pinned, and named current: new KEKs are
//!    wrapped under it from then on;
//! 2. each call rotates a batch of keys whose current version is under
//!    another master key (a crash between calls loses nothing: a key either
//!    has its new version or not);
//! 3. when none is left, the meta record drops the rotation.
//!
//! Older versions stay under the old master key, and decrypt, until their
//! data is rewrapped and they are trimmed; only then can it be retired.
//! Rollback is the same walk towards the older master key, while it exists.

use std::sync::Arc;

use keyhaven::lifecycle::{AdminRetireMaster, AdminRotateMaster, MasterRotationStatus, RetireMasterResponse};
use keyhaven::KeyPath;

use super::{blocking, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Change;
use crate::clock::now_unix;
use crate::error::Error;
use crate::hsm::Hsm;
use crate::policy::{Access, Permission, Target};
use crate::store::{MasterKeyPin, MasterRotation, Meta, PendingMasterKey, Store};

/// Most keys an `admin_rotate_master` audit record names (`rotated`
/// counts them all).
const RECORD_KEYS: usize = 100;

/// Default and largest batch.
const BATCH: (u32, u32) = (100, 10_000);

/// Keys per `admin_rotate_master_keys` record: a durable record names
/// each group of a batch's keys before they are rotated, so a call killed
/// in its middle (whose own record is never written) leaves every key it
/// rotated named in the audit log (docs/AUDIT.md §2.1).
const RECORD_GROUP: usize = 50;

/// The op of the records that name the keys a batch is about to rotate.
pub const GROUP_OP: &str = "admin_rotate_master_keys";

/// Number of key versions wrapped under master key `mk`.
fn versions_under(store: &Store, mk: u32) -> Result<u64, Error> {
    let mut n = 0;
    for rec in store.keys(None)? {
        n += rec.versions.iter().filter(|v| v.master_key_version == mk && !v.wrapped_kek.is_empty()).count();
    }
    Ok(n as u64)
}

/// Keys whose current version is wrapped under another master key than
/// `mk` and that can still change (not deleted, current version not
/// destroyed).
fn behind(store: &Store, mk: u32) -> Result<Vec<KeyPath>, Error> {
    use keyhaven::lifecycle::KeyState;
    let mut out = Vec::new();
    for rec in store.keys(None)? {
        // An imported key gets no generated version: it stays under its
        // master key until its owner imports again (OPERATIONS.md, BYOK).
        if matches!(rec.state, KeyState::PendingDeletion | KeyState::Deleted)
            || rec.origin == keyhaven::import::Origin::External
        {
            continue;
        }
        match rec.version(rec.current_version) {
            Some(v) if v.master_key_version != mk && !v.wrapped_kek.is_empty() => out.push(rec.path()?),
            _ => {}
        }
    }
    Ok(out)
}

/// `admin_rotate_master`: starts, continues or rolls back a rotation by one
/// batch.
pub async fn rotate(
    d: &Arc<Daemon>,
    caller: &crate::identity::Caller,
    req: AdminRotateMaster,
    change: &mut Change,
) -> Result<Reply, Error> {
    let batch = req.batch.unwrap_or(BATCH.0);
    if batch == 0 || batch > BATCH.1 {
        return Err(Error::BadRequest(format!("batch {batch} is out of range: 1 to {}", BATCH.1)));
    }
    // One rotation step at a time.
    let _one = d.master_lock.lock().await;
    let meta = d
        .store
        .backend()
        .meta()
        .await?
        .ok_or_else(|| Error::Internal("the store has no meta record".into()))?;
    change.before = Some(serde_json::json!({
        "master_key_version": meta.master_key_version,
        "rotation": meta.master_rotation.map(|r| serde_json::json!({"from": r.from, "to": r.to})),
    }));
    if req.rollback {
        change.detail = Some("rollback".into());
    }
    let rotation = match (meta.master_rotation, req.rollback) {
        (Some(r), false) => r,
        (Some(r), true) => begin(d, &meta, r.to, r.from).await?,
        (None, false) => begin(d, &meta, meta.master_key_version, meta.master_key_version + 1).await?,
        (None, true) => {
            let back = meta.master_key_version.checked_sub(1).filter(|v| *v >= 1).ok_or_else(|| {
                Error::BadRequest("there is no earlier master key version to roll back to".into())
            })?;
            begin(d, &meta, meta.master_key_version, back).await?
        }
    };
    let MasterRotation { from, to, .. } = rotation;
    let mut rotated = 0u64;
    let mut keys = Vec::new();
    let todo = blocking(d, move |store| behind(store, to)).await?;
    let todo: Vec<KeyPath> = todo.into_iter().take(batch as usize).collect();
    for group in todo.chunks(RECORD_GROUP) {
        // Named durably before any of them changes: the call's own record
        // comes only when it completes, and a node killed meanwhile would
        // leave the keys it rotated in no record.
        let names: Vec<String> = group.iter().map(|p| p.to_string()).collect();
        let subject = crate::audit::Subject {
            change: Change {
                detail: Some(format!(
                    "about to give these {} key(s) a new version under master key version {to} (rotation from \
                     {from}); each is one write, so a key's versions show whether it got one",
                    names.len()
                )),
                after: Some(serde_json::json!({"from": from, "to": to, "keys": names})),
                ..Change::default()
            },
            ..crate::audit::Subject::default()
        };
        d.audit.record(caller, GROUP_OP, subject, &Ok::<(), Error>(())).await?;
        for path in group {
            // Progress so far goes in the record even if a key fails.
            change.after = Some(serde_json::json!({
                "master_key_version": to, "from": from, "to": to, "rotated": rotated, "keys": keys,
            }));
            let (_, rec) = super::lifecycle::rotate_key_under(d, path.clone(), Some(to), None).await?;
            // The record names the first keys of a batch, not thousands.
            if keys.len() < RECORD_KEYS {
                keys.push(format!("{path}@{}", rec.current_version));
            }
            rotated += 1;
        }
    }
    let (remaining, left_under_from) = blocking(d, move |store| {
        let remaining = behind(store, to)?.len() as u64;
        if remaining == 0 {
            store.update_meta(&mut |m| {
                if m.master_rotation.is_some_and(|r| r.from == from && r.to == to) {
                    m.master_rotation = None;
                }
            })?;
        }
        Ok((remaining, versions_under(store, from)?))
    })
    .await?;
    if remaining == 0 {
        tracing::warn!(from, to, left_under_from, "master-key rotation complete");
    } else {
        tracing::info!(from, to, rotated, remaining, "master-key rotation batch");
    }
    let status =
        MasterRotationStatus { from, to, rotated, remaining, finished: remaining == 0, left_under_from };
    change.after = Some(serde_json::json!({
        "master_key_version": to,
        "rotation": (remaining > 0).then(|| serde_json::json!({"from": from, "to": to})),
        "rotated": rotated,
        "keys": keys,
        "remaining": remaining,
        "finished": remaining == 0,
        "left_under_from": left_under_from,
    }));
    reply(&status, 0)
}

/// Records a rotation from `from` to `to` and makes `to` current. Master
/// key `to` is made in the token when the store has no pin for it (a new
/// rotation); otherwise it must match its pin (a rollback, or a rotation
/// towards a version that was kept).
async fn begin(d: &Arc<Daemon>, meta: &Meta, from: u32, to: u32) -> Result<MasterRotation, Error> {
    if let Some(pin) = meta.master_pin(to).cloned() {
        let (id, canary) = (pin.id.clone(), pin.canary.clone());
        d.hsm
            .run(move |w| w.check_master_key(to, &id, &canary))
            .await
            .map_err(|e| Error::BadRequest(format!("cannot rotate to master key version {to}: {e}")))?;
    } else if to < from {
        return Err(Error::BadRequest(format!(
            "cannot roll back to master key version {to}: the store holds no record of it (retired)"
        )));
    } else {
        make_pinned(d, meta, to).await?;
    }
    let rotation = MasterRotation { from, to, started_at: now_unix() };
    blocking(d, move |store| {
        store.update_meta(&mut |m| {
            m.master_rotation = Some(rotation);
            m.master_key_version = to;
        })?;
        Ok(())
    })
    .await?;
    d.hsm.set_master_key_version(to);
    tracing::warn!(from, to, "master-key rotation started");
    Ok(rotation)
}

/// Makes master key `version` in the token and pins it in the store. The
/// pending record comes first, so that a run interrupted after
/// C_GenerateKey adopts the key it made (same `CKA_ID`) and nothing else.
async fn make_pinned(d: &Arc<Daemon>, meta: &Meta, version: u32) -> Result<(), Error> {
    let (id, adopt) = match &meta.master_pending {
        Some(p) if p.version == version => (p.id.clone(), true),
        _ => {
            let id = d.hsm.run(|w| w.random_id()).await?;
            let pending = PendingMasterKey { version, id: id.clone() };
            blocking(d, move |store| {
                store.update_meta(&mut |m| m.master_pending = Some(pending.clone()))?;
                Ok(())
            })
            .await?;
            (id, false)
        }
    };
    let (canary, confined) = {
        let id = id.clone();
        d.hsm
            .run(move |w| {
                let canary = w.make_master_key(version, &id, adopt)?;
                let confined = w.check_master_key(version, &id, &canary)?;
                Ok((canary, confined))
            })
            .await?
    };
    d.hsm.set_confinement(version, confined);
    let pin = MasterKeyPin { version, id, canary, pinned_at: now_unix() };
    blocking(d, move |store| {
        store.update_meta(&mut |m| {
            m.master_keys.retain(|p| p.version != version);
            m.master_keys.push(pin.clone());
            m.master_pending = None;
        })?;
        Ok(())
    })
    .await?;
    tracing::warn!(version, "master key made in the token and pinned in the store");
    Ok(())
}

/// `admin_retire_master`: destroys an old master key version in the token,
/// refused while it is current, part of a rotation, or still wraps a KEK.
pub async fn retire(d: &Arc<Daemon>, req: AdminRetireMaster, change: &mut Change) -> Result<Reply, Error> {
    let _one = d.master_lock.lock().await;
    let v = req.version;
    let meta = d
        .store
        .backend()
        .meta()
        .await?
        .ok_or_else(|| Error::Internal("the store has no meta record".into()))?;
    let pinned = |m: &Meta| m.master_keys.iter().map(|p| p.version).collect::<Vec<_>>();
    change.before = Some(serde_json::json!({
        "master_key_version": meta.master_key_version,
        "pinned_versions": pinned(&meta),
    }));
    if v == meta.master_key_version {
        return Err(Error::BadRequest(format!("master key version {v} is the current one")));
    }
    if let Some(r) = meta.master_rotation.filter(|r| r.from == v || r.to == v) {
        return Err(Error::BadRequest(format!(
            "master key version {v} is part of the rotation from {} to {} under way; finish it first",
            r.from, r.to
        )));
    }
    let still = blocking(d, move |store| versions_under(store, v)).await?;
    if still > 0 {
        return Err(Error::BadRequest(format!(
            "master key version {v} still wraps {still} key version(s), which cannot move to another master \
             key: rewrap their data under the current versions, raise each key's minimum decryption version \
             and trim (docs/OPERATIONS.md), then retire it"
        )));
    }
    let destroyed = d.hsm.run(move |w| w.destroy_master_key(v)).await?;
    let after = blocking(d, move |store| {
        let m = store.update_meta(&mut |m| m.master_keys.retain(|p| p.version != v))?;
        Ok(m)
    })
    .await?;
    change.after = Some(serde_json::json!({
        "master_key_version": meta.master_key_version,
        "pinned_versions": pinned(&after),
        "destroyed_in_token": destroyed,
    }));
    if !destroyed {
        return Err(Error::NotFound(format!("master key version {v} is not in the token")));
    }
    d.hsm.forget_confinement(v);
    if let Err(e) = d.hsm.on_every_worker(move |w| w.forget_master_key(v)).await {
        tracing::warn!(error = %e, "could not clear the retired master key from every worker");
    }
    tracing::warn!(version = v, "master key version destroyed in the token");
    reply(&RetireMasterResponse { destroyed: v }, 0)
}

/// At start, before the daemon serves: checks every master key version the
/// store relies on against its pin (its `CKA_ID`, its canary) and asks the
/// token whether it confines KEKs ([`Hsm::confinement`]). A version in use
/// without a pin (a store from before pinning) is pinned now, once its
/// attributes pass, with a warning. A pinned version that is not in use and
/// is gone from the token is forgotten.
pub fn check_pins(hsm: &Hsm, store: &Store) -> Result<(), Error> {
    let meta = store.meta()?.ok_or_else(|| Error::Internal("the store has no meta record".into()))?;
    let mut in_use = std::collections::BTreeSet::from([meta.master_key_version]);
    if let Some(r) = meta.master_rotation {
        in_use.extend([r.from, r.to]);
    }
    for rec in store.keys(None)? {
        in_use
            .extend(rec.versions.iter().filter(|v| !v.wrapped_kek.is_empty()).map(|v| v.master_key_version));
    }
    for pin in &meta.master_keys {
        hsm.pin_master_id(pin.version, &pin.id);
    }
    for pin in &meta.master_keys {
        let (version, id, canary) = (pin.version, pin.id.clone(), pin.canary.clone());
        match hsm.run_blocking(move |w| w.check_master_key(version, &id, &canary)) {
            Ok(confined) => hsm.set_confinement(version, confined),
            Err(crate::hsm::HsmError::KeyMissing { label }) if !in_use.contains(&version) => {
                tracing::warn!(%label, "a master key the store pinned is gone from the token; nothing needs it");
                store.update_meta(&mut |m| m.master_keys.retain(|p| p.version != version))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    for version in in_use.into_iter().filter(|v| meta.master_pin(*v).is_none()) {
        let (id, canary) = hsm.run_blocking(move |w| w.pin_master_key(version))?;
        let confined = {
            let (id, canary) = (id.clone(), canary.clone());
            hsm.run_blocking(move |w| w.check_master_key(version, &id, &canary))?
        };
        hsm.set_confinement(version, confined);
        let pin = MasterKeyPin { version, id, canary, pinned_at: now_unix() };
        store.update_meta(&mut |m| {
            m.master_keys.retain(|p| p.version != version);
            m.master_keys.push(pin.clone());
        })?;
        tracing::warn!(version, "master key pinned in the store (it was made before pinning existed)");
    }
    for (version, confined) in hsm.confinement() {
        if !confined {
            tracing::warn!(
                version,
                "the token does not confine the KEKs master key {version} unwraps: anyone with the PIN can \
                 take them out in plaintext (docs/SECURITY.md); rotate the master key"
            );
        }
    }
    Ok(())
}

/// `admin_rotate_master` and `admin_retire_master` (`admin`).
pub(super) const OPS: &[Route] = &[route::<AdminRotateMaster>(), route::<AdminRetireMaster>()];

impl Op for AdminRotateMaster {
    const ACCESS: Access = Access::Needs(Permission::Admin);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        rotate(cx.d, cx.caller, self, &mut cx.s.change).await
    }
}

impl Op for AdminRetireMaster {
    const ACCESS: Access = Access::Needs(Permission::Admin);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        retire(cx.d, self, &mut cx.s.change).await
    }
}
