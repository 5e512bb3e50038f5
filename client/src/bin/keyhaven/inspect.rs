//! `keyhaven inspect`: what a stored Keyhaven value is (format, tenant, key,
//! version, envelope id), decoded offline, without the daemon. Nothing in
//! these forms is secret: the data key inside is wrapped, and nothing here
//! authenticates them (the fields are claims until the daemon unwraps the
//! envelope).

use std::io::{Read, Write};

use keyhaven::envelope::{Ciphertext, Envelope, ENVELOPE_PREFIX};
use keyhaven::seal::{SealedRecord, StreamHeader, KIND_SEALED, KIND_STREAM};
use serde::Serialize;

use super::Failure;

/// Reads at most this much: a stream's header comes first, and text forms
/// of records are far smaller.
const INPUT_LIMIT: u64 = 16 << 20;

/// What `inspect` prints for one value.
#[derive(Serialize)]
pub struct Inspected {
    /// `envelope` (`khe1:`), `ciphertext` (`khc1:`), `sealed_record`
    /// (`khs1:`), `sealed_stream` or `public_ciphertext` (`khp1:`).
    format: &'static str,
    /// `text` or `binary`.
    form: &'static str,
    tenant: String,
    key: String,
    key_version: u32,
    pub envelope_id: String,
    /// The envelope's text form (what `datakey decrypt` and
    /// `revoke datakey` take), for a ciphertext, record or stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    envelope: Option<String>,
    /// Plaintext bytes sealed in a ciphertext or record.
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext_bytes: Option<usize>,
    /// A stream's plaintext bytes per chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_size: Option<u32>,
}

impl Inspected {
    fn new(format: &'static str, form: &'static str, envelope: &Envelope) -> Inspected {
        Inspected {
            format,
            form,
            tenant: envelope.path().tenant().to_owned(),
            key: envelope.path().key().to_owned(),
            key_version: envelope.key_version(),
            envelope_id: envelope.id().to_string(),
            envelope: (format != "envelope").then(|| envelope.to_string()),
            plaintext_bytes: None,
            chunk_size: None,
        }
    }
}

/// Decodes one text form (`khe1:`, `khc1:`, `khs1:`, `khp1:`).
pub fn text(s: &str) -> Result<Inspected, String> {
    let s = s.trim();
    let prefix = s.split_once(':').map(|(p, _)| p).unwrap_or("");
    match prefix {
        "khe1" => Ok(Inspected::new("envelope", "text", &s.parse::<Envelope>().map_err(|e| e.to_string())?)),
        "khc1" => {
            let c = s.parse::<Ciphertext>().map_err(|e| e.to_string())?;
            let mut out = Inspected::new("ciphertext", "text", c.envelope());
            out.plaintext_bytes = Some(c.payload().len().saturating_sub(16));
            Ok(out)
        }
        "khs1" => {
            let bytes = keyhaven::seal::sealed_from_text(s).map_err(|e| e.to_string())?;
            let mut out = record(&bytes)?;
            out.form = "text";
            Ok(out)
        }
        "khp1" => {
            use sha2::Digest as _;
            let c = s.parse::<keyhaven::hybrid::PublicCiphertext>().map_err(|e| e.to_string())?;
            // The id `decrypt` gives it (ENVELOPE.md §11.3).
            let digest = sha2::Sha256::digest(c.wrapped_key());
            Ok(Inspected {
                format: "public_ciphertext",
                form: "text",
                tenant: c.path().tenant().to_owned(),
                key: c.path().key().to_owned(),
                key_version: c.key_version(),
                envelope_id: digest[..16].iter().map(|b| format!("{b:02x}")).collect(),
                envelope: None,
                plaintext_bytes: Some(c.payload().len().saturating_sub(16)),
                chunk_size: None,
            })
        }
        _ => Err(format!(
            "not a Keyhaven text form: it must start with `{ENVELOPE_PREFIX}`, `khc1:`, `khs1:` or `khp1:` (got `{}`)",
            s.chars().take(12).collect::<String>().escape_debug()
        )),
    }
}

fn record(bytes: &[u8]) -> Result<Inspected, String> {
    let r = SealedRecord::parse(bytes).map_err(|e| e.to_string())?;
    let mut out = Inspected::new("sealed_record", "binary", r.envelope());
    // Preamble and envelope length (7 bytes), the envelope, the nonce, then
    // ciphertext and tag (ENVELOPE.md §10.1).
    let payload = bytes.len() - 7 - r.envelope_bytes().len() - 12;
    out.plaintext_bytes = Some(payload.saturating_sub(16));
    Ok(out)
}

/// Decodes a binary form by its kind byte (ENVELOPE.md §2.2).
pub fn binary(bytes: &[u8]) -> Result<Inspected, String> {
    if bytes.len() < 5 || &bytes[..2] != b"KH" {
        return Err("not a Keyhaven binary form: it does not start with `KH` (4b 48)".into());
    }
    match bytes[3] {
        keyhaven::envelope::KIND_ENVELOPE => {
            Ok(Inspected::new("envelope", "binary", &Envelope::from_bytes(bytes).map_err(|e| e.to_string())?))
        }
        keyhaven::envelope::KIND_CIPHERTEXT => {
            let c = Ciphertext::from_bytes(bytes).map_err(|e| e.to_string())?;
            let mut out = Inspected::new("ciphertext", "binary", c.envelope());
            out.plaintext_bytes = Some(c.payload().len().saturating_sub(16));
            Ok(out)
        }
        KIND_SEALED => record(bytes),
        KIND_STREAM => {
            let h = StreamHeader::read_from(&mut &bytes[..]).map_err(|e| e.to_string())?;
            let mut out = Inspected::new("sealed_stream", "binary", h.envelope());
            out.chunk_size = Some(h.chunk_size());
            Ok(out)
        }
        kind => Err(format!("unknown Keyhaven kind {kind:#04x} (known: 01 envelope, 02 ciphertext, 03 sealed record, 04 sealed stream)")),
    }
}

/// `keyhaven inspect [VALUE]`: the argument, or stdin (one text form per
/// line, or one binary value); one JSON object per value.
pub fn run(value: Option<&str>) -> Result<(), Failure> {
    let found: Vec<Inspected> = match value {
        Some(v) => vec![text(v).map_err(Failure::new)?],
        None => {
            let mut raw = Vec::new();
            std::io::stdin()
                .take(INPUT_LIMIT)
                .read_to_end(&mut raw)
                .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
            if raw.starts_with(b"KH") {
                vec![binary(&raw).map_err(Failure::new)?]
            } else {
                let s = std::str::from_utf8(&raw).map_err(|_| {
                    Failure::new("stdin is neither a Keyhaven text form nor a binary form".into())
                })?;
                let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
                if lines.is_empty() {
                    return Err(Failure::new("nothing to inspect on stdin".into()));
                }
                let mut out = Vec::new();
                for (n, line) in lines.iter().enumerate() {
                    out.push(text(line).map_err(|e| {
                        Failure::new(if lines.len() > 1 { format!("line {}: {e}", n + 1) } else { e })
                    })?);
                }
                out
            }
        }
    };
    for item in &found {
        let line = serde_json::to_string(item).map_err(|e| Failure::new(e.to_string()))?;
        writeln!(std::io::stdout().lock(), "{line}")?;
    }
    Ok(())
}
