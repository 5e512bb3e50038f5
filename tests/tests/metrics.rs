//! Metrics (docs/OPERATIONS.md "Metrics") against the real daemon: counters
//! the test moves are seen moving over the socket (`keyhaven metrics`) and
//! over HTTP (`[metrics] listen`); Prometheus's own `promtool check
//! metrics` accepts both texts; a real Prometheus (the Debian package)
//! scrapes the daemon and its query API answers with the count the test
//! made; the `metrics` permission is enforced; bad `[metrics]` configs are
//! refused; hostile HTTP clients do not hurt the socket's clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keyhaven_tests::*;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A loopback port free at the moment.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon serving `GET /metrics` on a loopback port.
fn daemon_with_http() -> (TestDaemon, SocketAddr) {
    let mut d = TestDaemon::start();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    d.restart_with(|dir| append_config(dir, &format!("\n[metrics]\nlisten = \"{addr}\"\n")));
    (d, addr)
}

fn append_config(dir: &Path, more: &str) {
    let file = dir.join("keyhaven.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    // Before the policy's array of tables, which would swallow a later table's keys.
    let at = text.find("[[policy.rules]]").unwrap_or(text.len());
    text.insert_str(at, &format!("{more}\n"));
    std::fs::write(&file, text).unwrap();
}

/// Sends `request` as is and reads the whole answer (the responder closes).
fn http(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// The value of the sample `series` (name and labels, exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `text`: asserts it exits 0 (the exposition
/// parses) and prints no lint problem.
fn promtool_accepts(exposition: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; softhsm/install.sh installs it)");
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success() && said.trim().is_empty(), "promtool on {what}: {said}\n{exposition}");
}

fn encrypt_n(d: &TestDaemon, n: usize) {
    for _ in 0..n {
        let out = d.cli(&["encrypt", "acme/app"], b"hello");
        assert!(out.status.success(), "{}", text(&out));
    }
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: keyhaven\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package `prometheus`; softhsm/install.sh installs it)");
        let p = Prometheus { child, _dir: dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err()
            || http(addr, b"GET /-/ready HTTP/1.0\r\n\r\n").0 != "HTTP/1.0 200 OK"
        {
            assert!(Instant::now() < deadline, "prometheus not ready in 30 s: {}", p.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// The value of an instant query's only result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let mut q = String::new();
        for b in promql.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' {
                q.push(b as char);
            } else {
                q.push_str(&format!("%{b:02X}"));
            }
        }
        let (status, body) =
            http(self.addr, format!("GET /api/v1/query?query={q} HTTP/1.0\r\n\r\n").as_bytes());
        assert!(status.contains(" 200 "), "{status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn counters_move_promtool_accepts_both_texts_and_prometheus_scrapes_them() {
    let (d, addr) = daemon_with_http();
    let out = d.cli(&["key", "create", "acme/app"], b"");
    assert!(out.status.success(), "{}", text(&out));
    let ok = r#"keyhaven_requests_total{operation="encrypt",outcome="ok"}"#;
    let integrity = r#"keyhaven_requests_total{operation="decrypt",outcome="integrity"}"#;

    let before = d.cli(&["metrics"], b"");
    assert!(before.status.success(), "{}", text(&before));
    let before = String::from_utf8(before.stdout).unwrap();
    assert_eq!(sample(&before, ok), Some(0.0), "{before}");
    assert_eq!(sample(&before, integrity), None, "{before}");

    encrypt_n(&d, 7);
    // A ciphertext decrypted under the wrong context: an `integrity` outcome.
    let ct = d.cli(&["encrypt", "acme/app", "--context", "row=1"], b"x");
    assert!(ct.status.success(), "{}", text(&ct));
    let bad = d.cli(&["decrypt", "--context", "row=2"], &ct.stdout);
    assert!(!bad.status.success());

    let after = String::from_utf8(d.cli(&["metrics"], b"").stdout).unwrap();
    assert_eq!(sample(&after, ok), Some(8.0), "{after}");
    assert_eq!(sample(&after, integrity), Some(1.0), "{after}");
    assert_eq!(
        sample(&after, r#"keyhaven_request_duration_seconds_count{operation="encrypt"}"#),
        Some(8.0),
        "{after}"
    );
    assert!(sample(&after, "keyhaven_kek_cache_hits_total").unwrap() >= 7.0, "{after}");
    assert!(sample(&after, "keyhaven_kek_loads_total").unwrap() >= 1.0, "{after}");
    assert!(sample(&after, "keyhaven_audit_records_written_total").unwrap() >= 10.0, "{after}");
    assert_eq!(sample(&after, r#"keyhaven_token_condition{condition="ok"}"#), Some(1.0), "{after}");
    assert_eq!(sample(&after, "keyhaven_token_up"), Some(1.0), "{after}");
    assert!(sample(&after, "keyhaven_connections_total").unwrap() >= 10.0, "{after}");
    promtool_accepts(&after, "`keyhaven metrics`");

    let over_http = scrape(addr);
    assert_eq!(sample(&over_http, ok), Some(8.0), "{over_http}");
    promtool_accepts(&over_http, "GET /metrics");

    let prometheus = Prometheus::start(addr);
    let wait_for = |want: f64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = prometheus.query(ok);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "Prometheus says {got:?}, not {want}: {}", prometheus.log());
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    wait_for(8.0);
    assert_eq!(prometheus.query("up{job=\"keyhaven\"}"), Some(1.0));
    encrypt_n(&d, 3);
    wait_for(11.0);
}

#[test]
fn the_metrics_permission_is_enforced() {
    let mut d = TestDaemon::start();
    let reader = ensure_user("khtest-metrics", &[]);
    let other = ensure_user("khtest-nometrics", &[]);
    d.write_policy(&format!(
        "[[policy.rules]]\nname = \"monitoring\"\nprincipals = [\"user:{}\"]\noperations = [\"metrics\"]\nkeys = [\"*\"]\n\
         [[policy.rules]]\nname = \"apps\"\nprincipals = [\"user:{}\"]\noperations = [\"encrypt\", \"key-admin\"]\nkeys = [\"*\"]\n",
        reader.name, other.name
    ));
    // The socket's mode (0o666, for the other users) takes a restart.
    d.restart();
    let refused = run_cli_as(&other, d.socket(), &["metrics"], b"");
    let t = text(&refused);
    assert!(!refused.status.success() && t.contains("(permission_denied)"), "{t}");
    assert!(t.contains("`metrics`") && t.contains("needs `metrics`"), "{t}");
    let allowed = run_cli_as(&reader, d.socket(), &["metrics"], b"");
    assert!(allowed.status.success(), "{}", text(&allowed));
    let m = String::from_utf8(allowed.stdout).unwrap();
    assert_eq!(
        sample(&m, r#"keyhaven_requests_total{operation="metrics",outcome="permission_denied"}"#),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn bad_metrics_configs_are_refused_with_the_reason() {
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let config = d.dir().join("keyhaven.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    // A port taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    for (section, want) in [
        ("listen = \"0.0.0.0:9464\"", "not a loopback address"),
        ("listen = \"192.0.2.1:9464\"", "allow_remote = true"),
        ("listen = \"localhost:9464\"", "host names are not accepted"),
        ("listen = \"127.0.0.1:0\"", "the port must not be 0"),
        ("listen = \"127.0.0.1\"", "not an IP address and port"),
        ("allow_remote = true", "`allow_remote` is set but `listen` is not"),
        ("listen = 9464", "metrics.listen"),
        ("lisen = \"127.0.0.1:9464\"", "unknown field `lisen`"),
        (&format!("listen = \"{taken_addr}\""), "cannot listen for metrics on"),
    ] {
        std::fs::write(&config, &original).unwrap();
        append_config(d.dir(), &format!("[metrics]\n{section}\n"));
        let out = d.run_once();
        let t = text(&out);
        assert!(!out.status.success(), "{section}: started: {t}");
        assert!(t.contains(want), "{section}: expected `{want}` in: {t}");
    }
    drop(taken);
    std::fs::write(&config, original).unwrap();
}

#[test]
fn hostile_http_clients_do_not_hurt_socket_clients() {
    let (d, addr) = daemon_with_http();
    let out = d.cli(&["key", "create", "acme/app"], b"");
    assert!(out.status.success(), "{}", text(&out));

    // Other paths, methods, garbage, a request far over the limit.
    assert!(http(addr, b"GET / HTTP/1.1\r\n\r\n").0.contains(" 404 "));
    assert!(http(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").0.contains(" 404 "));
    assert!(http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0.contains(" 405 "));
    assert!(http(addr, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n").0.contains(" 400 "));
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
    huge.resize(1 << 20, b'a');
    let (status, _) = http(addr, &huge);
    assert!(status.contains(" 431 ") || status.is_empty(), "{status}");

    // Slow loris: connections that send a byte every 500 ms, more of them
    // than the responder serves at once, while a socket client works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let loris: Vec<_> = (0..40)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(addr) else { return None };
                s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
                let mut answer = Vec::new();
                for b in b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.read_to_end(&mut answer);
                Some((started.elapsed(), String::from_utf8_lossy(&answer).into_owned()))
            })
        })
        .collect();
    // Meanwhile the socket's clients are served as usual.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let worst = rt.block_on(async {
        let c = d.client().await;
        let mut worst = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(7);
        while Instant::now() < until {
            let t = Instant::now();
            let ct = c.encrypt(&path("acme/app"), b"x", &ctx(&[])).await.expect("encrypt during the attack");
            c.decrypt(&ct.ciphertext, &ctx(&[])).await.expect("decrypt during the attack");
            worst = worst.max(t.elapsed());
        }
        worst
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut timed_out = 0;
    for h in loris {
        if let Some((when, answer)) = h.join().unwrap() {
            if answer.contains(" 408 ") {
                timed_out += 1;
                assert!(when < Duration::from_secs(12), "408 only after {when:?}");
            }
        }
    }
    assert!(timed_out >= 1, "no slow client was told 408");
    assert!(worst < Duration::from_secs(2), "a socket round trip took {worst:?} during the attack");
    // And the endpoint serves again once they are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        if status == "HTTP/1.1 200 OK" {
            assert!(body.contains("keyhaven_build_info"));
            break;
        }
        assert!(Instant::now() < deadline, "GET /metrics not served after the attack: {status:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends one raw request frame (4-byte big-endian length, then the JSON)
/// and reads the answer frame.
fn raw_request(socket: &Path, body: &[u8]) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut answer).unwrap();
    serde_json::from_slice(&answer).unwrap()
}

#[test]
fn operation_names_a_client_makes_up_are_one_label() {
    let d = TestDaemon::start();
    let names = ["evil_1", "evil\"op{le=\"x\"}\n# TYPE x counter", "keyhaven_requests_total", "\u{202e}rtl"];
    for (i, op) in names.iter().enumerate() {
        let frame = serde_json::json!({"id": i, "op": op, "params": {}}).to_string();
        let answer = raw_request(d.socket(), frame.as_bytes());
        assert_eq!(answer["error"]["code"], "unknown_operation", "{answer}");
    }
    let out = d.cli(&["metrics"], b"");
    assert!(out.status.success(), "{}", text(&out));
    let m = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        sample(&m, r#"keyhaven_requests_total{operation="unknown",outcome="unknown_operation"}"#),
        Some(names.len() as f64),
        "{m}"
    );
    assert!(!m.contains("evil") && !m.contains("rtl") && !m.contains("{le=\"x\"}"), "{m}");
    promtool_accepts(&m, "`keyhaven metrics` after made-up operations");
}

#[test]
fn key_versions_near_their_wrap_bound_are_named_and_no_others() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let line = text.lines().find(|l| l.starts_with("wraps_per_key_version")).expect("the limit line");
        std::fs::write(&file, text.replace(line, "wraps_per_key_version = 10")).unwrap();
    });
    for key in ["acme/near", "acme/far"] {
        let out = d.cli(&["key", "create", key], b"");
        assert!(out.status.success(), "{}", text(&out));
    }
    let wrap = |key: &str, n: usize| {
        for _ in 0..n {
            let out = d.cli(&["datakey", key], b"");
            assert!(out.status.success(), "{}", text(&out));
        }
    };
    wrap("acme/near", 6);
    wrap("acme/far", 5);
    let m = String::from_utf8(d.cli(&["metrics"], b"").stdout).unwrap();
    assert_eq!(sample(&m, "keyhaven_wrap_budget_limit"), Some(10.0), "{m}");
    assert_eq!(sample(&m, "keyhaven_wrap_budget_versions_over_half"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, r#"keyhaven_wrap_budget_used_ratio{tenant="acme",key="near",version="1"}"#),
        Some(0.6),
        "{m}"
    );
    assert!(!m.contains("key=\"far\""), "a version at half its bound is not named: {m}");
    assert_eq!(sample(&m, r#"keyhaven_requests_total{operation="datakey",outcome="ok"}"#), Some(11.0), "{m}");
    promtool_accepts(&m, "`keyhaven metrics` with a wrap series");
}

#[test]
fn connections_open_and_refused_are_counted() {
    let mut d = TestDaemon::start();
    d.restart_with(|dir| {
        let file = dir.join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("max_connections_per_uid = 1024", "max_connections_per_uid = 2"))
            .unwrap();
    });
    let held: Vec<_> = (0..2).map(|_| std::os::unix::net::UnixStream::connect(d.socket()).unwrap()).collect();
    let refused = d.cli(&["health"], b"");
    let t = text(&refused);
    assert!(!refused.status.success() && t.contains("max_connections_per_uid"), "{t}");
    drop(held);
    // The daemon sees the two close; then `metrics` has a slot.
    // A try that comes before the daemon saw them close is refused too.
    let mut refusals = 1.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let out = d.cli(&["metrics"], b"");
        let m = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && sample(&m, "keyhaven_connections_open") == Some(1.0) {
            break m;
        }
        if text(&out).contains("max_connections_per_uid") {
            refusals += 1.0;
        }
        assert!(Instant::now() < deadline, "connections not seen closed: {}{m}", text(&out));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(&m, r#"keyhaven_connections_refused_total{reason="max_connections_per_uid"}"#),
        Some(refusals),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"keyhaven_connections_refused_total{reason="max_connections"}"#),
        Some(0.0),
        "{m}"
    );
    assert!(sample(&m, "keyhaven_connections_total").unwrap() >= 3.0, "{m}");
}

/// A node on PostgreSQL with an audit sink: its lease, feed lag and the
/// cluster's nodes are exported, and so is the sink's delivery; promtool
/// accepts the text.
#[test]
fn the_cluster_lease_and_the_audit_sinks_are_exported() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("metrics");
    let mut d = TestDaemon::start_postgres(&pg.url("metrics"));
    let ship = d.dir().join("ship.jsonl");
    d.restart_with(|dir| {
        append_config(dir, &format!("[[audit.sink]]\ntype = \"file\"\npath = \"{}\"\n", ship.display()))
    });
    assert!(d.cli(&["key", "create", "acme/app"], b"").status.success());
    encrypt_n(&d, 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let m = loop {
        let m = String::from_utf8(d.cli(&["metrics"], b"").stdout).unwrap();
        let caught_up =
            sample(&m, r#"keyhaven_audit_sink_lag_records{sink="file",type="file"}"#) == Some(0.0);
        if caught_up || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(sample(&m, r#"keyhaven_audit_sink_lag_records{sink="file",type="file"}"#), Some(0.0), "{m}");
    assert_eq!(sample(&m, r#"keyhaven_audit_sink_up{sink="file",type="file"}"#), Some(1.0), "{m}");
    let delivered =
        sample(&m, r#"keyhaven_audit_sink_delivered_seq{sink="file",type="file"}"#).unwrap_or(0.0);
    assert!(delivered >= 4.0, "key_create and 3 encryptions at least were delivered: {m}");
    assert_eq!(sample(&m, "keyhaven_cluster_serving"), Some(1.0), "{m}");
    let node = m
        .lines()
        .find_map(|l| l.strip_prefix("keyhaven_cluster_node_live{node=\"")?.split('"').next())
        .unwrap_or_else(|| panic!("no node series: {m}"))
        .to_owned();
    assert_eq!(sample(&m, &format!("keyhaven_cluster_node_live{{node=\"{node}\"}}")), Some(1.0), "{m}");
    let left = sample(&m, &format!("keyhaven_cluster_node_lease_left_seconds{{node=\"{node}\"}}")).unwrap();
    assert!(left > 0.0 && left <= 60.0, "lease left {left}: {m}");
    assert!(sample(&m, "keyhaven_cluster_feed_lag_revisions").is_some(), "{m}");
    promtool_accepts(&m, "`keyhaven metrics` on a cluster node with a sink");
}
