//! `encrypt` and `decrypt` of small secrets (up to 64 KiB): a fresh data key
//! per call, and the payload sealed with it by AES-256-GCM in the daemon
//! (docs/ENVELOPE.md §6). The data key is wiped when the call ends.

use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyhaven::envelope::{self, Ciphertext};
use keyhaven::wire::{self, EncryptResponse, SecretBytes, MAX_ENCRYPT_PLAINTEXT};
use keyhaven::{EncryptionContext, KeyPath};
use zeroize::Zeroizing;

use super::datakey::{new_data_key, open_data_key, opened, NewDataKey};
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
    let new = new_data_key(d, path, req.context.clone()).await?;
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
    let key = open_data_key(d, ct.envelope(), context.clone()).await?;
    let plain = open_payload(&ct, &key, &context)?;
    let hint = plain.len() * 4 / 3;
    reply(&opened(ct.envelope(), SecretBytes::from_slice(&plain)), hint)
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
        let ct: Ciphertext = self.ciphertext.parse()?;
        cx.s.envelope(ct.envelope());
        cx.allow(key_target(ct.envelope().path()))?;
        cx.d.audit.watch_decrypt(cx.caller, ct.envelope().path().tenant()).await?;
        decrypt(cx.d, ct, self.context).await
    }
}
