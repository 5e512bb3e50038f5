//! The data-key envelope and the ciphertext of `encrypt`, byte by byte as in
//! docs/ENVELOPE.md, in binary and text form.
//!
//! Parsing here checks structure only (magic, version, lengths, names). An
//! envelope that parses may still be forged or altered: only unwrapping it
//! with its key, under the right encryption context, authenticates it.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::names::KeyPath;

/// First two bytes of every binary form (ENVELOPE.md §2).
pub const MAGIC: [u8; 2] = *b"KH";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Kind byte of a data-key envelope.
pub const KIND_ENVELOPE: u8 = 0x01;
/// Kind byte of a ciphertext.
pub const KIND_CIPHERTEXT: u8 = 0x02;
/// Algorithm id: AES-256-GCM, 96-bit nonce, 128-bit tag.
pub const ALG_AES_256_GCM: u8 = 0x01;
/// Length of a GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of a data key.
pub const DEK_LEN: usize = 32;
/// Length of a wrapped data key: the encrypted key followed by its tag.
pub const WRAPPED_DEK_LEN: usize = DEK_LEN + TAG_LEN;
/// Length of an envelope id.
pub const ID_LEN: usize = 16;
/// Text form prefix of an envelope (ENVELOPE.md §5).
pub const ENVELOPE_PREFIX: &str = "khe1:";
/// Text form prefix of a ciphertext (ENVELOPE.md §5).
pub const CIPHERTEXT_PREFIX: &str = "khc1:";

pub(crate) fn malformed(what: &str, why: impl fmt::Display) -> Error {
    Error::Envelope(format!("{what}: {why}"))
}

/// The 128-bit random id of one data key, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeId(pub [u8; ID_LEN]);

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lowercase hex in one write (it is formatted for every response
        // and audit record that names an envelope).
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 2 * ID_LEN];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 15)];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeId({self})")
    }
}

impl FromStr for EnvelopeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || malformed("envelope id", "expected 32 lowercase hex digits");
        if s.len() != 2 * ID_LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut id = [0u8; ID_LEN];
        for (i, out) in id.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(EnvelopeId(id))
    }
}

/// A data-key envelope (ENVELOPE.md §2): which key version wrapped the data
/// key, the envelope's id and nonce, and the wrapped data key.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    path: KeyPath,
    key_version: u32,
    id: EnvelopeId,
    nonce: [u8; NONCE_LEN],
    wrapped_dek: [u8; WRAPPED_DEK_LEN],
}

/// The header of an envelope (ENVELOPE.md §2, offsets 0 to the end of the
/// nonce): the bytes that are authenticated, followed by the encryption
/// context, when the data key is wrapped.
pub fn envelope_header(
    path: &KeyPath,
    key_version: u32,
    id: &EnvelopeId,
    nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let mut h = Vec::with_capacity(9 + path.tenant().len() + path.key().len() + 4 + 28);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&[FORMAT_VERSION, KIND_ENVELOPE, ALG_AES_256_GCM]);
    h.push(path.tenant().len() as u8);
    h.extend_from_slice(path.tenant().as_bytes());
    h.push(path.key().len() as u8);
    h.extend_from_slice(path.key().as_bytes());
    h.extend_from_slice(&key_version.to_be_bytes());
    h.extend_from_slice(&id.0);
    h.extend_from_slice(nonce);
    h
}

/// The additional authenticated data of a GCM operation: `header || context`
/// (ENVELOPE.md §3).
pub fn aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 64);
    aad.extend_from_slice(header);
    context.encode(&mut aad);
    aad
}

/// Reads the fixed parts of a binary form in order, naming what is missing.
struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], Error> {
        if self.buf.len() - self.pos < n {
            return Err(malformed(self.what, format!("truncated in {field}")));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self, field: &str) -> Result<u8, Error> {
        Ok(self.take(1, field)?[0])
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], Error> {
        Ok(self.take(N, field)?.try_into().expect("take returns N bytes"))
    }

    /// Magic, version, kind and algorithm: the first five bytes of both forms.
    fn preamble(&mut self, kind: u8) -> Result<(), Error> {
        if self.take(2, "magic")? != MAGIC {
            return Err(malformed(self.what, "does not start with the magic `KH`"));
        }
        let version = self.byte("version")?;
        if version != FORMAT_VERSION {
            return Err(malformed(self.what, format!("unsupported format version {version}")));
        }
        let k = self.byte("kind")?;
        if k != kind {
            return Err(malformed(self.what, format!("kind byte is {k:#04x}, expected {kind:#04x}")));
        }
        let alg = self.byte("algorithm")?;
        if alg != ALG_AES_256_GCM {
            return Err(malformed(self.what, format!("unknown algorithm id {alg:#04x}")));
        }
        Ok(())
    }

    fn name(&mut self, field: &'static str) -> Result<String, Error> {
        let len = self.byte(field)? as usize;
        let raw = self.take(len, field)?;
        let name = std::str::from_utf8(raw)
            .map_err(|_| malformed(self.what, format!("{field} name is not UTF-8")))?;
        crate::names::validate_name(field, name).map_err(|e| malformed(self.what, e))?;
        Ok(name.to_owned())
    }

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

impl Envelope {
    /// Assembles an envelope from its parts.
    pub fn new(
        path: KeyPath,
        key_version: u32,
        id: EnvelopeId,
        nonce: [u8; NONCE_LEN],
        wrapped_dek: [u8; WRAPPED_DEK_LEN],
    ) -> Self {
        Envelope { path, key_version, id, nonce, wrapped_dek }
    }

    /// The tenant and key whose version wrapped the data key.
    pub fn path(&self) -> &KeyPath {
        &self.path
    }

    /// The key version that wrapped the data key.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// The envelope id.
    pub fn id(&self) -> EnvelopeId {
        self.id
    }

    /// The nonce used to wrap the data key.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// The wrapped data key and its tag.
    pub fn wrapped_dek(&self) -> &[u8; WRAPPED_DEK_LEN] {
        &self.wrapped_dek
    }

    /// The authenticated header (ENVELOPE.md §2).
    pub fn header(&self) -> Vec<u8> {
        envelope_header(&self.path, self.key_version, &self.id, &self.nonce)
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.header();
        b.extend_from_slice(&self.wrapped_dek);
        b
    }

    /// Parses the binary form; nothing may follow the wrapped key.
    pub fn from_bytes(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader { what: "envelope", buf, pos: 0 };
        let env = Self::read(&mut r)?;
        if !r.rest().is_empty() {
            return Err(malformed("envelope", format!("{} bytes after the end", r.rest().len())));
        }
        Ok(env)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, Error> {
        r.preamble(KIND_ENVELOPE)?;
        let tenant = r.name("tenant")?;
        let key = r.name("key")?;
        let path = KeyPath::new(&tenant, &key).map_err(|e| malformed(r.what, e))?;
        let key_version = u32::from_be_bytes(r.array("key version")?);
        if key_version == 0 {
            return Err(malformed(r.what, "key version 0 does not exist"));
        }
        let id = EnvelopeId(r.array("envelope id")?);
        let nonce = r.array("nonce")?;
        let wrapped_dek = r.array("wrapped data key")?;
        Ok(Envelope { path, key_version, id, nonce, wrapped_dek })
    }
}

impl fmt::Display for Envelope {
    /// The text form: `khe1:` and the binary form in unpadded base64url.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ENVELOPE_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl FromStr for Envelope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Envelope::from_bytes(&decode_text("envelope", ENVELOPE_PREFIX, s)?)
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("path", &self.path)
            .field("key_version", &self.key_version)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn decode_text(what: &'static str, prefix: &str, s: &str) -> Result<Vec<u8>, Error> {
    let s = s.trim();
    let body = s
        .strip_prefix(prefix)
        .ok_or_else(|| malformed(what, format!("text form must start with `{prefix}`")))?;
    URL_SAFE_NO_PAD.decode(body).map_err(|e| malformed(what, format!("bad base64url: {e}")))
}

/// The ciphertext of `encrypt` (ENVELOPE.md §6): an envelope, then a small
/// secret encrypted with AES-256-GCM under the envelope's data key.
#[derive(Clone, PartialEq, Eq)]
pub struct Ciphertext {
    envelope: Envelope,
    nonce: [u8; NONCE_LEN],
    payload: Vec<u8>,
}

impl Ciphertext {
    /// Assembles a ciphertext; `payload` is the GCM output, ciphertext then tag.
    pub fn new(envelope: Envelope, nonce: [u8; NONCE_LEN], payload: Vec<u8>) -> Self {
        Ciphertext { envelope, nonce, payload }
    }

    /// Builds the authenticated header of a ciphertext before its payload
    /// exists (to compute the AAD).
    pub fn header_for(envelope: &Envelope, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let env = envelope.to_bytes();
        let mut h = Vec::with_capacity(7 + env.len() + NONCE_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&[FORMAT_VERSION, KIND_CIPHERTEXT, ALG_AES_256_GCM]);
        h.extend_from_slice(&(env.len() as u16).to_be_bytes());
        h.extend_from_slice(&env);
        h.extend_from_slice(nonce);
        h
    }

    /// The embedded data-key envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The payload nonce.
    pub fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// The encrypted payload followed by its tag.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The authenticated header (ENVELOPE.md §6).
    pub fn header(&self) -> Vec<u8> {
        Self::header_for(&self.envelope, &self.nonce)
    }

    /// The binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.header();
        b.extend_from_slice(&self.payload);
        b
    }

    /// Parses the binary form.
    pub fn from_bytes(buf: &[u8]) -> Result<Self, Error> {
        let what = "ciphertext";
        let mut r = Reader { what, buf, pos: 0 };
        r.preamble(KIND_CIPHERTEXT)?;
        let env_len = u16::from_be_bytes(r.array("envelope length")?) as usize;
        let env_bytes = r.take(env_len, "envelope")?;
        let envelope = Envelope::from_bytes(env_bytes).map_err(|e| malformed(what, e))?;
        let nonce = r.array("payload nonce")?;
        let payload = r.rest();
        if payload.len() < TAG_LEN {
            return Err(malformed(what, "payload shorter than its 16-byte tag"));
        }
        Ok(Ciphertext { envelope, nonce, payload: payload.to_vec() })
    }
}

impl fmt::Display for Ciphertext {
    /// The text form: `khc1:` and the binary form in unpadded base64url.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{CIPHERTEXT_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl FromStr for Ciphertext {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ciphertext::from_bytes(&decode_text("ciphertext", CIPHERTEXT_PREFIX, s)?)
    }
}

impl fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ciphertext")
            .field("envelope", &self.envelope)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope::new(
            "acme/pii".parse().unwrap(),
            3,
            EnvelopeId([0xab; ID_LEN]),
            [7; NONCE_LEN],
            [9; WRAPPED_DEK_LEN],
        )
    }

    #[test]
    fn envelope_layout_is_the_spec() {
        let b = sample().to_bytes();
        // ENVELOPE.md §2: KH 01 01 01 | 04 acme | 03 pii | 00000003 | id | nonce | wrapped
        assert_eq!(&b[..5], b"KH\x01\x01\x01");
        assert_eq!(&b[5..10], b"\x04acme");
        assert_eq!(&b[10..14], b"\x03pii");
        assert_eq!(&b[14..18], &[0, 0, 0, 3]);
        assert_eq!(&b[18..34], &[0xab; 16]);
        assert_eq!(&b[34..46], &[7; 12]);
        assert_eq!(&b[46..], &[9; 48]);
        assert_eq!(sample().header(), b[..46].to_vec());
    }

    #[test]
    fn round_trips_binary_and_text() {
        let e = sample();
        assert_eq!(Envelope::from_bytes(&e.to_bytes()).unwrap(), e);
        let t = e.to_string();
        assert!(t.starts_with("khe1:"));
        assert_eq!(t.parse::<Envelope>().unwrap(), e);
        let c = Ciphertext::new(e, [1; NONCE_LEN], vec![5; 40]);
        assert_eq!(Ciphertext::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(c.to_string().parse::<Ciphertext>().unwrap(), c);
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = sample().to_bytes();
        for n in 0..b.len() {
            assert!(Envelope::from_bytes(&b[..n]).is_err(), "accepted {n} bytes");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Envelope::from_bytes(&long).is_err());
    }

    #[test]
    fn bad_text_is_refused() {
        let t = sample().to_string();
        assert!(t.replacen("khe1:", "khc1:", 1).parse::<Envelope>().is_err());
        assert!(format!("{t}=").parse::<Envelope>().is_err());
        assert!(t[..t.len() - 1].parse::<Envelope>().is_err());
        assert!("khe1:!!!!".parse::<Envelope>().is_err());
    }

    #[test]
    fn envelope_id_text() {
        let id = EnvelopeId([0x0f; ID_LEN]);
        assert_eq!(id.to_string(), "0f".repeat(16));
        let every = EnvelopeId(std::array::from_fn(|i| (i as u8) * 17));
        assert_eq!(every.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!(id.to_string().parse::<EnvelopeId>().unwrap(), id);
        assert!("0F".repeat(16).parse::<EnvelopeId>().is_err());
        assert!("0f".parse::<EnvelopeId>().is_err());
        assert!("é".repeat(16).parse::<EnvelopeId>().is_err());
    }
}
