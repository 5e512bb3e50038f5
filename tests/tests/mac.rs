//! HMAC keys and MAC tags against the real daemon and token (PROTOCOL.md
//! §3.29–3.30): tags verify across key rotation and master-key rotation
//! until their version is retired; altered messages, tags, versions and
//! keys are refused; each operation is its own permission, audited,
//! refused under every revocation scope covering it, and refused on keys of
//! the wrong type; bad input is typed and changes nothing.

use std::process::Output;

use keyhaven::mac::MacTag;
use keyhaven::revocation::{Destroy, Reason, Revoke, RevokeLift, Scope};
use keyhaven::wire::SecretBytes;
use keyhaven::{ErrorCode, KeyType};
use keyhaven_tests::*;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "expected success, got {}: {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `keyhaven mac verify` could not check the tag (exit 4, README's CLI
/// tour): a version that is unknown, retired or revoked; it says why.
#[track_caller]
fn not_checked(out: Output, why: &str) {
    assert_eq!(out.status.code(), Some(4), "expected exit 4: {}", text(&out));
    assert!(text(&out).contains(why), "expected `{why}`: {}", text(&out));
}

/// `keyhaven mac verify` exits 1 (not 0, not a usage error) and says why.
#[track_caller]
fn rejected(out: Output, why: &str) {
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {}", text(&out));
    assert!(text(&out).contains(why), "expected `{why}`: {}", text(&out));
}

fn code_of<T: std::fmt::Debug>(r: Result<T, keyhaven::Error>) -> ErrorCode {
    r.expect_err("expected a refusal").code().expect("a daemon error")
}

#[tokio::test]
async fn tags_verify_across_rotations_until_their_version_is_retired() {
    let mut d = TestDaemon::start();
    let created = ok(d.cli(&["key", "create", "acme/hooks", "--type", "hmac-sha256"], b""));
    assert!(created.contains(r#""type": "hmac-sha256""#), "{created}");
    ok(d.cli(&["key", "create", "acme/other", "--type", "hmac-sha256"], b""));
    ok(d.cli(&["key", "create", "acme/pii"], b""));
    let list = ok(d.cli(&["key", "list", "acme"], b""));
    assert!(list.contains(r#""type": "aes256-gcm""#) && list.contains(r#""type": "hmac-sha256""#), "{list}");

    // Deterministic (a blind index needs that), self-describing, per key.
    let tag1 = ok(d.cli(&["mac", "acme/hooks"], b"alice@example.com"));
    assert_eq!(tag1.len(), 53, "{tag1}");
    let parsed: MacTag = tag1.parse().unwrap();
    assert_eq!(parsed.version, 1);
    assert_eq!(ok(d.cli(&["mac", "acme/hooks"], b"alice@example.com")), tag1);
    assert_ne!(ok(d.cli(&["mac", "acme/hooks"], b"bob@example.com")), tag1);
    let other = ok(d.cli(&["mac", "acme/other"], b"alice@example.com"));
    assert_ne!(other, tag1, "two keys give two tags");

    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b"alice@example.com"));
    rejected(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b"alice@example.con"), "does not match");
    rejected(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b""), "does not match");
    rejected(d.cli(&["mac", "verify", "acme/other", "--tag", &tag1], b"alice@example.com"), "does not match");
    for bit in [0usize, 77, 255] {
        let mut flipped = parsed.clone();
        flipped.mac[bit / 8] ^= 1 << (bit % 8);
        rejected(
            d.cli(&["mac", "verify", "acme/hooks", "--tag", &flipped.to_string()], b"alice@example.com"),
            "does not match",
        );
    }
    // A tag that names another version: a version that does not exist.
    let moved = MacTag { version: 2, ..parsed.clone() }.to_string();
    not_checked(d.cli(&["mac", "verify", "acme/hooks", "--tag", &moved], b"alice@example.com"), "not_found");

    // Rotation: new tags under version 2, old ones still verify.
    ok(d.cli(&["key", "rotate", "acme/hooks"], b""));
    let tag2 = ok(d.cli(&["mac", "acme/hooks"], b"alice@example.com"));
    assert_eq!(tag2.parse::<MacTag>().unwrap().version, 2);
    assert_ne!(tag2[9..], tag1[9..], "a new version is a new secret");
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b"alice@example.com"));
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag2], b"alice@example.com"));
    // Version 2 rejects what version 1 made, under the same bytes.
    let forged = MacTag { version: 2, ..parsed.clone() }.to_string();
    rejected(
        d.cli(&["mac", "verify", "acme/hooks", "--tag", &forged], b"alice@example.com"),
        "does not match",
    );
    // An explicit older version gives its own tag again (re-indexing).
    assert_eq!(ok(d.cli(&["mac", "acme/hooks", "--version", "1"], b"alice@example.com")), tag1);

    // Master-key rotation gives the key a version 3 under the new master key.
    ok(d.cli(&["admin", "rotate-master"], b""));
    let show = ok(d.cli(&["key", "show", "acme/hooks"], b""));
    assert!(show.contains(r#""type": "hmac-sha256""#) && show.contains(r#""current_version": 3"#), "{show}");
    let tag3 = ok(d.cli(&["mac", "acme/hooks"], b"alice@example.com"));
    assert_eq!(tag3.parse::<MacTag>().unwrap().version, 3);
    for t in [&tag1, &tag2, &tag3] {
        ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", t], b"alice@example.com"));
    }
    // Verifications count as uses of their version.
    let show = ok(d.cli(&["key", "show", "acme/hooks"], b""));
    let details: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert!(details["versions"][0]["decryptions"].as_u64().unwrap() >= 4, "{show}");

    // The type and the tags survive a restart.
    d.restart();
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b"alice@example.com"));
    assert_eq!(ok(d.cli(&["mac", "acme/hooks"], b"alice@example.com")), tag3);

    // Retiring version 1 ends its tags (and MACs under it).
    ok(d.cli(&["key", "set", "acme/hooks", "--min-decryption-version", "2"], b""));
    not_checked(
        d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag1], b"alice@example.com"),
        "version_retired",
    );
    let e = text(&d.cli(&["mac", "acme/hooks", "--version", "1"], b"alice@example.com"));
    assert!(e.contains("version_retired"), "{e}");
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag2], b"alice@example.com"));

    // Disabled: no new tags, old ones still verify.
    ok(d.cli(&["key", "set", "acme/hooks", "--disable"], b""));
    let e = text(&d.cli(&["mac", "acme/hooks"], b"x"));
    assert!(e.contains("key_disabled"), "{e}");
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag3], b"alice@example.com"));
}

#[tokio::test]
async fn an_operation_on_the_wrong_type_of_key_is_wrong_key_type() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let info = c.key_create_of_type(&path("acme/hooks"), KeyType::HmacSha256).await.unwrap();
    assert_eq!(info.key_type, KeyType::HmacSha256);
    let ctx = ctx(&[]);

    let e = c.mac(&path("acme/pii"), b"m", None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::WrongKeyType), "{e}");
    assert!(e.to_string().contains("acme/pii") && e.to_string().contains("hmac-sha256"), "{e}");
    let tag = c.mac(&path("acme/hooks"), b"m", None).await.unwrap().tag;
    assert_eq!(code_of(c.mac_verify(&path("acme/pii"), b"m", &tag).await), ErrorCode::WrongKeyType);
    assert_eq!(code_of(c.encrypt(&path("acme/hooks"), b"m", &ctx).await), ErrorCode::WrongKeyType);
    assert_eq!(
        code_of(c.datakey(&path("acme/hooks"), &ctx, keyhaven::Plaintext::Include).await),
        ErrorCode::WrongKeyType
    );
    // The CLI says it by name.
    let out = d.cli(&["encrypt", "acme/hooks"], b"m");
    assert!(!out.status.success() && text(&out).contains("wrong_key_type"), "{}", text(&out));

    // A crafted envelope or ciphertext naming the HMAC key: each opening
    // operation is refused naming itself (as `encrypt` and `datakey` are),
    // the key and both types, before the token is asked.
    let envelope = keyhaven::envelope::Envelope::new(
        path("acme/hooks"),
        1,
        keyhaven::envelope::EnvelopeId([0x11; 16]),
        [0x22; 12],
        [0x33; 48],
    );
    let ciphertext = keyhaven::envelope::Ciphertext::new(envelope.clone(), [0x44; 12], vec![0x55; 23]);
    let (envelope, ciphertext) = (envelope.to_string(), ciphertext.to_string());
    let refusals = [
        ("decrypt", c.decrypt(&ciphertext, &ctx).await.map(|_| ())),
        ("datakey_decrypt", c.datakey_decrypt(&envelope, &ctx).await.map(|_| ())),
        ("rewrap", c.rewrap(&envelope, &ctx).await.map(|_| ())),
        ("rewrap", c.rewrap(&ciphertext, &ctx).await.map(|_| ())),
    ];
    for (op, r) in refusals {
        let e = r.expect_err(op);
        assert_eq!(e.code(), Some(ErrorCode::WrongKeyType), "{op}: {e}");
        let m = e.to_string();
        assert!(
            m.contains(&format!("`{op}` needs a key of type `aes256-gcm`"))
                && m.contains("acme/hooks")
                && m.contains("hmac-sha256")
                && !m.contains("opening"),
            "{op}: {m}"
        );
    }
}

#[tokio::test]
async fn bad_mac_input_is_typed_and_the_daemon_stays_up() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create_of_type(&path("acme/hooks"), KeyType::HmacSha256).await.unwrap();
    let good = c.mac(&path("acme/hooks"), b"m", None).await.unwrap().tag;
    let body = good.strip_prefix("khm1:").unwrap();
    let raw = |op: &str, params: serde_json::Value| {
        let c = &c;
        let op = op.to_owned();
        async move { c.call_raw(&op, params).await.unwrap_err() }
    };
    for (tag, why) in [
        ("", "must start with `khm1:`"),
        ("khm2:AAAA", "must start with `khm1:`"),
        ("khm1:!!!!", "bad base64url"),
        (&format!("khm1:{}", &body[..40]), "30 bytes"),
        (&format!("khm1:{body}AAAA"), "39 bytes"),
        (&format!("khm1:{body}="), "bad base64url"),
        ("khm1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "version 0"),
    ] {
        let e = raw(
            "mac_verify",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "bQ==", "tag": tag}),
        )
        .await;
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{tag}: {e}");
        assert!(e.to_string().contains(why) && e.to_string().contains("tag"), "{tag}: {e}");
    }
    let big = SecretBytes::from_slice(&vec![b'x'; keyhaven::mac::MAX_MAC_MESSAGE + 1]);
    for params in [
        serde_json::json!({"tenant": "acme", "key": "hooks", "message": big}),
        serde_json::json!({"tenant": "acme", "key": "hooks", "message": big, "tag": good}),
    ] {
        let op = if params.get("tag").is_some() { "mac_verify" } else { "mac" };
        let e = raw(op, params).await;
        assert_eq!(e.code(), Some(ErrorCode::PayloadTooLarge), "{op}: {e}");
        assert!(e.to_string().contains("65536"), "{e}");
    }
    for (op, params, code) in [
        (
            "mac",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "not base64!"}),
            ErrorCode::BadRequest,
        ),
        ("mac", serde_json::json!({"tenant": "acme", "key": "hooks"}), ErrorCode::BadRequest),
        (
            "mac",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "", "extra": 1}),
            ErrorCode::BadRequest,
        ),
        (
            "mac",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "", "version": -1}),
            ErrorCode::BadRequest,
        ),
        (
            "mac",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "", "version": 0}),
            ErrorCode::BadRequest,
        ),
        (
            "mac",
            serde_json::json!({"tenant": "acme", "key": "hooks", "message": "", "version": 9}),
            ErrorCode::NotFound,
        ),
        ("mac", serde_json::json!({"tenant": "ACME", "key": "hooks", "message": ""}), ErrorCode::BadRequest),
        ("mac", serde_json::json!({"tenant": "acme", "key": "nope", "message": ""}), ErrorCode::NotFound),
        (
            "key_create",
            serde_json::json!({"tenant": "acme", "key": "k", "type": "rsa-1024"}),
            ErrorCode::BadRequest,
        ),
        ("key_create", serde_json::json!({"tenant": "acme", "key": "k", "type": 3}), ErrorCode::BadRequest),
    ] {
        let e = raw(op, params.clone()).await;
        assert_eq!(e.code(), Some(code), "{op} {params}: {e}");
    }
    // The CLI refuses a malformed tag before connecting, as a usage error.
    let out = d.cli(&["mac", "verify", "acme/hooks", "--tag", "khm1:xyz"], b"m");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = d.cli(&["key", "create", "acme/k2", "--type", "rsa"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("hmac-sha256"), "{}", text(&out));
    // Nothing was made, and the daemon still answers.
    assert_eq!(c.key_list(Some("acme")).await.unwrap().len(), 1);
    assert!(c.mac_verify(&path("acme/hooks"), b"m", &good).await.unwrap());
}

#[tokio::test]
async fn every_revocation_scope_covering_a_key_refuses_mac_and_verify() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let key = path("acme/hooks");
    c.key_create_of_type(&key, KeyType::HmacSha256).await.unwrap();
    c.key_create_of_type(&path("other/hooks"), KeyType::HmacSha256).await.unwrap();
    let tag1 = c.mac(&key, b"m", None).await.unwrap().tag;
    c.call(&keyhaven::lifecycle::KeyRotate {
        tenant: "acme".into(),
        key: "hooks".into(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    let tag2 = c.mac(&key, b"m", None).await.unwrap().tag;
    let k = |version| Scope::Key { tenant: "acme".into(), key: "hooks".into(), version };
    for scope in [k(None), Scope::Tenant { tenant: "acme".into() }, Scope::All] {
        c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None })
            .await
            .unwrap();
        assert_eq!(code_of(c.mac(&key, b"m", None).await), ErrorCode::Revoked, "{scope:?}");
        for t in [&tag1, &tag2] {
            assert_eq!(code_of(c.mac_verify(&key, b"m", t).await), ErrorCode::Revoked, "{scope:?}");
        }
        let other = c.mac(&path("other/hooks"), b"m", None).await;
        assert_eq!(other.is_ok(), scope != Scope::All, "{scope:?}: {other:?}");
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
        assert!(c.mac_verify(&key, b"m", &tag1).await.unwrap());
    }
    // One version: its tags and MACs under it are refused, the other's work.
    c.call(&Revoke { scope: k(Some(1)), reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    assert_eq!(code_of(c.mac_verify(&key, b"m", &tag1).await), ErrorCode::Revoked);
    assert_eq!(code_of(c.mac(&key, b"m", Some(1)).await), ErrorCode::Revoked);
    assert!(c.mac_verify(&key, b"m", &tag2).await.unwrap());
    assert_eq!(c.mac(&key, b"m", None).await.unwrap().tag, tag2);
    // Destroyed: gone for good, even once the revocation records are lifted.
    c.call(&Revoke { scope: k(None), reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let done = c.call(&Destroy { scope: k(None), confirm: "acme/hooks".into() }).await.unwrap();
    assert_eq!(done.erased, ["acme/hooks@1", "acme/hooks@2"]);
    assert_eq!(code_of(c.mac_verify(&key, b"m", &tag2).await), ErrorCode::Revoked);
}

#[tokio::test]
async fn mac_and_mac_verify_are_permissions_of_their_own_and_audited() {
    let mut d = TestDaemon::start();
    let signer = ensure_user("khtest-macsigner", &[]);
    let checker = ensure_user("khtest-macchecker", &[]);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["mac", "encrypt", "decrypt"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["mac-verify"]
keys = ["acme/hooks"]
"#,
        signer.name, checker.name
    ));
    d.restart();
    ok(d.cli(&["key", "create", "acme/hooks", "--type", "hmac-sha256"], b""));
    ok(d.cli(&["key", "create", "beta/hooks", "--type", "hmac-sha256"], b""));
    let sock = d.socket();

    let tag = ok(run_cli_as(&signer, sock, &["mac", "acme/hooks"], b"payload"));
    let out = run_cli_as(&signer, sock, &["mac", "verify", "acme/hooks", "--tag", &tag], b"payload");
    assert!(text(&out).contains("permission_denied") && text(&out).contains("mac-verify"), "{}", text(&out));
    ok(run_cli_as(&checker, sock, &["mac", "verify", "acme/hooks", "--tag", &tag], b"payload"));
    let out = run_cli_as(&checker, sock, &["mac", "acme/hooks"], b"payload");
    assert!(text(&out).contains("permission_denied") && text(&out).contains("`mac`"), "{}", text(&out));
    // Out of the granted keys, the refusal says nothing about the key.
    for k in ["beta/hooks", "beta/none"] {
        let out = run_cli_as(&signer, sock, &["mac", k], b"payload");
        assert!(text(&out).contains("permission_denied"), "{k}: {}", text(&out));
    }

    // Every call is in the audit log, with the key and the version.
    let log = ok(d.cli(&["audit", "tail", "--json", "-n", "50"], b""));
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find = |op: &str, outcome: &str| {
        records.iter().filter(|r| r["op"] == op && r["outcome"] == outcome).cloned().collect::<Vec<_>>()
    };
    let made = find("mac", "ok");
    assert_eq!(made.len(), 1, "{log}");
    assert_eq!(
        (made[0]["tenant"].as_str(), made[0]["key"].as_str(), made[0]["version"].as_u64()),
        (Some("acme"), Some("hooks"), Some(1))
    );
    assert_eq!(made[0]["caller"]["uid"].as_u64(), Some(u64::from(signer.uid)), "{log}");
    assert_eq!(find("mac_verify", "ok").len(), 1, "{log}");
    assert_eq!(find("mac_verify", "denied").len(), 1, "{log}");
    assert_eq!(find("mac", "denied").len(), 3, "{log}");
    assert!(!log.contains("payload") && !log.contains("cGF5bG9hZA"), "no message in the audit log");
}
