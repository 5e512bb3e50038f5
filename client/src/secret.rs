//! Bytes that are secret (plaintexts, data keys): zeroized on drop, redacted
//! in Debug, base64 (standard alphabet, padded) on the wire.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Secret bytes. There is no Display, and Debug prints only the length.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are wiped when this value drops.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new secret buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        SecretBytes::new(bytes.to_vec())
    }

    /// The secret itself. Callers keep what they read inside zeroizing
    /// buffers, or hand it straight to its one consumer.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(STANDARD.encode(self.expose()));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 3));
        STANDARD
            .decode_vec(text.as_bytes(), &mut out)
            // The decoder's own message quotes the offending byte: a byte of
            // the secret. Say only what is wrong.
            .map_err(|_| serde::de::Error::custom("bad base64 (standard alphabet, padded)"))?;
        Ok(SecretBytes(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_and_serde_round_trips() {
        let s = SecretBytes::from_slice(b"hunter2");
        assert_eq!(format!("{s:?}"), "SecretBytes(<7 bytes redacted>)");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"aHVudGVyMg==\"");
        let back: SecretBytes = serde_json::from_str(&json).unwrap();
        assert_eq!(back.expose(), b"hunter2");
        let err = serde_json::from_str::<SecretBytes>("\"not base64!\"").unwrap_err();
        assert!(err.to_string().contains("bad base64"), "{err}");
    }
}
