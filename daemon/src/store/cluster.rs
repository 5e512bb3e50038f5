//! What a node of a cluster learns from the others (docs/CLUSTER.md): the
//! store's change feed tells it which records other nodes wrote, the store
//! reloads them into its own caches and its copy of the anchored digest,
//! and hands them to a [`ChangeSink`], the daemon's in-memory state
//! (revocations in force, loaded KEKs), before it reports the revision as
//! applied. A `revoke` waits for that report from every node with a live
//! lease, so a node never serves what another node revoked.

use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;

use super::{KeyRecord, Meta};

/// The daemon's state that follows other nodes' writes. Called on the
/// store's own threads, in revision order, before the revision is
/// reported as applied: keep each call short and non-blocking.
pub trait ChangeSink: Send + Sync {
    /// The revocation of `scope` is now `record` (`None`: lifted).
    fn revocation(&self, scope: &Scope, record: Option<&Revocation>);
    /// Key `path` changed (rotated, trimmed, destroyed, disabled...).
    fn key(&self, path: &KeyPath, record: Option<&KeyRecord>);
    /// The global facts changed (a master-key rotation step).
    fn meta(&self, meta: &Meta);
    /// The feed no longer held every change this node had not applied
    /// (trimmed while the node was away, docs/CLUSTER.md §4): the whole
    /// state, read afresh in one snapshot: every revocation and every key
    /// record in the store, and the meta record.
    fn reload(&self, meta: Option<&Meta>, keys: &[KeyRecord], revocations: &[Revocation]);
}

/// The revocation scope whose record key (`super::sled_store::revocation_key`)
/// is `key`.
pub fn scope_of_key(key: &str) -> Option<Scope> {
    let parts: Vec<&str> = key.split('/').collect();
    Some(match parts.as_slice() {
        ["all"] => Scope::All,
        ["tenant", t] => Scope::Tenant { tenant: (*t).to_owned() },
        ["key", t, k] => Scope::Key { tenant: (*t).to_owned(), key: (*k).to_owned(), version: None },
        ["version", t, k, v] => {
            Scope::Key { tenant: (*t).to_owned(), key: (*k).to_owned(), version: Some(v.parse().ok()?) }
        }
        ["datakey", id] => Scope::Datakey { envelope_id: (*id).to_owned() },
        _ => return None,
    })
}

/// Whether the change from `old` to `new` takes away a right to use the
/// key (disabled, a version destroyed or trimmed, a minimum decryption
/// version raised, a deletion scheduled): such a write returns only once
/// every live node applied it. Rotations, usage counts and wrap
/// reservations do not wait.
pub fn takes_away(old: &KeyRecord, new: &KeyRecord) -> bool {
    let usable = |r: &KeyRecord| {
        r.versions.iter().filter(|v| v.destroyed_at.is_none()).map(|v| v.version).collect::<Vec<_>>()
    };
    old.state != new.state
        || new.min_decryption_version > old.min_decryption_version
        || new.deletion_at.is_some() && new.deletion_at != old.deletion_at
        || usable(old).iter().any(|v| !usable(new).contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_keys_parse_back_to_their_scope() {
        for scope in [
            Scope::All,
            Scope::Tenant { tenant: "acme".into() },
            Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None },
            Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(3) },
            Scope::Datakey { envelope_id: "0123456789abcdef0123456789abcdef".into() },
        ] {
            let key = String::from_utf8(super::super::sled_store::revocation_key(&scope)).unwrap();
            assert_eq!(scope_of_key(&key), Some(scope));
        }
        for bad in ["", "version/a/b/x", "key/a", "nope/x"] {
            assert_eq!(scope_of_key(bad), None, "{bad}");
        }
    }
}
