//! The daemon's TOML configuration. `keyhavend dev` writes one; production
//! installs write their own (see docs/OPERATIONS.md for an annotated
//! example). The PIN is never inline: it comes from a file or an
//! environment variable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hsm::HsmConfig;
use crate::policy::{Policy, PolicySection};
use crate::secret::Pin;

/// Whether the daemon runs for development or production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Created by `keyhavend dev`: a SoftHSM2 token in a local folder.
    Dev,
    /// Everything else.
    #[default]
    Production,
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `dev` or `production` (default).
    #[serde(default)]
    pub mode: Mode,
    /// Path of the Unix socket to listen on.
    pub socket: PathBuf,
    /// File mode of the socket (default `0o660`). The policy decides what a
    /// caller may do; the mode decides who may connect at all. Use `0o666`
    /// (or a `socket_group`) to let other users' processes reach the policy.
    #[serde(default = "default_socket_mode", skip_serializing_if = "is_default_socket_mode")]
    pub socket_mode: u32,
    /// Group to give the socket (by name), e.g. one that every client
    /// user is in, with `socket_mode = 0o660`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Directory of the store.
    pub store: PathBuf,
    /// The token.
    pub hsm: HsmSection,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditSection,
    /// Periodic key upkeep.
    #[serde(default)]
    pub lifecycle: LifecycleSection,
    /// Who may do what (docs/POLICY.md).
    #[serde(default)]
    pub policy: PolicySection,
    /// `policy`, compiled (by [`Config::load`]).
    #[serde(skip)]
    pub access: Policy,
    /// The file this configuration was read from (for reloading).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[audit]` (docs/AUDIT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Whether to keep the audit log. Only a dev install may turn it off
    /// (to measure its cost); production refuses `false`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Longest time, in milliseconds, a record stays unsealed (default 1000).
    #[serde(default = "default_seal_interval_ms")]
    pub seal_interval_ms: u64,
    /// Most records between two seals (default 1000).
    #[serde(default = "default_seal_every")]
    pub seal_every: u64,
    /// Unusual volume: more decryptions (`decrypt`, `datakey_decrypt`) than
    /// this in one minute, by one uid or on one tenant, writes an alert
    /// record and a warning. 0 (the default) turns it off.
    #[serde(default)]
    pub decrypt_alert_per_minute: u64,
    /// Decryptions outside these UTC hours (`[from, to)`, e.g. `[7, 19]`)
    /// write an alert record and a warning (once a minute per uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decrypt_hours_utc: Option<[u8; 2]>,
    /// Refuse (`permission_denied`) the decryptions that raise an alert,
    /// instead of only recording them.
    #[serde(default)]
    pub decrypt_alert_block: bool,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            enabled: true,
            seal_interval_ms: default_seal_interval_ms(),
            seal_every: default_seal_every(),
            decrypt_alert_per_minute: 0,
            decrypt_hours_utc: None,
            decrypt_alert_block: false,
        }
    }
}

/// `[hsm]`: where the master key lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token.
    pub token_label: String,
    /// File holding the user PIN (first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
    /// Base label of the master key (version N is `{label}-vN`).
    #[serde(default = "default_mk_label")]
    pub master_key_label: String,
    /// HSM worker threads, each with its own session. On SoftHSM2 one is
    /// fastest (its internal locking makes two slower than one).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Requests that may wait for a worker before new ones get `busy`.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Label of the audit key (an HMAC key in the token that seals the
    /// audit log; created on start when missing).
    #[serde(default = "default_audit_key_label")]
    pub audit_key_label: String,
    /// For SoftHSM2 only: its configuration file (sets SOFTHSM2_CONF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softhsm2_conf: Option<PathBuf>,
}

/// `[lifecycle]`: how often the daemon looks for due rotations and
/// deletions, and persists usage counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSection {
    /// Seconds between checks for due automatic rotations and scheduled
    /// deletions (also done at start-up).
    #[serde(default = "default_check_seconds")]
    pub check_seconds: u64,
    /// Seconds between writes of the usage counts to the store.
    #[serde(default = "default_usage_flush_seconds")]
    pub usage_flush_seconds: u64,
    /// For tests of scheduled deletion, in `dev` mode only: seconds added
    /// to the clock when deciding whether a deletion is due.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub test_clock_offset_seconds: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Default for LifecycleSection {
    fn default() -> Self {
        LifecycleSection {
            check_seconds: default_check_seconds(),
            usage_flush_seconds: default_usage_flush_seconds(),
            test_clock_offset_seconds: 0,
        }
    }
}

fn default_check_seconds() -> u64 {
    60
}
fn default_usage_flush_seconds() -> u64 {
    5
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests one connection may have in flight (pipelined).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Seconds to let in-flight requests finish at shutdown.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
    /// Data keys one KEK version may wrap (docs/ENVELOPE.md §7); at most
    /// and by default 2^31. Lower it only to test the limit.
    #[serde(default = "default_wraps_per_key_version")]
    pub wraps_per_key_version: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
            drain_seconds: default_drain_seconds(),
            wraps_per_key_version: default_wraps_per_key_version(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_socket_mode() -> u32 {
    0o660
}
fn is_default_socket_mode(m: &u32) -> bool {
    *m == default_socket_mode()
}
fn default_seal_interval_ms() -> u64 {
    1000
}
fn default_seal_every() -> u64 {
    1000
}
fn default_audit_key_label() -> String {
    "keyhaven-audit".into()
}
fn default_mk_label() -> String {
    "keyhaven-mk".into()
}
fn default_workers() -> usize {
    1
}
fn default_queue_depth() -> usize {
    4096
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_in_flight() -> usize {
    128
}
fn default_drain_seconds() -> u64 {
    10
}
fn default_wraps_per_key_version() -> u64 {
    crate::wraps::MAX_WRAPS_PER_VERSION
}

/// A configuration problem, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("config {}: {reason}", path.display())]
    Parse {
        /// File.
        path: PathBuf,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// A value is wrong.
    #[error("config {}: {reason}", path.display())]
    Invalid {
        /// File.
        path: PathBuf,
        /// What to change.
        reason: String,
    },
}

impl Config {
    /// Reads and checks a configuration file. Relative paths in it are
    /// taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.socket, &mut cfg.store, &mut cfg.hsm.module] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [&mut cfg.hsm.pin_file, &mut cfg.hsm.softhsm2_conf].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let invalid =
            |reason: &str| ConfigError::Invalid { path: path.to_owned(), reason: reason.to_owned() };
        match (&cfg.hsm.pin_file, &cfg.hsm.pin_env) {
            (None, None) => return Err(invalid("[hsm] needs `pin_file` or `pin_env`")),
            (Some(_), Some(_)) => {
                return Err(invalid("[hsm] takes one of `pin_file` and `pin_env`, not both"))
            }
            _ => {}
        }
        if cfg.lifecycle.check_seconds == 0 || cfg.lifecycle.usage_flush_seconds == 0 {
            return Err(invalid("[lifecycle] check_seconds and usage_flush_seconds must be at least 1"));
        }
        if cfg.lifecycle.test_clock_offset_seconds != 0 && cfg.mode != Mode::Dev {
            return Err(invalid("[lifecycle] test_clock_offset_seconds is for `dev` installs only"));
        }
        if cfg.hsm.workers == 0 || cfg.hsm.workers > 64 {
            return Err(invalid("[hsm] workers must be from 1 to 64"));
        }
        if cfg.hsm.queue_depth == 0 {
            return Err(invalid("[hsm] queue_depth must be at least 1"));
        }
        if cfg.limits.max_connections == 0 || cfg.limits.max_in_flight == 0 {
            return Err(invalid("[limits] max_connections and max_in_flight must be at least 1"));
        }
        if !(1..=crate::wraps::MAX_WRAPS_PER_VERSION).contains(&cfg.limits.wraps_per_key_version) {
            return Err(invalid("[limits] wraps_per_key_version must be from 1 to 2147483648 (2^31)"));
        }
        if cfg.hsm.token_label.is_empty() || cfg.hsm.token_label.len() > 32 {
            return Err(invalid("[hsm] token_label must be 1 to 32 bytes (a PKCS#11 token label)"));
        }
        if cfg.hsm.audit_key_label.is_empty() || cfg.hsm.audit_key_label == cfg.hsm.master_key_label {
            return Err(invalid("[hsm] audit_key_label must be set and differ from master_key_label"));
        }
        if cfg.socket_mode > 0o777 || cfg.socket_mode & 0o600 != 0o600 {
            return Err(invalid("socket_mode must be a permission mode (at most 0o777) that keeps 0o600"));
        }
        if !(10..=60_000).contains(&cfg.audit.seal_interval_ms) || cfg.audit.seal_every == 0 {
            return Err(invalid(
                "[audit] seal_interval_ms must be from 10 to 60000 and seal_every at least 1",
            ));
        }
        if cfg.audit.decrypt_hours_utc.is_some_and(|[a, b]| a > 23 || b > 24 || a == b) {
            return Err(invalid(
                "[audit] decrypt_hours_utc must be [from, to] with hours 0 to 24, from != to",
            ));
        }
        if !cfg.audit.enabled && cfg.mode == Mode::Production {
            return Err(invalid("[audit] enabled = false is refused in production mode"));
        }
        cfg.access = Policy::compile(&cfg.policy, &text).map_err(|e| invalid(&format!("[policy] {e}")))?;
        cfg.source = Some(path.to_owned());
        Ok(cfg)
    }

    /// Reads the PIN from where the configuration says.
    pub fn read_pin(&self) -> Result<Pin, String> {
        if let Some(file) = &self.hsm.pin_file {
            return Pin::from_file(file)
                .map_err(|e| format!("cannot read the PIN file {}: {e}", file.display()));
        }
        let var = self.hsm.pin_env.as_deref().unwrap_or_default();
        Pin::from_env(var).ok_or_else(|| format!("the PIN variable `{var}` is not set"))
    }

    /// The HSM part, with the PIN read.
    pub fn hsm_config(&self) -> Result<HsmConfig, String> {
        Ok(HsmConfig {
            module: self.hsm.module.display().to_string(),
            token_label: self.hsm.token_label.clone(),
            pin: self.read_pin()?,
            master_key_label: self.hsm.master_key_label.clone(),
            audit_key_label: self.hsm.audit_key_label.clone(),
            workers: self.hsm.workers,
            queue_depth: self.hsm.queue_depth,
        })
    }
}
