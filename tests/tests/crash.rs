//! kill -9 during acknowledged writes of every kind (issue 20): key create,
//! rotate and set, data keys (their wrap reservations), revoke, lift,
//! destroy and master-key rotation, from several connections at once. After
//! each kill the daemon must start (its token anchor accepting the store),
//! every write it acknowledged must be there, a write it never answered may
//! be there or not (but nothing else), and the audit log must verify.
//!
//! `KEYHAVEN_CRASH_CYCLES` sets the number of kills (default 12); the
//! figure in issue 20's note comes from a run with 100.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyhaven::{Client, ErrorCode};
use keyhaven_tests::*;
use serde_json::{json, Value};

/// The writes made to one key, in order. Each key is written by one worker
/// only, so after a kill its state is that of its last acknowledged step,
/// or of the step after it if that one was sent and never answered.
const STEPS: [&str; 8] = ["create", "rotate", "set", "datakey", "revoke", "lift", "revoke", "destroy"];

/// A key's revocation state after step `i` (`None`: before any revoke).
fn revocation_after(i: usize) -> Option<&'static str> {
    match i {
        4 | 6 => Some("suspended"),
        7 => Some("destroyed"),
        _ => None,
    }
}

/// What one worker got acknowledged for one key.
#[derive(Debug, Default, Clone)]
struct KeyLog {
    /// The last step answered with success (`None`: not even `create`).
    acked: Option<usize>,
    /// A step was sent and never answered (the kill cut it).
    in_flight: bool,
    /// The envelope of the `datakey` step, once acknowledged.
    envelope: Option<String>,
}

/// A small deterministic generator (xorshift), seeded per run and printed,
/// so that a failing schedule can be replayed with `KEYHAVEN_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn scope(tenant: &str, key: &str) -> Value {
    json!({"kind": "key", "tenant": tenant, "key": key})
}

fn params(step: usize, tenant: &str, key: &str, i: u64) -> (&'static str, Value) {
    match STEPS[step] {
        "create" => ("key_create", json!({"tenant": tenant, "key": key})),
        "rotate" => ("key_rotate", json!({"tenant": tenant, "key": key})),
        "set" => ("key_set", json!({"tenant": tenant, "key": key, "rotate_every_secs": 86_400 + i})),
        "datakey" => ("datakey", json!({"tenant": tenant, "key": key, "include_plaintext": false})),
        "revoke" => ("revoke", json!({"scope": scope(tenant, key), "reason": "key-compromise"})),
        "lift" => ("revoke_lift", json!({"scope": scope(tenant, key), "reason": "unspecified"})),
        "destroy" => ("destroy", json!({"scope": scope(tenant, key), "confirm": format!("{tenant}/{key}")})),
        other => unreachable!("{other}"),
    }
}

/// One worker: keys `w{worker}k{n}` of `tenant`, each taken through every
/// step, until the connection dies. Returns what was acknowledged.
async fn writer(c: Client, tenant: String, worker: usize) -> BTreeMap<String, KeyLog> {
    let mut logs = BTreeMap::new();
    for n in 0u64.. {
        let key = format!("w{worker}k{n}");
        let log: &mut KeyLog = logs.entry(key.clone()).or_default();
        for (step, name) in STEPS.iter().enumerate() {
            let (op, p) = params(step, &tenant, &key, n);
            log.in_flight = true;
            match c.call_raw(op, p).await {
                Ok(answer) => {
                    log.in_flight = false;
                    log.acked = Some(step);
                    if *name == "datakey" {
                        log.envelope = answer["envelope"].as_str().map(str::to_owned);
                    }
                }
                Err(e) if e.code().is_none() => return logs, // the kill: no answer
                Err(e) => panic!("{tenant}/{key} step {name}: the daemon refused: {e}"),
            }
        }
    }
    logs
}

/// Master-key rotation in small batches, one call at a time; returns the
/// highest `to` acknowledged.
async fn master_rotator(c: Client) -> u64 {
    let mut to = 0;
    loop {
        match c.call_raw("admin_rotate_master", json!({"batch": 3})).await {
            Ok(answer) => {
                to = to.max(answer["to"].as_u64().expect("to"));
                if answer["finished"] == json!(true) {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
            Err(e) if e.code().is_none() => return to,
            Err(e) => panic!("admin_rotate_master refused: {e}"),
        }
    }
}

/// Checks one key against what was acknowledged for it.
async fn check_key(c: &Client, tenant: &str, key: &str, log: &KeyLog, revoked: &BTreeMap<String, String>) {
    let Some(acked) = log.acked else {
        return; // `create` never answered: the key may or may not exist
    };
    let name = format!("{tenant}/{key}");
    let show = c
        .call_raw("key_show", json!({"tenant": tenant, "key": key}))
        .await
        .unwrap_or_else(|e| panic!("{name}: acknowledged `create`, but after the kill: {e}"));
    if acked >= 1 {
        let current = show["current_version"].as_u64().unwrap();
        assert!(current >= 2, "{name}: acknowledged `rotate`, but the current version is {current}");
    }
    if acked >= 2 {
        let n: u64 = key.rsplit('k').next().unwrap().parse().unwrap();
        assert_eq!(show["rotate_every_secs"], json!(86_400 + n), "{name}: acknowledged `set` lost");
    }
    let now = revoked.get(&name).map(String::as_str);
    let allowed = [Some(revocation_after(acked)), log.in_flight.then(|| revocation_after(acked + 1))];
    let allowed: Vec<_> = allowed.into_iter().flatten().collect();
    // A `lift` after a revoke, in flight, may have lifted it; `create`..
    // `datakey` leave no revocation.
    assert!(
        allowed.contains(&now),
        "{name}: revocation state {now:?} after acknowledged step `{}` (in flight: {}); allowed {allowed:?}",
        STEPS[acked],
        log.in_flight
    );
    if let Some(envelope) = &log.envelope {
        let opened = c.call_raw("datakey_decrypt", json!({"envelope": envelope})).await;
        match now {
            None => {
                opened.unwrap_or_else(|e| panic!("{name}: acknowledged data key does not open: {e}"));
            }
            Some(_) => {
                let e = opened.expect_err("a revoked key's data key opened");
                assert_eq!(e.code(), Some(ErrorCode::Revoked), "{name}: {e}");
            }
        }
    }
}

/// Revocations in force, by `tenant/key`.
async fn key_revocations(c: &Client, tenant: &str) -> BTreeMap<String, String> {
    let list = c.call_raw("revoke_list", json!({"tenant": tenant})).await.expect("revoke_list");
    let mut out = BTreeMap::new();
    for r in list["revocations"].as_array().unwrap() {
        if r["scope"]["kind"] == "key" && r["scope"].get("version").is_none() {
            let name =
                format!("{}/{}", r["scope"]["tenant"].as_str().unwrap(), r["scope"]["key"].as_str().unwrap());
            out.insert(name, r["kind"].as_str().unwrap().to_owned());
        }
    }
    out
}

async fn check_round(c: &Client, tenant: &str, logs: &BTreeMap<String, KeyLog>) {
    let revoked = key_revocations(c, tenant).await;
    for (key, log) in logs {
        check_key(c, tenant, key, log, &revoked).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_writes_of_every_kind_loses_no_acknowledged_write() {
    let cycles: usize =
        std::env::var("KEYHAVEN_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let seed = std::env::var("KEYHAVEN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    eprintln!("crash test: {cycles} cycles, KEYHAVEN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut d = TestDaemon::start();
    let mut rounds: Vec<(String, BTreeMap<String, KeyLog>)> = Vec::new();
    let mut master_to = 1;
    let (mut steps_acked, mut cut) = (0, 0);
    for round in 0..cycles {
        let tenant = format!("r{round}");
        let mut workers = Vec::new();
        for w in 0..3 {
            workers.push(tokio::spawn(writer(d.client().await, tenant.clone(), w)));
        }
        let rotator = tokio::spawn(master_rotator(d.client().await));
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        signal(d.pid(), "KILL");
        let mut logs = BTreeMap::new();
        for w in workers {
            logs.extend(w.await.unwrap());
        }
        master_to = master_to.max(rotator.await.unwrap());
        let (status, _) = d.stop();
        assert!(!status.success(), "the daemon was not killed");
        d.start_again(); // panics if the start fails (an anchor refusing the store)

        steps_acked += logs.values().filter_map(|l| l.acked.map(|a| a + 1)).sum::<usize>();
        cut += logs.values().filter(|l| l.in_flight).count();
        let c = d.client().await;
        check_round(&c, &tenant, &logs).await;
        let health = c.health().await.unwrap();
        assert!(
            u64::from(health.token.master_key_version) >= master_to,
            "acknowledged master key version {master_to}, but health says {}",
            health.token.master_key_version
        );
        rounds.push((tenant, logs));
    }
    // Later kills must not undo what earlier rounds had made durable.
    let c = d.client().await;
    for (tenant, logs) in &rounds {
        check_round(&c, tenant, logs).await;
    }
    // Records written just before a kill are sealed only at the next start
    // and reported as such (AUDIT.md §4: `status` `unsealed`, CLI exit 3):
    // at most one range a kill, and nothing else wrong with the chain.
    let verify = c.call(&keyhaven::wire::AuditVerify {}).await.expect("audit_verify");
    assert!(verify.problem.is_none(), "audit log not intact after {cycles} kills: {:?}", verify.problem);
    assert_ne!(verify.status, "not_intact");
    assert!(verify.unsealed.len() <= cycles, "{} unsealed ranges for {cycles} kills", verify.unsealed.len());
    for range in &verify.unsealed {
        assert!(range.from <= range.to && range.to < range.reported_in, "{range:?}");
    }
    let cli = d.cli(&["audit", "verify"], b"");
    let expected = if verify.unsealed.is_empty() { 0 } else { 3 };
    assert_eq!(cli.status.code(), Some(expected), "{}", String::from_utf8_lossy(&cli.stdout));
    eprintln!(
        "crash test: {cycles} kills, {steps_acked} acknowledged writes checked, {cut} cut in flight, 0 lost; master key version {master_to}"
    );
    assert!(cut >= cycles, "the kills did not land among the writes ({cut} cut in {cycles} cycles)");
}
