//! ECDSA key pairs for signing keys (`ecdsa-p256`, `ecdsa-p384`): made in
//! the token as session objects, the private key wrapped under a master key
//! with CKM_AES_KEY_WRAP_PAD (RFC 5649; a PKCS#8 private key is not a
//! multiple of 8 bytes) and both halves destroyed. The private key only
//! ever comes back into the token, confined ([`confine`]); the public key
//! is returned as DER SubjectPublicKeyInfo for the store.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::Session;

use super::worker::Generated;
use super::HsmError;

/// CKA_EC_PARAMS of P-256: the DER of the OID prime256v1 (1.2.840.10045.3.1.7).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// CKA_EC_PARAMS of P-384: the DER of the OID secp384r1 (1.3.132.0.34).
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// The DER of the OID id-ecPublicKey (1.2.840.10045.2.1).
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// The curve's CKA_EC_PARAMS and the length of an uncompressed point.
pub(crate) fn curve(key_type: keyhaven::KeyType) -> Result<(&'static [u8], usize), HsmError> {
    match key_type {
        keyhaven::KeyType::EcdsaP256 => Ok((P256_PARAMS, 65)),
        keyhaven::KeyType::EcdsaP384 => Ok((P384_PARAMS, 97)),
        other => Err(HsmError::Library(format!("`{other}` is not an ECDSA key type"))),
    }
}

/// Generates a key pair of `key_type`, wraps its private key under master
/// key `mk` and destroys both halves.
pub fn generate_wrapped(
    s: &Session,
    mk: ObjectHandle,
    key_type: keyhaven::KeyType,
) -> Result<Generated, HsmError> {
    let (params, point_len) = curve(key_type)?;
    let (public, private) = s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(params.to_vec()),
            Attribute::Token(false),
            Attribute::Verify(true),
        ],
        &[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Sign(true),
            Attribute::Derive(false),
        ],
    )?;
    let spki = public_spki(s, public, params, point_len);
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, mk, private);
    let _ = s.destroy_object(public);
    s.destroy_object(private)?;
    Ok(Generated { wrapped: wrapped?, public_key: Some(spki?) })
}

/// The public key as DER SubjectPublicKeyInfo, from its CKA_EC_POINT (a DER
/// OCTET STRING holding the uncompressed point, or the bare point).
fn public_spki(
    s: &Session,
    public: ObjectHandle,
    params: &[u8],
    point_len: usize,
) -> Result<Vec<u8>, HsmError> {
    let attrs = s.get_attributes(public, &[AttributeType::EcPoint])?;
    let point = attrs.into_iter().find_map(|a| match a {
        Attribute::EcPoint(p) => Some(p),
        _ => None,
    });
    let point = match point.as_deref() {
        Some([0x04, len, rest @ ..]) if usize::from(*len) == point_len && rest.len() == point_len => {
            rest.to_vec()
        }
        Some(p) if p.len() == point_len && p[0] == 0x04 => p.to_vec(),
        _ => return Err(HsmError::Library("the token gave no uncompressed EC point (CKA_EC_POINT)".into())),
    };
    Ok(spki(params, &point))
}

/// DER SubjectPublicKeyInfo { { id-ecPublicKey, curve }, BIT STRING point }.
pub fn spki(params: &[u8], point: &[u8]) -> Vec<u8> {
    let der = |tag: u8, body: &[u8]| {
        let mut out = vec![tag];
        if body.len() >= 0x80 {
            out.extend_from_slice(&[0x81, body.len() as u8]);
        } else {
            out.push(body.len() as u8);
        }
        out.extend_from_slice(body);
        out
    };
    let algorithm = der(0x30, &[EC_PUBLIC_KEY_OID, params].concat());
    let bits = der(0x03, &[&[0x00][..], point].concat());
    der(0x30, &[algorithm, bits].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p256_spki_has_the_known_prefix() {
        let point = [0x04; 65];
        let der = spki(P256_PARAMS, &point);
        assert_eq!(der.len(), 91);
        assert_eq!(&der[..4], &[0x30, 0x59, 0x30, 0x13]);
        let der = spki(P384_PARAMS, &[0x04; 97]);
        assert_eq!(der.len(), 120);
        assert_eq!(&der[..4], &[0x30, 0x76, 0x30, 0x10]);
    }
}
