//! Public-key (hybrid) ciphertexts, `khp1:` (docs/ENVELOPE.md §11): a
//! fresh AES-256-GCM data key wrapped to an `rsa-4096-oaep` key version's
//! public key with RSA-OAEP, and the payload sealed under the data key with
//! the header and the encryption context as AAD. Anyone with the public key
//! makes one, offline; only the daemon opens it, unwrapping the data key in
//! the token with the private key.
//!
//! This module lays the bytes out and seals the payload (`aes-gcm`); the
//! RSA-OAEP wrap is the caller's (the CLI uses OpenSSL), so the crate does
//! no RSA of its own.

use std::fmt;
use std::str::FromStr;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::envelope::{decode_text, malformed, FORMAT_VERSION, MAGIC, NONCE_LEN, TAG_LEN};
use crate::error::Error;
use crate::names::KeyPath;

/// Kind byte of a public-key ciphertext.
pub const KIND_PUBLIC: u8 = 0x05;
/// Algorithm id: the data key wrapped with RSA-OAEP (SHA-1, MGF1-SHA-1,
/// empty label), the payload AES-256-GCM with a 96-bit nonce.
pub const ALG_RSA_OAEP_SHA1_AES_256_GCM: u8 = 0x01;
/// Text form prefix.
pub const PUBLIC_PREFIX: &str = "khp1:";
/// Length of the wrapped data key under a 4096-bit RSA key.
pub const WRAPPED_LEN: usize = 512;
/// Largest plaintext, as for `encrypt`.
pub const MAX_PLAINTEXT: usize = crate::wire::MAX_ENCRYPT_PLAINTEXT;

const WHAT: &str = "public-key ciphertext";

/// A parsed `khp1:` ciphertext. Parsing checks structure only; the daemon
/// authenticates it by opening it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicCiphertext {
    path: KeyPath,
    version: u32,
    wrapped: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    payload: Vec<u8>,
}

impl PublicCiphertext {
    /// The key whose private key opens it.
    pub fn path(&self) -> &KeyPath {
        &self.path
    }
    /// Its version.
    pub fn key_version(&self) -> u32 {
        self.version
    }
    /// The data key, RSA-OAEP-encrypted to the version's public key.
    pub fn wrapped_key(&self) -> &[u8] {
        &self.wrapped
    }
    /// The payload's GCM nonce.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }
    /// The payload: AES-256-GCM ciphertext and tag.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The header: every byte before the payload (the AAD starts with it).
    pub fn header(&self) -> Vec<u8> {
        let (t, k) = (self.path.tenant().as_bytes(), self.path.key().as_bytes());
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&[FORMAT_VERSION, KIND_PUBLIC, ALG_RSA_OAEP_SHA1_AES_256_GCM]);
        h.push(t.len() as u8);
        h.extend_from_slice(t);
        h.push(k.len() as u8);
        h.extend_from_slice(k);
        h.extend_from_slice(&self.version.to_be_bytes());
        h.extend_from_slice(&(self.wrapped.len() as u16).to_be_bytes());
        h.extend_from_slice(&self.wrapped);
        h.extend_from_slice(&self.nonce);
        h
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.header();
        b.extend_from_slice(&self.payload);
        b
    }

    /// Parses the binary form.
    pub fn from_bytes(b: &[u8]) -> Result<PublicCiphertext, Error> {
        let mut pos = 0usize;
        let mut take = |n: usize, field: &str| -> Result<&[u8], Error> {
            let out = b.get(pos..pos + n).ok_or_else(|| malformed(WHAT, format!("truncated in {field}")))?;
            pos += n;
            Ok(out)
        };
        if take(2, "magic")? != MAGIC {
            return Err(malformed(WHAT, "does not start with the magic `KH`"));
        }
        let pre = take(3, "header")?;
        if pre[0] != FORMAT_VERSION {
            return Err(malformed(WHAT, format!("unsupported format version {}", pre[0])));
        }
        if pre[1] != KIND_PUBLIC {
            return Err(malformed(
                WHAT,
                format!("kind {:#04x} is not a public-key ciphertext (0x05)", pre[1]),
            ));
        }
        if pre[2] != ALG_RSA_OAEP_SHA1_AES_256_GCM {
            return Err(malformed(WHAT, format!("unknown algorithm id {:#04x}", pre[2])));
        }
        let t = usize::from(take(1, "tenant length")?[0]);
        let tenant =
            std::str::from_utf8(take(t, "tenant")?).map_err(|_| malformed(WHAT, "tenant is not ASCII"))?;
        let k = usize::from(take(1, "key-name length")?[0]);
        let key = std::str::from_utf8(take(k, "key name")?)
            .map_err(|_| malformed(WHAT, "key name is not ASCII"))?;
        let path = KeyPath::new(tenant, key).map_err(|e| malformed(WHAT, e))?;
        let version = u32::from_be_bytes(take(4, "key version")?.try_into().unwrap_or_default());
        if version == 0 {
            return Err(malformed(WHAT, "key version 0"));
        }
        let w =
            usize::from(u16::from_be_bytes(take(2, "wrapped-key length")?.try_into().unwrap_or_default()));
        if w != WRAPPED_LEN {
            return Err(malformed(
                WHAT,
                format!("wrapped key of {w} bytes; an rsa-4096-oaep key wraps to {WRAPPED_LEN}"),
            ));
        }
        let wrapped = take(w, "wrapped key")?.to_vec();
        let nonce: [u8; NONCE_LEN] = take(NONCE_LEN, "nonce")?.try_into().unwrap_or_default();
        let payload = b[pos..].to_vec();
        if payload.len() < TAG_LEN {
            return Err(malformed(WHAT, "truncated in payload (shorter than its tag)"));
        }
        if payload.len() > MAX_PLAINTEXT + TAG_LEN {
            return Err(malformed(WHAT, "payload over the 64 KiB limit"));
        }
        Ok(PublicCiphertext { path, version, wrapped, nonce, payload })
    }

    /// Seals `plaintext` under `data_key` (a fresh 32-byte key that
    /// `wrapped` holds, RSA-OAEP-encrypted to version `version` of `path`),
    /// with a random nonce, the header and `context` as AAD.
    pub fn seal(
        path: &KeyPath,
        version: u32,
        wrapped: Vec<u8>,
        data_key: &[u8; 32],
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<PublicCiphertext, Error> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::Envelope(format!("plaintext over {MAX_PLAINTEXT} bytes")));
        }
        if wrapped.len() != WRAPPED_LEN || version == 0 {
            return Err(Error::Envelope(format!("the wrapped key must be {WRAPPED_LEN} bytes")));
        }
        let nonce: [u8; NONCE_LEN] = Aes256Gcm::generate_nonce(&mut OsRng).into();
        let mut ct = PublicCiphertext { path: path.clone(), version, wrapped, nonce, payload: Vec::new() };
        let aad = crate::envelope::aad(&ct.header(), context);
        let cipher =
            Aes256Gcm::new_from_slice(data_key).map_err(|_| Error::Envelope("data key length".into()))?;
        ct.payload = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .map_err(|_| Error::Envelope("AES-GCM encryption failed".into()))?;
        Ok(ct)
    }

    /// A fresh random data key.
    pub fn new_data_key() -> Zeroizing<[u8; 32]> {
        Zeroizing::new(Aes256Gcm::generate_key(&mut OsRng).into())
    }

    /// Opens the payload with the unwrapped `data_key` under `context`.
    pub fn open(&self, data_key: &[u8], context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, Error> {
        let aad = crate::envelope::aad(&self.header(), context);
        let cipher =
            Aes256Gcm::new_from_slice(data_key).map_err(|_| Error::Envelope("data key length".into()))?;
        cipher
            .decrypt(Nonce::from_slice(&self.nonce), Payload { msg: &self.payload, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| {
                Error::Envelope(
                    "the ciphertext does not authenticate: it was altered, or the encryption context differs"
                        .into(),
                )
            })
    }
}

impl fmt::Display for PublicCiphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl FromStr for PublicCiphertext {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        PublicCiphertext::from_bytes(&decode_text(WHAT, PUBLIC_PREFIX, s)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_changes() {
        let path = KeyPath::new("acme", "vault").unwrap();
        let ctx = EncryptionContext::default();
        let key = [7u8; 32];
        let ct = PublicCiphertext::seal(&path, 3, vec![9u8; 512], &key, b"secret", &ctx).unwrap();
        let text = ct.to_string();
        assert!(text.starts_with("khp1:"));
        let back: PublicCiphertext = text.parse().unwrap();
        assert_eq!(back, ct);
        assert_eq!(&back.open(&key, &ctx).unwrap()[..], b"secret");
        let mut bytes = ct.to_bytes();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        assert!(PublicCiphertext::from_bytes(&bytes).unwrap().open(&key, &ctx).is_err());
        assert!(PublicCiphertext::from_bytes(&bytes[..40]).is_err());
    }
}
