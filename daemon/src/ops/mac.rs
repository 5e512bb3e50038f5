//! MACs under `hmac-sha256` keys: `mac` and `mac_verify` (PROTOCOL.md
//! §3.29–3.30).
//!
//! An HMAC key version is stored and loaded like a KEK (generated in the
//! token, wrapped under the master key, unwrapped as a sensitive,
//! non-extractable session object); the MAC is computed and compared in the
//! token (CKM_SHA256_HMAC, C_Sign and C_Verify). A tag names the version it
//! was made under ([`MacTag`]), so tags of older versions verify until the
//! version is retired (below the minimum decryption version), trimmed or
//! destroyed.

use std::sync::Arc;

use keyhaven::lifecycle::KeyState;
use keyhaven::mac::{Mac, MacResponse, MacTag, MacVerify, MacVerifyResponse, MAC_LEN, MAX_MAC_MESSAGE};
use keyhaven::{KeyPath, KeyType};

use super::datakey::{check_decrypt, check_decrypt_state, kek_ref, unknown_key};
use super::{key_target, reply, require_type, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::error::Error;
use crate::policy::{Access, Permission};

/// `mac` (`mac`) and `mac_verify` (`mac-verify`).
pub(super) const OPS: &[Route] = &[route::<Mac>(), route::<MacVerify>()];

impl Op for Mac {
    const ACCESS: Access = Access::Needs(Permission::Mac);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        if self.version == Some(0) {
            return Err(Error::BadRequest("field `version`: key versions start at 1".into()));
        }
        cx.allow(key_target(&path))?;
        mac(cx.d, path, self, cx.s).await
    }
}

impl Op for MacVerify {
    const ACCESS: Access = Access::Needs(Permission::MacVerify);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = cx.key_path(&self.tenant, &self.key).await?;
        let tag: MacTag =
            self.tag.parse().map_err(|e: keyhaven::Error| Error::BadRequest(format!("field `tag`: {e}")))?;
        cx.s.version = Some(tag.version);
        cx.allow(key_target(&path))?;
        verify(cx.d, path, self, tag).await
    }
}

fn check_size(len: usize) -> Result<(), Error> {
    if len > MAX_MAC_MESSAGE {
        return Err(Error::InputTooLarge(format!(
            "message of {len} bytes is over the MAC limit of {MAX_MAC_MESSAGE} bytes; MAC a digest of it instead"
        )));
    }
    Ok(())
}

/// `mac` of a checked request under `path`.
async fn mac(d: &Arc<Daemon>, path: KeyPath, req: Mac, s: &mut Subject) -> Result<Reply, Error> {
    check_size(req.message.len())?;
    // Revocation before the keyring: a refusal must not say whether a key exists.
    d.revocations.check(&path, None, None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    require_type(&rec, &path, KeyType::HmacSha256, "mac")?;
    match rec.state {
        KeyState::Enabled => {}
        KeyState::Disabled => {
            return Err(Error::KeyDisabled(format!(
                "key `{path}` is disabled: it makes no new MAC tags (existing ones still verify)"
            )))
        }
        other => check_decrypt_state(&rec, &path, other)?,
    }
    let version = req.version.unwrap_or(rec.current_version);
    d.revocations.check(&path, Some(version), None)?;
    check_decrypt(&rec, &path, version)?;
    let key = kek_ref(&rec, &path, version)?;
    s.version = Some(version);
    let message = req.message;
    let mac = d.hsm.run_short(path.tenant(), move |w| w.mac(&key, message.expose())).await?;
    let mac: [u8; MAC_LEN] = mac.as_slice().try_into().map_err(|_| {
        Error::Internal(format!("HMAC-SHA256 returned {} bytes, expected {MAC_LEN}", mac.len()))
    })?;
    reply(&MacResponse { tag: MacTag { version, mac }.to_string(), key_version: version }, 0)
}

/// `mac_verify` of a checked request: the tag against the version it names.
async fn verify(d: &Arc<Daemon>, path: KeyPath, req: MacVerify, tag: MacTag) -> Result<Reply, Error> {
    check_size(req.message.len())?;
    d.revocations.check(&path, Some(tag.version), None)?;
    let rec = d.store.backend().key(&path).await?.ok_or_else(|| unknown_key(&path))?;
    require_type(&rec, &path, KeyType::HmacSha256, "mac_verify")?;
    check_decrypt(&rec, &path, tag.version)?;
    let key = kek_ref(&rec, &path, tag.version)?;
    let id = key.id.clone();
    let message = req.message;
    let valid = d.hsm.run_short(path.tenant(), move |w| w.mac_ok(&key, message.expose(), &tag.mac)).await?;
    // A verification is what keeps an old version needed, as a decryption
    // does for an AES key: it is counted in the same place.
    d.usage.decrypted(&id, crate::clock::now_unix());
    reply(&MacVerifyResponse { valid, key_version: id.version }, 0)
}
