//! Kinds of named key (docs/PROTOCOL.md §3.3). A key's type is fixed when
//! it is made; every version of it is of that type, and an operation meant
//! for another type is refused with `wrong_key_type`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a named key is and which operations it serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
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
    /// ECDSA key pairs on P-256, signing SHA-256 digests: `sign`,
    /// `public_key`.
    EcdsaP256,
    /// ECDSA key pairs on P-384, signing SHA-384 digests: `sign`,
    /// `public_key`.
    EcdsaP384,
    /// RSA-3072 key pairs signing with RSASSA-PSS (SHA-256, MGF1-SHA-256,
    /// 32-byte salt): `sign`, `verify`, `public_key`.
    #[serde(rename = "rsa-3072-pss")]
    RsaPss3072,
    /// RSA-4096 key pairs for public-key encryption: anyone with the
    /// public key (`public_key`) makes a `khp1:` ciphertext offline, whose
    /// data key only the token's private key unwraps (RSA-OAEP) in
    /// `decrypt`.
    #[serde(rename = "rsa-4096-oaep")]
    RsaOaep4096,
}

impl KeyType {
    /// Every type, in the order the docs list them.
    pub const ALL: [KeyType; 6] = [
        KeyType::Aes256Gcm,
        KeyType::HmacSha256,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::RsaPss3072,
        KeyType::RsaOaep4096,
    ];

    /// The name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Aes256Gcm => "aes256-gcm",
            KeyType::HmacSha256 => "hmac-sha256",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::RsaPss3072 => "rsa-3072-pss",
            KeyType::RsaOaep4096 => "rsa-4096-oaep",
        }
    }

    /// Whether keys of this type are signing key pairs (a private key in
    /// the token, a public key stored with each version).
    pub fn is_signing(self) -> bool {
        matches!(self, KeyType::EcdsaP256 | KeyType::EcdsaP384 | KeyType::RsaPss3072)
    }

    /// Whether keys of this type are RSA key pairs.
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::RsaPss3072 | KeyType::RsaOaep4096)
    }

    /// Whether each version has a public key (`public_key` serves it).
    pub fn has_public_key(self) -> bool {
        self.is_signing() || self == KeyType::RsaOaep4096
    }

    /// The length of the digest a signing key signs (SHA-256 or SHA-384).
    pub fn digest_len(self) -> Option<usize> {
        match self {
            KeyType::EcdsaP256 | KeyType::RsaPss3072 => Some(32),
            KeyType::EcdsaP384 => Some(48),
            _ => None,
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

/// Read through [`FromStr`], so that the daemon's refusal of a type names
/// the types there are (and says why `ed25519` is not one).
impl<'de> Deserialize<'de> for KeyType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyType, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<KeyType, String> {
        if s == "ed25519" {
            return Err(
                "`ed25519` is not available: a key of the hierarchy is stored wrapped under the master \
                        key, and SoftHSM2 2.6 cannot wrap an EdDSA private key (PROTOCOL.md §3.3); sign with \
                        `ecdsa-p256` (ES256) or `rsa-3072-pss` (PS256)"
                    .into(),
            );
        }
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
