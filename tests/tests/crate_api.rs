//! The Rust crate as an application uses it, against the real daemon: a
//! reconnecting client across daemon restarts (what is retried, what is
//! not, resubscription), the blocking client, typed answers and Debug
//! output without secrets.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyhaven::client::Event;
use keyhaven::{blocking, Client, Error, KeyOptions, KeyType, Plaintext};
use keyhaven_tests::*;

/// A reconnecting client whose connect timeout covers a daemon start on a
/// loaded machine.
async fn reconnecting(d: &TestDaemon, hook: Option<keyhaven::client::EventHook>) -> Client {
    let mut b = Client::builder().reconnect(true).connect_timeout(Some(Duration::from_secs(60)));
    if let Some(hook) = hook {
        b = b.events(hook);
    }
    b.connect(d.socket()).await.expect("connect")
}

/// After a clean restart, a reconnecting client carries on (one new
/// connection, calls succeed); a plain client says the connection closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_client_carries_on_after_a_restart() {
    let mut d = TestDaemon::start();
    let c = reconnecting(&d, None).await;
    let plain = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let context = ctx(&["table=users"]);
    let enc = c.encrypt(&path("acme/pii"), b"card 4111", &context).await.unwrap();

    tokio::task::block_in_place(|| d.restart());
    assert!(matches!(plain.health().await, Err(Error::Closed)));
    assert_eq!(c.connections(), 1);
    // Not idempotent, and never sent on the dead connection: sent on a new one.
    let again = c.encrypt(&path("acme/pii"), b"card 4111", &context).await.unwrap();
    assert_eq!(c.connections(), 2);
    for text in [&enc.ciphertext, &again.ciphertext] {
        assert_eq!(c.decrypt(text, &context).await.unwrap().plaintext.expose(), b"card 4111");
    }
    assert!(!c.is_closed());
    let shown = format!("{c:?}");
    assert!(shown.contains("connections: 2") && shown.contains("reconnect: true"), "{shown}");
}

/// Requests in flight when the daemon dies: read-only ones and a
/// `key_rotate` with an idempotency key are sent again on the new
/// connection; `encrypt` and an unkeyed `key_rotate` fail with `Closed`
/// (they might have run). The keyed rotation makes exactly one version.
#[tokio::test(flavor = "multi_thread")]
async fn in_flight_requests_are_retried_only_when_idempotent() {
    let mut d = TestDaemon::start();
    let c = Arc::new(reconnecting(&d, None).await);
    let key = path("acme/pii");
    c.key_create(&key).await.unwrap();
    let context = ctx(&["table=users"]);
    let enc = c.encrypt(&key, b"secret", &context).await.unwrap();

    // A stopped daemon reads nothing: every request below is written and
    // waits in the socket, in flight, until the daemon is killed.
    signal(d.pid(), "STOP");
    let show = tokio::spawn({
        let c = c.clone();
        async move { c.key_show(&path("acme/pii")).await.map(|k| k.current_version) }
    });
    let decrypt = tokio::spawn({
        let (c, ct) = (c.clone(), enc.ciphertext.clone());
        async move { c.decrypt(&ct, &ctx(&["table=users"])).await.map(|p| p.plaintext) }
    });
    let keyed = tokio::spawn({
        let c = c.clone();
        async move { c.key_rotate(&path("acme/pii"), Some("rot-1")).await.map(|k| k.current_version) }
    });
    let unkeyed = tokio::spawn({
        let c = c.clone();
        async move { c.key_rotate(&path("acme/pii"), None).await.map(|k| k.current_version) }
    });
    let encrypt = tokio::spawn({
        let c = c.clone();
        async move { c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await.map(|e| e.ciphertext) }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !format!("{c:?}").contains("in_flight: 5") {
        assert!(Instant::now() < deadline, "requests not in flight: {c:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(|| {
        d.kill();
        d.start_again();
    });
    let (show, decrypt, keyed) = (show.await.unwrap(), decrypt.await.unwrap(), keyed.await.unwrap());
    if show.is_err() || decrypt.is_err() || keyed.is_err() {
        let (_, log) = d.stop();
        panic!("{show:?} {decrypt:?} {keyed:?} {c:?}\n{log}");
    }
    let shown_version = show.expect("key_show is retried");
    assert!([1, 2].contains(&shown_version), "{shown_version}");
    assert_eq!(decrypt.expect("decrypt is retried").expose(), b"secret");
    assert_eq!(keyed.expect("a keyed key_rotate is retried"), 2);
    let e = unkeyed.await.unwrap().expect_err("an unkeyed key_rotate is not retried");
    assert!(matches!(e, Error::Closed), "{e:?}");
    let e = encrypt.await.unwrap().expect_err("encrypt is not retried");
    assert!(matches!(e, Error::Closed), "{e:?}");
    // The keyed rotation ran once; the unkeyed one never reached the daemon.
    assert_eq!(c.key_show(&key).await.unwrap().current_version, 2);
    // Retrying the keyed rotation by hand adds nothing either.
    assert_eq!(c.key_rotate(&key, Some("rot-1")).await.unwrap().current_version, 2);
    assert_eq!(c.connections(), 2);
}

/// A subscribed client reconnects by itself when the daemon restarts,
/// subscribes again, says so (`Closed`, then `Reconnected`), and hears the
/// revocations made afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_survives_a_restart() {
    let mut d = TestDaemon::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let hook: keyhaven::client::EventHook = Arc::new(move |e| seen.lock().unwrap().push(e));
    let c = reconnecting(&d, Some(hook)).await;
    c.key_create(&path("acme/pii")).await.unwrap();
    assert!(c.subscribe_revocations().await.unwrap().subscribed);

    tokio::task::block_in_place(|| d.restart());
    let wait_for = |what: &'static str, f: fn(&Event) -> bool| {
        let events = events.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !events.lock().unwrap().iter().any(f) {
                assert!(Instant::now() < deadline, "no {what}: {:?}", events.lock().unwrap());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // No call of ours made it reconnect: the subscription did.
    wait_for("Reconnected", |e| *e == Event::Reconnected).await;
    {
        // A reconnection may reach the old daemon while it drains and be
        // closed again (seen on a loaded machine): Closed once or more, then
        // Reconnected.
        let events = events.lock().unwrap();
        let first_back = events.iter().position(|e| *e == Event::Reconnected).unwrap();
        assert!(first_back >= 1 && events[..first_back].iter().all(|e| *e == Event::Closed), "{events:?}");
        assert!(c.connections() >= 2, "{events:?}");
    }

    let other = d.client().await;
    let id = "ab".repeat(16);
    other
        .call_raw(
            "revoke",
            serde_json::json!({"scope": {"kind": "datakey", "envelope_id": id}, "reason": "key-compromise"}),
        )
        .await
        .unwrap();
    wait_for("revocation", |e| matches!(e, Event::Revoked(Some(_)))).await;
    let shown = format!("{:?}", events.lock().unwrap());
    assert!(shown.contains(&"ab".repeat(16)), "{shown}");
}

/// The blocking client, on a daemon, from a program without tokio: the
/// same calls, typed answers, options instead of bare booleans, and Debug
/// output that holds no plaintext and no data key.
#[test]
fn the_blocking_client_and_typed_answers() {
    let d = TestDaemon::start();
    let c = blocking::Client::connect(d.socket()).unwrap();
    let key = path("acme/pii");
    let hooks = path("acme/hooks");
    c.key_create(&key).unwrap();
    let info = c
        .key_create_with(&hooks, &KeyOptions::new().key_type(KeyType::HmacSha256).idempotency_key("mk-1"))
        .unwrap();
    assert_eq!(info.path().unwrap(), hooks);
    // The same idempotency key again: the key as it is, not `already_exists`.
    c.key_create_with(&hooks, &KeyOptions::new().key_type(KeyType::HmacSha256).idempotency_key("mk-1"))
        .unwrap();

    let context = ctx(&["user=alice@example.com"]);
    let enc = c.encrypt(&key, b"hunter2-the-plaintext", &context).unwrap();
    let ct = enc.to_ciphertext().unwrap();
    assert_eq!(ct.envelope().id(), enc.id().unwrap());
    assert_eq!(ct.envelope().path(), &key);
    // A typed ciphertext or its text: the same call.
    let opened = c.decrypt(&ct, &context).unwrap();
    assert_eq!(opened.plaintext.expose(), b"hunter2-the-plaintext");
    assert_eq!((opened.path().unwrap(), opened.id().unwrap()), (key.clone(), enc.id().unwrap()));

    let only_envelope = c.datakey(&key, &context, Plaintext::Omit).unwrap();
    assert!(only_envelope.plaintext.is_none());
    let dk = c.datakey(&key, &context, Plaintext::Include).unwrap();
    let data_key = dk.plaintext.clone().expect("a data key");
    let envelope = dk.to_envelope().unwrap();
    assert_eq!(c.datakey_decrypt(&envelope, &context).unwrap().plaintext, data_key);

    let tag = c.mac(&hooks, b"alice@example.com", None).unwrap().to_tag().unwrap();
    assert!(c.mac_verify(&hooks, b"alice@example.com", &tag).unwrap());
    assert!(!c.mac_verify(&hooks, b"bob@example.com", &tag).unwrap());
    assert_eq!(c.key_rotate(&key, None).unwrap().current_version, 2);

    // Debug of everything a program might log.
    let sealer = blocking::Sealer::connect(
        d.socket(),
        keyhaven::cache::SealLimits::new(Duration::from_secs(60), 100, 1 << 20).unwrap(),
        keyhaven::cache::OpenLimits::new(Duration::from_secs(60), 100).unwrap(),
    )
    .unwrap();
    let sealed = sealer.seal(&key, b"hunter2-the-plaintext", &context).unwrap();
    assert_eq!(&sealer.open(&sealed, &context).unwrap()[..], b"hunter2-the-plaintext");
    let shown = format!("{c:?} {dk:?} {dk:#?} {opened:?} {enc:?} {ct:?} {envelope:?} {sealer:?} {context:?}");
    use base64::Engine;
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(data_key.expose());
    let key_hex: String = data_key.expose().iter().map(|b| format!("{b:02x}")).collect();
    let key_list = format!("{:?}", data_key.expose());
    for secret in ["hunter2", "alice", &key_b64, &key_hex, &key_list[1..20]] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("32 bytes redacted"), "{shown}");
}

/// An operator's work through the crate alone: the key's lifecycle, rewrap,
/// revocation of a key and of one data key, destroy. Every answer is typed
/// and checked against what the daemon then does.
#[tokio::test(flavor = "multi_thread")]
async fn revocation_and_the_key_lifecycle_through_the_crate() {
    use keyhaven::lifecycle::{KeySet, KeyState};
    use keyhaven::revocation::{Reason, RevocationKind, Scope};
    let d = TestDaemon::start();
    let c = d.client().await;
    let key = path("acme/pii");
    let context = ctx(&["row=7"]);
    c.key_create(&key).await.unwrap();
    let old = c.encrypt(&key, b"under v1", &context).await.unwrap();
    c.key_rotate(&key, None).await.unwrap();

    // rewrap moves it to v2; already-current input comes back unchanged.
    let moved = c.rewrap(&old.ciphertext, &context).await.unwrap();
    assert_eq!((moved.from_version, moved.key_version), (1, 2));
    assert_eq!(c.rewrap(&moved.text, &context).await.unwrap().text, moved.text);
    assert_eq!(c.decrypt(&moved.text, &context).await.unwrap().plaintext.expose(), b"under v1");

    // key_set: disable (nothing new, old data opens), then raise the floor and trim v1.
    let set = |state| KeySet { state: Some(state), ..Default::default() };
    assert_eq!(c.key_set(&key, set(KeyState::Disabled)).await.unwrap().state, KeyState::Disabled);
    let refused = c.encrypt(&key, b"x", &context).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::KeyDisabled), "{refused}");
    c.key_set(&key, set(KeyState::Enabled)).await.unwrap();
    let floor = KeySet { min_decryption_version: Some(2), ..Default::default() };
    assert_eq!(c.key_set(&key, floor).await.unwrap().min_decryption_version, 2);
    let trimmed = c.key_trim(&key).await.unwrap();
    assert_eq!(trimmed.trimmed, [1]);
    assert!(c.decrypt(&old.ciphertext, &context).await.is_err());

    // Scheduled deletion and its cancellation.
    let scheduled = c.key_schedule_deletion(&key, Some(7)).await.unwrap();
    assert!(scheduled.deletion_at.is_some());
    assert!(c.decrypt(&moved.text, &context).await.is_err());
    assert_eq!(c.key_cancel_deletion(&key).await.unwrap().state, KeyState::Disabled);
    c.key_set(&key, set(KeyState::Enabled)).await.unwrap();

    // One data key: suspended by its id, lifted.
    let one = c.encrypt(&key, b"one row", &context).await.unwrap();
    let id = one.id().unwrap();
    let suspended = c.revoke(&Scope::datakey(&id), Reason::KeyCompromise, None).await.unwrap();
    assert_eq!((suspended.kind, suspended.envelope_seen), (RevocationKind::Suspended, Some(true)));
    let e = c.decrypt(&one.ciphertext, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    assert_eq!(
        c.revoke_lift(&Scope::datakey(&id), Reason::Unspecified).await.unwrap().scope,
        Scope::datakey(&id)
    );
    assert_eq!(c.decrypt(&one.ciphertext, &context).await.unwrap().plaintext.expose(), b"one row");

    // A malformed scope is refused before anything is sent.
    let bad = Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(0) };
    assert!(c.revoke(&bad, Reason::Unspecified, None).await.unwrap_err().code().is_none());

    // The key: suspended, then destroyed (the name typed again), for good.
    c.revoke(&Scope::key(&key), Reason::KeyCompromise, None).await.unwrap();
    let wrong = c.destroy(&Scope::key(&key), "acme/other").await.unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::BadRequest), "{wrong}");
    let destroyed = c.destroy(&Scope::key(&key), "acme/pii").await.unwrap();
    assert_eq!(destroyed.revocation.kind, RevocationKind::Destroyed);
    assert_eq!(destroyed.erased, ["acme/pii@2"]);
    let e = c.decrypt(&moved.text, &context).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");

    // The blocking twins answer alike.
    let b = tokio::task::spawn_blocking({
        let socket = d.socket().to_owned();
        move || {
            let b = blocking::Client::connect(socket).unwrap();
            let k = path("acme/other");
            b.key_create(&k).unwrap();
            b.revoke(&Scope::version(&k, 1), Reason::Superseded, None).unwrap();
            let listed = b.revoke_list(Some("acme")).unwrap();
            b.revoke_lift(&Scope::version(&k, 1), Reason::Unspecified).unwrap();
            (listed.len(), b.key_schedule_deletion(&k, None).unwrap().deletion_at.is_some())
        }
    });
    assert_eq!(b.await.unwrap(), (2, true));
}
