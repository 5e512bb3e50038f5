//! `encrypt` and `decrypt` of small secrets (up to 64 KiB): a fresh data key
//! per call, and the payload sealed with it by AES-256-GCM in the daemon
//! (docs/ENVELOPE.md §6). The data key is wiped when the call ends.

use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyhaven::envelope::{self, Ciphertext};
use keyhaven::hybrid::{PublicCiphertext, PUBLIC_PREFIX};
use keyhaven::wire::{self, EncryptResponse, SecretBytes, MAX_ENCRYPT_PLAINTEXT};
use keyhaven::{EncryptionContext, KeyPath, KeyType};
use sha2::Digest as _;
use zeroize::Zeroizing;

use super::datakey::{check_decrypt, kek_ref, new_data_key, open_data_key, opened, unknown_key, NewDataKey};
use super::{key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::error::Error;
use crate::policy::{Access, Permission};
use crate::secret::DataKey;

/// `encrypt` under `path` (the request's key, already checked).
pub async fn encrypt(
    d: &Arc<Daemon>,
    path: KeyPath,
    req: wire::Encrypt,
    s: &mut Subject,
) -> Result<Reply, Error> {
    if req.plaintext.len() > MAX_ENCRYPT_PLAINTEXT {
        return Err(Error::PayloadTooLarge(req.plaintext.len()));
    }
    let new = new_data_key(d, path, req.context.clone(), "encrypt").await?;
    s.envelope(&new.envelope);
    let ct = seal_payload(&new, req.plaintext.expose(), &req.context)?;
    let text = ct.to_string();
    let resp = EncryptResponse {
        envelope_id: ct.envelope().id().to_string(),
        key_version: ct.envelope().key_version(),
        ciphertext: text,
    };
    reply(&resp, resp.ciphertext.len())
}

/// `decrypt` of a parsed ciphertext.
pub async fn decrypt(d: &Arc<Daemon>, ct: Ciphertext, context: EncryptionContext) -> Result<Reply, Error> {
    if ct.payload().len() > MAX_ENCRYPT_PLAINTEXT + envelope::TAG_LEN {
        return Err(Error::BadEnvelope(format!(
            "malformed ciphertext: payload of {} bytes is over the `encrypt` limit",
            ct.payload().len()
        )));
    }
    let key = open_data_key(d, ct.envelope(), context.clone(), "decrypt").await?;
    let plain = open_payload(&ct, &key, &context)?;
    let hint = plain.len() * 4 / 3;
    reply(&opened(ct.envelope(), SecretBytes::from_slice(&plain)), hint)
}

/// `decrypt` of a parsed public-key ciphertext (docs/ENVELOPE.md §11): the
/// data key is decrypted with RSA-OAEP by the version's private key in the
/// token, under the same revocation, state and retirement checks as any
/// decryption, then opens the payload.
async fn decrypt_public(
    d: &Arc<Daemon>,
    ct: PublicCiphertext,
    context: EncryptionContext,
) -> Result<Reply, Error> {
    let path = ct.path().clone();
    let version = ct.key_version();
    d.revocations.check(&path, Some(version), None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    super::require_type(&rec, &path, KeyType::RsaOaep4096, "decrypt")?;
    check_decrypt(&rec, &path, version)?;
    let key = kek_ref(&rec, &path, version)?;
    let id = key.id.clone();
    let wrapped = ct.wrapped_key().to_vec();
    let data_key = d.hsm.run_for(path.tenant(), move |w| w.oaep_decrypt(&key, &wrapped)).await?;
    if data_key.len() != 32 {
        return Err(Error::Integrity("the wrapped data key is not a 256-bit key".into()));
    }
    let plain = ct.open(&data_key, &context).map_err(|_| {
        Error::Integrity(
            "the ciphertext does not authenticate: it was altered, or the encryption context differs".into(),
        )
    })?;
    d.usage.decrypted(&id, crate::clock::now_unix());
    let digest = sha2::Sha256::digest(ct.wrapped_key());
    let resp = wire::DecryptResponse {
        plaintext: SecretBytes::from_slice(&plain),
        tenant: path.tenant().into(),
        key: path.key().into(),
        key_version: version,
        envelope_id: digest[..16].iter().map(|b| format!("{b:02x}")).collect(),
    };
    let hint = plain.len() * 4 / 3;
    reply(&resp, hint)
}

/// Seals `plaintext` with a new data key's key and spare nonce into a
/// ciphertext (docs/ENVELOPE.md §6.2).
pub fn seal_payload(
    new: &NewDataKey,
    plaintext: &[u8],
    context: &EncryptionContext,
) -> Result<Ciphertext, Error> {
    let nonce = new.spare_nonce;
    let header = Ciphertext::header_for(&new.envelope, &nonce);
    let aad = envelope::aad(&header, context);
    let cipher =
        Aes256Gcm::new_from_slice(&new.key[..]).map_err(|_| Error::Internal("data key length".into()))?;
    let payload = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
        .map_err(|_| Error::Internal("AES-GCM encryption failed".into()))?;
    Ok(Ciphertext::new(new.envelope.clone(), nonce, payload))
}

/// Opens a ciphertext's payload with its data key (docs/ENVELOPE.md §6.2).
pub fn open_payload(
    ct: &Ciphertext,
    key: &DataKey,
    context: &EncryptionContext,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let aad = envelope::aad(&ct.header(), context);
    let cipher =
        Aes256Gcm::new_from_slice(&key[..]).map_err(|_| Error::Internal("data key length".into()))?;
    let plain = cipher
        .decrypt(Nonce::from_slice(ct.nonce()), Payload { msg: ct.payload(), aad: &aad })
        .map_err(|_| {
            Error::Integrity(
                "the ciphertext does not authenticate: it was altered, or the encryption context differs"
                    .into(),
            )
        })?;
    Ok(Zeroizing::new(plain))
}

/// `encrypt` (`encrypt`) and `decrypt` (`decrypt`) of small secrets.
pub(super) const OPS: &[Route] = &[route::<wire::Encrypt>(), route::<wire::Decrypt>()];

impl Op for wire::Encrypt {
    const ACCESS: Access = Access::Needs(Permission::Encrypt);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        cx.s.context(&self.context);
        cx.allow(key_target(&path))?;
        encrypt(cx.d, path, self, cx.s).await
    }
}

impl Op for wire::Decrypt {
    const ACCESS: Access = Access::Needs(Permission::Decrypt);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.s.context(&self.context);
        if self.ciphertext.trim_start().starts_with(PUBLIC_PREFIX) {
            let ct: PublicCiphertext = self.ciphertext.parse().map_err(Error::from)?;
            cx.s.key(ct.path());
            cx.s.version = Some(ct.key_version());
            cx.allow(key_target(ct.path()))?;
            cx.d.audit.watch_decrypt(cx.caller, ct.path().tenant()).await?;
            return decrypt_public(cx.d, ct, self.context).await;
        }
        let ct: Ciphertext = self.ciphertext.parse()?;
        cx.s.envelope(ct.envelope());
        cx.allow(key_target(ct.envelope().path()))?;
        cx.d.audit.watch_decrypt(cx.caller, ct.envelope().path().tenant()).await?;
        decrypt(cx.d, ct, self.context).await
    }
}
