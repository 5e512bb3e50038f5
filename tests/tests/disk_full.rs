//! A full disk (issue 20): the store (sled) on a small tmpfs and its audit
//! log's segment files (`store/audit/`) on a second one mounted inside it,
//! each filled in turn with a filler file while clients make acknowledged
//! writes, so that each failure is met on its own: first the store's disk
//! (the log has room: reads are still served), then the log's (nothing is
//! served unaudited), then both, across a restart. The daemon must refuse
//! with `store_unavailable` naming the condition and the place, say why in
//! `health` (and `keyhaven health` exit non-zero), lose nothing it
//! acknowledged, serve again by itself once the filler is gone (no
//! restart), keep an audit log that verifies, and, started while the disk
//! is full, fail with a clear error rather than a panic.
//!
//! The token stays on the real disk (the dev folder's `tokens/`): a token
//! is an HSM, not a file on the store's disk. Needs root (to mount the
//! tmpfs); skipped, saying why, otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use keyhaven::{Client, ErrorCode};
use keyhaven_tests::*;
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A tmpfs mounted on a folder; unmounted (lazily, so that a daemon still
/// holding files there does not stop it) when dropped, panics included.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        if my_uid() != 0 {
            return Err("not root: mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { dir: dir.to_owned() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the filesystem of `dir` with a file until it is full (1 MiB
/// writes, then smaller ones); returns its path and how much it took.
fn fill(dir: &Path) -> (PathBuf, u64) {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("filler");
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0x5au8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n > 0 => written += n as u64,
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "filling {}: {e}", path.display());
                    break;
                }
            }
        }
    }
    let _ = f.sync_all();
    (path, written)
}

/// Refusals seen so far by the writers and readers: all, and those the
/// store itself made (`store: …`), so that each phase runs until the full
/// disk was met rather than for a fixed time.
static REFUSED: AtomicUsize = AtomicUsize::new(0);
static REFUSED_BY_STORE: AtomicUsize = AtomicUsize::new(0);

/// Notes a refusal in `acked` and in the counters.
fn note_refusal(acked: &mut Acked, op: &str, e: &keyhaven::Error) {
    let message = e.to_string();
    REFUSED.fetch_add(1, Ordering::AcqRel);
    if message.starts_with("store: ") {
        REFUSED_BY_STORE.fetch_add(1, Ordering::AcqRel);
    }
    acked.refused.push((op.to_owned(), e.code(), message));
}

/// Waits until `counter` has grown by `n` since `from` and at least
/// `at_least` has passed; fails after 30 s.
async fn until_refused(what: &str, counter: &AtomicUsize, from: usize, n: usize, at_least: Duration) {
    let t = Instant::now();
    while counter.load(Ordering::Acquire) < from + n || t.elapsed() < at_least {
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: fewer than {n} refusals within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the writer got acknowledged.
#[derive(Default, Debug)]
struct Acked {
    /// Keys whose `key_create` was answered, with the version a later
    /// acknowledged `key_rotate` reached (1 if none).
    keys: BTreeMap<String, u64>,
    /// (key, ciphertext, plaintext) of acknowledged `encrypt`s.
    ciphertexts: Vec<(String, String, Vec<u8>)>,
    /// (key, envelope, data key) of acknowledged `datakey`s.
    datakeys: Vec<(String, String, String)>,
    /// Envelope ids answered (encrypt and datakey): each must be in the log.
    envelope_ids: Vec<String>,
    /// Refusals: (op, code, message).
    refused: Vec<(String, Option<ErrorCode>, String)>,
    /// Aliases (`t/NAME`) whose `alias_create` was answered, or that an
    /// `alias_list` showed: each must be there afterwards (a reader must
    /// not see the meta record's change before it is durable).
    aliases: BTreeSet<String>,
}

/// Tags that make a key's record about 7 KiB, so that a few writes need
/// room on the disk (sled writes its log in 512 KiB segments).
fn big_tags() -> Value {
    let tags: serde_json::Map<String, Value> =
        (0..50).map(|i| (format!("tag{i:02}"), Value::String("x".repeat(128)))).collect();
    Value::Object(tags)
}

/// Writes until `stop`: for each n, `key_create` of `t/wWkN` (with
/// [`big_tags`]), `key_rotate` of it, an `encrypt` and a `datakey` under
/// it. Every answer is noted; a connection that breaks (no answer at all)
/// fails the test.
async fn writer(c: Client, worker: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let key = format!("w{worker}k{n}");
        n += 1;
        let name = format!("t/{key}");
        let refuse = |acked: &mut Acked, op: &str, e: keyhaven::Error| {
            assert!(e.code().is_some(), "{op} {name}: no answer from the daemon (did it die?): {e}");
            note_refusal(acked, op, &e);
        };
        match c.call_raw("key_create", json!({"tenant": "t", "key": key, "tags": big_tags()})).await {
            Ok(_) => {
                acked.keys.insert(name.clone(), 1);
            }
            Err(e) => {
                refuse(&mut acked, "key_create", e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        match c.call_raw("key_rotate", json!({"tenant": "t", "key": key})).await {
            Ok(v) => {
                let version = v["current_version"].as_u64().or(v["version"].as_u64()).unwrap_or(2);
                acked.keys.insert(name.clone(), version);
            }
            Err(e) => refuse(&mut acked, "key_rotate", e),
        }
        let plaintext = format!("secret {worker}/{n}").into_bytes();
        match c
            .call_raw("encrypt", json!({"tenant": "t", "key": key, "plaintext": B64.encode(&plaintext)}))
            .await
        {
            Ok(v) => {
                acked.envelope_ids.push(v["envelope_id"].as_str().expect("envelope_id").to_owned());
                acked.ciphertexts.push((
                    name.clone(),
                    v["ciphertext"].as_str().expect("ciphertext").to_owned(),
                    plaintext,
                ));
            }
            Err(e) => refuse(&mut acked, "encrypt", e),
        }
        match c.call_raw("datakey", json!({"tenant": "t", "key": key, "include_plaintext": true})).await {
            Ok(v) => {
                acked.envelope_ids.push(v["envelope_id"].as_str().expect("envelope_id").to_owned());
                acked.datakeys.push((
                    name.clone(),
                    v["envelope"].as_str().expect("envelope").to_owned(),
                    v["plaintext"].as_str().expect("plaintext").to_owned(),
                ));
            }
            Err(e) => refuse(&mut acked, "datakey", e),
        }
    }
    acked
}

/// Decryptions and data keys under `t/before` until `stop` (reads, each
/// needing its audit record): every answer noted as [`writer`] does.
async fn reader(c: Client, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let plaintext = format!("read {n}").into_bytes();
        match c
            .call_raw("encrypt", json!({"tenant": "t", "key": "before", "plaintext": B64.encode(&plaintext)}))
            .await
        {
            Ok(v) => {
                acked.envelope_ids.push(v["envelope_id"].as_str().expect("envelope_id").to_owned());
                let ciphertext = v["ciphertext"].as_str().expect("ciphertext").to_owned();
                match c.call_raw("decrypt", json!({"ciphertext": ciphertext})).await {
                    Ok(v) => assert_eq!(B64.decode(v["plaintext"].as_str().unwrap()).unwrap(), plaintext),
                    Err(e) => {
                        assert!(e.code().is_some(), "decrypt: no answer from the daemon: {e}");
                        note_refusal(&mut acked, "decrypt", &e);
                    }
                }
                acked.ciphertexts.push(("t/before".into(), ciphertext, plaintext));
            }
            Err(e) => {
                assert!(e.code().is_some(), "encrypt: no answer from the daemon: {e}");
                note_refusal(&mut acked, "encrypt", &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    acked
}

/// Until `stop` (at most 400): `alias_create` of `t/aW-N` for `t/before`
/// (each a write of the store's meta record), each answer noted as
/// [`writer`] does.
async fn alias_writer(c: Client, worker: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let mut n = 0u64;
    // Far under the 1,000 aliases the store takes.
    while !stop.load(Ordering::Acquire) && n < 400 {
        n += 1;
        let alias = format!("a{worker}-{n}");
        match c.call_raw("alias_create", json!({"tenant": "t", "alias": alias, "key": "before"})).await {
            Ok(_) => {
                acked.aliases.insert(format!("t/{alias}"));
            }
            Err(e) => {
                assert!(e.code().is_some(), "alias_create: no answer from the daemon: {e}");
                note_refusal(&mut acked, "alias_create", &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    acked
}

/// The aliases of tenant `t` as `alias_list` shows them.
async fn alias_list(c: &Client) -> Result<BTreeSet<String>, keyhaven::Error> {
    let v = c.call_raw("alias_list", json!({"tenant": "t"})).await?;
    Ok(v["aliases"]
        .as_array()
        .expect("aliases")
        .iter()
        .map(|a| format!("t/{}", a["alias"].as_str().expect("alias")))
        .collect())
}

/// `alias_list` in a loop until `stop`, while [`alias_writer`]s write:
/// every alias shown is noted, for it must be there afterwards.
async fn alias_reader(c: Client, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    while !stop.load(Ordering::Acquire) {
        match alias_list(&c).await {
            Ok(seen) => acked.aliases.extend(seen),
            Err(e) => {
                assert!(e.code().is_some(), "alias_list: no answer from the daemon: {e}");
                note_refusal(&mut acked, "alias_list", &e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    acked
}

/// Every acknowledged write is there: keys at (at least) their acknowledged
/// version, ciphertexts and data keys open to what was answered, aliases
/// acknowledged or seen.
async fn check_acked(c: &Client, acked: &Acked) {
    let aliases = alias_list(c).await.expect("alias_list");
    let lost: Vec<&String> = acked.aliases.difference(&aliases).collect();
    assert!(lost.is_empty(), "aliases acknowledged or seen by a reader, and then gone: {lost:?}");
    for (name, version) in &acked.keys {
        let (tenant, key) = name.split_once('/').unwrap();
        let show = c
            .call_raw("key_show", json!({"tenant": tenant, "key": key}))
            .await
            .unwrap_or_else(|e| panic!("{name}: acknowledged, but now: {e}"));
        let current = show["current_version"].as_u64().unwrap();
        assert!(current >= *version, "{name}: acknowledged version {version}, the store has {current}");
    }
    for (name, ciphertext, plaintext) in &acked.ciphertexts {
        let v = c
            .call_raw("decrypt", json!({"ciphertext": ciphertext}))
            .await
            .unwrap_or_else(|e| panic!("{name}: an acknowledged ciphertext does not decrypt: {e}"));
        assert_eq!(B64.decode(v["plaintext"].as_str().unwrap()).unwrap(), *plaintext, "{name}");
    }
    for (name, envelope, data_key) in &acked.datakeys {
        let v = c
            .call_raw("datakey_decrypt", json!({"envelope": envelope}))
            .await
            .unwrap_or_else(|e| panic!("{name}: an acknowledged data key does not open: {e}"));
        assert_eq!(v["plaintext"].as_str().unwrap(), data_key, "{name}");
    }
}

fn merge(into: &mut Acked, from: Acked) {
    into.keys.extend(from.keys);
    into.ciphertexts.extend(from.ciphertexts);
    into.datakeys.extend(from.datakeys);
    into.envelope_ids.extend(from.envelope_ids);
    into.refused.extend(from.refused);
    into.aliases.extend(from.aliases);
}

/// `keyhaven health`: its exit code, its JSON, its stderr.
fn cli_health(d: &TestDaemon) -> (Option<i32>, Value, String) {
    let out = d.cli(&["health"], b"");
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("health is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Whether `text` says the disk is full.
fn says_full(text: &str) -> bool {
    text.to_ascii_lowercase().contains("no space left on device")
}

/// Runs `keyhavend run` on the folder's config while the disk is full: it
/// must stop with a clear error (no panic) within `limit`, or, if it starts,
/// say in `health` why it is degraded. Returns what it printed.
fn start_while_full(d: &TestDaemon, limit: Duration) -> String {
    let mut child = Command::new(bin("keyhavend"))
        .args(["run", "--config"])
        .arg(d.dir().join("keyhaven.toml"))
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keyhavend");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            // 75 (EX_TEMPFAIL): systemd starts it again; it starts once
            // there is room (docs/OPERATIONS.md §1.5).
            assert_eq!(status.code(), Some(75), "a start on a full disk:\n{text}");
            assert!(!text.contains("panicked"), "a start on a full disk panicked:\n{text}");
            assert!(says_full(&text), "a start on a full disk does not say so:\n{text}");
            return text;
        }
        if d.socket().exists() && Instant::now() + limit / 2 > deadline {
            // It started: then it must say in `health` what is wrong.
            let (code, health, stderr) = cli_health(d);
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!log.contains("panicked"), "{log}");
            assert_ne!(code, Some(0), "started on a full disk and healthy?\n{health}\n{stderr}");
            assert!(says_full(&health.to_string()), "{health}");
            return log;
        }
        assert!(Instant::now() < deadline, "keyhavend on a full disk neither started nor stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints each kind of refusal once, with how many.
fn print_refusals(phase: &str, refused: &[(String, Option<ErrorCode>, String)]) {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (op, code, message) in refused {
        *kinds.entry(format!("{op}: {code:?}: {message}")).or_default() += 1;
    }
    for (refusal, n) in &kinds {
        eprintln!("{phase}: refused {n}x: {refusal}");
    }
}

/// Every refusal is `store_unavailable`, says the disk is full and names
/// the place (`place`: a path under the filled filesystem).
fn check_refusals(phase: &str, refused: &[(String, Option<ErrorCode>, String)], place: &Path) {
    assert!(!refused.is_empty(), "{phase}: nothing was refused while the disk was full");
    for (op, code, message) in refused {
        assert_eq!(*code, Some(ErrorCode::StoreUnavailable), "{phase}: {op}: {message}");
        assert!(says_full(message), "{phase}: {op}: the refusal does not say the disk is full: {message}");
        assert!(
            message.contains(&place.display().to_string()),
            "{phase}: {op}: the refusal does not name {}: {message}",
            place.display()
        );
    }
}

/// After the filler is removed: waits until a `key_create` and an
/// `encrypt` succeed and `health` is `ok` again (the same daemon process);
/// returns how long it took. Refusals meanwhile must be typed.
async fn wait_for_service(c: &Client, d: &TestDaemon, acked: &mut Acked, tag: &str) -> Duration {
    let pid = d.pid();
    let freed = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let key = format!("{tag}{n}");
        let create = c.call_raw("key_create", json!({"tenant": "t", "key": key})).await;
        let encrypt = match &create {
            Ok(_) => Some(
                c.call_raw("encrypt", json!({"tenant": "t", "key": key, "plaintext": B64.encode(b"x")}))
                    .await,
            ),
            Err(_) => None,
        };
        let health = c.call_raw("health", json!({})).await.unwrap();
        if create.is_ok() {
            acked.keys.insert(format!("t/{key}"), 1);
        }
        if let Some(Ok(v)) = &encrypt {
            acked.ciphertexts.push((
                format!("t/{key}"),
                v["ciphertext"].as_str().unwrap().into(),
                b"x".to_vec(),
            ));
            acked.envelope_ids.push(v["envelope_id"].as_str().unwrap().into());
            if health["status"] == json!("ok") {
                assert_eq!(d.pid(), pid, "the daemon was restarted");
                return freed.elapsed();
            }
        }
        for e in
            [create.as_ref().err(), encrypt.as_ref().and_then(|r| r.as_ref().err())].into_iter().flatten()
        {
            assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "after freeing room: {e}");
        }
        assert!(freed.elapsed() < Duration::from_secs(10), "no service 10 s after room came back: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `health` while full: degraded, `part` (`store` or `audit`) not ok with
/// condition `no_space` and an error naming `place`; `keyhaven health`
/// exits non-zero and says it on stderr.
fn check_health_full(d: &TestDaemon, part: &str, place: &Path) -> Value {
    let (code, health, stderr) = cli_health(d);
    eprintln!("health while the {part}'s disk is full (exit {code:?}): {health}\n{stderr}");
    assert_eq!(health["status"], json!("degraded"), "{health}");
    assert_ne!(code, Some(0), "keyhaven health exit code while the disk is full");
    assert_eq!(health[part]["ok"], json!(false), "{health}");
    assert_eq!(health[part]["condition"], json!("no_space"), "{health}");
    let error = health[part]["error"].as_str().unwrap_or_else(|| panic!("no {part}.error: {health}"));
    assert!(says_full(error), "{health}");
    assert!(
        error.contains(&place.display().to_string()),
        "{part}.error does not name {}: {health}",
        place.display()
    );
    assert!(says_full(&stderr), "keyhaven health prints nothing on stderr about the full disk: {stderr}");
    health
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_closed_says_why_and_service_resumes_by_itself() {
    let began = Instant::now();
    if my_uid() != 0 {
        eprintln!("SKIPPED: not root: mounting a tmpfs needs root");
        return;
    }
    // Small audit segments: each new one asks its disk for room (4 MiB of
    // preallocated zeros, less what the last one gave back), so a full disk
    // reaches the log within 16 KiB of records rather than 4 MiB.
    std::env::set_var("KEYHAVEN_TEST_AUDIT_SEGMENT_BYTES", "16384");
    // Each change of the meta record (an alias) waits 20 ms in sled's
    // memory before its flush, so that `alias_list` meets such writes,
    // some of which fail for the full disk and must never have been seen.
    std::env::set_var("KEYHAVEN_TEST_META_WRITE_DELAY_MS", "20");
    let mut d = TestDaemon::start();
    // The store onto a 16 MiB tmpfs, its audit folder onto a 32 MiB one.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let store = d.store_dir();
    let audit = store.join("audit");
    let original = d.dir().join("store.orig");
    std::fs::rename(&store, &original).unwrap();
    let store_fs = match Tmpfs::mount(&store, "16m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let audit_fs = Tmpfs::mount(&audit, "32m").expect("a second tmpfs");
    copy_dir(&original, &store);
    d.start_again();
    let c = d.client().await;

    // Before: a key and a ciphertext, made while there is room.
    let mut acked = Acked::default();
    let before = c.call_raw("key_create", json!({"tenant": "t", "key": "before"})).await.unwrap();
    assert_eq!(before["current_version"], json!(1), "{before}");
    acked.keys.insert("t/before".into(), 1);
    // A meta record of about 11 KiB (100 aliases of long names), so that
    // each of its writes needs room as a key's does.
    for n in 0..100 {
        let alias = format!("pre{n:03}-{}", "x".repeat(56));
        c.call_raw("alias_create", json!({"tenant": "t", "alias": alias, "key": "before"})).await.unwrap();
        acked.aliases.insert(format!("t/{alias}"));
    }

    // 1. The store's disk fills under writers and a reader; the log has room.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..2 {
        tasks.push(tokio::spawn(writer(d.client().await, w, stop.clone())));
    }
    tasks.push(tokio::spawn(reader(d.client().await, stop.clone())));
    tasks.push(tokio::spawn(alias_writer(d.client().await, 0, stop.clone())));
    tasks.push(tokio::spawn(alias_reader(d.client().await, stop.clone())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let by_store = REFUSED_BY_STORE.load(Ordering::Acquire);
    let (filler, filled) = fill(&store);
    eprintln!("store's disk full: filler of {} KiB on {}", filled / 1024, store.display());
    until_refused("store full", &REFUSED_BY_STORE, by_store, 5, Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let mut phase = Acked::default();
    for t in tasks {
        merge(&mut phase, t.await.unwrap());
    }
    // Then aliases alone for 3 s (the store tries a write every 250 ms to
    // 2 s): their failing writes wait in sled's memory while `alias_list`
    // runs; what it shows must be there afterwards (`check_acked`).
    let stop = Arc::new(AtomicBool::new(false));
    let aliases = [
        tokio::spawn(alias_writer(d.client().await, 1, stop.clone())),
        tokio::spawn(alias_reader(d.client().await, stop.clone())),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Release);
    for t in aliases {
        merge(&mut phase, t.await.unwrap());
    }
    print_refusals("store full", &phase.refused);
    check_refusals("store full", &phase.refused, &store);
    assert!(
        phase.refused.iter().any(|(_, _, m)| m.starts_with("store: ")),
        "no write was refused by the store itself"
    );
    // Reads need no room in the store: with room in the log they are served.
    let reads_refused = phase.refused.iter().filter(|(op, _, _)| op == "decrypt").count();
    assert_eq!(reads_refused, 0, "decryptions were refused while the log had room");
    check_health_full(&d, "store", &store);
    let metrics = d.cli(&["metrics"], b"");
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("\nkeyhaven_store_writable 0\n"), "{metrics}");
    assert!(metrics.contains("\nkeyhaven_audit_writable 1\n"), "{metrics}");
    merge(&mut acked, phase);
    std::fs::remove_file(&filler).unwrap();
    let back = wait_for_service(&c, &d, &mut acked, "after-store").await;
    eprintln!("store full: service back {} ms after the filler was removed", back.as_millis());
    check_acked(&c, &acked).await;

    // 2. The log's disk fills: nothing is served that cannot be recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let reading = tokio::spawn(reader(d.client().await, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = REFUSED.load(Ordering::Acquire);
    let (filler, filled) = fill(&audit);
    eprintln!("audit log's disk full: filler of {} KiB on {}", filled / 1024, audit.display());
    until_refused("log full", &REFUSED, refused, 5, Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let mut phase = reading.await.unwrap();
    // A write, refused before it runs: the key must not exist afterwards.
    let e = c.call_raw("key_create", json!({"tenant": "t", "key": "unrecorded"})).await.unwrap_err();
    phase.refused.push(("key_create".into(), e.code(), e.to_string()));
    print_refusals("log full", &phase.refused);
    check_refusals("log full", &phase.refused, &audit);
    check_health_full(&d, "audit", &audit);
    merge(&mut acked, phase);
    std::fs::remove_file(&filler).unwrap();
    let back = wait_for_service(&c, &d, &mut acked, "after-log").await;
    eprintln!("log full: service back {} ms after the filler was removed", back.as_millis());
    let e = c.call_raw("key_show", json!({"tenant": "t", "key": "unrecorded"})).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "a key_create refused for the log ran anyway: {e}");

    // Nothing acknowledged was lost, every answer has its `ok` record, the
    // refusals are counted in an alert, and the chain is sound (no restart:
    // intact, not merely unsealed).
    check_acked(&c, &acked).await;
    let records = audit_records(&c).await;
    for id in &acked.envelope_ids {
        assert!(
            records.iter().any(|r| r.envelope_id.as_deref() == Some(id.as_str()) && r.outcome == "ok"),
            "envelope {id} was answered but has no `ok` audit record"
        );
    }
    let alert = records
        .iter()
        .find(|r| {
            r.op == "alert" && r.detail.as_deref().is_some_and(|t| t.contains("refused without running"))
        })
        .expect("an alert record counting the requests refused while the log could not be written");
    eprintln!("alert: {}", alert.detail.as_deref().unwrap_or(""));
    let verify = c.call_raw("audit_verify", json!({})).await.expect("audit_verify");
    assert_eq!(verify["status"], json!("intact"), "{verify}");
    let cli = d.cli(&["audit", "verify"], b"");
    assert_eq!(cli.status.code(), Some(0), "{}", String::from_utf8_lossy(&cli.stdout));

    // 3. Both full, and the daemon stops: a start on the full disks fails
    // with a clear error (or starts and says why), never a panic.
    let (filler, _) = fill(&store);
    let (audit_filler, _) = fill(&audit);
    let _ = c.call_raw("key_create", json!({"tenant": "t", "key": "while-full"})).await;
    drop(c);
    let (status, log) = d.stop();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    eprintln!("stop on full disks: {status}");
    let text = start_while_full(&d, Duration::from_secs(20));
    eprintln!("start on full disks: {}", text.lines().rfind(|l| says_full(l)).unwrap_or(""));
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&audit_filler).unwrap();
    d.start_again();
    let c = d.client().await;
    check_acked(&c, &acked).await;
    // A stop that could not seal leaves records that are sealed at the next
    // start and reported as such (AUDIT.md §4); nothing else may be wrong.
    let verify = c.call_raw("audit_verify", json!({})).await.expect("audit_verify");
    assert!(verify["problem"].is_null(), "{verify}");
    assert!(verify["status"] == json!("intact") || verify["status"] == json!("unsealed"), "{verify}");
    eprintln!("after the restart: audit log {}", verify["status"]);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // sled may have left an unfinished snapshot at the start on the full
    // disk; this start removed it (else it would not have started).
    let removed = log.lines().filter(|l| l.contains("a snapshot sled never finished writing")).count();
    eprintln!("unfinished sled snapshots removed at the last start: {removed}");
    drop(audit_fs);
    drop(store_fs);
    eprintln!(
        "disk full test: {} writes acknowledged and checked, {:.1} s",
        acked.keys.len() + acked.ciphertexts.len() + acked.datakeys.len(),
        began.elapsed().as_secs_f64()
    );
}

/// The token's own files on a full disk: SoftHSM2's token folder on a
/// 4 MiB tmpfs, filled. What SoftHSM2 rewrites in place needs no new room:
/// the store's anchor (every write) and the audit log's (every seal) keep
/// being written, so key writes, reads and seals go on. What needs a new
/// token object fails closed and named: a master-key rotation is
/// `hsm_unavailable` saying that the token directory has no space left
/// (SoftHSM2 itself says only CKR_GENERAL_ERROR), changes nothing (the
/// master key version stays), and succeeds once there is room again.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_token_folder_fails_closed_and_says_why() {
    if my_uid() != 0 {
        eprintln!("SKIPPED: not root: mounting a tmpfs needs root");
        return;
    }
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let tokens = d.dir().join("tokens");
    let original = d.dir().join("tokens.orig");
    std::fs::rename(&tokens, &original).unwrap();
    let token_fs = match Tmpfs::mount(&tokens, "4m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    copy_dir(&original, &tokens);
    d.start_again();
    let c = d.client().await;
    c.call_raw("key_create", json!({"tenant": "t", "key": "before"})).await.unwrap();
    let before = c
        .call_raw("encrypt", json!({"tenant": "t", "key": "before", "plaintext": B64.encode(b"x")}))
        .await
        .unwrap();
    let (filler, filled) = fill(&tokens);
    eprintln!("token's disk full: filler of {} KiB on {}", filled / 1024, tokens.display());

    // Writes anchored in the token, reads and their audit records go on.
    let mut acked = Acked::default();
    acked.keys.insert("t/before".into(), 1);
    acked.ciphertexts.push(("t/before".into(), before["ciphertext"].as_str().unwrap().into(), b"x".to_vec()));
    for n in 0..20 {
        let key = format!("k{n}");
        c.call_raw("key_create", json!({"tenant": "t", "key": key}))
            .await
            .unwrap_or_else(|e| panic!("key_create with the token's folder full: {e}"));
        acked.keys.insert(format!("t/{key}"), 1);
    }
    check_acked(&c, &acked).await;

    // A new token object: refused, named, nothing changed.
    let e = c.call_raw("admin_rotate_master", json!({"batch": 100})).await.unwrap_err();
    eprintln!("master-key rotation with the token's folder full: {e}");
    assert_eq!(e.code(), Some(ErrorCode::HsmUnavailable), "{e}");
    let message = e.to_string();
    assert!(says_full(&message), "{message}");
    assert!(message.contains(&tokens.display().to_string()), "does not name the token folder: {message}");
    let health = c.call_raw("health", json!({})).await.unwrap();
    assert_eq!(health["token"]["master_key_version"], json!(1), "{health}");
    assert_eq!(health["status"], json!("ok"), "{health}");
    check_acked(&c, &acked).await;

    // Room again: the rotation goes through, on the same process.
    std::fs::remove_file(&filler).unwrap();
    let pid = d.pid();
    let mut rotated =
        c.call_raw("admin_rotate_master", json!({"batch": 100})).await.expect("rotation with room");
    while rotated["finished"] != json!(true) {
        rotated = c.call_raw("admin_rotate_master", json!({"batch": 100})).await.expect("rotation step");
    }
    assert_eq!(rotated["to"], json!(2), "{rotated}");
    assert_eq!(d.pid(), pid);
    check_acked(&c, &acked).await;
    let verify = c.call_raw("audit_verify", json!({})).await.expect("audit_verify");
    assert_eq!(verify["status"], json!("intact"), "{verify}");
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(token_fs);
}
