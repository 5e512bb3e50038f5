//! The CLI's messages and output shapes, one snapshot file per case in
//! `tests/cli-snapshots/` (as rage does), against a real daemon: each
//! case's exit status, stdout and stderr must match its file exactly, so
//! that a message that was fixed does not come back unnoticed. Values that
//! differ from run to run (times, ids, the test folder) are replaced by
//! placeholders before comparing. `KEYHAVEN_UPDATE_SNAPSHOTS=1` rewrites
//! the files (review the diff before committing).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keyhaven_tests::*;

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cli-snapshots")
}

/// Times, ids and paths that change from run to run, as placeholders.
fn normalise(text: &str, dir: &Path) -> String {
    let mut out = text
        .replace(&dir.display().to_string(), "$DIR")
        .replace(&format!("\"by_uid\": {}", my_uid()), "\"by_uid\": $UID");
    // Unix seconds (10 digits) and hex ids (32 digits) inside JSON values.
    let mut words = String::with_capacity(out.len());
    let mut token = String::new();
    let flush = |token: &mut String, words: &mut String| {
        if token.len() == 10 && token.bytes().all(|b| b.is_ascii_digit()) {
            words.push_str("$TIME");
        } else if token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            words.push_str("$ID");
        } else {
            words.push_str(token);
        }
        token.clear();
    };
    for c in out.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut words);
            words.push(c);
        }
    }
    flush(&mut token, &mut words);
    out = words;
    readable_times(&out)
}

/// RFC 3339 times (`2026-12-01T02:47:24Z`, the CLI's `*_utc` fields) as `$UTC`.
fn readable_times(text: &str) -> String {
    const SHAPE: &[u8; 20] = b"dddd-dd-ddTdd:dd:ddZ";
    let fits =
        |w: &[u8]| w.iter().zip(SHAPE).all(|(b, s)| if *s == b'd' { b.is_ascii_digit() } else { b == s });
    let (bytes, mut out, mut i) = (text.as_bytes(), String::with_capacity(text.len()), 0);
    while i < bytes.len() {
        if bytes.len() - i >= SHAPE.len() && fits(&bytes[i..i + SHAPE.len()]) {
            out.push_str("$UTC");
            i += SHAPE.len();
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn render(args: &[&str], status: Option<i32>, stdout: &str, stderr: &str) -> String {
    format!(
        "$ keyhaven {}\nexit: {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        args.join(" "),
        status.map(|c| c.to_string()).unwrap_or_else(|| "signal".into())
    )
}

fn check(name: &str, actual: &str) -> Option<String> {
    let file = snapshot_dir().join(format!("{name}.txt"));
    if std::env::var_os("KEYHAVEN_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&file, actual).unwrap();
        return None;
    }
    let expected = std::fs::read_to_string(&file).unwrap_or_default();
    (expected != actual).then(|| {
        format!(
            "{name}: the output differs from {} (KEYHAVEN_UPDATE_SNAPSHOTS=1 rewrites it)\n--- expected\n{expected}\n--- \
             actual\n{actual}",
            file.display()
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_message_and_shape_matches_its_snapshot() {
    let d = TestDaemon::start();
    let c = d.client().await;
    let context = ctx(&[]);
    c.key_create(&path("acme/pii")).await.unwrap();
    c.key_create(&path("acme/gone")).await.unwrap();
    let ciphertext = c.encrypt(&path("acme/pii"), b"secret", &context).await.unwrap().ciphertext;
    let envelope = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Omit).await.unwrap().envelope;
    let too_big = vec![b'x'; 64 * 1024 + 1];
    let missing = d.dir().join("no-such-file");
    let missing = missing.to_str().unwrap();
    for (args, stdin) in [
        (&["revoke", "key", "acme/gone", "--reason", "key-compromise"][..], &b""[..]),
        (&["destroy", "key", "acme/gone", "--confirm", "acme/gone"], b""),
    ] {
        assert!(d.cli(args, stdin).status.success(), "{args:?}");
    }

    let cases: Vec<(&str, Vec<&str>, &[u8])> = vec![
        ("decrypt-given-an-envelope", vec!["decrypt"], envelope.as_bytes()),
        ("datakey-decrypt-given-a-ciphertext", vec!["datakey", "decrypt"], ciphertext.as_bytes()),
        ("decrypt-json", vec!["decrypt", "--json"], ciphertext.as_bytes()),
        ("encrypt-over-64-kib", vec!["encrypt", "acme/pii"], &too_big),
        ("encrypt-in-missing-file", vec!["encrypt", "acme/pii", "--in", missing], b""),
        ("encrypt-text-and-in", vec!["encrypt", "acme/pii", "--text", "a", "--in", missing], b""),
        ("key-trim-without-confirm", vec!["key", "trim", "acme/pii"], b""),
        ("key-trim-wrong-confirm", vec!["key", "trim", "acme/pii", "--confirm", "acme/other"], b""),
        ("retire-master-without-confirm", vec!["admin", "retire-master", "--version", "1"], b""),
        ("destroy-without-confirm", vec!["destroy", "key", "acme/pii"], b""),
        ("key-create-destroyed-name", vec!["key", "create", "acme/gone"], b""),
        ("key-show-destroyed", vec!["key", "show", "acme/gone"], b""),
        ("key-list", vec!["key", "list", "acme"], b""),
        ("key-usage", vec!["key", "usage", "acme/pii"], b""),
        (
            "key-create-with-labels",
            vec!["key", "create", "acme/labelled", "--description", "for the tests", "--tag", "team=qa"],
            b"",
        ),
        ("key-create-tag-not-name-value", vec!["key", "create", "acme/x", "--tag", "team"], b""),
        ("key-set-bad-tag-name", vec!["key", "set", "acme/pii", "--tag", "a b=c"], b""),
        (
            "revoke-datakey-unseen-id",
            vec!["revoke", "datakey", "0123456789abcdef0123456789abcdef", "--reason", "unspecified"],
            b"",
        ),
        ("idempotency-key-malformed", vec!["key", "rotate", "acme/pii", "--idempotency-key", "a b"], b""),
        ("rotate-every-over-100-years", vec!["key", "create", "acme/new", "--rotate-every", "200000d"], b""),
        (
            "revoke-expires-in-the-past",
            vec!["revoke", "key", "acme/pii", "--reason", "superseded", "--expires", "2000-01-01T00:00:00Z"],
            b"",
        ),
        ("version-zero", vec!["key", "public", "acme/pii", "--version", "0"], b""),
    ];
    let mut failures = Vec::new();
    for (name, args, stdin) in &cases {
        let out = d.cli(args, stdin);
        let actual = render(
            args,
            out.status.code(),
            &normalise(&String::from_utf8_lossy(&out.stdout), d.dir()),
            &normalise(&String::from_utf8_lossy(&out.stderr), d.dir()),
        );
        failures.extend(check(name, &normalise(&actual, d.dir())));
    }
    // Every file in the folder is a case here (none left behind).
    for entry in std::fs::read_dir(snapshot_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().trim_end_matches(".txt").to_owned();
        if !cases.iter().any(|(n, _, _)| *n == name) {
            failures.push(format!("tests/cli-snapshots/{name}.txt has no case"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `keyhaven key list | head -c 1`: the reader goes away; the CLI stops
/// quietly (no "Broken pipe" message, no panic) with status 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_pipe_ends_the_cli_quietly() {
    let d = TestDaemon::start();
    let c = d.client().await;
    for i in 0..200 {
        c.key_create(&path(&format!("acme/key-{i:03}"))).await.unwrap();
    }
    for args in [&["key", "list"][..], &["audit", "tail", "-n", "1000"]] {
        let mut child = Command::new(bin("keyhaven"))
            .arg("--socket")
            .arg(d.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one byte, then close our end, as `head -c 1` does.
        let mut stdout = child.stdout.take().unwrap();
        let mut one = [0u8; 1];
        stdout.read_exact(&mut one).unwrap();
        drop(stdout);
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        assert_eq!(status.code(), Some(0), "{args:?}");
    }
}
