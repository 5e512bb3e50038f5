//! Custody against a PIN holder (docs/SECURITY.md): someone with the user
//! PIN works on the real token directly, past the daemon, with an attacker's
//! PKCS#11 probe (`p11probe`, cryptoki on the SoftHSM2 module). They must
//! not get a KEK out in plaintext (nor an HMAC key, an EC private key or
//! imported material, stored the same way), and a master key they plant or
//! swap in must never be adopted.

use std::path::Path;
use std::process::Output;

use keyhaven_tests::*;

/// Runs the probe against the test daemon's token with its PIN.
fn probe(d: &TestDaemon, args: &[&str]) -> Output {
    std::process::Command::new(bin("p11probe"))
        .arg(softhsm_module())
        .arg("keyhaven-dev")
        .arg(d.dir().join("pin"))
        .args(args)
        .env("SOFTHSM2_CONF", d.dir().join("softhsm2.conf"))
        .output()
        .expect("run p11probe")
}

fn probe_ok(d: &TestDaemon, args: &[&str]) -> String {
    let out = probe(d, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "p11probe {args:?}: {text}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The wrapped KEK of `tenant/key`'s version 1 and the master key version
/// that wraps it, from a stopped daemon's store.
fn stored_kek(store: &Path, name: &str) -> (String, u64) {
    let db = open_stopped_store(store);
    let v = db.open_tree("keyring").unwrap().get(name.as_bytes()).unwrap().expect("key record");
    let rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
    let version = &rec["versions"][0];
    (version["wrapped_kek"].as_str().unwrap().to_owned(), version["master_key_version"].as_u64().unwrap())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pin_holder_cannot_take_a_kek_out_of_the_token() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let sealed = c.encrypt(&path("acme/pii"), b"card 4111", &ctx(&[])).await.unwrap();
    let health = c.health().await.unwrap();
    assert_eq!(health.custody.kek_confinement, "enforced", "{health:?}");
    assert!(health.custody.unconfined_master_keys.is_empty());
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    let (wrapped, mk) = stored_kek(&d.store_dir(), "acme/pii");
    let report = probe_ok(&d, &["extract", &format!("keyhaven-mk-v{mk}"), &wrapped]);
    // The control: the stored material is a real KEK under that master key.
    assert!(report.contains("control-confined-unwrap: ok"), "{report}");
    for attack in [
        "unwrap-plain",
        "unwrap-extractable",
        "unwrap-pad-plain",
        "unwrap-generic",
        "unwrap-derivable",
        "unwrap-token-object",
        "decrypt-with-master-key",
        "wrap-under-own-key",
        "set-extractable",
        "set-not-sensitive",
        "copy-extractable",
        "read-value",
    ] {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("{attack}:")))
            .unwrap_or_else(|| panic!("{report}"));
        assert!(line.contains("refused"), "the token let a PIN holder do {attack}:\n{report}");
    }

    // Nothing the probe did harmed the daemon.
    d.start_again();
    let back = d.client().await.decrypt(&sealed.ciphertext, &ctx(&[])).await.unwrap();
    assert_eq!(back.plaintext.expose(), b"card 4111");
}

/// What the PIN holder tries on every stored version (see `p11probe`).
const ATTACKS: [&str; 13] = [
    "unwrap-plain",
    "unwrap-extractable",
    "unwrap-pad-plain",
    "unwrap-generic",
    "unwrap-derivable",
    "unwrap-token-object",
    "decrypt-with-master-key",
    "wrap-under-own-key",
    "wrap-under-own-key-kw",
    "set-extractable",
    "set-not-sensitive",
    "copy-extractable",
    "read-value",
];

/// HMAC keys, EC private keys and imported material are stored like KEKs
/// and confined like them: the same attacks, each with the template and
/// mechanism of its kind, are refused, and the control (the template the
/// master key allows) works, so the refusals are the token's doing.
#[tokio::test(flavor = "multi_thread")]
async fn a_pin_holder_cannot_take_hmac_ec_or_imported_material_out() {
    let mut d = TestDaemon::start();
    for (key, key_type) in
        [("acme/hooks", "hmac-sha256"), ("acme/p256", "ecdsa-p256"), ("acme/p384", "ecdsa-p384")]
    {
        let out = d.cli(&["key", "create", key, "--type", key_type], b"");
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Imported material (OPERATIONS.md §16), an AES key and an HMAC key.
    let tmp = tempfile::tempdir().unwrap();
    for (key, key_type) in [("acme/byok", "aes256-gcm"), ("acme/byok-mac", "hmac-sha256")] {
        let pem = tmp.path().join("WrappingPublicKey.pem");
        let out = d.cli(
            &["key", "import-params", key, "--type", key_type, "--public-key-out", pem.to_str().unwrap()],
            b"",
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let sh = std::process::Command::new("sh")
            .arg("-ec")
            .arg(
                "openssl rand -out KeyMaterial.bin 32 && openssl pkeyutl -encrypt -pubin -inkey \
                 WrappingPublicKey.pem -in KeyMaterial.bin -out EncryptedKeyMaterial.bin -pkeyopt \
                 rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1 -pkeyopt rsa_mgf1_md:sha1",
            )
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(sh.status.success(), "{}", stderr(&sh));
        let wrapped = tmp.path().join("EncryptedKeyMaterial.bin");
        let out = d.cli(
            &["key", "import", key, "--wrapped", wrapped.to_str().unwrap(), "--import-token", &token],
            b"",
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    for (name, kind) in [
        ("acme/hooks", "hmac"),
        ("acme/p256", "ec"),
        ("acme/p384", "ec"),
        ("acme/byok", "aes"),
        ("acme/byok-mac", "hmac"),
    ] {
        let (wrapped, mk) = stored_kek(&d.store_dir(), name);
        let report = probe_ok(&d, &["extract", &format!("keyhaven-mk-v{mk}"), &wrapped, kind]);
        assert!(report.contains("control-confined-unwrap: ok"), "{name}: {report}");
        for attack in ATTACKS {
            let line = report
                .lines()
                .find(|l| l.starts_with(&format!("{attack}:")))
                .unwrap_or_else(|| panic!("{name}: {report}"));
            assert!(line.contains("refused"), "the token let a PIN holder do {attack} to {name}:\n{report}");
        }
    }
    // Nothing the probe did harmed the daemon: the keys still work.
    d.start_again();
    for (key, args) in [("acme/hooks", ["mac"]), ("acme/p256", ["sign"]), ("acme/byok-mac", ["mac"])] {
        let out = d.cli(&[args[0], key], b"m");
        assert!(out.status.success(), "{key}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_master_key_is_never_adopted_by_a_rotation() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let sealed = c.encrypt(&path("acme/pii"), b"secret", &ctx(&[])).await.unwrap();

    // A key with a value the attacker knows, under the next version's label.
    probe_ok(&d, &["plant", "keyhaven-mk-v2"]);
    drop(c);
    d.restart(); // a restart in between must not help
    let out = d.cli(&["admin", "rotate-master"], b"");
    assert!(!out.status.success(), "a rotation adopted a planted key");
    let err = stderr(&out);
    assert!(err.contains("keyhaven-mk-v2") && err.contains("never recorded making it"), "{err}");
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().token.master_key_version, 1);

    // A key generated in the token (so it passes the attribute checks) that
    // the store never recorded making is refused as well.
    probe_ok(&d, &["destroy", "keyhaven-mk-v2"]);
    probe_ok(&d, &["generate", "keyhaven-mk-v2", "00112233"]);
    let out = d.cli(&["admin", "rotate-master"], b"");
    assert!(!out.status.success(), "a rotation adopted a key the store never made");
    // (The first refusal left the version it was making recorded, with a
    // CKA_ID of its own: this key does not carry it.)
    assert!(stderr(&out).contains("refusing to adopt it"), "{}", stderr(&out));
    assert_eq!(c.health().await.unwrap().token.master_key_version, 1);

    // Once the stray key is gone, the rotation makes and pins its own.
    probe_ok(&d, &["destroy", "keyhaven-mk-v2"]);
    let out = d.cli(&["admin", "rotate-master"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let id = probe_ok(&d, &["id", "keyhaven-mk-v2"]);
    assert_eq!(id.len(), 32, "a 16-byte random CKA_ID: {id}");
    drop(c);
    d.restart();
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().custody.pinned_master_keys, vec![1, 2]);
    assert_eq!(c.decrypt(&sealed.ciphertext, &ctx(&[])).await.unwrap().plaintext.expose(), b"secret");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_master_key_swapped_under_its_label_stops_the_start() {
    let mut d = TestDaemon::start();
    d.client().await.key_create(&path("acme/pii")).await.unwrap();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // Same label, same CKA_ID, generated in the token: only the canary
    // tells it from the real one.
    let id = probe_ok(&d, &["id", "keyhaven-mk-v1"]);
    probe_ok(&d, &["destroy", "keyhaven-mk-v1"]);
    probe_ok(&d, &["generate", "keyhaven-mk-v1", &id]);
    let out = d.run_once();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("keyhaven-mk-v1")
            && err.contains("canary")
            && err.contains("not the one the store recorded"),
        "{err}"
    );

    // Another CKA_ID is named as such.
    probe_ok(&d, &["destroy", "keyhaven-mk-v1"]);
    probe_ok(&d, &["generate", "keyhaven-mk-v1", "abcdef"]);
    let err = stderr(&d.run_once());
    assert!(err.contains("CKA_ID") && err.contains("replaced"), "{err}");

    // A key imported by value under the label: not generated in the token.
    probe_ok(&d, &["destroy", "keyhaven-mk-v1"]);
    probe_ok(&d, &["plant", "keyhaven-mk-v1"]);
    let err = stderr(&d.run_once());
    assert!(err.contains("keyhaven-mk-v1") && err.contains("not generated"), "{err}");
}

/// OPERATIONS.md §12.6, run as written: the PIN changed with pkcs11-tool
/// and reloaded by SIGHUP, the master key rotated, the old data rewrapped
/// and the old versions trimmed, the old master key retired.
#[tokio::test(flavor = "multi_thread")]
async fn the_departed_administrator_runbook_removes_their_access() {
    use keyhaven::lifecycle::{AdminRetireMaster, KeySet, KeyTrim, Rewrap};
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let old = c.encrypt(&path("acme/pii"), b"made before", &ctx(&[])).await.unwrap();

    // 1. The PIN is changed in the token and the daemon re-reads it.
    let old_pin = std::fs::read_to_string(d.dir().join("pin")).unwrap().trim().to_owned();
    let new_pin = "f00dfeedcafe4b1d9e2a";
    let out = std::process::Command::new("pkcs11-tool")
        .args(["--module"])
        .arg(softhsm_module())
        .args([
            "--token-label",
            "keyhaven-dev",
            "--login",
            "--pin",
            &old_pin,
            "--change-pin",
            "--new-pin",
            new_pin,
        ])
        .env("SOFTHSM2_CONF", d.dir().join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(d.dir().join("pin"), format!("{new_pin}\n")).unwrap();
    signal(d.pid(), "HUP");
    let kept = d.dir().join("old-pin");
    std::fs::write(&kept, &old_pin).unwrap();
    let out = std::process::Command::new(bin("p11probe"))
        .arg(softhsm_module())
        .arg("keyhaven-dev")
        .arg(&kept)
        .args(["id", "keyhaven-mk-v1"])
        .env("SOFTHSM2_CONF", d.dir().join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the old PIN still logs in");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PinIncorrect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 2. The master key is rotated: new data is under a new key version,
    //    under the new master key.
    let out = d.cli(&["admin", "rotate-master"], b"");
    assert!(out.status.success(), "{}", stderr(&out));
    let new = c.encrypt(&path("acme/pii"), b"made after", &ctx(&[])).await.unwrap();
    assert_eq!((old.key_version, new.key_version), (1, 2));

    // 3. Old data rewrapped, old version trimmed, old master key retired.
    let rewrapped = c.call(&Rewrap { text: old.ciphertext.clone(), context: ctx(&[]) }).await.unwrap();
    let set = KeySet {
        tenant: "acme".into(),
        key: "pii".into(),
        min_decryption_version: Some(2),
        rotate_every_secs: None,
        state: None,
        ..Default::default()
    };
    c.call(&set).await.unwrap();
    c.call(&KeyTrim { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    c.call(&AdminRetireMaster { version: 1 }).await.unwrap();
    let e = c.decrypt(&old.ciphertext, &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::VersionRetired), "{e}");
    assert_eq!(c.decrypt(&rewrapped.text, &ctx(&[])).await.unwrap().plaintext.expose(), b"made before");
    assert_eq!(c.decrypt(&new.ciphertext, &ctx(&[])).await.unwrap().plaintext.expose(), b"made after");
    drop(c);

    // The daemon starts again on the new PIN; the token no longer holds v1.
    d.restart();
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().custody.pinned_master_keys, vec![2]);
    let out = probe(&d, &["id", "keyhaven-mk-v1"]);
    assert!(!out.status.success(), "master key 1 is still in the token");
}
