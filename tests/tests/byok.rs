//! Bring your own key (PROTOCOL.md §3.35–3.36, OPERATIONS.md §16) against
//! the real daemon and token, with the customer's side done by openssl
//! exactly as the docs say: material made with `openssl rand`, wrapped to
//! the one-time public key with `openssl pkeyutl` (RSA-OAEP) or, for
//! RSA_AES_KEY_WRAP, `openssl enc -id-aes256-wrap-pad` under an ephemeral
//! AES key that `openssl pkeyutl` wraps. The imported keys then agree with
//! software holding the same material: an AES key's data keys open offline
//! (aes-gcm with the known material) and the daemon opens envelopes made
//! offline; an HMAC key's tags are what `openssl dgst -mac HMAC` computes.
//! These are the only tests that know a key's material, because they chose
//! it. Bad inputs are typed; import tokens are single use, expire, are
//! bound to their key and do not survive a restart; `import` is a
//! permission of its own, audited without material, under revocation.

use std::path::Path;
use std::process::{Command, Output};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use keyhaven::envelope::{aad, envelope_header, Envelope, EnvelopeId};
use keyhaven::mac::MacTag;
use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
use keyhaven_tests::*;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "expected success, got {}: {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[track_caller]
fn refused(out: Output, code: &str, why: &str) {
    assert!(!out.status.success(), "expected a refusal: {}", text(&out));
    assert!(text(&out).contains(code) && text(&out).contains(why), "expected {code} `{why}`: {}", text(&out));
}

/// Runs a shell command line of the docs in `dir` and checks it worked.
#[track_caller]
fn sh(dir: &Path, line: &str) {
    let out = Command::new("sh").arg("-ec").arg(line).current_dir(dir).output().expect("sh");
    assert!(out.status.success(), "`{line}` failed: {}", text(&out));
}

/// The customer's side of OPERATIONS.md §16.2 (RSAES_OAEP_SHA_1): 32 bytes
/// of material (or `bytes`), encrypted to `WrappingPublicKey.pem`.
fn wrap_oaep(dir: &Path, bytes: usize) -> Vec<u8> {
    sh(dir, &format!("openssl rand -out KeyMaterial.bin {bytes}"));
    sh(
        dir,
        "openssl pkeyutl -encrypt -pubin -inkey WrappingPublicKey.pem -in KeyMaterial.bin \
         -out EncryptedKeyMaterial.bin -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 \
         -pkeyopt rsa_mgf1_md:sha1",
    );
    std::fs::read(dir.join("KeyMaterial.bin")).unwrap()
}

/// The customer's side of OPERATIONS.md §16.3 (RSA_AES_KEY_WRAP_SHA_1).
fn wrap_rsa_aes(dir: &Path) -> Vec<u8> {
    sh(dir, "openssl rand -out KeyMaterial.bin 32");
    sh(dir, "openssl rand -out aes-key.bin 32");
    sh(
        dir,
        "openssl enc -id-aes256-wrap-pad -K \"$(od -An -v -tx1 aes-key.bin | tr -d ' \\n')\" -iv A65959A6 \
         -in KeyMaterial.bin -out material-wrapped.bin",
    );
    sh(
        dir,
        "openssl pkeyutl -encrypt -pubin -inkey WrappingPublicKey.pem -in aes-key.bin -out aes-key-wrapped.bin \
         -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1",
    );
    sh(dir, "cat aes-key-wrapped.bin material-wrapped.bin > EncryptedKeyMaterial.bin");
    sh(dir, "rm -f aes-key.bin");
    std::fs::read(dir.join("KeyMaterial.bin")).unwrap()
}

/// `keyhaven key import-params KEY [extra] --public-key-out WrappingPublicKey.pem`: the token.
fn params(d: &TestDaemon, dir: &Path, key: &str, extra: &[&str]) -> String {
    let pem = dir.join("WrappingPublicKey.pem");
    let mut args = vec!["key", "import-params", key, "--public-key-out", pem.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(d.cli(&args, b""))
}

fn import(d: &TestDaemon, dir: &Path, key: &str, token: &str, extra: &[&str]) -> Output {
    let wrapped = dir.join("EncryptedKeyMaterial.bin");
    let mut args =
        vec!["key", "import", key, "--wrapped", wrapped.to_str().unwrap(), "--import-token", token];
    args.extend_from_slice(extra);
    d.cli(&args, b"")
}

#[tokio::test]
async fn openssl_wrapped_material_imports_and_agrees_with_software_holding_it() {
    let mut d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // The one-time wrapping key is RSA-3072, as openssl reads it.
    let token = params(&d, dir, "acme/byok", &[]);
    assert!(token.starts_with("khi1."), "{token}");
    let info = Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(dir.join("WrappingPublicKey.pem"))
        .output()
        .unwrap();
    assert!(text(&info).contains("3072 bit"), "{}", text(&info));

    // An AES key, RSAES_OAEP_SHA_1.
    let material = wrap_oaep(dir, 32);
    let json: serde_json::Value =
        serde_json::from_str(&ok(import(&d, dir, "acme/byok", &token, &[]))).unwrap();
    assert_eq!(json["origin"], "external", "{json}");
    assert_eq!(json["versions"][0]["origin"], "external", "{json}");
    assert_eq!(json["current_version"], 1);
    let list = ok(d.cli(&["key", "list", "acme"], b""));
    assert!(list.contains("external"), "{list}");

    // Its data keys open offline under the known material...
    let c = d.client().await;
    let context = ctx(&["tenant=acme"]);
    let made = c.datakey(&path("acme/byok"), &context, keyhaven::Plaintext::Include).await.unwrap();
    let env: Envelope = made.envelope.parse().unwrap();
    let software = Aes256Gcm::new_from_slice(&material).unwrap();
    let dek = software
        .decrypt(
            Nonce::from_slice(env.nonce()),
            Payload { msg: env.wrapped_dek(), aad: &aad(&env.header(), &context) },
        )
        .expect("the imported key's data key opens under the known material");
    assert_eq!(dek, made.plaintext.unwrap().expose());
    // ... and the daemon opens an envelope made offline with the material.
    let (id, nonce, chosen) = (EnvelopeId([7; 16]), [9u8; 12], [42u8; 32]);
    let header = envelope_header(&path("acme/byok"), 1, &id, &nonce);
    let wrapped = software
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: &chosen, aad: &aad(&header, &context) })
        .unwrap();
    let offline = Envelope::new(path("acme/byok"), 1, id, nonce, wrapped.try_into().unwrap());
    let opened = c.datakey_decrypt(&offline.to_string(), &context).await.unwrap();
    assert_eq!(opened.plaintext.expose(), chosen);
    // Encryption round trip, across a restart (the version is stored like any).
    let ct = c.encrypt(&path("acme/byok"), b"imported", &context).await.unwrap();
    drop(c);
    d.restart();
    let c = d.client().await;
    assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), b"imported");

    // An HMAC key, RSA_AES_KEY_WRAP_SHA_1: its tags are openssl's HMAC.
    let token = params(&d, dir, "acme/hooks", &["--type", "hmac-sha256"]);
    let material = wrap_rsa_aes(dir);
    ok(import(&d, dir, "acme/hooks", &token, &["--algorithm", "rsa-aes-key-wrap-sha1"]));
    let offline_mac = |material: &[u8]| {
        std::fs::write(dir.join("msg"), b"webhook body").unwrap();
        let hex: String = material.iter().map(|b| format!("{b:02x}")).collect();
        let out = Command::new("openssl")
            .args(["dgst", "-sha256", "-mac", "HMAC", "-macopt", &format!("hexkey:{hex}"), "-r"])
            .arg(dir.join("msg"))
            .output()
            .unwrap();
        text(&out).split_whitespace().next().unwrap().to_owned()
    };
    let tag: MacTag = ok(d.cli(&["mac", "acme/hooks"], b"webhook body")).parse().unwrap();
    let daemon_hex: String = tag.mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!((tag.version, daemon_hex), (1, offline_mac(&material)));

    // Re-import: a new version of the imported key, of new material.
    let token = params(&d, dir, "acme/hooks", &["--type", "hmac-sha256"]);
    let material2 = wrap_oaep(dir, 32);
    let json: serde_json::Value =
        serde_json::from_str(&ok(import(&d, dir, "acme/hooks", &token, &[]))).unwrap();
    assert_eq!(json["current_version"], 2, "{json}");
    assert_eq!(json["versions"][1]["origin"], "external", "{json}");
    let tag2: MacTag = ok(d.cli(&["mac", "acme/hooks"], b"webhook body")).parse().unwrap();
    let hex2: String = tag2.mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!((tag2.version, hex2), (2, offline_mac(&material2)));
    // The old version's tags verify until it is retired, as for any key.
    ok(d.cli(&["mac", "verify", "acme/hooks", "--tag", &tag.to_string()], b"webhook body"));
    // The token makes no versions of an imported key, not even in a
    // master-key rotation, which passes it by (OPERATIONS.md §16.4).
    refused(d.cli(&["key", "rotate", "acme/hooks"], b""), "bad_request", "imported material");
    ok(d.cli(&["admin", "rotate-master"], b""));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["key", "show", "acme/hooks"], b""))).unwrap();
    assert_eq!((shown["current_version"].as_u64(), shown["origin"].as_str()), (Some(2), Some("external")));
    let tag3: MacTag = ok(d.cli(&["mac", "acme/hooks"], b"webhook body")).parse().unwrap();
    assert_eq!(tag3.mac, tag2.mac);
    refused(
        d.cli(&["key", "set", "acme/hooks", "--rotate-every", "30d"], b""),
        "bad_request",
        "imported material",
    );

    // OAEP with SHA-256: SoftHSM2 2.6.1 has OAEP with SHA-1 only
    // (CKR_ARGUMENTS_BAD), said as a refusal of the request naming it.
    let token = params(&d, dir, "acme/sha256", &[]);
    sh(dir, "openssl rand -out KeyMaterial.bin 32");
    sh(
        dir,
        "openssl pkeyutl -encrypt -pubin -inkey WrappingPublicKey.pem -in KeyMaterial.bin \
         -out EncryptedKeyMaterial.bin -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 \
         -pkeyopt rsa_mgf1_md:sha256",
    );
    let out = import(&d, dir, "acme/sha256", &token, &["--algorithm", "rsaes-oaep-sha256"]);
    refused(out, "bad_request", "does not unwrap with RSA-OAEP-SHA-256");
}

#[tokio::test]
async fn bad_import_tokens_and_material_are_typed_refusals() {
    let mut d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Garbage in place of wrapped material: refused, and the token is used up.
    let token = params(&d, dir, "acme/k", &[]);
    std::fs::write(dir.join("EncryptedKeyMaterial.bin"), [0x5au8; 384]).unwrap();
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "not key material encrypted");
    wrap_oaep(dir, 32);
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "unknown or already used");
    // The wrong size of wrapped bytes, and of material.
    let token = params(&d, dir, "acme/k", &[]);
    std::fs::write(dir.join("EncryptedKeyMaterial.bin"), [1u8; 10]).unwrap();
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "one 384-byte RSA-OAEP block");
    let token = params(&d, dir, "acme/k", &[]);
    wrap_oaep(dir, 16);
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "16 bytes");
    let token = params(&d, dir, "acme/k", &[]);
    wrap_oaep(dir, 32);
    refused(
        import(&d, dir, "acme/k", &token, &["--algorithm", "rsa-aes-key-wrap-sha1"]),
        "bad_request",
        "RSA-OAEP block of the AES key",
    );
    // A token for another key: refused, and still good for its own.
    let token = params(&d, dir, "acme/k", &[]);
    wrap_oaep(dir, 32);
    refused(import(&d, dir, "acme/other", &token, &[]), "bad_request", "issued for key `acme/k`");
    ok(import(&d, dir, "acme/k", &token, &[]));
    // Used: refused.
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "unknown or already used");
    refused(import(&d, dir, "acme/k", "not-a-token", &[]), "bad_request", "not an import token");
    // Expired.
    let token = params(&d, dir, "acme/k", &["--expires-in", "1"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "expired");
    refused(d.cli(&["key", "import-params", "acme/k", "--expires-in", "90000"], b""), "bad_request", "86400");
    // Forgotten by a restart (said in the docs), and the key itself kept.
    let token = params(&d, dir, "acme/k", &[]);
    d.restart();
    refused(import(&d, dir, "acme/k", &token, &[]), "bad_request", "restart");
    ok(d.cli(&["encrypt", "acme/k"], b"still here"));
    // Types that cannot be imported; keys whose material the token made.
    // The CLI offers only the importable types and refuses others before
    // sending anything (exit 2); the daemon refuses them for any client.
    let out = d.cli(&["key", "import-params", "acme/e", "--type", "ecdsa-p256"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("[possible values: aes256-gcm, hmac-sha256]"), "{}", text(&out));
    let c = d.client().await;
    let e = c.key_import_params(&path("acme/e"), keyhaven::KeyType::EcdsaP256, None).await.unwrap_err();
    assert_eq!(e.code(), Some(keyhaven::ErrorCode::BadRequest), "{e}");
    assert!(e.to_string().contains("`ecdsa-p256` cannot be imported"), "{e}");
    ok(d.cli(&["key", "create", "acme/generated"], b""));
    refused(
        d.cli(&["key", "import-params", "acme/generated"], b""),
        "already_exists",
        "generated in the token",
    );
    refused(
        d.cli(&["key", "import-params", "acme/k", "--type", "hmac-sha256"], b""),
        "wrong_key_type",
        "aes256-gcm",
    );
    // A wrapped file over the limit never reaches the daemon.
    std::fs::write(dir.join("EncryptedKeyMaterial.bin"), vec![0u8; 5000]).unwrap();
    refused(import(&d, dir, "acme/k", "khi1.x", &[]), "", "at most 4096");
    // Raw requests: unknown fields and a bad base64 are named.
    let c = d.client().await;
    let e = c
        .call_raw(
            "key_import",
            serde_json::json!({"tenant": "acme", "key": "k", "import_token": "khi1.x", "wrapped": "%%"}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("base64"), "{e}");
}

#[tokio::test]
async fn import_is_a_permission_of_its_own_audited_and_under_revocation() {
    let mut d = TestDaemon::start();
    let importer = ensure_user("khtest-importer", &[]);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["import"]
keys = ["acme/*"]
"#,
        importer.name
    ));
    d.restart();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = d.socket();
    let pem = dir.join("WrappingPublicKey.pem");
    let token = ok(run_cli_as(
        &importer,
        sock,
        &["key", "import-params", "acme/k", "--public-key-out", pem.to_str().unwrap()],
        b"",
    ));
    let material = wrap_oaep(dir, 32);
    let wrapped = dir.join("EncryptedKeyMaterial.bin");
    let w = wrapped.to_str().unwrap();
    ok(run_cli_as(
        &importer,
        sock,
        &["key", "import", "acme/k", "--wrapped", w, "--import-token", &token],
        b"",
    ));
    // Only import: no other operation, and not outside its keys.
    refused(run_cli_as(&importer, sock, &["encrypt", "acme/k"], b"m"), "permission_denied", "encrypt");
    refused(
        run_cli_as(&importer, sock, &["key", "import-params", "beta/k"], b""),
        "permission_denied",
        "import",
    );

    // Audited, with the origin and without the material.
    let c = d.client().await;
    let records = audit_records(&c).await;
    let rec = records.iter().find(|r| r.op == "key_import" && r.outcome == "ok").expect("an import record");
    assert_eq!((rec.key.as_deref(), rec.version), (Some("k"), Some(1)));
    assert!(rec.detail.as_deref().unwrap_or_default().contains("origin external"), "{rec:?}");
    assert!(records.iter().any(|r| r.op == "key_import_params" && r.outcome == "ok"));
    let all = serde_json::to_string(&records).unwrap();
    let hex: String = material.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!all.contains(&hex) && !all.contains(&token), "material or token in the audit log");

    // Refused under every revocation scope that covers the key.
    for scope in [
        Scope::Key { tenant: "acme".into(), key: "k".into(), version: None },
        Scope::Tenant { tenant: "acme".into() },
        Scope::All,
    ] {
        let token = params(&d, dir, "acme/k", &[]);
        c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None })
            .await
            .unwrap();
        wrap_oaep(dir, 32);
        refused(import(&d, dir, "acme/k", &token, &[]), "revoked", "");
        refused(d.cli(&["key", "import-params", "acme/k"], b""), "revoked", "");
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
        // Nothing was consumed by a refused request.
        ok(import(&d, dir, "acme/k", &token, &[]));
    }
}

/// An imported version is destroyed like any (its material erased from the
/// store); the owner's copy can be imported again, as a new version: data
/// under the destroyed version stays refused, new data uses the new one.
#[tokio::test]
async fn an_imported_version_is_destroyed_and_its_material_imported_again() {
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let token = params(&d, dir, "acme/k", &[]);
    let material = wrap_oaep(dir, 32);
    ok(import(&d, dir, "acme/k", &token, &[]));
    let c = d.client().await;
    let context = ctx(&[]);
    let old = c.encrypt(&path("acme/k"), b"under v1", &context).await.unwrap();
    let scope = Scope::Key { tenant: "acme".into(), key: "k".into(), version: Some(1) };
    c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let done = c.call(&keyhaven::revocation::Destroy { scope, confirm: "acme/k".into() }).await.unwrap();
    assert_eq!(done.erased, ["acme/k@1"]);
    // The same material, wrapped to new import parameters.
    let token = params(&d, dir, "acme/k", &[]);
    std::fs::write(dir.join("KeyMaterial.bin"), &material).unwrap();
    sh(
        dir,
        "openssl pkeyutl -encrypt -pubin -inkey WrappingPublicKey.pem -in KeyMaterial.bin \
         -out EncryptedKeyMaterial.bin -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 \
         -pkeyopt rsa_mgf1_md:sha1",
    );
    let json: serde_json::Value = serde_json::from_str(&ok(import(&d, dir, "acme/k", &token, &[]))).unwrap();
    assert_eq!(json["current_version"], 2, "{json}");
    assert_eq!(json["versions"][0]["state"], "destroyed", "{json}");
    assert_eq!(json["versions"][1]["origin"], "external", "{json}");
    let refused = c.decrypt(&old.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(keyhaven::ErrorCode::Revoked));
    let new = c.encrypt(&path("acme/k"), b"under v2", &context).await.unwrap();
    assert_eq!(new.key_version, 2);
    assert_eq!(c.decrypt(&new.ciphertext, &context).await.unwrap().plaintext.expose(), b"under v2");
}
