//! The tamper-evident audit log (docs/AUDIT.md is the normative
//! construction).
//!
//! Every request leaves one record: who, what, on which key, and how it
//! ended. Records form a SHA-256 hash chain (each holds the hash of the
//! bytes of the one before), and a flusher thread seals the chain head with
//! an HMAC computed in the token by the audit key, at most every
//! `seal_interval_ms` or `seal_every` records, and at shutdown.
//!
//! A record is durable before the response it records is sent: [`Audit::
//! record`] returns once a flush that covers it has finished. Concurrent
//! requests share flushes (group commit): the flusher takes everything
//! written since its last flush, flushes once, and wakes every waiter.
//! When the audit cannot be written, the request fails (fail closed).
//!
//! When a flush fails (a full disk), the log is *failing*: the requests of
//! that round fail with the error (their results withheld), and until a
//! flush succeeds again new requests are refused before they run
//! ([`Audit::refuse_while_failing`]), so that nothing takes effect that
//! cannot be recorded and the frames waiting in memory do not grow. The
//! flusher tries the write again every [`RETRY_EVERY`] on its own, so
//! the log recovers by itself once there is room; it then records how many
//! requests were refused meanwhile, in one alert record (docs/AUDIT.md §4).

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyhaven::envelope::Envelope;
use keyhaven::wire::{
    AuditCaller, AuditExport, AuditExportResponse, AuditProblem, AuditRead, AuditReadResponse, AuditRecord,
    AuditUnsealed, AuditVerifyResponse,
};
use keyhaven::{EncryptionContext, KeyPath};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::audit_sinks::Sinks;
use crate::config::AuditSection;
use crate::error::Error;
use crate::hsm::anchor::AnchorKind;
use crate::hsm::Hsm;
use crate::identity::Caller;
use crate::store::{AuditKind, Store, StoreError};

/// Domain separation of the seal's HMAC input (docs/AUDIT.md §3).
pub const SEAL_CONTEXT: &[u8] = b"keyhaven-audit-seal-v1\0";

/// Domain separation of the signed head (docs/AUDIT.md §3.3).
pub const HEAD_CONTEXT: &[u8] = b"keyhaven-audit-head-v1\0";

/// What a request was about, filled in as dispatch understands it. Holds
/// names, versions and ids only: never a secret or a context value.
#[derive(Default, Debug)]
pub struct Subject {
    /// Tenant.
    pub tenant: Option<String>,
    /// Key name.
    pub key: Option<String>,
    /// Key version.
    pub version: Option<u32>,
    /// Envelope id, hex.
    pub envelope_id: Option<String>,
    /// Names of the encryption context's entries.
    pub context_keys: Vec<String>,
    /// Set when the policy was consulted for the request.
    pub checked: bool,
    /// What a state change did, for the record (docs/AUDIT.md §2.1).
    pub change: Change,
}

/// What a state change did: its reason, the state before and after (only
/// names, versions, states and times: never key material), and a note.
/// Filled in by the handler as it learns it; a request refused early
/// carries what was known by then.
#[derive(Default, Debug)]
pub struct Change {
    /// Why (`reason` in the record).
    pub reason: Option<String>,
    /// The state before (`before`).
    pub before: Option<serde_json::Value>,
    /// The state after (`after`).
    pub after: Option<serde_json::Value>,
    /// A note for people (`detail`), such as a break-glass lift.
    pub detail: Option<String>,
}

impl Subject {
    /// Notes the key concerned.
    pub fn key(&mut self, path: &KeyPath) {
        self.tenant = Some(path.tenant().to_owned());
        self.key = Some(path.key().to_owned());
    }

    /// Notes an envelope's key, version and id (as the envelope claims them).
    pub fn envelope(&mut self, env: &Envelope) {
        self.key(env.path());
        self.version = Some(env.key_version());
        self.envelope_id = Some(env.id().to_string());
    }

    /// Notes the context's keys, never its values.
    pub fn context(&mut self, ctx: &EncryptionContext) {
        self.context_keys = ctx.keys().map(str::to_owned).collect();
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A seal over the chain head (docs/AUDIT.md §3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seal {
    /// The sequence number of the sealed head.
    pub seq: u64,
    /// SHA-256 of that record's bytes, hex.
    pub head: String,
    /// When the seal was made, Unix milliseconds.
    pub time_ms: u64,
    /// HMAC-SHA256 under the audit key of [`seal_input`], hex.
    pub mac: String,
    /// ECDSA P-256 signature by the audit signing key of SHA-256 of
    /// [`head_message`], DER, hex (docs/AUDIT.md §3.3). Absent on seals
    /// made before the signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// The bytes the seal's HMAC covers: context, seq (8 bytes big-endian),
/// head (32 bytes), time_ms (8 bytes big-endian).
pub fn seal_input(seq: u64, head: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SEAL_CONTEXT.len() + 48);
    v.extend_from_slice(SEAL_CONTEXT);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(head);
    v.extend_from_slice(&time_ms.to_be_bytes());
    v
}

/// The message the audit signing key signs (docs/AUDIT.md §3.3): context,
/// seq (8 bytes big-endian), head (32 bytes), time_ms (8 bytes
/// big-endian). The token signs its SHA-256 digest with ECDSA P-256.
pub fn head_message(seq: u64, head: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEAD_CONTEXT.len() + 48);
    v.extend_from_slice(HEAD_CONTEXT);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(head);
    v.extend_from_slice(&time_ms.to_be_bytes());
    v
}

/// Makes the seal of record `seq` whose hash is `head`: its MAC and its
/// signature, both in the token, in one job.
fn make_seal(hsm: &Hsm, seq: u64, head: &[u8; 32]) -> Result<Seal, String> {
    let time_ms = now_ms();
    let input = seal_input(seq, head, time_ms);
    let digest: [u8; 32] = Sha256::digest(head_message(seq, head, time_ms)).into();
    let (mac, sig) = hsm
        .run_blocking(move |w| Ok((w.audit_mac(&input)?, w.audit_sign(&digest)?)))
        .map_err(|e| e.to_string())?;
    Ok(Seal { seq, head: hex(head), time_ms, mac: hex(&mac), sig: Some(hex(&sig)) })
}

struct State {
    /// Last sequence number written.
    last: u64,
    /// SHA-256 of the last record's bytes.
    head: [u8; 32],
    /// Requests waiting for their record to be durable, in sequence
    /// order; the flusher answers each once (`Err`: the flush failed, why).
    waiting: Vec<oneshot::Sender<Result<(), Arc<str>>>>,
    /// Records appended since the last flush, to put in the store (by the
    /// flusher, in one go, before it answers their requests).
    batch: Vec<(u64, Vec<u8>)>,
    /// Set at shutdown.
    stop: bool,
    /// The flusher is waiting on the condition variable (appends notify it
    /// only then: a notification is a system call).
    idle: bool,
    /// The seal the sealer thread is to make next: the record it covers
    /// and that record's hash. Asked for by the flusher once the record is
    /// durable; one at a time.
    seal_wanted: Option<(u64, [u8; 32])>,
    /// A seal the sealer made (its bytes), or why it could not, for the
    /// flusher's next round to write.
    seal_made: Option<MadeSeal>,
    /// The newest durable seal, for the sealer to anchor in the token.
    anchor_wanted: Option<(u64, [u8; 32])>,
    /// Set by the flusher when it stops: the sealer finishes its job, if
    /// any, and stops.
    sealer_stop: bool,
}

/// A seal the sealer made: the record it covers, that record's hash, and
/// the seal's bytes or why it could not be made.
type MadeSeal = (u64, [u8; 32], Result<Vec<u8>, String>);

struct Log {
    store: Store,
    hsm: Arc<Hsm>,
    state: Mutex<State>,
    /// Wakes the flusher.
    wake: Condvar,
    /// Wakes the sealer.
    seal_wake: Condvar,
    seal_interval: Duration,
    seal_every: u64,
    /// `[audit] commit_gather_us`.
    commit_gather: Duration,
    /// The last record made durable (read by the sinks).
    durable: Arc<AtomicU64>,
    /// Set while flushes fail (see the module docs).
    failing: Mutex<Option<Failing>>,
    /// Whether `failing` is set: read by every request, without the lock.
    is_failing: std::sync::atomic::AtomicBool,
}

/// How often a failing log tries its write again.
pub const RETRY_EVERY: Duration = Duration::from_millis(250);

/// The log while its flushes fail.
struct Failing {
    /// `no_space`, `read_only`, `io_error` or `unavailable` (as
    /// [`StoreError::condition`]).
    condition: &'static str,
    /// The last flush's error, naming the file.
    message: String,
    /// Since when (Unix ms).
    since_ms: u64,
    /// Requests refused before they ran since then.
    refused: u64,
    /// Whether a flush failed (else requests were refused only because
    /// this node of a cluster held no lease: [`Audit::refuse_unserved`]).
    flush: bool,
}

/// Why the audit log cannot be written now, for `health`.
#[derive(Clone, Debug)]
pub struct AuditFailure {
    /// As [`StoreError::condition`].
    pub condition: &'static str,
    /// The last write's error, naming the file.
    pub message: String,
    /// Requests refused before they ran since the log began failing.
    pub refused: u64,
}

/// The audit log, or nothing when `[audit] enabled = false`.
pub struct Audit {
    log: Option<Arc<Log>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    volume: Volume,
    /// Where the log is shipped (`[[audit.sink]]`).
    sinks: Sinks,
}

/// Decryptions counted per uid and per tenant in fixed one-minute windows,
/// for the unusual-volume alert.
struct Volume {
    per_minute: u64,
    hours: Option<[u8; 2]>,
    block: bool,
    counts: Mutex<VolumeCounts>,
}

#[derive(Default)]
struct VolumeCounts {
    minute: u64,
    by_uid: std::collections::HashMap<u32, u64>,
    by_tenant: std::collections::HashMap<String, u64>,
    /// uids already alerted for decrypting outside hours this minute.
    off_hours: std::collections::HashSet<u32>,
}

impl Volume {
    fn new(cfg: &AuditSection) -> Volume {
        Volume {
            per_minute: cfg.decrypt_alert_per_minute,
            hours: cfg.decrypt_hours_utc,
            block: cfg.decrypt_alert_block,
            counts: Mutex::new(VolumeCounts::default()),
        }
    }

    /// Counts one decryption; returns the alerts it raises (each once a
    /// minute per uid or tenant).
    fn count(&self, caller: &Caller, tenant: &str, now_ms: u64) -> Vec<String> {
        let mut alerts = Vec::new();
        let who = match &caller.user {
            Some(u) => format!("uid {} ({u})", caller.uid),
            None => format!("uid {}", caller.uid),
        };
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let minute = now_ms / 60_000;
        if c.minute != minute {
            *c = VolumeCounts { minute, ..Default::default() };
        }
        if self.per_minute > 0 {
            let n = c.by_uid.entry(caller.uid).or_default();
            *n += 1;
            if *n == self.per_minute + 1 {
                alerts.push(format!("{who} is over {} decryptions this minute", self.per_minute));
            }
            let n = c.by_tenant.entry(tenant.to_owned()).or_default();
            *n += 1;
            if *n == self.per_minute + 1 {
                alerts.push(format!("tenant `{tenant}` is over {} decryptions this minute", self.per_minute));
            }
        }
        if let Some([from, to]) = self.hours {
            if outside_hours(from, to, now_ms) && c.off_hours.insert(caller.uid) {
                let hour = now_ms / 3_600_000 % 24;
                alerts.push(format!("{who} decrypts at {hour:02}h UTC, outside {from:02}h-{to:02}h"));
            }
        }
        alerts
    }

    /// Whether the caller is over a limit now (for blocking).
    fn over(&self, caller: &Caller, tenant: &str, now_ms: u64) -> bool {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let over_rate = self.per_minute > 0
            && (c.by_uid.get(&caller.uid).is_some_and(|n| *n > self.per_minute)
                || c.by_tenant.get(tenant).is_some_and(|n| *n > self.per_minute));
        over_rate || self.hours.is_some_and(|[from, to]| outside_hours(from, to, now_ms))
    }
}

/// Whether `now_ms` falls outside the UTC hours `[from, to)` (which may
/// wrap past midnight: `[22, 6]`).
fn outside_hours(from: u8, to: u8, now_ms: u64) -> bool {
    let hour = (now_ms / 3_600_000 % 24) as u8;
    let inside = if from < to { (from..to).contains(&hour) } else { hour >= from || hour < to };
    !inside
}

impl Audit {
    /// Opens the log in `store` (continuing its chain) and starts the
    /// flusher thread; with `enabled = false`, a log that records nothing.
    /// Starts the sinks of `[[audit.sink]]` too, with their cursors in
    /// `state_dir/audit-sinks/`.
    pub fn open(
        store: Store,
        hsm: Arc<Hsm>,
        cfg: &AuditSection,
        state_dir: &Path,
    ) -> Result<Audit, StoreError> {
        if !cfg.enabled {
            tracing::warn!("the audit log is off ([audit] enabled = false): nothing is recorded");
            return Ok(Audit {
                log: None,
                flusher: Mutex::new(None),
                volume: Volume::new(cfg),
                sinks: Sinks::none(),
            });
        }
        let (mut last, mut head) = match newest(&store, AuditKind::Record) {
            Some((seq, bytes)) => (seq, Sha256::digest(&bytes).into()),
            None => (0, [0u8; 32]),
        };
        check_anchor(&store, &hsm, last)?;
        let mut sealed = match newest_valid_seal(&store, &hsm, last)? {
            Some((seq, h)) => {
                if seq > last {
                    // Records a seal covers are gone: carry on after the seal,
                    // so that the gap stays visible to `audit verify`.
                    tracing::error!(
                        "the audit log ends at record {last} but a seal covers record {seq}: \
                         records were removed; continuing at record {}",
                        seq.saturating_add(1)
                    );
                    (last, head) = (seq, h);
                }
                seq
            }
            None => 0,
        };
        if last > sealed {
            (last, head, sealed) = report_unsealed(&store, &hsm, sealed + 1, last, head)?;
        }
        // Here every record is sealed: `head` is the sealed head.
        let sealed_head = head;
        let durable = Arc::new(AtomicU64::new(last));
        let sinks = Sinks::start(&cfg.sinks, &store, state_dir, durable.clone())
            .map_err(|e| StoreError::Backend(format!("audit sinks: {e}")))?;
        let log = Arc::new(Log {
            store,
            hsm,
            state: Mutex::new(State {
                last,
                head,
                waiting: Vec::new(),
                batch: Vec::new(),
                stop: false,
                idle: false,
                seal_wanted: None,
                seal_made: None,
                anchor_wanted: None,
                sealer_stop: false,
            }),
            wake: Condvar::new(),
            seal_wake: Condvar::new(),
            seal_interval: Duration::from_millis(cfg.seal_interval_ms),
            seal_every: cfg.seal_every,
            commit_gather: Duration::from_micros(cfg.commit_gather_us),
            durable,
            failing: Mutex::new(None),
            is_failing: std::sync::atomic::AtomicBool::new(false),
        });
        let l = log.clone();
        let sealer = std::thread::Builder::new()
            .name("keyhaven-audit-seal".into())
            .spawn(move || l.sealer())
            .map_err(|e| StoreError::Backend(format!("cannot start the audit sealing thread: {e}")))?;
        let l = log.clone();
        let t = std::thread::Builder::new()
            .name("keyhaven-audit".into())
            .spawn(move || l.flusher(sealed, sealed_head, sealer))
            .map_err(|e| StoreError::Backend(format!("cannot start the audit thread: {e}")))?;
        Ok(Audit { log: Some(log), flusher: Mutex::new(Some(t)), volume: Volume::new(cfg), sinks })
    }

    /// Each sink's state (delivered, lag, lagging, error): for the metrics
    /// and `health` (docs/AUDIT.md §11).
    pub fn sink_status(&self) -> Vec<crate::audit_sinks::SinkStatus> {
        self.sinks.status()
    }

    /// Refuses a request before it runs while the log cannot be written
    /// (its last flush failed; see the module docs), naming why; the
    /// refusal is counted, and the count recorded once the log is written
    /// again. Dispatch does not record such a request: its record could
    /// not be written either.
    pub fn refuse_while_failing(&self) -> Result<(), Error> {
        let Some(log) = &self.log else { return Ok(()) };
        if !log.is_failing.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut f = log.failing.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_mut() {
            None => Ok(()),
            Some(f) => {
                f.refused += 1;
                Err(Error::Audit(format!(
                    "{}; the request was refused without running, because its record could not be written \
                     (docs/AUDIT.md §4)",
                    f.message
                )))
            }
        }
    }

    /// Refuses a request before it runs because this node of a cluster
    /// holds no valid lease (`why`, docs/CLUSTER.md §5): its record would
    /// wait on a database the node cannot count on. Counted with the
    /// refusals of a failing log, and recorded with them in one alert
    /// record once the node serves again ([`Audit::serving_again`]).
    pub fn refuse_unserved(&self, why: StoreError) -> Error {
        if let Some(log) = &self.log {
            let mut f = log.failing.lock().unwrap_or_else(|e| e.into_inner());
            let f = f.get_or_insert_with(|| Failing {
                condition: why.condition(),
                message: why.to_string(),
                since_ms: now_ms(),
                refused: 0,
                flush: false,
            });
            f.refused += 1;
            log.is_failing.store(true, std::sync::atomic::Ordering::Release);
        }
        Error::Store(StoreError::Backend(format!(
            "{why}; refused without running, and counted in one alert record when the node serves again \
             (docs/CLUSTER.md §5)"
        )))
    }

    /// This node of a cluster serves again: the requests refused while it
    /// held no lease are recorded in one alert record (unless the log's own
    /// flush is failing: then the flusher does that when it recovers).
    /// Costs an atomic load when nothing was refused.
    pub fn serving_again(&self) {
        let Some(log) = &self.log else { return };
        if !log.is_failing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let unserved =
            log.failing.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|f| !f.flush);
        if unserved {
            log.recovered();
            let idle = std::mem::take(&mut log.state.lock().unwrap_or_else(|e| e.into_inner()).idle);
            if idle {
                log.wake.notify_one();
            }
        }
    }

    /// Why the log cannot be written now (its last flush failed), for
    /// `health`; `None` when it can (or the log is off).
    pub fn failure(&self) -> Option<AuditFailure> {
        let log = self.log.as_ref()?;
        let f = log.failing.lock().unwrap_or_else(|e| e.into_inner());
        f.as_ref().filter(|f| f.flush).map(|f| AuditFailure {
            condition: f.condition,
            message: f.message.clone(),
            refused: f.refused,
        })
    }

    /// Whether the log is on (`[audit] enabled`).
    pub fn enabled(&self) -> bool {
        self.log.is_some()
    }

    /// Waits while a sink with `on_lag = "wait"` is too far behind, and
    /// refuses once it has waited its `wait_ms` (docs/AUDIT.md §11).
    pub async fn admit(&self) -> Result<(), Error> {
        self.sinks.admit().await
    }

    /// Seals the head, flushes, and stops the flusher (at shutdown, before
    /// the HSM workers stop). Records asked for afterwards fail.
    pub fn stop(&self) {
        if let Some(log) = &self.log {
            log.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            log.wake.notify_all();
        }
        let t = self.flusher.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        // After the last flush: the sinks deliver what is durable, then stop.
        self.sinks.stop();
    }

    /// Counts a decryption on `tenant` for the unusual-volume alert
    /// (`[audit] decrypt_alert_per_minute`, `decrypt_hours_utc`): writes an
    /// alert record and a warning when it crosses a line, and refuses it
    /// when `decrypt_alert_block` is set and the caller or tenant is over.
    pub async fn watch_decrypt(&self, caller: &Caller, tenant: &str) -> Result<(), Error> {
        if self.volume.per_minute == 0 && self.volume.hours.is_none() {
            return Ok(());
        }
        let now = now_ms();
        for alert in self.volume.count(caller, tenant, now) {
            crate::metrics::alert_raised();
            tracing::warn!(%caller, tenant, "unusual volume: {alert}");
            if let Some(log) = &self.log {
                let rec = AuditRecord {
                    tenant: Some(tenant.to_owned()),
                    ..alert_record(audit_caller(caller), "alert", alert)
                };
                log.append(rec).await?;
            }
        }
        if self.volume.block && self.volume.over(caller, tenant, now) {
            return Err(Error::PermissionDenied(format!(
                "decryption by {caller} on tenant `{tenant}` refused: unusual volume ([audit] decrypt_alert_block)"
            )));
        }
        Ok(())
    }

    /// Records an act done outside the socket (an operator's command, such
    /// as `keyhavend accept-store`) as an `alert` record naming the uid that
    /// did it, and waits until it is durable.
    pub async fn operator_event(
        &self,
        op: &str,
        uid: u32,
        detail: String,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let Some(log) = &self.log else { return Ok(()) };
        let rec =
            AuditRecord { reason, ..alert_record(AuditCaller { uid, ..AuditCaller::default() }, op, detail) };
        log.append(rec).await
    }

    /// Records one request and waits until the record is durable. An
    /// error means the record may be lost: the caller must not answer with
    /// the request's result.
    pub async fn record<T>(
        &self,
        caller: &Caller,
        op: &str,
        subject: Subject,
        result: &Result<T, Error>,
    ) -> Result<(), Error> {
        let Some(log) = &self.log else { return Ok(()) };
        let (outcome, code) = match result {
            Ok(_) => ("ok", None),
            Err(e @ Error::PermissionDenied(_)) => ("denied", Some(e.code().as_str().to_owned())),
            Err(e) => ("error", Some(e.code().as_str().to_owned())),
        };
        let rec = AuditRecord {
            seq: 0,
            time_ms: 0,
            prev: String::new(),
            caller: audit_caller(caller),
            op: crate::text::printable(op),
            tenant: subject.tenant,
            key: subject.key,
            version: subject.version,
            envelope_id: subject.envelope_id,
            context_keys: subject.context_keys,
            outcome: outcome.to_owned(),
            code,
            detail: subject.change.detail,
            unsealed: None,
            actor: None,
            reason: subject.change.reason,
            before: subject.change.before,
            after: subject.change.after,
        };
        log.append(rec).await
    }

    /// Records a state change the daemon made on its own (an automatic
    /// rotation, a scheduled deletion: `actor` [`DAEMON_ACTOR`]) or on a
    /// signal (`signal`), docs/AUDIT.md §2.1: `caller` is the daemon's
    /// process. Waits until durable; an error means the record may be lost.
    pub async fn daemon_event(
        &self,
        op: &str,
        actor: &str,
        subject: Subject,
        outcome: Result<(), &Error>,
    ) -> Result<(), Error> {
        let Some(log) = &self.log else { return Ok(()) };
        let (outcome, code) = match outcome {
            Ok(()) => ("ok", None),
            Err(e) => ("error", Some(e.code().as_str().to_owned())),
        };
        let rec = AuditRecord {
            tenant: subject.tenant,
            key: subject.key,
            version: subject.version,
            envelope_id: subject.envelope_id,
            outcome: outcome.to_owned(),
            code,
            actor: Some(actor.to_owned()),
            reason: subject.change.reason,
            before: subject.change.before,
            after: subject.change.after,
            detail: subject.change.detail,
            ..alert_record(daemon_caller(), op, String::new())
        };
        log.append(rec).await
    }
}

/// The `actor` of the records of the daemon's own work.
pub const DAEMON_ACTOR: &str = "daemon";

/// The daemon's own process as an audit caller.
fn daemon_caller() -> AuditCaller {
    AuditCaller {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        user: None,
        groups: Vec::new(),
        pid: i32::try_from(std::process::id()).ok(),
        exe: std::env::current_exe().ok().map(|p| p.display().to_string()),
        cgroup: None,
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An alert record (outcome `alert`) of `op` by `caller`, saying `detail`;
/// its place in the chain is filled in when it is appended.
fn alert_record(caller: AuditCaller, op: &str, detail: String) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time_ms: 0,
        prev: String::new(),
        caller,
        op: op.into(),
        tenant: None,
        key: None,
        version: None,
        envelope_id: None,
        context_keys: Vec::new(),
        outcome: "alert".into(),
        code: None,
        detail: Some(detail),
        unsealed: None,
        actor: None,
        reason: None,
        before: None,
        after: None,
    }
}

fn audit_caller(c: &Caller) -> AuditCaller {
    AuditCaller {
        uid: c.uid,
        gid: c.gid,
        user: c.user.clone(),
        groups: c.groups.iter().map(|g| g.gid).filter(|g| *g != c.gid).collect(),
        pid: c.pid,
        exe: c.exe.as_ref().map(|p| p.display().to_string()),
        cgroup: c.cgroup.clone(),
    }
}

/// Gives `rec` its place in the chain (sequence number, time, link) and
/// adds it to the next flush's batch.
fn chain(st: &mut State, rec: &mut AuditRecord) -> Result<(), Error> {
    rec.seq =
        st.last.checked_add(1).ok_or_else(|| Error::Audit("the sequence numbers are used up".into()))?;
    rec.time_ms = now_ms();
    rec.prev = hex(&st.head);
    let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Internal(format!("audit record: {e}")))?;
    st.last = rec.seq;
    st.head = Sha256::digest(&bytes).into();
    st.batch.push((rec.seq, bytes));
    Ok(())
}

impl Log {
    async fn append(&self, mut rec: AuditRecord) -> Result<(), Error> {
        let durable = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.stop {
                return Err(Error::Audit("the daemon is stopping".into()));
            }
            chain(&mut st, &mut rec)?;
            let (tx, rx) = oneshot::channel();
            st.waiting.push(tx);
            (rx, std::mem::take(&mut st.idle))
        };
        let (durable, idle) = durable;
        if idle {
            self.wake.notify_one();
        }
        match durable.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(Error::Audit(format!(
                "{why}; the record of the request could not be written, so its result is withheld \
                 (docs/AUDIT.md §4)"
            ))),
            Err(_) => Err(Error::Audit("the audit thread has stopped".into())),
        }
    }

    /// The flusher: one flush for every batch of records written since the
    /// last one (each waiting request is woken once, after the flush that
    /// covers its record), until stopped. When a seal is due it asks the
    /// sealer thread for one over the newest durable record and writes it
    /// in a later round, so that no round waits for the token (on a network
    /// HSM a seal and an anchor are several round trips); at the stop it
    /// seals and anchors the head itself, after the sealer has stopped.
    fn flusher(&self, mut sealed: u64, mut sealed_head: [u8; 32], sealer: JoinHandle<()>) {
        let mut sealer = Some(sealer);
        let mut sealed_at = Instant::now();
        // Whether a seal was asked of the sealer and not yet written.
        let mut in_flight = false;
        // The last seal given to the sealer to anchor in the token (none
        // yet: the first round anchors the seal it started from).
        let mut anchored = 0u64;
        // When the last round started, and how many records it served.
        let mut round_at = Instant::now();
        let mut round_records = 0;
        // While flushes fail: when the last one was tried.
        let mut failed_at: Option<Instant> = None;
        loop {
            let (last, head, stop, waiting, batch, made) = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let due = !in_flight
                        && st.last > sealed
                        && (sealed_at.elapsed() >= self.seal_interval || st.last - sealed >= self.seal_every);
                    // A failed flush is tried again on its own, so that
                    // the log recovers without a request.
                    let retry = failed_at.is_some_and(|t| t.elapsed() >= RETRY_EVERY);
                    if st.stop
                        || !st.waiting.is_empty()
                        || due
                        || retry
                        || !st.batch.is_empty()
                        || st.seal_made.is_some()
                    {
                        break;
                    }
                    let mut wait = if st.last > sealed && !in_flight {
                        self.seal_interval.saturating_sub(sealed_at.elapsed())
                    } else {
                        Duration::from_secs(3600)
                    };
                    if let Some(t) = failed_at {
                        wait = wait.min(RETRY_EVERY.saturating_sub(t.elapsed()));
                    }
                    st.idle = true;
                    st = self.wake.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0;
                    st.idle = false;
                }
                if st.stop && sealer.is_some() {
                    // The last round seals and anchors on this thread: the
                    // sealer finishes what it is doing and stops first.
                    st.sealer_stop = true;
                    self.seal_wake.notify_all();
                    drop(st);
                    if let Some(t) = sealer.take() {
                        let _ = t.join();
                    }
                    st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                }
                // Under load (the last round served more than
                // GATHER_AFTER records), let the records of requests still
                // on their way join this round: one `fdatasync` for more of
                // them, fewer rounds. With few clients, every round goes
                // at once.
                let left = self.commit_gather.saturating_sub(round_at.elapsed());
                if round_records > GATHER_AFTER && !st.stop && !left.is_zero() {
                    drop(st);
                    std::thread::sleep(left);
                    st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                }
                round_at = Instant::now();
                (
                    st.last,
                    st.head,
                    st.stop,
                    std::mem::take(&mut st.waiting),
                    std::mem::take(&mut st.batch),
                    st.seal_made.take(),
                )
            };
            round_records = batch.len();
            let mut put = Ok(());
            // A seal the sealer made covers a record of an earlier round:
            // it goes first, so that the frames stay in sequence order...
            if let Some((seq, h, made)) = made {
                in_flight = false;
                match made {
                    Ok(bytes) => {
                        put = self.store.audit_put(AuditKind::Seal, seq, &bytes);
                        crate::metrics::audit_sealed();
                        sealed = seq;
                        sealed_head = h;
                        sealed_at = Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!("cannot seal the audit log at record {seq}: {e}");
                        // Try again after an interval, not at once.
                        sealed_at = Instant::now();
                    }
                }
            }
            // ... then the round's records...
            for (seq, bytes) in &batch {
                if put.is_ok() {
                    put = self.store.audit_put(AuditKind::Record, *seq, bytes);
                }
            }
            // ... and at the stop the seal of the head, made here.
            if stop && last > sealed {
                match self.seal(last, &head) {
                    Ok(()) => {
                        crate::metrics::audit_sealed();
                        sealed = last;
                        sealed_head = head;
                    }
                    Err(e) => tracing::warn!("cannot seal the audit log at record {last}: {e}"),
                }
            }
            // All become durable in one write and one `fdatasync`.
            let flushed = put.and_then(|()| self.store.audit_flush());
            crate::metrics::audit_written(if flushed.is_ok() { batch.len() } else { 0 });
            let answer = match &flushed {
                Ok(()) => {
                    self.durable.store(last, std::sync::atomic::Ordering::Release);
                    if failed_at.take().is_some() {
                        self.recovered();
                    }
                    Ok(())
                }
                Err(e) => {
                    if failed_at.is_none() {
                        tracing::error!(
                            "cannot write the audit log: {e}; requests are refused, and the write tried again \
                             every {} ms, until it succeeds (docs/AUDIT.md §4, docs/OPERATIONS.md §7.1)",
                            RETRY_EVERY.as_millis()
                        );
                    }
                    failed_at = Some(Instant::now());
                    self.failed(e);
                    Err(Arc::<str>::from(e.to_string()))
                }
            };
            for w in waiting {
                let _ = w.send(answer.clone());
            }
            if flushed.is_err() {
                if stop {
                    return;
                }
                continue;
            }
            if stop {
                // A durable seal is anchored in the token (after the
                // answers: the anchor only ever trails the log).
                if sealed > anchored {
                    let text = AuditAnchor { seq: sealed, head: sealed_head }.encode();
                    if let Err(e) = self.hsm.run_blocking(move |w| w.write_anchor(AnchorKind::Audit, &text)) {
                        tracing::warn!(
                            "cannot anchor the audit log's seal of record {sealed} in the token: {e}"
                        );
                    }
                }
                return;
            }
            let ask_seal = !in_flight
                && last > sealed
                && (sealed_at.elapsed() >= self.seal_interval || last - sealed >= self.seal_every);
            let ask_anchor = sealed > anchored;
            if ask_seal || ask_anchor {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if ask_seal {
                    // `last` is durable now: the seal over it may be made.
                    st.seal_wanted = Some((last, head));
                    in_flight = true;
                }
                if ask_anchor {
                    st.anchor_wanted = Some((sealed, sealed_head));
                    anchored = sealed;
                }
                drop(st);
                self.seal_wake.notify_one();
            }
        }
    }

    /// The sealer: makes the seals the flusher asks for and anchors the
    /// durable ones in the token (docs/AUDIT.md §3.2, §4), off the
    /// flusher's path, until the flusher stops it.
    fn sealer(&self) {
        loop {
            let (seal, anchor) = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.sealer_stop {
                        return;
                    }
                    if st.seal_wanted.is_some() || st.anchor_wanted.is_some() {
                        break;
                    }
                    st = self.seal_wake.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                (st.seal_wanted.take(), st.anchor_wanted.take())
            };
            if let Some((seq, head)) = anchor {
                let text = AuditAnchor { seq, head }.encode();
                if let Err(e) = self.hsm.run_blocking(move |w| w.write_anchor(AnchorKind::Audit, &text)) {
                    // The next durable seal is anchored instead.
                    tracing::warn!("cannot anchor the audit log's seal of record {seq} in the token: {e}");
                }
            }
            if let Some((seq, head)) = seal {
                let made = make_seal(&self.hsm, seq, &head)
                    .and_then(|seal| serde_json::to_vec(&seal).map_err(|e| e.to_string()));
                self.state.lock().unwrap_or_else(|e| e.into_inner()).seal_made = Some((seq, head, made));
                self.wake.notify_one();
            }
        }
    }

    /// A flush failed with `e`: the log is failing (see the module docs).
    fn failed(&self, e: &StoreError) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_mut() {
            Some(f) => {
                f.condition = e.condition();
                f.message = e.to_string();
                f.flush = true;
            }
            None => {
                *f = Some(Failing {
                    condition: e.condition(),
                    message: e.to_string(),
                    since_ms: now_ms(),
                    refused: 0,
                    flush: true,
                });
                self.is_failing.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// A flush succeeded after failures: the log is not failing any more;
    /// the requests refused meanwhile are recorded in one alert record
    /// (made durable by the next round, at once).
    fn recovered(&self) {
        let was = {
            let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
            self.is_failing.store(false, std::sync::atomic::Ordering::Release);
            f.take()
        };
        let Some(was) = was else { return };
        let secs = now_ms().saturating_sub(was.since_ms) as f64 / 1000.0;
        tracing::warn!(
            "the audit log can be written again after {secs:.1} s; {} requests were refused meanwhile",
            was.refused
        );
        if was.refused == 0 {
            return;
        }
        let since = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(was.since_ms));
        let because = match was.flush {
            true => "the audit log could not be written",
            false => "this node of the cluster held no valid lease",
        };
        let mut rec = alert_record(
            daemon_caller(),
            "alert",
            format!(
                "{} requests were refused without running from {since} for {secs:.1} s, because {because} ({}); \
                 they are not recorded one by one",
                was.refused, was.message
            ),
        );
        rec.code = Some(keyhaven::ErrorCode::StoreUnavailable.as_str().to_owned());
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = chain(&mut st, &mut rec) {
            tracing::error!("cannot record the requests refused while the audit log failed: {e}");
        }
    }

    fn seal(&self, seq: u64, head: &[u8; 32]) -> Result<(), String> {
        let seal = make_seal(&self.hsm, seq, head)?;
        let bytes = serde_json::to_vec(&seal).map_err(|e| e.to_string())?;
        self.store.audit_put(AuditKind::Seal, seq, &bytes).map_err(|e| e.to_string())
    }
}

/// Reports records `from..=to`, which no valid seal covers at start (docs/
/// AUDIT.md §4): a warning, then an alert record that names them (the
/// `unsealed` field), which is made durable and then sealed. Only then may
/// anything seal over them. Returns the new last record, its hash, and the
/// last sealed record.
fn report_unsealed(
    store: &Store,
    hsm: &Hsm,
    from: u64,
    to: u64,
    head: [u8; 32],
) -> Result<(u64, [u8; 32], u64), StoreError> {
    let range = if from == to { format!("record {from} is") } else { format!("records {from} to {to} are") };
    let seq =
        to.checked_add(1).ok_or_else(|| StoreError::Backend("audit sequence numbers used up".into()))?;
    let detail = format!(
        "{range} covered by no valid seal at start: written before the daemon stopped without sealing \
         them (a crash), or changed while it was stopped; nobody vouches for them"
    );
    tracing::warn!("audit log: {detail}; reported in alert record {seq}, which is sealed now");
    let rec = AuditRecord {
        seq,
        time_ms: now_ms(),
        prev: hex(&head),
        caller: daemon_caller(),
        unsealed: Some([from, to]),
        ..alert_record(AuditCaller::default(), "alert", detail)
    };
    let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Backend(format!("audit record: {e}")))?;
    let head: [u8; 32] = Sha256::digest(&bytes).into();
    store.audit_put(AuditKind::Record, seq, &bytes)?;
    // The alert first, on its own: it is durable before any seal covers it.
    store.audit_flush()?;
    let sealed = match make_seal(hsm, seq, &head) {
        Ok(seal) => {
            let b = serde_json::to_vec(&seal).map_err(|e| StoreError::Backend(format!("audit seal: {e}")))?;
            store.audit_put(AuditKind::Seal, seq, &b)?;
            store.audit_flush()?;
            seq
        }
        Err(e) => {
            tracing::warn!("cannot seal the audit log at record {seq}: {e}; the flusher tries again");
            from - 1
        }
    };
    Ok((seq, head, sealed))
}

/// The newest seal (the last one written) whose MAC verifies in the token
/// and whose head is the hash of the record it names, or that names a
/// record past the end of the log (a cut-off tail), as (seq, head). Seals
/// that fail are passed over with an error in the log (`audit verify`
/// reports them).
fn newest_valid_seal(store: &Store, hsm: &Hsm, last: u64) -> Result<Option<(u64, [u8; 32])>, StoreError> {
    for entry in store.audit_scan(AuditKind::Seal, u64::MAX, true) {
        let (seq, bytes) = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("the audit log is damaged: {e}; `keyhaven audit verify` reports it");
                continue;
            }
        };
        let decoded = serde_json::from_slice::<Seal>(&bytes)
            .ok()
            .filter(|s| s.seq == seq)
            .and_then(|s| Some((s.time_ms, unhex32(&s.head)?, unhex(&s.mac)?)));
        let Some((time_ms, head, mac)) = decoded else {
            tracing::error!("the audit log's seal of record {seq} does not decode; passed over");
            continue;
        };
        let input = seal_input(seq, &head, time_ms);
        let ok = hsm.run_blocking(move |w| w.audit_mac_ok(&input, &mac)).map_err(|e| {
            StoreError::Backend(format!("checking the audit log's seal of record {seq} in the token: {e}"))
        })?;
        if !ok {
            tracing::error!(
                "the audit log's seal of record {seq} does not verify under the audit key (forged or \
                 altered); passed over"
            );
            continue;
        }
        if seq > last {
            return Ok(Some((seq, head)));
        }
        match store.audit_scan(AuditKind::Record, seq, true).find_map(Result::ok) {
            Some((s, b)) if s == seq && <[u8; 32]>::from(Sha256::digest(&b)) == head => {
                return Ok(Some((seq, head)))
            }
            _ => tracing::error!(
                "the audit log's seal of record {seq} does not match record {seq}: a record up to \
                 {seq} was changed; passed over"
            ),
        }
    }
    Ok(None)
}

/// The audit log's anchor in the token (docs/AUDIT.md §4): the last seal
/// that was durable, by record and head. The log may run ahead of it (a
/// stop before the anchor's write), never behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditAnchor {
    /// The sealed record (0: nothing anchored, as after `accept-store`).
    pub seq: u64,
    /// The chain head at it: SHA-256 of that record.
    pub head: [u8; 32],
}

impl AuditAnchor {
    /// Text form: `khaudit1 SEQ HEAD`.
    pub fn encode(&self) -> String {
        format!("khaudit1 {} {}", self.seq, hex(&self.head))
    }

    /// Parses [`encode`](Self::encode)'s form.
    pub fn decode(text: &str) -> Result<AuditAnchor, StoreError> {
        let bad = || StoreError::Tampered(format!("the token's audit anchor does not parse: {text:?}"));
        let parts: Vec<&str> = text.split(' ').collect();
        let ["khaudit1", seq, head] = parts.as_slice() else { return Err(bad()) };
        Ok(AuditAnchor { seq: seq.parse().map_err(|_| bad())?, head: unhex32(head).ok_or_else(bad)? })
    }
}

/// At start: the log must still hold the record the token's anchor names,
/// with the same hash. A log cut back before it, or any copy in which that
/// record differs (an older log, or one rewritten and relinked after it),
/// is refused: `audit verify` could not tell, since the seals went with it.
fn check_anchor(store: &Store, hsm: &Hsm, last: u64) -> Result<(), StoreError> {
    let text = hsm
        .run_blocking(|w| w.read_anchor(AnchorKind::Audit))
        .map_err(|e| StoreError::Backend(format!("cannot read the audit log's anchor in the token: {e}")))?;
    let Some(anchor) = text.as_deref().map(AuditAnchor::decode).transpose()? else { return Ok(()) };
    if anchor.seq == 0 {
        return Ok(());
    }
    let accept = "If you restored the store and its audit log from a backup on purpose, run \
                  `keyhavend accept-store --reason TEXT` (docs/OPERATIONS.md §7)";
    match store.audit_scan(AuditKind::Record, anchor.seq, true).find_map(Result::ok) {
        Some((s, b)) if s == anchor.seq && <[u8; 32]>::from(Sha256::digest(&b)) == anchor.head => Ok(()),
        Some((s, _)) if s == anchor.seq => Err(StoreError::Tampered(format!(
            "audit record {s} is not the record that was sealed and anchored in the token: the log was \
             replaced or rewritten after it. {accept}"
        ))),
        _ => Err(StoreError::Tampered(format!(
            "the audit log ends at record {last}, but record {} was sealed and anchored in the token: the \
             log was cut back or replaced by an older copy. {accept}",
            anchor.seq
        ))),
    }
}

/// A round that served more records than this makes the next one gather
/// (`[audit] commit_gather_us`).
const GATHER_AFTER: usize = 8;

/// The newest entry of `kind` that can be read, passing over (with an
/// error in the log) damage that `audit verify` will report.
fn newest(store: &Store, kind: AuditKind) -> Option<(u64, Vec<u8>)> {
    for entry in store.audit_scan(kind, u64::MAX, true) {
        match entry {
            Ok(e) => return Some(e),
            Err(e) => tracing::error!("the audit log is damaged: {e}; `keyhaven audit verify` reports it"),
        }
    }
    None
}

/// Largest `audit_read` answer, in bytes of records (frames hold 1 MiB).
const READ_BUDGET: usize = 512 * 1024;

/// `audit_read`: matching records, oldest first, cut to fit a frame.
pub fn read(store: &Store, req: &AuditRead) -> Result<AuditReadResponse, Error> {
    let since_ms = req.since.map(|s| s.saturating_mul(1000));
    let matches = |r: &AuditRecord| {
        req.tenant.as_ref().is_none_or(|t| r.tenant.as_ref() == Some(t))
            && since_ms.is_none_or(|s| r.time_ms >= s)
    };
    let corrupt = |seq: u64, reason: String| {
        Error::Store(StoreError::Corrupt { key: format!("audit record {seq}"), reason })
    };
    let decode = |seq: u64, bytes: &[u8]| {
        serde_json::from_slice::<AuditRecord>(bytes).map_err(|e| corrupt(seq, e.to_string()))
    };
    // With `raw`, the stored bytes go along, counted in the frame budget.
    let mut lines = req.raw.then(Vec::new);
    let mut keep = |seq: u64, bytes: Vec<u8>, records: &mut Vec<AuditRecord>, r: AuditRecord| {
        let mut size = bytes.len();
        if let Some(lines) = lines.as_mut() {
            size *= 2;
            lines.push(String::from_utf8(bytes).map_err(|_| corrupt(seq, "not UTF-8".into()))?);
        }
        records.push(r);
        Ok::<usize, Error>(size)
    };
    let after = req.after.unwrap_or(0);
    let mut records = Vec::new();
    let mut size = 0;
    let mut more = false;
    // With `last`, the newest record in the log (matching or not): the
    // answer's `next`, so that reading on from it prints only what comes.
    let mut newest = after;
    if let Some(last) = req.last {
        let want = last.min(10_000) as usize;
        for entry in store.audit_scan(AuditKind::Record, u64::MAX, true) {
            let (seq, bytes) = entry?;
            newest = newest.max(seq);
            if seq <= after || records.len() >= want {
                break;
            }
            if size > READ_BUDGET {
                more = true;
                break;
            }
            let r = decode(seq, &bytes)?;
            if since_ms.is_some_and(|s| r.time_ms < s) {
                break;
            }
            if matches(&r) {
                size += keep(seq, bytes, &mut records, r)?;
            }
        }
        records.reverse();
        if let Some(lines) = lines.as_mut() {
            lines.reverse();
        }
    } else {
        for entry in store.audit_scan(AuditKind::Record, after.saturating_add(1), false) {
            let (seq, bytes) = entry?;
            if size > READ_BUDGET {
                more = true;
                break;
            }
            let r = decode(seq, &bytes)?;
            if matches(&r) {
                size += keep(seq, bytes, &mut records, r)?;
            }
        }
    }
    let next = records.last().map_or(after, |r| r.seq).max(newest);
    Ok(AuditReadResponse { records, next, more, lines, node: None, chains: Vec::new() })
}

/// Ops whose records name an envelope id they were only given to revoke.
const REVOKING_OPS: &[&str] = &["revoke", "revoke_lift", "destroy"];

/// Whether a record of the audit log (of every chain in `chains`, or this
/// daemon's log when none is given) names envelope `id` as one that was
/// made or used: `revoke datakey`'s check for a mistyped id. Searched
/// newest first, the chains in turn (an entry of each, so that an envelope
/// made or used lately on any node is found in the first page of its
/// chain, however long the other chains are), for at most `budget`;
/// `None` when the time ran out first. Damaged entries are passed over
/// (`audit_verify` names them).
pub fn envelope_seen(store: &Store, chains: &[String], id: &str, budget: Duration) -> Option<bool> {
    let until = Instant::now() + budget;
    let needle = format!("\"envelope_id\":\"{id}\"");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut scans: Vec<crate::store::AuditIter<'_>> = Vec::new();
    if chains.is_empty() {
        scans.push(store.audit_scan(AuditKind::Record, u64::MAX, true));
    } else {
        for c in chains {
            scans.push(store.backend().audit_scan_chain(c, AuditKind::Record, u64::MAX, true));
        }
    }
    // One chain after the other read every other node's whole chain
    // before the last one's newest entry (docs/CLUSTER.md §4).
    let mut n = 0usize;
    while !scans.is_empty() {
        let mut i = 0;
        while i < scans.len() {
            let Some(entry) = scans[i].next() else {
                drop(scans.remove(i));
                continue;
            };
            i += 1;
            if n % 1024 == 0 && Instant::now() > until {
                return None;
            }
            n += 1;
            let Ok((_, bytes)) = entry else { continue };
            if finder.find(&bytes).is_none() {
                continue;
            }
            let op = serde_json::from_slice::<AuditRecord>(&bytes).map(|r| r.op).unwrap_or_default();
            if !REVOKING_OPS.contains(&op.as_str()) {
                return Some(true);
            }
        }
    }
    Some(false)
}

/// `audit_export`: records as stored and the seals after the records they
/// cover, oldest first, cut to fit a frame (docs/AUDIT.md §7).
pub fn export(store: &Store, req: &AuditExport) -> Result<AuditExportResponse, Error> {
    let since_ms = req.since.map(|s| s.saturating_mul(1000));
    let after = req.after.unwrap_or(0);
    let mut records = Vec::new();
    let mut size = 0;
    let mut more = false;
    for entry in store.audit_scan(AuditKind::Record, after.saturating_add(1), false) {
        let (seq, bytes) = entry?;
        if size > READ_BUDGET {
            more = true;
            break;
        }
        if records.is_empty() {
            if let Some(since) = since_ms {
                let r = serde_json::from_slice::<AuditRecord>(&bytes).map_err(|e| {
                    Error::Store(StoreError::Corrupt {
                        key: format!("audit record {seq}"),
                        reason: e.to_string(),
                    })
                })?;
                if r.time_ms < since {
                    continue;
                }
            }
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            Error::Store(StoreError::Corrupt {
                key: format!("audit record {seq}"),
                reason: "not UTF-8: it was altered".into(),
            })
        })?;
        size += text.len();
        records.push((seq, text));
    }
    let (Some(first), Some(last)) = (records.first().map(|r| r.0), records.last().map(|r| r.0)) else {
        return Ok(AuditExportResponse { lines: Vec::new(), next: after, more: false });
    };
    let mut seals: Vec<(u64, String)> = Vec::new();
    for entry in store.audit_scan(AuditKind::Seal, first, false) {
        let (seq, bytes) = entry?;
        if seq > last {
            break;
        }
        seals.push((seq, format!("{{\"seal\":{}}}", String::from_utf8_lossy(&bytes))));
    }
    let mut lines = Vec::with_capacity(records.len() + seals.len());
    let mut seals = seals.into_iter().peekable();
    for (seq, text) in records {
        lines.push(text);
        while let Some((_, seal)) = seals.next_if(|(s, _)| *s <= seq) {
            lines.push(seal);
        }
    }
    lines.extend(seals.map(|(_, s)| s));
    Ok(AuditExportResponse { lines, next: last, more })
}

/// A seal to check in the token.
#[derive(Clone)]
pub struct SealCheck {
    /// The record it covers.
    pub seq: u64,
    /// The HMAC input ([`seal_input`]).
    pub input: Vec<u8>,
    /// The MAC.
    pub mac: Vec<u8>,
    /// SHA-256 of [`head_message`] and the DER signature, when signed.
    pub signed: Option<([u8; 32], Vec<u8>)>,
}

/// What the chain walk found, before the seals' MACs are checked in the HSM.
pub struct Walk {
    /// Records walked.
    pub records: u64,
    /// The first problem of the chain itself.
    pub problem: Option<AuditProblem>,
    /// Seals whose head matches the chain, to check in the token.
    pub seals: Vec<SealCheck>,
    /// Number of seals.
    pub seal_count: u64,
    /// Highest sealed sequence number (seals that go back are not counted).
    pub last_sealed: Option<u64>,
    /// Records reported at a start as covered by no valid seal.
    pub unsealed: Vec<AuditUnsealed>,
    /// The first record kept by retention (docs/AUDIT.md §12), when the
    /// log no longer starts at record 1.
    pub first_kept: Option<u64>,
}

/// How the `unsealed` field of a record starts in its JSON (the daemon
/// writes it after `detail`; inside a string a quote is escaped).
const UNSEALED_FIELD: &[u8] = b",\"unsealed\":[";

fn problem(seq: u64, kind: &str, message: String) -> Option<AuditProblem> {
    Some(AuditProblem { seq, kind: kind.to_owned(), message })
}

/// 64 hex digits to 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let v = unhex(s)?;
    v.try_into().ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// Walks the whole chain and the seals (docs/AUDIT.md §5); blocking.
pub fn walk(store: &Store) -> Result<Walk, Error> {
    let mut seals = Vec::new();
    let mut seal_problem = None;
    for entry in store.audit_scan(AuditKind::Seal, 0, false) {
        let (seq, bytes) = match entry {
            Ok(e) => e,
            Err(StoreError::AuditFrame { seq, file, offset, reason }) => {
                let seq = seq.unwrap_or_else(|| seals.last().map_or(1, |s: &Seal| s.seq.saturating_add(1)));
                seal_problem = seal_problem.or(problem(
                    seq,
                    "bad_seal",
                    format!("the seal of record {seq} is not intact ({file}, offset {offset}: {reason})"),
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<Seal>(&bytes) {
            // Seals are written in the order of the chain: each covers a
            // later record than the one before it.
            Ok(s) if s.seq == seq => match seals.last() {
                Some(p) if p.seq == seq => {
                    seal_problem = seal_problem.or(problem(
                        seq,
                        "bad_seal",
                        format!("the seal of record {seq} appears twice: a copy was put in"),
                    ));
                }
                Some(p) if p.seq > seq => {
                    seal_problem = seal_problem.or(problem(
                        seq,
                        "bad_seal",
                        format!(
                            "the seal of record {seq} comes after the seal of record {}: seals never go \
                             back, this one was put in",
                            p.seq
                        ),
                    ));
                }
                _ => seals.push(s),
            },
            _ => {
                seal_problem = seal_problem.or(problem(
                    seq,
                    "bad_seal",
                    format!("the seal of record {seq} does not decode"),
                ));
            }
        }
    }
    let last_sealed = seals.last().map(|s| s.seq);
    let mut next_seal = 0;
    let mut signed_before = false;
    let mut out = Walk {
        records: 0,
        problem: None,
        seals: Vec::new(),
        seal_count: seals.len() as u64,
        last_sealed,
        unsealed: Vec::new(),
        first_kept: None,
    };
    let mut expected = 1u64;
    let mut prev = [0u8; 32];
    let mut first: Option<AuditProblem> = None;
    // After retention the chain starts at the boundary, which a retention
    // record in the chain must vouch for (docs/AUDIT.md §12).
    let boundary = match store.audit_files() {
        Some(f) => f.boundary()?,
        None => None,
    };
    let mut vouched = false;
    if let Some(b) = &boundary {
        out.first_kept = Some(b.first);
        expected = b.first;
        match unhex32(&b.prev) {
            Some(h) => prev = h,
            None => {
                first = problem(
                    b.first,
                    "altered",
                    "the retention boundary's hash does not decode: audit/boundary.json was altered".into(),
                )
            }
        }
    }
    for entry in store.audit_scan(AuditKind::Record, 0, false) {
        if let (Some(b), Ok((pos, _))) = (&boundary, &entry) {
            // Left over by a retention that stopped before it removed them.
            if *pos < b.first {
                continue;
            }
        }
        let (pos, bytes) = match entry {
            Ok(e) => e,
            // A frame that is not intact (its checksum, or not a frame at
            // all): the scan goes on after it.
            Err(StoreError::AuditFrame { seq, file, offset, reason }) => {
                out.records += 1;
                let seq = seq.unwrap_or(expected);
                if first.is_none() {
                    first = problem(
                        seq,
                        "altered",
                        format!("record {seq} was altered: {file}, offset {offset}: {reason}"),
                    );
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        out.records += 1;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if first.is_none() {
            if pos == 0 {
                first = problem(
                    0,
                    "inserted",
                    "position 0 holds a record: one was inserted before record 1".into(),
                );
            } else if pos < expected {
                // Entries come in the order they were written: one that
                // goes back was put in.
                first = problem(
                    expected,
                    "inserted",
                    format!("position {expected} holds a copy of record {pos}: a record was inserted"),
                );
            } else if pos > expected
                && store
                    .audit_scan(AuditKind::Record, expected, false)
                    .filter_map(Result::ok)
                    .any(|(s, _)| s == expected)
            {
                first = problem(
                    expected,
                    "reordered",
                    format!("record {pos} comes before record {expected}: records were reordered"),
                );
            } else if pos > expected {
                let range = if pos - 1 == expected {
                    format!("record {expected} is")
                } else {
                    format!("records {expected} to {} are", pos - 1)
                };
                // A daemon that found its tail cut off carries on after the
                // last seal, linking to the sealed head (see `Audit::open`).
                let resumed = seals.iter().find(|s| s.seq == pos - 1).is_some_and(|s| {
                    serde_json::from_slice::<AuditRecord>(&bytes).is_ok_and(|r| r.prev == s.head)
                });
                first = if resumed {
                    problem(
                        expected,
                        "truncated",
                        format!(
                            "{range} missing: the log was truncated after record {} (a seal covers record {})",
                            expected - 1,
                            pos - 1
                        ),
                    )
                } else {
                    problem(
                        expected,
                        "removed",
                        format!("{range} missing (removed); the log goes on at record {pos}"),
                    )
                };
            } else {
                match serde_json::from_slice::<AuditRecord>(&bytes) {
                    Err(_) => {
                        first =
                            problem(pos, "altered", format!("record {pos} does not decode: it was altered"));
                    }
                    Ok(r) if r.seq < pos => {
                        first = problem(
                            pos,
                            "inserted",
                            format!(
                                "position {pos} holds a copy of record {}: a record was inserted before it",
                                r.seq
                            ),
                        );
                    }
                    Ok(r) if r.seq > pos => {
                        let later = store
                            .audit_scan(AuditKind::Record, pos + 1, false)
                            .filter_map(Result::ok)
                            .any(|(_, b)| {
                                serde_json::from_slice::<AuditRecord>(&b).is_ok_and(|x| x.seq == pos)
                            });
                        first = if later {
                            problem(pos, "reordered", format!("position {pos} holds record {}, and record {pos} comes later: records were reordered", r.seq))
                        } else {
                            problem(
                                pos,
                                "removed",
                                format!(
                                    "record {pos} is missing (removed); position {pos} holds record {}",
                                    r.seq
                                ),
                            )
                        };
                    }
                    Ok(r)
                        if unhex32(&r.prev) != Some(prev)
                            && boundary.as_ref().is_some_and(|b| b.first == pos) =>
                    {
                        first = problem(
                            pos,
                            "altered",
                            format!(
                                "record {pos}, the first kept by retention, does not follow the hash the \
                                 retention boundary holds: it or the boundary was altered"
                            ),
                        );
                    }
                    Ok(r) if unhex32(&r.prev) != Some(prev) && pos == 1 => {
                        first =
                            problem(1, "altered", "record 1 does not start the chain: it was altered".into());
                    }
                    Ok(r) if unhex32(&r.prev) != Some(prev) => {
                        let before = pos - 1;
                        first = problem(before, "altered", format!("record {before} was altered (record {pos} holds another hash of it), or record {pos} was altered or inserted"));
                    }
                    Ok(_) => {}
                }
            }
        }
        // Seals of records before this one that were never reached: removed records.
        while next_seal < seals.len() && seals[next_seal].seq < pos {
            next_seal += 1;
        }
        if next_seal < seals.len() && seals[next_seal].seq == pos {
            let s = &seals[next_seal];
            match (unhex32(&s.head), unhex(&s.mac)) {
                (Some(head), Some(mac)) if head == hash => {
                    let signed = match s.sig.as_deref().map(unhex) {
                        // The daemon signs every seal since the signing key.
                        None if signed_before => {
                            seal_problem = seal_problem.or(problem(
                                pos,
                                "bad_seal",
                                format!(
                                    "the seal of record {pos} is not signed though an earlier seal is: its \
                                     signature was removed"
                                ),
                            ));
                            None
                        }
                        None => None,
                        Some(Some(sig)) => {
                            Some((Sha256::digest(head_message(pos, &head, s.time_ms)).into(), sig))
                        }
                        Some(None) => {
                            seal_problem = seal_problem.or(problem(
                                pos,
                                "bad_seal",
                                format!("the signature of the seal of record {pos} does not decode"),
                            ));
                            None
                        }
                    };
                    signed_before |= s.sig.is_some();
                    out.seals.push(SealCheck {
                        seq: pos,
                        input: seal_input(pos, &head, s.time_ms),
                        mac,
                        signed,
                    })
                }
                (Some(_), Some(_)) => {
                    let from = seals.get(next_seal.wrapping_sub(1)).map_or(1, |p| p.seq.saturating_add(1));
                    seal_problem = seal_problem.or(problem(pos, "altered", format!("the seal of record {pos} does not match the chain: a record from {from} to {pos} was altered")));
                }
                _ => {
                    seal_problem = seal_problem.or(problem(
                        pos,
                        "bad_seal",
                        format!("the seal of record {pos} does not decode"),
                    ))
                }
            }
            next_seal += 1;
        }
        // The alert a daemon wrote at start about records no seal covered.
        if bytes.windows(UNSEALED_FIELD.len()).any(|w| w == UNSEALED_FIELD) {
            if let Ok(AuditRecord { unsealed: Some([from, to]), time_ms, .. }) =
                serde_json::from_slice::<AuditRecord>(&bytes)
            {
                out.unsealed.push(AuditUnsealed { from, to, reported_in: pos, time_ms });
            }
        }
        if let Some(b) = &boundary {
            if !vouched
                && bytes
                    .windows(crate::retention::RETENTION_OP.len())
                    .any(|w| w == crate::retention::RETENTION_OP.as_bytes())
            {
                vouched = crate::retention::vouches_for(&bytes, b);
            }
        }
        prev = hash;
        expected = pos.saturating_add(1);
    }
    if let Some(b) = boundary.as_ref().filter(|_| !vouched) {
        first = first.or(problem(
            b.first,
            "removed",
            format!(
                "records before {} are missing: the retention boundary says they were archived or deleted, \
                 but no retention record in the log vouches for it (audit/boundary.json was put in or changed)",
                b.first
            ),
        ));
    }
    if let Some(s) = seals.iter().find(|s| s.seq >= expected) {
        let last = expected - 1;
        seal_problem = seal_problem.or(problem(
            expected,
            "truncated",
            format!("the log ends at record {last} but a seal covers record {}: records from {expected} were removed (truncated)", s.seq),
        ));
    }
    out.problem = match (first, seal_problem) {
        (Some(a), Some(b)) => Some(if b.seq < a.seq { b } else { a }),
        (a, b) => a.or(b),
    };
    Ok(out)
}

/// Finishes a walk by checking each seal's MAC in the token.
pub async fn verify(store: Store, hsm: &Hsm) -> Result<AuditVerifyResponse, Error> {
    let walk = tokio::task::spawn_blocking(move || walk(&store))
        .await
        .map_err(|e| Error::Internal(format!("audit walk: {e}")))??;
    let mut problem = walk.problem;
    for chunk in walk.seals.chunks(256) {
        let chunk = chunk.to_vec();
        let bad = hsm
            .run(move |w| {
                let mut bad_mac = None;
                for c in &chunk {
                    if !w.audit_mac_ok(&c.input, &c.mac)? {
                        bad_mac = Some((c.seq, "its MAC does not verify under the audit key"));
                        break;
                    }
                }
                let (seqs, signed): (Vec<u64>, Vec<_>) =
                    chunk.iter().filter_map(|c| Some((c.seq, c.signed.clone()?))).unzip();
                let bad_sig = w
                    .audit_signatures_check(&signed)?
                    .map(|i| (seqs[i], "its signature does not verify under the audit signing key"));
                Ok(match (bad_mac, bad_sig) {
                    (Some(m), Some(s)) => Some(if s.0 < m.0 { s } else { m }),
                    (m, s) => m.or(s),
                })
            })
            .await?;
        if let Some((seq, why)) = bad {
            if problem.as_ref().is_none_or(|p| seq < p.seq) {
                problem = Some(AuditProblem {
                    seq,
                    kind: "bad_seal".into(),
                    message: format!("the seal of record {seq} is bad: {why}: it was forged or altered"),
                });
            }
            break;
        }
    }
    let status = match (&problem, walk.unsealed.is_empty()) {
        (Some(_), _) => "not_intact",
        (None, false) => "unsealed",
        (None, true) => "intact",
    };
    Ok(AuditVerifyResponse {
        intact: status == "intact",
        records: walk.records,
        seals: walk.seal_count,
        last_sealed: walk.last_sealed,
        problem,
        status: status.into(),
        unsealed: walk.unsealed,
        chains: Vec::new(),
        first_kept: walk.first_kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn record(seq: u64, prev: &[u8; 32]) -> Vec<u8> {
        let rec = AuditRecord {
            seq,
            time_ms: 1,
            prev: hex(prev),
            caller: AuditCaller::default(),
            op: "hello".into(),
            tenant: None,
            key: None,
            version: None,
            envelope_id: None,
            context_keys: vec![],
            outcome: "ok".into(),
            code: None,
            detail: None,
            unsealed: None,
            actor: None,
            reason: None,
            before: None,
            after: None,
        };
        serde_json::to_vec(&rec).unwrap()
    }

    /// A store in a fresh folder with records 1..=n chained.
    fn chain(name: &str, n: u64) -> (crate::store::Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("keyhaven-walk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = crate::store::Store::new(std::sync::Arc::new(
            crate::store::sled_store::SledStore::open(&dir).unwrap(),
        ));
        let mut prev = [0u8; 32];
        for seq in 1..=n {
            let b = record(seq, &prev);
            store.audit_put(AuditKind::Record, seq, &b).unwrap();
            prev = Sha256::digest(&b).into();
        }
        store.audit_flush().unwrap();
        (store, dir)
    }

    #[test]
    fn walk_survives_hostile_sequence_numbers() {
        let (store, dir) = chain("edges", 3);
        assert!(walk(&store).unwrap().problem.is_none());
        store.audit_put(AuditKind::Record, 0, &record(0, &[0; 32])).unwrap();
        store.audit_flush().unwrap();
        let p = walk(&store).unwrap().problem.unwrap();
        assert_eq!((p.seq, p.kind.as_str()), (0, "inserted"));
        let (store, dir2) = chain("max", 2);
        store.audit_put(AuditKind::Record, u64::MAX, &record(u64::MAX, &[1; 32])).unwrap();
        store
            .audit_put(
                AuditKind::Seal,
                u64::MAX,
                br#"{"seq":18446744073709551615,"head":"00","time_ms":0,"mac":"00"}"#,
            )
            .unwrap();
        store.audit_flush().unwrap();
        let p = walk(&store).unwrap().problem.unwrap();
        assert_eq!((p.seq, p.kind.as_str()), (3, "removed"));
        let (store, dir3) = chain("first", 0);
        let one = record(1, &[7; 32]);
        store.audit_put(AuditKind::Record, 1, &one).unwrap();
        store.audit_put(AuditKind::Record, 2, &record(2, &Sha256::digest(&one).into())).unwrap();
        store.audit_flush().unwrap();
        let p = walk(&store).unwrap().problem.unwrap();
        assert_eq!((p.seq, p.kind.as_str()), (1, "altered"));
        for d in [dir, dir2, dir3] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn hours_may_wrap_past_midnight() {
        for (from, to, hour, outside) in [
            (8, 20, 7, true),
            (8, 20, 8, false),
            (8, 20, 19, false),
            (8, 20, 20, true),
            (22, 6, 23, false),
            (22, 6, 5, false),
            (22, 6, 6, true),
            (22, 6, 12, true),
        ] {
            assert_eq!(
                outside_hours(from, to, 1000 * 86_400_000 + hour * HOUR),
                outside,
                "{from}-{to} at {hour}"
            );
        }
    }

    #[test]
    fn volume_alerts_once_a_minute_per_uid_and_per_tenant() {
        let cfg = AuditSection {
            decrypt_alert_per_minute: 2,
            decrypt_hours_utc: Some([8, 20]),
            ..AuditSection::default()
        };
        let v = Volume::new(&cfg);
        let alice = Caller::resolve(4_000_000_001, 4_000_000_001, None);
        let bob = Caller::resolve(4_000_000_002, 4_000_000_002, None);
        let noon = 1000 * 86_400_000 + 12 * HOUR;
        assert!(v.count(&alice, "acme", noon).is_empty());
        assert!(v.count(&alice, "acme", noon).is_empty());
        let a = v.count(&alice, "acme", noon);
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(v.over(&alice, "acme", noon) && v.over(&bob, "acme", noon) && !v.over(&bob, "beta", noon));
        assert!(v.count(&alice, "acme", noon).is_empty(), "once a minute");
        let b = v.count(&bob, "beta", noon + 60_000);
        assert!(b.is_empty(), "a new minute starts afresh: {b:?}");
        let night = 1000 * 86_400_000 + 3 * HOUR;
        let n = v.count(&bob, "beta", night);
        assert_eq!(n, vec!["uid 4000000002 decrypts at 03h UTC, outside 08h-20h".to_owned()]);
        assert!(v.count(&bob, "beta", night).is_empty());
        assert!(v.over(&bob, "beta", night));
    }
}
