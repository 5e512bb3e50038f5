//! RSA key pairs of `rsa-3072-pss` keys: made in the token
//! (CKM_RSA_PKCS_KEY_PAIR_GEN) as session objects, the private key wrapped
//! under a master key with CKM_AES_KEY_WRAP_PAD (its PKCS#8 encoding is not
//! a multiple of 8 bytes) and both halves destroyed, as [`ec`](super::ec)
//! does for ECDSA. Signatures are RSASSA-PSS with SHA-256, MGF1-SHA-256 and
//! a 32-byte salt (what `openssl dgst -sigopt rsa_padding_mode:pss
//! -sigopt rsa_pss_saltlen:32` checks): CKM_SHA256_RSA_PKCS_PSS over a
//! message, CKM_RSA_PKCS_PSS over a digest the caller gives.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::worker::Generated;
use super::HsmError;

/// The public exponent of every key pair, 65537.
const EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

/// The modulus length in bits of a key type.
fn modulus_bits(key_type: keyhaven::KeyType) -> Result<u64, HsmError> {
    match key_type {
        keyhaven::KeyType::RsaPss3072 => Ok(3072),
        keyhaven::KeyType::RsaOaep4096 => Ok(4096),
        other => Err(HsmError::Library(format!("`{other}` is not an RSA key type"))),
    }
}

/// PSS with SHA-256, MGF1-SHA-256 and a salt as long as the hash.
pub fn pss_params() -> PkcsPssParams {
    PkcsPssParams { hash_alg: MechanismType::SHA256, mgf: PkcsMgfType::MGF1_SHA256, s_len: 32.into() }
}

/// Generates a key pair of `key_type`, wraps its private key under master
/// key `mk` and destroys both halves; the public key comes back as DER
/// SubjectPublicKeyInfo.
pub fn generate_wrapped(
    s: &Session,
    mk: ObjectHandle,
    key_type: keyhaven::KeyType,
) -> Result<Generated, HsmError> {
    let bits = modulus_bits(key_type)?;
    // A signing key signs; an encryption key decrypts (RSA-OAEP).
    let decrypts = key_type == keyhaven::KeyType::RsaOaep4096;
    let (public, private) = s.generate_key_pair(
        &Mechanism::RsaPkcsKeyPairGen,
        &[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::ModulusBits(bits.into()),
            Attribute::PublicExponent(EXPONENT.to_vec()),
            Attribute::Token(false),
            Attribute::Verify(!decrypts),
            Attribute::Encrypt(decrypts),
        ],
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Sign(!decrypts),
            Attribute::Decrypt(decrypts),
            Attribute::Derive(false),
        ],
    )?;
    let spki = public_spki(s, public);
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, mk, private);
    let _ = s.destroy_object(public);
    s.destroy_object(private)?;
    Ok(Generated { wrapped: wrapped?, public_key: Some(spki?) })
}

/// The public key as DER SubjectPublicKeyInfo, from its CKA_MODULUS and
/// CKA_PUBLIC_EXPONENT.
fn public_spki(s: &Session, public: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let attrs = s.get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])?;
    let (mut n, mut e) = (None, None);
    for a in attrs {
        match a {
            Attribute::Modulus(v) => n = Some(v),
            Attribute::PublicExponent(v) => e = Some(v),
            _ => {}
        }
    }
    match (n, e) {
        (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => Ok(keyhaven::spki::rsa_spki(&n, &e)),
        _ => Err(HsmError::Library("the token gave no RSA modulus or exponent".into())),
    }
}

/// RSA-OAEP as `khp1:` uses it (docs/ENVELOPE.md §11): SHA-1 and
/// MGF1-SHA-1, empty label. SoftHSM2 2.6.1 refuses any other hash
/// (CKR_ARGUMENTS_BAD for SHA-256, checked with pkcs11-tool).
pub fn oaep() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(cryptoki::mechanism::rsa::PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        cryptoki::mechanism::rsa::PkcsOaepSource::empty(),
    ))
}

/// The attributes of a session public-key object holding the RSA key of
/// the DER SubjectPublicKeyInfo `spki`.
pub fn public_key_attributes(spki: &[u8]) -> Result<Vec<Attribute>, HsmError> {
    let (n, e) = keyhaven::spki::rsa_public(spki)
        .ok_or_else(|| HsmError::Library("the stored public key is not an RSA key".into()))?;
    Ok(vec![Attribute::KeyType(KeyType::RSA), Attribute::Modulus(n), Attribute::PublicExponent(e)])
}
