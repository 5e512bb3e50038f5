//! Audit sinks: the audit log shipped, as it is written, to where an
//! operator's SIEM reads it (docs/AUDIT.md §11): a JSON-lines file with
//! rotation, syslog (RFC 5424 over a local Unix socket), journald (its
//! native protocol).
//!
//! Why apart from the log itself: the log is the record of truth (chain,
//! seals, anchor) and every request waits for it; a sink is a copy that may
//! be slow or down. So each sink runs in its own thread, off the request
//! path, reading records from the store after they are durable and keeping
//! a **durable cursor** (the last record it delivered, in a file of the
//! state directory, written atomically after each delivery): after a crash
//! or an outage it starts again after the cursor, so every record is
//! delivered at least once (a record delivered just before a crash may be
//! delivered again). A sink that falls more than `max_lag` records behind
//! logs a warning, and with `on_lag = "wait"` requests wait for it (up to
//! `wait_ms`) and then fail with `store_unavailable` (fail closed).
//!
//! Each shipped record carries its sequence number, its chain hash
//! (SHA-256 of the record's stored bytes, the `prev` of the next record) and
//! the node that wrote it, and the record's bytes as stored, so a verifier
//! downstream can check the chain (`keyhaven audit verify --file`).

mod file;
mod journald;
mod syslog;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::hex;
use crate::error::Error;
use crate::store::{AuditKind, Store};

/// Records shipped per delivery (and per cursor write).
const BATCH: usize = 1000;

/// How long a sink goes on delivering at a clean stop before it stops
/// behind (its cursor says where to go on).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `[[audit.sink]]`: one sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `file`, `syslog` or `journald`.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Names the sink in logs, in [`SinkStatus`] and in its cursor file
    /// (`audit-sinks/NAME.cursor`); default: the type. Unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `file`: the file written (required). `syslog`: the socket (default
    /// `/dev/log`). `journald`: the socket (default
    /// `/run/systemd/journal/socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `file`: rotate when the file holds this many bytes (default 100 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// `file`: rotate when the file's first record is this old, seconds
    /// (default 86400; 0: never by age).
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u64,
    /// `file`: rotated files kept (`FILE.1` newest … `FILE.N`), default 10.
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// What requests do when the sink is more than `max_lag` records
    /// behind: `continue` (default) or `wait`.
    #[serde(default)]
    pub on_lag: OnLag,
    /// Records the sink may be behind before it counts as lagging (default
    /// 10000).
    #[serde(default = "default_max_lag")]
    pub max_lag: u64,
    /// With `on_lag = "wait"`: how long a request waits for the sink to
    /// catch up before it fails, milliseconds (default 2000, at most 60000).
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
}

fn default_max_bytes() -> u64 {
    100 << 20
}
fn default_max_age_secs() -> u64 {
    86_400
}
fn default_keep() -> u32 {
    10
}
fn default_max_lag() -> u64 {
    10_000
}
fn default_wait_ms() -> u64 {
    2000
}

/// The kinds of sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines in a file, rotated by size and age.
    File,
    /// RFC 5424 datagrams to a local Unix socket.
    Syslog,
    /// journald's native protocol.
    Journald,
}

impl SinkKind {
    fn as_str(self) -> &'static str {
        match self {
            SinkKind::File => "file",
            SinkKind::Syslog => "syslog",
            SinkKind::Journald => "journald",
        }
    }
}

/// `on_lag`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLag {
    /// Requests go on; the sink catches up when it can.
    #[default]
    Continue,
    /// Requests wait for the sink (up to `wait_ms`), then fail.
    Wait,
}

impl SinkConfig {
    /// The sink's name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.kind.as_str().to_owned())
    }

    /// What is wrong with the sink's settings, as (key, reason).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let name = self.name();
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(("audit.sink.name", "must be 1 to 64 letters, digits, `-` or `_`".into()));
        }
        if self.kind == SinkKind::File && self.path.is_none() {
            return Err(("audit.sink.path", format!("sink `{name}`: a file sink needs `path`")));
        }
        if let Some(p) = self.path.as_ref().filter(|p| !p.is_absolute()) {
            return Err((
                "audit.sink.path",
                format!("sink `{name}`: {} is not an absolute path", p.display()),
            ));
        }
        if self.max_bytes < 4096 {
            return Err(("audit.sink.max_bytes", format!("sink `{name}`: must be at least 4096")));
        }
        if !(1..=1000).contains(&self.keep) {
            return Err(("audit.sink.keep", format!("sink `{name}`: must be from 1 to 1000")));
        }
        if self.max_lag == 0 {
            return Err(("audit.sink.max_lag", format!("sink `{name}`: must be at least 1")));
        }
        if self.wait_ms > 60_000 {
            return Err(("audit.sink.wait_ms", format!("sink `{name}`: must be from 0 to 60000")));
        }
        Ok(())
    }
}

/// Checks a list of sinks: each, and their names unique.
pub fn check_all(sinks: &[SinkConfig]) -> Result<(), (&'static str, String)> {
    let mut names = std::collections::HashSet::new();
    for s in sinks {
        s.check()?;
        if !names.insert(s.name()) {
            return Err((
                "audit.sink.name",
                format!("two sinks are named `{}`: give each its own `name`", s.name()),
            ));
        }
    }
    Ok(())
}

/// One record to ship: its sequence number, its chain hash (hex SHA-256 of
/// its stored bytes), its bytes as stored, and its outcome (for syslog's and
/// journald's priority).
pub struct Shipped<'a> {
    /// Sequence number.
    pub seq: u64,
    /// hex(SHA-256(bytes)).
    pub hash: String,
    /// The record's JSON as stored (`B(n)`, docs/AUDIT.md §3.1).
    pub bytes: &'a [u8],
    /// `ok`, `denied`, `error`, `alert`.
    pub outcome: String,
    /// Seals written with this record (the ones covering it), as stored.
    pub seals: Vec<Entry>,
}

/// Where a sink delivers.
trait Deliver: Send {
    /// Delivers `records` in order, all or an error (a later call
    /// delivers them again: at least once).
    fn deliver(&mut self, node: &str, records: &[Shipped<'_>]) -> Result<(), String>;

    /// Delivers seals written after the records they cover were delivered
    /// (a seal made by the timer, with no new record). Only the file sink
    /// ships seals.
    fn deliver_seals(&mut self, _node: &str, _seals: &[Entry]) -> Result<(), String> {
        Ok(())
    }
}

/// A sink's state, for the metrics and the logs: how far it is.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    /// The sink's name.
    pub name: String,
    /// `file`, `syslog`, `journald`.
    pub kind: &'static str,
    /// The last record delivered (its cursor).
    pub delivered: u64,
    /// Records durable in the log and not yet delivered.
    pub lag: u64,
    /// Whether `lag` is over the sink's `max_lag`.
    pub lagging: bool,
    /// The last delivery error, while the sink cannot deliver.
    pub error: Option<String>,
}

struct Sink {
    cfg: SinkConfig,
    name: String,
    /// The last record delivered.
    cursor: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The running sinks of a daemon.
pub struct Sinks {
    sinks: Vec<Arc<Sink>>,
    /// The last durable record of the log (set by the audit flusher).
    durable: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The node name shipped with each record: the host name (gethostname(2):
/// the unit's `ProcSubset=pid` hides /proc/sys; a cluster will name its
/// nodes).
fn node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn cursor_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.cursor"))
}

/// Reads a sink's cursor, `RECORD SEAL`: the last record delivered and
/// the last seal (by the record it covers); (0, 0) when it has none yet.
fn read_cursor(dir: &Path, name: &str) -> Result<(u64, u64), String> {
    let path = cursor_path(dir, name);
    let bad = |text: &str| {
        format!("the audit sink cursor {} does not hold `RECORD SEAL`: {text:?}", path.display())
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut parts = text.split_whitespace().map(str::parse::<u64>);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(Ok(r)), Some(Ok(s)), None) => Ok((r, s)),
                (Some(Ok(r)), None, None) => Ok((r, r)),
                _ => Err(bad(&text)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(format!("cannot read the audit sink cursor {}: {e}", path.display())),
    }
}

/// Writes a sink's cursor atomically: a temporary file written and
/// `fsync`ed, renamed over the cursor, the folder `fsync`ed.
fn write_cursor(dir: &Path, name: &str, (seq, seal): (u64, u64)) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.cursor.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(format!("{seq} {seal}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, cursor_path(dir, name))?;
    std::fs::File::open(dir)?.sync_all()
}

impl Sinks {
    /// No sinks.
    pub fn none() -> Sinks {
        Sinks {
            sinks: Vec::new(),
            durable: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts one thread per sink, each reading its cursor in
    /// `state_dir/audit-sinks/`. `durable` is the log's last durable record,
    /// kept up to date by the audit flusher.
    pub fn start(
        configs: &[SinkConfig],
        store: &Store,
        state_dir: &Path,
        durable: Arc<AtomicU64>,
    ) -> Result<Sinks, String> {
        let mut out = Sinks {
            sinks: Vec::new(),
            durable,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        };
        if configs.is_empty() {
            return Ok(out);
        }
        let dir = state_dir.join("audit-sinks");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let node = node_name();
        for cfg in configs {
            let name = cfg.name();
            let (cursor, sealed) = read_cursor(&dir, &name)?;
            let deliver: Box<dyn Deliver> = match cfg.kind {
                SinkKind::File => Box::new(file::FileSink::new(cfg)),
                SinkKind::Syslog => Box::new(syslog::SyslogSink::new(cfg)),
                SinkKind::Journald => Box::new(journald::JournaldSink::new(cfg)),
            };
            let sink = Arc::new(Sink {
                cfg: cfg.clone(),
                name: name.clone(),
                cursor: AtomicU64::new(cursor),
                error: Mutex::new(None),
            });
            tracing::info!(sink = %name, kind = cfg.kind.as_str(), after = cursor, "audit sink starting");
            let (s, st, du, stop, dir, node) = (
                sink.clone(),
                store.clone(),
                out.durable.clone(),
                out.stop.clone(),
                dir.clone(),
                node.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("keyhaven-sink-{name}"))
                .spawn(move || run(&s, deliver, &st, &du, &stop, &dir, &node, sealed))
                .map_err(|e| format!("cannot start the audit sink thread: {e}"))?;
            out.threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            out.sinks.push(sink);
        }
        Ok(out)
    }

    /// Each sink's state: delivered, lag, lagging, error (for the metrics:
    /// `keyhaven_audit_sink_lag{sink=NAME}` and the like).
    pub fn status(&self) -> Vec<SinkStatus> {
        let head = self.durable.load(Ordering::Acquire);
        self.sinks
            .iter()
            .map(|s| {
                let delivered = s.cursor.load(Ordering::Acquire);
                let lag = head.saturating_sub(delivered);
                SinkStatus {
                    name: s.name.clone(),
                    kind: s.cfg.kind.as_str(),
                    delivered,
                    lag,
                    lagging: lag > s.cfg.max_lag,
                    error: s.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                }
            })
            .collect()
    }

    /// Before a request runs: waits while a sink with `on_lag = "wait"` is
    /// more than `max_lag` records behind, up to its `wait_ms`, then fails
    /// (`store_unavailable`: the request is refused, fail closed).
    pub async fn admit(&self) -> Result<(), Error> {
        for s in self.sinks.iter().filter(|s| s.cfg.on_lag == OnLag::Wait) {
            let deadline = Instant::now() + Duration::from_millis(s.cfg.wait_ms);
            loop {
                let lag =
                    self.durable.load(Ordering::Acquire).saturating_sub(s.cursor.load(Ordering::Acquire));
                if lag <= s.cfg.max_lag {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Audit(format!(
                        "audit sink `{}` is {lag} records behind (over max_lag {}), and on_lag = \"wait\": \
                         request refused until it catches up",
                        s.name, s.cfg.max_lag
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// Stops the threads once each has delivered what is durable (or
    /// failed): at shutdown, after the audit log's last flush.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sink's thread: reads the records after its cursor that are durable,
/// delivers them in batches, and moves its cursor after each delivery.
#[allow(clippy::too_many_arguments)]
fn run(
    sink: &Sink,
    mut deliver: Box<dyn Deliver>,
    store: &Store,
    durable: &AtomicU64,
    stop: &AtomicBool,
    dir: &Path,
    node: &str,
    mut sealed: u64,
) {
    let mut lagging = false;
    let mut failing_since: Option<Instant> = None;
    let mut seals_checked = Instant::now();
    let mut stop_seen: Option<Instant> = None;
    loop {
        let head = durable.load(Ordering::Acquire);
        let cursor = sink.cursor.load(Ordering::Acquire);
        let lag = head.saturating_sub(cursor);
        if lag > sink.cfg.max_lag && !lagging {
            lagging = true;
            tracing::warn!(sink = %sink.name, lag, max_lag = sink.cfg.max_lag, "audit sink is lagging");
        } else if lag <= sink.cfg.max_lag && lagging {
            lagging = false;
            tracing::info!(sink = %sink.name, lag, "audit sink caught up");
        }
        let stopping = stop.load(Ordering::Acquire);
        if stopping && cursor < head && stop_seen.get_or_insert_with(Instant::now).elapsed() > STOP_GRACE {
            tracing::warn!(sink = %sink.name, after = cursor, lag, "audit sink stopped behind; it goes on from its cursor at the next start");
            return;
        }
        if cursor >= head {
            // Seals made since, over records already delivered.
            if stopping || seals_checked.elapsed() >= Duration::from_millis(500) {
                seals_checked = Instant::now();
                let late = late_seals(store, sealed, cursor).and_then(|seals| {
                    let Some(last) = seals.last().map(|s| s.0) else { return Ok(sealed) };
                    deliver.deliver_seals(node, &seals)?;
                    write_cursor(dir, &sink.name, (cursor, last))
                        .map_err(|e| format!("cannot write the cursor in {}: {e}", dir.display()))?;
                    Ok(last)
                });
                match late {
                    Ok(s) => sealed = s,
                    Err(e) => {
                        tracing::warn!(sink = %sink.name, error = %e, "audit sink cannot deliver seals")
                    }
                }
            }
            if stopping {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let result = batch(store, cursor, head, sealed).and_then(|(records, mut seals)| {
            seals.retain(|s| s.0 > sealed);
            let last_seal = seals.last().map_or(sealed, |s| s.0);
            let shipped = shipped(&records, seals);
            deliver.deliver(node, &shipped)?;
            let last = records.last().map_or(cursor, |r| r.0);
            write_cursor(dir, &sink.name, (last, last_seal))
                .map_err(|e| format!("cannot write the cursor in {}: {e}", dir.display()))?;
            Ok((last, last_seal))
        });
        match result {
            Ok((last, last_seal)) => {
                sealed = last_seal;
                sink.cursor.store(last, Ordering::Release);
                if failing_since.take().is_some() {
                    tracing::info!(sink = %sink.name, after = last, "audit sink delivers again");
                    *sink.error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(sink = %sink.name, error = %e, after = cursor, "audit sink cannot deliver; retrying every second");
                    failing_since = Some(Instant::now());
                }
                *sink.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                if stopping {
                    tracing::warn!(sink = %sink.name, after = cursor, "audit sink stopped behind; it goes on from its cursor at the next start");
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A stored record: sequence number and bytes.
type Entry = (u64, Vec<u8>);

/// Up to [`BATCH`] records after `cursor` up to `head`, and the seals
/// after `sealed` up to the last of them: a seal is made after the record
/// it covers is durable, so it may cover a record delivered before.
fn batch(store: &Store, cursor: u64, head: u64, sealed: u64) -> Result<(Vec<Entry>, Vec<Entry>), String> {
    let mut records = Vec::new();
    for entry in store.audit_scan(AuditKind::Record, cursor.saturating_add(1), false) {
        let (seq, bytes) = entry.map_err(|e| format!("reading the audit log: {e}"))?;
        if seq > head || records.len() >= BATCH {
            break;
        }
        records.push((seq, bytes));
    }
    let (Some(first), Some(last)) = (records.first().map(|r| r.0), records.last().map(|r| r.0)) else {
        return Ok((records, Vec::new()));
    };
    let mut seals = Vec::new();
    for entry in store.audit_scan(AuditKind::Seal, first.min(sealed.saturating_add(1)), false) {
        let (seq, bytes) = entry.map_err(|e| format!("reading the audit log's seals: {e}"))?;
        if seq > last {
            break;
        }
        seals.push((seq, bytes));
    }
    Ok((records, seals))
}

/// Seals covering records after `sealed` up to `cursor` (already
/// delivered records).
fn late_seals(store: &Store, sealed: u64, cursor: u64) -> Result<Vec<Entry>, String> {
    let mut seals = Vec::new();
    for entry in store.audit_scan(AuditKind::Seal, sealed.saturating_add(1), false) {
        let (seq, bytes) = entry.map_err(|e| format!("reading the audit log's seals: {e}"))?;
        if seq > cursor {
            break;
        }
        seals.push((seq, bytes));
    }
    Ok(seals)
}

fn shipped(records: &[Entry], seals: Vec<Entry>) -> Vec<Shipped<'_>> {
    let mut seals = seals.into_iter().peekable();
    records
        .iter()
        .map(|(seq, bytes)| {
            let outcome = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v["outcome"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "error".into());
            let mut mine = Vec::new();
            while let Some(s) = seals.next_if(|(s, _)| s <= seq) {
                mine.push(s);
            }
            Shipped { seq: *seq, hash: hex(&Sha256::digest(bytes)), bytes, outcome, seals: mine }
        })
        .collect()
}

/// A record's bytes as text (they are JSON the daemon wrote; anything
/// else is shipped with its bad bytes replaced, and `verify` reports it).
fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const HEAD: &str = "socket = \"/run/k.sock\"\nstore = \"/var/lib/k\"\n[hsm]\nmodule = \"m.so\"\n\
                        token_label = \"t\"\npin_file = \"/etc/k/pin\"\n";

    fn parse(sinks: &str) -> Result<Config, String> {
        Config::parse(&format!("{HEAD}{sinks}"), Path::new("/etc/keyhaven/keyhaven.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sinks_parse_with_their_defaults() {
        let c = parse(
            "[[audit.sink]]\ntype = \"file\"\npath = \"/var/log/k/audit.jsonl\"\n\
             [[audit.sink]]\ntype = \"syslog\"\non_lag = \"wait\"\nmax_lag = 5\n\
             [[audit.sink]]\ntype = \"journald\"\n",
        )
        .unwrap();
        let s = &c.audit.sinks;
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].name(), s[0].max_bytes, s[0].keep, s[0].on_lag),
            ("file".into(), 100 << 20, 10, super::OnLag::Continue)
        );
        assert_eq!(
            (s[1].name(), s[1].on_lag, s[1].max_lag, s[1].wait_ms),
            ("syslog".into(), super::OnLag::Wait, 5, 2000)
        );
        assert_eq!(s[2].path, None);
        assert!(parse("").unwrap().audit.sinks.is_empty());
    }

    #[test]
    fn bad_sinks_are_refused_naming_the_key() {
        for (bad, names) in [
            ("type = \"kafka\"\n", "unknown variant `kafka`"),
            ("type = \"file\"\n", "a file sink needs `path`"),
            ("type = \"file\"\npath = \"rel/a.log\"\n", "not an absolute path"),
            ("type = \"syslog\"\nmax_bytes = 10\n", "audit.sink.max_bytes"),
            ("type = \"syslog\"\nkeep = 0\n", "audit.sink.keep"),
            ("type = \"syslog\"\nmax_lag = 0\n", "audit.sink.max_lag"),
            ("type = \"syslog\"\nwait_ms = 60001\n", "audit.sink.wait_ms"),
            ("type = \"syslog\"\non_lag = \"block\"\n", "unknown variant `block`"),
            ("type = \"syslog\"\nname = \"../x\"\n", "audit.sink.name"),
            ("type = \"syslog\"\ncolour = 1\n", "unknown field `colour`"),
            ("type = \"syslog\"\n[[audit.sink]]\ntype = \"syslog\"\n", "two sinks are named `syslog`"),
        ] {
            let err = parse(&format!("[[audit.sink]]\n{bad}")).expect_err(bad);
            assert!(err.contains(names), "{bad:?} -> {err}");
        }
    }

    /// Sinks with the audit log turned off would ship nothing: refused, not
    /// silently ignored.
    #[test]
    fn sinks_without_an_audit_log_are_refused() {
        // Only a dev install may turn the log off.
        let dev = |more: &str| {
            Config::parse(&format!("mode = \"dev\"\n{HEAD}{more}"), Path::new("/tmp/k.toml"))
                .map_err(|e| e.to_string())
        };
        let err = dev("[audit]\nenabled = false\n[[audit.sink]]\ntype = \"journald\"\n").unwrap_err();
        assert!(err.contains("audit.sink") && err.contains("enabled = false"), "{err}");
        let without = dev("[audit]\nenabled = false\n");
        assert!(without.is_ok(), "{without:?}");
    }
}
