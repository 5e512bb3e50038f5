//! `keyhaven audit verify --file FILE…`: checks an exported or shipped
//! audit log offline, with no daemon and no token (docs/AUDIT.md §3.3,
//! §11): the hash chain, each seal's head against the chain, and, with
//! `--public-key` (from `keyhaven audit public-key`), each seal's ECDSA
//! P-256 signature.
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
    Failure::new(format!("audit log NOT intact at record {seq} ({kind}): {msg}"))
}

fn read(files: &[PathBuf]) -> Result<Log, Failure> {
    let mut log = Log { records: BTreeMap::new(), seals: BTreeMap::new() };
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))?;
        for (n, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = || format!("{} line {}", file.display(), n + 1);
            let line: Line = serde_json::from_str(l)
                .map_err(|e| Failure::new(format!("{}: not an audit log line: {e}", at())))?;
            if let Some(seal) = line.seal {
                let s: Seal = serde_json::from_str(seal.get()).map_err(|e| {
                    problem("bad_seal", 0, format!("{}: a seal that does not decode: {e}", at()))
                })?;
                if let Some(old) = log.seals.get(&s.seq) {
                    if old.head != s.head || old.sig != s.sig || old.time_ms != s.time_ms {
                        return Err(problem(
                            "bad_seal",
                            s.seq,
                            format!("{}: two different seals of it", at()),
                        ));
                    }
                }
                log.seals.insert(s.seq, s);
                continue;
            }
            let raw = line.record.map_or(l, |r| r.get());
            let hash: [u8; 32] = Sha256::digest(raw.as_bytes()).into();
            let r: AuditRecord = serde_json::from_str(raw).map_err(|e| {
                problem("altered", 0, format!("{}: a record that does not decode: {e}", at()))
            })?;
            if line.hash.as_ref().is_some_and(|h| *h != hex(&hash)) {
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
                continue;
            }
            log.records.insert(r.seq, (hash, r));
        }
    }
    Ok(log)
}

/// `audit verify --file FILE… [--public-key PEM]`: exits 0 when intact,
/// 1 when not, 3 when intact but records were reported unsealed at a start.
pub fn verify(files: &[PathBuf], public_key: Option<&Path>) -> Result<(), Failure> {
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
    let log = read(files)?;
    let (Some(&first), Some(&last)) = (log.records.keys().next(), log.records.keys().next_back()) else {
        return Err(Failure::new("no audit records in the file(s)".into()));
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
    let summary = format!("records {first} to {last}, {seals} seals; {vouched}");
    if !unsealed.is_empty() {
        return Err(Failure {
            message: format!(
                "audit log UNSEALED in part: no problem found, but a start found {} covered by no seal [{summary}]",
                unsealed.join(", ")
            ),
            exit: 3,
        });
    }
    if key.is_some() && signed_up_to.is_none() {
        return Err(Failure::new(format!("audit log not vouched for: {summary}")));
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
