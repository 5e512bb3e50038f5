//! Signature checks in the token (`verify`, PROTOCOL.md §3.34): the stored
//! public key of a version is loaded as a session object (C_CreateObject,
//! destroyed after use) and the token checks the signature with C_Verify,
//! so the daemon does no signature arithmetic of its own. RSA signatures
//! are checked over the digest (CKM_RSA_PKCS_PSS).

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{ec, HsmError, Worker};

/// The session public-key object's template for the stored DER
/// SubjectPublicKeyInfo `spki` of a `key_type` version.
pub fn public_key_template(key_type: keyhaven::KeyType, spki: &[u8]) -> Result<Vec<Attribute>, HsmError> {
    let mut t = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ];
    if key_type.is_rsa() {
        t.extend(super::rsa::public_key_attributes(spki)?);
        return Ok(t);
    }
    let (params, point_len) = ec::curve(key_type)?;
    let point = spki.get(spki.len().saturating_sub(point_len)..).unwrap_or_default();
    if point.len() != point_len || ec::spki(params, point) != spki {
        return Err(HsmError::Library(format!("the stored public key is not a `{key_type}` key")));
    }
    t.push(Attribute::KeyType(KeyType::EC));
    t.push(Attribute::EcParams(params.to_vec()));
    // CKA_EC_POINT is the DER OCTET STRING of the point.
    t.push(Attribute::EcPoint([&[0x04, point_len as u8][..], point].concat()));
    Ok(t)
}

/// Whether the token accepts `signature` (PKCS#11 form) of `data` under
/// the public key `spki`, with `mechanism`.
fn check(
    s: &Session,
    key_type: keyhaven::KeyType,
    spki: &[u8],
    mechanism: &Mechanism,
    data: &[u8],
    signature: &[u8],
) -> Result<bool, HsmError> {
    let h: ObjectHandle = s.create_object(&public_key_template(key_type, spki)?)?;
    let r = s.verify(mechanism, h, data, signature);
    let _ = s.destroy_object(h);
    match r {
        Ok(()) => Ok(true),
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::SignatureInvalid | cryptoki::error::RvError::SignatureLenRange,
            _,
        )) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Worker {
    /// Whether `signature` (`r || s`) is an ECDSA signature of `digest`
    /// under the public key `spki` of a `key_type` version (CKM_ECDSA in
    /// the token).
    pub fn verify_ecdsa(
        &mut self,
        key_type: keyhaven::KeyType,
        spki: &[u8],
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool, HsmError> {
        self.retrying(|w| check(w.session()?, key_type, spki, &Mechanism::Ecdsa, digest, signature))
    }

    /// Whether `signature` is an RSASSA-PSS signature of `digest` (SHA-256)
    /// under the RSA public key `spki` (CKM_RSA_PKCS_PSS in the token).
    pub fn verify_pss(
        &mut self,
        key_type: keyhaven::KeyType,
        spki: &[u8],
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool, HsmError> {
        let mechanism = Mechanism::RsaPkcsPss(super::rsa::pss_params());
        self.retrying(|w| check(w.session()?, key_type, spki, &mechanism, digest, signature))
    }
}
