//! The slow token (tests/slow-token): a PKCS#11 module that forwards every
//! call to SoftHSM2 after a delay, like a network HSM's round trip. Checked
//! from outside: each call waits, sessions wait in parallel (the sleep is
//! outside any lock), pkcs11-tool lists the token through it, a session
//! limit is reported and enforced, a session object serves every session
//! of its process (what sharing KEK handles would rest on), its object
//! limit makes the daemon unload keys and carry on, a bad setting
//! is refused by name, and the real daemon, loaded on it through the normal
//! `[hsm] module` path, serves a full round trip, sizes `workers = "auto"`
//! from it, serves a calm tenant while another bursts, and keeps no more
//! keys unwrapped than `[hsm] loaded_keys`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use keyhaven_tests::*;

/// The slow token's module, built next to the daemon by `cargo build --workspace`.
fn slow_token_module() -> PathBuf {
    let path = bin("keyhavend").with_file_name("libkeyhaven_slow_token.so");
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` first", path.display());
    path
}

/// The slow token's settings. The in-process test sets them in this
/// process's environment; every command started here starts without them
/// and gets only its own.
const SETTINGS: [&str; 5] = [
    "KEYHAVEN_SLOW_TOKEN_DELAY",
    "KEYHAVEN_SLOW_TOKEN_PER",
    "KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS",
    "KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS",
    "KEYHAVEN_SLOW_TOKEN_MODULE",
];

fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in SETTINGS {
        cmd.env_remove(var);
    }
    cmd
}

/// A `keyhavend dev` whose token is reached through the slow token (dev
/// makes its SoftHSM2 token through the same module: `KEYHAVEN_SOFTHSM_MODULE`).
struct SlowDaemon {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl SlowDaemon {
    fn start(env: &[(&str, &str)]) -> SlowDaemon {
        let dir = tempfile::Builder::new().prefix("keyhaven-slow-").tempdir().expect("temp dir");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, stderr) = Self::spawn(dir.path(), &env);
        let mut d = SlowDaemon { dir, env, child, stderr: Some(stderr) };
        d.wait_serving();
        d
    }

    /// Stops the daemon, lets `change` edit its config text, and starts it
    /// again; returns the log of the run that stopped.
    fn restart_with(&mut self, change: impl FnOnce(String) -> String) -> String {
        let log = self.stop();
        let path = self.dir.path().join("keyhaven.toml");
        std::fs::write(&path, change(std::fs::read_to_string(&path).unwrap())).unwrap();
        let (child, stderr) = Self::spawn(self.dir.path(), &self.env);
        (self.child, self.stderr) = (child, Some(stderr));
        self.wait_serving();
        log
    }

    fn spawn(dir: &Path, env: &[(String, String)]) -> (Child, std::thread::JoinHandle<String>) {
        let mut child = command(bin("keyhavend"))
            .args(["dev", "--dir"])
            .arg(dir)
            .env("KEYHAVEN_LOG", "info")
            .env("KEYHAVEN_SOFTHSM_MODULE", slow_token_module())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keyhavend");
        let stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n")
        });
        (child, stderr)
    }

    fn wait_serving(&mut self) {
        let mut lines = BufReader::new(self.child.stdout.take().expect("stdout")).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("export KEYHAVEN_SOCKET=") => break,
                Some(Ok(_)) => {}
                _ => panic!("keyhavend stopped before serving:\n{}", self.stop()),
            }
        }
        std::thread::spawn(move || for _ in lines {});
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("keyhaven.sock")
    }

    fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        run_cli(&self.socket(), args, stdin)
    }

    /// Stops the daemon; returns its log.
    fn stop(&mut self) -> String {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for SlowDaemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn ok(out: std::process::Output, what: &str) -> Vec<u8> {
    assert!(out.status.success(), "{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A SoftHSM2 token of its own in `dir` (softhsm2-util, not our code);
/// returns the SOFTHSM2_CONF to use.
fn softhsm_token(dir: &Path, label: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", "87654321"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util");
    ok(out, "softhsm2-util --init-token");
    conf
}

#[test]
fn the_daemon_serves_a_round_trip_through_the_slow_token_and_each_call_waits() {
    let delay = Duration::from_millis(20);
    let mut d =
        SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "20ms"), ("KEYHAVEN_SLOW_TOKEN_PER", "call")]);
    let config = std::fs::read_to_string(d.dir.path().join("keyhaven.toml")).unwrap();
    assert!(
        config.contains("libkeyhaven_slow_token.so"),
        "the daemon's [hsm] module is the slow token:\n{config}"
    );

    ok(d.cli(&["key", "create", "acme/slow"], b""), "key create");
    let sealed =
        ok(d.cli(&["encrypt", "acme/slow", "--context", "app=slow"], b"through a slow token"), "encrypt");
    // A decryption is at least the token's DecryptInit, the length query
    // and C_Decrypt: three round trips.
    let started = Instant::now();
    let plain = ok(d.cli(&["decrypt", "--context", "app=slow"], &sealed), "decrypt");
    let took = started.elapsed();
    assert_eq!(plain, b"through a slow token");
    assert!(took >= 3 * delay, "a decryption through a 20 ms token took {took:?}: the delay was not applied");
    // The wrong context still fails as it should through the forwarding module.
    let out = d.cli(&["decrypt", "--context", "app=other"], &sealed);
    assert!(!out.status.success(), "a wrong context decrypted through the slow token");

    // Data keys too: one made, its envelope decrypted.
    let made =
        ok(d.cli(&["datakey", "acme/slow", "--context", "app=slow", "--no-plaintext"], b""), "datakey");
    let made: serde_json::Value = serde_json::from_slice(&made).expect("datakey --no-plaintext prints JSON");
    let envelope = made["envelope"].as_str().expect("an envelope");
    ok(d.cli(&["datakey", "decrypt", "--context", "app=slow"], envelope.as_bytes()), "datakey decrypt");

    // pkcs11-tool (OpenSC, not ours) lists the dev token through the slow token.
    let started = Instant::now();
    let out = command("pkcs11-tool")
        .arg("--module")
        .arg(slow_token_module())
        .args(["-L"])
        .env("SOFTHSM2_CONF", d.dir.path().join("softhsm2.conf"))
        .env("KEYHAVEN_SLOW_TOKEN_DELAY", "20ms")
        .output()
        .expect("pkcs11-tool");
    let took = started.elapsed();
    let listing = String::from_utf8_lossy(&ok(out, "pkcs11-tool -L")).into_owned();
    assert!(listing.contains("token label        : keyhaven-dev"), "pkcs11-tool -L:\n{listing}");
    // C_Initialize, C_GetSlotList twice, C_GetSlotInfo, C_GetTokenInfo at least.
    assert!(took >= 5 * delay, "pkcs11-tool -L through a 20 ms token took {took:?}");
    let log = d.stop();
    assert!(!log.contains("panicked"), "daemon log:\n{log}");
}

/// One process loading the slow token in-process, as the daemon does. The
/// environment is read once, at the module's first call: only one test
/// of this file may load it in-process.
fn in_process_token() -> (cryptoki::context::Pkcs11, PathBuf) {
    static SETUP: Once = Once::new();
    let dir = std::env::temp_dir().join(format!("keyhaven-slow-inproc-{}", std::process::id()));
    SETUP.call_once(|| {
        let _ = std::fs::remove_dir_all(&dir);
        let conf = softhsm_token(&dir, "slow-inproc");
        std::env::set_var("SOFTHSM2_CONF", conf);
        std::env::set_var("KEYHAVEN_SLOW_TOKEN_DELAY", "100ms");
        std::env::set_var("KEYHAVEN_SLOW_TOKEN_PER", "call");
        std::env::set_var("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS", "9");
    });
    let pkcs11 = cryptoki::context::Pkcs11::new(slow_token_module()).expect("load the slow token");
    match pkcs11.initialize(cryptoki::context::CInitializeArgs::new(
        cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
    )) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize through the slow token: {e}"),
    }
    (pkcs11, dir)
}

#[test]
fn sessions_wait_in_parallel_and_the_session_limit_holds() {
    let (pkcs11, dir) = in_process_token();
    let slot = *pkcs11.get_slots_with_initialized_token().expect("slots").first().expect("a token");
    let info = pkcs11.get_token_info(slot).expect("token info");
    assert!(
        matches!(info.max_session_count(), cryptoki::slot::Limit::Max(9)),
        "{:?}",
        info.max_session_count()
    );

    // One session: five calls take at least five delays.
    let session = pkcs11.open_ro_session(slot).expect("session");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    for _ in 0..5 {
        session.generate_random_slice(&mut buf).expect("random");
    }
    let serial = started.elapsed();
    assert!(serial >= Duration::from_millis(500), "5 calls at 100 ms took {serial:?}");

    // Eight more sessions (nine in all: the limit), each on its own thread,
    // five calls each: 40 calls of 100 ms would take 4 s one after the
    // other; in parallel about 0.5 s.
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            let pkcs11 = pkcs11.clone();
            s.spawn(move || {
                let session = pkcs11.open_ro_session(slot).expect("session");
                let mut buf = [0u8; 16];
                for _ in 0..5 {
                    session.generate_random_slice(&mut buf).expect("random");
                }
                // All nine are open now or soon: the tenth is refused.
                std::thread::sleep(Duration::from_millis(300));
            });
        }
        std::thread::sleep(Duration::from_millis(400));
        match pkcs11.open_ro_session(slot) {
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::SessionCount, _)) => {}
            Err(e) => panic!("a tenth session failed otherwise: {e}"),
            Ok(_) => panic!("a tenth session opened past a limit of nine"),
        }
    });
    let parallel = started.elapsed();
    assert!(
        parallel < Duration::from_millis(2500),
        "8 sessions × 5 calls of 100 ms took {parallel:?}: the calls did not wait in parallel"
    );
    drop(session);
    // Sessions closed give their places back.
    let again = pkcs11.open_ro_session(slot).expect("a session after the others closed");
    drop(again);
    a_session_object_serves_every_session_of_its_process(&pkcs11, slot);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_bad_setting_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let conf = softhsm_token(dir.path(), "slow-bad");
    for (var, value, named) in [
        ("KEYHAVEN_SLOW_TOKEN_DELAY", "fast", "KEYHAVEN_SLOW_TOKEN_DELAY"),
        ("KEYHAVEN_SLOW_TOKEN_PER", "request", "KEYHAVEN_SLOW_TOKEN_PER"),
        ("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS", "0", "KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS"),
        ("KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS", "none", "KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS"),
        ("KEYHAVEN_SLOW_TOKEN_MODULE", "/nonexistent/libnothing.so", "/nonexistent/libnothing.so"),
    ] {
        let out = command("pkcs11-tool")
            .arg("--module")
            .arg(slow_token_module())
            .arg("-L")
            .env("SOFTHSM2_CONF", &conf)
            .env(var, value)
            .output()
            .expect("pkcs11-tool");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert!(
            stderr.contains("keyhaven-slow-token: ") && stderr.contains(named),
            "{var}={value}: {stderr}"
        );
    }
}

/// Sets `[hsm] workers` in a dev config's text.
fn set_workers(config: String, value: &str) -> String {
    assert!(config.contains("\nworkers = 1\n"), "a dev config sets one worker:\n{config}");
    config.replace("\nworkers = 1\n", &format!("\nworkers = {value}\n"))
}

#[test]
fn workers_auto_sizes_the_pool_from_the_token_latency_and_session_limit() {
    // A 1 ms token allowing 40 sessions: the latency asks for 64 workers
    // (2+ CPUs × 1 ms / 25 µs, at most 64), the limit allows three quarters of 40.
    let mut d = SlowDaemon::start(&[
        ("KEYHAVEN_SLOW_TOKEN_DELAY", "1ms"),
        ("KEYHAVEN_SLOW_TOKEN_PER", "operation"),
        ("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS", "40"),
    ]);
    d.restart_with(|c| set_workers(c, "\"auto\""));
    let health: serde_json::Value =
        serde_json::from_slice(&ok(d.cli(&["health"], b""), "health")).expect("health prints JSON");
    assert_eq!(health["token"]["workers"], 30, "{health}");
    // Every worker's session works: as many requests in flight as workers.
    ok(d.cli(&["key", "create", "acme/auto"], b""), "key create");
    ok(d.cli(&["bench", "--op", "datakey-decrypt", "--concurrency", "30", "--duration", "1s"], b""), "bench");
    let log = d.stop();
    let line = log
        .lines()
        .find(|l| l.contains("HSM workers: 30"))
        .unwrap_or_else(|| panic!("no sizing line:\n{log}"));
    assert!(line.contains("the token allows 40 sessions") && line.contains("a remote token"), "{line}");
    assert!(!log.contains("panicked"), "{log}");

    // The same setting on SoftHSM2 itself (a local token): one worker.
    let mut local = TestDaemon::start();
    local.restart_with(|dir| {
        let path = dir.join("keyhaven.toml");
        std::fs::write(&path, set_workers(std::fs::read_to_string(&path).unwrap(), "\"auto\"")).unwrap();
    });
    let health: serde_json::Value =
        serde_json::from_slice(&ok(local.cli(&["health"], b""), "health")).expect("health prints JSON");
    assert_eq!(health["token"]["workers"], 1, "{health}");
    let (_, log) = local.stop();
    assert!(log.contains("HSM workers: 1") && log.contains("the token is local"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenants_burst_does_not_starve_another_tenants_requests() {
    // One worker on a 5 ms token: a data-key decryption is three calls,
    // 15 ms of token time. Tenant `burst` keeps 24 requests waiting;
    // tenant `calm` asks one at a time. First come, first served would
    // make each of calm's requests wait for the 24 (about 360 ms); taking
    // turns makes it wait for at most one of burst's.
    let d = SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "5ms"), ("KEYHAVEN_SLOW_TOKEN_PER", "call")]);
    let socket = d.socket();
    let client = Client::connect(&socket).await.expect("connect");
    let ctx = ctx(&["app=fair"]);
    let mut envelopes = Vec::new();
    for tenant in ["burst", "calm"] {
        let key = path(&format!("{tenant}/k"));
        client.key_create(&key).await.expect("key create");
        let env = client.datakey(&key, &ctx, keyhaven::Plaintext::Omit).await.expect("datakey").envelope;
        client.datakey_decrypt(&env, &ctx).await.expect("warm-up");
        envelopes.push(env);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut burst = Vec::new();
    for _ in 0..24 {
        let (socket, env, ctx, stop) = (socket.clone(), envelopes[0].clone(), ctx.clone(), stop.clone());
        burst.push(tokio::spawn(async move {
            let c = Client::connect(&socket).await.expect("connect");
            let mut times = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                c.datakey_decrypt(&env, &ctx).await.expect("burst decrypt");
                times.push(t.elapsed());
            }
            times
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut calm = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        client.datakey_decrypt(&envelopes[1], &ctx).await.expect("calm decrypt");
        calm.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut burst_times = Vec::new();
    for b in burst {
        burst_times.extend(b.await.expect("burst task"));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (calm_p50, burst_p50) = (median(&mut calm), median(&mut burst_times));
    eprintln!("calm p50 {calm_p50:?}, burst p50 {burst_p50:?} ({} burst requests)", burst_times.len());
    assert!(
        calm_p50 * 3 < burst_p50,
        "the calm tenant waited {calm_p50:?} (median) against the burst's {burst_p50:?}: it waited its turn behind the burst"
    );
}

#[test]
fn keyhavend_bench_token_latency_runs_the_comparison_and_prints_its_line() {
    // A smoke run, not a measurement: nothing here checks a timing.
    let dir = tempfile::tempdir().unwrap();
    let out = command(bin("keyhavend"))
        .args(["bench", "--token-latency", "200us", "--duration", "200ms", "--sessions", "8", "--dir"])
        .arg(dir.path().join("bench"))
        .arg("--keyhaven")
        .arg(bin("keyhaven"))
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("token: slow token, 200 µs per operation"), "{text}");
    for sessions in [8, 32, 128] {
        assert!(text.contains(&format!("raw token decrypt, {sessions} sess")), "{text}");
    }
    assert!(text.contains("[hsm] workers = \"auto\""), "{text}");
    assert!(!text.contains("first error"), "{text}");
    let summary = text.lines().find(|l| l.starts_with("daemon/raw ")).unwrap_or_default();
    assert!(summary.starts_with("daemon/raw datakey-decrypt c=64 token 200 µs/operation: "), "{text}");
    assert!(summary.contains(" of raw at ") && summary.ends_with(" µs)"), "{summary}");
    // --sessions 8: the daemon with 8 workers and 24 clients, last.
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("daemon/ideal datakey-decrypt sessions=8 c=24 token 200 µs/operation: "),
        "{text}"
    );
    assert!(last.contains(" of 8/latency, ") && last.contains(" 0 errors,"), "{last}");
}

/// A session object made in one session serves another session of the
/// same process, and dies with the session that made it.
fn a_session_object_serves_every_session_of_its_process(
    pkcs11: &cryptoki::context::Pkcs11,
    slot: cryptoki::slot::Slot,
) {
    // What sharing KEK handles across workers would rest on (PKCS#11: an
    // application's session objects are visible to all its sessions),
    // checked on SoftHSM2 through the slow token. Not used by the daemon
    // yet: each worker unwraps its own copy (docs/PERFORMANCE.md).
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    let maker = pkcs11.open_rw_session(slot).expect("session");
    maker.login(cryptoki::session::UserType::User, Some(&"87654321".into())).expect("login");
    let key = maker
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
            ],
        )
        .expect("a session key");
    let user = pkcs11.open_rw_session(slot).expect("a second session");
    let sealed = user.encrypt(&Mechanism::AesEcb, key, &[7u8; 16]).expect("the other session uses the key");
    assert_eq!(maker.decrypt(&Mechanism::AesEcb, key, &sealed).expect("decrypt"), [7u8; 16]);
    // The object lives as long as the session that made it.
    drop(maker);
    assert!(user.encrypt(&Mechanism::AesEcb, key, &[7u8; 16]).is_err(), "the key outlived its session");
}

/// Encrypts under `n` keys of a fresh tenant, then decrypts each ciphertext
/// `rounds` times, all keys in turn; every request must succeed.
async fn use_keys(client: &Client, tenant: &str, n: usize, rounds: usize) {
    let ctx = ctx(&["app=room"]);
    let mut sealed = Vec::new();
    for i in 0..n {
        let key = path(&format!("{tenant}/k{i}"));
        client.key_create(&key).await.expect("key create");
        let secret = format!("secret {i}");
        sealed.push((client.encrypt(&key, secret.as_bytes(), &ctx).await.expect("encrypt"), secret));
    }
    for _ in 0..rounds {
        for (ct, secret) in &sealed {
            let opened = client.decrypt(ct.ciphertext.as_str(), &ctx).await.expect("decrypt");
            assert_eq!(opened.plaintext.expose(), secret.as_bytes());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_keys_bounds_the_keys_kept_in_the_token_and_a_full_token_is_survived() {
    // `[hsm] loaded_keys = 3`: ten keys in turn are served, but never more
    // than three KEKs sit unwrapped in the token (least recently used out).
    let mut d = SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "0")]);
    d.restart_with(|c| {
        assert!(c.contains("\nloaded_keys = 16384\n"), "a dev config says the default:\n{c}");
        c.replace("\nloaded_keys = 16384\n", "\nloaded_keys = 3\n")
    });
    let client = Client::connect(&d.socket()).await.expect("connect");
    use_keys(&client, "bounded", 10, 2).await;
    let m = client.metrics().await.expect("metrics");
    assert!(sample(&m, "keyhaven_keks_loaded") <= 3.0, "{m}");
    assert!(sample(&m, "keyhaven_keks_loaded") >= 1.0, "{m}");
    // Each key version is loaded again at each round: 10 encrypts + 20 decrypts.
    assert!(sample(&m, "keyhaven_kek_loads_total") >= 30.0, "{m}");
    drop(client);
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");

    // A token with room for six objects of ours, and the default
    // `loaded_keys` (16384): once it is full, a worker unloads its KEKs and
    // tries again; the client never sees the token's CKR_DEVICE_MEMORY.
    let mut d =
        SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "0"), ("KEYHAVEN_SLOW_TOKEN_MAX_OBJECTS", "6")]);
    let client = Client::connect(&d.socket()).await.expect("connect");
    use_keys(&client, "full", 10, 2).await;
    let m = client.metrics().await.expect("metrics");
    assert!(sample(&m, "keyhaven_keks_loaded") <= 6.0, "{m}");
    drop(client);
    let log = d.stop();
    assert!(log.contains("the token has no room for another object"), "the retry is logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_on_a_token_as_slow_as_a_network_hsm_is_warned_about_and_still_serves() {
    // `[hsm] inline = true` on a 1 ms token: every inline call would hold
    // an I/O thread for a round trip; the start says so (OPERATIONS.md §2).
    let mut d = SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "1ms")]);
    d.restart_with(|c| {
        assert!(c.contains("\n[hsm]\n"), "{c}");
        c.replace("\n[hsm]\n", "\n[hsm]\ninline = true\n")
    });
    let client = Client::connect(&d.socket()).await.expect("connect");
    use_keys(&client, "inline", 2, 2).await;
    drop(client);
    let log = d.stop();
    assert!(log.contains("[hsm] inline is set, but a token call takes"), "the warning:\n{log}");
    assert!(log.contains("run on the I/O threads"), "inline is on all the same:\n{log}");

    // On the same token without the delay, no warning.
    let mut d = SlowDaemon::start(&[("KEYHAVEN_SLOW_TOKEN_DELAY", "0")]);
    d.restart_with(|c| c.replace("\n[hsm]\n", "\n[hsm]\ninline = true\n"));
    let log = d.stop();
    assert!(log.contains("run on the I/O threads"), "{log}");
    assert!(!log.contains("[hsm] inline is set, but"), "a fast token is not warned about:\n{log}");
}
