//! Sealed records (`khs1:`, ENVELOPE.md §10.5): parsing, the text form, and
//! opening with a key that is not the record's, which must fail cleanly.
#![no_main]

use keyhaven::context::EncryptionContext;
use keyhaven::seal::{sealed_from_text, sealed_to_text, DataKey, SealedRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = SealedRecord::parse(data) {
        assert_eq!(sealed_from_text(&sealed_to_text(data)).unwrap(), data);
        let key = DataKey::new(&[7u8; 32]).unwrap();
        // Only a record made under this key and context could open.
        let _ = record.open(&key, &EncryptionContext::new());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(bytes) = sealed_from_text(text) {
            let _ = SealedRecord::parse(&bytes);
        }
    }
});
