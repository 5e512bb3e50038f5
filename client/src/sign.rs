//! Signatures under ECDSA and RSA-PSS keys: the `sign`, `public_key` and
//! `verify` operations (docs/PROTOCOL.md §3.31–3.32, §3.34). The private key of each version stays in
//! the token; its public key is stored with the version and given out as
//! PEM, so that verifiers (openssl, any JOSE or X.509 library) never need
//! the daemon.

use serde::{Deserialize, Serialize};

use crate::keytype::KeyType;
use crate::wire::{operation, Operation, SecretBytes};

/// `sign`: an ECDSA signature of a message (hashed by the daemon with the
/// key type's hash) or of a digest the caller computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sign {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The message, base64 (0 to 65 536 bytes). Exactly one of `message`
    /// and `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<SecretBytes>,
    /// A digest computed by the caller, base64: 32 bytes (SHA-256) for
    /// `ecdsa-p256` and `rsa-3072-pss`, 48 (SHA-384) for `ecdsa-p384`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<SecretBytes>,
}

/// Answer to `sign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignResponse {
    /// The signature, standard base64: DER `Ecdsa-Sig-Value` for ECDSA,
    /// the RSASSA-PSS signature (as long as the modulus) for RSA; what
    /// openssl reads.
    pub signature: String,
    /// The key version that signed (its public key verifies it).
    pub key_version: u32,
    /// `ecdsa-p256-sha256`, `ecdsa-p384-sha384` or `rsa-3072-pss-sha256`.
    pub algorithm: String,
}
operation!(Sign, "sign", SignResponse);

/// `public_key`: the public key of a version of a signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The version; the current one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// Answer to `public_key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicKeyResponse {
    /// PEM `PUBLIC KEY` (DER SubjectPublicKeyInfo).
    pub pem: String,
    /// The version.
    pub key_version: u32,
    /// The key's type.
    #[serde(rename = "type")]
    pub key_type: KeyType,
}
operation!(PublicKey, "public_key", PublicKeyResponse);

/// The algorithm name of a signing key type (`None` for other types).
pub fn algorithm(key_type: KeyType) -> Option<&'static str> {
    match key_type {
        KeyType::EcdsaP256 => Some("ecdsa-p256-sha256"),
        KeyType::EcdsaP384 => Some("ecdsa-p384-sha384"),
        KeyType::RsaPss3072 => Some("rsa-3072-pss-sha256"),
        _ => None,
    }
}

/// `verify`: whether a signature is a version's signature of a message (or
/// of a digest the caller computed), checked by the daemon in the token
/// with the version's public key (docs/PROTOCOL.md §3.34).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// Tenant name.
    pub tenant: String,
    /// Key name.
    pub key: String,
    /// The version whose public key checks the signature; the current one
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The message, base64 (0 to 65 536 bytes). Exactly one of `message`
    /// and `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<SecretBytes>,
    /// A digest computed by the caller, base64, of the length `sign` takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<SecretBytes>,
    /// The signature as `sign` gives it, standard base64.
    pub signature: String,
}

/// Answer to `verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// Whether the signature verifies.
    pub valid: bool,
    /// The version whose public key checked it.
    pub key_version: u32,
    /// The algorithm, as `sign` names it.
    pub algorithm: String,
}
operation!(Verify, "verify", VerifyResponse);
