//! Audit sinks against real receivers (docs/AUDIT.md §11): the JSON-lines
//! file read back and its chain checked across rotations, a kill -9 of the
//! daemon in the middle of shipping (every record at least once, no gap),
//! a file outage and recovery; syslog to a real `rsyslogd -n` on a Unix
//! socket in a temp dir, and `on_lag = "wait"` refusing requests while the
//! syslog receiver is away, then serving once it is back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhaven::wire::{AuditRead, AuditRecord};
use keyhaven::{Client, ErrorCode};
use keyhaven_tests::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

async fn head(c: &Client) -> u64 {
    c.call(&AuditRead { last: Some(1), ..Default::default() }).await.unwrap().next
}

fn add_sinks(d: &mut TestDaemon, sinks: &str) {
    let sinks = sinks.to_owned();
    d.restart_with(move |dir| {
        let file = dir.join("keyhaven.toml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push('\n');
        text.push_str(&sinks);
        std::fs::write(&file, text).unwrap();
    });
}

#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    #[serde(default)]
    hash: Option<String>,
    node: String,
    #[serde(borrow, default)]
    record: Option<&'a RawValue>,
    #[serde(borrow, default)]
    seal: Option<&'a RawValue>,
}

/// Every record line of the files matching `FILE*` in `dir`: seq → (hash,
/// raw record); duplicates must be the same record. Returns also the
/// number of lines, seals and files.
fn read_shipped(files: &[PathBuf]) -> (BTreeMap<u64, (String, String)>, usize, usize) {
    let mut out: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let (mut lines, mut seals) = (0, 0);
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        for l in text.lines() {
            lines += 1;
            let line: Line = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(!line.node.is_empty());
            if line.seal.is_some() {
                seals += 1;
                continue;
            }
            let raw = line.record.expect("a record or a seal").get().to_owned();
            let hash = line.hash.expect("a record line has its hash");
            assert_eq!(hash, hex(&Sha256::digest(raw.as_bytes())), "the hash is the record's as shipped");
            let r: AuditRecord = serde_json::from_str(&raw).unwrap();
            assert_eq!(r.seq, line.seq);
            if let Some((h, _)) = out.get(&line.seq) {
                assert_eq!(h, &hash, "record {} shipped twice, differently", line.seq);
            }
            out.insert(line.seq, (hash, raw));
        }
    }
    (out, lines, seals)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The records 1..=head are all there and chained.
#[track_caller]
fn check_chain(got: &BTreeMap<u64, (String, String)>, from: u64, head: u64) {
    let missing: Vec<u64> = (from..=head).filter(|s| !got.contains_key(s)).collect();
    assert!(missing.is_empty(), "records not shipped: {missing:?}");
    for seq in from + 1..=head {
        let r: AuditRecord = serde_json::from_str(&got[&seq].1).unwrap();
        assert_eq!(r.prev, got[&(seq - 1)].0, "record {seq}'s prev is record {}'s hash", seq - 1);
    }
}

fn files_of(dir: &Path, base: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p: &PathBuf| p.file_name().unwrap().to_string_lossy().starts_with(base))
        .collect();
    v.sort();
    v
}

/// Waits until `files` hold record `head` (or 20 s pass).
fn wait_for(files: impl Fn() -> Vec<PathBuf>, head: u64) -> BTreeMap<u64, (String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (got, _, _) = read_shipped(&files());
        if got.contains_key(&head) {
            return got;
        }
        assert!(Instant::now() < deadline, "record {head} not shipped; last {:?}", got.keys().last());
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn write_some(c: &Client, key: &str, n: usize) {
    for i in 0..n {
        c.encrypt(&path(key), format!("{i}").as_bytes(), &ctx(&["row=1"])).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_sink_ships_every_record_across_rotation_a_kill_and_an_outage() {
    let mut d = TestDaemon::start();
    let ship = d.dir().join("ship");
    std::fs::create_dir(&ship).unwrap();
    let file = ship.join("audit.jsonl");
    add_sinks(
        &mut d,
        &format!(
            "[[audit.sink]]\ntype = \"file\"\npath = \"{}\"\nmax_bytes = 16384\nkeep = 1000\n",
            file.display()
        ),
    );
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    // Three bursts, each shipped before the next, each over 16 KiB (the
    // file rotates between deliveries, so one big delivery would not).
    let mut h = 0;
    for _ in 0..3 {
        write_some(&c, "acme/pii", 40).await;
        h = head(&c).await;
        wait_for(|| files_of(&ship, "audit.jsonl"), h);
    }
    let got = wait_for(|| files_of(&ship, "audit.jsonl"), h);
    check_chain(&got, 1, h);
    let files = files_of(&ship, "audit.jsonl");
    assert!(files.len() >= 3, "16 KiB files rotated: {files:?}");
    // The timer's seal comes after its records were shipped: it follows.
    std::thread::sleep(Duration::from_millis(1800));
    let (_, _, seals) = read_shipped(&files_of(&ship, "audit.jsonl"));
    assert!(seals >= 1, "the seals are shipped too");
    assert!(d.store_dir().join("audit-sinks/file.cursor").exists());

    // kill -9 while records are written and shipped.
    drop(c);
    let socket = d.socket().to_owned();
    let writer = tokio::spawn(async move {
        let c = Client::connect(&socket).await.unwrap();
        let mut n = 0;
        while c.encrypt(&path("acme/pii"), b"x", &ctx(&["row=1"])).await.is_ok() {
            n += 1;
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    signal(d.pid(), "KILL");
    let _ = d.stop();
    assert!(writer.await.unwrap() > 0);
    d.start_again();
    let c = d.client().await;
    write_some(&c, "acme/pii", 5).await;
    let h = head(&c).await;
    let got = wait_for(|| files_of(&ship, "audit.jsonl"), h);
    check_chain(&got, 1, h);

    // Outage: the folder goes away; records keep coming; it comes back.
    let away = d.dir().join("ship-away");
    std::fs::rename(&ship, &away).unwrap();
    write_some(&c, "acme/pii", 20).await;
    let during = head(&c).await;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!ship.exists(), "the sink does not make the folder");
    std::fs::create_dir(&ship).unwrap();
    write_some(&c, "acme/pii", 3).await;
    let h = head(&c).await;
    let got = wait_for(|| [files_of(&away, "audit.jsonl"), files_of(&ship, "audit.jsonl")].concat(), h);
    check_chain(&got, 1, h);
    assert!(during < h);
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("audit sink cannot deliver"), "the outage is logged: {log}");
    assert!(log.contains("audit sink delivers again"), "{log}");
    // A clean stop ships what is durable: the last records and the seal
    // of the head, whose `head` is the shipped record's hash.
    let files = [files_of(&away, "audit.jsonl"), files_of(&ship, "audit.jsonl")].concat();
    let (got, _, _) = read_shipped(&files);
    let last = *got.keys().last().unwrap();
    let text = std::fs::read_to_string(files_of(&ship, "audit.jsonl").last().unwrap()).unwrap();
    let seal: serde_json::Value =
        serde_json::from_str(text.lines().rev().find(|l| l.contains("\"seal\"")).unwrap()).unwrap();
    assert_eq!(seal["seal"]["seq"], last, "{seal}");
    assert_eq!(seal["seal"]["head"].as_str().unwrap(), got[&last].0);
}

/// A real rsyslogd, in the foreground, listening on `dir/log.sock` and
/// writing every message it gets, as received, to `dir/out.log`.
struct Rsyslogd {
    child: Child,
    socket: PathBuf,
    out: PathBuf,
}

impl Rsyslogd {
    fn start(dir: &Path) -> Option<Rsyslogd> {
        let bin = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"].into_iter().find(|p| Path::new(p).exists())?;
        let (socket, out) = (dir.join("log.sock"), dir.join("out.log"));
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{dir}\" maxMessageSize=\"64k\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{socket}\" UseSpecialParser=\"off\" ParseHostname=\"on\" \
                 UseSysTimeStamp=\"off\" IgnoreOwnMessages=\"off\")\n\
                 template(name=\"raw\" type=\"string\" string=\"%syslogpriority% %msgid% %structured-data% %msg%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{out}\" template=\"raw\" flushOnTXEnd=\"on\" asyncWriting=\"off\")\n",
                dir = dir.display(),
                socket = socket.display(),
                out = out.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["-n", "-i"])
            .arg(dir.join("rsyslogd.pid"))
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "rsyslogd did not make its socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Rsyslogd { child, socket, out })
    }
}

impl Drop for Rsyslogd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_reaches_a_real_rsyslogd_and_on_lag_wait_fails_closed_while_it_is_away() {
    let mut d = TestDaemon::start();
    let rdir = tempfile::tempdir().unwrap();
    let Some(rsyslog) = Rsyslogd::start(rdir.path()) else {
        panic!("rsyslogd is not installed: run softhsm/install.sh (Debian package rsyslog)");
    };
    let sock = rsyslog.socket.clone();
    add_sinks(
        &mut d,
        &format!(
            "[[audit.sink]]\ntype = \"syslog\"\npath = \"{}\"\non_lag = \"wait\"\nmax_lag = 5\nwait_ms = 300\n",
            sock.display()
        ),
    );
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    write_some(&c, "acme/pii", 20).await;
    let h = head(&c).await;
    // rsyslogd's file: PRI MSGID SD MSG per line.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeMap::new();
    while !seen.contains_key(&h) {
        assert!(Instant::now() < deadline, "rsyslogd did not get record {h}: {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&rsyslog.out).unwrap_or_default();
        for l in text.lines() {
            let (pri, rest) = l.split_once(' ').unwrap();
            let (msgid, rest) = rest.split_once(' ').unwrap();
            assert_eq!(msgid, "audit", "{l}");
            let (sd, msg) = rest.split_once("] ").unwrap_or_else(|| panic!("{l}"));
            assert!(sd.starts_with("[keyhaven@32473 seq=\""), "{l}");
            let r: AuditRecord = serde_json::from_str(msg.trim()).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(sd.contains(&format!("seq=\"{}\"", r.seq)), "{l}");
            assert!(sd.contains(&format!("hash=\"{}\"", hex(&Sha256::digest(msg.trim().as_bytes())))), "{l}");
            assert!(sd.contains("node=\""), "{l}");
            let want = match r.outcome.as_str() {
                "ok" => "6",
                "denied" => "5",
                "alert" => "3",
                _ => "4",
            };
            assert_eq!(pri, want, "severity by outcome: {l}");
            seen.insert(r.seq, r);
        }
    }
    let missing: Vec<u64> = (1..=h).filter(|s| !seen.contains_key(s)).collect();
    assert!(missing.is_empty(), "not received by rsyslogd: {missing:?}");

    // The receiver goes away: within max_lag requests go on, then they wait
    // wait_ms and fail closed with a named error.
    drop(rsyslog);
    let _ = std::fs::remove_file(&sock);
    let mut refused = None;
    for _ in 0..30 {
        match c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("requests were not held back by the lagging sink");
    assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}");
    assert!(e.to_string().contains("audit sink `syslog` is"), "{e}");
    // Back: everything it missed arrives, and requests are served again.
    let back = Rsyslogd::start(rdir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.encrypt(&path("acme/pii"), b"again", &ctx(&[])).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "not served after the receiver came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let h2 = head(&c).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&back.out).unwrap_or_default();
        let seqs: Vec<u64> =
            text.lines().filter_map(|l| l.split("seq=\"").nth(1)?.split('"').next()?.parse().ok()).collect();
        if (h + 1..h2).all(|s| seqs.contains(&s) || seen.contains_key(&s)) {
            break;
        }
        assert!(Instant::now() < deadline, "records of the outage not delivered after it: {seqs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("audit sink is lagging"), "{log}");
}
