//! Tampering with envelopes and ciphertexts, against the real daemon and
//! token: every single-byte change, every truncation and an appended byte
//! must be refused, never answered with a key or a plaintext. Where in the
//! binary form the change lands decides which refusal is right (the layout
//! is docs/ENVELOPE.md §2 and §6, as `keyhaven::envelope` writes it).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use keyhaven::envelope::{NONCE_LEN, TAG_LEN};
use keyhaven::{Ciphertext, Envelope};
use keyhaven_tests::*;

/// Every single-bit flip, and all bits at once: nine changes per byte.
const MASKS: [u8; 9] = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF];

const ANY_REFUSAL: &[ErrorCode] = &[ErrorCode::BadEnvelope, ErrorCode::Integrity, ErrorCode::NotFound];

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A data-key envelope, opened with `datakey_decrypt`.
    Envelope,
    /// A ciphertext of `encrypt`, opened with `decrypt`.
    Ciphertext,
}

impl Kind {
    fn text(self, bytes: &[u8]) -> String {
        use base64::Engine;
        let prefix = match self {
            Kind::Envelope => keyhaven::envelope::ENVELOPE_PREFIX,
            Kind::Ciphertext => keyhaven::envelope::CIPHERTEXT_PREFIX,
        };
        format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }
}

/// One altered input and the refusals that are right for it.
struct Case {
    what: String,
    text: String,
    allowed: &'static [ErrorCode],
}

/// Where the fields of an envelope lie in its binary form, from `at` on.
struct EnvelopeLayout {
    preamble: Range<usize>,
    names: Range<usize>,
    version: Range<usize>,
}

fn envelope_layout(env: &Envelope, at: usize) -> EnvelopeLayout {
    let (t, k) = (env.path().tenant().len(), env.path().key().len());
    let names = at + 5..at + 5 + 1 + t + 1 + k;
    let version = names.end..names.end + 4;
    // Then the envelope id, nonce and wrapped data key: all bound by GCM.
    EnvelopeLayout { preamble: at..at + 5, names, version }
}

/// The refusals that are right for a change of the byte at `i`.
fn allowed_for(i: usize, layout: &EnvelopeLayout, structure: &[Range<usize>]) -> &'static [ErrorCode] {
    if layout.preamble.contains(&i) || structure.iter().any(|r| r.contains(&i)) {
        // Magic, version, kind, algorithm, a length field: does not parse.
        &[ErrorCode::BadEnvelope]
    } else if layout.names.contains(&i) {
        // An invalid name does not parse; a valid one names no existing key.
        &[ErrorCode::BadEnvelope, ErrorCode::NotFound]
    } else if layout.version.contains(&i) {
        // Version 0 does not parse; any other version does not exist.
        &[ErrorCode::BadEnvelope, ErrorCode::NotFound]
    } else {
        // Id, nonces, wrapped key, payload: parses, does not authenticate.
        &[ErrorCode::Integrity]
    }
}

fn single_byte_changes(
    kind: Kind,
    bytes: &[u8],
    layout: &EnvelopeLayout,
    structure: &[Range<usize>],
) -> Vec<Case> {
    let mut cases = Vec::new();
    for i in 0..bytes.len() {
        for mask in MASKS {
            let mut b = bytes.to_vec();
            b[i] ^= mask;
            cases.push(Case {
                what: format!("{kind:?} byte {i} ^ {mask:#04x}"),
                text: kind.text(&b),
                allowed: allowed_for(i, layout, structure),
            });
        }
    }
    cases
}

/// Sends every case at once on one connection (pipelined) and checks that
/// each is refused with an allowed code. Returns how often each code came.
async fn assert_all_refused(
    c: &Arc<Client>,
    kind: Kind,
    cases: Vec<Case>,
    context: &EncryptionContext,
) -> BTreeMap<&'static str, usize> {
    let total = cases.len();
    let mut tasks = Vec::with_capacity(total);
    for case in cases {
        let (c, context) = (c.clone(), context.clone());
        tasks.push(tokio::spawn(async move {
            let result = match kind {
                Kind::Envelope => c.datakey_decrypt(&case.text, &context).await.map(drop),
                Kind::Ciphertext => c.decrypt(&case.text, &context).await.map(drop),
            };
            (case, result)
        }));
    }
    let mut failures = Vec::new();
    let mut codes = BTreeMap::new();
    for t in tasks {
        let (case, result) = t.await.expect("request task");
        match result {
            // The plaintext is not printed: it is what must never come back.
            Ok(()) => failures.push(format!("{}: ACCEPTED (answered with the secret)", case.what)),
            Err(e) => match e.code() {
                Some(code) if case.allowed.contains(&code) && ANY_REFUSAL.contains(&code) => {
                    *codes.entry(code.as_str()).or_insert(0) += 1;
                }
                _ => failures.push(format!("{}: {e} (allowed: {:?})", case.what, case.allowed)),
            },
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} altered {kind:?}s were not refused as they should be:\n{}",
        failures.len(),
        failures.join("\n")
    );
    codes
}

/// Stops the daemon and checks that it exits cleanly and never panicked.
fn assert_clean_exit(mut d: TestDaemon) {
    let (status, log) = d.stop();
    assert!(status.success(), "keyhavend exited with {status}:\n{log}");
    assert!(!log.contains("panicked"), "keyhavend panicked:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_single_byte_change_of_a_data_key_envelope_is_refused() {
    let d = TestDaemon::start();
    let c = Arc::new(d.client().await);
    c.key_create(&path("acme/pii")).await.unwrap();
    let context = ctx(&["user=42", "table=providers"]);
    let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
    let key = dk.plaintext.clone().expect("plaintext asked for");
    let env: Envelope = dk.envelope.parse().unwrap();
    let bytes = env.to_bytes();
    let layout = envelope_layout(&env, 0);
    // The tenant and key length bytes are structure.
    let t = env.path().tenant().len();
    let structure = [5..6, 6 + t..7 + t];

    // The untouched envelope opens, re-encoded the same way.
    let back = c.datakey_decrypt(&Kind::Envelope.text(&bytes), &context).await.unwrap();
    assert_eq!(back.plaintext, key);

    let cases = single_byte_changes(Kind::Envelope, &bytes, &layout, &structure);
    assert_eq!(cases.len(), bytes.len() * MASKS.len());
    let codes = assert_all_refused(&c, Kind::Envelope, cases, &context).await;
    // Not vacuous: each kind of refusal was met.
    for code in ["bad_envelope", "integrity", "not_found"] {
        assert!(codes.get(code).copied().unwrap_or(0) > 0, "no {code} among {codes:?}");
    }

    // Every truncation, and one byte more, whatever the byte.
    let mut cases: Vec<Case> = (0..bytes.len())
        .map(|n| Case {
            what: format!("envelope truncated to {n} bytes"),
            text: Kind::Envelope.text(&bytes[..n]),
            allowed: &[ErrorCode::BadEnvelope],
        })
        .collect();
    for extra in [0x00, 0x01, 0xFF] {
        let mut long = bytes.clone();
        long.push(extra);
        cases.push(Case {
            what: format!("envelope with {extra:#04x} appended"),
            text: Kind::Envelope.text(&long),
            allowed: &[ErrorCode::BadEnvelope],
        });
    }
    assert_all_refused(&c, Kind::Envelope, cases, &context).await;

    // After all that, the real envelope still opens to the same key.
    let back = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    assert_eq!(back.plaintext, key);
    assert_eq!(d.client().await.health().await.unwrap().status, "ok");
    drop(c);
    assert_clean_exit(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_single_byte_change_of_a_ciphertext_is_refused() {
    let d = TestDaemon::start();
    let c = Arc::new(d.client().await);
    c.key_create(&path("acme/pii")).await.unwrap();
    let context = ctx(&["user=42", "table=providers"]);
    let secret = b"sk-live-0123456789";
    let enc = c.encrypt(&path("acme/pii"), secret, &context).await.unwrap();
    let ct: Ciphertext = enc.ciphertext.parse().unwrap();
    let bytes = ct.to_bytes();
    let env_len = ct.envelope().to_bytes().len();
    // Preamble (5), envelope length (2), envelope, payload nonce, payload.
    let layout = envelope_layout(ct.envelope(), 7);
    let t = ct.envelope().path().tenant().len();
    let structure = [0..7, 7 + 5..7 + 6, 7 + 6 + t..7 + 7 + t];
    assert_eq!(bytes.len(), 7 + env_len + NONCE_LEN + secret.len() + TAG_LEN);

    let back = c.decrypt(&Kind::Ciphertext.text(&bytes), &context).await.unwrap();
    assert_eq!(back.plaintext.expose(), secret);

    let cases = single_byte_changes(Kind::Ciphertext, &bytes, &layout, &structure);
    let codes = assert_all_refused(&c, Kind::Ciphertext, cases, &context).await;
    for code in ["bad_envelope", "integrity", "not_found"] {
        assert!(codes.get(code).copied().unwrap_or(0) > 0, "no {code} among {codes:?}");
    }

    // Every truncation: while the header and a tag's worth of payload are
    // incomplete it does not parse; after that it does not authenticate.
    let shortest = 7 + env_len + NONCE_LEN + TAG_LEN;
    let mut cases: Vec<Case> = (0..bytes.len())
        .map(|n| Case {
            what: format!("ciphertext truncated to {n} bytes"),
            text: Kind::Ciphertext.text(&bytes[..n]),
            allowed: if n < shortest { &[ErrorCode::BadEnvelope] } else { &[ErrorCode::Integrity] },
        })
        .collect();
    for extra in [0x00, 0x01, 0xFF] {
        let mut long = bytes.clone();
        long.push(extra);
        cases.push(Case {
            what: format!("ciphertext with {extra:#04x} appended"),
            text: Kind::Ciphertext.text(&long),
            allowed: &[ErrorCode::Integrity],
        });
    }
    assert_all_refused(&c, Kind::Ciphertext, cases, &context).await;

    let back = c.decrypt(&enc.ciphertext, &context).await.unwrap();
    assert_eq!(back.plaintext.expose(), secret);
    assert_eq!(d.client().await.health().await.unwrap().status, "ok");
    drop(c);
    assert_clean_exit(d);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flip_to_a_key_version_that_does_not_exist_is_not_found_naming_it() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let context = ctx(&["user=42"]);
    let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    let enc = c.encrypt(&path("acme/pii"), b"secret", &context).await.unwrap();
    assert_eq!((dk.key_version, enc.key_version), (1, 1));

    let env: Envelope = dk.envelope.parse().unwrap();
    let at = envelope_layout(&env, 0).version.start;
    // (byte of the big-endian version, mask, resulting version)
    for (byte, mask, version) in [(3, 0x02, 3u32), (3, 0x03, 2), (0, 0x80, 0x8000_0001), (2, 0x01, 257)] {
        let mut b = env.to_bytes();
        b[at + byte] ^= mask;
        let altered = Envelope::from_bytes(&b).expect("still parses");
        assert_eq!(altered.key_version(), version);
        let e = c.datakey_decrypt(&altered.to_string(), &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "version {version}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("acme/pii") && msg.contains(&format!("version {version}")), "{msg}");

        let ct: Ciphertext = enc.ciphertext.parse().unwrap();
        let mut b = ct.to_bytes();
        b[7 + at + byte] ^= mask;
        let altered = Ciphertext::from_bytes(&b).expect("still parses");
        assert_eq!(altered.envelope().key_version(), version);
        let e = c.decrypt(&altered.to_string(), &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "version {version}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("acme/pii") && msg.contains(&format!("version {version}")), "{msg}");
    }

    // Version 0 is not a version at all: the envelope does not parse.
    let mut b = env.to_bytes();
    b[at + 3] ^= 0x01;
    let e = c.datakey_decrypt(&Kind::Envelope.text(&b), &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadEnvelope), "{e}");

    drop(c);
    assert_clean_exit(d);
}
