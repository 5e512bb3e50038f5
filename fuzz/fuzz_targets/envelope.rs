//! Envelopes and ciphertexts, binary and text forms (ENVELOPE.md §3, §6):
//! whatever parses must be in canonical form, so that one value has one
//! encoding (re-encoding gives the input back).
#![no_main]

use std::str::FromStr;

use keyhaven::envelope::{Ciphertext, Envelope, EnvelopeId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Envelope::from_bytes(data) {
        assert_eq!(e.to_bytes(), data, "an envelope parsed from a non-canonical encoding");
        assert_eq!(Envelope::from_str(&e.to_string()).unwrap(), e);
    }
    if let Ok(c) = Ciphertext::from_bytes(data) {
        assert_eq!(c.to_bytes(), data, "a ciphertext parsed from a non-canonical encoding");
        assert_eq!(Ciphertext::from_str(&c.to_string()).unwrap(), c);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(e) = Envelope::from_str(text) {
            assert_eq!(e.to_string(), text.trim(), "an envelope text form that is not canonical");
        }
        if let Ok(c) = Ciphertext::from_str(text) {
            assert_eq!(c.to_string(), text.trim(), "a ciphertext text form that is not canonical");
        }
        if let Ok(id) = EnvelopeId::from_str(text) {
            assert_eq!(id.to_string(), text, "an envelope id that is not canonical");
        }
    }
});
