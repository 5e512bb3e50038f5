//! The store conformance suite: the same cases against every backend — sled
//! in a temporary folder, and PostgreSQL in a throwaway cluster started for
//! the test (a database per case) — through the daemon's own `Store`.
//! Then what only a networked store has: a database writer who is not the
//! daemon (the "file writer" of docs/SECURITY.md §3) is caught by the
//! token's anchor; a newer schema is refused by name; writes survive a
//! reopen and a server restart.
//!
//! The anchor here is kept in memory (the cases are about the store; the
//! token's own anchor is tested end to end in tests/postgres.rs and
//! tests/tamper.rs).

use std::sync::{Arc, Mutex};

use keyhaven::revocation::{Revocation, Scope};
use keyhaven_tests::{path, TestPostgres};
use keyhavend::store::postgres::{PgOptions, PgStore, PG_SCHEMA_VERSION};
use keyhavend::store::sled_store::SledStore;
use keyhavend::store::state::{Anchor, AnchorState};
use keyhavend::store::{AuditKind, KeyRecord, Meta, Store, StoreError, SCHEMA_VERSION};

/// The token's anchor, in memory.
#[derive(Default)]
struct MemoryAnchor(Mutex<Option<AnchorState>>);

impl Anchor for MemoryAnchor {
    fn read(&self) -> Result<Option<AnchorState>, StoreError> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn write(&self, state: &AnchorState) -> Result<(), StoreError> {
        *self.0.lock().unwrap() = Some(state.clone());
        Ok(())
    }
}

impl MemoryAnchor {
    fn generation(&self) -> u64 {
        self.0.lock().unwrap().as_ref().map_or(0, |a| a.generation)
    }
}

fn meta() -> Meta {
    serde_json::from_value(serde_json::json!({
        "schema_version": SCHEMA_VERSION, "master_key_version": 1, "token_label": "t", "created_at": 1
    }))
    .unwrap()
}

/// A record built from JSON, so that fields added to `KeyRecord` later
/// (with serde defaults) need no change here.
fn record(tenant: &str, key: &str) -> KeyRecord {
    serde_json::from_value(serde_json::json!({
        "tenant": tenant, "key": key, "created_at": 1, "current_version": 1,
        "versions": [{"version": 1, "created_at": 1, "master_key_version": 1, "wrapped_kek": "AAAA"}]
    }))
    .unwrap()
}

fn revocation(scope: Scope, since: u64) -> Revocation {
    serde_json::from_value(serde_json::json!({
        "scope": scope, "kind": "suspended", "reason": "key-compromise", "since": since, "by_uid": 0
    }))
    .unwrap()
}

fn open_pg(pg: &TestPostgres, db: &str) -> Store {
    let options = PgOptions::default();
    Store::new(Arc::new(PgStore::open(&pg.url(db), &options).expect("open the PostgreSQL store")))
}

/// Every case, against a fresh store from `fresh`.
fn conformance(fresh: &mut dyn FnMut(&str) -> Store) {
    meta_is_written_once(&fresh("meta"));
    keys_are_created_once_listed_and_counted(&fresh("keys"));
    updates_write_only_changes_and_anchor_each(&fresh("updates"));
    concurrent_updates_lose_nothing(&fresh("concurrent"));
    revocations_are_put_replaced_and_removed(&fresh("revocations"));
    audit_entries_appear_at_flush_in_order(&fresh("audit"));
}

fn meta_is_written_once(s: &Store) {
    assert!(s.meta().unwrap().is_none());
    assert!(matches!(s.check_initialised(), Err(StoreError::NotInitialised(_))));
    let anchor = Arc::new(MemoryAnchor::default());
    s.attach_anchor(anchor.clone()).unwrap();
    s.init_meta(&meta()).unwrap();
    assert!(matches!(s.init_meta(&meta()), Err(StoreError::AlreadyInitialised(_))));
    assert_eq!(s.check_initialised().unwrap(), meta());
    let m = s.update_meta(&mut |m| m.master_key_version = 2).unwrap();
    assert_eq!(m.master_key_version, 2);
    assert_eq!(s.meta().unwrap().unwrap().master_key_version, 2);
    assert_eq!(anchor.generation(), 2, "init and update: two anchored writes");
}

fn keys_are_created_once_listed_and_counted(s: &Store) {
    s.attach_anchor(Arc::new(MemoryAnchor::default())).unwrap();
    // Byte order: `a-b` < `a/...` differs from the `tenant/key` string order.
    for (t, k) in [("beta", "x"), ("a", "z"), ("a-b", "k"), ("a", "b")] {
        s.create_key(&record(t, k)).unwrap();
    }
    match s.create_key(&record("a", "b")) {
        Err(StoreError::AlreadyExists(what)) => assert!(what.contains("a/b"), "{what}"),
        other => panic!("a second create: {other:?}"),
    }
    let all: Vec<String> = s.keys(None).unwrap().iter().map(|r| format!("{}/{}", r.tenant, r.key)).collect();
    assert_eq!(all, ["a/b", "a/z", "a-b/k", "beta/x"]);
    let a: Vec<String> = s.keys(Some("a")).unwrap().iter().map(|r| r.key.clone()).collect();
    assert_eq!(a, ["b", "z"], "a tenant's keys, and not those of a tenant whose name it prefixes");
    assert_eq!(s.key_count().unwrap(), 4);
    assert_eq!(s.key(&path("a/z")).unwrap().unwrap().key, "z");
    assert!(s.key(&path("a/none")).unwrap().is_none());
}

fn updates_write_only_changes_and_anchor_each(s: &Store) {
    let anchor = Arc::new(MemoryAnchor::default());
    s.attach_anchor(anchor.clone()).unwrap();
    s.create_key(&record("acme", "one")).unwrap();
    s.create_key(&record("acme", "two")).unwrap();
    let g = anchor.generation();
    let written =
        s.update_key(&path("acme/one"), &mut |r| r.versions[0].wraps_reserved = 7).unwrap().unwrap();
    assert_eq!(written.versions[0].wraps_reserved, 7);
    assert_eq!(s.key(&path("acme/one")).unwrap().unwrap().versions[0].wraps_reserved, 7);
    assert_eq!(anchor.generation(), g + 1);
    // No change, no write; no key, nothing.
    s.update_key(&path("acme/one"), &mut |_| {}).unwrap().unwrap();
    assert!(s.update_key(&path("acme/none"), &mut |_| panic!("no record to change")).unwrap().is_none());
    assert_eq!(anchor.generation(), g + 1);
    // A batch: one anchored write for every key it changes; absent keys passed over.
    let paths = [path("acme/one"), path("acme/two"), path("acme/none")];
    s.update_keys(&paths, &mut |_, r| r.versions[0].decryptions += 5).unwrap();
    assert_eq!(anchor.generation(), g + 2);
    for p in ["acme/one", "acme/two"] {
        assert_eq!(s.key(&path(p)).unwrap().unwrap().versions[0].decryptions, 5, "{p}");
        assert_eq!(s.keys(Some("acme")).unwrap().iter().map(|r| r.versions[0].decryptions).sum::<u64>(), 10);
    }
}

fn concurrent_updates_lose_nothing(s: &Store) {
    s.attach_anchor(Arc::new(MemoryAnchor::default())).unwrap();
    s.create_key(&record("acme", "budget")).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..25 {
                    s.update_key(&path("acme/budget"), &mut |r| r.versions[0].wraps_reserved += 1).unwrap();
                }
            });
        }
    });
    assert_eq!(s.key(&path("acme/budget")).unwrap().unwrap().versions[0].wraps_reserved, 100);
    let listed = s.keys(Some("acme")).unwrap();
    assert_eq!(listed[0].versions[0].wraps_reserved, 100, "the store, not only the cache");
}

fn revocations_are_put_replaced_and_removed(s: &Store) {
    s.attach_anchor(Arc::new(MemoryAnchor::default())).unwrap();
    let key = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    let version = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(2) };
    s.put_revocation(&revocation(key.clone(), 10)).unwrap();
    s.put_revocation(&revocation(version.clone(), 11)).unwrap();
    s.put_revocation(&revocation(Scope::All, 12)).unwrap();
    s.put_revocation(&revocation(key.clone(), 13)).unwrap();
    let mut since: Vec<u64> = s.revocations().unwrap().iter().map(|r| r.since).collect();
    since.sort();
    assert_eq!(since, [11, 12, 13], "the same scope is replaced");
    assert_eq!(s.remove_revocation(&key).unwrap().unwrap().since, 13);
    assert!(s.remove_revocation(&key).unwrap().is_none());
    assert!(s.remove_revocation(&Scope::Tenant { tenant: "acme".into() }).unwrap().is_none());
    assert_eq!(s.revocations().unwrap().len(), 2);
}

fn audit_entries_appear_at_flush_in_order(s: &Store) {
    // More than one page of PostgreSQL's scan (512).
    for seq in 1..=1200u64 {
        s.audit_put(AuditKind::Record, seq, format!("record {seq}").as_bytes()).unwrap();
        if seq % 100 == 0 {
            s.audit_put(AuditKind::Seal, seq, format!("seal {seq}").as_bytes()).unwrap();
        }
        if seq == 600 {
            assert_eq!(s.audit_scan(AuditKind::Record, 1, false).count(), 0, "nothing before a flush");
            s.audit_flush().unwrap();
        }
    }
    assert_eq!(s.audit_scan(AuditKind::Record, 1, false).count(), 600);
    s.audit_flush().unwrap();
    let seqs = |kind, from, reverse| -> Vec<u64> {
        s.audit_scan(kind, from, reverse).map(|e| e.unwrap().0).collect()
    };
    assert_eq!(seqs(AuditKind::Record, 1, false), (1..=1200).collect::<Vec<_>>());
    assert_eq!(seqs(AuditKind::Record, 1100, false), (1100..=1200).collect::<Vec<_>>());
    assert_eq!(seqs(AuditKind::Record, 700, true), (1..=700).rev().collect::<Vec<_>>());
    assert_eq!(seqs(AuditKind::Record, u64::MAX, true).len(), 1200);
    assert_eq!(seqs(AuditKind::Seal, 1, false), (1..=12).map(|n| n * 100).collect::<Vec<_>>());
    assert_eq!(seqs(AuditKind::Seal, 650, true), (1..=6).rev().map(|n| n * 100).collect::<Vec<_>>());
    let (seq, bytes) = s.audit_scan(AuditKind::Record, 777, false).next().unwrap().unwrap();
    assert_eq!((seq, bytes), (777, b"record 777".to_vec()));
    s.audit_flush().unwrap(); // nothing pending: nothing to do

    // Gaps wider than a page (PostgreSQL pages by ranges of `seq`).
    for seq in [5000u64, 9000, 9001] {
        s.audit_put(AuditKind::Record, seq, format!("record {seq}").as_bytes()).unwrap();
    }
    s.audit_flush().unwrap();
    let all: Vec<u64> = (1..=1200).chain([5000, 9000, 9001]).collect();
    assert_eq!(seqs(AuditKind::Record, 1, false), all);
    assert_eq!(seqs(AuditKind::Record, u64::MAX, true), all.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(seqs(AuditKind::Record, 8999, true)[..3], [5000, 1200, 1199]);
    assert_eq!(seqs(AuditKind::Record, 1201, false), [5000, 9000, 9001]);
}

#[test]
fn sled_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&mut |name| Store::new(Arc::new(SledStore::open(&dir.path().join(name)).unwrap())));
}

#[test]
fn postgres_passes_the_conformance_suite() {
    let Some(pg) = TestPostgres::start() else { return };
    conformance(&mut |name| {
        pg.create_db(name);
        open_pg(&pg, name)
    });
}

#[test]
fn postgres_keeps_every_write_across_a_reopen_and_a_server_restart() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("kh");
    let anchor = Arc::new(MemoryAnchor::default());
    {
        let s = open_pg(&pg, "kh");
        s.attach_anchor(anchor.clone()).unwrap();
        s.init_meta(&meta()).unwrap();
        s.create_key(&record("acme", "pii")).unwrap();
        s.put_revocation(&revocation(Scope::Tenant { tenant: "beta".into() }, 5)).unwrap();
        // The server restarts under the open store: the pool's broken
        // connections are replaced, and the next write goes through.
        pg.restart();
        let mut last = Err(StoreError::Backend("not tried".into()));
        for _ in 0..3 {
            last = s.update_key(&path("acme/pii"), &mut |r| r.current_version = 9).map(|_| ());
            if last.is_ok() {
                break;
            }
        }
        last.expect("a write after the server restarted");
    }
    let s = open_pg(&pg, "kh");
    assert_eq!(s.attach_anchor(anchor.clone()).unwrap().pending, None, "the same state as anchored");
    assert_eq!(s.key(&path("acme/pii")).unwrap().unwrap().current_version, 9);
    assert_eq!(s.revocations().unwrap().len(), 1);
    // Opening again migrates nothing: one schema row per migration.
    assert_eq!(pg.psql("kh", "SELECT count(*) FROM schema_version"), PG_SCHEMA_VERSION.to_string());
}

#[test]
fn a_version_1_database_migrates_in_place_keeping_its_audit_chain() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("kh");
    // The schema slice 1 made, with one audit entry in it.
    pg.psql(
        "kh",
        "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO schema_version (version) VALUES (1);
         CREATE TABLE meta (id text PRIMARY KEY, record text NOT NULL, row_version bigint NOT NULL);
         CREATE TABLE keyring (tenant text NOT NULL, name text NOT NULL, record text NOT NULL,
                               row_version bigint NOT NULL, PRIMARY KEY (tenant, name));
         CREATE TABLE revocations (scope text PRIMARY KEY, record text NOT NULL);
         CREATE TABLE audit (kind smallint NOT NULL, seq bigint NOT NULL, entry bytea NOT NULL,
                             PRIMARY KEY (kind, seq));
         INSERT INTO audit VALUES (0, 1, 'entry one');",
    );
    let s = open_pg(&pg, "kh");
    assert_eq!(pg.psql("kh", "SELECT max(version) FROM schema_version"), "2");
    // The single daemon's chain is node '' now: read as before.
    let entries: Vec<_> = s.audit_scan(AuditKind::Record, 0, false).map(Result::unwrap).collect();
    assert_eq!(entries, vec![(1, b"entry one".to_vec())]);
    assert_eq!(pg.psql("kh", "SELECT node = '' FROM audit"), "t");
    // Two nodes' chains may now hold the same (kind, seq).
    pg.psql("kh", "INSERT INTO audit (node, kind, seq, entry) VALUES ('n2', 0, 1, 'other node')");
    assert_eq!(pg.psql("kh", "SELECT count(*) FROM nodes"), "0");
}

#[test]
fn a_database_writer_who_is_not_the_daemon_is_caught_by_the_anchor() {
    let Some(pg) = TestPostgres::start() else { return };
    let cases: &[(&str, &str)] = &[
        // Lift a revocation behind the daemon's back.
        ("lift", "DELETE FROM revocations"),
        // Hand a key back budget it has used (nonce reuse) or change its master key.
        ("budget", "UPDATE keyring SET record = replace(record, '\"wraps_reserved\":7', '\"wraps_reserved\":0')"),
        // Swap two keys' records.
        ("swap", "UPDATE keyring k SET record = o.record FROM keyring o WHERE k.name <> o.name"),
        // Add a key the daemon never made.
        (
            "add",
            "INSERT INTO keyring SELECT tenant, 'three', replace(record, '\"one\"', '\"three\"'), 1 FROM keyring \
             WHERE name = 'one'",
        ),
    ];
    for (db, attack) in cases {
        pg.create_db(db);
        let anchor = Arc::new(MemoryAnchor::default());
        {
            let s = open_pg(&pg, db);
            s.attach_anchor(anchor.clone()).unwrap();
            s.init_meta(&meta()).unwrap();
            s.create_key(&record("acme", "one")).unwrap();
            s.create_key(&record("acme", "two")).unwrap();
            s.update_key(&path("acme/one"), &mut |r| r.versions[0].wraps_reserved = 7).unwrap();
            s.put_revocation(&revocation(Scope::All, 3)).unwrap();
        }
        pg.psql(db, attack);
        let s = open_pg(&pg, db);
        match s.attach_anchor(anchor.clone()) {
            Err(StoreError::Tampered(why)) => assert!(why.contains("accept-store"), "{why}"),
            other => panic!("{db}: `{attack}` went unnoticed: {other:?}"),
        }
    }
    // An older copy of the database (a rollback): caught too.
    pg.create_db("live");
    let anchor = Arc::new(MemoryAnchor::default());
    let s = open_pg(&pg, "live");
    s.attach_anchor(anchor.clone()).unwrap();
    s.init_meta(&meta()).unwrap();
    s.create_key(&record("acme", "one")).unwrap();
    drop(s);
    pg.psql("postgres", "CREATE DATABASE old TEMPLATE live");
    let s = open_pg(&pg, "live");
    s.attach_anchor(anchor.clone()).unwrap();
    s.put_revocation(&revocation(Scope::All, 4)).unwrap();
    drop(s);
    let s = open_pg(&pg, "old");
    assert!(matches!(s.attach_anchor(anchor), Err(StoreError::Tampered(_))), "a rollback went unnoticed");
}

#[test]
fn a_newer_schema_is_refused_by_name_and_a_bad_connection_string_is_named() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("kh");
    drop(open_pg(&pg, "kh"));
    pg.psql("kh", &format!("INSERT INTO schema_version (version) VALUES ({})", PG_SCHEMA_VERSION + 1));
    let options = PgOptions::default();
    match PgStore::open(&pg.url("kh"), &options) {
        Err(e @ StoreError::NewerSchema { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("version {}", PG_SCHEMA_VERSION + 1)), "{text}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
    // A database that does not exist, and a string that does not parse:
    // named errors, with no password in them.
    let err = PgStore::open(&format!("{} password=hunter2", pg.url("nowhere")), &options).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("nowhere") && !text.contains("hunter2"), "{text}");
    let err = PgStore::open("host=/tmp port=notaport password=hunter2", &options).err().unwrap();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn production_refuses_postgres_over_tcp_without_tls() {
    let production = PgOptions { require_tls: true, ..PgOptions::default() };
    for url in [
        "host=db.example password=hunter2 dbname=kh",
        "postgresql://kh:hunter2@db.example/kh",
        "postgresql://kh:hunter2@db.example/kh?sslmode=prefer",
    ] {
        let err = PgStore::open(url, &production).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains("sslmode=require") && !text.contains("hunter2"), "{url}: {text}");
    }
}

/// A write that fails after its anchor was prepared (here the database
/// refuses it; in life, the connection breaks before the answer) leaves
/// the daemon unsure whether it happened: the next write first reads the
/// database and settles the anchor on what it holds, so the daemon keeps
/// writing and still starts on the database afterwards.
#[test]
fn postgres_settles_a_failed_write_before_the_next_and_still_starts() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("kh");
    pg.psql(
        "kh",
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.record LIKE '%\"decryptions\":99%' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; \
         RETURN NEW; END $$",
    );
    let anchor = Arc::new(MemoryAnchor::default());
    let s = open_pg(&pg, "kh");
    s.attach_anchor(anchor.clone()).unwrap();
    s.init_meta(&meta()).unwrap();
    s.create_key(&record("acme", "one")).unwrap();
    s.create_key(&record("acme", "two")).unwrap();
    pg.psql("kh", "CREATE TRIGGER refuse BEFORE UPDATE ON keyring FOR EACH ROW EXECUTE FUNCTION refuse()");
    let err = s.update_key(&path("acme/one"), &mut |r| r.versions[0].decryptions = 99).unwrap_err();
    assert!(err.to_string().contains("refused by a trigger"), "{err}");
    // A batch whose second row is refused: the first is not written either.
    let paths = [path("acme/one"), path("acme/two")];
    let err = s
        .update_keys(&paths, &mut |p, r| r.versions[0].decryptions = if p.key() == "two" { 99 } else { 5 })
        .unwrap_err();
    assert!(err.to_string().contains("refused by a trigger"), "{err}");
    assert_eq!(s.key(&path("acme/one")).unwrap().unwrap().versions[0].decryptions, 0);
    s.update_key(&path("acme/two"), &mut |r| r.versions[0].decryptions = 7).unwrap();
    drop(s);
    let s = open_pg(&pg, "kh");
    s.attach_anchor(anchor).expect("the database starts after the failed writes");
    assert_eq!(s.key(&path("acme/two")).unwrap().unwrap().versions[0].decryptions, 7);
    assert_eq!(s.key(&path("acme/one")).unwrap().unwrap().versions[0].decryptions, 0);
}
