//! Bring-your-own-key import (docs/PROTOCOL.md §3.35–3.36), all in the
//! token: Keyhaven never holds the imported material in plaintext.
//!
//! - [`Worker::import_key_pair`] makes a one-time RSA-3072 wrapping key pair
//!   as session objects, wraps the private key under the current master key
//!   with CKM_AES_KEY_WRAP_PAD (as EC private keys are, `hsm::ec`) and
//!   destroys both halves; the daemon keeps the wrapped private key in
//!   memory only (`ops::import`) and gives out the public key.
//! - [`Worker::import_material`] brings the wrapping key back, confined (it
//!   unwraps, nothing else), and unwraps the customer's material with it:
//!   either directly with RSA-OAEP (RSAES_OAEP_SHA_1 / _SHA_256), or as
//!   AWS KMS's RSA_AES_KEY_WRAP does, RSA-OAEP of an ephemeral AES-256 key
//!   (unwrapped as a non-extractable key that only unwraps) followed by
//!   CKM_AES_KEY_WRAP_PAD of the material under it. The material lands in
//!   the token as a sensitive session key, is checked (32 bytes), wrapped
//!   under the master key like a generated version, and destroyed.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use keyhaven::import::WrappingAlgorithm;

use super::worker::Worker;
use super::HsmError;

/// Bits of the wrapping key's modulus.
pub const WRAPPING_KEY_BITS: u64 = 3072;
/// Bytes of an RSA-OAEP block under it.
pub const RSA_BLOCK: usize = (WRAPPING_KEY_BITS / 8) as usize;
/// Bytes of imported material (AES-256 and HMAC-SHA256 keys).
pub const MATERIAL_LEN: u64 = 32;

/// Why the token would not make a key of the wrapped bytes: the caller's
/// input, not the daemon's fault (answered as `bad_request`).
#[derive(Debug)]
pub struct Refused(pub String);

/// A one-time wrapping key: its private key wrapped under master key
/// `master_key_version`, and its public key as DER SubjectPublicKeyInfo.
pub struct WrappingKey {
    /// The RSA private key, CKM_AES_KEY_WRAP_PAD under the master key.
    pub wrapped_private: Vec<u8>,
    /// The master key version that wraps it.
    pub master_key_version: u32,
    /// DER SubjectPublicKeyInfo (rsaEncryption).
    pub spki: Vec<u8>,
}

/// A DER length.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// A DER TLV.
fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER of an unsigned big-endian number.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    let mut v = bytes[start..].to_vec();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// DER SubjectPublicKeyInfo of an RSA public key (RFC 8017 A.1.1, RFC 5280).
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    const ALG: &[u8] =
        &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let rsa_public_key = der(0x30, &[der_uint(modulus), der_uint(exponent)].concat());
    let mut bits = vec![0u8];
    bits.extend(rsa_public_key);
    der(0x30, &[ALG.to_vec(), der(0x03, &bits)].concat())
}

fn oaep(hash: MechanismType, mgf: PkcsMgfType) -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty()))
}

/// The OAEP mechanism of `algorithm` (the hash of OAEP and of MGF1).
fn oaep_of(algorithm: WrappingAlgorithm) -> Mechanism<'static> {
    if algorithm.sha256() {
        oaep(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)
    } else {
        oaep(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)
    }
}

/// The template of the imported material: a sensitive session key of the
/// version's type, extractable only so that the master key can wrap it,
/// usable for nothing while it exists.
fn material_template(key_type: keyhaven::KeyType) -> Result<Vec<Attribute>, Refused> {
    let kind = match key_type {
        keyhaven::KeyType::Aes256Gcm => KeyType::AES,
        keyhaven::KeyType::HmacSha256 => KeyType::GENERIC_SECRET,
        other => return Err(Refused(format!("keys of type `{other}` cannot be imported"))),
    };
    Ok(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(kind),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ])
}

/// The template of the ephemeral AES key of RSA_AES_KEY_WRAP: it unwraps
/// the material and does nothing else; it never leaves the token.
fn ephemeral_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(true),
        Attribute::Derive(false),
    ]
}

/// The template the wrapping private key comes back with under the master
/// key: the master key's confinement plus "it unwraps, nothing else".
fn wrapping_private_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Unwrap(true),
        Attribute::Derive(false),
    ]
}

/// Whether a PKCS#11 refusal is about the caller's bytes (or a choice the
/// token does not offer) rather than the session or the token.
fn input_refusal(rv: cryptoki::error::RvError) -> bool {
    use cryptoki::error::RvError::*;
    matches!(
        rv,
        EncryptedDataInvalid
            | EncryptedDataLenRange
            | WrappedKeyInvalid
            | WrappedKeyLenRange
            | MechanismParamInvalid
            | MechanismInvalid
            | ArgumentsBad
            | TemplateInconsistent
            | TemplateIncomplete
            | AttributeValueInvalid
            | KeySizeRange
            | DataLenRange
            | DataInvalid
            | GeneralError
    )
}

/// The token's ways of saying a key is of a length it cannot wrap.
fn key_size(rv: cryptoki::error::RvError) -> bool {
    use cryptoki::error::RvError::*;
    matches!(rv, KeySizeRange | KeyNotWrappable | KeyUnextractable)
}

/// Unwraps with `mechanism`, telling input refusals apart.
fn unwrap(
    s: &Session,
    mechanism: &Mechanism,
    key: ObjectHandle,
    wrapped: &[u8],
    template: &[Attribute],
    what: &str,
) -> Result<Result<ObjectHandle, Refused>, HsmError> {
    use cryptoki::error::RvError::{ArgumentsBad, MechanismInvalid, MechanismParamInvalid};
    match s.unwrap_key(mechanism, key, wrapped, template) {
        Ok(h) => Ok(Ok(h)),
        // SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD to OAEP with SHA-256.
        Err(cryptoki::error::Error::Pkcs11(rv @ (ArgumentsBad | MechanismInvalid | MechanismParamInvalid), _))
            if matches!(mechanism, Mechanism::RsaPkcsOaep(p) if p.hash_alg() != MechanismType::SHA1) =>
        {
            Ok(Err(Refused(format!(
                "this token does not unwrap with RSA-OAEP-SHA-256 ({rv:?}; SoftHSM2 2.6 offers OAEP with SHA-1 \
                 only): wrap with `rsaes-oaep-sha1` or `rsa-aes-key-wrap-sha1`"
            ))))
        }
        Err(cryptoki::error::Error::Pkcs11(rv, _)) if input_refusal(rv) => Ok(Err(Refused(format!("{what} ({rv:?})")))),
        Err(e) => Err(e.into()),
    }
}

/// Generates a wrapping key pair, wraps its private key under `mk`, reads
/// its public key and destroys both halves.
fn generate(s: &Session, mk: ObjectHandle) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
    let (public, private) = s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::ModulusBits(WRAPPING_KEY_BITS.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Token(false),
            Attribute::Wrap(true),
        ],
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Unwrap(true),
            Attribute::Derive(false),
        ],
    )?;
    let read = (|| {
        let attrs = s.get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])?;
        let (mut n, mut e) = (None, None);
        for a in attrs {
            match a {
                Attribute::Modulus(m) => n = Some(m),
                Attribute::PublicExponent(x) => e = Some(x),
                _ => {}
            }
        }
        let (n, e) = n.zip(e).ok_or_else(|| {
            HsmError::Library("the token gave no modulus or exponent for the wrapping key".into())
        })?;
        let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, mk, private)?;
        Ok::<_, HsmError>((wrapped, rsa_spki(&n, &e)))
    })();
    let _ = s.destroy_object(private);
    let _ = s.destroy_object(public);
    read
}

impl Worker {
    /// A new one-time wrapping key pair (see the module docs).
    pub fn import_key_pair(&mut self) -> Result<WrappingKey, HsmError> {
        let version = self.shared.master_key_version.load(std::sync::atomic::Ordering::SeqCst);
        self.retrying(|w| {
            let mk = w.master_key(version)?;
            let (wrapped_private, spki) = generate(w.session()?, mk)?;
            Ok(WrappingKey { wrapped_private, master_key_version: version, spki })
        })
    }

    /// Unwraps `wrapped` (material wrapped by the customer with
    /// `algorithm` to `key`'s public key) as a `key_type` secret and
    /// returns it wrapped under the current master key, with that
    /// version. The inner `Err` is a refusal of the caller's bytes.
    pub fn import_material(
        &mut self,
        key: &WrappingKey,
        algorithm: WrappingAlgorithm,
        wrapped: &[u8],
        key_type: keyhaven::KeyType,
    ) -> Result<Result<(Vec<u8>, u32), Refused>, HsmError> {
        let template = match material_template(key_type) {
            Ok(t) => t,
            Err(r) => return Ok(Err(r)),
        };
        let version = self.shared.master_key_version.load(std::sync::atomic::Ordering::SeqCst);
        self.retrying(|w| {
            let wrapping_mk = w.master_key(key.master_key_version)?;
            let mk = w.master_key(version)?;
            let s = w.session()?;
            let private = s
                .unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    wrapping_mk,
                    &key.wrapped_private,
                    &wrapping_private_template(),
                )
                .map_err(|e| {
                    super::error::integrity_or(
                        e,
                        "the import wrapping key does not unwrap under its master key",
                    )
                })?;
            let r = import_with(s, private, mk, algorithm, wrapped, &template);
            let _ = s.destroy_object(private);
            Ok(r?.map(|w| (w, version)))
        })
    }
}

/// The material of `wrapped`, unwrapped with the wrapping key `private`
/// and wrapped under `mk`.
fn import_with(
    s: &Session,
    private: ObjectHandle,
    mk: ObjectHandle,
    algorithm: WrappingAlgorithm,
    wrapped: &[u8],
    template: &[Attribute],
) -> Result<Result<Vec<u8>, Refused>, HsmError> {
    let hash = if algorithm.sha256() { "SHA-256" } else { "SHA-1" };
    let material = if algorithm.aes_key_wrap() {
        if wrapped.len() <= RSA_BLOCK {
            return Ok(Err(Refused(format!(
                "{} bytes: `{algorithm}` material is the {RSA_BLOCK}-byte RSA-OAEP block of the AES key, then the \
                 AES-key-wrapped material",
                wrapped.len()
            ))));
        }
        let (block, rest) = wrapped.split_at(RSA_BLOCK);
        let eph = match unwrap(
            s,
            &oaep_of(algorithm),
            private,
            block,
            &ephemeral_template(),
            &format!(
                "the first {RSA_BLOCK} bytes are not an AES-256 key encrypted to this import's public key with \
                 RSA-OAEP-{hash}"
            ),
        )? {
            Ok(h) => h,
            Err(r) => return Ok(Err(r)),
        };
        // CKA_VALUE_LEN of an unwrapped key is not to be trusted (SoftHSM2
        // leaves it 0): the AES unwrap below is what checks the key.
        let m = unwrap(
            s,
            &Mechanism::AesKeyWrapPad,
            eph,
            rest,
            template,
            "the bytes after the RSA-OAEP block are not material wrapped with AES key wrap with padding (RFC \
             5649) under the AES key of the block",
        );
        let _ = s.destroy_object(eph);
        m?
    } else {
        if wrapped.len() != RSA_BLOCK {
            return Ok(Err(Refused(format!(
                "{} bytes: `{algorithm}` material is one {RSA_BLOCK}-byte RSA-OAEP block (RSA-3072)",
                wrapped.len()
            ))));
        }
        unwrap(
            s,
            &oaep_of(algorithm),
            private,
            wrapped,
            template,
            &format!(
                "the bytes are not key material encrypted to this import's public key with RSA-OAEP-{hash}"
            ),
        )?
    };
    let material = match material {
        Ok(h) => h,
        Err(r) => return Ok(Err(r)),
    };
    // SoftHSM2 leaves CKA_VALUE_LEN of an unwrapped key at 0, so the
    // length is read off the master key's wrap instead: AES key wrap
    // (RFC 3394) gives exactly 8 bytes more than it wraps, and refuses a
    // length that is not a multiple of 8.
    let out = match s.wrap_key(&Mechanism::AesKeyWrap, mk, material) {
        Ok(w) if w.len() as u64 == MATERIAL_LEN + 8 => Ok(Ok(w)),
        Ok(w) => Ok(Err(Refused(format!(
            "the unwrapped key material is {} bytes; an imported key is {MATERIAL_LEN} bytes",
            w.len().saturating_sub(8)
        )))),
        Err(cryptoki::error::Error::Pkcs11(rv, _)) if input_refusal(rv) || key_size(rv) => {
            Ok(Err(Refused(format!(
                "the unwrapped key material is not {MATERIAL_LEN} bytes (not even a multiple of 8: {rv})"
            ))))
        }
        Err(e) => Err(e.into()),
    };
    let _ = s.destroy_object(material);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_is_der_with_long_lengths() {
        let n = [0xc5u8; 384];
        let spki = rsa_spki(&n, &[1, 0, 1]);
        // SEQUENCE, long form of two bytes.
        assert_eq!(&spki[..2], &[0x30, 0x82]);
        assert_eq!(usize::from(u16::from_be_bytes([spki[2], spki[3]])), spki.len() - 4);
        // The modulus got a leading zero (its top bit is set).
        assert!(spki.windows(5).any(|w| w == [0x02, 0x82, 0x01, 0x81, 0x00]));
        assert!(spki.ends_with(&[0x02, 0x03, 1, 0, 1]));
    }
}
