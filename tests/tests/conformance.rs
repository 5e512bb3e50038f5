//! The language-neutral vectors of tests/conformance/vectors.json, which an
//! independent generator (tests/conformance/generate.py, Python
//! `cryptography` only) wrote and which the Node.js and Python packages run
//! too: contexts, envelopes, sealed records, sealed streams and `khm1:` MAC
//! tags, each with the failure class a bad one must get. No daemon: the
//! vectors carry their data keys.
//!
//! Also the scenarios of tests/conformance/scenarios.json (sequences of
//! operations with the outcome of each step, which the Node.js and Python
//! packages run too), through this crate's `Client` against a real dev
//! daemon, one fresh tenant per scenario.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use keyhaven::seal::{self, ChunkCipher, DataKey, SealedRecord, StreamHeader};
use keyhaven::{Client, EncryptionContext, Envelope, Error, KeyPath, KeyType, MacTag, Plaintext};
use serde_json::{json, Map, Value};

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

// ---------------------------------------------------------------------------
// Scenarios (tests/conformance/scenarios.json; format in its README.md).
// An op, an argument, a check or a result field this runner does not know
// fails the scenario, so that no step is skipped silently.

/// The ops of scenarios.json this runner performs (`perform` below).
const SCENARIO_OPS: &[&str] = &[
    "key_create",
    "key_show",
    "encrypt",
    "decrypt",
    "datakey",
    "datakey_decrypt",
    "rewrap",
    "mac",
    "mac_verify",
    "sign",
    "verify",
    "public_key",
    "alias_create",
    "alias_update",
    "alias_delete",
    "call",
];
/// The checks of scenarios.json this runner evaluates (`check` below).
const SCENARIO_CHECKS: &[&str] = &["utf8", "not", "prefix", "bytes"];
const STEP_FIELDS: &[&str] = &["op", "note", "save", "expect"];

fn scenario_file() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/scenarios.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read scenarios.json"))
        .expect("parse scenarios.json")
}

/// Why a step did not give an answer: the client or the daemon refused
/// (`Kh`), or the step is one this runner cannot run (`Runner`).
enum Fail {
    Kh(Error),
    Runner(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Kh(e)
    }
}

fn runner(msg: impl Into<String>) -> Fail {
    Fail::Runner(msg.into())
}

fn str_arg<'a>(a: &'a Map<String, Value>, name: &str) -> Result<&'a str, Fail> {
    a.get(name).and_then(Value::as_str).ok_or_else(|| runner(format!("`{name}` must be a string")))
}

/// A `plaintext`/`message` argument: a string, or `{"repeat": S, "times": N}`.
fn text_arg(a: &Map<String, Value>, name: &str) -> Result<String, Fail> {
    match a.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Object(o)) if o.len() == 2 => {
            match (o.get("repeat").and_then(Value::as_str), o.get("times").and_then(Value::as_u64)) {
                (Some(s), Some(n)) => Ok(s.repeat(usize::try_from(n).map_err(|_| runner("times"))?)),
                _ => Err(runner(format!("`{name}`: not a text argument"))),
            }
        }
        _ => Err(runner(format!("`{name}`: not a text argument"))),
    }
}

fn version_arg(a: &Map<String, Value>) -> Result<Option<u32>, Fail> {
    match a.get("version") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| runner("`version` must be an integer of 0 to 2^32-1")),
    }
}

/// The context argument; an invalid one is refused by `EncryptionContext`.
fn context_arg(a: &Map<String, Value>) -> Result<EncryptionContext, Fail> {
    let mut ctx = EncryptionContext::new();
    if let Some(pairs) = a.get("context") {
        for (k, v) in pairs.as_object().ok_or_else(|| runner("`context` must be an object"))? {
            ctx.insert(k, v.as_str().ok_or_else(|| runner("context values are strings"))?)?;
        }
    }
    Ok(ctx)
}

/// A result as the wire has it (bytes as standard base64: `SecretBytes`
/// serialises so).
fn wire<T: serde::Serialize>(t: &T) -> Result<Value, Fail> {
    serde_json::to_value(t).map_err(|e| runner(format!("result to JSON: {e}")))
}

/// One op through the public API of `keyhaven::Client`.
async fn perform(kh: &Client, tenant: &str, op: &str, a: &Map<String, Value>) -> Result<Value, Fail> {
    let path = || -> Result<KeyPath, Fail> { Ok(KeyPath::new(tenant, str_arg(a, "key")?)?) };
    match op {
        "key_create" => match a.get("type") {
            None => wire(&kh.key_create(&path()?).await?),
            Some(t) => {
                let t: KeyType = t.as_str().unwrap_or_default().parse().map_err(Fail::Runner)?;
                wire(&kh.key_create_of_type(&path()?, t).await?)
            }
        },
        "key_show" => wire(&kh.key_show(&path()?).await?),
        "encrypt" => {
            wire(&kh.encrypt(&path()?, text_arg(a, "plaintext")?.as_bytes(), &context_arg(a)?).await?)
        }
        "decrypt" => wire(&kh.decrypt(str_arg(a, "ciphertext")?, &context_arg(a)?).await?),
        "datakey" => wire(&kh.datakey(&path()?, &context_arg(a)?, Plaintext::Include).await?),
        "datakey_decrypt" => wire(&kh.datakey_decrypt(str_arg(a, "envelope")?, &context_arg(a)?).await?),
        "rewrap" => wire(&kh.rewrap(str_arg(a, "text")?, &context_arg(a)?).await?),
        "mac" => wire(&kh.mac(&path()?, text_arg(a, "message")?.as_bytes(), version_arg(a)?).await?),
        "mac_verify" => {
            let valid =
                kh.mac_verify(&path()?, text_arg(a, "message")?.as_bytes(), str_arg(a, "tag")?).await?;
            Ok(json!({ "valid": valid }))
        }
        "sign" => wire(&kh.sign(&path()?, text_arg(a, "message")?.as_bytes()).await?),
        "verify" => {
            let message = text_arg(a, "message")?;
            let signature = str_arg(a, "signature")?;
            wire(&kh.verify(&path()?, message.as_bytes(), signature, version_arg(a)?).await?)
        }
        "public_key" => wire(&kh.public_key(&path()?, version_arg(a)?).await?),
        "alias_create" => wire(&kh.alias_create(str_arg(a, "alias")?, &path()?).await?),
        "alias_update" => wire(&kh.alias_update(str_arg(a, "alias")?, &path()?).await?),
        "alias_delete" => wire(&kh.alias_delete(tenant, str_arg(a, "alias")?).await?),
        "call" => {
            Ok(kh.call_raw(str_arg(a, "call")?, a.get("params").cloned().unwrap_or(Value::Null)).await?)
        }
        other => Err(runner(format!("unknown op `{other}`"))),
    }
}

/// The wire code of a refusal and who refused: `daemon` (its answer) or
/// `client` (this crate, before sending: the code the daemon would give).
fn refusal(e: &Error) -> Result<(String, &'static str), String> {
    match e {
        Error::Daemon { code, .. } => Ok((code.as_str().to_owned(), "daemon")),
        Error::InvalidName(_) | Error::InvalidContext(_) => Ok(("bad_request".into(), "client")),
        Error::Envelope(_) => Ok(("bad_envelope".into(), "client")),
        Error::Integrity(_) => Ok(("integrity".into(), "client")),
        other => Err(format!("failed without an answer: {other}")),
    }
}

fn field<'a>(result: &'a Value, path: &str) -> Result<&'a Value, String> {
    let mut value = result;
    for part in path.split('.') {
        value = match value {
            Value::Object(o) => o.get(part),
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| {
            let shown: String = result.to_string().chars().take(400).collect();
            format!("the result has no field `{path}`: {shown}")
        })?;
    }
    Ok(value)
}

/// `$name` and `$name.field.path` references, recursively.
fn resolve(value: &Value, saved: &Map<String, Value>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) if s.starts_with('$') => {
            let (name, rest) = s[1..].split_once('.').map_or((&s[1..], None), |(n, r)| (n, Some(r)));
            let got = saved.get(name).ok_or_else(|| format!("`{s}`: nothing saved as `{name}`"))?;
            match rest {
                Some(rest) => field(got, rest)?.clone(),
                None => got.clone(),
            }
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| resolve(v, saved)).collect::<Result<_, _>>()?),
        Value::Object(o) => Value::Object(
            o.iter().map(|(k, v)| Ok((k.clone(), resolve(v, saved)?))).collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn decoded(actual: &Value) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    actual
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| format!("not a base64 field: {actual}"))
}

fn check(result: &Value, path: &str, want: &Value, saved: &Map<String, Value>) -> Result<(), String> {
    let actual = field(result, path)?;
    let shown: String = actual.to_string().chars().take(200).collect();
    if let Value::Object(o) = want {
        let mut it = o.iter();
        let (Some((kind, arg)), None) = (it.next(), it.next()) else {
            return Err(format!("check of `{path}`: an object check has exactly one key"));
        };
        let arg = resolve(arg, saved)?;
        let passed = match kind.as_str() {
            "utf8" => decoded(actual)? == arg.as_str().unwrap_or_default().as_bytes(),
            "not" => *actual != arg,
            "prefix" => actual.as_str().zip(arg.as_str()).is_some_and(|(a, p)| a.starts_with(p)),
            "bytes" => Some(decoded(actual)?.len() as u64) == arg.as_u64(),
            other => return Err(format!("check of `{path}`: unknown check `{other}`")),
        };
        if !passed {
            return Err(format!("`{path}` is {shown}: fails {kind} {arg}"));
        }
    } else {
        let want = resolve(want, saved)?;
        if *actual != want {
            return Err(format!("`{path}` is {shown}, expected {want}"));
        }
    }
    Ok(())
}

/// A step's op, its arguments and its `expect`.
type ValidStep<'a> = (&'a str, Map<String, Value>, &'a Map<String, Value>);

/// Checks a step against the file's `ops`; its op, arguments and expectation.
fn validate<'a>(ops: &'a Map<String, Value>, step: &'a Value) -> Result<ValidStep<'a>, String> {
    let names = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect()
    };
    let step = step.as_object().ok_or("a step is an object")?;
    let op = step.get("op").and_then(Value::as_str).unwrap_or("");
    let spec =
        ops.get(op).filter(|_| SCENARIO_OPS.contains(&op)).ok_or_else(|| format!("unknown op `{op}`"))?;
    let (required, optional) = (names(&spec["args"]), names(&spec["optional"]));
    let args: Map<String, Value> = step
        .iter()
        .filter(|(k, _)| !STEP_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let unknown: Vec<&String> =
        args.keys().filter(|k| !required.contains(k) && !optional.contains(k)).collect();
    let missing: Vec<&String> = required.iter().filter(|k| !args.contains_key(*k)).collect();
    if !unknown.is_empty() || !missing.is_empty() {
        return Err(format!("`{op}`: unknown arguments {unknown:?}, missing {missing:?}"));
    }
    let expect = step.get("expect").and_then(Value::as_object).ok_or("a step has an `expect` object")?;
    if expect.contains_key("ok") == expect.contains_key("error") {
        return Err("`expect` must have exactly one of `ok` and `error`".into());
    }
    if expect.keys().any(|k| !["ok", "error", "by"].contains(&k.as_str()))
        || (expect.contains_key("by") && !expect.contains_key("error"))
    {
        return Err(format!("unknown `expect` fields {:?}", expect.keys().collect::<Vec<_>>()));
    }
    if let Some(by) = expect.get("by").filter(|b| *b != "client" && *b != "daemon") {
        return Err(format!("`by` is client or daemon, not {by}"));
    }
    if let Some(ok) = expect.get("ok") {
        let result = names(&spec["result"]);
        for f in ok.as_object().ok_or("`ok` is an object of checks")?.keys() {
            let top = f.split('.').next().unwrap_or_default().to_owned();
            if !result.iter().any(|r| r == "*" || *r == top) {
                return Err(format!("`{op}` has no result field `{f}`"));
            }
        }
    } else if step.contains_key("save") {
        return Err("a step expecting an error saves nothing".into());
    }
    Ok((op, args, expect))
}

async fn run_step(
    kh: &Client,
    ops: &Map<String, Value>,
    tenant: &str,
    step: &Value,
    saved: &mut Map<String, Value>,
) -> Result<(), String> {
    let (op, args, expect) = validate(ops, step)?;
    let Value::Object(args) = resolve(&Value::Object(args), saved)? else { unreachable!() };
    let outcome = match perform(kh, tenant, op, &args).await {
        Ok(v) => Ok(v),
        Err(Fail::Runner(msg)) => return Err(msg),
        Err(Fail::Kh(e)) => Err(refusal(&e)?),
    };
    if let Some(want) = expect.get("error") {
        let want = want.as_str().ok_or("`error` is a wire code")?;
        let by = expect.get("by").and_then(Value::as_str);
        return match outcome {
            Ok(v) => {
                let shown: String = v.to_string().chars().take(300).collect();
                Err(format!("expected error {want}, got ok {shown}"))
            }
            Err((code, who)) if want == code && by.is_none_or(|b| b == who) => Ok(()),
            Err((code, who)) => {
                Err(format!("expected error {want} by {}, got {code} by {who}", by.unwrap_or("either")))
            }
        };
    }
    let result = outcome.map_err(|(code, who)| format!("expected ok, got error {code} by {who}"))?;
    if !result.is_object() {
        return Err(format!("a result that is not an object: {result}"));
    }
    for (f, want) in expect["ok"].as_object().into_iter().flatten() {
        check(&result, f, want, saved)?;
    }
    if let Some(name) = step.get("save").and_then(Value::as_str) {
        saved.insert(name.to_owned(), result);
    }
    Ok(())
}

/// Runs one scenario in a fresh tenant; the failure names the scenario,
/// the tenant and the step.
async fn run_scenario(kh: &Client, ops: &Map<String, Value>, scenario: &Value) -> Result<usize, String> {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let tenant = format!("sc-{:08x}", random as u32);
    let mut saved = Map::new();
    saved.insert("tenant".into(), Value::String(tenant.clone()));
    let steps = scenario["steps"].as_array().map(Vec::as_slice).unwrap_or_default();
    for (i, step) in steps.iter().enumerate() {
        run_step(kh, ops, &tenant, step, &mut saved).await.map_err(|e| {
            let op = step["op"].as_str().unwrap_or("?");
            format!("scenario {} (tenant {tenant}), step {} ({op}): {e}", name(scenario), i + 1)
        })?;
    }
    Ok(steps.len())
}

#[test]
fn the_scenario_runner_knows_every_op_and_check_of_the_file() {
    let s = scenario_file();
    let mut ops: Vec<&str> = s["ops"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut mine = SCENARIO_OPS.to_vec();
    ops.sort_unstable();
    mine.sort_unstable();
    assert_eq!(mine, ops);
    let mut checks: Vec<&str> = s["checks"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let mut known = SCENARIO_CHECKS.to_vec();
    checks.sort_unstable();
    known.sort_unstable();
    assert_eq!(known, checks);
    let names: std::collections::BTreeSet<&str> =
        s["scenarios"].as_array().unwrap().iter().map(name).collect();
    assert_eq!(names.len(), s["scenarios"].as_array().unwrap().len(), "scenario names are unique");
}

#[tokio::test(flavor = "multi_thread")]
async fn scenarios_behave_as_the_file_says_against_a_real_daemon() {
    let s = scenario_file();
    let ops = s["ops"].as_object().unwrap();
    let d = keyhaven_tests::TestDaemon::start();
    let kh = d.client().await;

    // A step this runner cannot run, or a check it does not know, fails.
    for step in [
        json!({"op": "key_frobnicate", "key": "k", "expect": {"ok": {}}}),
        json!({"op": "key_create", "key": "k", "colour": "red", "expect": {"ok": {}}}),
        json!({"op": "key_create", "key": "k", "expect": {"ok": {"colour": "red"}}}),
        json!({"op": "key_create", "key": "k", "expect": {"ok": {"key": {"shout": "K"}}}}),
        json!({"op": "key_create", "key": "k", "expect": {"ok": {"key": "k"}, "error": "not_found"}}),
    ] {
        let probe = json!({"name": "probe", "steps": [step]});
        let err = run_scenario(&kh, ops, &probe).await.expect_err("a probe must fail");
        assert!(err.starts_with("scenario probe (tenant sc-") && err.contains("step 1"), "{err}");
    }

    let mut failures = Vec::new();
    for scenario in s["scenarios"].as_array().unwrap() {
        let started = std::time::Instant::now();
        match run_scenario(&kh, ops, scenario).await {
            Ok(n) => eprintln!("scenario {}: {n} steps ok in {:?}", name(scenario), started.elapsed()),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{} scenario(s) failed:\n{}", failures.len(), failures.join("\n"));
}
