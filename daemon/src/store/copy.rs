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
//! A cluster's store holds one audit chain per node (docs/CLUSTER.md §3).
//! PostgreSQL to PostgreSQL copies every chain under its node's name. sled
//! keeps one log: PostgreSQL to sled makes the chain of the node that
//! `--from`'s configuration names the sled store's log, and writes every
//! other node's chain alongside, in `STORE/audit-chains/node-NAME.jsonl`,
//! as a signed export (`keyhaven audit export --signed`'s format, checked
//! offline by `keyhaven audit verify --file`), read back and compared with
//! the source. sled to PostgreSQL makes the sled log the chain of the node
//! `--to`'s configuration names.
//!
//! The source must not be written while it is copied (stop its daemons: sled
//! refuses a second opener by its lock; a PostgreSQL database where a node
//! holds a live lease is refused by name unless the caller allows it, and a
//! writer that slips in is caught because the copy then no longer matches
//! the anchor or the source's chains). Once a daemon
//! writes to one of the two stores, the other is an older copy that the
//! token refuses (docs/SECURITY.md §3): point every configuration at the
//! destination before starting the daemons again.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
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

/// The folder of a sled destination where other nodes' chains go.
pub const EXPORTS: &str = "audit-chains";

/// What a copy moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Named keys.
    pub keys: u64,
    /// Revocation records.
    pub revocations: u64,
    /// Audit records (every chain).
    pub audit_records: u64,
    /// Audit seals (every chain).
    pub audit_seals: u64,
    /// Audit chains copied (1 for a sled source).
    pub chains: u64,
    /// Chains written alongside a sled destination as signed exports.
    pub exported: Vec<PathBuf>,
    /// The anchor's write generation that both stores now match.
    pub anchor_generation: u64,
}

/// How to copy.
#[derive(Debug, Default, Clone)]
pub struct CopyOptions {
    /// Copy even when nodes of a PostgreSQL source or destination hold live
    /// leases (a running daemon would write during the copy, which then
    /// fails its verification).
    pub allow_live_nodes: bool,
}

/// Where one audit chain of the source goes.
#[derive(Debug, Clone)]
enum Dest {
    /// The destination's own log (sled), or the chain of the node its
    /// configuration names (PostgreSQL).
    Log,
    /// Node `NAME`'s chain of a PostgreSQL destination.
    Chain(String),
    /// A signed export file beside a sled destination.
    Export(PathBuf),
}

/// One audit chain to copy: the source's own log (`None`) or a node's.
#[derive(Debug, Clone)]
struct Part {
    from: Option<String>,
    into: Dest,
}

impl Part {
    fn name(&self) -> String {
        match &self.from {
            None => "audit log".into(),
            Some(node) => format!("audit chain of node `{node}`"),
        }
    }
}

/// Copies the store `from` names into the (empty) store `to` names, then
/// verifies the copy against the token's anchor. `progress` receives a line
/// at most once a second and at the end of each part.
pub fn copy(
    from: &Config,
    to: &Config,
    options: &CopyOptions,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<CopyReport> {
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
    for (store, role) in [(&source, "source"), (&destination, "destination")] {
        let live = super::wait(store.backend().live_nodes())
            .with_context(|| format!("reading the {role}'s nodes"))?;
        if !live.is_empty() && !options.allow_live_nodes {
            bail!(
                "node(s) {} hold a live lease in the {role} database {}: a running keyhavend writes there during \
                 the copy. Stop every node first (a clean stop gives its lease up; a killed node's runs out within \
                 its lease), or pass --allow-live-nodes to copy anyway (a write during the copy then fails its \
                 verification)",
                live.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                store.location()
            );
        }
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
    let holds_audit = || {
        bail!(
            "the destination store {} holds audit entries already: a copy goes only into an empty store",
            destination.location()
        )
    };
    for kind in [AuditKind::Record, AuditKind::Seal] {
        if let Some(entry) = destination.audit_scan(kind, 0, false).next() {
            entry.context("reading the destination's audit log")?;
            return holds_audit();
        }
    }
    if !super::wait(destination.backend().audit_chains())
        .context("reading the destination's audit chains")?
        .is_empty()
    {
        return holds_audit();
    }

    // Which chain goes where.
    let chains = super::wait(source.backend().audit_chains()).context("reading the source's audit chains")?;
    let parts: Vec<Part> = if chains.is_empty() {
        vec![Part { from: None, into: Dest::Log }]
    } else if destination.is_cluster() {
        chains.iter().map(|c| Part { from: Some(c.clone()), into: Dest::Chain(c.clone()) }).collect()
    } else {
        let own = from.cluster.node_name().map_err(anyhow::Error::msg)?;
        let folder = to.store.path.join(EXPORTS);
        if std::fs::read_dir(&folder).map(|mut d| d.next().is_some()).unwrap_or(false) {
            bail!("{} holds files already: a copy goes only into an empty store", folder.display());
        }
        chains
            .iter()
            .map(|c| Part {
                from: Some(c.clone()),
                into: match *c == own {
                    true => Dest::Log,
                    false => Dest::Export(folder.join(format!("node-{c}.jsonl"))),
                },
            })
            .collect()
    };

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
    let result = copy_with(&source, &destination, &parts, TokenAnchor::new(hsm.clone()), progress);
    hsm.shutdown();
    result
}

fn copy_with(
    source: &Store,
    destination: &Store,
    parts: &[Part],
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

    let mut copied = Vec::new();
    for part in parts {
        let counts = match &part.into {
            Dest::Export(file) => {
                let counts = export_chain(source, part, file, progress)?;
                report.exported.push(file.clone());
                counts
            }
            _ => copy_chain(source, destination, part, progress)?,
        };
        report.audit_records += counts.0;
        report.audit_seals += counts.1;
        report.chains += 1;
        copied.push(counts);
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
    for (part, counts) in parts.iter().zip(copied) {
        match &part.into {
            Dest::Export(file) => verify_export(source, part, file, counts)?,
            _ => verify_chain(source, destination, part, counts)?,
        }
    }
    progress(&format!("verified: {} audit chain(s) read back equal to the source's", parts.len()));
    report.anchor_generation = after.generation;
    Ok(report)
}

/// The source's entries of `kind` on `part`'s chain.
fn scan_source<'a>(source: &'a Store, part: &Part, kind: AuditKind) -> super::AuditIter<'a> {
    match &part.from {
        None => source.audit_scan(kind, 0, false),
        Some(chain) => source.backend().audit_scan_chain(chain, kind, 0, false),
    }
}

/// The destination's entries of `kind` on `part`'s chain.
fn scan_destination<'a>(destination: &'a Store, part: &Part, kind: AuditKind) -> super::AuditIter<'a> {
    match &part.into {
        Dest::Chain(chain) => destination.backend().audit_scan_chain(chain, kind, 0, false),
        _ => destination.audit_scan(kind, 0, false),
    }
}

/// Copies one chain into the destination's store: `(records, seals)`.
fn copy_chain(
    source: &Store,
    destination: &Store,
    part: &Part,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<(u64, u64)> {
    let name = part.name();
    let mut counts = (0, 0);
    let mut last = Instant::now();
    for kind in [AuditKind::Record, AuditKind::Seal] {
        let what = match kind {
            AuditKind::Record => "records",
            AuditKind::Seal => "seals",
        };
        let mut copied = 0u64;
        let mut pending = 0usize;
        for entry in scan_source(source, part, kind) {
            let (seq, bytes) = entry.with_context(|| format!("reading the source's {name}"))?;
            match &part.into {
                Dest::Chain(chain) => destination.backend().audit_put_chain(chain, kind, seq, &bytes)?,
                _ => destination.audit_put(kind, seq, &bytes)?,
            }
            copied += 1;
            pending += 1;
            if pending == AUDIT_BATCH {
                destination.audit_flush().with_context(|| format!("writing the {name}"))?;
                pending = 0;
            }
            if last.elapsed() >= PROGRESS_EVERY {
                progress(&format!("{name}: {what}: {copied}"));
                last = Instant::now();
            }
        }
        destination.audit_flush().with_context(|| format!("writing the {name}"))?;
        progress(&format!("{name}: {what}: {copied}"));
        match kind {
            AuditKind::Record => counts.0 = copied,
            AuditKind::Seal => counts.1 = copied,
        }
    }
    Ok(counts)
}

/// The destination's copy of a chain holds what the source's does, entry
/// for entry.
fn verify_chain(source: &Store, destination: &Store, part: &Part, counts: (u64, u64)) -> anyhow::Result<()> {
    let name = part.name();
    for (kind, expected) in [(AuditKind::Record, counts.0), (AuditKind::Seal, counts.1)] {
        let mut a = scan_source(source, part, kind);
        let mut b = scan_destination(destination, part, kind);
        let mut n = 0u64;
        loop {
            match (a.next().transpose()?, b.next().transpose()?) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => n += 1,
                (x, y) => bail!(
                    "the copied {name} differs from the source's at entry {}",
                    x.or(y).map(|(seq, _)| seq).unwrap_or_default()
                ),
            }
        }
        if n != expected {
            bail!("the source's {name} changed during the copy ({expected} entries copied, {n} now)");
        }
    }
    Ok(())
}

/// Each line of the signed export of `part`'s chain (as `audit export
/// --signed` prints it: each record's stored bytes, and after the record a
/// seal covers, `{"seal":SEAL}`), in order, to `line`. Returns `(records,
/// seals)`.
fn export_lines(
    source: &Store,
    part: &Part,
    line: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, u64)> {
    let name = part.name();
    let mut seals = Vec::new();
    for entry in scan_source(source, part, AuditKind::Seal) {
        let (seq, bytes) = entry.with_context(|| format!("reading the source's {name}"))?;
        let mut text = b"{\"seal\":".to_vec();
        text.extend_from_slice(&bytes);
        text.push(b'}');
        seals.push((seq, text));
    }
    let n_seals = seals.len() as u64;
    let mut seals = seals.into_iter().peekable();
    let mut records = 0u64;
    for entry in scan_source(source, part, AuditKind::Record) {
        let (seq, bytes) = entry.with_context(|| format!("reading the source's {name}"))?;
        if bytes.contains(&b'\n') {
            bail!("record {seq} of the source's {name} holds a line break: it was altered");
        }
        line(&bytes)?;
        records += 1;
        while let Some((_, seal)) = seals.next_if(|(s, _)| *s <= seq) {
            line(&seal)?;
        }
    }
    for (_, seal) in seals {
        line(&seal)?;
    }
    Ok((records, n_seals))
}

/// Writes `part`'s chain as a signed export to `file` (0600, in a 0700
/// folder), durable before it returns.
fn export_chain(
    source: &Store,
    part: &Part,
    file: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let folder = file.parent().expect("a file in the exports' folder");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
        .with_context(|| format!("creating {}", folder.display()))?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    let mut out = std::io::BufWriter::new(out);
    let name = part.name();
    let mut last = Instant::now();
    let mut lines = 0u64;
    let counts = export_lines(source, part, &mut |line| {
        out.write_all(line)?;
        out.write_all(b"\n")?;
        lines += 1;
        if last.elapsed() >= PROGRESS_EVERY {
            progress(&format!("{name}: exported lines: {lines}"));
            last = Instant::now();
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", file.display()))?;
    let out = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", file.display()))?;
    out.sync_all().with_context(|| format!("writing {}", file.display()))?;
    std::fs::File::open(folder)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("making {} durable", folder.display()))?;
    progress(&format!("{name}: {} records and {} seals exported to {}", counts.0, counts.1, file.display()));
    Ok(counts)
}

/// The export file holds exactly the source's chain, line for line.
fn verify_export(source: &Store, part: &Part, file: &Path, counts: (u64, u64)) -> anyhow::Result<()> {
    let reading = || format!("reading back {}", file.display());
    let mut written = std::io::BufReader::new(std::fs::File::open(file).with_context(reading)?).split(b'\n');
    let mut n = 0u64;
    let now = export_lines(source, part, &mut |line| {
        n += 1;
        match written.next().transpose()? {
            Some(back) if back == line => Ok(()),
            _ => bail!("{} differs from the source's {} at line {n}", file.display(), part.name()),
        }
    })?;
    if written.next().is_some() {
        bail!("{} holds more lines than the source's {}", file.display(), part.name());
    }
    if now != counts {
        bail!("the source's {} changed during the copy", part.name());
    }
    Ok(())
}
