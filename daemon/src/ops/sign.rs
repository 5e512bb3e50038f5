//! Signatures under ECDSA and RSA-PSS keys: `sign`, `public_key` and `verify`
//! (PROTOCOL.md §3.31–3.32, §3.34).
//!
//! Each version's private key is made in the token and stored wrapped
//! (`hsm::ec`); it signs in the token with CKM_ECDSA over a digest the
//! daemon computes (SHA-256 for P-256, SHA-384 for P-384: SoftHSM2 2.6.1
//! offers CKM_ECDSA but not the hash-and-sign mechanisms, `hsm::signing`,
//! and the result is the same signature) or the caller gives. An
//! `rsa-3072-pss` key (`hsm::rsa`) signs a message with
//! CKM_SHA256_RSA_PKCS_PSS and a digest with CKM_RSA_PKCS_PSS. The public key
//! is stored with the version and served as PEM; `verify` loads it into the
//! token and checks a signature there (`hsm::verify`).

use std::sync::Arc;

use base64::Engine as _;
use keyhaven::lifecycle::KeyState;
use keyhaven::sign::{algorithm, PublicKey, PublicKeyResponse, Sign, SignResponse, Verify, VerifyResponse};
use keyhaven::wire::{SecretBytes, MAX_ENCRYPT_PLAINTEXT};
use keyhaven::{KeyPath, KeyType};
use sha2::Digest as _;

use super::datakey::{check_decrypt, check_decrypt_state, kek_ref, unknown_key};
use super::{key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::error::Error;
use crate::policy::{Access, Permission};
use crate::store::KeyRecord;

/// `sign` (`sign`), `public_key` (`public-key`) and `verify` (`verify`).
pub(super) const OPS: &[Route] = &[route::<Sign>(), route::<PublicKey>(), route::<Verify>()];

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
        public_key(cx.d, path, self, cx.s).await
    }
}

impl Op for Verify {
    const ACCESS: Access = Access::Needs(Permission::Verify);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        if self.version == Some(0) {
            return Err(Error::BadRequest("field `version`: key versions start at 1".into()));
        }
        cx.s.version = self.version;
        cx.allow(key_target(&path))?;
        verify(cx.d, path, self, cx.s).await
    }
}

/// Refuses a key that is not a signing key.
fn require_signing(rec: &KeyRecord, path: &KeyPath, op: &str) -> Result<(), Error> {
    if rec.key_type.is_signing() {
        Ok(())
    } else {
        Err(Error::WrongKeyType(format!(
            "key `{path}` is of type `{}`; `{op}` needs a signing key (`ecdsa-p256`, `ecdsa-p384` or `rsa-3072-pss`)",
            rec.key_type
        )))
    }
}

/// The message or the digest of a `sign` or `verify` request: exactly one,
/// the message within the size limit (`Err` holds a digest).
fn message_or_digest(
    message: Option<SecretBytes>,
    digest: Option<SecretBytes>,
    op: &str,
) -> Result<Result<SecretBytes, SecretBytes>, Error> {
    match (message, digest) {
        (Some(m), None) => {
            if m.len() > MAX_ENCRYPT_PLAINTEXT {
                return Err(Error::InputTooLarge(format!(
                    "message of {} bytes is over the `{op}` limit of {MAX_ENCRYPT_PLAINTEXT} bytes; give its digest (`digest`) instead",
                    m.len()
                )));
            }
            Ok(Ok(m))
        }
        (None, Some(dg)) => Ok(Err(dg)),
        _ => Err(Error::BadRequest("give exactly one of the fields `message` and `digest`".into())),
    }
}

/// The digest a `key_type` key signs: the message hashed with the type's
/// hash, or the caller's digest when it has that hash's length.
fn digest_of(key_type: KeyType, input: Result<SecretBytes, SecretBytes>) -> Result<Vec<u8>, Error> {
    let digest_len = key_type.digest_len().unwrap_or(32);
    match input {
        Ok(m) if digest_len == 48 => Ok(sha2::Sha384::digest(m.expose()).to_vec()),
        Ok(m) => Ok(sha2::Sha256::digest(m.expose()).to_vec()),
        Err(dg) if dg.len() == digest_len => Ok(dg.expose().to_vec()),
        Err(dg) => Err(Error::BadRequest(format!(
            "field `digest`: {} bytes; a `{key_type}` key signs {digest_len}-byte digests",
            dg.len()
        ))),
    }
}

/// `sign` of a checked request with the current version of `path`.
async fn sign(d: &Arc<Daemon>, path: KeyPath, req: Sign, s: &mut Subject) -> Result<Reply, Error> {
    let input = message_or_digest(req.message, req.digest, "sign")?;
    d.revocations.check(&path, None, None)?;
    // The backend's own future: a PostgreSQL store answers on its runtime
    // while this task waits, without holding an async thread.
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    require_signing(&rec, &path, "sign")?;
    // An RSA key hashes a message in the token (CKM_SHA256_RSA_PKCS_PSS).
    let rsa_message = match &input {
        Ok(m) if rec.key_type.is_rsa() => Some(m.clone()),
        _ => None,
    };
    let digest = digest_of(rec.key_type, input)?;
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
    let raw = match rsa_message {
        Some(m) => d.hsm.run_for(path.tenant(), move |w| w.sign_message_pss(&key, m.expose())).await?,
        None => d.hsm.run_for(path.tenant(), move |w| w.sign_digest(&key, &digest)).await?,
    };
    let der = if rec.key_type.is_rsa() {
        raw
    } else {
        crate::hsm::signing::signature_der(&raw)
            .ok_or_else(|| Error::Internal(format!("the token gave a {}-byte ECDSA signature", raw.len())))?
    };
    let resp = SignResponse {
        signature: base64::engine::general_purpose::STANDARD.encode(der),
        key_version: version,
        algorithm: algorithm(rec.key_type).unwrap_or_default().into(),
    };
    reply(&resp, 0)
}

/// `verify` of a checked request: the signature against the public key of
/// the version it names (current by default), in the token. Refused like
/// `public_key` under revocation and once the version is retired; a
/// signature that is not one of this key type's is `valid: false`.
async fn verify(d: &Arc<Daemon>, path: KeyPath, req: Verify, s: &mut Subject) -> Result<Reply, Error> {
    let input = message_or_digest(req.message, req.digest, "verify")?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(req.signature.trim())
        .map_err(|_| Error::BadRequest("field `signature`: not standard base64".into()))?;
    d.revocations.check(&path, None, None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    require_signing(&rec, &path, "verify")?;
    let digest = digest_of(rec.key_type, input)?;
    let version = req.version.unwrap_or(rec.current_version);
    s.version = Some(version);
    d.revocations.check(&path, Some(version), None)?;
    check_decrypt(&rec, &path, version)?;
    let key = kek_ref(&rec, &path, version)?;
    let spki = stored_public_key(&rec, &path, version)?;
    let key_type = rec.key_type;
    let n = key_type.digest_len().unwrap_or(32);
    let valid = if key_type.is_rsa() {
        d.hsm.run_for(path.tenant(), move |w| w.verify_pss(key_type, &spki, &digest, &signature)).await?
    } else {
        match keyhaven::jose::raw_signature(&signature, n) {
            Ok(raw) => {
                d.hsm.run_for(path.tenant(), move |w| w.verify_ecdsa(key_type, &spki, &digest, &raw)).await?
            }
            Err(_) => false,
        }
    };
    // A verification keeps an old version needed, as a decryption does.
    d.usage.decrypted(&key.id, crate::clock::now_unix());
    let resp = VerifyResponse {
        valid,
        key_version: version,
        algorithm: algorithm(key_type).unwrap_or_default().into(),
    };
    reply(&resp, 0)
}

/// The DER SubjectPublicKeyInfo stored with `version` of `rec`.
fn stored_public_key(rec: &KeyRecord, path: &KeyPath, version: u32) -> Result<Vec<u8>, Error> {
    rec.version(version)
        .and_then(|v| v.public_key.as_deref())
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| Error::Integrity(format!("key `{path}` version {version} has no stored public key")))
}

/// `public_key` of a version of `path` (current by default): refused
/// under revocation and once the version is retired or destroyed, like any
/// use of it.
async fn public_key(d: &Arc<Daemon>, path: KeyPath, req: PublicKey, s: &mut Subject) -> Result<Reply, Error> {
    d.revocations.check(&path, None, None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    if !rec.key_type.has_public_key() {
        return Err(Error::WrongKeyType(format!(
            "key `{path}` is of type `{}`; `public_key` needs a key pair (a signing key or `rsa-4096-oaep`)",
            rec.key_type
        )));
    }
    let version = req.version.unwrap_or(rec.current_version);
    s.version = Some(version);
    d.revocations.check(&path, Some(version), None)?;
    check_decrypt(&rec, &path, version)?;
    kek_ref(&rec, &path, version)?;
    let spki = stored_public_key(&rec, &path, version)?;
    reply(
        &PublicKeyResponse {
            pem: crate::hsm::signing::pem(&spki),
            key_version: version,
            key_type: rec.key_type,
        },
        0,
    )
}
