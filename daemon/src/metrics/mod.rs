//! Metrics for Prometheus (docs/OPERATIONS.md "Metrics").
//!
//! What the daemon counts as it works lives in one process-wide [`Metrics`]
//! ([`METRICS`]) of atomics, so that any part (the request path, the HSM
//! workers, the audit thread, the accept loop) counts with one call and no
//! lock, and nothing is threaded through constructors. What is a state
//! rather than an event (HSM queue depth, token condition, revocations in
//! force, wrap budgets, seal age) is read when the text is made
//! (`crate::ops::metrics::render`), never kept twice.
//!
//! - [`registry`]: counters, gauges, fixed-bucket histograms, and the text
//!   exposition format.
//! - [`http`]: `[metrics] listen`, a small HTTP/1.1 responder for
//!   `GET /metrics`.
//!
//! Label values never come from clients unbounded: operations are the
//! daemon's own table (an unknown one is `unknown`), outcomes are `ok` and
//! the wire error codes. Tenant and key names are labels of one metric
//! only, the wrap budget of key versions past half their bound, at most
//! [`WRAP_SERIES_MAX`] of them.
//!
//! # Adding metrics
//!
//! An event count: a field here (a [`Counter`], or a [`Gauge`] for a level)
//! with a small function next to the others that the code counting it
//! calls, and its family in `crate::ops::metrics::render`. A state: read it
//! in `render` from what owns it: the audit sinks' cursors and lag
//! (`Audit::sink_status`) and the cluster's lease and feed (the store's
//! `cluster()`) are states read that way at each scrape.
//!
//! Collection can be switched off (`[metrics] collect = false`): then the
//! request path skips its clock reads and counters, which is how the cost
//! of counting is measured (`keyhavend bench --metrics-cost`).

pub mod http;
pub mod registry;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use keyhaven::ErrorCode;
pub use registry::{Counter, Exposition, Gauge, Histogram, Kind};

/// The most operations the daemon declares, plus one slot for unknown
/// operations (a unit test of `crate::ops` checks the table fits).
pub const MAX_OPS: usize = 64;

/// The wire error codes, in declaration order: `code as usize` indexes
/// this (checked by a test).
pub const ERROR_CODES: [ErrorCode; 23] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownOperation,
    ErrorCode::UnsupportedProtocol,
    ErrorCode::FrameTooLarge,
    ErrorCode::PayloadTooLarge,
    ErrorCode::BadEnvelope,
    ErrorCode::Integrity,
    ErrorCode::NotFound,
    ErrorCode::AlreadyExists,
    ErrorCode::KeyExhausted,
    ErrorCode::KeyDisabled,
    ErrorCode::VersionRetired,
    ErrorCode::PermissionDenied,
    ErrorCode::WrongKeyType,
    ErrorCode::Revoked,
    ErrorCode::InvalidConfig,
    ErrorCode::Busy,
    ErrorCode::HsmUnavailable,
    ErrorCode::HsmLoginFailed,
    ErrorCode::MasterKeyUnavailable,
    ErrorCode::StoreUnavailable,
    ErrorCode::Internal,
    ErrorCode::Unknown,
];

/// Outcomes: `ok`, then one per error code.
pub const OUTCOMES: usize = ERROR_CODES.len() + 1;

/// At most this many key versions get a wrap-budget series.
pub const WRAP_SERIES_MAX: usize = 20;

/// Why a connection was refused, for `keyhaven_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over `[limits] max_connections`.
    MaxConnections,
    /// Over `[limits] max_connections_per_uid`.
    MaxConnectionsPerUid,
}

impl Refusal {
    /// Every reason, as labelled.
    pub const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerUid];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerUid => "max_connections_per_uid",
        }
    }
}

/// Everything the daemon counts (see the module docs).
pub struct Metrics {
    collect: AtomicBool,
    /// Requests per operation and outcome.
    pub requests: [[Counter; OUTCOMES]; MAX_OPS],
    /// Request latency per operation (from parsed to answered, the audit
    /// record included).
    pub latency: [Histogram; MAX_OPS],
    /// HSM jobs refused because the queue was full.
    pub hsm_busy: Counter,
    /// KEK lookups answered from a worker's cache.
    pub kek_cache_hits: Counter,
    /// KEK lookups not in the cache.
    pub kek_cache_misses: Counter,
    /// KEKs unwrapped into a worker's session.
    pub kek_loads: Counter,
    /// KEKs loaded in the workers' sessions now.
    pub keks_loaded: Gauge,
    /// Connections being served.
    pub connections_open: Gauge,
    /// Connections accepted and served, since start.
    pub connections: Counter,
    /// Connections refused, per [`Refusal`].
    pub connections_refused: [Counter; 2],
    /// Audit records made durable.
    pub audit_records: Counter,
    /// Unix time in ms of the last audit seal (0: none since start).
    pub audit_sealed_at_ms: AtomicU64,
    /// Unusual-volume alerts raised (`[audit] decrypt_alert_*`).
    pub alerts: Counter,
}

/// The daemon's metrics.
pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    const fn new() -> Metrics {
        Metrics {
            collect: AtomicBool::new(true),
            requests: [const { [const { Counter::new() }; OUTCOMES] }; MAX_OPS],
            latency: [const { Histogram::new() }; MAX_OPS],
            hsm_busy: Counter::new(),
            kek_cache_hits: Counter::new(),
            kek_cache_misses: Counter::new(),
            kek_loads: Counter::new(),
            keks_loaded: Gauge::new(),
            connections_open: Gauge::new(),
            connections: Counter::new(),
            connections_refused: [const { Counter::new() }; 2],
            audit_records: Counter::new(),
            audit_sealed_at_ms: AtomicU64::new(0),
            alerts: Counter::new(),
        }
    }

    /// Whether the request path counts (`[metrics] collect`).
    pub fn collecting(&self) -> bool {
        self.collect.load(Relaxed)
    }

    /// Turns counting on the request path on or off.
    pub fn set_collecting(&self, on: bool) {
        self.collect.store(on, Relaxed);
    }
}

/// The outcome index of a result: 0 for `ok`, else 1 + its error code.
pub fn outcome_index(code: Option<ErrorCode>) -> usize {
    match code {
        None => 0,
        Some(c) => (1 + c as usize).min(OUTCOMES - 1),
    }
}

/// The label of outcome index `i`.
pub fn outcome_label(i: usize) -> &'static str {
    match i {
        0 => "ok",
        i => ERROR_CODES[(i - 1).min(ERROR_CODES.len() - 1)].as_str(),
    }
}

/// When a request started, if requests are counted.
pub fn request_started() -> Option<Instant> {
    METRICS.collecting().then(Instant::now)
}

/// Counts a finished request of operation number `op` (the ops table's
/// index; [`MAX_OPS`] - 1 and above: unknown) started at `started`.
pub fn request_done(op: usize, started: Option<Instant>, code: Option<ErrorCode>) {
    let Some(started) = started else { return };
    let op = op.min(MAX_OPS - 1);
    METRICS.requests[op][outcome_index(code)].inc();
    METRICS.latency[op].observe(started.elapsed());
}

/// An HSM job refused for a full queue.
pub fn hsm_busy() {
    METRICS.hsm_busy.inc();
}

/// A KEK lookup on a worker: found in its cache or not.
pub fn kek_lookup(hit: bool) {
    if hit {
        METRICS.kek_cache_hits.inc();
    } else {
        METRICS.kek_cache_misses.inc();
    }
}

/// A KEK unwrapped into a worker's session.
pub fn kek_loaded() {
    METRICS.kek_loads.inc();
    METRICS.keks_loaded.add(1);
}

/// `n` KEKs unloaded from a worker's session (destroyed, or the session
/// closed).
pub fn keks_unloaded(n: usize) {
    METRICS.keks_loaded.add(-(n as i64));
}

/// A connection refused.
pub fn connection_refused(why: Refusal) {
    METRICS.connections_refused[why as usize].inc();
}

/// `n` audit records made durable.
pub fn audit_written(n: usize) {
    METRICS.audit_records.add(n as u64);
}

/// The audit log was sealed now.
pub fn audit_sealed() {
    METRICS.audit_sealed_at_ms.store(now_ms(), Relaxed);
}

/// An unusual-volume alert was raised.
pub fn alert_raised() {
    METRICS.alerts.inc();
}

/// A connection being served: counted open while it lives.
pub struct OpenConnection(());

impl OpenConnection {
    /// Counts a connection accepted and open.
    pub fn new() -> OpenConnection {
        METRICS.connections.inc();
        METRICS.connections_open.add(1);
        OpenConnection(())
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        OpenConnection::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        METRICS.connections_open.add(-1);
    }
}

/// How long ago the audit log was last sealed by this run, if it was.
pub fn audit_seal_age() -> Option<Duration> {
    match METRICS.audit_sealed_at_ms.load(Relaxed) {
        0 => None,
        at => Some(Duration::from_millis(now_ms().saturating_sub(at))),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_indexed_by_their_discriminant() {
        for (i, c) in ERROR_CODES.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c}");
            assert_eq!(outcome_label(outcome_index(Some(*c))), c.as_str());
        }
        assert_eq!(ERROR_CODES[ERROR_CODES.len() - 1], ErrorCode::Unknown, "`Unknown` is the last code");
        assert_eq!(outcome_label(outcome_index(None)), "ok");
        let labels: std::collections::BTreeSet<_> = (0..24).map(outcome_label).collect();
        assert_eq!(labels.len(), 24, "outcome labels are distinct");
    }
}
