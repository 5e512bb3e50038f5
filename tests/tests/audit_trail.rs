//! Nothing left out of the audit trail (docs/AUDIT.md §2.1): every state
//! change leaves a record with its actor, its reason where there is one and
//! its before and after, read back from the real daemon's log, including
//! the daemon's own scheduled work (automatic rotation, scheduled deletion),
//! with no key material in any of it.

use std::time::Duration;

use keyhaven::lifecycle::{
    AdminRetireMaster, AdminRotateMaster, KeyCancelDeletion, KeyRotate, KeyScheduleDeletion, KeySet,
    KeyState, KeyTrim,
};
use keyhaven::revocation::{Destroy, Reason, Revoke, RevokeLift, Scope};
use keyhaven::wire::{AdminReload, AuditRecord};
use keyhaven::Client;
use keyhaven_tests::*;
use serde_json::Value;

/// The newest record of `op` (and `ok`), after sequence number `after`.
async fn newest(c: &Client, op: &str, after: u64) -> AuditRecord {
    let records = audit_records(c).await;
    records
        .into_iter()
        .rev()
        .find(|r| r.op == op && r.seq > after)
        .unwrap_or_else(|| panic!("no `{op}` record after {after}"))
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

fn field<'a>(v: &'a Option<Value>, name: &str) -> &'a Value {
    &v.as_ref().unwrap_or_else(|| panic!("no before/after holding `{name}`"))[name]
}

/// The fields a key's before/after holds, and no others (no material).
#[track_caller]
fn only_settings(v: &Option<Value>) {
    let keys: Vec<&str> = v.as_ref().unwrap().as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "current_version",
            "deletion_at",
            "description",
            "destroyed_versions",
            "key_type",
            "min_decryption_version",
            "rotate_every_secs",
            "state",
            "tags",
            "versions"
        ],
        "{v:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_and_revocation_change_records_its_reason_before_and_after() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let r = newest(&c, "key_create", 0).await;
    assert_eq!(r.before, None);
    only_settings(&r.after);
    assert_eq!(field(&r.after, "state"), "enabled");
    assert_eq!(field(&r.after, "key_type"), "aes256-gcm");
    assert_eq!(r.actor, None, "a request's actor is its caller");
    assert_eq!(r.caller.uid, my_uid());

    // key_set: each setting before and after.
    let mut req = set("acme", "pii");
    req.rotate_every_secs = Some(86_400);
    req.state = Some(KeyState::Disabled);
    c.call(&req).await.unwrap();
    let r = newest(&c, "key_set", 0).await;
    only_settings(&r.before);
    only_settings(&r.after);
    assert_eq!(
        (field(&r.before, "state"), field(&r.after, "state")),
        (&"enabled".into(), &"disabled".into())
    );
    assert_eq!(field(&r.before, "rotate_every_secs"), &Value::Null);
    assert_eq!(field(&r.after, "rotate_every_secs"), 86_400);

    // key_rotate and key_trim.
    c.call(&KeyRotate { tenant: "acme".into(), key: "pii".into(), idempotency_key: None }).await.unwrap();
    let r = newest(&c, "key_rotate", 0).await;
    assert_eq!(
        (field(&r.before, "current_version"), field(&r.after, "current_version")),
        (&1.into(), &2.into())
    );
    let mut req = set("acme", "pii");
    req.min_decryption_version = Some(2);
    c.call(&req).await.unwrap();
    let r = newest(&c, "key_set", 0).await;
    assert_eq!(field(&r.before, "min_decryption_version"), 1);
    assert_eq!(field(&r.after, "min_decryption_version"), 2);
    c.call(&KeyTrim { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    let r = newest(&c, "key_trim", 0).await;
    assert_eq!(field(&r.before, "versions"), &serde_json::json!([1, 2]));
    assert_eq!(field(&r.after, "versions"), &serde_json::json!([2]));

    // A refused change: the record says why, and claims no after.
    let mut bad = set("acme", "pii");
    bad.min_decryption_version = Some(9);
    c.call(&bad).await.unwrap_err();
    let r = newest(&c, "key_set", 0).await;
    assert_eq!((r.outcome.as_str(), r.code.as_deref()), ("error", Some("bad_request")));
    assert_eq!((r.before.as_ref(), r.after.as_ref()), (None, None));

    // Scheduled deletion and its cancellation.
    let sched = KeyScheduleDeletion { tenant: "acme".into(), key: "pii".into(), days: Some(7) };
    c.call(&sched).await.unwrap();
    let r = newest(&c, "key_schedule_deletion", 0).await;
    assert_eq!(field(&r.after, "state"), "pending_deletion");
    assert!(field(&r.after, "deletion_at").as_u64().is_some(), "{r:?}");
    c.call(&KeyCancelDeletion { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    let r = newest(&c, "key_cancel_deletion", 0).await;
    assert_eq!(field(&r.before, "state"), "pending_deletion");
    assert_eq!(field(&r.after, "deletion_at"), &Value::Null);

    // revoke: reason, expiry and scope text; again: the one it replaces.
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    let expires = keyhaven_now() + 3600;
    let revoke = Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: Some(expires) };
    c.call(&revoke).await.unwrap();
    let r = newest(&c, "revoke", 0).await;
    assert_eq!(r.reason.as_deref(), Some("key-compromise"));
    assert_eq!(r.before, None);
    assert_eq!(field(&r.after, "expires_at"), expires);
    assert_eq!(field(&r.after, "kind"), "suspended");
    assert_eq!(field(&r.after, "scope_text"), "key `acme/pii`");
    assert!(r.detail.as_deref().unwrap().contains("key `acme/pii` is suspended since"), "{r:?}");
    let again = Revoke { scope: scope.clone(), reason: Reason::Superseded, expires_at: None };
    c.call(&again).await.unwrap();
    let r = newest(&c, "revoke", 0).await;
    assert_eq!(r.reason.as_deref(), Some("superseded"));
    assert_eq!(field(&r.before, "reason"), "key-compromise");
    assert_eq!(field(&r.before, "expires_at"), expires);
    assert_eq!(field(&r.after, "expires_at"), &Value::Null);

    // revoke_lift: its own reason, the suspension it ended.
    c.call(&RevokeLift { scope: scope.clone(), reason: Reason::Unspecified }).await.unwrap();
    let r = newest(&c, "revoke_lift", 0).await;
    assert_eq!(r.reason.as_deref(), Some("unspecified"));
    assert_eq!(field(&r.before, "reason"), "superseded");
    assert_eq!(r.after, None);
    assert!(r.detail.as_deref().unwrap().starts_with("lifted: key `acme/pii` is suspended"), "{r:?}");
    assert!(!r.detail.as_deref().unwrap().contains("BREAK-GLASS"));

    // A break-glass lift says it is one.
    let all = Revoke { scope: Scope::All, reason: Reason::PrivilegeWithdrawn, expires_at: None };
    c.call(&all).await.unwrap();
    c.call(&RevokeLift { scope: Scope::All, reason: Reason::Unspecified }).await.unwrap();
    let r = newest(&c, "revoke_lift", 0).await;
    assert!(r.detail.as_deref().unwrap().starts_with("BREAK-GLASS"), "{r:?}");
    assert_eq!(field(&r.before, "scope_text"), "the whole system");

    // destroy: the suspension before, the versions erased after.
    c.key_create(&path("gone/k")).await.unwrap();
    let t = Scope::Tenant { tenant: "gone".into() };
    c.call(&Revoke { scope: t.clone(), reason: Reason::CessationOfOperation, expires_at: None })
        .await
        .unwrap();
    c.call(&Destroy { scope: t, confirm: "gone".into() }).await.unwrap();
    let r = newest(&c, "destroy", 0).await;
    assert_eq!(r.reason.as_deref(), Some("cessation-of-operation"));
    assert_eq!(field(&r.before, "kind"), "suspended");
    assert_eq!(field(&r.after, "kind"), "destroyed");
    assert_eq!(field(&r.after, "erased"), &serde_json::json!(["gone/k@1"]));

    // admin_reload: the policy's size before and after.
    c.call(&AdminReload {}).await.unwrap();
    let r = newest(&c, "admin_reload", 0).await;
    assert!(field(&r.before, "policy_rules").as_u64().is_some(), "{r:?}");
    assert!(field(&r.after, "policy_rules").as_u64().is_some(), "{r:?}");

    // SIGHUP: the same, with actor `signal`; a broken file: an error.
    let seen = newest(&c, "admin_reload", 0).await.seq;
    signal(d.pid(), "HUP");
    let r = wait_for(&c, "admin_reload", seen).await;
    assert_eq!((r.actor.as_deref(), r.outcome.as_str()), (Some("signal"), "ok"), "{r:?}");
    assert_eq!(r.caller.pid, Some(d.pid() as i32));
    assert!(field(&r.after, "policy_rules").as_u64().is_some(), "{r:?}");
    let config = d.dir().join("keyhaven.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{good}
[[policy.rules]]
broken = 
"
        ),
    )
    .unwrap();
    signal(d.pid(), "HUP");
    let r = wait_for(&c, "admin_reload", r.seq).await;
    assert_eq!((r.actor.as_deref(), r.outcome.as_str()), (Some("signal"), "error"), "{r:?}");
    assert_eq!(r.after, None);
    std::fs::write(&config, good).unwrap();

    no_material_in(&mut d, &c).await;
}

/// Waits (up to 10 s) for a record of `op` after `after`.
async fn wait_for(c: &Client, op: &str, after: u64) -> AuditRecord {
    for _ in 0..100 {
        if let Some(r) = audit_records(c).await.into_iter().find(|r| r.op == op && r.seq > after) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no `{op}` record after {after}");
}

fn keyhaven_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// No wrapped key material from the store appears in any record: every
/// version's wrapped KEK, as the store holds it, is looked for in the
/// segment files.
async fn no_material_in(d: &mut TestDaemon, c: &Client) {
    let records = audit_records(c).await;
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let db = open_stopped_store(&d.store_dir());
    let mut needles = Vec::new();
    for tree in db.tree_names() {
        let tree = db.open_tree(tree).unwrap();
        for kv in tree.iter() {
            let (_, v) = kv.unwrap();
            if let Ok(rec) = serde_json::from_slice::<Value>(&v) {
                for v in rec["versions"].as_array().into_iter().flatten() {
                    if let Some(w) = v["wrapped_kek"].as_str().filter(|w| w.len() > 16) {
                        needles.push(w.as_bytes()[..16].to_vec());
                    }
                }
            }
        }
    }
    drop(db);
    assert!(!needles.is_empty(), "no wrapped material found to look for");
    let text: Vec<u8> = records.iter().flat_map(|r| serde_json::to_vec(r).unwrap()).collect();
    assert_eq!(find_any(&text, &needles), Vec::<usize>::new());
    for seg in audit_segments(&d.store_dir()) {
        let bytes = std::fs::read(seg).unwrap();
        assert_eq!(find_any(&bytes, &needles), Vec::<usize>::new());
    }
    d.start_again();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemons_own_rotations_and_deletions_are_recorded_with_actor_daemon() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("check_seconds = 60", "check_seconds = 1");
        assert!(text.contains("check_seconds = 1"), "{text}");
        std::fs::write(&file, text).unwrap();
    });
    let c = d.client().await;
    c.key_create(&path("acme/auto")).await.unwrap();
    let mut req = set("acme", "auto");
    req.rotate_every_secs = Some(1);
    c.call(&req).await.unwrap();
    let mut rotated = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rotated = audit_records(&c).await.into_iter().find(|r| r.op == "key_rotate");
        if rotated.is_some() {
            break;
        }
    }
    let r = rotated.expect("no record of the automatic rotation");
    assert_eq!(r.actor.as_deref(), Some("daemon"));
    assert_eq!(r.caller.pid, Some(d.pid() as i32), "the caller is the daemon's own process");
    assert_eq!(r.outcome, "ok");
    assert!(r.reason.as_deref().unwrap().starts_with("automatic rotation: version 1 was made at"), "{r:?}");
    assert!(r.reason.as_deref().unwrap().ends_with("rotates every 1 s"), "{r:?}");
    assert_eq!((r.tenant.as_deref(), r.key.as_deref(), r.version), (Some("acme"), Some("auto"), Some(2)));
    only_settings(&r.before);
    assert_eq!(
        (field(&r.before, "current_version"), field(&r.after, "current_version")),
        (&1.into(), &2.into())
    );
    let mut off = set("acme", "auto");
    off.rotate_every_secs = Some(0);
    c.call(&off).await.unwrap();

    // A scheduled deletion, eight days later as far as the check can tell.
    let sched = KeyScheduleDeletion { tenant: "acme".into(), key: "auto".into(), days: Some(7) };
    c.call(&sched).await.unwrap();
    drop(c);
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("[lifecycle]", "[lifecycle]\ntest_clock_offset_seconds = 691200");
        std::fs::write(&file, text).unwrap();
    });
    let c = d.client().await;
    let mut deleted = None;
    for _ in 0..60 {
        deleted = audit_records(&c).await.into_iter().find(|r| r.op == "key_delete");
        if deleted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = deleted.expect("no record of the scheduled deletion");
    assert_eq!(r.actor.as_deref(), Some("daemon"));
    assert_eq!(r.caller.pid, Some(d.pid() as i32));
    assert!(
        r.reason.as_deref().unwrap().starts_with("scheduled deletion: the waiting period ended at"),
        "{r:?}"
    );
    assert_eq!(field(&r.before, "state"), "pending_deletion");
    assert_eq!(field(&r.after, "state"), "deleted");
    assert_eq!(field(&r.after, "destroyed_versions"), field(&r.after, "versions"));
    assert!(field(&r.after, "versions").as_array().unwrap().len() >= 2, "{r:?}");
    assert_eq!(r.detail.as_deref(), Some("every version's key material erased"));
    // The CLI shows who did it, and why.
    let out = d.cli(&["audit", "tail", "-n", "50"], b"");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains(" key_delete ")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("actor=daemon") && line.contains("reason: scheduled deletion"), "{line}");
    let out = d.cli(&["audit", "verify"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn master_key_rotation_and_retirement_record_their_before_and_after() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/a")).await.unwrap();
    c.key_create(&path("acme/b")).await.unwrap();
    let s = c.call(&AdminRotateMaster { batch: Some(1), rollback: false }).await.unwrap();
    assert!(!s.finished);
    let r = newest(&c, "admin_rotate_master", 0).await;
    assert_eq!(field(&r.before, "master_key_version"), 1);
    assert_eq!(field(&r.before, "rotation"), &Value::Null);
    assert_eq!(field(&r.after, "master_key_version"), 2);
    assert_eq!(field(&r.after, "rotation"), &serde_json::json!({"from": 1, "to": 2}));
    assert_eq!(field(&r.after, "keys"), &serde_json::json!(["acme/a@2"]));
    assert_eq!(field(&r.after, "remaining"), 1);
    let first = r.seq;
    c.call(&AdminRotateMaster { batch: None, rollback: false }).await.unwrap();
    let r = newest(&c, "admin_rotate_master", first).await;
    assert_eq!(field(&r.before, "rotation"), &serde_json::json!({"from": 1, "to": 2}));
    assert_eq!(field(&r.after, "keys"), &serde_json::json!(["acme/b@2"]));
    assert_eq!(field(&r.after, "finished"), true);

    // Refused while version 1 still wraps keys: the record has the before.
    c.call(&AdminRetireMaster { version: 1 }).await.unwrap_err();
    let r = newest(&c, "admin_retire_master", 0).await;
    assert_eq!(r.outcome, "error");
    assert_eq!(field(&r.before, "pinned_versions"), &serde_json::json!([1, 2]));
    assert_eq!(r.after, None);
    for k in ["a", "b"] {
        let mut req = set("acme", k);
        req.min_decryption_version = Some(2);
        c.call(&req).await.unwrap();
        c.call(&KeyTrim { tenant: "acme".into(), key: k.into() }).await.unwrap();
    }
    c.call(&AdminRetireMaster { version: 1 }).await.unwrap();
    let r = newest(&c, "admin_retire_master", 0).await;
    assert_eq!(r.outcome, "ok");
    assert_eq!(field(&r.after, "pinned_versions"), &serde_json::json!([2]));
    assert_eq!(field(&r.after, "destroyed_in_token"), true);
}
