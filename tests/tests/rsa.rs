//! `rsa-3072-pss` signing keys against the real daemon and token: the key
//! pair is made in the token and its private key stored wrapped; openssl
//! verifies every RSASSA-PSS signature (SHA-256, MGF1-SHA-256, salt 32)
//! from the exported PEM, over messages and over digests, across key and
//! master-key rotation and a restart; the daemon's `verify` checks them in
//! the token; PyJWT verifies PS256 JWTs against the JWKS; other key types'
//! operations are refused both ways.

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
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

/// Whether openssl accepts `sig_b64` as an RSASSA-PSS (SHA-256, salt 32)
/// signature of `msg` under `pem`.
fn openssl_verifies(dir: &Path, pem: &str, sig_b64: &str, msg: &[u8]) -> bool {
    let (p, s, m) = (dir.join("pub.pem"), dir.join("sig.bin"), dir.join("msg"));
    std::fs::write(&p, pem).unwrap();
    std::fs::write(&s, base64::engine::general_purpose::STANDARD.decode(sig_b64.trim()).unwrap()).unwrap();
    std::fs::write(&m, msg).unwrap();
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
            "-verify",
        ])
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
async fn openssl_verifies_rsa_pss_signatures_from_the_exported_public_key() {
    let mut d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = "acme/rsa";
    let created = ok(d.cli(&["key", "create", key, "--type", "rsa-3072-pss"], b""));
    assert!(created.contains(r#""type": "rsa-3072-pss""#), "{created}");
    let pem1 = ok(d.cli(&["key", "public", key], b""));
    std::fs::write(tmp.path().join("k.pem"), &pem1).unwrap();
    let info = Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(tmp.path().join("k.pem"))
        .output()
        .unwrap();
    assert!(
        text(&info).contains("Public-Key: (3072 bit)") && text(&info).contains("65537"),
        "{}",
        text(&info)
    );

    let msg = b"{\"sub\":\"alice\"}".as_slice();
    let sig1 = ok(d.cli(&["sign", key], msg));
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(sig1.trim()).unwrap().len(), 384);
    assert!(openssl_verifies(tmp.path(), &pem1, &sig1, msg));
    assert!(!openssl_verifies(tmp.path(), &pem1, &sig1, b"{\"sub\":\"mallory\"}"));
    // PSS is randomised (a fresh salt): two signatures differ, both verify.
    let again = ok(d.cli(&["sign", key], msg));
    assert_ne!(again, sig1);
    assert!(openssl_verifies(tmp.path(), &pem1, &again, msg));
    // A digest the caller computed (CKM_RSA_PKCS_PSS), and openssl's own
    // PSS signature of a key it made is not ours.
    let digest = sha2::Sha256::digest(msg).to_vec();
    let sig_d = ok(d.cli(&["sign", key, "--digest"], &digest));
    assert!(openssl_verifies(tmp.path(), &pem1, &sig_d, msg));
    let out = d.cli(&["sign", key, "--digest"], &digest[..20]);
    assert!(!out.status.success() && text(&out).contains("bad_request"), "{}", text(&out));

    // The daemon's verify agrees, in the token.
    let v = d.cli(&["verify", key, "--signature", sig1.trim()], msg);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let v = d.cli(&["verify", key, "--signature", sig_d.trim(), "--digest"], &digest);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let v = d.cli(&["verify", key, "--signature", sig1.trim()], b"other");
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    let mut flipped = base64::engine::general_purpose::STANDARD.decode(sig1.trim()).unwrap();
    flipped[100] ^= 0x20;
    let flipped = base64::engine::general_purpose::STANDARD.encode(flipped);
    let v = d.cli(&["verify", key, "--signature", &flipped], msg);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    let v = d.cli(&["verify", key, "--signature", "AAAA"], msg);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));

    // Rotation: a new key pair; each version's PEM verifies its own.
    ok(d.cli(&["key", "rotate", key], b""));
    let pem2 = ok(d.cli(&["key", "public", key], b""));
    assert_ne!(pem2, pem1);
    let sig2: serde_json::Value = serde_json::from_str(&ok(d.cli(&["sign", key, "--json"], msg))).unwrap();
    assert_eq!(
        (sig2["key_version"].as_u64(), sig2["algorithm"].as_str()),
        (Some(2), Some("rsa-3072-pss-sha256"))
    );
    let sig2 = sig2["signature"].as_str().unwrap().to_owned();
    assert!(openssl_verifies(tmp.path(), &pem2, &sig2, msg));
    assert!(!openssl_verifies(tmp.path(), &pem1, &sig2, msg));
    let v = d.cli(&["verify", key, "--signature", sig1.trim(), "--version", "1"], msg);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));

    // Master-key rotation and a restart: the private keys unwrap under the
    // new master key's versions, the public keys are still served.
    ok(d.cli(&["admin", "rotate-master"], b""));
    d.restart();
    let pem3 = ok(d.cli(&["key", "public", key], b""));
    let sig3: serde_json::Value = serde_json::from_str(&ok(d.cli(&["sign", key, "--json"], b"m"))).unwrap();
    assert_eq!(sig3["key_version"], 3);
    assert!(openssl_verifies(tmp.path(), &pem3, sig3["signature"].as_str().unwrap(), b"m"));
    assert_eq!(ok(d.cli(&["key", "public", key, "--version", "1"], b"")), pem1);
}

#[tokio::test]
async fn rsa_pss_keys_refuse_other_operations_and_others_refuse_theirs() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create_of_type(&path("acme/rsa"), KeyType::RsaPss3072).await.unwrap();
    let shown = ok(d.cli(&["key", "show", "acme/rsa"], b""));
    assert!(shown.contains("rsa-3072-pss"), "{shown}");
    let ctx = ctx(&[]);
    assert_eq!(
        c.encrypt(&path("acme/rsa"), b"m", &ctx).await.unwrap_err().code(),
        Some(ErrorCode::WrongKeyType)
    );
    assert_eq!(c.mac(&path("acme/rsa"), b"m", None).await.unwrap_err().code(), Some(ErrorCode::WrongKeyType));
    let e = c.datakey(&path("acme/rsa"), &ctx, keyhaven::Plaintext::Include).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::WrongKeyType));
    // An ECDSA signature given to an RSA key: not valid (another key type's
    // signature), not an error.
    c.key_create_of_type(&path("acme/ec"), KeyType::EcdsaP256).await.unwrap();
    let ec_sig = ok(d.cli(&["sign", "acme/ec"], b"m")).trim().to_owned();
    assert!(!c.verify(&path("acme/rsa"), b"m", &ec_sig, None).await.unwrap().valid);
    let rsa_sig = ok(d.cli(&["sign", "acme/rsa"], b"m")).trim().to_owned();
    assert!(!c.verify(&path("acme/ec"), b"m", &rsa_sig, None).await.unwrap().valid);
    assert!(c.verify(&path("acme/rsa"), b"m", &rsa_sig, None).await.unwrap().valid);
    // Revocation covers it as any key.
    use keyhaven::revocation::{Reason, Revoke, Scope};
    let scope = Scope::Key { tenant: "acme".into(), key: "rsa".into(), version: None };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let out = d.cli(&["sign", "acme/rsa"], b"m");
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    let out = d.cli(&["key", "public", "acme/rsa"], b"");
    assert!(text(&out).contains("revoked"), "{}", text(&out));
    assert_eq!(
        c.verify(&path("acme/rsa"), b"m", &rsa_sig, None).await.unwrap_err().code(),
        Some(ErrorCode::Revoked)
    );
}

#[tokio::test]
async fn pyjwt_verifies_ps256_jwts_against_the_jwks_across_a_rotation() {
    const SCRIPT: &str = r#"
import json, sys, jwt
jwks = json.load(open(sys.argv[1]))
token = open(sys.argv[2]).read().strip()
kid = jwt.get_unverified_header(token)["kid"]
keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
if kid not in keys:
    sys.exit("no key with kid " + kid)
print(jwt.decode(token, keys[kid].key, algorithms=["PS256"])["sub"])
"#;
    let d = TestDaemon::start();
    let tmp = tempfile::tempdir().unwrap();
    let verify = |jwks: &str, token: &str| -> Result<String, String> {
        let (j, t) = (tmp.path().join("jwks.json"), tmp.path().join("token"));
        std::fs::write(&j, jwks).unwrap();
        std::fs::write(&t, token).unwrap();
        let out = Command::new("/usr/bin/python3").arg("-c").arg(SCRIPT).arg(&j).arg(&t).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(text(&out))
        }
    };
    let claims = tmp.path().join("claims.json");
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    std::fs::write(&claims, format!(r#"{{"sub": "alice", "exp": {exp}}}"#)).unwrap();
    let claims = claims.to_str().unwrap();
    let key = "acme/ps";
    ok(d.cli(&["key", "create", key, "--type", "rsa-3072-pss"], b""));
    let t1 = ok(d.cli(&["jwt", "sign", key, "--claims", claims], b"")).trim().to_owned();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t1.split('.').next().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("PS256"), Some("acme/ps@1")));
    let jwks1 = ok(d.cli(&["key", "jwks", key], b""));
    let set: serde_json::Value = serde_json::from_str(&jwks1).unwrap();
    assert_eq!((set["keys"][0]["kty"].as_str(), set["keys"][0]["e"].as_str()), (Some("RSA"), Some("AQAB")));
    assert_eq!(verify(&jwks1, &t1), Ok("alice".into()));
    let parts: Vec<&str> = t1.split('.').collect();
    let evil = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!(r#"{{"sub": "mallory", "exp": {exp}}}"#));
    assert!(verify(&jwks1, &format!("{}.{evil}.{}", parts[0], parts[2]))
        .unwrap_err()
        .contains("Signature verification failed"));

    ok(d.cli(&["key", "rotate", key], b""));
    let t2 = ok(d.cli(&["jwt", "sign", key, "--claims", claims], b"")).trim().to_owned();
    let jwks2 = ok(d.cli(&["key", "jwks", key], b""));
    assert_eq!(verify(&jwks2, &t2), Ok("alice".into()));
    assert_eq!(verify(&jwks2, &t1), Ok("alice".into()));
    assert!(verify(&jwks1, &t2).unwrap_err().contains("no key with kid"));
}
