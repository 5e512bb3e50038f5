//! Issue 14 §3: the client crate and the CLI give up with a clear error
//! when the daemon does not answer: a socket that accepts and never
//! answers (what systemd's socket is while the service fails to start), a
//! stopped daemon, a path nobody listens on.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use keyhaven::{Error, TimedOut};
use keyhaven_tests::*;

/// Runs the CLI and returns (exit code, stderr, seconds it took).
fn timed_cli(socket: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, f64) {
    let start = Instant::now();
    let mut cmd = std::process::Command::new(bin("keyhaven"));
    cmd.arg("--socket").arg(socket).args(args).env_remove("KEYHAVEN_TIMEOUT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run keyhaven");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), start.elapsed().as_secs_f64())
}

#[test]
fn a_socket_that_accepts_and_never_answers_times_out_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accepts every connection and keeps it open without a word.
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in listener.incoming() {
            kept.push(s);
        }
    });

    // The default connect timeout: 5 s.
    let (code, err, secs) = timed_cli(&path, &["health"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!((4.5..15.0).contains(&secs), "gave up after {secs:.1} s: {err}");
    assert!(err.contains("timed out after 5 s") && err.contains("connecting to the daemon at"), "{err}");
    assert!(err.contains(&path.display().to_string()), "names the socket: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // --connect-timeout.
    let (code, err, secs) = timed_cli(&path, &["--connect-timeout", "1s", "whoami"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(secs < 5.0, "gave up after {secs:.1} s: {err}");
    assert!(err.contains("timed out after 1 s waiting for connecting"), "{err}");
}

#[test]
fn a_path_nobody_listens_on_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // No file at all.
    let missing = dir.path().join("missing.sock");
    let (code, err, secs) = timed_cli(&missing, &["health"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(secs < 4.0, "{secs:.1} s: {err}");
    assert!(err.contains("daemon not reachable at") && err.contains("No such file"), "{err}");
    // A socket file left behind by a listener that is gone.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let (code, err, secs) = timed_cli(&stale, &["health"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(secs < 4.0, "{secs:.1} s: {err}");
    assert!(err.contains("daemon not reachable at") && err.contains("refused"), "{err}");
}

/// A real daemon stopped with SIGSTOP: the kernel still accepts
/// connections on its socket, and nothing answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_times_out_each_request_and_the_connect() {
    let d = TestDaemon::start();
    let mut client =
        Client::builder().request_timeout(Some(Duration::from_secs(1))).connect(d.socket()).await.unwrap();
    // While it runs, given time (a loaded machine can take over 1 s for a
    // health probe); then the 1 s under test.
    client.set_request_timeout(Some(Duration::from_secs(30)));
    client.health().await.expect("answers while running");
    client.set_request_timeout(Some(Duration::from_secs(1)));
    signal(d.pid(), "STOP");
    let start = Instant::now();
    let e = client.health().await.expect_err("no answer from a stopped daemon");
    let secs = start.elapsed().as_secs_f64();
    assert!(
        matches!(&e, Error::Timeout { what: TimedOut::Request(op), after } if op == "health" && *after == Duration::from_secs(1)),
        "{e:?}"
    );
    assert!((0.9..4.0).contains(&secs), "{secs:.1} s");
    assert_eq!(e.to_string(), "timed out after 1 s waiting for the daemon's answer to `health`");

    // The CLI: the connect timeout (hello is never answered), then the
    // request timeout from $KEYHAVEN_TIMEOUT does not stretch it.
    let (code, err, secs) = timed_cli(d.socket(), &["--connect-timeout", "1s", "health"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(secs < 5.0 && err.contains("timed out after 1 s waiting for connecting"), "{secs:.1} s: {err}");
    let e = Client::builder()
        .connect_timeout(Some(Duration::from_millis(500)))
        .connect(d.socket())
        .await
        .expect_err("no hello from a stopped daemon");
    assert!(matches!(&e, Error::Timeout { what: TimedOut::Connect(p), .. } if p == d.socket()), "{e:?}");

    signal(d.pid(), "CONT");
    // The late answer to the timed-out request is dropped; the next is served.
    client.set_request_timeout(Some(Duration::from_secs(10)));
    client.health().await.expect("answers again");
    let (code, err, _) = timed_cli(d.socket(), &["health"], &[("KEYHAVEN_TIMEOUT", "10s")]);
    assert_eq!(code, Some(0), "{err}");
}
