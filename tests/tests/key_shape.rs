//! One shape for a key in every answer (PROTOCOL.md §3.3 "One key shape"):
//! `key_create`, `key_list`, `key_show`, `key_rotate` and `key_set` use the
//! same field names, on the wire and in the CLI's JSON, against a real
//! daemon.

use std::collections::BTreeSet;

use keyhaven_tests::*;
use serde_json::{json, Value};

/// The field names of a key answer, `versions` aside (its items differ:
/// numbers in a KeyInfo, objects in a KeyDetails).
fn fields(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().filter(|k| *k != "versions").cloned().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_answer_has_the_same_field_names() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let name = json!({"tenant": "acme", "key": "tokens"});
    let created = c
        .call_raw("key_create", json!({"tenant": "acme", "key": "tokens", "rotate_every_secs": 86400}))
        .await
        .unwrap();
    let listed = c.call_raw("key_list", json!({"tenant": "acme"})).await.unwrap()["keys"][0].clone();
    let shown = c.call_raw("key_show", name.clone()).await.unwrap();
    let rotated = c.call_raw("key_rotate", name.clone()).await.unwrap();
    let set = c
        .call_raw("key_set", json!({"tenant": "acme", "key": "tokens", "min_decryption_version": 2}))
        .await
        .unwrap();
    for (op, v) in [("key_list", &listed), ("key_show", &shown), ("key_rotate", &rotated), ("key_set", &set)]
    {
        assert_eq!(fields(v), fields(&created), "{op} vs key_create: {v}");
    }
    for wanted in
        ["tenant", "key", "type", "state", "created_at", "current_version", "min_decryption_version"]
    {
        assert!(created.get(wanted).is_some(), "{wanted} in {created}");
    }
    assert_eq!(created["next_rotation_at"], json!(created["created_at"].as_u64().unwrap() + 86400));
    assert_eq!(shown["next_rotation_at"], created["next_rotation_at"]);
    assert_eq!(set["min_decryption_version"], 2);
    // `wraps` is deprecated: the same figure under its new name.
    let versions = set["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    for v in versions {
        assert!(v["wrap_budget_reserved"].is_u64(), "{v}");
        assert_eq!(v["wrap_budget_reserved"], v["wraps"], "{v}");
    }
    // The key as `key_list` sees it after the change: the same settings.
    let listed = c.call_raw("key_list", json!({"tenant": "acme"})).await.unwrap()["keys"][0].clone();
    assert_eq!(listed["min_decryption_version"], 2);
    assert_eq!(listed["versions"], json!([1, 2]));
    let hello = c.call(&keyhaven::wire::Hello { protocol: 1, client: None }).await.unwrap();
    assert!(hello.features.iter().any(|f| f == "key_shape"), "{:?}", hello.features);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_one_shape_with_readable_times_next_to_unix_ones() {
    let d = TestDaemon::start();
    let json_of = |args: &[&str], stdin: &[u8]| -> Value {
        let out = d.cli(args, stdin);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = json_of(&["key", "create", "acme/tokens", "--rotate-every", "1d"], b"");
    let shown = json_of(&["key", "show", "acme/tokens"], b"");
    let listed = json_of(&["key", "list", "acme"], b"")["keys"][0].clone();
    assert_eq!(fields(&created), fields(&shown));
    assert_eq!(fields(&listed), fields(&shown));
    for v in [&created, &shown, &listed] {
        assert!(v["created_utc"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["next_rotation_utc"].as_str().unwrap().ends_with('Z'), "{v}");
    }
    let ct = d.cli(&["encrypt", "acme/tokens", "--text", "s3cret"], b"");
    assert!(ct.status.success(), "{}", String::from_utf8_lossy(&ct.stderr));
    assert_eq!(json_of(&["decrypt", "--json"], &ct.stdout)["key_version"], 1);
    // `key usage`: the key named as everywhere, `last_used_at` as in key_show.
    let usage = json_of(&["key", "usage", "acme/tokens"], b"");
    assert_eq!((usage["tenant"].as_str(), usage["key"].as_str()), (Some("acme"), Some("tokens")), "{usage}");
    let v1 = &usage["versions"][0];
    assert!(v1["last_used_at"].is_u64(), "{usage}");
    assert!(v1["last_used_utc"].as_str().unwrap().ends_with('Z'), "{usage}");
    assert!(v1["wrap_budget_reserved"].is_u64(), "{usage}");
    assert!(v1.get("last_used_utc").is_some() && usage.get("last_used_utc").is_none());
}
