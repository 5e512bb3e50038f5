//! DER SubjectPublicKeyInfo of RSA public keys (RFC 8017 A.1.1, RFC 5280
//! 4.1): built from a token's modulus and exponent, and read back for JWKs
//! and for loading into a token. Only DER encoding; no arithmetic.

/// The DER of `SEQUENCE { rsaEncryption, NULL }`.
const RSA_ALGORITHM: &[u8] =
    &[0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];

/// A DER element of `tag` around `body` (definite length).
fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

/// A DER INTEGER of the unsigned big-endian `value`.
fn integer(value: &[u8]) -> Vec<u8> {
    let start = value.iter().position(|b| *b != 0).unwrap_or(value.len().saturating_sub(1));
    let mut v = value.get(start..).unwrap_or(&[0]).to_vec();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// One DER element at the start of `input`: its tag, body and what follows.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The DER SubjectPublicKeyInfo of the RSA public key (`modulus`,
/// `exponent`), both unsigned big-endian.
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let key = der(0x30, &[integer(modulus), integer(exponent)].concat());
    let bits = der(0x03, &[&[0u8][..], &key].concat());
    der(0x30, &[RSA_ALGORITHM, &bits].concat())
}

/// The modulus and exponent (unsigned big-endian, no leading zeros) of a
/// DER SubjectPublicKeyInfo of an RSA key; `None` when it is not one.
pub fn rsa_public(spki: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (0x30, body, []) = element(spki)? else { return None };
    let (0x30, alg, rest) = element(body)? else { return None };
    if alg != &RSA_ALGORITHM[2..] {
        return None;
    }
    let (0x03, bits, []) = element(rest)? else { return None };
    let (0, key) = bits.split_first()? else { return None };
    let (0x30, key, []) = element(key)? else { return None };
    let (0x02, n, rest) = element(key)? else { return None };
    let (0x02, e, []) = element(rest)? else { return None };
    let strip = |v: &[u8]| v.iter().position(|b| *b != 0).map(|i| v[i..].to_vec());
    Some((strip(n)?, strip(e)?))
}

/// The DER of a PEM `PUBLIC KEY`.
pub fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_spki_round_trips() {
        let mut n = vec![0xc3u8; 384];
        n[383] = 0x01;
        let spki = rsa_spki(&n, &[0x01, 0x00, 0x01]);
        // SEQUENCE of 0x1a2 bytes: a 3072-bit key's SPKI is 422 bytes.
        assert_eq!(&spki[..4], &[0x30, 0x82, 0x01, 0xa2]);
        assert_eq!(spki.len(), 422);
        assert_eq!(rsa_public(&spki), Some((n, vec![1, 0, 1])));
        assert_eq!(rsa_public(&spki[..spki.len() - 1]), None);
        assert_eq!(rsa_public(&[0x30, 0x00]), None);
    }
}
