//! The daemon on PostgreSQL, end to end: `keyhavend dev --postgres URL`
//! with a real token, the real daemon and a throwaway PostgreSQL cluster.
//! Keys made, used, rotated and revoked survive a restart of the daemon
//! and of the server; the audit log verifies from the database; a database
//! writer who lifts a revocation is refused at the next start, as a file
//! writer is with sled (docs/SECURITY.md §3).

use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
use keyhaven::wire::AuditVerify;
use keyhaven_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_on_postgres_keeps_keys_revocations_and_audit_across_restarts() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut d = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().store.keys, 0);
    c.key_create(&path("acme/pii")).await.unwrap();
    let again = c.key_create(&path("acme/pii")).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::AlreadyExists));
    let context = ctx(&["user=42"]);
    let v1 = c.encrypt(&path("acme/pii"), b"under version 1", &context).await.unwrap();
    let envelope = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    c.call(&keyhaven::lifecycle::KeyRotate {
        tenant: "acme".into(),
        key: "pii".into(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    let v2 = c.encrypt(&path("acme/pii"), b"under version 2", &context).await.unwrap();
    assert_eq!((v1.key_version, v2.key_version), (1, 2));
    // A field the key record gained after the schema was written (its
    // type) goes through without a migration.
    c.key_create_of_type(&path("acme/hooks"), keyhaven::KeyType::HmacSha256).await.unwrap();
    let tag = c.mac(&path("acme/hooks"), b"webhook", None).await.unwrap().tag;
    c.key_create(&path("beta/x")).await.unwrap();
    let beta = c.encrypt(&path("beta/x"), b"beta", &context).await.unwrap();
    let scope = Scope::Tenant { tenant: "beta".into() };
    c.call(&Revoke { scope: scope.clone(), reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    let refused = c.decrypt(&beta.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Revoked));
    // What the database holds: the records, under the daemon's schema.
    assert_eq!(pg.psql("keyhaven", "SELECT count(*) FROM keyring"), "3");
    assert_eq!(
        pg.psql("keyhaven", "SELECT record::jsonb->>'key_type' FROM keyring WHERE name = 'hooks'"),
        "hmac-sha256"
    );
    assert_eq!(pg.psql("keyhaven", "SELECT count(*) FROM revocations"), "1");
    assert_eq!(pg.psql("keyhaven", "SELECT max(version) FROM schema_version"), "2");
    drop(c);

    // The daemon restarts: everything is read back from the database.
    d.restart();
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().store.keys, 3);
    assert!(
        c.mac_verify(&path("acme/hooks"), b"webhook", &tag).await.unwrap(),
        "the hmac key after a restart"
    );
    let wrong = c.encrypt(&path("acme/hooks"), b"m", &context).await.unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::WrongKeyType), "its type survived the restart");
    for (ct, plain) in [(&v1, &b"under version 1"[..]), (&v2, b"under version 2")] {
        assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), plain);
    }
    let dk = c.datakey_decrypt(&envelope.envelope, &context).await.unwrap();
    assert_eq!(dk.key_version, 1);
    let refused = c.decrypt(&beta.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Revoked), "the revocation survives the restart");

    // The PostgreSQL server restarts under the running daemon: the next
    // requests are served (the pool reconnects), and writes go on.
    pg.restart();
    let mut rotated = None;
    for _ in 0..3 {
        match c
            .call(&keyhaven::lifecycle::KeyRotate {
                tenant: "acme".into(),
                key: "pii".into(),
                idempotency_key: None,
            })
            .await
        {
            Ok(r) => {
                rotated = Some(r);
                break;
            }
            Err(e) => eprintln!("a rotation right after the server restarted: {e}"),
        }
    }
    assert_eq!(rotated.expect("a rotation after the server restarted").current_version, 3);
    c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
    assert_eq!(c.decrypt(&beta.ciphertext, &context).await.unwrap().plaintext.expose(), b"beta");
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
    assert!(verified.records >= 10, "{verified:?}");
    assert!(pg.psql("keyhaven", "SELECT count(*) FROM audit WHERE kind = 0").parse::<u64>().unwrap() >= 10);
    let scope = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: None };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // A database writer lifts the revocation behind the daemon's back:
    // the daemon refuses to start, naming the way out.
    pg.psql("keyhaven", "DELETE FROM revocations");
    let out = d.run_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a tampered database: {err}");
    assert!(err.contains("does not match the token's anchor") && err.contains("accept-store"), "{err}");
}

/// Production checks the connection string's file as it checks the PIN
/// file's: a file others may read is refused, with the fix; the same
/// file at 0400 is not.
#[test]
fn production_checks_the_connection_string_file_like_the_pin_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("keyhaven-pgprod-").tempdir().unwrap();
    let d = dir.path();
    for sub in ["run", "store"] {
        std::fs::create_dir(d.join(sub)).unwrap();
        std::fs::set_permissions(d.join(sub), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(d.join("pin"), "Correct-Horse-Battery-9\n").unwrap();
    std::fs::set_permissions(d.join("pin"), std::fs::Permissions::from_mode(0o400)).unwrap();
    let config = d.join("keyhaven.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"run/keyhaven.sock\"\n[store]\nbackend = \"postgres\"\npath = \"store\"\n\
             url_file = \"pg-url\"\n[hsm]\nmodule = \"{}\"\ntoken_label = \"prod\"\npin_file = \"pin\"\n\
             allow_softhsm = true\n",
            softhsm_module().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let check = |mode: u32| {
        std::fs::write(d.join("pg-url"), "host=/run/postgresql password=S3cret-4242 dbname=kh\n").unwrap();
        std::fs::set_permissions(d.join("pg-url"), std::fs::Permissions::from_mode(mode)).unwrap();
        let out = std::process::Command::new(bin("keyhavend"))
            .args(["check", "--config"])
            .arg(&config)
            .env_remove("SOFTHSM2_CONF")
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let open = check(0o644);
    assert!(open.contains("the PostgreSQL connection string file") && open.contains("chmod 0400"), "{open}");
    assert!(!open.contains("S3cret"), "{open}");
    let closed = check(0o400);
    assert!(!closed.contains("connection string file"), "{closed}");
}

/// PostgreSQL down under a running daemon: what needs the database fails
/// with `store_unavailable` (an audited operation's result is withheld,
/// since its record cannot be made durable), nothing is served unaudited,
/// and once the server is back the same daemon serves again.
#[tokio::test(flavor = "multi_thread")]
async fn with_postgres_down_the_daemon_withholds_answers_and_recovers_when_it_returns() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let d = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let context = ctx(&["user=42"]);
    let ct = c.encrypt(&path("acme/pii"), b"kept", &context).await.unwrap();
    let records = |pg: &TestPostgres| pg.psql("keyhaven", "SELECT count(*) FROM audit WHERE kind = 0");
    let before = records(&pg);
    pg.stop();
    let refused = c.decrypt(&ct.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::StoreUnavailable), "{refused}");
    let refused = c.key_create(&path("acme/other")).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::StoreUnavailable), "{refused}");
    let h = c.health().await.unwrap();
    assert!(!h.store.ok && h.status != "ok", "{h:?}");
    pg.restart();
    let mut served = None;
    for _ in 0..20 {
        match c.decrypt(&ct.ciphertext, &context).await {
            Ok(p) => {
                served = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
    assert_eq!(served.expect("served again once PostgreSQL is back").plaintext.expose(), b"kept");
    assert_eq!(c.health().await.unwrap().status, "ok");
    c.key_create(&path("acme/other")).await.unwrap();
    // The refused requests' records went in with the next flush, before the answers that followed.
    assert!(records(&pg).parse::<u64>().unwrap() > before.parse::<u64>().unwrap());
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
}

/// Encryptions through an alias by 16 clients at once on PostgreSQL: every
/// few hundred, a version's next range of wraps is reserved in the store
/// (ENVELOPE.md §7). The reservation used to wait for the database on the
/// runtime's own thread while requests through the alias held the store's
/// writers' lock on that runtime: with both runtime threads waiting, the
/// daemon stopped answering anything, `health` included (found with
/// `keyhaven bench --key ALIAS` on `softhsm/dev-cluster`).
#[tokio::test(flavor = "multi_thread")]
async fn wrap_reservations_under_load_through_an_alias_never_stop_the_daemon() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let d = TestDaemon::start_postgres(&pg.url("keyhaven"));
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.call(&keyhaven::alias::AliasCreate {
        tenant: "acme".into(),
        alias: "current".into(),
        key: "pii".into(),
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let c = d.client().await;
        clients.push(tokio::spawn(async move {
            let (key, context) = (path("acme/current"), ctx(&["load=1"]));
            let mut done = 0u32;
            while started.elapsed() < std::time::Duration::from_secs(4) {
                let call = c.encrypt(&key, b"through the alias", &context);
                match tokio::time::timeout(std::time::Duration::from_secs(10), call).await {
                    Ok(r) => assert_eq!(r.expect("encrypt through the alias").key_version, 1),
                    Err(_) => panic!("an encrypt through the alias got no answer in 10 s (after {done})"),
                }
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in clients {
        total += t.await.expect("client task");
    }
    // More than the first ranges (256, then 512, …): several reservations ran.
    assert!(total > 800, "only {total} encryptions in 4 s");
    let health = tokio::time::timeout(std::time::Duration::from_secs(5), c.health()).await;
    assert!(health.expect("health answers").expect("health").store.ok);
}
