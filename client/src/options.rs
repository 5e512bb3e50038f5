//! Options of the client's calls that would otherwise be bare booleans or
//! long lists of `Option`s.

use std::time::Duration;

use crate::keytype::KeyType;

/// Whether `datakey` returns the data key itself, or only its envelope
/// (to store now and unwrap later with `datakey_decrypt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Plaintext {
    /// The data key and its envelope: to encrypt something now.
    #[default]
    Include,
    /// Only the envelope (`plaintext` is `None` in the answer).
    Omit,
}

/// How [`Client::key_create_with`](crate::Client::key_create_with) makes a
/// key: its type, automatic rotation and idempotency key.
///
/// ```
/// use std::time::Duration;
/// use keyhaven::{KeyOptions, KeyType};
///
/// let options = KeyOptions::new()
///     .key_type(KeyType::HmacSha256)
///     .rotate_every(Duration::from_secs(90 * 86_400))
///     .idempotency_key("deploy-42");
/// assert_eq!(options.get_key_type(), KeyType::HmacSha256);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    pub(crate) key_type: KeyType,
    pub(crate) rotate_every: Option<Duration>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) tags: std::collections::BTreeMap<String, String>,
}

impl KeyOptions {
    /// An `aes256-gcm` key, no automatic rotation, no idempotency key.
    pub fn new() -> Self {
        Self::default()
    }

    /// The key's type.
    pub fn key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// Rotate automatically every `period` (whole seconds, 1 s to 100
    /// years: PROTOCOL.md §3.3), set in the same write as the key.
    pub fn rotate_every(mut self, period: Duration) -> Self {
        self.rotate_every = Some(period);
        self
    }

    /// Makes the call safe to retry: a second `key_create` with the same
    /// idempotency key answers with the key as it is instead of
    /// `already_exists`, and a reconnecting client retries it after a lost
    /// connection (1 to 64 of `A-Za-z0-9._:-`).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// A description of the key (at most 256 bytes; PROTOCOL.md §3.3).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// A tag `name` = `value` (at most 50; PROTOCOL.md §3.3); the same
    /// name again replaces the value.
    pub fn tag(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(name.into(), value.into());
        self
    }

    /// The key's type, as set.
    pub fn get_key_type(&self) -> KeyType {
        self.key_type
    }
}
