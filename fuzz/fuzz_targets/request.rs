//! A request frame's body, arbitrary bytes, through what the daemon does
//! with it before anything needs its state (PROTOCOL.md §1, §2.1): the
//! frame parsed, the operation found, its params parsed into the
//! operation's own type, the names in them checked and the policy asked
//! (POLICY.md; `keyhavend::fuzzing::FUZZ_POLICY`: user `fuzz` may encrypt
//! and decrypt under `acme/*`, nothing else). Every refusal is one answer
//! frame of valid JSON: `id` and `error` only, a known code, a message that
//! quotes no `plaintext`, and the id PROTOCOL.md §1 says. The policy
//! allows exactly what its one rule grants: never another permission,
//! tenant or a request without names, and always `acme`'s keys for
//! encrypt and decrypt.
#![no_main]

use keyhaven::ErrorCode;
use keyhavend::fuzzing::{echoed_id, request, Request};
use keyhavend::policy::{Access, Permission};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    // What PROTOCOL.md §1 lets the answer's id be, from an independent
    // parse: `null` unless the body is JSON text holding an object whose
    // `id` is an unsigned integer (`null` too for an `id` given twice,
    // which this parse, keeping the last, cannot see).
    // (A number too big for a double is JSON text too: then only its
    // well-formedness is checked.)
    let text = std::str::from_utf8(body).ok();
    let well_formed =
        text.is_some_and(|s| serde_json::from_str::<Box<serde_json::value::RawValue>>(s).is_ok());
    let parsed: Option<Value> = text.and_then(|s| serde_json::from_str(s).ok());
    let echoed = echoed_id(body);
    if echoed.is_some() {
        assert!(well_formed, "echoed an id for a body that is not JSON text");
        if let Some(v) = &parsed {
            assert_eq!(echoed, v.get("id").and_then(Value::as_u64), "echoed an id the body does not hold");
        }
    }
    match request(body) {
        Request::Parsed { id, op, access, allowed } => {
            // A request the daemon runs is an object with that one id and op.
            assert_eq!(echoed, Some(id), "a parsed request's id is not the one §1 echoes");
            assert!(well_formed, "a request run from a body that is not JSON text");
            if let Some(v) = &parsed {
                assert_eq!(v.get("op").and_then(Value::as_str), Some(op.as_str()));
                assert!(v.as_object().unwrap().keys().all(|k| ["id", "op", "params"].contains(&k.as_str())));
            }
            let Access::Needs(permission) = access else {
                assert!(allowed.is_none(), "an open operation was put to the policy");
                return;
            };
            let allowed = allowed.expect("an operation that needs a permission was not put to the policy");
            let params = parsed.as_ref().and_then(|v| v.get("params"));
            let name = |field: &str| params.and_then(|p| p.get(field)).and_then(Value::as_str);
            let granted = matches!(permission, Permission::Encrypt | Permission::Decrypt);
            match (name("tenant"), name("key")) {
                // The rule's own keys: granted exactly for its two operations.
                (Some("acme"), Some(_)) => assert_eq!(allowed, granted, "{op} on acme's key: {permission:?}"),
                // Anything else (another tenant, a whole tenant, every key): never.
                (tenant, key) => {
                    assert!(!allowed || tenant == Some("acme"), "{op} allowed on {tenant:?}/{key:?}");
                }
            }
        }
        Request::Refused(frame) => {
            assert!(frame.len() >= 4, "an answer without a length prefix");
            let n = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(n, frame.len() - 4, "the length prefix is not the body's length");
            assert!(n <= keyhaven::frame::MAX_FRAME_LEN, "an answer over the frame limit");
            let answer: Value = serde_json::from_slice(&frame[4..]).expect("an answer that is not JSON");
            let answer = answer.as_object().expect("an answer that is not an object");
            let mut keys: Vec<&str> = answer.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["error", "id"], "an answer with other fields than id and error");
            let id = &answer["id"];
            // The id: the request's when the body is a request whose op or
            // params are refused, else the one §1 gives; never another.
            match id.as_u64() {
                Some(n) => assert_eq!(Some(n), echoed, "answered with an id §1 does not give"),
                None => assert!(id.is_null() && echoed.is_none(), "id {id} for echoed {echoed:?}"),
            }
            let error = answer["error"].as_object().expect("`error` is not an object");
            let code: ErrorCode =
                serde_json::from_value(error["code"].clone()).expect("a code that is not a string");
            assert!(
                matches!(code, ErrorCode::BadRequest | ErrorCode::UnknownOperation),
                "refused before the handler with {code:?}"
            );
            let message = error["message"].as_str().expect("a message that is not a string");
            // A secret the request carries is not repeated to the log or the
            // client: the message quotes no `plaintext` value (checked
            // against the message for the same body with that value
            // blanked out, which has whatever the message says anyway).
            if let Some(p) = parsed
                .as_ref()
                .and_then(|v| v.get("params"))
                .and_then(|p| p.get("plaintext"))
                .and_then(Value::as_str)
                .filter(|p| p.len() >= 6 && message.contains(*p))
            {
                // Every value spelt as serde_json spells it (after a `:`).
                let raw = serde_json::to_string(p).unwrap();
                let mut blanked = body.to_vec();
                let mut at = 0;
                while let Some(i) = find(&body[at..], raw.as_bytes()).map(|i| i + at) {
                    if body[..i].iter().rev().find(|c| !c.is_ascii_whitespace()) == Some(&b':') {
                        blanked[i + 1..i + raw.len() - 1].fill(b'Q');
                    }
                    at = i + 1;
                }
                if let Request::Refused(frame) = request(&blanked) {
                    let other: Value = serde_json::from_slice(&frame[4..]).unwrap();
                    let other = other["error"]["message"].as_str().unwrap_or_default();
                    assert!(other.contains(p), "the message quotes the plaintext: {message}");
                }
            }
        }
    }
});

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
