//! `keyhaven inspect` (offline decoding of every stored form) and
//! `keyhaven revoke datakey` given the stored value instead of its id
//! (issue 19), against values a real daemon made.

use std::time::Duration;

use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::seal::sealed_to_text;
use keyhaven::{ErrorCode, Sealer};
use keyhaven_tests::*;
use serde_json::Value;

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// `inspect` with no daemon at all: the socket points nowhere.
fn inspect(args: &[&str], stdin: &[u8]) -> std::process::Output {
    run_cli(std::path::Path::new("/nonexistent/keyhaven.sock"), &[&["inspect"], args].concat(), stdin)
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_decodes_every_form_offline_and_revoke_datakey_takes_the_value() {
    let d = TestDaemon::start();
    assert!(d.cli(&["key", "create", "acme/pii"], b"").status.success());
    assert!(d.cli(&["key", "rotate", "acme/pii"], b"").status.success());

    // A ciphertext: what `encrypt --json` said about it, read back offline.
    let enc = [json_of(&d.cli(&["encrypt", "acme/pii", "--json"], b"secret"))];
    let ciphertext = enc[0]["ciphertext"].as_str().unwrap().to_owned();
    let found = &json_lines(&inspect(&[&ciphertext], b""))[0];
    assert_eq!(found["format"], "ciphertext");
    assert_eq!(found["form"], "text");
    assert_eq!((found["tenant"].as_str(), found["key"].as_str()), (Some("acme"), Some("pii")));
    assert_eq!(found["key_version"], 2);
    assert_eq!(found["envelope_id"], enc[0]["envelope_id"]);
    assert_eq!(found["plaintext_bytes"], 6);

    // An envelope, a sealed record (text and binary) and a stream, on stdin.
    let c = d.client().await;
    let dk = c.datakey(&path("acme/pii"), &ctx(&[]), keyhaven::Plaintext::Omit).await.unwrap();
    let sealer = Sealer::connect(
        d.socket(),
        SealLimits::new(Duration::from_secs(60), 10, 1 << 20).unwrap(),
        OpenLimits::new(Duration::from_secs(60), 10).unwrap(),
    )
    .await
    .unwrap();
    let record = sealer.seal(&path("acme/pii"), b"a record", &ctx(&["app=crm"])).await.unwrap();
    let record_text = sealed_to_text(&record);
    let stdin = format!("{}\n\n{record_text}\n", dk.envelope);
    let found = json_lines(&inspect(&[], stdin.as_bytes()));
    assert_eq!(found.len(), 2, "one object per non-empty line");
    assert_eq!(found[0]["format"], "envelope");
    assert_eq!(found[0]["envelope_id"].as_str(), Some(dk.envelope_id.as_str()));
    assert_eq!(found[1]["format"], "sealed_record");
    assert_eq!(found[1]["plaintext_bytes"], 8);
    let binary = &json_lines(&inspect(&[], &record))[0];
    assert_eq!((binary["format"].as_str(), binary["form"].as_str()), (Some("sealed_record"), Some("binary")));
    assert_eq!(binary["envelope_id"], found[1]["envelope_id"]);
    let stream = d.cli(&["seal", "acme/pii"], &[7u8; 5000]);
    assert!(stream.status.success());
    let s = &json_lines(&inspect(&[], &stream.stdout))[0];
    assert_eq!(s["format"], "sealed_stream");
    assert_eq!(s["chunk_size"], keyhaven::seal::DEFAULT_CHUNK);
    assert!(s["envelope"].as_str().unwrap().starts_with("khe1:"));

    // Revoking by the stored value revokes that value's data key only.
    let other = json_of(&d.cli(&["encrypt", "acme/pii", "--json"], b"other"))["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke = d.cli(&["revoke", "datakey", &ciphertext, "--reason", "key-compromise"], b"");
    assert!(revoke.status.success(), "{}", String::from_utf8_lossy(&revoke.stderr));
    let refused = d.cli(&["decrypt"], ciphertext.as_bytes());
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        d.cli(&["decrypt"], other.as_bytes()).status.success(),
        "another data key of the key still opens"
    );
    // ... and an id in capitals is the same id.
    let upper = dk.envelope_id.to_ascii_uppercase();
    assert!(d.cli(&["revoke", "datakey", &upper, "--reason", "superseded"], b"").status.success());
    let e = c.datakey_decrypt(&dk.envelope, &ctx(&[])).await.expect_err("revoked by its id in capitals");
    assert_eq!(e.code(), Some(ErrorCode::Revoked));
}

#[test]
fn inspect_names_what_is_wrong_and_exits_non_zero() {
    for (input, says) in [
        ("khx1:AAAA", "not a Keyhaven text form"),
        ("khc1:not*base64", "bad base64url"),
        ("khe1:S0gBAQ", "malformed envelope"),
        ("hello", "not a Keyhaven text form"),
    ] {
        let out = inspect(&[input], b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input}: {err}");
        assert!(err.contains(says), "{input}: expected `{says}` in: {err}");
    }
    let out = inspect(&[], b"KH\x01\x09\x01rest");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown Keyhaven kind 0x09"));
    let out = inspect(&[], b"khe1:S0gBAQ\nsecond");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1:"));
    let out = run_cli(
        std::path::Path::new("/nonexistent"),
        &["revoke", "datakey", "abc", "--reason", "superseded"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2), "a malformed id is a usage error, nothing sent");
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 hex digits"));
}
