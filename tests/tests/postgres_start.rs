//! Start-up and the one-shot commands against a PostgreSQL server that
//! stops answering (docs/CLUSTER.md §2, docs/OPERATIONS.md §7.2): each
//! gives up within its time limit, exits 75 (try again later) and says
//! which server did not answer, while doing what, within which limit and
//! set by which keys, never the connection string's password.
//!
//! The server that never answers is a real socket: a TCP listener made
//! here on 127.0.0.1 that accepts connections and never writes a byte, so
//! the daemon's own PostgreSQL driver sends its startup message and waits.
//! The second test pauses a real PostgreSQL server (SIGSTOP on the
//! postmaster and every backend) while the start waits in its anchor check.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven_tests::*;

/// The password every connection string here holds: never printed.
const PASSWORD: &str = "Never-Print-Me-7731";

/// What a failed start may take beyond its limit on a loaded machine
/// (starting a debug binary, loading the config, exiting).
const MARGIN: Duration = Duration::from_secs(6);

/// A TCP listener on 127.0.0.1 that accepts every connection and never
/// answers (nor closes) until it is dropped.
struct SilentServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        held.push(conn);
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentServer { port, accepted, stop, thread: Some(thread) }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `command` to its end, killing it after `cap` (a hang fails the
/// test rather than holding it); returns its output and how long it took.
fn run_capped(mut command: Command, cap: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let child = command
        .env_remove("SOFTHSM2_CONF")
        .env("KEYHAVEN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyhavend");
    let out = wait_capped(child, cap);
    (out, started.elapsed())
}

fn wait_capped(mut child: Child, cap: Duration) -> Output {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > cap {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "keyhavend still ran after {cap:?} (killed): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal to a process that may have exited meanwhile (a backend
/// of a `psql` that just ended).
fn signal_quietly(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).stderr(Stdio::null()).status();
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `keyhavend` with `args`.
fn keyhavend(args: &[&str]) -> Command {
    let mut c = Command::new(bin("keyhavend"));
    c.args(args);
    c
}

/// The dev install's config with its store in the PostgreSQL database of
/// `url` (in a file, as production keeps it), 1 s to connect and a 1 s
/// lease: written next to it as `name`.toml.
fn postgres_config(dir: &Path, name: &str, url: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(dir.join("keyhaven.toml")).unwrap();
    let url_file = dir.join(format!("{name}.url"));
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let sled_line = format!("store = \"{}\"\n", dir.join("store").display());
    let dev_url = format!("url_file = \"{}\"\n", dir.join("postgres-url").display());
    let text = if text.contains(&sled_line) {
        // A dev install on sled: the store becomes a database.
        let notes = dir.join(format!("{name}.notes"));
        std::fs::create_dir_all(&notes).unwrap();
        format!(
            "{}\n[store]\nbackend = \"postgres\"\npath = \"{}\"\nurl_file = \"{}\"\nconnect_timeout_seconds = 1\n\n\
             [cluster]\nnode = \"{name}\"\nlease = \"1s\"\n",
            text.replace(&sled_line, ""),
            notes.display(),
            url_file.display()
        )
    } else {
        // A dev install on PostgreSQL: another connection string.
        assert!(text.contains(&dev_url) && text.contains("[cluster]\n"), "{text}");
        text.replace(
            &dev_url,
            &format!("url_file = \"{}\"\nconnect_timeout_seconds = 1\n", url_file.display()),
        )
        .replace("[cluster]\n", "[cluster]\nlease = \"1s\"\n")
    };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts a failed start against a server that did not answer: exit 75,
/// within `limit` + [`MARGIN`], the message naming `server`, `what`,
/// `limit` and `set_by`, and no password.
fn assert_gave_up((out, took): &(Output, Duration), server: &str, what: &str, limit: Duration, set_by: &str) {
    let all = text(out);
    assert_eq!(out.status.code(), Some(75), "{all}");
    assert!(*took < limit + MARGIN, "gave up after {took:?}, limit {limit:?}: {all}");
    let expected = format!(
        "the PostgreSQL server at {server} did not answer within {} s while {what} (the limit: {set_by})",
        limit.as_secs()
    );
    assert!(all.contains(&expected), "wanted `{expected}` in:\n{all}");
    assert!(!all.contains(PASSWORD), "the password was printed:\n{all}");
}

/// `keyhavend run`, `accept-store`, `init`, `store copy` and `dev
/// --postgres` against a server that accepts connections and never
/// answers: each gives up once opening its connection has taken the
/// limit, and says so.
#[test]
fn every_command_that_opens_the_store_gives_up_on_a_server_that_never_answers() {
    let silent = SilentServer::start();
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let url = format!("host=127.0.0.1 port={} user=kh password={PASSWORD} dbname=kh", silent.port);
    let config = postgres_config(d.dir(), "silent", &url);
    let config = config.to_str().unwrap();
    let server = format!("127.0.0.1:{} (database kh)", silent.port);
    let limit = Duration::from_secs(1);
    let set_by = "[store] connect_timeout_seconds = 1";
    let cap = Duration::from_secs(90);

    for args in [
        vec!["run", "--config", config],
        vec!["accept-store", "--reason", "restored a backup", "--config", config],
        vec!["init", "--config", config],
    ] {
        let before = silent.accepted.load(Ordering::SeqCst);
        let result = run_capped(keyhavend(&args), cap);
        eprintln!("{}: gave up after {:?}", args[0], result.1);
        assert_gave_up(&result, &server, "opening a connection", limit, set_by);
        assert!(silent.accepted.load(Ordering::SeqCst) > before, "{}: never reached the server", args[0]);
    }
    // `store copy` from the (stopped) sled store into the silent database.
    let sled = d.dir().join("keyhaven.toml");
    let result =
        run_capped(keyhavend(&["store", "copy", "--from", sled.to_str().unwrap(), "--to", config]), cap);
    eprintln!("store copy: gave up after {:?}", result.1);
    assert_gave_up(&result, &server, "opening a connection", limit, set_by);
    assert!(text(&result.0).contains("opening the destination store"), "{}", text(&result.0));
    // A new dev install on it, with the default limit (5 s).
    let fresh = tempfile::Builder::new().prefix("keyhaven-test-").tempdir().unwrap();
    let dev = fresh.path().join("dev");
    let result = run_capped(keyhavend(&["dev", "--dir", dev.to_str().unwrap(), "--postgres", &url]), cap);
    eprintln!("dev --postgres: gave up after {:?}", result.1);
    assert_gave_up(
        &result,
        &server,
        "opening a connection",
        Duration::from_secs(5),
        "[store] connect_timeout_seconds = 5",
    );

    // The same configuration against a port where nothing listens is
    // refused at once, as before, naming the host.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("host=127.0.0.1 port={closed} user=kh password={PASSWORD} dbname=kh");
    let refused = postgres_config(d.dir(), "refused", &url);
    let (out, took) = run_capped(keyhavend(&["run", "--config", refused.to_str().unwrap()]), cap);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(75), "{all}");
    assert!(took < MARGIN, "{took:?}: {all}");
    assert!(all.contains("postgres 127.0.0.1 database kh") && all.contains("refused"), "{all}");
    assert!(!all.contains(PASSWORD), "{all}");
}

/// `[store] connect_timeout_seconds` is range-checked like the other keys,
/// and is for the PostgreSQL store only.
#[test]
fn connect_timeout_seconds_is_checked() {
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let config = postgres_config(d.dir(), "checked", "host=127.0.0.1 port=9 dbname=kh");
    let text_of = |body: &str| {
        std::fs::write(&config, body).unwrap();
        let (out, _) =
            run_capped(keyhavend(&["check", "--config", config.to_str().unwrap()]), Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(78), "{}", text(&out));
        text(&out)
    };
    let good = std::fs::read_to_string(&config).unwrap();
    for bad in ["0", "301"] {
        let all = text_of(
            &good.replace("connect_timeout_seconds = 1", &format!("connect_timeout_seconds = {bad}")),
        );
        assert!(all.contains("store.connect_timeout_seconds") && all.contains("from 1 to 300"), "{all}");
    }
    let sled = std::fs::read_to_string(d.dir().join("keyhaven.toml")).unwrap();
    let all = text_of(&sled.replace("store = ", "[store]\nconnect_timeout_seconds = 5\npath = "));
    assert!(all.contains("connect_timeout_seconds") && all.contains("backend = \"postgres\""), "{all}");
}

/// A real PostgreSQL server that stops answering while the start waits in
/// its anchor check (for the cluster's write lock, which a session here
/// holds): the start gives up within the write's limit, naming the check;
/// with the server still stopped, `run` and `accept-store` give up on
/// opening their connection (a Unix socket's backlog accepts it, nothing
/// answers). Once the server resumes and the lock is free, the daemon
/// starts and serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_stopped_during_the_anchor_check_fails_the_start_in_bounded_time() {
    let Some(pg) = TestPostgres::start() else { return };
    pg.create_db("keyhaven");
    let mut d = TestDaemon::start_postgres(&pg.url("keyhaven"));
    d.client().await.key_create(&path("acme/pii")).await.unwrap();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // The same database, the password added (the server trusts the test's
    // user and never asks for it): 1 s to connect, a 1 s lease.
    let url = format!("{} password={PASSWORD}", pg.url("keyhaven"));
    let config = postgres_config(d.dir(), "paused", &url);
    let config = config.to_str().unwrap();
    let socket = pg.url("keyhaven");
    let socket_dir = socket.split_whitespace().find_map(|kv| kv.strip_prefix("host=")).unwrap();
    let server = format!("{socket_dir}/.s.PGSQL.5432 (database keyhaven)");

    // A session holds the cluster's write lock ("khwrite").
    let mut holder = Command::new(postgres_bin_dir().unwrap().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &pg.url("keyhaven")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    let mut holder_in = holder.stdin.take().unwrap();
    writeln!(holder_in, "SELECT pg_advisory_lock(30232684737950821);").unwrap();
    holder_in.flush().unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let holder = Kill(holder);
    let granted = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND classid::bigint * 4294967296 + objid::bigint = 30232684737950821";
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg.psql("keyhaven", granted) != "1" {
        assert!(Instant::now() < deadline, "psql never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The start reaches the anchor check and waits for the lock.
    let start = keyhavend(&["run", "--config", config])
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyhavend");
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keyhavend' \
                   AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql("keyhaven", waiting) != "1" {
        assert!(Instant::now() < deadline, "the start never waited for the cluster's write lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server stops answering (resumed on drop too, should the test
    // fail, before the server is stopped).
    struct Resume(Vec<u32>);
    impl Drop for Resume {
        fn drop(&mut self) {
            for pid in self.0.iter().rev() {
                signal_quietly(*pid, "CONT");
            }
        }
    }
    let resume = Resume(pg.server_pids());
    for pid in &resume.0 {
        signal_quietly(*pid, "STOP");
    }
    let stopped = Instant::now();
    let out = wait_capped(start, Duration::from_secs(120));
    let took = stopped.elapsed();
    eprintln!("run: gave up {took:?} after the server stopped");
    // 15 s for the write lock, 1 s to connect, the 1 s lease.
    let limit = Duration::from_secs(17);
    assert_gave_up(
        &(out, took),
        &server,
        "checking the store against its anchor in the token",
        limit,
        "[store] connect_timeout_seconds = 1 plus [cluster] lease = 1s plus 15 s for the cluster's write lock",
    );

    // Still stopped: the next start and `accept-store` give up on their
    // connection.
    for args in [
        vec!["run", "--config", config],
        vec!["accept-store", "--reason", "restored a backup", "--config", config],
    ] {
        let result = run_capped(keyhavend(&args), Duration::from_secs(90));
        eprintln!("{} on the stopped server: gave up after {:?}", args[0], result.1);
        assert_gave_up(
            &result,
            &server,
            "opening a connection",
            Duration::from_secs(1),
            "[store] connect_timeout_seconds = 1",
        );
    }

    // Resumed, the lock let go: the daemon starts on the same database and
    // serves the key made before.
    drop(resume);
    drop(holder_in);
    drop(holder);
    d.start_again();
    let c = d.client().await;
    c.encrypt(&path("acme/pii"), b"after", &ctx(&[])).await.unwrap();
}
