//! Persistent state behind a small trait, so that a networked backend can be
//! added for multi-host installs; [`sled_store::SledStore`] is the embedded
//! default. The store never holds plaintext key material: KEKs are kept only
//! wrapped under a master key version that lives in the token.
//!
//! Every mutating call returns only after the write is durable.

pub mod audit_files;
pub mod sled_store;
pub mod state;

use keyhaven::lifecycle::KeyState;
use keyhaven::revocation::{Revocation, Scope};
use keyhaven::{KeyPath, KeyType};
use serde::{Deserialize, Serialize};

/// What the store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record to create exists already.
    #[error("{0} exists already")]
    AlreadyExists(String),
    /// The store has not been initialised with `keyhavend init`.
    #[error("the store at {0} is not initialised; run `keyhavend init` first")]
    NotInitialised(String),
    /// The store was initialised already.
    #[error("the store at {0} is initialised already")]
    AlreadyInitialised(String),
    /// The store was written by an unknown schema version.
    #[error("the store has schema version {found}; this daemon reads version {expected}")]
    Schema {
        /// Found in the store.
        found: u32,
        /// Known here.
        expected: u32,
    },
    /// A record does not decode.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
    /// The store's records are not the state the token's anchor vouches for
    /// (altered, swapped, removed, or an older copy): see [`state`].
    #[error("the store does not match the token's anchor: {0}")]
    Tampered(String),
    /// An audit segment file cannot be read or written.
    #[error("audit log {file}, offset {offset}: {reason}")]
    AuditFile {
        /// The segment file.
        file: String,
        /// Where.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// An audit segment holds bytes that are not an intact frame (altered,
    /// or not a frame at all).
    #[error("audit log {file}, offset {offset}{}: {reason}", seq.map(|s| format!(" (entry {s})")).unwrap_or_default())]
    AuditFrame {
        /// The segment file.
        file: String,
        /// Where the frame starts.
        offset: u64,
        /// The sequence number its header claims, when it has a header.
        seq: Option<u64>,
        /// What is wrong.
        reason: String,
    },
}

/// The store's global facts (the `meta` tree).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// Schema version of the records.
    pub schema_version: u32,
    /// The master key version that new KEKs are wrapped under.
    pub master_key_version: u32,
    /// Label of the token the master key lives in.
    pub token_label: String,
    /// When `init` ran, Unix seconds.
    pub created_at: u64,
    /// A master-key rotation under way: KEKs move from one version to the
    /// other, in batches, until none is left under `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_rotation: Option<MasterRotation>,
    /// Every master key version in the token that the store relies on, as
    /// pinned when it was made (docs/SECURITY.md): a key under its label
    /// that does not match is refused, never adopted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub master_keys: Vec<MasterKeyPin>,
    /// A master key being made: recorded before C_GenerateKey, so that a
    /// rotation interrupted between the two adopts the key it made (same
    /// `CKA_ID`) and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_pending: Option<PendingMasterKey>,
    /// An operator accepted the store as it is over the token's anchor
    /// (`keyhavend accept-store`, after restoring a backup on purpose); the
    /// daemon records it in the audit log at its next start, then clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_accepted: Option<StoreAccepted>,
}

/// `keyhavend accept-store`: who, when, why, and what it replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreAccepted {
    /// When, Unix seconds.
    pub at: u64,
    /// The uid that ran the command.
    pub uid: u32,
    /// The operator's reason.
    pub reason: String,
    /// The anchor's generation it replaced (`None`: the token had none).
    pub replaced_generation: Option<u64>,
}

impl Meta {
    /// The pin of master key `version`, if the store has one.
    pub fn master_pin(&self, version: u32) -> Option<&MasterKeyPin> {
        self.master_keys.iter().find(|p| p.version == version)
    }
}

/// A master key version's identity, recorded when it is made.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MasterKeyPin {
    /// The version (its label is `{base}-v{version}`).
    pub version: u32,
    /// The `CKA_ID` it was generated with (random, 16 bytes; empty for a key
    /// pinned when a store from before pinning was first opened).
    #[serde(with = "b64")]
    pub id: Vec<u8>,
    /// A random AES key generated in the token and wrapped under this master
    /// key when it was pinned: only the same key material unwraps it, which
    /// the daemon checks at every start.
    #[serde(with = "b64")]
    pub canary: Vec<u8>,
    /// When it was pinned, Unix seconds.
    pub pinned_at: u64,
}

impl std::fmt::Debug for MasterKeyPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeyPin").field("version", &self.version).finish_non_exhaustive()
    }
}

/// A master key version about to be generated.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingMasterKey {
    /// The version.
    pub version: u32,
    /// The `CKA_ID` it is generated with.
    #[serde(with = "b64")]
    pub id: Vec<u8>,
}

impl std::fmt::Debug for PendingMasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMasterKey").field("version", &self.version).finish_non_exhaustive()
    }
}

/// A master-key rotation (or its rollback) under way.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MasterRotation {
    /// The version KEKs are moving away from.
    pub from: u32,
    /// The version they move to (the current one).
    pub to: u32,
    /// When it began, Unix seconds.
    pub started_at: u64,
}

/// The schema version this daemon writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A named key and its versions (the `keyring` tree).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// The version new data keys are wrapped with.
    pub current_version: u32,
    /// Every version still held, oldest first (trimmed ones are gone).
    pub versions: Vec<KeyVersion>,
    /// Whether the key may be used.
    #[serde(default = "enabled")]
    pub state: KeyState,
    /// Versions below this one are refused for decryption (1: none).
    #[serde(default = "one")]
    pub min_decryption_version: u32,
    /// Automatic rotation period, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every_secs: Option<u64>,
    /// When a scheduled deletion happens, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_at: Option<u64>,
    /// What kind of key; every version is of this type. Absent (records
    /// from before key types, and every AES key) means `aes256-gcm`.
    #[serde(default, skip_serializing_if = "KeyType::is_default")]
    pub key_type: KeyType,
}

fn enabled() -> KeyState {
    KeyState::Enabled
}

fn one() -> u32 {
    1
}

/// One version of a named key.
#[derive(Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    /// Version number, from 1.
    pub version: u32,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Master key version that wraps this KEK.
    pub master_key_version: u32,
    /// The version's secret (a KEK, or an HMAC key: the record's
    /// `key_type`) wrapped with CKM_AES_KEY_WRAP under that master key.
    #[serde(with = "b64")]
    pub wrapped_kek: Vec<u8>,
    /// Data-key wraps reserved under this version so far (docs/ENVELOPE.md
    /// §7): an upper bound on the GCM nonces it has used.
    #[serde(default)]
    pub wraps_reserved: u64,
    /// When the version was destroyed (its `wrapped_kek` erased), Unix
    /// seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<u64>,
    /// Data keys unwrapped under it (counted in memory, persisted every few
    /// seconds and at shutdown).
    #[serde(default)]
    pub decryptions: u64,
    /// Envelopes and ciphertexts rewrapped away from it.
    #[serde(default)]
    pub rewraps: u64,
    /// Last decryption or rewrap, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    /// A signing key version's public key: DER SubjectPublicKeyInfo,
    /// standard base64 (its private key is `wrapped_kek`). Absent for other
    /// types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

impl KeyVersion {
    /// A fresh version holding `wrapped_kek`.
    pub fn new(version: u32, now: u64, master_key_version: u32, wrapped_kek: Vec<u8>) -> KeyVersion {
        KeyVersion {
            version,
            created_at: now,
            master_key_version,
            wrapped_kek,
            wraps_reserved: 0,
            destroyed_at: None,
            decryptions: 0,
            rewraps: 0,
            last_used_at: None,
            public_key: None,
        }
    }
}

impl std::fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVersion")
            .field("version", &self.version)
            .field("master_key_version", &self.master_key_version)
            .field("wraps_reserved", &self.wraps_reserved)
            .field("destroyed_at", &self.destroyed_at)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// The record's path.
    pub fn path(&self) -> Result<KeyPath, StoreError> {
        KeyPath::new(&self.tenant, &self.key).map_err(|e| StoreError::Corrupt {
            key: format!("{}/{}", self.tenant, self.key),
            reason: e.to_string(),
        })
    }

    /// A version by number.
    pub fn version(&self, version: u32) -> Option<&KeyVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// A version by number, to change it.
    pub fn version_mut(&mut self, version: u32) -> Option<&mut KeyVersion> {
        self.versions.iter_mut().find(|v| v.version == version)
    }
}

/// The storage backend.
pub trait Store: Send + Sync + 'static {
    /// The global facts; `None` before `init`.
    fn meta(&self) -> Result<Option<Meta>, StoreError>;
    /// Writes the global facts for the first time (refuses a second time).
    fn init_meta(&self, meta: &Meta) -> Result<(), StoreError>;
    /// Changes the global facts atomically (as [`Store::update_key`]).
    fn update_meta(&self, change: &mut dyn FnMut(&mut Meta)) -> Result<Meta, StoreError>;
    /// A named key.
    fn key(&self, path: &KeyPath) -> Result<Option<std::sync::Arc<KeyRecord>>, StoreError>;
    /// Creates a named key; refuses when one exists with that path.
    fn create_key(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Changes a named key atomically: `change` edits the current record,
    /// and is run again if another writer changed it meanwhile. Returns the
    /// record as written, or `None` when there is no such key.
    fn update_key(
        &self,
        path: &KeyPath,
        change: &mut dyn FnMut(&mut KeyRecord),
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Changes several named keys in one write (and one anchor update):
    /// `change` edits each current record; paths with no key are passed
    /// over. For the usage counts' flush, which touches every key used
    /// since the last one.
    fn update_keys(
        &self,
        paths: &[KeyPath],
        change: &mut dyn FnMut(&KeyPath, &mut KeyRecord),
    ) -> Result<(), StoreError>;
    /// Named keys, all or one tenant's, sorted by tenant then key.
    fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;
    /// Number of named keys.
    fn key_count(&self) -> Result<u64, StoreError>;
    /// Every revocation record (suspensions and destructions).
    fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    /// Writes a revocation, replacing one of the same scope.
    fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError>;
    /// Removes the revocation of exactly `scope`; returns it.
    fn remove_revocation(&self, scope: &Scope) -> Result<Option<Revocation>, StoreError>;
    /// Makes every acknowledged write durable (used at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
    /// Appends audit entry `seq` of `kind` (docs/AUDIT.md §4). Not durable,
    /// nor visible to [`audit_scan`](Store::audit_scan), until
    /// [`audit_flush`](Store::audit_flush): the audit log batches many
    /// records into one write.
    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// Makes every audit entry appended so far durable (one write and one
    /// `fdatasync`); on failure they stay pending for the next flush.
    fn audit_flush(&self) -> Result<(), StoreError>;
    /// Audit entries of `kind` in the order they were written (which is
    /// sequence order unless the files were tampered with): ascending from
    /// `from`, or (with `reverse`) descending from `from` down. Damage is
    /// returned as [`StoreError::AuditFrame`], and the scan goes on.
    fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_>;
}

/// The two kinds of entries of the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditKind {
    /// A record of an operation (or an alert).
    Record,
    /// A seal over the chain head (docs/AUDIT.md §3).
    Seal,
}

/// Audit entries as `(seq, bytes)`.
pub type AuditIter<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + Send + 'a>;

/// Base64 for byte fields in stored records.
mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
