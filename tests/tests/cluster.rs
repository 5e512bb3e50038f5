//! Several nodes on one PostgreSQL database and one token (docs/CLUSTER.md):
//! real daemons (`keyhavend dev --postgres URL`, then `keyhavend dev --join`),
//! one SoftHSM2 token shared by every node, a throwaway PostgreSQL cluster.
//! Keys, rotations and revocations made on one node hold on every node;
//! concurrent writers on two nodes make one key and distinct versions; a
//! revocation returned by one node is honoured by every node for every
//! request that starts afterwards; a node whose lease lapses refuses, and
//! catches up before it serves again, also when it is cut off from the
//! database by a partition (a network namespace whose link goes down) while
//! the others keep it; a database writer who is not a node is still caught
//! by the token's anchor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::lifecycle::{AdminRotateMaster, KeyRotate, KeyScheduleDeletion, KeySet, KeyShow};
use keyhaven::revocation::{Reason, Revoke, Scope};
use keyhaven::wire::AuditVerify;
use keyhaven::Client;
use keyhaven_tests::*;

/// A database and three nodes on it (the first made it; two joined).
fn three_nodes(pg: &TestPostgres) -> Vec<TestDaemon> {
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let third = TestDaemon::join(&first);
    vec![first, second, third]
}

/// Retries `f` until it returns `Some`, for at most `limit`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(limit: Duration, f: impl Fn() -> F) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_keys_rotations_health_and_audit() {
    let Some(pg) = TestPostgres::start() else { return };
    let nodes = three_nodes(&pg);
    let mut c = Vec::new();
    for n in &nodes {
        c.push(n.client().await);
    }
    let context = ctx(&["user=7"]);
    // Made on node 1, used for encryption on node 2, decrypted on node 3.
    c[0].key_create(&path("acme/pii")).await.unwrap();
    let ct = c[1].encrypt(&path("acme/pii"), b"across the cluster", &context).await.unwrap();
    let plain = c[2].decrypt(&ct.ciphertext, &context).await.unwrap();
    assert_eq!(plain.plaintext.expose(), b"across the cluster");
    let dk = c[2].datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
    let back = c[0].datakey_decrypt(&dk.envelope, &context).await.unwrap();
    assert_eq!(back.plaintext.expose(), dk.plaintext.as_ref().unwrap().expose());

    // A rotation on node 2 is used by every node (each learns it from the
    // change feed; node 3 has the old record cached).
    let rotated = c[1]
        .call(&KeyRotate { tenant: "acme".into(), key: "pii".into(), idempotency_key: None })
        .await
        .unwrap();
    assert_eq!(rotated.current_version, 2);
    for (i, client) in c.iter().enumerate() {
        let v = eventually(Duration::from_secs(3), || async {
            let r = client.encrypt(&path("acme/pii"), b"x", &context).await.unwrap();
            (r.key_version == 2).then_some(r.key_version)
        })
        .await;
        assert_eq!(v, 2, "node {}", i + 1);
    }

    // Every node sees the same keys; health names the backend, the node,
    // and the cluster's three live nodes.
    let health = c[2].health().await.unwrap();
    assert_eq!(health.status, "ok", "{health:?}");
    assert_eq!(health.store.backend, "postgres");
    let cluster = health.store.cluster.expect("a cluster in health");
    assert!(cluster.serving);
    assert_eq!(cluster.nodes.len(), 3, "{cluster:?}");
    assert!(cluster.nodes.iter().all(|n| n.live && n.lease_left_ms > 0), "{cluster:?}");
    assert!(cluster.nodes.iter().any(|n| n.name == cluster.node));
    // Each node is woken by the feed's NOTIFY on a LISTEN connection of its own.
    let listening = pg.psql("keyhaven", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'");
    assert_eq!(listening, "3");

    // One audit chain per node, never colliding; any node verifies all.
    let names: std::collections::BTreeSet<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let verified = eventually(Duration::from_secs(5), || async {
        let v = c[0].call(&AuditVerify {}).await.unwrap();
        let chains: std::collections::BTreeSet<String> = v.chains.iter().map(|ch| ch.node.clone()).collect();
        (chains == names).then_some(v)
    })
    .await;
    assert!(verified.intact, "{verified:?}");
    assert!(verified.chains.iter().all(|ch| ch.problem.is_none() && ch.records > 0), "{verified:?}");
    let per_node = pg.psql("keyhaven", "SELECT count(DISTINCT node) FROM audit");
    assert_eq!(per_node, "3");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_on_two_nodes_make_one_key_and_distinct_versions() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (Arc::new(first.client().await), Arc::new(second.client().await));
    // The same key created on both nodes at once: one key, one `already_exists`.
    for i in 0..6 {
        let p = path(&format!("acme/k{i}"));
        let (ra, rb) = tokio::join!(a.key_create(&p), b.key_create(&p));
        let outcomes = [ra.map(|_| ()).map_err(|e| e.code()), rb.map(|_| ()).map_err(|e| e.code())];
        assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1, "{outcomes:?}");
        assert!(outcomes.contains(&Err(Some(ErrorCode::AlreadyExists))), "{outcomes:?}");
    }
    // Rotations from both nodes at once: every one a distinct version.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            c.call(&KeyRotate { tenant: "acme".into(), key: "k0".into(), idempotency_key: None })
                .await
                .unwrap()
                .current_version
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (2..=9).collect::<Vec<u32>>());
    // Data keys from both nodes under one version: their wrap reservations
    // are ranges of one count, never overlapping.
    let context = ctx(&["a=b"]);
    for _ in 0..5 {
        let k1 = path("acme/k1");
        let (x, y) = tokio::join!(
            a.datakey(&k1, &context, keyhaven::Plaintext::Omit),
            b.datakey(&k1, &context, keyhaven::Plaintext::Omit)
        );
        assert_eq!((x.unwrap().key_version, y.unwrap().key_version), (1, 1));
    }
    // Each node reserved its own range: the stored count covers both.
    let reserved = pg.psql(
        "keyhaven",
        "SELECT (record::jsonb->'versions'->0->>'wraps_reserved')::bigint FROM keyring WHERE name = 'k1'",
    );
    assert!(reserved.parse::<u64>().unwrap() >= 2 * 256, "two ranges reserved, found {reserved}");
    // Alternating writers: each reads the anchor the other process wrote
    // in the token (SoftHSM2 re-reads a changed object), or it would take
    // the other's write for tampering.
    for i in 0..6 {
        let c = if i % 2 == 0 { &a } else { &b };
        c.key_create(&path(&format!("beta/alt{i}"))).await.unwrap();
    }
}

/// Clients decrypting on every node; a revocation made on one node; the
/// requests that started after `revoke` returned and still succeeded.
async fn served_after_revoke(
    clients: &[Arc<Client>],
    envelope: &str,
    revoke: impl std::future::Future<Output = ()>,
) -> (usize, usize, usize) {
    let context = ctx(&["user=7"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for c in clients {
        let (c, stop, envelope, context) = (c.clone(), stop.clone(), envelope.to_owned(), context.clone());
        loops.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let ok = c.datakey_decrypt(&envelope, &context).await.is_ok();
                seen.push((started, ok));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let asked = Instant::now();
    revoke.await;
    let returned = Instant::now();
    eprintln!("revoke returned in {:?} with every node decrypting", returned - asked);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut before_ok, mut after, mut after_ok) = (0, 0, 0);
    for l in loops {
        for (started, ok) in l.await.unwrap() {
            if started > returned {
                after += 1;
                after_ok += ok as usize;
            } else {
                before_ok += ok as usize;
            }
        }
    }
    (before_ok, after, after_ok)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_node_serves_a_request_that_starts_after_revoke_returned_on_another() {
    let Some(pg) = TestPostgres::start() else { return };
    let nodes = three_nodes(&pg);
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(Arc::new(n.client().await));
    }
    let context = ctx(&["user=7"]);
    let mut round = 0;
    for scope_kind in ["version", "key", "tenant", "datakey", "min_version"] {
        for _ in 0..2 {
            round += 1;
            let tenant = format!("t{round}");
            let p = path(&format!("{tenant}/k"));
            clients[0].key_create(&p).await.unwrap();
            let dk = clients[1].datakey(&p, &context, keyhaven::Plaintext::Omit).await.unwrap();
            if scope_kind == "min_version" {
                clients[2]
                    .call(&KeyRotate { tenant: tenant.clone(), key: "k".into(), idempotency_key: None })
                    .await
                    .unwrap();
            }
            let scope = match scope_kind {
                "version" => Scope::Key { tenant: tenant.clone(), key: "k".into(), version: Some(1) },
                "key" => Scope::Key { tenant: tenant.clone(), key: "k".into(), version: None },
                "tenant" => Scope::Tenant { tenant: tenant.clone() },
                _ => Scope::Datakey { envelope_id: dk.envelope_id.clone() },
            };
            // The revoking node changes from round to round.
            let by = clients[round % 3].clone();
            let (before_ok, after, after_ok) = served_after_revoke(&clients, &dk.envelope, async {
                if scope_kind == "min_version" {
                    // Version 1 stops being accepted for decryption.
                    let set = KeySet {
                        tenant: tenant.clone(),
                        key: "k".into(),
                        min_decryption_version: Some(2),
                        rotate_every_secs: None,
                        state: None,
                        ..Default::default()
                    };
                    by.call(&set).await.unwrap();
                } else {
                    by.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None })
                        .await
                        .unwrap();
                }
            })
            .await;
            eprintln!(
                "{scope_kind}: {before_ok} served before, {after} requests after, {after_ok} served after"
            );
            assert!(before_ok > 0, "{scope_kind}: nothing was served before the revocation");
            assert!(after > 0, "{scope_kind}: no request after the revocation");
            assert_eq!(after_ok, 0, "{scope_kind}: requests that started after revoke returned were served");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_lease_lapses_refuses_and_catches_up_before_serving_again() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    let context = ctx(&["user=7"]);
    a.key_create(&path("acme/pii")).await.unwrap();
    a.key_create(&path("acme/other")).await.unwrap();
    let dk = a.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    let other = a.datakey(&path("acme/other"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    b.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    b.datakey_decrypt(&other.envelope, &context).await.unwrap();

    // Node 2 stops answering (SIGSTOP): a revocation on node 1 waits for
    // its lease (5 s by default) to run out, and no longer.
    signal(second.pid(), "STOP");
    let started = Instant::now();
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    a.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(7), "revoke waited {waited:?}, more than the lease bound");
    assert!(
        waited > Duration::from_secs(2),
        "revoke returned after {waited:?}, before node 2's lease ran out"
    );
    let health = a.health().await.unwrap().store.cluster.unwrap();
    assert!(health.nodes.iter().any(|n| !n.live), "node 2's lease has ended: {health:?}");

    // Node 2 resumes: its first request finds its lease over by its own
    // clock, and is refused; once it renewed and caught up it serves
    // again, and honours the revocation it missed.
    signal(second.pid(), "CONT");
    let first_answer = b.datakey_decrypt(&dk.envelope, &context).await.unwrap_err();
    assert!(
        matches!(first_answer.code(), Some(ErrorCode::StoreUnavailable) | Some(ErrorCode::Revoked)),
        "{first_answer}"
    );
    eventually(Duration::from_secs(5), || async {
        b.datakey_decrypt(&other.envelope, &context).await.ok().map(|_| ())
    })
    .await;
    let refused = b.datakey_decrypt(&dk.envelope, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Revoked), "{refused}");
}

/// Entries in the long audit chain of
/// [`revoking_a_data_key_on_idle_nodes_answers_quickly_however_long_the_other_chains`].
const LONG_CHAIN: u32 = 300_000;

/// `revoke` of a data key answers once the revocation is in force on every
/// live node, and after a bounded search of the audit log for the envelope
/// (`envelope_seen`). Here, on three idle nodes, the audit log also holds a
/// long chain that comes first in the chains' order (a node that served a
/// lot and left: its rows are written straight into the database, one per
/// decryption it would have logged, and PostgreSQL has not analysed them
/// yet), and each envelope was made on node 1 just before. The search takes
/// the chains in turn, newest first, a page of each, and a page reads only
/// its range of `seq`: each envelope is found at the head of node 1's chain.
/// Before (docs/CLUSTER.md §4), the search read the long chain to its end
/// first, and each page of it read and sorted the whole chain: the first
/// `revoke` here ran out of the search's 2 s, without `envelope_seen`.
#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_data_key_on_idle_nodes_answers_quickly_however_long_the_other_chains() {
    let Some(pg) = TestPostgres::start() else { return };
    let nodes = three_nodes(&pg);
    pg.psql(
        "keyhaven",
        &format!(
            "INSERT INTO audit (node, kind, seq, entry) \
             SELECT 'a-node-that-left', 0, g, convert_to(format( \
               '{{\"op\":\"datakey_decrypt\",\"envelope_id\":\"%s\",\"outcome\":\"ok\"}}', md5(g::text)), 'UTF8') \
             FROM generate_series(1, {LONG_CHAIN}) AS g"
        ),
    );
    let c = nodes[0].client().await;
    let context = ctx(&["user=7"]);
    c.key_create(&path("idle/k")).await.unwrap();
    let mut took = Vec::new();
    for _ in 0..20 {
        let envelope_id =
            c.datakey(&path("idle/k"), &context, keyhaven::Plaintext::Omit).await.unwrap().envelope_id;
        let asked = Instant::now();
        let answer = c
            .call(&Revoke {
                scope: Scope::Datakey { envelope_id },
                reason: Reason::KeyCompromise,
                expires_at: None,
            })
            .await
            .unwrap();
        took.push(asked.elapsed());
        assert_eq!(answer.envelope_seen, Some(true), "node 1's audit chain names the envelope it just made");
    }
    took.sort();
    eprintln!(
        "idle revoke beside a chain of {LONG_CHAIN} entries, 20 in a row: p50 {:?}, max {:?}",
        took[10], took[19]
    );
    // Measured (debug build, 2-core machine at load 5–8): p50 15–30 ms.
    assert!(took[10] < Duration::from_millis(150), "revoke p50 {:?}: {took:?}", took[10]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_with_a_live_node_name_is_refused_and_a_killed_one_is_replaced() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let mut second = TestDaemon::join(&first);
    // Another daemon on node 2's config (so node 2's name) while it runs:
    // refused once node 2's lease has outlived the wait, exit 78.
    let out = second.run_once();
    let log = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(78) {
        // Only if node 2's lease ran out meanwhile (a renewal starved for
        // more than a lease on a loaded machine) may the name be taken; the
        // newcomer then stops at node 2's socket, and node 2, which can no
        // longer renew, serves nothing.
        assert!(log.contains("cannot listen on"), "{log}");
        eprintln!("node 2's lease ran out under load: the name was taken over, as designed");
        return;
    }
    assert!(log.contains("holds the lease of node"), "{log}");
    // Killed without giving its lease up, node 2 starts again: the new
    // daemon waits for the old lease to run out, then takes the name.
    second.kill();
    second.start_again();
    let c = second.client().await;
    c.key_create(&path("acme/after")).await.unwrap();
    let health = c.health().await.unwrap();
    assert_eq!(health.status, "ok", "{health:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_writer_who_is_not_a_node_is_still_caught() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let a = first.client().await;
    let context = ctx(&["user=7"]);
    a.key_create(&path("acme/one")).await.unwrap();
    a.key_create(&path("acme/two")).await.unwrap();
    let ct = a.encrypt(&path("acme/two"), b"secret", &context).await.unwrap();
    // Node 2 joins after the keys were made: it checked every record
    // against the token's anchor at start, and has none in its cache.
    let second = TestDaemon::join(&first);
    let b = second.client().await;
    // Key two's row gets key one's wrapped KEK, behind every node's back;
    // node 2 must read the row now, and refuses it.
    pg.psql(
        "keyhaven",
        "UPDATE keyring SET record = (SELECT record FROM keyring WHERE name = 'one')::jsonb \
         || jsonb_build_object('key', 'two') #>> '{}' WHERE name = 'two'",
    );
    let refused = b.decrypt(&ct.ciphertext, &context).await.unwrap_err();
    assert_ne!(refused.code(), None, "{refused}");
    // And announced in the change feed as if a node wrote it: the next
    // write on any node refuses, since the token's anchor does not vouch
    // for it.
    pg.psql(
        "keyhaven",
        "INSERT INTO changes (revision, node, tree, key) \
         SELECT max(revision) + 1, 'intruder', 'keyring', 'acme/two' FROM changes",
    );
    let write = a.key_create(&path("acme/three")).await.unwrap_err();
    assert_eq!(write.code(), Some(ErrorCode::StoreUnavailable), "{write}");
    assert!(write.to_string().contains("not a node"), "{write}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_under_load_loses_no_acknowledged_write_and_the_nodes_recover() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let clients = [Arc::new(first.client().await), Arc::new(second.client().await)];
    // Both nodes create keys in a loop; the server restarts under them.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (n, c) in clients.iter().enumerate() {
        let (c, stop) = (c.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("n{n}/k{i}");
                i += 1;
                if c.key_create(&path(&name)).await.is_ok() {
                    acknowledged.push(name);
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.restart();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.extend(w.await.unwrap());
    }
    assert!(!acknowledged.is_empty());
    // Every acknowledged key is in the database, and each node, without a
    // restart, serves again: every key encrypts on both.
    let context = ctx(&["a=b"]);
    for c in &clients {
        eventually(Duration::from_secs(15), || async {
            c.health().await.ok().filter(|h| h.status == "ok").map(|_| ())
        })
        .await;
    }
    let stored: std::collections::BTreeSet<String> =
        pg.psql("keyhaven", "SELECT tenant || '/' || name FROM keyring").lines().map(str::to_owned).collect();
    for name in &acknowledged {
        assert!(stored.contains(name), "acknowledged key {name} is not in the database");
        for c in &clients {
            c.encrypt(&path(name), b"x", &context).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_in_the_middle_of_rotations_leaves_the_others_unaffected() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let mut second = TestDaemon::join(&first);
    let a = first.client().await;
    let context = ctx(&["a=b"]);
    a.key_create(&path("acme/r")).await.unwrap();
    let before = a.encrypt(&path("acme/r"), b"before", &context).await.unwrap();
    // Node 2 rotates in a loop and is killed (SIGKILL) in the middle,
    // perhaps between the database's commit and the token anchor's.
    let b = Arc::new(second.client().await);
    let rotating = tokio::spawn(async move {
        loop {
            if b.call(&KeyRotate { tenant: "acme".into(), key: "r".into(), idempotency_key: None })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    second.kill();
    rotating.await.unwrap();
    // Node 1 goes on writing and serving: its next write settles what
    // the killed node left (committed or not), and nothing is taken
    // for tampering.
    let rotated =
        a.call(&KeyRotate { tenant: "acme".into(), key: "r".into(), idempotency_key: None }).await.unwrap();
    let versions: Vec<u32> = rotated.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=rotated.current_version).collect::<Vec<_>>(), "one version each, in order");
    a.key_create(&path("acme/after")).await.unwrap();
    let now = a.encrypt(&path("acme/r"), b"now", &context).await.unwrap();
    assert_eq!(now.key_version, rotated.current_version);
    for ct in [&before, &now] {
        a.decrypt(&ct.ciphertext, &context).await.unwrap();
    }
    // The killed node comes back, checks the store against the anchor,
    // and serves the same key.
    second.start_again();
    let b = second.client().await;
    b.decrypt(&now.ciphertext, &context).await.unwrap();
}

/// The figure of docs/CLUSTER.md §4 (not run in CI: set
/// `KEYHAVEN_CLUSTER_FIGURES=1`): 100 revocations, each made on one of
/// three nodes while a client on every node decrypts; how long `revoke`
/// takes to return (every live node has applied it by then), p50 and p99.
#[tokio::test(flavor = "multi_thread")]
async fn figures_revocation_delay_with_three_nodes() {
    if std::env::var_os("KEYHAVEN_CLUSTER_FIGURES").is_none() {
        return;
    }
    let Some(pg) = TestPostgres::start() else { return };
    let nodes = three_nodes(&pg);
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(Arc::new(n.client().await));
    }
    let context = ctx(&["user=7"]);
    let mut delays = Vec::new();
    for round in 0..100 {
        let p = path(&format!("f{round}/k"));
        clients[0].key_create(&p).await.unwrap();
        let dk = clients[1].datakey(&p, &context, keyhaven::Plaintext::Omit).await.unwrap();
        let by = clients[round % 3].clone();
        let scope = Scope::Datakey { envelope_id: dk.envelope_id.clone() };
        let mut took = Duration::ZERO;
        let (_, _, after_ok) = served_after_revoke(&clients, &dk.envelope, async {
            let asked = Instant::now();
            by.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
            took = asked.elapsed();
        })
        .await;
        assert_eq!(after_ok, 0);
        delays.push(took);
    }
    delays.sort();
    println!(
        "revoke with 3 nodes decrypting, 100 revocations: p50 {:?}, p99 {:?}, max {:?}",
        delays[49], delays[98], delays[99]
    );
}

/// Data-key decryptions by `clients` connections spread over `nodes`, for
/// `secs`: (ops per second, p50, p99) per node, in node order.
async fn decrypt_rate(
    nodes: &[&TestDaemon],
    clients: usize,
    envelope: &str,
    secs: u64,
) -> Vec<(f64, Duration, Duration)> {
    let context = ctx(&["user=7"]);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let node = i % nodes.len();
        let c = nodes[node].client().await;
        let (envelope, context) = (envelope.to_owned(), context.clone());
        tasks.push((
            node,
            tokio::spawn(async move {
                let mut took = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    c.datakey_decrypt(&envelope, &context).await.unwrap();
                    took.push(t.elapsed());
                }
                took
            }),
        ));
    }
    let mut per_node = vec![Vec::new(); nodes.len()];
    for (node, t) in tasks {
        per_node[node].extend(t.await.unwrap());
    }
    per_node
        .into_iter()
        .map(|mut took| {
            took.sort();
            let n = took.len();
            (n as f64 / secs as f64, took[n / 2], took[n * 99 / 100])
        })
        .collect()
}

/// `count` key creations one after another on `c`: (p50, p99).
async fn create_latency(c: &Client, prefix: &str, count: usize) -> (Duration, Duration) {
    let mut took = Vec::new();
    for i in 0..count {
        let t = Instant::now();
        c.key_create(&path(&format!("{prefix}/k{i}"))).await.unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    (took[count / 2], took[count * 99 / 100])
}

/// p50 and p99 of `count` data-key revocations in a row (each a fresh data
/// key of `key`, made beforehand), by `c`.
async fn revoke_latency(c: &Client, key: &str, count: usize) -> (Duration, Duration) {
    let context = ctx(&["user=7"]);
    let _ = c.key_create(&path(key)).await;
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(c.datakey(&path(key), &context, keyhaven::Plaintext::Omit).await.unwrap().envelope_id);
    }
    let mut took = Vec::new();
    for envelope_id in ids {
        let t = Instant::now();
        c.call(&Revoke {
            scope: Scope::Datakey { envelope_id },
            reason: Reason::KeyCompromise,
            expires_at: None,
        })
        .await
        .unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    (took[count / 2], took[count * 99 / 100])
}

/// The figures of docs/CLUSTER.md §4 (not a test: `KEYHAVEN_CLUSTER_FIGURES=1
/// cargo test -p keyhaven-tests --test cluster figures_decryption -- --nocapture`):
/// data-key decryption with 64 clients spread over three nodes, and on one
/// node of the same cluster; key creation and data-key revocation latency
/// on PostgreSQL (a node of three) and on sled (one daemon).
#[tokio::test(flavor = "multi_thread")]
async fn figures_decryption_through_three_nodes_and_key_create_on_postgres_and_sled() {
    if std::env::var_os("KEYHAVEN_CLUSTER_FIGURES").is_none() {
        return;
    }
    let Some(pg) = TestPostgres::start() else { return };
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    let nodes = three_nodes(&pg);
    let c = nodes[0].client().await;
    let context = ctx(&["user=7"]);
    c.key_create(&path("bench/k")).await.unwrap();
    let dk = c.datakey(&path("bench/k"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    for n in &nodes {
        n.client().await.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    }
    println!("load before: {}", load());
    let three = decrypt_rate(&[&nodes[0], &nodes[1], &nodes[2]], 64, &dk.envelope, 10).await;
    let total: f64 = three.iter().map(|r| r.0).sum();
    for (i, (rate, p50, p99)) in three.iter().enumerate() {
        println!(
            "datakey_decrypt, 64 clients over 3 nodes: node {}: {rate:.0} ops/s, p50 {p50:?}, p99 {p99:?}",
            i + 1
        );
    }
    println!("datakey_decrypt, 64 clients over 3 nodes: {total:.0} ops/s in all (load {})", load());
    let one = decrypt_rate(&[&nodes[0]], 64, &dk.envelope, 10).await;
    println!(
        "datakey_decrypt, 64 clients on node 1 alone: {:.0} ops/s, p50 {:?}, p99 {:?} (load {})",
        one[0].0,
        one[0].1,
        one[0].2,
        load()
    );
    let (p50, p99) = create_latency(&c, "create", 200).await;
    println!(
        "key_create on PostgreSQL (node 1 of 3), 200 in a row: p50 {p50:?}, p99 {p99:?} (load {})",
        load()
    );
    let (p50, p99) = revoke_latency(&c, "revoke/k", 100).await;
    println!(
        "revoke (a data key) on PostgreSQL (node 1 of 3, every node live), 100 in a row: p50 {p50:?}, \
         p99 {p99:?} (load {})",
        load()
    );
    drop((c, nodes));
    let sled = TestDaemon::start();
    let sc = sled.client().await;
    let (p50, p99) = create_latency(&sc, "create", 200).await;
    println!("key_create on sled, 200 in a row: p50 {p50:?}, p99 {p99:?} (load {})", load());
    let (p50, p99) = revoke_latency(&sc, "revoke/k", 100).await;
    println!("revoke (a data key) on sled, 100 in a row: p50 {p50:?}, p99 {p99:?} (load {})", load());
}

/// Restarts `node` with `[cluster] lease = LEASE`, `[lifecycle]
/// check_seconds = CHECK` and its periodic jobs' clock `ahead` seconds
/// ahead (`test_clock_offset_seconds`); nodes that join it afterwards copy
/// its config.
fn reconfigure(node: &mut TestDaemon, lease: &str, check_seconds: u64, ahead: u64) {
    node.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("[cluster]") && text.contains("check_seconds = 60"), "{text}");
        let text = text
            .replace("[cluster]", &format!("[cluster]\nlease = \"{lease}\""))
            .replace("[lifecycle]", &format!("[lifecycle]\ntest_clock_offset_seconds = {ahead}"))
            .replace("check_seconds = 60", &format!("check_seconds = {check_seconds}"));
        std::fs::write(&file, text).unwrap();
    });
}

/// Retries `f` while the node answers `store_unavailable` (a short lease
/// on a loaded machine lapses now and then), for at most 15 s.
async fn steady<T, F: std::future::Future<Output = Result<T, keyhaven::Error>>>(f: impl Fn() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.code() == Some(ErrorCode::StoreUnavailable) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn rotate(key: &str) -> KeyRotate {
    let (tenant, key) = key.split_once('/').unwrap();
    KeyRotate { tenant: tenant.into(), key: key.into(), idempotency_key: None }
}

/// The change feed is trimmed to what some node may still need: with
/// writes going on it stays a few revisions long. A node paused (SIGSTOP)
/// for longer than the trimming waits for it, and a node stopped cleanly
/// and started again later, both end with the cluster's state: a
/// revocation made while they were away is enforced, one lifted is not,
/// a key rotated while they were away encrypts under its new version, an
/// alias moved names its new key, and a key made under a name they had
/// found to be nothing is used.
#[tokio::test(flavor = "multi_thread")]
async fn the_change_feed_is_trimmed_and_nodes_away_meanwhile_end_with_the_right_state() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    // A 1 s lease: the trimming waits 10 leases for a node that went away.
    reconfigure(&mut first, "1s", 60, 0);
    let paused = TestDaemon::join(&first);
    let mut stopped = TestDaemon::join(&first);
    let a = first.client().await;
    let context = ctx(&["user=7"]);
    for k in ["acme/pii", "acme/other", "acme/lifted", "acme/churn"] {
        steady(|| async { a.key_create(&path(k)).await }).await;
    }
    let dk =
        steady(|| async { a.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await }).await;
    let other =
        steady(|| async { a.datakey(&path("acme/other"), &context, keyhaven::Plaintext::Omit).await }).await;
    let lifted =
        steady(|| async { a.datakey(&path("acme/lifted"), &context, keyhaven::Plaintext::Omit).await }).await;
    let suspended = Scope::Key { tenant: "acme".into(), key: "lifted".into(), version: None };
    steady(|| async {
        a.call(&Revoke { scope: suspended.clone(), reason: Reason::Superseded, expires_at: None }).await
    })
    .await;
    steady(|| async { a.alias_create("current", &path("acme/other")).await }).await;
    let mut names = Vec::new();
    for node in [&paused, &stopped] {
        let c = node.client().await;
        steady(|| async { c.datakey_decrypt(&dk.envelope, &context).await }).await;
        // Each caches key `other` at version 1.
        let ct = steady(|| async { c.encrypt(&path("acme/other"), b"x", &context).await }).await;
        assert_eq!(ct.key_version, 1);
        let e = c.datakey_decrypt(&lifted.envelope, &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
        // Each caches the alias, and that `later` is nothing.
        let ct = steady(|| async { c.encrypt(&path("acme/current"), b"x", &context).await }).await;
        assert_eq!(key_of(&ct.ciphertext), "other");
        steady(|| async {
            match c.encrypt(&path("acme/later"), b"x", &context).await {
                Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
                other => other.map(|_| panic!("`acme/later` is no key yet")),
            }
        })
        .await;
        names.push(steady(|| async { c.health().await }).await.store.cluster.unwrap().node);
    }

    // Many writes: the feed stays a few revisions long.
    let mut longest = 0;
    for i in 0..150 {
        steady(|| async { a.call(&rotate("acme/churn")).await }).await;
        if i % 10 == 9 {
            longest = longest
                .max(pg.psql("keyhaven", "SELECT count(DISTINCT revision) FROM changes").parse().unwrap());
        }
    }
    let newest: i64 = pg.psql("keyhaven", "SELECT max(revision) FROM changes").parse().unwrap();
    assert!(newest > 150, "{newest}");
    eprintln!("150 writes: at most {longest} revisions in the feed");
    assert!(longest < 60, "the feed held {longest} revisions during 150 writes");
    eventually(Duration::from_secs(5), || async {
        let n: i64 = pg.psql("keyhaven", "SELECT count(DISTINCT revision) FROM changes").parse().unwrap();
        (n <= 3).then_some(())
    })
    .await;

    // One node paused, one stopped cleanly; meanwhile a revocation, a lift,
    // a rotation, and more writes; the feed is trimmed past both.
    signal(paused.pid(), "STOP");
    let (status, log) = stopped.stop();
    assert!(status.success(), "{log}");
    let away: i64 = pg
        .psql(
            "keyhaven",
            &format!("SELECT max(applied) FROM nodes WHERE name IN ('{}', '{}')", names[0], names[1]),
        )
        .parse()
        .unwrap();
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    steady(|| async {
        a.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None }).await
    })
    .await;
    let lift = keyhaven::revocation::RevokeLift { scope: suspended.clone(), reason: Reason::Superseded };
    steady(|| async { a.call(&lift).await }).await;
    let rotated = steady(|| async { a.call(&rotate("acme/other")).await }).await;
    assert_eq!(rotated.current_version, 2);
    steady(|| async { a.alias_update("current", &path("acme/churn")).await }).await;
    steady(|| async { a.key_create(&path("acme/later")).await }).await;
    // Once their leases ran out 10 leases ago, the feed is trimmed to its
    // newest revision, past what either applied.
    eventually(Duration::from_secs(25), || async {
        let trimmed = pg.psql("keyhaven", "SELECT min(revision) = max(revision), min(revision) FROM changes");
        let (all, oldest) = trimmed.split_once('|').unwrap();
        (all == "t" && oldest.parse::<i64>().unwrap() > away + 1).then_some(())
    })
    .await;

    // Both come back and end with the cluster's state.
    signal(paused.pid(), "CONT");
    stopped.start_again();
    for node in [&paused, &stopped] {
        let c = node.client().await;
        eventually(Duration::from_secs(10), || async {
            c.datakey_decrypt(&other.envelope, &context).await.ok().map(|_| ())
        })
        .await;
        let e = c.datakey_decrypt(&dk.envelope, &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
        steady(|| async { c.datakey_decrypt(&lifted.envelope, &context).await }).await;
        let ct = steady(|| async { c.encrypt(&path("acme/other"), b"x", &context).await }).await;
        assert_eq!(ct.key_version, 2, "key `other` was rotated while the node was away");
        let ct = steady(|| async { c.encrypt(&path("acme/current"), b"x", &context).await }).await;
        assert_eq!(key_of(&ct.ciphertext), "churn", "the alias was moved while the node was away");
        steady(|| async { c.encrypt(&path("acme/later"), b"x", &context).await }).await;
    }
    let mut paused = paused;
    let (_, log) = paused.stop();
    assert!(log.contains("trimmed past this node's revision"), "the paused node did not reload:\n{log}");
    let verified = steady(|| async { a.call(&AuditVerify {}).await }).await;
    assert!(verified.intact, "{verified:?}");
}

/// The key a ciphertext names.
fn key_of(ciphertext: &str) -> String {
    ciphertext.parse::<keyhaven::Ciphertext>().unwrap().envelope().path().key().to_owned()
}

async fn step(c: &Client) -> keyhaven::lifecycle::MasterRotationStatus {
    c.call(&AdminRotateMaster { batch: Some(2), rollback: false }).await.unwrap()
}

async fn show(c: &Client, key: &str) -> keyhaven::lifecycle::KeyDetails {
    let (tenant, key) = key.split_once('/').unwrap();
    steady(|| async { c.call(&KeyShow { tenant: tenant.into(), key: key.into() }).await }).await
}

/// The periodic jobs (automatic rotation, scheduled deletion) run on every
/// node every second, and each due job happens once: a key rotating every
/// 2 s gets one version per period, never two, and one audit record per
/// rotation across the three nodes' chains; a scheduled deletion erases
/// the key once, with one audit record.
#[tokio::test(flavor = "multi_thread")]
async fn periodic_jobs_run_once_on_a_cluster_of_three_nodes() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    // The jobs' clock is 8 days ahead on every node: a deletion scheduled
    // in 7 days is due at once, and a rotation period of 8 days and 2 s
    // falls due 2 s after each version.
    const AHEAD: u64 = 8 * 86_400;
    reconfigure(&mut first, "5s", 1, AHEAD);
    let second = TestDaemon::join(&first);
    let third = TestDaemon::join(&first);
    let c = [first.client().await, second.client().await, third.client().await];
    let context = ctx(&["a=b"]);
    c[0].key_create(&path("acme/doomed")).await.unwrap();
    let sealed = c[0].encrypt(&path("acme/doomed"), b"gone", &context).await.unwrap();
    c[0].key_create(&path("acme/auto")).await.unwrap();
    let every = |secs| KeySet {
        tenant: "acme".into(),
        key: "auto".into(),
        min_decryption_version: None,
        rotate_every_secs: Some(secs),
        state: None,
        ..Default::default()
    };
    steady(|| async { c[1].call(&every(AHEAD + 2)).await }).await;
    let schedule = KeyScheduleDeletion { tenant: "acme".into(), key: "doomed".into(), days: Some(7) };
    steady(|| async { c[2].call(&schedule).await }).await;

    // Three automatic rotations, then none.
    eventually(Duration::from_secs(25), || async {
        (show(&c[0], "acme/auto").await.current_version >= 4).then_some(())
    })
    .await;
    steady(|| async { c[1].call(&every(0)).await }).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let auto = show(&c[2], "acme/auto").await;
    let n = auto.current_version;
    let numbers: Vec<u32> = auto.versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (1..=n).collect::<Vec<_>>(), "{auto:?}");
    for pair in auto.versions.windows(2) {
        let gap = pair[1].created_at - pair[0].created_at;
        assert!(
            gap >= 2,
            "versions {} and {} made {gap} s apart: a rotation ran twice",
            pair[0].version,
            pair[1].version
        );
    }

    // The deletion happened, on every node.
    for client in &c {
        eventually(Duration::from_secs(10), || async {
            (show(client, "acme/doomed").await.state == keyhaven::lifecycle::KeyState::Deleted).then_some(())
        })
        .await;
        let e = client.decrypt(&sealed.ciphertext, &context).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::KeyDisabled), "{e}");
    }

    // One audit record per job, across the three chains.
    let (mut rotations, mut deletions, mut by_node) = (Vec::new(), 0, Vec::new());
    for client in &c {
        let mut here = 0;
        for r in audit_records(client).await {
            if r.actor.as_deref() != Some("daemon") || r.outcome != "ok" {
                continue;
            }
            match (r.op.as_str(), r.key.as_deref()) {
                ("key_rotate", Some("auto")) => rotations.push(r.version.unwrap()),
                ("key_delete", Some("doomed")) => deletions += 1,
                _ => continue,
            }
            here += 1;
        }
        by_node.push(here);
    }
    rotations.sort_unstable();
    eprintln!("{} versions; the jobs ran on the nodes {by_node:?} times", n);
    assert_eq!(rotations, (2..=n).collect::<Vec<_>>(), "one audit record per automatic rotation");
    assert_eq!(deletions, 1, "one audit record for the scheduled deletion");
    let verified = steady(|| async { c[0].call(&AuditVerify {}).await }).await;
    assert!(verified.intact, "{verified:?}");
}

/// A master-key rotation started on one node is continued and finished on
/// another: the second node learns the new current master key version from
/// the change feed (its pin checked in its own token session) and wraps
/// its new keys under it, each key ends with its current version under the
/// new master key, and both nodes open data made before, during and after.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_key_rotation_started_on_one_node_finishes_on_another() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let second = TestDaemon::join(&first);
    let (a, b) = (first.client().await, second.client().await);
    let context = ctx(&["row=1"]);
    let keys: Vec<String> = (0..5).map(|i| format!("mk/k{i}")).collect();
    let mut sealed = Vec::new();
    for k in &keys {
        a.key_create(&path(k)).await.unwrap();
        sealed.push(a.encrypt(&path(k), k.as_bytes(), &context).await.unwrap());
    }
    let dk = b.datakey(&path("mk/k0"), &context, keyhaven::Plaintext::Include).await.unwrap();

    let s = step(&a).await;
    assert_eq!((s.from, s.to, s.rotated, s.remaining, s.finished), (1, 2, 2, 3, false), "{s:?}");
    // Node 2 follows: version 2 becomes current there too.
    eventually(Duration::from_secs(5), || async {
        (b.health().await.unwrap().token.master_key_version == 2).then_some(())
    })
    .await;
    b.key_create(&path("mk/during")).await.unwrap();
    sealed.push(b.encrypt(&path("mk/during"), b"mk/during", &context).await.unwrap());
    // Node 2 continues the same rotation (from 1 to 2, not a new one), and
    // finishes it.
    let s = step(&b).await;
    assert_eq!((s.from, s.to, s.rotated, s.remaining, s.finished), (1, 2, 2, 1, false), "{s:?}");
    let s = step(&b).await;
    assert_eq!((s.from, s.to, s.rotated, s.remaining, s.finished), (1, 2, 1, 0, true), "{s:?}");
    assert_eq!(a.health().await.unwrap().token.master_key_version, 2);

    // Every key: version 1 under master key 1, its current version under 2.
    for k in keys.iter().chain(["mk/during".to_owned()].iter()) {
        let d = show(&a, k).await;
        let current = d.versions.iter().find(|v| v.version == d.current_version).unwrap();
        assert_eq!(current.master_key_version, 2, "{k}: {d:?}");
        if k != "mk/during" {
            assert_eq!((d.current_version, d.versions[0].master_key_version), (2, 1), "{k}: {d:?}");
        }
    }
    // New data on both nodes; both open everything.
    for (i, k) in keys.iter().enumerate() {
        let by = if i % 2 == 0 { &a } else { &b };
        let ct = by.encrypt(&path(k), k.as_bytes(), &context).await.unwrap();
        assert_eq!(ct.key_version, 2);
        sealed.push(ct);
    }
    for c in [&a, &b] {
        for ct in &sealed {
            c.decrypt(&ct.ciphertext, &context).await.unwrap();
        }
        let back = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
        assert_eq!(back.plaintext.expose(), dk.plaintext.as_ref().unwrap().expose());
    }
    // One audit record per step, on the chain of the node that made it.
    let steps = |records: Vec<keyhaven::wire::AuditRecord>| {
        records.iter().filter(|r| r.op == "admin_rotate_master" && r.outcome == "ok").count()
    };
    assert_eq!(steps(audit_records(&a).await), 1);
    assert_eq!(steps(audit_records(&b).await), 2);
    let verified = a.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
}

/// A node killed (SIGKILL) in the middle of a master-key rotation batch,
/// while another node creates keys: the rotation resumes where it stopped
/// once the node is back, nothing acknowledged is lost, no key gets a
/// version twice, every key ends under the new master key, every older
/// ciphertext opens on both nodes, and the audit chains verify.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_in_a_master_key_rotation_batch_resumes_it_after_a_restart() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let mut second = TestDaemon::join(&first);
    let a = Arc::new(first.client().await);
    let context = ctx(&["row=1"]);
    const KEYS: usize = 60;
    let mut sealed = Vec::new();
    for i in 0..KEYS {
        let k = format!("mk/k{i:02}");
        a.key_create(&path(&k)).await.unwrap();
        sealed.push(a.encrypt(&path(&k), k.as_bytes(), &context).await.unwrap());
    }
    // Node 1 creates keys all along; node 2 rotates the master key in one
    // batch of every key and is killed in its middle.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let k = format!("w/k{i}");
                i += 1;
                if a.key_create(&path(&k)).await.is_ok() {
                    acknowledged.push(k);
                }
            }
            acknowledged
        })
    };
    let b = second.client().await;
    let batch =
        tokio::spawn(async move { b.call(&AdminRotateMaster { batch: Some(1000), rollback: false }).await });
    let rotated_sql = "SELECT count(*) FROM keyring WHERE tenant = 'mk' \
                       AND jsonb_array_length(record::jsonb -> 'versions') > 1";
    eventually(Duration::from_secs(20), || async {
        (pg.psql("keyhaven", rotated_sql).parse::<usize>().unwrap() >= 5).then_some(())
    })
    .await;
    second.kill();
    let answer = batch.await.unwrap();
    assert!(answer.is_err(), "the batch finished before the kill: {answer:?}");
    let at_kill: usize = pg.psql("keyhaven", rotated_sql).parse().unwrap();
    let rotated_at_kill: Vec<String> = pg
        .psql(
            "keyhaven",
            "SELECT tenant || '/' || name FROM keyring WHERE tenant = 'mk' \
             AND jsonb_array_length(record::jsonb -> 'versions') > 1",
        )
        .lines()
        .map(str::to_owned)
        .collect();
    let under_way = pg.psql("keyhaven", "SELECT record::jsonb -> 'master_rotation' IS NOT NULL FROM meta");
    assert_eq!(under_way, "t", "the rotation is under way in the store");
    assert!(at_kill < KEYS, "{at_kill} keys of {KEYS} rotated at the kill");

    // Node 2 starts again (the store matches the token's anchor, whatever
    // the kill cut short) and resumes the same rotation.
    second.start_again();
    let b = second.client().await;
    let mut steps = 0;
    let resumed = loop {
        let s = b.call(&AdminRotateMaster { batch: Some(1000), rollback: false }).await.unwrap();
        assert_eq!((s.from, s.to), (1, 2), "the same rotation resumes: {s:?}");
        steps += 1;
        if s.finished {
            break s;
        }
        assert!(steps < 5, "{s:?}");
    };
    eprintln!("{at_kill} of {KEYS} keys rotated when node 2 was killed; resumed: {resumed:?}");
    stop.store(true, Ordering::SeqCst);
    let acknowledged = writer.await.unwrap();
    assert!(!acknowledged.is_empty());

    // Every acknowledged key is there; every original key has exactly two
    // versions (one made before the kill or after, never both); every key's
    // current version is under master key 2.
    let stored: std::collections::BTreeSet<String> =
        pg.psql("keyhaven", "SELECT tenant || '/' || name FROM keyring").lines().map(str::to_owned).collect();
    for k in &acknowledged {
        assert!(stored.contains(k), "acknowledged key {k} is not in the database");
    }
    let twice = pg.psql(
        "keyhaven",
        "SELECT name FROM keyring WHERE tenant = 'mk' AND jsonb_array_length(record::jsonb -> 'versions') <> 2",
    );
    assert_eq!(twice, "", "keys without exactly two versions");
    let behind = pg.psql(
        "keyhaven",
        "SELECT k.tenant || '/' || k.name FROM keyring k, jsonb_array_elements(k.record::jsonb -> 'versions') v \
         WHERE (v ->> 'version')::int = (k.record::jsonb ->> 'current_version')::int \
         AND (v ->> 'master_key_version')::int <> 2",
    );
    assert_eq!(behind, "", "keys whose current version is not under master key 2");
    let a2 = second.client().await;
    for c in [&*a, &a2] {
        for (i, ct) in sealed.iter().enumerate() {
            let back = c.decrypt(&ct.ciphertext, &context).await.unwrap();
            assert_eq!(back.plaintext.expose(), format!("mk/k{i:02}").as_bytes());
        }
        for k in acknowledged.iter().step_by(7) {
            let ct = c.encrypt(&path(k), b"x", &context).await.unwrap();
            c.decrypt(&ct.ciphertext, &context).await.unwrap();
        }
    }
    for c in [&*a, &a2] {
        let verified = eventually(Duration::from_secs(5), || async {
            let v = c.call(&AuditVerify {}).await.unwrap();
            v.intact.then_some(v)
        })
        .await;
        assert!(verified.chains.iter().all(|ch| ch.problem.is_none()), "{verified:?}");
    }

    // Every key the killed call rotated is named by an audit record, though
    // that call's own record was never written: the batch named each group
    // of its keys, durably, before rotating them (docs/CLUSTER.md §5).
    let records: Vec<(String, serde_json::Value)> = pg
        .psql(
            "keyhaven",
            "SELECT node, convert_from(entry, 'UTF8') FROM audit WHERE kind = 0 ORDER BY node, seq",
        )
        .lines()
        .map(|l| {
            let (node, json) = l.split_once('|').unwrap();
            (node.to_owned(), serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
        })
        .collect();
    let named_in = |op: &str| -> std::collections::BTreeSet<String> {
        records
            .iter()
            .filter(|(_, r)| r["op"] == op)
            .flat_map(|(_, r)| r["after"]["keys"].as_array().cloned().unwrap_or_default())
            .filter_map(|k| k.as_str().map(|k| k.split('@').next().unwrap().to_owned()))
            .collect()
    };
    let grouped = named_in("admin_rotate_master_keys");
    let completed = named_in("admin_rotate_master");
    assert!(!rotated_at_kill.is_empty());
    for k in &rotated_at_kill {
        assert!(grouped.contains(k), "key {k}, rotated by the killed batch, is named by no record");
    }
    // And after the resumption, every rotated key is named.
    for i in 0..KEYS {
        let k = format!("mk/k{i:02}");
        assert!(grouped.contains(&k) || completed.contains(&k), "key {k} is named by no record");
    }
    let killed_only: Vec<&String> = rotated_at_kill.iter().filter(|k| !completed.contains(*k)).collect();
    eprintln!(
        "{} key(s) rotated by the killed batch; {} of them named only by its admin_rotate_master_keys record(s)",
        rotated_at_kill.len(),
        killed_only.len(),
    );
}

/// One request of a client loop: when it started, when its answer came,
/// and the answer (`Err(None)`: no code, a client-side timeout).
type Outcome = (Instant, Instant, Result<(), Option<ErrorCode>>);

/// Decrypts `envelope` on `client` in a loop until `stop`; sets `refused`
/// when the node answers `store_unavailable`.
fn decrypt_loop(
    client: Arc<Client>,
    envelope: String,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    let context = ctx(&["user=7"]);
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let answer = client.datakey_decrypt(&envelope, &context).await.map(|_| ()).map_err(|e| e.code());
            if answer == Err(Some(ErrorCode::StoreUnavailable)) {
                refused.store(true, Ordering::SeqCst);
            }
            seen.push((started, Instant::now(), answer));
            if answer.is_err() {
                // No busy loop on a node that refuses at once.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        seen
    })
}

/// A partition (docs/CLUSTER.md §5): node 2 runs in a network namespace of
/// its own and reaches PostgreSQL over TCP through a veth pair, while nodes
/// 1 and 3 reach it over its Unix socket. The link is cut (the host side
/// goes down: every packet between node 2 and the server vanishes, nothing
/// is refused) while a client on every node decrypts two data keys in a
/// loop; node 2 keeps running and must notice by itself. A revocation on
/// node 1 returns within node 2's lease; node 2 serves no request that
/// started after it returned, and answers `store_unavailable`; nodes 1 and 3
/// serve throughout; when the link is back, node 2 renews, catches up and
/// serves again, refusing the revoked key.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_from_postgres_stops_serving_within_its_lease_and_catches_up_when_the_link_returns() {
    let Some(net) = TestNetns::create() else { return };
    let Some(pg) = TestPostgres::start_listening_on(net.host_addr()) else { return };
    const LEASE: Duration = Duration::from_secs(3);
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    reconfigure(&mut first, "3s", 60, 0);
    let mut cut = TestDaemon::join(&first);
    let third = TestDaemon::join(&first);
    // Node 2 moves into the namespace, with the server's TCP address as its
    // connection string (its folder's own file, instead of node 1's).
    let tcp_url = pg.tcp_url("keyhaven");
    let shared_url = first.dir().join("postgres-url").display().to_string();
    cut.run_in_netns(Some(net.name()));
    cut.restart_with(|dir| {
        use std::os::unix::fs::OpenOptionsExt;
        let own = dir.join("postgres-url");
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&own).unwrap();
        std::io::Write::write_all(&mut f, format!("{tcp_url}\n").as_bytes()).unwrap();
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(&shared_url), "{text}");
        std::fs::write(&file, text.replace(&shared_url, &own.display().to_string())).unwrap();
    });
    let over_tcp = format!("SELECT count(*) FROM pg_stat_activity WHERE client_addr = '{}'", net.ns_addr());
    let from_ns: u32 = pg.psql("keyhaven", &over_tcp).parse().unwrap();
    assert!(from_ns > 0, "node 2 has no connection from its namespace");

    let nodes = [&first, &cut, &third];
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(Arc::new(n.client().await));
    }
    let context = ctx(&["user=7"]);
    for k in ["acme/pii", "acme/other"] {
        steady(|| async { clients[0].key_create(&path(k)).await }).await;
    }
    let dk =
        steady(|| async { clients[0].datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await })
            .await;
    let other = steady(|| async {
        clients[0].datakey(&path("acme/other"), &context, keyhaven::Plaintext::Omit).await
    })
    .await;
    for c in &clients {
        steady(|| async { c.datakey_decrypt(&dk.envelope, &context).await }).await;
        steady(|| async { c.datakey_decrypt(&other.envelope, &context).await }).await;
    }

    // Every node decrypts both data keys in a loop, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let refused = [(); 3].map(|_| Arc::new(AtomicBool::new(false)));
    let mut loops = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for envelope in [&dk.envelope, &other.envelope] {
            let (c, stop, refused) = (c.clone(), stop.clone(), refused[i].clone());
            loops.push((i, envelope == &dk.envelope, decrypt_loop(c, envelope.clone(), stop, refused)));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The cut; then a revocation on node 1.
    net.cut();
    let cut_at = Instant::now();
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    clients[0].call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let returned = Instant::now();
    let waited = returned - cut_at;
    eprintln!("cut: revoke on node 1 returned after {waited:?} (lease {LEASE:?})");
    // (a) Within the bound: node 2's lease, plus the time to notice.
    assert!(waited < LEASE + Duration::from_secs(2), "revoke waited {waited:?}, more than the lease bound");
    // It waited for node 2's lease (a node that applies it takes milliseconds).
    assert!(
        waited > Duration::from_secs(1),
        "revoke returned after {waited:?}, before node 2's lease ran out"
    );
    let health = clients[0].health().await.unwrap().store.cluster.unwrap();
    assert!(health.nodes.iter().any(|n| !n.live), "node 2's lease has ended: {health:?}");

    // The link stays cut until node 2 was seen answering `store_unavailable`
    // (and at least two leases), at most 20 s.
    let deadline = cut_at + Duration::from_secs(20);
    while Instant::now() < deadline && (!refused[1].load(Ordering::SeqCst) || cut_at.elapsed() < 2 * LEASE) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_in_cut = refused[1].load(Ordering::SeqCst);
    net.restore();
    let restored = Instant::now();
    eprintln!("cut: link restored after {:?}", restored - cut_at);

    // (c) Node 2 renews, catches up, and serves again: its other keys, not
    // the revoked one.
    let b = cut.client().await;
    eventually(Duration::from_secs(15), || async {
        b.datakey_decrypt(&other.envelope, &context).await.ok().map(|_| ())
    })
    .await;
    let back = restored.elapsed();
    let e = b.datakey_decrypt(&dk.envelope, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    eprintln!("cut: node 2 served again {back:?} after the link returned");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);

    let mut by_node = [[0usize; 4]; 3]; // ok, revoked, store_unavailable, other errors
                                        // Node 2 during the cut: the last request it served (when it started),
                                        // its first `store_unavailable` (when answered), its slowest answer.
    let (mut last_served, mut first_refusal, mut slowest) = (None, None, Duration::ZERO);
    for (node, revoked_key, l) in loops {
        for (started, answered, answer) in l.await.unwrap() {
            let slot = match answer {
                Ok(()) => 0,
                Err(Some(ErrorCode::Revoked)) => 1,
                Err(Some(ErrorCode::StoreUnavailable)) => 2,
                Err(_) => 3,
            };
            by_node[node][slot] += 1;
            // (b) No request that started after revoke returned is served
            // under the revoked key, on any node.
            assert!(
                !(revoked_key && started > returned && answer.is_ok()),
                "node {}: a request that started {:?} after revoke returned was served",
                node + 1,
                started - returned
            );
            if node == 1 {
                // Nor any request on node 2 while it is cut off, once its
                // lease has run out.
                if started > returned && answered < restored {
                    assert!(answer.is_err(), "node 2 served a request during the cut, after its lease");
                }
                if answered > cut_at && started < restored {
                    slowest = slowest.max(answered - started);
                    if answer.is_ok() && started > cut_at {
                        last_served = last_served.max(Some(started - cut_at));
                    }
                    if answer == Err(Some(ErrorCode::StoreUnavailable)) && answered < restored {
                        first_refusal = Some(first_refusal.unwrap_or(Duration::MAX).min(answered - cut_at));
                    }
                }
            } else {
                // (d) Nodes 1 and 3 never stopped serving: every request
                // was answered, the revoked key's with `revoked` at most,
                // and none took long.
                assert!(
                    answer.is_ok() || (revoked_key && answer == Err(Some(ErrorCode::Revoked))),
                    "node {}: {answer:?} {:?} after the cut",
                    node + 1,
                    started.checked_duration_since(cut_at)
                );
                assert!(
                    answered - started < Duration::from_secs(2),
                    "node {}: a request took {:?}",
                    node + 1,
                    answered - started
                );
            }
        }
    }
    eprintln!("cut: answers by node [ok, revoked, store_unavailable, other]: {by_node:?}");
    eprintln!(
        "cut: node 2 in the cut: last request served started at {last_served:?}, first store_unavailable \
         answered at {first_refusal:?} (after the cut), slowest answer {slowest:?}"
    );
    assert!(refused_in_cut, "node 2 answered no `store_unavailable` while cut off");
    // Its answers wait for their audit records to be durable in PostgreSQL,
    // so none is served from the cut on; a request waiting for its record
    // gives up when the node's lease ends by its own clock (before the
    // lease), and from then on every request is refused at once, without
    // running (docs/CLUSTER.md §5).
    let first_refusal = first_refusal.expect("a `store_unavailable` answered during the cut");
    assert!(first_refusal < LEASE + Duration::from_secs(1), "node 2 first refused after {first_refusal:?}");
    assert!(slowest < LEASE + Duration::from_secs(1), "node 2 took {slowest:?} to answer during the cut");
    assert!(by_node[0][0] > 0 && by_node[2][0] > 0, "nodes 1 and 3 served nothing");
    let health = steady(|| async { b.health().await }).await.store.cluster.unwrap();
    assert!(health.serving, "{health:?}");
    assert!(health.nodes.iter().all(|n| n.live), "{health:?}");
    // The requests it refused without running are counted in one alert
    // record on its chain, written once it could write again.
    let alerts = format!(
        "SELECT convert_from(entry, 'UTF8') FROM audit WHERE node = '{}' AND kind = 0 \
         AND convert_from(entry, 'UTF8') LIKE '%requests were refused without running%'",
        health.node
    );
    let alert = eventually(Duration::from_secs(5), || async {
        let text = pg.psql("keyhaven", &alerts);
        (!text.is_empty()).then_some(text)
    })
    .await;
    eprintln!("cut: node 2's alert: {alert}");
    // Node 2 noticed by itself, and said so.
    drop((b, clients));
    let (_, log) = cut.stop();
    assert!(log.contains("cannot renew this node's lease"), "{log}");
    assert!(log.contains("the lease is renewed again"), "{log}");
}

/// `keyhaven audit tail ARGS --json` on `node`, its stdout lines sent to a
/// channel; killed on drop.
struct Tail {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Tail {
    fn spawn(node: &TestDaemon, args: &[&str]) -> Tail {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin("keyhaven"))
            .arg("--socket")
            .arg(node.socket())
            .args(["audit", "tail", "--json"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Tail { child, lines }
    }

    /// Reads printed records until one satisfies `until` (or 20 s pass).
    fn until(&self, seen: &mut Vec<serde_json::Value>, until: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "audit tail did not print what was expected: {seen:#?}");
            if let Ok(r) = self.lines.recv_timeout(Duration::from_millis(100)) {
                let done = until(&r);
                seen.push(r);
                if done {
                    return;
                }
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn created(r: &serde_json::Value, key: &str) -> bool {
    r["op"] == "key_create" && r["key"] == key
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_tail_on_one_node_follows_every_nodes_chain() {
    let Some(pg) = TestPostgres::start() else { return };
    let nodes = three_nodes(&pg);
    let mut c = Vec::new();
    let mut names = Vec::new();
    for n in &nodes {
        let client = n.client().await;
        names.push(client.health().await.unwrap().store.cluster.expect("a cluster").node);
        c.push(client);
    }
    c[1].key_create(&path("tail/before-2")).await.unwrap();
    c[2].key_create(&path("tail/before-3")).await.unwrap();

    // Followed on node 1: a record made on node 3 (and one on node 2)
    // comes, labelled with its node.
    let all = Tail::spawn(&nodes[0], &["--all-nodes", "-f", "-n", "0"]);
    let one = Tail::spawn(&nodes[0], &["--node", &names[2], "-f", "-n", "0"]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    c[2].key_create(&path("tail/on-3")).await.unwrap();
    c[1].key_create(&path("tail/on-2")).await.unwrap();
    let mut seen = Vec::new();
    all.until(&mut seen, |r| created(r, "on-3"));
    all.until(&mut seen, |r| created(r, "on-2"));
    let on3 = seen.iter().find(|r| created(r, "on-3")).unwrap();
    assert_eq!(on3["node"], names[2].as_str(), "{on3}");
    let on2 = seen.iter().find(|r| created(r, "on-2")).unwrap();
    assert_eq!(on2["node"], names[1].as_str(), "{on2}");
    assert!(!seen.iter().any(|r| created(r, "before-3")), "-n 0 printed an older record: {seen:#?}");
    let mut seen_one = Vec::new();
    one.until(&mut seen_one, |r| created(r, "on-3"));
    assert!(seen_one.iter().all(|r| r["node"] == names[2].as_str()), "{seen_one:#?}");
    assert!(!seen_one.iter().any(|r| created(r, "on-2")), "--node printed another chain: {seen_one:#?}");
    // Every node's chain is in time order within the merge, each chain in
    // its own order.
    for name in &names {
        let seqs: Vec<u64> =
            seen.iter().filter(|r| r["node"] == name.as_str()).map(|r| r["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "node {name}: {seqs:?}");
    }
    drop((all, one));

    // Without -f: the last records of every chain together, labelled.
    let out = nodes[0].cli(&["audit", "tail", "--all-nodes", "-n", "200", "--json"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (key, node) in [("before-2", &names[1]), ("before-3", &names[2]), ("on-3", &names[2])] {
        let r = printed.iter().find(|r| created(r, key)).unwrap_or_else(|| panic!("{key}: {printed:#?}"));
        assert_eq!(r["node"], node.as_str());
    }
    let times: Vec<u64> = printed.iter().map(|r| r["time_ms"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order: {times:?}");
    let text = nodes[0].cli(&["audit", "tail", "--node", &names[1], "-n", "50"], b"");
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.lines().all(|l| l.starts_with(&format!("[{}] ", names[1]))), "{text}");
    assert!(text.contains("key_create tail/on-2"), "{text}");

    // A node that has no chain is refused by name; so is `node` on sled.
    let out = nodes[0].cli(&["audit", "tail", "--node", "nosuch"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no audit chain of node `nosuch`"), "{out:?}");
    let single = TestDaemon::start();
    let refused = single
        .client()
        .await
        .call(&keyhaven::wire::AuditRead { node: Some("x".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::BadRequest), "{refused}");
    let out = single.cli(&["audit", "tail", "--all-nodes"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a cluster"), "{out:?}");
}

/// A PostgreSQL server on a Unix socket that stops answering (SIGSTOP on
/// the postmaster and every backend: nothing is closed, nothing refused,
/// and a Unix socket has no TCP time limit): each node stops serving
/// within its lease, answers `store_unavailable` (and `health`) in bounded
/// time all along, and serves again once the server resumes (docs/CLUSTER.md
/// §5).
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_postgres_server_makes_the_nodes_stop_serving_within_their_lease_and_they_recover() {
    let Some(pg) = TestPostgres::start() else { return };
    const LEASE: Duration = Duration::from_secs(3);
    pg.create_db("keyhaven");
    let mut first = TestDaemon::start_postgres(&pg.url("keyhaven"));
    reconfigure(&mut first, "3s", 60, 0);
    let second = TestDaemon::join(&first);
    let clients = [Arc::new(first.client().await), Arc::new(second.client().await)];
    let context = ctx(&["user=7"]);
    steady(|| async { clients[0].key_create(&path("acme/pii")).await }).await;
    let dk =
        steady(|| async { clients[0].datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await })
            .await;
    for c in &clients {
        steady(|| async { c.datakey_decrypt(&dk.envelope, &context).await }).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let refused = [(); 2].map(|_| Arc::new(AtomicBool::new(false)));
    let loops: Vec<_> = clients
        .iter()
        .zip(&refused)
        .map(|(c, r)| decrypt_loop(c.clone(), dk.envelope.clone(), stop.clone(), r.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The server stops answering for three leases (resumed on drop too,
    // should the test fail, before the server is stopped).
    struct Resume(Vec<u32>);
    impl Drop for Resume {
        fn drop(&mut self) {
            for pid in self.0.iter().rev() {
                signal(*pid, "CONT");
            }
        }
    }
    let pids = pg.server_pids();
    assert!(pids.len() > 2, "the postmaster and its backends: {pids:?}");
    for pid in &pids {
        signal(*pid, "STOP");
    }
    let resume = Resume(pids);
    let stopped = Instant::now();
    // A write waits, and fails in bounded time.
    let write = {
        let c = clients[1].clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = c.key_create(&path("acme/during")).await;
            (t.elapsed(), r.map(|_| ()).map_err(|e| e.code()))
        })
    };
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    // `health` answers, saying the node does not serve.
    let asked = Instant::now();
    let health = tokio::time::timeout(LEASE * 3, clients[0].health()).await;
    let took = asked.elapsed();
    let health = health.unwrap_or_else(|_| panic!("health did not answer within {:?}", LEASE * 3)).unwrap();
    eprintln!("stopped: health answered in {took:?}: status {}", health.status);
    assert_ne!(health.status, "ok", "{health:?}");
    while stopped.elapsed() < 3 * LEASE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(resume);
    let resumed = Instant::now();
    eprintln!("stopped: server resumed after {:?}", resumed - stopped);

    // Both nodes serve again, and write.
    for (i, c) in clients.iter().enumerate() {
        eventually(Duration::from_secs(15), || async {
            c.datakey_decrypt(&dk.envelope, &context).await.ok()
        })
        .await;
        eprintln!("stopped: node {} served again {:?} after the server resumed", i + 1, resumed.elapsed());
    }
    let (write_took, write) = write.await.unwrap();
    eprintln!("stopped: the write in the stop answered {write:?} after {write_took:?}");
    steady(|| async { clients[0].key_create(&path("acme/after")).await }).await;
    steady(|| async { clients[1].encrypt(&path("acme/after"), b"x", &context).await }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);

    for (node, l) in loops.into_iter().enumerate() {
        let (mut first_refusal, mut slowest, mut by) = (None, Duration::ZERO, [0usize; 3]);
        for (started, answered, answer) in l.await.unwrap() {
            by[match answer {
                Ok(()) => 0,
                Err(Some(ErrorCode::StoreUnavailable)) => 1,
                Err(_) => 2,
            }] += 1;
            if answered < stopped || started > resumed {
                continue;
            }
            slowest = slowest.max(answered - started);
            // Nothing is served from a lease after the stop on.
            assert!(
                !(answer.is_ok() && started > stopped + LEASE),
                "node {} served a request that started {:?} into the stop",
                node + 1,
                started - stopped
            );
            if answer == Err(Some(ErrorCode::StoreUnavailable)) {
                first_refusal = Some(first_refusal.unwrap_or(Duration::MAX).min(answered - stopped));
            }
        }
        eprintln!(
            "stopped: node {}: [ok, store_unavailable, other] {by:?}, first store_unavailable {first_refusal:?} \
             after the stop, slowest answer in it {slowest:?}",
            node + 1
        );
        assert!(refused[node].load(Ordering::SeqCst), "node {} never refused", node + 1);
        let first_refusal = first_refusal.expect("a refusal in the stop");
        assert!(first_refusal < LEASE + Duration::from_secs(1), "node {}: {first_refusal:?}", node + 1);
        assert!(slowest < LEASE + Duration::from_secs(1), "node {}: an answer took {slowest:?}", node + 1);
        assert_eq!(by[2], 0, "node {}: other errors", node + 1);
    }
    let verified = steady(|| async { clients[0].call(&AuditVerify {}).await }).await;
    assert!(verified.intact, "{verified:?}");
}
