//! Master-key rotation: `admin_rotate_master` and `admin_retire_master`
//! (docs/PROTOCOL.md, runbook in docs/OPERATIONS.md).
//!
//! The rotation's state lives in the store's meta record (`from`, `to`), so
//! it survives a crash or restart at any point:
//! 1. the new master key is made in the token (a re-run finds the one an
//!    interrupted run made), then the meta record names it current: new
//!    KEKs are wrapped under it from then on;
//! 2. each call rewraps a batch of KEK versions from `from` to `to` inside
//!    the token, each written with a compare-and-swap on its key record, so
//!    a KEK is under one version or the other, never lost;
//! 3. when nothing is left under `from`, the meta record drops the rotation.
//!
//! Until the old master key is retired, both versions unwrap, so service
//! goes on throughout. Rollback is the same walk the other way.

use std::sync::Arc;

use keyhaven::lifecycle::{AdminRetireMaster, AdminRotateMaster, MasterRotationStatus, RetireMasterResponse};

use super::{blocking, now_unix, reply, Daemon, Reply};
use crate::error::Error;
use crate::store::{MasterRotation, Store};

/// Default and largest batch.
const BATCH: (u32, u32) = (100, 10_000);

/// KEK versions wrapped under master key `mk`: (key path, version, wrapped).
fn under(store: &dyn Store, mk: u32) -> Result<Vec<(keyhaven::KeyPath, u32, Vec<u8>)>, Error> {
    let mut out = Vec::new();
    for rec in store.keys(None)? {
        let path = rec.path()?;
        for v in &rec.versions {
            if v.master_key_version == mk && !v.wrapped_kek.is_empty() {
                out.push((path.clone(), v.version, v.wrapped_kek.clone()));
            }
        }
    }
    Ok(out)
}

/// `admin_rotate_master`: starts, continues or rolls back a rotation by one
/// batch.
pub async fn rotate(d: &Arc<Daemon>, req: AdminRotateMaster) -> Result<Reply, Error> {
    let batch = req.batch.unwrap_or(BATCH.0);
    if batch == 0 || batch > BATCH.1 {
        return Err(Error::BadRequest(format!("batch {batch} is out of range: 1 to {}", BATCH.1)));
    }
    // One rotation step at a time.
    let _one = d.master_lock.lock().await;
    let meta = d.store.meta()?.ok_or_else(|| Error::Internal("the store has no meta record".into()))?;
    let rotation = match (meta.master_rotation, req.rollback) {
        (Some(r), false) => r,
        (Some(r), true) => begin(d, r.to, r.from, false).await?,
        (None, false) => begin(d, meta.master_key_version, meta.master_key_version + 1, true).await?,
        (None, true) => {
            let back = meta.master_key_version.checked_sub(1).filter(|v| *v >= 1).ok_or_else(|| {
                Error::BadRequest("there is no earlier master key version to roll back to".into())
            })?;
            begin(d, meta.master_key_version, back, false).await?
        }
    };
    let MasterRotation { from, to, .. } = rotation;
    let mut rewrapped = 0u64;
    let todo = under(&*d.store, from)?;
    for (path, version, wrapped) in todo.iter().take(batch as usize) {
        let old = wrapped.clone();
        let new = d.hsm.run(move |w| w.rewrap_kek(&old, from, to)).await?;
        let (path, version, old) = (path.clone(), *version, wrapped.clone());
        blocking(d, move |store| {
            store.update_key(&path, &mut |rec| {
                if let Some(v) = rec.version_mut(version) {
                    // Only if nobody changed it meanwhile (destroyed, trimmed).
                    if v.master_key_version == from && v.wrapped_kek == old {
                        v.wrapped_kek = new.clone();
                        v.master_key_version = to;
                    }
                }
            })?;
            Ok(())
        })
        .await?;
        rewrapped += 1;
    }
    let remaining = under(&*d.store, from)?.len() as u64;
    if remaining == 0 {
        blocking(d, move |store| {
            store.update_meta(&mut |m| {
                if m.master_rotation.is_some_and(|r| r.from == from && r.to == to) {
                    m.master_rotation = None;
                }
            })?;
            Ok(())
        })
        .await?;
        tracing::warn!(from, to, "master-key rotation complete");
    } else {
        tracing::info!(from, to, rewrapped, remaining, "master-key rotation batch");
    }
    reply(&MasterRotationStatus { from, to, rewrapped, remaining, finished: remaining == 0 }, 0)
}

/// Records a rotation from `from` to `to` and makes `to` current. `create`:
/// make master key `to` in the token when it does not exist (a new
/// rotation); otherwise it must exist (a rollback).
async fn begin(d: &Arc<Daemon>, from: u32, to: u32, create: bool) -> Result<MasterRotation, Error> {
    d.hsm.run(move |w| w.ensure_master_key(to, create)).await.map_err(|e| {
        if create {
            Error::from(e)
        } else {
            Error::BadRequest(format!("cannot roll back to master key version {to}: {e}"))
        }
    })?;
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

/// `admin_retire_master`: destroys an old master key version in the token,
/// refused while it is current, part of a rotation, or still wraps a KEK.
pub async fn retire(d: &Arc<Daemon>, req: AdminRetireMaster) -> Result<Reply, Error> {
    let _one = d.master_lock.lock().await;
    let v = req.version;
    let meta = d.store.meta()?.ok_or_else(|| Error::Internal("the store has no meta record".into()))?;
    if v == meta.master_key_version {
        return Err(Error::BadRequest(format!("master key version {v} is the current one")));
    }
    if let Some(r) = meta.master_rotation.filter(|r| r.from == v || r.to == v) {
        return Err(Error::BadRequest(format!(
            "master key version {v} is part of the rotation from {} to {} under way; finish it first",
            r.from, r.to
        )));
    }
    let still = under(&*d.store, v)?.len();
    if still > 0 {
        return Err(Error::BadRequest(format!(
            "master key version {v} still wraps {still} key version(s); rotate the master key first"
        )));
    }
    let destroyed = d.hsm.run(move |w| w.destroy_master_key(v)).await?;
    if !destroyed {
        return Err(Error::NotFound(format!("master key version {v} is not in the token")));
    }
    if let Err(e) = d.hsm.on_every_worker(move |w| w.forget_master_key(v)).await {
        tracing::warn!(error = %e, "could not clear the retired master key from every worker");
    }
    tracing::warn!(version = v, "master key version destroyed in the token");
    reply(&RetireMasterResponse { destroyed: v }, 0)
}
