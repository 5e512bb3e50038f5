//! `verify` against the real daemon and token (PROTOCOL.md §3.34): the
//! token checks signatures made by `sign` with each version's stored public
//! key; altered messages, other versions, garbage signatures fail (exit 1);
//! retired versions, wrong key types, every revocation scope, a missing
//! permission and bad input are named errors (exit 3); it is audited.

use std::process::Output;

use keyhaven::sign::Verify;
use keyhaven::wire::SecretBytes;
use keyhaven::{ErrorCode, KeyType};
use keyhaven_tests::*;
use sha2::Digest as _;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "expected success, got {}: {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn exit(out: &Output, code: i32, says: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", text(out));
    assert!(text(out).contains(says), "expected `{says}` in: {}", text(out));
}

#[tokio::test]
async fn the_token_verifies_signatures_of_each_version() {
    let d = TestDaemon::start();
    for key_type in ["ecdsa-p256", "ecdsa-p384"] {
        let key = format!("acme/{key_type}");
        ok(d.cli(&["key", "create", &key, "--type", key_type], b""));
        let msg = b"invoice 42: pay 10 EUR".as_slice();
        let sig1 = ok(d.cli(&["sign", &key], msg)).trim().to_owned();
        exit(&d.cli(&["verify", &key, "--signature", &sig1], msg), 0, "verifies (key");
        exit(
            &d.cli(&["verify", &key, "--signature", &sig1], b"invoice 42: pay 99 EUR"),
            1,
            "does not verify",
        );
        // The digest form, both ways.
        let digest = if key_type == "ecdsa-p256" {
            sha2::Sha256::digest(msg).to_vec()
        } else {
            sha2::Sha384::digest(msg).to_vec()
        };
        exit(&d.cli(&["verify", &key, "--signature", &sig1, "--digest"], &digest), 0, "verifies");
        let sig_d = ok(d.cli(&["sign", &key, "--digest"], &digest)).trim().to_owned();
        exit(&d.cli(&["verify", &key, "--signature", &sig_d], msg), 0, "verifies");
        let out = d.cli(&["verify", &key, "--signature", &sig1, "--digest"], &digest[..20]);
        exit(&out, 4, "bad_request");

        // Rotation: the current version does not verify the old signature;
        // --version 1 does, until version 1 is retired.
        ok(d.cli(&["key", "rotate", &key], b""));
        exit(&d.cli(&["verify", &key, "--signature", &sig1], msg), 1, "version 2");
        exit(&d.cli(&["verify", &key, "--signature", &sig1, "--version", "1"], msg), 0, "version 1");
        let json = ok(d.cli(&["verify", &key, "--signature", &sig1, "--version", "1", "--json"], msg));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!((v["valid"].as_bool(), v["key_version"].as_u64()), (Some(true), Some(1)), "{json}");
        ok(d.cli(&["key", "set", &key, "--min-decryption-version", "2"], b""));
        exit(&d.cli(&["verify", &key, "--signature", &sig1, "--version", "1"], msg), 4, "version_retired");
        exit(&d.cli(&["verify", &key, "--signature", &sig1, "--version", "9"], msg), 4, "not_found");

        // Garbage that is base64 is not a signature: it does not verify.
        let mut bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &sig1).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let flipped = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes);
        exit(&d.cli(&["verify", &key, "--signature", &flipped, "--version", "2"], msg), 1, "does not verify");
        exit(&d.cli(&["verify", &key, "--signature", "AAAA"], msg), 1, "does not verify");
        exit(&d.cli(&["verify", &key, "--signature", "not base64!"], msg), 4, "bad_request");
    }
    // Usage errors exit 2, before any daemon is asked.
    exit(
        &d.cli(&["verify", "acme/ecdsa-p256", "--signature", "AAAA", "--version", "0"], b"m"),
        2,
        "start at 1",
    );
    exit(&d.cli(&["verify", "acme/ecdsa-p256"], b"m"), 2, "--signature");
}

#[tokio::test]
async fn verify_refuses_other_key_types_revocation_and_bad_input() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create_of_type(&path("acme/signer"), KeyType::EcdsaP256).await.unwrap();
    c.key_create_of_type(&path("acme/hooks"), KeyType::HmacSha256).await.unwrap();
    c.key_create(&path("acme/pii")).await.unwrap();
    let sig = ok(d.cli(&["sign", "acme/signer"], b"m")).trim().to_owned();
    // The client crate's method.
    let r = c.verify(&path("acme/signer"), b"m", &sig, None).await.unwrap();
    assert!(r.valid && r.key_version == 1 && r.algorithm == "ecdsa-p256-sha256", "{r:?}");
    assert!(!c.verify(&path("acme/signer"), b"n", &sig, None).await.unwrap().valid);
    for key in ["acme/hooks", "acme/pii"] {
        let e = c.verify(&path(key), b"m", &sig, None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::WrongKeyType), "{key}: {e}");
        exit(&d.cli(&["verify", key, "--signature", &sig], b"m"), 4, "wrong_key_type");
    }
    let req = |message: Option<&[u8]>, digest: Option<&[u8]>, signature: &str| Verify {
        tenant: "acme".into(),
        key: "signer".into(),
        version: None,
        message: message.map(SecretBytes::from_slice),
        digest: digest.map(SecretBytes::from_slice),
        signature: signature.into(),
    };
    for (r, want) in [
        (req(None, None, &sig), ErrorCode::BadRequest),
        (req(Some(b"m"), Some(&[0; 32]), &sig), ErrorCode::BadRequest),
        (req(None, Some(&[0; 48]), &sig), ErrorCode::BadRequest),
        (req(Some(b"m"), None, "%%%"), ErrorCode::BadRequest),
        (req(Some(&vec![0; 65537]), None, &sig), ErrorCode::PayloadTooLarge),
    ] {
        assert_eq!(c.call(&r).await.unwrap_err().code(), Some(want), "{r:?}");
    }
    for body in [
        serde_json::json!({"tenant": "acme", "key": "signer", "message": "bQ==", "signature": sig, "version": 0}),
        serde_json::json!({"tenant": "acme", "key": "signer", "message": "bQ==", "signature": sig, "x": 1}),
        serde_json::json!({"tenant": "acme", "key": "signer", "message": "bQ=="}),
    ] {
        let e = c.call_raw("verify", body.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{body}");
    }
    let e = c.verify(&path("acme/none"), b"m", &sig, None).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));

    // Every revocation scope covering the key refuses it.
    use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
    let k = |version| Scope::Key { tenant: "acme".into(), key: "signer".into(), version };
    for scope in [k(Some(1)), k(None), Scope::Tenant { tenant: "acme".into() }, Scope::All] {
        c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None })
            .await
            .unwrap();
        let e = c.verify(&path("acme/signer"), b"m", &sig, None).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{scope:?}");
        let e = c.verify(&path("acme/signer"), b"m", &sig, Some(1)).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{scope:?}");
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
    }
    assert!(c.verify(&path("acme/signer"), b"m", &sig, None).await.unwrap().valid);

    // Audited with the key and version, never the message or signature.
    let log = ok(d.cli(&["audit", "tail", "--json", "-n", "300"], b""));
    let verified: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["op"] == "verify")
        .collect();
    assert!(
        verified.iter().any(|r| r["outcome"] == "ok" && r["key"] == "signer" && r["version"] == 1),
        "{log}"
    );
    assert!(verified.iter().any(|r| r["outcome"] != "ok"), "{log}");
    assert!(!log.contains(&sig), "the signature is not in the audit log");
}

#[tokio::test]
async fn verify_is_a_permission_of_its_own() {
    let mut d = TestDaemon::start();
    let verifier = ensure_user("khtest-verifier", &[]);
    let reader = ensure_user("khtest-pkreader", &[]);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["verify"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["public-key"]
keys = ["*"]
"#,
        verifier.name, reader.name
    ));
    d.restart();
    ok(d.cli(&["key", "create", "acme/jwt", "--type", "ecdsa-p256"], b""));
    let sig = ok(d.cli(&["sign", "acme/jwt"], b"m")).trim().to_owned();
    let sock = d.socket();
    exit(&run_cli_as(&verifier, sock, &["verify", "acme/jwt", "--signature", &sig], b"m"), 0, "verifies");
    exit(&run_cli_as(&verifier, sock, &["sign", "acme/jwt"], b"m"), 1, "permission_denied");
    let out = run_cli_as(&reader, sock, &["verify", "acme/jwt", "--signature", &sig], b"m");
    exit(&out, 4, "permission_denied");
    assert!(text(&out).contains("`verify`"), "{}", text(&out));
}
