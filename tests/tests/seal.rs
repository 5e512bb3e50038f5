//! Client-side sealing against the real daemon and token (issue 8): sealed
//! records and streams round trip and refuse every altered byte; the caches
//! keep their limits exactly; revocation events empty exactly the cache
//! entries in scope, in several client processes at once; a lost
//! connection empties the caches until resubscribed; the CLI streams a
//! large input in bounded memory.
//!
//! The client processes are this test binary started again on the ignored
//! test `worker`, which serves a small line protocol on stdin/stdout.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
use keyhaven::seal::{sealed_from_text, sealed_to_text, SealedRecord};
use keyhaven::{ErrorCode, Sealer};
use keyhaven_tests::*;

fn limits(messages: u64, bytes: u64) -> (SealLimits, OpenLimits) {
    (
        SealLimits::new(Duration::from_secs(300), messages, bytes).unwrap(),
        OpenLimits::new(Duration::from_secs(300), 1000).unwrap(),
    )
}

async fn sealer(d: &TestDaemon, messages: u64, bytes: u64) -> Sealer {
    let (s, o) = limits(messages, bytes);
    Sealer::connect(d.socket(), s, o).await.expect("sealer")
}

fn id_of(sealed: &[u8]) -> String {
    SealedRecord::parse(sealed).unwrap().envelope().id().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn records_round_trip_with_cached_keys() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let s = sealer(&d, 1000, 1 << 20).await;
    let ctx1 = ctx(&["table=users", "column=iban"]);
    let mut sealed = Vec::new();
    for i in 0..10 {
        let pt = format!("record {i}");
        sealed.push((pt.clone(), s.seal(&path("acme/pii"), pt.as_bytes(), &ctx1).await.unwrap()));
    }
    let st = s.stats();
    assert_eq!((st.datakeys, st.seal_hits, st.seal_keys), (1, 9, 1), "{st:?}");
    for (pt, ct) in &sealed {
        assert_eq!(&*s.open(ct, &ctx1).await.unwrap(), pt.as_bytes());
    }
    let st = s.stats();
    assert_eq!((st.unwraps, st.open_hits, st.open_keys), (1, 9, 1), "{st:?}");
    // Empty and large records; the text form.
    for pt in [&b""[..], &vec![0xa5; 3 << 20][..]] {
        let ct = s.seal(&path("acme/pii"), pt, &ctx1).await.unwrap();
        assert_eq!(&*s.open(&ct, &ctx1).await.unwrap(), pt);
        let text = sealed_to_text(&ct);
        assert!(text.starts_with("khs1:"));
        assert_eq!(&*s.open_text(&text, &ctx1).await.unwrap(), pt);
    }
    // Wrong context: refused locally (cached key) and by the daemon (fresh client).
    let e = s.open(&sealed[0].1, &ctx(&["table=users"])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
    let other = sealer(&d, 10, 1000).await;
    let e = other.open(&sealed[0].1, &ctx(&["table=users"])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Integrity), "{e}");
    // Another client opens through the daemon; the envelope is an ordinary one.
    assert_eq!(&*other.open(&sealed[3].1, &ctx1).await.unwrap(), sealed[3].0.as_bytes());
    let env = SealedRecord::parse(&sealed[3].1).unwrap().envelope().to_string();
    assert_eq!(c.datakey_decrypt(&env, &ctx1).await.unwrap().envelope_id, id_of(&sealed[3].1));
    // Debug output shows no key material.
    let dbg = format!("{s:?}");
    assert!(dbg.contains("SealCache") && dbg.contains("OpenCache { limits"), "{dbg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_byte_flip_of_a_record_or_a_stream_is_refused() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let s = sealer(&d, 1000, 1 << 20).await;
    let context = ctx(&["app=billing"]);
    let ct = s.seal(&path("acme/pii"), b"DE89 3704 0044 0532 0130 00", &context).await.unwrap();
    for i in 0..ct.len() {
        let mut t = ct.clone();
        t[i] ^= 0x01;
        let e = s.open(&t, &context).await.expect_err(&format!("flip of byte {i} accepted"));
        let code = e.code();
        assert!(
            matches!(e, keyhaven::Error::Envelope(_))
                || matches!(code, Some(ErrorCode::Integrity | ErrorCode::NotFound | ErrorCode::BadEnvelope)),
            "byte {i}: {e}"
        );
    }
    for n in 0..ct.len() {
        assert!(s.open(&ct[..n], &context).await.is_err(), "truncation to {n} accepted");
    }
    assert!(sealed_from_text(&format!("{}=", sealed_to_text(&ct))).is_err());

    // A stream of three chunks.
    let data: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
    let mut stream = Vec::new();
    s.seal_stream(&path("acme/pii"), &context, 1024, &mut &data[..], &mut stream).await.unwrap();
    let mut out = Vec::new();
    s.open_stream(&context, &mut &stream[..], &mut out).await.unwrap();
    assert_eq!(out, data);
    for i in 0..stream.len() {
        let mut t = stream.clone();
        t[i] ^= 0x01;
        let mut out = Vec::new();
        assert!(s.open_stream(&context, &mut &t[..], &mut out).await.is_err(), "stream flip {i} accepted");
    }
    let mut out = Vec::new();
    assert!(s.open_stream(&ctx(&[]), &mut &stream[..], &mut out).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_limits_are_exact() {
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("acme/smtp")).await.unwrap();
    let p = path("acme/pii");
    let x = ctx(&["a=1"]);

    // Messages: with max 3, records 1-3 share a key and the 4th has a new one.
    let s = sealer(&d, 3, 1 << 20).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(id_of(&s.seal(&p, b"r", &x).await.unwrap()));
    }
    assert!(ids[0] == ids[1] && ids[1] == ids[2] && ids[2] != ids[3], "{ids:?}");
    assert!(ids[3] == ids[4] && ids[4] == ids[5] && ids[5] != ids[6], "{ids:?}");
    assert_eq!(s.stats().datakeys, 3);
    // Partitions: another context or another key has its own data key.
    let other_ctx = id_of(&s.seal(&p, b"r", &ctx(&["a=2"])).await.unwrap());
    let other_key = id_of(&s.seal(&path("acme/smtp"), b"r", &x).await.unwrap());
    assert!(!ids.contains(&other_ctx) && !ids.contains(&other_key) && other_ctx != other_key);
    assert_eq!(s.stats().seal_keys, 3);

    // Bytes: 100 per key; 50 + 50 fit exactly, the next byte does not.
    let s = sealer(&d, 1000, 100).await;
    let a = id_of(&s.seal(&p, &[0; 50], &x).await.unwrap());
    assert_eq!(id_of(&s.seal(&p, &[0; 50], &x).await.unwrap()), a);
    let b = id_of(&s.seal(&p, &[0; 1], &x).await.unwrap());
    assert_ne!(a, b);
    // A record over max_bytes gets a key of its own, not cached.
    let big = id_of(&s.seal(&p, &[0; 101], &x).await.unwrap());
    assert!(big != a && big != b);
    assert_eq!(id_of(&s.seal(&p, &[0; 1], &x).await.unwrap()), b);

    // Age.
    let (_, o) = limits(1, 1);
    let s = Sealer::connect(d.socket(), SealLimits::new(Duration::from_millis(300), 1000, 1000).unwrap(), o)
        .await
        .unwrap();
    let a = id_of(&s.seal(&p, b"r", &x).await.unwrap());
    assert_eq!(id_of(&s.seal(&p, b"r", &x).await.unwrap()), a);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_ne!(id_of(&s.seal(&p, b"r", &x).await.unwrap()), a);

    // Opening cache: at most 2 keys, oldest out first, and an age.
    let (sl, _) = limits(1, 1000);
    let s = Sealer::connect(d.socket(), sl, OpenLimits::new(Duration::from_millis(400), 2).unwrap())
        .await
        .unwrap();
    let recs: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(s.seal(&p, b"r", &x).await.unwrap());
        }
        v
    };
    for r in &recs {
        s.open(r, &x).await.unwrap();
    }
    assert_eq!((s.stats().unwraps, s.stats().open_keys), (3, 2));
    s.open(&recs[2], &x).await.unwrap(); // newest: cached
    assert_eq!(s.stats().unwraps, 3);
    s.open(&recs[0], &x).await.unwrap(); // oldest: was evicted
    assert_eq!(s.stats().unwraps, 4);
    tokio::time::sleep(Duration::from_millis(450)).await;
    s.open(&recs[0], &x).await.unwrap(); // too old now
    assert_eq!(s.stats().unwraps, 5);
}

// ---- several client processes -------------------------------------------

/// A client process: this binary, running one of the ignored tests
/// `worker` or `event_listener`, answering in lines that start with `@@ `.
struct Worker {
    child: Child,
    input: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Worker {
    fn start(d: &TestDaemon) -> Worker {
        let mut w = Worker::spawn(d, "worker", None);
        assert_eq!(w.ask("ping"), "pong");
        w
    }

    /// Starts the ignored test `test`, as `user` when given.
    fn spawn(d: &TestDaemon, test: &str, user: Option<&TestUser>) -> Worker {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if let Some(u) = user {
            cmd.uid(u.uid).gid(u.gid).current_dir("/");
        }
        let mut child = cmd
            .args([test, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("KEYHAVEN_SEAL_WORKER", d.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                // The test harness prints its own text too, on the same
                // line as the first answer ("test worker ... @@ pong").
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].trim_end().to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        Worker { child, input, lines }
    }

    fn next(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no answer from the client process within 10 s")
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.input, "{line}").unwrap();
        self.next()
    }

    /// `tenant/key@version/id` of every cached key, both caches.
    fn cached(&mut self) -> BTreeSet<String> {
        self.ask("cached").split_whitespace().map(str::to_owned).collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = writeln!(self.input, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The worker side: `seal T/K` (prints the sealed record's text, or
/// `err CODE`), `open TEXT`, `cached`, `stats`, `ping`, `quit`.
#[test]
#[ignore = "a client process for the other tests, started by them"]
fn worker() {
    let Some(socket) = std::env::var_os("KEYHAVEN_SEAL_WORKER") else { return };
    let (sl, ol) = limits(1 << 20, 1 << 30);
    let s = keyhaven::blocking::Sealer::connect(socket, sl, ol).unwrap();
    let context = ctx(&["app=test"]);
    let answer = |e: keyhaven::Error| format!("err {}", e.code().map_or("local".into(), |c| c.to_string()));
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (cmd, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let out = match cmd {
            "ping" => "pong".to_owned(),
            "seal" => s.seal(&path(arg), b"x", &context).map_or_else(answer, |c| sealed_to_text(&c)),
            "open" => s.open(&sealed_from_text(arg).unwrap(), &context).map_or_else(answer, |_| "ok".into()),
            "cached" => {
                let (a, b) = s.cached();
                let all: BTreeSet<String> =
                    a.iter().chain(&b).map(|o| format!("{}@{}/{}", o.path, o.version, o.id)).collect();
                all.into_iter().collect::<Vec<_>>().join(" ")
            }
            "stats" => format!("{:?}", s.stats()),
            _ => break,
        };
        println!("@@ {out}");
    }
}

/// Subscribes (twice: the second changes nothing) and prints every event:
/// `@@ ready`, then `@@ <scope JSON>` or `@@ hidden` per revocation.
#[test]
#[ignore = "a client process for the other tests, started by them"]
fn event_listener() {
    let Some(socket) = std::env::var_os("KEYHAVEN_SEAL_WORKER") else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let hook: keyhaven::client::EventHook = Arc::new(move |e| {
        let _ = tx.send(e);
    });
    let _client = rt.block_on(async {
        let c = keyhaven::Client::connect_with_events(socket, hook).await.unwrap();
        assert!(c.subscribe_revocations().await.unwrap().subscribed);
        assert!(c.subscribe_revocations().await.unwrap().subscribed);
        c
    });
    println!("@@ ready");
    for e in rx {
        match e {
            keyhaven::client::Event::Revoked(Some(scope)) => {
                println!("@@ {}", serde_json::to_string(&scope).unwrap())
            }
            keyhaven::client::Event::Revoked(None) => println!("@@ hidden"),
            _ => println!("@@ closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_show_a_scope_only_to_callers_the_policy_lets_use_it() {
    let alice = ensure_user("khtest-alice", &[]);
    let bob = ensure_user("khtest-bob", &["khtest-billing"]);
    let dave = ensure_user("khtest-dave", &[]);
    let mut d = TestDaemon::start();
    let c = d.client().await;
    for k in ["acme/pii", "acme/smtp", "beta/pii"] {
        c.key_create(&path(k)).await.unwrap();
    }
    let id = c.datakey(&path("acme/pii"), &ctx(&[]), keyhaven::Plaintext::Omit).await.unwrap().envelope_id;
    drop(c);
    d.write_policy(&format!(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["key-admin", "revoke", "break-glass"]
keys = ["*"]

[[policy.rules]]
principals = ["user:{}"]
operations = ["encrypt", "decrypt"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["group:khtest-billing"]
operations = ["datakey"]
keys = ["*/pii"]
"#,
        alice.name
    ));
    d.restart();
    let mut listeners: Vec<Worker> =
        [&alice, &bob, &dave].into_iter().map(|u| Worker::spawn(&d, "event_listener", Some(u))).collect();
    for l in &mut listeners {
        assert_eq!(l.next(), "ready");
    }
    let c = d.client().await;
    let json = |s: &Scope| serde_json::to_string(s).unwrap();
    let key = |t: &str, k: &str| Scope::Key { tenant: t.into(), key: k.into(), version: None };
    let datakey = Scope::Datakey { envelope_id: id };
    let tenant_beta = Scope::Tenant { tenant: "beta".into() };
    //             scope                   alice sees            bob sees              dave sees
    let cases = [
        (key("acme", "smtp"), [true, false, false]),
        (key("beta", "pii"), [false, true, false]),
        (key("acme", "pii"), [true, true, false]),
        (tenant_beta, [false, false, false]),
        (datakey, [true, true, true]),
        (Scope::All, [true, true, true]),
    ];
    for (scope, shown) in cases {
        c.call(&suspend_scope(scope.clone())).await.unwrap();
        for (l, shown) in listeners.iter_mut().zip(shown) {
            let expect = if shown { json(&scope) } else { "hidden".to_owned() };
            assert_eq!(l.next(), expect, "{scope:?}");
        }
    }
    // Lifting sends nothing; the next revocation is the next event.
    c.call(&RevokeLift { scope: Scope::All, reason: Reason::Unspecified }).await.unwrap();
    c.call(&suspend_scope(Scope::All)).await.unwrap();
    for l in &mut listeners {
        assert_eq!(l.next(), json(&Scope::All));
    }
    // A destruction is an event too.
    let smtp = key("acme", "smtp");
    c.call(&keyhaven::revocation::Destroy { scope: smtp.clone(), confirm: "acme/smtp".into() })
        .await
        .unwrap();
    for (l, shown) in listeners.iter_mut().zip([true, false, false]) {
        assert_eq!(l.next(), if shown { json(&smtp) } else { "hidden".to_owned() });
    }
}

fn suspend_scope(scope: Scope) -> Revoke {
    Revoke { scope, reason: Reason::KeyCompromise, expires_at: None }
}

/// Whether `entry` (`tenant/key@v/id`) lies in `scope`.
fn in_scope(entry: &str, scope: &Scope) -> bool {
    let (name, id) = entry.split_once('/').unwrap();
    let (key, rest) = id.split_once('@').unwrap();
    let (version, id) = rest.split_once('/').unwrap();
    match scope {
        Scope::All => true,
        Scope::Tenant { tenant } => name == tenant,
        Scope::Key { tenant, key: k, version: v } => {
            name == tenant && key == k && v.is_none_or(|v| v.to_string() == version)
        }
        Scope::Datakey { envelope_id } => id == envelope_id,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_empties_exactly_the_entries_in_scope_in_every_process() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let keys = ["acme/pii", "acme/smtp", "beta/pii"];
    for k in keys {
        c.key_create(&path(k)).await.unwrap();
    }
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start(&d)).collect();
    // Fill both caches of every worker: each seals under every key and
    // opens one record of its neighbour (a different data key).
    let warm = |workers: &mut Vec<Worker>| -> Vec<BTreeSet<String>> {
        let mut records = Vec::new();
        for w in workers.iter_mut() {
            let mut mine = Vec::new();
            for k in keys {
                let text = w.ask(&format!("seal {k}"));
                assert!(text.starts_with("khs1:"), "{text}");
                mine.push(text);
            }
            records.push(mine);
        }
        let n = workers.len();
        for (i, w) in workers.iter_mut().enumerate() {
            for text in &records[(i + 1) % n] {
                assert_eq!(w.ask(&format!("open {text}")), "ok");
            }
        }
        workers.iter_mut().map(Worker::cached).collect()
    };
    let before = warm(&mut workers);
    for b in &before {
        assert_eq!(b.len(), 6, "3 sealing + 3 opening keys: {b:?}");
    }
    let some_id = before[0].iter().next().unwrap().rsplit('/').next().unwrap().to_owned();
    let scopes = [
        Scope::Datakey { envelope_id: some_id },
        Scope::Key { tenant: "acme".into(), key: "pii".into(), version: Some(1) },
        Scope::Key { tenant: "acme".into(), key: "smtp".into(), version: None },
        Scope::Tenant { tenant: "beta".into() },
        Scope::All,
    ];
    for scope in scopes {
        let before = warm(&mut workers);
        c.call(&suspend_scope(scope.clone())).await.unwrap();
        let returned = Instant::now();
        for (w, b) in workers.iter_mut().zip(&before) {
            let expect: BTreeSet<String> = b.iter().filter(|e| !in_scope(e, &scope)).cloned().collect();
            assert!(
                expect.len() < b.len() || matches!(scope, Scope::Datakey { .. }),
                "{scope:?} covers nothing"
            );
            // The event was written before `revoke` answered; allow the
            // worker's reader a moment to be scheduled.
            let mut now = w.cached();
            while now != expect && returned.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
                now = w.cached();
            }
            assert_eq!(now, expect, "after revoking {scope:?}");
        }
        // In scope: refused; out of scope: still served.
        for k in keys {
            let covered = in_scope(&format!("{k}@1/-"), &scope);
            let r = workers[1].ask(&format!("seal {k}"));
            if covered && !matches!(scope, Scope::Datakey { .. }) {
                assert_eq!(r, "err revoked", "{k} under {scope:?}");
            } else {
                assert!(r.starts_with("khs1:"), "{k} under {scope:?}: {r}");
            }
        }
        c.call(&RevokeLift { scope, reason: Reason::Unspecified }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_connection_empties_the_caches_until_resubscribed() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    drop(c);
    let s = sealer(&d, 1000, 1 << 20).await;
    let x = ctx(&["a=1"]);
    let rec = s.seal(&path("acme/pii"), b"r", &x).await.unwrap();
    s.open(&rec, &x).await.unwrap();
    assert_eq!((s.stats().seal_keys, s.stats().open_keys, s.is_live()), (1, 1, true));

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let t = Instant::now();
    while s.is_live() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = s.stats();
    assert_eq!((s.is_live(), st.seal_keys, st.open_keys), (false, 0, 0), "{st:?}");
    // No daemon: no keys, no cached fallback.
    assert!(s.seal(&path("acme/pii"), b"r", &x).await.is_err());
    assert!(s.open(&rec, &x).await.is_err());

    d.start_again();
    assert_eq!(&*s.open(&rec, &x).await.unwrap(), b"r");
    assert!(s.is_live());
    let rec2 = s.seal(&path("acme/pii"), b"r2", &x).await.unwrap();
    s.seal(&path("acme/pii"), b"r3", &x).await.unwrap();
    assert_ne!(id_of(&rec2), id_of(&rec));
    let st = s.stats();
    assert_eq!((st.connections, st.seal_keys, st.open_keys, st.datakeys), (2, 1, 1, 2), "{st:?}");
    // And revocations reach the new subscription.
    d.client().await.call(&suspend_scope(Scope::Tenant { tenant: "acme".into() })).await.unwrap();
    let t = Instant::now();
    while s.stats().seal_keys > 0 && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!((s.stats().seal_keys, s.stats().open_keys), (0, 0));
    let e = s.seal(&path("acme/pii"), b"r", &x).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
}

#[test]
fn the_blocking_facade_seals_opens_and_streams() {
    let d = TestDaemon::start();
    let out = d.cli(&["key", "create", "acme/files"], b"");
    assert!(out.status.success());
    let (sl, ol) = limits(100, 1 << 20);
    let s = keyhaven::blocking::Sealer::connect(d.socket(), sl, ol).unwrap();
    let x = ctx(&["f=1"]);
    let rec = s.seal(&path("acme/files"), b"hello", &x).unwrap();
    assert_eq!(&*s.open(&rec, &x).unwrap(), b"hello");
    let data = vec![3u8; 200_000];
    let mut sealed = Vec::new();
    assert_eq!(s.seal_stream(&path("acme/files"), &x, 4096, &mut &data[..], &mut sealed).unwrap(), 200_000);
    let mut back = Vec::new();
    s.open_stream(&x, &mut &sealed[..], &mut back).unwrap();
    assert_eq!(back, data);
}

// ---- the CLI: streams in bounded memory ---------------------------------

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Block `i` of the test input: 1 MiB of a fixed pattern, stamped with `i`.
fn block(base: &[u8], i: u64) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&i.to_be_bytes());
    b
}

#[test]
fn the_cli_streams_a_large_input_in_bounded_memory() {
    const MIB: usize = 1 << 20;
    // 1 GiB, as the issue asks; KEYHAVEN_STREAM_MIB makes it smaller.
    let blocks: u64 = std::env::var("KEYHAVEN_STREAM_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let d = TestDaemon::start();
    assert!(d.cli(&["key", "create", "acme/files"], b"").status.success());
    let mut base = vec![0u8; MIB];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in base.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let cli = |args: &[&str], stdin: Stdio, stdout: Stdio| {
        Command::new(bin("keyhaven"))
            .arg("--socket")
            .arg(d.socket())
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // keyhaven seal | keyhaven open, fed and drained by this test.
    let mut seal = cli(&["seal", "acme/files", "--context", "file=big"], Stdio::piped(), Stdio::piped());
    let sealed_out = seal.stdout.take().unwrap();
    let mut open = cli(&["open", "--context", "file=big"], Stdio::from(sealed_out), Stdio::piped());
    let mut plain_out = open.stdout.take().unwrap();
    let reader_base = base.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; MIB];
        let mut i = 0u64;
        loop {
            let mut got = 0;
            while got < MIB {
                let n = plain_out.read(&mut buf[got..]).unwrap();
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                return i;
            }
            assert_eq!(got, MIB, "block {i} short");
            assert!(buf == block(&reader_base, i), "block {i} differs");
            i += 1;
        }
    });
    let started = Instant::now();
    let mut input = seal.stdin.take().unwrap();
    for i in 0..blocks {
        input.write_all(&block(&base, i)).unwrap();
    }
    // Both processes have seen all but the last chunk: their peak so far.
    let (seal_hwm, open_hwm) = (vm_hwm_kib(seal.id()), vm_hwm_kib(open.id()));
    drop(input);
    let seal_status = seal.wait_with_output().unwrap();
    let open_status = open.wait_with_output().unwrap();
    assert!(seal_status.status.success(), "{}", String::from_utf8_lossy(&seal_status.stderr));
    assert!(open_status.status.success(), "{}", String::from_utf8_lossy(&open_status.stderr));
    assert_eq!(reader.join().unwrap(), blocks);
    eprintln!(
        "{blocks} MiB sealed and opened through two CLI processes in {:?}; peak RSS seal {seal_hwm} KiB, open {open_hwm} KiB",
        started.elapsed()
    );
    // Constant memory: a few 64 KiB chunks and pipe buffers on top of the
    // process itself, whatever the input's size.
    assert!(seal_hwm < 16 * 1024 && open_hwm < 16 * 1024, "seal {seal_hwm} KiB, open {open_hwm} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_opens_records_and_names_its_usage_errors() {
    let d = TestDaemon::start();
    assert!(d.cli(&["key", "create", "acme/files"], b"").status.success());
    let s = sealer(&d, 10, 1000).await;
    let rec = s.seal(&path("acme/files"), b"one record", &ctx(&["row=1"])).await.unwrap();
    for input in
        [sealed_to_text(&rec).into_bytes(), format!("  {}\n", sealed_to_text(&rec)).into_bytes(), rec]
    {
        let out = d.cli(&["open", "--context", "row=1"], &input);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"one record");
    }
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let out = d.cli(&["seal", "acme/files", "--chunk-size", "10"], b"x");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out), "keyhaven: --chunk-size must be 1024 to 16777216 bytes\n");
    let out = d.cli(&["seal", "acme/files", "--context", "novalue"], b"x");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = d.cli(&["open"], b"hello");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "keyhaven: stdin holds neither a sealed stream nor a sealed record\n");
    let out = d.cli(&["seal", "acme/nokey"], b"x");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("(not_found)"), "{}", stderr(&out));
    // Empty input seals to a stream that opens to nothing.
    let out = d.cli(&["seal", "acme/files"], b"");
    assert!(out.status.success());
    let back = d.cli(&["open"], &out.stdout);
    assert!(back.status.success() && back.stdout.is_empty(), "{}", stderr(&back));
}
