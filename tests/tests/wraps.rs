//! The wrap budget of a KEK version (docs/ENVELOPE.md §7), with the limit
//! lowered in the config so that it can be reached: wraps are counted across
//! restarts, the wrap past the limit is refused with `key_exhausted` for
//! `datakey` and `encrypt` alike, and decryption and other keys go on.

use keyhaven_tests::*;

/// Sets `[limits] wraps_per_key_version` in a dev folder's config.
fn set_wrap_limit(dir: &std::path::Path, limit: u64) {
    let file = dir.join("keyhaven.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text.lines().find(|l| l.starts_with("wraps_per_key_version")).expect("the limit line");
    let text = text.replace(line, &format!("wraps_per_key_version = {limit}"));
    std::fs::write(&file, text).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_version_wraps_no_more_than_its_limit_across_restarts() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| set_wrap_limit(dir, 5));
    let c = d.client().await;
    let (pii, smtp) = (path("acme/pii"), path("acme/smtp"));
    c.key_create(&pii).await.unwrap();
    c.key_create(&smtp).await.unwrap();
    let context = ctx(&["app=billing"]);

    let first = c.datakey(&pii, &context, true).await.unwrap();
    let sealed = c.encrypt(&pii, b"sk-live-1", &context).await.unwrap();
    c.datakey(&pii, &context, false).await.unwrap();
    drop(c);

    // Three wraps are counted in the store, so two remain after a restart.
    d.restart();
    let c = d.client().await;
    c.datakey(&pii, &context, false).await.unwrap();
    c.encrypt(&pii, b"x", &context).await.unwrap();
    for refused in [
        c.datakey(&pii, &context, true).await.map(|_| ()).unwrap_err(),
        c.encrypt(&pii, b"y", &context).await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(refused.code(), Some(ErrorCode::KeyExhausted), "{refused}");
        let msg = refused.to_string();
        assert!(msg.contains("acme/pii") && msg.contains("version 1"), "{msg}");
    }

    // Decryption uses no nonce and goes on; so does another key.
    let opened = c.datakey_decrypt(&first.envelope, &context).await.unwrap();
    assert_eq!(opened.plaintext.expose(), first.plaintext.as_ref().unwrap().expose());
    assert_eq!(c.decrypt(&sealed.ciphertext, &context).await.unwrap().plaintext.expose(), b"sk-live-1");
    c.encrypt(&smtp, b"z", &context).await.unwrap();

    // The CLI says so in one line and exits non-zero.
    let out = d.cli(&["datakey", "acme/pii"], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key_exhausted") || err.contains("limit"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrap_limit_out_of_range_is_refused_at_start_up() {
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    set_wrap_limit(d.dir(), 1 << 32);
    let out = d.run_once();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wraps_per_key_version"), "{err}");
}
