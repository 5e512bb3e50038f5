//! Key aliases (PROTOCOL.md §3.37–3.40) against a real daemon, token and
//! store: an alias names a key of its tenant, the key-use operations take
//! it wherever they take a key name, and it can be moved; what was made
//! through it names the real key and keeps opening after the move. The
//! policy is asked about the real key, never the alias.

use keyhaven::ErrorCode;
use keyhaven_tests::*;
use serde_json::{json, Value};

fn code(e: keyhaven::Error) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("not a daemon error: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_names_a_key_moves_and_old_data_still_opens() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    for k in ["acme/web-2025", "acme/web-2026", "acme/tags", "beta/web-2025"] {
        c.key_create(&path(k)).await.unwrap();
    }
    let hmac = keyhaven::KeyOptions::new().key_type(keyhaven::KeyType::HmacSha256);
    c.key_create_with(&path("acme/mac-2025"), &hmac).await.unwrap();

    let made = c.alias_create("web", &path("acme/web-2025")).await.unwrap();
    assert_eq!((made.tenant.as_str(), made.alias.as_str(), made.key.as_str()), ("acme", "web", "web-2025"));
    c.alias_create("mac", &path("acme/mac-2025")).await.unwrap();

    // Used through the alias: the answer and the ciphertext name the key.
    let ctx = ctx(&["row=1"]);
    let old = c.encrypt(&path("acme/web"), b"before the move", &ctx).await.unwrap();
    let ct: keyhaven::Ciphertext = old.ciphertext.parse().unwrap();
    assert_eq!(ct.envelope().path().to_string(), "acme/web-2025");
    let dk = c.datakey(&path("acme/web"), &ctx, keyhaven::Plaintext::Omit).await.unwrap();
    let env: keyhaven::Envelope = dk.envelope.parse().unwrap();
    assert_eq!(env.path().to_string(), "acme/web-2025");
    let tag = c.mac(&path("acme/mac"), b"m", None).await.unwrap();
    assert!(c.mac_verify(&path("acme/mac-2025"), b"m", &tag.tag).await.unwrap());
    assert!(c.mac_verify(&path("acme/mac"), b"m", &tag.tag).await.unwrap());
    // Signing, checking and reading the public key through an alias.
    let ec = keyhaven::KeyOptions::new().key_type(keyhaven::KeyType::EcdsaP256);
    c.key_create_with(&path("acme/release-2025"), &ec).await.unwrap();
    c.alias_create("release", &path("acme/release-2025")).await.unwrap();
    let signed = c.sign(&path("acme/release"), b"v1.2").await.unwrap();
    assert!(c.verify(&path("acme/release"), b"v1.2", &signed.signature, None).await.unwrap().valid);
    assert!(!c.verify(&path("acme/release"), b"v1.3", &signed.signature, None).await.unwrap().valid);
    let via_alias = c.public_key(&path("acme/release"), None).await.unwrap();
    let direct = c.public_key(&path("acme/release-2025"), None).await.unwrap();
    assert_eq!(via_alias.pem, direct.pem);
    c.alias_delete("acme", "release").await.unwrap();

    // Moved: new data goes to the new key, old data still opens.
    let moved = c.alias_update("web", &path("acme/web-2026")).await.unwrap();
    assert_eq!(moved.key, "web-2026");
    assert_eq!(moved.previous_key.as_deref(), Some("web-2025"));
    let new = c.encrypt(&path("acme/web"), b"after the move", &ctx).await.unwrap();
    let ct: keyhaven::Ciphertext = new.ciphertext.parse().unwrap();
    assert_eq!(ct.envelope().path().to_string(), "acme/web-2026");
    assert_eq!(c.decrypt(&old.ciphertext, &ctx).await.unwrap().plaintext.expose(), b"before the move");
    assert_eq!(c.datakey_decrypt(&dk.envelope, &ctx).await.unwrap().plaintext.len(), 32);

    // Listed, and survives a restart.
    let listed = c.alias_list(Some("acme")).await.unwrap();
    let names: Vec<_> = listed.iter().map(|a| (a.alias.as_str(), a.key.as_str())).collect();
    assert_eq!(names, [("mac", "mac-2025"), ("web", "web-2026")]);
    assert!(c.alias_list(Some("beta")).await.unwrap().is_empty());
    drop(c);
    d.restart();
    let c = d.client().await;
    assert_eq!(c.alias_list(None).await.unwrap().len(), 2);
    let again = c.encrypt(&path("acme/web"), b"x", &ctx).await.unwrap();
    assert_eq!(again.ciphertext.parse::<keyhaven::Ciphertext>().unwrap().envelope().path().key(), "web-2026");

    // A suspension names the key, and covers uses through the alias; the
    // alias's name is no scope.
    let out = d.cli(&["revoke", "key", "acme/web", "--reason", "key-compromise"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is an alias, not a key"), "{out:?}");
    let out = d.cli(&["revoke", "key", "acme/web-2026", "--reason", "key-compromise"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(code(c.encrypt(&path("acme/web"), b"x", &ctx).await.unwrap_err()), ErrorCode::Revoked);
    let out = d.cli(&["revoke", "lift", "key", "acme/web-2026", "--reason", "key-compromise"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Deleted: the name names nothing any more; the key stays.
    let gone = c.alias_delete("acme", "web").await.unwrap();
    assert_eq!(gone.key, "web-2026");
    assert_eq!(code(c.encrypt(&path("acme/web"), b"x", &ctx).await.unwrap_err()), ErrorCode::NotFound);
    assert_eq!(code(c.alias_delete("acme", "web").await.unwrap_err()), ErrorCode::NotFound);
    assert_eq!(c.decrypt(&new.ciphertext, &ctx).await.unwrap().plaintext.expose(), b"after the move");
    // `key_show` reads through an alias and names the key; the operations
    // that change a key take key names only.
    assert_eq!(c.key_show(&path("acme/mac")).await.unwrap().key, "mac-2025");
    assert_eq!(code(c.key_rotate(&path("acme/mac"), None).await.unwrap_err()), ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn names_clash_neither_way_and_bad_input_is_typed() {
    let d = TestDaemon::start();
    let c = d.client().await;
    for k in ["acme/real", "acme/other", "acme/doomed", "beta/real"] {
        c.key_create(&path(k)).await.unwrap();
    }
    c.alias_create("web", &path("acme/real")).await.unwrap();
    // A key of an alias's name, an alias of a key's name, an alias twice.
    assert_eq!(code(c.key_create(&path("acme/web")).await.unwrap_err()), ErrorCode::AlreadyExists);
    assert_eq!(
        code(c.alias_create("other", &path("acme/real")).await.unwrap_err()),
        ErrorCode::AlreadyExists
    );
    assert_eq!(code(c.alias_create("web", &path("acme/other")).await.unwrap_err()), ErrorCode::AlreadyExists);
    // In another tenant the name is free.
    c.alias_create("web", &path("beta/real")).await.unwrap();
    // Targets: missing, an alias (no chains), destroyed.
    assert_eq!(code(c.alias_create("x", &path("acme/nope")).await.unwrap_err()), ErrorCode::NotFound);
    let e = c.alias_create("x", &path("acme/web")).await.unwrap_err();
    assert!(e.to_string().contains("is an alias"), "{e}");
    assert_eq!(code(e), ErrorCode::NotFound);
    assert_eq!(code(c.alias_update("nope", &path("acme/other")).await.unwrap_err()), ErrorCode::NotFound);
    let doomed = path("acme/doomed");
    for args in [
        &["revoke", "key", "acme/doomed", "--reason", "key-compromise"][..],
        &["destroy", "key", "acme/doomed", "--confirm", "acme/doomed"][..],
    ] {
        let out = d.cli(args, b"");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(code(c.alias_create("x", &doomed).await.unwrap_err()), ErrorCode::Revoked);
    assert_eq!(code(c.alias_update("web", &doomed).await.unwrap_err()), ErrorCode::Revoked);
    // Bad names, unknown and missing fields: bad_request or invalid name, typed.
    for (op, params) in [
        ("alias_create", json!({"tenant": "acme", "alias": "Bad Name", "key": "real"})),
        ("alias_create", json!({"tenant": "acme", "alias": "", "key": "real"})),
        ("alias_create", json!({"tenant": "acme", "alias": "a".repeat(64), "key": "real"})),
        ("alias_create", json!({"tenant": "acme", "alias": "ok", "key": "../x"})),
        ("alias_create", json!({"tenant": "acme", "alias": "ok"})),
        ("alias_create", json!({"tenant": "acme", "alias": "ok", "key": "real", "extra": 1})),
        ("alias_update", json!({"tenant": "ACME", "alias": "web", "key": "real"})),
        ("alias_delete", json!({"tenant": "acme", "alias": 7})),
        ("alias_list", json!({"tenant": "no/slash"})),
    ] {
        let e = c.call_raw(op, params.clone()).await.unwrap_err();
        assert_eq!(code(e), ErrorCode::BadRequest, "{op} {params}");
    }
    let e = c
        .call_raw("alias_create", json!({"tenant": "acme", "alias": "Bad", "key": "real"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("alias name"), "{e}");
    // The failed attempts changed nothing.
    let all = c.alias_list(None).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    // hello says it.
    let hello = c.call(&keyhaven::wire::Hello { protocol: 1, client: None }).await.unwrap();
    assert!(hello.features.iter().any(|f| f == "key_aliases"));
    for op in ["alias_create", "alias_update", "alias_delete", "alias_list"] {
        assert!(hello.operations.iter().any(|o| o == op), "{op}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_sees_the_real_key_and_an_alias_grants_nothing() {
    let user = ensure_user("khtest-aliaser", &[]);
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        for k in ["acme/real-only", "acme/other"] {
            c.key_create(&path(k)).await.unwrap();
        }
        c.alias_create("to-other", &path("acme/other")).await.unwrap();
        c.alias_create("granted-alias", &path("acme/other")).await.unwrap();
        c.alias_create("to-real", &path("acme/real-only")).await.unwrap();
    }
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{0}"]
operations = ["encrypt", "decrypt"]
keys = ["acme/real-only", "acme/granted-alias"]

[[policy.rules]]
principals = ["user:{0}"]
operations = ["alias"]
keys = ["acme/mine-*"]
"#,
        user.name
    ));
    d.restart();
    let s = d.socket();
    let as_user = |args: &[&str]| run_cli_as(&user, s, args, b"secret");
    // Granted on the key: through an alias of it, allowed.
    let ok = as_user(&["encrypt", "acme/to-real"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // An alias of a key not granted: refused, and the message names what
    // was asked, not the key behind it.
    for asked in ["acme/to-other", "acme/granted-alias"] {
        let out = as_user(&["encrypt", asked]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permission_denied") || err.contains("does not grant"), "{err}");
        assert!(err.contains(asked), "{err}");
        assert!(!err.contains("acme/other"), "the refusal leaks the target: {err}");
    }
    // The same refusal as for a name that is nothing at all.
    let nothing = as_user(&["encrypt", "acme/nothing-here"]);
    let alias = as_user(&["encrypt", "acme/to-other"]);
    let without_pid = |out: &std::process::Output, name: &str| {
        let text = String::from_utf8_lossy(&out.stderr).replace(name, "X");
        text.split(" pid=").next().unwrap().to_owned()
    };
    assert_eq!(without_pid(&nothing, "nothing-here"), without_pid(&alias, "to-other"));
    // `alias` on acme/mine-* does not let the user point an alias of its
    // own at a key outside it, nor move one there, nor touch others'.
    let out = as_user(&["alias", "create", "acme/mine-1", "acme/other"]);
    assert!(!out.status.success(), "alias to an ungranted key");
    let out = as_user(&["alias", "update", "acme/to-real", "acme/real-only"]);
    assert!(!out.status.success(), "moved someone else's alias");
    let out = as_user(&["alias", "delete", "acme/to-other"]);
    assert!(!out.status.success(), "deleted someone else's alias");
    let out = as_user(&["alias", "list"]);
    assert!(!out.status.success(), "listed every tenant's aliases");
    let c = d.client().await;
    assert_eq!(c.alias_list(None).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn alias_changes_and_uses_are_audited() {
    let d = TestDaemon::start();
    let c = d.client().await;
    for k in ["acme/a", "acme/b"] {
        c.key_create(&path(k)).await.unwrap();
    }
    c.alias_create("cur", &path("acme/a")).await.unwrap();
    c.alias_update("cur", &path("acme/b")).await.unwrap();
    c.encrypt(&path("acme/cur"), b"x", &ctx(&[])).await.unwrap();
    c.alias_delete("acme", "cur").await.unwrap();
    let records = audit_records(&c).await;
    let find = |op: &str| records.iter().rev().find(|r| r.op == op).unwrap_or_else(|| panic!("no {op}"));
    let created = find("alias_create");
    assert_eq!(created.after, Some(json!({"alias": "acme/cur", "key": "a"})));
    assert_eq!(created.key.as_deref(), Some("a"));
    let updated = find("alias_update");
    assert_eq!(updated.before, Some(json!({"alias": "acme/cur", "key": "a"})));
    assert_eq!(updated.after, Some(json!({"alias": "acme/cur", "key": "b"})));
    let used = find("encrypt");
    assert_eq!((used.tenant.as_deref(), used.key.as_deref()), (Some("acme"), Some("b")));
    assert!(used.detail.as_deref().is_some_and(|t| t.contains("acme/cur")), "{:?}", used.detail);
    let deleted = find("alias_delete");
    assert_eq!(deleted.before, Some(json!({"alias": "acme/cur", "key": "b"})));
    assert_eq!(deleted.outcome, "ok");
}

#[test]
fn the_cli_manages_aliases() {
    let d = TestDaemon::start();
    let ok = |args: &[&str]| -> Value {
        let out = d.cli(args, b"");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    ok(&["key", "create", "acme/k1"]);
    ok(&["key", "create", "acme/k2"]);
    assert_eq!(ok(&["alias", "create", "acme/app", "acme/k1"])["key"], "k1");
    assert_eq!(ok(&["alias", "update", "acme/app", "acme/k2"])["previous_key"], "k1");
    assert_eq!(ok(&["alias", "list", "acme"])[0]["alias"], "app");
    let ct = d.cli(&["encrypt", "acme/app", "--text", "hi"], b"");
    assert!(ct.status.success());
    let back = d.cli(&["decrypt", "--json"], &ct.stdout);
    let back: Value = serde_json::from_slice(&back.stdout).unwrap();
    assert_eq!((back["tenant"].as_str(), back["key"].as_str()), (Some("acme"), Some("k2")), "{back}");
    // Different tenants: a usage error, before any request.
    let out = d.cli(&["alias", "create", "acme/x", "beta/k1"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different tenants"));
    assert_eq!(ok(&["alias", "delete", "acme/app"])["key"], "k2");
    assert_eq!(ok(&["alias", "list"]), json!([]));
}

/// On PostgreSQL, aliases live in the same shared record: one node's
/// alias is seen (and moved) by the other at once, and both survive a
/// restart of the cluster.
#[tokio::test(flavor = "multi_thread")]
async fn aliases_on_postgres_are_shared_by_the_nodes_of_a_cluster() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    a.key_create(&path("acme/k1")).await.unwrap();
    a.key_create(&path("acme/k2")).await.unwrap();
    a.alias_create("app", &path("acme/k1")).await.unwrap();
    let ctx = ctx(&[]);
    let old = b.encrypt(&path("acme/app"), b"one", &ctx).await.unwrap();
    assert_eq!(old.ciphertext.parse::<keyhaven::Ciphertext>().unwrap().envelope().path().key(), "k1");
    b.alias_update("app", &path("acme/k2")).await.unwrap();
    let new = a.encrypt(&path("acme/app"), b"two", &ctx).await.unwrap();
    assert_eq!(new.ciphertext.parse::<keyhaven::Ciphertext>().unwrap().envelope().path().key(), "k2");
    assert_eq!(code(b.key_create(&path("acme/app")).await.unwrap_err()), ErrorCode::AlreadyExists);
    drop(a);
    first.restart();
    let a = first.client().await;
    assert_eq!(a.alias_list(Some("acme")).await.unwrap()[0].key, "k2");
    assert_eq!(a.decrypt(&old.ciphertext, &ctx).await.unwrap().plaintext.expose(), b"one");
    b.alias_delete("acme", "app").await.unwrap();
    assert!(a.alias_list(None).await.unwrap().is_empty());
}

/// A store takes at most 1000 aliases (they live in one record, and
/// `alias_list` answers them in one frame): the next is refused, typed,
/// and the list still fits.
#[tokio::test(flavor = "multi_thread")]
async fn the_number_of_aliases_is_bounded() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/k")).await.unwrap();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let c = d.client().await;
        tasks.push(tokio::spawn(async move {
            for i in (t..1000).step_by(8) {
                let long = format!("{i:04}-{}", "a".repeat(58));
                c.alias_create(&long, &path("acme/k")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("1000 aliases made in {:?}", started.elapsed());
    let e = c.alias_create("one-more", &path("acme/k")).await.unwrap_err();
    assert!(e.to_string().contains("1000 aliases"), "{e}");
    assert_eq!(code(e), ErrorCode::BadRequest);
    assert_eq!(c.alias_list(None).await.unwrap().len(), 1000);
    // What resolving costs with the store full of aliases (printed, for
    // the figures; not asserted: the machine is shared).
    let alias = format!("0999-{}", "a".repeat(58));
    for name in ["acme/k".to_owned(), format!("acme/{alias}")] {
        let started = std::time::Instant::now();
        for _ in 0..200 {
            c.encrypt(&path(&name), b"x", &ctx(&[])).await.unwrap();
        }
        eprintln!("200 encrypts through {} in {:?}", &name[..name.len().min(10)], started.elapsed());
    }
    // Room again after a delete.
    c.alias_delete("acme", &format!("0000-{}", "a".repeat(58))).await.unwrap();
    c.alias_create("one-more", &path("acme/k")).await.unwrap();
}

/// The key an encryption through `name` on `c` used, or the refusal's code.
async fn used_key(c: &keyhaven::Client, name: &str) -> Result<String, ErrorCode> {
    match c.encrypt(&path(name), b"x", &ctx(&[])).await {
        Ok(r) => Ok(r.ciphertext.parse::<keyhaven::Ciphertext>().unwrap().envelope().path().key().to_owned()),
        Err(e) => Err(code(e)),
    }
}

/// How long a change made on one node may take to reach another's answers:
/// the change feed's `NOTIFY` takes milliseconds, its poll (a lost
/// notification) 250 ms; the rest is room for a loaded machine.
const FEED_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks `c` about `name` until it answers `want`, for at most
/// [`FEED_BOUND`]; then asks 20 times more, and every answer must be `want`
/// (a node that saw a change never goes back to what was before). Returns
/// how long it took.
async fn until_answers(
    c: &keyhaven::Client,
    name: &str,
    want: Result<&str, ErrorCode>,
) -> std::time::Duration {
    let want = want.map(str::to_owned);
    let started = std::time::Instant::now();
    loop {
        let got = used_key(c, name).await;
        if got == want {
            break;
        }
        assert!(started.elapsed() < FEED_BOUND, "`{name}`: {got:?}, not {want:?}, after {FEED_BOUND:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    for _ in 0..20 {
        assert_eq!(used_key(c, name).await, want, "`{name}` went back");
    }
    took
}

/// On PostgreSQL a node answers names from its caches (docs/CLUSTER.md §4):
/// an alias made, moved and deleted on node 1 is honoured on node 2 within
/// the change feed's bound (and on node 1 at once), a name node 2 found to
/// be nothing becomes usable there once node 1 makes a key of it, and a
/// name that is neither key nor alias is `not_found` on both, every time.
#[tokio::test(flavor = "multi_thread")]
async fn on_postgres_alias_changes_on_one_node_reach_another_within_the_feeds_bound() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    a.key_create(&path("acme/k1")).await.unwrap();
    a.key_create(&path("acme/k2")).await.unwrap();
    // Node 2 meets every name first as nothing (and keeps that in mind).
    for name in ["acme/app", "acme/late", "acme/nothing", "acme/nothing"] {
        assert_eq!(used_key(&b, name).await, Err(ErrorCode::NotFound), "{name}");
        assert_eq!(used_key(&a, name).await, Err(ErrorCode::NotFound), "{name}");
    }
    until_answers(&b, "acme/k1", Ok("k1")).await;

    a.alias_create("app", &path("acme/k1")).await.unwrap();
    assert_eq!(used_key(&a, "acme/app").await, Ok("k1".into()), "on the node that made it, at once");
    let made = until_answers(&b, "acme/app", Ok("k1")).await;

    b.alias_update("app", &path("acme/k2")).await.unwrap();
    assert_eq!(used_key(&b, "acme/app").await, Ok("k2".into()), "on the node that moved it, at once");
    let moved = until_answers(&a, "acme/app", Ok("k2")).await;
    a.alias_update("app", &path("acme/k1")).await.unwrap();
    let moved_back = until_answers(&b, "acme/app", Ok("k1")).await;

    // A name node 2 knows to be nothing, made a key on node 1.
    a.key_create(&path("acme/late")).await.unwrap();
    let late = until_answers(&b, "acme/late", Ok("late")).await;

    a.alias_delete("acme", "app").await.unwrap();
    assert_eq!(used_key(&a, "acme/app").await, Err(ErrorCode::NotFound));
    let deleted = until_answers(&b, "acme/app", Err(ErrorCode::NotFound)).await;
    for c in [&a, &b] {
        assert_eq!(used_key(c, "acme/nothing").await, Err(ErrorCode::NotFound));
        assert_eq!(used_key(c, "acme/k1").await, Ok("k1".into()));
    }
    eprintln!(
        "seen on the other node after: alias made {made:?}, moved {moved:?}, moved back {moved_back:?}, \
         key made {late:?}, alias deleted {deleted:?}"
    );
}

/// A key and an alias of one name made at once on two nodes: `key_create`
/// checks for an alias, `alias_create` for a key, and neither sees the
/// other's write in flight, so both may succeed; then the key wins on every
/// node (PROTOCOL.md §3.37), and the alias stays listed until deleted.
#[tokio::test(flavor = "multi_thread")]
async fn on_postgres_a_key_and_an_alias_made_at_once_under_one_name_the_key_wins() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    a.key_create(&path("acme/target")).await.unwrap();
    until_answers(&b, "acme/target", Ok("target")).await;
    let (mut both, mut keys, mut aliases) = (0, 0, 0);
    for i in 0..30 {
        let name = format!("acme/r{i}");
        // Node 1 has looked the name up: nothing (as it was).
        assert_eq!(used_key(&a, &name).await, Err(ErrorCode::NotFound));
        let (key_path, alias_name, target) = (path(&name), format!("r{i}"), path("acme/target"));
        let (key, alias) = tokio::join!(b.key_create(&key_path), a.alias_create(&alias_name, &target));
        for r in [key.as_ref().err(), alias.as_ref().err()].into_iter().flatten() {
            assert_eq!(r.code(), Some(ErrorCode::AlreadyExists), "{r}");
        }
        let want = match (key.is_ok(), alias.is_ok()) {
            (true, true) => {
                both += 1;
                format!("r{i}")
            }
            (true, false) => {
                keys += 1;
                format!("r{i}")
            }
            (false, true) => {
                aliases += 1;
                "target".to_owned()
            }
            (false, false) => panic!("`{name}`: neither the key nor the alias was made"),
        };
        for c in [&a, &b] {
            until_answers(c, &name, Ok(&want)).await;
        }
        let listed = a.alias_list(Some("acme")).await.unwrap().iter().any(|x| x.alias == format!("r{i}"));
        assert_eq!(listed, alias.is_ok(), "{name}");
        if alias.is_ok() {
            a.alias_delete("acme", &format!("r{i}")).await.unwrap();
            for c in [&a, &b] {
                let after = if key.is_ok() { Ok(want.as_str()) } else { Err(ErrorCode::NotFound) };
                until_answers(c, &name, after).await;
            }
        }
    }
    eprintln!("30 races: both made {both}, only the key {keys}, only the alias {aliases}");
}
