//! Round trips of every operation against the real daemon and token, through
//! the client library and through the CLI.

use keyhaven_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_round_trips() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let h = c.health().await.unwrap();
    assert_eq!(h.status, "ok");
    assert!(h.token.ok);
    assert_eq!(h.token.label, "keyhaven-dev");
    assert_eq!(h.store.keys, 0);

    let info = c.key_create(&path("acme/pii")).await.unwrap();
    assert_eq!((info.current_version, info.versions.clone()), (1, vec![1]));
    c.key_create(&path("acme/smtp")).await.unwrap();
    c.key_create(&path("beta/pii")).await.unwrap();
    let all = c.key_list(None).await.unwrap();
    let names: Vec<String> = all.iter().map(|k| format!("{}/{}", k.tenant, k.key)).collect();
    assert_eq!(names, ["acme/pii", "acme/smtp", "beta/pii"]);
    assert_eq!(c.key_list(Some("acme")).await.unwrap().len(), 2);
    assert!(c.key_list(Some("nobody")).await.unwrap().is_empty());
    let again = c.key_create(&path("acme/pii")).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::AlreadyExists));

    let context = ctx(&["user=42", "table=providers"]);
    for plaintext in [&b""[..], b"sk-live-123", &vec![0xA5u8; 65536]] {
        let enc = c.encrypt(&path("acme/pii"), plaintext, &context).await.unwrap();
        assert!(enc.ciphertext.starts_with("khc1:"));
        assert_eq!(enc.key_version, 1);
        let dec = c.decrypt(&enc.ciphertext, &context).await.unwrap();
        assert_eq!(dec.plaintext.expose(), plaintext);
        assert_eq!((dec.tenant.as_str(), dec.key.as_str()), ("acme", "pii"));
        assert_eq!(dec.envelope_id, enc.envelope_id);
    }
    let too_big = c.encrypt(&path("acme/pii"), &vec![0u8; 65537], &context).await.unwrap_err();
    assert_eq!(too_big.code(), Some(ErrorCode::PayloadTooLarge));
    assert!(too_big.to_string().contains("datakey"), "{too_big}");

    let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
    let key = dk.plaintext.clone().expect("plaintext asked for");
    assert_eq!(key.len(), 32);
    let back = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    assert_eq!(back.plaintext, key);
    assert_eq!(back.envelope_id, dk.envelope_id);
    let only_env = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap();
    assert!(only_env.plaintext.is_none());
    let other = c.datakey_decrypt(&only_env.envelope, &context).await.unwrap();
    assert_ne!(other.plaintext, key, "two data keys must differ");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_or_missing_context_is_refused() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let right = ctx(&["user=42"]);
    let enc = c.encrypt(&path("acme/pii"), b"secret", &right).await.unwrap();
    let dk = c.datakey(&path("acme/pii"), &right, keyhaven::Plaintext::Omit).await.unwrap();
    for wrong in [ctx(&[]), ctx(&["user=43"]), ctx(&["user=42", "x=y"]), ctx(&["User=42"])] {
        let e = c.decrypt(&enc.ciphertext, &wrong).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
        let e = c.datakey_decrypt(&dk.envelope, &wrong).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
    }
    // And with no context at encrypt time, any context is wrong at decrypt time.
    let plain = c.encrypt(&path("acme/pii"), b"secret", &ctx(&[])).await.unwrap();
    let e = c.decrypt(&plain.ciphertext, &right).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity));
    assert_eq!(c.decrypt(&plain.ciphertext, &ctx(&[])).await.unwrap().plaintext.expose(), b"secret");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_envelope_of_one_tenant_is_useless_under_another() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("beta/pii")).await.unwrap();
    let none = ctx(&[]);
    let dk = c.datakey(&path("acme/pii"), &none, keyhaven::Plaintext::Include).await.unwrap();
    let enc = c.encrypt(&path("acme/pii"), b"acme secret", &none).await.unwrap();

    // Rewrite the tenant inside the envelope ("acme" -> "beta", same length):
    // the header then names beta's key, which must not unwrap acme's data key.
    let env: keyhaven::Envelope = dk.envelope.parse().unwrap();
    let mut bytes = env.to_bytes();
    let at = bytes.windows(4).position(|w| w == b"acme").unwrap();
    bytes[at..at + 4].copy_from_slice(b"beta");
    let moved = keyhaven::Envelope::from_bytes(&bytes).unwrap();
    assert_eq!(moved.path().tenant(), "beta");
    let e = c.datakey_decrypt(&moved.to_string(), &none).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");

    let ct: keyhaven::Ciphertext = enc.ciphertext.parse().unwrap();
    let mut bytes = ct.to_bytes();
    let at = bytes.windows(4).position(|w| w == b"acme").unwrap();
    bytes[at..at + 4].copy_from_slice(b"beta");
    let moved = keyhaven::Ciphertext::from_bytes(&bytes).unwrap();
    let e = c.decrypt(&moved.to_string(), &none).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_ciphertexts_survive_a_restart() {
    let mut d = TestDaemon::start();
    let context = ctx(&["row=7"]);
    let (enc, dk) = {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        let enc = c.encrypt(&path("acme/pii"), b"persist me", &context).await.unwrap();
        let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
        (enc, dk)
    };
    d.restart();
    let c = d.client().await;
    assert_eq!(c.key_list(None).await.unwrap().len(), 1);
    assert_eq!(c.decrypt(&enc.ciphertext, &context).await.unwrap().plaintext.expose(), b"persist me");
    let back = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    assert_eq!(Some(back.plaintext), dk.plaintext);
    drop(c);
    let (status, _) = d.stop();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_on_one_connection_all_get_their_answer() {
    let d = TestDaemon::start();
    let c = std::sync::Arc::new(d.client().await);
    c.key_create(&path("acme/pii")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let msg = format!("message {i}");
            let context = ctx(&[&format!("i={i}")]);
            let enc = c.encrypt(&path("acme/pii"), msg.as_bytes(), &context).await.unwrap();
            let dec = c.decrypt(&enc.ciphertext, &context).await.unwrap();
            assert_eq!(dec.plaintext.expose(), msg.as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn the_cli_does_it_all() {
    let d = TestDaemon::start();
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let health: serde_json::Value = serde_json::from_slice(&ok(d.cli(&["health"], b""))).unwrap();
    assert_eq!(health["status"], "ok");
    ok(d.cli(&["key", "create", "acme/pii"], b""));
    let list: serde_json::Value = serde_json::from_slice(&ok(d.cli(&["key", "list", "acme"], b""))).unwrap();
    assert_eq!(list["keys"][0]["key"], "pii");

    let ct = ok(d.cli(&["encrypt", "acme/pii", "--context", "user=42"], b"sk-live-xyz"));
    let ct = String::from_utf8(ct).unwrap();
    assert!(ct.starts_with("khc1:") && ct.ends_with('\n'));
    let plain = ok(d.cli(&["decrypt", "--context", "user=42"], ct.as_bytes()));
    assert_eq!(plain, b"sk-live-xyz");
    let json: serde_json::Value =
        serde_json::from_slice(&ok(d.cli(&["encrypt", "acme/pii", "--json"], b"x"))).unwrap();
    assert_eq!(json["envelope_id"].as_str().unwrap().len(), 32);

    let dk: serde_json::Value =
        serde_json::from_slice(&ok(d.cli(&["datakey", "acme/pii", "--context", "a=b"], b""))).unwrap();
    let env = dk["envelope"].as_str().unwrap();
    let back: serde_json::Value =
        serde_json::from_slice(&ok(d.cli(&["datakey", "decrypt", "--context", "a=b"], env.as_bytes())))
            .unwrap();
    assert_eq!(back["plaintext"], dk["plaintext"]);
    let none: serde_json::Value =
        serde_json::from_slice(&ok(d.cli(&["datakey", "acme/pii", "--no-plaintext"], b""))).unwrap();
    assert!(none.get("plaintext").is_none());

    // Errors: non-zero exit, one line naming the problem.
    let fail = |out: std::process::Output, needle: &str| {
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    };
    fail(d.cli(&["encrypt", "acme/nope"], b"x"), "unknown key `acme/nope`");
    fail(d.cli(&["decrypt", "--context", "user=43"], ct.as_bytes()), "integrity");
    fail(d.cli(&["decrypt"], b"garbage"), "malformed ciphertext");
    fail(d.cli(&["encrypt", "acme/pii"], &vec![0u8; 65537]), "64 KiB");
    fail(d.cli(&["encrypt", "acme/pii", "--context", "novalue"], b"x"), "key=value");
    fail(d.cli(&["key", "create", "Acme/pii"], b""), "tenant name `Acme`");
    fail(run_cli(&d.dir().join("nowhere.sock"), &["health"], b""), "daemon not reachable at");
}

/// A connection over `[limits] max_connections` is told `busy`, clearly,
/// instead of waiting unanswered; once one closes, the next gets in.
#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_are_refused_with_busy() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("max_connections = 4096", "max_connections = 2");
        assert!(text.contains("max_connections = 2"), "{text}");
        std::fs::write(&file, text).unwrap();
    });
    let a = d.client().await;
    let b = d.client().await;
    let out = d.cli(&["health"], b"");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && text.contains("maximum of 2 connections"), "{text}");
    assert!(text.contains("busy"), "{text}");
    drop(a);
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if d.cli(&["health"], b"").status.success() {
            ok = true;
            break;
        }
    }
    assert!(ok, "a slot frees when a connection closes");
    b.health().await.unwrap();
}
