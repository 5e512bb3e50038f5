//! Signatures under ECDSA keys: `sign` and `public_key` (PROTOCOL.md
//! §3.31–3.32).
//!
//! Each version's private key is made in the token and stored wrapped
//! (`hsm::ec`); it signs in the token with CKM_ECDSA over a digest the
//! daemon computes (SHA-256 for P-256, SHA-384 for P-384: SoftHSM2 2.6.1
//! offers CKM_ECDSA but not the hash-and-sign mechanisms, `hsm::signing`,
//! and the result is the same signature) or the caller gives. The public key
//! is stored with the version and served as PEM.

use std::sync::Arc;

use base64::Engine as _;
use keyhaven::lifecycle::KeyState;
use keyhaven::sign::{algorithm, PublicKey, PublicKeyResponse, Sign, SignResponse};
use keyhaven::wire::MAX_ENCRYPT_PLAINTEXT;
use keyhaven::KeyPath;
use sha2::Digest as _;

use super::datakey::{check_decrypt, check_decrypt_state, kek_ref, unknown_key};
use super::{key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::error::Error;
use crate::policy::{Access, Permission};
use crate::store::KeyRecord;

/// `sign` (`sign`) and `public_key` (`public-key`).
pub(super) const OPS: &[Route] = &[route::<Sign>(), route::<PublicKey>()];

impl Op for Sign {
    const ACCESS: Access = Access::Needs(Permission::Sign);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        cx.allow(key_target(&path))?;
        sign(cx.d, path, self, cx.s).await
    }
}

impl Op for PublicKey {
    const ACCESS: Access = Access::Needs(Permission::PublicKey);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        if self.version == Some(0) {
            return Err(Error::BadRequest("field `version`: key versions start at 1".into()));
        }
        cx.allow(key_target(&path))?;
        public_key(cx.d, path, self, cx.s)
    }
}

/// Refuses a key that is not a signing key.
fn require_signing(rec: &KeyRecord, path: &KeyPath, op: &str) -> Result<(), Error> {
    if rec.key_type.is_signing() {
        Ok(())
    } else {
        Err(Error::WrongKeyType(format!(
            "key `{path}` is of type `{}`; `{op}` needs a signing key (`ecdsa-p256` or `ecdsa-p384`)",
            rec.key_type
        )))
    }
}

/// `sign` of a checked request with the current version of `path`.
async fn sign(d: &Arc<Daemon>, path: KeyPath, req: Sign, s: &mut Subject) -> Result<Reply, Error> {
    let input = match (req.message, req.digest) {
        (Some(m), None) => {
            if m.len() > MAX_ENCRYPT_PLAINTEXT {
                return Err(Error::InputTooLarge(format!(
                    "message of {} bytes is over the `sign` limit of {MAX_ENCRYPT_PLAINTEXT} bytes; sign its digest (`digest`) instead",
                    m.len()
                )));
            }
            Ok(m)
        }
        (None, Some(dg)) => Err(dg),
        _ => return Err(Error::BadRequest("give exactly one of the fields `message` and `digest`".into())),
    };
    d.revocations.check(&path, None, None)?;
    let rec = d.store.key(&path)?.ok_or_else(|| unknown_key(&path))?;
    require_signing(&rec, &path, "sign")?;
    let digest_len = rec.key_type.digest_len().unwrap_or(32);
    let digest: Vec<u8> = match input {
        Ok(m) if digest_len == 48 => sha2::Sha384::digest(m.expose()).to_vec(),
        Ok(m) => sha2::Sha256::digest(m.expose()).to_vec(),
        Err(dg) if dg.len() == digest_len => dg.expose().to_vec(),
        Err(dg) => {
            return Err(Error::BadRequest(format!(
                "field `digest`: {} bytes; a `{}` key signs {digest_len}-byte digests",
                dg.len(),
                rec.key_type
            )))
        }
    };
    match rec.state {
        KeyState::Enabled => {}
        KeyState::Disabled => {
            return Err(Error::KeyDisabled(format!("key `{path}` is disabled: it makes no new signatures")))
        }
        other => check_decrypt_state(&rec, &path, other)?,
    }
    let version = rec.current_version;
    d.revocations.check(&path, Some(version), None)?;
    let key = kek_ref(&rec, &path, version)?;
    s.version = Some(version);
    let raw = d.hsm.run_for(path.tenant(), move |w| w.sign_digest(&key, &digest)).await?;
    let der = crate::hsm::signing::signature_der(&raw)
        .ok_or_else(|| Error::Internal(format!("the token gave a {}-byte ECDSA signature", raw.len())))?;
    let resp = SignResponse {
        signature: base64::engine::general_purpose::STANDARD.encode(der),
        key_version: version,
        algorithm: algorithm(rec.key_type).unwrap_or_default().into(),
    };
    reply(&resp, 0)
}

/// `public_key` of a version of `path` (current by default): refused
/// under revocation and once the version is retired or destroyed, like any
/// use of it.
fn public_key(d: &Arc<Daemon>, path: KeyPath, req: PublicKey, s: &mut Subject) -> Result<Reply, Error> {
    d.revocations.check(&path, None, None)?;
    let rec = d.store.key(&path)?.ok_or_else(|| unknown_key(&path))?;
    require_signing(&rec, &path, "public_key")?;
    let version = req.version.unwrap_or(rec.current_version);
    s.version = Some(version);
    d.revocations.check(&path, Some(version), None)?;
    check_decrypt(&rec, &path, version)?;
    kek_ref(&rec, &path, version)?;
    let spki = rec
        .version(version)
        .and_then(|v| v.public_key.as_deref())
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| {
            Error::Integrity(format!("key `{path}` version {version} has no stored public key"))
        })?;
    reply(
        &PublicKeyResponse {
            pem: crate::hsm::signing::pem(&spki),
            key_version: version,
            key_type: rec.key_type,
        },
        0,
    )
}
