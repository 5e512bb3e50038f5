//! The `keyhavend` binary: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keyhavend::config::Config;
use keyhavend::hardening::{self, MemoryLock};
use keyhavend::{daemon, dev, init};

/// Keyhaven daemon: HSM-backed key management over a Unix socket.
#[derive(Parser)]
#[command(name = "keyhavend", version)]
struct Cli {
    /// Configuration file (same as `run --config FILE`).
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
    },
    /// Create the master key in an existing token and an empty store.
    Init,
    /// Run the daemon.
    Run,
    /// Accept the store as it is over the token's anchor, after restoring a backup on purpose (recorded in the audit log).
    AcceptStore {
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Benchmark: a fresh dev install, the raw token rate, then `keyhaven bench` against it.
    Bench(keyhavend::bench::BenchArgs),
}

fn main() -> ExitCode {
    // Everything the daemon creates (store files, dev files) is private by default.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyhavend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, human-readable or JSON. Under systemd (JOURNAL_STREAM
/// set) without timestamps, because the journal adds its own; colours only
/// on a terminal.
fn init_logging(format: LogFormat) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEYHAVEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match (format, journal) {
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Json, true) => builder.json().without_time().init(),
        (LogFormat::Human, false) => builder.init(),
        (LogFormat::Human, true) => builder.without_time().init(),
    }
}

/// Reads the config, applies the process hygiene (no core dumps, memory
/// locked where allowed) and, in production mode, refuses a weak set-up.
fn load(config: Option<PathBuf>) -> anyhow::Result<Config> {
    let path = config.ok_or_else(|| anyhow::anyhow!("--config FILE is required"))?;
    let config = Config::load(&path)?;
    match hardening::process_hygiene(config.mode).map_err(anyhow::Error::msg)? {
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
        Some(Command::Dev { dir }) => {
            let (path, store) = dev::prepare(&dir)?;
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
                config.store.display()
            );
            Ok(())
        }
        Some(Command::Bench(args)) => keyhavend::bench::run(args),
        Some(Command::AcceptStore { reason }) => {
            let config = load(cli.config)?;
            println!("{}", keyhavend::anchor::accept_store(&config, &reason)?);
            Ok(())
        }
        Some(Command::Run) | None => daemon::run(load(cli.config)?, None, |_| {}),
    }
}
