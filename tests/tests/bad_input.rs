//! Bad input on the wire, against the real daemon, token and socket. Frames
//! are written by hand (a u32 big-endian length, then the body) so that the
//! daemon sees exactly what a broken or hostile client would send:
//!
//! - bodies that are not JSON, not a JSON object, or not a request (missing
//!   or mistyped `id` or `op`, unknown or duplicate fields, `params` not an
//!   object), and a zero-length body: `bad_request`, with the request's id
//!   when it has one, else `null` (PROTOCOL.md §1, §2);
//! - unknown operations (`unknown_operation`, the name shortened and
//!   escaped) and protocol versions (`unsupported_protocol`);
//! - mistyped, missing and unknown params, bad encryption contexts, bad
//!   base64 in plaintexts and bad tenant or key names: `bad_request`, with no
//!   secret quoted back; unparsable ciphertexts and envelopes: `bad_envelope`
//!   (ENVELOPE.md §8);
//! - unknown tenants, keys and key versions: `not_found` naming the key;
//!   `encrypt` over 64 KiB: `payload_too_large` pointing to data keys;
//!   creating an existing key: `already_exists`;
//! - a frame announcing more than 1 MiB: `frame_too_large` with id `null`,
//!   requests read before it still answered, then the connection closes;
//! - torn frames and hang-ups: the connection closes without an answer, and
//!   the daemon serves everyone else.
//!
//! After every bad request in a well-formed frame the same connection still
//! answers `health` with the right id; a second, well-behaved client keeps
//! round-tripping through all of it; failed requests change neither the key
//! list nor the store's files; and the daemon logs no panic and exits 0 on
//! SIGTERM. Each test has its own token and daemon.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::time::Duration;

use keyhaven::envelope::{Ciphertext, Envelope, EnvelopeId};
use keyhaven_tests::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The frame limit of PROTOCOL.md §1.
const MAX_FRAME: usize = 1 << 20;
/// How long any single answer may take before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest error message we accept: hostile input must be shortened.
const MAX_MESSAGE: usize = 400;

// ---------------------------------------------------------------------------
// A raw connection
// ---------------------------------------------------------------------------

/// `body` with its length prefix.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A connection that writes frames by hand.
struct Raw {
    stream: UnixStream,
    next_probe: u64,
}

impl Raw {
    async fn connect(d: &TestDaemon) -> Raw {
        let stream = UnixStream::connect(d.socket()).await.expect("connect to the daemon");
        Raw { stream, next_probe: 1_000_000 }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to the daemon");
    }

    async fn send(&mut self, body: &[u8]) {
        self.write(&frame(body)).await;
    }

    /// The next response, or `None` at the end of the stream. A reset counts
    /// as the end: the daemon closes without reading what we sent after an
    /// oversized frame, and a Unix socket may report that as a reset.
    async fn recv_or_end(&mut self) -> Option<Value> {
        let read = async {
            let first = match self.stream.read_u8().await {
                Ok(b) => b,
                Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
                    return None;
                }
                Err(e) => panic!("reading from the daemon: {e}"),
            };
            let mut len = [first, 0, 0, 0];
            self.stream.read_exact(&mut len[1..]).await.expect("a response's length");
            let len = u32::from_be_bytes(len) as usize;
            assert!(len <= MAX_FRAME, "response frame of {len} bytes");
            let mut body = vec![0; len];
            self.stream.read_exact(&mut body).await.expect("a response's body");
            Some(serde_json::from_slice(&body).expect("a response is JSON"))
        };
        tokio::time::timeout(IO_TIMEOUT, read).await.expect("no answer from the daemon within 10 s")
    }

    async fn recv(&mut self) -> Value {
        self.recv_or_end().await.expect("the daemon closed the connection instead of answering")
    }

    /// Asserts that the daemon closes the connection with no (further) answer.
    async fn expect_end(&mut self, what: &str) {
        if let Some(v) = self.recv_or_end().await {
            panic!("{what}: expected the connection to close, got {v}");
        }
    }

    /// Sends one request and waits for its answer.
    async fn call(&mut self, body: &[u8]) -> Value {
        self.send(body).await;
        self.recv().await
    }

    /// Asserts that this connection still answers `health`, with its id.
    async fn assert_usable(&mut self, after: &str) {
        self.next_probe += 1;
        let id = self.next_probe;
        let r = self.call(json!({"id": id, "op": "health"}).to_string().as_bytes()).await;
        assert_eq!(r["id"], id, "after {after}: health answered with the wrong id: {r}");
        assert_eq!(r["ok"]["status"], "ok", "after {after}: health failed: {r}");
    }
}

// ---------------------------------------------------------------------------
// Bad requests and the answers they must get
// ---------------------------------------------------------------------------

/// One bad request in a well-formed frame, and its expected error.
struct Bad {
    what: String,
    body: Vec<u8>,
    /// The `id` the error must carry.
    id: Option<u64>,
    code: &'static str,
    /// Each must occur in the message: it names the problem.
    needles: Vec<String>,
    /// None may occur in the message (secrets, raw control characters).
    absent: Vec<String>,
}

impl Bad {
    /// A hand-written body.
    fn raw(
        what: &str,
        body: impl Into<Vec<u8>>,
        id: Option<u64>,
        code: &'static str,
        needles: &[&str],
    ) -> Bad {
        Bad {
            what: what.to_owned(),
            body: body.into(),
            id,
            code,
            needles: needles.iter().map(|s| s.to_string()).collect(),
            absent: Vec::new(),
        }
    }

    /// A well-formed request frame for `op` with `params`.
    fn op(id: u64, op: &str, params: Value, code: &'static str, needles: &[&str]) -> Bad {
        let body = json!({"id": id, "op": op, "params": params}).to_string();
        let mut what = format!("{op} {params}");
        if what.len() > 120 {
            what = format!("{}…", &what[..what.char_indices().nth(120).map_or(what.len(), |(i, _)| i)]);
        }
        Bad::raw(&what, body, Some(id), code, needles)
    }

    fn never(mut self, absent: &[&str]) -> Bad {
        self.absent.extend(absent.iter().map(|s| s.to_string()));
        self
    }

    /// What is wrong with the daemon's answer: it must be exactly
    /// `{"id": .., "error": {"code": .., "message": ..}}` with the expected
    /// id and code, and a message that names the problem, quotes no secret,
    /// and holds hostile input only shortened and escaped.
    fn problems(&self, resp: &Value) -> Vec<String> {
        let mut out = Vec::new();
        let fields = |v: &Value| {
            let mut f: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            f.sort_unstable();
            f
        };
        if fields(resp) != ["error", "id"] {
            out.push("the answer is not {\"id\", \"error\"}".to_owned());
        }
        if resp["id"] != json!(self.id) {
            out.push(format!("id {} instead of {}", resp["id"], json!(self.id)));
        }
        if fields(&resp["error"]) != ["code", "message"] {
            out.push("`error` is not {\"code\", \"message\"}".to_owned());
        }
        if resp["error"]["code"] != self.code {
            out.push(format!("code {} instead of {}", resp["error"]["code"], self.code));
        }
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        for needle in &self.needles {
            if !message.contains(needle.as_str()) {
                out.push(format!("`{needle}` is not in the message"));
            }
        }
        for bad in &self.absent {
            if message.contains(bad.as_str()) {
                out.push(format!("`{bad}` is in the message"));
            }
        }
        if message.len() > MAX_MESSAGE {
            out.push(format!("message of {} bytes", message.len()));
        }
        if message.chars().any(char::is_control) {
            out.push("raw control character in the message".to_owned());
        }
        out
    }

    /// Asserts that the answer is right.
    fn check(&self, resp: &Value) {
        let problems = self.problems(resp);
        assert!(problems.is_empty(), "{}: {}\nanswer: {resp}", self.what, problems.join("; "));
    }
}

/// Sends `case` on `raw`, checks the error, then checks that the connection
/// still answers.
async fn run(raw: &mut Raw, case: &Bad) {
    let resp = raw.call(&case.body).await;
    case.check(&resp);
    raw.assert_usable(&case.what).await;
}

/// Frames that are not requests at all (PROTOCOL.md §1, §2.1).
fn frame_cases() -> Vec<Bad> {
    let br = "bad_request";
    let malformed = &["malformed request"][..];
    let object = &["malformed request", "JSON object"][..];
    vec![
        Bad::raw("zero-length body", "", None, br, object),
        Bad::raw("whitespace only", " \n\t ", None, br, object),
        Bad::raw("not JSON", "hello daemon", None, br, object),
        Bad::raw("not JSON inside braces", "{not json}", None, br, malformed),
        Bad::raw("truncated JSON", r#"{"id":1,"op":"health""#, None, br, malformed),
        Bad::raw("trailing garbage", r#"{"id":1,"op":"health"} x"#, None, br, malformed),
        Bad::raw(
            "a lone surrogate in a context value",
            r#"{"id":7,"op":"encrypt","params":{"tenant":"a","key":"b","plaintext":"","context":{"k":"\ud800"}}}"#,
            Some(7),
            br,
            &["lone UTF-16 surrogate"],
        ),
        Bad::raw(
            "two objects in one frame",
            r#"{"id":1,"op":"health"}{"id":2,"op":"health"}"#,
            None,
            br,
            malformed,
        ),
        Bad::raw("invalid UTF-8", &b"{\"op\":\"he\xffalth\"}"[..], None, br, malformed),
        Bad::raw("JSON array", r#"[1,"health",{}]"#, None, br, object),
        Bad::raw("array after whitespace", " \n[{\"id\":1,\"op\":\"health\"}]", None, br, object),
        Bad::raw("JSON number", "42", None, br, object),
        Bad::raw("JSON string", r#""health""#, None, br, object),
        Bad::raw("JSON null", "null", None, br, object),
        Bad::raw("JSON true", "true", None, br, object),
        Bad::raw("missing id", r#"{"op":"health"}"#, None, br, &["missing field `id`"]),
        Bad::raw("id as string", r#"{"id":"7","op":"health"}"#, None, br, &["malformed request", "u64"]),
        Bad::raw("negative id", r#"{"id":-1,"op":"health"}"#, None, br, &["malformed request", "-1"]),
        Bad::raw("fractional id", r#"{"id":1.5,"op":"health"}"#, None, br, &["malformed request", "1.5"]),
        Bad::raw("id over 2^64-1", r#"{"id":18446744073709551616,"op":"health"}"#, None, br, malformed),
        Bad::raw("id null", r#"{"id":null,"op":"health"}"#, None, br, malformed),
        Bad::raw("missing op", r#"{"id":5}"#, Some(5), br, &["missing field `op`"]),
        Bad::raw("op as number", r#"{"id":6,"op":7}"#, Some(6), br, &["malformed request", "integer `7`"]),
        Bad::raw("op null", r#"{"id":7,"op":null}"#, Some(7), br, &["malformed request", "null"]),
        Bad::raw("op as object", r#"{"id":8,"op":{"name":"health"}}"#, Some(8), br, &["malformed request"]),
        Bad::raw(
            "unknown top-level field",
            r#"{"id":9,"op":"health","tenant":"acme"}"#,
            Some(9),
            br,
            &["unknown field `tenant`"],
        ),
        Bad::raw(
            "duplicate op",
            r#"{"id":10,"op":"health","op":"hello"}"#,
            Some(10),
            br,
            &["duplicate field `op`"],
        ),
        Bad::raw(
            "duplicate params",
            r#"{"id":10,"op":"health","params":{},"params":{}}"#,
            Some(10),
            br,
            &["duplicate field `params`"],
        ),
        Bad::raw(
            "a parameter twice",
            r#"{"id":10,"op":"key_create","params":{"tenant":"acme","key":"x","key":"y"}}"#,
            Some(10),
            br,
            &["params of `key_create`", "duplicate field `key`"],
        ),
        Bad::raw(
            "params an array",
            r#"{"id":11,"op":"health","params":[]}"#,
            Some(11),
            br,
            &["`params` must be a JSON object"],
        ),
        Bad::raw(
            "params a number",
            r#"{"id":12,"op":"health","params":5}"#,
            Some(12),
            br,
            &["`params` must be a JSON object"],
        ),
        Bad::raw(
            "params a string",
            r#"{"id":13,"op":"key_list","params":"acme"}"#,
            Some(13),
            br,
            &["`params` must be a JSON object"],
        ),
        Bad::raw(
            "params true",
            r#"{"id":14,"op":"health","params":true}"#,
            Some(14),
            br,
            &["`params` must be a JSON object"],
        ),
        Bad::raw(
            "largest id echoed",
            r#"{"id":18446744073709551615,"op":"health","x":1}"#,
            Some(u64::MAX),
            br,
            &["unknown field `x`"],
        ),
    ]
}

/// Unknown operations and protocol versions (PROTOCOL.md §2.1, §3.1).
fn op_cases() -> Vec<Bad> {
    let long = "x".repeat(5000);
    vec![
        Bad::op(20, "frobnicate", json!({}), "unknown_operation", &["unknown operation `frobnicate`"]),
        Bad::op(21, "", json!({}), "unknown_operation", &["unknown operation ``"]),
        Bad::op(22, "HEALTH", json!({}), "unknown_operation", &["`HEALTH`"]),
        Bad::op(
            23,
            "key_delete",
            json!({"tenant": "acme", "key": "pii"}),
            "unknown_operation",
            &["`key_delete`"],
        ),
        Bad::op(24, "frobnicate", json!({"bogus": [1, 2]}), "unknown_operation", &["`frobnicate`"]),
        Bad::op(25, &long, json!({}), "unknown_operation", &["unknown operation `xxxx", "…"]),
        Bad::op(26, "evil\n\u{1b}[31mred", json!({}), "unknown_operation", &["evil\\n"]),
        Bad::op(
            27,
            "hello",
            json!({"protocol": 2}),
            "unsupported_protocol",
            &["protocol version 2", "version 1"],
        ),
        Bad::op(28, "hello", json!({"protocol": 0}), "unsupported_protocol", &["protocol version 0"]),
        Bad::op(29, "hello", json!({"protocol": "1"}), "bad_request", &["params of `hello`", "invalid type"]),
        Bad::op(30, "hello", json!({"protocol": -1}), "bad_request", &["params of `hello`", "-1"]),
        Bad::op(31, "hello", json!({}), "bad_request", &["params of `hello`", "missing field `protocol`"]),
        Bad::op(32, "hello", json!({"protocol": 1, "extra": 1}), "bad_request", &["unknown field `extra`"]),
        Bad::op(
            33,
            "health",
            json!({"verbose": true}),
            "bad_request",
            &["params of `health`", "unknown field `verbose`"],
        ),
    ]
}

/// Mistyped, missing and unknown params; bad encryption contexts.
fn param_cases() -> Vec<Bad> {
    let br = "bad_request";
    let p = "aGk="; // "hi"
    let many: serde_json::Map<String, Value> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let long_value = "s3cr3t".repeat(171); // 1026 bytes
    vec![
        Bad::op(
            40,
            "key_create",
            json!({"tenant": 5, "key": "pii"}),
            br,
            &["params of `key_create`", "invalid type: integer `5`"],
        ),
        Bad::op(
            41,
            "key_create",
            json!({"tenant": "acme"}),
            br,
            &["params of `key_create`", "missing field `key`"],
        ),
        Bad::op(
            42,
            "key_create",
            json!({"tenant": "acme", "key": "new", "version": 2}),
            br,
            &["unknown field `version`"],
        ),
        Bad::op(43, "key_list", json!({"tenant": 7}), br, &["params of `key_list`", "invalid type"]),
        Bad::op(44, "key_list", json!({"tenant": ["acme"]}), br, &["params of `key_list`", "invalid type"]),
        Bad::op(
            45,
            "encrypt",
            json!({"tenant": 1, "key": "pii", "plaintext": p}),
            br,
            &["params of `encrypt`", "invalid type"],
        ),
        Bad::op(
            46,
            "encrypt",
            json!({"tenant": "acme", "key": null, "plaintext": p}),
            br,
            &["params of `encrypt`", "invalid type: null"],
        ),
        Bad::op(
            47,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": 12}),
            br,
            &["params of `encrypt`", "invalid type: integer `12`"],
        ),
        Bad::op(
            48,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": [104, 105]}),
            br,
            &["params of `encrypt`", "invalid type"],
        ),
        Bad::op(
            49,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": {"b64": p}}),
            br,
            &["params of `encrypt`", "invalid type"],
        ),
        Bad::op(50, "encrypt", json!({"tenant": "acme", "key": "pii"}), br, &["missing field `plaintext`"]),
        Bad::op(
            51,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "tenantt": "x"}),
            br,
            &["unknown field `tenantt`"],
        ),
        Bad::op(
            52,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": "user=hunter2"}),
            br,
            &["params of `encrypt`", "invalid type"],
        )
        .never(&["hunter2"]),
        Bad::op(
            53,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": [["user", "42"]]}),
            br,
            &["invalid type"],
        ),
        Bad::op(
            54,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": null}),
            br,
            &["invalid type: null"],
        ),
        Bad::op(
            55,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"user": 42}}),
            br,
            &["invalid type: integer `42`"],
        ),
        Bad::op(
            56,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"user": null}}),
            br,
            &["invalid type: null"],
        ),
        Bad::op(
            57,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"user": {"id": "7"}}}),
            br,
            &["invalid type"],
        ),
        Bad::op(
            58,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"a": "hunter2", "b": true}}),
            br,
            &["invalid type: boolean"],
        )
        .never(&["hunter2"]),
        Bad::op(
            59,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"": "v"}}),
            br,
            &["invalid encryption context", "key of 0 bytes"],
        ),
        Bad::op(
            60,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": many}),
            br,
            &["invalid encryption context", "33 pairs"],
        ),
        Bad::op(
            61,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"user": long_value}}),
            br,
            &["invalid encryption context", "1026 bytes"],
        )
        .never(&["s3cr3t"]),
        Bad::op(
            62,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"k".repeat(129): "v"}}),
            br,
            &["invalid encryption context", "key of 129 bytes"],
        ),
        Bad::op(
            63,
            "datakey",
            json!({"tenant": "acme", "key": "pii", "include_plaintext": "hunter2"}),
            br,
            &["params of `datakey`", "invalid type"],
        )
        .never(&["hunter2"]),
        Bad::op(
            64,
            "datakey",
            json!({"tenant": "acme", "key": "pii", "include_plaintext": 1}),
            br,
            &["invalid type: integer `1`"],
        ),
        Bad::op(
            65,
            "datakey",
            json!({"tenant": "acme", "key": "pii", "context": {"user": 1}}),
            br,
            &["params of `datakey`", "invalid type"],
        ),
        Bad::op(
            66,
            "datakey",
            json!({"tenant": "acme", "key": "pii", "context": {"": "x"}}),
            br,
            &["invalid encryption context"],
        ),
        Bad::op(
            67,
            "decrypt",
            json!({"ciphertext": 5}),
            br,
            &["params of `decrypt`", "invalid type: integer `5`"],
        ),
        Bad::op(68, "decrypt", json!({}), br, &["missing field `ciphertext`"]),
        Bad::op(
            69,
            "decrypt",
            json!({"ciphertext": "khc1:AAAA", "tenant": "acme"}),
            br,
            &["unknown field `tenant`"],
        ),
        Bad::op(70, "decrypt", json!({"ciphertext": "khc1:AAAA", "context": "x"}), br, &["invalid type"]),
        Bad::op(
            71,
            "datakey_decrypt",
            json!({"envelope": {"tenant": "acme"}}),
            br,
            &["params of `datakey_decrypt`", "invalid type"],
        ),
        Bad::op(72, "datakey_decrypt", json!({"envelope": null}), br, &["invalid type: null"]),
        // A context naming a key twice is refused, not last-one-wins (ENVELOPE.md §4.1).
        Bad::raw("context key twice (encrypt)", r#"{"id":73,"op":"encrypt","params":{"tenant":"acme","key":"pii","plaintext":"aGk=","context":{"a":"1","a":"hunter2"}}}"#, Some(73), br, &["params of `encrypt`", "context key `a` given twice"]).never(&["hunter2"]),
        Bad::raw("context key twice (decrypt)", format!(r#"{{"id":74,"op":"decrypt","params":{{"ciphertext":"{}","context":{{"u":"1","u":"1"}}}}}}"#, ciphertext_for("acme/pii", 1)), Some(74), br, &["params of `decrypt`", "context key `u` given twice"]),
    ]
}

/// An envelope that parses, for `tenant/key` at `version`, with made-up bytes.
fn envelope_for(key: &str, version: u32) -> Envelope {
    Envelope::new(path(key), version, EnvelopeId([0x11; 16]), [0x22; 12], [0x33; 48])
}

/// A ciphertext that parses, for `tenant/key` at `version`, with made-up bytes.
fn ciphertext_for(key: &str, version: u32) -> String {
    Ciphertext::new(envelope_for(key, version), [0x44; 12], vec![0x55; 23]).to_string()
}

/// Bad base64 in plaintexts (`bad_request`) and ciphertexts or envelopes
/// that do not parse (`bad_envelope`, ENVELOPE.md §8).
fn encoding_cases() -> Vec<Bad> {
    let enc = |id: u64, plaintext: &str| {
        Bad::op(
            id,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": plaintext}),
            "bad_request",
            &["params of `encrypt`", "bad base64"],
        )
    };
    let env = envelope_for("acme/pii", 1).to_string();
    let ct = ciphertext_for("acme/pii", 1);
    let bad_ct = |id: u64, text: &str, needles: &[&str]| {
        Bad::op(id, "decrypt", json!({"ciphertext": text}), "bad_envelope", needles)
    };
    let bad_env = |id: u64, text: &str, needles: &[&str]| {
        Bad::op(id, "datakey_decrypt", json!({"envelope": text}), "bad_envelope", needles)
    };
    vec![
        enc(80, "hunter2!").never(&["hunter2"]),
        enc(81, "aGk"),
        enc(82, "aGl="),
        enc(83, "-_-_"),
        enc(84, "aGk=\n"),
        enc(85, " aGk="),
        enc(86, "aGk=aGk="),
        bad_ct(87, "khc1:!!!!", &["malformed ciphertext", "base64url"]),
        bad_ct(88, &format!("{ct}=="), &["malformed ciphertext", "base64url"]),
        bad_ct(89, "khc1:ab+/cd", &["malformed ciphertext", "base64url"]),
        bad_ct(90, &ct["khc1:".len()..], &["malformed ciphertext", "`khc1:`"]),
        bad_ct(91, "", &["malformed ciphertext", "`khc1:`"]),
        bad_ct(92, &env, &["malformed ciphertext", "`khc1:`"]),
        bad_ct(93, "khc1:AAAA", &["malformed ciphertext"]),
        bad_ct(94, &ct[..ct.len() - 30], &["malformed ciphertext"]),
        bad_env(95, "khe1:***", &["malformed envelope", "base64url"]),
        bad_env(96, &ct, &["malformed envelope", "`khe1:`"]),
        bad_env(97, "", &["malformed envelope", "`khe1:`"]),
        bad_env(98, &format!("{env}AA"), &["malformed envelope"]),
        bad_env(99, &env[..env.len() - 4], &["malformed envelope"]),
    ]
}

/// Tenant and key names that break the rules (ENVELOPE.md §2.3).
fn name_cases() -> Vec<Bad> {
    let br = "bad_request";
    let long = "a".repeat(5000);
    let mut out = Vec::new();
    let mut id = 100;
    let names: Vec<(&str, &str, Vec<&str>)> = vec![
        ("Acme", "pii", vec!["tenant name `Acme`", "lowercase"]),
        ("acme", "", vec!["key name ``", "is empty"]),
        ("", "pii", vec!["tenant name ``", "is empty"]),
        ("acme/pii", "pii", vec!["tenant name `acme/pii`"]),
        ("acme", "pii/x", vec!["key name `pii/x`"]),
        ("acme", "-pii", vec!["key name `-pii`", "must start"]),
        ("acme", "p i", vec!["key name `p i`"]),
        ("acme", "pïi", vec!["key name `p\\u{ef}i`"]),
        ("acme", "a\nb", vec!["key name `a\\nb`"]),
        (&long[..64], "pii", vec!["longer than 63 bytes"]),
        (&long, "pii", vec!["longer than 63 bytes", "…"]),
    ];
    for (tenant, key, needles) in names {
        let p = json!({"tenant": tenant, "key": key});
        out.push(Bad::op(id, "key_create", p.clone(), br, &needles));
        let mut p2 = p.clone();
        p2["plaintext"] = json!("aGk=");
        out.push(Bad::op(id + 1, "encrypt", p2, br, &needles));
        out.push(Bad::op(id + 2, "datakey", p, br, &needles));
        id += 3;
    }
    for (tenant, needle) in
        [("Acme", "tenant name `Acme`"), ("", "tenant name ``"), ("a b", "tenant name `a b`")]
    {
        out.push(Bad::op(id, "key_list", json!({"tenant": tenant}), br, &[needle]));
        id += 1;
    }
    out
}

/// Unknown tenants, keys and versions (`acme/pii` exists at version 1 only).
fn missing_cases() -> Vec<Bad> {
    let nf = "not_found";
    let p = "aGk=";
    vec![
        Bad::op(
            150,
            "encrypt",
            json!({"tenant": "acme", "key": "nope", "plaintext": p}),
            nf,
            &["unknown key `acme/nope`"],
        ),
        Bad::op(
            151,
            "encrypt",
            json!({"tenant": "beta", "key": "pii", "plaintext": p, "context": {"user": "s3cr3t"}}),
            nf,
            &["unknown key `beta/pii`"],
        )
        .never(&["s3cr3t"]),
        Bad::op(152, "datakey", json!({"tenant": "gamma", "key": "pii"}), nf, &["unknown key `gamma/pii`"]),
        Bad::op(
            153,
            "datakey",
            json!({"tenant": "acme", "key": "pii2", "include_plaintext": false}),
            nf,
            &["unknown key `acme/pii2`"],
        ),
        Bad::op(
            154,
            "decrypt",
            json!({"ciphertext": ciphertext_for("beta/pii", 1)}),
            nf,
            &["unknown key `beta/pii`"],
        ),
        Bad::op(
            155,
            "decrypt",
            json!({"ciphertext": ciphertext_for("acme/pii", 3), "context": {"user": "s3cr3t"}}),
            nf,
            &["acme/pii", "version 3"],
        )
        .never(&["s3cr3t"]),
        Bad::op(
            156,
            "datakey_decrypt",
            json!({"envelope": envelope_for("acme/pii", 2).to_string()}),
            nf,
            &["acme/pii", "version 2"],
        ),
        Bad::op(
            157,
            "datakey_decrypt",
            json!({"envelope": envelope_for("beta/smtp", 1).to_string()}),
            nf,
            &["unknown key `beta/smtp`"],
        ),
    ]
}

/// Limits and duplicates (`acme/pii` exists).
fn limit_cases() -> Vec<Bad> {
    use base64::Engine;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0x5a; n]);
    vec![
        Bad::op(
            170,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": b64(65537)}),
            "payload_too_large",
            &["65537 bytes", "65536", "`datakey`"],
        ),
        Bad::op(
            171,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": b64(700_000)}),
            "payload_too_large",
            &["700000 bytes", "`datakey`"],
        ),
        Bad::op(
            172,
            "key_create",
            json!({"tenant": "acme", "key": "pii"}),
            "already_exists",
            &["`acme/pii`", "exists already"],
        ),
    ]
}

fn all_cases() -> Vec<Bad> {
    let mut all = frame_cases();
    all.extend(op_cases());
    all.extend(param_cases());
    all.extend(encoding_cases());
    all.extend(name_cases());
    all.extend(missing_cases());
    all.extend(limit_cases());
    all
}

// ---------------------------------------------------------------------------
// Set-up, the well-behaved client, and the end of a test
// ---------------------------------------------------------------------------

/// A daemon with `acme/pii` (version 1), and a well-behaved client.
async fn setup() -> (TestDaemon, Client) {
    let d = TestDaemon::start();
    let good = d.client().await;
    good.key_create(&path("acme/pii")).await.expect("create acme/pii");
    (d, good)
}

/// The well-behaved client encrypts and decrypts a message of its own.
async fn round_trip(good: &Client, n: usize) {
    let msg = format!("good client message {n}");
    let context = ctx(&[&format!("n={n}")]);
    let enc = good.encrypt(&path("acme/pii"), msg.as_bytes(), &context).await.expect("good encrypt");
    let dec = good.decrypt(&enc.ciphertext, &context).await.expect("good decrypt");
    assert_eq!(dec.plaintext.expose(), msg.as_bytes());
}

/// Stops the daemon with SIGTERM: it must exit 0 and its log hold no panic.
fn finish(d: &mut TestDaemon) {
    let (status, log) = d.stop();
    assert!(status.success(), "keyhavend exited with {status} after SIGTERM:\n{log}");
    assert!(!log.contains("panicked"), "keyhavend panicked:\n{log}");
}

/// Sends a frame announcing more than 1 MiB on a fresh connection: the
/// answer is `frame_too_large` with id `null`, then the connection closes.
async fn oversized(d: &TestDaemon, announced: u32, extra: &[u8]) {
    let mut raw = Raw::connect(d).await;
    let mut bytes = announced.to_be_bytes().to_vec();
    bytes.extend_from_slice(extra);
    raw.write(&bytes).await;
    let resp = raw.recv().await;
    Bad::raw("oversized frame", "", None, "frame_too_large", &[&announced.to_string(), "1048576"])
        .check(&resp);
    raw.expect_end("after frame_too_large").await;
}

/// Tears a frame in its length or its body, then hangs up (the write side,
/// or the whole socket): no answer, and the daemon goes on.
async fn torn(d: &TestDaemon, bytes: &[u8], full_close: bool) {
    let mut raw = Raw::connect(d).await;
    raw.write(bytes).await;
    if full_close {
        drop(raw);
    } else {
        raw.stream.shutdown().await.expect("shut down the write side");
        raw.expect_end("after a torn frame").await;
    }
}

/// A torn frame of each kind.
fn torn_frames() -> Vec<Vec<u8>> {
    let mut body_torn = 100u32.to_be_bytes().to_vec();
    body_torn.extend_from_slice(br#"{"id":1,"o"#);
    vec![vec![0, 0], vec![0, 0, 0], 100u32.to_be_bytes().to_vec(), body_torn]
}

/// The store's files, by path.
/// A keyring record without the usage counts, which the good client's
/// successful decryptions change.
fn without_usage(record: &[u8]) -> Vec<u8> {
    let mut rec: serde_json::Value = serde_json::from_slice(record).unwrap();
    for v in rec["versions"].as_array_mut().unwrap() {
        let v = v.as_object_mut().unwrap();
        for field in ["decryptions", "rewraps", "last_used_at"] {
            v.remove(field);
        }
    }
    serde_json::to_vec(&rec).unwrap()
}

/// Every record of a stopped daemon's store, tree by tree; the audit log
/// (its frames, in the segment files) apart, since every request (failed ones too) is recorded there, and the
/// usage counts apart, since the good client's decryptions count.
type Trees = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

fn store_records(d: &TestDaemon) -> (Trees, usize) {
    let db = sled::open(d.store_dir()).expect("open the stopped store");
    let mut trees = Trees::new();
    let audited = audit_frames(&d.store_dir()).len();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).unwrap();
        let name = String::from_utf8_lossy(&name).into_owned();
        let records = tree
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| (k.to_vec(), if name == "keyring" { without_usage(&v) } else { v.to_vec() }))
            .collect();
        trees.insert(name, records);
    }
    (trees, audited)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn frames_that_are_not_requests_get_bad_request() {
    let (mut d, _good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in frame_cases() {
        run(&mut raw, &case).await;
    }
    // The shapes the same rules allow: omitted or null params, leading
    // whitespace, id 0 and the largest id.
    for (body, id) in [
        (r#"{"id":0,"op":"health"}"#.to_owned(), 0u64),
        (r#"{"id":1,"op":"health","params":null}"#.to_owned(), 1),
        (" \n\t{\"id\":2,\"op\":\"health\",\"params\":{}}".to_owned(), 2),
        (format!(r#"{{"id":{},"op":"hello","params":{{"protocol":1}}}}"#, u64::MAX), u64::MAX),
    ] {
        let r = raw.call(body.as_bytes()).await;
        assert_eq!(r["id"], id, "{body}: {r}");
        assert!(r["ok"].is_object() && r.get("error").is_none(), "{body}: {r}");
    }
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_operations_and_protocol_versions_are_refused() {
    let (mut d, _good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in op_cases() {
        run(&mut raw, &case).await;
    }
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn mistyped_params_and_bad_contexts_get_bad_request() {
    let (mut d, _good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in param_cases() {
        run(&mut raw, &case).await;
    }
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_base64_and_unparsable_envelopes_are_refused() {
    let (mut d, _good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in encoding_cases() {
        run(&mut raw, &case).await;
    }
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_get_bad_request_and_create_nothing() {
    let (mut d, good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in name_cases() {
        run(&mut raw, &case).await;
    }
    let keys = good.key_list(None).await.unwrap();
    let names: Vec<String> = keys.iter().map(|k| format!("{}/{}", k.tenant, k.key)).collect();
    assert_eq!(names, ["acme/pii"]);
    drop(good);
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_keys_get_not_found_naming_the_key() {
    let (mut d, good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    for case in missing_cases() {
        run(&mut raw, &case).await;
    }
    // An unknown tenant simply has no keys.
    let r = raw.call(br#"{"id":160,"op":"key_list","params":{"tenant":"nobody"}}"#).await;
    assert_eq!(r, json!({"id": 160, "ok": {"keys": []}}));
    assert_eq!(good.key_list(None).await.unwrap().len(), 1);
    drop(good);
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn payload_limit_and_existing_keys_change_nothing() {
    let (mut d, good) = setup().await;
    let before = good.key_list(None).await.unwrap();
    let kept = good.encrypt(&path("acme/pii"), b"made before", &ctx(&[])).await.unwrap();
    let mut raw = Raw::connect(&d).await;
    for case in limit_cases() {
        run(&mut raw, &case).await;
    }
    // The limit is inclusive.
    use base64::Engine;
    let exact = base64::engine::general_purpose::STANDARD.encode(vec![0x5a; 65536]);
    let body =
        json!({"id": 180, "op": "encrypt", "params": {"tenant": "acme", "key": "pii", "plaintext": exact}});
    let r = raw.call(body.to_string().as_bytes()).await;
    assert_eq!(r["id"], 180);
    assert!(r["ok"]["ciphertext"].as_str().unwrap().starts_with("khc1:"), "{}", r["error"]);
    // `already_exists` replaced nothing: same list, same KEK.
    assert_eq!(good.key_list(None).await.unwrap(), before);
    let back = good.decrypt(&kept.ciphertext, &ctx(&[])).await.unwrap();
    assert_eq!(back.plaintext.expose(), b"made before");
    drop(good);
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_over_1_mib_is_answered_then_the_connection_closes() {
    let (mut d, good) = setup().await;
    // Exactly 1 MiB is still a frame.
    let mut raw = Raw::connect(&d).await;
    let mut body = br#"{"id":40,"op":"health"}"#.to_vec();
    body.resize(MAX_FRAME, b' ');
    let r = raw.call(&body).await;
    assert_eq!((&r["id"], &r["ok"]["status"]), (&json!(40), &json!("ok")), "{r}");
    // One byte more is not; the body is not read.
    let mut bytes = frame(br#"{"id":41,"op":"health"}"#);
    bytes.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
    raw.write(&bytes).await;
    // The request read before it is still answered (in any order).
    let (a, b) = (raw.recv().await, raw.recv().await);
    let (ok, too_large) = if a["id"] == 41 { (a, b) } else { (b, a) };
    assert_eq!(ok["ok"]["status"], "ok", "{ok}");
    Bad::raw("1 MiB + 1", "", None, "frame_too_large", &["1048577", "1048576"]).check(&too_large);
    raw.expect_end("after frame_too_large").await;
    round_trip(&good, 0).await;

    // Announced lengths far over the limit, with or without some body sent.
    oversized(&d, MAX_FRAME as u32 + 1, b"").await;
    oversized(&d, u32::MAX, b"").await;
    oversized(&d, 64 << 20, &vec![b'{'; 4096]).await;
    round_trip(&good, 1).await;
    let mut fresh = Raw::connect(&d).await;
    fresh.assert_usable("oversized frames on other connections").await;
    drop(good);
    finish(&mut d);
}

#[tokio::test(flavor = "multi_thread")]
async fn torn_frames_and_hang_ups_leave_the_daemon_serving() {
    let (mut d, good) = setup().await;
    for (i, bytes) in torn_frames().iter().enumerate() {
        torn(&d, bytes, false).await;
        torn(&d, bytes, true).await;
        round_trip(&good, i).await;
    }
    // A request read before the torn frame is still answered, then the
    // connection closes with nothing for the torn frame.
    let mut raw = Raw::connect(&d).await;
    let mut bytes = frame(br#"{"id":51,"op":"health"}"#);
    bytes.extend_from_slice(&torn_frames()[3]);
    raw.write(&bytes).await;
    raw.stream.shutdown().await.unwrap();
    let r = raw.recv().await;
    assert_eq!((&r["id"], &r["ok"]["status"]), (&json!(51), &json!("ok")), "{r}");
    raw.expect_end("after a torn frame").await;
    // A client that pipelines requests and hangs up without reading.
    let mut raw = Raw::connect(&d).await;
    let mut bytes = Vec::new();
    for id in 0..50 {
        let req = json!({"id": id, "op": "encrypt", "params": {"tenant": "acme", "key": "pii", "plaintext": "aGk="}});
        bytes.extend(frame(req.to_string().as_bytes()));
    }
    raw.write(&bytes).await;
    drop(raw);
    round_trip(&good, 100).await;
    let mut fresh = Raw::connect(&d).await;
    fresh.assert_usable("torn frames on other connections").await;
    drop(good);
    finish(&mut d);
}

/// Everything at once on one connection, with the well-behaved client
/// round-tripping between each bad request, and oversized and torn frames on
/// connections of their own: the key list is the same after.
#[tokio::test(flavor = "multi_thread")]
async fn a_barrage_of_bad_input_harms_nothing() {
    let (mut d, good) = setup().await;
    good.key_create(&path("zeta/extra")).await.unwrap();
    let before = good.key_list(None).await.unwrap();
    let health_before = good.health().await.unwrap();
    let mut raw = Raw::connect(&d).await;
    for (n, case) in all_cases().iter().enumerate() {
        run(&mut raw, case).await;
        round_trip(&good, n).await;
    }
    for (n, bytes) in torn_frames().iter().enumerate() {
        torn(&d, bytes, n % 2 == 0).await;
        round_trip(&good, 1000 + n).await;
        raw.assert_usable("a torn frame on another connection").await;
    }
    oversized(&d, u32::MAX, b"{}").await;
    round_trip(&good, 2000).await;
    raw.assert_usable("an oversized frame on another connection").await;

    assert_eq!(good.key_list(None).await.unwrap(), before, "failed requests changed the key list");
    let health = good.health().await.unwrap();
    assert_eq!(health.status, "ok");
    assert_eq!(health.store.keys, health_before.store.keys);
    drop((good, raw));
    finish(&mut d);
}

/// Failed requests write nothing: the store's files are byte for byte the
/// same before and after the barrage, both read with the daemon stopped.
///
/// sled rewrites its files (segment size, snapshot) the first time a store
/// written by a running daemon is opened and closed again, so the "before"
/// picture is taken after one idle start and stop; from then on an idle
/// start and stop leaves every byte as it was, while one successful
/// `key_create` or `encrypt` (which persists its wrap counter, ENVELOPE.md
/// §7) changes the files. Hence the well-behaved client only decrypts here.
#[tokio::test(flavor = "multi_thread")]
async fn failed_requests_leave_the_store_unchanged_but_audited() {
    let (mut d, good) = setup().await;
    let context = ctx(&["row=1"]);
    let kept = good.encrypt(&path("acme/pii"), b"made before", &context).await.unwrap();
    let before = good.key_list(None).await.unwrap();
    drop(good);
    finish(&mut d);
    let (records_before, audited_before) = store_records(&d);
    d.start_again();

    let good = d.client().await;
    let mut raw = Raw::connect(&d).await;
    for case in all_cases() {
        run(&mut raw, &case).await;
        let back = good.decrypt(&kept.ciphertext, &context).await.expect("good decrypt");
        assert_eq!(back.plaintext.expose(), b"made before");
    }
    for (n, bytes) in torn_frames().iter().enumerate() {
        torn(&d, bytes, n % 2 == 1).await;
    }
    oversized(&d, MAX_FRAME as u32 + 1, b"").await;
    assert_eq!(good.key_list(None).await.unwrap(), before);
    drop((good, raw));
    finish(&mut d);

    let (records_after, audited_after) = store_records(&d);
    assert_eq!(records_before, records_after, "failed requests changed the keyring, meta or revocations");
    assert!(
        audited_after > audited_before + all_cases().len(),
        "every request is audited: {audited_before} -> {audited_after}"
    );
}

// ---------------------------------------------------------------------------
// Documented behaviour the daemon does not have yet
// ---------------------------------------------------------------------------

/// Mistyped values, whose message should name the field (PROTOCOL.md §4:
/// "it names the thing concerned (the key, the field, the limit)").
fn mistyped_field_cases() -> Vec<Bad> {
    let br = "bad_request";
    let p = "aGk=";
    vec![
        Bad::op(200, "encrypt", json!({"tenant": 1, "key": "pii", "plaintext": p}), br, &["`tenant`"]),
        Bad::op(
            201,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": "hunter2!"}),
            br,
            &["`plaintext`", "base64"],
        )
        .never(&["hunter2"]),
        Bad::op(
            202,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": 12}),
            br,
            &["`plaintext`"],
        ),
        Bad::op(
            203,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": p, "context": {"user": 42}}),
            br,
            &["context"],
        ),
        Bad::op(
            204,
            "datakey",
            json!({"tenant": "acme", "key": "pii", "include_plaintext": "x"}),
            br,
            &["`include_plaintext`"],
        ),
        Bad::op(205, "hello", json!({"protocol": "1"}), br, &["`protocol`"]),
        Bad::op(206, "decrypt", json!({"ciphertext": 5}), br, &["`ciphertext`"]),
        Bad::op(207, "key_list", json!({"tenant": 7}), br, &["`tenant`"]),
    ]
}

/// Request input quoted back in messages: PROTOCOL.md §4 says names from the
/// request are shortened and escaped, and messages never hold secrets (the
/// daemon already cuts a mistyped string value out of `params` errors).
fn hostile_input_cases() -> Vec<Bad> {
    let br = "bad_request";
    let long = "x".repeat(5000);
    let ctl = "a\nb\u{1b}[31m";
    vec![
        Bad::op(210, "health", json!({long.clone(): 1}), br, &["unknown field `xxxx"]),
        Bad::op(211, "health", json!({ctl: 1}), br, &["unknown field `a\\nb"]),
        Bad::raw(
            "long unknown top-level field",
            json!({"id": 212, "op": "health", long: 1}).to_string(),
            Some(212),
            br,
            &["unknown field `xxxx"],
        ),
        Bad::raw(
            "unknown top-level field with control characters",
            json!({"id": 213, "op": "health", ctl: 1}).to_string(),
            Some(213),
            br,
            &["unknown field `a\\nb"],
        ),
        Bad::op(
            214,
            "encrypt",
            json!({"tenant": "acme", "key": "pii", "plaintext": "aGk=", "context": {ctl: "v".repeat(1025)}}),
            br,
            &["value of key `a\\nb"],
        ),
        Bad::raw("string id", r#"{"id":"hunter2","op":"health"}"#, None, br, &["malformed request"])
            .never(&["hunter2"]),
    ]
}

/// Runs `cases` and returns every problem instead of stopping at the first.
async fn problems_of(cases: Vec<Bad>) -> Vec<String> {
    let (mut d, _good) = setup().await;
    let mut raw = Raw::connect(&d).await;
    let mut out = Vec::new();
    for case in cases {
        let resp = raw.call(&case.body).await;
        out.extend(
            case.problems(&resp).into_iter().map(|p| format!("{}: {p}\n    answer: {resp}", case.what)),
        );
        raw.assert_usable(&case.what).await;
    }
    finish(&mut d);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn mistyped_params_are_named_in_the_message() {
    let problems = problems_of(mistyped_field_cases()).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_input_in_messages_is_shortened_escaped_and_scrubbed() {
    let problems = problems_of(hostile_input_cases()).await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
