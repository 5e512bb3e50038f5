//! Public-key (hybrid) encryption against the real daemon and token
//! (docs/ENVELOPE.md §11): `keyhaven encrypt --public-key` makes `khp1:`
//! ciphertexts offline, with no daemon, from the JWK of an `rsa-4096-oaep`
//! key; `keyhaven decrypt` opens them through the daemon, whose token
//! decrypts the data key with RSA-OAEP. Flipped bytes in every part, a
//! wrong context, a revoked or retired version, wrong key types both ways
//! and a missing permission are refused; a data key wrapped by openssl's
//! own `pkeyutl` opens too.

use std::process::{Command, Output};

use base64::Engine as _;
use keyhaven::{ErrorCode, KeyType};
use keyhaven_tests::*;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "expected success, got {}: {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the CLI with no daemon at its socket (offline encryption).
fn offline(args: &[&str], stdin: &[u8]) -> Output {
    run_cli(std::path::Path::new("/nonexistent/keyhaven.sock"), args, stdin)
}

#[tokio::test]
async fn offline_ciphertexts_open_through_the_daemon_and_altered_ones_do_not() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    ok(d.cli(&["key", "create", "acme/vault", "--type", "rsa-4096-oaep"], b""));
    let jwk = ok(d.cli(&["key", "public", "acme/vault", "--format", "jwk"], b""));
    let v: serde_json::Value = serde_json::from_str(&jwk).unwrap();
    assert_eq!(
        (v["kty"].as_str(), v["alg"].as_str(), v["kid"].as_str()),
        (Some("RSA"), Some("RSA-OAEP"), Some("acme/vault@1"))
    );
    let jwk_file = tmp.path().join("vault.jwk");
    std::fs::write(&jwk_file, &jwk).unwrap();
    let jwk_path = jwk_file.to_str().unwrap();

    // Offline: no daemon at this socket.
    let ct =
        ok(offline(&["encrypt", "--public-key", jwk_path, "--context", "provider=stripe"], b"sk_live_123"));
    let ct = ct.trim().to_owned();
    assert!(ct.starts_with("khp1:"), "{ct}");
    let again =
        ok(offline(&["encrypt", "--public-key", jwk_path, "--context", "provider=stripe"], b"sk_live_123"));
    assert_ne!(again.trim(), ct, "a fresh data key and nonce each time");
    let plain = ok(d.cli(&["decrypt", "--context", "provider=stripe"], ct.as_bytes()));
    assert_eq!(plain, "sk_live_123");
    let json: serde_json::Value = serde_json::from_str(&ok(
        d.cli(&["decrypt", "--json", "--context", "provider=stripe"], ct.as_bytes())
    ))
    .unwrap();
    assert_eq!((json["key"].as_str(), json["key_version"].as_u64()), (Some("vault"), Some(1)));
    // `inspect` reads it offline and names the same data-key id.
    let seen: serde_json::Value = serde_json::from_str(&ok(offline(&["inspect", &ct], b""))).unwrap();
    assert_eq!((seen["format"].as_str(), seen["key_version"].as_u64()), (Some("public_ciphertext"), Some(1)));
    assert_eq!((seen["plaintext_bytes"].as_u64(), &seen["envelope_id"]), (Some(11), &json["envelope_id"]));

    // Wrong or missing context: refused.
    for ctx in [&["--context", "provider=paypal"][..], &[][..]] {
        let out = d.cli(&[&["decrypt"][..], ctx].concat(), ct.as_bytes());
        assert!(!out.status.success() && text(&out).contains("integrity"), "{}", text(&out));
    }

    // Flipped bytes in each part: header (tenant, key name, version),
    // wrapped key, nonce, body, tag.
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&ct[5..]).unwrap();
    let t = 5 + 1 + 4 + 1 + 5; // "acme", "vault"
    let wrapped_at = t + 4 + 2;
    let nonce_at = wrapped_at + 512;
    let body_at = nonce_at + 12;
    let tag_at = bytes.len() - 16;
    for (what, at, want) in [
        ("tenant", 6, "not_found"),
        ("key name", 11, "not_found"),
        ("version", t + 3, "not_found"),
        ("wrapped key first", wrapped_at, "integrity"),
        ("wrapped key last", nonce_at - 1, "integrity"),
        ("nonce", nonce_at + 3, "integrity"),
        ("body", body_at + 2, "integrity"),
        ("tag", tag_at + 7, "integrity"),
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x02;
        let altered = format!("khp1:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b));
        let out = d.cli(&["decrypt", "--context", "provider=stripe"], altered.as_bytes());
        assert!(!out.status.success() && text(&out).contains(want), "{what}: {}", text(&out));
    }
    let out = d.cli(
        &["decrypt"],
        format!("khp1:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..100])).as_bytes(),
    );
    assert!(!out.status.success() && text(&out).contains("bad_envelope"), "{}", text(&out));

    // A data key wrapped by openssl's own pkeyutl (OAEP, SHA-1) into the same layout.
    let pem = ok(d.cli(&["key", "public", "acme/vault"], b""));
    std::fs::write(tmp.path().join("vault.pem"), pem).unwrap();
    let dk = [0x42u8; 32];
    std::fs::write(tmp.path().join("dk"), dk).unwrap();
    let out = Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey"])
        .arg(tmp.path().join("vault.pem"))
        .args(["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1", "-in"])
        .arg(tmp.path().join("dk"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let ct = keyhaven::hybrid::PublicCiphertext::seal(
        &path("acme/vault"),
        1,
        out.stdout,
        &dk,
        b"from openssl",
        &ctx(&[]),
    )
    .unwrap();
    assert_eq!(ok(d.cli(&["decrypt"], ct.to_string().as_bytes())), "from openssl");

    // Rotation: version 2 has a new key pair; version 1's ciphertexts still
    // open until it is retired; a revoked version is refused.
    ok(d.cli(&["key", "rotate", "acme/vault"], b""));
    let jwk2 = ok(d.cli(&["key", "public", "acme/vault", "--format", "jwk"], b""));
    assert!(jwk2.contains("acme/vault@2"), "{jwk2}");
    ok(d.cli(&["decrypt", "--context", "provider=stripe"], ct_v1(&d, jwk_path).as_bytes()));
    let c = d.client().await;
    use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
    let k = |version| Scope::Key { tenant: "acme".into(), key: "vault".into(), version };
    for scope in [k(Some(1)), k(None), Scope::Tenant { tenant: "acme".into() }, Scope::All] {
        c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None })
            .await
            .unwrap();
        let e = c.decrypt(&ct_v1(&d, jwk_path), &ctx(&["provider=stripe"])).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{scope:?}");
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
    }
    ok(d.cli(&["key", "set", "acme/vault", "--min-decryption-version", "2"], b""));
    let out = d.cli(&["decrypt", "--context", "provider=stripe"], ct_v1(&d, jwk_path).as_bytes());
    assert!(text(&out).contains("version_retired"), "{}", text(&out));

    // Audited as a decrypt of the key and version, never the plaintext.
    let log = ok(d.cli(&["audit", "tail", "--json", "-n", "300"], b""));
    assert!(log.lines().any(|l| l.contains(r#""op":"decrypt""#) && l.contains(r#""key":"vault""#)), "{log}");
    assert!(!log.contains("sk_live_123"));
}

/// A version-1 ciphertext made offline.
fn ct_v1(_d: &TestDaemon, jwk_path: &str) -> String {
    ok(offline(&["encrypt", "--public-key", jwk_path, "--context", "provider=stripe"], b"sk_live_123"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn public_key_encryption_refuses_other_types_and_bad_files() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let c = d.client().await;
    c.key_create_of_type(&path("acme/vault"), KeyType::RsaOaep4096).await.unwrap();
    c.key_create_of_type(&path("acme/signer"), KeyType::RsaPss3072).await.unwrap();
    c.key_create(&path("acme/pii")).await.unwrap();
    // An rsa-4096-oaep key neither encrypts with AES, nor signs, nor MACs.
    let e = c.encrypt(&path("acme/vault"), b"m", &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::WrongKeyType));
    let out = d.cli(&["sign", "acme/vault"], b"m");
    assert!(text(&out).contains("wrong_key_type"), "{}", text(&out));
    // A khp1: ciphertext naming a key of another type is refused by name.
    let signer_jwk = ok(d.cli(&["key", "public", "acme/signer", "--format", "jwk"], b""));
    std::fs::write(tmp.path().join("signer.jwk"), &signer_jwk).unwrap();
    let out = offline(&["encrypt", "--public-key", tmp.path().join("signer.jwk").to_str().unwrap()], b"m");
    assert!(!out.status.success() && text(&out).contains("rsa-4096-oaep"), "{}", text(&out));
    let vault_jwk = ok(d.cli(&["key", "public", "acme/vault", "--format", "jwk"], b""));
    for other in ["acme/pii", "acme/signer"] {
        let forged = vault_jwk.replace("acme/vault@1", &format!("{other}@1"));
        std::fs::write(tmp.path().join("forged.jwk"), forged).unwrap();
        let ct =
            ok(offline(&["encrypt", "--public-key", tmp.path().join("forged.jwk").to_str().unwrap()], b"m"));
        let out = d.cli(&["decrypt"], ct.trim().as_bytes());
        assert!(text(&out).contains("wrong_key_type"), "{other}: {}", text(&out));
        // Named as the operation asked for, with the type a `khp1:` ciphertext needs.
        assert!(
            text(&out).contains("`decrypt` needs a key of type `rsa-4096-oaep`"),
            "{other}: {}",
            text(&out)
        );
    }
    // Bad files: named, before anything is written.
    std::fs::write(tmp.path().join("junk"), "not json").unwrap();
    for (file, says) in [("junk", "not a JWK"), ("missing", "No such file")] {
        let out = offline(&["encrypt", "--public-key", tmp.path().join(file).to_str().unwrap()], b"m");
        assert!(!out.status.success() && text(&out).contains(says), "{}", text(&out));
    }
    let out = offline(&["encrypt", "acme/pii", "--public-key", "x"], b"m");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test]
async fn opening_a_public_key_ciphertext_needs_decrypt() {
    let mut d = TestDaemon::start();
    let writer = ensure_user("khtest-pkwriter", &[]);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["public-key"]
keys = ["*"]
"#,
        writer.name
    ));
    d.restart();
    ok(d.cli(&["key", "create", "acme/vault", "--type", "rsa-4096-oaep"], b""));
    let sock = d.socket();
    // The writer reads the public key and encrypts, but cannot read back.
    let jwk = ok(run_cli_as(&writer, sock, &["key", "public", "acme/vault", "--format", "jwk"], b""));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("k.jwk"), jwk).unwrap();
    let ct = ok(offline(&["encrypt", "--public-key", tmp.path().join("k.jwk").to_str().unwrap()], b"secret"));
    let out = run_cli_as(&writer, sock, &["decrypt"], ct.trim().as_bytes());
    assert!(text(&out).contains("permission_denied") && text(&out).contains("decrypt"), "{}", text(&out));
    assert_eq!(ok(d.cli(&["decrypt"], ct.trim().as_bytes())), "secret");
}
