//! MACs under `hmac-sha256` keys: the `mac` and `mac_verify` operations
//! and the tag's text form (docs/PROTOCOL.md §3.29–3.30).
//!
//! A tag is HMAC-SHA256 (RFC 2104) of the message under one version of the
//! key, computed in the token, and written with the version it was made
//! under, so that a verifier needs nothing but the tag and the message:
//!
//! ```text
//! khm1: || base64url( version: u32 big-endian || mac: 32 bytes )
//! ```
//!
//! 36 bytes, 48 base64url characters, 53 with the prefix. The same message
//! under the same version always gives the same tag, which is what a blind
//! index needs (equality lookups of an encrypted column).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::wire::{operation, Operation, SecretBytes};

/// The text prefix of a tag.
pub const TAG_PREFIX: &str = "khm1:";

/// Length of the HMAC-SHA256 output.
pub const MAC_LEN: usize = 32;

/// Length of a tag's binary form: the version and the MAC.
pub const TAG_LEN: usize = 4 + MAC_LEN;

/// Largest message `mac` and `mac_verify` take, in bytes (as `encrypt`).
pub const MAX_MAC_MESSAGE: usize = crate::wire::MAX_ENCRYPT_PLAINTEXT;

/// A MAC and the key version it was made under.
#[derive(Clone, PartialEq, Eq)]
pub struct MacTag {
    /// The key version.
    pub version: u32,
    /// HMAC-SHA256 of the message under that version.
    pub mac: [u8; MAC_LEN],
}

impl MacTag {
    /// The binary form (version big-endian, then the MAC).
    pub fn to_bytes(&self) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        out[..4].copy_from_slice(&self.version.to_be_bytes());
        out[4..].copy_from_slice(&self.mac);
        out
    }
}

impl fmt::Display for MacTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TAG_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl fmt::Debug for MacTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacTag({self})")
    }
}

impl FromStr for MacTag {
    type Err = Error;

    /// Parses a tag's text form strictly: surrounding whitespace is
    /// ignored; the prefix, the unpadded canonical base64url, the length
    /// and a version of at least 1 are required.
    fn from_str(s: &str) -> Result<MacTag, Error> {
        let bad = |why: &str| Error::Envelope(format!("MAC tag: {why}"));
        let body = s
            .trim()
            .strip_prefix(TAG_PREFIX)
            .ok_or_else(|| bad(&format!("text form must start with `{TAG_PREFIX}`")))?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|e| bad(&format!("bad base64url: {e}")))?;
        if bytes.len() != TAG_LEN {
            return Err(bad(&format!("{} bytes, a tag has {TAG_LEN}", bytes.len())));
        }
        let version = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
        if version == 0 {
            return Err(bad("key version 0 (versions start at 1)"));
        }
        Ok(MacTag { version, mac: bytes[4..].try_into().expect("32 bytes") })
    }
}

/// `mac`: HMAC-SHA256 of a message under an `hmac-sha256` key (PROTOCOL.md
/// §3.29).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mac {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The message, base64 (secret: it may be the value a blind index
    /// hides).
    pub message: SecretBytes,
    /// The key version to use; the current one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// Answer to `mac`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MacResponse {
    /// The tag, `khm1:…`.
    pub tag: String,
    /// The key version it was made under.
    pub key_version: u32,
}
operation!(Mac, "mac", MacResponse);

/// `mac_verify`: whether a tag is the MAC of a message under the key
/// version it names (PROTOCOL.md §3.30).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacVerify {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The message, base64.
    pub message: SecretBytes,
    /// The tag, `khm1:…`.
    pub tag: String,
}

/// Answer to `mac_verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MacVerifyResponse {
    /// Whether the tag is the message's MAC under `key_version`.
    pub valid: bool,
    /// The key version the tag names.
    pub key_version: u32,
}
operation!(MacVerify, "mac_verify", MacVerifyResponse);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_bad_ones_are_refused() {
        let tag = MacTag { version: 3, mac: [0xab; MAC_LEN] };
        let text = tag.to_string();
        assert_eq!(text.len(), 53);
        assert!(text.starts_with("khm1:AAAAA6ur"), "{text}");
        assert_eq!(text.parse::<MacTag>().unwrap(), tag);
        assert_eq!(format!(" {text}\n").parse::<MacTag>().unwrap(), tag);
        let zero = MacTag { version: 0, mac: [0; MAC_LEN] }.to_string();
        for bad in [
            "",
            "khm1:",
            &text[..52],
            &format!("{text}A"),
            &text.replace("khm1:", "khm2:"),
            &text.replace("khm1:", "KHM1:"),
            &format!("{text}="),
            &text.replacen('A', "+", 1),
            &zero,
        ] {
            assert!(bad.parse::<MacTag>().is_err(), "{bad}");
        }
    }
}
