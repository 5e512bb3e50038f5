//! Master-key rotation against the real daemon and token: every key gets a
//! new version under the new master key in batches while service goes on
//! (KEKs are confined to the master key that wraps them, so none is
//! rewrapped); SIGKILL at several points and a restart lose nothing;
//! rollback; retiring the old master key is refused while a key version
//! needs it, and after rewrap and trim it makes every older copy of the
//! store useless, which is how a destruction is made to hold against backups.

use keyhaven::lifecycle::{
    AdminRetireMaster, AdminRotateMaster, KeyRotate, KeySet, KeyTrim, MasterRotationStatus, Rewrap,
};
use keyhaven::revocation::{Destroy, Reason, Revoke, Scope};
use keyhaven::wire::EncryptResponse;
use keyhaven::Client;
use keyhaven_tests::*;

const KEYS: [&str; 4] = ["acme/pii", "acme/smtp", "beta/pii", "beta/sso"];

/// Four keys with two versions each, and a ciphertext under every version.
async fn fixture(c: &Client) -> Vec<(String, EncryptResponse)> {
    let mut out = Vec::new();
    for name in KEYS {
        c.key_create(&path(name)).await.unwrap();
        out.push((name.to_owned(), c.encrypt(&path(name), name.as_bytes(), &ctx(&[])).await.unwrap()));
        let (t, k) = name.split_once('/').unwrap();
        c.call(&KeyRotate { tenant: t.into(), key: k.into(), idempotency_key: None }).await.unwrap();
        out.push((name.to_owned(), c.encrypt(&path(name), name.as_bytes(), &ctx(&[])).await.unwrap()));
    }
    out
}

async fn all_open(c: &Client, sealed: &[(String, EncryptResponse)]) {
    for (name, s) in sealed {
        let back = c.decrypt(&s.ciphertext, &ctx(&[])).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.plaintext.expose(), name.as_bytes());
    }
}

async fn step(c: &Client, batch: u32, rollback: bool) -> MasterRotationStatus {
    c.call(&AdminRotateMaster { batch: Some(batch), rollback }).await.unwrap()
}

/// The runbook's second half (docs/OPERATIONS.md): every ciphertext
/// rewrapped under its key's current version, every key's older versions
/// trimmed. Returns the rewrapped ciphertexts.
async fn rewrap_and_trim(c: &Client, sealed: &[(String, EncryptResponse)]) -> Vec<(String, EncryptResponse)> {
    let mut out = Vec::new();
    for (name, s) in sealed {
        let r = c.call(&Rewrap { text: s.ciphertext.clone(), context: ctx(&[]) }).await.unwrap();
        out.push((name.clone(), EncryptResponse { ciphertext: r.text, ..s.clone() }));
    }
    for name in KEYS {
        let (t, k) = name.split_once('/').unwrap();
        let show = c.call(&keyhaven::lifecycle::KeyShow { tenant: t.into(), key: k.into() }).await.unwrap();
        let min = Some(show.current_version);
        c.call(&KeySet {
            tenant: t.into(),
            key: k.into(),
            min_decryption_version: min,
            rotate_every_secs: None,
            state: None,
            ..Default::default()
        })
        .await
        .unwrap();
        c.call(&KeyTrim { tenant: t.into(), key: k.into() }).await.unwrap();
    }
    out
}

fn kill_and_restart(d: &mut TestDaemon) {
    signal(d.pid(), "KILL");
    let (status, _) = d.stop();
    assert!(!status.success());
    d.start_again();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_in_batches_survives_sigkill_at_every_step() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let sealed = fixture(&c).await;

    // Started, three of the four keys given a version under v2, then killed.
    let s = step(&c, 3, false).await;
    assert_eq!((s.from, s.to, s.rotated, s.remaining, s.finished), (1, 2, 3, 1, false));
    assert_eq!(s.left_under_from, 8, "the old versions stay where they are");
    assert_eq!(c.health().await.unwrap().token.master_key_version, 2);
    // Service goes on mid-rotation: old and new KEKs open, new keys use v2.
    all_open(&c, &sealed).await;
    c.key_create(&path("gamma/new")).await.unwrap();
    drop(c);
    kill_and_restart(&mut d);

    let c = d.client().await;
    let health = c.health().await.unwrap();
    assert_eq!(health.token.master_key_version, 2);
    assert_eq!(health.custody.kek_confinement, "enforced", "{health:?}");
    assert_eq!(health.custody.pinned_master_keys, vec![1, 2], "{health:?}");
    all_open(&c, &sealed).await;
    // Retiring either side mid-rotation is refused.
    for v in [1, 2] {
        let e = c.call(&AdminRetireMaster { version: v }).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    }
    let s = step(&c, 2, false).await;
    assert_eq!((s.from, s.to, s.rotated, s.remaining, s.finished), (1, 2, 1, 0, true));
    drop(c);
    kill_and_restart(&mut d);

    // Finished: every key's current version is under v2; v1 still wraps the
    // older versions, so it cannot go yet, and v2 never while current.
    let c = d.client().await;
    all_open(&c, &sealed).await;
    let e = c.call(&AdminRetireMaster { version: 2 }).await.unwrap_err();
    assert!(e.to_string().contains("current"), "{e}");
    let e = c.call(&AdminRetireMaster { version: 1 }).await.unwrap_err();
    assert!(e.to_string().contains("still wraps 8 key version"), "{e}");
    let rewrapped = rewrap_and_trim(&c, &sealed).await;
    assert_eq!(c.call(&AdminRetireMaster { version: 1 }).await.unwrap().destroyed, 1);
    let e = c.call(&AdminRetireMaster { version: 1 }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    all_open(&c, &rewrapped).await;
    assert_eq!(c.health().await.unwrap().custody.pinned_master_keys, vec![2]);
    drop(c);
    d.restart();
    all_open(&d.client().await, &rewrapped).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_returns_to_the_old_master_key_while_it_exists() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let sealed = fixture(&c).await;
    assert!(step(&c, 100, false).await.finished);
    let back = step(&c, 3, true).await;
    assert_eq!((back.from, back.to, back.rotated, back.remaining), (2, 1, 3, 1));
    assert!(step(&c, 100, false).await.finished);
    assert_eq!(c.health().await.unwrap().token.master_key_version, 1);
    all_open(&c, &sealed).await;
    // v2 still wraps the versions the first rotation made.
    let e = c.call(&AdminRetireMaster { version: 2 }).await.unwrap_err();
    assert!(e.to_string().contains("still wraps 4 key version"), "{e}");
    // A new rotation goes to version 2 again: the pinned key, not a new one.
    let s = step(&c, 100, false).await;
    assert_eq!((s.from, s.to, s.finished), (1, 2, true));
    all_open(&c, &sealed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retiring_the_old_master_key_makes_older_store_copies_useless() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let sealed = fixture(&c).await;
    drop(c);
    // A backup taken before the destruction.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), backup.path());
    d.start_again();

    let c = d.client().await;
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    c.call(&Destroy { scope, confirm: "acme/pii".into() }).await.unwrap();
    assert!(step(&c, 100, false).await.finished);
    let others: Vec<_> = sealed.iter().filter(|(n, _)| n != "acme/pii").cloned().collect();
    let mut rewrapped = Vec::new();
    for (name, s) in &others {
        let r = c.call(&Rewrap { text: s.ciphertext.clone(), context: ctx(&[]) }).await.unwrap();
        rewrapped.push((name.clone(), EncryptResponse { ciphertext: r.text, ..s.clone() }));
    }
    for name in KEYS.iter().filter(|n| **n != "acme/pii") {
        let (t, k) = name.split_once('/').unwrap();
        c.call(&KeySet {
            tenant: t.into(),
            key: k.into(),
            min_decryption_version: Some(3),
            rotate_every_secs: None,
            state: None,
            ..Default::default()
        })
        .await
        .unwrap();
        c.call(&KeyTrim { tenant: t.into(), key: k.into() }).await.unwrap();
    }
    c.call(&AdminRetireMaster { version: 1 }).await.unwrap();
    all_open(&c, &rewrapped).await;
    drop(c);

    // The old copy needs master key 1, which the token no longer has.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    std::fs::remove_dir_all(d.store_dir()).unwrap();
    copy_dir(backup.path(), &d.store_dir());
    let out = d.run_once();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyhaven-mk-v1") && err.contains("not in the token"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_master_rotation_input_changes_nothing() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    for batch in [0, 10_001] {
        let e = c.call(&AdminRotateMaster { batch: Some(batch), rollback: false }).await.unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
    let e = c.call(&AdminRotateMaster { batch: None, rollback: true }).await.unwrap_err();
    assert!(e.to_string().contains("no earlier"), "{e}");
    let e = c.call(&AdminRetireMaster { version: 1 }).await.unwrap_err();
    assert!(e.to_string().contains("current"), "{e}");
    let e = c.call(&AdminRetireMaster { version: 7 }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert_eq!(c.health().await.unwrap().token.master_key_version, 1);

    // The CLI drives a whole rotation with progress lines.
    let out = d.cli(&["admin", "rotate-master", "--batch", "1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("master key 1 -> 2") && progress.contains("0 to go"), "{progress}");
    assert_eq!(c.health().await.unwrap().token.master_key_version, 2);
}
