//! Entry points for the fuzz targets in `fuzz/` (docs/SECURITY.md §6):
//! the daemon's own code for what a client's frame or a database row goes
//! through, reachable without a running daemon. Not an API: nothing else
//! calls these, and they change with the code they expose.

use std::sync::OnceLock;

use crate::identity::{Caller, GroupId};
use crate::policy::{Access, Permission, Policy, PolicySection, Target};
use crate::store::{KeyRecord, Meta, StoreError};
use keyhaven::revocation::Revocation;

/// What the daemon makes of one request frame's body before anything that
/// needs its state (the audit log's, the store's).
pub enum Request {
    /// Parsed: the request's id and operation, its params parsed into the
    /// operation's type, what the operation needs from the policy, and
    /// (when it needs a permission) the decision of [`FUZZ_POLICY`] for
    /// [`fuzz_caller`] on the names the params carry.
    Parsed { id: u64, op: String, access: Access, allowed: Option<bool> },
    /// Refused before the handler runs: the whole answer frame (length
    /// prefix and JSON body), as the connection would write it.
    Refused(Vec<u8>),
}

/// The policy the `request` target decides with: user `fuzz` may encrypt
/// and decrypt under tenant `acme`'s keys, and nothing else.
pub const FUZZ_POLICY: &str = r#"
[[policy.rules]]
name = "fuzz"
principals = ["user:fuzz"]
operations = ["encrypt", "decrypt"]
keys = ["acme/*"]
"#;

/// The caller the `request` target decides for: uid 4242, user `fuzz`.
pub fn fuzz_caller() -> Caller {
    Caller {
        uid: 4242,
        gid: 4242,
        pid: None,
        user: Some("fuzz".into()),
        groups: vec![GroupId { gid: 4242, name: Some("fuzz".into()) }],
        exe: None,
        cgroup: None,
    }
}

fn fuzz_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        #[derive(serde::Deserialize)]
        struct File {
            policy: PolicySection,
        }
        let file: File = toml::from_str(FUZZ_POLICY).expect("FUZZ_POLICY parses");
        Policy::compile(&file.policy, FUZZ_POLICY).expect("FUZZ_POLICY compiles")
    })
}

/// A frame body as [`crate::connection`] reads it and [`crate::ops::dispatch`]
/// finds and parses its operation, then (for an operation that needs a
/// permission) the names in its params checked as a handler checks them
/// and the policy asked, as a handler asks it for a target named in the
/// params (`tenant` and `key`, `tenant` alone, or neither: every key). An
/// alias is not resolved (that needs the store), and a target named only
/// inside a ciphertext or envelope is not decoded here. The answer to a
/// refused request is built exactly as the connection builds it.
pub fn request(body: &[u8]) -> Request {
    let (id, op, params) = match crate::connection::read_request(body) {
        Err(answer) => return Request::Refused(answer.to_vec()),
        Ok(parts) => parts,
    };
    let refused = |e: crate::error::Error| {
        Request::Refused(crate::connection::error_frame(Some(id), e.code(), &e).to_vec())
    };
    let access = match crate::ops::parse_request_params(&op, &params) {
        Ok(access) => access,
        Err(e) => return refused(e),
    };
    let Access::Needs(permission) = access else {
        return Request::Parsed { id, op, access, allowed: None };
    };
    match decide(permission, &params) {
        Ok(allowed) => Request::Parsed { id, op, access, allowed: Some(allowed) },
        Err(e) => refused(e),
    }
}

/// The policy's decision on the target the params name; a name that is
/// not a valid name is refused as the handlers refuse it.
fn decide(permission: Permission, params: &str) -> Result<bool, crate::error::Error> {
    let params: serde_json::Value = serde_json::from_str(params).unwrap_or_default();
    let text = |field: &str| params.get(field).and_then(serde_json::Value::as_str);
    let caller = fuzz_caller();
    let allowed = match (text("tenant"), text("key")) {
        (Some(tenant), Some(key)) => {
            let path = keyhaven::KeyPath::new(tenant, key)?;
            fuzz_policy().allows(&caller, permission, &Target::Key { tenant: path.tenant(), key: path.key() })
        }
        (Some(tenant), None) => {
            keyhaven::names::validate_name("tenant", tenant)?;
            fuzz_policy().allows(&caller, permission, &Target::Tenant(tenant))
        }
        _ => fuzz_policy().allows(&caller, permission, &Target::All),
    };
    Ok(allowed)
}

/// The `id` the daemon echoes for a body that is not a valid request
/// (PROTOCOL.md §1).
pub fn echoed_id(body: &[u8]) -> Option<u64> {
    crate::connection::echoed_id(body)
}

/// A record as PostgreSQL returns it, decoded as the store decodes it.
pub enum Row {
    Meta(Box<Meta>),
    Key(Box<KeyRecord>),
    Revocation(Box<Revocation>),
}

/// Decodes one row of table `tree` (`meta`, `keyring` with key
/// `tenant/name`, `revocations` with its scope key) as the PostgreSQL store
/// does when it reads or catches up on it, and runs on a key record what
/// the daemon computes from one it serves (details, rotation schedule).
/// A row that does not decode is [`StoreError::Corrupt`], never a panic.
pub fn postgres_row(tree: &str, key: &str, text: &str) -> Result<Row, StoreError> {
    use crate::store::postgres::decode;
    match tree {
        "meta" => Ok(Row::Meta(Box::new(decode::<Meta>("meta", text)?))),
        "keyring" => {
            let record: KeyRecord = decode(&format!("keyring {key}"), text)?;
            if let Some((tenant, name)) = key.split_once('/') {
                let _ = keyhaven::KeyPath::new(tenant, name);
            }
            let _ = record.path();
            crate::ops::key_record_views(&record)
                .map_err(|e| StoreError::Corrupt { key: format!("keyring {key}"), reason: e.to_string() })?;
            Ok(Row::Key(Box::new(record)))
        }
        "revocations" => {
            let record: Revocation = decode(&format!("revocation {key}"), text)?;
            let _ = crate::store::cluster::scope_of_key(key);
            Ok(Row::Revocation(Box::new(record)))
        }
        other => Err(StoreError::Corrupt { key: other.to_owned(), reason: "no such table".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(body: &str) -> Option<bool> {
        match request(body.as_bytes()) {
            Request::Parsed { allowed, .. } => allowed,
            Request::Refused(frame) => panic!("refused: {}", String::from_utf8_lossy(&frame[4..])),
        }
    }

    #[test]
    fn the_request_target_puts_named_targets_to_the_policy() {
        let encrypt = |tenant: &str| {
            format!(
                r#"{{"id":1,"op":"encrypt","params":{{"tenant":"{tenant}","key":"pii","plaintext":""}}}}"#
            )
        };
        assert_eq!(decision(&encrypt("acme")), Some(true));
        assert_eq!(decision(&encrypt("other")), Some(false));
        assert_eq!(
            decision(r#"{"id":2,"op":"key_create","params":{"tenant":"acme","key":"k"}}"#),
            Some(false)
        );
        assert_eq!(decision(r#"{"id":3,"op":"key_list","params":{}}"#), Some(false));
        assert_eq!(decision(r#"{"id":4,"op":"health","params":{}}"#), None);
        // A name that is not one is refused as the handlers refuse it.
        match request(encrypt("a/b").as_bytes()) {
            Request::Refused(frame) => {
                let answer: serde_json::Value = serde_json::from_slice(&frame[4..]).unwrap();
                assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
            }
            Request::Parsed { .. } => panic!("a tenant name with a slash was not refused"),
        }
    }
}
