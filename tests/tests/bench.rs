//! A smoke run of `keyhavend bench` (docs/PERFORMANCE.md): a fresh dev
//! install, the raw token rate, `keyhaven bench` against it, every op
//! including the new-connection rows, and the summary line. It checks that
//! the benchmark runs and that no request failed, never a timing.

use keyhaven_tests::*;

#[test]
fn keyhavend_bench_runs_every_op_and_prints_the_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("bench");
    let out = std::process::Command::new(bin("keyhavend"))
        .args(["bench", "--duration", "200ms", "--concurrency", "1,2", "--new-connection", "--dir"])
        .arg(&run)
        .arg("--keyhaven")
        .arg(bin("keyhaven"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for op in
        ["raw token decrypt", "health", "encrypt", "datakey ", "datakey-decrypt", "rewrap", "(new conn)"]
    {
        assert!(text.contains(op), "no `{op}` row: {text}");
    }
    assert!(!text.contains("first error"), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("daemon/raw datakey-decrypt c=2: "), "{last}");
    assert!(last.contains("ops/s, raw ") && last.ends_with(" µs)"), "{last}");
    // A folder that is not empty is refused: the bench wants a fresh token.
    let again =
        std::process::Command::new(bin("keyhavend")).args(["bench", "--dir"]).arg(&run).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}

/// `mac`, `sign-*` and `pk-decrypt` rows, each with the token's own rate of the
/// operation and a daemon/raw line (PERFORMANCE.md, issue 16).
#[test]
fn keyhavend_bench_compares_mac_and_sign_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("keyhavend"))
        .args([
            "bench",
            "--duration",
            "200ms",
            "--concurrency",
            "1",
            "--op",
            "mac,sign-p256,sign-p384,sign-rsa3072,pk-decrypt",
            "--dir",
        ])
        .arg(dir.path().join("bench"))
        .arg("--keyhaven")
        .arg(bin("keyhaven"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for op in ["mac", "sign-p256", "sign-p384", "sign-rsa3072", "pk-decrypt"] {
        assert!(text.contains(&format!("raw token {op} ")), "no raw `{op}` row: {text}");
        assert!(text.contains(&format!("daemon/raw {op} c=1: ")), "no `{op}` ratio: {text}");
    }
    assert!(!text.contains("first error"), "{text}");
}
