//! Data keys: `datakey` and `datakey_decrypt`, and the two steps `encrypt`
//! builds on: [`new_data_key`] and [`open_data_key`].
//!
//! A data key is 32 random bytes from the token, wrapped with AES-256-GCM by
//! the current KEK version inside the token; the AAD is the envelope header
//! and the encryption context (docs/ENVELOPE.md §2–4).

use std::sync::Arc;

use keyhaven::envelope::{self, Envelope, EnvelopeId, DEK_LEN, ID_LEN, NONCE_LEN, WRAPPED_DEK_LEN};
use keyhaven::lifecycle::KeyState;
use keyhaven::wire::{self, DatakeyResponse, DecryptResponse, SecretBytes};
use keyhaven::{EncryptionContext, KeyPath, KeyType};
use zeroize::Zeroizing;

use super::{key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::error::Error;
use crate::hsm::{KekId, KekRef};
use crate::policy::{Access, Permission};
use crate::secret::DataKey;
use crate::store::KeyRecord;

/// A freshly made data key.
pub struct NewDataKey {
    /// Its envelope.
    pub envelope: Envelope,
    /// The plaintext key.
    pub key: DataKey,
    /// A spare random nonce from the same token call, for `encrypt`'s payload.
    pub spare_nonce: [u8; NONCE_LEN],
}

pub fn kek_ref(rec: &KeyRecord, path: &KeyPath, version: u32) -> Result<KekRef, Error> {
    let v = rec
        .version(version)
        .ok_or_else(|| Error::NotFound(format!("key `{path}` has no version {version}")))?;
    if v.destroyed_at.is_some() {
        // The revocation index refuses this first; the record agrees.
        return Err(Error::Revoked(format!("key `{path}` version {version} was destroyed")));
    }
    Ok(KekRef {
        id: KekId { path: path.clone(), version },
        wrapped: v.wrapped_kek.as_slice().into(),
        master_key_version: v.master_key_version,
        key_type: rec.key_type,
    })
}

pub(super) fn unknown_key(path: &KeyPath) -> Error {
    Error::NotFound(format!("unknown key `{path}`"))
}

/// Refuses a new data key under a key that is not enabled.
pub(super) fn check_new_use(rec: &KeyRecord, path: &KeyPath) -> Result<(), Error> {
    match rec.state {
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(Error::KeyDisabled(format!(
            "key `{path}` is disabled: it makes no new data keys (existing ones still decrypt)"
        ))),
        other => check_decrypt_state(rec, path, other),
    }
}

pub(super) fn check_decrypt_state(rec: &KeyRecord, path: &KeyPath, state: KeyState) -> Result<(), Error> {
    match state {
        KeyState::Enabled | KeyState::Disabled => Ok(()),
        KeyState::PendingDeletion => Err(Error::KeyDisabled(format!(
            "key `{path}` is scheduled for deletion at {} and cannot be used; `keyhaven key cancel-deletion` restores it",
            crate::revocation::rfc3339(rec.deletion_at.unwrap_or_default())
        ))),
        KeyState::Deleted => Err(Error::KeyDisabled(format!("key `{path}` was deleted"))),
    }
}

/// Refuses decryption under a key's state or a retired version.
pub(super) fn check_decrypt(rec: &KeyRecord, path: &KeyPath, version: u32) -> Result<(), Error> {
    check_decrypt_state(rec, path, rec.state)?;
    if version < rec.min_decryption_version {
        return Err(Error::VersionRetired(format!(
            "key `{path}` version {version} is retired: the minimum decryption version is {}",
            rec.min_decryption_version
        )));
    }
    Ok(())
}

/// Makes a data key under the current version of `path`, for operation
/// `op` (`encrypt` or `datakey`, named in a `wrong_key_type` refusal).
pub async fn new_data_key(
    d: &Daemon,
    path: KeyPath,
    context: EncryptionContext,
    op: &str,
) -> Result<NewDataKey, Error> {
    context.validate()?;
    // Revocation before the keyring: a refusal must not say whether a key exists.
    d.revocations.check(&path, None, None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    super::require_type(&rec, &path, KeyType::Aes256Gcm, op)?;
    check_new_use(&rec, &path)?;
    let version = rec.current_version;
    d.revocations.check(&path, Some(version), None)?;
    let kek = kek_ref(&rec, &path, version)?;
    seal_data_key(d, kek, None, context).await
}

/// Wraps a data key under `kek` (a version of the key it names): a fresh
/// one, or `existing` (a data key and its envelope id, for `rewrap`). Counts
/// the wrap against the version's nonce budget first.
pub async fn seal_data_key(
    d: &Daemon,
    kek: KekRef,
    existing: Option<(DataKey, EnvelopeId)>,
    context: EncryptionContext,
) -> Result<NewDataKey, Error> {
    d.wraps.take(&kek.id).await?;
    let (path, version) = (kek.id.path.clone(), kek.id.version);
    let tenant = path.tenant().to_owned();
    d.hsm
        .run_short(&tenant, move |w| {
            // One token call for every random value: key, id, two nonces.
            let mut rnd = Zeroizing::new([0u8; DEK_LEN + ID_LEN + 2 * NONCE_LEN]);
            w.random(&mut rnd[..])?;
            let (key, id) = match existing {
                Some(kept) => kept,
                None => {
                    let key = DataKey::from_slice(&rnd[..DEK_LEN]).expect("32 bytes");
                    (key, EnvelopeId(rnd[DEK_LEN..DEK_LEN + ID_LEN].try_into().expect("16 bytes")))
                }
            };
            let at = DEK_LEN + ID_LEN;
            let nonce: [u8; NONCE_LEN] = rnd[at..at + NONCE_LEN].try_into().expect("12 bytes");
            let spare_nonce: [u8; NONCE_LEN] = rnd[at + NONCE_LEN..].try_into().expect("12 bytes");
            let header = envelope::envelope_header(&path, version, &id, &nonce);
            let aad = envelope::aad(&header, &context);
            let sealed = w.seal(&kek, &nonce, &aad, &key[..])?;
            let wrapped: [u8; WRAPPED_DEK_LEN] = sealed.as_slice().try_into().map_err(|_| {
                crate::hsm::HsmError::Library(format!("GCM returned {} bytes, expected 48", sealed.len()))
            })?;
            Ok(NewDataKey { envelope: Envelope::new(path, version, id, nonce, wrapped), key, spare_nonce })
        })
        .await
        .map_err(Error::from)
}

/// Unwraps the data key of `env` under `context`, counting a decryption,
/// for operation `op` (`decrypt` or `datakey_decrypt`, named in a
/// `wrong_key_type` refusal).
pub async fn open_data_key(
    d: &Daemon,
    env: &Envelope,
    context: EncryptionContext,
    op: &str,
) -> Result<DataKey, Error> {
    let (key, kek) = unwrap_data_key(d, env, context, op).await?;
    d.usage.decrypted(&kek, crate::clock::now_unix());
    Ok(key)
}

/// Unwraps the data key of `env` under `context` for operation `op`
/// (named in a `wrong_key_type` refusal); counts nothing. Returns the key
/// and the version that wrapped it.
pub async fn unwrap_data_key(
    d: &Daemon,
    env: &Envelope,
    context: EncryptionContext,
    op: &str,
) -> Result<(DataKey, KekId), Error> {
    context.validate()?;
    let path = env.path().clone();
    d.revocations.check(&path, Some(env.key_version()), Some(&env.id()))?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    super::require_type(&rec, &path, KeyType::Aes256Gcm, op)?;
    check_decrypt(&rec, &path, env.key_version())?;
    let kek = kek_ref(&rec, &path, env.key_version())?;
    let id = kek.id.clone();
    let aad = envelope::aad(&env.header(), &context);
    let nonce = *env.nonce();
    let wrapped = *env.wrapped_dek();
    let key = d
        .hsm
        .run_short(path.tenant(), move |w| {
            let plain = w.open(&kek, &nonce, &aad, &wrapped)?;
            Ok(DataKey::from_slice(&plain))
        })
        .await?
        .ok_or_else(|| Error::Integrity("the envelope holds no 32-byte data key".into()))?;
    Ok((key, id))
}

/// `datakey` under `path` (the request's key, already checked).
pub async fn generate(
    d: &Arc<Daemon>,
    path: KeyPath,
    req: wire::Datakey,
    s: &mut Subject,
) -> Result<Reply, Error> {
    let new = new_data_key(d, path, req.context, "datakey").await?;
    s.envelope(&new.envelope);
    let resp = DatakeyResponse {
        envelope: new.envelope.to_string(),
        envelope_id: new.envelope.id().to_string(),
        key_version: new.envelope.key_version(),
        plaintext: req.include_plaintext.then(|| SecretBytes::from_slice(&new.key[..])),
    };
    reply(&resp, 256)
}

/// `datakey_decrypt` of a parsed envelope.
pub async fn decrypt(d: &Arc<Daemon>, env: Envelope, context: EncryptionContext) -> Result<Reply, Error> {
    let key = open_data_key(d, &env, context, "datakey_decrypt").await?;
    reply(&opened(&env, SecretBytes::from_slice(&key[..])), 256)
}

/// The response of `decrypt` and `datakey_decrypt`.
pub fn opened(env: &Envelope, plaintext: SecretBytes) -> DecryptResponse {
    DecryptResponse {
        plaintext,
        tenant: env.path().tenant().into(),
        key: env.path().key().into(),
        key_version: env.key_version(),
        envelope_id: env.id().to_string(),
    }
}

/// `datakey` (`datakey`) and `datakey_decrypt` (`decrypt`).
pub(super) const OPS: &[Route] = &[route::<wire::Datakey>(), route::<wire::DatakeyDecrypt>()];

impl Op for wire::Datakey {
    const ACCESS: Access = Access::Needs(Permission::Datakey);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        cx.s.context(&self.context);
        cx.allow(key_target(&path))?;
        generate(cx.d, path, self, cx.s).await
    }
}

impl Op for wire::DatakeyDecrypt {
    const ACCESS: Access = Access::Needs(Permission::Decrypt);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.s.context(&self.context);
        let env: Envelope = self.envelope.parse()?;
        cx.s.envelope(&env);
        cx.allow(key_target(env.path()))?;
        cx.d.audit.watch_decrypt(cx.caller, env.path().tenant()).await?;
        decrypt(cx.d, env, self.context).await
    }
}
