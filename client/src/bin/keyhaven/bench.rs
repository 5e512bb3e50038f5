//! `keyhaven bench`: a closed-loop load generator against a running daemon.
//! Each of `concurrency` clients sends its next request when the previous
//! one is answered, on its own connection (or, with `--new-connection`, on a
//! new connection per request, as short-lived CLI callers do). Every
//! latency goes into an HDR histogram (3 significant digits, nanoseconds),
//! merged over the clients for the percentiles.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::{Client, EncryptionContext, KeyPath, Sealer};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// `health` (no HSM work beyond a probe).
    Health,
    /// `encrypt` of the payload.
    Encrypt,
    /// `datakey` (new data key, wrapped in the HSM).
    Datakey,
    /// `datakey_decrypt` (unwrap in the HSM).
    DatakeyDecrypt,
    /// `rewrap` of an envelope made under an older version (unwrap and wrap in the HSM).
    Rewrap,
    /// `decrypt` of a ciphertext of the payload.
    Decrypt,
    /// `key_create` of a new key each time (tenant `bench-create`): a
    /// write, made durable and anchored in the token before the answer.
    KeyCreate,
    /// Client-side `seal` of a record of the payload, with the sealing
    /// cache (one `Sealer`, so one connection and one cache, per client).
    Seal,
    /// Client-side `open` of records of the payload, with the opening cache.
    Open,
    /// `mac` of the payload under an `hmac-sha256` key (KEY with `-hmac` after it).
    Mac,
    /// `sign` of the payload with an `ecdsa-p256` key (KEY with `-p256` after it).
    SignP256,
    /// `sign` of the payload with an `ecdsa-p384` key (KEY with `-p384` after it).
    SignP384,
    /// `sign` of the payload with an `rsa-3072-pss` key (KEY with `-rsa3072` after it).
    SignRsa3072,
    /// `decrypt` of a `khp1:` public-key ciphertext of the payload, made
    /// offline to an `rsa-4096-oaep` key (KEY with `-oaep` after it): the
    /// token decrypts its data key with RSA-OAEP, the daemon opens the rest.
    PkDecrypt,
}

impl BenchOp {
    /// The name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::Health => "health",
            BenchOp::Encrypt => "encrypt",
            BenchOp::Datakey => "datakey",
            BenchOp::DatakeyDecrypt => "datakey-decrypt",
            BenchOp::Rewrap => "rewrap",
            BenchOp::Decrypt => "decrypt",
            BenchOp::KeyCreate => "key-create",
            BenchOp::Seal => "seal",
            BenchOp::Open => "open",
            BenchOp::Mac => "mac",
            BenchOp::SignP256 => "sign-p256",
            BenchOp::SignP384 => "sign-p384",
            BenchOp::SignRsa3072 => "sign-rsa3072",
            BenchOp::PkDecrypt => "pk-decrypt",
        }
    }
}

/// How to run.
pub struct Options {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The key to use (created when missing).
    pub key: KeyPath,
    /// Measuring time per op and concurrency.
    pub duration: Duration,
    /// Plaintext bytes for `encrypt`.
    pub payload: usize,
    /// A new connection (connect, `hello`) for every request.
    pub new_connection: bool,
    /// Print a progress line on stderr (when it is a terminal).
    pub progress: bool,
}

/// One row of results.
#[derive(serde::Serialize)]
pub struct Row {
    pub op: &'static str,
    pub concurrency: usize,
    pub new_connection: bool,
    pub payload: usize,
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Parses a size: `512`, `512B`, `1KiB`, `4KB` (1000), `1MiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("`{s}` is not a size (512, 512B, 1KiB, 4KB, 1MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "kb" => 1000,
        "m" | "mib" => 1024 * 1024,
        "mb" => 1_000_000,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (B, KiB, KB, MiB, MB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// Everything a request needs, made once before the clock starts.
struct Material {
    key: KeyPath,
    ctx: EncryptionContext,
    envelope: String,
    old_envelope: String,
    ciphertext: String,
    data: Vec<u8>,
    /// For `mac` and `sign-*`: the key of that type.
    typed_key: KeyPath,
    /// For `key-create`: this run's prefix, and keys made so far.
    run: u128,
    created: AtomicU64,
}

async fn prepare(opts: &Options, op: BenchOp) -> Result<Material, keyhaven::Error> {
    let setup = Client::connect(&opts.socket).await?;
    let key = opts.key.clone();
    match setup.key_create(&key).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(keyhaven::ErrorCode::AlreadyExists) => {}
        Err(e) => return Err(e),
    }
    let ctx = EncryptionContext::from_pairs(["bench=1"])?;
    let mut old_envelope = String::new();
    if op == BenchOp::Rewrap {
        // An envelope under a version that is no longer current, so that
        // every rewrap unwraps and wraps again.
        old_envelope = setup.datakey(&key, &ctx, keyhaven::Plaintext::Omit).await?.envelope;
        let rotate = keyhaven::lifecycle::KeyRotate {
            tenant: key.tenant().into(),
            key: key.key().into(),
            idempotency_key: None,
        };
        setup.call(&rotate).await?;
    }
    let envelope = setup.datakey(&key, &ctx, keyhaven::Plaintext::Omit).await?.envelope;
    let data = vec![0x5a; opts.payload];
    let ciphertext = match op {
        BenchOp::Decrypt => setup.encrypt(&key, &data, &ctx).await?.ciphertext,
        _ => String::new(),
    };
    let typed = match op {
        BenchOp::Mac => Some(("hmac", keyhaven::KeyType::HmacSha256)),
        BenchOp::SignP256 => Some(("p256", keyhaven::KeyType::EcdsaP256)),
        BenchOp::SignP384 => Some(("p384", keyhaven::KeyType::EcdsaP384)),
        BenchOp::SignRsa3072 => Some(("rsa3072", keyhaven::KeyType::RsaPss3072)),
        BenchOp::PkDecrypt => Some(("oaep", keyhaven::KeyType::RsaOaep4096)),
        _ => None,
    };
    let typed_key = match typed {
        Some((suffix, kind)) => {
            let k = KeyPath::new(key.tenant(), &format!("{}-{suffix}", key.key()))?;
            match setup.key_create_of_type(&k, kind).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(keyhaven::ErrorCode::AlreadyExists) => {}
                Err(e) => return Err(e),
            }
            k
        }
        None => key.clone(),
    };
    let ciphertext = match op {
        BenchOp::PkDecrypt => public_ciphertext(&setup, &typed_key, &data, &ctx).await?,
        _ => ciphertext,
    };
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Ok(Material {
        key,
        ctx,
        envelope,
        old_envelope,
        ciphertext,
        data,
        typed_key,
        run,
        created: AtomicU64::new(0),
    })
}

/// A `khp1:` ciphertext of `data` to the current version of the
/// `rsa-4096-oaep` key `key`, made offline as `keyhaven encrypt
/// --public-key` makes one.
async fn public_ciphertext(
    setup: &Client,
    key: &KeyPath,
    data: &[u8],
    ctx: &EncryptionContext,
) -> Result<String, keyhaven::Error> {
    let public = setup.public_key(key, None).await?;
    let pkey = openssl::pkey::PKey::public_key_from_pem(public.pem.as_bytes())
        .map_err(|e| keyhaven::Error::Protocol(format!("the daemon's public key: {e}")))?;
    crate::seal_to_public_key(&pkey, key, public.key_version, data, ctx)
        .map(|ct| ct.to_string())
        .map_err(|f| keyhaven::Error::Protocol(f.to_string()))
}

/// A client's own state: its sealer (for `seal` and `open`) and the
/// records it opens.
#[derive(Default)]
struct Local {
    sealer: Option<Sealer>,
    records: Vec<Vec<u8>>,
    n: usize,
}

async fn one(client: &Client, op: BenchOp, m: &Material, local: &mut Local) -> Result<(), keyhaven::Error> {
    local.n += 1;
    if let Some(s) = &local.sealer {
        if local.n % 64 == 0 {
            // Cache hits never wait: let the connection's reader task
            // (revocation events) run.
            tokio::task::yield_now().await;
        }
        return match op {
            BenchOp::Seal => s.seal(&m.key, &m.data, &m.ctx).await.map(drop),
            _ => s.open(&local.records[local.n % local.records.len()], &m.ctx).await.map(drop),
        };
    }
    match op {
        BenchOp::Decrypt => client.decrypt(&m.ciphertext, &m.ctx).await.map(drop),
        BenchOp::KeyCreate => {
            let n = m.created.fetch_add(1, Ordering::Relaxed);
            client.key_create(&KeyPath::new("bench-create", &format!("k{}-{n}", m.run))?).await.map(drop)
        }
        BenchOp::Seal | BenchOp::Open => unreachable!("a sealer is made for seal and open"),
        BenchOp::Health => client.health().await.map(drop),
        BenchOp::Encrypt => client.encrypt(&m.key, &m.data, &m.ctx).await.map(drop),
        BenchOp::Datakey => client.datakey(&m.key, &m.ctx, keyhaven::Plaintext::Include).await.map(drop),
        BenchOp::DatakeyDecrypt => client.datakey_decrypt(&m.envelope, &m.ctx).await.map(drop),
        BenchOp::Rewrap => {
            let req = keyhaven::lifecycle::Rewrap { text: m.old_envelope.clone(), context: m.ctx.clone() };
            client.call(&req).await.map(drop)
        }
        BenchOp::Mac => client.mac(&m.typed_key, &m.data, None).await.map(drop),
        BenchOp::PkDecrypt => client.decrypt(&m.ciphertext, &m.ctx).await.map(drop),
        BenchOp::SignP256 | BenchOp::SignP384 | BenchOp::SignRsa3072 => {
            let req = keyhaven::sign::Sign {
                tenant: m.typed_key.tenant().into(),
                key: m.typed_key.key().into(),
                message: Some(keyhaven::wire::SecretBytes::new(m.data.clone())),
                digest: None,
            };
            client.call(&req).await.map(drop)
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Runs one op at one concurrency for `opts.duration`.
pub async fn run(opts: &Options, op: BenchOp, concurrency: usize) -> Result<Row, keyhaven::Error> {
    let m = Arc::new(prepare(opts, op).await?);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = match opts.new_connection {
            false => Some(Client::connect(&opts.socket).await?),
            true => None,
        };
        let mut local = Local::default();
        if matches!(op, BenchOp::Seal | BenchOp::Open) {
            let s = bench_sealer(&opts.socket).await?;
            if op == BenchOp::Open {
                // Records to open: sealed (with the cache) before the clock starts.
                for _ in 0..64 {
                    local.records.push(s.seal(&m.key, &m.data, &m.ctx).await?);
                }
            }
            local.sealer = Some(s);
        }
        clients.push((client, local));
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    // The clock starts once every connection is open.
    let start = Instant::now();
    let deadline = start + opts.duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for (client, mut local) in clients {
        let (m, done, failed, first_error) = (m.clone(), done.clone(), failed.clone(), first_error.clone());
        let socket = opts.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = match &client {
                    Some(c) => one(c, op, &m, &mut local).await,
                    None => match Client::connect(&socket).await {
                        Ok(c) => one(&c, op, &m, &mut local).await,
                        Err(e) => Err(e),
                    },
                };
                match r {
                    Ok(()) => {
                        let ns = t.elapsed().as_nanos().clamp(1, 600_000_000_000) as u64;
                        hist.saturating_record(ns);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().expect("error lock").get_or_insert_with(|| e.to_string());
                    }
                }
            }
            hist
        }));
    }
    let progress = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let (done, failed) = (done.clone(), failed.clone());
        let total = opts.duration.as_secs_f64();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (now, n) = (Instant::now(), done.load(Ordering::Relaxed));
                let rate = (n - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, n);
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r{:<16} c={:<4} {:>5.1}/{:.1}s {:>9.0} ops/s {:>10} ops {:>6} errors ",
                    op.name(),
                    concurrency,
                    start.elapsed().as_secs_f64().min(total),
                    total,
                    rate,
                    n,
                    failed.load(Ordering::Relaxed)
                );
                let _ = err.flush();
            }
        })
    });
    let mut all = histogram();
    for t in tasks {
        let h = t.await.map_err(|e| keyhaven::Error::Protocol(e.to_string()))?;
        all.add(&h).map_err(|e| keyhaven::Error::Protocol(format!("histogram: {e}")))?;
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{:80}\r", "");
        let _ = err.flush();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let ops = all.len();
    let first_error = first_error.lock().expect("error lock").take();
    Ok(Row {
        op: op.name(),
        concurrency,
        new_connection: opts.new_connection,
        payload: opts.payload,
        ops,
        errors: failed.load(Ordering::Relaxed),
        secs,
        ops_per_sec: ops as f64 / secs,
        p50_us: us(all.value_at_quantile(0.50)),
        p99_us: us(all.value_at_quantile(0.99)),
        p999_us: us(all.value_at_quantile(0.999)),
        max_us: us(all.max()),
        first_error,
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

/// Checks that the socket exists before any work (a clearer message).
pub fn check_socket(socket: &Path) -> Result<(), String> {
    if socket.exists() {
        Ok(())
    } else {
        Err(format!("no daemon socket at {} (set --socket or $KEYHAVEN_SOCKET)", socket.display()))
    }
}

/// Prints the table header.
pub fn header() {
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "op", "conc", "ops", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
    );
}

/// Prints a row.
pub fn print(r: &Row) {
    let name = if r.new_connection { format!("{}/conn", r.op) } else { r.op.to_owned() };
    println!(
        "{:<16} {:>5} {:>10} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>7}",
        name, r.concurrency, r.ops, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us, r.max_us, r.errors
    );
    if let Some(e) = &r.first_error {
        println!("  first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32"), Ok(32));
        assert_eq!(parse_size("32B"), Ok(32));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("4KB"), Ok(4000));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1XB").is_err() && parse_size("KiB").is_err());
    }
}
