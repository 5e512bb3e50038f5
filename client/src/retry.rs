//! Which requests a reconnecting [`Client`](crate::Client) sends again
//! after the connection died while they were in flight.
//!
//! A request that never reached the daemon (the connection had already
//! ended, or writing it failed) is always sent once more on a new
//! connection: the daemon never saw it. A request that was written and
//! then lost its answer may have run; it is sent again only when running
//! it twice does what running it once does:
//!
//! - operations that change nothing: [`READ_ONLY`];
//! - `key_create` and `key_rotate` with an idempotency key (the daemon
//!   answers a repeat with the key as it is, PROTOCOL.md §3.3, §3.17).
//!
//! Everything else (`encrypt`, `datakey`, `rewrap` make a new envelope or
//! ciphertext and spend the key version's wrap budget; `revoke`, `key_set`,
//! `destroy`... change state) fails with [`Error::Closed`](crate::Error::Closed):
//! the caller decides.

use serde_json::Value;

use crate::wire::Operation;

/// Operations that change no state (the audit log records each call, so a
/// retried one may appear twice there).
pub const READ_ONLY: &[&str] = &[
    "hello",
    "health",
    "whoami",
    "metrics",
    "key_list",
    "key_show",
    "revoke_list",
    "audit_read",
    "audit_verify",
    "audit_export",
    "audit_public_key",
    "public_key",
    "decrypt",
    "datakey_decrypt",
    "mac",
    "mac_verify",
    "sign",
    "subscribe_revocations",
];

/// Operations that are safe to repeat when they carry an idempotency key.
pub const IDEMPOTENT_WITH_KEY: &[&str] = &["key_create", "key_rotate"];

/// Whether a lost request of this operation may be sent again.
pub(crate) fn is_safe<O: Operation + 'static>(params: &O) -> bool {
    let any = params as &dyn std::any::Any;
    if let Some(create) = any.downcast_ref::<crate::wire::KeyCreate>() {
        return create.idempotency_key.is_some();
    }
    if let Some(rotate) = any.downcast_ref::<crate::lifecycle::KeyRotate>() {
        return rotate.idempotency_key.is_some();
    }
    READ_ONLY.contains(&O::OP)
}

/// [`is_safe`] for a request by name with raw params.
pub(crate) fn is_safe_raw(op: &str, params: &Value) -> bool {
    READ_ONLY.contains(&op)
        || (IDEMPOTENT_WITH_KEY.contains(&op) && params.get("idempotency_key").is_some_and(Value::is_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::KeyRotate;
    use crate::wire::{Datakey, Health, KeyCreate};

    #[test]
    fn only_reads_and_keyed_creations_are_retried() {
        // Built from JSON, so that fields added to these structs later
        // leave this test alone.
        fn params<T: serde::de::DeserializeOwned>(v: Value) -> T {
            serde_json::from_value(v).unwrap()
        }
        assert!(is_safe(&Health {}));
        assert!(!is_safe(&params::<KeyRotate>(serde_json::json!({"tenant": "a", "key": "b"}))));
        let keyed = serde_json::json!({"tenant": "a", "key": "b", "idempotency_key": "r1"});
        assert!(is_safe(&params::<KeyRotate>(keyed.clone())));
        assert!(!is_safe(&params::<KeyCreate>(serde_json::json!({"tenant": "a", "key": "b"}))));
        assert!(is_safe(&params::<KeyCreate>(keyed)));
        assert!(!is_safe(&params::<Datakey>(serde_json::json!({"tenant": "a", "key": "b"}))));
        assert!(is_safe_raw("key_show", &serde_json::json!({})));
        assert!(!is_safe_raw("encrypt", &serde_json::json!({})));
        assert!(!is_safe_raw("key_rotate", &serde_json::json!({"idempotency_key": null})));
        assert!(is_safe_raw("key_rotate", &serde_json::json!({"idempotency_key": "x"})));
    }
}
