//! The daemon's TOML configuration. `keyhavend dev` writes one; production
//! installs write their own (see docs/OPERATIONS.md for an annotated
//! example). The PIN is never inline: it comes from a file, an
//! environment variable or a systemd credential (`$CREDENTIALS_DIRECTORY`).
//! Errors name the file, the line and the key.

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
    /// The store: a folder (the embedded sled store), or a `[store]` table
    /// that names its backend (docs/CLUSTER.md).
    #[serde(deserialize_with = "store_section", serialize_with = "write_store_section")]
    pub store: StoreSection,
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
    /// This node of a cluster on PostgreSQL (docs/CLUSTER.md).
    #[serde(default, skip_serializing_if = "ClusterSection::is_default")]
    pub cluster: ClusterSection,
    /// Who may do what (docs/POLICY.md).
    #[serde(default)]
    pub policy: PolicySection,
    /// Metrics for Prometheus (docs/OPERATIONS.md "Metrics").
    #[serde(default, skip_serializing_if = "MetricsSection::is_default")]
    pub metrics: MetricsSection,
    /// `policy`, compiled (by [`Config::load`]).
    #[serde(skip)]
    pub access: Policy,
    /// The file this configuration was read from (for reloading).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Which store backend keeps the keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled, embedded, in the folder `path` (the default).
    #[default]
    Sled,
    /// A PostgreSQL database (docs/CLUSTER.md).
    Postgres,
}

/// `store = "FOLDER"`, or `[store]`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sled` (default) or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// sled: the store's folder. postgres: the daemon's own local folder
    /// (notes such as a refused PIN's), the database being elsewhere.
    pub path: PathBuf,
    /// postgres: a file holding the connection string (first line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// postgres: an environment variable holding the connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// postgres: a systemd credential holding the connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_credential: Option<String>,
    /// postgres: an inline connection string, for `dev` installs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// postgres: a PEM file of CA certificates to trust for TLS, besides
    /// the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// postgres: how long opening a connection may take, from the socket's
    /// connect to the end of authentication (TLS included), in seconds
    /// (from 1 to 300; default [`DEFAULT_CONNECT_TIMEOUT`]). It also sets
    /// the time limit of every database call, at start and after
    /// (docs/CLUSTER.md §2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_seconds: Option<u64>,
}

/// `[store] connect_timeout_seconds` when it is not set.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The shortest and longest `[store] connect_timeout_seconds`.
pub const CONNECT_TIMEOUT_BOUNDS: (u64, u64) = (1, 300);

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An inline connection string may hold a password: never printed.
        f.debug_struct("StoreSection")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url_file", &self.url_file)
            .field("url_env", &self.url_env)
            .field("url_credential", &self.url_credential)
            .field("url", &self.url.as_ref().map(|_| "(redacted)"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("connect_timeout_seconds", &self.connect_timeout_seconds)
            .finish()
    }
}

impl StoreSection {
    /// The embedded store in `path`.
    pub fn sled(path: PathBuf) -> StoreSection {
        StoreSection {
            backend: StoreBackend::Sled,
            path,
            url_file: None,
            url_env: None,
            url_credential: None,
            url: None,
            tls_ca_file: None,
            connect_timeout_seconds: None,
        }
    }

    /// `connect_timeout_seconds`, or its default.
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.connect_timeout_seconds.map_or(DEFAULT_CONNECT_TIMEOUT, std::time::Duration::from_secs)
    }

    /// The PostgreSQL connection string, from where the section says.
    pub fn read_url(&self) -> Result<zeroize::Zeroizing<String>, String> {
        let from_file = |file: &Path| {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
                format!("cannot read the PostgreSQL connection string file {}: {e}", file.display())
            })?);
            let line = text.lines().next().unwrap_or_default().trim();
            if line.is_empty() {
                return Err(format!("the PostgreSQL connection string file {} is empty", file.display()));
            }
            Ok(zeroize::Zeroizing::new(line.to_owned()))
        };
        if let Some(file) = &self.url_file {
            return from_file(file);
        }
        if let Some(name) = &self.url_credential {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!(
                    "`url_credential = \"{name}\"` needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit \
                     with `LoadCredential={name}:/path/to/file`; outside systemd use `url_file`"
                )
            })?;
            return from_file(&PathBuf::from(dir).join(name));
        }
        if let Some(var) = &self.url_env {
            return std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| zeroize::Zeroizing::new(v.trim().to_owned()))
                .ok_or_else(|| {
                    format!("the variable `{var}` (the PostgreSQL connection string) is not set")
                });
        }
        self.url.clone().map(zeroize::Zeroizing::new).ok_or_else(|| {
            "[store] backend = \"postgres\" needs `url_file`, `url_env` or `url_credential`".to_owned()
        })
    }
}

/// The embedded store as the plain folder (`store = "…"`, as configs have
/// always said it), anything else as a `[store]` table.
fn write_store_section<S: serde::Serializer>(store: &StoreSection, s: S) -> Result<S::Ok, S::Error> {
    let plain = StoreSection::sled(store.path.clone());
    let is_plain = store.backend == StoreBackend::Sled
        && [&store.url_file, &store.tls_ca_file].iter().all(|f| f.is_none())
        && [&store.url_env, &store.url_credential, &store.url].iter().all(|v| v.is_none())
        && store.connect_timeout_seconds.is_none();
    if is_plain {
        plain.path.serialize(s)
    } else {
        store.serialize(s)
    }
}

/// `store` is either a folder (sled) or a table.
fn store_section<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreSection, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = StoreSection;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a folder for the embedded store, or a [store] table")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StoreSection, E> {
            Ok(StoreSection::sled(PathBuf::from(v)))
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<StoreSection, A::Error> {
            StoreSection::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(V)
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
    /// Group commit under load: when the last flush served more than 8
    /// records, the next starts no sooner than this many microseconds after
    /// the last one started, so that more records share one `fdatasync`
    /// (docs/AUDIT.md §4). 0 turns it off. Default 250.
    #[serde(default = "default_commit_gather_us")]
    pub commit_gather_us: u64,
    /// `[[audit.sink]]`: where the log is shipped as it is written
    /// (docs/AUDIT.md §11).
    #[serde(default, rename = "sink", skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<crate::audit_sinks::SinkConfig>,
    /// `[audit.retention]`: old sealed segments archived or deleted
    /// (docs/AUDIT.md §12); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::retention::RetentionSection>,
}

fn default_commit_gather_us() -> u64 {
    250
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
            commit_gather_us: default_commit_gather_us(),
            sinks: Vec::new(),
            retention: None,
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
    /// Name of a systemd credential holding the user PIN (`LoadCredential=`):
    /// the file `$CREDENTIALS_DIRECTORY/{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_credential: Option<String>,
    /// An inline PIN: always refused. Present only so that the refusal can
    /// say what to do instead; its value is discarded unread.
    #[serde(default, skip_serializing)]
    pub pin: Option<InlinePin>,
    /// Production mode refuses a SoftHSM2 module unless this is `true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_softhsm: bool,
    /// Base label of the master key (version N is `{label}-vN`).
    #[serde(default = "default_mk_label")]
    pub master_key_label: String,
    /// HSM worker threads, each with its own session: `"auto"` (sized at
    /// start from the token, `hsm::sizing`) or a number.
    #[serde(default)]
    pub workers: crate::hsm::Workers,
    /// AES-GCM and HMAC calls of requests made on the I/O thread that runs
    /// the request, each I/O thread with a session of its own, instead of
    /// on a worker (`hsm::inline`): for a local token only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inline: bool,
    /// Requests that may wait for a worker before new ones get `busy`.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// The most keys kept unwrapped in the token at once, all workers
    /// together (each worker holds its share, least recently used out
    /// first): a network HSM has room for only so many objects.
    #[serde(default = "default_loaded_keys")]
    pub loaded_keys: usize,
    /// Label of the audit key (an HMAC key in the token that seals the
    /// audit log; created on start when missing).
    #[serde(default = "default_audit_key_label")]
    pub audit_key_label: String,
    /// For SoftHSM2 only: its configuration file (sets SOFTHSM2_CONF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softhsm2_conf: Option<PathBuf>,
}

/// `[metrics]`: whether the request path counts, and where (if anywhere)
/// `GET /metrics` is served over HTTP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Count requests and their latencies (default `true`); `false` leaves
    /// those at zero (for measuring their cost on the request path).
    #[serde(default = "default_true")]
    pub collect: bool,
    /// `IP:PORT` to serve `GET /metrics` on; none (the default) serves
    /// nothing over the network (`keyhaven metrics` still works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Allow a `listen` address that is not loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_remote: bool,
}

fn default_true() -> bool {
    true
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { collect: true, listen: None, allow_remote: false }
    }
}

impl MetricsSection {
    fn is_default(&self) -> bool {
        *self == MetricsSection::default()
    }

    /// The checked `listen` address: an IP address and a port (no host
    /// name: what it resolves to could change), loopback unless
    /// `allow_remote`.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let Some(text) = &self.listen else {
            if self.allow_remote {
                return Err("`allow_remote` is set but `listen` is not".into());
            }
            return Ok(None);
        };
        let addr: std::net::SocketAddr = text.parse().map_err(|_| {
            format!(
                "`{}` is not an IP address and port, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\" \
                 (host names are not accepted)",
                crate::text::printable(text)
            )
        })?;
        if addr.port() == 0 {
            return Err("the port must not be 0: a scraper needs to know it".into());
        }
        if !addr.ip().is_loopback() && !self.allow_remote {
            return Err(format!(
                "{addr} is not a loopback address: anyone who can reach it could read the metrics; \
                 set `allow_remote = true` in [metrics] to serve on it (and restrict it with a firewall)"
            ));
        }
        Ok(Some(addr))
    }
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

/// `[cluster]`: this node's name and lease (docs/CLUSTER.md §2). Only a
/// PostgreSQL store has nodes; sled ignores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The node's name (checked like a tenant name); default: the host
    /// name, lowercased, with `.` turned into `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How long a lease lasts (`"5s"`, from 1 s to 60 s): the bound on how
    /// long `revoke` waits for a node that stopped answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The shortest and longest lease.
pub const LEASE_BOUNDS: (std::time::Duration, std::time::Duration) =
    (std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));

/// The lease when `[cluster] lease` is not set.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(5);

impl ClusterSection {
    fn is_default(&self) -> bool {
        *self == ClusterSection::default()
    }

    /// The node's name: `node`, or the host name made into a name.
    pub fn node_name(&self) -> Result<String, String> {
        let name = match &self.node {
            Some(n) => n.clone(),
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map_err(|e| format!("cannot read the host name ({e}): set [cluster] node"))?;
                host.trim().to_ascii_lowercase().replace('.', "-")
            }
        };
        keyhaven::names::validate_name("cluster node", &name)
            .map_err(|e| format!("{e} (set [cluster] node to a name of a-z, 0-9, `-`, `_`)"))?;
        Ok(name)
    }

    /// The lease's length.
    pub fn lease(&self) -> Result<std::time::Duration, String> {
        let Some(text) = &self.lease else { return Ok(DEFAULT_LEASE) };
        let d = humantime::parse_duration(text)
            .map_err(|e| format!("`{}` is not a duration like \"5s\": {e}", text.escape_default()))?;
        if !(LEASE_BOUNDS.0..=LEASE_BOUNDS.1).contains(&d) {
            return Err("must be from 1s to 60s".into());
        }
        Ok(d)
    }
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

/// The value of an inline `pin = …`, thrown away as it is parsed: it is
/// never kept, printed or compared.
#[derive(Debug, Clone, Copy)]
pub struct InlinePin;

impl<'de> Deserialize<'de> for InlinePin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(InlinePin)
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one uid may hold at once (more than `max_connections`
    /// acts as `max_connections`).
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
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
    /// Seconds a frame, once its first byte arrived, may take to arrive
    /// whole; a connection over it is closed.
    #[serde(default = "default_frame_timeout_seconds")]
    pub frame_timeout_seconds: u64,
    /// Seconds a connection may stay idle (nothing received, nothing
    /// running, nothing to write, no subscription) before it is closed.
    #[serde(default = "default_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
    /// Bytes all connections together may hold for partly received frames.
    #[serde(default = "default_request_buffer_bytes")]
    pub request_buffer_bytes: usize,
    /// Bytes of answers one connection may have waiting for its client to
    /// read; past it the daemon reads no more requests from it.
    #[serde(default = "default_outbox_bytes")]
    pub outbox_bytes: usize,
    /// Seconds a client may leave its answers unread (the daemon writes
    /// nothing) before the connection is dropped.
    #[serde(default = "default_write_timeout_seconds")]
    pub write_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_connections_per_uid: default_max_connections_per_uid(),
            max_in_flight: default_max_in_flight(),
            drain_seconds: default_drain_seconds(),
            wraps_per_key_version: default_wraps_per_key_version(),
            frame_timeout_seconds: default_frame_timeout_seconds(),
            idle_timeout_seconds: default_idle_timeout_seconds(),
            request_buffer_bytes: default_request_buffer_bytes(),
            outbox_bytes: default_outbox_bytes(),
            write_timeout_seconds: default_write_timeout_seconds(),
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
fn default_queue_depth() -> usize {
    4096
}
fn default_loaded_keys() -> usize {
    crate::hsm::DEFAULT_LOADED_KEYS
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_uid() -> usize {
    1024
}
fn default_max_in_flight() -> usize {
    128
}
fn default_drain_seconds() -> u64 {
    10
}
fn default_frame_timeout_seconds() -> u64 {
    10
}
fn default_idle_timeout_seconds() -> u64 {
    // An hour: long enough that an application's pooled connection is not
    // closed between quiet spells (the Rust `Client` does not reconnect
    // yet), short enough that abandoned connections give their slot back.
    3600
}
fn default_request_buffer_bytes() -> usize {
    256 << 20
}
fn default_outbox_bytes() -> usize {
    4 << 20
}
fn default_write_timeout_seconds() -> u64 {
    30
}
fn default_wraps_per_key_version() -> u64 {
    crate::wraps::MAX_WRAPS_PER_VERSION
}

/// The least and the most `[limits]` request_buffer_bytes and
/// outbox_bytes may be.
const MIN_BUFFER_BYTES: usize = 2 << 20;
const MAX_BUFFER_BYTES: usize = 16 << 30;

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
    /// The file does not parse. The message names the line, the column
    /// and the key, and never quotes the file: the line could hold a PIN
    /// (an inline `pin = …`, or a PIN pasted in the wrong place).
    #[error("config {}{}: {reason}", path.display(), at_column(key.as_deref(), *line, *column))]
    Parse {
        /// File.
        path: PathBuf,
        /// The key concerned (`hsm.workers`), when known.
        key: Option<String>,
        /// Its line in the file (from 1), when the parser knows it.
        line: Option<usize>,
        /// Its column (from 1), when the parser knows it.
        column: Option<usize>,
        /// The parser's message, without the quoted line.
        reason: String,
    },
    /// A value is wrong.
    #[error("config {}{}: {reason}", path.display(), at(key.as_deref(), *line))]
    Invalid {
        /// File.
        path: PathBuf,
        /// The key concerned (`hsm.workers`), when there is one.
        key: Option<String>,
        /// Its line in the file, when it is written there.
        line: Option<usize>,
        /// What to change.
        reason: String,
    },
}

fn at_column(key: Option<&str>, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}{}", at(key, None)),
        _ => at(key, line),
    }
}

/// Line and column (both from 1) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The parser's message for a key, safe to print: the TOML parser's own
/// text quotes the offending line, so only its message is kept, and a
/// message about a PIN key (`hsm.pin…`), which could quote the value, is
/// replaced.
fn parse_reason(key: Option<&str>, message: &str) -> String {
    if key.is_some_and(|k| k.starts_with("hsm.pin")) {
        return "this value is not valid here (not shown: it may be a PIN)".into();
    }
    message.trim().to_owned()
}

fn at(key: Option<&str>, line: Option<usize>) -> String {
    match (key, line) {
        (Some(k), Some(l)) => format!(", line {l}, key `{k}`"),
        (Some(k), None) => format!(", key `{k}`"),
        (None, Some(l)) => format!(", line {l}"),
        (None, None) => String::new(),
    }
}

/// The line (from 1) where `key` (`hsm.workers`, `socket`) is set in
/// `text`, found by a plain scan of table headers and `name =` lines.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h.trim_start_matches('[').trim_end_matches(']').trim().to_owned();
            continue;
        }
        if current == table {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim().trim_matches('"') == name {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

impl Config {
    /// Reads and checks a configuration file. Relative paths in it are
    /// taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and checks the text of the configuration file at `path`
    /// (which only names the file in errors and anchors relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let key = e.path().to_string();
                let key = (key != "." && !key.is_empty()).then_some(key);
                let inner = e.into_inner();
                let (line, column) = inner.span().map(|s| line_column(text, s.start)).unzip();
                ConfigError::Parse {
                    path: path.to_owned(),
                    reason: parse_reason(key.as_deref(), inner.message()),
                    key,
                    line,
                    column,
                }
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.socket, &mut cfg.store.path, &mut cfg.hsm.module] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [
            &mut cfg.hsm.pin_file,
            &mut cfg.hsm.softhsm2_conf,
            &mut cfg.store.url_file,
            &mut cfg.store.tls_ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let invalid_key = |key: &str, reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: Some(key.to_owned()),
            line: line_of(text, key),
            reason: reason.to_owned(),
        };
        let invalid = |reason: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: None,
            line: None,
            reason: reason.to_owned(),
        };
        if cfg.hsm.pin.is_some() {
            return Err(invalid_key(
                "hsm.pin",
                "an inline PIN is refused: remove `pin` and put the PIN in a file named by `pin_file` \
                 (mode 0400), a systemd credential named by `pin_credential`, or an environment variable \
                 named by `pin_env`",
            ));
        }
        let sources =
            [cfg.hsm.pin_file.is_some(), cfg.hsm.pin_env.is_some(), cfg.hsm.pin_credential.is_some()];
        match sources.iter().filter(|s| **s).count() {
            0 => return Err(invalid("[hsm] needs `pin_file`, `pin_env` or `pin_credential`")),
            1 => {}
            _ => {
                return Err(invalid(
                    "[hsm] takes one of `pin_file`, `pin_env` and `pin_credential`, not both or all three",
                ))
            }
        }
        if let Some(name) = &cfg.hsm.pin_credential {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(invalid_key(
                    "hsm.pin_credential",
                    "must be a credential name (no `/`), e.g. \"pin\"",
                ));
            }
        }
        cfg.hsm.workers.check().map_err(|reason| invalid_key("hsm.workers", &reason))?;
        if cfg.hsm.queue_depth == 0 {
            return Err(invalid_key("hsm.queue_depth", "must be at least 1"));
        }
        if !(1..=crate::hsm::MAX_LOADED_KEYS).contains(&cfg.hsm.loaded_keys) {
            return Err(invalid_key(
                "hsm.loaded_keys",
                &format!("must be a number from 1 to {}", crate::hsm::MAX_LOADED_KEYS),
            ));
        }
        if cfg.limits.max_connections == 0 {
            return Err(invalid_key("limits.max_connections", "must be at least 1"));
        }
        if cfg.limits.max_connections > 1 << 20 {
            return Err(invalid_key("limits.max_connections", "must be from 1 to 1048576"));
        }
        if !(1..=1 << 20).contains(&cfg.limits.max_connections_per_uid) {
            return Err(invalid_key("limits.max_connections_per_uid", "must be from 1 to 1048576"));
        }
        if cfg.limits.max_in_flight == 0 {
            return Err(invalid_key("limits.max_in_flight", "must be at least 1"));
        }
        if !(1..=3600).contains(&cfg.limits.frame_timeout_seconds) {
            return Err(invalid_key("limits.frame_timeout_seconds", "must be from 1 to 3600"));
        }
        if !(1..=86400).contains(&cfg.limits.idle_timeout_seconds) {
            return Err(invalid_key("limits.idle_timeout_seconds", "must be from 1 to 86400"));
        }
        if !(1..=3600).contains(&cfg.limits.write_timeout_seconds) {
            return Err(invalid_key("limits.write_timeout_seconds", "must be from 1 to 3600"));
        }
        if !(MIN_BUFFER_BYTES..=MAX_BUFFER_BYTES).contains(&cfg.limits.request_buffer_bytes) {
            return Err(invalid_key(
                "limits.request_buffer_bytes",
                "must be from 2097152 (2 MiB: two largest frames) to 17179869184 (16 GiB)",
            ));
        }
        if !(MIN_BUFFER_BYTES..=MAX_BUFFER_BYTES).contains(&cfg.limits.outbox_bytes) {
            return Err(invalid_key(
                "limits.outbox_bytes",
                "must be from 2097152 (2 MiB: two largest frames) to 17179869184 (16 GiB)",
            ));
        }
        if cfg.limits.drain_seconds > 3600 {
            return Err(invalid_key("limits.drain_seconds", "must be at most 3600"));
        }
        if cfg.limits.max_in_flight > 65536 {
            return Err(invalid_key("limits.max_in_flight", "must be from 1 to 65536"));
        }
        if !(1..=crate::wraps::MAX_WRAPS_PER_VERSION).contains(&cfg.limits.wraps_per_key_version) {
            return Err(invalid_key("limits.wraps_per_key_version", "must be from 1 to 2147483648 (2^31)"));
        }
        if cfg.hsm.token_label.is_empty() || cfg.hsm.token_label.len() > 32 {
            return Err(invalid_key("hsm.token_label", "must be 1 to 32 bytes (a PKCS#11 token label)"));
        }
        if cfg.hsm.audit_key_label.is_empty() || cfg.hsm.audit_key_label == cfg.hsm.master_key_label {
            return Err(invalid_key("hsm.audit_key_label", "must be set and differ from master_key_label"));
        }
        if cfg.socket_mode > 0o777 || cfg.socket_mode & 0o600 != 0o600 {
            return Err(invalid_key(
                "socket_mode",
                "must be a permission mode (at most 0o777) that keeps 0o600",
            ));
        }
        if !(10..=60_000).contains(&cfg.audit.seal_interval_ms) {
            return Err(invalid_key("audit.seal_interval_ms", "must be from 10 to 60000"));
        }
        if !(1..=1_000_000).contains(&cfg.audit.seal_every) {
            return Err(invalid_key("audit.seal_every", "must be from 1 to 1000000"));
        }
        if !cfg.audit.enabled && !cfg.audit.sinks.is_empty() {
            return Err(invalid_key(
                "audit.sink",
                "sinks ship the audit log, which `enabled = false` turns off: remove the sinks or the `false`",
            ));
        }
        if let Err((key, why)) = crate::audit_sinks::check_all(&cfg.audit.sinks) {
            return Err(invalid_key(key, &why));
        }
        if let Some(r) = &cfg.audit.retention {
            if !cfg.audit.enabled {
                return Err(invalid_key(
                    "audit.retention",
                    "retention trims the audit log, which `enabled = false` turns off: remove one of them",
                ));
            }
            r.check(&cfg.store.path, cfg.store.backend == StoreBackend::Postgres)
                .map_err(|(key, why)| invalid_key(key, &why))?;
        }
        if cfg.audit.commit_gather_us > 10_000 {
            return Err(invalid_key("audit.commit_gather_us", "must be from 0 to 10000 (10 ms)"));
        }
        if cfg.audit.decrypt_hours_utc.is_some_and(|[a, b]| a > 23 || b > 24 || a == b) {
            return Err(invalid_key(
                "audit.decrypt_hours_utc",
                "must be [from, to] with hours 0 to 24, from != to",
            ));
        }
        if !(1..=86_400).contains(&cfg.lifecycle.check_seconds) {
            return Err(invalid_key("lifecycle.check_seconds", "must be from 1 to 86400 (a day)"));
        }
        if !(1..=86_400).contains(&cfg.lifecycle.usage_flush_seconds) {
            return Err(invalid_key("lifecycle.usage_flush_seconds", "must be from 1 to 86400 (a day)"));
        }
        if cfg.lifecycle.test_clock_offset_seconds > 100 * 365 * 86_400 {
            return Err(invalid_key("lifecycle.test_clock_offset_seconds", "must be at most 100 years"));
        }
        if cfg.lifecycle.test_clock_offset_seconds != 0 && cfg.mode != Mode::Dev {
            return Err(invalid_key("lifecycle.test_clock_offset_seconds", "is for `dev` installs only"));
        }
        if !cfg.audit.enabled && cfg.mode == Mode::Production {
            return Err(invalid_key("audit.enabled", "`false` is refused in production mode"));
        }
        if cfg.cluster.node.is_some() || cfg.store.backend == StoreBackend::Postgres {
            cfg.cluster.node_name().map_err(|e| invalid_key("cluster.node", &e))?;
        }
        cfg.cluster.lease().map_err(|e| invalid_key("cluster.lease", &e))?;
        cfg.metrics.listen_addr().map_err(|reason| invalid_key("metrics.listen", &reason))?;
        check_store(&cfg.store, cfg.mode).map_err(|(key, reason)| invalid_key(key, &reason))?;
        cfg.access = Policy::compile(&cfg.policy, text).map_err(|e| invalid(&format!("[policy] {e}")))?;
        cfg.source = Some(path.to_owned());
        Ok(cfg)
    }

    /// The file the PIN is read from: `pin_file`, or the systemd
    /// credential's file under `$CREDENTIALS_DIRECTORY`.
    pub fn pin_path(&self) -> Result<Option<PathBuf>, String> {
        if let Some(file) = &self.hsm.pin_file {
            return Ok(Some(file.clone()));
        }
        if let Some(name) = &self.hsm.pin_credential {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!(
                    "`pin_credential = \"{name}\"` needs $CREDENTIALS_DIRECTORY, which systemd sets \
                     for a unit with `LoadCredential={name}:/path/to/pin`; outside systemd use `pin_file`"
                )
            })?;
            return Ok(Some(PathBuf::from(dir).join(name)));
        }
        Ok(None)
    }

    /// Reads the PIN from where the configuration says.
    pub fn read_pin(&self) -> Result<Pin, String> {
        if let Some(file) = self.pin_path()? {
            return Pin::from_file(&file)
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
            inline: self.hsm.inline,
            queue_depth: self.hsm.queue_depth,
            loaded_keys: self.hsm.loaded_keys,
        })
    }
}

/// `[store]`: the connection string's source, as for the PIN (one of
/// them; never inline in production); nothing of it for sled.
fn check_store(store: &StoreSection, mode: Mode) -> Result<(), (&'static str, String)> {
    let sources = [
        store.url_file.is_some(),
        store.url_env.is_some(),
        store.url_credential.is_some(),
        store.url.is_some(),
    ];
    let n = sources.iter().filter(|s| **s).count();
    if let Some(s) = store.connect_timeout_seconds {
        let (low, high) = CONNECT_TIMEOUT_BOUNDS;
        if !(low..=high).contains(&s) {
            return Err(("store.connect_timeout_seconds", format!("must be from {low} to {high} (seconds)")));
        }
    }
    match store.backend {
        StoreBackend::Sled
            if n > 0 || store.tls_ca_file.is_some() || store.connect_timeout_seconds.is_some() =>
        {
            Err((
                "store.backend",
                "the connection settings (`url*`, `tls_ca_file`, `connect_timeout_seconds`) are for \
                 `backend = \"postgres\"`"
                    .into(),
            ))
        }
        StoreBackend::Sled => Ok(()),
        StoreBackend::Postgres if store.url.is_some() && mode == Mode::Production => Err((
            "store.url",
            "an inline connection string is refused in production: put it in a file named by `url_file` \
             (mode 0400), a systemd credential named by `url_credential`, or a variable named by `url_env`"
                .into(),
        )),
        StoreBackend::Postgres if n == 0 => {
            Err(("store.backend", "`postgres` needs `url_file`, `url_env` or `url_credential`".into()))
        }
        StoreBackend::Postgres if n > 1 => Err((
            "store.backend",
            "takes one of `url_file`, `url_env`, `url_credential` and `url`, not several".into(),
        )),
        StoreBackend::Postgres => match &store.url_credential {
            Some(name) if name.is_empty() || name.contains('/') || name == "." || name == ".." => Err((
                "store.url_credential",
                "must be a credential name (no `/`), e.g. \"postgres-url\"".into(),
            )),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_listen_is_loopback_unless_allowed() {
        let m = |listen: &str, allow_remote: bool| {
            MetricsSection { collect: true, listen: Some(listen.into()), allow_remote }.listen_addr()
        };
        assert_eq!(m("127.0.0.1:9464", false).unwrap().unwrap().port(), 9464);
        assert!(m("127.0.0.2:9464", false).is_ok(), "127.0.0.0/8 is loopback");
        assert!(m("[::1]:9464", false).is_ok());
        for remote in ["0.0.0.0:9464", "[::]:9464", "10.0.0.1:9464", "[::ffff:127.0.0.1]:9464"] {
            let e = m(remote, false).unwrap_err();
            assert!(e.contains("not a loopback address") && e.contains("allow_remote"), "{remote}: {e}");
            assert!(m(remote, true).is_ok(), "{remote} with allow_remote");
        }
        for bad in ["localhost:9464", "127.0.0.1", ":9464", "127.0.0.1:99999", "", "\u{1b}[31m"] {
            let e = m(bad, true).unwrap_err();
            assert!(e.contains("not an IP address and port") && !e.contains('\u{1b}'), "{bad:?}: {e}");
        }
        assert!(m("127.0.0.1:0", false).unwrap_err().contains("port must not be 0"));
        assert_eq!(MetricsSection::default().listen_addr(), Ok(None));
        let e = MetricsSection { allow_remote: true, ..Default::default() }.listen_addr().unwrap_err();
        assert!(e.contains("`listen` is not"), "{e}");
    }

    /// A syntax error on or near an inline PIN line, or a PIN put where a
    /// path or name goes: the error names the place, never the PIN.
    #[test]
    fn parse_errors_never_quote_the_line() {
        let dir = std::env::temp_dir().join(format!("keyhaven-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let head = "socket = \"s\"\nstore = \"d\"\n[hsm]\nmodule = \"m.so\"\ntoken_label = \"t\"\npin_file = \"p\"\n";
        for (n, bad) in [
            "pin = \"Inl1ne-S3cret-4242\n",
            "pin = Inl1ne-S3cret-4242\n",
            "pin = \"Inl1ne-S3cret-4242\\q\"\n",
            "pin = \"Inl1ne-S3cret-4242\" x\n",
            "pin = \"Inl1ne-S3cret-4242\"\npin = \"Inl1ne-S3cret-4242\"\n",
            "pin = \"Inl1ne-S3cret-4242\"\nworkers = = 2\n",
            "workers = 2 2\npin = \"Inl1ne-S3cret-4242\"\n",
            "pin_env = Inl1ne-S3cret-4242\n",
            "pin_credential = 4242424242424242\n",
            "Inl1ne-S3cret-4242\n",
            "[Inl1ne-S3cret-4242\n",
        ]
        .iter()
        .enumerate()
        {
            let file = dir.join(format!("c{n}.toml"));
            std::fs::write(&file, format!("{head}{bad}")).unwrap();
            let err = Config::load(&file).expect_err(bad).to_string();
            assert!(!err.contains("S3cret") && !err.contains("4242"), "{bad:?} -> {err}");
            assert!(err.contains("line 7") || err.contains("line 8"), "{bad:?} -> {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `[store]`: a folder or a table; the connection string from one
    /// source, never inline in production, never printed; sled takes none.
    #[test]
    fn the_store_section_takes_one_connection_string_source_never_inline_in_production() {
        let path = Path::new("/etc/keyhaven/keyhaven.toml");
        let hsm = "[hsm]\nmodule = \"m.so\"\ntoken_label = \"t\"\npin_file = \"p\"\n";
        let cfg = |mode: &str, store: &str| format!("mode = \"{mode}\"\nsocket = \"s\"\n{store}\n{hsm}");
        let plain = Config::parse(&cfg("production", "store = \"d\""), path).unwrap();
        assert_eq!(
            (plain.store.backend, plain.store.path.as_path()),
            (StoreBackend::Sled, Path::new("/etc/keyhaven/d"))
        );
        let pg = "[store]\nbackend = \"postgres\"\npath = \"d\"\n";
        let ok = Config::parse(&cfg("production", &format!("{pg}url_file = \"pg-url\"")), path).unwrap();
        assert_eq!(ok.store.url_file.as_deref(), Some(Path::new("/etc/keyhaven/pg-url")));
        // Written back (as `keyhavend dev` does): sled as the plain folder, postgres as a table.
        assert!(toml::to_string(&plain).unwrap().contains("\nstore = \"/etc/keyhaven/d\"\n"));
        let written = toml::to_string(&ok).unwrap();
        assert!(written.contains("[store]\nbackend = \"postgres\""), "{written}");
        assert_eq!(Config::parse(&written, path).unwrap().store.url_file, ok.store.url_file);
        let secret = "url = \"postgresql://kh:S3cret-4242@db/kh\"";
        let dev = Config::parse(&cfg("dev", &format!("{pg}{secret}")), path).unwrap();
        assert!(!format!("{dev:?}").contains("S3cret"), "Debug prints the inline connection string");
        for (mode, store, names) in [
            ("production", format!("{pg}{secret}"), "store.url"),
            ("production", pg.to_owned(), "url_file"),
            ("dev", format!("{pg}url_env = \"A\"\nurl_file = \"f\""), "not several"),
            ("dev", "[store]\npath = \"d\"\nurl_env = \"A\"".to_owned(), "postgres"),
            ("dev", format!("{pg}url_credential = \"../x\""), "store.url_credential"),
            ("dev", format!("{pg}port = 5432"), "port"),
        ] {
            let err = Config::parse(&cfg(mode, &store), path).expect_err(&store).to_string();
            assert!(err.contains(names) && !err.contains("S3cret"), "{store:?} -> {err}");
        }
    }
}
