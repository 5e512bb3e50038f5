//! The key lifecycle against the real daemon and token: rotation, rewrap,
//! retirement and trimming, states and scheduled deletion, usage, automatic
//! rotation (also when it fell due while the daemon was down), and bad input
//! that changes nothing.

use std::time::Duration;

use keyhaven::lifecycle::{
    KeyCancelDeletion, KeyDetails, KeyRotate, KeyScheduleDeletion, KeySet, KeyShow, KeyState, KeyTrim, Rewrap,
};
use keyhaven::Client;
use keyhaven_tests::*;

async fn rotate(c: &Client, t: &str, k: &str) -> KeyDetails {
    c.call(&KeyRotate { tenant: t.into(), key: k.into(), idempotency_key: None }).await.unwrap()
}

async fn show(c: &Client, t: &str, k: &str) -> KeyDetails {
    c.call(&KeyShow { tenant: t.into(), key: k.into() }).await.unwrap()
}

fn set(t: &str, k: &str) -> KeySet {
    KeySet {
        tenant: t.into(),
        key: k.into(),
        min_decryption_version: None,
        rotate_every_secs: None,
        state: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_version_decrypts_after_rotations_and_rewrap_moves_to_the_newest() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&["table=providers"]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let mut made = Vec::new();
    for v in 1..=4u32 {
        if v > 1 {
            assert_eq!(rotate(&c, "acme", "pii").await.current_version, v);
        }
        let sealed = c.encrypt(&path("acme/pii"), format!("secret {v}").as_bytes(), &context).await.unwrap();
        assert_eq!(sealed.key_version, v);
        let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
        assert_eq!(dk.key_version, v);
        made.push((v, sealed.ciphertext, dk));
    }
    drop(c);
    d.restart();
    let c = d.client().await;
    for (v, ct, dk) in &made {
        assert_eq!(
            c.decrypt(ct, &context).await.unwrap().plaintext.expose(),
            format!("secret {v}").as_bytes()
        );
        let opened = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
        assert_eq!(opened.key_version, *v);
    }

    // Rewrap: the newest version, the same data key and envelope id.
    for (v, ct, dk) in &made {
        let r = c.call(&Rewrap { text: dk.envelope.clone(), context: context.clone() }).await.unwrap();
        assert_eq!((r.from_version, r.key_version), (*v, 4));
        assert_eq!(r.envelope_id, dk.envelope_id);
        let opened = c.datakey_decrypt(&r.text, &context).await.unwrap();
        assert_eq!(opened.key_version, 4);
        assert_eq!(opened.plaintext.expose(), dk.plaintext.as_ref().unwrap().expose(), "same data key");
        let r = c.call(&Rewrap { text: ct.clone(), context: context.clone() }).await.unwrap();
        assert!(r.text.starts_with("khc1:"));
        let back = c.decrypt(&r.text, &context).await.unwrap();
        assert_eq!((back.key_version, back.plaintext.expose()), (4, format!("secret {v}").as_bytes()));
    }
    // A wrong context rewraps nothing.
    let e = c.call(&Rewrap { text: made[0].2.envelope.clone(), context: ctx(&["table=other"]) }).await;
    assert_eq!(e.unwrap_err().code(), Some(ErrorCode::Integrity));

    // Usage shows it: each old version decrypted and rewrapped.
    let details = show(&c, "acme", "pii").await;
    for v in &details.versions[..3] {
        assert_eq!((v.decryptions, v.rewraps), (2, 2), "{v:?}");
        assert!(v.last_used_at.is_some());
    }
    assert_eq!(details.versions[3].state, "current");

    // Input already current: returned as it is, counted as one decryption
    // of the current version and no rewrap (PROTOCOL.md §3.23).
    let current = c.encrypt(&path("acme/pii"), b"now", &context).await.unwrap().ciphertext;
    let before = show(&c, "acme", "pii").await.versions[3].clone();
    let r = c.call(&Rewrap { text: current.clone(), context: context.clone() }).await.unwrap();
    assert_eq!((r.from_version, r.key_version, r.text.as_str()), (4, 4, current.as_str()));
    let after = show(&c, "acme", "pii").await.versions[3].clone();
    assert_eq!((after.decryptions, after.rewraps), (before.decryptions + 1, before.rewraps), "{after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retirement_refuses_old_versions_then_trim_deletes_them() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&[]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let v1 = c.encrypt(&path("acme/pii"), b"one", &context).await.unwrap();
    rotate(&c, "acme", "pii").await;
    let v2 = c.encrypt(&path("acme/pii"), b"two", &context).await.unwrap();
    rotate(&c, "acme", "pii").await;
    let v3 = c.encrypt(&path("acme/pii"), b"three", &context).await.unwrap();

    let mut req = set("acme", "pii");
    req.min_decryption_version = Some(3);
    let after = c.call(&req).await.unwrap();
    assert_eq!(
        after.versions.iter().map(|v| v.state.as_str()).collect::<Vec<_>>(),
        ["retired", "retired", "current"]
    );
    for old in [&v1, &v2] {
        let e = c.decrypt(&old.ciphertext, &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::VersionRetired), "{e}");
        assert!(
            e.to_string().contains(&format!("version {}", old.key_version)) && e.to_string().contains("3"),
            "{e}"
        );
    }
    assert_eq!(c.decrypt(&v3.ciphertext, &context).await.unwrap().plaintext.expose(), b"three");
    // Lowering it again brings them back while they exist.
    req.min_decryption_version = Some(2);
    c.call(&req).await.unwrap();
    assert!(c.decrypt(&v2.ciphertext, &context).await.is_ok());

    let trimmed = c.call(&KeyTrim { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    assert_eq!(trimmed.trimmed, [1]);
    assert_eq!(trimmed.details.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 3]);
    // Trimmed is gone for good: the minimum cannot go back below it.
    req.min_decryption_version = Some(1);
    let e = c.call(&req).await.unwrap_err();
    assert!(e.to_string().contains("trimmed"), "{e}");
    let e = c.decrypt(&v1.ciphertext, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::VersionRetired), "{e}");
    // Nothing more to trim; the current version is never trimmed.
    let e = c.call(&KeyTrim { tenant: "acme".into(), key: "pii".into() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
}

#[tokio::test(flavor = "multi_thread")]
async fn states_disable_and_scheduled_deletion() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&[]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let old = c.encrypt(&path("acme/pii"), b"kept", &context).await.unwrap();

    let mut req = set("acme", "pii");
    req.state = Some(KeyState::Disabled);
    assert_eq!(c.call(&req).await.unwrap().state, KeyState::Disabled);
    let e = c.encrypt(&path("acme/pii"), b"new", &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::KeyDisabled), "{e}");
    assert!(c.decrypt(&old.ciphertext, &context).await.is_ok(), "disabled still decrypts");
    req.state = Some(KeyState::Enabled);
    c.call(&req).await.unwrap();
    assert!(c.encrypt(&path("acme/pii"), b"new", &context).await.is_ok());

    for days in [6, 31] {
        let r = KeyScheduleDeletion { tenant: "acme".into(), key: "pii".into(), days: Some(days) };
        assert_eq!(c.call(&r).await.unwrap_err().code(), Some(ErrorCode::BadRequest));
    }
    let r = KeyScheduleDeletion { tenant: "acme".into(), key: "pii".into(), days: Some(7) };
    let pending = c.call(&r).await.unwrap();
    assert_eq!(pending.state, KeyState::PendingDeletion);
    assert!(pending.deletion_at.unwrap() > 6 * 86_400);
    let e = c.decrypt(&old.ciphertext, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::KeyDisabled));
    assert!(e.to_string().contains("cancel-deletion"), "{e}");
    let back = c.call(&KeyCancelDeletion { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    assert_eq!(back.state, KeyState::Disabled);
    assert!(c.decrypt(&old.ciphertext, &context).await.is_ok());
    let e = c.call(&KeyCancelDeletion { tenant: "acme".into(), key: "pii".into() }).await.unwrap_err();
    assert!(e.to_string().contains("not scheduled"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn automatic_rotation_fires_and_catches_up_after_downtime() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("check_seconds = 60", "check_seconds = 1");
        assert!(text.contains("check_seconds = 1"), "{text}");
        std::fs::write(&file, text).unwrap();
    });
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("acme/still")).await.unwrap();
    let mut req = set("acme", "pii");
    req.rotate_every_secs = Some(2);
    let details = c.call(&req).await.unwrap();
    assert_eq!(details.rotate_every_secs, Some(2));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let now = show(&c, "acme", "pii").await;
    assert!(now.current_version >= 2, "{now:?}");
    assert_eq!(show(&c, "acme", "still").await.current_version, 1, "no period, no rotation");

    // Down for longer than the period: rotated at start-up.
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let before = now.current_version;
    std::thread::sleep(Duration::from_millis(2500));
    d.start_again();
    let c = d.client().await;
    // The start-up check runs beside the first requests: give it a moment.
    let mut after = show(&c, "acme", "pii").await;
    for _ in 0..30 {
        if after.current_version > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = show(&c, "acme", "pii").await;
    }
    assert!(after.current_version > before, "{before} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_lifecycle_input_is_refused_and_changes_nothing() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let before = show(&c, "acme", "pii").await;
    let e = c
        .call(&KeyRotate { tenant: "acme".into(), key: "nope".into(), idempotency_key: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    assert!(e.to_string().contains("acme/nope"), "{e}");
    for (min, needle) in [(0, "out of range"), (2, "out of range")] {
        let mut req = set("acme", "pii");
        req.min_decryption_version = Some(min);
        let e = c.call(&req).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    let e = c.call(&set("acme", "pii")).await.unwrap_err();
    assert!(e.to_string().contains("at least one"), "{e}");
    let mut req = set("acme", "pii");
    req.state = Some(KeyState::Deleted);
    assert_eq!(c.call(&req).await.unwrap_err().code(), Some(ErrorCode::BadRequest));
    let e = c.call(&KeyTrim { tenant: "acme".into(), key: "pii".into() }).await.unwrap_err();
    assert!(e.to_string().contains("never trimmed"), "{e}");
    let e = c.call(&Rewrap { text: "khe1:AAAA".into(), context: ctx(&[]) }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadEnvelope));
    assert_eq!(show(&c, "acme", "pii").await, before);

    // The CLI: usage errors exit 2 and name the problem.
    for (args, needle) in [
        (&["key", "set", "acme/pii", "--rotate-every", "soon"][..], "--rotate-every"),
        (&["key", "set", "acme/pii"][..], "nothing to set"),
        (&["key", "schedule-deletion", "acme/pii", "--days", "3"][..], "7 to 30"),
        (&["key", "create", "acme/x", "--rotate-every", "0s"][..], "under one second"),
        // Irreversible commands are guarded as `destroy` is.
        (
            &["key", "trim", "acme/pii"][..],
            "trimming cannot be undone: repeat the name with --confirm acme/pii",
        ),
        (&["key", "trim", "acme/pii", "--confirm", "acme/other"][..], "does not repeat the name `acme/pii`"),
        (
            &["admin", "retire-master", "--version", "1"][..],
            "cannot be undone: repeat the name with --confirm 1",
        ),
        (&["admin", "retire-master", "--version", "1", "--confirm", "2"][..], "does not repeat"),
    ] {
        let out = d.cli(args, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{args:?}");
    }
    assert_eq!(show(&c, "acme", "pii").await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_rotates_shows_and_rewraps_a_column_through_a_pipe() {
    let d = TestDaemon::start();
    let ok = |args: &[&str], stdin: &[u8]| {
        let out = d.cli(args, stdin);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // The period is set by the create itself (one request, one write):
    // the answer and the audit log say so.
    let created: serde_json::Value =
        serde_json::from_str(&ok(&["key", "create", "acme/pii", "--rotate-every", "90d"], b"")).unwrap();
    assert_eq!(created["rotate_every_secs"], 90 * 86_400, "{created}");
    assert_eq!(created["state"], "enabled", "{created}");
    assert_eq!(
        created["next_rotation_at"].as_u64(),
        created["created_at"].as_u64().map(|t| t + 90 * 86_400),
        "{created}"
    );
    let c = d.client().await;
    let ops: Vec<String> = c
        .call(&keyhaven::wire::AuditRead { last: Some(20), ..Default::default() })
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.op)
        .collect();
    assert!(ops.contains(&"key_create".to_owned()) && !ops.contains(&"key_set".to_owned()), "{ops:?}");
    // Out of range through the protocol: refused, nothing made.
    let raw = c
        .call_raw(
            "key_create",
            serde_json::json!({"tenant": "acme", "key": "far", "rotate_every_secs": u64::MAX}),
        )
        .await
        .unwrap_err();
    assert_eq!(raw.code(), Some(ErrorCode::BadRequest), "{raw}");
    assert!(raw.to_string().contains("rotate_every_secs"), "{raw}");
    assert!(c.key_list(Some("acme")).await.unwrap().iter().all(|k| k.key != "far"));
    let column: Vec<String> = (0..5)
        .map(|i| ok(&["encrypt", "acme/pii"], format!("row {i}").as_bytes()).trim().to_owned())
        .collect();
    let shown: serde_json::Value = serde_json::from_str(&ok(&["key", "rotate", "acme/pii"], b"")).unwrap();
    assert_eq!(shown["current_version"], 2);
    assert_eq!(shown["rotate_every_secs"], 90 * 86_400);
    assert!(shown["next_rotation_utc"].is_string());
    let input = column.join("\n") + "\n";
    let out = ok(&["rewrap"], input.as_bytes());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(ok(&["decrypt"], line.as_bytes()), format!("row {i}"));
    }
    let usage: serde_json::Value = serde_json::from_str(&ok(&["key", "usage", "acme/pii"], b"")).unwrap();
    assert_eq!(usage["versions"][0]["rewraps"], 5, "{usage}");
    assert_eq!(usage["versions"][1]["decryptions"], 5, "{usage}");
    // A bad line stops the run and names it.
    let out = d.cli(&["rewrap"], format!("{}\nkhc1:nope\n", column[0]).as_bytes());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_deletion_happens_when_its_time_comes() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("acme/kept")).await.unwrap();
    let old = c.encrypt(&path("acme/pii"), b"gone", &ctx(&[])).await.unwrap();
    let kept = c.encrypt(&path("acme/kept"), b"kept", &ctx(&[])).await.unwrap();
    let r = KeyScheduleDeletion { tenant: "acme".into(), key: "pii".into(), days: Some(7) };
    c.call(&r).await.unwrap();
    drop(c);
    // Eight days later, as far as the daemon's deletion check can tell.
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("[lifecycle]", "[lifecycle]\ntest_clock_offset_seconds = 691200");
        std::fs::write(&file, text).unwrap();
    });
    let c = d.client().await;
    let mut state = show(&c, "acme", "pii").await;
    for _ in 0..50 {
        if state.state == KeyState::Deleted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = show(&c, "acme", "pii").await;
    }
    assert_eq!(state.state, KeyState::Deleted, "{state:?}");
    assert!(state.versions.iter().all(|v| v.state == "destroyed"), "{state:?}");
    let e = c.decrypt(&old.ciphertext, &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::KeyDisabled), "{e}");
    assert!(e.to_string().contains("deleted"), "{e}");
    assert!(c.decrypt(&kept.ciphertext, &ctx(&[])).await.is_ok());
    let e = c.call(&KeyCancelDeletion { tenant: "acme".into(), key: "pii".into() }).await.unwrap_err();
    assert!(e.to_string().contains("deleted"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrap_authenticates_and_honours_revocation_even_when_nothing_changes() {
    use keyhaven::revocation::{Reason, Revoke, Scope};
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&["row=1"]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    // Already current: returned as is, but only after it opened.
    let same = c.call(&Rewrap { text: dk.envelope.clone(), context: context.clone() }).await.unwrap();
    assert_eq!(same.text, dk.envelope);
    let e = c.call(&Rewrap { text: dk.envelope.clone(), context: ctx(&["row=2"]) }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
    let scope = Scope::Tenant { tenant: "acme".into() };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let e = c.call(&Rewrap { text: dk.envelope.clone(), context: context.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
}

/// A client that lost the answer retries with the same idempotency key:
/// `key_create` answers as it did (not `already_exists`) and `key_rotate`
/// adds no second version, also after a restart; a different or absent
/// key is a new request; a malformed one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn retries_with_an_idempotency_key_make_nothing_twice() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let create = |k: Option<&str>| {
        let mut p = serde_json::json!({"tenant": "acme", "key": "idem"});
        if let Some(k) = k {
            p["idempotency_key"] = k.into();
        }
        p
    };
    let first = c.call_raw("key_create", create(Some("req-1"))).await.unwrap();
    let again = c.call_raw("key_create", create(Some("req-1"))).await.unwrap();
    assert_eq!(first, again, "the retry answers as the first call did");
    for other in [None, Some("req-2")] {
        let e = c.call_raw("key_create", create(other)).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::AlreadyExists), "{other:?}: {e}");
    }
    for bad in ["", "has space", &"x".repeat(65)] {
        let e = c.call_raw("key_create", create(Some(bad))).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{bad:?}: {e}");
        assert!(e.to_string().contains("idempotency_key"), "{e}");
    }
    let rotate =
        |k: &str| KeyRotate { tenant: "acme".into(), key: "idem".into(), idempotency_key: Some(k.into()) };
    assert_eq!(c.call(&rotate("rot-1")).await.unwrap().current_version, 2);
    assert_eq!(c.call(&rotate("rot-1")).await.unwrap().current_version, 2, "a retry adds no version");
    assert_eq!(c.call(&rotate("rot-2")).await.unwrap().current_version, 3);
    drop(c);
    d.restart();
    let c = d.client().await;
    let shown = c.call(&rotate("rot-1")).await.unwrap();
    assert_eq!((shown.current_version, shown.versions.len()), (3, 3), "remembered across a restart");
    // The retry answers with the key as it is now (it was rotated since).
    let later = c.call_raw("key_create", create(Some("req-1"))).await.unwrap();
    assert_eq!(
        (&later["created_at"], &later["current_version"]),
        (&first["created_at"], &3.into()),
        "{later}"
    );
    let out = d.cli(&["key", "rotate", "acme/idem", "--idempotency-key", "rot-2"], b"");
    assert!(out.status.success());
    let out: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["current_version"], 3, "the CLI's retry adds no version");
}
