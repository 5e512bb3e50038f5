//! Bring your own key: `key_import_params` and `key_import` (PROTOCOL.md
//! §3.35–3.36; the customer's side in OPERATIONS.md §16).
//!
//! The import parameters (a one-time RSA-3072 wrapping key, its private
//! key wrapped under the master key) are held in this daemon's memory
//! only, never in the store: an import token is single use, expires after
//! [`IMPORT_TTL_SECS`], is bound to one key path and type, and a restart
//! forgets every one (ask again). So the wrapping private key exists
//! nowhere a PIN holder could later find it, even wrapped.
//!
//! An attempt that reaches the token consumes the import token, whatever
//! its outcome: one wrapping key never unwraps twice, so a caller cannot
//! use the daemon's answers as an RSA decryption oracle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use keyhaven::import::{KeyImport, KeyImportParams, KeyImportParamsResponse, Origin, WrappingAlgorithm};
use keyhaven::lifecycle::KeyState;
use keyhaven::{KeyPath, KeyType};

use super::{blocking, key_target, reply, route, Cx, Daemon, Op, Reply, Route};
use crate::audit::Subject;
use crate::clock::now_unix;
use crate::error::Error;
use crate::hsm::import::WrappingKey;
use crate::hsm::worker::Generated;
use crate::policy::{Access, Permission};
use crate::store::KeyRecord;

/// How long an import token is good for at most (and by default): 24 hours.
pub const IMPORT_TTL_SECS: u64 = 24 * 3600;
/// Most import tokens outstanding at once (each holds a wrapped RSA key).
pub const MAX_PENDING: usize = 1000;
/// Prefix of an import token.
const TOKEN_PREFIX: &str = "khi1.";
/// Largest wrapped material accepted: an RSA-3072 block and a wrapped
/// 32-byte key with room to spare.
const MAX_WRAPPED: usize = 1024;

/// One outstanding import.
struct Pending {
    path: KeyPath,
    key_type: KeyType,
    expires_at: u64,
    key: Arc<WrappingKey>,
}

/// The outstanding import tokens, by token.
#[derive(Default)]
pub struct PendingImports(Mutex<HashMap<String, Pending>>);

impl PendingImports {
    /// Takes the import token `token` for `path`: refused (and left in
    /// place) when it is for another key; consumed otherwise.
    fn take(&self, token: &str, path: &KeyPath, now: u64) -> Result<(KeyType, Arc<WrappingKey>), Error> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let unknown = || {
            Error::BadRequest(
                "field `import_token`: unknown or already used (an import token is single use, and a restart \
                 of the daemon forgets them all): ask for new import parameters"
                    .into(),
            )
        };
        let p = map.get(token).ok_or_else(unknown)?;
        if p.expires_at <= now {
            let ago = now - p.expires_at;
            map.remove(token);
            return Err(Error::BadRequest(format!(
                "field `import_token`: expired {ago} s ago: ask for new import parameters"
            )));
        }
        if &p.path != path {
            return Err(Error::BadRequest(format!(
                "field `import_token`: it was issued for key `{}`, not `{path}`",
                p.path
            )));
        }
        let p = map.remove(token).ok_or_else(unknown)?;
        Ok((p.key_type, p.key))
    }

    /// Adds an import token, after dropping the expired ones.
    fn put(&self, token: String, pending: Pending, now: u64) -> Result<(), Error> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, p| p.expires_at > now);
        if map.len() >= MAX_PENDING {
            return Err(Error::Busy(format!(
                "{MAX_PENDING} import tokens are outstanding; use or let some expire first"
            )));
        }
        map.insert(token, pending);
        Ok(())
    }
}

/// `key_import_params` and `key_import` (`import`).
pub(super) const OPS: &[Route] = &[route::<KeyImportParams>(), route::<KeyImport>()];

impl Op for KeyImportParams {
    const ACCESS: Access = Access::Needs(Permission::Import);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = KeyPath::new(&self.tenant, &self.key)?;
        cx.s.key(&path);
        cx.allow(key_target(&path))?;
        params(cx.d, path, self).await
    }
}

impl Op for KeyImport {
    const ACCESS: Access = Access::Needs(Permission::Import);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let path = KeyPath::new(&self.tenant, &self.key)?;
        cx.s.key(&path);
        cx.allow(key_target(&path))?;
        import(cx.d, path, self, cx.s).await
    }
}

/// Whether `path` may receive imported material of `key_type`: a new key,
/// or an imported key of that type that can still change.
fn check_target(rec: Option<&KeyRecord>, path: &KeyPath, key_type: KeyType) -> Result<(), Error> {
    let Some(rec) = rec else { return Ok(()) };
    if rec.origin != Origin::External {
        return Err(Error::AlreadyExists(format!(
            "key `{path}` exists and its material was generated in the token; import makes a new key, or a \
             new version of an imported key"
        )));
    }
    if rec.key_type != key_type {
        return Err(Error::WrongKeyType(format!(
            "key `{path}` is of type `{}`, not `{key_type}`",
            rec.key_type
        )));
    }
    if matches!(rec.state, KeyState::PendingDeletion | KeyState::Deleted) {
        return Err(Error::KeyDisabled(format!(
            "key `{path}` is {}; it cannot change",
            rec.state.as_str().replace('_', " ")
        )));
    }
    Ok(())
}

/// `key_import_params`: a wrapping key pair made in the token.
async fn params(d: &Arc<Daemon>, path: KeyPath, req: KeyImportParams) -> Result<Reply, Error> {
    let key_type = req.key_type;
    let ttl = req.expires_in_secs.unwrap_or(IMPORT_TTL_SECS);
    if !(1..=IMPORT_TTL_SECS).contains(&ttl) {
        return Err(Error::BadRequest(format!(
            "field `expires_in_secs`: {ttl} is out of range: 1 to {IMPORT_TTL_SECS} (24 hours)"
        )));
    }
    if !matches!(key_type, KeyType::Aes256Gcm | KeyType::HmacSha256) {
        return Err(Error::BadRequest(format!(
            "field `type`: keys of type `{key_type}` cannot be imported; `aes256-gcm` or `hmac-sha256` can"
        )));
    }
    d.revocations.check(&path, None, None)?;
    let rec = d.store.backend().key(&path).await?;
    check_target(rec.as_deref(), &path, key_type)?;
    let (key, id) = d
        .hsm
        .run_for(path.tenant(), |w| {
            let key = w.import_key_pair()?;
            Ok((key, w.random_id()?))
        })
        .await?;
    let token = format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id));
    let now = now_unix();
    let expires_at = now + ttl;
    let public_key = crate::hsm::signing::pem(&key.spki);
    d.imports.put(token.clone(), Pending { path, key_type, expires_at, key: Arc::new(key) }, now)?;
    reply(
        &KeyImportParamsResponse {
            public_key,
            import_token: token,
            expires_at,
            key_type,
            algorithms: WrappingAlgorithm::ALL.to_vec(),
        },
        0,
    )
}

/// `key_import`: unwraps the material in the token and stores it as version
/// 1 of a new key or the next version of an imported one.
async fn import(d: &Arc<Daemon>, path: KeyPath, req: KeyImport, s: &mut Subject) -> Result<Reply, Error> {
    if !req.import_token.starts_with(TOKEN_PREFIX) || req.import_token.len() > 64 {
        return Err(Error::BadRequest(format!(
            "field `import_token`: not an import token (they start with `{TOKEN_PREFIX}`)"
        )));
    }
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(req.wrapped.trim())
        .map_err(|e| Error::BadRequest(format!("field `wrapped`: not standard base64: {e}")))?;
    if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED {
        return Err(Error::BadRequest(format!(
            "field `wrapped`: {} bytes; wrapped key material is 384 bytes (RSA-OAEP) or 384 + 40 \
             (RSA_AES_KEY_WRAP), at most {MAX_WRAPPED}",
            wrapped.len()
        )));
    }
    d.revocations.check(&path, None, None)?;
    let (key_type, key) = d.imports.take(&req.import_token, &path, now_unix())?;
    let rec = d.store.backend().key(&path).await?;
    check_target(rec.as_deref(), &path, key_type)?;
    let algorithm = req.algorithm;
    let outcome =
        d.hsm.run_for(path.tenant(), move |w| w.import_material(&key, algorithm, &wrapped, key_type)).await?;
    let (wrapped_kek, master_key_version) = outcome.map_err(|r| {
        Error::BadRequest(format!(
            "field `wrapped`: {} (the import token is used up: ask for new import parameters)",
            r.0
        ))
    })?;
    let generated = Generated { wrapped: wrapped_kek, public_key: None };
    let now = now_unix();
    s.change.detail = Some(format!("imported key material (origin external), wrapped with {algorithm}"));
    let (before, after) = match rec {
        None => {
            let mut version = super::lifecycle::new_version(1, now, master_key_version, generated);
            version.origin = Origin::External;
            let rec = KeyRecord {
                tenant: path.tenant().into(),
                key: path.key().into(),
                created_at: now,
                current_version: 1,
                versions: vec![version],
                state: KeyState::Enabled,
                min_decryption_version: 1,
                rotate_every_secs: None,
                deletion_at: None,
                key_type,
                created_with: None,
                origin: Origin::External,
                description: None,
                tags: Default::default(),
            };
            let stored = rec.clone();
            blocking(d, move |store| Ok(store.create_key(&stored)?)).await?;
            (None, rec)
        }
        Some(_) => {
            let p = path.clone();
            blocking(d, move |store| {
                let mut refused = None;
                let mut was = None;
                let written = store.update_key(&p, &mut |rec| {
                    if let Err(e) = check_target(Some(rec), &p, key_type) {
                        refused = Some(e);
                        return;
                    }
                    was = Some(rec.clone());
                    let next =
                        rec.versions.iter().map(|v| v.version).max().unwrap_or(0).max(rec.current_version)
                            + 1;
                    let mut version =
                        super::lifecycle::new_version(next, now, master_key_version, generated.clone());
                    version.origin = Origin::External;
                    rec.versions.push(version);
                    rec.current_version = next;
                })?;
                match (refused, written) {
                    (Some(e), _) => Err(e),
                    (None, Some(rec)) => Ok((was, rec)),
                    (None, None) => Err(Error::NotFound(format!("unknown key `{p}`"))),
                }
            })
            .await?
        }
    };
    s.version = Some(after.current_version);
    s.change.before = before.as_ref().map(super::lifecycle::settings_json);
    s.change.after = Some(super::lifecycle::settings_json(&after));
    tracing::info!(key = %path, version = after.current_version, key_type = %key_type, "key material imported");
    reply(&super::lifecycle::details(&after, &d.revocations), 0)
}
