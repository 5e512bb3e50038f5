//! Client-side sealing (docs/ENVELOPE.md §10): the sealed-record and
//! sealed-stream formats and their AES-256-GCM, run in this process with a
//! data key from the daemon. Nothing here talks to the daemon; the
//! [`Sealer`](crate::sealer::Sealer) fetches and caches the keys.
//!
//! - A **sealed record** (`khs1:`, kind `03`) is one message: the data-key
//!   envelope, a random 96-bit nonce and the GCM payload. One data key may
//!   seal many records, each with its own random nonce, within the limits of
//!   §10.3.
//! - A **sealed stream** (kind `04`, binary only) is a header with the
//!   envelope and a chunk size, then chunks, each sealed with its index and
//!   a final-chunk flag in its nonce and AAD (the STREAM construction of
//!   Hoang, Reyhanitabar, Rogaway and Vizár), so that a reordered,
//!   truncated or extended stream fails to open. A stream has a data key of
//!   its own.

use std::fmt;
use std::io::{Read, Write};

use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::envelope::{
    decode_text, malformed, Envelope, ALG_AES_256_GCM, DEK_LEN, FORMAT_VERSION, MAGIC, NONCE_LEN, TAG_LEN,
};
use crate::error::Error;

/// Kind byte of a sealed record (ENVELOPE.md §10.1).
pub const KIND_SEALED: u8 = 0x03;
/// Kind byte of a sealed stream (ENVELOPE.md §10.4).
pub const KIND_STREAM: u8 = 0x04;
/// Text form prefix of a sealed record.
pub const SEALED_PREFIX: &str = "khs1:";
/// Largest plaintext of one record: the GCM bound of 2^36 − 32 bytes
/// (NIST SP 800-38D); larger data wants a stream.
pub const MAX_RECORD_PLAINTEXT: u64 = (1 << 36) - 32;
/// Most records one data key may seal (ENVELOPE.md §10.3): half the NIST
/// bound for random 96-bit nonces, as for KEK versions (§7).
pub const MAX_MESSAGES_PER_KEY: u64 = 1 << 31;
/// Smallest chunk size of a stream.
pub const MIN_CHUNK: u32 = 1 << 10;
/// Largest chunk size of a stream (bounds what an opener allocates).
pub const MAX_CHUNK: u32 = 1 << 24;
/// Chunk size the writers use unless told otherwise (64 KiB).
pub const DEFAULT_CHUNK: u32 = 1 << 16;
/// Most chunks in one stream (the index is a u32).
pub const MAX_CHUNKS: u64 = 1 << 32;

/// A plaintext data key, ready for AES-256-GCM. The key bytes and the AES
/// round keys are wiped when it drops; Debug shows nothing of them.
pub struct DataKey {
    cipher: Aes256Gcm,
}

impl DataKey {
    /// Takes a 32-byte key (the daemon's `datakey` or `datakey_decrypt`
    /// plaintext).
    pub fn new(key: &[u8]) -> Result<DataKey, Error> {
        if key.len() != DEK_LEN {
            return Err(Error::Protocol(format!("a data key of {} bytes, expected {DEK_LEN}", key.len())));
        }
        // Expands the key in place: no copy of the 32 bytes is made here.
        let cipher =
            Aes256Gcm::new_from_slice(key).map_err(|_| Error::Protocol("bad data key length".into()))?;
        Ok(DataKey { cipher })
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

fn integrity(what: &str) -> Error {
    Error::Integrity(format!(
        "the {what} does not authenticate: it was altered, truncated or reordered, or the encryption context differs"
    ))
}

fn preamble(kind: u8) -> [u8; 5] {
    [MAGIC[0], MAGIC[1], FORMAT_VERSION, kind, ALG_AES_256_GCM]
}

/// Checks magic, version, kind and algorithm (ENVELOPE.md §10.5).
fn check_preamble(what: &str, b: &[u8], kind: u8) -> Result<(), Error> {
    if b.len() < 5 {
        return Err(malformed(what, "truncated in the preamble"));
    }
    if b[..2] != MAGIC {
        return Err(malformed(what, "does not start with the magic `KH`"));
    }
    if b[2] != FORMAT_VERSION {
        return Err(malformed(what, format!("unsupported format version {}", b[2])));
    }
    if b[3] != kind {
        return Err(malformed(what, format!("kind byte is {:#04x}, expected {kind:#04x}", b[3])));
    }
    if b[4] != ALG_AES_256_GCM {
        return Err(malformed(what, format!("unknown algorithm id {:#04x}", b[4])));
    }
    Ok(())
}

fn aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    crate::envelope::aad(header, context)
}

/// Seals one record (ENVELOPE.md §10.1–10.2) under `key`, whose envelope is
/// `envelope` (binary form), with a fresh random nonce from the operating
/// system. The caller counts the message against the key's limits.
/// [`Sealer`](crate::Sealer) does all this with keys from the daemon; here
/// is the format alone, with a made-up key and envelope:
///
/// ```
/// use keyhaven::seal::{seal_record, sealed_from_text, sealed_to_text, DataKey, SealedRecord};
/// use keyhaven::{EncryptionContext, Envelope, EnvelopeId};
///
/// let envelope = Envelope::new("acme/pii".parse()?, 1, EnvelopeId([1; 16]), [2; 12], [3; 48]);
/// let key = DataKey::new(&[9; 32])?;
/// let ctx = EncryptionContext::from_pairs(["table=users"])?;
/// let record = seal_record(&key, &envelope.to_bytes(), &ctx, b"hello")?;
/// let text = sealed_to_text(&record); // `khs1:…`
/// let bytes = sealed_from_text(&text)?;
/// let parsed = SealedRecord::parse(&bytes)?;
/// assert_eq!(parsed.envelope(), &envelope);
/// assert_eq!(&parsed.open(&key, &ctx)?[..], b"hello");
/// // Another context, or another key: refused, never garbage.
/// assert!(parsed.open(&key, &EncryptionContext::new()).is_err());
/// assert!(parsed.open(&DataKey::new(&[8; 32])?, &ctx).is_err());
/// # Ok::<(), keyhaven::Error>(())
/// ```
pub fn seal_record(
    key: &DataKey,
    envelope: &[u8],
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    if plaintext.len() as u64 > MAX_RECORD_PLAINTEXT {
        return Err(Error::Config(format!(
            "a record of {} bytes is over the GCM limit; seal it as a stream",
            plaintext.len()
        )));
    }
    context.validate()?;
    let env_len = u16::try_from(envelope.len()).map_err(|_| malformed("envelope", "too long"))?;
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let mut out = Vec::with_capacity(7 + envelope.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&preamble(KIND_SEALED));
    out.extend_from_slice(&env_len.to_be_bytes());
    out.extend_from_slice(envelope);
    out.extend_from_slice(&nonce);
    let aad = aad(&out, context);
    let header_len = out.len();
    out.extend_from_slice(plaintext);
    let tag = key
        .cipher
        .encrypt_in_place_detached(&nonce, &aad, &mut out[header_len..])
        .map_err(|_| Error::Config("plaintext too long for AES-GCM".into()))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// A parsed sealed record (structure only: it authenticates when opened).
#[derive(Clone)]
pub struct SealedRecord<'a> {
    envelope: Envelope,
    envelope_bytes: &'a [u8],
    header: &'a [u8],
    payload: &'a [u8],
}

impl<'a> SealedRecord<'a> {
    /// Parses the binary form (ENVELOPE.md §10.5).
    pub fn parse(b: &'a [u8]) -> Result<SealedRecord<'a>, Error> {
        let what = "sealed record";
        check_preamble(what, b, KIND_SEALED)?;
        if b.len() < 7 {
            return Err(malformed(what, "truncated in envelope length"));
        }
        let l = u16::from_be_bytes([b[5], b[6]]) as usize;
        if b.len() < 7 + l {
            return Err(malformed(what, "truncated in envelope"));
        }
        let envelope_bytes = &b[7..7 + l];
        let envelope = Envelope::from_bytes(envelope_bytes).map_err(|e| malformed(what, e))?;
        if b.len() < 7 + l + NONCE_LEN {
            return Err(malformed(what, "truncated in nonce"));
        }
        let header = &b[..7 + l + NONCE_LEN];
        let payload = &b[7 + l + NONCE_LEN..];
        if payload.len() < TAG_LEN {
            return Err(malformed(what, "payload shorter than its 16-byte tag"));
        }
        Ok(SealedRecord { envelope, envelope_bytes, header, payload })
    }

    /// The embedded data-key envelope (its fields are claims until the
    /// daemon unwraps it).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The envelope's binary form, as embedded.
    pub fn envelope_bytes(&self) -> &'a [u8] {
        self.envelope_bytes
    }

    /// Decrypts and authenticates the record with `key` (the envelope's data
    /// key) under `context`.
    pub fn open(&self, key: &DataKey, context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, Error> {
        context.validate()?;
        let nonce = Nonce::from_slice(&self.header[self.header.len() - NONCE_LEN..]);
        let aad = aad(self.header, context);
        key.cipher
            .decrypt(nonce, Payload { msg: self.payload, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| integrity("sealed record"))
    }
}

impl fmt::Debug for SealedRecord<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRecord")
            .field("envelope", &self.envelope)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The text form of a sealed record: `khs1:` and unpadded base64url
/// (ENVELOPE.md §5 rules).
pub fn sealed_to_text(sealed: &[u8]) -> String {
    format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed))
}

/// Decodes the text form of a sealed record to its binary form.
pub fn sealed_from_text(text: &str) -> Result<Vec<u8>, Error> {
    decode_text("sealed record", SEALED_PREFIX, text)
}

/// The header of a sealed stream (ENVELOPE.md §10.4).
#[derive(Clone)]
pub struct StreamHeader {
    bytes: Vec<u8>,
    envelope: Envelope,
    chunk: u32,
}

impl StreamHeader {
    /// A header for a new stream.
    pub fn new(envelope: &Envelope, chunk: u32) -> Result<StreamHeader, Error> {
        check_chunk(chunk)?;
        let env = envelope.to_bytes();
        let mut bytes = Vec::with_capacity(11 + env.len());
        bytes.extend_from_slice(&preamble(KIND_STREAM));
        bytes.extend_from_slice(&chunk.to_be_bytes());
        bytes.extend_from_slice(&(env.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&env);
        Ok(StreamHeader { bytes, envelope: envelope.clone(), chunk })
    }

    /// Reads a header from the start of a stream, and nothing more.
    pub fn read_from<R: Read>(r: &mut R) -> Result<StreamHeader, Error> {
        let mut fixed = [0u8; 11];
        read_full(r, &mut fixed, "sealed stream", "header")?;
        Self::after_fixed(fixed, |buf| read_full(r, buf, "sealed stream", "envelope"))
    }

    /// Reads a header from the start of an async stream, and nothing more.
    pub async fn read_from_async<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, Error> {
        let mut fixed = [0u8; 11];
        read_full_async(r, &mut fixed, "header").await?;
        let l = u16::from_be_bytes([fixed[9], fixed[10]]) as usize;
        let mut env = vec![0u8; l];
        read_full_async(r, &mut env, "envelope").await?;
        Self::after_fixed(fixed, |buf| {
            buf.copy_from_slice(&env);
            Ok(())
        })
    }

    fn after_fixed(
        fixed: [u8; 11],
        read_env: impl FnOnce(&mut [u8]) -> Result<(), Error>,
    ) -> Result<StreamHeader, Error> {
        let what = "sealed stream";
        check_preamble(what, &fixed, KIND_STREAM)?;
        let chunk = u32::from_be_bytes([fixed[5], fixed[6], fixed[7], fixed[8]]);
        check_chunk(chunk).map_err(|e| malformed(what, e))?;
        let l = u16::from_be_bytes([fixed[9], fixed[10]]) as usize;
        let mut bytes = Vec::with_capacity(11 + l);
        bytes.extend_from_slice(&fixed);
        bytes.resize(11 + l, 0);
        read_env(&mut bytes[11..])?;
        let envelope = Envelope::from_bytes(&bytes[11..]).map_err(|e| malformed(what, e))?;
        Ok(StreamHeader { bytes, envelope, chunk })
    }

    /// The header's bytes, as written at the start of the stream.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The embedded data-key envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Plaintext bytes per chunk (the final chunk may hold fewer).
    pub fn chunk_size(&self) -> u32 {
        self.chunk
    }
}

impl fmt::Debug for StreamHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamHeader").field("envelope", &self.envelope).field("chunk", &self.chunk).finish()
    }
}

fn check_chunk(chunk: u32) -> Result<(), Error> {
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
        return Err(Error::Config(format!("chunk size {chunk} is outside {MIN_CHUNK}..={MAX_CHUNK} bytes")));
    }
    Ok(())
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], what: &str, field: &str) -> Result<(), Error> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(malformed(what, format!("truncated in {field}")))
        }
        Err(e) => Err(Error::Io(e)),
    }
}

async fn read_full_async<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    field: &str,
) -> Result<(), Error> {
    use tokio::io::AsyncReadExt;
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(malformed("sealed stream", format!("truncated in {field}")))
        }
        Err(e) => Err(Error::Io(e)),
    }
}

/// Seals or opens the chunks of one stream, in order (ENVELOPE.md §10.4):
/// chunk `i` has nonce `u64 i || u8 final || 00 00 00` and AAD
/// `header || C(ctx) || u64 i || u8 final`.
pub struct ChunkCipher {
    key: std::sync::Arc<DataKey>,
    aad: Vec<u8>,
    prefix_len: usize,
    index: u64,
    done: bool,
}

impl ChunkCipher {
    /// Starts at chunk 0.
    pub fn new(
        key: std::sync::Arc<DataKey>,
        header: &StreamHeader,
        context: &EncryptionContext,
    ) -> Result<ChunkCipher, Error> {
        context.validate()?;
        let aad = aad(header.as_bytes(), context);
        let prefix_len = aad.len();
        Ok(ChunkCipher { key, aad, prefix_len, index: 0, done: false })
    }

    fn next(&mut self, last: bool) -> Result<[u8; NONCE_LEN], Error> {
        if self.done {
            return Err(Error::Protocol("a chunk after the final chunk".into()));
        }
        if self.index >= MAX_CHUNKS {
            return Err(Error::Config(format!("a stream holds at most {MAX_CHUNKS} chunks")));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.index.to_be_bytes());
        nonce[8] = u8::from(last);
        self.aad.truncate(self.prefix_len);
        self.aad.extend_from_slice(&nonce[..9]);
        self.index += 1;
        self.done = last;
        Ok(nonce)
    }

    /// Encrypts the next chunk in place and appends its tag.
    pub fn seal(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), Error> {
        let nonce = self.next(last)?;
        let tag = self
            .key
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &self.aad, buf)
            .map_err(|_| Error::Config("chunk too long for AES-GCM".into()))?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts the next chunk (ciphertext and tag) in place, leaving the
    /// plaintext.
    pub fn open(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), Error> {
        if buf.len() < TAG_LEN {
            return Err(integrity("sealed stream"));
        }
        let nonce = self.next(last)?;
        let split = buf.len() - TAG_LEN;
        let tag = aes_gcm::Tag::clone_from_slice(&buf[split..]);
        buf.truncate(split);
        self.key.cipher.decrypt_in_place_detached(Nonce::from_slice(&nonce), &self.aad, buf, &tag).map_err(
            |_| {
                buf.iter_mut().for_each(|b| *b = 0);
                integrity("sealed stream")
            },
        )
    }

    /// Whether the final chunk has been processed.
    pub fn finished(&self) -> bool {
        self.done
    }
}

/// Reads until `buf` holds `want` bytes or the input ends.
fn fill<R: Read>(r: &mut R, buf: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    while buf.len() < want {
        let n = r.by_ref().take((want - buf.len()) as u64).read_to_end(buf)?;
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Seals everything `input` yields into `output` as a stream: header, then
/// chunks. Memory: two chunks. Returns the plaintext length.
pub fn seal_stream<R: Read, W: Write>(
    cipher: &mut ChunkCipher,
    header: &StreamHeader,
    input: &mut R,
    output: &mut W,
) -> Result<u64, Error> {
    let chunk = header.chunk_size() as usize;
    output.write_all(header.as_bytes())?;
    let mut cur = Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN));
    let mut next = Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN));
    fill(input, &mut cur, chunk)?;
    let mut total = 0u64;
    loop {
        // A full chunk is final only if nothing follows it.
        let last = if cur.len() < chunk {
            true
        } else {
            next.clear();
            fill(input, &mut next, chunk)?;
            next.is_empty()
        };
        total += cur.len() as u64;
        cipher.seal(&mut cur, last)?;
        output.write_all(&cur)?;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
    }
    output.flush()?;
    Ok(total)
}

/// Opens the chunks that follow a stream's header (already read), writing
/// each chunk's plaintext once it has authenticated. Output written before
/// an error must be discarded: the stream is valid only if this returns Ok.
pub fn open_stream<R: Read, W: Write>(
    cipher: &mut ChunkCipher,
    header: &StreamHeader,
    input: &mut R,
    output: &mut W,
) -> Result<u64, Error> {
    let sealed_chunk = header.chunk_size() as usize + TAG_LEN;
    let mut cur = Zeroizing::new(Vec::with_capacity(sealed_chunk + 1));
    let mut total = 0u64;
    fill(input, &mut cur, sealed_chunk + 1)?;
    loop {
        // One byte past a full chunk tells whether more follows.
        let carry = (cur.len() > sealed_chunk).then(|| cur[sealed_chunk]);
        cur.truncate(sealed_chunk);
        let last = carry.is_none();
        cipher.open(&mut cur, last)?;
        output.write_all(&cur)?;
        total += cur.len() as u64;
        if last {
            break;
        }
        cur.clear();
        cur.extend(carry);
        fill(input, &mut cur, sealed_chunk + 1)?;
    }
    output.flush()?;
    Ok(total)
}

/// Async [`seal_stream`].
pub async fn seal_stream_async<R, W>(
    cipher: &mut ChunkCipher,
    header: &StreamHeader,
    input: &mut R,
    output: &mut W,
) -> Result<u64, Error>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let chunk = header.chunk_size() as usize;
    output.write_all(header.as_bytes()).await?;
    let mut cur = Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN));
    let mut next = Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN));
    fill_async(input, &mut cur, chunk).await?;
    let mut total = 0u64;
    loop {
        let last = if cur.len() < chunk {
            true
        } else {
            next.clear();
            fill_async(input, &mut next, chunk).await?;
            next.is_empty()
        };
        total += cur.len() as u64;
        cipher.seal(&mut cur, last)?;
        output.write_all(&cur).await?;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
    }
    output.flush().await?;
    Ok(total)
}

/// Async [`open_stream`].
pub async fn open_stream_async<R, W>(
    cipher: &mut ChunkCipher,
    header: &StreamHeader,
    input: &mut R,
    output: &mut W,
) -> Result<u64, Error>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let sealed_chunk = header.chunk_size() as usize + TAG_LEN;
    let mut cur = Zeroizing::new(Vec::with_capacity(sealed_chunk + 1));
    let mut total = 0u64;
    fill_async(input, &mut cur, sealed_chunk + 1).await?;
    loop {
        let carry = (cur.len() > sealed_chunk).then(|| cur[sealed_chunk]);
        cur.truncate(sealed_chunk);
        let last = carry.is_none();
        cipher.open(&mut cur, last)?;
        output.write_all(&cur).await?;
        total += cur.len() as u64;
        if last {
            break;
        }
        cur.clear();
        cur.extend(carry);
        fill_async(input, &mut cur, sealed_chunk + 1).await?;
    }
    output.flush().await?;
    Ok(total)
}

async fn fill_async<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    while buf.len() < want {
        let n = r.take((want - buf.len()) as u64).read_to_end(buf).await?;
        if n == 0 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{EnvelopeId, WRAPPED_DEK_LEN};

    fn envelope() -> Envelope {
        Envelope::new("acme/pii".parse().unwrap(), 3, EnvelopeId([0xab; 16]), [7; 12], [9; WRAPPED_DEK_LEN])
    }

    fn key() -> DataKey {
        DataKey::new(&[0x20; 32]).unwrap()
    }

    #[test]
    fn record_layout_and_round_trip() {
        let env = envelope().to_bytes();
        let ctx = EncryptionContext::from_pairs(["a=1"]).unwrap();
        let s = seal_record(&key(), &env, &ctx, b"hunter2").unwrap();
        assert_eq!(&s[..5], b"KH\x01\x03\x01");
        assert_eq!(&s[5..7], &(env.len() as u16).to_be_bytes());
        assert_eq!(&s[7..7 + env.len()], &env[..]);
        assert_eq!(s.len(), 7 + env.len() + 12 + 7 + 16);
        let r = SealedRecord::parse(&s).unwrap();
        assert_eq!(r.envelope().id(), EnvelopeId([0xab; 16]));
        assert_eq!(&*r.open(&key(), &ctx).unwrap(), b"hunter2");
        assert!(matches!(r.open(&key(), &EncryptionContext::new()), Err(Error::Integrity(_))));
        // Same plaintext twice: different nonces, different records.
        assert_ne!(s, seal_record(&key(), &env, &ctx, b"hunter2").unwrap());
        assert_eq!(sealed_from_text(&sealed_to_text(&s)).unwrap(), s);
    }

    #[test]
    fn every_flip_and_truncation_is_refused() {
        let env = envelope().to_bytes();
        let ctx = EncryptionContext::new();
        let s = seal_record(&key(), &env, &ctx, b"some record").unwrap();
        for i in 0..s.len() {
            for bit in [0x01, 0x80] {
                let mut t = s.clone();
                t[i] ^= bit;
                let opened = SealedRecord::parse(&t).and_then(|r| r.open(&key(), &ctx));
                assert!(opened.is_err(), "flip of byte {i} accepted");
            }
        }
        for n in 0..s.len() {
            assert!(SealedRecord::parse(&s[..n]).and_then(|r| r.open(&key(), &ctx)).is_err());
        }
        let mut long = s.clone();
        long.push(0);
        assert!(SealedRecord::parse(&long).and_then(|r| r.open(&key(), &ctx)).is_err());
    }

    fn stream(data: &[u8], chunk: u32) -> Vec<u8> {
        let h = StreamHeader::new(&envelope(), chunk).unwrap();
        let mut c = ChunkCipher::new(std::sync::Arc::new(key()), &h, &EncryptionContext::new()).unwrap();
        let mut out = Vec::new();
        assert_eq!(seal_stream(&mut c, &h, &mut &data[..], &mut out).unwrap(), data.len() as u64);
        out
    }

    fn unstream(s: &[u8]) -> Result<Vec<u8>, Error> {
        let mut r = s;
        let h = StreamHeader::read_from(&mut r)?;
        let mut c = ChunkCipher::new(std::sync::Arc::new(key()), &h, &EncryptionContext::new())?;
        let mut out = Vec::new();
        open_stream(&mut c, &h, &mut r, &mut out)?;
        Ok(out)
    }

    #[test]
    fn streams_round_trip_at_every_boundary() {
        for len in [0usize, 1, 1023, 1024, 1025, 2048, 5000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let s = stream(&data, 1024);
            let chunks = len / 1024 + 1 - usize::from(len % 1024 == 0 && len > 0);
            assert_eq!(s.len(), 11 + envelope().to_bytes().len() + len + 16 * chunks, "len {len}");
            assert_eq!(unstream(&s).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn reordered_truncated_or_extended_streams_fail() {
        let data = vec![7u8; 3000];
        let s = stream(&data, 1024);
        let h = 11 + envelope().to_bytes().len();
        let c = 1024 + 16;
        // Swap chunks 0 and 1.
        let mut swapped = s[..h].to_vec();
        swapped.extend_from_slice(&s[h + c..h + 2 * c]);
        swapped.extend_from_slice(&s[h..h + c]);
        swapped.extend_from_slice(&s[h + 2 * c..]);
        assert!(matches!(unstream(&swapped), Err(Error::Integrity(_))));
        // Cut at a chunk boundary: the new last chunk was not sealed as final.
        assert!(matches!(unstream(&s[..h + 2 * c]), Err(Error::Integrity(_))));
        // Anything appended.
        let mut longer = s.clone();
        longer.extend_from_slice(&s[h..h + c]);
        assert!(unstream(&longer).is_err());
        for n in 0..s.len() {
            assert!(unstream(&s[..n]).is_err(), "truncation to {n} accepted");
        }
        for i in (0..s.len()).step_by(7) {
            let mut t = s.clone();
            t[i] ^= 0x10;
            assert!(unstream(&t).is_err(), "flip of byte {i} accepted");
        }
    }

    #[test]
    fn debug_shows_no_key() {
        assert_eq!(format!("{:?}", key()), "DataKey(<redacted>)");
    }
}
