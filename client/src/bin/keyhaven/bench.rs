//! `keyhaven bench`: a closed-loop load generator against a running daemon.
//! Each of `concurrency` clients has its own connection and sends its next
//! request when the previous one is answered; latencies of every request are
//! kept and sorted for the percentiles.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::{Client, EncryptionContext, KeyPath};

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
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(Client::connect(socket).await?);
    }
    // The clock starts once every connection is open.
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for client in clients {
        let (key, ctx, envelope, data) = (key.clone(), ctx.clone(), envelope.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match op {
                    BenchOp::Health => client.health().await.is_ok(),
                    BenchOp::Encrypt => client.encrypt(&key, &data, &ctx).await.is_ok(),
                    BenchOp::Datakey => client.datakey(&key, &ctx, true).await.is_ok(),
                    BenchOp::DatakeyDecrypt => client.datakey_decrypt(&envelope, &ctx).await.is_ok(),
                };
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
