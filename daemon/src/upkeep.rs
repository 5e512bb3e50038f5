//! Periodic jobs, in one task: usage counts written to the store every few
//! seconds, and, at start-up (before the daemon says it is ready) and then
//! every `[lifecycle] check_seconds`,
//! automatic rotations that are due (also those that fell due while the
//! daemon was down) and scheduled deletions whose waiting period is over.

use std::sync::Arc;
use std::time::Duration;

use keyhaven::lifecycle::KeyState;
use tokio_util::sync::CancellationToken;

use crate::ops::{self, Daemon};

/// Runs until `shutdown`; the last usage flush is the caller's, after the
/// drain.
pub async fn run(d: Arc<Daemon>, shutdown: CancellationToken) {
    if let Ok(Some(r)) = d.store.meta().map(|m| m.and_then(|m| m.master_rotation)) {
        tracing::warn!(
            from = r.from,
            to = r.to,
            "a master-key rotation is under way: run `keyhaven admin rotate-master` to finish it"
        );
    }
    let mut check = tokio::time::interval(Duration::from_secs(d.config.lifecycle.check_seconds));
    let mut flush = tokio::time::interval(Duration::from_secs(d.config.lifecycle.usage_flush_seconds));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = check.tick() => due_keys(&d).await,
            _ = flush.tick() => {
                let dd = d.clone();
                let r = tokio::task::spawn_blocking(move || dd.usage.flush(&dd.store)).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "cannot write the usage counts; they are kept for the next try");
                }
            }
        }
    }
}

/// Rotates the keys whose period has passed and deletes those whose
/// deletion is due.
pub async fn due_keys(d: &Arc<Daemon>) {
    // On a cluster, one node at a time runs them (docs/CLUSTER.md).
    let _jobs = match d.store.backend().jobs_lock().await {
        Ok(Some(guard)) => guard,
        Ok(None) => return tracing::debug!("another node is running the periodic jobs"),
        Err(e) => return tracing::warn!(error = %e, "cannot take the periodic jobs' lock"),
    };
    let now = crate::clock::now_unix().saturating_add(d.config.lifecycle.test_clock_offset_seconds);
    let keys = match d.store.keys(None) {
        Ok(k) => k,
        Err(e) => return tracing::warn!(error = %e, "cannot list keys for rotation and deletion"),
    };
    for rec in keys {
        let Ok(path) = rec.path() else { continue };
        if rec.state == KeyState::PendingDeletion && rec.deletion_at.is_some_and(|t| t <= now) {
            let (store, p) = (d.store.clone(), path.clone());
            match tokio::task::spawn_blocking(move || ops::delete_if_due(&store, &p, now)).await {
                Ok(Ok(true)) => {
                    tracing::warn!(key = %path, "scheduled deletion done: key material erased");
                    ops::notify_versions(d, &path, [None]);
                    let p = path.clone();
                    ops::unload(d, move |id| id.path == p).await;
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(key = %path, error = %e, "scheduled deletion failed; retried later")
                }
                Err(e) => tracing::warn!(key = %path, error = %e, "scheduled deletion task failed"),
            }
            continue;
        }
        let due = match (rec.state, rec.rotate_every_secs, rec.version(rec.current_version)) {
            // Saturating: a period stored before it was range-checked never wraps.
            (KeyState::Enabled | KeyState::Disabled, Some(period), Some(v)) => {
                v.created_at.saturating_add(period) <= now
            }
            _ => false,
        };
        // A suspended or destroyed key gets no new versions on its own.
        if due && d.revocations.covering(&path, None, None, now).is_some() {
            continue;
        }
        if due {
            match ops::rotate_key(d, path.clone()).await {
                Ok(r) => tracing::info!(key = %path, version = r.current_version, "automatic rotation"),
                Err(e) => tracing::warn!(key = %path, error = %e, "automatic rotation failed; retried later"),
            }
        }
    }
}
