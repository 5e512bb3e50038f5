//! `hello` and `health`.
//!
//! A `health` call probes the token (a session call, the token listing and
//! the master key lookup: about 100 µs on the HSM thread, with file reads
//! in SoftHSM2) and counts the store's keys. Monitors and load balancers
//! call it often and all at once, so calls share probes through a
//! [`ProbeGate`]: a call is answered from a good probe that started at most
//! [`REUSE_GOOD`] before it arrived, else from the first probe that starts
//! after it arrived (calls that arrive during a probe wait for it, then
//! share the next). A failure is never reused past its own burst, so a
//! token coming back shows at the next call; a token going away shows
//! within [`REUSE_GOOD`]. Without this, 64 clients calling `health` kept
//! the HSM thread busy with nothing but probes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhaven::wire::{self, CustodyHealth, HealthResponse, HelloResponse, StoreHealth, TokenHealth};

use super::{reply, route, Cx, Daemon, Op, Reply, Route};
use crate::error::Error;
use crate::identity::Caller;
use crate::policy::{Access, Permission, Target};

pub fn hello(req: wire::Hello) -> Result<Reply, Error> {
    if req.protocol != wire::PROTOCOL_VERSION {
        return Err(Error::UnsupportedProtocol(req.protocol));
    }
    let mut operations: Vec<String> = super::names().map(str::to_owned).collect();
    operations.sort();
    let resp = HelloResponse {
        protocol: wire::PROTOCOL_VERSION,
        server: format!("keyhavend/{}", env!("CARGO_PKG_VERSION")),
        operations,
        features: wire::FEATURES.iter().map(|f| (*f).to_owned()).collect(),
    };
    reply(&resp, 0)
}

/// How long a good probe answers later calls.
pub const REUSE_GOOD: Duration = Duration::from_millis(100);

/// What one probe found.
#[derive(Clone)]
struct Probe {
    /// When the probe started.
    started: Instant,
    /// The probe's failure mode and message, when the token failed it.
    token_error: Option<(String, String)>,
    /// The number of keys, or `None` when the store failed.
    keys: Option<u64>,
    /// Why the store cannot be written (a full disk), when it cannot.
    store_failure: Option<crate::store::StoreFailure>,
    /// The cluster's nodes (PostgreSQL).
    cluster: Option<keyhaven::wire::ClusterHealth>,
}

impl Probe {
    /// Whether a call that arrived at `arrived` may be answered from this
    /// probe: it started after the call arrived, or it was good and
    /// started at most [`REUSE_GOOD`] before.
    fn reusable(&self, arrived: Instant) -> bool {
        let good = self.token_error.is_none() && self.keys.is_some() && self.store_failure.is_none();
        self.started >= arrived || (good && arrived.duration_since(self.started) <= REUSE_GOOD)
    }
}

/// Shares token and store probes between concurrent `health` calls (see
/// the module docs).
#[derive(Default)]
pub struct ProbeGate {
    /// The latest probe; held across a probe, so that calls arriving during
    /// one wait for it (and, when it failed, for one more that starts after
    /// them). Only tasks of the gate's own take it (see [`ProbeGate::probe`]).
    last: tokio::sync::Mutex<Option<Probe>>,
}

impl ProbeGate {
    /// A probe for a call that arrives now. The lock is taken, held across
    /// the token probe and released by a task of its own, never by the
    /// caller's: a connection's task may stop polling its requests for a
    /// while (before this, one blocked writing to a client that did not
    /// read, holding the lock, and every `health` waited on it).
    async fn probe(d: &Arc<Daemon>) -> Probe {
        let arrived = Instant::now();
        // The common case, a probe to reuse, without a task: the lock is
        // only tried, and let go at once.
        if let Ok(last) = d.health_probe.last.try_lock() {
            if let Some(p) = last.as_ref().filter(|p| p.reusable(arrived)) {
                return p.clone();
            }
        }
        let d2 = d.clone();
        match tokio::spawn(async move { d2.health_probe.probe_since(&d2, arrived).await }).await {
            Ok(p) => p,
            Err(e) => Probe {
                started: arrived,
                token_error: Some(("internal".into(), format!("the health probe's task failed: {e}"))),
                keys: None,
                store_failure: None,
                cluster: None,
            },
        }
    }

    async fn probe_since(&self, d: &Daemon, arrived: Instant) -> Probe {
        let mut last = self.last.lock().await;
        if let Some(p) = last.as_ref().filter(|p| p.reusable(arrived)) {
            return p.clone();
        }
        let started = Instant::now();
        // The token probe runs on an HSM thread (which retries a lost
        // session there); the store's write probe may block, so it runs
        // on a blocking thread (below): nothing here holds the async
        // thread that runs this task.
        let token = d.hsm.run(|w| w.probe()).await;
        let (store_failure, keys) = store_probe(d).await;
        let p = Probe {
            started,
            token_error: token.err().map(|e| (e.condition().to_owned(), e.to_string())),
            store_failure,
            keys,
            cluster: d.store.backend().cluster().await.ok().flatten(),
        };
        *last = Some(p.clone());
        p
    }
}

/// Why the store cannot be written, if it cannot, and its number of keys
/// (`None`: the store failed). A store that failed a write tries one here
/// (sled: a small write and a flush, at most every 250 ms to 2 s, after
/// taking the writers' lock, and opening the database again if need be,
/// which waits up to 5 s for sled's file lock), so that recovery shows
/// even when no request writes; counting the keys may open the database
/// too (sled) or wait for the database (PostgreSQL). All of which blocks:
/// it runs on a blocking thread, not on the async thread of the probe's
/// task.
async fn store_probe(d: &Daemon) -> (Option<crate::store::StoreFailure>, Option<u64>) {
    let store = d.store.clone();
    tokio::task::spawn_blocking(move || (store.backend().failure(), store.key_count().ok()))
        .await
        .unwrap_or_else(|e| {
            let failure = crate::store::StoreFailure {
                condition: "unavailable",
                message: format!("the store's probe failed: {e}"),
            };
            (Some(failure), None)
        })
}

/// The token's condition as a `health` call now would report it (`None`:
/// fine), from a shared probe (see the module docs).
pub(super) async fn token_condition(d: &Arc<Daemon>) -> Option<String> {
    ProbeGate::probe(d).await.token_error.map(|(condition, _)| condition)
}

/// Why the store cannot be written now (`None`: it can), from a shared
/// probe, for the metrics.
pub(super) async fn store_failure(d: &Arc<Daemon>) -> Option<crate::store::StoreFailure> {
    ProbeGate::probe(d).await.store_failure
}

/// Probes the token and the store (shared with concurrent calls: see the
/// module docs); reports each rather than failing the call. A whole-system
/// suspension shows as status `suspended`. An audit sink's error text
/// names paths of the daemon's config (a file, a socket): only a caller
/// the policy grants `admin` on `*` gets it; others see the sink's state
/// (docs/PROTOCOL.md §3.2).
pub async fn health(d: &Arc<Daemon>, caller: &Caller, _req: wire::Health) -> Result<Reply, Error> {
    let probe = ProbeGate::probe(d).await;
    let (condition, error) = probe.token_error.map_or((None, None), |(c, e)| (Some(c), Some(e)));
    let token = TokenHealth {
        ok: error.is_none(),
        label: d.hsm.token_label().to_owned(),
        master_key_version: d.hsm.master_key_version(),
        workers: d.hsm.workers(),
        condition,
        error,
    };
    let serving = d.store.backend().serving().is_ok();
    let store = StoreHealth {
        ok: probe.keys.is_some() && serving && probe.store_failure.is_none(),
        keys: probe.keys.unwrap_or(0),
        backend: d.store.kind().into(),
        cluster: probe.cluster,
        condition: probe.store_failure.as_ref().map(|f| f.condition.to_owned()),
        error: probe.store_failure.map(|f| f.message),
    };
    // The audit log's state is known without a probe: its flusher tries a
    // failed write again on its own (docs/AUDIT.md §4).
    let audit = d.audit.enabled().then(|| {
        let failure = d.audit.failure();
        wire::AuditHealth {
            ok: failure.is_none(),
            condition: failure.as_ref().map(|f| f.condition.to_owned()),
            refused: failure.as_ref().map_or(0, |f| f.refused),
            error: failure.map(|f| f.message),
        }
    });
    let audit_ok = audit.as_ref().is_none_or(|a| a.ok);
    let suspended = d.revocations.all(crate::clock::now_unix());
    let status = match (token.ok && store.ok && audit_ok, &suspended) {
        (false, _) => "degraded",
        (true, Some(_)) => "suspended",
        (true, None) => "ok",
    };
    let confinement = d.hsm.confinement();
    let unconfined: Vec<u32> = confinement.iter().filter(|(_, c)| !c).map(|(v, _)| *v).collect();
    let custody = CustodyHealth {
        kek_confinement: if unconfined.is_empty() { "enforced" } else { "not_enforced" }.into(),
        unconfined_master_keys: unconfined,
        pinned_master_keys: confinement.iter().map(|(v, _)| *v).collect(),
    };
    let operator = d.policy().allows(caller, Permission::Admin, &Target::All);
    let audit_sinks = d
        .audit
        .sink_status()
        .into_iter()
        .map(|s| wire::AuditSinkHealth {
            state: match (&s.error, s.lagging) {
                (Some(_), _) => "failing",
                (None, true) => "lagging",
                (None, false) => "ok",
            }
            .into(),
            name: s.name,
            kind: s.kind.into(),
            delivered: s.delivered,
            lag: s.lag,
            error: s.error.filter(|_| operator),
        })
        .collect();
    let resp = HealthResponse {
        status: status.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        token,
        store,
        suspended_message: suspended.as_ref().map(crate::revocation::describe),
        suspended,
        custody,
        audit,
        audit_sinks,
    };
    reply(&resp, 0)
}

/// `hello` and `health`: open to every caller and not audited
/// (docs/AUDIT.md §1).
pub(super) const OPS: &[Route] = &[route::<wire::Hello>(), route::<wire::Health>()];

impl Op for wire::Hello {
    const ACCESS: Access = Access::Open;
    const AUDITED: bool = false;
    async fn handle(self, _cx: Cx<'_>) -> Result<Reply, Error> {
        hello(self)
    }
}

impl Op for wire::Health {
    const ACCESS: Access = Access::Open;
    const AUDITED: bool = false;
    async fn handle(self, cx: Cx<'_>) -> Result<Reply, Error> {
        health(cx.d, cx.caller, self).await
    }
}
