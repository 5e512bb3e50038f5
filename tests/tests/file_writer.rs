//! Custody against a file writer (docs/SECURITY.md §3): someone who can
//! write the store's files but has no token PIN edits records, swaps
//! wrapped KEKs, removes a suspension, or puts back an older copy of the
//! store. The digest of the store's state is anchored in the token, so the
//! daemon refuses to start on any of it until an operator accepts the store
//! on purpose (`keyhavend accept-store`), which the audit log records.

use std::path::Path;

use keyhaven::revocation::{Reason, Revoke, Scope};
use keyhaven::wire::AuditRead;
use keyhaven_tests::*;

/// Edits record `key` of `tree` in a stopped daemon's store.
fn edit(store: &Path, tree: &str, key: &str, change: impl FnOnce(&mut serde_json::Value)) {
    let db = open_stopped_store(store);
    let t = db.open_tree(tree).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&t.get(key).unwrap().expect("record")).unwrap();
    change(&mut v);
    t.insert(key, serde_json::to_vec(&v).unwrap()).unwrap();
    db.flush().unwrap();
}

fn refused_start(d: &TestDaemon, what: &str) {
    let out = d.run_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon started on a store with {what}");
    assert!(
        err.contains("does not match the token's anchor") && err.contains("accept-store"),
        "{what}: {err}"
    );
}

fn restore(d: &TestDaemon, pristine: &Path) {
    std::fs::remove_dir_all(d.store_dir()).unwrap();
    copy_dir(pristine, &d.store_dir());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hand_edit_of_the_store_is_refused_at_start() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("beta/pii")).await.unwrap();
    c.call(&keyhaven::lifecycle::KeyRotate {
        tenant: "acme".into(),
        key: "pii".into(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    let set = keyhaven::lifecycle::KeySet {
        tenant: "acme".into(),
        key: "pii".into(),
        min_decryption_version: Some(2),
        rotate_every_secs: None,
        state: None,
        ..Default::default()
    };
    c.call(&set).await.unwrap();
    let scope = Scope::Tenant { tenant: "beta".into() };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), pristine.path());

    // The control: the untouched store starts (and stopping it writes the
    // usage counts, anchored; so the pristine copy is taken after).
    d.start_again();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    std::fs::remove_dir_all(pristine.path()).unwrap();
    copy_dir(&d.store_dir(), pristine.path());

    edit(&d.store_dir(), "keyring", "acme/pii", |v| v["min_decryption_version"] = 1.into());
    refused_start(&d, "a lowered minimum decryption version");
    restore(&d, pristine.path());

    let (a, b) = {
        let db = open_stopped_store(&d.store_dir());
        let t = db.open_tree("keyring").unwrap();
        let get = |k: &str| serde_json::from_slice::<serde_json::Value>(&t.get(k).unwrap().unwrap()).unwrap();
        (
            get("acme/pii")["versions"][0]["wrapped_kek"].clone(),
            get("beta/pii")["versions"][0]["wrapped_kek"].clone(),
        )
    };
    edit(&d.store_dir(), "keyring", "acme/pii", |v| v["versions"][0]["wrapped_kek"] = b);
    edit(&d.store_dir(), "keyring", "beta/pii", |v| v["versions"][0]["wrapped_kek"] = a);
    refused_start(&d, "wrapped KEKs swapped between keys");
    restore(&d, pristine.path());

    {
        let db = open_stopped_store(&d.store_dir());
        db.open_tree("revocations").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    refused_start(&d, "a suspension removed");
    restore(&d, pristine.path());

    edit(&d.store_dir(), "meta", "meta", |v| v["master_keys"] = serde_json::json!([]));
    refused_start(&d, "the master keys' pins removed");
    restore(&d, pristine.path());

    {
        let db = open_stopped_store(&d.store_dir());
        db.open_tree("keyring").unwrap().remove("beta/pii").unwrap();
        db.flush().unwrap();
    }
    refused_start(&d, "a key record removed");
    restore(&d, pristine.path());

    // Put back as it was, the store starts and serves.
    d.start_again();
    let c = d.client().await;
    let e = c.encrypt(&path("beta/pii"), b"x", &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_copy_of_the_store_is_refused_until_an_operator_accepts_it() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), backup.path());
    d.start_again();
    let c = d.client().await;
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // The copy from before the suspension would lift it: refused.
    restore(&d, backup.path());
    refused_start(&d, "an older copy (from before a suspension)");

    // An operator restores it on purpose.
    let said = d.accept_store("restored last night's backup after a disk failure");
    assert!(said.contains("accepted as it is"), "{said}");
    d.start_again();
    let c = d.client().await;
    assert!(c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await.is_ok(), "the accepted copy is served");
    let page = c.call(&AuditRead { tenant: None, ..Default::default() }).await.unwrap();
    let rec = page.records.iter().find(|r| r.op == "accept_store").expect("accept-store is in the audit log");
    assert_eq!(rec.outcome, "alert");
    assert_eq!(rec.caller.uid, my_uid());
    assert!(rec.detail.as_deref().unwrap_or_default().contains("after a disk failure"), "{rec:?}");
    assert_eq!(rec.reason.as_deref(), Some("restored last night's backup after a disk failure"));
    drop(c);
    // Recorded once, not at every start.
    d.restart();
    let c = d.client().await;
    let page = c.call(&AuditRead { tenant: None, ..Default::default() }).await.unwrap();
    assert_eq!(page.records.iter().filter(|r| r.op == "accept_store").count(), 1);
    assert!(d.cli(&["audit", "verify"], b"").status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_writes_never_leaves_a_store_its_anchor_refuses() {
    let mut d = TestDaemon::start();
    let mut cut_short = 0;
    for round in 0..6 {
        let c = d.client().await;
        let writes = tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..1000 {
                let name = format!("r{round}/k{i}");
                match c.key_create(&path(&name)).await {
                    Ok(_) => made.push(name),
                    Err(_) => break,
                }
            }
            made
        });
        tokio::time::sleep(std::time::Duration::from_millis(40 + 30 * round)).await;
        signal(d.pid(), "KILL");
        let made = writes.await.unwrap();
        if !made.is_empty() && made.len() < 1000 {
            cut_short += 1;
        }
        let (status, _) = d.stop();
        assert!(!status.success());
        d.start_again(); // panics if the anchor refused the store
        let c = d.client().await;
        let listed: Vec<String> = c
            .key_list(Some(&format!("r{round}")))
            .await
            .unwrap()
            .iter()
            .map(|k| format!("{}/{}", k.tenant, k.key))
            .collect();
        for name in &made {
            assert!(listed.contains(name), "round {round}: acknowledged key {name} is gone");
        }
    }
    assert!(cut_short >= 3, "the kills did not land among the writes ({cut_short} of 6 rounds)");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_log_cut_back_with_its_seals_is_refused_at_start() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    drop(c);
    d.restart(); // a seal at the stop
    let c = d.client().await;
    for _ in 0..5 {
        c.key_list(None).await.unwrap();
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let frames = audit_frames(&d.store_dir());
    let last_seal = frames.iter().rposition(|f| f.kind == b's').expect("a seal at the clean stop");

    // The tail cut off together with the seal that covers it, back to an
    // earlier seal: a shorter log that verifies on its own.
    let earlier_seal = frames[..last_seal].iter().rposition(|f| f.kind == b's').expect("an earlier seal");
    write_audit_frames(&d.store_dir(), &frames[..=earlier_seal]);
    let out = d.run_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a log cut back with its seals started");
    assert!(err.contains("sealed and anchored in the token") && err.contains("accept-store"), "{err}");

    // Put back whole, it starts; then an operator who restores on purpose
    // gets the shorter log accepted, and the accept is recorded.
    write_audit_frames(&d.store_dir(), &frames);
    d.start_again();
    drop(d.client().await);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    write_audit_frames(&d.store_dir(), &frames[..=earlier_seal]);
    d.accept_store("test: restored an older audit log");
    d.start_again();
    let c = d.client().await;
    let page = c.call(&AuditRead { tenant: None, ..Default::default() }).await.unwrap();
    assert!(page.records.iter().any(|r| r.op == "accept_store"));
    assert!(d.cli(&["audit", "verify"], b"").status.success());
}
