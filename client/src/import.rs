//! Bring your own key: the `key_import_params` and `key_import`
//! operations (docs/PROTOCOL.md §3.35–3.36, the customer's side in
//! docs/OPERATIONS.md "Bring your own key"). The customer encrypts 32 bytes
//! of key material to a one-time RSA-3072 public key made in the token;
//! the daemon unwraps it in the token and stores it wrapped under the
//! master key like any version it generated. Keyhaven never sees it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keytype::KeyType;
use crate::lifecycle::KeyDetails;
use crate::wire::{operation, Operation};

/// How the customer wrapped the material (the names of AWS KMS's wrapping
/// algorithms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum WrappingAlgorithm {
    /// RSA-OAEP with SHA-1 (and MGF1-SHA-1) of the 32-byte material: one
    /// 384-byte block. What SoftHSM2 2.6 unwraps.
    #[default]
    RsaesOaepSha1,
    /// RSA-OAEP with SHA-256 (and MGF1-SHA-256): refused by tokens whose
    /// OAEP is SHA-1 only (SoftHSM2 2.6), with `bad_request` naming it.
    RsaesOaepSha256,
    /// RSA-OAEP-SHA-1 of an ephemeral AES-256 key (384 bytes), followed by
    /// the material wrapped under that key with AES key wrap with padding
    /// (RFC 5649), as AWS KMS's RSA_AES_KEY_WRAP_SHA_1.
    RsaAesKeyWrapSha1,
    /// As `rsa-aes-key-wrap-sha1` with RSA-OAEP-SHA-256.
    RsaAesKeyWrapSha256,
}

impl WrappingAlgorithm {
    /// Every algorithm, in the order the docs list them.
    pub const ALL: [WrappingAlgorithm; 4] = [
        WrappingAlgorithm::RsaesOaepSha1,
        WrappingAlgorithm::RsaesOaepSha256,
        WrappingAlgorithm::RsaAesKeyWrapSha1,
        WrappingAlgorithm::RsaAesKeyWrapSha256,
    ];

    /// The name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            WrappingAlgorithm::RsaesOaepSha1 => "rsaes-oaep-sha1",
            WrappingAlgorithm::RsaesOaepSha256 => "rsaes-oaep-sha256",
            WrappingAlgorithm::RsaAesKeyWrapSha1 => "rsa-aes-key-wrap-sha1",
            WrappingAlgorithm::RsaAesKeyWrapSha256 => "rsa-aes-key-wrap-sha256",
        }
    }

    /// Whether OAEP uses SHA-256 (else SHA-1).
    pub fn sha256(self) -> bool {
        matches!(self, WrappingAlgorithm::RsaesOaepSha256 | WrappingAlgorithm::RsaAesKeyWrapSha256)
    }

    /// Whether an ephemeral AES key wraps the material (RSA_AES_KEY_WRAP).
    pub fn aes_key_wrap(self) -> bool {
        matches!(self, WrappingAlgorithm::RsaAesKeyWrapSha1 | WrappingAlgorithm::RsaAesKeyWrapSha256)
    }
}

impl fmt::Display for WrappingAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WrappingAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<WrappingAlgorithm, String> {
        WrappingAlgorithm::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = WrappingAlgorithm::ALL.iter().map(|t| t.as_str()).collect();
            format!(
                "unknown wrapping algorithm `{}`; one of {}",
                crate::names::printable(s),
                names.join(", ")
            )
        })
    }
}

/// Where a key version's material came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Origin {
    /// Generated in the token by Keyhaven.
    #[default]
    Token,
    /// Imported (`key_import`): the customer has the material.
    External,
}

impl Origin {
    /// Whether this is the default (`token`), which records leave out.
    pub fn is_default(&self) -> bool {
        *self == Origin::Token
    }
}

/// `key_import_params`: a one-time wrapping public key and an import token
/// for one import into `tenant/key` as a key of `key_type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyImportParams {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// `aes256-gcm` (the default) or `hmac-sha256`.
    #[serde(rename = "type", default, skip_serializing_if = "KeyType::is_default")]
    pub key_type: KeyType,
    /// Seconds the import token is good for: 1 to 86 400 (24 hours, the
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// Answer to `key_import_params`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyImportParamsResponse {
    /// The wrapping public key, PEM `PUBLIC KEY` (RSA-3072).
    pub public_key: String,
    /// The import token: opaque, single use, for this key and type only.
    pub import_token: String,
    /// When the token expires, Unix seconds.
    pub expires_at: u64,
    /// The key type the import will make.
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// The wrapping algorithms the daemon accepts (the token may refuse the
    /// SHA-256 ones: PROTOCOL.md §3.35).
    pub algorithms: Vec<WrappingAlgorithm>,
}
operation!(KeyImportParams, "key_import_params", KeyImportParamsResponse);

/// `key_import`: makes `tenant/key` (or a new version of it, when it is an
/// imported key) from wrapped material.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyImport {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The import token of `key_import_params`.
    pub import_token: String,
    /// How the material was wrapped.
    #[serde(default)]
    pub algorithm: WrappingAlgorithm,
    /// The wrapped material, standard base64 (it is encrypted: not a
    /// secret).
    pub wrapped: String,
}
operation!(KeyImport, "key_import", KeyDetails);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in WrappingAlgorithm::ALL {
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
            assert_eq!(a.as_str().parse::<WrappingAlgorithm>().unwrap(), a);
        }
        assert!("RSAES_OAEP_SHA_1".parse::<WrappingAlgorithm>().is_err());
        assert_eq!(serde_json::to_string(&Origin::External).unwrap(), "\"external\"");
    }
}
