//! JOSE for signing keys, built here from the daemon's answers, with no
//! cryptography of its own: a version's public key as a JWK (RFC 7517/7518,
//! `kid` = the version's id), a key's JWKS, and a compact JWS (RFC 7515)
//! whose signature the daemon makes (docs/PROTOCOL.md §3.31).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::Error;
use crate::keytype::KeyType;
use crate::names::KeyPath;

fn bad(what: &str) -> Error {
    Error::Envelope(format!("public key or signature: {what}"))
}

/// The JWS `alg` of a signing key type.
pub fn jws_alg(key_type: KeyType) -> Option<&'static str> {
    match key_type {
        KeyType::EcdsaP256 => Some("ES256"),
        KeyType::EcdsaP384 => Some("ES384"),
        KeyType::RsaPss3072 => Some("PS256"),
        _ => None,
    }
}

/// The `kid` of a key version: `tenant/key@N`.
pub fn kid(path: &KeyPath, version: u32) -> String {
    format!("{path}@{version}")
}

/// The coordinate length of a signing key type's curve.
fn coordinate_len(key_type: KeyType) -> Option<usize> {
    key_type.digest_len()
}

/// The JWK of a PEM public key of `key_type`: an EC key
/// (SubjectPublicKeyInfo with an uncompressed point) or an RSA key.
pub fn jwk(pem: &str, key_type: KeyType, kid: &str) -> Result<Value, Error> {
    if key_type.is_rsa() {
        let der = crate::spki::pem_der(pem).ok_or_else(|| bad("PEM is not base64"))?;
        let (n, e) = crate::spki::rsa_public(&der).ok_or_else(|| bad("not an RSA public key"))?;
        // An encryption key's JWK says so (RFC 7518 §4.3: RSA-OAEP is
        // OAEP with SHA-1 and MGF1-SHA-1, what khp1: uses).
        let (usage, alg) = match key_type {
            KeyType::RsaOaep4096 => ("enc", Some("RSA-OAEP")),
            _ => ("sig", jws_alg(key_type)),
        };
        return Ok(json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(n),
            "e": URL_SAFE_NO_PAD.encode(e),
            "use": usage,
            "alg": alg,
            "kid": kid,
        }));
    }
    let n = coordinate_len(key_type).ok_or_else(|| bad("not a signing key type"))?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(body.trim()).map_err(|_| bad("PEM is not base64"))?;
    let point = der.get(der.len().saturating_sub(2 * n + 1)..).ok_or_else(|| bad("too short"))?;
    if point.len() != 2 * n + 1 || point[0] != 0x04 {
        return Err(bad("no uncompressed point"));
    }
    let crv = if n == 32 { "P-256" } else { "P-384" };
    Ok(json!({
        "kty": "EC",
        "crv": crv,
        "x": URL_SAFE_NO_PAD.encode(&point[1..=n]),
        "y": URL_SAFE_NO_PAD.encode(&point[n + 1..]),
        "use": "sig",
        "alg": jws_alg(key_type),
        "kid": kid,
    }))
}

/// `r || s`, each `n` bytes big-endian (JWS, RFC 7518 §3.4), of a DER
/// `Ecdsa-Sig-Value`.
pub fn raw_signature(der: &[u8], n: usize) -> Result<Vec<u8>, Error> {
    let body = match der {
        [0x30, 0x81, len, body @ ..] if usize::from(*len) == body.len() => body,
        [0x30, len, body @ ..] if *len < 0x80 && usize::from(*len) == body.len() => body,
        _ => return Err(bad("signature is not a DER SEQUENCE")),
    };
    let mut out = Vec::with_capacity(2 * n);
    let mut rest = body;
    for _ in 0..2 {
        let [0x02, len, tail @ ..] = rest else { return Err(bad("signature has no INTEGER")) };
        let len = usize::from(*len);
        let v = tail.get(..len).ok_or_else(|| bad("signature INTEGER too short"))?;
        let v = match v {
            [0, t @ ..] if !t.is_empty() => t,
            v => v,
        };
        if v.len() > n {
            return Err(bad("signature INTEGER too long"));
        }
        out.extend(std::iter::repeat_n(0u8, n - v.len()));
        out.extend_from_slice(v);
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the signature"));
    }
    Ok(out)
}

/// The JWS signing input `base64url(header) . base64url(claims)`.
pub fn signing_input(key_type: KeyType, kid: &str, claims: &Value) -> Result<String, Error> {
    let header = json!({"alg": jws_alg(key_type).ok_or_else(|| bad("not a signing key type"))?, "typ": "JWT", "kid": kid});
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    ))
}

/// The compact JWS: the signing input and the base64url raw signature.
/// An RSA signature is used as it is (RFC 7518 §3.5).
pub fn compact(signing_input: &str, der_signature_b64: &str, key_type: KeyType) -> Result<String, Error> {
    let n = coordinate_len(key_type).ok_or_else(|| bad("not a signing key type"))?;
    let der = STANDARD.decode(der_signature_b64.trim()).map_err(|_| bad("signature is not base64"))?;
    if key_type.is_rsa() {
        return Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(der)));
    }
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw_signature(&der, n)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_signatures_become_fixed_length_halves() {
        // r = 0x80 (needs a leading zero in DER), s = 1.
        let der = [0x30, 0x07, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x01];
        let raw = raw_signature(&der, 32).unwrap();
        assert_eq!(raw.len(), 64);
        assert_eq!((raw[31], raw[63]), (0x80, 0x01));
        assert!(raw_signature(&der[..8], 32).is_err());
        assert!(raw_signature(&[0x30, 0x00], 32).is_err());
    }
}
