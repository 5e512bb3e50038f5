//! `keyhaven audit tail` against the real daemon (docs/AUDIT.md §7):
//! `-f -n 0` prints only new records, `--after SEQ` exactly those after
//! SEQ, and `-f` goes on across a clean restart and a kill -9 of the
//! daemon with every record printed once: no duplicate, no gap.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use keyhaven::wire::AuditRecord;
use keyhaven::Client;
use keyhaven_tests::*;

/// `keyhaven audit tail ARGS --json`, its stdout lines sent to a channel.
fn spawn_tail(d: &TestDaemon, args: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(bin("keyhaven"))
        .arg("--socket")
        .arg(d.socket())
        .args(["audit", "tail", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Reads printed records until one satisfies `until` (or 20 s pass).
fn read_until(rx: &Receiver<String>, seen: &mut Vec<AuditRecord>, until: impl Fn(&AuditRecord) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "tail -f did not print what was expected: {seen:?}");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let r: AuditRecord = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let done = until(&r);
            seen.push(r);
            if done {
                return;
            }
        }
    }
}

async fn some_records(d: &TestDaemon, name: &str, n: usize) {
    let c = d.client().await;
    let key = path(&format!("acme/{name}"));
    c.key_create(&key).await.unwrap();
    for i in 0..n {
        c.encrypt(&key, format!("{i}").as_bytes(), &ctx(&[])).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_across_a_restart_and_a_kill_with_no_duplicate_and_no_gap() {
    let mut d = TestDaemon::start();
    some_records(&d, "old", 30).await;
    // The newest record when the tail starts: the record of this read.
    let head = audit_records(&d.client().await).await.last().unwrap().seq + 1;

    // -f -n 0: nothing from before, only what comes.
    let (mut tail, rx) = spawn_tail(&d, &["-f", "-n", "0"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(rx.try_recv().is_err(), "-n 0 printed an old record");
    let mut seen = Vec::new();
    some_records(&d, "first", 10).await;
    read_until(&rx, &mut seen, |r| r.op == "encrypt" && r.key.as_deref() == Some("first"));
    assert!(seen[0].seq > head, "printed a record from before it started: {:?}", seen[0]);

    // A clean restart, then a kill -9 in the middle of writes.
    d.restart();
    some_records(&d, "second", 10).await;
    let socket = d.socket().to_owned();
    let writer = tokio::spawn(async move {
        let c = Client::connect(&socket).await.unwrap();
        let key = path("acme/second");
        // Until the kill cuts it off.
        for i in 0..100_000 {
            if c.encrypt(&key, format!("{i}").as_bytes(), &ctx(&[])).await.is_err() {
                return i;
            }
        }
        100_000
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(d.pid(), "KILL");
    let (status, _) = d.stop();
    assert!(!status.success());
    let written = writer.await.unwrap();
    assert!(written > 0, "the writer wrote nothing before the kill");
    std::thread::sleep(Duration::from_millis(800));
    d.start_again();
    some_records(&d, "last", 5).await;
    read_until(&rx, &mut seen, |r| {
        r.op == "encrypt" && r.key.as_deref() == Some("last") && r.outcome == "ok"
    });
    // Let it catch up with the last one's neighbours, then stop it.
    std::thread::sleep(Duration::from_millis(1200));
    seen.extend(rx.try_iter().map(|l| serde_json::from_str::<AuditRecord>(&l).unwrap()));
    let _ = tail.kill();
    let _ = tail.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(tail.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("connecting again to go on after record"), "{stderr}");

    // Exactly the log's records after `head`, less its own reads, once each
    // and in order.
    let own = Some(tail.id() as i32);
    let want: Vec<u64> = audit_records(&d.client().await)
        .await
        .into_iter()
        .filter(|r| r.seq > head && !(r.op == "audit_read" && r.caller.pid == own))
        .map(|r| r.seq)
        .collect();
    let got: Vec<u64> = seen.iter().map(|r| r.seq).collect();
    let last_seen = *got.last().unwrap();
    let want: Vec<u64> = want.into_iter().filter(|s| *s <= last_seen).collect();
    assert_eq!(got, want, "printed records differ from the log's (duplicates or gaps)");
    assert!(
        seen.iter().any(|r| r.op == "alert" && r.unsealed.is_some()),
        "the kill's unsealed alert is shown"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_seq_prints_exactly_the_records_after_it() {
    let d = TestDaemon::start();
    some_records(&d, "k", 25).await;
    let records = audit_records(&d.client().await).await;
    let from = records[9].seq;
    let out = d.cli(&["audit", "tail", "--json", "--after", &from.to_string()], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().seq)
        .collect();
    // Its own read is recorded after its answer: up to the one before.
    let records = audit_records(&d.client().await).await;
    assert_eq!(records.iter().find(|r| r.seq == got.last().unwrap() + 1).unwrap().op, "audit_read");
    let want: Vec<u64> =
        records.iter().map(|r| r.seq).filter(|s| *s > from && s <= got.last().unwrap()).collect();
    assert_eq!(got, want);
    // -n and --after do not go together; a bad SEQ is a usage error.
    let out = d.cli(&["audit", "tail", "-n", "3", "--after", "4"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["audit", "tail", "--after", "-1"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // -n 0 without -f prints nothing.
    let out = d.cli(&["audit", "tail", "-n", "0"], b"");
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
}
