//! Sealed streams (ENVELOPE.md §10.6): the header, then chunks opened with a
//! fixed key. Arbitrary bytes must give an error, never a panic, and no
//! plaintext may be written for a chunk that did not authenticate.
#![no_main]

use std::sync::Arc;

use keyhaven::context::EncryptionContext;
use keyhaven::seal::{open_stream, ChunkCipher, DataKey, StreamHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Ok(header) = StreamHeader::read_from(&mut input) else { return };
    assert!(header.as_bytes().len() <= data.len());
    let key = Arc::new(DataKey::new(&[7u8; 32]).unwrap());
    let Ok(mut cipher) = ChunkCipher::new(key, &header, &EncryptionContext::new()) else { return };
    let mut out = Vec::new();
    if open_stream(&mut cipher, &header, &mut input, &mut out).is_err() {
        // Written before the failure: chunks that authenticated under the
        // fuzzer's key, which arbitrary bytes never do.
        assert!(out.is_empty(), "plaintext written from bytes that never authenticated");
    }
});
