//! What a database writer could put in PostgreSQL's rows (docs/CLUSTER.md):
//! records of `meta`, `keyring` and `revocations`, decoded as the store
//! decodes them when it reads or catches up on a row, a key record run
//! through what the daemon computes from one it serves; the rows hashed
//! into the state digest (store/state.rs) loaded at once and write by
//! write; and the token's anchor texts. Damage is a typed error
//! (`StoreError::Corrupt`), never a panic; whatever decodes is written
//! back as the same record; both ways of hashing give one digest.
//!
//! Input: rows separated by 0xFF (never in UTF-8 text); a row is a byte
//! choosing the table, then the key, a NUL, and the record's text.
#![no_main]

use keyhavend::fuzzing::{postgres_row, Row};
use keyhavend::store::state::{AnchorState, StateDigest};
use keyhavend::store::StoreError;
use libfuzzer_sys::fuzz_target;

const TREES: [&str; 3] = ["meta", "keyring", "revocations"];

fuzz_target!(|data: &[u8]| {
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for part in data.split(|b| *b == 0xFF).take(16) {
        let Some((&t, rest)) = part.split_first() else { continue };
        let tree = TREES[usize::from(t) % TREES.len()];
        let (key, text) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&rest[..0], rest),
        };
        let (Ok(key), Ok(text)) = (std::str::from_utf8(key), std::str::from_utf8(text)) else { continue };
        rows.push((tree, key, text));
        match postgres_row(tree, key, text) {
            Ok(row) => written_back_the_same(tree, key, &row),
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("a row that does not decode gave {e:?}, not Corrupt"),
        }
        for anchor in [text, key] {
            if let Ok(a) = AnchorState::decode(anchor) {
                assert_eq!(AnchorState::decode(&a.encode()).unwrap(), a);
            }
            if let Ok(a) = keyhavend::audit::AuditAnchor::decode(anchor) {
                assert_eq!(keyhavend::audit::AuditAnchor::decode(&a.encode()).unwrap(), a);
            }
        }
    }
    // The digest of the rows loaded at once (a start, a reload) and set one
    // by one (writes, catching up), predicted before each write.
    if rows.is_empty() {
        return;
    }
    // The empty digest, made once (256 bucket hashes and the top).
    static EMPTY: std::sync::OnceLock<(StateDigest, [u8; 32])> = std::sync::OnceLock::new();
    let (empty, empty_digest) = EMPTY.get_or_init(|| {
        let d = StateDigest::default();
        let top = d.digest();
        (d, top)
    });
    let mut loaded = empty.clone();
    let mut latest = std::collections::BTreeMap::new();
    for (tree, key, text) in &rows {
        loaded.load(tree, key.as_bytes(), text.as_bytes());
        latest.insert((*tree, *key), *text);
    }
    loaded.finish_load();
    let mut written = empty.clone();
    for (tree, key, text) in &rows {
        let predicted = written.with(tree, key.as_bytes(), Some(text.as_bytes()));
        written.set(tree, key.as_bytes(), Some(text.as_bytes()));
        assert_eq!(written.digest(), predicted, "a write's digest is not the one predicted");
        assert!(written.holds(tree, key.as_bytes(), text.as_bytes()));
    }
    assert_eq!(loaded.digest(), written.digest(), "loading and writing the rows give other digests");
    for ((tree, key), text) in &latest {
        assert!(loaded.holds(tree, key.as_bytes(), text.as_bytes()));
    }
    // Removing every row gives the empty store's digest.
    for (tree, key) in latest.keys() {
        written.set(tree, key.as_bytes(), None);
    }
    assert_eq!(&written.digest(), empty_digest);
});

/// What the store writes back for a record it decoded decodes to the same.
fn written_back_the_same(tree: &str, key: &str, row: &Row) {
    let text = match row {
        Row::Meta(m) => serde_json::to_string(m),
        Row::Key(k) => serde_json::to_string(k),
        Row::Revocation(r) => serde_json::to_string(r),
    }
    .expect("a decoded record serialises");
    let again = postgres_row(tree, key, &text).expect("a record written back does not decode");
    match (row, &again) {
        (Row::Meta(a), Row::Meta(b)) => assert_eq!(a, b),
        (Row::Revocation(a), Row::Revocation(b)) => assert_eq!(a, b),
        (Row::Key(a), Row::Key(b)) => {
            assert_eq!(serde_json::to_string(a).unwrap(), serde_json::to_string(b).unwrap())
        }
        _ => panic!("a record written back decodes as another kind"),
    }
}
