//! `keyhavend bench`: the whole comparison in one go (docs/PERFORMANCE.md).
//!
//! 1. makes a fresh dev install (SoftHSM2 token, config, store) in a folder
//!    and starts `keyhavend dev` on it, as its own process;
//! 2. measures the raw token rate in this process: AES-256-GCM decryption
//!    of a 32-byte data key with a session-object AES key, with the AAD a
//!    data-key decryption uses, one session, one thread: the token's own
//!    limit for the daemon's hottest operation;
//! 3. runs `keyhaven bench` (a second process, as an application would be)
//!    against the daemon;
//! 4. prints the table and the ratio daemon/raw for data-key decryption at
//!    the highest concurrency, and for `mac`, `sign-p256`/`sign-p384`/
//!    `sign-rsa3072` and `pk-decrypt` (when asked for) at each concurrency
//!    against the token's own rate of HMAC-SHA256, ECDSA and RSASSA-PSS
//!    signing and RSA-OAEP decryption.
//!
//! With `--token-latency 1ms` the token is the slow token
//! (tests/slow-token: SoftHSM2 behind a delay per call, like a network
//! HSM), the daemon's `[hsm] workers` is `"auto"`, and the raw rate is
//! measured with 8, 32 and 128 sessions in parallel and with as many as
//! the daemon chose.
//!
//! A benchmark, not a test: nothing here fails on a timing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use keyhaven::envelope::{self, EnvelopeId, NONCE_LEN, TAG_LEN};
use keyhaven::{EncryptionContext, KeyPath};

use crate::config::Config;
use crate::hsm::token;

/// What to run: the options of `keyhavend bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Folder for the dev install (must not exist or be empty) [default: a temporary one, removed after].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Operations for `keyhaven bench --op` [default: health,encrypt,datakey,datakey-decrypt,rewrap;
    /// with --token-latency: datakey-decrypt]. With mac, sign-p256, sign-p384, sign-rsa3072 or
    /// pk-decrypt the token's own rate of that operation is measured too, and compared.
    #[arg(long = "op", value_name = "OP")]
    pub ops: Option<String>,
    /// Concurrent clients for `keyhaven bench --concurrency` [default: 1,8,64; with --token-latency: 8,64].
    #[arg(long)]
    pub concurrency: Option<String>,
    /// Time per measurement (and for the raw token rate).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Also measure a new connection per request (datakey-decrypt at 1 and 8 clients).
    #[arg(long)]
    pub new_connection: bool,
    /// Run the daemon with the audit log off ([audit] enabled = false), to measure its cost.
    #[arg(long)]
    pub no_audit: bool,
    /// HSM worker threads of the daemon ([hsm] workers; the dev default is 1,
    /// with --token-latency "auto").
    #[arg(long)]
    pub workers: Option<usize>,
    /// Run the daemon with `[hsm] inline = true`: AES-GCM and HMAC calls on
    /// the I/O threads, each with its own session.
    #[arg(long)]
    pub inline: bool,
    /// Put the slow token (tests/slow-token, next to this executable) in
    /// front of SoftHSM2 with this delay per call, e.g. 1ms: a token shaped
    /// like a network HSM.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub token_latency: Option<Duration>,
    /// With --token-latency: `operation` (one delay per token operation;
    /// init calls and length queries are free) or `call` (every call).
    #[arg(long, default_value = "operation", value_parser = ["operation", "call"])]
    pub token_latency_per: String,
    /// With --token-latency: the session counts to measure the daemon's scaling at, each with
    /// `[hsm] workers` set to it and three clients per session, against `sessions / latency`
    /// and the raw token with as many sessions; `none` to skip.
    #[arg(long, default_value = "8,32,128")]
    pub sessions: String,
    /// Then run datakey-decrypt at 64 clients for this long (e.g. 60s),
    /// sampling the daemon's resident memory every 10 s, and print its growth.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub soak: Option<Duration>,
    /// Instead of the table: the cost of counting metrics. datakey-decrypt at 64 clients for
    /// `--duration`, against the daemon with `[metrics] collect` on and off in turn (a restart
    /// each), `--metrics-rounds` times each; prints the median rates and the difference.
    #[arg(long)]
    pub metrics_cost: bool,
    /// Instead of the table: audit shipping. datakey-decrypt at 64 clients for `--duration`
    /// without sinks, then with a file sink and a syslog sink (to a datagram socket this
    /// command reads), `--metrics-rounds` times each; prints the rates, each sink's lag when the
    /// load stops, how long it takes to catch up, and its shipping rate.
    #[arg(long, conflicts_with = "metrics_cost")]
    pub audit_sinks: bool,
    /// Rounds of each setting for `--metrics-cost` and `--audit-sinks`.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub metrics_rounds: u32,
    /// The `keyhaven` binary [default: the one next to keyhavend, else from PATH].
    #[arg(long)]
    pub keyhaven: Option<PathBuf>,
}

/// The raw token rate.
pub struct Raw {
    /// Decryptions per second.
    pub ops_per_sec: f64,
    /// Mean time per decryption.
    pub mean_us: f64,
}

/// Measures AES-256-GCM decryption of a 32-byte data key in the token, one
/// session, one thread, for `duration`: the same mechanism, key kind
/// (a sensitive, non-extractable session-object AES-256 key, as an unwrapped
/// KEK is), data and AAD size as a data-key decryption. Uses the same
/// cryptoki call as the daemon's worker (`C_DecryptInit`, then `C_Decrypt`
/// twice: length, then data).
pub fn raw_datakey_decrypt(config: &Config, duration: Duration) -> anyhow::Result<Raw> {
    let hsm = config.hsm_config().map_err(anyhow::Error::msg)?;
    let pkcs11 = token::load_module(&hsm.module)?;
    let slot = token::find_token(&pkcs11, &hsm.token_label)?;
    let session = token::open_session(&pkcs11, slot, &hsm.token_label, &hsm.pin)?;
    let (key, nonce, aad, sealed) = decrypt_fixture(&session)?;
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..64 {
            let mut iv = nonce;
            let params = GcmParams::new(&mut iv, &aad, (8 * TAG_LEN as u64).into())?;
            let plain = zeroize::Zeroizing::new(session.decrypt(&Mechanism::AesGcm(params), key, &sealed)?);
            if plain.len() != 32 {
                bail!("the token returned {} bytes, expected 32", plain.len());
            }
        }
        n += 64;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = session.destroy_object(key);
    Ok(Raw { ops_per_sec: n as f64 / secs, mean_us: secs * 1e6 / n as f64 })
}

/// The raw token rate of the operation behind `mac`, `sign` or a
/// public-key `decrypt` (`op`: `mac`, `sign-p256`, `sign-p384`,
/// `sign-rsa3072`, `pk-decrypt`), one session, one thread, for
/// `duration`: HMAC-SHA256 (C_Sign, CKM_SHA256_HMAC) of a `payload`-byte
/// message with a sensitive, non-extractable session-object generic secret
/// (as an unwrapped HMAC key version is), or ECDSA (C_Sign, CKM_ECDSA) of a
/// SHA-256/384 digest with a session-object EC private key (as an
/// unwrapped signing key version is; the daemon hashes, the token signs),
/// RSASSA-PSS (CKM_RSA_PKCS_PSS) of a SHA-256 digest with a 3072-bit key,
/// or RSA-OAEP decryption (CKM_RSA_PKCS_OAEP, SHA-1) of a 32-byte data key
/// with a 4096-bit key, as a `khp1:` ciphertext's is.
pub fn raw_mac_or_sign(config: &Config, op: &str, payload: usize, duration: Duration) -> anyhow::Result<Raw> {
    let hsm = config.hsm_config().map_err(anyhow::Error::msg)?;
    let pkcs11 = token::load_module(&hsm.module)?;
    let slot = token::find_token(&pkcs11, &hsm.token_label)?;
    let session = token::open_session(&pkcs11, slot, &hsm.token_label, &hsm.pin)?;
    let (key, others, mechanism, data) = match op {
        "mac" => {
            let key = session.generate_key(
                &Mechanism::GenericSecretKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                ],
            )?;
            (key, None, Mechanism::Sha256Hmac, vec![0x5a; payload])
        }
        "sign-p256" | "sign-p384" => {
            let kind =
                if op == "sign-p256" { keyhaven::KeyType::EcdsaP256 } else { keyhaven::KeyType::EcdsaP384 };
            let (params, _) = crate::hsm::ec::curve(kind)?;
            let (public, private) = session.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(params.to_vec()),
                    Attribute::Token(false),
                    Attribute::Verify(true),
                ],
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                ],
            )?;
            let digest = if op == "sign-p256" { 32 } else { 48 };
            (private, Some(public), Mechanism::Ecdsa, vec![0x5a; digest])
        }
        "sign-rsa3072" | "pk-decrypt" => {
            let decrypts = op == "pk-decrypt";
            let bits: u64 = if decrypts { 4096 } else { 3072 };
            let (public, private) = session.generate_key_pair(
                &Mechanism::RsaPkcsKeyPairGen,
                &[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::ModulusBits(bits.into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    Attribute::Token(false),
                    Attribute::Verify(!decrypts),
                    Attribute::Encrypt(decrypts),
                ],
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(KeyType::RSA),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(!decrypts),
                    Attribute::Decrypt(decrypts),
                ],
            )?;
            if decrypts {
                // A 32-byte data key under RSA-OAEP, as in a `khp1:` ciphertext.
                let block = session.encrypt(&crate::hsm::rsa::oaep(), public, &[0x5a; 32])?;
                (private, Some(public), crate::hsm::rsa::oaep(), block)
            } else {
                (private, Some(public), Mechanism::RsaPkcsPss(crate::hsm::rsa::pss_params()), vec![0x5a; 32])
            }
        }
        other => bail!("no raw token rate for `{other}`"),
    };
    let decrypts = op == "pk-decrypt";
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..16 {
            let out = match decrypts {
                true => session.decrypt(&mechanism, key, &data)?,
                false => session.sign(&mechanism, key, &data)?,
            };
            if out.is_empty() {
                bail!("the token returned an empty {op} result");
            }
        }
        n += 16;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = session.destroy_object(key);
    if let Some(p) = others {
        let _ = session.destroy_object(p);
    }
    Ok(Raw { ops_per_sec: n as f64 / secs, mean_us: secs * 1e6 / n as f64 })
}

/// The raw token rate with `sessions` sessions, each on its own thread
/// with its own key, doing what [`raw_datakey_decrypt`] does, at once, for
/// `duration`: what the token gives when nothing but the calls stands
/// between it and the caller.
pub fn raw_datakey_decrypt_parallel(
    config: &Config,
    sessions: usize,
    duration: Duration,
) -> anyhow::Result<Raw> {
    let hsm = config.hsm_config().map_err(anyhow::Error::msg)?;
    let pkcs11 = token::load_module(&hsm.module)?;
    let slot = token::find_token(&pkcs11, &hsm.token_label)?;
    let barrier = std::sync::Barrier::new(sessions);
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|_| {
                let (pkcs11, hsm, barrier) = (&pkcs11, &hsm, &barrier);
                s.spawn(move || -> anyhow::Result<u64> {
                    let session = token::open_session(pkcs11, slot, &hsm.token_label, &hsm.pin);
                    // Every thread waits for the others, even one that failed.
                    let ready = session.and_then(|s| Ok((decrypt_fixture(&s)?, s)));
                    barrier.wait();
                    let ((key, nonce, aad, sealed), session) = ready?;
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < duration {
                        let mut iv = nonce;
                        let params = GcmParams::new(&mut iv, &aad, (8 * TAG_LEN as u64).into())?;
                        let plain = zeroize::Zeroizing::new(session.decrypt(
                            &Mechanism::AesGcm(params),
                            key,
                            &sealed,
                        )?);
                        if plain.len() != 32 {
                            bail!("the token returned {} bytes, expected 32", plain.len());
                        }
                        n += 1;
                    }
                    let _ = session.destroy_object(key);
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a thread panicked"))))
            .collect()
    });
    let mut n = 0;
    for r in results {
        n += r?;
    }
    let secs = duration.as_secs_f64();
    Ok(Raw { ops_per_sec: n as f64 / secs, mean_us: secs * 1e6 * sessions as f64 / n.max(1) as f64 })
}

/// A session-object AES-256 key as an unwrapped KEK is, and a data key
/// sealed under it with a data-key decryption's AAD.
#[allow(clippy::type_complexity)]
fn decrypt_fixture(
    session: &cryptoki::session::Session,
) -> Result<(cryptoki::object::ObjectHandle, [u8; NONCE_LEN], Vec<u8>, Vec<u8>), crate::hsm::HsmError> {
    let key = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )?;
    let path: KeyPath = "bench/bench".parse().expect("a key path");
    let ctx = EncryptionContext::from_pairs(["bench=1"]).expect("a context");
    let mut nonce = [0u8; NONCE_LEN];
    session.generate_random_slice(&mut nonce)?;
    let header = envelope::envelope_header(&path, 1, &EnvelopeId([7; 16]), &nonce);
    let aad = envelope::aad(&header, &ctx);
    let mut dek = [0u8; 32];
    session.generate_random_slice(&mut dek)?;
    let mut iv = nonce;
    let sealed = session.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, &aad, (8 * TAG_LEN as u64).into())?),
        key,
        &dek,
    )?;
    Ok((key, nonce, aad, sealed))
}

/// The daemon, stopped (SIGTERM) when dropped.
struct DaemonProcess(Child);

impl DaemonProcess {
    fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.0.id())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of a process, KiB (from /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The daemon's HSM worker count, from `keyhaven health`.
fn daemon_workers(bin: &Path, socket: &Path) -> Option<u64> {
    let out = Command::new(bin).arg("--socket").arg(socket).arg("health").output().ok()?;
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    health["token"]["workers"].as_u64()
}

/// The slow token's module, next to this executable (built with the
/// workspace: `cargo build --workspace`, or `--release`).
fn slow_token_module() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let module = exe.with_file_name("libkeyhaven_slow_token.so");
    if !module.exists() {
        bail!(
            "{} is missing: build the workspace (`cargo build --workspace`, or `--release`), which builds \
             the slow token (tests/slow-token)",
            module.display()
        );
    }
    Ok(module)
}

fn start_daemon(dir: &Path) -> anyhow::Result<(DaemonProcess, PathBuf)> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut child = Command::new(exe)
        .args(["dev", "--dir"])
        .arg(dir)
        .env("KEYHAVEN_LOG", std::env::var("KEYHAVEN_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start `keyhavend dev`")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let daemon = DaemonProcess(child);
    // The daemon prints `export KEYHAVEN_SOCKET=…` once it serves.
    let mut lines = BufReader::new(stdout).lines();
    let socket = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(s) = l.strip_prefix("export KEYHAVEN_SOCKET=") {
                    break PathBuf::from(s);
                }
            }
            _ => bail!("the daemon stopped before serving; see {}", dir.join("daemon.log").display()),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((daemon, socket))
}

fn keyhaven_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.keyhaven {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe()?;
    let next = exe.with_file_name("keyhaven");
    if next.exists() {
        return Ok(next);
    }
    Ok(PathBuf::from("keyhaven"))
}

/// One row of `keyhaven bench --json`.
#[derive(serde::Deserialize)]
struct Row {
    op: String,
    concurrency: usize,
    new_connection: bool,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    first_error: Option<String>,
}

fn client_bench(bin: &Path, socket: &Path, args: &[String]) -> anyhow::Result<Vec<Row>> {
    let out = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!("`keyhaven bench` failed ({})", out.status);
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        rows.push(serde_json::from_str::<Row>(line).with_context(|| format!("bad row: {line}"))?);
    }
    Ok(rows)
}

/// Runs datakey-decrypt at 64 clients for `length`, sampling the daemon's
/// resident memory every 10 s; returns `(seconds, KiB)` samples, the first
/// at 0 s.
fn soak(
    bin: &Path,
    socket: &Path,
    daemon: &DaemonProcess,
    length: Duration,
) -> anyhow::Result<Vec<(u64, u64)>> {
    eprintln!("keyhavend bench: soak, datakey-decrypt at 64 clients for {} s", length.as_secs());
    let mut child = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(["bench", "--op", "datakey-decrypt", "--concurrency", "64", "--json", "--duration"])
        .arg(format!("{}ms", length.as_millis()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next = 0;
    loop {
        if start.elapsed() >= Duration::from_secs(next) {
            if let Some(kib) = daemon.rss_kib() {
                samples.push((next, kib));
            }
            next += 10;
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !child.wait()?.success() {
        bail!("`keyhaven bench` (soak) failed");
    }
    Ok(samples)
}

fn print_soak(samples: &[(u64, u64)]) {
    let line: Vec<String> =
        samples.iter().map(|(s, kib)| format!("{s}s {:.1}", *kib as f64 / 1024.0)).collect();
    println!("soak, datakey-decrypt c=64, resident memory MiB: {}", line.join(", "));
    let at10 = samples.iter().find(|(s, _)| *s == 10);
    if let (Some((_, a)), Some((s, b))) = (at10, samples.last()) {
        if *s > 10 {
            println!(
                "soak: resident memory from 10 s to {s} s: {:+.1} %",
                (*b as f64 - *a as f64) * 100.0 / *a as f64
            );
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.to_owned()))
        .and_then(|l| l.split(':').nth(1).map(|m| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let softhsm = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    format!("{cores} cores ({model}), SoftHSM2 {softhsm}, load average {load}")
}

/// Runs the comparison and prints it.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (dir, temporary) = match &args.dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!("{} is not empty: `keyhavend bench` needs a fresh folder for its token", d.display());
            }
            (d.clone(), false)
        }
        None => (std::env::temp_dir().join(format!("keyhaven-bench-{}", std::process::id())), true),
    };
    let result = run_in(&args, &dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(args: &BenchArgs, dir: &Path) -> anyhow::Result<()> {
    let bin = keyhaven_binary(args)?;
    let sessions = parse_sessions(&args.sessions)?;
    if let Some(latency) = args.token_latency {
        // The dev install's token, the daemon and the raw loops all load
        // the slow token; it reads these at its first call.
        std::env::set_var("KEYHAVEN_SOFTHSM_MODULE", slow_token_module()?);
        std::env::set_var("KEYHAVEN_SLOW_TOKEN_DELAY", format!("{}us", latency.as_micros()));
        std::env::set_var("KEYHAVEN_SLOW_TOKEN_PER", &args.token_latency_per);
        std::env::remove_var("KEYHAVEN_SLOW_TOKEN_MAX_SESSIONS");
    }
    eprintln!("keyhavend bench: a fresh dev install in {}", dir.display());
    let (config_path, store) = crate::dev::prepare(dir, None)?;
    drop(store);
    let mut settings = Vec::new();
    if args.no_audit {
        settings.push(("audit", "enabled", toml::Value::Boolean(false)));
    }
    if args.inline {
        settings.push(("hsm", "inline", toml::Value::Boolean(true)));
    }
    if let Some(n) = args.workers {
        settings.push(("hsm", "workers", toml::Value::Integer(n as i64)));
    } else if args.token_latency.is_some() {
        settings.push(("hsm", "workers", toml::Value::String("auto".into())));
    }
    set_config(&config_path, settings)?;
    let config = Config::load(&config_path)?;
    if args.metrics_cost {
        return metrics_cost(args, &bin, dir, &config_path, &config);
    }
    if args.audit_sinks {
        return audit_sinks(args, &bin, dir, &config_path, &config);
    }
    if let Some(latency) = args.token_latency {
        let (daemon, socket) = start_daemon(dir)?;
        return slow_token_comparison(args, &bin, &config, daemon, &socket, latency)
            .and_then(|()| slow_token_scaling(args, &bin, dir, &config_path, &config, latency, &sessions));
    }
    let (daemon, socket) = start_daemon(dir)?;
    let rss_start = daemon.rss_kib();
    eprintln!("keyhavend bench: raw token rate, {} s", args.duration.as_secs_f64());
    let raw1 = raw_datakey_decrypt(&config, args.duration)?;
    let mut bench_args = vec![
        "--op".to_owned(),
        args.ops.clone().unwrap_or_else(|| "health,encrypt,datakey,datakey-decrypt,rewrap".into()),
        "--concurrency".to_owned(),
        args.concurrency.clone().unwrap_or_else(|| "1,8,64".into()),
        "--duration".to_owned(),
        format!("{}ms", args.duration.as_millis()),
    ];
    let mut rows = client_bench(&bin, &socket, &bench_args)?;
    if args.new_connection {
        bench_args = vec![
            "--op".to_owned(),
            "datakey-decrypt".to_owned(),
            "--concurrency".to_owned(),
            "1,8".to_owned(),
            "--duration".to_owned(),
            format!("{}ms", args.duration.as_millis()),
            "--new-connection".to_owned(),
        ];
        rows.extend(client_bench(&bin, &socket, &bench_args)?);
    }
    let rss_end = daemon.rss_kib();
    let soak = match args.soak {
        Some(d) => Some(soak(&bin, &socket, &daemon, d)?),
        None => None,
    };
    // Once more after the load, with the daemon idle: the better of the two
    // is the token's limit (the machine's other load only lowers it).
    let raw2 = raw_datakey_decrypt(&config, args.duration)?;
    let mut raw_typed = Vec::new();
    for op in ["mac", "sign-p256", "sign-p384", "sign-rsa3072", "pk-decrypt"] {
        if rows.iter().any(|r| r.op == op) {
            eprintln!("keyhavend bench: raw token {op} rate, {} s", args.duration.as_secs_f64());
            raw_typed.push((op, raw_mac_or_sign(&config, op, 32, args.duration)?));
        }
    }
    drop(daemon);
    let raw = if raw2.ops_per_sec > raw1.ops_per_sec { raw2 } else { raw1 };

    println!("machine: {}", machine());
    println!(
        "audit: {}, HSM workers: {}{}",
        if args.no_audit { "off" } else { "on" },
        config.hsm.workers,
        if config.hsm.inline { ", inline sessions on the I/O threads" } else { "" }
    );
    print_header();
    println!(
        "{:<26} {:>5} {:>10.0} {:>9.1} {:>9} {:>9} {:>7}",
        "raw token decrypt", 1, raw.ops_per_sec, raw.mean_us, "-", "-", 0
    );
    print_rows(&rows);
    if let (Some(a), Some(b)) = (rss_start, rss_end) {
        println!("daemon resident memory: {} MiB after start, {} MiB after the load", a / 1024, b / 1024);
    }
    if let Some(samples) = soak {
        print_soak(&samples);
    }
    // mac, sign and pk-decrypt against the token's own rate of the same operation.
    for (op, raw) in &raw_typed {
        println!(
            "{:<26} {:>5} {:>10.0} {:>9.1} {:>9} {:>9} {:>7}",
            format!("raw token {op}"),
            1,
            raw.ops_per_sec,
            raw.mean_us,
            "-",
            "-",
            0
        );
        for r in rows.iter().filter(|r| r.op == *op && !r.new_connection) {
            println!(
                "daemon/raw {op} c={}: {:.2} (daemon {:.0} ops/s, raw {:.0} ops/s, p99 {:.0} µs)",
                r.concurrency,
                r.ops_per_sec / raw.ops_per_sec,
                r.ops_per_sec,
                raw.ops_per_sec,
                r.p99_us
            );
        }
    }
    let best =
        rows.iter().filter(|r| r.op == "datakey-decrypt" && !r.new_connection).max_by_key(|r| r.concurrency);
    match best {
        Some(r) => println!(
            "daemon/raw datakey-decrypt c={}: {:.2} (daemon {:.0} ops/s, raw {:.0} ops/s, p99 {:.0} µs)",
            r.concurrency,
            r.ops_per_sec / raw.ops_per_sec,
            r.ops_per_sec,
            raw.ops_per_sec,
            r.p99_us
        ),
        None => {
            println!("raw datakey-decrypt: {:.0} ops/s (no datakey-decrypt row to compare)", raw.ops_per_sec)
        }
    }
    Ok(())
}

/// `--metrics-cost`: datakey-decrypt at 64 clients with `[metrics] collect`
/// on and off in turn, a daemon restarted for each measurement, the order
/// swapped every round (on, off; off, on; …) so that a drift of the
/// machine's load weighs on both alike.
fn metrics_cost(
    args: &BenchArgs,
    bin: &Path,
    dir: &Path,
    config_path: &Path,
    config: &Config,
) -> anyhow::Result<()> {
    let original = std::fs::read_to_string(config_path)?;
    let bench_args: Vec<String> = ["--op", "datakey-decrypt", "--concurrency", "64", "--duration"]
        .into_iter()
        .map(str::to_owned)
        .chain([format!("{}ms", args.duration.as_millis())])
        .collect();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..args.metrics_rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for collect in order {
            let mut doc: toml::Table = original.parse()?;
            let table = doc.entry("metrics").or_insert_with(|| toml::Value::Table(Default::default()));
            if let Some(t) = table.as_table_mut() {
                t.insert("collect".into(), toml::Value::Boolean(collect));
            }
            std::fs::write(config_path, toml::to_string(&doc)?)?;
            let (daemon, socket) = start_daemon(dir)?;
            let rows = client_bench(bin, &socket, &bench_args);
            drop(daemon);
            let row = rows?.into_iter().next().context("`keyhaven bench` printed no row")?;
            if row.errors > 0 {
                bail!("{} errors with metrics {}: {:?}", row.errors, on_off(collect), row.first_error);
            }
            eprintln!(
                "keyhavend bench: round {}, metrics {}: {:.0} ops/s, p99 {:.0} µs",
                round + 1,
                on_off(collect),
                row.ops_per_sec,
                row.p99_us
            );
            if collect { &mut on } else { &mut off }.push(row.ops_per_sec);
        }
    }
    std::fs::write(config_path, original)?;
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    println!("machine: {}", machine());
    println!(
        "HSM workers: {}, datakey-decrypt at 64 clients, {} s per run",
        config.hsm.workers,
        args.duration.as_secs_f64()
    );
    println!("metrics on  (ops/s): {}", list(&on));
    println!("metrics off (ops/s): {}", list(&off));
    println!(
        "metrics cost: {:+.1} % (median on {m_on:.0} ops/s, off {m_off:.0} ops/s; positive = slower with metrics)",
        (m_off - m_on) / m_off * 100.0
    );
    // The same cost without the machine's noise: what counting one request
    // takes, against the CPU time one request has at the rate measured.
    let ns = counting_ns();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu_us = cores * 1e6 / m_off;
    println!(
        "counting one request: {ns:.0} ns (one thread, in this process), {:.3} % of the {cpu_us:.0} µs of CPU \
         a request has at {m_off:.0} ops/s on {cores} cores",
        ns / 1e3 / cpu_us * 100.0
    );
    Ok(())
}

/// Each sink's `(name, delivered, lag)` from `keyhaven health`.
fn sink_lags(bin: &Path, socket: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let out = Command::new(bin).arg("--socket").arg(socket).arg("health").stderr(Stdio::null()).output()?;
    let h: keyhaven::wire::HealthResponse =
        serde_json::from_slice(&out.stdout).context("`keyhaven health` printed no answer")?;
    Ok(h.audit_sinks.into_iter().map(|s| (s.name, s.delivered, s.lag)).collect())
}

/// `--audit-sinks`: datakey-decrypt at 64 clients without sinks and with a
/// file and a syslog sink, in turn (a restart each, the order swapped every
/// round); for the runs with sinks, each sink's lag when the load stops,
/// the time it then takes to deliver everything, and its rate over the
/// whole run (records delivered / seconds from the load's start until it
/// caught up).
fn audit_sinks(
    args: &BenchArgs,
    bin: &Path,
    dir: &Path,
    config_path: &Path,
    config: &Config,
) -> anyhow::Result<()> {
    let original = std::fs::read_to_string(config_path)?;
    let bench_args: Vec<String> = ["--op", "datakey-decrypt", "--concurrency", "64", "--duration"]
        .into_iter()
        .map(str::to_owned)
        .chain([format!("{}ms", args.duration.as_millis())])
        .collect();
    let syslog = dir.join("bench-syslog.sock");
    let file = dir.join("bench-sink").join("audit.jsonl");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut shipped: Vec<String> = Vec::new();
    for round in 0..args.metrics_rounds {
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        for sinks in order {
            let mut text = original.clone();
            let _ = std::fs::remove_file(&syslog);
            let _ = std::fs::remove_dir_all(dir.join("bench-sink"));
            let receiver = if sinks {
                text.push_str(&format!(
                    "\n[[audit.sink]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n\n[[audit.sink]]\nname = \"syslog\"\ntype = \"syslog\"\npath = \"{}\"\n",
                    file.display(),
                    syslog.display()
                ));
                std::fs::create_dir_all(file.parent().context("sink folder")?)?;
                let rx = std::os::unix::net::UnixDatagram::bind(&syslog)?;
                rx.set_read_timeout(Some(Duration::from_millis(200)))?;
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = stop.clone();
                let t = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                        if rx.recv(&mut buf).is_ok() {
                            n += 1;
                        }
                    }
                    n
                });
                Some((stop, t))
            } else {
                None
            };
            std::fs::write(config_path, &text)?;
            let (daemon, socket) = start_daemon(dir)?;
            // The sinks first ship what earlier runs without them wrote.
            let mut start_seq = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while sinks && Instant::now() < deadline {
                let lags = sink_lags(bin, &socket)?;
                start_seq = lags.iter().map(|s| s.1).min().unwrap_or(0);
                if lags.iter().all(|s| s.2 == 0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let started = Instant::now();
            let rows = client_bench(bin, &socket, &bench_args);
            let load = started.elapsed();
            let row = rows?.into_iter().next().context("`keyhaven bench` printed no row")?;
            if row.errors > 0 {
                bail!("{} errors (sinks {}): {:?}", row.errors, on_off(sinks), row.first_error);
            }
            eprintln!(
                "keyhavend bench: round {}, sinks {}: {:.0} ops/s, p99 {:.0} µs",
                round + 1,
                on_off(sinks),
                row.ops_per_sec,
                row.p99_us
            );
            if let Some((stop, t)) = receiver {
                let at_end = sink_lags(bin, &socket)?;
                let mut caught: Vec<Option<(Duration, u64)>> = vec![None; at_end.len()];
                let deadline = Instant::now() + Duration::from_secs(120);
                while caught.iter().any(Option::is_none) && Instant::now() < deadline {
                    for (i, (_, delivered, lag)) in sink_lags(bin, &socket)?.into_iter().enumerate() {
                        if lag == 0 && caught.get(i).is_some_and(Option::is_none) {
                            caught[i] = Some((started.elapsed(), delivered));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                for ((name, _, lag), c) in at_end.iter().zip(&caught) {
                    shipped.push(match c {
                        Some((t, delivered)) => format!(
                            "round {}: {name}: {lag} records behind when the load stopped, caught up {:.2} s later; \
                             {:.0} records/s shipped over the run",
                            round + 1,
                            t.saturating_sub(load).as_secs_f64(),
                            delivered.saturating_sub(start_seq) as f64 / t.as_secs_f64()
                        ),
                        None => format!("round {}: {name}: {lag} records behind, not caught up within 120 s", round + 1),
                    });
                }
                drop(daemon);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let got = t.join().unwrap_or(0);
                shipped.push(format!("round {}: the syslog receiver got {got} datagrams", round + 1));
                with.push(row.ops_per_sec);
            } else {
                drop(daemon);
                without.push(row.ops_per_sec);
            }
        }
    }
    std::fs::write(config_path, original)?;
    let (m_with, m_without) = (median(&mut with), median(&mut without));
    println!("machine: {}", machine());
    println!(
        "HSM workers: {}, datakey-decrypt at 64 clients, {} s per run; sinks: file + syslog (datagram socket)",
        config.hsm.workers,
        args.duration.as_secs_f64()
    );
    println!("without sinks (ops/s): {}", list(&without));
    println!("with sinks    (ops/s): {}", list(&with));
    println!(
        "sinks cost: {:+.1} % (median with {m_with:.0} ops/s, without {m_without:.0} ops/s; positive = slower)",
        (m_without - m_with) / m_without * 100.0
    );
    for l in shipped {
        println!("{l}");
    }
    Ok(())
}

/// Nanoseconds per request of what the request path does for the metrics
/// (`request_started`, `request_done`), over a million requests.
fn counting_ns() -> f64 {
    let n = 1_000_000u32;
    let t = Instant::now();
    for i in 0..n {
        let started = std::hint::black_box(crate::metrics::request_started());
        crate::metrics::request_done(std::hint::black_box(i as usize % 8), started, None);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
}

fn print_header() {
    println!(
        "{:<26} {:>5} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "op", "conc", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "errors"
    );
}

fn print_rows(rows: &[Row]) {
    for r in rows {
        let name = if r.new_connection { format!("{} (new conn)", r.op) } else { r.op.clone() };
        println!(
            "{:<26} {:>5} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>7}",
            name, r.concurrency, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us, r.errors
        );
        if let Some(e) = &r.first_error {
            println!("  first error: {e}");
        }
    }
}

/// Sets `section.key = value` for each of `settings` in the dev config at
/// `path` (nothing to do: the file is left alone).
fn set_config(path: &Path, settings: Vec<(&str, &str, toml::Value)>) -> anyhow::Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let mut doc: toml::Table = std::fs::read_to_string(path)?.parse()?;
    for (section, key, value) in settings {
        let table = doc.entry(section).or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = table.as_table_mut() {
            t.insert(key.into(), value);
        }
    }
    std::fs::write(path, toml::to_string(&doc)?)?;
    Ok(())
}

/// `--sessions`: a list of session counts (1 to the most workers), or `none`.
fn parse_sessions(text: &str) -> anyhow::Result<Vec<usize>> {
    if text == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|n| match n.trim().parse::<usize>() {
            Ok(n) if (1..=crate::hsm::sizing::MAX_WORKERS).contains(&n) => Ok(n),
            _ => bail!(
                "--sessions: {n:?} is not a session count from 1 to {} (a list such as 8,32,128, or none)",
                crate::hsm::sizing::MAX_WORKERS
            ),
        })
        .collect()
}

/// Clients per session in `--sessions` runs: while a worker waits on the
/// token for one request, the others of its clients are in the daemon's
/// own path or waiting for the audit log's write, so one client per
/// session would leave sessions idle.
const CLIENTS_PER_SESSION: usize = 3;

/// `--token-latency` with `--sessions`: how the daemon scales with the
/// token's sessions. For each count S, the daemon with `[hsm] workers = S`
/// and 3 × S clients, against `S / latency` and the raw token with S
/// sessions (each on its own thread), one line each.
fn slow_token_scaling(
    args: &BenchArgs,
    bin: &Path,
    dir: &Path,
    config_path: &Path,
    config: &Config,
    latency: Duration,
    sessions: &[usize],
) -> anyhow::Result<()> {
    let per = &args.token_latency_per;
    let mut lines = Vec::new();
    for &n in sessions {
        set_config(config_path, vec![("hsm", "workers", toml::Value::Integer(n as i64))])?;
        let clients = n * CLIENTS_PER_SESSION;
        eprintln!("keyhavend bench: the daemon with {n} HSM workers, {clients} clients, through a {latency:?} token");
        let (daemon, socket) = start_daemon(dir)?;
        let bench_args = vec![
            "--op".to_owned(),
            "datakey-decrypt".to_owned(),
            "--concurrency".to_owned(),
            clients.to_string(),
            "--duration".to_owned(),
            format!("{}ms", args.duration.as_millis()),
        ];
        let rows = client_bench(bin, &socket, &bench_args)?;
        drop(daemon);
        let row = rows
            .iter()
            .find(|r| r.op == "datakey-decrypt" && !r.new_connection)
            .context("`keyhaven bench` printed no datakey-decrypt row")?;
        eprintln!("keyhavend bench: raw token rate with {n} sessions, {} s", args.duration.as_secs_f64());
        let raw = raw_datakey_decrypt_parallel(config, n, args.duration)?;
        let ideal = n as f64 / latency.as_secs_f64();
        lines.push(format!(
            "daemon/ideal datakey-decrypt sessions={n} c={clients} token {} µs/{per}: {:.2} of {n}/latency, \
             {:.2} of raw at {n} sessions (daemon {:.0} ops/s, {} errors, p50 {:.0} µs, p99 {:.0} µs; \
             raw {:.0} ops/s)",
            latency.as_micros(),
            row.ops_per_sec / ideal,
            row.ops_per_sec / raw.ops_per_sec.max(1.0),
            row.ops_per_sec,
            row.errors,
            row.p50_us,
            row.p99_us,
            raw.ops_per_sec
        ));
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `--token-latency`: the daemon (workers as configured, "auto" unless
/// `--workers`) against the raw token with 8, 32 and 128 sessions and with
/// as many sessions as the daemon has workers, all through the slow token.
fn slow_token_comparison(
    args: &BenchArgs,
    bin: &Path,
    config: &Config,
    daemon: DaemonProcess,
    socket: &Path,
    latency: Duration,
) -> anyhow::Result<()> {
    let workers =
        daemon_workers(bin, socket).context("cannot read the daemon's worker count from `health`")?;
    let bench_args = vec![
        "--op".to_owned(),
        args.ops.clone().unwrap_or_else(|| "datakey-decrypt".into()),
        "--concurrency".to_owned(),
        args.concurrency.clone().unwrap_or_else(|| "8,64".into()),
        "--duration".to_owned(),
        format!("{}ms", args.duration.as_millis()),
    ];
    eprintln!("keyhavend bench: the daemon ({workers} HSM workers) through a {latency:?} token");
    let rows = client_bench(bin, socket, &bench_args)?;
    drop(daemon);
    let mut sessions: Vec<usize> = vec![8, 32, 128];
    if !sessions.contains(&(workers as usize)) {
        sessions.push(workers as usize);
        sessions.sort_unstable();
    }
    let mut raw = Vec::new();
    for &n in &sessions {
        eprintln!("keyhavend bench: raw token rate with {n} sessions, {} s", args.duration.as_secs_f64());
        raw.push((n, raw_datakey_decrypt_parallel(config, n, args.duration)?));
    }
    let per = &args.token_latency_per;
    let ideal = |n: usize| n as f64 / latency.as_secs_f64();
    println!("machine: {}", machine());
    println!(
        "token: slow token, {} µs per {per}, over SoftHSM2; audit: {}; HSM workers: {workers} ([hsm] workers = {})",
        latency.as_micros(),
        if args.no_audit { "off" } else { "on" },
        args.workers.map_or("\"auto\"".to_owned(), |n| n.to_string())
    );
    print_header();
    for (n, r) in &raw {
        println!(
            "{:<26} {:>5} {:>10.0} {:>9.1} {:>9} {:>9} {:>7}",
            format!("raw token decrypt, {n} sess"),
            n,
            r.ops_per_sec,
            r.mean_us,
            "-",
            "-",
            0
        );
    }
    print_rows(&rows);
    let raw_line: Vec<String> = raw
        .iter()
        .map(|(n, r)| format!("{n}: {:.0} ({:.2} of {n}/latency)", r.ops_per_sec, r.ops_per_sec / ideal(*n)))
        .collect();
    println!("raw token decrypt by sessions: {}", raw_line.join(", "));
    let best =
        rows.iter().filter(|r| r.op == "datakey-decrypt" && !r.new_connection).max_by_key(|r| r.concurrency);
    if let Some(r) = best {
        let in_flight = (workers as usize).min(r.concurrency);
        let raw_same =
            raw.iter().find(|(n, _)| *n == workers as usize).map(|(_, r)| r.ops_per_sec).unwrap_or(0.0);
        println!(
            "daemon/raw datakey-decrypt c={} token {} µs/{per}: {:.2} of raw at {workers} sessions, {:.2} of {in_flight}/latency \
             (daemon {:.0} ops/s with {workers} workers, raw {:.0} ops/s, p50 {:.0} µs, p99 {:.0} µs)",
            r.concurrency,
            latency.as_micros(),
            r.ops_per_sec / raw_same.max(1.0),
            r.ops_per_sec / ideal(in_flight),
            r.ops_per_sec,
            raw_same,
            r.p50_us,
            r.p99_us
        );
    }
    Ok(())
}
