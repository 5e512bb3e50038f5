//! `keyhaven bench`: a closed-loop load generator against a running daemon.
//! Each of `concurrency` clients has its own connection and sends its next
//! request when the previous one is answered; latencies of every request are
//! kept and sorted for the percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::{Client, EncryptionContext, KeyPath, Sealer};

/// What to measure.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchOp {
    /// `health` (no HSM work beyond a probe).
    Health,
    /// `encrypt` of the payload.
    Encrypt,
    /// `datakey` (new data key, wrapped in the HSM).
    Datakey,
    /// `datakey_decrypt` (unwrap in the HSM).
    DatakeyDecrypt,
    /// `decrypt` of a ciphertext of the payload.
    Decrypt,
    /// Client-side `seal` of a record of the payload, with the sealing
    /// cache (one `Sealer`, so one connection and one cache, per client).
    Seal,
    /// Client-side `open` of records of the payload, with the opening cache.
    Open,
}

/// One row of results.
pub struct Row {
    pub op: BenchOp,
    pub concurrency: usize,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

/// Runs one op at one concurrency for `duration`.
pub async fn run(
    socket: &Path,
    key: &KeyPath,
    op: BenchOp,
    concurrency: usize,
    duration: Duration,
    payload: usize,
) -> Result<Row, keyhaven::Error> {
    let setup = Client::connect(socket).await?;
    match setup.key_create(key).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(keyhaven::ErrorCode::AlreadyExists) => {}
        Err(e) => return Err(e),
    }
    let ctx = EncryptionContext::from_pairs(["bench=1"])?;
    let envelope = setup.datakey(key, &ctx, false).await?.envelope;
    let envelope = Arc::new(envelope);
    let data = Arc::new(vec![0x5au8; payload]);
    let ciphertext = Arc::new(setup.encrypt(key, &data, &ctx).await?.ciphertext);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = Client::connect(socket).await?;
        let sealer = match op {
            BenchOp::Seal | BenchOp::Open => Some(bench_sealer(socket).await?),
            _ => None,
        };
        // Records to open: sealed (with the cache) before the clock starts.
        let mut records = Vec::new();
        if let (BenchOp::Open, Some(s)) = (op, &sealer) {
            for _ in 0..64 {
                records.push(s.seal(key, &data, &ctx).await?);
            }
        }
        clients.push((client, sealer, records));
    }
    // The clock starts once every connection is open.
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (client, sealer, records) in clients {
        let (key, ctx, envelope, data) = (key.clone(), ctx.clone(), envelope.clone(), data.clone());
        let ciphertext = ciphertext.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut n = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                n += 1;
                let ok = match (op, &sealer) {
                    (BenchOp::Health, _) => client.health().await.is_ok(),
                    (BenchOp::Encrypt, _) => client.encrypt(&key, &data, &ctx).await.is_ok(),
                    (BenchOp::Datakey, _) => client.datakey(&key, &ctx, true).await.is_ok(),
                    (BenchOp::DatakeyDecrypt, _) => client.datakey_decrypt(&envelope, &ctx).await.is_ok(),
                    (BenchOp::Decrypt, _) => client.decrypt(&ciphertext, &ctx).await.is_ok(),
                    (BenchOp::Seal, Some(s)) => s.seal(&key, &data, &ctx).await.is_ok(),
                    (BenchOp::Open, Some(s)) => s.open(&records[n % records.len()], &ctx).await.is_ok(),
                    _ => false,
                };
                if sealer.is_some() && n % 64 == 0 {
                    // Cache hits never wait: let the connections' reader
                    // tasks (revocation events) run.
                    tokio::task::yield_now().await;
                }
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(|e| keyhaven::Error::Protocol(e.to_string()))?;
        all.extend(lat);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied();
    Ok(Row {
        op,
        concurrency,
        ops: all.len() as u64,
        errors,
        secs,
        p50_us: pct(0.50).unwrap_or(0),
        p99_us: pct(0.99).unwrap_or(0),
        p999_us: pct(0.999).unwrap_or(0),
    })
}

/// A sealer with generous cache limits, as an application sealing many
/// small records would set them.
async fn bench_sealer(socket: &Path) -> Result<Sealer, keyhaven::Error> {
    let seal = SealLimits::new(Duration::from_secs(300), 1 << 24, 1 << 34)?;
    let open = OpenLimits::new(Duration::from_secs(300), 1024)?;
    Sealer::connect(socket, seal, open).await
}

/// Figures of `bench --op revoke-delay`.
pub struct RevokeDelay {
    /// Clients.
    pub clients: usize,
    /// Per round: from `revoke` returning to the last client's first
    /// refusal, µs (negative: every client refused before the revoker had
    /// its answer).
    pub last_us: Vec<i64>,
}

/// `concurrency` sealers (one connection each) seal records of `payload`
/// bytes with cached keys in a loop; a separate client revokes the key;
/// each sealer notes when it is first refused. Repeated `rounds` times
/// (the key is lifted between rounds).
pub async fn revoke_delay(
    socket: &Path,
    key: &KeyPath,
    concurrency: usize,
    payload: usize,
    rounds: usize,
) -> Result<RevokeDelay, keyhaven::Error> {
    use keyhaven::revocation::{Reason, Revoke, RevokeLift, Scope};
    let admin = Client::connect(socket).await?;
    match admin.key_create(key).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(keyhaven::ErrorCode::AlreadyExists) => {}
        Err(e) => return Err(e),
    }
    let scope = Scope::Key { tenant: key.tenant().into(), key: key.key().into(), version: None };
    let ctx = EncryptionContext::from_pairs(["bench=revoke"])?;
    let data = Arc::new(vec![0x5au8; payload]);
    let mut sealers = Vec::new();
    for _ in 0..concurrency {
        sealers.push(bench_sealer(socket).await?);
    }
    let mut last_us = Vec::new();
    for _ in 0..rounds {
        // Warm every cache, then keep sealing until refused.
        for s in &sealers {
            s.seal(key, &data, &ctx).await?;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for s in &sealers {
            let (s, key, ctx, data, stop) = (s.clone(), key.clone(), ctx.clone(), data.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return None;
                    }
                    if s.seal(&key, &data, &ctx).await.is_err() {
                        return Some(Instant::now());
                    }
                    n += 1;
                    if n % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        admin.call(&Revoke { scope: scope.clone(), reason: Reason::Unspecified, expires_at: None }).await?;
        let returned = Instant::now();
        let give_up = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(give_up);
        let mut worst = i64::MIN;
        for t in tasks {
            let refused = tokio::select! {
                r = t => r.map_err(|e| keyhaven::Error::Protocol(e.to_string()))?,
                _ = &mut give_up => None,
            };
            let Some(at) = refused else {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(keyhaven::Error::Protocol(
                    "a client went on sealing for 5 s after the revocation".into(),
                ));
            };
            let us = if at >= returned {
                at.duration_since(returned).as_micros() as i64
            } else {
                -(returned.duration_since(at).as_micros() as i64)
            };
            worst = worst.max(us);
        }
        last_us.push(worst);
        admin.call(&RevokeLift { scope: scope.clone(), reason: Reason::Unspecified }).await?;
    }
    Ok(RevokeDelay { clients: concurrency, last_us })
}

/// Prints the table header.
pub fn header() {
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "op", "conc", "ops", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "errors"
    );
}

/// Prints a row.
pub fn print(r: &Row) {
    println!(
        "{:<16} {:>5} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>7}",
        clap::ValueEnum::to_possible_value(&r.op).map(|v| v.get_name().to_owned()).unwrap_or_default(),
        r.concurrency,
        r.ops,
        r.ops as f64 / r.secs,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.errors
    );
}
