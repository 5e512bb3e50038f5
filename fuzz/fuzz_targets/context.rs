//! Encryption contexts from JSON (ENVELOPE.md §4): a context that parses and
//! validates encodes canonically, and reading its JSON back gives the same.
#![no_main]

use keyhaven::context::EncryptionContext;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ctx) = serde_json::from_slice::<EncryptionContext>(data) else { return };
    if ctx.validate().is_err() {
        return;
    }
    let mut canonical = Vec::new();
    ctx.encode(&mut canonical);
    let again: EncryptionContext = serde_json::from_str(&serde_json::to_string(&ctx).unwrap()).unwrap();
    let mut twice = Vec::new();
    again.encode(&mut twice);
    assert_eq!(canonical, twice, "a context's canonical encoding depends on how it was written");
    let keys: Vec<&str> = ctx.keys().collect();
    assert!(keys.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()), "context keys out of byte order");
});
