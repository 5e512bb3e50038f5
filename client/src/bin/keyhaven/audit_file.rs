//! `keyhaven audit verify --file FILE… --archive DIR`: checks an exported
//! or shipped audit log, and segments archived by retention, offline, with
//! no daemon and no token (docs/AUDIT.md §3.3, §11, §12): the hash chain,
//! each seal's head against the chain, and, with `--public-key` (from
//! `keyhaven audit public-key`), each seal's ECDSA P-256 signature.
//!
//! An archive folder holds `NNNNNNNNNNNNNNNNNNNN.log.gz` files: gzip of the
//! daemon's segment files, frames of `kind || u64be(seq) || u32be(len) ||
//! value || SHA-256(all before)`, each frame's checksum checked here.
//!
//! It reads both forms: `audit export --signed` (each record's stored
//! bytes on a line, `{"seal":{…}}` after the record a seal covers) and a
//! file sink's (`{"seq","hash","node","record":{…}}`, `{"seq","node",
//! "seal":{…}}`). Sinks deliver at least once, so a record repeated with
//! the same bytes counts once; repeated with other bytes, it is altered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keyhaven::wire::AuditRecord;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::Failure;

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    hash: Option<String>,
    #[serde(borrow, default)]
    record: Option<&'a RawValue>,
    #[serde(borrow, default)]
    seal: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Seal {
    seq: u64,
    head: String,
    time_ms: u64,
    #[serde(default)]
    sig: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// What the files hold: records by seq (hash, decoded record) and seals
/// by the record they cover.
struct Log {
    records: BTreeMap<u64, ([u8; 32], AuditRecord)>,
    seals: BTreeMap<u64, Seal>,
}

fn problem(kind: &str, seq: u64, msg: String) -> Failure {
    Failure::no(format!("audit log NOT intact at record {seq} ({kind}): {msg}"))
}

/// Largest archived segment read (the daemon's are 64 MiB).
const MAX_SEGMENT: u64 = 1 << 30;
/// Bytes before a frame's value: kind, seq, length.
const FRAME_HEAD: usize = 13;

/// Adds the records and seals of every `*.log.gz` in `dir`.
fn read_archive(dir: &Path, log: &mut Log) -> Result<usize, Failure> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Failure::new(format!("cannot list {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Failure::new(format!("cannot list {}: {e}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let segment = name
            .strip_suffix(".log.gz")
            .is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()));
        if segment {
            files.push(e.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Failure::new(format!(
            "no archived segments (NNNNNNNNNNNNNNNNNNNN.log.gz) in {}",
            dir.display()
        )));
    }
    for file in &files {
        let f = std::fs::File::open(file)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(flate2::read::GzDecoder::new(f), MAX_SEGMENT + 1),
            &mut bytes,
        )
        .map_err(|e| problem("altered", 0, format!("{}: not an intact gzip file: {e}", file.display())))?;
        if bytes.len() as u64 > MAX_SEGMENT {
            return Err(Failure::no(format!("{}: over 1 GiB decompressed: not a segment", file.display())));
        }
        let mut at = 0usize;
        while at < bytes.len() {
            let bad = |seq: u64, why: &str| {
                problem("altered", seq, format!("{}, offset {at} (decompressed): {why}", file.display()))
            };
            let head = bytes.get(at..at + FRAME_HEAD).ok_or_else(|| bad(0, "a frame cut short"))?;
            let seq = u64::from_be_bytes(head[1..9].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(head[9..13].try_into().unwrap_or_default()) as usize;
            let end = at + FRAME_HEAD + len;
            let frame = bytes.get(at..end + 32).ok_or_else(|| bad(seq, "a frame cut short"))?;
            let sum: [u8; 32] = Sha256::digest(&frame[..end - at]).into();
            if frame[end - at..] != sum {
                return Err(bad(seq, "the frame's checksum does not match: it was altered"));
            }
            let value = &bytes[at + FRAME_HEAD..end];
            let where_ = || format!("{} record {seq}", file.display());
            match head[0] {
                b'r' => add_record(log, value, None, &where_)?,
                b's' => add_seal(log, value, &where_)?,
                _ => return Err(bad(seq, "not a frame (unknown kind byte)")),
            }
            at = end + 32;
        }
    }
    Ok(files.len())
}

fn add_seal(log: &mut Log, raw: &[u8], at: &dyn Fn() -> String) -> Result<(), Failure> {
    let s: Seal = serde_json::from_slice(raw)
        .map_err(|e| problem("bad_seal", 0, format!("{}: a seal that does not decode: {e}", at())))?;
    if let Some(old) = log.seals.get(&s.seq) {
        if old.head != s.head || old.sig != s.sig || old.time_ms != s.time_ms {
            return Err(problem("bad_seal", s.seq, format!("{}: two different seals of it", at())));
        }
    }
    log.seals.insert(s.seq, s);
    Ok(())
}

fn add_record(
    log: &mut Log,
    raw: &[u8],
    shipped: Option<&str>,
    at: &dyn Fn() -> String,
) -> Result<(), Failure> {
    let hash: [u8; 32] = Sha256::digest(raw).into();
    let r: AuditRecord = serde_json::from_slice(raw)
        .map_err(|e| problem("altered", 0, format!("{}: a record that does not decode: {e}", at())))?;
    if shipped.is_some_and(|h| *h != hex(&hash)) {
        return Err(problem(
            "altered",
            r.seq,
            format!("{}: its bytes do not hash to the hash shipped with it", at()),
        ));
    }
    if let Some((old, _)) = log.records.get(&r.seq) {
        if *old != hash {
            return Err(problem(
                "altered",
                r.seq,
                format!("{}: it appears twice, with different bytes", at()),
            ));
        }
        return Ok(());
    }
    log.records.insert(r.seq, (hash, r));
    Ok(())
}

fn read(files: &[PathBuf], log: &mut Log) -> Result<(), Failure> {
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
        for (n, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = || format!("{} line {}", file.display(), n + 1);
            let line: Line = serde_json::from_str(l)
                .map_err(|e| Failure::no(format!("{}: not an audit log line: {e}", at())))?;
            if let Some(seal) = line.seal {
                add_seal(log, seal.get().as_bytes(), &at)?;
                continue;
            }
            let raw = line.record.map_or(l, |r| r.get());
            add_record(log, raw.as_bytes(), line.hash.as_deref(), &at)?;
        }
    }
    Ok(())
}

/// `audit verify --file FILE… --archive DIR… [--public-key PEM]`: exits 0
/// when intact, 1 when not, 3 when intact but records were reported
/// unsealed at a start.
pub fn verify(files: &[PathBuf], archives: &[PathBuf], public_key: Option<&Path>) -> Result<(), Failure> {
    let key = match public_key {
        Some(p) => {
            let pem =
                std::fs::read(p).map_err(|e| Failure::new(format!("cannot read {}: {e}", p.display())))?;
            let key = openssl::pkey::PKey::public_key_from_pem(&pem)
                .map_err(|e| Failure::new(format!("{} is not a PEM public key: {e}", p.display())))?;
            let ec = key.ec_key().map_err(|_| Failure::new(format!("{} is not an EC key", p.display())))?;
            if ec.group().curve_name() != Some(openssl::nid::Nid::X9_62_PRIME256V1) {
                return Err(Failure::new(format!("{} is not a P-256 key", p.display())));
            }
            Some(key)
        }
        None => None,
    };
    let mut log = Log { records: BTreeMap::new(), seals: BTreeMap::new() };
    let mut segments = 0;
    for dir in archives {
        segments += read_archive(dir, &mut log)?;
    }
    read(files, &mut log)?;
    let (Some(&first), Some(&last)) = (log.records.keys().next(), log.records.keys().next_back()) else {
        return Err(Failure::no("no audit records in the file(s)".into()));
    };
    // The chain: no gap, each `prev` the hash of the record before.
    let mut before: Option<(u64, [u8; 32])> = None;
    for (&seq, (hash, r)) in &log.records {
        match before {
            None if seq == 1 && r.prev != "0".repeat(64) => {
                return Err(problem("altered", 1, "record 1's prev is not 64 zeros".into()))
            }
            Some((b, _)) if seq != b + 1 => {
                return Err(problem(
                    "removed",
                    b + 1,
                    format!("records {} to {} are missing", b + 1, seq - 1),
                ))
            }
            Some((b, h)) if r.prev != hex(&h) => {
                return Err(problem(
                    "altered",
                    b,
                    format!("record {seq}'s prev is not the hash of record {b}: one of them was changed"),
                ))
            }
            _ => {}
        }
        before = Some((seq, *hash));
    }
    // The seals over records in the files.
    let mut signed_up_to = None;
    let mut seals = 0;
    let mut had_sig = false;
    for (&seq, s) in log.seals.range(first..=last) {
        seals += 1;
        let head = unhex(&s.head).filter(|h| h.len() == 32);
        if head.as_deref() != Some(&log.records[&seq].0[..]) {
            return Err(problem(
                "altered",
                seq,
                "the seal's head is not the hash of the record: a record up to it was changed".into(),
            ));
        }
        let Some(key) = &key else { continue };
        let Some(sig) = &s.sig else {
            if had_sig {
                return Err(problem(
                    "bad_seal",
                    seq,
                    "the seal has no signature though an earlier one has".into(),
                ));
            }
            continue;
        };
        had_sig = true;
        let sig = unhex(sig).ok_or_else(|| problem("bad_seal", seq, "its signature is not hex".into()))?;
        let mut m = Vec::with_capacity(71);
        m.extend_from_slice(b"keyhaven-audit-head-v1\0");
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&log.records[&seq].0);
        m.extend_from_slice(&s.time_ms.to_be_bytes());
        let ok = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), key)
            .and_then(|mut v| v.verify_oneshot(&sig, &m))
            .unwrap_or(false);
        if !ok {
            return Err(problem(
                "bad_seal",
                seq,
                "its signature does not verify under the public key: forged or altered".into(),
            ));
        }
        signed_up_to = Some(seq);
    }
    let unsealed: Vec<String> = log
        .records
        .values()
        .filter_map(|(_, r)| {
            r.unsealed.map(|[a, b]| format!("records {a} to {b} (reported in record {})", r.seq))
        })
        .collect();
    let vouched = match (&key, signed_up_to) {
        (None, _) => "signatures NOT checked (no --public-key)".to_owned(),
        (Some(_), Some(s)) if s == last => format!("signed heads verified up to the last record {s}"),
        (Some(_), Some(s)) => {
            format!("signed heads verified up to record {s}; records {} to {last} are vouched for by no signed head yet", s + 1)
        }
        (Some(_), None) => "no signed head in the file(s): nothing vouches for the records".to_owned(),
    };
    let start = if first == 1 {
        String::new()
    } else {
        format!(" (records before {first} are in none of these: deleted, or in another archive)")
    };
    let archived =
        if archives.is_empty() { String::new() } else { format!(", {segments} archived segments") };
    let summary = format!("records {first} to {last}{start}, {seals} seals{archived}; {vouched}");
    if !unsealed.is_empty() {
        return Err(Failure {
            message: format!(
                "audit log UNSEALED in part: no problem found, but a start found {} covered by no seal [{summary}]",
                unsealed.join(", ")
            ),
            exit: 3,
            no: false,
        });
    }
    if key.is_some() && signed_up_to.is_none() {
        return Err(Failure::no(format!("audit log not vouched for: {summary}")));
    }
    println!("audit log intact: {summary}");
    if key.is_none() {
        eprintln!(
            "keyhaven: without --public-key (from `keyhaven audit public-key`) only the chain was checked: \
             anyone can rewrite a chain"
        );
    }
    Ok(())
}
