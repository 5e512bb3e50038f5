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
    // `key trim`: the key as `key show` prints it, plus what went.
    json_of(&["key", "rotate", "acme/tokens"], b"");
    json_of(&["key", "set", "acme/tokens", "--min-decryption-version", "2"], b"");
    let trimmed = json_of(&["key", "trim", "acme/tokens", "--confirm", "acme/tokens"], b"");
    assert_eq!(trimmed["trimmed"], json!([1]), "{trimmed}");
    let mut with_trimmed = fields(&shown);
    with_trimmed.insert("trimmed".into());
    assert_eq!(fields(&trimmed), with_trimmed);
}

/// The labels a key answer carries, for comparing.
fn labels(v: &Value) -> (Value, Value) {
    (v.get("description").cloned().unwrap_or(Value::Null), v.get("tags").cloned().unwrap_or(json!({})))
}

/// Description and tags on the store in `d`: set at create, changed by
/// `key_set`, shown by every key answer, kept across a restart, filtered on
/// by `key_list`, audited with before and after.
async fn labels_round_trip(d: &mut TestDaemon) {
    let c = d.client().await;
    let created = c
        .call_raw(
            "key_create",
            json!({"tenant": "acme", "key": "tokens", "description": "API tokens of the billing app",
                   "tags": {"team": "billing", "env": "prod"}}),
        )
        .await
        .unwrap();
    let want = (json!("API tokens of the billing app"), json!({"env": "prod", "team": "billing"}));
    assert_eq!(labels(&created), want);
    c.call_raw(
        "key_create",
        json!({"tenant": "acme", "key": "search", "tags": {"team": "search", "env": "prod"}}),
    )
    .await
    .unwrap();
    c.call_raw("key_create", json!({"tenant": "acme", "key": "plain"})).await.unwrap();
    let shown = c.call_raw("key_show", json!({"tenant": "acme", "key": "tokens"})).await.unwrap();
    assert_eq!(labels(&shown), want);
    let names = |v: Value| -> Vec<String> {
        v["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_owned()).collect()
    };
    let list = |tags: Value| {
        let c = &c;
        async move { names(c.call_raw("key_list", json!({"tenant": "acme", "tags": tags})).await.unwrap()) }
    };
    assert_eq!(list(json!({"env": "prod"})).await, ["search", "tokens"]);
    assert_eq!(list(json!({"env": "prod", "team": "billing"})).await, ["tokens"]);
    assert!(list(json!({"env": "dev"})).await.is_empty());
    assert_eq!(list(json!({})).await, ["plain", "search", "tokens"]);

    let set = c
        .call_raw(
            "key_set",
            json!({"tenant": "acme", "key": "tokens", "description": "rotated quarterly",
                   "set_tags": {"env": "staging", "owner": "ops"}, "remove_tags": ["team", "absent"]}),
        )
        .await
        .unwrap();
    let after = (json!("rotated quarterly"), json!({"env": "staging", "owner": "ops"}));
    assert_eq!(labels(&set), after);
    // The audit record of the change says the labels before and after.
    let record = audit_records(&c).await.into_iter().rev().find(|r| r.op == "key_set").unwrap();
    assert_eq!(record.outcome, "ok");
    let (before, now) = (record.before.unwrap(), record.after.unwrap());
    assert_eq!((before["description"].clone(), before["tags"].clone()), want);
    assert_eq!((now["description"].clone(), now["tags"].clone()), after);

    d.restart();
    let c = d.client().await;
    let listed = c.call_raw("key_list", json!({"tenant": "acme", "tags": {"owner": "ops"}})).await.unwrap();
    assert_eq!(labels(&listed["keys"][0]), after, "{listed}");
    // An empty description removes it.
    let cleared =
        c.call_raw("key_set", json!({"tenant": "acme", "key": "tokens", "description": ""})).await.unwrap();
    assert_eq!(labels(&cleared), (Value::Null, after.1.clone()));
    let plain = c.call_raw("key_show", json!({"tenant": "acme", "key": "plain"})).await.unwrap();
    assert_eq!(labels(&plain), (Value::Null, json!({})));
}

#[tokio::test(flavor = "multi_thread")]
async fn descriptions_and_tags_are_kept_shown_filtered_and_audited() {
    let mut d = TestDaemon::start();
    labels_round_trip(&mut d).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn descriptions_and_tags_on_postgresql() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut d = TestDaemon::start_postgres(&pg.url("keyhaven"));
    labels_round_trip(&mut d).await;
    d.stop();
    pg.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_descriptions_and_tags_are_refused_naming_the_field() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.call_raw("key_create", json!({"tenant": "acme", "key": "k", "tags": {"a": "1"}})).await.unwrap();
    let many: serde_json::Map<String, Value> = (0..51).map(|i| (format!("t{i}"), json!("v"))).collect();
    let fifty: serde_json::Map<String, Value> = (0..50).map(|i| (format!("t{i}"), json!("v"))).collect();
    let long = "x".repeat(257);
    let cases = [
        ("key_create", json!({"tenant": "acme", "key": "n1", "description": "two\nlines"}), "`description`"),
        ("key_create", json!({"tenant": "acme", "key": "n2", "description": long}), "`description`"),
        ("key_create", json!({"tenant": "acme", "key": "n3", "tags": {"a b": "v"}}), "`tags`"),
        ("key_create", json!({"tenant": "acme", "key": "n4", "tags": {"": "v"}}), "`tags`"),
        ("key_create", json!({"tenant": "acme", "key": "n5", "tags": {"a": "\u{1b}[31m"}}), "`tags`"),
        ("key_create", json!({"tenant": "acme", "key": "n6", "tags": {"a": long}}), "`tags`"),
        ("key_create", json!({"tenant": "acme", "key": "n7", "tags": many}), "`tags`"),
        ("key_create", json!({"tenant": "acme", "key": "n8", "tags": {"a": 1}}), "tags"),
        ("key_set", json!({"tenant": "acme", "key": "k", "set_tags": {"-x": "v"}}), "`set_tags`"),
        ("key_set", json!({"tenant": "acme", "key": "k", "remove_tags": ["a=b"]}), "`remove_tags`"),
        (
            "key_set",
            json!({"tenant": "acme", "key": "k", "set_tags": {"a": "2"}, "remove_tags": ["a"]}),
            "`remove_tags`",
        ),
        // 50 more on top of the one it has: over the bound once merged.
        ("key_set", json!({"tenant": "acme", "key": "k", "set_tags": fifty}), "`set_tags`"),
        ("key_list", json!({"tags": {"bad name": "v"}}), "`tags`"),
    ];
    for (op, params, field) in cases {
        let e = c.call_raw(op, params.clone()).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{op} {params}: {e}");
        assert!(e.to_string().contains(field), "{op} {params}: {e}");
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
    }
    // Nothing was made or changed by a refused request.
    let keys = c.call_raw("key_list", json!({"tenant": "acme"})).await.unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys["keys"][0]["tags"], json!({"a": "1"}));
    // The CLI refuses a tag that is not NAME=VALUE before it connects.
    let out = d.cli(&["key", "create", "acme/x", "--tag", "novalue"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tag `novalue` is not NAME=VALUE"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_sets_shows_and_filters_labels() {
    let d = TestDaemon::start();
    let json_of = |args: &[&str]| -> Value {
        let out = d.cli(args, b"");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let made = json_of(&[
        "key",
        "create",
        "acme/pii",
        "--description",
        "customer PII",
        "--tag",
        "team=crm",
        "--tag",
        "env=prod",
    ]);
    assert_eq!(labels(&made), (json!("customer PII"), json!({"env": "prod", "team": "crm"})));
    json_of(&["key", "create", "acme/logs", "--tag", "env=dev"]);
    let list = json_of(&["key", "list", "acme", "--tag", "env=prod"]);
    assert_eq!(list["keys"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["keys"][0]["key"], "pii");
    let set =
        json_of(&["key", "set", "acme/pii", "--tag", "env=staging", "--untag", "team", "--description", ""]);
    assert_eq!(labels(&set), (Value::Null, json!({"env": "staging"})));
    let shown = json_of(&["key", "show", "acme/pii"]);
    assert_eq!(labels(&shown), labels(&set));
}

/// A key record stored before descriptions and tags (sled and PostgreSQL
/// both keep the record as this JSON) reads with none, and is written back
/// without the new fields until it gets some.
#[test]
fn a_record_from_before_labels_reads_unchanged() {
    let old = json!({
        "tenant": "acme", "key": "pii", "created_at": 1, "current_version": 1,
        "versions": [{"version": 1, "created_at": 1, "master_key_version": 1, "wrapped_kek": "AAAA"}]
    });
    let rec: keyhavend::store::KeyRecord = serde_json::from_value(old).unwrap();
    assert_eq!((rec.description.as_deref(), rec.tags.len()), (None, 0));
    let written = serde_json::to_value(&rec).unwrap();
    assert!(written.get("description").is_none() && written.get("tags").is_none(), "{written}");
}

/// In a cluster, a label change made on one node is what every node shows
/// and filters on (it is a key-record write, as `key_set` is).
#[tokio::test(flavor = "multi_thread")]
async fn labels_set_on_one_node_are_seen_on_another() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let mut second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    a.call_raw("key_create", json!({"tenant": "acme", "key": "pii", "tags": {"env": "prod"}})).await.unwrap();
    a.call_raw(
        "key_set",
        json!({"tenant": "acme", "key": "pii", "set_tags": {"env": "dev"}, "description": "moved"}),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = b.call_raw("key_list", json!({"tenant": "acme", "tags": {"env": "dev"}})).await.unwrap();
        if listed["keys"].as_array().unwrap().len() == 1 {
            assert_eq!(labels(&listed["keys"][0]), (json!("moved"), json!({"env": "dev"})));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node 2 never saw the change: {listed}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let shown = b.call_raw("key_show", json!({"tenant": "acme", "key": "pii"})).await.unwrap();
    assert_eq!(labels(&shown), (json!("moved"), json!({"env": "dev"})));
    second.stop();
    first.stop();
    pg.stop();
}
