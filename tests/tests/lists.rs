//! Lists in pages (issue 20): with more keys or revocations than one answer
//! may hold, `key_list` and `revoke_list` answer in pages under the frame
//! limit, the pages join up to the whole list in order, and the CLI and the
//! Rust client follow them. Before: 13,000 keys made a 1.17 MB answer and
//! `keyhaven key list` failed with "the daemon closed the connection".

use std::collections::BTreeSet;

use keyhaven::revocation::{Reason, Revoke, RevokeList, Scope};
use keyhaven::wire::{KeyList, MAX_LIST_PAGE};
use keyhaven::ErrorCode;
use keyhaven_tests::*;
use serde_json::json;

/// Makes `n` keys `{tenant}/k{i:05}` over 8 connections.
async fn make_keys(d: &TestDaemon, tenant: &str, n: usize) {
    let mut tasks = Vec::new();
    for part in 0..8 {
        let c = d.client().await;
        let tenant = tenant.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (part..n).step_by(8) {
                c.key_create(&path(&format!("{tenant}/k{i:05}"))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn key_list_pages_join_up_and_the_cli_follows_them() {
    let d = TestDaemon::start();
    make_keys(&d, "big", 1100).await;
    make_keys(&d, "small", 23).await;
    let c = d.client().await;

    // The default page is MAX_LIST_PAGE keys, then the rest.
    let first = c.call(&KeyList::default()).await.unwrap();
    assert_eq!(first.keys.len(), MAX_LIST_PAGE as usize);
    let after = first.next.clone().expect("more keys follow");
    assert_eq!(after, "big/k00999");
    let second = c.call(&KeyList { after: Some(after), ..Default::default() }).await.unwrap();
    assert_eq!(second.keys.len(), 1123 - 1000);
    assert_eq!(second.next, None, "the last page has no `next`");

    // Small pages of one tenant join up to the whole tenant, in order, once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = c
            .call(&KeyList { tenant: Some("small".into()), limit: Some(7), after, ..Default::default() })
            .await
            .unwrap();
        assert!(p.keys.len() <= 7);
        seen.extend(p.keys.iter().map(|k| format!("{}/{}", k.tenant, k.key)));
        match p.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..23).map(|i| format!("small/k{i:05}")).collect();
    assert_eq!(seen, expected);

    // A cursor whose key is gone still works: the keys after its name.
    let p = c
        .call(&KeyList {
            tenant: Some("small".into()),
            limit: Some(2),
            after: Some("small/k00003x".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p.keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["k00004", "k00005"]);

    // The Rust client and the CLI follow the pages.
    assert_eq!(c.key_list(None).await.unwrap().len(), 1123);
    let out = d.cli(&["key", "list"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeSet<String> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("{}/{}", k["tenant"].as_str().unwrap(), k["key"].as_str().unwrap()))
        .collect();
    assert_eq!(names.len(), 1123, "the CLI listed every key once");

    // Bad paging input is a named bad_request.
    for (params, says) in [
        (json!({"limit": 0}), "`limit` 0 is out of range"),
        (json!({"limit": MAX_LIST_PAGE + 1}), "is out of range"),
        (json!({"after": "no-slash"}), "`after` must be a key as TENANT/KEY"),
        (json!({"after": 7}), "after"),
    ] {
        let e = c.call_raw("key_list", params.clone()).await.expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{params}: {e}");
        assert!(e.to_string().contains(says), "{params}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_list_pages_hold_every_revocation_broadest_first() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let mut ids = BTreeSet::new();
    let mut tasks = Vec::new();
    for part in 0..8u64 {
        let c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..135u64 {
                let id = format!("{:016x}{:016x}", part + 1, i * 7919 + 13);
                let scope = Scope::Datakey { envelope_id: id.clone() };
                c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
                ids.push(id);
            }
            ids
        }));
    }
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let key = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    c.call(&Revoke { scope: key.clone(), reason: Reason::Superseded, expires_at: None }).await.unwrap();
    c.call(&Revoke {
        scope: Scope::Tenant { tenant: "acme".into() },
        reason: Reason::Superseded,
        expires_at: None,
    })
    .await
    .unwrap();

    let first = c.call(&RevokeList::default()).await.unwrap();
    assert_eq!(first.revocations.len(), MAX_LIST_PAGE as usize);
    assert_eq!(first.revocations[0].scope, Scope::Tenant { tenant: "acme".into() }, "broadest first");
    assert_eq!(first.revocations[1].scope, key);
    let rest = c.call(&RevokeList { after: first.next.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(rest.next, None);
    let listed: Vec<String> = first
        .revocations
        .iter()
        .chain(&rest.revocations)
        .filter_map(|r| match &r.scope {
            Scope::Datakey { envelope_id } => Some(envelope_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect::<Vec<_>>(), "every data key once, by envelope id");
    assert_eq!(c.revoke_list(None).await.unwrap().len(), 1080 + 2);

    let out = d.cli(&["revoke", "list"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all["revocations"].as_array().unwrap().len(), 1082);

    let e = c
        .call_raw("revoke_list", json!({"after": {"kind": "datakey", "envelope_id": "xyz"}}))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
}
