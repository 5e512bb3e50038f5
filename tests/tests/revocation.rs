//! Emergency revocation against the real daemon and token: every scope
//! refuses what it covers and nothing else, lifting restores service,
//! destruction erases the key material from the keyring for good (across
//! restarts, even with the revocation records gone; sled's log may still hold
//! the old bytes, see OPERATIONS.md §10.11), a revocation is honoured by every
//! request that starts
//! after it returns, and bad revocation requests change nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::lifecycle::{KeyShow, KeyStatus};
use keyhaven::revocation::{
    Destroy, Reason, Revocation, RevocationKind, Revoke, RevokeLift, RevokeList, Scope,
};
use keyhaven::wire::DatakeyResponse;
use keyhaven::Client;
use keyhaven_tests::*;

fn key(t: &str, k: &str, version: Option<u32>) -> Scope {
    Scope::Key { tenant: t.into(), key: k.into(), version }
}

fn tenant(t: &str) -> Scope {
    Scope::Tenant { tenant: t.into() }
}

async fn suspend(c: &Client, scope: Scope, reason: Reason) -> Revocation {
    c.call(&Revoke { scope, reason, expires_at: None }).await.unwrap()
}

async fn lift(c: &Client, scope: Scope) {
    c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
}

/// Data keys and ciphertexts under three keys of two tenants.
struct Fixture {
    context: keyhaven::EncryptionContext,
    dk: Vec<(String, DatakeyResponse)>,
    ct: Vec<(String, String)>,
}

impl Fixture {
    async fn new(c: &Client) -> Fixture {
        let context = ctx(&["app=billing"]);
        let (mut dk, mut ct) = (Vec::new(), Vec::new());
        for name in ["acme/pii", "acme/smtp", "beta/pii"] {
            c.key_create(&path(name)).await.unwrap();
            for _ in 0..2 {
                dk.push((
                    name.to_owned(),
                    c.datakey(&path(name), &context, keyhaven::Plaintext::Include).await.unwrap(),
                ));
            }
            let sealed = c.encrypt(&path(name), name.as_bytes(), &context).await.unwrap();
            ct.push((name.to_owned(), sealed.ciphertext));
        }
        Fixture { context, dk, ct }
    }

    /// Which of the fixture's envelopes and ciphertexts open, by key name;
    /// refusals must say `revoked`.
    async fn opening(&self, c: &Client) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for (name, dk) in &self.dk {
            out.push((
                format!("dk {name} {}", dk.envelope_id),
                opens(c.datakey_decrypt(&dk.envelope, &self.context).await),
            ));
        }
        for (name, ct) in &self.ct {
            out.push((format!("ct {name}"), opens(c.decrypt(ct, &self.context).await)));
        }
        for name in ["acme/pii", "acme/smtp", "beta/pii"] {
            out.push((
                format!("new {name}"),
                opens(c.datakey(&path(name), &self.context, keyhaven::Plaintext::Omit).await),
            ));
        }
        out
    }
}

fn opens<T>(r: Result<T, keyhaven::Error>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
            false
        }
    }
}

/// The names in `opening` that were refused.
fn refused(all: &[(String, bool)]) -> Vec<&str> {
    all.iter().filter(|(_, ok)| !ok).map(|(n, _)| n.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_scope_refuses_what_it_covers_and_nothing_else_until_lifted() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let f = Fixture::new(&c).await;
    assert!(refused(&f.opening(&c).await).is_empty());

    // One data key.
    let id = f.dk[0].1.envelope_id.clone();
    let r = suspend(&c, Scope::Datakey { envelope_id: id.clone() }, Reason::KeyCompromise).await;
    assert_eq!((r.kind, r.reason), (RevocationKind::Suspended, Reason::KeyCompromise));
    assert_eq!(refused(&f.opening(&c).await), [format!("dk acme/pii {id}")]);
    let e = c.datakey_decrypt(&f.dk[0].1.envelope, &f.context).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&id) && msg.contains("key-compromise") && msg.contains("suspended since"), "{msg}");
    lift(&c, Scope::Datakey { envelope_id: id }).await;
    assert!(refused(&f.opening(&c).await).is_empty());

    // A ciphertext's own data key.
    let sealed = c.encrypt(&path("acme/pii"), b"one", &f.context).await.unwrap();
    suspend(&c, Scope::Datakey { envelope_id: sealed.envelope_id.clone() }, Reason::Unspecified).await;
    assert!(!opens(c.decrypt(&sealed.ciphertext, &f.context).await));
    assert!(refused(&f.opening(&c).await).is_empty());
    lift(&c, Scope::Datakey { envelope_id: sealed.envelope_id }).await;

    // One key version, one key, one tenant: old data and new data keys.
    let acme_pii = ["dk acme/pii", "dk acme/pii", "ct acme/pii", "new acme/pii"];
    for (scope, expect) in [
        (key("acme", "pii", Some(1)), acme_pii.to_vec()),
        (key("acme", "pii", None), acme_pii.to_vec()),
        (
            tenant("acme"),
            ["dk acme/pii", "dk acme/pii", "dk acme/smtp", "dk acme/smtp", "ct acme/pii", "ct acme/smtp"]
                .into_iter()
                .chain(["new acme/pii", "new acme/smtp"])
                .collect(),
        ),
    ] {
        suspend(&c, scope.clone(), Reason::PrivilegeWithdrawn).await;
        let got: Vec<String> = refused(&f.opening(&c).await)
            .iter()
            .map(|n| n.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(got, expect, "{scope}");
        let e = c.encrypt(&path("acme/pii"), b"x", &f.context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked));
        lift(&c, scope).await;
        assert!(refused(&f.opening(&c).await).is_empty());
    }

    // Everything; health says so.
    suspend(&c, Scope::All, Reason::KeyCompromise).await;
    assert_eq!(refused(&f.opening(&c).await).len(), f.opening(&c).await.len());
    let h = c.health().await.unwrap();
    assert_eq!(h.status, "suspended");
    assert_eq!(h.suspended.unwrap().reason, Reason::KeyCompromise);
    // A tenant that does not exist is refused as revoked too: nothing leaks.
    let e = c.datakey(&path("nobody/x"), &f.context, keyhaven::Plaintext::Omit).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked));
    lift(&c, Scope::All).await;
    assert_eq!(c.health().await.unwrap().status, "ok");
    assert!(refused(&f.opening(&c).await).is_empty());
    assert!(c.call(&RevokeList::default()).await.unwrap().revocations.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn suspensions_survive_a_restart_and_expire_by_themselves() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let f = Fixture::new(&c).await;
    suspend(&c, tenant("beta"), Reason::AffiliationChanged).await;
    let soon = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2;
    c.call(&Revoke { scope: key("acme", "smtp", None), reason: Reason::Superseded, expires_at: Some(soon) })
        .await
        .unwrap();
    suspend(&c, Scope::All, Reason::KeyCompromise).await;
    drop(c);
    d.restart();
    let c = d.client().await;
    // A start under a whole-system suspension says so (log below), and
    // health says it in words.
    let h = c.health().await.unwrap();
    assert_eq!(h.status, "suspended");
    let said = h.suspended_message.unwrap_or_default();
    assert!(said.contains("is suspended since") && said.contains("key-compromise"), "{said}");
    lift(&c, Scope::All).await;
    assert_eq!(c.health().await.unwrap().suspended_message, None);
    let listed = c.call(&RevokeList::default()).await.unwrap().revocations;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let acme_only = c.revoke_list(Some("acme")).await.unwrap();
    assert_eq!(acme_only.iter().map(|r| r.scope.clone()).collect::<Vec<_>>(), [key("acme", "smtp", None)]);
    let now: Vec<String> = refused(&f.opening(&c).await).iter().map(|s| s.to_string()).collect();
    assert!(
        now.iter().any(|n| n.contains("beta/pii")) && now.iter().any(|n| n.contains("acme/smtp")),
        "{now:?}"
    );

    tokio::time::sleep(Duration::from_millis(2600)).await;
    let later = f.opening(&c).await;
    assert!(refused(&later).iter().all(|n| n.contains("beta/pii")), "{later:?}");
    assert_eq!(c.call(&RevokeList::default()).await.unwrap().revocations.len(), 1);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("every key operation is refused until it is lifted"),
        "the start did not say so: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn destruction_erases_the_material_for_good() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    let f = Fixture::new(&c).await;
    let destroy = |scope: Scope, confirm: &str| Destroy { scope, confirm: confirm.into() };

    // Not suspended yet; wrong confirmation; the whole system; a data key.
    for (req, needle) in [
        (destroy(key("acme", "pii", None), "acme/pii"), "must be suspended"),
        (destroy(Scope::All, ""), "cannot be destroyed"),
        (destroy(Scope::Datakey { envelope_id: f.dk[0].1.envelope_id.clone() }, ""), "suspend it"),
    ] {
        let e = c.call(&req).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    suspend(&c, key("acme", "pii", None), Reason::KeyCompromise).await;
    // What the key's answers say while it is suspended.
    let shown = c.call(&KeyShow { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    assert_eq!(shown.state, KeyStatus::Suspended, "{shown:?}");
    assert_eq!(shown.revocation.as_ref().map(|r| r.reason), Some(Reason::KeyCompromise), "{shown:?}");
    let e = c.call(&destroy(key("acme", "pii", None), "acme/smtp")).await.unwrap_err();
    assert!(e.to_string().contains("does not repeat"), "{e}");
    assert!(refused(&f.opening(&c).await).iter().all(|n| n.contains("acme/pii")));

    // A copy of the store taken before the destruction, for later.
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let wrapped_before = stored_wrapped_keks(&d.store_dir());
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), backup.path());
    d.start_again();
    let c = d.client().await;

    let done = c.call(&destroy(key("acme", "pii", None), "acme/pii")).await.unwrap();
    assert_eq!(done.erased, ["acme/pii@1"]);
    assert_eq!(done.revocation.kind, RevocationKind::Destroyed);
    let e = c.datakey_decrypt(&f.dk[0].1.envelope, &f.context).await.unwrap_err();
    assert!(e.to_string().contains("was destroyed"), "{e}");
    let e = c
        .call(&RevokeLift { scope: key("acme", "pii", None), reason: Reason::Unspecified })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot be lifted"), "{e}");
    let again = Revoke { scope: key("acme", "pii", None), reason: Reason::Unspecified, expires_at: None };
    assert_eq!(c.call(&again).await.unwrap_err().code(), Some(ErrorCode::AlreadyExists));
    // `key show` and `key list` say it is destroyed (not "enabled"), and
    // its name is taken for good: `already_exists`, as PROTOCOL.md says.
    let shown = c.call(&KeyShow { tenant: "acme".into(), key: "pii".into() }).await.unwrap();
    assert_eq!(shown.state, KeyStatus::Destroyed, "{shown:?}");
    assert_eq!(shown.revocation.as_ref().map(|r| r.kind), Some(RevocationKind::Destroyed), "{shown:?}");
    let listed = c.key_list(Some("acme")).await.unwrap();
    let state = |name: &str| listed.iter().find(|k| k.key == name).and_then(|k| k.state);
    assert_eq!((state("pii"), state("smtp")), (Some(KeyStatus::Destroyed), Some(KeyStatus::Enabled)));
    let shown = run_cli(d.socket(), &["key", "show", "acme/pii"], b"");
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"state\": \"destroyed\""), "{shown:?}");
    let e = c.key_create(&path("acme/pii")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists), "{e}");
    // Other keys are untouched.
    let other: Vec<&str> = vec![];
    let still = f.opening(&c).await;
    assert_eq!(
        refused(&still).iter().filter(|n| !n.contains("acme/pii")).copied().collect::<Vec<_>>(),
        other
    );

    // Survives a restart; the wrapped KEK is gone from the store. Revocation
    // records removed by hand are caught by the token's anchor; and even
    // accepted by an operator, nothing opens.
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let (pii, _) = wrapped_before.iter().find(|(k, _)| k == "acme/pii").unwrap();
    let after = stored_wrapped_keks(&d.store_dir());
    assert!(after.iter().any(|(k, w)| k == pii && w.is_empty()), "{after:?}");
    clear_revocations(&d.store_dir());
    let out = d.run_once();
    assert!(!out.status.success(), "a store whose revocations were removed by hand started");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match the token's anchor"));
    d.accept_store("test: revocations removed by hand");
    d.start_again();
    let c = d.client().await;
    let e = c.datakey_decrypt(&f.dk[0].1.envelope, &f.context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    assert!(e.to_string().contains("destroyed"), "{e}");
    assert!(c.decrypt(&f.ct[1].1, &f.context).await.is_ok(), "acme/smtp still opens");
    drop(c);

    // What OPERATIONS.md states: restoring a copy taken before the
    // destruction brings the material back while the master key exists,
    // once an operator accepts the older copy on purpose.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    std::fs::remove_dir_all(d.store_dir()).unwrap();
    copy_dir(backup.path(), &d.store_dir());
    let out = d.run_once();
    assert!(!out.status.success(), "an older copy of the store started unnoticed");
    d.accept_store("test: restored the backup on purpose");
    d.start_again();
    let c = d.client().await;
    lift(&c, key("acme", "pii", None)).await;
    assert!(c.datakey_decrypt(&f.dk[0].1.envelope, &f.context).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn destroying_a_tenant_erases_all_its_keys() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let f = Fixture::new(&c).await;
    suspend(&c, tenant("acme"), Reason::CessationOfOperation).await;
    let done = c.call(&Destroy { scope: tenant("acme"), confirm: "acme".into() }).await.unwrap();
    assert_eq!(done.erased, ["acme/pii@1", "acme/smtp@1"]);
    let all = f.opening(&c).await;
    let r = refused(&all);
    assert!(r.iter().all(|n| n.contains("acme/")) && r.len() == 8, "{r:?}");
    // No new key under a destroyed tenant.
    let e = c.key_create(&path("acme/new")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_is_honoured_by_every_request_that_starts_after_it_returns() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&["app=load"]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    let envelope = Arc::new(dk.envelope);
    let stop = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = d.client().await;
        let (envelope, context) = (envelope.clone(), context.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop {
                let started = Instant::now();
                let r = client.datakey_decrypt(&envelope, &context).await;
                seen.push((started, r.map(|_| ()).map_err(|e| e.code())));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    suspend(&c, key("acme", "pii", None), Reason::KeyCompromise).await;
    let returned = Instant::now();
    let (mut before, mut after) = (0, 0);
    for t in tasks {
        for (started, r) in t.await.unwrap() {
            if started > returned {
                assert_eq!(r, Err(Some(ErrorCode::Revoked)));
                after += 1;
            } else {
                before += 1;
            }
        }
    }
    assert!(before > 100 && after > 100, "too few requests to tell: {before} before, {after} after");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_revocation_requests_are_refused_and_change_nothing() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    suspend(&c, key("acme", "pii", Some(1)), Reason::Superseded).await;
    let before = c.call(&RevokeList::default()).await.unwrap().revocations;
    let raw = |op: &'static str, params: serde_json::Value| {
        let c = &c;
        async move { c.call_raw(op, params).await.unwrap_err() }
    };
    for (op, params, code, needle) in [
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "planet"}, "reason": "unspecified"}),
            ErrorCode::BadRequest,
            "planet",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "tenant", "tenant": "acme"}}),
            ErrorCode::BadRequest,
            "reason",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "all"}, "reason": "oops"}),
            ErrorCode::BadRequest,
            "key-compromise",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "key", "tenant": "acme", "key": "nope"}, "reason": "unspecified"}),
            ErrorCode::NotFound,
            "acme/nope",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "key", "tenant": "acme", "key": "pii", "version": 7}, "reason": "unspecified"}),
            ErrorCode::NotFound,
            "version 7",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "tenant", "tenant": "beta"}, "reason": "unspecified"}),
            ErrorCode::NotFound,
            "beta",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "datakey", "envelope_id": "xyz"}, "reason": "unspecified"}),
            ErrorCode::BadRequest,
            "envelope id",
        ),
        (
            "revoke",
            serde_json::json!({"scope": {"kind": "all"}, "reason": "unspecified", "expires_at": 1}),
            ErrorCode::BadRequest,
            "not in the future",
        ),
        (
            "revoke_lift",
            serde_json::json!({"scope": {"kind": "key", "tenant": "acme", "key": "pii"}, "reason": "unspecified"}),
            ErrorCode::NotFound,
            "not suspended",
        ),
        (
            "revoke_lift",
            serde_json::json!({"scope": {"kind": "all"}, "reason": "unspecified"}),
            ErrorCode::NotFound,
            "not suspended",
        ),
        (
            "destroy",
            serde_json::json!({"scope": {"kind": "key", "tenant": "acme", "key": "pii", "version": 1}, "confirm": "acme/pi"}),
            ErrorCode::BadRequest,
            "does not repeat",
        ),
    ] {
        let e = raw(op, params).await;
        assert_eq!(e.code(), Some(code), "{op}: {e}");
        assert!(e.to_string().contains(needle), "{op}: {e}");
    }
    assert_eq!(c.call(&RevokeList::default()).await.unwrap().revocations, before);
    assert_eq!(c.key_list(None).await.unwrap()[0].versions, [1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_revokes_lists_lifts_and_destroys() {
    let d = TestDaemon::start();
    let ok = |args: &[&str], stdin: &[u8]| {
        let out = d.cli(args, stdin);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let fails = |args: &[&str], code: i32| {
        let out = d.cli(args, b"");
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    ok(&["key", "create", "acme/pii"], b"");
    let sealed: serde_json::Value =
        serde_json::from_str(&ok(&["encrypt", "acme/pii", "--json"], b"sk-live")).unwrap();
    let id = sealed["envelope_id"].as_str().unwrap().to_owned();
    let ct = sealed["ciphertext"].as_str().unwrap().to_owned();

    // Usage errors name the problem before anything is sent.
    assert!(fails(&["revoke", "key", "acme/pii"], 2).contains("--reason is required"));
    assert!(fails(&["revoke", "key", "acme/pii", "--reason", "oops"], 2).contains("key-compromise"));
    assert!(fails(&["revoke", "all", "--reason", "superseded", "--expires", "soon"], 2).contains("--expires"));
    assert!(fails(&["destroy", "key", "acme/pii"], 2).contains("--confirm acme/pii"));
    assert!(fails(&["destroy", "tenant", "acme", "--confirm", "acme/pii"], 2).contains("does not repeat"));

    let out = d.cli(&["revoke", "datakey", &id, "--reason", "key-compromise"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "a real id is not warned about");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["kind"], "suspended");
    assert_eq!(r["envelope_seen"], true, "{r}");
    // An id no record names (a typo): suspended all the same, with a
    // warning; its own revocation record does not count as a sighting.
    let typo = format!("{}0", &id[..31]);
    let typo = if typo == id { format!("{}1", &id[..31]) } else { typo };
    for _ in 0..2 {
        let out = d.cli(&["revoke", "datakey", &typo, "--reason", "key-compromise"], b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("warning: no audit record names envelope id {typo}")), "{err}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (r["kind"].as_str(), r["envelope_seen"].as_bool()),
            (Some("suspended"), Some(false)),
            "{r}"
        );
    }
    ok(&["revoke", "lift", "datakey", &typo, "--reason", "unspecified"], b"");
    let out = d.cli(&["decrypt"], ct.as_bytes());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    ok(&["revoke", "key", "acme/pii", "--version", "1", "--reason", "superseded", "--expires", "1h"], b"");
    let list: serde_json::Value = serde_json::from_str(&ok(&["revoke", "list"], b"")).unwrap();
    assert_eq!(list["revocations"].as_array().unwrap().len(), 2, "{list}");
    assert!(list["revocations"][0]["expires_utc"].is_string(), "{list}");
    ok(&["revoke", "lift", "datakey", &id, "--reason", "unspecified"], b"");
    assert!(
        fails(&["revoke", "lift", "datakey", &id, "--reason", "unspecified"], 1).contains("not suspended")
    );
    let destroyed: serde_json::Value = serde_json::from_str(&ok(
        &["destroy", "key", "acme/pii", "--version", "1", "--confirm", "acme/pii"],
        b"",
    ))
    .unwrap();
    assert_eq!(destroyed["erased"], serde_json::json!(["acme/pii@1"]));
    // The wire's `revocation` (PROTOCOL.md §3.16), with the CLI's own fields.
    assert_eq!(destroyed["revocation"]["kind"], "destroyed", "{destroyed}");
    assert!(destroyed["revocation"]["since_utc"].is_string(), "{destroyed}");
    let out = d.cli(&["decrypt"], ct.as_bytes());
    assert!(String::from_utf8_lossy(&out.stderr).contains("destroyed"));

    ok(&["revoke", "all", "--reason", "key-compromise"], b"");
    let out = d.cli(&["health"], b"");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("suspended"));
    ok(&["revoke", "lift", "all", "--reason", "unspecified"], b"");
    ok(&["health"], b"");
}

/// `tenant/key` → the wrapped KEK bytes of version 1, read from a stopped
/// daemon's store.
fn stored_wrapped_keks(store: &std::path::Path) -> Vec<(String, String)> {
    let db = open_stopped_store(store);
    let keyring = db.open_tree("keyring").unwrap();
    keyring
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            let rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let wrapped = rec["versions"][0]["wrapped_kek"].as_str().unwrap_or_default().to_owned();
            (String::from_utf8(k.to_vec()).unwrap(), wrapped)
        })
        .collect()
}

fn clear_revocations(store: &std::path::Path) {
    let db = open_stopped_store(store);
    db.open_tree("revocations").unwrap().clear().unwrap();
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_scope_leaves_the_other_versions_alone() {
    use keyhaven::lifecycle::KeyRotate;
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&[]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let v1 = c.encrypt(&path("acme/pii"), b"one", &context).await.unwrap();
    c.call(&KeyRotate { tenant: "acme".into(), key: "pii".into(), idempotency_key: None }).await.unwrap();
    let v2 = c.encrypt(&path("acme/pii"), b"two", &context).await.unwrap();
    suspend(&c, key("acme", "pii", Some(1)), Reason::Superseded).await;
    assert!(!opens(c.decrypt(&v1.ciphertext, &context).await));
    assert!(opens(c.decrypt(&v2.ciphertext, &context).await));
    // New data keys use version 2, which is not suspended.
    assert!(opens(c.encrypt(&path("acme/pii"), b"three", &context).await));
    // Destroying version 1 only.
    c.call(&Destroy { scope: key("acme", "pii", Some(1)), confirm: "acme/pii".into() }).await.unwrap();
    assert!(!opens(c.decrypt(&v1.ciphertext, &context).await));
    assert!(opens(c.decrypt(&v2.ciphertext, &context).await));
}
