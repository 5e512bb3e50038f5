//! The `keyhavend` binary: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keyhavend::config::{Config, Mode};
use keyhavend::exit::{StartError, EX_CONFIG};
use keyhavend::hardening::{self, MemoryLock};
use keyhavend::{daemon, dev, init, logging};

/// jemalloc, configured in .cargo/config.toml: freed pages go back to the
/// system about a second after they are freed (`dirty_decay_ms:1000`,
/// `muzzy_decay_ms:0`, a background thread), by `munmap` rather than
/// `madvise` (`retain:false`), which also works on memory locked by
/// `mlockall`. glibc's malloc kept the memory clients that never read had
/// made the daemon allocate (+109 % after the attack); `malloc_trim` needs
/// `unsafe`, and `madvise` cannot free locked pages anyway
/// (docs/PERFORMANCE.md "The hostile-client limits").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keyhaven daemon: HSM-backed key management over a Unix socket.
#[derive(Parser)]
#[command(name = "keyhavend", version)]
struct Cli {
    /// Configuration file (same as `run --config FILE`); not for `dev`, which writes its own in its folder,
    /// nor `store copy`, which takes --from and --to.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr: `human` (default) or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create (first run) or reuse a local dev install with a SoftHSM2 token, and run it.
    Dev {
        /// Folder of the dev install.
        #[arg(long, default_value = ".keyhaven-dev")]
        dir: PathBuf,
        /// Keep the store in this PostgreSQL database (a libpq connection string or `postgresql://` URL)
        /// instead of sled; written to DIR/postgres-url (0600) on the first run (docs/CLUSTER.md).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// Start another node of the cluster of the dev install in this folder (on PostgreSQL): it shares
        /// that install's token and database, with its own socket and node name (docs/CLUSTER.md).
        #[arg(long, value_name = "DIR", conflicts_with = "postgres")]
        join: Option<PathBuf>,
        /// With --join: the node's name (default: DIR's folder name).
        #[arg(long, value_name = "NAME", requires = "join")]
        node: Option<String>,
    },
    /// Create the master key in an existing token and an empty store.
    Init,
    /// Run the daemon.
    Run,
    /// Check a config as `run` would, without starting: every config error and production refusal at once,
    /// the PIN readable (and strong, in production), the PKCS#11 module loadable, the token present and its
    /// files accessible. Exits 0 when all pass, 78 otherwise. Does not log in (a wrong PIN would count
    /// against the token's retry limit), so it cannot see a wrong PIN, missing keys or a store that does
    /// not match its anchor.
    Check,
    /// Accept the store as it is over the token's anchor, after restoring a backup on purpose (recorded in the audit log).
    AcceptStore {
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Benchmark: a fresh dev install, the raw token rate, then `keyhaven bench` against it.
    Bench(keyhavend::bench::BenchArgs),
    /// Store maintenance (docs/OPERATIONS.md).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy a keyring (keys, revocations, the whole audit log) from the store one configuration names into the
    /// empty store another names (sled or PostgreSQL, either way), then verify the copy against the token's
    /// anchor. Stop every daemon on the source first; afterwards point every daemon at the destination.
    Copy {
        /// Configuration naming the store to copy (and the token that anchors it).
        #[arg(long, value_name = "CONFIG")]
        from: PathBuf,
        /// Configuration naming the empty store to copy into (the same token).
        #[arg(long, value_name = "CONFIG")]
        to: PathBuf,
        /// Copy even when nodes hold live leases in a PostgreSQL source or destination (a running
        /// node writing during the copy makes its verification fail).
        #[arg(long)]
        allow_live_nodes: bool,
    },
}

fn main() -> ExitCode {
    // Everything the daemon creates (store files, dev files) is private by default.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    let journal = logging::stderr_is_journal();
    init_logging(cli.log_format, journal);
    if let Some(Command::Check) = cli.command {
        return check(cli.config);
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::eprint_lines(journal, "<3>", &format!("keyhavend: {e:#}"));
            ExitCode::from(keyhavend::exit::status(&e))
        }
    }
}

/// Logs to stderr, human-readable or JSON. When stderr is the journal,
/// without timestamps (the journal adds its own) and with each line's
/// priority (`<4>` for a warning); colours only on a terminal.
fn init_logging(format: LogFormat, journal: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYHAVEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(logging::Stderr { journal })
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match (format, journal) {
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder.json().without_time().init(),
        (LogFormat::Human, false) => builder.init(),
        (LogFormat::Human, true) => builder.without_time().init(),
    }
}

/// `keyhavend check`: every problem `run` would meet before it logs in, all
/// at once, one per line on stderr; 0 when there are none, else 78.
fn check(config: Option<PathBuf>) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    let Some(path) = config else {
        eprintln!("keyhavend: --config FILE is required");
        return ExitCode::from(EX_CONFIG);
    };
    // No core dump while the PIN is in memory; no memory lock needed.
    if let Err(e) = hardening::process_hygiene(Mode::Dev) {
        problems.push(e);
    }
    let config = match Config::load(&path) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(config) = &config {
        match hardening::check(config) {
            Ok(()) => {
                if config.mode != Mode::Production {
                    if let Err(e) = config.read_pin() {
                        problems.push(e);
                    }
                }
            }
            Err(refused) => problems.extend(refused.problems.iter().map(ToString::to_string)),
        }
        if let Ok(pin) = config.read_pin() {
            if let Err(e) = keyhavend::refusal::check(&config.store.path, &config.hsm.token_label, &pin) {
                problems.push(e.to_string());
            }
        }
        daemon::prepare_environment(config);
        problems.extend(check_token(config));
        if !config.store.path.is_dir() {
            problems.push(format!(
                "the store {} does not exist: run `keyhavend init --config {}`",
                config.store.path.display(),
                path.display()
            ));
        }
    }
    if problems.is_empty() {
        println!(
            "config {}: ok (not checked: the PIN against the token, the master and audit keys, the store \
             against its anchor in the token)",
            path.display()
        );
        return ExitCode::SUCCESS;
    }
    let n = problems.len();
    eprintln!(
        "keyhavend: config {}: {n} problem{} `run` would refuse:\n  - {}",
        path.display(),
        if n == 1 { "" } else { "s" },
        problems.join("\n  - ")
    );
    ExitCode::from(EX_CONFIG)
}

/// The module loads, the token is there, and (SoftHSM2) its files can be
/// read and written. No session is opened and nobody logs in.
fn check_token(config: &Config) -> Vec<String> {
    use keyhavend::hsm::token;
    let mut problems = Vec::new();
    let module = config.hsm.module.display().to_string();
    match token::load_module(&module) {
        Ok(pkcs11) => {
            if let Err(e) = token::find_token(&pkcs11, &config.hsm.token_label) {
                problems.push(e.to_string());
            }
            let _ = pkcs11.finalize();
        }
        Err(e) => problems.push(e.to_string()),
    }
    problems.extend(keyhavend::softhsm::token_files_problem(config));
    problems
}

/// Reads the config, applies the process hygiene (no core dumps, memory
/// locked where allowed) and, in production mode, refuses a weak set-up.
fn load(config: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = config.ok_or(StartError::NoConfig)?;
    let config = Config::load(&path)?;
    match hardening::process_hygiene(config.mode).map_err(StartError::Hygiene)? {
        MemoryLock::Locked => tracing::info!("memory locked (mlockall): secrets stay out of swap"),
        MemoryLock::NotLocked(why) => tracing::warn!("memory not locked: {why}"),
        MemoryLock::Skipped => {}
    }
    hardening::check(&config)?;
    daemon::prepare_environment(&config);
    Ok(config)
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Dev { .. }) | Some(Command::Store { .. }) if cli.config.is_some() => {
            anyhow::bail!(
                "--config does not apply to `dev` (it writes and uses DIR/keyhaven.toml) nor to `store copy` (it \
                 takes --from and --to)"
            )
        }
        Some(Command::Dev { dir, postgres: None, join: Some(other), node }) => {
            let path = dev::join(&dir, &other, node.as_deref())?;
            let config = load(Some(path))?;
            daemon::run(config, None, |c| {
                println!("export KEYHAVEN_SOCKET={}", c.socket.display());
            })
        }
        Some(Command::Dev { dir, postgres, .. }) => {
            let (path, store) = dev::prepare(&dir, postgres.as_deref())?;
            let config = load(Some(path))?;
            daemon::run(config, store, |c| {
                println!("export KEYHAVEN_SOCKET={}", c.socket.display());
            })
        }
        Some(Command::Init) => {
            let config = load(cli.config)?;
            init::initialise(&config)?;
            println!(
                "initialised: master key `{}-v1` in token `{}`, store at {}",
                config.hsm.master_key_label,
                config.hsm.token_label,
                config.store.path.display()
            );
            Ok(())
        }
        Some(Command::Bench(args)) => keyhavend::bench::run(args),
        Some(Command::AcceptStore { reason }) => {
            let config = load(cli.config)?;
            println!("{}", keyhavend::anchor::accept_store(&config, &reason)?);
            Ok(())
        }
        Some(Command::Store { command: StoreCommand::Copy { from, to, allow_live_nodes } }) => {
            // `from` last: its token environment (SOFTHSM2_CONF) is the one used.
            let to_config = load(Some(to.clone()))?;
            let from_config = load(Some(from.clone()))?;
            let options = keyhavend::store::copy::CopyOptions { allow_live_nodes };
            let report = keyhavend::store::copy::copy(&from_config, &to_config, &options, &mut |line| {
                eprintln!("keyhavend: store copy: {line}")
            })?;
            let exported = match report.exported.as_slice() {
                [] => String::new(),
                files => format!(
                    " Other nodes' audit chains were written alongside as signed exports ({}): check them with \
                     `keyhaven audit verify --file FILE --public-key PEM`.",
                    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            };
            println!(
                "copied {} keys, {} revocations, {} audit records and {} seals ({} audit chain(s)) from {} to {}; \
                 the copy matches the token's anchor (write {}).{exported} Point every daemon at {} before \
                 starting them: the first write to either store makes the other an older copy that the daemon \
                 refuses.",
                report.keys,
                report.revocations,
                report.audit_records,
                report.audit_seals,
                report.chains,
                from.display(),
                to.display(),
                report.anchor_generation,
                to.display()
            );
            Ok(())
        }
        Some(Command::Check) => unreachable!("handled in main"),
        Some(Command::Run) | None => daemon::run(load(cli.config)?, None, |_| {}),
    }
}
