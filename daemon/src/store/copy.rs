//! `keyhavend store copy --from CONFIG --to CONFIG`: moves a keyring from
//! one store to another (sled to PostgreSQL, PostgreSQL to sled, or the
//! same kind elsewhere), with every record and the whole audit log.
//!
//! A copy is exact: the records are written as they were read, so the
//! destination's state digest ([`super::state`]) is the one the token's
//! anchor already vouches for, and the copy is verified by anchoring it
//! exactly as a daemon would at start. No anchor is rewritten and no key
//! material leaves the store's wrapped form. The audit log's entries are
//! copied byte for byte, so its hash chain and seals (and the token's audit
//! anchor) hold for the destination as they did for the source.
//!
//! The source must not be written while it is copied (stop its daemons: sled
//! refuses a second opener by its lock; a PostgreSQL writer that slips in is
//! caught because the copy then no longer matches the anchor). Once a daemon
//! writes to one of the two stores, the other is an older copy that the
//! token refuses (docs/SECURITY.md §3): point every configuration at the
//! destination before starting the daemons again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{AuditKind, Store, StoreError};
use crate::anchor::TokenAnchor;
use crate::config::Config;
use crate::hsm::Hsm;

/// Audit entries written per flush.
const AUDIT_BATCH: usize = 512;

/// How often progress is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a copy moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Named keys.
    pub keys: u64,
    /// Revocation records.
    pub revocations: u64,
    /// Audit records.
    pub audit_records: u64,
    /// Audit seals.
    pub audit_seals: u64,
    /// The anchor's write generation that both stores now match.
    pub anchor_generation: u64,
}

/// Copies the store `from` names into the (empty) store `to` names, then
/// verifies the copy against the token's anchor. `progress` receives a line
/// at most once a second and at the end of each part.
pub fn copy(from: &Config, to: &Config, progress: &mut dyn FnMut(&str)) -> anyhow::Result<CopyReport> {
    if from.hsm.token_label != to.hsm.token_label {
        bail!(
            "the two configurations name different tokens (`{}` and `{}`): a keyring can only be copied to a \
             store that the same token anchors",
            from.hsm.token_label,
            to.hsm.token_label
        );
    }
    let source = super::open(from).context("opening the source store")?;
    let destination = super::open(to).context("opening the destination store")?;
    if source.kind() == destination.kind() && source.location() == destination.location() {
        bail!("--from and --to name the same store ({})", source.location());
    }
    let meta = source.check_initialised().context("the source store")?;
    if let Some(other) = destination.meta().context("reading the destination store")? {
        bail!(
            "the destination store {} holds a keyring already (made at Unix time {}): a copy goes only into an \
             empty store",
            destination.location(),
            other.created_at
        );
    }
    for kind in [AuditKind::Record, AuditKind::Seal] {
        if let Some(entry) = destination.audit_scan(kind, 0, false).next() {
            entry.context("reading the destination's audit log")?;
            bail!(
                "the destination store {} holds audit entries already: a copy goes only into an empty store",
                destination.location()
            );
        }
    }

    // A log trimmed by retention starts at its boundary (docs/AUDIT.md
    // §12), which goes with it; PostgreSQL has no boundary yet.
    let boundary = match source.audit_files() {
        Some(f) => f.boundary().context("reading the source's retention boundary")?,
        None => None,
    };
    if let Some(b) = &boundary {
        match destination.audit_files() {
            Some(f) => f.write_boundary(b).context("writing the retention boundary")?,
            None => bail!(
                "the source's audit log was trimmed by retention (it starts at record {}): copying it into \
                 PostgreSQL is not supported yet",
                b.first
            ),
        }
    }

    let hsm_config = from.hsm_config().map_err(anyhow::Error::msg)?;
    let hsm = Arc::new(Hsm::start(hsm_config, meta.master_key_version).context("starting the HSM workers")?);
    let result = copy_with(&source, &destination, TokenAnchor::new(hsm.clone()), progress);
    hsm.shutdown();
    result
}

fn copy_with(
    source: &Store,
    destination: &Store,
    anchor: Arc<TokenAnchor>,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<CopyReport> {
    // The source first: a copy of a store the token does not vouch for
    // would carry its damage along.
    let before = source.attach_anchor(anchor.clone()).map_err(|e| match e {
        StoreError::Tampered(why) => anyhow::anyhow!(
            "the source store {} does not match the token's anchor ({why}); nothing was copied",
            source.location()
        ),
        other => anyhow::Error::new(other).context("checking the source store against the token's anchor"),
    })?;
    let meta = source.check_initialised()?;
    let mut report = CopyReport::default();

    destination.init_meta(&meta).context("writing the destination's global facts")?;

    let keys = source.keys(None).context("reading the source's keys")?;
    let total = keys.len();
    let mut last = Instant::now();
    for (i, record) in keys.iter().enumerate() {
        destination
            .create_key(record)
            .with_context(|| format!("writing key {}/{}", record.tenant, record.key))?;
        report.keys += 1;
        if last.elapsed() >= PROGRESS_EVERY {
            progress(&format!("keys: {}/{total}", i + 1));
            last = Instant::now();
        }
    }
    progress(&format!("keys: {total}/{total}"));

    let revocations = source.revocations().context("reading the source's revocations")?;
    for revocation in &revocations {
        destination.put_revocation(revocation).context("writing a revocation")?;
        report.revocations += 1;
    }
    progress(&format!("revocations: {}", revocations.len()));

    for (kind, name) in [(AuditKind::Record, "audit records"), (AuditKind::Seal, "audit seals")] {
        let mut copied = 0u64;
        let mut pending = 0usize;
        for entry in source.audit_scan(kind, 0, false) {
            let (seq, bytes) = entry.with_context(|| format!("reading the source's {name}"))?;
            destination.audit_put(kind, seq, &bytes)?;
            copied += 1;
            pending += 1;
            if pending == AUDIT_BATCH {
                destination.audit_flush().with_context(|| format!("writing {name}"))?;
                pending = 0;
            }
            if last.elapsed() >= PROGRESS_EVERY {
                progress(&format!("{name}: {copied}"));
                last = Instant::now();
            }
        }
        destination.audit_flush().with_context(|| format!("writing {name}"))?;
        progress(&format!("{name}: {copied}"));
        match kind {
            AuditKind::Record => report.audit_records = copied,
            AuditKind::Seal => report.audit_seals = copied,
        }
    }
    destination.flush().context("making the destination durable")?;

    // The verification: the destination, read back, is the state the token
    // vouches for — as a daemon starting on it would check.
    let after = destination.attach_anchor(anchor).map_err(|e| match e {
        StoreError::Tampered(why) => anyhow::anyhow!(
            "the copy in {} does not match the token's anchor ({why}): was the source written during the \
             copy? Stop every daemon on it and copy again into an empty store",
            destination.location()
        ),
        other => anyhow::Error::new(other).context("checking the copy against the token's anchor"),
    })?;
    if after.generation != before.generation {
        bail!(
            "the token's anchor moved from write {} to {} during the copy: a daemon wrote the source; stop \
             every daemon on it and copy again into an empty store",
            before.generation,
            after.generation
        );
    }
    verify_audit(source, destination, &report)?;
    report.anchor_generation = after.generation;
    Ok(report)
}

/// The destination's audit log holds what the source's does, entry for
/// entry.
fn verify_audit(source: &Store, destination: &Store, report: &CopyReport) -> anyhow::Result<()> {
    for (kind, expected) in [(AuditKind::Record, report.audit_records), (AuditKind::Seal, report.audit_seals)]
    {
        let mut a = source.audit_scan(kind, 0, false);
        let mut b = destination.audit_scan(kind, 0, false);
        let mut n = 0u64;
        loop {
            match (a.next().transpose()?, b.next().transpose()?) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => n += 1,
                (x, y) => bail!(
                    "the copied audit log differs from the source's at entry {}",
                    x.or(y).map(|(seq, _)| seq).unwrap_or_default()
                ),
            }
        }
        if n != expected {
            bail!("the source's audit log changed during the copy ({expected} entries copied, {n} now)");
        }
    }
    Ok(())
}
