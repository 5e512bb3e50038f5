//! Kinds of named key (docs/PROTOCOL.md §3.3). A key's type is fixed when
//! it is made; every version of it is of that type, and an operation meant
//! for another type is refused with `wrong_key_type`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a named key is and which operations it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KeyType {
    /// AES-256 key-encryption keys: `encrypt`, `decrypt`, `datakey`,
    /// `datakey_decrypt`, `rewrap` (the default, and every key made before
    /// key types existed).
    #[default]
    Aes256Gcm,
    /// HMAC-SHA256 keys: `mac`, `mac_verify`.
    HmacSha256,
}

impl KeyType {
    /// Every type, in the order the docs list them.
    pub const ALL: [KeyType; 2] = [KeyType::Aes256Gcm, KeyType::HmacSha256];

    /// The name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Aes256Gcm => "aes256-gcm",
            KeyType::HmacSha256 => "hmac-sha256",
        }
    }

    /// Whether this is the default type (`aes256-gcm`), which records and
    /// requests leave out.
    pub fn is_default(&self) -> bool {
        *self == KeyType::Aes256Gcm
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyType, String> {
        KeyType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = KeyType::ALL.iter().map(|t| t.as_str()).collect();
            format!("unknown key type `{}`; one of {}", crate::names::printable(s), names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for t in KeyType::ALL {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
        }
        assert!("AES256-GCM".parse::<KeyType>().is_err());
        assert!(serde_json::from_str::<KeyType>("\"rsa\"").is_err());
    }
}
