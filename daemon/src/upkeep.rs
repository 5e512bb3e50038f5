//! Periodic jobs, in one task: usage counts written to the store every few
//! seconds, and, at start-up (before the daemon says it is ready) and then
//! every `[lifecycle] check_seconds`,
//! automatic rotations that are due (also those that fell due while the
//! daemon was down) and scheduled deletions whose waiting period is over;
//! and every `[audit.retention] check_every`, audit log retention
//! ([`crate::retention`]).

use std::sync::Arc;
use std::time::Duration;

use keyhaven::lifecycle::KeyState;
use tokio_util::sync::CancellationToken;

use crate::audit::{Change, Subject};
use crate::ops::{self, Daemon};
use crate::revocation::rfc3339;

/// The `op` of an automatic rotation's audit record (the same as an
/// operator's rotation; `actor` tells them apart).
pub const ROTATE_OP: &str = "key_rotate";

/// The `op` of a scheduled deletion's audit record (the erasure when the
/// waiting period ends).
pub const DELETE_OP: &str = "key_delete";

/// Records the daemon's own change of the key at `path` (docs/AUDIT.md
/// §2.1). The change is made already: a record that cannot be written is
/// an error in the daemon's log.
async fn record(d: &Daemon, op: &str, path: &keyhaven::KeyPath, version: Option<u32>, change: Change) {
    let mut subject = Subject { version, change, ..Subject::default() };
    subject.key(path);
    if let Err(e) = d.audit.daemon_event(op, crate::audit::DAEMON_ACTOR, subject, Ok(())).await {
        tracing::error!(key = %path, op, error = %e, "cannot write the audit record of the daemon's own change");
    }
}

/// Records that the daemon's own change of the key at `path` failed
/// (outcome `error`, its code, `reason` saying what was tried and why it
/// failed); nothing was changed, and the next check tries again.
async fn record_failure(d: &Daemon, op: &str, path: &keyhaven::KeyPath, what: &str, e: &crate::error::Error) {
    let change = Change {
        reason: Some(format!("{what} failed: {e}; retried at the next check")),
        ..Change::default()
    };
    let mut subject = Subject { change, ..Subject::default() };
    subject.key(path);
    if let Err(e2) = d.audit.daemon_event(op, crate::audit::DAEMON_ACTOR, subject, Err(e)).await {
        tracing::error!(key = %path, op, error = %e2, "cannot write the audit record of the daemon's failed change");
    }
}

/// Runs until `shutdown`; the last usage flush is the caller's, after the
/// drain.
pub async fn run(d: Arc<Daemon>, shutdown: CancellationToken) {
    if let Ok(Some(r)) = d.store.backend().meta().await.map(|m| m.and_then(|m| m.master_rotation)) {
        tracing::warn!(
            from = r.from,
            to = r.to,
            "a master-key rotation is under way: run `keyhaven admin rotate-master` to finish it"
        );
    }
    let mut check = tokio::time::interval(Duration::from_secs(d.config.lifecycle.check_seconds));
    let mut flush = tokio::time::interval(Duration::from_secs(d.config.lifecycle.usage_flush_seconds));
    let retention = d.config.audit.retention.as_ref().map(|r| r.interval());
    let mut retain = tokio::time::interval(retention.unwrap_or(Duration::from_secs(86_400)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = check.tick() => due_keys(&d).await,
            _ = retain.tick(), if retention.is_some() => crate::retention::run_once(&d).await,
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
    let keys = match d.store.backend().keys(None).await {
        Ok(k) => k,
        Err(e) => return tracing::warn!(error = %e, "cannot list keys for rotation and deletion"),
    };
    for rec in keys {
        let Ok(path) = rec.path() else { continue };
        if rec.state == KeyState::PendingDeletion && rec.deletion_at.is_some_and(|t| t <= now) {
            let (store, p) = (d.store.clone(), path.clone());
            match tokio::task::spawn_blocking(move || ops::delete_if_due(&store, &p, now)).await {
                Ok(Ok(Some(was))) => {
                    tracing::warn!(key = %path, "scheduled deletion done: key material erased");
                    ops::notify_versions(d, &path, [None]);
                    let p = path.clone();
                    ops::unload(d, move |id| id.path == p).await;
                    let after = d.store.backend().key(&path).await.ok().flatten();
                    let reason = match was.deletion_at {
                        Some(t) => format!("scheduled deletion: the waiting period ended at {}", rfc3339(t)),
                        None => "scheduled deletion".to_owned(),
                    };
                    let change = Change {
                        reason: Some(reason),
                        before: Some(ops::settings_json(&was)),
                        after: after.as_deref().map(ops::settings_json),
                        detail: Some("every version's key material erased".into()),
                    };
                    record(d, DELETE_OP, &path, None, change).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(key = %path, error = %e, "scheduled deletion failed; retried later");
                    record_failure(d, DELETE_OP, &path, "scheduled deletion", &e).await;
                    if silent(&e) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %path, error = %e, "scheduled deletion task failed");
                    let e = crate::error::Error::Internal(format!("the deletion task failed: {e}"));
                    record_failure(d, DELETE_OP, &path, "scheduled deletion", &e).await;
                }
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
                Ok((was, r)) => {
                    tracing::info!(key = %path, version = r.current_version, "automatic rotation");
                    let reason = match (rec.rotate_every_secs, rec.version(rec.current_version)) {
                        (Some(p), Some(v)) => format!(
                            "automatic rotation: version {} was made at {}, and the key rotates every {p} s",
                            v.version,
                            rfc3339(v.created_at)
                        ),
                        _ => "automatic rotation".to_owned(),
                    };
                    let change = Change {
                        reason: Some(reason),
                        before: Some(ops::settings_json(&was)),
                        after: Some(ops::settings_json(&r)),
                        detail: None,
                    };
                    record(d, ROTATE_OP, &path, Some(r.current_version), change).await;
                }
                Err(e) => {
                    tracing::warn!(key = %path, error = %e, "automatic rotation failed; retried later");
                    record_failure(d, ROTATE_OP, &path, "automatic rotation", &e).await;
                    if silent(&e) {
                        return;
                    }
                }
            }
        }
    }
}

/// A PostgreSQL server that did not answer within its time limit: the
/// other keys due would each wait as long, so the round stops (the next
/// one, or the next start, does them), and a start waits for one such
/// limit, not one per key (docs/CLUSTER.md §2).
fn silent(e: &crate::error::Error) -> bool {
    let silent = matches!(e, crate::error::Error::Store(crate::store::StoreError::NoAnswer { .. }));
    if silent {
        tracing::warn!("the database does not answer: the other keys due wait for the next round");
    }
    silent
}
