//! The key lifecycle: `key_rotate`, `key_show`, `key_set`, `key_trim`,
//! `key_schedule_deletion`, `key_cancel_deletion` and `rewrap`
//! (docs/PROTOCOL.md §3.17–3.23).
//!
//! Every change goes through `Store::update_key`, so concurrent changes of
//! one key (an operator's and an automatic rotation, say) never lose each
//! other's writes, and each is durable before the call answers.

use std::sync::Arc;

use keyhaven::envelope::Ciphertext;
use keyhaven::import::Origin;
use keyhaven::lifecycle::{
    KeyCancelDeletion, KeyDetails, KeyRotate, KeyScheduleDeletion, KeySet, KeyShow, KeyState, KeyTrim,
    KeyTrimResponse, Rewrap, RewrapResponse, VersionDetails,
};
use keyhaven::{Envelope, KeyPath};

use super::datakey::{kek_ref, seal_data_key, unwrap_data_key};
use super::{blocking, key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Change;
use crate::clock::now_unix;
use crate::error::Error;
use crate::hsm::worker::Generated;
use crate::policy::{Access, Permission};
use crate::store::{KeyRecord, KeyVersion, Store};

/// Waiting period of a scheduled deletion, in days.
pub const DELETION_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

/// Period of automatic rotation, in seconds: 1 s to 100 years (0 turns it
/// off). Longer periods would wrap the due time around.
pub const ROTATE_EVERY_SECS: std::ops::RangeInclusive<u64> = 1..=100 * 365 * 86_400;

/// When `rec`'s next automatic rotation is due: its current version's
/// creation time plus the period, if it has one.
pub fn next_rotation_at(rec: &KeyRecord) -> Option<u64> {
    rec.rotate_every_secs.zip(rec.version(rec.current_version)).map(|(p, v)| v.created_at.saturating_add(p))
}

/// The public view of a key record, with its status under the
/// revocations in force ([`super::keys::status`]).
pub fn details(rec: &KeyRecord, revocations: &crate::revocation::Index) -> KeyDetails {
    let (state, revocation) = super::keys::status(rec, revocations);
    KeyDetails {
        tenant: rec.tenant.clone(),
        key: rec.key.clone(),
        key_type: rec.key_type,
        state,
        revocation,
        created_at: rec.created_at,
        current_version: rec.current_version,
        min_decryption_version: rec.min_decryption_version,
        rotate_every_secs: rec.rotate_every_secs,
        next_rotation_at: next_rotation_at(rec),
        deletion_at: rec.deletion_at,
        description: rec.description.clone(),
        tags: rec.tags.clone(),
        versions: rec
            .versions
            .iter()
            .map(|v| VersionDetails {
                version: v.version,
                state: if v.destroyed_at.is_some() {
                    "destroyed"
                } else if v.version == rec.current_version {
                    "current"
                } else if v.version < rec.min_decryption_version {
                    "retired"
                } else {
                    "active"
                }
                .into(),
                created_at: v.created_at,
                master_key_version: v.master_key_version,
                wrap_budget_reserved: v.wraps_reserved,
                wraps: v.wraps_reserved,
                decryptions: v.decryptions,
                rewraps: v.rewraps,
                last_used_at: v.last_used_at,
                origin: v.origin,
            })
            .collect(),
        origin: rec.origin,
    }
}

/// The lifecycle requests name one key.
pub trait NamesKey {
    /// Tenant name.
    fn tenant(&self) -> &str;
    /// Key name.
    fn key(&self) -> &str;
}

macro_rules! names_key {
    ($($t:ty),*) => {$(
        impl NamesKey for $t {
            fn tenant(&self) -> &str { &self.tenant }
            fn key(&self) -> &str { &self.key }
        }
    )*};
}
names_key!(KeyRotate, KeyShow, KeySet, KeyTrim, KeyScheduleDeletion, KeyCancelDeletion);

fn path_of(tenant: &str, key: &str) -> Result<KeyPath, Error> {
    Ok(KeyPath::new(tenant, key)?)
}

/// Applies `change` to the key at `path`; `change` may refuse, and then
/// nothing is written. Returns the record as it was before the change that
/// was written, and after it.
async fn change_key(
    d: &Arc<Daemon>,
    path: KeyPath,
    change: impl FnMut(&mut KeyRecord) -> Result<(), Error> + Send + 'static,
) -> Result<(KeyRecord, KeyRecord), Error> {
    let mut change = change;
    blocking(d, move |store| {
        let mut refused = None;
        let mut was = None;
        let written = store.update_key(&path, &mut |rec| {
            let before = rec.clone();
            refused = change(rec).err();
            if refused.is_some() {
                *rec = before; // written back unchanged
            } else {
                was = Some(before);
            }
        })?;
        match (refused, written, was) {
            (Some(e), _, _) => Err(e),
            (None, Some(rec), Some(was)) => Ok((was, rec)),
            (None, _, _) => Err(Error::NotFound(format!("unknown key `{path}`"))),
        }
    })
    .await
}

/// A key's settings and versions as an audit record's `before`/`after`
/// (docs/AUDIT.md §2.1): names, numbers, states and times only.
pub fn settings_json(rec: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "key_type": rec.key_type.to_string(),
        "state": rec.state.as_str(),
        "current_version": rec.current_version,
        "min_decryption_version": rec.min_decryption_version,
        "rotate_every_secs": rec.rotate_every_secs,
        "deletion_at": rec.deletion_at,
        "description": rec.description,
        "tags": rec.tags,
        "versions": rec.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        "destroyed_versions": rec
            .versions
            .iter()
            .filter(|v| v.destroyed_at.is_some())
            .map(|v| v.version)
            .collect::<Vec<_>>(),
    })
}

/// Notes a key change's before and after in the audit record.
fn note(change: &mut Change, before: &KeyRecord, after: &KeyRecord) {
    change.before = Some(settings_json(before));
    change.after = Some(settings_json(after));
}

/// Adds a version generated in the HSM and makes it current; returns the
/// record before and after.
pub async fn rotate_key(d: &Arc<Daemon>, path: KeyPath) -> Result<(KeyRecord, KeyRecord), Error> {
    rotate_key_under(d, path, None, None).await
}

/// Like [`rotate_key`], with the new KEK wrapped under master key
/// `master_key` (a master-key rotation) rather than the current one.
pub async fn rotate_key_under(
    d: &Arc<Daemon>,
    path: KeyPath,
    master_key: Option<u32>,
    made_with: Option<String>,
) -> Result<(KeyRecord, KeyRecord), Error> {
    let rec = d
        .store
        .backend()
        .key(&path)
        .await?
        .ok_or_else(|| Error::NotFound(format!("unknown key `{path}`")))?;
    refuse_gone(&rec, &path)?;
    if rec.origin == Origin::External {
        return Err(refuse_imported(&path));
    }
    // A new version of the key's own type (an HMAC key's versions are HMAC
    // keys).
    let kind = rec.key_type;
    let (generated, master_key_version) = match master_key {
        None => d.hsm.run_for(path.tenant(), move |w| w.generate_kek(kind)).await?,
        Some(mk) => (d.hsm.run_for(path.tenant(), move |w| w.generate_kek_for(kind, mk)).await?, mk),
    };
    let now = now_unix();
    let p = path.clone();
    let (was, rec) = change_key(d, path, move |rec| {
        refuse_gone(rec, &p)?;
        // A concurrent retry with the same idempotency key made it already.
        if made_with.is_some() && rec.versions.iter().any(|v| v.made_with == made_with) {
            return Ok(());
        }
        let next = rec.versions.iter().map(|v| v.version).max().unwrap_or(0).max(rec.current_version) + 1;
        let mut version = new_version(next, now, master_key_version, generated.clone());
        version.made_with = made_with.clone();
        rec.versions.push(version);
        rec.current_version = next;
        Ok(())
    })
    .await?;
    tracing::info!(key = %format!("{}/{}", rec.tenant, rec.key), version = rec.current_version, "key rotated");
    Ok((was, rec))
}

/// A fresh version record holding `generated` (and a signing key's public
/// key).
pub(super) fn new_version(
    version: u32,
    now: u64,
    master_key_version: u32,
    generated: Generated,
) -> KeyVersion {
    use base64::Engine as _;
    let mut v = KeyVersion::new(version, now, master_key_version, generated.wrapped);
    v.public_key = generated.public_key.map(|p| base64::engine::general_purpose::STANDARD.encode(p));
    v
}

/// An imported key's versions come from its owner's material only: the
/// token makes none (no rotation, automatic or by master-key rotation).
fn refuse_imported(path: &KeyPath) -> Error {
    Error::BadRequest(format!(
        "key `{path}` holds imported material (origin external): the token makes no versions of it; give it a \
         new version with `key import` (key_import_params, then key_import)"
    ))
}

fn refuse_gone(rec: &KeyRecord, path: &KeyPath) -> Result<(), Error> {
    match rec.state {
        KeyState::PendingDeletion | KeyState::Deleted => Err(Error::KeyDisabled(format!(
            "key `{path}` is {}; it cannot change",
            rec.state.as_str().replace('_', " ")
        ))),
        _ => Ok(()),
    }
}

/// `key_rotate`.
pub async fn rotate(d: Arc<Daemon>, req: KeyRotate, change: &mut Change) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    d.revocations.check(&path, None, None)?;
    if let Some(k) = &req.idempotency_key {
        keyhaven::names::validate_idempotency_key(k).map_err(Error::BadRequest)?;
        // A retry of a rotation that was made: the key as it is, no new version.
        let rec = d.store.backend().key(&path).await?;
        if let Some(rec) =
            rec.filter(|r| r.versions.iter().any(|v| v.made_with.as_deref() == Some(k.as_str())))
        {
            return reply(&details(&rec, &d.revocations), 0);
        }
    }
    let (was, rec) = rotate_key_under(d, path, None, req.idempotency_key.clone()).await?;
    note(change, &was, &rec);
    reply(&details(&rec, &d.revocations), 0)
}

/// `key_show`: flushes the usage counts first, so they are current.
pub async fn show(d: Arc<Daemon>, req: KeyShow, _: &mut Change) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    let dd = d.clone();
    blocking(d, move |store| Ok(dd.usage.flush(store)?)).await?;
    let rec = d
        .store
        .backend()
        .key(&path)
        .await?
        .ok_or_else(|| Error::NotFound(format!("unknown key `{path}`")))?;
    reply(&details(&rec, &d.revocations), 0)
}

/// `key_set`.
pub async fn set(d: Arc<Daemon>, req: KeySet, change: &mut Change) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    if req.min_decryption_version.is_none()
        && req.rotate_every_secs.is_none()
        && req.state.is_none()
        && req.description.is_none()
        && req.set_tags.is_none()
        && req.remove_tags.is_none()
    {
        return Err(Error::BadRequest("`key_set` needs at least one setting to change".into()));
    }
    if let Some(text) = &req.description {
        crate::labels::check_description("description", text)?;
    }
    if let Some(tags) = &req.set_tags {
        crate::labels::check_tags("set_tags", tags)?;
    }
    for name in req.remove_tags.iter().flatten() {
        crate::labels::check_tag_name("remove_tags", name)?;
        if req.set_tags.as_ref().is_some_and(|t| t.contains_key(name)) {
            return Err(Error::BadRequest(format!(
                "field `remove_tags`: tag `{name}` is also in `set_tags`; set it or remove it, not both"
            )));
        }
    }
    if let Some(period) = req.rotate_every_secs.filter(|p| *p != 0 && !ROTATE_EVERY_SECS.contains(p)) {
        return Err(Error::BadRequest(format!(
            "field `rotate_every_secs`: {period} is out of range: an automatic rotation period is from 1 s to \
             {} s (100 years), or 0 to turn it off",
            ROTATE_EVERY_SECS.end()
        )));
    }
    if let Some(state) = req.state.filter(|s| !matches!(s, KeyState::Enabled | KeyState::Disabled)) {
        return Err(Error::BadRequest(format!(
            "state `{}` cannot be set directly: use `key_schedule_deletion`",
            state.as_str()
        )));
    }
    let p = path.clone();
    let (was, rec) = change_key(d, path, move |rec| {
        refuse_gone(rec, &p)?;
        if let Some(min) = req.min_decryption_version {
            if min == 0 || min > rec.current_version {
                return Err(Error::BadRequest(format!(
                    "minimum decryption version {min} is out of range: key `{p}` has versions up to {}",
                    rec.current_version
                )));
            }
            if min < rec.min_decryption_version && rec.version(min).is_none() {
                return Err(Error::BadRequest(format!(
                    "key `{p}` version {min} was trimmed; the minimum cannot go back below {}",
                    rec.min_decryption_version
                )));
            }
            rec.min_decryption_version = min;
        }
        if let Some(period) = req.rotate_every_secs {
            if period != 0 && rec.origin == Origin::External {
                return Err(refuse_imported(&p));
            }
            rec.rotate_every_secs = (period != 0).then_some(period);
        }
        if let Some(state) = req.state {
            rec.state = state;
        }
        if let Some(text) = &req.description {
            rec.description = (!text.is_empty()).then(|| text.clone());
        }
        for name in req.remove_tags.iter().flatten() {
            rec.tags.remove(name);
        }
        if let Some(tags) = &req.set_tags {
            rec.tags.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
            if rec.tags.len() > crate::labels::MAX_TAGS {
                return Err(Error::BadRequest(format!(
                    "field `set_tags`: key `{p}` would have {} tags; a key holds at most {}",
                    rec.tags.len(),
                    crate::labels::MAX_TAGS
                )));
            }
        }
        Ok(())
    })
    .await?;
    note(change, &was, &rec);
    if req.min_decryption_version.is_some() {
        // Retired versions: cached data keys under them must go too.
        let retired = rec.versions.iter().map(|v| v.version).filter(|v| *v < rec.min_decryption_version);
        notify_versions(d, &rec.path()?, retired.map(Some));
    }
    tracing::info!(key = %format!("{}/{}", rec.tenant, rec.key), state = rec.state.as_str(), min_decryption_version = rec.min_decryption_version, "key settings changed");
    reply(&details(&rec, &d.revocations), 0)
}

/// `key_trim`: removes the versions below the minimum decryption version,
/// wrapped material and all.
pub async fn trim(d: Arc<Daemon>, req: KeyTrim, change: &mut Change) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    let before =
        d.store.backend().key(&path).await?.map(|r| r.versions.iter().map(|v| v.version).collect::<Vec<_>>());
    let p = path.clone();
    let (was, rec) = change_key(d, path, move |rec| {
        let min = rec.min_decryption_version;
        if !rec.versions.iter().any(|v| v.version < min) {
            return Err(Error::BadRequest(format!(
                "key `{p}` has no version below its minimum decryption version {min} to trim (the current version is never trimmed)"
            )));
        }
        rec.versions.retain(|v| v.version >= min);
        Ok(())
    })
    .await?;
    note(change, &was, &rec);
    let old = rec.min_decryption_version;
    let trimmed: Vec<u32> =
        before.unwrap_or_default().into_iter().filter(|v| rec.version(*v).is_none()).collect();
    let p = rec.path()?;
    notify_versions(d, &p, trimmed.iter().map(|v| Some(*v)));
    unload(d, move |id| id.path == p && id.version < old).await;
    tracing::warn!(key = %format!("{}/{}", rec.tenant, rec.key), below = old, "key versions trimmed");
    reply(&KeyTrimResponse { trimmed, details: details(&rec, &d.revocations) }, 0)
}

/// `key_schedule_deletion`.
pub async fn schedule_deletion(
    d: Arc<Daemon>,
    req: KeyScheduleDeletion,
    change: &mut Change,
) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    let days = req.days.unwrap_or(*DELETION_DAYS.end());
    if !DELETION_DAYS.contains(&days) {
        return Err(Error::BadRequest(format!("a deletion waits 7 to 30 days, not {days}")));
    }
    let at = now_unix() + u64::from(days) * 86_400;
    let p = path.clone();
    let (was, rec) = change_key(d, path, move |rec| {
        refuse_gone(rec, &p)?;
        rec.state = KeyState::PendingDeletion;
        rec.deletion_at = Some(at);
        Ok(())
    })
    .await?;
    note(change, &was, &rec);
    notify_versions(d, &rec.path()?, [None]);
    tracing::warn!(key = %format!("{}/{}", rec.tenant, rec.key), days, "key scheduled for deletion");
    reply(&details(&rec, &d.revocations), 0)
}

/// `key_cancel_deletion`: back to `disabled`, for an operator to enable.
pub async fn cancel_deletion(
    d: Arc<Daemon>,
    req: KeyCancelDeletion,
    change: &mut Change,
) -> Result<Reply, Error> {
    let d = &d;
    let path = path_of(&req.tenant, &req.key)?;
    let p = path.clone();
    let (was, rec) = change_key(d, path, move |rec| {
        if rec.state != KeyState::PendingDeletion {
            return Err(Error::BadRequest(format!(
                "key `{p}` is {}, not scheduled for deletion",
                rec.state.as_str().replace('_', " ")
            )));
        }
        rec.state = KeyState::Disabled;
        rec.deletion_at = None;
        Ok(())
    })
    .await?;
    note(change, &was, &rec);
    tracing::warn!(key = %format!("{}/{}", rec.tenant, rec.key), "key deletion cancelled; key disabled");
    reply(&details(&rec, &d.revocations), 0)
}

/// Tells subscribed clients (PROTOCOL.md §6) to drop cached data keys of
/// versions that may no longer be used.
pub fn notify_versions(d: &Daemon, path: &KeyPath, versions: impl IntoIterator<Item = Option<u32>>) {
    for version in versions {
        let scope = keyhaven::revocation::Scope::Key {
            tenant: path.tenant().to_owned(),
            key: path.key().to_owned(),
            version,
        };
        let _ = d.revocation_events.send(scope);
    }
}

/// Destroys, in every HSM worker's session, the loaded KEK copies that
/// `covered` selects (after a trim or a deletion).
pub async fn unload(d: &Daemon, covered: impl Fn(&crate::hsm::KekId) -> bool + Send + Sync + 'static) {
    if let Err(e) = d
        .hsm
        .on_every_worker(move |w| {
            w.evict(&covered);
        })
        .await
    {
        tracing::warn!(error = %e, "could not unload KEKs from the HSM workers");
    }
}

/// Deletes a key whose waiting period is over: erases every version's
/// wrapped material and marks it deleted. Returns the record as it was
/// before when it did.
pub fn delete_if_due(store: &Store, path: &KeyPath, now: u64) -> Result<Option<KeyRecord>, Error> {
    let mut done = None;
    store.update_key(path, &mut |rec| {
        done = None;
        if rec.state == KeyState::PendingDeletion && rec.deletion_at.is_some_and(|t| t <= now) {
            done = Some(rec.clone());
            for v in &mut rec.versions {
                v.wrapped_kek.clear();
                v.destroyed_at.get_or_insert(now);
            }
            rec.state = KeyState::Deleted;
        }
    })?;
    Ok(done)
}

/// The envelope inside a `rewrap` input.
enum Input {
    Envelope(Envelope),
    Ciphertext(Ciphertext),
}

/// `rewrap`: opens the data key inside the daemon/HSM and wraps it again
/// under the current version, keeping the envelope id (it is the same data
/// key). A ciphertext's payload is decrypted and sealed again with a fresh
/// nonce, since its AAD holds the envelope. The caller never sees the key.
pub async fn rewrap(d: &Arc<Daemon>, req: Rewrap) -> Result<Reply, Error> {
    let input = if req.text.starts_with(keyhaven::envelope::CIPHERTEXT_PREFIX) {
        Input::Ciphertext(req.text.parse()?)
    } else {
        Input::Envelope(req.text.parse()?)
    };
    let env = match &input {
        Input::Envelope(e) => e.clone(),
        Input::Ciphertext(c) => c.envelope().clone(),
    };
    // Opened first, whatever its version: this authenticates it under its
    // context and applies the revocations, the key's state and retirement
    // before anything is said about the key.
    let path = env.path().clone();
    let from = env.key_version();
    let (key, old) = unwrap_data_key(d, &env, req.context.clone(), "rewrap").await?;
    let rec = d
        .store
        .backend()
        .key(&path)
        .await?
        .ok_or_else(|| Error::NotFound(format!("unknown key `{path}`")))?;
    if from == rec.current_version {
        // Nothing rewrapped, but the data key was opened under the current
        // version: a decryption of it (PROTOCOL.md §3.23).
        d.usage.decrypted(&old, now_unix());
        let resp = RewrapResponse {
            text: req.text,
            from_version: from,
            key_version: from,
            envelope_id: env.id().to_string(),
        };
        return reply(&resp, 0);
    }
    // New envelopes under the current version: its revocations and state.
    d.revocations.check(&path, Some(rec.current_version), None)?;
    if rec.state != KeyState::Enabled {
        return Err(Error::KeyDisabled(format!(
            "key `{path}` is {} and makes no new envelopes",
            rec.state.as_str().replace('_', " ")
        )));
    }
    let kek = kek_ref(&rec, &path, rec.current_version)?;
    let payload = match &input {
        Input::Ciphertext(c) => Some(super::encrypt::open_payload(c, &key, &req.context)?),
        Input::Envelope(_) => None,
    };
    let new = seal_data_key(d, kek, Some((key, env.id())), req.context.clone()).await?;
    d.usage.rewrapped(&old, now_unix());
    let text = match payload {
        None => new.envelope.to_string(),
        Some(plain) => super::encrypt::seal_payload(&new, &plain, &req.context)?.to_string(),
    };
    let resp = RewrapResponse {
        text,
        from_version: from,
        key_version: new.envelope.key_version(),
        envelope_id: new.envelope.id().to_string(),
    };
    reply(&resp, resp.text.len())
}

/// The key lifecycle operations (`key-admin`) and `rewrap` (`decrypt`).
pub(super) const OPS: &[Route] = &[
    route::<KeyRotate>(),
    route::<KeyShow>(),
    route::<KeySet>(),
    route::<KeyTrim>(),
    route::<KeyScheduleDeletion>(),
    route::<KeyCancelDeletion>(),
    route::<Rewrap>(),
];

/// Declares a `key-admin` operation on one named key: note, check, run.
macro_rules! key_admin {
    ($($t:ty => $run:ident),* $(,)?) => {$(
        impl Op for $t {
            const ACCESS: Access = Access::Needs(Permission::KeyAdmin);
            async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
                let path = KeyPath::new(self.tenant(), self.key())?;
                cx.s.key(&path);
                cx.allow(key_target(&path))?;
                $run(cx.d.clone(), self, &mut cx.s.change).await
            }
        }
    )*};
}
key_admin!(
    KeyRotate => rotate,
    KeySet => set,
    KeyTrim => trim,
    KeyScheduleDeletion => schedule_deletion,
    KeyCancelDeletion => cancel_deletion,
);

// `key_show` reads only: it takes an alias too (as AWS KMS `DescribeKey`
// does), and answers with the key it names.
impl Op for KeyShow {
    const ACCESS: Access = Access::Needs(Permission::KeyAdmin);
    async fn handle(mut self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        self.key = path.key().to_owned();
        cx.allow(key_target(&path))?;
        show(cx.d.clone(), self, &mut cx.s.change).await
    }
}

// Rewrap opens a data key (inside the daemon) and seals it again: it needs
// `decrypt`, and counts as a decryption.
impl Op for Rewrap {
    const ACCESS: Access = Access::Needs(Permission::Decrypt);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.s.context(&self.context);
        let env: Envelope = if self.text.starts_with(keyhaven::envelope::CIPHERTEXT_PREFIX) {
            self.text.parse::<Ciphertext>()?.envelope().clone()
        } else {
            self.text.parse()?
        };
        cx.s.envelope(&env);
        cx.allow(key_target(env.path()))?;
        cx.d.audit.watch_decrypt(cx.caller, env.path().tenant()).await?;
        rewrap(cx.d, self).await
    }
}
