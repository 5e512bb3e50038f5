//! Tenant and key names.
//!
//! A name is 1 to 63 bytes of lowercase ASCII letters, digits, `-` and `_`,
//! starting with a letter or digit. The same rule holds on the wire, in the
//! store and in envelopes (docs/ENVELOPE.md §2), so a name that parses here
//! can be written into an envelope header with a one-byte length.

use std::fmt;

use crate::error::Error;

/// Longest tenant or key name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// The longest idempotency key (`key_create`, `key_rotate`).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

/// Checks an idempotency key: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`
/// (a UUID, a request id, `deploy-2026-12-01:step3`).
pub fn validate_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "field `idempotency_key`: {} characters; it takes 1 to {MAX_IDEMPOTENCY_KEY_LEN}",
            key.chars().count()
        ));
    }
    if let Some(c) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "field `idempotency_key`: `{}` is not allowed; it takes letters, digits and . _ : -",
            c.escape_debug()
        ));
    }
    Ok(())
}

/// Checks one tenant or key name; `what` names it in the error ("tenant", "key").
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::InvalidName(format!("{what} name `{}`: {why}", printable(name))));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("is longer than 63 bytes");
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return bad("must start with a lowercase letter or a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        return bad("may hold only a-z, 0-9, `-` and `_`");
    }
    Ok(())
}

/// Shortens and escapes a name for an error message, so that hostile input
/// cannot flood a log line or a terminal.
pub(crate) fn printable(name: &str) -> String {
    let mut s: String = name.chars().take(64).flat_map(char::escape_default).collect();
    if name.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// A named key of a tenant, written `tenant/key`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPath {
    tenant: String,
    key: String,
}

impl KeyPath {
    /// Builds a path from its two names, checking both.
    pub fn new(tenant: &str, key: &str) -> Result<Self, Error> {
        validate_name("tenant", tenant)?;
        validate_name("key", key)?;
        Ok(KeyPath { tenant: tenant.to_owned(), key: key.to_owned() })
    }

    /// The tenant's name.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The key's name within its tenant.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl std::str::FromStr for KeyPath {
    type Err = Error;

    /// Parses `tenant/key`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.split_once('/') {
            Some((tenant, key)) => KeyPath::new(tenant, key),
            None => Err(Error::InvalidName(format!("`{}` is not of the form TENANT/KEY", printable(s)))),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.key)
    }
}

impl fmt::Debug for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for n in ["a", "acme", "pii-2", "tenant_9", &"x".repeat(63)] {
            validate_name("key", n).unwrap();
        }
        let p: KeyPath = "acme/pii".parse().unwrap();
        assert_eq!((p.tenant(), p.key()), ("acme", "pii"));
        assert_eq!(p.to_string(), "acme/pii");
    }

    #[test]
    fn refuses_bad_names() {
        for n in ["", "-a", "_a", "Acme", "a b", "a/b", "a*", "é", &"x".repeat(64)] {
            assert!(validate_name("key", n).is_err(), "{n:?} accepted");
        }
        for p in ["acme", "acme/", "/pii", "acme/pii/x", "acme/p i"] {
            assert!(p.parse::<KeyPath>().is_err(), "{p:?} accepted");
        }
    }
}
