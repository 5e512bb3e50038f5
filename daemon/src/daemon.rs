//! Starting and stopping the daemon: store, HSM workers, socket (its own, or
//! systemd's), signals, and systemd notifications.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hsm::Hsm;
use crate::ops::Daemon;
use crate::server;
use crate::store::Store;

/// Sets the process-wide environment the PKCS#11 module reads. Must run
/// before any thread is started.
pub fn prepare_environment(config: &Config) {
    if let Some(conf) = &config.hsm.softhsm2_conf {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns after a clean drain.
/// `on_ready` is called once the socket accepts connections. `store` is an
/// already open store (from a `dev` first run), else the configured one is
/// opened.
pub fn run(config: Config, store: Option<Store>, on_ready: impl FnOnce(&Config)) -> anyhow::Result<()> {
    // Before any thread starts: this reads and clears LISTEN_FDS.
    let inherited = crate::systemd::take_listener().context("taking the listening socket from systemd")?;
    server::raise_open_file_limit(&config.limits)?;
    let store = match store {
        Some(s) => s,
        None => crate::store::open(&config)?,
    };
    let meta = store.check_initialised()?;
    let hsm_config = config.hsm_config().map_err(crate::exit::StartError::Pin)?;
    // A PIN the token refused at an earlier start is not presented again.
    crate::refusal::check(&config.store.path, &config.hsm.token_label, &hsm_config.pin)?;
    let started = Hsm::start(hsm_config, meta.master_key_version);
    match &started {
        Ok(_) => crate::refusal::clear(&config.store.path),
        Err(e) => {
            if let Ok(pin) = config.read_pin() {
                crate::refusal::note(&config.store.path, &config.hsm.token_label, &pin, e);
            }
        }
    }
    let hsm = Arc::new(
        started.map_err(|e| crate::softhsm::explain(&config, e)).context("starting the HSM workers")?,
    );
    let anchored = store
        .attach_anchor(crate::anchor::TokenAnchor::new(hsm.clone()))
        .map_err(|e| crate::softhsm::explain(&config, e))
        .context("checking the store against its anchor in the token")?;
    tracing::info!(generation = anchored.generation, "the store matches its anchor in the token");
    // Before anything of this node is written (its audit chain): a name
    // another running node holds is refused (docs/CLUSTER.md).
    store.backend().claim_node().context("claiming this node's name in the cluster")?;
    crate::ops::master::check_pins(&hsm, &store).context("checking the master keys against the store")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("keyhaven-io").build()?;
    for name in config.access.unknown_names() {
        tracing::warn!("the policy names `{name}`, which the user database does not know");
    }
    if config.access.is_empty() {
        tracing::warn!("the policy has no rules: nobody may use a key (docs/POLICY.md)");
    }
    let daemon =
        Arc::new(Daemon::new(hsm, store, config).context("opening the audit log and the revocations")?);
    // A node of a cluster serves only under a lease, and follows the other
    // nodes' changes (docs/CLUSTER.md); the embedded store has no cluster.
    daemon.revocations.gate_on(daemon.store.clone());
    let follow = crate::cluster::FollowOthers {
        revocations: daemon.revocations.clone(),
        events: daemon.revocation_events.clone(),
        hsm: daemon.hsm.clone(),
        runtime: runtime.handle().clone(),
    };
    daemon.store.backend().start_cluster(Arc::new(follow)).context("joining the cluster")?;
    let mut bound = false;
    let activated = inherited.is_some();
    let result = runtime.block_on(async {
        let listener = match inherited {
            // systemd made the socket (path, mode, owner: keyhavend.socket)
            // and keeps it: the daemon neither binds nor removes it.
            Some(l) => {
                l.set_nonblocking(true)?;
                tracing::info!("using the socket passed by systemd");
                let passed = l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.to_owned()));
                if passed.as_deref() != Some(daemon.config.socket.as_path()) {
                    tracing::warn!(
                        config = %daemon.config.socket.display(),
                        passed = ?passed,
                        "the socket systemd passed is not the config's `socket`; clients that read the config look in the wrong place"
                    );
                }
                tokio::net::UnixListener::from_std(l)?
            }
            None => {
                let l = server::bind(&daemon.config)
                    .with_context(|| format!("cannot listen on {}", daemon.config.socket.display()))?;
                bound = true;
                l
            }
        };
        let shutdown = CancellationToken::new();
        // Installed before `on_ready`, so that a signal sent the moment the
        // daemon says it is ready is handled, not fatal.
        let signals = Signals::install().context("installing signal handlers")?;
        tokio::spawn(signals.handle(daemon.clone(), shutdown.clone()));
        crate::metrics::METRICS.set_collecting(daemon.config.metrics.collect);
        if let Some(addr) = daemon.config.metrics.listen_addr().map_err(anyhow::Error::msg)? {
            let l = crate::metrics::http::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr} ([metrics] listen)"))?;
            tracing::info!(%addr, "serving GET /metrics");
            tokio::spawn(crate::metrics::http::serve(daemon.clone(), l, shutdown.clone()));
        }
        tracing::info!(socket = %daemon.config.socket.display(), token = daemon.hsm.token_label(), "listening");
        // Rotations that fell due while the daemon was down happen before it
        // says it is ready, so no data key is made under an overdue version.
        crate::upkeep::due_keys(&daemon).await;
        record_store_accepted(&daemon).await?;
        on_ready(&daemon.config);
        crate::systemd::notify("READY=1\nSTATUS=listening");
        tokio::spawn(crate::upkeep::run(daemon.clone(), shutdown.clone()));
        server::run(daemon.clone(), listener, shutdown).await;
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // Nobody waits for this node's lease any more.
    daemon.store.backend().leave();
    // The last seal needs the token, and so does every store write (its
    // anchor): stop the audit and write the usage counts before the HSM
    // workers stop.
    daemon.audit.stop();
    if let Err(e) = daemon.usage.flush(&daemon.store) {
        tracing::warn!(error = %e, "cannot write the last usage counts");
    }
    match daemon.wraps.release() {
        Ok(0) => {}
        Ok(n) => tracing::info!(wraps = n, "gave back the data-key wraps reserved and not used"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot give back the unused wrap reservations (they stay counted)")
        }
    }
    daemon.hsm.shutdown();
    daemon.store.flush().context("flushing the store")?;
    // A daemon that was refused the socket leaves the other one's alone.
    if bound {
        let _ = std::fs::remove_file(&daemon.config.socket);
    }
    if bound || activated {
        tracing::info!("stopped");
    }
    result
}

/// An operator's `keyhavend accept-store` since the last start goes into the
/// audit log, and then out of the store's meta record.
async fn record_store_accepted(d: &Arc<crate::ops::Daemon>) -> anyhow::Result<()> {
    let Some(a) = d.store.backend().meta().await?.and_then(|m| m.store_accepted) else { return Ok(()) };
    let when =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(a.at));
    let replaced =
        a.replaced_generation.map_or("no anchor".to_owned(), |g| format!("the anchor of write {g}"));
    let detail = format!("the store was accepted as it is over {replaced} at {when}: {}", a.reason);
    tracing::warn!(uid = a.uid, "keyhavend accept-store: {detail}");
    d.audit
        .operator_event("accept_store", a.uid, detail, Some(a.reason.clone()))
        .await
        .context("recording accept-store in the audit log")?;
    let store = d.store.clone();
    tokio::task::spawn_blocking(move || store.update_meta(&mut |m| m.store_accepted = None))
        .await
        .context("store task")??;
    Ok(())
}

/// SIGHUP: reloads what can change without a restart: the policy, and the
/// PIN (which also lets the HSM workers try a refused login once more).
/// Refusals are logged; what is in force stays.
/// Returns the number of rules before and the reload's result, for the
/// audit record.
fn reload(d: &Daemon) -> (usize, Result<usize, crate::error::Error>) {
    tracing::info!("SIGHUP: reloading the policy and the PIN");
    crate::systemd::notify_reloading();
    let before = d.policy().len();
    let result = crate::ops::reload_policy(d);
    crate::ops::reload_pin(d);
    crate::systemd::notify("READY=1\nSTATUS=listening");
    (before, result)
}

/// Records a SIGHUP reload in the audit log: `admin_reload` with `actor`
/// `signal` (whoever sent it is not known), the policy's size before and
/// after (docs/AUDIT.md §2.1).
async fn record_reload(d: &Daemon, before: usize, result: &Result<usize, crate::error::Error>) {
    let change = crate::audit::Change {
        reason: None,
        before: Some(serde_json::json!({ "policy_rules": before })),
        after: result.as_ref().ok().map(|n| serde_json::json!({ "policy_rules": n })),
        detail: Some("SIGHUP: the policy and the PIN reloaded from the config file".into()),
    };
    let subject = crate::audit::Subject { change, ..Default::default() };
    if let Err(e) = d.audit.daemon_event("admin_reload", "signal", subject, result.as_ref().map(|_| ())).await
    {
        tracing::error!(error = %e, "cannot write the audit record of the SIGHUP reload");
    }
}

/// SIGTERM and SIGINT drain and stop; SIGHUP reloads (see [`reload`]).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn handle(mut self, daemon: Arc<Daemon>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    crate::systemd::notify("STOPPING=1\nSTATUS=draining");
                    break
                }
                _ = self.int.recv() => {
                    tracing::info!("SIGINT: draining");
                    crate::systemd::notify("STOPPING=1\nSTATUS=draining");
                    break
                }
                _ = self.hup.recv() => {
                    let d = daemon.clone();
                    if let Ok((before, result)) = tokio::task::spawn_blocking(move || reload(&d)).await {
                        record_reload(&daemon, before, &result).await;
                    }
                }
            }
        }
        shutdown.cancel();
    }
}
