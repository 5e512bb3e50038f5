//! ECDSA signing keys against the real daemon and token (PROTOCOL.md
//! §3.31–3.32), checked by a tool nobody here wrote: openssl verifies
//! every signature from the exported PEM, for both curves, over messages
//! and over digests the caller computed, before and after key rotation and
//! master-key rotation; altered messages and other versions' keys fail.
//! Wrong key types, revocation scopes, permissions, audit and bad input
//! are checked too. The signing tests run on the sled store and on a
//! throwaway PostgreSQL.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use keyhaven::sign::{PublicKey, Sign};
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

/// Whether `openssl dgst -<hash> -verify pem -signature sig` accepts `msg`.
fn openssl_verifies(dir: &Path, hash: &str, pem: &str, sig_b64: &str, msg: &[u8]) -> bool {
    let (p, s, m) = (dir.join("pub.pem"), dir.join("sig.der"), dir.join("msg"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&s, base64::engine::general_purpose::STANDARD.decode(sig_b64.trim()).unwrap()).unwrap();
    std::fs::write(&m, msg).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", &format!("-{hash}"), "-verify"])
        .arg(&p)
        .arg("-signature")
        .arg(&s)
        .arg(&m)
        .output()
        .expect("openssl");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.success(), said.contains("Verified OK"), "{}", text(&out));
    out.status.success()
}

#[tokio::test]
async fn openssl_verifies_every_signature_from_the_exported_public_key() {
    openssl_verifies_every_signature(TestDaemon::start());
}

/// The same on the PostgreSQL store: the public keys are stored with each
/// version there too, and read back after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn openssl_verifies_every_signature_on_postgres() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    openssl_verifies_every_signature(TestDaemon::start_postgres(&pg.url("keyhaven")));
}

fn openssl_verifies_every_signature(mut d: TestDaemon) {
    let tmp = tempfile::tempdir().unwrap();
    for (key_type, hash) in [("ecdsa-p256", "sha256"), ("ecdsa-p384", "sha384")] {
        let key = format!("acme/{key_type}");
        let created = ok(d.cli(&["key", "create", &key, "--type", key_type], b""));
        assert!(created.contains(&format!(r#""type": "{key_type}""#)), "{created}");
        let pem1 = ok(d.cli(&["key", "public", &key], b""));
        assert!(pem1.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem1}");
        // openssl reads it as a key on the right curve.
        std::fs::write(tmp.path().join("k.pem"), &pem1).unwrap();
        let info = Command::new("openssl")
            .args(["pkey", "-pubin", "-noout", "-text", "-in"])
            .arg(tmp.path().join("k.pem"))
            .output()
            .unwrap();
        let curve = if key_type == "ecdsa-p256" { "prime256v1" } else { "secp384r1" };
        assert!(text(&info).contains(curve), "{}", text(&info));

        let msg = b"{\"sub\":\"alice\"}".as_slice();
        let sig1 = ok(d.cli(&["sign", &key], msg));
        assert!(openssl_verifies(tmp.path(), hash, &pem1, &sig1, msg));
        assert!(!openssl_verifies(tmp.path(), hash, &pem1, &sig1, b"{\"sub\":\"mallory\"}"));
        // ECDSA is randomised: two signatures differ, both verify.
        let again = ok(d.cli(&["sign", &key], msg));
        assert_ne!(again, sig1);
        assert!(openssl_verifies(tmp.path(), hash, &pem1, &again, msg));

        // A digest the caller computed (openssl's own, here).
        let digest = match hash {
            "sha256" => sha2::Sha256::digest(msg).to_vec(),
            _ => sha2::Sha384::digest(msg).to_vec(),
        };
        let sig_d = ok(d.cli(&["sign", &key, "--digest"], &digest));
        assert!(openssl_verifies(tmp.path(), hash, &pem1, &sig_d, msg));
        let out = d.cli(&["sign", &key, "--digest"], &digest[..20]);
        assert!(!out.status.success() && text(&out).contains("bad_request"), "{}", text(&out));

        // Rotation: a new key pair; each version's PEM verifies its own.
        let json = ok(d.cli(&["key", "rotate", &key], b""));
        assert!(json.contains(r#""current_version": 2"#), "{json}");
        let pem2 = ok(d.cli(&["key", "public", &key], b""));
        assert_ne!(pem2, pem1);
        assert_eq!(ok(d.cli(&["key", "public", &key, "--version", "1"], b"")), pem1);
        let sig2: serde_json::Value =
            serde_json::from_str(&ok(d.cli(&["sign", &key, "--json"], msg))).unwrap();
        assert_eq!(sig2["key_version"], 2);
        assert_eq!(sig2["algorithm"], format!("{key_type}-{hash}"));
        let sig2 = sig2["signature"].as_str().unwrap().to_owned();
        assert!(openssl_verifies(tmp.path(), hash, &pem2, &sig2, msg));
        assert!(!openssl_verifies(tmp.path(), hash, &pem1, &sig2, msg));
        assert!(!openssl_verifies(tmp.path(), hash, &pem2, &sig1, msg));
    }

    // Master-key rotation: every signing key gets a new key pair (version 3).
    ok(d.cli(&["admin", "rotate-master"], b""));
    let pem3 = ok(d.cli(&["key", "public", "acme/ecdsa-p256"], b""));
    let sig3: serde_json::Value =
        serde_json::from_str(&ok(d.cli(&["sign", "acme/ecdsa-p256", "--json"], b"m"))).unwrap();
    assert_eq!(sig3["key_version"], 3);
    assert!(openssl_verifies(tmp.path(), "sha256", &pem3, sig3["signature"].as_str().unwrap(), b"m"));
    // The public keys survive a restart, and the old ones are still served.
    d.restart();
    assert_eq!(ok(d.cli(&["key", "public", "acme/ecdsa-p256", "--version", "3"], b"")), pem3);
    ok(d.cli(&["key", "public", "acme/ecdsa-p256", "--version", "1"], b""));
    // Retired versions give no public key any more.
    ok(d.cli(&["key", "set", "acme/ecdsa-p256", "--min-decryption-version", "3"], b""));
    let out = d.cli(&["key", "public", "acme/ecdsa-p256", "--version", "1"], b"");
    assert!(text(&out).contains("version_retired"), "{}", text(&out));
}

#[tokio::test]
async fn signing_keys_refuse_other_operations_and_bad_input() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create_of_type(&path("acme/signer"), KeyType::EcdsaP256).await.unwrap();
    c.key_create_of_type(&path("acme/hooks"), KeyType::HmacSha256).await.unwrap();
    c.key_create(&path("acme/pii")).await.unwrap();
    let sign = |key: &str, message: Option<&[u8]>, digest: Option<&[u8]>| {
        let p = path(key);
        Sign {
            tenant: p.tenant().into(),
            key: p.key().into(),
            message: message.map(SecretBytes::from_slice),
            digest: digest.map(SecretBytes::from_slice),
        }
    };
    let code =
        |r: Result<_, keyhaven::Error>| r.map(|_: keyhaven::sign::SignResponse| ()).unwrap_err().code();
    for key in ["acme/hooks", "acme/pii"] {
        assert_eq!(code(c.call(&sign(key, Some(b"m"), None)).await), Some(ErrorCode::WrongKeyType), "{key}");
        let e = c.call(&PublicKey { tenant: "acme".into(), key: key[5..].into(), version: None }).await;
        assert_eq!(e.unwrap_err().code(), Some(ErrorCode::WrongKeyType), "{key}");
    }
    assert_eq!(
        c.mac(&path("acme/signer"), b"m", None).await.unwrap_err().code(),
        Some(ErrorCode::WrongKeyType)
    );
    let ctx = ctx(&[]);
    assert_eq!(
        c.encrypt(&path("acme/signer"), b"m", &ctx).await.unwrap_err().code(),
        Some(ErrorCode::WrongKeyType)
    );

    for (req, want) in [
        (sign("acme/signer", None, None), ErrorCode::BadRequest),
        (sign("acme/signer", Some(b"m"), Some(&[0; 32])), ErrorCode::BadRequest),
        (sign("acme/signer", None, Some(&[0; 48])), ErrorCode::BadRequest),
        (sign("acme/signer", Some(&vec![0; 65537]), None), ErrorCode::PayloadTooLarge),
        (sign("acme/none", Some(b"m"), None), ErrorCode::NotFound),
    ] {
        assert_eq!(code(c.call(&req).await), Some(want), "{req:?}");
    }
    let e =
        c.call_raw("public_key", serde_json::json!({"tenant": "acme", "key": "signer", "version": 7})).await;
    assert_eq!(e.unwrap_err().code(), Some(ErrorCode::NotFound));
    let e =
        c.call_raw("public_key", serde_json::json!({"tenant": "acme", "key": "signer", "version": 0})).await;
    assert_eq!(e.unwrap_err().code(), Some(ErrorCode::BadRequest));
    let e = c
        .call_raw("sign", serde_json::json!({"tenant": "acme", "key": "signer", "message": "m!", "x": 1}))
        .await;
    assert_eq!(e.unwrap_err().code(), Some(ErrorCode::BadRequest));

    // Every revocation scope covering the key refuses both operations.
    use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
    let k = |version| Scope::Key { tenant: "acme".into(), key: "signer".into(), version };
    for scope in [k(Some(1)), k(None), Scope::Tenant { tenant: "acme".into() }, Scope::All] {
        c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None })
            .await
            .unwrap();
        assert_eq!(code(c.call(&sign("acme/signer", Some(b"m"), None)).await), Some(ErrorCode::Revoked));
        let e = c.call(&PublicKey { tenant: "acme".into(), key: "signer".into(), version: None }).await;
        assert_eq!(e.unwrap_err().code(), Some(ErrorCode::Revoked), "{scope:?}");
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
    }
    c.call(&sign("acme/signer", Some(b"m"), None)).await.unwrap();

    // Audited with the key and version, never the message.
    let log = ok(d.cli(&["audit", "tail", "--json", "-n", "200"], b""));
    let signed: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["op"] == "sign" && r["outcome"] == "ok")
        .collect();
    assert_eq!(signed.len(), 1, "{log}");
    assert_eq!((signed[0]["key"].as_str(), signed[0]["version"].as_u64()), (Some("signer"), Some(1)));
}

#[tokio::test]
async fn sign_and_public_key_are_permissions_of_their_own() {
    let mut d = TestDaemon::start();
    let signer = ensure_user("khtest-ecsigner", &[]);
    let reader = ensure_user("khtest-pkreader", &[]);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["sign"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["public-key"]
keys = ["*"]
"#,
        signer.name, reader.name
    ));
    d.restart();
    ok(d.cli(&["key", "create", "acme/jwt", "--type", "ecdsa-p256"], b""));
    let sock = d.socket();
    ok(run_cli_as(&signer, sock, &["sign", "acme/jwt"], b"m"));
    let out = run_cli_as(&signer, sock, &["key", "public", "acme/jwt"], b"");
    assert!(text(&out).contains("permission_denied") && text(&out).contains("public-key"), "{}", text(&out));
    ok(run_cli_as(&reader, sock, &["key", "public", "acme/jwt"], b""));
    let out = run_cli_as(&reader, sock, &["sign", "acme/jwt"], b"m");
    assert!(text(&out).contains("permission_denied") && text(&out).contains("`sign`"), "{}", text(&out));
}

/// Verifies a compact JWS against a JWKS with PyJWT (Debian's
/// python3-jwt): finds the key by the token's `kid`, checks the signature
/// and `exp`. Returns the `sub` claim, or PyJWT's complaint as an error.
fn pyjwt_verify(dir: &Path, jwks: &str, token: &str) -> Result<String, String> {
    const SCRIPT: &str = r#"
import json, sys, jwt
jwks = json.load(open(sys.argv[1]))
token = open(sys.argv[2]).read().strip()
kid = jwt.get_unverified_header(token)["kid"]
keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
if kid not in keys:
    sys.exit("no key with kid " + kid)
claims = jwt.decode(token, keys[kid].key, algorithms=["ES256", "ES384"])
print(claims["sub"])
"#;
    let (j, t) = (dir.join("jwks.json"), dir.join("token"));
    std::fs::write(&j, jwks).unwrap();
    std::fs::write(&t, token).unwrap();
    let out =
        Command::new("/usr/bin/python3").arg("-c").arg(SCRIPT).arg(&j).arg(&t).output().expect("python3");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(text(&out))
    }
}

#[tokio::test]
async fn pyjwt_verifies_keyhaven_jwts_against_the_jwks_across_a_rotation() {
    pyjwt_verifies_jwts(TestDaemon::start());
}

/// `key jwks` and `jwt sign` on the PostgreSQL store.
#[tokio::test(flavor = "multi_thread")]
async fn pyjwt_verifies_keyhaven_jwts_on_postgres() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    pyjwt_verifies_jwts(TestDaemon::start_postgres(&pg.url("keyhaven")));
}

fn pyjwt_verifies_jwts(d: TestDaemon) {
    let tmp = tempfile::tempdir().unwrap();
    let claims = tmp.path().join("claims.json");
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    std::fs::write(&claims, format!(r#"{{"sub": "alice", "exp": {exp}}}"#)).unwrap();
    let claims = claims.to_str().unwrap();
    for (key_type, alg) in [("ecdsa-p256", "ES256"), ("ecdsa-p384", "ES384")] {
        let key = format!("acme/{key_type}");
        ok(d.cli(&["key", "create", &key, "--type", key_type], b""));
        let t1 = ok(d.cli(&["jwt", "sign", &key, "--claims", claims], b"")).trim().to_owned();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t1.split('.').next().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some(alg), Some(&*format!("{key}@1"))));
        let jwks1 = ok(d.cli(&["key", "jwks", &key], b""));
        assert_eq!(pyjwt_verify(tmp.path(), &jwks1, &t1), Ok("alice".into()));

        // Tampered claims or signature: refused.
        let mut parts: Vec<String> = t1.split('.').map(str::to_owned).collect();
        let evil = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"sub": "mallory", "exp": {exp}}}"#));
        let forged = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert!(pyjwt_verify(tmp.path(), &jwks1, &forged)
            .unwrap_err()
            .contains("Signature verification failed"));
        // The first character (six whole bits of the signature): the last
        // one of unpadded base64url also holds unused bits, and changing
        // only those leaves the signature as it was.
        let first = parts[2].remove(0);
        parts[2].insert(0, if first == 'A' { 'B' } else { 'A' });
        assert!(pyjwt_verify(tmp.path(), &jwks1, &parts.join(".")).is_err());

        // Rotation: new tokens carry kid @2; the new JWKS verifies old and new
        // tokens (nobody is logged out); the old JWKS does not know @2.
        ok(d.cli(&["key", "rotate", &key], b""));
        let t2 = ok(d.cli(&["jwt", "sign", &key, "--claims", claims], b"")).trim().to_owned();
        let jwks2 = ok(d.cli(&["key", "jwks", &key], b""));
        let set: serde_json::Value = serde_json::from_str(&jwks2).unwrap();
        let kids: Vec<&str> =
            set["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(kids, [format!("{key}@2"), format!("{key}@1")]);
        assert_eq!(pyjwt_verify(tmp.path(), &jwks2, &t2), Ok("alice".into()));
        assert_eq!(pyjwt_verify(tmp.path(), &jwks2, &t1), Ok("alice".into()));
        assert!(pyjwt_verify(tmp.path(), &jwks1, &t2).unwrap_err().contains("no key with kid"));

        // Retiring version 1 drops it from the JWKS: its tokens stop verifying.
        ok(d.cli(&["key", "set", &key, "--min-decryption-version", "2"], b""));
        let jwks3 = ok(d.cli(&["key", "jwks", &key], b""));
        assert!(pyjwt_verify(tmp.path(), &jwks3, &t1).unwrap_err().contains("no key with kid"));
        assert_eq!(pyjwt_verify(tmp.path(), &jwks3, &t2), Ok("alice".into()));
    }
    // Not a signing key: a named error, and no token.
    ok(d.cli(&["key", "create", "acme/hooks", "--type", "hmac-sha256"], b""));
    let out = d.cli(&["jwt", "sign", "acme/hooks", "--claims", claims], b"");
    assert!(!out.status.success() && text(&out).contains("wrong_key_type"), "{}", text(&out));
    std::fs::write(tmp.path().join("list.json"), "[1]").unwrap();
    let out = d.cli(
        &["jwt", "sign", "acme/ecdsa-p256", "--claims", tmp.path().join("list.json").to_str().unwrap()],
        b"",
    );
    assert!(!out.status.success() && text(&out).contains("JSON object"), "{}", text(&out));
}
