//! The key lifecycle on the wire (docs/PROTOCOL.md §3.17–3.23): versions and
//! rotation, the minimum decryption version and trimming, states and
//! scheduled deletion, usage, and `rewrap`.

use serde::{Deserialize, Serialize};

use crate::context::EncryptionContext;
use crate::wire::Operation;

/// Whether a named key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Every use.
    Enabled,
    /// No new data keys or ciphertexts; existing ones still decrypt, so data
    /// stays readable while a key is phased out (stopping decryption is what
    /// revocation is for).
    Disabled,
    /// No use at all until the deletion is cancelled or happens.
    PendingDeletion,
    /// The key material is erased; nothing under the key opens again.
    Deleted,
}

impl KeyState {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "enabled",
            KeyState::Disabled => "disabled",
            KeyState::PendingDeletion => "pending_deletion",
            KeyState::Deleted => "deleted",
        }
    }
}

/// What an answer says about whether a key may be used: its lifecycle
/// state ([`KeyState`]), unless a revocation in force covers the whole key
/// (itself, its tenant or the whole system), which takes precedence:
/// `suspended` (reversible) or `destroyed` (its material is erased). The
/// revocation itself comes with it (`revocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Every use.
    Enabled,
    /// Decrypts what exists; no new data keys, ciphertexts, MAC tags or
    /// signatures (see [`KeyState::Disabled`]).
    Disabled,
    /// No use at all until the deletion is cancelled or happens.
    PendingDeletion,
    /// Erased by a scheduled deletion.
    Deleted,
    /// A suspension covers the key: no use at all until it is lifted or
    /// expires.
    Suspended,
    /// A destruction covers the key: its material is erased.
    Destroyed,
}

impl From<KeyState> for KeyStatus {
    fn from(s: KeyState) -> KeyStatus {
        match s {
            KeyState::Enabled => KeyStatus::Enabled,
            KeyState::Disabled => KeyStatus::Disabled,
            KeyState::PendingDeletion => KeyStatus::PendingDeletion,
            KeyState::Deleted => KeyStatus::Deleted,
        }
    }
}

/// A status is its lifecycle state when no revocation covers the key.
impl PartialEq<KeyState> for KeyStatus {
    fn eq(&self, other: &KeyState) -> bool {
        *self == KeyStatus::from(*other)
    }
}

impl KeyStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Enabled => "enabled",
            KeyStatus::Disabled => "disabled",
            KeyStatus::PendingDeletion => "pending_deletion",
            KeyStatus::Deleted => "deleted",
            KeyStatus::Suspended => "suspended",
            KeyStatus::Destroyed => "destroyed",
        }
    }
}

/// One version as `key_show` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionDetails {
    /// Version number.
    pub version: u32,
    /// `current` (new data keys use it), `active` (decrypts), `retired`
    /// (below the minimum decryption version) or `destroyed`.
    pub state: String,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// The master key version that wraps it.
    pub master_key_version: u32,
    /// Data-key wraps counted against its nonce budget, counted in reserved
    /// ranges: an upper bound while the daemon runs (PROTOCOL.md §3.17).
    /// Absent (0) from a daemon that predates the `key_shape` feature.
    #[serde(default)]
    pub wrap_budget_reserved: u64,
    /// The same figure under its protocol-1 name; deprecated (PROTOCOL.md
    /// §5): read `wrap_budget_reserved`.
    #[serde(default)]
    pub wraps: u64,
    /// Decryptions (data-key unwraps) under it.
    pub decryptions: u64,
    /// Envelopes and ciphertexts rewrapped away from it.
    pub rewraps: u64,
    /// Last decryption or rewrap, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    /// `external` for imported material (`key_import`); left out for
    /// material generated in the token.
    #[serde(default, skip_serializing_if = "crate::import::Origin::is_default")]
    pub origin: crate::import::Origin,
}

/// A named key in full (`key_show` and the lifecycle operations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDetails {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// What kind of key (`aes256-gcm` from a daemon that predates types).
    #[serde(rename = "type", default)]
    pub key_type: crate::keytype::KeyType,
    /// Whether it may be used: the lifecycle state, or `suspended` /
    /// `destroyed` when a revocation covers the whole key.
    pub state: KeyStatus,
    /// The revocation in force that covers the whole key (the broadest:
    /// the whole system, then its tenant, then the key), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<crate::revocation::Revocation>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// The version new data keys use.
    pub current_version: u32,
    /// Versions below this one are refused for decryption.
    pub min_decryption_version: u32,
    /// Automatic rotation period in seconds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every_secs: Option<u64>,
    /// When the next automatic rotation is due, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<u64>,
    /// When a scheduled deletion happens, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_at: Option<u64>,
    /// Every version still held, oldest first.
    pub versions: Vec<VersionDetails>,
    /// What the key is for, if said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its tags, by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
    /// `external` for a key made by `key_import` (its versions come only
    /// from imports); left out for keys generated in the token.
    #[serde(default, skip_serializing_if = "crate::import::Origin::is_default")]
    pub origin: crate::import::Origin,
}

macro_rules! key_op {
    ($(#[$doc:meta])* $name:ident, $op:literal, $resp:ty { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Tenant name.
            pub tenant: String,
            /// Key name.
            pub key: String,
            $($(#[$fdoc])* #[serde(default, skip_serializing_if = "Option::is_none")] pub $field: $ty,)*
        }
        crate::wire::operation!($name, $op, $resp);
    };
}

key_op!(
    /// `key_rotate`: a new version, generated in the HSM; new data keys use it.
    KeyRotate, "key_rotate", KeyDetails {
        /// Makes a retry safe: a `key_rotate` whose idempotency key made one
        /// of the key's versions answers with the key as it is, adding none
        /// (PROTOCOL.md §3.17).
        idempotency_key: Option<String>
    }
);
key_op!(
    /// `key_show`: versions, states, dates, rotation period and usage.
    KeyShow, "key_show", KeyDetails {}
);
key_op!(
    /// `key_set`: change a key's lifecycle settings; absent fields stay.
    KeySet, "key_set", KeyDetails {
        /// Refuse decryption under versions below this one.
        min_decryption_version: Option<u32>,
        /// Automatic rotation period in seconds; 0 turns it off.
        rotate_every_secs: Option<u64>,
        /// `enabled` or `disabled`.
        state: Option<KeyState>,
        /// A new description; `""` removes it.
        description: Option<String>,
        /// Tags to add, or to give a new value.
        set_tags: Option<std::collections::BTreeMap<String, String>>,
        /// Names of tags to remove (a name the key lacks is ignored).
        remove_tags: Option<Vec<String>>
    }
);
key_op!(
    /// `key_trim`: delete for good the versions below the minimum
    /// decryption version.
    KeyTrim, "key_trim", KeyTrimResponse {}
);
key_op!(
    /// `key_schedule_deletion`: no use from now on; the material is erased
    /// after the waiting period (7 to 30 days, default 30).
    KeyScheduleDeletion, "key_schedule_deletion", KeyDetails {
        /// Days to wait.
        days: Option<u32>
    }
);
key_op!(
    /// `key_cancel_deletion`: back to `disabled`.
    KeyCancelDeletion, "key_cancel_deletion", KeyDetails {}
);

/// Answer to `key_trim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyTrimResponse {
    /// The versions deleted.
    pub trimmed: Vec<u32>,
    /// The key afterwards.
    pub details: KeyDetails,
}

/// `rewrap`: an envelope or ciphertext under an older version, returned
/// under the newest; the data key never leaves the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrap {
    /// A `khe1:` envelope or a `khc1:` ciphertext.
    pub text: String,
    /// The encryption context it was made with.
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub context: EncryptionContext,
}

/// Answer to `rewrap`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewrapResponse {
    /// The same kind of text, under the current version (unchanged when it
    /// already was).
    pub text: String,
    /// The version it was under.
    pub from_version: u32,
    /// The version it is under now.
    pub key_version: u32,
    /// The envelope id (kept: it is the same data key).
    pub envelope_id: String,
}
crate::wire::operation!(Rewrap, "rewrap", RewrapResponse);

/// `admin_rotate_master`: one batch of a master-key rotation. The first call
/// makes a new master key version in the HSM and makes it current; every
/// call rewraps up to `batch` KEK versions from the old master key to the
/// new one; call again until `finished`. Resumable at any point: a call
/// after a crash or restart carries on. With `rollback`, the rotation (under
/// way or finished, while the old master key exists) runs back the other way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRotateMaster {
    /// KEK versions to rewrap in this call (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// Go back to the previous master key version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
}

/// Answer to `admin_rotate_master`. KEKs cannot leave the master key that
/// wraps them (docs/SECURITY.md), so a rotation gives every key a new
/// version under the new master key; older versions stay under the old one
/// until their data is rewrapped and they are trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterRotationStatus {
    /// The master key version the rotation moves away from.
    pub from: u32,
    /// The master key version it moves to; new KEKs use it already.
    pub to: u32,
    /// Keys given a new current version under `to` by this call.
    pub rotated: u64,
    /// Keys whose current version is still under another master key.
    pub remaining: u64,
    /// Every key's current version is under `to`: the rotation is complete.
    pub finished: bool,
    /// Key versions still wrapped under `from` (older versions, kept for
    /// decryption): `from` can be retired once their data is rewrapped and
    /// they are trimmed or destroyed.
    pub left_under_from: u64,
}
crate::wire::operation!(AdminRotateMaster, "admin_rotate_master", MasterRotationStatus);

/// `admin_retire_master`: destroy an old master key version in the HSM,
/// refused while anything is still wrapped under it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRetireMaster {
    /// The master key version to destroy.
    pub version: u32,
}

/// Answer to `admin_retire_master`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetireMasterResponse {
    /// The version destroyed.
    pub destroyed: u32,
}
crate::wire::operation!(AdminRetireMaster, "admin_retire_master", RetireMasterResponse);
