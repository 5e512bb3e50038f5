//! Hostile local clients (issue 20), against the real daemon on a real
//! socket: slow frames, connection floods, clients that never read, and
//! values out of range. Each test bounds its time and its connections and
//! stops the daemon it started; docs/SECURITY.md §6 names them.

use std::time::{Duration, Instant};

use keyhaven_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `body` with its length prefix.
/// The attacks run one at a time: each loads both cores (thousands of
/// connections), and their time limits (health within 2 s, drops within
/// seconds) are about the daemon, not about sharing the machine with
/// another attack in the same test binary.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    ALONE.get_or_init(Default::default).lock().await
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The daemon's resident memory, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// What one attack did to the daemon's memory and to a good client,
/// printed as one `attack figures:` line (run with `--nocapture`; the
/// figures of docs/PERFORMANCE.md "The hostile-client limits"): resident
/// memory before, at its highest sample during, 0.5 s after the attackers
/// are gone, and "after": once it has settled (see [`Figures::after`]); and
/// the good client's requests, errors (any fails the test: 0 when it
/// passes) and p50/p99.
struct Figures {
    attack: &'static str,
    pid: u32,
    baseline: u64,
    during: u64,
    good: Vec<Duration>,
}

impl Figures {
    /// Before the attack: the baseline.
    fn before(attack: &'static str, pid: u32) -> Figures {
        let baseline = rss_kib(pid);
        Figures { attack, pid, baseline, during: baseline, good: Vec::new() }
    }

    /// A sample of the memory during the attack.
    fn sample(&mut self) {
        self.during = self.during.max(rss_kib(self.pid));
    }

    /// A good client's request that took `t` (sampling the memory too).
    fn good(&mut self, t: Duration) {
        self.good.push(t);
        self.sample();
    }

    /// After the attack (the attackers gone): prints the line and fails
    /// the test unless "after" is back within 10 % of the baseline (issue
    /// 20's target; measured at +0.6 to +4.1 %).
    ///
    /// The allocator gives freed pages back to the system after a short
    /// decay (docs/PERFORMANCE.md "The hostile-client limits"), so "after"
    /// is the resident memory once it has settled: sampled every 100 ms
    /// from 0.5 s on, the first sample after which it has not fallen for
    /// 1 s, and at most 5 s after the attackers are gone (the 5 s sample
    /// if it is still falling). The 0.5 s sample is printed too.
    fn after(mut self) {
        let gone = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let early = rss_kib(self.pid);
        let (mut low, mut low_at) = (early, Instant::now());
        while low_at.elapsed() < Duration::from_secs(1) && gone.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            let now = rss_kib(self.pid);
            if now < low {
                (low, low_at) = (now, Instant::now());
            }
        }
        let settled = rss_kib(self.pid);
        let waited = gone.elapsed();
        self.good.sort();
        let at =
            |q: f64| self.good.get(((self.good.len() as f64 * q) as usize).min(self.good.len().max(1) - 1));
        let ms =
            |d: Option<&Duration>| d.map_or("-".to_owned(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
        let change = |kib: u64| (kib as f64 / self.baseline as f64 - 1.0) * 100.0;
        eprintln!(
            "attack figures: {}: VmRSS {} KiB before, {} KiB during, {} KiB 0.5 s after ({:+.1} %), {} KiB \
             after ({:+.1} % of before, settled {:.1} s after); good client: {} requests, 0 errors, p50 {}, p99 {}",
            self.attack,
            self.baseline,
            self.during,
            early,
            change(early),
            settled,
            change(settled),
            waited.as_secs_f64(),
            self.good.len(),
            ms(at(0.50)),
            ms(at(0.99)),
        );
        assert!(
            change(settled) <= 10.0,
            "{}: the daemon's memory did not come back within 10 % of {} KiB: {} KiB {:.1} s after the attack",
            self.attack,
            self.baseline,
            settled,
            waited.as_secs_f64()
        );
    }
}

/// Times a good client's request.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed())
}

/// The daemon's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Sets `[limits]` keys in the config (the dev config lists every key).
fn set_limits(dir: &std::path::Path, values: &[(&str, &str)]) {
    let file = dir.join("keyhaven.toml");
    let mut text = std::fs::read_to_string(&file).expect("config");
    for (key, value) in values {
        let at = text.find(&format!("\n{key} = ")).unwrap_or_else(|| panic!("no `{key}` in:\n{text}")) + 1;
        let end = at + text[at..].find('\n').expect("line end");
        text.replace_range(at..end, &format!("{key} = {value}"));
    }
    std::fs::write(&file, text).expect("write config");
}

/// Reads everything until the end of the stream; `None` if it does not end
/// within `limit`.
async fn read_to_end_within(s: &mut UnixStream, limit: Duration) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut all)).await.ok().map(|_| all)
}

/// The frames' JSON bodies in `bytes` (a whole number of frames).
fn bodies(bytes: &[u8]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let n = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if at + 4 + n > bytes.len() {
            break;
        }
        out.push(serde_json::from_slice(&bytes[at + 4..at + 4 + n]).expect("JSON body"));
        at += 4 + n;
    }
    out
}

/// `n` connections that each announce a 1 MiB frame and send 10 bytes of it.
async fn slow_wave(socket: &std::path::Path, n: usize) -> Vec<UnixStream> {
    let mut slow = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = UnixStream::connect(socket).await.expect("connect");
        let mut bytes = ((1u32 << 20).to_be_bytes()).to_vec();
        bytes.extend_from_slice(b"{\"id\":1,\"o");
        s.write_all(&bytes).await.expect("write 10 bytes");
        slow.push(s);
    }
    slow
}

/// The well-behaved client encrypts and decrypts a message of its own.
async fn round_trip(good: &Client, n: usize) {
    let msg = format!("good client message {n}");
    let context = ctx(&[&format!("n={n}")]);
    let enc = good.encrypt(&path("acme/pii"), msg.as_bytes(), &context).await.expect("good encrypt");
    let dec = good.decrypt(&enc.ciphertext, &context).await.expect("good decrypt");
    assert_eq!(dec.plaintext.expose(), msg.as_bytes());
}

/// `health` answers within `limit`, with the token and the store healthy.
async fn healthy_within(c: &Client, limit: Duration) {
    let h = tokio::time::timeout(limit, c.health())
        .await
        .unwrap_or_else(|_| panic!("health took more than {limit:?}"))
        .expect("health");
    assert_eq!(h.status, "ok", "{h:?}");
    assert!(h.token.ok && h.store.ok, "{h:?}");
}

/// A CLI run, failing the test if it takes more than 30 s (the daemon is
/// stopped when the test ends, which ends the CLI).
async fn within(run: tokio::task::JoinHandle<std::process::Output>) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the good user's CLI took more than 30 s")
        .expect("CLI task")
}

/// Stops the daemon with SIGTERM: exit 0, no panic in its log; returns the log.
fn finish(d: &mut TestDaemon) -> String {
    let (status, log) = d.stop();
    assert!(status.success(), "keyhavend exited with {status} after SIGTERM:\n{log}");
    assert!(!log.contains("panicked"), "keyhavend panicked:\n{log}");
    log
}

/// Finding 1: 1,000 connections each announce a 1 MiB frame and send 10
/// bytes, twice (the first wave closed by its clients). The daemon's
/// memory grows by what arrived, not by what was announced (before: a
/// 1 MiB buffer each, resident once reused); a good client is
/// served meanwhile; each slow connection is told `bad_request` naming
/// `frame_timeout_seconds` and closed after the deadline, not before.
#[tokio::test(flavor = "multi_thread")]
async fn slow_frames_hold_little_memory_and_are_dropped_after_the_deadline() {
    let _alone = one_at_a_time().await;
    const SLOW: usize = 1000;
    const DEADLINE: u64 = 3;
    let mut d = TestDaemon::start();
    d.restart_with(|dir| set_limits(dir, &[("frame_timeout_seconds", &DEADLINE.to_string())]));
    let good = d.client().await;
    good.key_create(&path("acme/pii")).await.expect("create acme/pii");
    round_trip(&good, 0).await;
    let baseline = rss_kib(d.pid());
    let mut figures = Figures::before("1,000 slow frames (1 MiB announced, 10 bytes sent), twice", d.pid());

    // Two waves, the first closed by the clients: memory the first
    // touched and gave back is reused by the second.
    let _ = slow_wave(d.socket(), SLOW).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut slow = slow_wave(d.socket(), SLOW).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 0..50 {
        let ((), t) = timed(round_trip(&good, 100 + n)).await;
        figures.good(t);
    }
    let during = rss_kib(d.pid());
    eprintln!("VmRSS: {baseline} KiB before, {during} KiB with {SLOW} slow frames");
    assert!(
        during < baseline + 32 * 1024,
        "{SLOW} slow frames of 10 bytes took the daemon from {baseline} to {during} KiB"
    );

    for (i, s) in slow.iter_mut().enumerate() {
        let got = read_to_end_within(s, Duration::from_secs(DEADLINE + 10))
            .await
            .unwrap_or_else(|| panic!("slow connection {i} still open {}s after its deadline", 10));
        let frames = bodies(&got);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0]["id"], serde_json::Value::Null, "{frames:?}");
        assert_eq!(frames[0]["error"]["code"], "bad_request", "{frames:?}");
        let msg = frames[0]["error"]["message"].as_str().unwrap();
        assert!(msg.contains("frame_timeout_seconds") && msg.contains(&format!("{DEADLINE} s")), "{msg}");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(DEADLINE) - Duration::from_millis(200), "dropped early: {took:?}");
    drop(slow);
    round_trip(&good, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(d.pid());
    eprintln!("VmRSS: {after} KiB after the slow connections were dropped");
    assert!(after < baseline + 32 * 1024, "{baseline} KiB before, {after} KiB after");
    figures.after();
    finish(&mut d);
}

/// Finding 6: 100 connections pipeline 3,000 `health` calls each and never
/// read. A monitor's `health` and a fresh connection's stay prompt and
/// healthy; each non-reader is dropped after `write_timeout_seconds`
/// (its stream ends with answers missing), not served for ever.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_read_are_dropped_and_health_stays_prompt() {
    let _alone = one_at_a_time().await;
    const READERS: usize = 100;
    const CALLS: u64 = 3000;
    const WRITE_TIMEOUT: u64 = 3;
    let mut d = TestDaemon::start();
    d.restart_with(|dir| set_limits(dir, &[("write_timeout_seconds", &WRITE_TIMEOUT.to_string())]));
    let monitor = d.client().await;
    healthy_within(&monitor, Duration::from_secs(5)).await;
    let fds_before = open_fds(d.pid());
    let mut figures = Figures::before("100 clients pipelining 3,000 `health` each, never reading", d.pid());

    let mut writers = Vec::new();
    let mut reads = Vec::new();
    for _ in 0..READERS {
        let s = UnixStream::connect(d.socket()).await.expect("connect");
        let (r, mut w) = s.into_split();
        reads.push(r);
        writers.push(tokio::spawn(async move {
            let mut batch = Vec::new();
            for id in 0..CALLS {
                batch.extend_from_slice(&frame(format!(r#"{{"id":{id},"op":"health"}}"#).as_bytes()));
            }
            // The daemon stops reading once its answers wait unread; the
            // write ends when it drops the connection.
            let _ = tokio::time::timeout(Duration::from_secs(30), w.write_all(&batch)).await;
            w
        }));
    }
    let flood_began = Instant::now();
    while flood_began.elapsed() < Duration::from_secs(WRITE_TIMEOUT + 2) {
        let ((), t) = timed(healthy_within(&monitor, Duration::from_secs(5))).await;
        figures.good(t);
        let fresh = d.client().await;
        let ((), t) = timed(healthy_within(&fresh, Duration::from_secs(5))).await;
        figures.good(t);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Reading now would make them readers: wait (bounded) for the daemon
    // to close every one of them, seen as its descriptors going back down
    // to where they were (a tolerance let a few be read before they were
    // dropped, which made them readers: a flaky failure in CI).
    let waited = Instant::now();
    while open_fds(d.pid()) > fds_before {
        assert!(waited.elapsed() < Duration::from_secs(60), "non-readers still open after 60 s");
        healthy_within(&monitor, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, r) in reads.iter_mut().enumerate() {
        let mut all = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut all)).await;
        assert!(ended.is_ok(), "non-reader {i} was not dropped ({} answers read)", bodies(&all).len());
        let answered = bodies(&all).len() as u64;
        assert!(answered < CALLS, "non-reader {i} got all {answered} answers: served, not dropped");
    }
    for w in writers {
        let _ = w.await;
    }
    healthy_within(&monitor, Duration::from_secs(5)).await;
    drop(reads);
    figures.after();
    let log = finish(&mut d);
    assert!(log.contains("dropping a client: answers unread for 3 s"), "{log}");
}

/// Finding 2: with the daemon's open-file limit cut to 480, one uid opens
/// 2,000 connections (its cap is 100, the daemon's 200). The flood gets
/// `busy` naming max_connections_per_uid; another user's encrypt and
/// decrypt through the CLI, and `health` with the token healthy, keep
/// working; the log shows no token failure and no spinning accept.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_past_the_per_uid_cap_leaves_another_user_served_and_the_token_healthy() {
    let _alone = one_at_a_time().await;
    const FLOOD: usize = 2000;
    let good_user = ensure_user("khtest-hostile", &[]);
    let mut d = TestDaemon::start();
    d.write_policy(&format!(
        r#"
[[policy.rules]]
name = "operators"
principals = ["uid:0"]
operations = ["*"]
keys = ["*"]

[[policy.rules]]
name = "app"
principals = ["uid:{}"]
operations = ["encrypt", "decrypt"]
keys = ["acme/*"]
"#,
        good_user.uid
    ));
    d.restart_with(|dir| set_limits(dir, &[("max_connections", "200"), ("max_connections_per_uid", "100")]));
    let monitor = d.client().await;
    monitor.key_create(&path("acme/pii")).await.expect("create acme/pii");
    let cut = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", d.pid()))
        .arg("--nofile=480:480")
        .status()
        .expect("prlimit");
    assert!(cut.success(), "prlimit failed");
    let mut figures = Figures::before("2,000 connections from one uid (cap 100 a uid, 200 in all)", d.pid());

    let socket = d.socket().to_owned();
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut busy = 0usize;
        for _ in 0..FLOOD {
            match UnixStream::connect(&socket).await {
                Ok(mut s) => {
                    // A `hello` so that a refused connection is told why.
                    let hello = frame(br#"{"id":1,"op":"hello","params":{"protocol":1}}"#);
                    let _ = s.write_all(&hello).await;
                    held.push(s);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        // Look for the refusals' answers.
        for s in held.iter_mut() {
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
                if String::from_utf8_lossy(&buf[..n]).contains("max_connections_per_uid") {
                    busy += 1;
                }
            }
        }
        (held, busy)
    });
    let s = d.socket().to_owned();
    let mut good_runs = 0;
    let began = Instant::now();
    while !flood.is_finished() || good_runs < 5 {
        let gu = good_user.clone();
        let s2 = s.clone();
        let (out, t) = timed(within(tokio::task::spawn_blocking(move || {
            run_cli_as(&gu, &s2, &["encrypt", "acme/pii", "--context", "row=1"], b"good user's secret")
        })))
        .await;
        figures.good(t);
        assert!(out.status.success(), "good user's encrypt: {}", String::from_utf8_lossy(&out.stderr));
        let ct = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (gu, s2) = (good_user.clone(), s.clone());
        let (back, t) = timed(within(tokio::task::spawn_blocking(move || {
            run_cli_as(&gu, &s2, &["decrypt", "--context", "row=1"], ct.as_bytes())
        })))
        .await;
        figures.good(t);
        assert!(back.status.success(), "good user's decrypt: {}", String::from_utf8_lossy(&back.stderr));
        assert_eq!(String::from_utf8_lossy(&back.stdout), "good user's secret");
        let ((), t) = timed(healthy_within(&monitor, Duration::from_secs(5))).await;
        figures.good(t);
        good_runs += 1;
        assert!(began.elapsed() < Duration::from_secs(120), "the flood did not end in 120 s");
    }
    let (held, busy) = flood.await.unwrap();
    assert!(busy > 0, "no flood connection was told max_connections_per_uid ({} held)", held.len());
    healthy_within(&monitor, Duration::from_secs(5)).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    figures.after();
    let log = finish(&mut d);
    for bad in ["Too many open files", "session lost", "cannot seal"] {
        assert!(!log.contains(bad), "the daemon's log shows `{bad}`:\n{log}");
    }
}

/// Runs `keyhavend run` on the test daemon's config (stopped) to its end;
/// one that has not ended after 30 s (it started) is killed, and the test
/// fails.
fn run_bounded(d: &TestDaemon) -> std::process::Output {
    let mut child = std::process::Command::new(bin("keyhavend"))
        .args(["run", "--config"])
        .arg(d.dir().join("keyhaven.toml"))
        .env_remove("SOFTHSM2_CONF")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run keyhavend");
    let began = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if began.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyhavend started (killed after 30 s)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// Finding 2: a configured cap that leaves no reserve under the hard
/// open-file limit stops the start, naming the numbers.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_cap_without_a_reserve_of_descriptors_stops_the_start() {
    let mut d = TestDaemon::start();
    let (status, _) = d.stop();
    assert!(status.success());
    let hard = {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
        line.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap()
    };
    let cap = hard - 100;
    set_limits(d.dir(), &[("max_connections", &cap.to_string())]);
    let out = run_bounded(&d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with max_connections = {cap} under a hard limit of {hard}");
    for part in [
        format!("max_connections = {cap}"),
        format!("open-file limit is {hard}"),
        format!("at most {}", hard - 256),
    ] {
        assert!(err.contains(&part), "`{part}` missing from: {err}");
    }
}

/// Sends `body` as one frame on a fresh connection and reads one answer.
async fn ask_raw(d: &TestDaemon, body: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(d.socket()).await.expect("connect");
    s.write_all(&frame(body)).await.expect("write");
    read_answer(&mut s).await
}

/// The next answer on `s` (within 10 s), as JSON.
async fn read_answer(s: &mut UnixStream) -> serde_json::Value {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .expect("answer")
        .expect("read");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.expect("read body");
    serde_json::from_slice(&buf).expect("JSON answer")
}

/// Finding 5: a rotation period that would wrap the due time around is
/// refused, by the CLI as a usage error and on the wire with `bad_request`
/// naming the field; nothing changes, and two restarts make no new version (before:
/// accepted, and the key rotated at every restart).
#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_durations_are_refused_and_nothing_wraps() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.expect("create acme/pii");
    let out = d.cli(&["key", "set", "acme/pii", "--rotate-every", "18446744073709551615s"], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    // The CLI refuses it as a usage error (exit 2) before sending anything;
    // the daemon's own refusal is checked on the wire below.
    assert_eq!(out.status.code(), Some(2), "accepted: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("--rotate-every") && err.contains("over 100 years"), "{err}");
    for period in [u64::MAX, 100 * 365 * 86_400 + 1] {
        let body = format!(
            r#"{{"id":9,"op":"key_set","params":{{"tenant":"acme","key":"pii","rotate_every_secs":{period}}}}}"#
        );
        let a = ask_raw(&d, body.as_bytes()).await;
        assert_eq!(a["id"], 9, "{a}");
        assert_eq!(a["error"]["code"], "bad_request", "{a}");
        assert!(a["error"]["message"].as_str().unwrap().contains("out of range"), "{a}");
    }
    // The largest period allowed is taken and does not wrap.
    let body = format!(
        r#"{{"id":10,"op":"key_set","params":{{"tenant":"acme","key":"pii","rotate_every_secs":{}}}}}"#,
        100u64 * 365 * 86_400
    );
    let a = ask_raw(&d, body.as_bytes()).await;
    assert!(a["ok"]["next_rotation_at"].as_u64().unwrap() > a["ok"]["created_at"].as_u64().unwrap(), "{a}");
    drop(c);
    d.restart();
    d.restart();
    let c = d.client().await;
    let show = keyhaven::lifecycle::KeyShow { tenant: "acme".into(), key: "pii".into() };
    let details = c.call(&show).await.expect("key show");
    assert_eq!(details.current_version, 1, "a restart rotated the key: {details:?}");
    finish(&mut d);
}

/// Finding 5: durations and counts in the config are range-checked: the
/// start stops, naming the key and its range.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_config_values_stop_the_start() {
    let mut d = TestDaemon::start();
    let (status, _) = d.stop();
    assert!(status.success());
    let file = d.dir().join("keyhaven.toml");
    let original = std::fs::read_to_string(&file).unwrap();
    for (key, value, range) in [
        ("frame_timeout_seconds", "0", "from 1 to 3600"),
        ("idle_timeout_seconds", "9223372036854775807", "from 1 to 86400"),
        ("write_timeout_seconds", "100000", "from 1 to 3600"),
        ("request_buffer_bytes", "1024", "from 2097152"),
        ("max_connections_per_uid", "0", "from 1 to 1048576"),
        ("drain_seconds", "9223372036854775807", "at most 3600"),
        ("check_seconds", "9223372036854775807", "from 1 to 86400"),
    ] {
        std::fs::write(&file, &original).unwrap();
        set_limits(d.dir(), &[(key, value)]);
        let out = run_bounded(&d);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key} = {value} was accepted");
        assert!(err.contains(key) && err.contains(range), "{key} = {value}: {err}");
    }
    std::fs::write(&file, &original).unwrap();
}

/// Finding 8: the `id` answered for a frame that is not a valid request
/// follows PROTOCOL.md §1: the request's unsigned integer `id` when the
/// body is a JSON object with one, else `null`. Not UTF-8 throughout (before:
/// `id: 1`), `id` twice, and a torn object get `null`.
#[tokio::test(flavor = "multi_thread")]
async fn the_id_echoed_for_a_bad_frame_follows_protocol_1() {
    let mut d = TestDaemon::start();
    let cases: [(&[u8], serde_json::Value); 6] = [
        (b"{\"id\":1,\"op\":\"he\xffalth\"}", serde_json::Value::Null),
        (br#"{"id":1,"id":2,"op":"health"}"#, serde_json::Value::Null),
        (br#"{"id":1,"id":1,"op":"health"}"#, serde_json::Value::Null),
        (br#"{"id":3,"op":"health""#, serde_json::Value::Null),
        (br#"{"id":4,"op":7}"#, 4.into()),
        (br#"{"op":"health","id":5,"extra":true}"#, 5.into()),
    ];
    for (body, id) in cases {
        let a = ask_raw(&d, body).await;
        assert_eq!(a["id"], id, "{}: {a}", String::from_utf8_lossy(body));
        assert_eq!(a["error"]["code"], "bad_request", "{a}");
    }
    finish(&mut d);
}

/// Finding 1: partly received frames of all connections share
/// `request_buffer_bytes` (here its least, 2 MiB). Four connections each
/// send 600 KiB of a 1 MiB frame: those past the budget get `busy` naming
/// it and are closed; once they are gone the budget is whole again.
#[tokio::test(flavor = "multi_thread")]
async fn partly_received_frames_share_one_budget() {
    let _alone = one_at_a_time().await;
    let mut d = TestDaemon::start();
    d.restart_with(|dir| set_limits(dir, &[("request_buffer_bytes", "2097152")]));
    let good = d.client().await;
    good.key_create(&path("acme/pii")).await.expect("create acme/pii");
    round_trip(&good, 0).await;
    let mut figures = Figures::before("4 frames of 600 KiB of 1 MiB against a 2 MiB budget", d.pid());
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut s = UnixStream::connect(d.socket()).await.expect("connect");
        let mut bytes = (1u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(&vec![b' '; 600 << 10]);
        // The daemon may close it mid-way: a write error is expected then.
        let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(&bytes)).await;
        conns.push(s);
    }
    let mut busy = 0;
    for s in conns.iter_mut() {
        let mut len = [0u8; 4];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut len)).await {
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut body).await.expect("body");
            let a: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(a["error"]["code"], "busy", "{a}");
            assert!(a["error"]["message"].as_str().unwrap().contains("request_buffer_bytes"), "{a}");
            busy += 1;
        }
    }
    assert!((1..=3).contains(&busy), "{busy} of 4 connections were told busy");
    for n in 0..50 {
        let ((), t) = timed(round_trip(&good, 100 + n)).await;
        figures.good(t);
    }
    drop(conns);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A 900 KiB frame now fits: it is read whole (and is a bad request).
    let mut big = br#"{"id":77,"op":"health","pad":""#.to_vec();
    big.extend_from_slice(&vec![b'x'; 900 << 10]);
    big.extend_from_slice(br#""}"#);
    let a = ask_raw(&d, &big).await;
    assert_eq!(a["id"], 77, "{a}");
    assert_eq!(a["error"]["code"], "bad_request", "{a}");
    figures.after();
    finish(&mut d);
}

/// 10,000 requests pipelined on one connection, and frames of deeply
/// nested JSON and invalid UTF-8 on others, while a good client keeps
/// encrypting and decrypting: every pipelined request is answered once,
/// under its own id; the nested and invalid frames are `bad_request` and
/// their connections stay usable; the good client sees no error (its p99
/// is printed, not asserted: speed is measured in benchmarks).
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_pipelined_requests_and_deep_json_leave_a_good_client_served() {
    let _alone = one_at_a_time().await;
    const PIPELINED: u64 = 10_000;
    let mut d = TestDaemon::start();
    let good = d.client().await;
    good.key_create(&path("acme/pii")).await.expect("create acme/pii");
    round_trip(&good, 0).await;
    let mut figures = Figures::before("10,000 pipelined encrypts, 100,000-deep JSON, invalid UTF-8", d.pid());

    let s = UnixStream::connect(d.socket()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for id in 1..=PIPELINED {
            let body = format!(
                r#"{{"id":{id},"op":"encrypt","params":{{"tenant":"acme","key":"pii","plaintext":"cGlwZWxpbmVk"}}}}"#
            );
            batch.extend_from_slice(&frame(body.as_bytes()));
            if id % 500 == 0 {
                wr.write_all(&batch).await.expect("pipeline write");
                batch.clear();
            }
        }
        wr
    });
    let reader = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut errors = 0;
        let mut len = [0u8; 4];
        while (seen.len() as u64) < PIPELINED {
            rd.read_exact(&mut len).await.expect("an answer's length");
            let mut body = vec![0; u32::from_be_bytes(len) as usize];
            rd.read_exact(&mut body).await.expect("an answer");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
            if v.get("ok").is_none() {
                errors += 1;
            }
            assert!(seen.insert(v["id"].as_u64().expect("an id")), "id {} answered twice", v["id"]);
        }
        (seen, errors)
    });

    // Meanwhile: deep nesting and invalid UTF-8, each on a connection that
    // is then used for a good request.
    let nested = format!(
        r#"{{"id":5,"op":"encrypt","params":{{"context":{}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut bad = b"{\"id\":6,\"op\":\"encr".to_vec();
    bad.extend_from_slice(&[0xff, 0xfe]);
    bad.extend_from_slice(b"ypt\",\"params\":{}}");
    for body in [nested.into_bytes(), bad] {
        let mut s = UnixStream::connect(d.socket()).await.expect("connect");
        s.write_all(&frame(&body)).await.expect("write");
        s.write_all(&frame(br#"{"id":7,"op":"health"}"#)).await.expect("write");
        // Answers arrive in any order (PROTOCOL.md §2.3): the `health` may
        // overtake the refusal.
        let mut answers = [read_answer(&mut s).await, read_answer(&mut s).await];
        if answers[0]["id"] == 7 {
            answers.swap(0, 1);
        }
        assert_eq!(answers[0]["error"]["code"], "bad_request", "{}", answers[0]);
        assert_eq!(answers[1]["id"], 7, "the connection still serves: {}", answers[1]);
        assert!(answers[1].get("ok").is_some(), "{}", answers[1]);
    }

    let mut latencies = Vec::new();
    for n in 0..300 {
        let ((), t) = timed(round_trip(&good, n)).await;
        latencies.push(t);
        figures.good(t);
    }
    latencies.sort();
    let (seen, errors) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("10,000 pipelined answers within 2 minutes")
        .unwrap();
    drop(writer.await.unwrap());
    assert_eq!(seen.len() as u64, PIPELINED);
    assert_eq!(errors, 0, "pipelined encrypts refused");
    healthy_within(&good, Duration::from_secs(2)).await;
    eprintln!(
        "good client under 10,000 pipelined requests: 300 round trips, 0 errors, p50 {:?}, p99 {:?}",
        latencies[150], latencies[296]
    );
    figures.after();
    finish(&mut d);
}
