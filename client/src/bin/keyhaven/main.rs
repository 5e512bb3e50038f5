//! The `keyhaven` command line: a thin shell over [`keyhaven::Client`].
//! Every failure prints one line naming the problem and exits non-zero.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// `println!` that returns a failure instead of panicking when stdout is
/// closed (a broken pipe ends the command quietly, see `Failure`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod alias;
mod audit;
mod audit_file;
mod bench;
mod import;
mod inspect;
mod jwt;
mod lifecycle;
mod revoke;
mod seal;
use keyhaven::wire::MAX_ENCRYPT_PLAINTEXT;
use keyhaven::{Client, EncryptionContext, KeyPath};

/// Default socket when neither --socket nor $KEYHAVEN_SOCKET is given.
const DEFAULT_SOCKET: &str = "/run/keyhaven/keyhaven.sock";

/// Keyhaven client: keys, data keys and encryption from the keyhavend daemon.
#[derive(Parser)]
#[command(name = "keyhaven", version)]
struct Cli {
    /// The daemon's socket [default: $KEYHAVEN_SOCKET, else /run/keyhaven/keyhaven.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Longest wait for each answer from the daemon (30s, 2m; 0 waits for ever) [default: 30s; none for
    /// `audit verify`].
    #[arg(long, global = true, env = "KEYHAVEN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Longest wait to connect and be greeted by the daemon (0 waits for ever).
    #[arg(long, global = true, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: std::time::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Daemon, token and store status.
    Health,
    /// The daemon's metrics, in the Prometheus text format (needs the `metrics` permission).
    Metrics,
    /// Named keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Key aliases: second names for keys, movable from one key to another (as AWS KMS aliases).
    #[command(subcommand)]
    Alias(alias::AliasCommand),
    /// Encrypt stdin (at most 64 KiB) under TENANT/KEY; the text ciphertext goes to stdout. With
    /// --public-key, offline: no daemon, a khp1: ciphertext that only the daemon opens.
    Encrypt {
        /// The key, as TENANT/KEY.
        #[arg(required_unless_present = "public_key", conflicts_with = "public_key")]
        key: Option<KeyPath>,
        /// Encrypt offline to an rsa-4096-oaep key's public key: the JWK that `keyhaven key public
        /// TENANT/KEY --format jwk` writes (its kid names the key and version).
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        #[command(flatten)]
        context: ContextArgs,
        /// Print the whole response as JSON (ciphertext, envelope id, key version).
        #[arg(long)]
        json: bool,
        /// Read the plaintext from this file instead of stdin.
        #[arg(long = "in", value_name = "FILE", conflicts_with = "text")]
        input: Option<PathBuf>,
        /// The plaintext as an argument instead of stdin (it shows in the process list and shell history:
        /// prefer stdin or --in for secrets).
        #[arg(long, value_name = "TEXT")]
        text: Option<String>,
    },
    /// Decrypt a text ciphertext (khc1:) from stdin; the plaintext goes to stdout.
    Decrypt {
        #[command(flatten)]
        context: ContextArgs,
        /// Print the whole response as JSON (tenant, key, key version, envelope id, plaintext in base64).
        #[arg(long)]
        json: bool,
    },
    /// Seal stdin under TENANT/KEY in this process (any size, streamed in chunks); binary to stdout.
    Seal {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        #[command(flatten)]
        context: ContextArgs,
        /// Plaintext bytes per chunk (1024 to 16777216).
        #[arg(long, default_value_t = keyhaven::seal::DEFAULT_CHUNK)]
        chunk_size: u32,
    },
    /// Open a sealed stream (or a khs1: sealed record) from stdin; the plaintext goes to stdout.
    Open {
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Data keys: `datakey TENANT/KEY` makes one; `datakey decrypt` unwraps one.
    Datakey(DatakeyArgs),
    /// MAC tags under hmac-sha256 keys: `mac TENANT/KEY < msg` prints a tag; `mac verify` checks one.
    Mac(MacArgs),
    /// Sign stdin (at most 64 KiB, or a digest with --digest) with an ECDSA or RSA-PSS key; prints the
    /// signature (DER for ECDSA) in base64.
    Sign {
        /// The key, as TENANT/KEY (of type ecdsa-p256, ecdsa-p384 or rsa-3072-pss).
        key: KeyPath,
        /// stdin is a digest, not the message: 32 bytes (SHA-256) for ecdsa-p256 and rsa-3072-pss, 48
        /// (SHA-384) for ecdsa-p384, raw (e.g. `openssl dgst -sha256 -binary`).
        #[arg(long)]
        digest: bool,
        /// Print the whole response as JSON (signature, key version, algorithm).
        #[arg(long)]
        json: bool,
    },
    /// JSON Web Tokens signed by an ECDSA key.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Check a signature (from `sign`) of stdin in the daemon, with a version's public key; exits 0 when
    /// it verifies, 1 when it does not, 2 for a usage error, 3 for any other error.
    Verify {
        /// The key, as TENANT/KEY (a signing key).
        key: KeyPath,
        /// The signature, base64, as `keyhaven sign` prints it.
        #[arg(long, value_name = "BASE64")]
        signature: String,
        /// The version whose public key checks it; the current one by default.
        #[arg(long)]
        version: Option<u32>,
        /// stdin is a digest, not the message (as for `sign --digest`).
        #[arg(long)]
        digest: bool,
        /// Print the whole response as JSON (valid, key version, algorithm).
        #[arg(long)]
        json: bool,
    },
    /// Rewrap envelopes or ciphertexts (one per line on stdin) under their key's newest version.
    Rewrap {
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Suspend decryption in a scope (datakey, key, tenant, all), list or lift suspensions.
    Revoke(revoke::RevokeArgs),
    /// Erase a suspended key's or tenant's material for good (crypto-shredding).
    Destroy(revoke::DestroyArgs),
    /// Who the daemon sees you as (uid, groups, process) and what the policy grants you.
    Whoami,
    /// Decode a khe1:/khc1:/khs1:/khp1: text form (argument, or one per line on stdin) or a binary envelope,
    /// ciphertext, record or stream (stdin) offline: format, tenant, key, version, envelope id; one JSON
    /// object each. Nothing is checked with the daemon: the fields are claims until it unwraps the envelope.
    Inspect {
        /// The text form; stdin when absent.
        value: Option<String>,
    },
    /// Administer the daemon.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Read and check the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Measure a running daemon: ops/s and p50/p99/p99.9 latency per op and concurrency.
    Bench {
        /// Operations to measure (seal and open run in this process with cached keys).
        #[arg(long, value_enum, value_delimiter = ',', default_values = ["encrypt", "datakey-decrypt"])]
        op: Vec<bench::BenchOp>,
        /// Instead of ops/s: rounds of revoking a key that CONCURRENCY sealers use from their caches, timing
        /// the last client's first refusal after `revoke` returns.
        #[arg(long)]
        revoke_delay: Option<usize>,
        /// Concurrent clients (one connection each), comma-separated.
        #[arg(long, value_delimiter = ',', default_values = ["1", "8", "64"])]
        concurrency: Vec<usize>,
        /// Measuring time per op and concurrency (5s, 500ms, 1m).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Plaintext size for `encrypt` (32, 1KiB, 4KB; at most 64KiB).
        #[arg(long, default_value = "32", value_parser = bench::parse_size)]
        payload: usize,
        /// Open a new connection (and say hello) for every request.
        #[arg(long)]
        new_connection: bool,
        /// One JSON object per row instead of the table.
        #[arg(long)]
        json: bool,
        /// No progress line on stderr.
        #[arg(long)]
        quiet: bool,
        /// Key to use (created when missing; `rewrap` rotates it once per run).
        #[arg(long, default_value = "bench/bench")]
        key: KeyPath,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a named key (version 1, generated in the HSM).
    Create {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Rotate automatically this often (90d, 12h, …); none by default.
        #[arg(long, value_name = "PERIOD")]
        rotate_every: Option<String>,
        /// What kind of key (fixed for good: every version is of this type).
        #[arg(long = "type", value_name = "TYPE", default_value = "aes256-gcm", value_parser = crate::KeyTypeParser::ANY)]
        key_type: keyhaven::KeyType,
        /// Makes a retry safe: a create with the same key as the one that made the key answers as it did.
        #[arg(long, value_name = "KEY", value_parser = crate::idempotency_key)]
        idempotency_key: Option<String>,
        /// What the key is for (at most 256 bytes).
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// A tag, NAME=VALUE; repeat for more.
        #[arg(long = "tag", value_name = "NAME=VALUE")]
        tags: Vec<String>,
    },
    /// List named keys, all or one tenant's.
    List {
        /// Only this tenant.
        tenant: Option<String>,
        /// Only keys with this tag, NAME=VALUE; repeated, keys with every one.
        #[arg(long = "tag", value_name = "NAME=VALUE")]
        tags: Vec<String>,
    },
    /// The public keys of a signing key's versions still in use, as a JWKS (kid = TENANT/KEY@N).
    Jwks {
        /// The key, as TENANT/KEY.
        key: KeyPath,
    },
    /// The public key of a signing or rsa-4096-oaep key's version, PEM (or a JWK).
    Public {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// The version; the current one by default.
        #[arg(long, value_parser = crate::version)]
        version: Option<u32>,
        /// pem, or jwk (kid = TENANT/KEY@N; what `encrypt --public-key` reads).
        #[arg(long, default_value = "pem", value_parser = ["pem", "jwk"])]
        format: String,
    },
    #[command(flatten)]
    Lifecycle(lifecycle::Lifecycle),
    /// Get a one-time wrapping public key (RSA-3072, made in the HSM) and an import token, to bring key
    /// material of your own (BYOK).
    ImportParams(import::ParamsArgs),
    /// Make a key (or a new version of an imported key) from key material wrapped to the import
    /// parameters' public key.
    Import(import::ImportArgs),
}

#[derive(Subcommand)]
enum JwtCommand {
    /// A compact JWS (ES256/ES384/PS256) of the JSON object in FILE, `kid` = the signing version's id (TENANT/KEY@N).
    Sign {
        /// The key, as TENANT/KEY (ecdsa-p256, ecdsa-p384 or rsa-3072-pss).
        key: KeyPath,
        /// The claims, a JSON object.
        #[arg(long, value_name = "FILE")]
        claims: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Re-read the policy from the daemon's config file (like SIGHUP); a policy that does not parse is refused.
    Reload,
    /// Rotate the master key: a new version in the HSM, and a new version of every key under it, in batches (resumable).
    RotateMaster {
        /// Keys per request.
        #[arg(long, default_value_t = 100)]
        batch: u32,
        /// Go back to the previous master key version (while it exists).
        #[arg(long)]
        rollback: bool,
    },
    /// Destroy an old master key version in the HSM (refused while anything is wrapped under it). Cannot be
    /// undone: needs --confirm VERSION.
    RetireMaster {
        /// The master key version.
        #[arg(long)]
        version: u32,
        /// The version number typed again: the key is destroyed in the HSM for good.
        #[arg(long, value_name = "VERSION")]
        confirm: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The last records, oldest first; with -f, then new ones as they come.
    Tail {
        /// Keep printing new records.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only records about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only records from this time: Unix seconds, an age (15m, 2h, 7d) or 2026-01-31[T12:00:00Z].
        #[arg(long, value_parser = audit::parse_time)]
        since: Option<u64>,
        /// How many records to show before following (0: none, only new ones with -f).
        #[arg(short = 'n', long, default_value_t = 20, conflicts_with = "after")]
        lines: u32,
        /// Every record after this sequence number instead of the last N (with -f: then new
        /// ones); to go on where an earlier tail stopped.
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// On a cluster: node NAME's audit chain instead of the answering node's; each record
        /// labelled with NAME.
        #[arg(long, value_name = "NAME", conflicts_with = "all_nodes")]
        node: Option<String>,
        /// On a cluster: every node's audit chain, merged in time order and each record
        /// labelled with its node (not with --after: sequence numbers are per chain).
        #[arg(long, conflicts_with = "after")]
        all_nodes: bool,
    },
    /// Walk the whole hash chain and check every seal in the token; exits 0 when intact, 3 when
    /// intact but records were found unsealed at a start, 1 otherwise.
    Verify {
        /// Print the daemon's full answer as JSON.
        #[arg(long, conflicts_with_all = ["file", "archive"])]
        json: bool,
        /// Check exported or shipped JSON lines offline instead (`audit export --signed`, a
        /// file sink's files, in any order; repeat for several files): no daemon needed.
        #[arg(long, value_name = "EXPORT")]
        file: Vec<PathBuf>,
        /// Check a folder of segments archived by retention (`*.log.gz`) offline; with
        /// --file (the live log's `audit export --signed`) the whole chain across the boundary.
        #[arg(long, value_name = "DIR")]
        archive: Vec<PathBuf>,
        /// With --file or --archive: the audit signing key (`keyhaven audit public-key`), to
        /// check the signed heads.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
    },
    /// Every matching record as JSON lines (for a SIEM).
    Export {
        /// Only records from this time: Unix seconds, an age (15m, 2h, 7d) or 2026-01-31[T12:00:00Z].
        #[arg(long, value_parser = audit::parse_time)]
        since: Option<u64>,
        /// Only records about this tenant.
        #[arg(long, conflicts_with = "signed")]
        tenant: Option<String>,
        /// The records exactly as stored, each followed by the signed seals that cover it, for
        /// checking with `audit public-key` away from this host (docs/AUDIT.md §3.3).
        #[arg(long)]
        signed: bool,
    },
    /// The public key that signs the audit log's seals, PEM.
    PublicKey,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct DatakeyArgs {
    #[command(subcommand)]
    sub: Option<DatakeySub>,
    /// The key, as TENANT/KEY.
    #[arg(required = true)]
    key: Option<KeyPath>,
    #[command(flatten)]
    context: ContextArgs,
    /// Return only the envelope, not the plaintext data key.
    #[arg(long)]
    no_plaintext: bool,
}

#[derive(Subcommand)]
enum DatakeySub {
    /// Unwrap the data key of an envelope read from stdin; prints JSON with the plaintext.
    Decrypt {
        #[command(flatten)]
        context: ContextArgs,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct MacArgs {
    #[command(subcommand)]
    sub: Option<MacSub>,
    /// The key, as TENANT/KEY (of type hmac-sha256).
    #[arg(required = true)]
    key: Option<KeyPath>,
    /// Use this key version instead of the current one (e.g. to compute a blind index under an older version).
    #[arg(long, value_parser = crate::version)]
    version: Option<u32>,
    /// Print the whole response as JSON (tag, key version).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum MacSub {
    /// Check a tag against the message on stdin; exits 0 when it matches, 1 when it does not or cannot be
    /// checked (the message says why).
    Verify {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// The tag, khm1:….
        #[arg(long)]
        tag: String,
    },
}

#[derive(Args)]
struct ContextArgs {
    /// Encryption context pair; repeat for more. Needed again to decrypt.
    #[arg(long = "context", value_name = "KEY=VALUE")]
    pairs: Vec<String>,
}

impl ContextArgs {
    fn parse(&self) -> Result<EncryptionContext, keyhaven::Error> {
        EncryptionContext::from_pairs(&self.pairs)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line that names the problem, like every other failure:
            // clap's first line, plus the indented lines that name the
            // missing arguments, without the usage and help hints.
            let text = e.to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let mut line = lines.next().unwrap_or_default().trim_start_matches("error: ").to_owned();
            for detail in lines.take_while(|l| l.starts_with("  ")) {
                line.push(' ');
                line.push_str(detail.trim());
            }
            eprintln!("keyhaven: {line}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyhaven: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checks = matches!(
        cli.command,
        Command::Verify { .. }
            | Command::Mac(MacArgs { sub: Some(MacSub::Verify { .. }), .. })
            | Command::Audit(AuditCommand::Verify { .. })
    );
    let result = runtime.block_on(run(cli)).map_err(|mut e| {
        // A checking command's failure to check is not its "no".
        if checks && e.exit == 1 && !e.no {
            e.exit = EXIT_NOT_CHECKED;
        }
        e
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.message.is_empty() => ExitCode::from(e.exit),
        Err(e) => {
            eprintln!("keyhaven: {e}");
            ExitCode::from(e.exit)
        }
    }
}

/// A CLI failure: one line for the user and the exit status (2 for a
/// usage error caught before connecting, 1 for everything else).
struct Failure {
    message: String,
    exit: u8,
    /// A check's answer "no" (exit 1), as opposed to a check that could
    /// not be made (exit 4 for the checking commands: [`EXIT_NOT_CHECKED`]).
    no: bool,
}

/// The status of `verify`, `mac verify` and `audit verify` when they could
/// not reach a verdict (no daemon, refused, timed out, unreadable file).
const EXIT_NOT_CHECKED: u8 = 4;

impl Failure {
    fn new(message: String) -> Failure {
        Failure { message, exit: 1, no: false }
    }

    /// A check that answers no: the signature, tag or log does not hold.
    fn no(message: String) -> Failure {
        Failure { message, exit: 1, no: true }
    }
}

/// The guard of an irreversible command (`destroy`, `key trim`, `admin
/// retire-master`): `--confirm` must repeat `name`.
pub(crate) fn confirmed(action: &str, name: &str, given: Option<&str>) -> Result<(), Failure> {
    match given {
        None => Err(usage(format!("{action} cannot be undone: repeat the name with --confirm {name}"))),
        Some(c) if c != name => Err(usage(format!("--confirm `{c}` does not repeat the name `{name}`"))),
        Some(_) => Ok(()),
    }
}

/// A key version given on the command line (`--version`, `--min-decryption-version`).
pub(crate) fn version(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("key versions start at 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a key version (1, 2, …)")),
    }
}

/// `key create --type`: every type the daemon makes ([`keyhaven::KeyType::ALL`]),
/// listed as clap's possible values (so `--help` shows them, each with what
/// it is for) and read through [`keyhaven::KeyType`]'s `FromStr`, so that a
/// refusal names the types there are (and says why `ed25519` is not one)
/// before anything is sent.
///
/// `key import-params --type` uses [`KeyTypeParser::IMPORTABLE`]: only the
/// types the daemon imports (PROTOCOL.md, `key_import_params`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyTypeParser {
    types: &'static [keyhaven::KeyType],
}

impl KeyTypeParser {
    /// Every type the daemon makes.
    pub(crate) const ANY: KeyTypeParser = KeyTypeParser { types: &keyhaven::KeyType::ALL };
    /// The types whose material can be imported (32 bytes either way).
    pub(crate) const IMPORTABLE: KeyTypeParser =
        KeyTypeParser { types: &[keyhaven::KeyType::Aes256Gcm, keyhaven::KeyType::HmacSha256] };

    /// What each type is for, as `--help` says it.
    fn purpose(t: keyhaven::KeyType) -> &'static str {
        use keyhaven::KeyType as T;
        match t {
            T::Aes256Gcm => "encryption and data keys (the default)",
            T::HmacSha256 => "MAC tags (`mac`, `mac verify`)",
            T::EcdsaP256 => "ECDSA P-256 signatures (ES256)",
            T::EcdsaP384 => "ECDSA P-384 signatures (ES384)",
            T::RsaPss3072 => "RSA-PSS signatures (PS256)",
            T::RsaOaep4096 => "offline public-key encryption (`encrypt --public-key`)",
            _ => "",
        }
    }
}

impl clap::builder::TypedValueParser for KeyTypeParser {
    type Value = keyhaven::KeyType;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<keyhaven::KeyType, clap::Error> {
        let by_name = clap::builder::StringValueParser::new().try_map(|s| s.parse::<keyhaven::KeyType>());
        let parsed = by_name.parse_ref(cmd, arg, value);
        match parsed {
            Ok(t) if self.types.contains(&t) => return Ok(t),
            // Every type allowed: the type's own refusal names them all.
            Err(e) if self.types.len() == keyhaven::KeyType::ALL.len() => return Err(e),
            _ => {}
        }
        let allowed: Vec<&str> = self.types.iter().map(|t| t.as_str()).collect();
        let mut e = clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd);
        if let Some(arg) = arg {
            e.insert(
                clap::error::ContextKind::InvalidArg,
                clap::error::ContextValue::String(arg.to_string()),
            );
        }
        e.insert(
            clap::error::ContextKind::InvalidValue,
            clap::error::ContextValue::String(value.to_string_lossy().into_owned()),
        );
        e.insert(
            clap::error::ContextKind::ValidValue,
            clap::error::ContextValue::Strings(allowed.iter().map(|s| s.to_string()).collect()),
        );
        Err(e)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            self.types.iter().map(|t| clap::builder::PossibleValue::new(t.as_str()).help(Self::purpose(*t))),
        ))
    }
}

/// `--idempotency-key`, checked as the daemon checks it, before anything is sent.
pub(crate) fn idempotency_key(text: &str) -> Result<String, String> {
    keyhaven::names::validate_idempotency_key(text)
        .map(|()| text.to_owned())
        .map_err(|e| e.trim_start_matches("field `idempotency_key`: ").to_owned())
}

/// A usage error: the command line is wrong, nothing was sent.
fn usage(e: impl std::fmt::Display) -> Failure {
    Failure { message: e.to_string(), exit: 2, no: false }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<keyhaven::Error> for Failure {
    fn from(e: keyhaven::Error) -> Self {
        Failure::new(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader went away (`keyhaven key list | head`): stop
            // quietly, as ripgrep and other filters do.
            return Failure { message: String::new(), exit: 0, no: false };
        }
        Failure::new(e.to_string())
    }
}

fn read_stdin(limit: usize, what: &str, hint: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure::new(format!("cannot read {what} from stdin: {e}")))?;
    if buf.len() > limit {
        return Err(Failure::new(format!("{what} on stdin is over {limit} bytes{hint}")));
    }
    Ok(buf)
}

/// `encrypt`'s plaintext: from `--text`, the file `--in`, or stdin.
fn read_plaintext(
    file: Option<&std::path::Path>,
    text: Option<&str>,
) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    const HINT: &str = "; `encrypt` takes at most 64 KiB: use `keyhaven seal` (any size, streamed), or \
                        `keyhaven datakey` and encrypt locally";
    let buf = match (file, text) {
        (_, Some(t)) => zeroize::Zeroizing::new(t.as_bytes().to_vec()),
        (Some(path), None) => {
            let mut buf = zeroize::Zeroizing::new(Vec::new());
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_ENCRYPT_PLAINTEXT as u64 + 1).read_to_end(&mut buf))
                .map_err(|e| Failure::new(format!("cannot read --in {}: {e}", path.display())))?;
            if buf.len() > MAX_ENCRYPT_PLAINTEXT {
                return Err(Failure::new(format!(
                    "--in {} is over {MAX_ENCRYPT_PLAINTEXT} bytes{HINT}",
                    path.display()
                )));
            }
            buf
        }
        (None, None) => return read_stdin(MAX_ENCRYPT_PLAINTEXT, "input", HINT),
    };
    if buf.len() > MAX_ENCRYPT_PLAINTEXT {
        return Err(usage(format!("--text is over {MAX_ENCRYPT_PLAINTEXT} bytes{HINT}")));
    }
    Ok(buf)
}

/// A text form given to the wrong command: which command takes it.
fn wrong_form(text: &str, expected: &str) -> Option<String> {
    let (prefix, command) = [
        ("khc1:", "keyhaven decrypt"),
        ("khe1:", "keyhaven datakey decrypt"),
        ("khm1:", "keyhaven mac verify"),
    ]
    .into_iter()
    .find(|(p, _)| text.starts_with(p))?;
    (prefix != expected).then(|| format!("this is a `{prefix}` text, which `{command}` takes"))
}

/// `encrypt --public-key`: a `khp1:` ciphertext made here, with no daemon
/// (docs/ENVELOPE.md §11): a fresh data key, RSA-OAEP-encrypted (OpenSSL;
/// SHA-1 and MGF1-SHA-1, what the token decrypts) to the JWK in `file`,
/// seals `plaintext` with the context as AAD.
fn public_encrypt(
    file: &std::path::Path,
    plaintext: &[u8],
    context: &EncryptionContext,
    json: bool,
) -> Result<(), Failure> {
    use base64::Engine as _;
    use keyhaven::hybrid::WRAPPED_LEN;
    let bad = |why: &str| Failure::new(format!("--public-key {}: {why}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|e| bad(&e.to_string()))?;
    let jwk: serde_json::Value =
        serde_json::from_str(&text).map_err(|_| bad("not a JWK (`keyhaven key public KEY --format jwk`)"))?;
    let field =
        |name: &str| jwk.get(name).and_then(|v| v.as_str()).ok_or_else(|| bad(&format!("no `{name}`")));
    if field("kty")? != "RSA" || field("alg")? != "RSA-OAEP" {
        return Err(bad("not the public key of an rsa-4096-oaep key (kty RSA, alg RSA-OAEP)"));
    }
    let (path, version) = field("kid")?
        .rsplit_once('@')
        .and_then(|(p, v)| Some((p.parse::<KeyPath>().ok()?, v.parse::<u32>().ok().filter(|v| *v > 0)?)))
        .ok_or_else(|| bad("its kid is not TENANT/KEY@VERSION"))?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(field("n")?).map_err(|_| bad("`n` is not base64url"))?;
    let e = b64.decode(field("e")?).map_err(|_| bad("`e` is not base64url"))?;
    let ssl = |e: openssl::error::ErrorStack| Failure::new(format!("OpenSSL: {e}"));
    let rsa = openssl::rsa::Rsa::from_public_components(
        openssl::bn::BigNum::from_slice(&n).map_err(ssl)?,
        openssl::bn::BigNum::from_slice(&e).map_err(ssl)?,
    )
    .map_err(ssl)?;
    if rsa.size() as usize != WRAPPED_LEN {
        return Err(bad("not a 4096-bit RSA key"));
    }
    let pkey = openssl::pkey::PKey::from_rsa(rsa).map_err(ssl)?;
    let ct = seal_to_public_key(&pkey, &path, version, plaintext, context)?;
    if json {
        return print_json(&serde_json::json!({
            "ciphertext": ct.to_string(),
            "tenant": path.tenant(),
            "key": path.key(),
            "key_version": version,
        }));
    }
    outln!("{ct}");
    Ok(())
}

/// A `khp1:` ciphertext of `plaintext` for version `version` of the
/// `rsa-4096-oaep` key `path`, whose public key is `pkey`: a fresh data key
/// RSA-OAEP-encrypted with OpenSSL (SHA-1 and MGF1-SHA-1, what the token
/// decrypts), the plaintext sealed under it with the context as AAD.
pub(crate) fn seal_to_public_key(
    pkey: &openssl::pkey::PKeyRef<openssl::pkey::Public>,
    path: &KeyPath,
    version: u32,
    plaintext: &[u8],
    context: &EncryptionContext,
) -> Result<keyhaven::hybrid::PublicCiphertext, Failure> {
    use keyhaven::hybrid::{PublicCiphertext, WRAPPED_LEN};
    let ssl = |e: openssl::error::ErrorStack| Failure::new(format!("OpenSSL: {e}"));
    if pkey.size() != WRAPPED_LEN {
        return Err(Failure::new("not a 4096-bit RSA public key".into()));
    }
    let data_key = PublicCiphertext::new_data_key();
    let mut enc = openssl::encrypt::Encrypter::new(pkey).map_err(ssl)?;
    enc.set_rsa_padding(openssl::rsa::Padding::PKCS1_OAEP).map_err(ssl)?;
    enc.set_rsa_oaep_md(openssl::hash::MessageDigest::sha1()).map_err(ssl)?;
    enc.set_rsa_mgf1_md(openssl::hash::MessageDigest::sha1()).map_err(ssl)?;
    let mut wrapped = vec![0u8; enc.encrypt_len(&data_key[..]).map_err(ssl)?];
    let len = enc.encrypt(&data_key[..], &mut wrapped).map_err(ssl)?;
    wrapped.truncate(len);
    Ok(PublicCiphertext::seal(path, version, wrapped, &data_key, plaintext, context)?)
}

fn read_stdin_text(what: &str) -> Result<String, Failure> {
    let raw = read_stdin(keyhaven::frame::MAX_FRAME_LEN, what, "")?;
    let text = std::str::from_utf8(&raw).map_err(|_| Failure::new(format!("{what} on stdin is not text")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(Failure::new(format!("no {what} on stdin")));
    }
    Ok(text.to_owned())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let text = zeroize::Zeroizing::new(
        serde_json::to_string_pretty(value).map_err(|e| Failure::new(e.to_string()))?,
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", *text)?;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.or_else(Client::socket_from_env).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    // Arguments are checked before connecting, so usage errors need no daemon.
    let context = match &cli.command {
        Command::Encrypt { context, .. }
        | Command::Decrypt { context, .. }
        | Command::Seal { context, .. }
        | Command::Open { context } => Some(context.parse().map_err(usage)?),
        Command::Datakey(d) => match &d.sub {
            Some(DatakeySub::Decrypt { context }) => Some(context.parse().map_err(usage)?),
            None => Some(d.context.parse().map_err(usage)?),
        },
        Command::Revoke(args) => {
            revoke::check_revoke(args)?;
            None
        }
        Command::Key(KeyCommand::Lifecycle(cmd)) => {
            lifecycle::check(cmd)?;
            None
        }
        Command::Key(KeyCommand::Create { rotate_every, tags, .. }) => {
            if let Some(p) = rotate_every {
                lifecycle::period(p)?;
            }
            lifecycle::tags(tags)?;
            None
        }
        Command::Key(KeyCommand::List { tags, .. }) => {
            lifecycle::tags(tags)?;
            None
        }
        Command::Mac(MacArgs { sub: Some(MacSub::Verify { tag, .. }), .. }) => {
            tag.parse::<keyhaven::mac::MacTag>().map_err(usage)?;
            None
        }
        Command::Rewrap { context } => Some(context.parse().map_err(usage)?),
        Command::Destroy(args) => {
            revoke::check_destroy(args)?;
            None
        }
        Command::Alias(cmd) => {
            alias::check(cmd)?;
            None
        }
        Command::Admin(AdminCommand::RetireMaster { version, confirm }) => {
            confirmed("retiring a master key version", &version.to_string(), confirm.as_deref())?;
            None
        }
        _ => None,
    }
    .unwrap_or_default();
    let input = match &cli.command {
        Command::Encrypt { input, text, .. } => Some(read_plaintext(input.as_deref(), text.as_deref())?),
        Command::Sign { .. } => Some(read_stdin(
            MAX_ENCRYPT_PLAINTEXT,
            "input",
            "; `sign` takes at most 64 KiB: sign a digest (--digest) instead",
        )?),
        Command::Verify { .. } => Some(read_stdin(
            MAX_ENCRYPT_PLAINTEXT,
            "input",
            "; `verify` takes at most 64 KiB: give a digest (--digest) instead",
        )?),
        Command::Mac(_) => Some(read_stdin(
            keyhaven::mac::MAX_MAC_MESSAGE,
            "message",
            "; MAC a digest of a longer message instead",
        )?),
        _ => None,
    };
    if let Command::Inspect { value } = &cli.command {
        return inspect::run(value.as_deref());
    }
    if let Command::Audit(AuditCommand::Verify { file, archive, public_key, .. }) = &cli.command {
        if !file.is_empty() || !archive.is_empty() {
            return audit_file::verify(file, archive, public_key.as_deref());
        }
        if public_key.is_some() {
            return Err(usage("--public-key is for checking offline, with --file or --archive"));
        }
    }
    if let Command::Seal { chunk_size, .. } = &cli.command {
        if !(keyhaven::seal::MIN_CHUNK..=keyhaven::seal::MAX_CHUNK).contains(chunk_size) {
            return Err(usage(format!(
                "--chunk-size must be {} to {} bytes",
                keyhaven::seal::MIN_CHUNK,
                keyhaven::seal::MAX_CHUNK
            )));
        }
    }
    if let Command::Encrypt { public_key: Some(file), json, .. } = &cli.command {
        return public_encrypt(file, &input.unwrap_or_default(), &context, *json);
    }
    match &cli.command {
        Command::Seal { key, chunk_size, .. } => {
            return seal::seal(&socket, key, &context, *chunk_size).await
        }
        Command::Open { .. } => return seal::open(&socket, &context).await,
        _ => {}
    }
    if let Command::Bench { revoke_delay: Some(rounds), concurrency, payload, key, .. } = &cli.command {
        if *rounds == 0 || concurrency.contains(&0) {
            return Err(usage("--revoke-delay and --concurrency need at least 1"));
        }
        outln!("{:>7} {:>7} {:>12} {:>12} {:>12}", "clients", "rounds", "p50 µs", "max µs", "min µs");
        for c in concurrency {
            let mut r = bench::revoke_delay(&socket, key, *c, *payload, *rounds).await?;
            r.last_us.sort_unstable();
            let p50 = r.last_us[r.last_us.len() / 2];
            let (min, max) = (r.last_us[0], r.last_us[r.last_us.len() - 1]);
            outln!("{:>7} {:>7} {:>12} {:>12} {:>12}", r.clients, rounds, p50, max, min);
        }
        return Ok(());
    }
    if let Command::Bench { op, concurrency, duration, payload, new_connection, json, quiet, key, .. } =
        &cli.command
    {
        if *payload > MAX_ENCRYPT_PLAINTEXT {
            return Err(usage(format!("--payload is at most {MAX_ENCRYPT_PLAINTEXT} bytes (64 KiB)")));
        }
        if concurrency.contains(&0) {
            return Err(usage("--concurrency takes numbers from 1"));
        }
        bench::check_socket(&socket).map_err(Failure::new)?;
        let opts = bench::Options {
            socket: socket.clone(),
            key: key.clone(),
            duration: *duration,
            payload: *payload,
            new_connection: *new_connection,
            progress: !*quiet,
        };
        if !*json {
            bench::header();
        }
        for op in op {
            for c in concurrency {
                let row = bench::run(&opts, *op, *c).await?;
                if *json {
                    outln!("{}", serde_json::to_string(&row).map_err(|e| Failure::new(e.to_string()))?);
                } else {
                    bench::print(&row);
                }
                std::io::stdout().flush()?;
            }
        }
        return Ok(());
    }
    if let Command::Verify { key, signature, version, digest, json } = &cli.command {
        if *version == Some(0) {
            return Err(usage("--version: key versions start at 1"));
        }
        let input = keyhaven::wire::SecretBytes::from_slice(&input.unwrap_or_default());
        let (message, digest) = if *digest { (None, Some(input)) } else { (Some(input), None) };
        let req = keyhaven::sign::Verify {
            tenant: key.tenant().into(),
            key: key.key().into(),
            version: *version,
            message,
            digest,
            signature: signature.clone(),
        };
        let timeout = cli.timeout.unwrap_or(keyhaven::client::DEFAULT_REQUEST_TIMEOUT);
        // Exit 1 means "does not verify"; an error is EXIT_NOT_CHECKED (in main).
        let resp = async {
            let client = Client::builder()
                .connect_timeout(Some(cli.connect_timeout).filter(|t| !t.is_zero()))
                .request_timeout(Some(timeout).filter(|t| !t.is_zero()))
                .connect(&socket)
                .await?;
            client.call(&req).await
        }
        .await
        .map_err(Failure::from)?;
        if *json {
            print_json(&resp)?;
        }
        return if resp.valid {
            eprintln!("keyhaven: the signature verifies (key `{key}` version {})", resp.key_version);
            Ok(())
        } else {
            Err(Failure::no(format!(
                "the signature does not verify under key `{key}` version {}",
                resp.key_version
            )))
        };
    }
    let request_timeout = match cli.timeout {
        Some(t) => t,
        // One request that walks the whole log and asks the token about every seal.
        None if matches!(cli.command, Command::Audit(AuditCommand::Verify { .. })) => Duration::ZERO,
        None => keyhaven::client::DEFAULT_REQUEST_TIMEOUT,
    };
    let client = Client::builder()
        .connect_timeout(Some(cli.connect_timeout).filter(|t| !t.is_zero()))
        .request_timeout(Some(request_timeout).filter(|t| !t.is_zero()))
        .connect(&socket)
        .await?;
    match cli.command {
        Command::Bench { .. }
        | Command::Seal { .. }
        | Command::Open { .. }
        | Command::Inspect { .. }
        | Command::Verify { .. } => {
            unreachable!("handled above")
        }
        Command::Health => {
            let h = client.health().await?;
            print_json(&h)?;
            if let Some(e) = &h.store.error {
                eprintln!(
                    "keyhaven: the store cannot be written ({}): {e}",
                    h.store.condition.as_deref().unwrap_or("unknown")
                );
            }
            if let Some(a) = h.audit.as_ref().filter(|a| !a.ok) {
                eprintln!(
                    "keyhaven: the audit log cannot be written ({}): {}; requests are refused until it can ({} so far)",
                    a.condition.as_deref().unwrap_or("unknown"),
                    a.error.as_deref().unwrap_or("no reason given"),
                    a.refused
                );
            }
            for s in h.audit_sinks.iter().filter(|s| s.state != "ok") {
                eprintln!(
                    "keyhaven: audit sink `{}` ({}) is {}: {} records behind{}",
                    s.name,
                    s.kind,
                    s.state,
                    s.lag,
                    s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
            match h.status.as_str() {
                "ok" => Ok(()),
                other => Err(Failure::new(format!("the daemon is {other}"))),
            }
        }
        Command::Revoke(args) => revoke::revoke(&client, args).await,
        Command::Alias(cmd) => alias::run(&client, cmd).await,
        Command::Destroy(args) => revoke::destroy(&client, args).await,
        Command::Metrics => {
            use std::io::Write as _;
            let text = client.metrics().await?;
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| Failure::new(format!("stdout: {e}")))
        }
        Command::Whoami => print_json(&client.call(&keyhaven::wire::Whoami {}).await?),
        Command::Admin(AdminCommand::RotateMaster { batch, rollback }) => {
            lifecycle::rotate_master(&client, batch, rollback).await
        }
        Command::Admin(AdminCommand::RetireMaster { version, .. }) => {
            print_json(&client.call(&keyhaven::lifecycle::AdminRetireMaster { version }).await?)
        }
        Command::Admin(AdminCommand::Reload) => {
            print_json(&client.call(&keyhaven::wire::AdminReload {}).await?)
        }
        Command::Audit(AuditCommand::Tail { follow, tenant, since, lines, after, json, node, all_nodes }) => {
            let start = match after {
                Some(seq) => audit::Start::After(seq),
                None => audit::Start::Last(lines),
            };
            let reconnect = audit::Reconnect {
                socket: socket.clone(),
                connect_timeout: Some(cli.connect_timeout).filter(|t| !t.is_zero()),
                request_timeout: Some(request_timeout).filter(|t| !t.is_zero()),
            };
            let nodes = match (node, all_nodes) {
                (_, true) => audit::Nodes::All,
                (Some(node), false) => audit::Nodes::One(node),
                (None, false) => audit::Nodes::This,
            };
            audit::tail(client, reconnect, tenant, since, start, follow, json, nodes).await
        }
        Command::Audit(AuditCommand::Verify { json, .. }) => audit::verify(&client, json).await,
        Command::Audit(AuditCommand::Export { since, tenant: _, signed: true }) => {
            audit::export_signed(&client, since).await
        }
        Command::Audit(AuditCommand::Export { since, tenant, signed: false }) => {
            audit::export(&client, tenant, since).await
        }
        Command::Audit(AuditCommand::PublicKey) => {
            std::io::stdout()
                .lock()
                .write_all(client.call(&keyhaven::wire::AuditPublicKey {}).await?.pem.as_bytes())?;
            Ok(())
        }
        Command::Key(KeyCommand::Create {
            key,
            rotate_every,
            key_type,
            idempotency_key,
            description,
            tags,
        }) => {
            let period = rotate_every.as_deref().map(lifecycle::period).transpose()?.filter(|p| *p != 0);
            let req = keyhaven::wire::KeyCreate {
                tenant: key.tenant().into(),
                key: key.key().into(),
                key_type,
                rotate_every_secs: period,
                idempotency_key,
                description,
                tags: lifecycle::tags(&tags)?,
            };
            print_json(&lifecycle::view(&client.call(&req).await?))
        }
        Command::Key(KeyCommand::Lifecycle(cmd)) => lifecycle::run(&client, cmd).await,
        Command::Rewrap { .. } => lifecycle::rewrap(&client, context).await,
        Command::Key(KeyCommand::List { tenant, tags }) => {
            let keys = lifecycle::list(&client, tenant, lifecycle::tags(&tags)?).await?;
            print_json(&lifecycle::view(&serde_json::json!({ "keys": keys })))
        }
        Command::Encrypt { key, json, .. } => {
            let key = key.ok_or_else(|| usage("encrypt needs TENANT/KEY or --public-key"))?;
            let plaintext = input.unwrap_or_default();
            let resp = client.encrypt(&key, &plaintext, &context).await?;
            if json {
                print_json(&resp)
            } else {
                outln!("{}", resp.ciphertext);
                Ok(())
            }
        }
        Command::Decrypt { json, .. } => {
            let ct = read_stdin_text("ciphertext")?;
            if let Some(hint) = wrong_form(&ct, "khc1:").filter(|_| !ct.starts_with("khp1:")) {
                return Err(Failure::new(format!("`decrypt` takes a ciphertext (khc1:): {hint}")));
            }
            let resp = client.decrypt(&ct, &context).await?;
            if json {
                return print_json(&resp);
            }
            let mut out = std::io::stdout().lock();
            out.write_all(resp.plaintext.expose())?;
            out.flush()?;
            Ok(())
        }
        Command::Datakey(DatakeyArgs { sub: Some(DatakeySub::Decrypt { .. }), .. }) => {
            let env = read_stdin_text("envelope")?;
            if let Some(hint) = wrong_form(&env, "khe1:") {
                return Err(Failure::new(format!("`datakey decrypt` takes an envelope (khe1:): {hint}")));
            }
            print_json(&client.datakey_decrypt(&env, &context).await?)
        }
        Command::Sign { key, digest, json } => {
            let input = keyhaven::wire::SecretBytes::from_slice(&input.unwrap_or_default());
            let (message, digest) = if digest { (None, Some(input)) } else { (Some(input), None) };
            let req =
                keyhaven::sign::Sign { tenant: key.tenant().into(), key: key.key().into(), message, digest };
            let resp = client.call(&req).await?;
            if json {
                print_json(&resp)
            } else {
                outln!("{}", resp.signature);
                Ok(())
            }
        }
        Command::Key(KeyCommand::Jwks { key }) => jwt::jwks(&client, &key).await,
        Command::Key(KeyCommand::ImportParams(args)) => import::params(&client, args).await,
        Command::Key(KeyCommand::Import(args)) => import::import(&client, args).await,
        Command::Jwt(JwtCommand::Sign { key, claims }) => jwt::sign(&client, &key, &claims).await,
        Command::Key(KeyCommand::Public { key, version, format }) => {
            let req =
                keyhaven::sign::PublicKey { tenant: key.tenant().into(), key: key.key().into(), version };
            let resp = client.call(&req).await?;
            if format == "jwk" {
                let kid = keyhaven::jose::kid(&key, resp.key_version);
                return print_json(&keyhaven::jose::jwk(&resp.pem, resp.key_type, &kid)?);
            }
            std::io::stdout().lock().write_all(resp.pem.as_bytes())?;
            Ok(())
        }
        Command::Mac(MacArgs { sub: Some(MacSub::Verify { key, tag }), .. }) => {
            let message = input.unwrap_or_default();
            let tag_version = tag.parse::<keyhaven::mac::MacTag>().map_err(usage)?.version;
            if client.mac_verify(&key, &message, &tag).await? {
                eprintln!("keyhaven: the tag matches (key `{key}` version {tag_version})");
                Ok(())
            } else {
                Err(Failure::no(format!(
                    "the tag does not match the message under key `{key}` version {tag_version}"
                )))
            }
        }
        Command::Mac(MacArgs { key, version, json, .. }) => {
            let key = key.ok_or_else(|| Failure::new("mac needs TENANT/KEY".into()))?;
            let message = input.unwrap_or_default();
            let resp = client.mac(&key, &message, version).await?;
            if json {
                print_json(&resp)
            } else {
                outln!("{}", resp.tag);
                Ok(())
            }
        }
        Command::Datakey(DatakeyArgs { key, no_plaintext, .. }) => {
            let key = key.ok_or_else(|| Failure::new("datakey needs TENANT/KEY".into()))?;
            print_json(
                &client
                    .datakey(
                        &key,
                        &context,
                        if no_plaintext { keyhaven::Plaintext::Omit } else { keyhaven::Plaintext::Include },
                    )
                    .await?,
            )
        }
    }
}
