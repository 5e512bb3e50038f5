//! Audit log retention (docs/AUDIT.md §12): sealed segments whose newest
//! record is older than `[audit.retention] after` are archived (gzip, in
//! `archive_dir`) or deleted, by an automatic job that records what it did
//! in the log itself (op `audit_retention`, actor `daemon`).
//!
//! Why it is safe to cut the chain: the hash of the last record removed is
//! kept as the log's boundary (`audit/boundary.json`) and written in the
//! retention record, which later seals cover; `audit verify` starts the
//! walk there and checks that a retention record vouches for it. A segment
//! is removed only when it is not the one being written, a seal covers
//! its last record, and every sink has shipped it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{hex, Change, Subject, DAEMON_ACTOR};
use crate::error::Error;
use crate::ops::Daemon;
use crate::store::audit_files::{segment_name, Boundary, SegmentInfo};
use crate::store::{AuditKind, Store};

/// The `op` of a retention record.
pub const RETENTION_OP: &str = "audit_retention";

/// `[audit.retention]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Age after which a sealed segment goes: a segment's age is that of
    /// its newest record (e.g. "90d").
    pub after: String,
    /// `archive` (gzip into `archive_dir`) or `delete`.
    pub action: RetentionAction,
    /// Where archived segments go (an absolute path outside the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_dir: Option<PathBuf>,
    /// How often the job looks (default "1h").
    #[serde(default = "default_check_every")]
    pub check_every: String,
}

fn default_check_every() -> String {
    "1h".into()
}

/// What retention does with an old segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionAction {
    Archive,
    Delete,
}

impl RetentionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionAction::Archive => "archive",
            RetentionAction::Delete => "delete",
        }
    }
}

/// Longest `after`: a century.
const MAX_AGE: Duration = Duration::from_secs(100 * 365 * 86_400);

fn duration(text: &str, example: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{}` is not a duration like \"{example}\": {e}", text.escape_default()))
}

impl RetentionSection {
    /// `after` as a duration.
    pub fn age(&self) -> Duration {
        duration(&self.after, "90d").unwrap_or(MAX_AGE)
    }

    /// `check_every` as a duration.
    pub fn interval(&self) -> Duration {
        duration(&self.check_every, "1h").unwrap_or(Duration::from_secs(3600))
    }

    /// Refuses nonsense, naming the key: `(key, reason)`. `store` is the
    /// store's folder (an archive inside it would be removed with it),
    /// `postgres` whether the store is PostgreSQL (not supported yet).
    pub fn check(&self, store: &Path, postgres: bool) -> Result<(), (&'static str, String)> {
        if postgres {
            return Err((
                "audit.retention",
                "is not supported on the PostgreSQL store yet (its audit log is rows, not segment \
                 files): remove [audit.retention], and keep the rows or move them out with the \
                 database's own tools"
                    .into(),
            ));
        }
        let age = duration(&self.after, "90d").map_err(|e| ("audit.retention.after", e))?;
        if !(Duration::from_secs(1)..=MAX_AGE).contains(&age) {
            return Err(("audit.retention.after", "must be from 1s to 100 years, e.g. \"90d\"".into()));
        }
        let every = duration(&self.check_every, "1h").map_err(|e| ("audit.retention.check_every", e))?;
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&every) {
            return Err(("audit.retention.check_every", "must be from 1s to 1d".into()));
        }
        match (self.action, &self.archive_dir) {
            (RetentionAction::Archive, None) => Err((
                "audit.retention.archive_dir",
                "is needed with `action = \"archive\"`: the folder the compressed segments go to".into(),
            )),
            (RetentionAction::Delete, Some(_)) => Err((
                "audit.retention.archive_dir",
                "is for `action = \"archive\"`; `delete` archives nothing (remove one of them)".into(),
            )),
            (RetentionAction::Archive, Some(dir)) if !dir.is_absolute() => {
                Err(("audit.retention.archive_dir", "must be an absolute path".into()))
            }
            (RetentionAction::Archive, Some(dir)) if dir.starts_with(store) || store.starts_with(dir) => {
                Err((
                    "audit.retention.archive_dir",
                    format!("must be outside the store's folder {} (and not hold it)", store.display()),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// What one run would remove.
#[derive(Debug)]
struct Plan {
    segments: Vec<SegmentInfo>,
    /// The first record removed (or the first kept, when none was left
    /// before the segments).
    from: u64,
    boundary: Boundary,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Finds the segments to remove: oldest first, while each is not the one
/// being written, sealed to its last record, shipped by every sink
/// (`shipped`: the lowest sink cursor), and its newest record older than
/// `cutoff_ms`. Blocking.
fn plan(store: &Store, shipped: Option<u64>, cutoff_ms: u64) -> Result<Option<Plan>, String> {
    let files = store.audit_files().ok_or("this store has no audit segment files")?;
    let segments = files.segments();
    let last_sealed = match store.audit_scan(AuditKind::Seal, u64::MAX, true).find_map(Result::ok) {
        Some((seq, _)) => seq,
        None => return Ok(None),
    };
    let old = files.boundary().map_err(|e| e.to_string())?;
    let mut take = 0;
    for pair in segments.windows(2) {
        let last = pair[1].first.saturating_sub(1);
        if last > last_sealed || shipped.is_some_and(|c| last > c) {
            break;
        }
        // Its newest record is no newer than the next segment's first.
        let newest = match store.audit_scan(AuditKind::Record, pair[1].first, false).next() {
            Some(Ok((_, bytes))) => {
                serde_json::from_slice::<keyhaven::wire::AuditRecord>(&bytes)
                    .map_err(|e| format!("record {} does not decode: {e}", pair[1].first))?
                    .time_ms
            }
            Some(Err(e)) => {
                return Err(format!("cannot read the segment after {}: {e}", pair[0].path.display()))
            }
            None => break,
        };
        if newest > cutoff_ms {
            break;
        }
        take += 1;
    }
    if take == 0 {
        return Ok(None);
    }
    let keep_from = segments[take].first;
    let last = keep_from - 1;
    let prev = match store.audit_scan(AuditKind::Record, last, true).next() {
        Some(Ok((seq, bytes))) if seq == last => hex(&Sha256::digest(&bytes)),
        Some(Err(e)) => {
            return Err(format!(
                "record {last}, the last one to remove, is not intact ({e}): nothing removed; run `keyhaven \
                 audit verify`"
            ))
        }
        _ => return Err(format!("record {last}, the last one to remove, is missing: nothing removed")),
    };
    let first_present = segments[0].first.max(old.map_or(1, |b| b.first));
    Ok(Some(Plan {
        segments: segments[..take].to_vec(),
        from: first_present,
        boundary: Boundary { first: keep_from, prev },
    }))
}

/// The name of a segment's archive in the archive folder.
pub fn archive_name(first: u64) -> String {
    format!("{}.gz", segment_name(first))
}

/// Writes each segment gzip-compressed into `dir` (a temporary file,
/// synced, renamed), then syncs the folder. Blocking.
fn archive(segments: &[SegmentInfo], dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the archive folder {}: {e}", dir.display()))?;
    for seg in segments {
        let to = dir.join(archive_name(seg.first));
        let tmp = dir.join(format!("{}.tmp", archive_name(seg.first)));
        let write = || -> std::io::Result<()> {
            let mut input = std::fs::File::open(&seg.path)?;
            let out =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            // Only the frames: a segment's length is its data.
            std::io::copy(&mut std::io::Read::take(&mut input, seg.len), &mut gz)?;
            let out = gz.finish()?;
            out.sync_all()?;
            drop(out);
            std::fs::rename(&tmp, &to)
        };
        write().map_err(|e| format!("cannot archive {} to {}: {e}", seg.path.display(), to.display()))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync the archive folder {}: {e}", dir.display()))?;
    Ok(())
}

/// One run of the job: plans, archives, records, removes. Failures are
/// audited (outcome `error`, actor `daemon`) and logged.
pub async fn run_once(d: &Arc<Daemon>) {
    let Some(cfg) = d.config.audit.retention.clone() else { return };
    let result = run_inner(d, &cfg).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "audit retention failed; retried at the next check");
        let change = Change {
            reason: Some(format!(
                "audit retention ({} after {}) failed: {e}",
                cfg.action.as_str(),
                cfg.after
            )),
            ..Change::default()
        };
        let subject = Subject { change, ..Subject::default() };
        if let Err(e2) = d.audit.daemon_event(RETENTION_OP, DAEMON_ACTOR, subject, Err(e)).await {
            tracing::error!(error = %e2, "cannot write the audit record of the failed retention");
        }
    }
}

async fn run_inner(d: &Arc<Daemon>, cfg: &RetentionSection) -> Result<Option<Plan>, Error> {
    let shipped = d.audit.sink_status().iter().map(|s| s.delivered).min();
    let cutoff = now_ms().saturating_sub(cfg.age().as_millis() as u64);
    let store = d.store.clone();
    let found = tokio::task::spawn_blocking(move || plan(&store, shipped, cutoff))
        .await
        .map_err(|e| Error::Internal(format!("retention task: {e}")))?
        .map_err(Error::Internal)?;
    let Some(plan) = found else { return Ok(None) };
    if let (RetentionAction::Archive, Some(dir)) = (cfg.action, cfg.archive_dir.clone()) {
        let segs = plan.segments.clone();
        tokio::task::spawn_blocking(move || archive(&segs, &dir))
            .await
            .map_err(|e| Error::Internal(format!("retention task: {e}")))?
            .map_err(Error::Internal)?;
    }
    let last = plan.boundary.first - 1;
    let names: Vec<String> = plan
        .segments
        .iter()
        .map(|s| s.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        .collect();
    let records = plan.boundary.first.saturating_sub(plan.from);
    let after = serde_json::json!({
        "action": cfg.action.as_str(),
        "segments": names,
        "records": records,
        "from": plan.from,
        "through": last,
        "first_kept": plan.boundary.first,
        "prev": plan.boundary.prev,
        "archive_dir": cfg.archive_dir.as_ref().map(|p| p.display().to_string()),
    });
    let verb = match cfg.action {
        RetentionAction::Archive => "archived",
        RetentionAction::Delete => "deleted",
    };
    let change = Change {
        reason: Some(format!(
            "audit retention: segments whose newest record is older than {} ([audit.retention] after)",
            cfg.after
        )),
        before: None,
        after: Some(after),
        detail: Some(format!(
            "{verb} {} segment(s), records {} to {last} ({records} records); the log now starts at record {}",
            names.len(),
            plan.from,
            plan.boundary.first
        )),
    };
    let subject = Subject { change, ..Subject::default() };
    // Durable before anything is removed: the boundary needs it.
    d.audit.daemon_event(RETENTION_OP, DAEMON_ACTOR, subject, Ok(())).await?;
    let store = d.store.clone();
    let boundary = plan.boundary.clone();
    let removed = tokio::task::spawn_blocking(move || match store.audit_files() {
        Some(f) => f.retire(&boundary).map_err(Error::from),
        None => Err(Error::Internal("this store has no audit segment files".into())),
    })
    .await
    .map_err(|e| Error::Internal(format!("retention task: {e}")))??;
    tracing::info!(
        action = cfg.action.as_str(),
        segments = removed.len(),
        records,
        first_kept = plan.boundary.first,
        "audit retention: {verb} segments up to record {last}"
    );
    Ok(Some(plan))
}

/// Whether the retention record `bytes` vouches for `boundary` (used by
/// the chain walk).
pub fn vouches_for(bytes: &[u8], boundary: &Boundary) -> bool {
    #[derive(Deserialize)]
    struct After {
        first_kept: u64,
        prev: String,
    }
    let Ok(r) = serde_json::from_slice::<keyhaven::wire::AuditRecord>(bytes) else { return false };
    r.op == RETENTION_OP
        && r.outcome == "ok"
        && r.after
            .and_then(|a| serde_json::from_value::<After>(a).ok())
            .is_some_and(|a| a.first_kept == boundary.first && a.prev == boundary.prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(after: &str, action: RetentionAction, dir: Option<&str>) -> RetentionSection {
        RetentionSection {
            after: after.into(),
            action,
            archive_dir: dir.map(PathBuf::from),
            check_every: "1h".into(),
        }
    }

    #[test]
    fn nonsense_is_refused_naming_the_key() {
        let store = Path::new("/var/lib/keyhaven");
        let key = |s: RetentionSection, pg: bool| s.check(store, pg).err().map(|e| e.0);
        use RetentionAction::*;
        assert_eq!(key(section("90d", Archive, Some("/srv/archive")), false), None);
        assert_eq!(key(section("90d", Delete, None), false), None);
        assert_eq!(key(section("ninety days", Delete, None), false), Some("audit.retention.after"));
        assert_eq!(key(section("0s", Delete, None), false), Some("audit.retention.after"));
        assert_eq!(key(section("200years", Delete, None), false), Some("audit.retention.after"));
        assert_eq!(key(section("90d", Archive, None), false), Some("audit.retention.archive_dir"));
        assert_eq!(key(section("90d", Delete, Some("/srv/a")), false), Some("audit.retention.archive_dir"));
        assert_eq!(key(section("90d", Archive, Some("archive")), false), Some("audit.retention.archive_dir"));
        assert_eq!(
            key(section("90d", Archive, Some("/var/lib/keyhaven/old")), false),
            Some("audit.retention.archive_dir")
        );
        assert_eq!(key(section("90d", Archive, Some("/var")), false), Some("audit.retention.archive_dir"));
        assert_eq!(key(section("90d", Delete, None), true), Some("audit.retention"));
        let mut s = section("90d", Delete, None);
        s.check_every = "0s".into();
        assert_eq!(key(s, false), Some("audit.retention.check_every"));
    }
}
