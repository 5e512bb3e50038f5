//! `keyhaven audit verify --file` (docs/AUDIT.md §3.3, §11): an export and
//! a file sink's shipped log verify offline with the public key, after the
//! daemon is gone; each kind of tampering done to the file, a forged
//! signature and the wrong key are named.

use std::path::Path;
use std::process::{Command, Output};

use keyhaven_tests::*;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn verify(files: &[&Path], key: Option<&Path>) -> Output {
    let mut cmd = Command::new(bin("keyhaven"));
    // No daemon: a socket that is not there.
    cmd.args(["--socket", "/nonexistent/keyhaven.sock", "audit", "verify"]);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    if let Some(k) = key {
        cmd.arg("--public-key").arg(k);
    }
    cmd.output().unwrap()
}

#[track_caller]
fn fails(out: &Output, seq: u64, kind: &str) {
    let t = text(out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("NOT intact at record {seq} ({kind})")), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_and_shipped_files_verify_offline_and_tampering_is_named() {
    let mut d = TestDaemon::start();
    let ship = d.dir().join("ship");
    std::fs::create_dir(&ship).unwrap();
    let shipped = ship.join("audit.jsonl");
    let sink =
        format!("\n[[audit.sink]]\ntype = \"file\"\npath = \"{}\"\nmax_bytes = 8192\n", shipped.display());
    d.restart_with(move |dir| {
        let file = dir.join("keyhaven.toml");
        let mut t = std::fs::read_to_string(&file).unwrap();
        t.push_str(&sink);
        std::fs::write(&file, t).unwrap();
    });
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    for i in 0..40 {
        c.encrypt(&path("acme/pii"), format!("{i}").as_bytes(), &ctx(&[])).await.unwrap();
    }
    drop(c);
    let tmp = d.dir().to_owned();
    let tmp = tmp.as_path();
    let pem = tmp.join("audit.pem");
    let out = d.cli(&["audit", "public-key"], b"");
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(&pem, &out.stdout).unwrap();
    // A clean stop seals the head, and the sink ships that seal.
    d.restart();
    let out = d.cli(&["audit", "export", "--signed"], b"");
    assert!(out.status.success(), "{}", text(&out));
    let export = tmp.join("export.jsonl");
    std::fs::write(&export, &out.stdout).unwrap();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // With the daemon gone.
    let out = verify(&[&export], Some(&pem));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("audit log intact: records 1 to"), "{}", text(&out));
    let mut files: Vec<_> = std::fs::read_dir(&ship).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 2, "rotated: {files:?}");
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let out = verify(&refs, Some(&pem));
    assert!(out.status.success(), "shipped files: {}", text(&out));
    assert!(text(&out).contains("signed heads verified up to"), "{}", text(&out));
    // Without the key: the chain only, and it says so.
    let out = verify(&[&export], None);
    assert!(out.status.success() && text(&out).contains("NOT checked"), "{}", text(&out));
    // A shipped file delivered twice (at least once) still verifies.
    let doubled = tmp.join("doubled.jsonl");
    let all: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    std::fs::write(&doubled, format!("{all}{all}")).unwrap();
    assert!(verify(&[&doubled], Some(&pem)).status.success());

    let lines: Vec<String> = std::fs::read_to_string(&export).unwrap().lines().map(str::to_owned).collect();
    let rec_at =
        |seq: u64| lines.iter().position(|l| l.starts_with(&format!("{{\"seq\":{seq},\"time_ms\""))).unwrap();
    let write = |name: &str, lines: &[String]| {
        let p = tmp.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    // A record changed.
    let mut v = lines.clone();
    let i = rec_at(10);
    v[i] = v[i].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
    assert_ne!(v[i], lines[i]);
    fails(&verify(&[&write("altered.jsonl", &v)], Some(&pem)), 10, "altered");
    // A record removed.
    let mut v = lines.clone();
    v.remove(rec_at(12));
    fails(&verify(&[&write("removed.jsonl", &v)], Some(&pem)), 12, "removed");
    // A record changed and every link after it rewritten: the seal's head tells.
    let mut v = lines.clone();
    let i = rec_at(5);
    v[i] = v[i].replace("\"outcome\":\"ok\"", "\"outcome\":\"error\"");
    let mut prev_hash = hex(&sha(&v[i]));
    for line in v.iter_mut().skip(i + 1) {
        if line.starts_with("{\"seal\"") {
            continue;
        }
        let mut r: serde_json::Value = serde_json::from_str(line).unwrap();
        r["prev"] = prev_hash.clone().into();
        *line = serde_json::to_string(&r).unwrap();
        prev_hash = hex(&sha(line));
    }
    let out = verify(&[&write("relinked.jsonl", &v)], Some(&pem));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("(altered)") && text(&out).contains("seal's head"), "{}", text(&out));
    // A forged signature.
    let mut v = lines.clone();
    let s = v.iter().position(|l| l.starts_with("{\"seal\"")).unwrap();
    let mut seal: serde_json::Value = serde_json::from_str(&v[s]).unwrap();
    let seq = seal["seal"]["seq"].as_u64().unwrap();
    let sig = seal["seal"]["sig"].as_str().unwrap().to_owned();
    let flipped = if sig.ends_with('0') { "1" } else { "0" };
    seal["seal"]["sig"] = format!("{}{flipped}", &sig[..sig.len() - 1]).into();
    v[s] = serde_json::to_string(&seal).unwrap();
    fails(&verify(&[&write("forged.jsonl", &v)], Some(&pem)), seq, "bad_seal");
    // Another key (openssl's own).
    let other = tmp.join("other.pem");
    let sh = format!(
        "openssl ecparam -name prime256v1 -genkey -noout | openssl ec -pubout -out {} 2>/dev/null",
        other.display()
    );
    assert!(Command::new("sh").args(["-c", &sh]).status().unwrap().success());
    let first_seal = lines
        .iter()
        .find_map(|l| l.strip_prefix("{\"seal\":{\"seq\":")?.split(',').next()?.parse::<u64>().ok())
        .unwrap();
    fails(&verify(&[&export], Some(&other)), first_seal, "bad_seal");
    // Not a log at all.
    let junk = write("junk.jsonl", &["hello".to_owned()]);
    let out = verify(&[&junk], Some(&pem));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("line 1: not an audit log line"), "{}", text(&out));
}

fn sha(s: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `audit_read` with `raw` answers the bytes the chain hashes (AUDIT.md
/// §3.1), so a third party can check the chain from them: each line is the
/// record beside it, the SHA-256 of one is the next one's `prev`, and they
/// are the same bytes `audit_export` gives; a filtered read gives the bytes
/// of the records it picked.
#[tokio::test(flavor = "multi_thread")]
async fn audit_read_raw_lines_are_the_bytes_the_chain_hashes() {
    use sha2::{Digest, Sha256};
    let d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("beta/pii")).await.unwrap();
    for i in 0..5 {
        c.encrypt(&path("acme/pii"), format!("{i}").as_bytes(), &ctx(&["k=v"])).await.unwrap();
    }
    let plain = c.call_raw("audit_read", serde_json::json!({})).await.unwrap();
    assert!(plain.get("lines").is_none(), "lines only when asked: {plain}");

    let read = c.call_raw("audit_read", serde_json::json!({"raw": true})).await.unwrap();
    let records = read["records"].as_array().unwrap();
    let lines: Vec<&str> = read["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(records.len() >= 8, "{read}");
    assert_eq!(records.len(), lines.len());
    for (r, l) in records.iter().zip(&lines) {
        let parsed: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(&parsed, r, "a line is its record");
    }
    for w in 0..lines.len() - 1 {
        let (a, b) = (&records[w], &records[w + 1]);
        if b["seq"].as_u64() == a["seq"].as_u64().map(|s| s + 1) {
            let h: String = Sha256::digest(lines[w].as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(b["prev"].as_str(), Some(h.as_str()), "record {} chains to the line before", b["seq"]);
        }
    }
    let export = c.call_raw("audit_export", serde_json::json!({})).await.unwrap();
    let exported: Vec<&str> =
        export["lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for l in &lines {
        assert!(exported.contains(l), "audit_read's raw line is what audit_export gives: {l}");
    }

    let some = c
        .call_raw("audit_read", serde_json::json!({"raw": true, "tenant": "beta", "last": 5}))
        .await
        .unwrap();
    let (records, lines) = (some["records"].as_array().unwrap(), some["lines"].as_array().unwrap());
    assert_eq!(records.len(), lines.len());
    assert!(!records.is_empty());
    for (r, l) in records.iter().zip(lines) {
        assert_eq!(r["tenant"], "beta");
        assert_eq!(&serde_json::from_str::<serde_json::Value>(l.as_str().unwrap()).unwrap(), r);
    }
}
