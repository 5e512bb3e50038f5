//! Data keys do not stay in the daemon's memory (docs/SECURITY.md §5): a
//! scan of the running daemon's writable memory, through /proc/PID/mem as
//! root would read it, after every data-key path has run, finds none of the
//! keys the daemon handed out, raw or in base64.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyhaven::lifecycle::Rewrap;
use keyhaven_tests::*;

/// Every readable and writable mapping of `pid` (heap, stacks, anonymous
/// memory), read whole: (name, bytes).
fn writable_memory(pid: u32) -> Vec<(String, Vec<u8>)> {
    let maps = std::fs::File::open(format!("/proc/{pid}/maps")).unwrap();
    let mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).expect("read /proc/PID/mem (needs root or ptrace)");
    let mut out = Vec::new();
    for line in BufReader::new(maps).lines().map_while(Result::ok) {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else { continue };
        if !perms.starts_with("rw") {
            continue;
        }
        let name = parts.nth(3).unwrap_or("[anon]").to_owned();
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_ok() {
            out.push((name, buf));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn no_data_key_is_left_in_the_daemons_memory_after_use() {
    let d = TestDaemon::start();
    let mut keys = Vec::new();
    {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        for i in 0..40 {
            let context = ctx(&[&format!("row={i}")]);
            // datakey with the plaintext; datakey_decrypt of it; rewrap of it.
            let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
            keys.push(dk.plaintext.clone().expect("plaintext").expose().to_vec());
            let again = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
            assert_eq!(Some(again.plaintext), dk.plaintext);
            if i % 4 == 0 {
                c.call(&keyhaven::lifecycle::KeyRotate {
                    tenant: "acme".into(),
                    key: "pii".into(),
                    idempotency_key: None,
                })
                .await
                .unwrap();
            }
            c.call(&Rewrap { text: dk.envelope.clone(), context: context.clone() }).await.unwrap();
            // encrypt and decrypt use data keys the caller never sees.
            let ct = c.encrypt(&path("acme/pii"), b"a small secret", &context).await.unwrap();
            c.decrypt(&ct.ciphertext, &context).await.unwrap();
        }
    }
    // The connection is closed; everything the daemon held for it is gone.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let memory = writable_memory(d.pid());
    assert!(
        memory.iter().map(|(_, b)| b.len()).sum::<usize>() > 1 << 20,
        "the scan read the daemon's memory"
    );
    // The scan is meaningful: a value the daemon keeps is found.
    assert!(memory.iter().any(|(_, b)| contains(b, b"acme/pii")), "key names are expected in memory");
    let mut needles = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        needles.push((format!("data key #{i} (raw)"), key.clone()));
        needles.push((format!("data key #{i} (base64)"), STANDARD.encode(key).into_bytes()));
    }
    let patterns: Vec<Vec<u8>> = needles.iter().map(|(_, n)| n.clone()).collect();
    let mut found = Vec::new();
    for (region, bytes) in &memory {
        for i in find_any(bytes, &patterns) {
            found.push(format!("{} in {region}", needles[i].0));
        }
    }
    assert!(
        found.is_empty(),
        "{} of {} data keys left in memory:\n{}",
        found.len(),
        keys.len(),
        found.join("\n")
    );
}
