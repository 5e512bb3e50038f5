//! `metrics`: the Prometheus text exposition (docs/OPERATIONS.md
//! "Metrics"), for the socket (`keyhaven metrics`, permission `metrics`)
//! and for `[metrics] listen` ([`crate::metrics::http`]).
//!
//! [`render`] writes every family: the counts of [`crate::metrics::METRICS`]
//! and the states read from their owners at this moment.

use std::sync::Arc;

use keyhaven::wire;

use super::{reply, route, Cx, Daemon, Op, Reply, Route};
use crate::error::Error;
use crate::metrics::{self, Exposition, Kind, METRICS};
use crate::policy::{Access, Permission, Target};

/// `metrics` (`metrics`).
pub(super) const OPS: &[Route] = &[route::<wire::Metrics>()];

impl Op for wire::Metrics {
    const ACCESS: Access = Access::Needs(Permission::Metrics);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        let text = render(cx.d).await;
        reply(&wire::MetricsResponse { format: "prometheus-text-0.0.4".into(), text }, 0)
    }
}

/// The token conditions `health` reports (docs/OPERATIONS.md §6), each a
/// series of `keyhaven_token_condition`.
const CONDITIONS: [&str; 15] = [
    "ok",
    "module_unavailable",
    "token_absent",
    "pin_incorrect",
    "pin_locked",
    "login_failed",
    "master_key_missing",
    "master_key_unusable",
    "master_key_mismatch",
    "integrity",
    "busy",
    "stopped",
    "session_lost",
    "token_error",
    "internal",
];

/// The exposition, as of now.
pub async fn render(d: &Arc<Daemon>) -> String {
    let m = &METRICS;
    let mut e = Exposition::new();
    e.single(
        "keyhaven_build_info",
        Kind::Gauge,
        "The daemon's version (value always 1).",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.single(
        "keyhaven_metrics_collecting",
        Kind::Gauge,
        "1 when requests are counted ([metrics] collect), else 0 and the request counts stay at 0.",
        &[],
        bool_value(m.collecting()),
    );

    // Requests.
    let names: Vec<&str> = super::names().collect();
    let label = |i: usize| if i < names.len() { names[i] } else { "unknown" };
    let slots = (0..names.len()).chain([metrics::MAX_OPS - 1]);
    e.family(
        "keyhaven_requests_total",
        Kind::Counter,
        "Requests answered, by operation and outcome (ok or the wire error code).",
    );
    for i in slots.clone() {
        for (o, c) in m.requests[i].iter().enumerate() {
            let n = c.get();
            if n > 0 || (o == 0 && i < names.len()) {
                e.sample(
                    "keyhaven_requests_total",
                    &[("operation", label(i)), ("outcome", metrics::outcome_label(o))],
                    n as f64,
                );
            }
        }
    }
    e.family(
        "keyhaven_request_duration_seconds",
        Kind::Histogram,
        "Time from a request parsed to its answer ready, the audit record included, by operation.",
    );
    for i in slots {
        if m.latency[i].count() > 0 {
            e.histogram("keyhaven_request_duration_seconds", &[("operation", label(i))], &m.latency[i]);
        }
    }

    // The HSM.
    let (queued, capacity) = d.hsm.queue();
    e.single("keyhaven_hsm_queue_depth", Kind::Gauge, "HSM jobs waiting for a worker.", &[], queued as f64);
    e.single(
        "keyhaven_hsm_queue_capacity",
        Kind::Gauge,
        "HSM jobs that may wait ([hsm] queue_depth); past it requests are refused `busy`.",
        &[],
        capacity as f64,
    );
    e.single("keyhaven_hsm_workers", Kind::Gauge, "HSM worker threads.", &[], d.hsm.workers() as f64);
    e.single(
        "keyhaven_hsm_busy_total",
        Kind::Counter,
        "HSM jobs refused because the queue was full (`busy`).",
        &[],
        m.hsm_busy.get() as f64,
    );
    let condition = super::health::token_condition(d).await;
    let current = condition.as_deref().unwrap_or("ok");
    let current = if CONDITIONS.contains(&current) { current } else { "token_error" };
    e.single(
        "keyhaven_token_up",
        Kind::Gauge,
        "1 when the token answers a probe (a session, the master key), else 0.",
        &[],
        bool_value(current == "ok"),
    );
    e.family(
        "keyhaven_token_condition",
        Kind::Gauge,
        "The token's condition as `keyhaven health` reports it: 1 for the current one.",
    );
    for c in CONDITIONS {
        e.sample("keyhaven_token_condition", &[("condition", c)], bool_value(c == current));
    }
    // A full disk (docs/OPERATIONS.md §7.1).
    let store_failure = super::health::store_failure(d).await;
    e.single(
        "keyhaven_store_writable",
        Kind::Gauge,
        "0 while the store's last write failed (e.g. a full disk: `keyhaven health` says why), else 1.",
        &[],
        bool_value(store_failure.is_none()),
    );
    let audit_failure = d.audit.failure();
    e.single(
        "keyhaven_audit_writable",
        Kind::Gauge,
        "0 while the audit log cannot be written (requests are refused before they run), else 1.",
        &[],
        bool_value(audit_failure.is_none()),
    );
    e.single(
        "keyhaven_master_key_version",
        Kind::Gauge,
        "The master key version new KEKs are wrapped under.",
        &[],
        d.hsm.master_key_version() as f64,
    );
    e.single(
        "keyhaven_kek_cache_hits_total",
        Kind::Counter,
        "KEK uses whose key was already unwrapped in the worker's session.",
        &[],
        m.kek_cache_hits.get() as f64,
    );
    e.single(
        "keyhaven_kek_cache_misses_total",
        Kind::Counter,
        "KEK uses whose key was not in the worker's session.",
        &[],
        m.kek_cache_misses.get() as f64,
    );
    e.single(
        "keyhaven_kek_loads_total",
        Kind::Counter,
        "KEKs unwrapped into a worker's session.",
        &[],
        m.kek_loads.get() as f64,
    );
    e.single(
        "keyhaven_keks_loaded",
        Kind::Gauge,
        "KEKs unwrapped in the workers' sessions now (at most [hsm] loaded_keys).",
        &[],
        m.keks_loaded.get() as f64,
    );

    // Connections.
    e.single(
        "keyhaven_connections_open",
        Kind::Gauge,
        "Client connections being served.",
        &[],
        m.connections_open.get() as f64,
    );
    e.single(
        "keyhaven_connections_total",
        Kind::Counter,
        "Client connections accepted and served.",
        &[],
        m.connections.get() as f64,
    );
    e.family(
        "keyhaven_connections_refused_total",
        Kind::Counter,
        "Client connections refused `busy`, by the limit they were over.",
    );
    for r in metrics::Refusal::ALL {
        e.sample(
            "keyhaven_connections_refused_total",
            &[("reason", r.as_str())],
            m.connections_refused[r as usize].get() as f64,
        );
    }

    // Revocations, audit, alerts.
    let now = crate::clock::now_unix();
    e.single(
        "keyhaven_revocations_in_force",
        Kind::Gauge,
        "Revocations in force (every scope).",
        &[],
        d.revocations.list(now).len() as f64,
    );
    e.single(
        "keyhaven_suspended",
        Kind::Gauge,
        "1 while a whole-system suspension is in force.",
        &[],
        bool_value(d.revocations.all(now).is_some()),
    );
    e.single(
        "keyhaven_audit_records_written_total",
        Kind::Counter,
        "Audit records made durable.",
        &[],
        m.audit_records.get() as f64,
    );
    let sealed_ms = m.audit_sealed_at_ms.load(std::sync::atomic::Ordering::Relaxed);
    e.single(
        "keyhaven_audit_last_seal_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the audit log's last seal by this run (0: none yet).",
        &[],
        sealed_ms as f64 / 1000.0,
    );
    if let Some(age) = metrics::audit_seal_age() {
        e.single(
            "keyhaven_audit_seal_age_seconds",
            Kind::Gauge,
            "Time since the audit log's last seal (absent until the first seal of this run).",
            &[],
            age.as_secs_f64(),
        );
    }
    e.single(
        "keyhaven_alerts_total",
        Kind::Counter,
        "Unusual-volume alerts raised ([audit] decrypt_alert_per_minute, decrypt_hours_utc).",
        &[],
        m.alerts.get() as f64,
    );

    // Audit sinks ([[audit.sink]]), one series each: names are the operator's.
    let sinks = d.audit.sink_status();
    if !sinks.is_empty() {
        let families: [(&str, &str, SinkValue); 4] = [
            (
                "keyhaven_audit_sink_delivered_seq",
                "The last audit record the sink delivered (its cursor).",
                |s| s.delivered as f64,
            ),
            (
                "keyhaven_audit_sink_lag_records",
                "Audit records durable in the log and not yet delivered.",
                |s| s.lag as f64,
            ),
            ("keyhaven_audit_sink_lagging", "1 while the sink's lag is over its max_lag.", |s| {
                bool_value(s.lagging)
            }),
            ("keyhaven_audit_sink_up", "0 while the sink's last delivery failed.", |s| {
                bool_value(s.error.is_none())
            }),
        ];
        for (name, help, value) in families {
            e.family(name, Kind::Gauge, help);
            for s in &sinks {
                e.sample(name, &[("sink", &s.name), ("type", s.kind)], value(s));
            }
        }
    }

    // The cluster (PostgreSQL): this node's lease and feed, and every node's.
    if let Ok(Some(cluster)) = d.store.backend().cluster().await {
        e.single(
            "keyhaven_cluster_serving",
            Kind::Gauge,
            "1 while this node's lease is valid by its own clock (else key operations get store_unavailable).",
            &[],
            bool_value(cluster.serving),
        );
        e.single(
            "keyhaven_cluster_feed_lag_revisions",
            Kind::Gauge,
            "Changes in the feed that this node has not applied yet.",
            &[],
            (cluster.revision - cluster.applied).max(0) as f64,
        );
        e.family(
            "keyhaven_cluster_node_live",
            Kind::Gauge,
            "1 while the node's lease is live by PostgreSQL's clock.",
        );
        for n in &cluster.nodes {
            e.sample("keyhaven_cluster_node_live", &[("node", &n.name)], bool_value(n.live));
        }
        e.family(
            "keyhaven_cluster_node_lease_left_seconds",
            Kind::Gauge,
            "Time until the node's lease ends (negative: it ended that long ago).",
        );
        for n in &cluster.nodes {
            e.sample(
                "keyhaven_cluster_node_lease_left_seconds",
                &[("node", &n.name)],
                n.lease_left_ms as f64 / 1000.0,
            );
        }
        e.family(
            "keyhaven_cluster_node_applied_revision",
            Kind::Gauge,
            "The change revision the node last reported as applied.",
        );
        for n in &cluster.nodes {
            e.sample("keyhaven_cluster_node_applied_revision", &[("node", &n.name)], n.applied as f64);
        }
    }

    // Wrap budgets.
    let limit = d.wraps.limit();
    e.single(
        "keyhaven_wrap_budget_limit",
        Kind::Gauge,
        "Data-key wraps allowed per key version ([limits] wraps_per_key_version).",
        &[],
        limit as f64,
    );
    let near = d.wraps.near_bound(limit / 2);
    e.single(
        "keyhaven_wrap_budget_versions_over_half",
        Kind::Gauge,
        "Key versions used since start with more than half their wrap budget used.",
        &[],
        near.len() as f64,
    );
    e.family(
        "keyhaven_wrap_budget_used_ratio",
        Kind::Gauge,
        "Wrap budget used by a key version past half its bound (the 20 fullest at most).",
    );
    for (kek, used) in near.iter().take(metrics::WRAP_SERIES_MAX) {
        let version = kek.version.to_string();
        e.sample(
            "keyhaven_wrap_budget_used_ratio",
            &[("tenant", kek.path.tenant()), ("key", kek.path.key()), ("version", &version)],
            *used as f64 / limit.max(1) as f64,
        );
    }
    e.finish()
}

/// One figure of a sink's status.
type SinkValue = fn(&crate::audit_sinks::SinkStatus) -> f64;

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}
