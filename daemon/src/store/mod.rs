//! Persistent state behind a small trait, so that a networked backend can be
//! added for multi-host installs; [`sled_store::SledStore`] is the embedded
//! default. The store never holds plaintext key material: KEKs are kept only
//! wrapped under a master key version that lives in the token.
//!
//! Every mutating call returns only after the write is durable.
//!
//! [`Backend`] is what a backend implements: futures, and writes shaped as
//! single atomic changes, so that a networked store fits without being
//! bent to an embedded one's shape. [`Store`] is what callers hold.

pub mod audit_files;
pub mod cluster;
pub mod copy;
pub mod postgres;
pub mod sled_store;
pub mod state;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use keyhaven::lifecycle::KeyState;
use keyhaven::revocation::{Revocation, Scope};
use keyhaven::{KeyPath, KeyType};
use serde::{Deserialize, Serialize};

use self::state::{Anchor, AnchorState};

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
    /// The database's schema is newer than this daemon knows: a newer
    /// daemon migrated it.
    #[error("{store}: the database schema is version {found}, newer than this daemon knows ({known}); run a keyhavend at least as new as the one that migrated it")]
    NewerSchema {
        /// The store.
        store: String,
        /// Found in `schema_version`.
        found: i32,
        /// The newest this daemon knows.
        known: i32,
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
    /// The PostgreSQL server did not answer a call within its time limit:
    /// it stopped answering (paused, hung, its host frozen), or what
    /// listens there is not a PostgreSQL server. Names the server (never
    /// the connection string), what was being done, and what sets the
    /// limit (docs/CLUSTER.md §2).
    #[error(
        "the PostgreSQL server at {server} did not answer within {} while {what} (the limit: {set_by})",
        seconds_text(*limit)
    )]
    NoAnswer {
        /// `host:port` or the socket's path, and the database.
        server: String,
        /// What the daemon was doing.
        what: String,
        /// The limit.
        limit: std::time::Duration,
        /// What sets it (the config keys).
        set_by: String,
    },
    /// The store's records are not the state the token's anchor vouches for
    /// (altered, swapped, removed, or an older copy): see [`state`].
    #[error("the store does not match the token's anchor: {0}")]
    Tampered(String),
    /// Another daemon holds the lease of this node's name: two daemons of
    /// a cluster share a `[cluster] node` name.
    #[error("another keyhavend holds the lease of node `{0}` in PostgreSQL: every node of a cluster needs its own [cluster] node name (docs/CLUSTER.md)")]
    NodeNameTaken(String),
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
    /// A file of the store cannot be written: the disk is full, the
    /// filesystem is read-only, or another I/O error (`condition`, see
    /// [`io_condition`]). Writes are refused, and tried again, until they
    /// can be made (docs/OPERATIONS.md §7.1).
    #[error("{} at {place} ({what})", condition_text(condition))]
    Unwritable {
        /// The file or folder.
        place: String,
        /// `no_space`, `read_only` or `io_error`.
        condition: &'static str,
        /// What was being done, and the system's error.
        what: String,
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

/// A time limit in seconds, for messages: `5 s`, `2.4 s`.
pub fn seconds_text(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Which condition an I/O error is, for messages and `health`
/// (docs/PROTOCOL.md §3.2): `no_space` (ENOSPC, or EDQUOT: a quota),
/// `read_only` (EROFS), else `io_error`. By the error's kind too, since
/// sled hands out copies of an error that keep only its kind.
pub fn io_condition(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match (e.raw_os_error(), e.kind()) {
        (Some(28 | 122), _) | (_, ErrorKind::StorageFull | ErrorKind::QuotaExceeded) => "no_space",
        (Some(30), _) | (_, ErrorKind::ReadOnlyFilesystem) => "read_only",
        _ => "io_error",
    }
}

/// A condition of [`io_condition`] in words.
pub fn condition_text(condition: &str) -> &'static str {
    match condition {
        "no_space" => "no space left on device",
        "read_only" => "read-only file system",
        _ => "I/O error",
    }
}

/// [`StoreError::Unwritable`] for `e`, met while doing `what` to `place`.
/// The system's error is given when it is one (sled hands out copies of
/// its error that hold only the original's debug text, which is left out).
pub fn unwritable(place: &std::path::Path, what: &str, e: &std::io::Error) -> StoreError {
    StoreError::Unwritable {
        place: place.display().to_string(),
        condition: io_condition(e),
        what: if e.raw_os_error().is_some() { format!("{what}: {e}") } else { what.to_owned() },
    }
}

impl StoreError {
    /// The condition of a failed write, for `health`: `no_space`,
    /// `read_only` or `io_error` for the store's files, `unavailable` for
    /// anything else (a database that does not answer).
    pub fn condition(&self) -> &'static str {
        match self {
            StoreError::Unwritable { condition, .. } => condition,
            _ => "unavailable",
        }
    }
}

/// Why the store cannot be written now, for `health`
/// ([`Backend::failure`]).
#[derive(Clone, Debug)]
pub struct StoreFailure {
    /// As [`StoreError::condition`].
    pub condition: &'static str,
    /// The error, naming the place.
    pub message: String,
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
    /// Key aliases (PROTOCOL.md §3.37): tenant, then alias name, then the
    /// alias. Kept with the global facts so that every backend stores them
    /// the same way, in one atomic, anchored record.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub aliases: Aliases,
}

/// The alias table of [`Meta::aliases`]: tenant, then alias name, then the
/// alias.
pub type Aliases = std::collections::BTreeMap<String, std::collections::BTreeMap<String, AliasRecord>>;

/// The key that the alias `path` names in `aliases`, if there is one.
pub fn alias_of(aliases: &Aliases, path: &KeyPath) -> Option<String> {
    aliases.get(path.tenant()).and_then(|t| t.get(path.key())).map(|a| a.key.clone())
}

/// A key alias: a second name for a key of the same tenant, that can be
/// moved to another key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasRecord {
    /// The key it names (in the alias's tenant).
    pub key: String,
    /// When it was made, Unix seconds.
    pub created_at: u64,
    /// When it was last moved, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<u64>,
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
    /// The idempotency key of the `key_create` that made it, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_with: Option<String>,
    /// What the key is for (absent in records from before descriptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its tags (absent in records from before tags, and when it has none).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: crate::labels::Tags,
    /// `external` for a key made by `key_import` (left out otherwise, so
    /// older records are byte-identical).
    #[serde(default, skip_serializing_if = "keyhaven::import::Origin::is_default")]
    pub origin: keyhaven::import::Origin,
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
    /// The idempotency key of the `key_rotate` that made it, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_with: Option<String>,
    /// `external` for imported material (left out when generated in the
    /// token).
    #[serde(default, skip_serializing_if = "keyhaven::import::Origin::is_default")]
    pub origin: keyhaven::import::Origin,
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
            made_with: None,
            origin: Default::default(),
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

/// Opens the store the configuration names (without checking that it was
/// initialised: see [`Store::check_initialised`]).
pub fn open(config: &crate::config::Config) -> Result<Store, StoreError> {
    use crate::config::{Mode, StoreBackend};
    match config.store.backend {
        StoreBackend::Sled => Ok(Store::new(Arc::new(sled_store::SledStore::open(&config.store.path)?))),
        StoreBackend::Postgres => {
            let url = config.store.read_url().map_err(StoreError::Backend)?;
            let options = postgres::PgOptions {
                require_tls: config.mode == Mode::Production,
                ca_file: config.store.tls_ca_file.clone(),
                connect_timeout: config.store.connect_timeout(),
            };
            let node = config.cluster.node_name().map_err(StoreError::Backend)?;
            let lease = config.cluster.lease().map_err(StoreError::Backend)?;
            // This node's audit chain has its own anchor in the shared token.
            crate::hsm::anchor::set_audit_chain(&node);
            let pg =
                postgres::PgStore::open_node(&url, &options, postgres::NodeOptions { name: node, lease })?;
            Ok(Store::new(pg.shared()))
        }
    }
}

/// A store operation under way: what [`Backend`]'s methods return.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A change to a named key, run on its current record.
pub type KeyChange<'a> = &'a mut (dyn FnMut(&mut KeyRecord) + Send);

/// A change to several named keys, run on each current record.
pub type KeysChange<'a> = &'a mut (dyn FnMut(&KeyPath, &mut KeyRecord) + Send);

/// A change to the global facts.
pub type MetaChange<'a> = &'a mut (dyn FnMut(&mut Meta) + Send);

/// A storage backend. Its operations are futures, so that a networked
/// store ([`postgres::PgStore`]) waits on the network without holding a
/// thread; the embedded one ([`sled_store::SledStore`]) completes them on
/// the thread that polls them. Every write is one atomic change (a record,
/// a batch of records, or a conditional update of one) and its future
/// completes only once the change is durable.
pub trait Backend: Send + Sync + 'static {
    /// Which backend this is, for `health` and messages. Behaviour is
    /// decided by what a backend answers below, never by this name.
    fn kind(&self) -> &'static str;
    /// Whether the nodes of a cluster share this store (PostgreSQL, even
    /// with one node: docs/CLUSTER.md): each node serves only under a
    /// lease ([`Backend::serving`], [`Backend::until_not_serving`]) and
    /// keeps an audit chain of its own ([`Backend::audit_chains`]). The
    /// embedded store has one daemon, no lease and one audit log.
    fn is_cluster(&self) -> bool;
    /// Where the store is, for messages (a folder, or a database without
    /// its password).
    fn location(&self) -> String;
    /// The global facts; `None` before `init`.
    fn meta(&self) -> StoreFuture<'_, Option<Meta>>;
    /// Writes the global facts for the first time (refuses a second time).
    fn init_meta<'a>(&'a self, meta: &'a Meta) -> StoreFuture<'a, ()>;
    /// Changes the global facts atomically (as [`Backend::update_key`]).
    fn update_meta<'a>(&'a self, change: MetaChange<'a>) -> StoreFuture<'a, Meta>;
    /// A named key.
    fn key<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<Arc<KeyRecord>>>;
    /// When `path` names no key but an alias (PROTOCOL.md §3.37): the
    /// name of the key the alias names, in the same tenant. `None` when a
    /// key has that name (a key wins over an alias of the same name, made
    /// in a race) or nothing does. For key-use requests, on every request:
    /// PostgreSQL answers from its caches ([`postgres::PgStore`]).
    fn alias_target<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            if self.key(path).await?.is_some() {
                return Ok(None);
            }
            Ok(self.meta().await?.and_then(|m| alias_of(&m.aliases, path)))
        })
    }
    /// Creates a named key; refuses when one exists with that path.
    fn create_key<'a>(&'a self, record: &'a KeyRecord) -> StoreFuture<'a, ()>;
    /// Changes a named key atomically: `change` edits the current record,
    /// which is written only if nobody changed it meanwhile (a
    /// compare-and-swap on the record, or on its row version); otherwise
    /// `change` runs again on the newer record. Returns the record as
    /// written, or `None` when there is no such key.
    fn update_key<'a>(
        &'a self,
        path: &'a KeyPath,
        change: KeyChange<'a>,
    ) -> StoreFuture<'a, Option<KeyRecord>>;
    /// Changes several named keys in one atomic write (and one anchor
    /// update): `change` edits each current record; paths with no key are
    /// passed over. For the usage counts' flush, which touches every key
    /// used since the last one.
    fn update_keys<'a>(&'a self, paths: &'a [KeyPath], change: KeysChange<'a>) -> StoreFuture<'a, ()>;
    /// Named keys, all or one tenant's, sorted by tenant then key.
    fn keys<'a>(&'a self, tenant: Option<&'a str>) -> StoreFuture<'a, Vec<KeyRecord>>;
    /// Number of named keys.
    fn key_count(&self) -> StoreFuture<'_, u64>;
    /// Every revocation record (suspensions and destructions).
    fn revocations(&self) -> StoreFuture<'_, Vec<Revocation>>;
    /// Writes a revocation, replacing one of the same scope.
    fn put_revocation<'a>(&'a self, revocation: &'a Revocation) -> StoreFuture<'a, ()>;
    /// Removes the revocation of exactly `scope`; returns it.
    fn remove_revocation<'a>(&'a self, scope: &'a Scope) -> StoreFuture<'a, Option<Revocation>>;
    /// Makes every acknowledged write durable (used at shutdown).
    fn flush(&self) -> StoreFuture<'_, ()>;
    /// Appends audit entry `seq` of `kind` (docs/AUDIT.md §4). Not durable,
    /// nor visible to [`audit_scan`](Backend::audit_scan), until
    /// [`audit_flush`](Backend::audit_flush): the audit log batches many
    /// records into one write. Buffers in memory only, so it is not a
    /// future.
    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError>;
    /// Makes every audit entry appended so far durable (one write); on
    /// failure they stay pending for the next flush.
    fn audit_flush(&self) -> StoreFuture<'_, ()>;
    /// Audit entries of `kind` in the order they were written (which is
    /// sequence order unless the log was tampered with): ascending from
    /// `from`, or (with `reverse`) descending from `from` down. Damage is
    /// returned as [`StoreError::AuditFrame`], and the scan goes on. An
    /// iterator that blocks on each page (the audit reader runs off the
    /// async threads), so that a scan of a long log never holds it all.
    fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_>;
    /// Checks the store against the token's anchor, then anchors every
    /// write from now on (docs/SECURITY.md §3, [`state`]). Returns the
    /// anchor as it stands. Called once, at start, off the async threads.
    fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError>;
    /// Anchors the store as it is now, whatever the token held
    /// (`keyhavend accept-store`). Returns the anchor it replaced.
    fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError>;

    /// A node of a cluster, at start before it writes anything (its audit
    /// log included): claims its name's lease row, waiting at most a lease
    /// for a killed daemon's to run out; refuses a name another running
    /// daemon holds ([`StoreError::NodeNameTaken`]).
    fn claim_node(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A node of a cluster: takes its first lease, catches up on the
    /// change feed, then keeps both up in the background, handing other
    /// nodes' changes to `sink` ([`cluster`]). Called once the daemon's
    /// state is loaded; the embedded store has no cluster.
    fn start_cluster(&self, _sink: Arc<dyn cluster::ChangeSink>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether this node may serve key operations now: a node of a
    /// cluster only while its lease is valid by its own clock.
    fn serving(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Completes once this node stops serving ([`Backend::serving`] fails:
    /// its lease lapsed by its own clock); never on a store without a
    /// cluster. A request waiting for its audit record gives up then
    /// (docs/CLUSTER.md §5).
    fn until_not_serving(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }

    /// Why the store cannot be written now (a full disk), or `None` when
    /// it can, for `health`. A store in that state tries again here (at
    /// most a few times a second), so that `health` sees it recover even
    /// when no request writes.
    fn failure(&self) -> Option<StoreFailure> {
        None
    }

    /// The cluster's nodes as the store lists them, for `health`.
    fn cluster(&self) -> StoreFuture<'_, Option<ClusterView>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Gives this node's lease up (a clean stop), so that no writer waits
    /// for it.
    fn leave(&self) {}

    /// The right to run the periodic jobs (automatic rotations, scheduled
    /// deletions) now, held until the guard is dropped: on a cluster one
    /// node at a time (`None`: another node is running them; the next
    /// round sees what it did, so each runs once per due time).
    fn jobs_lock(&self) -> StoreFuture<'_, Option<JobsGuard>> {
        Box::pin(std::future::ready(Ok(Some(JobsGuard(Box::new(()))))))
    }

    /// The nodes that have an audit chain in the store (none: only this
    /// daemon's log).
    fn audit_chains(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// The audit log's segment files, for retention (docs/AUDIT.md §12):
    /// the embedded store's; PostgreSQL has none (retention is refused
    /// there at config).
    fn audit_files(&self) -> Option<&audit_files::AuditFiles> {
        None
    }

    /// [`Backend::audit_put`] into node `chain`'s audit chain (`store
    /// copy` between clusters); the embedded store keeps one log.
    fn audit_put_chain(
        &self,
        chain: &str,
        _kind: AuditKind,
        _seq: u64,
        _bytes: &[u8],
    ) -> Result<(), StoreError> {
        Err(StoreError::Backend(format!(
            "the {} store keeps one audit log: it cannot hold node `{chain}`'s chain",
            self.kind()
        )))
    }

    /// The nodes whose lease is live now (none: the embedded store has no
    /// cluster).
    fn live_nodes(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// [`Backend::audit_scan`] of another node's chain.
    fn audit_scan_chain(&self, _chain: &str, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        self.audit_scan(kind, from, reverse)
    }
}

/// Held while a node runs the periodic jobs ([`Backend::jobs_lock`]).
pub struct JobsGuard(pub Box<dyn Send>);

/// The cluster as one node sees it (`health`).
pub type ClusterView = keyhaven::wire::ClusterHealth;

/// One node of [`ClusterView`].
pub type NodeView = keyhaven::wire::ClusterNode;

/// The store as the daemon's callers use it: a [`Backend`], with each
/// operation also callable from synchronous code ([`Store::meta`] etc.
/// wait for the backend's future). The synchronous calls are for code that
/// runs off the async threads (`ops::blocking`, the audit writer, start-up
/// and shutdown); async code awaits [`Store::backend`]'s futures.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// Whose audit chain [`Store::audit_scan`] reads (`None`: this node's).
    chain: Option<Arc<str>>,
}

impl Store {
    /// The store kept by `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Store {
        Store { backend, chain: None }
    }

    /// The same store, whose [`Store::audit_scan`] reads node `node`'s
    /// audit chain (to verify it from here).
    pub fn for_audit_chain(&self, node: &str) -> Store {
        Store { backend: self.backend.clone(), chain: Some(node.into()) }
    }

    /// The backend, to await its operations.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Which backend this is.
    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// See [`Backend::is_cluster`].
    pub fn is_cluster(&self) -> bool {
        self.backend.is_cluster()
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// See [`Backend::meta`].
    pub fn meta(&self) -> Result<Option<Meta>, StoreError> {
        wait(self.backend.meta())
    }

    /// The global facts of a store that `init` prepared, with a schema this
    /// daemon knows.
    pub fn check_initialised(&self) -> Result<Meta, StoreError> {
        let meta = self.meta()?.ok_or_else(|| StoreError::NotInitialised(self.location()))?;
        if meta.schema_version != SCHEMA_VERSION {
            return Err(StoreError::Schema { found: meta.schema_version, expected: SCHEMA_VERSION });
        }
        Ok(meta)
    }

    /// See [`Backend::init_meta`].
    pub fn init_meta(&self, meta: &Meta) -> Result<(), StoreError> {
        wait(self.backend.init_meta(meta))
    }

    /// See [`Backend::update_meta`].
    pub fn update_meta(&self, change: MetaChange<'_>) -> Result<Meta, StoreError> {
        wait(self.backend.update_meta(change))
    }

    /// See [`Backend::key`].
    pub fn key(&self, path: &KeyPath) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        wait(self.backend.key(path))
    }

    /// See [`Backend::create_key`].
    pub fn create_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        wait(self.backend.create_key(record))
    }

    /// See [`Backend::update_key`].
    pub fn update_key(&self, path: &KeyPath, change: KeyChange<'_>) -> Result<Option<KeyRecord>, StoreError> {
        wait(self.backend.update_key(path, change))
    }

    /// See [`Backend::update_keys`].
    pub fn update_keys(&self, paths: &[KeyPath], change: KeysChange<'_>) -> Result<(), StoreError> {
        wait(self.backend.update_keys(paths, change))
    }

    /// See [`Backend::keys`].
    pub fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        wait(self.backend.keys(tenant))
    }

    /// See [`Backend::key_count`].
    pub fn key_count(&self) -> Result<u64, StoreError> {
        wait(self.backend.key_count())
    }

    /// See [`Backend::revocations`].
    pub fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        wait(self.backend.revocations())
    }

    /// See [`Backend::put_revocation`].
    pub fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        wait(self.backend.put_revocation(revocation))
    }

    /// See [`Backend::remove_revocation`].
    pub fn remove_revocation(&self, scope: &Scope) -> Result<Option<Revocation>, StoreError> {
        wait(self.backend.remove_revocation(scope))
    }

    /// See [`Backend::flush`].
    pub fn flush(&self) -> Result<(), StoreError> {
        wait(self.backend.flush())
    }

    /// See [`Backend::audit_put`].
    pub fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.backend.audit_put(kind, seq, bytes)
    }

    /// See [`Backend::audit_flush`].
    pub fn audit_flush(&self) -> Result<(), StoreError> {
        wait(self.backend.audit_flush())
    }

    /// See [`Backend::audit_scan`].
    pub fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        match &self.chain {
            Some(node) => self.backend.audit_scan_chain(node, kind, from, reverse),
            None => self.backend.audit_scan(kind, from, reverse),
        }
    }

    /// See [`Backend::audit_files`].
    pub fn audit_files(&self) -> Option<&audit_files::AuditFiles> {
        match &self.chain {
            Some(_) => None,
            None => self.backend.audit_files(),
        }
    }

    /// See [`Backend::attach_anchor`].
    pub fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        self.backend.attach_anchor(anchor)
    }

    /// See [`Backend::accept_as_is`].
    pub fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        self.backend.accept_as_is(anchor)
    }
}

/// Runs a store future to its end on this thread. Only for threads that
/// may block (never an async worker: a backend's futures do their I/O on
/// the backend's own threads, so this cannot deadlock, but it would hold
/// the worker).
pub fn wait<T>(fut: StoreFuture<'_, T>) -> Result<T, StoreError> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = fut;
    loop {
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => return r,
            std::task::Poll::Pending => std::thread::park(),
        }
    }
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
