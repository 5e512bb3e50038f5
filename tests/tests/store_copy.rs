//! `keyhavend store copy`: a keyring moved from sled to PostgreSQL and
//! back, with the real token, the real daemon and a throwaway PostgreSQL.
//! Every ciphertext made before still decrypts after each move, revocations
//! stay in force, the audit log still verifies; a copy is refused into a
//! store that holds a keyring, from a store the token's anchor does not
//! vouch for, and between different tokens; and once the copy is written to,
//! the store it came from is an older copy that the daemon refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyhaven::revocation::{Reason, Revoke, Scope};
use keyhaven::wire::AuditVerify;
use keyhaven_tests::*;

/// The dev config `dir/keyhaven.toml` with its store (a `store = PATH`
/// line for sled, or a `[store]` section) replaced by a `[store]` section of
/// `store` (TOML lines), written to `dir/NAME`.
fn config_with_store(dir: &Path, name: &str, store: &str) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("keyhaven.toml")).unwrap();
    let mut out = String::new();
    let mut in_store = false;
    let mut top_level = true;
    for line in text.lines() {
        if line.starts_with('[') {
            top_level = false;
            in_store = line.trim() == "[store]";
        }
        let sled_line = top_level && line.starts_with("store = ");
        if !in_store && !sled_line {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("\n[store]\n");
    out.push_str(store);
    out.push('\n');
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn postgres_config(dir: &Path, name: &str, url: &str) -> PathBuf {
    let url_file = dir.join(format!("{name}.url"));
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    std::fs::set_permissions(&url_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let local = dir.join(format!("{name}.local"));
    std::fs::create_dir_all(&local).unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    config_with_store(
        dir,
        name,
        &format!("backend = \"postgres\"\npath = {:?}\nurl_file = {:?}", local.display(), url_file.display()),
    )
}

fn sled_config(dir: &Path, name: &str, store: &Path) -> PathBuf {
    config_with_store(dir, name, &format!("backend = \"sled\"\npath = {:?}", store.display()))
}

fn store_copy(from: &Path, to: &Path) -> Output {
    Command::new(bin("keyhavend"))
        .args(["store", "copy", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .env_remove("SOFTHSM2_CONF")
        .output()
        .expect("run keyhavend store copy")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn use_config(dir: &Path, config: &Path) {
    std::fs::copy(config, dir.join("keyhaven.toml")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_moves_from_sled_to_postgres_and_back_and_everything_still_decrypts() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("copy");
    let mut d = TestDaemon::start();
    let dir = d.dir().to_owned();
    let c = d.client().await;
    let context = ctx(&["user=42"]);
    c.key_create(&path("acme/pii")).await.unwrap();
    let v1 = c.encrypt(&path("acme/pii"), b"under version 1", &context).await.unwrap();
    c.call(&keyhaven::lifecycle::KeyRotate {
        tenant: "acme".into(),
        key: "pii".into(),
        idempotency_key: None,
    })
    .await
    .unwrap();
    let v2 = c.encrypt(&path("acme/pii"), b"under version 2", &context).await.unwrap();
    let envelope = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
    c.key_create_of_type(&path("acme/hooks"), keyhaven::KeyType::HmacSha256).await.unwrap();
    let tag = c.mac(&path("acme/hooks"), b"webhook", None).await.unwrap().tag;
    c.key_create(&path("beta/x")).await.unwrap();
    let beta = c.encrypt(&path("beta/x"), b"beta", &context).await.unwrap();
    let scope = Scope::Tenant { tenant: "beta".into() };
    c.call(&Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // sled → PostgreSQL.
    let sled_first = sled_config(&dir, "sled-first.toml", &dir.join("store"));
    let on_pg = postgres_config(&dir, "pg.toml", &pg.url("copy"));
    let out = store_copy(&sled_first, &on_pg);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("copied 3 keys, 1 revocations"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store copy: keys: 3/3"),
        "progress: {}",
        text(&out)
    );
    assert_eq!(pg.psql("copy", "SELECT count(*) FROM keyring"), "3");
    assert_eq!(pg.psql("copy", "SELECT count(*) FROM revocations"), "1");

    // A second copy into the same database is refused, and changes nothing.
    let again = store_copy(&sled_first, &on_pg);
    assert!(!again.status.success());
    assert!(text(&again).contains("holds a keyring already"), "{}", text(&again));
    assert_eq!(pg.psql("copy", "SELECT count(*) FROM keyring"), "3");

    // The daemon on the copy: everything decrypts, the revocation holds,
    // the audit log (copied with the keyring) verifies.
    use_config(&dir, &on_pg);
    d.start_again();
    let c = d.client().await;
    for (ct, plain) in [(&v1, &b"under version 1"[..]), (&v2, b"under version 2")] {
        assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), plain);
    }
    let key = c.datakey_decrypt(&envelope.envelope, &context).await.unwrap();
    assert_eq!(
        key.plaintext.expose(),
        envelope.plaintext.as_ref().expect("asked for the plaintext").expose(),
        "the data key after the copy"
    );
    assert!(c.mac_verify(&path("acme/hooks"), b"webhook", &tag).await.unwrap());
    let refused = c.decrypt(&beta.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Revoked), "the revocation came along");
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
    // Written on PostgreSQL: this makes the sled store an older copy.
    let on_postgres = c.encrypt(&path("acme/pii"), b"written on postgres", &context).await.unwrap();
    c.key_create(&path("acme/later")).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // PostgreSQL → a new sled store.
    let sled_second = sled_config(&dir, "sled-second.toml", &dir.join("store-2"));
    let out = store_copy(&on_pg, &sled_second);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("copied 4 keys, 1 revocations"), "{}", text(&out));
    use_config(&dir, &sled_second);
    d.start_again();
    let c = d.client().await;
    for (ct, plain) in
        [(&v1, &b"under version 1"[..]), (&v2, b"under version 2"), (&on_postgres, b"written on postgres")]
    {
        assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), plain);
    }
    let refused = c.decrypt(&beta.ciphertext, &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Revoked));
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
    let keys = c.key_list(Some("acme")).await.unwrap();
    assert!(keys.iter().any(|k| k.key == "later"), "the key made on PostgreSQL: {keys:?}");
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // The first sled store is now an older copy: the token refuses it.
    use_config(&dir, &sled_first);
    let out = d.run_once();
    assert!(!out.status.success(), "a daemon started on the superseded store: {}", text(&out));
    assert!(text(&out).contains("anchor"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_is_refused_from_an_altered_store_to_itself_and_across_tokens() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("source");
    let mut d = TestDaemon::start_postgres(&pg.url("source"));
    let dir = d.dir().to_owned();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("acme/other")).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let source = dir.join("keyhaven.toml");

    // Onto itself.
    let out = store_copy(&source, &source);
    assert!(!out.status.success());
    assert!(text(&out).contains("name the same store"), "{}", text(&out));

    // Into another token's store.
    let target = sled_config(&dir, "sled.toml", &dir.join("copy"));
    let other_token = dir.join("other-token.toml");
    let changed = std::fs::read_to_string(&target)
        .unwrap()
        .replace("token_label = \"keyhaven-dev\"", "token_label = \"another\"");
    assert!(changed.contains("token_label = \"another\""), "{changed}");
    std::fs::write(&other_token, changed).unwrap();
    let out = store_copy(&source, &other_token);
    assert!(!out.status.success());
    assert!(text(&out).contains("different tokens"), "{}", text(&out));

    // A database writer swaps two keys' records: the copy is refused before
    // anything is written.
    pg.psql(
        "source",
        "UPDATE keyring SET record = (SELECT record FROM keyring WHERE name = 'other') WHERE name = 'pii'",
    );
    let out = store_copy(&source, &target);
    assert!(!out.status.success(), "an altered store was copied: {}", text(&out));
    assert!(text(&out).contains("does not match the token's anchor"), "{}", text(&out));
    assert!(text(&out).contains("nothing was copied"), "{}", text(&out));
    let written = std::fs::read_dir(dir.join("copy")).map(|d| d.count()).unwrap_or(0);
    let out = store_copy(&source, &target);
    assert!(!out.status.success());
    assert!(
        !text(&out).contains("holds a keyring already"),
        "the refused copy wrote the destination ({written} files)"
    );
}

/// A sled store that a running daemon holds cannot be copied (nor opened
/// by a second daemon), and the message says so in words.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_held_by_a_running_daemon_is_refused_by_name() {
    let d = TestDaemon::start();
    let dir = d.dir().to_owned();
    let target = sled_config(&dir, "copy.toml", &dir.join("copy"));
    let out = store_copy(&dir.join("keyhaven.toml"), &target);
    assert!(!out.status.success());
    let expected = format!("another keyhavend holds the store at {}", dir.join("store").display());
    assert!(text(&out).contains(&expected), "{}", text(&out));
    assert!(!text(&out).contains("Os {"), "Rust Debug in a message: {}", text(&out));
    let out = d.run_once();
    assert!(!out.status.success());
    assert!(text(&out).contains(&expected), "{}", text(&out));
}

/// A cluster's store holds one audit chain per node: a copy to PostgreSQL
/// takes every chain; a copy to sled makes the chain of `--from`'s node the
/// log and writes the others alongside as signed exports that `keyhaven
/// audit verify --file` checks; a database whose nodes hold live leases is
/// refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_is_copied_with_every_nodes_audit_chain_to_postgres_and_to_sled() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("cluster");
    pg.create_db("copy");
    let mut first = TestDaemon::start_postgres(&pg.url("cluster"));
    let mut second = TestDaemon::join(&first);
    let mut third = TestDaemon::join(&first);
    let context = ctx(&["row=1"]);
    let mut sealed = Vec::new();
    let mut names = Vec::new();
    for (i, node) in [&first, &second, &third].into_iter().enumerate() {
        let c = node.client().await;
        names.push(c.health().await.unwrap().store.cluster.expect("a cluster").node);
        let key = path(&format!("acme/k{i}"));
        c.key_create(&key).await.unwrap();
        for j in 0..3 {
            let plain = format!("made on node {i}, {j}");
            sealed.push((c.encrypt(&key, plain.as_bytes(), &context).await.unwrap(), plain));
        }
    }
    let dir = first.dir().to_owned();
    let source = dir.join("source.toml");
    std::fs::copy(dir.join("keyhaven.toml"), &source).unwrap();
    let on_pg = postgres_config(&dir, "copy.toml", &pg.url("copy"));

    // Running nodes: refused, naming them.
    let out = store_copy(&source, &on_pg);
    assert!(!out.status.success(), "copied a database with live nodes: {}", text(&out));
    for name in &names {
        assert!(text(&out).contains(&format!("`{name}`")), "{name}: {}", text(&out));
    }
    assert!(text(&out).contains("--allow-live-nodes"), "{}", text(&out));
    assert_eq!(pg.psql("copy", "SELECT count(*) FROM keyring"), "0");
    for node in [&mut first, &mut second, &mut third] {
        let (status, log) = node.stop();
        assert!(status.success(), "{log}");
    }
    let chains_sql = "SELECT node, kind, count(*) FROM audit GROUP BY node, kind ORDER BY node, kind";
    let per_chain = pg.psql("cluster", chains_sql);
    assert_eq!(pg.psql("cluster", "SELECT count(DISTINCT node) FROM audit"), "3", "{per_chain}");

    // PostgreSQL → PostgreSQL: every chain, entry for entry.
    let out = store_copy(&source, &on_pg);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(3 audit chain(s))"), "{}", text(&out));
    assert!(text(&out).contains("verified: 3 audit chain(s)"), "{}", text(&out));
    let entries = "SELECT node, kind, seq, md5(entry) FROM audit ORDER BY node, kind, seq";
    assert_eq!(pg.psql("copy", entries), pg.psql("cluster", entries));
    assert_eq!(pg.psql("copy", chains_sql), per_chain);

    // A node on the copy: every key decrypts, every chain verifies.
    use_config(&dir, &on_pg);
    first.start_again();
    let c = first.client().await;
    for (ct, plain) in &sealed {
        assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), plain.as_bytes());
    }
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
    let mut chains: Vec<String> = verified.chains.iter().map(|ch| ch.node.clone()).collect();
    chains.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(chains, expected, "{verified:?}");
    assert!(verified.chains.iter().all(|ch| ch.status == "intact" && ch.records > 0), "{verified:?}");
    let pem = first.cli(&["audit", "public-key"], b"");
    assert!(pem.status.success());
    let pem_file = dir.join("audit.pem");
    std::fs::write(&pem_file, &pem.stdout).unwrap();
    drop(c);
    let (status, log) = first.stop();
    assert!(status.success(), "{log}");

    // PostgreSQL → sled: node 1's chain is the log, the others go
    // alongside as signed exports, each the whole chain.
    let sled_store = dir.join("sled-copy");
    let on_sled = sled_config(&dir, "sled.toml", &sled_store);
    let out = store_copy(&on_pg, &on_sled);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signed exports"), "{}", text(&out));
    let exports = sled_store.join("audit-chains");
    assert!(!exports.join(format!("node-{}.jsonl", names[0])).exists(), "node 1's chain is the log");
    for name in &names[1..] {
        let file = exports.join(format!("node-{name}.jsonl"));
        let body = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let records = body.lines().filter(|l| !l.starts_with("{\"seal\":")).count();
        let stored =
            pg.psql("copy", &format!("SELECT count(*) FROM audit WHERE node = '{name}' AND kind = 0"));
        assert_eq!(records.to_string(), stored, "{name}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        let check = first.cli(
            &[
                "audit",
                "verify",
                "--file",
                file.to_str().unwrap(),
                "--public-key",
                pem_file.to_str().unwrap(),
            ],
            b"",
        );
        assert!(check.status.success(), "{name}: {}", text(&check));
        assert!(String::from_utf8_lossy(&check.stdout).contains("audit log intact"), "{}", text(&check));
    }
    use_config(&dir, &on_sled);
    first.start_again();
    let c = first.client().await;
    for (ct, plain) in &sealed {
        assert_eq!(c.decrypt(&ct.ciphertext, &context).await.unwrap().plaintext.expose(), plain.as_bytes());
    }
    let verified = c.call(&AuditVerify {}).await.unwrap();
    assert!(verified.intact, "{verified:?}");
    let node1 =
        pg.psql("copy", &format!("SELECT count(*) FROM audit WHERE node = '{}' AND kind = 0", names[0]));
    assert!(verified.records >= node1.parse::<u64>().unwrap(), "{verified:?} < {node1}");
    drop(c);
    let (status, log) = first.stop();
    assert!(status.success(), "{log}");
}
