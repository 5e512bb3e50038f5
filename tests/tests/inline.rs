//! `[hsm] inline` (OPERATIONS.md §2, PERFORMANCE.md "Token calls on the I/O
//! threads"): AES-GCM and HMAC calls of requests made on the I/O threads,
//! each with its own session. Against a real SoftHSM2 token and the real
//! daemon: every request is answered under concurrent load, and a
//! revocation unloads the key from the I/O threads' sessions as from the
//! workers'.

use keyhaven::revocation::{Reason, Scope};
use keyhaven::{Client, ErrorCode, KeyOptions, KeyType, Plaintext};
use keyhaven_tests::{ctx, path, sample, token_dir, TestDaemon};

/// A daemon with `[hsm] inline = true`.
fn inline_daemon() -> TestDaemon {
    inline_daemon_with(&[])
}

/// A daemon with `[hsm] inline = true` and the config's lines `edits`
/// (`from`, `to`) replaced.
fn inline_daemon_with(edits: &[(&str, &str)]) -> TestDaemon {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let mut config = std::fs::read_to_string(&file).unwrap();
        assert!(config.contains("\n[hsm]\n"), "{config}");
        config = config.replace("\n[hsm]\n", "\n[hsm]\ninline = true\n");
        for (from, to) in edits {
            assert!(config.contains(from), "{from} in:\n{config}");
            config = config.replace(from, to);
        }
        std::fs::write(&file, config).unwrap();
    });
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_sessions_answer_every_request_and_a_revocation_unloads_their_keys() {
    let mut d = inline_daemon();
    let c = d.client().await;
    let (aes, hmac) = (path("acme/pii"), path("acme/index"));
    c.key_create(&aes).await.unwrap();
    c.key_create_with(&hmac, &KeyOptions::new().key_type(KeyType::HmacSha256)).await.unwrap();
    let context = ctx(&["table=users"]);

    // 16 clients at once, each its own connection: encrypt, decrypt,
    // data keys, MACs; every answer right.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let socket = d.socket().to_owned();
        let (aes, hmac, context) = (aes.clone(), hmac.clone(), context.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(&socket).await.unwrap();
            for j in 0..40 {
                let secret = format!("row {i}/{j}");
                let sealed = c.encrypt(&aes, secret.as_bytes(), &context).await.unwrap();
                let opened = c.decrypt(&sealed.ciphertext, &context).await.unwrap();
                assert_eq!(opened.plaintext.expose(), secret.as_bytes());
                let dk = c.datakey(&aes, &context, Plaintext::Include).await.unwrap();
                let again = c.datakey_decrypt(&dk.to_envelope().unwrap(), &context).await.unwrap();
                assert_eq!(again.plaintext, dk.plaintext.expect("asked for it"));
                let tag = c.mac(&hmac, secret.as_bytes(), None).await.unwrap().to_tag().unwrap();
                assert!(c.mac_verify(&hmac, secret.as_bytes(), &tag).await.unwrap());
                assert!(!c.mac_verify(&hmac, b"another row", &tag).await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }
    let m = c.metrics().await.unwrap();
    let loaded = sample(&m, "keyhaven_keks_loaded");
    // The AES key and the HMAC key, in the I/O threads' sessions (and the
    // worker's, for a call that found its thread's session busy).
    assert!(loaded >= 2.0, "keys loaded in the inline sessions: {loaded}\n{m}");

    // Revoked: refused, and no session keeps it unwrapped.
    let kept = c.encrypt(&aes, b"before", &context).await.unwrap();
    c.revoke(&Scope::key(&aes), Reason::KeyCompromise, None).await.unwrap();
    let e = c.decrypt(&kept.ciphertext, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    c.revoke(&Scope::key(&hmac), Reason::KeyCompromise, None).await.unwrap();
    let m = c.metrics().await.unwrap();
    assert_eq!(sample(&m, "keyhaven_keks_loaded"), 0.0, "every session unloaded both keys:\n{m}");

    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("[hsm] inline: AES-GCM and HMAC calls of requests run on the I/O threads"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn inline_takes_only_true_or_false() {
    let mut d = TestDaemon::start();
    let (status, _) = d.stop();
    assert!(status.success());
    let file = d.dir().join("keyhaven.toml");
    let config = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, config.replace("\n[hsm]\n", "\n[hsm]\ninline = \"yes\"\n")).unwrap();
    let out = d.run_once();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inline"), "the refusal names the key: {err}");
}

async fn token_condition(c: &Client) -> String {
    c.health().await.unwrap().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_inline_a_token_gone_is_a_typed_refusal_and_its_return_is_found_without_a_restart() {
    // OPERATIONS.md §6: requests are refused `hsm_unavailable` (never a
    // hang or a crash) while the token is away, and served again once it
    // is back, the module re-initialised with the I/O threads' sessions
    // held out of it. The audit log is off: its seals are the worker's own
    // jobs, which would find the token again by themselves; here only the
    // I/O threads' requests (and one `health` while it is away) reach it.
    let mut d = inline_daemon_with(&[("\n[audit]\nenabled = true\n", "\n[audit]\nenabled = false\n")]);
    let c = d.client().await;
    let key = path("acme/pii");
    c.key_create(&key).await.unwrap();
    let context = ctx(&["table=users"]);
    let kept = c.encrypt(&key, b"before", &context).await.unwrap();
    // A key no session has loaded yet: using it needs the token.
    let unused = path("acme/unused");
    c.key_create(&unused).await.unwrap();
    let index = path("acme/index");
    c.key_create_with(&index, &KeyOptions::new().key_type(KeyType::HmacSha256)).await.unwrap();

    let tokdir = token_dir(d.dir());
    let away = d.dir().join("token-away");
    std::fs::rename(&tokdir, &away).unwrap();
    for _ in 0..4 {
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(10), c.decrypt(&kept.ciphertext, &context))
                .await
                .expect("answered while the token is away");
        let Err(e) = r else { continue };
        // A session whose key is loaded may still answer; one that must
        // unwrap it is told the token is gone (SoftHSM2 keeps sessions of a
        // token whose files went away, without its objects), not that the
        // master key was deleted.
        assert_eq!(e.code(), Some(ErrorCode::HsmUnavailable), "{e}");
        assert!(!e.to_string().contains("backup"), "not the advice for a deleted key: {e}");
    }
    // Its first encryption reserves wraps (a store write, anchored in the
    // token) and unwraps the key: either refusal names the token's side.
    let e = c.encrypt(&unused, b"x", &context).await.expect_err("a key to unwrap, and no token");
    assert!(matches!(e.code(), Some(ErrorCode::HsmUnavailable | ErrorCode::StoreUnavailable)), "{e}");
    // A MAC under a key no session has loaded: its unwrap needs the master
    // key, and the refusal says the token is gone, not that the key was
    // deleted (whose advice is a restore from backup).
    let e = c.mac(&index, b"x", None).await.expect_err("a key to unwrap, and no token");
    assert_eq!(e.code(), Some(ErrorCode::HsmUnavailable), "{e}");
    assert!(e.to_string().contains("keyhaven-dev") && !e.to_string().contains("backup"), "{e}");
    let h = c.health().await.unwrap();
    assert_eq!(h.status, "degraded", "{h:?}");

    std::fs::rename(&away, &tokdir).unwrap();
    // Back, without a restart and without a `health` call: an I/O thread's
    // session that finds the token gone has a worker probe it, which
    // re-initialises the module (at most every 2 s); the I/O threads'
    // sessions of the old module are dropped unclosed and reopened.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match c.mac(&index, b"x", None).await {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Some(ErrorCode::HsmUnavailable), "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the token is back, but requests still fail: {e}"),
        }
    }
    for _ in 0..20 {
        let opened = c.decrypt(&kept.ciphertext, &context).await.expect("served again without a restart");
        assert_eq!(opened.plaintext.expose(), b"before");
        c.encrypt(&unused, b"after", &context).await.expect("a key not loaded before");
    }
    assert_eq!(token_condition(&c).await, "ok");
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("re-initialised"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
