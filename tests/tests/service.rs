//! Life under a supervisor (issue 6): socket activation and sd_notify
//! states, checked with systemd's own `systemd-socket-activate` and a
//! notify socket the test listens on; and SIGTERM during a 16-client load:
//! every request the daemon processed was answered, it exits 0, and the
//! store opens cleanly afterwards.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven_tests::*;

fn next_state(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_and_notify_ready_reloading_stopping() {
    let mut d = TestDaemon::start();
    assert_eq!(d.client().await.health().await.unwrap().status, "ok");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    let notify_path = d.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let activated = d.dir().join("activated.sock");
    let config = d.dir().join("keyhaven.toml");
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&activated)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=KEYHAVEN_LOG=info")
        .arg("--")
        .arg(bin("keyhavend"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (from the systemd package)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !activated.exists() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon on the socket systemd made.
    let c = Client::connect(&activated).await.unwrap();
    assert_eq!(c.health().await.unwrap().status, "ok");
    assert!(next_state(&notify).starts_with("READY=1"));
    assert!(!d.socket().exists(), "an activated daemon binds no socket of its own");

    signal(child.id(), "HUP");
    let reloading = next_state(&notify);
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert!(next_state(&notify).starts_with("READY=1"));
    assert_eq!(c.health().await.unwrap().status, "ok");
    drop(c);

    signal(child.id(), "TERM");
    assert!(next_state(&notify).starts_with("STOPPING=1"));
    let out = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (status, err)
    })
    .await
    .unwrap();
    assert_eq!(out.0.code(), Some(0), "{}", out.1);
    assert!(out.1.contains("using the socket passed by systemd"), "{}", out.1);
    // The test activates on another path than the config's `socket`: said.
    assert!(out.1.contains("is not the config's `socket`"), "{}", out.1);
    assert!(activated.exists(), "the socket belongs to systemd: the daemon leaves it in place");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_16_clients_answers_every_processed_request_and_exits_0() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/load")).await.unwrap();
    drop(c);

    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = d.client().await;
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = None;
            let mut cut = None;
            for n in 0.. {
                let msg = format!("client {i} message {n}");
                match c.encrypt(&path("acme/load"), msg.as_bytes(), &ctx(&[])).await {
                    Ok(enc) => {
                        answered.fetch_add(1, Ordering::SeqCst);
                        last = Some((enc.ciphertext, msg));
                    }
                    Err(e) if e.code().is_some() => panic!("the daemon answered with an error: {e}"),
                    // The daemon stopped reading: this request was never accepted.
                    Err(e) => {
                        cut = Some(e.to_string());
                        break;
                    }
                }
            }
            (last, cut)
        }));
    }
    // Let the load run, then stop the daemon in the middle of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = answered.load(Ordering::SeqCst);
    assert!(before > 16, "the load is running ({before} answers)");
    let (status, log) = tokio::task::block_in_place(|| d.stop());
    assert_eq!(status.code(), Some(0), "SIGTERM under load must exit 0:\n{log}");
    assert!(log.contains("SIGTERM: draining") && log.contains("stopped"), "{log}");
    assert!(!log.contains("still running"), "the drain finished in time:\n{log}");
    let mut samples = Vec::new();
    for t in tasks {
        let (last, cut) = t.await.unwrap();
        assert!(cut.is_some(), "every client is cut off once the daemon is gone");
        samples.extend(last);
    }
    let answered = answered.load(Ordering::SeqCst);
    eprintln!(
        "{answered} encrypts answered ({before} before SIGTERM); all 16 clients cut off after the drain"
    );

    // The store opens cleanly; every answered ciphertext decrypts; and the
    // audit log (written before each answer) holds exactly as many
    // successful encrypts as the clients received: none was processed and
    // then left unanswered.
    d.start_again();
    let c = d.client().await;
    assert_eq!(c.health().await.unwrap().status, "ok");
    assert_eq!(c.key_list(None).await.unwrap().len(), 1);
    for (ct, msg) in &samples {
        assert_eq!(c.decrypt(ct, &ctx(&[])).await.unwrap().plaintext.expose(), msg.as_bytes());
    }
    let export = d.cli(&["audit", "export", "--since", "1h"], b"");
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let audited = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["op"] == "encrypt" && r["outcome"] == "ok")
        .count();
    assert_eq!(audited, answered, "processed encrypts (audited) vs answered ones");
    let verify = d.cli(&["audit", "verify"], b"");
    assert!(
        verify.status.success(),
        "the audit chain is intact after the stop: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
