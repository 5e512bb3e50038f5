//! Emergency revocation on the wire (docs/PROTOCOL.md §3.13–3.16): the
//! scopes, the reasons, and the `revoke`, `revoke_lift`, `revoke_list` and
//! `destroy` operations.
//!
//! A suspension is reversible and may expire; a destruction erases the
//! wrapped key material for good. Scopes nest: a data key lies in a key
//! version, which lies in a key, which lies in a tenant, which lies in the
//! whole system.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::names::KeyPath;
use crate::wire::Operation;

/// What a revocation covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scope {
    /// One data key, by its envelope id (32 hex digits).
    Datakey {
        /// The envelope id, as `datakey` and `encrypt` return it.
        envelope_id: String,
    },
    /// One key, or one version of it.
    Key {
        /// Tenant name.
        tenant: String,
        /// Key name.
        key: String,
        /// Only this version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
    /// Every key of a tenant.
    Tenant {
        /// Tenant name.
        tenant: String,
    },
    /// Everything.
    All,
}

impl Scope {
    /// The key `path`, every version of it.
    pub fn key(path: &KeyPath) -> Scope {
        Scope::Key { tenant: path.tenant().into(), key: path.key().into(), version: None }
    }

    /// One version of the key `path`.
    pub fn version(path: &KeyPath, version: u32) -> Scope {
        Scope::Key { tenant: path.tenant().into(), key: path.key().into(), version: Some(version) }
    }

    /// Every key of `tenant`.
    pub fn tenant(tenant: &str) -> Scope {
        Scope::Tenant { tenant: tenant.into() }
    }

    /// One data key, by the envelope id that `encrypt` and `datakey`
    /// answer (or that [`crate::Envelope::id`] reads from a stored value).
    pub fn datakey(id: &crate::EnvelopeId) -> Scope {
        Scope::Datakey { envelope_id: id.to_string() }
    }

    /// Checks the names and the envelope id.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Scope::Datakey { envelope_id } => envelope_id.parse::<crate::EnvelopeId>().map(|_| ()),
            Scope::Key { tenant, key, version } => {
                KeyPath::new(tenant, key)?;
                if *version == Some(0) {
                    return Err(Error::InvalidName("key version 0: versions start at 1".into()));
                }
                Ok(())
            }
            Scope::Tenant { tenant } => KeyPath::new(tenant, "x").map(|_| ()),
            Scope::All => Ok(()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Datakey { envelope_id } => write!(f, "data key {envelope_id}"),
            Scope::Key { tenant, key, version: None } => write!(f, "key `{tenant}/{key}`"),
            Scope::Key { tenant, key, version: Some(v) } => write!(f, "key `{tenant}/{key}` version {v}"),
            Scope::Tenant { tenant } => write!(f, "tenant `{tenant}`"),
            Scope::All => f.write_str("the whole system"),
        }
    }
}

/// Why, in the KMIP revocation reason vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// No reason given.
    Unspecified,
    /// The key (or something that can use it) leaked.
    KeyCompromise,
    /// The owner left or moved.
    AffiliationChanged,
    /// Replaced by a newer key.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// The user of the key lost the right to it.
    PrivilegeWithdrawn,
}

impl Reason {
    /// Every reason, in wire spelling.
    pub const ALL: [&'static str; 6] = [
        "unspecified",
        "key-compromise",
        "affiliation-changed",
        "superseded",
        "cessation-of-operation",
        "privilege-withdrawn",
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "key-compromise",
            Reason::AffiliationChanged => "affiliation-changed",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessation-of-operation",
            Reason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Reason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("unknown reason `{s}`; one of: {}", Reason::ALL.join(", ")))
    }
}

/// Suspended (reversible) or destroyed (for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// Reversible; may expire.
    Suspended,
    /// The key material is erased.
    Destroyed,
}

/// A revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What it covers.
    pub scope: Scope,
    /// Suspended or destroyed.
    pub kind: RevocationKind,
    /// Why.
    pub reason: Reason,
    /// Since when, Unix seconds.
    pub since: u64,
    /// When a suspension ends by itself, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The uid of the caller who revoked.
    pub by_uid: u32,
    /// In `revoke`'s answer for a `datakey` scope only (never stored):
    /// whether a record of the audit log names that envelope id (`false`:
    /// none does, perhaps a typo; absent: the search ran out of time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_seen: Option<bool>,
}

/// `revoke`: suspend a scope (PROTOCOL.md §3.13).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// What to suspend.
    pub scope: Scope,
    /// Why.
    pub reason: Reason,
    /// When the suspension ends by itself, Unix seconds (future).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `revoke_lift`: end a suspension (PROTOCOL.md §3.14).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeLift {
    /// The scope exactly as it was suspended.
    pub scope: Scope,
    /// Why it is lifted.
    pub reason: Reason,
}

/// Answer to `revoke_lift`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiftResponse {
    /// The suspension that ended.
    pub lifted: Revocation,
}

/// `revoke_list`: revocations in force (PROTOCOL.md §3.15).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeList {
    /// Only those that touch this tenant (its keys, itself, and `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// At most this many revocations in the answer, 1 to
    /// [`crate::wire::MAX_LIST_PAGE`] (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The revocations after this scope: the previous page's `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Scope>,
}

/// Answer to `revoke_list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeListResponse {
    /// Revocations, narrowest scope last.
    pub revocations: Vec<Revocation>,
    /// Present when more follow: pass it as `after` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Scope>,
}

impl Scope {
    /// The scope's place in `revoke_list`'s order: the whole system, then
    /// each tenant (by name) with its keys (by name), each key before its
    /// versions; then data keys, by envelope id.
    pub fn list_order(&self) -> (u8, &str, &str, u32, &str) {
        match self {
            Scope::All => (0, "", "", 0, ""),
            Scope::Tenant { tenant } => (1, tenant, "", 0, ""),
            Scope::Key { tenant, key, version } => (1, tenant, key, version.unwrap_or(0), ""),
            Scope::Datakey { envelope_id } => (2, "", "", 0, envelope_id),
        }
    }
}

/// `destroy`: erase the key material of a suspended key, key version or
/// tenant for good (PROTOCOL.md §3.16).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destroy {
    /// A key, a key version or a tenant.
    pub scope: Scope,
    /// The scope's name typed again: `tenant/key` or `tenant`.
    pub confirm: String,
}

/// Answer to `destroy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestroyResponse {
    /// The destruction, now in force for good.
    pub revocation: Revocation,
    /// The key versions whose material was erased, as `tenant/key@N`.
    pub erased: Vec<String>,
}

crate::wire::operation!(Revoke, "revoke", Revocation);
crate::wire::operation!(RevokeLift, "revoke_lift", LiftResponse);
crate::wire::operation!(RevokeList, "revoke_list", RevokeListResponse);
crate::wire::operation!(Destroy, "destroy", DestroyResponse);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_on_the_wire() {
        let s: Scope =
            serde_json::from_str(r#"{"kind":"key","tenant":"acme","key":"pii","version":2}"#).unwrap();
        assert_eq!(s, Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(2) });
        assert_eq!(serde_json::to_string(&Scope::All).unwrap(), r#"{"kind":"all"}"#);
        assert!(serde_json::from_str::<Scope>(r#"{"kind":"tenant","tenant":"a","key":"b"}"#).is_err());
        assert!(serde_json::from_str::<Scope>(r#"{"kind":"planet"}"#).is_err());
        assert!(Scope::Datakey { envelope_id: "00".into() }.validate().is_err());
        assert!(Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(0) }
            .validate()
            .is_err());
    }

    #[test]
    fn reasons_parse_and_print() {
        for r in Reason::ALL {
            assert_eq!(r.parse::<Reason>().unwrap().as_str(), r);
        }
        let e = "oops".parse::<Reason>().unwrap_err();
        assert!(e.contains("key-compromise"), "{e}");
    }
}
