//! The language-neutral vectors of tests/conformance/vectors.json, which an
//! independent generator (tests/conformance/generate.py, Python
//! `cryptography` only) wrote and which the Node.js and Python packages run
//! too: contexts, envelopes, sealed records, sealed streams and `khm1:` MAC
//! tags, each with the failure class a bad one must get. No daemon: the
//! vectors carry their data keys.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use keyhaven::seal::{self, ChunkCipher, DataKey, SealedRecord, StreamHeader};
use keyhaven::{EncryptionContext, Envelope, Error, MacTag};
use serde_json::Value;

fn vectors() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/vectors.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read vectors.json"))
        .expect("parse vectors.json")
}

fn hex(s: &Value) -> Vec<u8> {
    let s = s.as_str().expect("a hex string");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn name(v: &Value) -> &str {
    v["name"].as_str().unwrap_or("?")
}

fn context(pairs: &Value) -> Result<EncryptionContext, Error> {
    let mut ctx = EncryptionContext::new();
    for p in pairs.as_array().expect("pairs") {
        ctx.insert(p[0].as_str().expect("key"), p[1].as_str().expect("value"))?;
    }
    Ok(ctx)
}

/// The wire code a failure maps to (PROTOCOL.md §4).
fn class(e: &Error) -> &'static str {
    match e {
        Error::Envelope(_) => "bad_envelope",
        Error::Integrity(_) => "integrity",
        Error::InvalidContext(_) => "bad_request",
        other => panic!("unexpected error class: {other}"),
    }
}

#[test]
fn contexts_encode_canonically_and_bad_ones_are_refused() {
    let v = vectors();
    for c in v["contexts"].as_array().unwrap() {
        let mut out = Vec::new();
        context(&c["pairs"]).unwrap_or_else(|e| panic!("{}: {e}", name(c))).encode(&mut out);
        assert_eq!(to_hex(&out), c["encoded"].as_str().unwrap(), "{}", name(c));
    }
    for c in v["bad_contexts"].as_array().unwrap() {
        let e = context(&c["pairs"]).expect_err(name(c));
        assert_eq!(class(&e), "bad_request", "{}", name(c));
    }
}

#[test]
fn envelopes_parse_to_their_fields_and_bad_ones_are_bad_envelope() {
    let v = vectors();
    for e in v["envelopes"].as_array().unwrap() {
        let env: Envelope =
            e["text"].as_str().unwrap().parse().unwrap_or_else(|x| panic!("{}: {x}", name(e)));
        assert_eq!(env.path().tenant(), e["tenant"].as_str().unwrap(), "{}", name(e));
        assert_eq!(env.path().key(), e["key"].as_str().unwrap(), "{}", name(e));
        assert_eq!(u64::from(env.key_version()), e["version"].as_u64().unwrap(), "{}", name(e));
        assert_eq!(env.id().to_string(), e["id"].as_str().unwrap(), "{}", name(e));
    }
    for e in v["bad_envelopes"].as_array().unwrap() {
        let err = e["text"].as_str().unwrap().parse::<Envelope>().expect_err(name(e));
        assert_eq!(class(&err), "bad_envelope", "{}: {err}", name(e));
    }
}

#[test]
fn records_open_and_bad_ones_get_their_class() {
    let v = vectors();
    for r in v["records"].as_array().unwrap() {
        let key = DataKey::new(&hex(&r["dek"])).unwrap();
        let ctx = context(&r["context"]).unwrap();
        let bytes = seal::sealed_from_text(r["text"].as_str().unwrap()).unwrap();
        let rec = SealedRecord::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", name(r)));
        assert_eq!(rec.envelope().to_string(), r["envelope"].as_str().unwrap(), "{}", name(r));
        assert_eq!(to_hex(&rec.open(&key, &ctx).unwrap()), r["plaintext"].as_str().unwrap(), "{}", name(r));
        // What this crate seals (random nonce) opens under the same key and context.
        let again = seal::seal_record(&key, &rec.envelope().to_bytes(), &ctx, &hex(&r["plaintext"])).unwrap();
        assert_eq!(
            to_hex(&SealedRecord::parse(&again).unwrap().open(&key, &ctx).unwrap()),
            r["plaintext"].as_str().unwrap()
        );
    }
    let key = DataKey::new(&hex(&v["records"][0]["dek"])).unwrap();
    for r in v["bad_records"].as_array().unwrap() {
        let ctx = context(&r["context"]).unwrap();
        let got = seal::sealed_from_text(r["text"].as_str().unwrap())
            .and_then(|b| SealedRecord::parse(&b).and_then(|rec| rec.open(&key, &ctx)).map(|_| ()));
        let err = got.expect_err(name(r));
        assert_eq!(class(&err), r["error"].as_str().unwrap(), "{}: {err}", name(r));
    }
}

fn open_stream(dek: &[u8], stream: &[u8], ctx: &EncryptionContext) -> Result<Vec<u8>, Error> {
    let mut input = Cursor::new(stream);
    let header = StreamHeader::read_from(&mut input)?;
    let mut cipher = ChunkCipher::new(Arc::new(DataKey::new(dek)?), &header, ctx)?;
    let mut out = Vec::new();
    seal::open_stream(&mut cipher, &header, &mut input, &mut out)?;
    Ok(out)
}

#[test]
fn streams_seal_byte_for_byte_open_and_bad_ones_are_refused() {
    let v = vectors();
    for s in v["streams"].as_array().unwrap() {
        let dek = hex(&s["dek"]);
        let ctx = context(&s["context"]).unwrap();
        let env: Envelope = s["envelope"].as_str().unwrap().parse().unwrap();
        let chunk = u32::try_from(s["chunk_size"].as_u64().unwrap()).unwrap();
        let header = StreamHeader::new(&env, chunk).unwrap();
        let mut cipher = ChunkCipher::new(Arc::new(DataKey::new(&dek).unwrap()), &header, &ctx).unwrap();
        let mut out = Vec::new();
        seal::seal_stream(&mut cipher, &header, &mut Cursor::new(hex(&s["plaintext"])), &mut out).unwrap();
        assert_eq!(to_hex(&out), s["stream"].as_str().unwrap(), "{}", name(s));
        let opened =
            open_stream(&dek, &hex(&s["stream"]), &ctx).unwrap_or_else(|e| panic!("{}: {e}", name(s)));
        assert_eq!(to_hex(&opened), s["plaintext"].as_str().unwrap(), "{}", name(s));
    }
    let dek = hex(&v["streams"][0]["dek"]);
    for s in v["bad_streams"].as_array().unwrap() {
        let ctx = context(&s["context"]).unwrap();
        let err = open_stream(&dek, &hex(&s["stream"]), &ctx).expect_err(name(s));
        assert_eq!(class(&err), s["error"].as_str().unwrap(), "{}: {err}", name(s));
    }
}

#[test]
fn mac_tags_parse_to_their_fields_and_bad_ones_are_refused() {
    let v = vectors();
    for t in v["mac_tags"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let tag: MacTag = text.parse().unwrap_or_else(|e| panic!("{}: {e}", name(t)));
        assert_eq!(u64::from(tag.version), t["version"].as_u64().unwrap(), "{}", name(t));
        assert_eq!(to_hex(&tag.mac), t["mac"].as_str().unwrap(), "{}", name(t));
        assert_eq!(tag.to_string(), text.trim(), "{}", name(t));
    }
    // The vectors say `bad_request`, what `mac_verify` answers for such a tag
    // (the daemon parses it with this crate); the crate's own parser reports
    // a malformed tag as `Error::Envelope`.
    for t in v["bad_mac_tags"].as_array().unwrap() {
        let err = t["text"].as_str().unwrap().parse::<MacTag>().expect_err(name(t));
        assert_eq!(class(&err), "bad_envelope", "{}: {err}", name(t));
    }
}
