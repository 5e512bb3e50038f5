//! Audit log retention (docs/AUDIT.md §12) on a real daemon with small
//! segments (`KEYHAVEN_TEST_AUDIT_SEGMENT_BYTES`): archived segments are
//! gzip files the `gzip` CLI reads, `audit verify` passes on the live log
//! after the cut, `audit verify --archive` (alone, and with the live
//! log's export) checks the whole chain; a flipped byte in an archive, a
//! removed archive, a removed middle live segment and a removed boundary
//! are caught; records a sink has not shipped are never removed; a failed
//! run is an audit record with outcome `error`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keyhaven::wire::AuditRecord;
use keyhaven::Client;
use keyhaven_tests::*;

/// 16 KiB segments: a few dozen records each.
fn small_segments() {
    std::env::set_var("KEYHAVEN_TEST_AUDIT_SEGMENT_BYTES", "16384");
}

fn set_config(d: &mut TestDaemon, extra: &str) {
    let extra = extra.to_owned();
    d.restart_with(move |dir| {
        let file = dir.join("keyhaven.toml");
        let mut text = std::fs::read_to_string(&file).unwrap();
        if let Some(at) = text.find("\n# retention-test\n") {
            text.truncate(at);
        }
        // A seal every 20 ms: each small segment holds seals.
        text = text.replace("seal_interval_ms = 1000", "seal_interval_ms = 20");
        text.push_str("\n# retention-test\n");
        text.push_str(&extra);
        std::fs::write(&file, text).unwrap();
    });
}

/// `n` encryptions: about `n` records.
async fn traffic(c: &Client, n: usize) {
    let key = path("ret/k");
    let _ = c.key_create(&key).await;
    for i in 0..n {
        c.encrypt(&key, format!("message {i}").as_bytes(), &ctx(&[])).await.unwrap();
    }
}

async fn retention_records(c: &Client) -> Vec<AuditRecord> {
    audit_records(c).await.into_iter().filter(|r| r.op == "audit_retention").collect()
}

/// Waits (up to 30 s) for a retention record that `want` accepts.
async fn wait_for(c: &Client, what: &str, want: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = retention_records(c).await.into_iter().find(|r| want(r)) {
            return r;
        }
        assert!(Instant::now() < deadline, "no retention record ({what}) within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn archives(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".log.gz")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

fn fails(out: &std::process::Output, needle: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(needle), "`{needle}` not in: {text}");
    text
}

fn offline(args: &[&str]) -> std::process::Output {
    Command::new(bin("keyhaven")).args(args).output().unwrap()
}

fn gzip(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip (Debian package gzip)");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_segments_stay_verifiable_and_tampering_is_caught() {
    small_segments();
    let mut d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    set_config(
        &mut d,
        &format!(
            "[audit.retention]\nafter = \"1s\"\naction = \"archive\"\narchive_dir = \"{}\"\ncheck_every = \"1s\"\n",
            archive.display()
        ),
    );
    let c = d.client().await;
    traffic(&c, 150).await;
    let r = wait_for(&c, "archive", |r| r.outcome == "ok").await;
    assert_eq!(r.actor.as_deref(), Some("daemon"));
    let after = r.after.clone().unwrap();
    assert_eq!(after["action"], "archive");
    assert_eq!(after["from"], 1);
    let first_kept = after["first_kept"].as_u64().unwrap();
    assert!(first_kept > 1 && after["records"].as_u64() == Some(first_kept - 1), "{after}");
    assert!(r.detail.as_deref().unwrap().contains("archived"), "{r:?}");
    let files = archives(&archive);
    assert!(files.len() >= 2, "{files:?}");
    // The live log starts at the boundary; the archived segments are gone from it.
    let live = audit_segments(&d.store_dir());
    assert!(!live.iter().any(|p| p.ends_with("00000000000000000001.log")), "{live:?}");

    // A third party reads an archive with the standard gzip tool: intact
    // frames, the first of which is the record the file is named after.
    let plain = Command::new("gzip").arg("-dc").arg(&files[0]).output().unwrap();
    assert!(plain.status.success());
    let seg = work.path().join("00000000000000000001.log");
    std::fs::write(&seg, &plain.stdout).unwrap();
    let frames = read_audit_frames(&seg);
    assert_eq!((frames[0].1.kind, frames[0].1.seq), (b'r', 1));
    assert_eq!(frames.iter().map(|(_, f)| 13 + f.value.len() + 32).sum::<usize>(), plain.stdout.len());

    // The live log verifies after the cut, and says where it starts.
    let out = ok(&d.cli(&["audit", "verify"], b""));
    assert!(out.contains("starts at record"), "{out}");
    // The archive offline, with the signed heads; then archive + live export: the whole chain.
    let pem = work.path().join("audit.pem");
    std::fs::write(&pem, ok(&d.cli(&["audit", "public-key"], b"")).trim_end().to_owned() + "\n").unwrap();
    let (a, p) = (archive.to_str().unwrap(), pem.to_str().unwrap());
    let out = ok(&offline(&["audit", "verify", "--archive", a, "--public-key", p]));
    assert!(out.contains("intact: records 1 to"), "{out}");
    let export = work.path().join("live.jsonl");
    let text = d.cli(&["audit", "export", "--signed"], b"");
    std::fs::write(&export, &text.stdout).unwrap();
    let e = export.to_str().unwrap();
    let out = ok(&offline(&["audit", "verify", "--archive", a, "--file", e, "--public-key", p]));
    assert!(out.contains("intact: records 1 to"), "{out}");
    assert!(out.contains("signed heads verified"), "{out}");

    // Attacks on the archive, each on a copy.
    let attack = |name: &str, change: &dyn Fn(&Path)| -> String {
        let dir = work.path().join(name);
        copy_dir(&archive, &dir);
        change(&dir);
        let out = offline(&["audit", "verify", "--archive", dir.to_str().unwrap(), "--public-key", p]);
        format!(
            "{}{}{}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // A byte of a record flipped, recompressed with gzip: the frame's checksum fails.
    let out = attack("flipped", &|dir| {
        let f = &archives(dir)[1];
        let mut plain = gzip(&["-dc"], &std::fs::read(f).unwrap());
        let at = plain.windows(7).position(|w| w == b"encrypt").unwrap();
        plain[at] ^= 0x20;
        std::fs::write(f, gzip(&["-c"], &plain)).unwrap();
    });
    assert!(out.starts_with('1') && out.contains("NOT intact") && out.contains("altered"), "{out}");
    // ... and with the frame checksum recomputed too: the chain fails.
    let out = attack("rechained", &|dir| {
        let f = &archives(dir)[0];
        let tmp = dir.join("plain");
        std::fs::write(&tmp, gzip(&["-dc"], &std::fs::read(f).unwrap())).unwrap();
        let mut frames: Vec<AuditFrame> = read_audit_frames(&tmp).into_iter().map(|(_, f)| f).collect();
        std::fs::remove_file(&tmp).unwrap();
        let i = frames.iter().position(|f| f.kind == b'r' && f.seq == 3).unwrap();
        let at = frames[i].value.windows(6).position(|w| w == b"\"op\":\"").unwrap();
        frames[i].value[at + 6] ^= 0x20;
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        std::fs::write(f, gzip(&["-c"], &bytes)).unwrap();
    });
    assert!(out.starts_with('1') && out.contains("NOT intact at record"), "{out}");
    // A byte of the gzip file itself.
    let out = attack("gz", &|dir| {
        let f = &archives(dir)[0];
        let mut bytes = std::fs::read(f).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(f, bytes).unwrap();
    });
    assert!(out.starts_with('1') && out.contains("NOT intact"), "{out}");
    // A middle archive removed.
    let out = attack("removed", &|dir| std::fs::remove_file(&archives(dir)[1]).unwrap());
    assert!(out.starts_with('1') && out.contains("missing"), "{out}");

    // The live log: no more retention for now; more segments; then a
    // middle one removed while the daemon is stopped.
    set_config(
        &mut d,
        &format!(
            "[audit.retention]\nafter = \"1h\"\naction = \"archive\"\narchive_dir = \"{}\"\n",
            archive.display()
        ),
    );
    let c = d.client().await;
    traffic(&c, 150).await;
    ok(&d.cli(&["audit", "verify"], b""));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let store = d.store_dir();
    let live = audit_segments(&store);
    assert!(live.len() >= 3, "{live:?}");
    let hidden = work.path().join("hidden.log");
    std::fs::rename(&live[1], &hidden).unwrap();
    d.start_again();
    fails(&d.cli(&["audit", "verify"], b""), "missing");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    std::fs::rename(&hidden, &live[1]).unwrap();
    // The boundary removed: the records before it are missing, and said so.
    let boundary = store.join("audit/boundary.json");
    let kept = std::fs::read(&boundary).unwrap();
    std::fs::remove_file(&boundary).unwrap();
    d.start_again();
    fails(&d.cli(&["audit", "verify"], b""), "missing");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // A boundary moved further on (as if more had been removed): no retention record vouches for it.
    let mut b: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    let moved = live[2].file_name().unwrap().to_string_lossy()[..20].parse::<u64>().unwrap();
    b["first"] = moved.into();
    std::fs::write(&boundary, serde_json::to_vec(&b).unwrap()).unwrap();
    d.start_again();
    fails(&d.cli(&["audit", "verify"], b""), "NOT intact");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    std::fs::write(&boundary, &kept).unwrap();
    d.start_again();
    ok(&d.cli(&["audit", "verify"], b""));
}

/// `keyhaven health`'s JSON and its stderr.
fn health(d: &TestDaemon) -> (serde_json::Value, String) {
    let out = d.cli(&["health"], b"");
    (serde_json::from_slice(&out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshipped_records_stay_sinks_show_in_health_and_a_failed_run_is_audited() {
    small_segments();
    let mut d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    // A syslog sink whose socket does not exist: it ships nothing.
    let gone = work.path().join("gone.sock");
    set_config(
        &mut d,
        &format!(
            "[[audit.sink]]\nname = \"siem\"\ntype = \"syslog\"\npath = \"{}\"\n\n[audit.retention]\nafter = \"1s\"\naction = \"delete\"\ncheck_every = \"1s\"\n",
            gone.display()
        ),
    );
    let c = d.client().await;
    traffic(&c, 120).await;
    let before = audit_segments(&d.store_dir());
    assert!(before.len() >= 3, "{before:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let now = audit_segments(&d.store_dir());
    assert!(
        before.iter().all(|p| now.contains(p)),
        "a segment no sink shipped was removed: {before:?} {now:?}"
    );
    assert!(retention_records(&c).await.is_empty());
    assert!(!d.store_dir().join("audit/boundary.json").exists());
    // health names the sink, its state and why.
    let (h, err) = health(&d);
    let s = &h["audit_sinks"][0];
    assert_eq!(
        (&s["name"], &s["type"], &s["state"]),
        (&"siem".into(), &"syslog".into(), &"failing".into()),
        "{h}"
    );
    assert_eq!(s["delivered"], 0, "{h}");
    assert!(s["lag"].as_u64().unwrap() > 100, "{h}");
    assert!(!s["error"].as_str().unwrap().is_empty(), "{h}");
    assert!(err.contains("audit sink `siem` (syslog) is failing"), "{err}");

    // The receiver comes (a datagram socket at the path): the sink ships,
    // health says ok, and then retention deletes.
    let rx = std::os::unix::net::UnixDatagram::bind(&gone).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, rx2) = (stop.clone(), rx.try_clone().unwrap());
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if rx2.recv(&mut buf).is_ok() {
                n += 1;
            }
        }
        n
    });
    let r = wait_for(&c, "delete", |r| r.outcome == "ok").await;
    assert_eq!(r.after.as_ref().unwrap()["action"], "delete");
    assert!(!audit_segments(&d.store_dir()).contains(&before[0]));
    let (h, err) = health(&d);
    assert_eq!(h["audit_sinks"][0]["state"], "ok", "{h}");
    assert!(
        h["audit_sinks"][0]["delivered"].as_u64().unwrap()
            >= r.after.as_ref().unwrap()["through"].as_u64().unwrap()
    );
    assert!(h["audit_sinks"][0].get("error").is_none(), "{h}");
    assert!(!err.contains("audit sink"), "{err}");
    let out = ok(&d.cli(&["audit", "verify"], b""));
    assert!(out.contains("starts at record"), "{out}");
    // Reading the log from its start still works.
    assert!(audit_records(&c).await[0].seq > 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(drain.join().unwrap() > 100);

    // An archive folder that cannot be made (a file is in the way): a
    // failed run, audited, nothing removed.
    traffic(&c, 120).await;
    let blocked = work.path().join("blocked");
    std::fs::write(&blocked, b"not a folder").unwrap();
    set_config(
        &mut d,
        &format!(
            "[audit.retention]\nafter = \"1s\"\naction = \"archive\"\narchive_dir = \"{}\"\ncheck_every = \"1s\"\n",
            blocked.display()
        ),
    );
    let kept = audit_segments(&d.store_dir());
    let c = d.client().await;
    let r = wait_for(&c, "failed", |r| r.outcome == "error").await;
    assert_eq!(r.actor.as_deref(), Some("daemon"));
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains("failed") && reason.contains(blocked.to_str().unwrap()), "{r:?}");
    assert!(r.code.is_some(), "{r:?}");
    assert_eq!(audit_segments(&d.store_dir())[0], kept[0], "nothing removed by a failed run");
    assert!(h.get("audit_sinks").is_some());
    assert!(health(&d).0.get("audit_sinks").is_none(), "no sinks, no field");

    // `keyhavend store copy` takes the boundary along: the copy verifies.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let config = d.dir().join("keyhaven.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let (from, to) = (
        format!("store = {:?}", d.store_dir().display()),
        format!("store = {:?}", work.path().join("copy").display()),
    );
    assert!(text.contains(&from), "{text}");
    let copy_config = work.path().join("copy.toml");
    std::fs::write(&copy_config, text.replace(&from, &to)).unwrap();
    let out = Command::new(bin("keyhavend"))
        .args(["store", "copy", "--from"])
        .arg(&config)
        .arg("--to")
        .arg(&copy_config)
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    ok(&out);
    std::fs::copy(&copy_config, &config).unwrap();
    d.start_again();
    let out = ok(&d.cli(&["audit", "verify"], b""));
    assert!(out.contains("starts at record"), "{out}");
}

#[test]
fn bad_retention_configs_are_refused_naming_the_key() {
    let mut d = TestDaemon::start();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let config = d.dir().join("keyhaven.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let store = d.store_dir();
    let inside = format!("archive_dir = \"{}/old\"", store.display());
    for (section, want) in [
        ("after = \"soon\"\naction = \"delete\"", "audit.retention.after"),
        ("after = \"0s\"\naction = \"delete\"", "must be from 1s"),
        ("after = \"90d\"\naction = \"shred\"", "audit.retention.action"),
        ("after = \"90d\"\naction = \"archive\"", "audit.retention.archive_dir"),
        ("after = \"90d\"\naction = \"archive\"\narchive_dir = \"rel\"", "must be an absolute path"),
        (&format!("after = \"90d\"\naction = \"archive\"\n{inside}"), "outside the store"),
        ("after = \"90d\"\naction = \"delete\"\narchive_dir = \"/srv/a\"", "audit.retention.archive_dir"),
        ("after = \"90d\"\naction = \"delete\"\ncheck_every = \"0s\"", "audit.retention.check_every"),
        ("after = \"90d\"\naction = \"delete\"\nkeep = 3", "unknown field `keep`"),
        ("action = \"delete\"", "missing field `after`"),
    ] {
        std::fs::write(&config, format!("{original}\n[audit.retention]\n{section}\n")).unwrap();
        let out = d.run_once();
        let t = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{section}: started: {t}");
        assert!(t.contains(want), "{section}: expected `{want}` in: {t}");
    }
    std::fs::write(&config, original).unwrap();
}
