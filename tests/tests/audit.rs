//! The audit log against the real daemon, token and store (docs/AUDIT.md):
//! the records each operation leaves, `audit verify` on an untouched log
//! and after each kind of tampering done to the segment files of the
//! stopped daemon's store, a torn tail, a crash, the move of an old store's
//! log out of sled, and no secret anywhere in it.

use std::path::Path;
use std::process::Output;

use base64::Engine as _;
use keyhaven::wire::AuditRecord;
use keyhaven_tests::*;
use serde_json::json;
use sha2::{Digest, Sha256};

fn out_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What one record says, without time, chain and caller.
#[derive(Debug, PartialEq)]
struct Says<'a> {
    op: &'a str,
    key: Option<&'a str>,
    version: Option<u32>,
    envelope_id: Option<&'a str>,
    context_keys: &'a [&'a str],
    outcome: &'a str,
    code: Option<&'a str>,
}

fn says(r: &AuditRecord) -> Says<'_> {
    Says {
        op: &r.op,
        key: None,
        version: r.version,
        envelope_id: r.envelope_id.as_deref(),
        context_keys: &[],
        outcome: &r.outcome,
        code: r.code.as_deref(),
    }
}

#[track_caller]
fn check(r: &AuditRecord, want: Says) {
    let key = match (&r.tenant, &r.key) {
        (Some(t), Some(k)) => Some(format!("{t}/{k}")),
        (Some(t), None) => Some(t.clone()),
        _ => None,
    };
    assert_eq!(key.as_deref(), want.key, "record {}: {r:?}", r.seq);
    assert_eq!(r.context_keys, want.context_keys, "record {}: {r:?}", r.seq);
    assert_eq!(Says { key: None, context_keys: &[], ..want }, says(r), "record {}: {r:?}", r.seq);
}

const SECRET: &[u8] = b"sk-live-AUDIT-must-never-see-this-9f8e7d";

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_leaves_exactly_the_record_described() {
    let mut d = TestDaemon::start();
    let context = ctx(&["user=ctxvalue-4242", "table=ctxvalue-providers"]);
    let (enc, dk) = {
        let c = d.client().await; // `hello`: not recorded (docs/AUDIT.md §1)
        c.key_create(&path("acme/pii")).await.unwrap(); // 1
        let enc = c.encrypt(&path("acme/pii"), SECRET, &context).await.unwrap(); // 2
        c.decrypt(&enc.ciphertext, &context).await.unwrap(); // 3
        let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap(); // 4
        c.datakey_decrypt(&dk.envelope, &context).await.unwrap(); // 5
        c.encrypt(&path("acme/nope"), b"x", &ctx(&[])).await.unwrap_err(); // 6
        c.decrypt(&enc.ciphertext, &ctx(&["user=ctxvalue-other"])).await.unwrap_err(); // 7
        c.call_raw("encrypt", json!({"tenant": "acme"})).await.unwrap_err(); // 8
        c.call_raw("frobnicate", json!({})).await.unwrap_err(); // 9
        c.health().await.unwrap(); // not recorded
        c.key_list(Some("acme")).await.unwrap(); // 10
        (enc, dk)
    };
    // Root keeps acme/* and the admin side; beta is not granted.
    d.write_policy(
        r#"
[[policy.rules]]
principals = ["uid:0"]
operations = ["*"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["uid:0"]
operations = ["audit-read", "admin"]
keys = ["*"]
"#,
    );
    d.restart();
    let c = d.client().await;
    let e = c.encrypt(&path("beta/pii"), SECRET, &context).await.unwrap_err(); // 11
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
    let records = audit_records(&c).await;
    assert_eq!(records.len(), 11, "{records:#?}");

    let ck: &[&str] = &["table", "user"];
    let env_id = Some(enc.envelope_id.as_str());
    let dk_id = Some(dk.envelope_id.as_str());
    let want = [
        Says {
            op: "key_create",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: None,
            context_keys: &[],
            outcome: "ok",
            code: None,
        },
        Says {
            op: "encrypt",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: env_id,
            context_keys: ck,
            outcome: "ok",
            code: None,
        },
        Says {
            op: "decrypt",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: env_id,
            context_keys: ck,
            outcome: "ok",
            code: None,
        },
        Says {
            op: "datakey",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: dk_id,
            context_keys: ck,
            outcome: "ok",
            code: None,
        },
        Says {
            op: "datakey_decrypt",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: dk_id,
            context_keys: ck,
            outcome: "ok",
            code: None,
        },
        Says {
            op: "encrypt",
            key: Some("acme/nope"),
            version: None,
            envelope_id: None,
            context_keys: &[],
            outcome: "error",
            code: Some("not_found"),
        },
        Says {
            op: "decrypt",
            key: Some("acme/pii"),
            version: Some(1),
            envelope_id: env_id,
            context_keys: &["user"],
            outcome: "error",
            code: Some("integrity"),
        },
        Says {
            op: "encrypt",
            key: None,
            version: None,
            envelope_id: None,
            context_keys: &[],
            outcome: "error",
            code: Some("bad_request"),
        },
        Says {
            op: "frobnicate",
            key: None,
            version: None,
            envelope_id: None,
            context_keys: &[],
            outcome: "error",
            code: Some("unknown_operation"),
        },
        Says {
            op: "key_list",
            key: Some("acme"),
            version: None,
            envelope_id: None,
            context_keys: &[],
            outcome: "ok",
            code: None,
        },
        Says {
            op: "encrypt",
            key: Some("beta/pii"),
            version: None,
            envelope_id: None,
            context_keys: ck,
            outcome: "denied",
            code: Some("permission_denied"),
        },
    ];
    let me = std::process::id() as i32;
    let exe = std::env::current_exe().unwrap().display().to_string();
    let mut prev = "0".repeat(64);
    let mut last_time = 0;
    for (i, (r, w)) in records.iter().zip(want).enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        check(r, w);
        assert_eq!((r.caller.uid, r.caller.gid, r.caller.user.as_deref()), (0, 0, Some("root")), "{r:?}");
        assert_eq!(r.caller.pid, Some(me), "the test process is the caller: {r:?}");
        assert_eq!(r.caller.exe.as_deref(), Some(exe.as_str()), "{r:?}");
        assert_eq!(r.prev, prev, "record {} must hold the hash of the one before", r.seq);
        assert!(r.time_ms >= last_time && r.time_ms > 1_700_000_000_000, "{r:?}");
        last_time = r.time_ms;
        prev = hex(&Sha256::digest(serde_json::to_vec(r).unwrap()));
    }

    // The CLI shows the same records.
    let tail = d.cli(&["audit", "tail", "--json", "-n", "12"], b"");
    assert!(tail.status.success(), "{}", out_text(&tail));
    let from_cli: Vec<AuditRecord> =
        String::from_utf8_lossy(&tail.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The last 12 include this test's `audit_read` (the CLI's own is not shown).
    assert_eq!(from_cli.len(), 12);
    assert_eq!(from_cli[..11], records[..]);
    assert_eq!(from_cli[11].op, "audit_read");
    let beta = d.cli(&["audit", "tail", "--tenant", "beta"], b"");
    let beta = String::from_utf8_lossy(&beta.stdout).into_owned();
    assert_eq!(beta.lines().count(), 1, "{beta}");
    assert!(
        beta.contains("uid=0(root)")
            && beta.contains("encrypt beta/pii context=[table,user] denied (permission_denied)"),
        "{beta}"
    );
    let human = String::from_utf8_lossy(&d.cli(&["audit", "tail", "-n", "100"], b"").stdout).into_owned();
    assert!(
        human.contains(&format!("encrypt acme/pii v1 envelope={} context=[table,user] ok", enc.envelope_id)),
        "{human}"
    );
    let export = d.cli(&["audit", "export", "--since", "1h"], b"");
    assert!(export.status.success(), "{}", out_text(&export));
    let exported: Vec<AuditRecord> =
        String::from_utf8_lossy(&export.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        exported.len() >= 11 && exported[..11] == records[..],
        "export holds every record from the start"
    );
    let future = d.cli(&["audit", "export", "--since", "2100-01-01"], b"");
    assert!(future.status.success() && future.stdout.is_empty(), "{}", out_text(&future));

    // No secret anywhere in the audit log or the store.
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let pin = std::fs::read_to_string(d.dir().join("pin")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = dk.plaintext.as_ref().unwrap().expose().to_vec();
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("plaintext", SECRET.to_vec()),
        ("plaintext, base64", b64.encode(SECRET).into_bytes()),
        ("data key", key.clone()),
        ("data key, base64", b64.encode(&key).into_bytes()),
        ("context value", b"ctxvalue".to_vec()),
        ("PIN", pin.trim().as_bytes().to_vec()),
    ];
    let mut entries = 0;
    for f in audit_frames(&d.store_dir()) {
        entries += 1;
        for (what, n) in &needles {
            assert!(
                !contains(&f.value, n),
                "{what} found in the audit log: {}",
                String::from_utf8_lossy(&f.value)
            );
        }
    }
    assert!(entries > 14, "records and seals are in the audit segment files");
    for (file, bytes) in read_all_files(&d.store_dir()) {
        for (what, n) in &needles {
            assert!(!contains(&bytes, n), "{what} found in {}", file.display());
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Restores the pristine store, lets `tamper` change the store folder (the
/// audit segment files), starts the daemon, and returns what `keyhaven
/// audit verify` says.
fn verify_after(d: &mut TestDaemon, pristine: &Path, tamper: impl FnOnce(&Path)) -> Output {
    verify_after_with(d, pristine, &["audit", "verify"], tamper)
}

/// [`verify_after`] with the CLI's arguments given (`--json`).
fn verify_after_with(
    d: &mut TestDaemon,
    pristine: &Path,
    args: &[&str],
    tamper: impl FnOnce(&Path),
) -> Output {
    let store = d.store_dir();
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(pristine, &store);
    // Putting the older copy back is a restore, which the token's anchors
    // refuse until an operator accepts it (docs/AUDIT.md §4); the tampering
    // comes after, as someone who writes the files would do it.
    d.accept_store("test: the pristine copy, put back");
    tamper(&store);
    d.start_again();
    let out = d.cli(args, b"");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    out
}

/// [`verify_after`] with `tamper` editing the log's frames, each written
/// back with a correct checksum (an attacker who knows the format): only
/// the hash chain and the seals can tell.
fn verify_after_frames(
    d: &mut TestDaemon,
    pristine: &Path,
    tamper: impl FnOnce(&mut Vec<AuditFrame>),
) -> Output {
    verify_after(d, pristine, |store| {
        let mut frames = audit_frames(store);
        tamper(&mut frames);
        write_audit_frames(store, &frames);
    })
}

#[track_caller]
fn assert_names(out: &Output, seq: u64, kind: &str) {
    let t = out_text(out);
    assert!(!out.status.success(), "verify must fail: {t}");
    assert!(
        t.contains(&format!("NOT intact at record {seq} ({kind})")),
        "expected record {seq} ({kind}): {t}"
    );
}

/// Where the frame of record (`b'r'`) or seal (`b's'`) `seq` is.
fn at(frames: &[AuditFrame], kind: u8, seq: u64) -> usize {
    frames.iter().position(|f| f.kind == kind && f.seq == seq).expect("the frame exists")
}

fn record(frames: &[AuditFrame], seq: u64) -> AuditRecord {
    serde_json::from_slice(&frames[at(frames, b'r', seq)].value).unwrap()
}

fn set_record(frames: &mut [AuditFrame], r: &AuditRecord) -> Vec<u8> {
    let bytes = serde_json::to_vec(r).unwrap();
    let i = at(frames, b'r', r.seq);
    frames[i].value = bytes.clone();
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_untouched_and_names_the_record_after_each_kind_of_tampering() {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for i in 0..12 {
            let enc =
                c.encrypt(&path("acme/pii"), format!("secret {i}").as_bytes(), &ctx(&[])).await.unwrap();
            c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap();
        }
    }
    let (status, log) = d.stop(); // seals the head
    assert!(status.success(), "{log}");
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), pristine.path());
    let n = {
        let frames = audit_frames(&d.store_dir());
        let n = frames.iter().filter(|f| f.kind == b'r').map(|f| f.seq).max().unwrap();
        assert_eq!(
            frames.last().map(|f| (f.kind, f.seq)),
            Some((b's', n)),
            "the shutdown seals the last record"
        );
        n
    };
    assert_eq!(n, 25, "key_create and 24 encrypt/decrypt; `hello` is not recorded");

    // Untouched: intact, and still intact with the daemon's own new records.
    let untouched = verify_after(&mut d, pristine.path(), |_| {});
    assert!(untouched.status.success(), "{}", out_text(&untouched));
    assert!(out_text(&untouched).contains("audit log intact"), "{}", out_text(&untouched));

    // Edit one record in the middle.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let mut r = record(f, 4);
        r.caller.uid = 4242;
        set_record(f, &r);
    });
    assert_names(&out, 4, "altered");

    // Edit the last record (no later record links to it; its seal does).
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let mut r = record(f, n);
        r.outcome = "error".into();
        set_record(f, &r);
    });
    assert_names(&out, n, "altered");

    // Edit a record and rewrite every later link: only the seal tells.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let mut r = record(f, 3);
        r.op = "health".into();
        let mut bytes = set_record(f, &r);
        for seq in 4..=n {
            let mut next = record(f, seq);
            next.prev = hex(&Sha256::digest(&bytes));
            bytes = set_record(f, &next);
        }
    });
    let t = out_text(&out);
    assert!(!out.status.success() && t.contains("(altered)") && t.contains("seal"), "{t}");

    // Delete one record.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        f.remove(at(f, b'r', 5));
    });
    assert_names(&out, 5, "removed");

    // Insert one: a copy of record 2 before record 6.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let copy = f[at(f, b'r', 2)].clone();
        f.insert(at(f, b'r', 6), copy);
    });
    assert_names(&out, 6, "inserted");

    // Insert one, the rest moved up: a copy of record 2 at position 6, the
    // headers of the later ones renumbered.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let mut copy = f[at(f, b'r', 2)].clone();
        let i = at(f, b'r', 6);
        for later in f[i..].iter_mut() {
            later.seq += 1;
        }
        copy.seq = 6;
        f.insert(i, copy);
    });
    assert_names(&out, 6, "inserted");

    // Reorder two frames.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let (a, b) = (at(f, b'r', 7), at(f, b'r', 8));
        f.swap(a, b);
    });
    assert_names(&out, 7, "reordered");

    // Reorder two records' contents, the headers kept.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let (a, b) = (at(f, b'r', 7), at(f, b'r', 8));
        let v = f[a].value.clone();
        f[a].value = std::mem::replace(&mut f[b].value, v);
    });
    assert_names(&out, 7, "reordered");

    // Truncate the tail that the last seal covers.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        f.retain(|x| x.kind != b'r' || x.seq < n - 2);
    });
    assert_names(&out, n - 2, "truncated");

    // Forge a seal.
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        let i = at(f, b's', n);
        let mut seal: serde_json::Value = serde_json::from_slice(&f[i].value).unwrap();
        let mac = seal["mac"].as_str().unwrap().to_owned();
        let flipped = if mac.starts_with('0') { "1" } else { "0" };
        seal["mac"] = json!(format!("{flipped}{}", &mac[1..]));
        f[i].value = serde_json::to_vec(&seal).unwrap();
    });
    assert_names(&out, n, "bad_seal");

    // A byte changed in the middle, the frame's checksum left wrong: not
    // taken for a torn tail (nothing is cut off), and reported.
    let mut size = 0;
    let out = verify_after(&mut d, pristine.path(), |store| {
        let seg = &audit_segments(store)[0];
        let (offset, frame) =
            read_audit_frames(seg).into_iter().find(|(_, f)| f.kind == b'r' && f.seq == 10).unwrap();
        let mut bytes = std::fs::read(seg).unwrap();
        let i = offset + 13 + frame.value.iter().position(|b| *b == b'"').unwrap();
        bytes[i + 1] ^= 0x20;
        size = bytes.len();
        std::fs::write(seg, bytes).unwrap();
    });
    assert_names(&out, 10, "altered");
    let seg = &audit_segments(&d.store_dir())[0];
    assert!(std::fs::metadata(seg).unwrap().len() as usize >= size, "nothing was cut off");
}

/// Waits, when needed, so that the next few seconds stay in one clock
/// minute (the volume alert counts per minute).
fn early_in_a_minute() {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if s % 60 >= 45 {
        std::thread::sleep(std::time::Duration::from_secs(61 - s % 60));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unusual_decrypt_volume_writes_alerts_and_can_block() {
    let mut d = TestDaemon::start();
    let enc = {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await.unwrap()
    };
    let edit = |from: &'static str, to: &'static str| {
        move |dir: &Path| {
            let file = dir.join("keyhaven.toml");
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.contains(from));
            std::fs::write(&file, text.replacen(from, to, 1)).unwrap();
        }
    };
    d.restart_with(edit("decrypt_alert_per_minute = 0\n", "decrypt_alert_per_minute = 5\n"));
    early_in_a_minute();
    let c = d.client().await;
    for _ in 0..8 {
        c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap();
    }
    let records = audit_records(&c).await;
    let ops: Vec<&str> = records.iter().map(|r| r.op.as_str()).collect();
    let first_decrypt = ops.iter().position(|o| *o == "decrypt").unwrap();
    let alerts: Vec<&AuditRecord> = records.iter().filter(|r| r.op == "alert").collect();
    assert_eq!(alerts.len(), 2, "one alert for the uid, one for the tenant: {ops:?}");
    assert_eq!(ops[first_decrypt + 5..first_decrypt + 8], ["alert", "alert", "decrypt"], "{ops:?}");
    for a in &alerts {
        assert_eq!((a.outcome.as_str(), a.tenant.as_deref(), a.caller.uid), ("alert", Some("acme"), 0));
    }
    assert!(
        alerts[0].detail.as_deref().unwrap().contains("uid 0 (root) is over 5 decryptions"),
        "{alerts:?}"
    );
    assert!(alerts[1].detail.as_deref().unwrap().contains("tenant `acme` is over 5"), "{alerts:?}");
    drop(c);
    let (_, log) = d.stop();
    assert!(log.contains("unusual volume"), "a warning is logged:\n{log}");

    edit("decrypt_alert_block = false\n", "decrypt_alert_block = true\n")(d.dir());
    d.start_again();
    early_in_a_minute();
    let c = d.client().await;
    for _ in 0..5 {
        c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap();
    }
    let e = c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    assert!(e.to_string().contains("unusual volume"), "{e}");
    let last = audit_records(&c).await.into_iter().rev().find(|r| r.op == "decrypt").unwrap();
    assert_eq!((last.outcome.as_str(), last.code.as_deref()), ("denied", Some("permission_denied")));
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follow_prints_new_records_but_not_its_own_reads() {
    use std::io::BufRead;
    let d = TestDaemon::start();
    let mut child = std::process::Command::new(bin("keyhaven"))
        .arg("--socket")
        .arg(d.socket())
        .args(["audit", "tail", "-f", "--json", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Let it poll a few times, then make something to see.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    d.client().await.key_create(&path("acme/pii")).await.unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.iter().any(|r: &AuditRecord| r.op == "key_create") {
        assert!(std::time::Instant::now() < deadline, "tail -f did not show the new record: {seen:?}");
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            seen.push(serde_json::from_str(&line).unwrap());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let own = child.id() as i32;
    assert!(
        !seen.iter().any(|r| r.op == "audit_read" && r.caller.pid == Some(own)),
        "its own polling is not shown: {seen:?}"
    );
    let ops: Vec<&str> = seen.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(ops[ops.len() - 1..], ["key_create"], "{ops:?}");
    assert!(!ops.contains(&"hello"), "`hello` is not recorded: {ops:?}");
}

/// A record is durable before its response (docs/AUDIT.md §4): after a
/// SIGKILL right after the last answer, the restarted daemon has the record
/// of every answered request in its segment files, and the chain is intact.
#[tokio::test(flavor = "multi_thread")]
async fn answered_requests_keep_their_records_across_sigkill() {
    let mut d = TestDaemon::start();
    let mut ids = Vec::new();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for i in 0..40 {
            let enc = c.encrypt(&path("acme/pii"), format!("s{i}").as_bytes(), &ctx(&[])).await.unwrap();
            ids.push(enc.envelope_id);
        }
    }
    signal(d.pid(), "KILL");
    let (status, _) = d.stop();
    assert!(!status.success());
    assert!(!audit_segments(&d.store_dir()).is_empty(), "the audit log is in segment files");
    assert!(!d.store_dir().join("audit.wal").exists(), "no write-ahead file any more");
    d.start_again();
    let c = d.client().await;
    let records = audit_records(&c).await;
    for id in &ids {
        assert!(
            records.iter().any(|r| r.op == "encrypt" && r.envelope_id.as_deref() == Some(id)),
            "the record of envelope {id} was lost"
        );
    }
    // The chain is whole. The records after the last seal made before the
    // kill were sealed by nobody: the start reports them (docs/AUDIT.md §4)
    // in record 42, after key_create and the 40 encrypts.
    let out = d.cli(&["audit", "verify", "--json"], b"");
    let v = verify_json(&out);
    assert!(v.get("problem").is_none(), "{v}");
    let last_sealed_before = v["unsealed"][0]["from"].as_u64().map_or(41, |from| from - 1);
    if last_sealed_before < 41 {
        assert_eq!(out.status.code(), Some(3), "{}", out_text(&out));
        assert_eq!(v["status"], "unsealed");
        assert_eq!(
            (v["unsealed"][0]["to"].as_u64(), v["unsealed"][0]["reported_in"].as_u64()),
            (Some(41), Some(42)),
            "{v}"
        );
    } else {
        assert!(out.status.success(), "{}", out_text(&out));
    }
}

/// A write cut short by a crash (docs/AUDIT.md §4): the bytes after the
/// last intact frame of the last segment were never acknowledged; the
/// daemon cuts them off with a warning, and the chain goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_tail_is_cut_off_and_the_chain_goes_on() {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let seg = audit_segments(&d.store_dir()).pop().unwrap();
    let frames = read_audit_frames(&seg);
    let (offset, last) = frames.last().unwrap().clone();
    let data = offset + last.encode().len();
    let half =
        AuditFrame { kind: b'r', seq: last.seq + 1, value: br#"{"seq":99,"never":"answered"}"#.to_vec() };
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&half.encode()[..20]);
    std::fs::write(&seg, &bytes).unwrap();

    d.start_again();
    let out = d.cli(&["audit", "verify"], b"");
    assert!(out.status.success(), "{}", out_text(&out));
    let c = d.client().await;
    c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await.unwrap();
    let records = audit_records(&c).await;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "{records:#?}");
    }
    drop(c);
    let out = d.cli(&["audit", "verify"], b"");
    assert!(out.status.success(), "{}", out_text(&out));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("truncating the segment at offset {data}")),
        "a warning names the offset:\n{log}"
    );
    assert!(audit_frames(&d.store_dir()).iter().all(|f| !contains(&f.value, b"never")));
}

/// A store made before the segment files keeps its log in the sled tree
/// `audit` (keys `r`/`s` + u64be(seq)) and `audit.wal`: the daemon moves it
/// into the files at start, the write-ahead file's records included.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_store_moves_its_audit_log_out_of_sled() {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for _ in 0..5 {
            c.encrypt(&path("acme/pii"), b"x", &ctx(&[])).await.unwrap();
        }
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let store = d.store_dir();
    let frames = audit_frames(&store);
    let n = frames.iter().filter(|f| f.kind == b'r').count() as u64;
    // The old layout: the tree without the last two records and the final
    // seal, which only the write-ahead file holds (a crash before sled's
    // flush), followed by a stale frame of an earlier round.
    std::fs::remove_dir_all(store.join("audit")).unwrap();
    {
        let db = sled::open(&store).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let mut wal = Vec::new();
        for f in &frames {
            let mut key = vec![f.kind];
            key.extend_from_slice(&f.seq.to_be_bytes());
            if f.seq + 2 > n {
                wal.extend(f.encode());
            } else {
                tree.insert(key, f.value.clone()).unwrap();
            }
        }
        wal.extend(frames[0].encode());
        wal.resize(1 << 20, 0);
        std::fs::write(store.join("audit.wal"), wal).unwrap();
        db.flush().unwrap();
    }
    d.start_again();
    let out = d.cli(&["audit", "verify"], b"");
    assert!(out.status.success(), "{}", out_text(&out));
    let c = d.client().await;
    let records = audit_records(&c).await;
    assert!(records.len() as u64 > n && records.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("moved the audit log ({n} records, ")), "{log}");
    assert!(!store.join("audit.wal").exists());
    let db = sled::open(&store).unwrap();
    assert!(!db.tree_names().iter().any(|t| &t[..] == b"audit"), "the old tree is gone");
    drop(db);
    assert_eq!(&audit_frames(&store)[..frames.len()], &frames[..], "the same frames, in the same order");
}

/// 64 clients at once: rounds of more than 8 records make the flusher
/// gather (docs/AUDIT.md §4). Every answered request still has its record,
/// once, in one intact chain.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_clients_keeps_every_record_once_in_an_intact_chain() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let socket = d.socket().to_owned();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(&socket).await.unwrap();
            let mut ids = Vec::new();
            for _ in 0..20 {
                ids.push(
                    c.datakey(&path("acme/pii"), &ctx(&[]), keyhaven::Plaintext::Omit)
                        .await
                        .unwrap()
                        .envelope_id,
                );
            }
            ids
        }));
    }
    let mut answered = std::collections::BTreeSet::new();
    for t in tasks {
        answered.extend(t.await.unwrap());
    }
    assert_eq!(answered.len(), 64 * 20);
    let records = audit_records(&c).await;
    let recorded: Vec<&str> =
        records.iter().filter(|r| r.op == "datakey").filter_map(|r| r.envelope_id.as_deref()).collect();
    assert_eq!(recorded.len(), answered.len(), "one record per answered request");
    assert!(recorded.iter().all(|id| answered.contains(*id)));
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "no gap, no repeat");
    }
    drop(c);
    let out = d.cli(&["audit", "verify"], b"");
    assert!(out.status.success() && out_text(&out).contains("audit log intact"), "{}", out_text(&out));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// A log with two seals: records 1..=k sealed at a clean restart, more
/// records, and the final seal at n made by a clean stop. Returns (k, n)
/// with the daemon stopped.
async fn two_seals(d: &mut TestDaemon) -> (u64, u64) {
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for i in 0..4 {
            c.encrypt(&path("acme/pii"), format!("a{i}").as_bytes(), &ctx(&[])).await.unwrap();
        }
    }
    d.restart(); // seals the head
    {
        let c = d.client().await;
        for i in 0..6 {
            c.encrypt(&path("acme/pii"), format!("b{i}").as_bytes(), &ctx(&[])).await.unwrap();
        }
    }
    let (status, log) = d.stop(); // seals the head again
    assert!(status.success(), "{log}");
    let frames = audit_frames(&d.store_dir());
    let seals: Vec<u64> = frames.iter().filter(|f| f.kind == b's').map(|f| f.seq).collect();
    let n = frames.iter().filter(|f| f.kind == b'r').map(|f| f.seq).max().unwrap();
    assert_eq!(frames.last().map(|f| (f.kind, f.seq)), Some((b's', n)), "the stop sealed the last record");
    assert!(seals.len() >= 2, "{seals:?}");
    (seals[seals.len() - 2], n)
}

fn verify_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out_text(out)))
}

/// Issue 13 §4: with the daemon stopped, the final seal is deleted and a
/// record after the previous seal rewritten, the chain relinked. The
/// daemon must not seal the forgery as if it had vouched for it: at start
/// it warns naming the records no valid seal covers, writes an alert
/// record naming them (sealed only after it), and `audit verify` reports
/// them as `unsealed`, never plain intact.
#[tokio::test(flavor = "multi_thread")]
async fn records_no_seal_covers_at_start_are_reported_unsealed_not_sealed_as_intact() {
    let mut d = TestDaemon::start();
    let (k, n) = two_seals(&mut d).await;
    let store = d.store_dir();
    let mut frames = audit_frames(&store);
    frames.remove(at(&frames, b's', n));
    let mut r = record(&frames, k + 1);
    r.caller.uid = 4242;
    r.outcome = "error".into();
    let mut bytes = set_record(&mut frames, &r);
    for seq in k + 2..=n {
        let mut next = record(&frames, seq);
        next.prev = hex(&Sha256::digest(&bytes));
        bytes = set_record(&mut frames, &next);
    }
    write_audit_frames(&store, &frames);

    // Record n was sealed and anchored in the token at the stop: the
    // rewritten log is refused outright.
    let refused = d.run_once();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("audit record {n} is not the record that was sealed and anchored")),
        "{err}"
    );
    // Accepted by an operator as it is, the records no seal covers are
    // reported, not sealed as if vouched for.
    d.accept_store("test: accepting the rewritten log to see it reported");
    d.start_again();
    let out = d.cli(&["audit", "verify", "--json"], b"");
    assert_eq!(out.status.code(), Some(3), "{}", out_text(&out));
    let v = verify_json(&out);
    assert_eq!(v["status"], "unsealed", "{v}");
    assert_eq!(v["intact"], false, "{v}");
    assert!(v.get("problem").is_none(), "the chain itself is whole: {v}");
    assert_eq!(
        v["unsealed"],
        json!([{"from": k + 1, "to": n, "reported_in": n + 1, "time_ms": v["unsealed"][0]["time_ms"]}]),
        "{v}"
    );
    let t = out_text(&out);
    assert!(t.contains("UNSEALED in part") && t.contains(&format!("records {} to {n}", k + 1)), "{t}");

    let c = d.client().await;
    let alert = audit_records(&c).await.into_iter().find(|r| r.seq == n + 1).expect("the alert record");
    assert_eq!((alert.op.as_str(), alert.outcome.as_str()), ("alert", "alert"));
    assert_eq!(alert.unsealed, Some([k + 1, n]));
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("records {} to {n} are covered by no valid seal at start", k + 1)),
        "a warning names the range:\n{log}"
    );
    // The start sealed the alert, not the forged records alone: the first
    // seal after record k is the one of the alert.
    let frames = audit_frames(&store);
    let after_k: Vec<u64> = frames.iter().filter(|f| f.kind == b's' && f.seq > k).map(|f| f.seq).collect();
    assert_eq!(after_k.first(), Some(&(n + 1)), "{after_k:?}");
}

/// Issue 13 §4: seals appended to the log (a copy of the last seal, a copy
/// of an earlier genuine seal after it) are `bad_seal`s named by record,
/// and `last_sealed` never goes back.
#[tokio::test(flavor = "multi_thread")]
async fn seals_that_repeat_or_go_back_are_bad_seals_and_last_sealed_never_goes_back() {
    let mut d = TestDaemon::start();
    let (k, n) = two_seals(&mut d).await;
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), pristine.path());
    let args = ["audit", "verify", "--json"];

    let untouched = verify_after_with(&mut d, pristine.path(), &args, |_| {});
    assert!(untouched.status.success(), "{}", out_text(&untouched));
    assert_eq!(verify_json(&untouched)["status"], "intact");

    let out = verify_after_with(&mut d, pristine.path(), &args, |store| {
        let mut f = audit_frames(store);
        let copy = f[at(&f, b's', n)].clone();
        f.push(copy);
        write_audit_frames(store, &f);
    });
    assert_names(&out, n, "bad_seal");
    assert!(out_text(&out).contains(&format!("the seal of record {n} appears twice")), "{}", out_text(&out));
    assert!(verify_json(&out)["last_sealed"].as_u64().unwrap() >= n);

    let out = verify_after_with(&mut d, pristine.path(), &args, |store| {
        let mut f = audit_frames(store);
        let copy = f[at(&f, b's', k)].clone();
        f.push(copy);
        write_audit_frames(store, &f);
    });
    assert_names(&out, k, "bad_seal");
    assert!(
        out_text(&out).contains(&format!("the seal of record {k} comes after the seal of record {n}")),
        "{}",
        out_text(&out)
    );
    assert!(verify_json(&out)["last_sealed"].as_u64().unwrap() >= n, "last_sealed went back");
}

/// Issue 13 §4: `audit verify` checks each seal's signature in the token
/// too: a seal whose signature was altered, or removed while earlier seals
/// are signed, is a `bad_seal` though its MAC is good.
#[tokio::test(flavor = "multi_thread")]
async fn a_seal_whose_signature_is_altered_or_removed_is_a_bad_seal() {
    let mut d = TestDaemon::start();
    let (_, n) = two_seals(&mut d).await;
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&d.store_dir(), pristine.path());
    let edit_seal = |f: &mut Vec<AuditFrame>, change: &dyn Fn(&mut serde_json::Value)| {
        let i = at(f, b's', n);
        let mut seal: serde_json::Value = serde_json::from_slice(&f[i].value).unwrap();
        change(&mut seal);
        f[i].value = serde_json::to_vec(&seal).unwrap();
    };
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        edit_seal(f, &|seal| {
            let sig = seal["sig"].as_str().expect("signed").to_owned();
            // The last hex digit: inside the DER integer s.
            let flipped = if sig.ends_with('0') { '1' } else { '0' };
            seal["sig"] = json!(format!("{}{flipped}", &sig[..sig.len() - 1]));
        })
    });
    assert_names(&out, n, "bad_seal");
    assert!(out_text(&out).contains("signature does not verify"), "{}", out_text(&out));
    let out = verify_after_frames(&mut d, pristine.path(), |f| {
        edit_seal(f, &|seal| {
            seal.as_object_mut().unwrap().remove("sig");
        })
    });
    assert_names(&out, n, "bad_seal");
    assert!(out_text(&out).contains("is not signed though an earlier seal is"), "{}", out_text(&out));
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// `openssl dgst -sha256 -verify pub -signature sig msg`.
fn openssl_verifies(dir: &Path, public: &Path, message: &[u8], sig: &[u8]) -> (bool, String) {
    let (m, s) = (dir.join("head.bin"), dir.join("sig.der"));
    std::fs::write(&m, message).unwrap();
    std::fs::write(&s, sig).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(public)
        .arg("-signature")
        .arg(&s)
        .arg(&m)
        .output()
        .expect("run openssl");
    (out.status.success(), out_text(&out))
}

/// Issue 13 §4: the audit head is signed by an ECDSA P-256 key generated
/// in the token; `audit public-key` gives its public half and `audit export
/// --signed` the records as stored with the signed seals, so that a tool
/// nobody here wrote (openssl) checks a sealed head, and the chain up to
/// it, away from the daemon; a flipped byte is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_exported_log_verifies_with_openssl_and_the_public_key() {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for i in 0..3 {
            c.encrypt(&path("acme/pii"), format!("s{i}").as_bytes(), &ctx(&[])).await.unwrap();
        }
    }
    d.restart(); // seals the head
    let work = tempfile::tempdir().unwrap();
    let public = work.path().join("pub.pem");
    let pem = d.cli(&["audit", "public-key"], b"");
    assert!(pem.status.success(), "{}", out_text(&pem));
    std::fs::write(&public, &pem.stdout).unwrap();
    let text = std::process::Command::new("openssl")
        .args(["pkey", "-pubin", "-noout", "-text", "-in"])
        .arg(&public)
        .output()
        .unwrap();
    assert!(out_text(&text).contains("prime256v1"), "{}", out_text(&text));

    let export = d.cli(&["audit", "export", "--signed"], b"");
    assert!(export.status.success(), "{}", out_text(&export));
    let lines: Vec<&[u8]> = export.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    // Walk the chain as an outsider: each record line's SHA-256 is the next one's `prev`.
    let mut hashes = std::collections::HashMap::new();
    let mut prev = "0".repeat(64);
    let mut signed = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        if let Some(seal) = v.get("seal") {
            signed.push(seal.clone());
            continue;
        }
        assert_eq!(v["prev"], prev.as_str(), "the chain links at record {}", v["seq"]);
        prev = hex(&Sha256::digest(line));
        hashes.insert(v["seq"].as_u64().unwrap(), prev.clone());
    }
    let seal = signed.last().expect("a signed seal").clone();
    let seq = seal["seq"].as_u64().unwrap();
    assert!(seq >= 4, "the restart sealed the records: {seal}");
    assert_eq!(seal["head"], hashes[&seq].as_str(), "the seal's head is the exported record's hash");
    let mut message = b"keyhaven-audit-head-v1\0".to_vec();
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(&unhex(seal["head"].as_str().unwrap()));
    message.extend_from_slice(&seal["time_ms"].as_u64().unwrap().to_be_bytes());
    let sig = unhex(seal["sig"].as_str().expect("the seal is signed"));
    let (ok, said) = openssl_verifies(work.path(), &public, &message, &sig);
    assert!(ok && said.contains("Verified OK"), "openssl: {said}");

    // One flipped byte, in the head or in the signature: refused.
    for i in [message.len() - 9 - 5, message.len() - 1] {
        let mut bad = message.clone();
        bad[i] ^= 1;
        let (ok, said) = openssl_verifies(work.path(), &public, &bad, &sig);
        assert!(!ok && said.contains("Verification failure"), "byte {i}: {said}");
    }
    let mut bad_sig = sig.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    assert!(!openssl_verifies(work.path(), &public, &message, &bad_sig).0);
    // A record changed in the export no longer hashes to the signed head.
    let line = lines.iter().find(|l| hex(&Sha256::digest(l)) == hashes[&seq]).unwrap();
    let mut changed = line.to_vec();
    let i = changed.iter().position(|b| *b == b'1').unwrap();
    changed[i] = b'2';
    assert_ne!(hex(&Sha256::digest(&changed)), hashes[&seq]);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `pkcs11-tool` on a dev daemon's token, logged in.
fn pkcs11_tool(d: &TestDaemon, args: &[&str]) -> Output {
    let pin = std::fs::read_to_string(d.dir().join("pin")).unwrap();
    let out = std::process::Command::new("pkcs11-tool")
        .arg("--module")
        .arg(softhsm_module())
        .args(["--token-label", "keyhaven-dev", "--login", "--pin", pin.trim_end()])
        .args(args)
        .env("SOFTHSM2_CONF", d.dir().join("softhsm2.conf"))
        .output()
        .expect("run pkcs11-tool");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {}", out_text(&out));
    out
}

/// A token from before the signing key (issue 13 §4): the daemon generates
/// the key pair in the token at start, as it does the audit key; the
/// private key is sensitive, never extractable and was made there.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_the_audit_signing_key_gets_one_generated_in_it_at_start() {
    let mut d = TestDaemon::start();
    let first = d.cli(&["audit", "public-key"], b"");
    assert!(first.status.success(), "{}", out_text(&first));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    for kind in ["privkey", "pubkey"] {
        pkcs11_tool(&d, &["--delete-object", "--type", kind, "--label", "keyhaven-audit-signing"]);
    }
    let listed = pkcs11_tool(&d, &["--list-objects", "--type", "privkey"]);
    assert!(!contains(&listed.stdout, b"keyhaven-audit-signing"), "{}", out_text(&listed));

    d.start_again();
    let second = d.cli(&["audit", "public-key"], b"");
    assert!(second.status.success(), "{}", out_text(&second));
    assert!(second.stdout.starts_with(b"-----BEGIN PUBLIC KEY-----\n"));
    assert_ne!(first.stdout, second.stdout, "a new key pair");
    let listed = String::from_utf8(pkcs11_tool(&d, &["--list-objects", "--type", "privkey"]).stdout).unwrap();
    let at = listed.find("label:      keyhaven-audit-signing").unwrap_or_else(|| panic!("{listed}"));
    let object = listed[..at].rfind("Private Key Object").map(|s| &listed[s..]).unwrap();
    // Its lines: the header, then indented ones.
    let end = object.match_indices('\n').map(|(i, _)| i + 1).find(|i| !object[*i..].starts_with(' '));
    let object = &object[..end.unwrap_or(object.len())];
    assert!(object.starts_with("Private Key Object; EC"), "{object}");
    assert!(object.contains("Access:     sensitive, always sensitive, never extractable, local"), "{object}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("created the audit signing key (ECDSA P-256) in the token"), "{log}");
}
