//! The JSON messages inside frames (docs/PROTOCOL.md §2–4).
//!
//! A request is `{"id": N, "op": "name", "params": {...}}`; its response is
//! `{"id": N, "ok": {...}}` or `{"id": N, "error": {"code": "...",
//! "message": "..."}}`. Responses may come back in any order: the id pairs
//! them. Each operation is a params type implementing [`Operation`], which
//! names its response type; unknown fields are refused.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::context::EncryptionContext;
use crate::error::ErrorCode;
use crate::keytype::KeyType;
pub use crate::secret::SecretBytes;

/// The protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest plaintext `encrypt` takes (64 KiB); larger data wants data keys.
pub const MAX_ENCRYPT_PLAINTEXT: usize = 64 * 1024;

/// A request frame body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// The operation's name.
    pub op: String,
    /// The operation's parameters (an object; may be omitted when empty).
    #[serde(default)]
    pub params: Value,
}

/// A response frame body: exactly one of `ok` and `error` is present.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The request's id; `null` when the request was too broken to have one.
    pub id: Option<u64>,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// An error on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message naming the thing concerned.
    pub message: String,
}

/// An operation: its params type, its name on the wire and its response.
pub trait Operation: Serialize + DeserializeOwned {
    /// The `op` string.
    const OP: &'static str;
    /// What a successful call returns.
    type Response: Serialize + DeserializeOwned;
}

macro_rules! operation {
    ($params:ty, $op:literal, $resp:ty) => {
        impl Operation for $params {
            const OP: &'static str = $op;
            type Response = $resp;
        }
    };
}
pub(crate) use operation;

/// `hello`: agree on the protocol version (PROTOCOL.md §3.1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The client's protocol version.
    pub protocol: u32,
    /// Free text naming the client, for the daemon's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// Answer to `hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloResponse {
    /// The daemon's protocol version.
    pub protocol: u32,
    /// The daemon's name and version.
    pub server: String,
    /// Every operation this daemon serves, sorted (empty from a daemon that
    /// predates the list): a client can tell what an older daemon lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    /// Optional features beyond the operations (PROTOCOL.md §3.1), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}
operation!(Hello, "hello", HelloResponse);

/// What `hello` lists in `features`: parameters and answer fields added to
/// operations after protocol version 1 first shipped, and the key types.
pub const FEATURES: &[&str] = &[
    "audit_read.node",
    "audit_read.raw",
    "idempotency_keys",
    "key_aliases",
    "key_create.rotate_every_secs",
    "key_labels",
    "key_shape",
    "key_status",
    "key_type.aes256-gcm",
    "key_type.ecdsa-p256",
    "key_type.ecdsa-p384",
    "key_type.hmac-sha256",
    "key_type.rsa-3072-pss",
    "key_type.rsa-4096-oaep",
    "list_pages",
];

/// `health`: daemon, token and store status (PROTOCOL.md §3.2).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {}

/// Answer to `health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `ok` when everything works; `degraded` when the token or the store
    /// fails; `suspended` when a whole-system suspension is in force.
    pub status: String,
    /// The daemon's version.
    pub version: String,
    /// The token.
    pub token: TokenHealth,
    /// The store.
    pub store: StoreHealth,
    /// The whole-system suspension in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<crate::revocation::Revocation>,
    /// That suspension in words, as the `revoked` errors say it: the scope,
    /// since when (RFC 3339), until when, and the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_message: Option<String>,
    /// What the token enforces to keep key material inside it
    /// (docs/SECURITY.md).
    #[serde(default)]
    pub custody: CustodyHealth,
    /// The audit log: whether its records can be written (absent when the
    /// log is off, and from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditHealth>,
    /// Each `[[audit.sink]]` (docs/AUDIT.md §11): how far it shipped, its
    /// lag and its state; absent when there is none. A failing sink does
    /// not change `status` (the log itself is kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit_sinks: Vec<AuditSinkHealth>,
}
operation!(Health, "health", HealthResponse);

/// The audit log in [`HealthResponse::audit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditHealth {
    /// Whether the log's last write succeeded. While it is false, requests
    /// that need a record are refused with `store_unavailable` before they
    /// run, and the write is tried again every 250 ms (docs/AUDIT.md §4).
    pub ok: bool,
    /// Why not, when not: `no_space` (the disk is full), `read_only`,
    /// `io_error`, `unavailable` (docs/PROTOCOL.md §3.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// The last write's error, naming the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests refused since the log could not be written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One audit sink in [`HealthResponse::audit_sinks`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditSinkHealth {
    /// The sink's name (`[[audit.sink]] name`, else its type).
    pub name: String,
    /// `file`, `syslog` or `journald`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ok`; `lagging` (more than its `max_lag` records behind); `failing`
    /// (its last delivery failed: `error` says why).
    pub state: String,
    /// The last record it delivered (its durable cursor).
    pub delivered: u64,
    /// Records durable in the log and not delivered yet.
    pub lag: u64,
    /// The last delivery error, while it cannot deliver; sent only to a
    /// caller granted `admin` on `*` (it names paths of the daemon's
    /// config), absent for others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The custody part of `health`: what the token was seen to enforce when
/// the daemon started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CustodyHealth {
    /// `enforced` when the token refused, for every master key version in
    /// use, to unwrap a KEK into an extractable or non-sensitive key (so no
    /// PIN holder can take a KEK out in plaintext); `not_enforced` when it
    /// did not for at least one (listed in `unconfined_master_keys`).
    pub kek_confinement: String,
    /// Master key versions under which the token does not confine KEKs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfined_master_keys: Vec<u32>,
    /// Master key versions checked against their pin in the store (their
    /// `CKA_ID` and canary) at start.
    #[serde(default)]
    pub pinned_master_keys: Vec<u32>,
}

/// The token part of `health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenHealth {
    /// Whether a probe call to the token succeeded.
    pub ok: bool,
    /// The token's label.
    pub label: String,
    /// The master key version in use.
    pub master_key_version: u32,
    /// Number of HSM worker threads.
    pub workers: usize,
    /// The error of the probe, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which failure mode, when the probe failed: `module_unavailable`,
    /// `token_absent`, `pin_incorrect`, `pin_locked`, `login_failed`,
    /// `session_lost`, `master_key_missing`, `master_key_unusable`, `busy`,
    /// `stopped`, `token_error` (docs/PROTOCOL.md §3.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

/// The store part of `health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreHealth {
    /// Whether the store answered.
    pub ok: bool,
    /// Number of named keys.
    pub keys: u64,
    /// Which backend: `sled` or `postgres` (absent from older daemons).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// The cluster this node is part of (PostgreSQL only; docs/CLUSTER.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterHealth>,
    /// Why the store cannot be written, when it cannot: `no_space` (the
    /// disk is full), `read_only`, `io_error` (docs/PROTOCOL.md §3.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// The failed write's error, naming the place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cluster as one node sees it (`health`, docs/CLUSTER.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterHealth {
    /// This node's name.
    pub node: String,
    /// The change revision this node has applied.
    pub applied: i64,
    /// The newest revision in the change feed.
    pub revision: i64,
    /// Whether this node's lease is valid by its own clock (else it
    /// refuses key operations with `store_unavailable`).
    pub serving: bool,
    /// Every node that ever joined, by name.
    pub nodes: Vec<ClusterNode>,
}

/// One node of [`ClusterHealth`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Its name.
    pub name: String,
    /// Whether its lease is live by PostgreSQL's clock.
    pub live: bool,
    /// Milliseconds until its lease ends (negative: it ended that long ago).
    pub lease_left_ms: i64,
    /// The change revision it last reported as applied.
    pub applied: i64,
    /// When it last joined, Unix seconds.
    pub started: i64,
    /// Its keyhavend version.
    pub version: String,
}

/// `key_create`: a new named key at version 1 (PROTOCOL.md §3.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCreate {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// What kind of key; `aes256-gcm` when absent.
    #[serde(rename = "type", default, skip_serializing_if = "KeyType::is_default")]
    pub key_type: KeyType,
    /// Rotate automatically this often, in seconds, from creation; set in
    /// the same write as the key (no period when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every_secs: Option<u64>,
    /// Makes a retry safe: a `key_create` with the idempotency key that made
    /// the key answers as the first one did instead of `already_exists`
    /// (PROTOCOL.md §3.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// What the key is for: free text, at most 256 bytes, no control
    /// characters (PROTOCOL.md §3.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Tags, `name` to `value` (at most 50; PROTOCOL.md §3.3).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// A named key as `key_create` and `key_list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The version new data keys are wrapped with.
    pub current_version: u32,
    /// All versions that exist.
    pub versions: Vec<u32>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// What kind of key (`aes256-gcm` from a daemon that predates types).
    #[serde(rename = "type", default)]
    pub key_type: KeyType,
    /// Whether it may be used, as in `key_show` (absent from a daemon that
    /// predates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::lifecycle::KeyStatus>,
    /// The revocation in force that covers the whole key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<crate::revocation::Revocation>,
    /// The automatic rotation period in seconds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every_secs: Option<u64>,
    /// When the next automatic rotation is due, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<u64>,
    /// Versions below this one are refused for decryption, as in
    /// `key_show` (absent from a daemon that predates the `key_shape`
    /// feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_decryption_version: Option<u32>,
    /// When a scheduled deletion happens, Unix seconds, as in `key_show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_at: Option<u64>,
    /// What the key is for, if said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its tags, by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
    /// `external` for an imported key (`key_import`), left out otherwise.
    #[serde(default, skip_serializing_if = "crate::import::Origin::is_default")]
    pub origin: crate::import::Origin,
}
operation!(KeyCreate, "key_create", KeyInfo);

/// `key_list`: named keys, of one tenant or all (PROTOCOL.md §3.4).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    /// Only this tenant's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// At most this many keys in the answer, 1 to [`MAX_LIST_PAGE`]
    /// (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The keys after this one (`tenant/key`): the previous page's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Only keys that have every one of these tags with these values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The most entries a list answer (`key_list`, `revoke_list`) holds, and
/// its default page size: with the longest names, a page stays well under
/// the frame limit.
pub const MAX_LIST_PAGE: u32 = 1000;

/// Answer to `key_list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyListResponse {
    /// The keys, sorted by tenant then key.
    pub keys: Vec<KeyInfo>,
    /// Present when more keys follow: pass it as `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}
operation!(KeyList, "key_list", KeyListResponse);

/// `encrypt`: encrypt up to 64 KiB under a fresh data key (PROTOCOL.md §3.5).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encrypt {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The secret, base64.
    pub plaintext: SecretBytes,
    /// Encryption context; must be given again to decrypt.
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub context: EncryptionContext,
}

/// Answer to `encrypt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncryptResponse {
    /// Text form of the ciphertext (`khc1:…`).
    pub ciphertext: String,
    /// The embedded data key's envelope id.
    pub envelope_id: String,
    /// The key version used.
    pub key_version: u32,
}
operation!(Encrypt, "encrypt", EncryptResponse);

/// `decrypt`: reverse `encrypt` (PROTOCOL.md §3.6).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decrypt {
    /// Text form of the ciphertext.
    pub ciphertext: String,
    /// The encryption context given to `encrypt`.
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub context: EncryptionContext,
}

/// Answer to `decrypt` and `datakey_decrypt`: the secret and where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecryptResponse {
    /// The plaintext (or data key), base64.
    pub plaintext: SecretBytes,
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// Key version.
    pub key_version: u32,
    /// Envelope id.
    pub envelope_id: String,
}
operation!(Decrypt, "decrypt", DecryptResponse);

/// `datakey`: a new data key and its envelope (PROTOCOL.md §3.7).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datakey {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// Encryption context bound to the envelope.
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub context: EncryptionContext,
    /// Whether to return the plaintext data key (default true).
    #[serde(default = "yes")]
    pub include_plaintext: bool,
}

fn yes() -> bool {
    true
}

/// Answer to `datakey`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatakeyResponse {
    /// Text form of the envelope (`khe1:…`).
    pub envelope: String,
    /// Envelope id.
    pub envelope_id: String,
    /// Key version.
    pub key_version: u32,
    /// The 32-byte data key, base64; absent with `include_plaintext: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<SecretBytes>,
}
operation!(Datakey, "datakey", DatakeyResponse);

/// `datakey_decrypt`: unwrap a data key from its envelope (PROTOCOL.md §3.8).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatakeyDecrypt {
    /// Text form of the envelope.
    pub envelope: String,
    /// The encryption context given to `datakey`.
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub context: EncryptionContext,
}
operation!(DatakeyDecrypt, "datakey_decrypt", DecryptResponse);

/// `subscribe_revocations`: ask the daemon to push revocation events on
/// this connection (PROTOCOL.md §3.26, §6).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRevocations {}

/// Answer to `subscribe_revocations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeResponse {
    /// Always true: events follow on this connection until it closes.
    pub subscribed: bool,
}
operation!(SubscribeRevocations, "subscribe_revocations", SubscribeResponse);

/// An event frame body (PROTOCOL.md §6): no `id`, pushed by the daemon
/// unasked on a subscribed connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventFrame {
    /// `revoked`, or `lagged` when events were lost.
    pub event: String,
    /// The revoked scope; absent when this connection may not see it (or
    /// for `lagged`): then it covers everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<crate::revocation::Scope>,
}

/// `whoami`: the caller's identity as the daemon sees it, and its grants
/// (PROTOCOL.md §3.9).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whoami {}

/// Answer to `whoami`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoamiResponse {
    /// Effective uid of the connecting process.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The uid's user name, when the daemon's user database has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Every group the policy counts: the gid, then the uid's supplementary groups.
    pub groups: Vec<GroupInfo>,
    /// The process's executable, where the daemon could read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The process's control group at connect time (the unified
    /// hierarchy's path, else systemd's v1 one), where the daemon could
    /// read it; at most 512 bytes. Absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The policy rules that name the caller.
    pub grants: Vec<GrantInfo>,
}
operation!(Whoami, "whoami", WhoamiResponse);

/// A group of the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group id.
    pub gid: u32,
    /// Group name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One policy rule naming the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    /// The rule's name, or `rule N`.
    pub rule: String,
    /// Permissions it grants.
    pub operations: Vec<String>,
    /// `TENANT/KEY` patterns it grants them on.
    pub keys: Vec<String>,
}

/// `admin_reload`: re-read the policy from the daemon's config file
/// (PROTOCOL.md §3.10).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminReload {}

/// Answer to `admin_reload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminReloadResponse {
    /// Number of rules now in force.
    pub rules: usize,
}
operation!(AdminReload, "admin_reload", AdminReloadResponse);

/// `audit_read`: audit records, oldest first (PROTOCOL.md §3.11).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRead {
    /// Only records about this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only records at or after this time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only records with a sequence number above this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Only the last this many matching records (at most 10 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<u32>,
    /// Also answer each record's exact stored bytes (`lines`), the bytes
    /// the hash chain covers (docs/AUDIT.md §3.1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
    /// On a cluster: read node `node`'s audit chain instead of the
    /// answering node's (docs/CLUSTER.md §3). `seq`, `after` and `next`
    /// are that chain's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Answer to `audit_read`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReadResponse {
    /// The records, by sequence number.
    pub records: Vec<AuditRecord>,
    /// The sequence number to pass as `after` to read on.
    pub next: u64,
    /// `records` was cut short to fit a frame: more matching records follow
    /// (with `last`: older matching records were left out).
    pub more: bool,
    /// With `raw`: each record of `records` as stored, same order; the
    /// SHA-256 of one is the `prev` of the record after it in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<String>>,
    /// On a cluster: the node whose chain `records` come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// On a cluster: every node that has an audit chain in the store, sorted
    /// (to read them all: one `audit_read` with `node` per chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<String>,
}
operation!(AuditRead, "audit_read", AuditReadResponse);

/// One audit record (docs/AUDIT.md §2). The stored bytes are this object's
/// JSON as the daemon wrote it; the chain hashes those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// When the record was written, Unix milliseconds.
    pub time_ms: u64,
    /// SHA-256 of the previous record's bytes, hex (64 zeros for record 1).
    pub prev: String,
    /// Who asked.
    pub caller: AuditCaller,
    /// `daemon` on the records of the daemon's own scheduled work
    /// (automatic rotations, scheduled deletions): `caller` is then the
    /// daemon's process. Absent when the caller asked (AUDIT.md §2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The operation (`alert` for an alert record).
    pub op: String,
    /// Tenant concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Key concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Key version concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Envelope id concerned, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_id: Option<String>,
    /// The names (never the values) of the encryption context.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_keys: Vec<String>,
    /// `ok`, `denied`, `error` or `alert`.
    pub outcome: String,
    /// The error code, when the outcome is not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Free text for alert records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// On the alert record a daemon writes at start when records were
    /// covered by no valid seal: the first and last of them (AUDIT.md §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsealed: Option<[u64; 2]>,
    /// Why the state changed: the reason the caller gave (`revoke`,
    /// `revoke_lift`) or, for the daemon's own work, what made it due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What a state change changed, as it was before (AUDIT.md §2.1):
    /// names, versions, states and times, never key material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// The same, after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// The caller as an audit record holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCaller {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// User name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Supplementary group ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
    /// Process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// Control group at connect time (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// `audit_verify`: walk the whole chain and every seal (PROTOCOL.md §3.12).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditVerify {}

/// Answer to `audit_verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerifyResponse {
    /// True when no problem was found.
    pub intact: bool,
    /// Records walked.
    pub records: u64,
    /// Seals checked.
    pub seals: u64,
    /// The highest sequence number a seal covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sealed: Option<u64>,
    /// The first problem, when not intact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<AuditProblem>,
    /// `intact`, `unsealed` (no problem, but records that no seal vouched
    /// for when the daemon started: `unsealed` lists them) or `not_intact`.
    #[serde(default)]
    pub status: String,
    /// Records that were covered by no valid seal when a daemon started
    /// (and were sealed only then), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsealed: Vec<AuditUnsealed>,
    /// On a cluster (docs/CLUSTER.md): every node's audit chain, each
    /// checked by the node that answers (the fields above are its own; a
    /// problem in any chain makes the whole answer not intact).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<AuditChainVerify>,
    /// After retention (docs/AUDIT.md §12): the first record kept; the
    /// records before it were archived or deleted, and the walk started at
    /// the boundary a retention record vouches for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_kept: Option<u64>,
}
operation!(AuditVerify, "audit_verify", AuditVerifyResponse);

/// One node's audit chain in [`AuditVerifyResponse::chains`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditChainVerify {
    /// The node that wrote it (`""`: the log of the single daemon from
    /// before the cluster).
    pub node: String,
    /// Its status, as [`AuditVerifyResponse::status`].
    pub status: String,
    /// Records walked.
    pub records: u64,
    /// Seals checked.
    pub seals: u64,
    /// Its first problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<AuditProblem>,
}

/// Records that no valid seal covered when a daemon started (AUDIT.md §4):
/// they were written before a crash, or changed while the daemon was
/// stopped; nobody can tell which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditUnsealed {
    /// The first of them.
    pub from: u64,
    /// The last of them.
    pub to: u64,
    /// The alert record that reports them.
    pub reported_in: u64,
    /// When the daemon started (the alert record's time), Unix milliseconds.
    pub time_ms: u64,
}

/// `audit_export`: the log as it is stored, records and seals, for checking
/// away from the host with the audit public key (PROTOCOL.md §3.27).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {
    /// Start with the first record at or after this time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Only records with a higher `seq` (and the seals of those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
}

/// Answer to `audit_export`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditExportResponse {
    /// JSON lines in the order of the chain: each record's exact stored
    /// bytes, and after a record the seals that cover it as
    /// `{"seal":{...}}` (AUDIT.md §3.3).
    pub lines: Vec<String>,
    /// The highest record `seq` returned (or `after`): pass it as `after`.
    pub next: u64,
    /// Cut to fit a frame: more follows.
    pub more: bool,
}
operation!(AuditExport, "audit_export", AuditExportResponse);

/// `audit_public_key`: the public half of the audit signing key
/// (PROTOCOL.md §3.28).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPublicKey {}

/// Answer to `audit_public_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditPublicKeyResponse {
    /// `ecdsa-p256-sha256`.
    pub algorithm: String,
    /// The key pair's label in the token.
    pub label: String,
    /// The public key, PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo).
    pub pem: String,
}
operation!(AuditPublicKey, "audit_public_key", AuditPublicKeyResponse);

/// The first thing wrong with the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditProblem {
    /// The record concerned.
    pub seq: u64,
    /// `altered`, `removed`, `inserted`, `reordered`, `truncated` or `bad_seal`.
    pub kind: String,
    /// What was found.
    pub message: String,
}

/// `metrics`: the daemon's metrics in the Prometheus text format
/// (PROTOCOL.md §3.33); needs the `metrics` permission.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {}

/// Answer to `metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsResponse {
    /// The format of `text`: `prometheus-text-0.0.4`.
    pub format: String,
    /// The exposition, as `GET /metrics` serves it.
    pub text: String,
}
operation!(Metrics, "metrics", MetricsResponse);
