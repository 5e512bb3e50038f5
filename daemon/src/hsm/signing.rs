//! The audit signing key (docs/AUDIT.md §3.3): an ECDSA P-256 key pair
//! generated inside the token, whose private half is sensitive and never
//! extractable. It signs each sealed audit head, so that anyone with the
//! public key can check an exported log away from this host.
//!
//! SoftHSM2 2.6.1 offers `CKM_ECDSA` but not `CKM_ECDSA_SHA256`, so the
//! daemon hashes the signed message with SHA-256 and the token signs the
//! digest with `CKM_ECDSA`: the same signature as ECDSA-with-SHA-256 over
//! the message, which `openssl dgst -sha256 -verify` checks.

use base64::Engine as _;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{Hsm, HsmError, Worker};

/// CKA_EC_PARAMS of P-256: the DER of the OID prime256v1 (1.2.840.10045.3.1.7).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The DER SubjectPublicKeyInfo of a P-256 key up to its point:
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) ...
const SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The label of the signing key pair: the audit key's label with
/// `-signing` after it (`keyhaven-audit-signing`).
pub fn signing_key_label(audit_key_label: &str) -> String {
    format!("{audit_key_label}-signing")
}

/// The one token object of `class` labelled `label`, if any.
fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
    fail: &impl Fn(&str) -> HsmError,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(fail(&format!("more than one {class} carries this label"))),
    }
}

/// Finds the signing key pair (private, public) and checks that the
/// private key is a P-256 key that was generated in the token and that the
/// token will never reveal; `None` when neither half exists.
pub fn find_signing_key(
    session: &Session,
    label: &str,
) -> Result<Option<(ObjectHandle, ObjectHandle)>, HsmError> {
    let fail = |reason: &str| HsmError::AuditKey { label: label.to_owned(), reason: reason.to_owned() };
    let private = find_one(session, ObjectClass::PRIVATE_KEY, label, &fail)?;
    let public = find_one(session, ObjectClass::PUBLIC_KEY, label, &fail)?;
    let (private, public) = match (private, public) {
        (None, None) => return Ok(None),
        (Some(k), Some(p)) => (k, p),
        (Some(_), None) => return Err(fail("the private key is there but its public key is missing")),
        (None, Some(_)) => return Err(fail("the public key is there but its private key is missing")),
    };
    let attrs = session.get_attributes(
        private,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Local,
            AttributeType::Sign,
        ],
    )?;
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) if t != KeyType::EC => return Err(fail("is not an EC key")),
            Attribute::EcParams(p) if p != P256_PARAMS => return Err(fail("is not on the curve P-256")),
            Attribute::Sensitive(false) => return Err(fail("is not sensitive (CKA_SENSITIVE is false)")),
            Attribute::Extractable(true) => return Err(fail("is extractable (CKA_EXTRACTABLE is true)")),
            Attribute::AlwaysSensitive(false) => {
                return Err(fail("was not always sensitive (CKA_ALWAYS_SENSITIVE is false): it was imported"))
            }
            Attribute::NeverExtractable(false) => {
                return Err(fail("was once extractable (CKA_NEVER_EXTRACTABLE is false): it was imported"))
            }
            Attribute::Local(false) => {
                return Err(fail("was not generated in the token (CKA_LOCAL is false)"))
            }
            Attribute::Sign(false) => return Err(fail("may not sign (CKA_SIGN is false)")),
            _ => {}
        }
    }
    let params = session.get_attributes(public, &[AttributeType::EcParams])?;
    if !params.iter().any(|a| matches!(a, Attribute::EcParams(p) if p == P256_PARAMS)) {
        return Err(fail("its public key is not on the curve P-256"));
    }
    Ok(Some((private, public)))
}

/// Finds the signing key pair, generating it in the token first when there
/// is none: ECDSA P-256, both halves token objects; the private half
/// private, sensitive, never extractable, not modifiable, for signing only.
pub fn ensure_signing_key(session: &Session, label: &str) -> Result<(ObjectHandle, ObjectHandle), HsmError> {
    if let Some(pair) = find_signing_key(session, label)? {
        return Ok(pair);
    }
    let id = label.as_bytes().to_vec();
    let public = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Modifiable(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ];
    let private = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
    tracing::info!(label, "created the audit signing key (ECDSA P-256) in the token");
    find_signing_key(session, label)?.ok_or_else(|| HsmError::KeyMissing { label: label.to_owned() })
}

/// The public key as DER SubjectPublicKeyInfo, from its CKA_EC_POINT (a DER
/// OCTET STRING holding the uncompressed point, or the bare point).
fn public_key_spki(session: &Session, public: ObjectHandle, label: &str) -> Result<Vec<u8>, HsmError> {
    let attrs = session.get_attributes(public, &[AttributeType::EcPoint])?;
    let point = attrs.into_iter().find_map(|a| match a {
        Attribute::EcPoint(p) => Some(p),
        _ => None,
    });
    let point = match point.as_deref() {
        Some([0x04, 0x41, rest @ ..]) if rest.len() == 65 && rest[0] == 0x04 => rest.to_vec(),
        Some(p) if p.len() == 65 && p[0] == 0x04 => p.to_vec(),
        _ => {
            return Err(HsmError::AuditKey {
                label: label.to_owned(),
                reason: "its public key has no uncompressed P-256 point (CKA_EC_POINT)".into(),
            })
        }
    };
    let mut spki = SPKI_PREFIX.to_vec();
    spki.extend_from_slice(&point);
    Ok(spki)
}

/// PEM (`PUBLIC KEY`) of a DER SubjectPublicKeyInfo.
pub fn pem(spki: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

/// The DER `Ecdsa-Sig-Value` (SEQUENCE of the INTEGERs r and s: RFC 3279,
/// what OpenSSL reads) of a PKCS#11 ECDSA signature, `r || s`.
pub fn signature_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 || raw.len() > 132 {
        return None;
    }
    let integer = |b: &[u8]| {
        let start = b.iter().position(|x| *x != 0).unwrap_or(b.len() - 1);
        let mut v = b[start..].to_vec();
        if v[0] & 0x80 != 0 {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let (r, s) = raw.split_at(raw.len() / 2);
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30];
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    Some(out)
}

/// The PKCS#11 form (`r || s`, each 32 bytes) of a DER P-256 ECDSA
/// signature; `None` when it is not one.
pub fn signature_raw(der: &[u8]) -> Option<Vec<u8>> {
    let body = match der {
        [0x30, len, body @ ..] if usize::from(*len) == body.len() && *len < 0x80 => body,
        _ => return None,
    };
    let integer = |b: &[u8]| -> Option<(Vec<u8>, usize)> {
        let [0x02, len, rest @ ..] = b else { return None };
        let len = usize::from(*len);
        let v = rest.get(..len)?;
        let v = match v {
            [0, tail @ ..] if !tail.is_empty() => tail,
            v => v,
        };
        if v.len() > 32 || v.is_empty() {
            return None;
        }
        let mut out = vec![0u8; 32 - v.len()];
        out.extend_from_slice(v);
        Some((out, 2 + len))
    };
    let (r, used) = integer(body)?;
    let (s, used2) = integer(&body[used..])?;
    (used + used2 == body.len()).then(|| [r, s].concat())
}

impl Hsm {
    /// The label of the audit signing key pair in the token.
    pub fn audit_signing_key_label(&self) -> String {
        signing_key_label(&self.shared.audit_key_label)
    }
}

impl Worker {
    fn signing_label(&self) -> String {
        signing_key_label(&self.shared.audit_key_label)
    }

    /// Finds the audit signing key, creating it when the token has none.
    pub fn ensure_audit_signing_key(&mut self) -> Result<(), HsmError> {
        let label = self.signing_label();
        self.retrying(|w| ensure_signing_key(w.session()?, &label).map(|_| ()))
    }

    /// Signs `digest` (SHA-256 of the message, computed by the caller) with
    /// the audit signing key, in the token; returns the signature as DER.
    pub fn audit_sign(&mut self, digest: &[u8; 32]) -> Result<Vec<u8>, HsmError> {
        let label = self.signing_label();
        self.retrying(|w| {
            let s = w.session()?;
            let (private, _) =
                find_signing_key(s, &label)?.ok_or_else(|| HsmError::KeyMissing { label: label.clone() })?;
            let raw = s.sign(&Mechanism::Ecdsa, private, digest)?;
            signature_der(&raw).ok_or_else(|| HsmError::AuditKey {
                label: label.clone(),
                reason: format!("the token returned a signature of {} bytes", raw.len()),
            })
        })
    }

    /// The index of the first of `signed` (SHA-256 digest, DER signature)
    /// whose signature does not verify under the audit signing key
    /// (C_Verify in the token), if any.
    pub fn audit_signatures_check(
        &mut self,
        signed: &[([u8; 32], Vec<u8>)],
    ) -> Result<Option<usize>, HsmError> {
        let label = self.signing_label();
        self.retrying(|w| {
            let s = w.session()?;
            let (_, public) =
                find_signing_key(s, &label)?.ok_or_else(|| HsmError::KeyMissing { label: label.clone() })?;
            for (i, (digest, der)) in signed.iter().enumerate() {
                let Some(raw) = signature_raw(der) else { return Ok(Some(i)) };
                match s.verify(&Mechanism::Ecdsa, public, digest, &raw) {
                    Ok(()) => {}
                    Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::SignatureInvalid
                        | cryptoki::error::RvError::SignatureLenRange,
                        _,
                    )) => return Ok(Some(i)),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(None)
        })
    }

    /// The audit signing key's public half, DER SubjectPublicKeyInfo.
    pub fn audit_public_key(&mut self) -> Result<Vec<u8>, HsmError> {
        let label = self.signing_label();
        self.retrying(|w| {
            let s = w.session()?;
            let (_, public) =
                find_signing_key(s, &label)?.ok_or_else(|| HsmError::KeyMissing { label: label.clone() })?;
            public_key_spki(s, public, &label)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_become_der_integers() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[63] = 1; // s is 1: leading zeros dropped
        let der = signature_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 2 + 33 + 3, 0x02, 33, 0x00]);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 1]);
        assert!(signature_der(&[1, 2, 3]).is_none());
        assert_eq!(signature_raw(&der).unwrap(), raw.to_vec());
        let mut random = [0u8; 64];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(97).wrapping_add(5);
        }
        assert_eq!(signature_raw(&signature_der(&random).unwrap()).unwrap(), random.to_vec());
        assert!(signature_raw(&der[..der.len() - 1]).is_none());
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let p = pem(&[7u8; 91]);
        assert!(p.starts_with("-----BEGIN PUBLIC KEY-----\n") && p.ends_with("-----END PUBLIC KEY-----\n"));
        assert!(p.lines().all(|l| l.len() <= 64));
    }
}
