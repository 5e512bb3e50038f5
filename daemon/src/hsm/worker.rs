//! An HSM worker: one thread that owns one logged-in session and the handles
//! it has loaded (master key versions, unwrapped KEKs as session objects).
//! Jobs arrive through the pool's bounded queue and run one at a time, so the
//! session (Send, not Sync) is never shared.

use std::collections::HashMap;
use std::sync::Arc;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keyhaven::envelope::{NONCE_LEN, TAG_LEN};
use keyhaven::KeyPath;
use zeroize::Zeroizing;

use super::confine;
use super::ec;
use super::error::integrity_or;
use super::token::{self, master_key_label};
use super::{HsmError, Job, Shared};

/// Which key-encryption key: a version of a named key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KekId {
    /// Tenant and key name.
    pub path: KeyPath,
    /// Version.
    pub version: u32,
}

/// A KEK as the store holds it: wrapped under a master key version.
#[derive(Clone)]
pub struct KekRef {
    /// Which KEK.
    pub id: KekId,
    /// The KEK wrapped with CKM_AES_KEY_WRAP under the master key.
    pub wrapped: Arc<[u8]>,
    /// The master key version that wrapped it.
    pub master_key_version: u32,
    /// What kind of key it is (the unwrap template and mechanisms follow).
    pub key_type: keyhaven::KeyType,
}

/// New key material for a version: its secret (or private key) wrapped
/// under a master key, and a signing key's public key (DER
/// SubjectPublicKeyInfo).
#[derive(Clone)]
pub struct Generated {
    /// The wrapped secret or private key.
    pub wrapped: Vec<u8>,
    /// The public key, for signing key types.
    pub public_key: Option<Vec<u8>>,
}

/// A KEK unwrapped in this worker's session.
struct LoadedKek {
    /// The wrapped material it came from (a key made again under the same
    /// name and version has other material: the handle is then stale).
    wrapped: Arc<[u8]>,
    handle: ObjectHandle,
    /// [`Worker::uses`] at its last use: the least recent goes first.
    used: u64,
}

/// One worker's state. Handles are valid only while `session` is the session
/// that loaded them; a lost session clears them all.
pub struct Worker {
    pub(super) shared: Arc<Shared>,
    session: Option<Session>,
    master_keys: HashMap<u32, ObjectHandle>,
    /// The KEKs loaded in `session`: at most this worker's share of
    /// `[hsm] loaded_keys` ([`Worker::kek_room`]).
    keks: HashMap<KekId, LoadedKek>,
    /// KEK uses so far, the clock of [`LoadedKek::used`].
    uses: u64,
    audit_key: Option<ObjectHandle>,
    lost: bool,
    /// The module's generation when `session` was opened ([`Shared`]).
    generation: u64,
    /// Whether this worker may re-initialise the module (a worker thread;
    /// not an I/O thread's session, which holds the module shared).
    may_reinit: bool,
}

impl Worker {
    /// Opens and logs in a session for a new worker.
    pub(super) fn new(shared: Arc<Shared>) -> Result<Worker, HsmError> {
        let mut w = Worker {
            shared,
            session: None,
            master_keys: HashMap::new(),
            keks: HashMap::new(),
            uses: 0,
            audit_key: None,
            lost: false,
            generation: 0,
            may_reinit: true,
        };
        w.session()?;
        Ok(w)
    }

    /// A worker for an I/O thread ([`super::inline`]): it never
    /// re-initialises the module.
    pub(super) fn for_io_thread(shared: Arc<Shared>) -> Result<Worker, HsmError> {
        let mut w = Worker::new(shared)?;
        w.may_reinit = false;
        Ok(w)
    }

    /// Whether the session was opened before the module was re-initialised:
    /// its handle, and its objects' handles, may now name another
    /// session's.
    pub(super) fn stale(&self) -> bool {
        self.session.is_some()
            && self.generation != self.shared.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs jobs until the queue closes.
    pub(super) fn run(mut self, jobs: Arc<super::queue::Queue<Job>>) {
        while let Some(job) = jobs.pop() {
            job(&mut self);
            self.after_job();
        }
        self.reset();
    }

    /// After each job: a session found lost is dropped, to be reopened by
    /// the next one.
    pub(super) fn after_job(&mut self) {
        if self.lost {
            tracing::warn!("HSM session lost; it will be reopened for the next request");
            self.reset();
        }
    }

    /// Runs `op`; when it fails because the session, the login or a cached
    /// handle is gone (the token went away and came back, the session was
    /// closed), drops the session and its handles, opens a new one, logs in
    /// and runs `op` once more, so the client sees no error. When the
    /// token has no room for another object, unloads this worker's KEKs
    /// and runs `op` once more; still no room is
    /// [`HsmError::TokenFull`], naming `[hsm] loaded_keys`. Every
    /// operation is safe to repeat: a failed one produced nothing.
    pub(super) fn retrying<T>(
        &mut self,
        op: impl Fn(&mut Worker) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        match op(self) {
            Err(e) if e.session_lost() => {
                tracing::warn!(error = %e, "HSM session lost; re-opening it and retrying the request once");
                self.reset();
                let r = op(self);
                if r.is_ok() {
                    tracing::info!("HSM session re-opened");
                }
                self.note(r)
            }
            Err(e) if e.out_of_room() => {
                let unloaded = self.unload_keks();
                tracing::warn!(
                    error = %e,
                    unloaded,
                    "the token has no room for another object; unloaded this worker's keys and retrying once"
                );
                let r = op(self).map_err(|e| match e.out_of_room() {
                    true => HsmError::TokenFull {
                        problem: format!(
                            "the token has no room for another object, even after this worker unloaded its \
                             {unloaded} loaded keys: free objects in the token, or lower `[hsm] loaded_keys` \
                             (now {}) so that the keys the daemon keeps loaded fit beside what else the token \
                             holds (docs/OPERATIONS.md §2)",
                            self.shared.loaded_keys
                        ),
                        source: Box::new(e),
                    },
                    false => e,
                });
                self.note(r)
            }
            r => self.note(r),
        }
    }

    /// Drops the session (and with it every session object) and the caches.
    pub(super) fn reset(&mut self) {
        self.master_keys.clear();
        crate::metrics::keks_unloaded(self.keks.len());
        self.keks.clear();
        self.audit_key = None;
        if self.stale() {
            // Closing it could close another session that now has its
            // handle; the module's re-initialisation ended it already.
            std::mem::forget(self.session.take());
        }
        self.session = None;
        self.lost = false;
    }

    /// How many KEKs this worker may keep loaded: its share of
    /// `[hsm] loaded_keys`.
    fn kek_room(&self) -> usize {
        let workers = self.shared.workers.load(std::sync::atomic::Ordering::Relaxed).max(1);
        (self.shared.loaded_keys / workers).max(1)
    }

    /// Destroys the session object of a loaded KEK; a failure closes the
    /// session after this job (which destroys every object it made).
    fn destroy_kek(&mut self, handle: ObjectHandle) {
        crate::metrics::keks_unloaded(1);
        if self.stale() {
            return;
        }
        if let Some(s) = &self.session {
            if let Err(e) = s.destroy_object(handle) {
                tracing::warn!(error = %e, "cannot destroy a KEK's session object; closing the session");
                self.lost = true;
            }
        }
    }

    /// Unloads every KEK of this worker; returns how many.
    fn unload_keks(&mut self) -> usize {
        let handles: Vec<ObjectHandle> = self.keks.drain().map(|(_, k)| k.handle).collect();
        for h in &handles {
            self.destroy_kek(*h);
        }
        handles.len()
    }

    /// Notes a lost session so that the next job reconnects.
    fn note<T>(&mut self, r: Result<T, HsmError>) -> Result<T, HsmError> {
        if let Err(e) = &r {
            if e.session_lost() {
                self.lost = true;
            }
        }
        r
    }

    pub(super) fn session(&mut self) -> Result<&Session, HsmError> {
        if self.session.is_none() {
            let sh = self.shared.clone();
            // The token first, re-initialising the module if need be, and
            // not under the login lock: an I/O thread's session waiting for
            // that lock holds the module shared, which a re-initialisation
            // waits for ([`Shared::in_module`]).
            let pkcs11 = sh.pkcs11();
            let (pkcs11, slot) = match token::find_token(&pkcs11, &sh.token_label) {
                Ok(slot) => (pkcs11, slot),
                Err(e) => {
                    if !self.may_reinit || !sh.reinitialise() {
                        return Err(e);
                    }
                    let pkcs11 = sh.pkcs11();
                    let slot = token::find_token(&pkcs11, &sh.token_label)?;
                    (pkcs11, slot)
                }
            };
            // One login at a time, and none after a refusal.
            let mut refused = sh.login_refused.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((kind, reason)) = &*refused {
                // Never try a refused PIN again by ourselves: that could lock the token.
                return Err(HsmError::Login {
                    label: sh.token_label.clone(),
                    kind: *kind,
                    reason: format!(
                        "{reason}; not retried: fix the PIN, then send SIGHUP (or restart) to try it once"
                    ),
                });
            }
            let pin = sh.pin.lock().unwrap_or_else(|e| e.into_inner());
            match token::open_session(&pkcs11, slot, &sh.token_label, &pin) {
                Ok(s) => {
                    self.session = Some(s);
                    self.generation = sh.generation.load(std::sync::atomic::Ordering::SeqCst);
                }
                Err(HsmError::Login { label, kind, reason }) => {
                    tracing::error!(
                        token = %label,
                        "HSM login refused: {reason}; no worker will try again until SIGHUP or a restart"
                    );
                    *refused = Some((kind, reason.clone()));
                    return Err(HsmError::Login { label, kind, reason });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.session.as_ref().expect("session just opened"))
    }

    /// Fills `buf` with random bytes from the token.
    pub fn random(&mut self, buf: &mut [u8]) -> Result<(), HsmError> {
        let r = self.session().and_then(|s| Ok(s.generate_random_slice(buf)?));
        if matches!(&r, Err(e) if e.session_lost()) {
            self.reset();
            let r = self.session().and_then(|s| Ok(s.generate_random_slice(buf)?));
            return self.note(r);
        }
        self.note(r)
    }

    /// 16 random bytes from the token: a new master key's `CKA_ID`.
    pub fn random_id(&mut self) -> Result<Vec<u8>, HsmError> {
        let mut id = vec![0u8; 16];
        self.random(&mut id)?;
        Ok(id)
    }

    /// A cheap call that proves the session and login still work.
    /// Looks the master key up afresh (not from the cache), so that a key
    /// deleted or a token gone since is noticed.
    pub fn probe(&mut self) -> Result<(), HsmError> {
        self.retrying(|w| {
            let current = w.shared.master_key_version.load(std::sync::atomic::Ordering::SeqCst);
            let label = master_key_label(&w.shared.master_key_label, current);
            // The session first: opening one finds the token (re-initialising
            // the module if need be); then the token must still be listed.
            w.session()?;
            token::find_token(&w.shared.pkcs11(), &w.shared.token_label)?;
            let s = w.session()?;
            s.get_session_info()?;
            let (h, id) = token::find_master_key(s, &label)?;
            w.shared.check_master_id(current, &label, &id)?;
            if w.master_keys.get(&current).is_some_and(|cached| *cached != h) {
                // The key was replaced (restored from a backup): drop stale handles.
                w.lost = true;
            }
            Ok(())
        })
    }

    pub(super) fn master_key(&mut self, version: u32) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = self.master_keys.get(&version) {
            return Ok(*h);
        }
        let label = master_key_label(&self.shared.master_key_label, version);
        let (h, id) = match token::find_master_key(self.session()?, &label) {
            Err(HsmError::KeyMissing { label }) => {
                // A session outlives the token's going away on some modules
                // (SoftHSM2), which then find no objects in it: say the
                // token is gone, not that the key was deleted (whose advice
                // is to restore it from a backup).
                if let Err(gone) = token::find_token(&self.shared.pkcs11(), &self.shared.token_label) {
                    self.lost = true;
                    return Err(gone);
                }
                return Err(HsmError::KeyMissing { label });
            }
            r => r?,
        };
        self.shared.check_master_id(version, &label, &id)?;
        self.master_keys.insert(version, h);
        Ok(h)
    }

    /// Finds the audit key, creating it when the token has none.
    pub fn ensure_audit_key(&mut self) -> Result<(), HsmError> {
        let shared = self.shared.clone();
        let r = self.session().and_then(|s| token::ensure_audit_key(s, &shared.audit_key_label));
        let h = self.note(r)?;
        self.audit_key = Some(h);
        Ok(())
    }

    fn audit_key(&mut self) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = self.audit_key {
            return Ok(h);
        }
        let shared = self.shared.clone();
        let label = &shared.audit_key_label;
        let h = token::find_audit_key(self.session()?, label)?
            .ok_or_else(|| HsmError::KeyMissing { label: label.clone() })?;
        self.audit_key = Some(h);
        Ok(h)
    }

    /// HMAC-SHA256 of `data` under the audit key, computed in the token.
    pub fn audit_mac(&mut self, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.retrying(|w| {
            w.audit_key().and_then(|k| Ok(w.session()?.sign(&Mechanism::Sha256Hmac, k, data)?))
        })
    }

    /// Whether `mac` is the HMAC-SHA256 of `data` under the audit key
    /// (C_Verify in the token).
    pub fn audit_mac_ok(&mut self, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        self.retrying(|w| w.audit_mac_ok_once(data, mac))
    }

    fn audit_mac_ok_once(&mut self, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        self.audit_key().and_then(|k| match self.session()?.verify(&Mechanism::Sha256Hmac, k, data, mac) {
            Ok(()) => Ok(true),
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::SignatureInvalid | cryptoki::error::RvError::SignatureLenRange,
                _,
            )) => Ok(false),
            Err(e) => Err(e.into()),
        })
    }

    /// Generates a new KEK in the token and returns it wrapped under the
    /// current master key. The plaintext KEK never leaves the token: it is
    /// created sensitive, wrapped, and destroyed; users of the KEK unwrap
    /// their own non-extractable copy.
    /// An HMAC key (`key_type` `hmac-sha256`) is made and wrapped the same
    /// way.
    pub fn generate_kek(&mut self, key_type: keyhaven::KeyType) -> Result<(Generated, u32), HsmError> {
        let version = self.shared.master_key_version.load(std::sync::atomic::Ordering::SeqCst);
        self.generate_kek_for(key_type, version).map(|w| (w, version))
    }

    /// Like [`generate_kek`](Self::generate_kek), under master key
    /// `mk_version` (a master-key rotation's target).
    pub fn generate_kek_for(
        &mut self,
        key_type: keyhaven::KeyType,
        mk_version: u32,
    ) -> Result<Generated, HsmError> {
        self.retrying(|w| w.generate_kek_under(key_type, mk_version))
    }

    fn generate_kek_under(
        &mut self,
        key_type: keyhaven::KeyType,
        mk_version: u32,
    ) -> Result<Generated, HsmError> {
        let mk = self.master_key(mk_version)?;
        let s = self.session()?;
        match key_type {
            keyhaven::KeyType::HmacSha256 => {
                Ok(Generated { wrapped: generate_wrapped_hmac(s, mk)?, public_key: None })
            }
            keyhaven::KeyType::EcdsaP256 | keyhaven::KeyType::EcdsaP384 => {
                ec::generate_wrapped(s, mk, key_type)
            }
            keyhaven::KeyType::RsaPss3072 | keyhaven::KeyType::RsaOaep4096 => {
                super::rsa::generate_wrapped(s, mk, key_type)
            }
            _ => Ok(Generated { wrapped: generate_wrapped(s, mk)?, public_key: None }),
        }
    }

    /// A signature of `digest` by a signing key version's private key, in
    /// the token: ECDSA (`r || s`, CKM_ECDSA) or RSASSA-PSS
    /// (CKM_RSA_PKCS_PSS, [`rsa::pss_params`](super::rsa::pss_params)).
    pub fn sign_digest(&mut self, key: &KekRef, digest: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mechanism = if key.key_type.is_rsa() {
            Mechanism::RsaPkcsPss(super::rsa::pss_params())
        } else {
            Mechanism::Ecdsa
        };
        self.retrying(|w| {
            let h = w.kek(key)?;
            Ok(w.session()?.sign(&mechanism, h, digest)?)
        })
    }

    /// The data key of a `khp1:` ciphertext: `wrapped` decrypted with
    /// RSA-OAEP ([`rsa::oaep`](super::rsa::oaep)) by an `rsa-4096-oaep`
    /// version's private key, in the token. A wrapped key that does not
    /// decrypt is [`HsmError::Integrity`].
    pub fn oaep_decrypt(&mut self, key: &KekRef, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.retrying(|w| {
            let h = w.kek(key)?;
            let plain = w.session()?.decrypt(&super::rsa::oaep(), h, wrapped).map_err(|e| {
                integrity_or(
                    e,
                    "the wrapped data key does not decrypt: it was altered, or it is for another key",
                )
            })?;
            Ok(Zeroizing::new(plain))
        })
    }

    /// An RSASSA-PSS signature of `message` (hashed in the token,
    /// CKM_SHA256_RSA_PKCS_PSS) by an RSA signing key version.
    pub fn sign_message_pss(&mut self, key: &KekRef, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mechanism = Mechanism::Sha256RsaPkcsPss(super::rsa::pss_params());
        self.retrying(|w| {
            let h = w.kek(key)?;
            Ok(w.session()?.sign(&mechanism, h, message)?)
        })
    }

    /// Makes master key `version` in the token with `CKA_ID` `id` and
    /// returns its canary (see [`MasterKeyPin`](crate::store::MasterKeyPin)).
    /// A key already under its label is adopted only with `adopt` (the
    /// store recorded making it, and a rotation is resuming) and only when
    /// it carries `id`; otherwise it is refused as possibly planted.
    pub fn make_master_key(&mut self, version: u32, id: &[u8], adopt: bool) -> Result<Vec<u8>, HsmError> {
        let label = master_key_label(&self.shared.master_key_label, version);
        let r = (|| {
            let s = self.session()?;
            let found = s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
            if found.is_empty() {
                token::create_master_key(s, &label, id)?;
            } else if !adopt {
                return Err(HsmError::MasterKeyMismatch {
                    label: label.clone(),
                    reason:
                        "an object carries this label, but the store never recorded making it (it may have \
                             been planted by someone with the PIN); refusing to adopt it. Inspect it with \
                             pkcs11-tool --list-objects, delete it if it is not yours, and rotate again"
                            .into(),
                });
            }
            let (h, found_id) = token::find_master_key(s, &label)?;
            if found_id != id {
                return Err(HsmError::MasterKeyMismatch {
                    label: label.clone(),
                    reason: "its CKA_ID is not the one the store recorded for the key it was making; \
                             refusing to adopt it"
                        .into(),
                });
            }
            Ok(h)
        })();
        let h = self.note(r)?;
        self.master_keys.insert(version, h);
        self.shared.master_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(version, id.to_vec());
        self.make_canary(h)
    }

    /// Pins an existing master key version (a store from before pinning):
    /// its attributes are checked as for every use, and its `CKA_ID` and a
    /// new canary are returned for the store.
    pub fn pin_master_key(&mut self, version: u32) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
        let label = master_key_label(&self.shared.master_key_label, version);
        let r = self.session().and_then(|s| token::find_master_key(s, &label));
        let (h, id) = self.note(r)?;
        self.master_keys.insert(version, h);
        self.shared.master_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(version, id.clone());
        Ok((id, self.make_canary(h)?))
    }

    /// A random AES key made in the token and wrapped under master key `mk`.
    fn make_canary(&mut self, mk: ObjectHandle) -> Result<Vec<u8>, HsmError> {
        let r = self.session().and_then(|s| generate_wrapped(s, mk));
        self.note(r)
    }

    /// Checks master key `version` against its pin: the same `CKA_ID`, and
    /// its canary unwraps (the same key material). Then asks the token to
    /// unwrap the canary as an extractable, non-sensitive key, which the
    /// master key's unwrap template forbids: returns whether the token
    /// refused (it enforces the confinement of KEKs) or not (a master key
    /// from before confinement, or a token that ignores unwrap templates).
    pub fn check_master_key(&mut self, version: u32, id: &[u8], canary: &[u8]) -> Result<bool, HsmError> {
        let label = master_key_label(&self.shared.master_key_label, version);
        self.shared.master_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(version, id.to_vec());
        self.master_keys.remove(&version);
        let r = (|| {
            let mk = self.master_key(version)?;
            let s = self.session()?;
            match s.unwrap_key(&Mechanism::AesKeyWrap, mk, canary, &confine::kek_unwrap_template()) {
                Ok(h) => s.destroy_object(h)?,
                Err(cryptoki::error::Error::Pkcs11(rv, _)) if !lost_session(rv) => {
                    return Err(HsmError::MasterKeyMismatch {
                        label: label.clone(),
                        reason: format!(
                            "it does not unwrap the canary the store made under it ({rv}): the key under this \
                             label is another key than the one the store's KEKs are wrapped under. Restore \
                             the right key from the HSM's backup"
                        ),
                    })
                }
                Err(e) => return Err(e.into()),
            }
            match s.unwrap_key(&Mechanism::AesKeyWrap, mk, canary, &confine::forbidden_unwrap_template()) {
                Ok(h) => {
                    s.destroy_object(h)?;
                    Ok(false)
                }
                Err(cryptoki::error::Error::Pkcs11(rv, _)) if !lost_session(rv) => Ok(true),
                Err(e) => Err(e.into()),
            }
        })();
        self.note(r)
    }

    /// Destroys master key `version` in the token. Returns false when no
    /// object carries its label.
    pub fn destroy_master_key(&mut self, version: u32) -> Result<bool, HsmError> {
        let label = master_key_label(&self.shared.master_key_label, version);
        self.master_keys.remove(&version);
        self.shared.master_ids.lock().unwrap_or_else(|e| e.into_inner()).remove(&version);
        let r = (|| {
            let s = self.session()?;
            let found = s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
            for h in &found {
                s.destroy_object(*h)?;
            }
            Ok(!found.is_empty())
        })();
        self.note(r)
    }

    /// Forgets the cached handle of master key `version` (another worker
    /// destroyed it).
    pub fn forget_master_key(&mut self, version: u32) {
        self.master_keys.remove(&version);
    }

    /// Destroys the loaded copies of the KEKs that `covered` selects (on
    /// revocation), so that nothing in the token can use them any more.
    pub fn evict(&mut self, covered: &dyn Fn(&KekId) -> bool) -> usize {
        let ids: Vec<KekId> = self.keks.keys().filter(|id| covered(id)).cloned().collect();
        for id in &ids {
            if let Some(k) = self.keks.remove(id) {
                // Closing the session (on a failure) destroys every object it made.
                self.destroy_kek(k.handle);
            }
        }
        ids.len()
    }

    /// The session handle of a KEK, unwrapping it on first use. When this
    /// worker holds its share of `[hsm] loaded_keys` already, the least
    /// recently used KEK is unloaded first.
    fn kek(&mut self, kek: &KekRef) -> Result<ObjectHandle, HsmError> {
        self.uses += 1;
        if let Some(loaded) = self.keks.get_mut(&kek.id) {
            if loaded.wrapped == kek.wrapped {
                crate::metrics::kek_lookup(true);
                loaded.used = self.uses;
                return Ok(loaded.handle);
            }
            // Same name and version, other material (a key destroyed and made
            // again): never use the old handle.
            let stale = loaded.handle;
            self.keks.remove(&kek.id);
            self.destroy_kek(stale);
        }
        crate::metrics::kek_lookup(false);
        let room = self.kek_room();
        if self.keks.len() >= room {
            // The least recently used sixteenth at once (at least one), so
            // that a worker at its share sorts once per room/16 loads.
            let mut by_use: Vec<(u64, KekId)> =
                self.keks.iter().map(|(id, k)| (k.used, id.clone())).collect();
            let out = (self.keks.len() + 1 - room).max(room / 16).clamp(1, by_use.len());
            by_use.select_nth_unstable_by_key(out - 1, |(used, _)| *used);
            for (_, id) in by_use.into_iter().take(out) {
                if let Some(k) = self.keks.remove(&id) {
                    self.destroy_kek(k.handle);
                }
            }
        }
        let mk = self.master_key(kek.master_key_version)?;
        let h = unwrap_kek(self.session()?, mk, &kek.wrapped, kek.key_type)?;
        crate::metrics::kek_loaded();
        self.keks
            .insert(kek.id.clone(), LoadedKek { wrapped: kek.wrapped.clone(), handle: h, used: self.uses });
        Ok(h)
    }

    /// HMAC-SHA256 of `data` under an HMAC key version, computed in the
    /// token.
    pub fn mac(&mut self, key: &KekRef, data: &[u8]) -> Result<Vec<u8>, HsmError> {
        self.retrying(|w| {
            let h = w.kek(key)?;
            Ok(w.session()?.sign(&Mechanism::Sha256Hmac, h, data)?)
        })
    }

    /// Whether `mac` is the HMAC-SHA256 of `data` under an HMAC key version
    /// (C_Verify in the token, which compares).
    pub fn mac_ok(&mut self, key: &KekRef, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        self.retrying(|w| {
            let h = w.kek(key)?;
            match w.session()?.verify(&Mechanism::Sha256Hmac, h, data, mac) {
                Ok(()) => Ok(true),
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::SignatureInvalid | cryptoki::error::RvError::SignatureLenRange,
                    _,
                )) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// AES-256-GCM encryption inside the token under a KEK; returns
    /// ciphertext followed by the 16-byte tag.
    pub fn seal(
        &mut self,
        kek: &KekRef,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.retrying(|w| w.seal_inner(kek, nonce, aad, plaintext))
    }

    fn seal_inner(
        &mut self,
        kek: &KekRef,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let h = self.kek(kek)?;
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, (8 * TAG_LEN as u64).into())?;
        Ok(self.session()?.encrypt(&Mechanism::AesGcm(params), h, plaintext)?)
    }

    /// AES-256-GCM decryption inside the token under a KEK. A tag that does
    /// not verify is [`HsmError::Integrity`]. The plaintext is returned in a
    /// zeroizing buffer.
    pub fn open(
        &mut self,
        kek: &KekRef,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.retrying(|w| w.open_inner(kek, nonce, aad, sealed))
    }

    fn open_inner(
        &mut self,
        kek: &KekRef,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let h = self.kek(kek)?;
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, (8 * TAG_LEN as u64).into())?;
        let plain = self.session()?.decrypt(&Mechanism::AesGcm(params), h, sealed).map_err(|e| {
            integrity_or(
                e,
                "the envelope does not authenticate: it was altered, or the encryption context differs",
            )
        })?;
        Ok(Zeroizing::new(plain))
    }
}

/// Generates an AES-256 key in the token as a sensitive session object,
/// wraps it under master key `mk` and destroys it: a new KEK, or a canary.
/// Its value never leaves the token; users of a KEK unwrap their own
/// confined copy ([`unwrap_kek`]).
fn generate_wrapped(s: &Session, mk: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let tmp = s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrap, mk, tmp);
    s.destroy_object(tmp)?;
    Ok(wrapped?)
}

/// Unwraps a KEK under master key `mk` as a sensitive, non-extractable
/// session object for encrypt and decrypt only: the template the master
/// key's `CKA_UNWRAP_TEMPLATE` demands ([`confine`]).
fn unwrap_kek(
    s: &Session,
    mk: ObjectHandle,
    wrapped: &[u8],
    key_type: keyhaven::KeyType,
) -> Result<ObjectHandle, HsmError> {
    let (mechanism, template) = match key_type {
        keyhaven::KeyType::HmacSha256 => (Mechanism::AesKeyWrap, confine::hmac_unwrap_template()),
        keyhaven::KeyType::EcdsaP256 | keyhaven::KeyType::EcdsaP384 => {
            (Mechanism::AesKeyWrapPad, confine::ec_private_unwrap_template())
        }
        keyhaven::KeyType::RsaPss3072 => (Mechanism::AesKeyWrapPad, confine::rsa_sign_unwrap_template()),
        keyhaven::KeyType::RsaOaep4096 => (Mechanism::AesKeyWrapPad, confine::rsa_decrypt_unwrap_template()),
        _ => (Mechanism::AesKeyWrap, confine::kek_unwrap_template()),
    };
    s.unwrap_key(&mechanism, mk, wrapped, &template)
        .map_err(|e| integrity_or(e, "the key material does not unwrap under its master key"))
}

/// Generates a 256-bit HMAC key in the token as a sensitive session object,
/// wraps it under master key `mk` and destroys it, as [`generate_wrapped`]
/// does for AES keys.
fn generate_wrapped_hmac(s: &Session, mk: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let tmp = s.generate_key(
        &Mechanism::GenericSecretKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ],
    )?;
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrap, mk, tmp);
    s.destroy_object(tmp)?;
    Ok(wrapped?)
}

/// Return values that mean the session or token is gone, not that the
/// token refused the request.
fn lost_session(rv: cryptoki::error::RvError) -> bool {
    HsmError::Pkcs11 { function: cryptoki::context::Function::UnwrapKey, rv }.session_lost()
}
