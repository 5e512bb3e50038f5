//! HSM failure modes (issue 6), provoked on a real SoftHSM2 token under a
//! real daemon: the token going away and coming back, a master key deleted
//! with pkcs11-tool, a PIN that stops working (and is never retried in a
//! loop), a module that cannot be loaded, and a full worker queue. Each
//! gives a named wire error, a `health` condition, and recovery without a
//! restart where recovery is possible.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyhaven_tests::*;

fn read_pin(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("pin")).unwrap().trim_end().to_owned()
}

fn pkcs11_tool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(softhsm_module())
        .args(["--token-label", "keyhaven-dev"])
        .args(args)
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .output()
        .expect("pkcs11-tool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pkcs11-tool {args:?} failed:\n{text}");
    text
}

async fn token_condition(c: &Client) -> (String, Option<String>) {
    let h = c.health().await.unwrap();
    (h.status, h.token.condition)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_going_away_and_coming_back_is_survived_without_a_restart() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let enc = c.encrypt(&path("acme/pii"), b"before", &ctx(&[])).await.unwrap();

    let tokdir = token_dir(d.dir());
    let away = d.dir().join("token-away");
    std::fs::rename(&tokdir, &away).unwrap();

    let (status, condition) = token_condition(&c).await;
    assert_eq!((status.as_str(), condition.as_deref()), ("degraded", Some("token_absent")));
    let e = c.key_create(&path("acme/other")).await.expect_err("no token, no new key");
    assert_eq!(e.code(), Some(ErrorCode::HsmUnavailable), "{e}");
    assert!(e.to_string().contains("keyhaven-dev"), "names the token: {e}");

    std::fs::rename(&away, &tokdir).unwrap();
    // The module is re-initialised at most every 2 s; a health probe is
    // enough to find the token again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(token_condition(&c).await, ("ok".into(), None), "health finds the token again");
    // The first request after the token is back succeeds: the worker
    // re-opens its session and logs in again without the client noticing.
    c.key_create(&path("acme/after")).await.expect("works again without a restart");
    let dec = c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap();
    assert_eq!(dec.plaintext.expose(), b"before");
    assert_eq!(token_condition(&c).await, ("ok".into(), None));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("re-initialised"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_key_deleted_with_pkcs11_tool_is_named_in_health_and_errors() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create_of_type(&path("acme/hooks"), keyhaven::KeyType::HmacSha256).await.unwrap();
    c.key_create_of_type(&path("acme/signer"), keyhaven::KeyType::EcdsaP256).await.unwrap();
    let pin = read_pin(d.dir());
    pkcs11_tool(
        d.dir(),
        &["--login", "--pin", &pin, "--delete-object", "--type", "secrkey", "--label", "keyhaven-mk-v1"],
    );
    let (status, condition) = token_condition(&c).await;
    assert_eq!((status.as_str(), condition.as_deref()), ("degraded", Some("master_key_missing")));
    let e = c.key_create(&path("acme/two")).await.expect_err("no master key, no new key");
    assert_eq!(e.code(), Some(ErrorCode::MasterKeyUnavailable), "{e}");
    assert!(e.to_string().contains("keyhaven-mk-v1"), "names the key: {e}");
    // Keys of the other types, never loaded yet, and import parameters
    // (their key pair is wrapped under the master key): PROTOCOL.md §4.
    let e = c.mac(&path("acme/hooks"), b"m", None).await.expect_err("no master key, no MAC");
    assert_eq!(e.code(), Some(ErrorCode::MasterKeyUnavailable), "mac: {e}");
    let e =
        c.call_raw("sign", serde_json::json!({"tenant": "acme", "key": "signer", "message": "bQ=="})).await;
    let e = e.expect_err("no master key, no signature");
    assert_eq!(e.code(), Some(ErrorCode::MasterKeyUnavailable), "sign: {e}");
    let e = c.call_raw("key_import_params", serde_json::json!({"tenant": "acme", "key": "byok"})).await;
    let e = e.expect_err("no master key, no wrapping key");
    assert_eq!(e.code(), Some(ErrorCode::MasterKeyUnavailable), "key_import_params: {e}");
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(&pin));
    // A restart does not hide it: start-up refuses, naming the key.
    let out = d.run_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("keyhaven-mk-v1") && err.contains("not in the token"), "{err}");
}

/// The PIN is changed behind the daemon's back and the token goes away and
/// back, so the daemon must log in again: the login is refused once, never
/// tried again by itself (which could lock the token), requests get
/// `hsm_login_failed`, health says `pin_incorrect`; once the PIN file holds
/// the new PIN, SIGHUP recovers without a restart.
/// The operations docs/PROTOCOL.md §4 says return `code` (its "returned
/// by" cell, the words that name operations of §3's table).
fn documented_returners(code: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md")).unwrap();
    let backticked =
        |t: &str| -> Vec<String> { t.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    let ops: Vec<String> = doc
        .lines()
        .skip_while(|l| !l.starts_with("| op | § |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| backticked(l)[0].clone())
        .collect();
    let row = doc.lines().find(|l| l.starts_with(&format!("| `{code}` |"))).expect("§4 row");
    let by = row.trim_end().trim_end_matches('|').rsplit(" | ").next().unwrap();
    backticked(by).into_iter().filter(|w| ops.contains(w)).collect()
}

/// A request for `op` that reaches the token (what the setup of
/// [`a_refused_pin_is_not_retried_until_sighup`] made is in `made`).
fn token_request(op: &str, made: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    match op {
        "key_create" => json!({"tenant": "acme", "key": "refused"}),
        "encrypt" => json!({"tenant": "acme", "key": "pii", "plaintext": b64(b"p")}),
        "decrypt" => json!({"ciphertext": made["ciphertext"]}),
        "datakey" => json!({"tenant": "acme", "key": "pii"}),
        "datakey_decrypt" => json!({"envelope": made["envelope"]}),
        "key_rotate" => json!({"tenant": "acme", "key": "pii"}),
        "rewrap" => json!({"text": made["old"]}),
        "mac" => json!({"tenant": "acme", "key": "hooks", "message": b64(b"m")}),
        "mac_verify" => json!({"tenant": "acme", "key": "hooks", "message": b64(b"m"), "tag": made["tag"]}),
        "sign" => json!({"tenant": "acme", "key": "signer", "message": b64(b"m")}),
        "verify" => {
            json!({"tenant": "acme", "key": "signer", "message": b64(b"m"), "signature": made["signature"]})
        }
        "key_import_params" => json!({"tenant": "acme", "key": "byok2"}),
        "key_import" => json!({"tenant": "acme", "key": "byok", "import_token": made["import_token"],
                                "algorithm": "rsaes-oaep-sha1", "wrapped": b64(&[7u8; 384])}),
        "audit_verify" | "audit_public_key" => json!({}),
        "admin_rotate_master" => json!({}),
        "admin_retire_master" => json!({"version": 99}),
        other => {
            panic!("PROTOCOL.md §4 says `{other}` can answer `hsm_login_failed`: give it a request here")
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_pin_is_not_retried_until_sighup() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    // Something for each operation that uses the token to work on.
    let call = |op: &'static str, params: serde_json::Value| {
        let c = &c;
        async move { c.call_raw(op, params).await.unwrap_or_else(|e| panic!("{op}: {e}")) }
    };
    use serde_json::json;
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    for (key, ty) in [("hooks", "hmac-sha256"), ("signer", "ecdsa-p256"), ("old", "aes256-gcm")] {
        call("key_create", json!({"tenant": "acme", "key": key, "type": ty})).await;
    }
    let ct = call("encrypt", json!({"tenant": "acme", "key": "pii", "plaintext": b64(b"s")})).await;
    let dk = call("datakey", json!({"tenant": "acme", "key": "pii"})).await;
    let old = call("encrypt", json!({"tenant": "acme", "key": "old", "plaintext": b64(b"s")})).await;
    call("key_rotate", json!({"tenant": "acme", "key": "old"})).await;
    let tag = call("mac", json!({"tenant": "acme", "key": "hooks", "message": b64(b"m")})).await;
    let sig = call("sign", json!({"tenant": "acme", "key": "signer", "message": b64(b"m")})).await;
    let offer = call("key_import_params", json!({"tenant": "acme", "key": "byok"})).await;
    let made = json!({"ciphertext": ct["ciphertext"], "envelope": dk["envelope"], "old": old["ciphertext"],
                      "tag": tag["tag"], "signature": sig["signature"], "import_token": offer["import_token"]});
    // `audit_verify` asks the token only when there are seals to check: one
    // is made within `seal_interval_ms` (1 s by default, AUDIT.md §3).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call("audit_verify", json!({})).await["seals"].as_u64() == Some(0) {
        assert!(std::time::Instant::now() < deadline, "no audit seal within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = read_pin(d.dir());
    let new = format!("{old}-new");
    pkcs11_tool(d.dir(), &["--login", "--pin", &old, "--change-pin", "--new-pin", &new]);

    let tokdir = token_dir(d.dir());
    let away = d.dir().join("token-away");
    std::fs::rename(&tokdir, &away).unwrap();
    let _ = c.key_create(&path("acme/gone")).await;
    std::fs::rename(&away, &tokdir).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let e = c.key_create(&path("acme/two")).await.expect_err("the old PIN no longer works");
    assert_eq!(e.code(), Some(ErrorCode::HsmLoginFailed), "{e}");
    assert!(e.to_string().contains("PIN is incorrect"), "{e}");
    for _ in 0..5 {
        let e = c.key_create(&path("acme/two")).await.expect_err("still refused");
        assert_eq!(e.code(), Some(ErrorCode::HsmLoginFailed), "{e}");
        assert!(e.to_string().contains("not retried"), "{e}");
    }
    let (status, condition) = token_condition(&c).await;
    assert_eq!((status.as_str(), condition.as_deref()), ("degraded", Some("pin_incorrect")));
    // Every operation PROTOCOL.md §4 lists for `hsm_login_failed` answers
    // it now (and those are the ones §3's table says use the token:
    // protocol_doc.rs).
    let listed = documented_returners("hsm_login_failed");
    assert!(listed.len() >= 15, "{listed:?}");
    for op in &listed {
        let e = c.call_raw(op, token_request(op, &made)).await.expect_err(op);
        assert_eq!(e.code(), Some(ErrorCode::HsmLoginFailed), "`{op}`: {e}");
    }

    std::fs::write(d.dir().join("pin"), format!("{new}\n")).unwrap();
    signal(d.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.key_create(&path("acme/two")).await.expect("recovered by SIGHUP");
    assert_eq!(token_condition(&c).await, ("ok".into(), None));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("HSM login refused").count(), 1, "one login attempt with the old PIN:\n{log}");
    assert!(!log.contains(&old) && !log.contains(&new), "no PIN in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_busy_and_every_other_request_succeeds() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap().replace("queue_depth = 4096", "queue_depth = 1");
        assert!(text.contains("queue_depth = 1"));
        std::fs::write(&file, text).unwrap();
    });
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..20 {
                outcomes.push(
                    c.datakey(&path("acme/pii"), &ctx(&[]), keyhaven::Plaintext::Omit).await.map(|_| ()),
                );
            }
            outcomes
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        for r in t.await.unwrap() {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::Busy), "only `busy` may fail: {e}");
                    busy += 1;
                }
            }
        }
    }
    assert!(busy > 0, "a queue of 1 under 16 clients must answer busy sometimes ({ok} ok)");
    assert!(ok > 0);
    // Busy is transient: once the load is gone, everything works.
    assert_eq!(token_condition(&c).await, ("ok".into(), None));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_module_is_refused_at_start_naming_it() {
    let mut d = TestDaemon::start();
    assert_eq!(d.client().await.health().await.unwrap().status, "ok");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let file = d.dir().join("keyhaven.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let module = softhsm_module().display().to_string();
    std::fs::write(d.dir().join("nomodule.toml"), text.replace(&module, "/nonexistent/libvendor-pkcs11.so"))
        .unwrap();
    let out = Command::new(bin("keyhavend"))
        .args(["run", "--config"])
        .arg(d.dir().join("nomodule.toml"))
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("/nonexistent/libvendor-pkcs11.so") && err.contains("cannot be loaded"), "{err}");
}
