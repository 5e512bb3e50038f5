//! The embedded store: one sled database, a tree per concern (`meta`,
//! `keyring`, `revocations`, `audit`). Records are JSON. Keyring keys are
//! `tenant/key`, so that one tenant's keys are a prefix scan; revocation keys
//! name their scope (see [`revocation_key`]).
//!
//! The audit log is not in sled: it lives in append-only segment files in
//! the `audit/` folder next to sled's own ([`AuditFiles`], docs/AUDIT.md
//! §4), which this store owns and delegates to. Stores made before kept it
//! in an `audit` tree (keys `r` or `s` then the sequence number as 8
//! big-endian bytes) made durable by `audit.wal`; opening such a store
//! moves it into the files once ([`migrate_audit`]).
//!
//! **A write that fails** (a full disk: docs/OPERATIONS.md §7.1). sled
//! applies a change in memory, then writes its log; when that write fails
//! it keeps the error and refuses every later write until the database is
//! opened again, and the change it failed to write is still in its memory.
//! So the store does not use those handles again: it closes them and opens
//! the database afresh from its files (what a restart would do, without
//! one), settles the token's anchor on what the files hold (the write
//! happened or not), and forgets its cached keys. Until a write succeeds
//! the store is *failing*: writes are tried at most every
//! [`RETRY_EVERY`], backing off to [`RETRY_MAX`] while they keep failing
//! (each failure opens the database again, which reads sled's log), and refused
//! meanwhile with the error that names the condition and the place; reads
//! are served from the reopened files (or refused while they cannot be
//! opened). Readers never see a change before it is durable: a key being
//! written is pinned in the cache at its old record until its write is,
//! and so is the meta record (aliases, master keys).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;
use serde::de::DeserializeOwned;

use super::audit_files::{self, AuditFiles};
use super::state::{commit, commit_all, prepare, prepare_all, Anchor, AnchorState, Anchored, StateDigest};
use super::{
    AuditIter, AuditKind, Backend, KeyChange, KeyRecord, KeysChange, Meta, MetaChange, StoreError,
    StoreFuture,
};

/// sled's handles: one database and its trees. Replaced by fresh ones
/// when a write fails (see the module docs).
struct Trees {
    db: sled::Db,
    meta: sled::Tree,
    keyring: sled::Tree,
    revocations: sled::Tree,
}

/// How often a failing store tries a write again (and opens its files
/// again), at most.
pub const RETRY_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// ... and at least this often while writes keep failing (the interval
/// doubles at each failure up to this).
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// A store whose last write failed (see the module docs).
struct Failing {
    /// Why (names the condition and the place).
    error: StoreError,
    /// Since when, for the log line when it recovers.
    since: std::time::Instant,
    /// When the next write or opening may be tried.
    next: std::time::Instant,
    /// The wait after the next failure ([`RETRY_EVERY`] doubling up to
    /// [`RETRY_MAX`]).
    interval: std::time::Duration,
}

impl Failing {
    /// After a failed try: the next one waits `interval`, which doubles.
    fn backoff(&mut self) {
        self.next = std::time::Instant::now() + self.interval;
        self.interval = (self.interval * 2).min(RETRY_MAX);
    }
}

/// sled behind [`Store`].
pub struct SledStore {
    path: PathBuf,
    /// The open database; `None` while it cannot be opened again after a
    /// failed write (see the module docs).
    trees: RwLock<Option<Arc<Trees>>>,
    audit: AuditFiles,
    /// Decoded keyring records, kept in step with every write made through
    /// this store, so that the request path does not decode JSON and base64
    /// for every request. A record being written is pinned here at its old
    /// value (`None`: no key yet) until the write is durable, so that no
    /// reader sees it before; writers hold the lock across their
    /// compare-and-swap, so the cache never goes back to an older record.
    keys: RwLock<HashMap<Vec<u8>, Option<Arc<KeyRecord>>>>,
    /// The meta record (aliases, master keys) pinned at its old value
    /// (`Some(None)`: none yet) while a write of it is under way, as a key
    /// is in `keys`: readers get it, not sled's copy of the new one, until
    /// that is durable. `None` while no write of it is under way (readers
    /// read sled). Readers hold it across their read of sled, so that a
    /// writer pins it before its change reaches sled's memory.
    meta_pin: RwLock<Option<Option<Vec<u8>>>>,
    /// For tests only (`KEYHAVEN_TEST_META_WRITE_DELAY_MS`, at most 1 s;
    /// zero otherwise): a wait between a meta record's change reaching
    /// sled's memory and its flush, so that a test's readers meet the
    /// write under way.
    meta_write_delay: std::time::Duration,
    /// The token's anchor and the digest of every record, once
    /// [`attach_anchor`](SledStore::attach_anchor) has checked the store
    /// against it (docs/SECURITY.md §3). Also the writers' lock: every
    /// mutation holds it from its anchor's `pending` to its `committed`.
    anchored: Mutex<Option<Anchored>>,
    /// Set while writes fail (see the module docs).
    failing: Mutex<Option<Failing>>,
}

/// The trees whose records the anchor covers.
const ANCHORED_TREES: [&str; 3] = ["meta", "keyring", "revocations"];

const META_KEY: &[u8] = b"meta";

/// The test-only knob of `meta_write_delay` (see [`SledStore`]).
pub const TEST_META_WRITE_DELAY_ENV: &str = "KEYHAVEN_TEST_META_WRITE_DELAY_MS";

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// sled's page cache, bytes.
const CACHE_BYTES: u64 = 16 << 20;

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

/// Opens sled's database and its trees. sled 0.34 writes a snapshot when it
/// opens a database whose log went on since the last one, first as
/// `snap.N.generating`, renamed once whole and synced; a write cut short (a
/// full disk) leaves that file, which the next opening takes for the newest
/// snapshot and refuses as corrupt, for ever (sled issue #1527). Such a
/// file is never a snapshot sled finished (it would have been renamed), so
/// when opening fails as corrupt and there is one, it is removed (logged)
/// and the opening tried once more. sled holds the store's lock before it
/// reads snapshots, so no other sled is writing one then.
fn open_trees(path: &Path) -> Result<Trees, StoreError> {
    match open_trees_once(path) {
        Err(StoreError::Backend(m)) if m.contains(CORRUPT) => {
            let unfinished: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .map(|n| n.to_string_lossy())
                                .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if unfinished.is_empty() {
                return Err(StoreError::Backend(m));
            }
            for f in &unfinished {
                tracing::warn!(
                    "{}: a snapshot sled never finished writing (cut short, e.g. by a full disk); removed, \
                     since sled would refuse to open the store because of it",
                    f.display()
                );
                std::fs::remove_file(f).map_err(|e| super::unwritable(f, "cannot remove it", &e))?;
            }
            std::fs::File::open(path)
                .and_then(|d| d.sync_all())
                .map_err(|e| super::unwritable(path, "cannot sync the folder", &e))?;
            open_trees_once(path)
        }
        other => other,
    }
}

/// What sled's corruption error says (`Error::Corruption`).
const CORRUPT: &str = "Read corrupted data";

fn open_trees_once(path: &Path) -> Result<Trees, StoreError> {
    // A bounded page cache (sled would otherwise keep up to 1 GiB).
    let db = sled::Config::new().cache_capacity(CACHE_BYTES).path(path).open().map_err(|e| match e {
        // sled says "could not acquire lock on …: Os { code: 11, kind: WouldBlock, … }".
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock") =>
        {
            StoreError::Backend(format!(
                "another keyhavend holds the store at {} (its lock is taken): stop it first, or use its socket",
                path.display()
            ))
        }
        sled::Error::Io(io) if super::io_condition(&io) != "io_error" => {
            super::unwritable(path, "cannot open the store", &io)
        }
        sled::Error::Io(io) => StoreError::Backend(format!("cannot open the store at {}: {io}", path.display())),
        other => StoreError::Backend(format!("cannot open the store at {}: {other}", path.display())),
    })?;
    let meta = db.open_tree("meta").map_err(|e| sled_err(path, e))?;
    let keyring = db.open_tree("keyring").map_err(|e| sled_err(path, e))?;
    let revocations = db.open_tree("revocations").map_err(|e| sled_err(path, e))?;
    Ok(Trees { db, meta, keyring, revocations })
}

/// A sled error met while using the store at `path`: an I/O error is
/// [`StoreError::Unwritable`] (naming its condition and the place).
fn sled_err(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => super::unwritable(path, "sled could not write its log", &io),
        other => backend(other),
    }
}

impl SledStore {
    /// Opens (or creates) the store directory.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        let trees = open_trees(path)?;
        let audit = migrate_audit(path, &trees.db)?;
        Ok(SledStore {
            path: path.to_owned(),
            trees: RwLock::new(Some(Arc::new(trees))),
            audit,
            keys: Default::default(),
            meta_pin: Default::default(),
            meta_write_delay: std::env::var(TEST_META_WRITE_DELAY_ENV)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(std::time::Duration::ZERO, |ms| std::time::Duration::from_millis(ms.min(1000))),
            anchored: Mutex::new(None),
            failing: Mutex::new(None),
        })
    }

    fn failing(&self) -> MutexGuard<'_, Option<Failing>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open database, to read: when a failed write left none, it is
    /// opened again (when the next try is due), else refused with the
    /// failure's error.
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        if let Some(t) = self.trees.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(t.clone());
        }
        let mut w = self.writer();
        self.reopen_if_due(&mut w)
    }

    /// The open database, for a writer (holding the writers' lock `w`): a
    /// failing store tries again only when the next try is due (every
    /// [`RETRY_EVERY`] to [`RETRY_MAX`]), and refuses in between with the
    /// failure's error; it opens the database again
    /// first when a failed write left none.
    fn trees_to_write(&self, w: &mut Option<Anchored>) -> Result<Arc<Trees>, StoreError> {
        {
            let mut f = self.failing();
            if let Some(f) = f.as_mut() {
                if std::time::Instant::now() < f.next {
                    return Err(again(&f.error));
                }
            }
        }
        let open = self.trees.read().unwrap_or_else(|e| e.into_inner()).clone();
        match open {
            Some(t) => Ok(t),
            None => self.reopen(w),
        }
    }

    /// [`reopen`](Self::reopen) when there is no open database and the
    /// next try is due; else the open one, or the failure.
    fn reopen_if_due(&self, w: &mut Option<Anchored>) -> Result<Arc<Trees>, StoreError> {
        if let Some(t) = self.trees.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(t.clone());
        }
        {
            let mut f = self.failing();
            if let Some(f) = f.as_mut() {
                if std::time::Instant::now() < f.next {
                    return Err(again(&f.error));
                }
            }
        }
        let trees = self.reopen(w)?;
        // Opened by a reader or `health`, not by a failed write: the next
        // write may be tried at once.
        if let Some(f) = self.failing().as_mut() {
            f.next = std::time::Instant::now();
            f.interval = RETRY_EVERY;
        }
        Ok(trees)
    }

    /// After a write failed (`error`), under the writers' lock: the store
    /// is failing; sled's handles, which may hold the change in memory
    /// only, are closed, and the database is opened afresh from its files
    /// (see the module docs). Returns `error` for the caller.
    fn write_failed(&self, w: &mut Option<Anchored>, error: StoreError) -> StoreError {
        {
            let mut f = self.failing();
            match f.as_mut() {
                Some(f) => {
                    f.error = again(&error);
                    f.backoff();
                }
                None => {
                    tracing::error!(
                        "the store cannot be written: {error}; writes are refused, and tried again every \
                         {} ms to {} s, until they succeed (docs/OPERATIONS.md §7.1)",
                        RETRY_EVERY.as_millis(),
                        RETRY_MAX.as_secs()
                    );
                    let now = std::time::Instant::now();
                    *f = Some(Failing {
                        error: again(&error),
                        since: now,
                        next: now + RETRY_EVERY,
                        interval: RETRY_EVERY * 2,
                    });
                }
            }
        }
        if let Err(e) = self.reopen(w) {
            tracing::debug!("the store cannot be opened again yet: {e}");
        }
        error
    }

    /// A write succeeded: the store is not failing any more.
    fn write_succeeded(&self) {
        let mut f = self.failing();
        if let Some(was) = f.take() {
            tracing::warn!(
                "the store can be written again, after {:.1} s of refused writes ({})",
                was.since.elapsed().as_secs_f64(),
                was.error
            );
        }
    }

    /// Closes sled's handles and opens the database again from its files,
    /// under the writers' lock: the write in doubt (if any) is settled
    /// against the token's anchor, the key cache is emptied. While this
    /// fails, the store has no open database.
    fn reopen(&self, w: &mut Option<Anchored>) -> Result<Arc<Trees>, StoreError> {
        // The key cache is kept meanwhile: it holds durable records only
        // (a record being written is pinned at its old one), so requests
        // on keys in it are still served while the store cannot be opened.
        let old = self.trees.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(old) = old {
            close(old);
        }
        // sled's own threads let go of the file lock shortly after the
        // last handle: try for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let trees = loop {
            match open_trees(&self.path) {
                Ok(t) => break Arc::new(t),
                Err(StoreError::Backend(m))
                    if m.contains("its lock is taken") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    if let Some(f) = self.failing().as_mut() {
                        f.backoff();
                    }
                    return Err(e);
                }
            }
        };
        if super::state::in_doubt(w) {
            super::state::settle(w, state_digest(&trees)?)?;
        }
        // The files may hold the write that failed (settled above): read
        // every key afresh.
        self.keys.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.unpin_meta();
        *self.trees.write().unwrap_or_else(|e| e.into_inner()) = Some(trees.clone());
        tracing::info!("the store at {} was opened again from its files", self.path.display());
        Ok(trees)
    }

    /// Runs a write (`f`, with the open database and the writers' lock):
    /// on a failure of the store's files, the store is failing (see the
    /// module docs); on success, it is not any more.
    fn write<T>(
        &self,
        f: impl FnOnce(&Trees, &mut Option<Anchored>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut w = self.writer();
        let trees = self.trees_to_write(&mut w)?;
        match f(&trees, &mut w) {
            Ok(v) => {
                self.write_succeeded();
                Ok(v)
            }
            Err(e @ StoreError::Unwritable { .. }) => {
                drop(trees);
                Err(self.write_failed(&mut w, e))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the store can be written, trying a small write when it was
    /// failing (for `health`): a value in sled's default tree, which the
    /// anchor does not cover and nothing reads.
    fn probe_failure(&self) -> Option<super::StoreFailure> {
        let failing = |f: &Option<Failing>| {
            f.as_ref()
                .map(|f| super::StoreFailure { condition: f.error.condition(), message: f.error.to_string() })
        };
        if self.failing().is_none() {
            return None;
        }
        let probe = self.write(|t, _| {
            let now = crate::clock::now_unix().to_be_bytes();
            t.db.insert(b"write-probe", &now[..]).map_err(|e| sled_err(&self.path, e))?;
            t.db.flush().map_err(|e| sled_err(&self.path, e))?;
            Ok(())
        });
        match probe {
            Ok(()) => None,
            Err(_) => failing(&self.failing()),
        }
    }

    /// Checks the store against the token's anchor, then anchors every
    /// write from now on (see [`Backend::attach_anchor`]).
    pub fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        let trees = self.trees()?;
        let mut guard = self.writer();
        let (anchored, state) = super::state::attach(anchor, state_digest(&trees)?)?;
        *guard = Some(anchored);
        Ok(state)
    }

    /// Anchors the store as it is now, whatever the token held (see
    /// [`Backend::accept_as_is`]).
    pub fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        let (anchored, old) = super::state::accept(anchor, state_digest(&*self.trees()?)?)?;
        *self.writer() = Some(anchored);
        Ok(old)
    }

    /// The writers' lock (see `anchored`).
    fn writer(&self) -> MutexGuard<'_, Option<Anchored>> {
        self.anchored.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The digest of every anchored record as the store holds them now.
fn state_digest(t: &Trees) -> Result<StateDigest, StoreError> {
    let mut digest = StateDigest::default();
    for (name, tree) in ANCHORED_TREES.iter().zip([&t.meta, &t.keyring, &t.revocations]) {
        for kv in tree.iter() {
            let (k, v) = kv.map_err(backend)?;
            digest.load(name, &k, &v);
        }
    }
    digest.finish_load();
    Ok(digest)
}

/// A failure's error again, for the writes refused while the store is
/// failing (the error itself is not `Clone`).
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unwritable { place, condition, what } => {
            StoreError::Unwritable { place: place.clone(), condition, what: what.clone() }
        }
        other => StoreError::Backend(other.to_string()),
    }
}

/// Drops sled's handles, once nobody else holds them (readers let go
/// within microseconds; a few seconds at most are waited for).
fn close(trees: Arc<Trees>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut trees = trees;
    loop {
        match Arc::try_unwrap(trees) {
            Ok(t) => {
                drop(t);
                return;
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                trees = shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(shared) => {
                tracing::warn!("sled's handles are still held after 5 s; opening the store anyway");
                drop(shared);
                return;
            }
        }
    }
}

/// The audit log's folder, in the store's.
pub const AUDIT_DIR: &str = "audit";
/// The write-ahead file of stores from before the segment files.
pub const OLD_WAL: &str = "audit.wal";
/// The tree that held the audit log in stores from before the segment files.
const OLD_TREE: &[u8] = b"audit";

/// Opens the audit log's segment files; first, when the store still has
/// its log in the old `audit` tree (and maybe `audit.wal`), moves it there:
/// the write-ahead file's records that continue the tree's chain are put
/// back into the tree (as the old daemon did at start), the tree's entries
/// are written in sequence order (a seal after its record) into a
/// temporary folder that is synced and then renamed to `audit/`, and only
/// then are the tree and the old file removed. A crash before the rename
/// leaves the old layout whole (the move starts again); after it, the
/// folder is the log, and the tree and file are left-overs removed here.
pub fn migrate_audit(path: &Path, db: &sled::Db) -> Result<AuditFiles, StoreError> {
    let dir = path.join(AUDIT_DIR);
    let wal = path.join(OLD_WAL);
    let had_tree = db.tree_names().iter().any(|n| &n[..] == OLD_TREE);
    if !had_tree && !wal.exists() {
        return AuditFiles::open(&dir);
    }
    let moved = std::fs::read_dir(&dir)
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))));
    let tree = db.open_tree(OLD_TREE).map_err(backend)?;
    if !moved {
        if wal.exists() {
            let n = replay_old_wal(&wal, &tree)?;
            if n > 0 {
                tracing::warn!("{}: put back {n} audit records or seals the tree had lost", wal.display());
            }
        }
        let tmp = path.join("audit.migrating");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| StoreError::Backend(format!("cannot remove {}: {e}", tmp.display())))?;
        }
        let files = AuditFiles::open(&tmp)?;
        let (mut records, mut seals) = (0u64, 0u64);
        let mut r = tree.scan_prefix(b"r").peekable();
        let mut s = tree.scan_prefix(b"s").peekable();
        loop {
            let seq_of = |kv: Option<&sled::Result<(sled::IVec, sled::IVec)>>| match kv {
                Some(Ok((k, _))) => Some(old_seq(k)),
                Some(Err(_)) => Some(0),
                None => None,
            };
            let take_seal = match (seq_of(r.peek()), seq_of(s.peek())) {
                (None, None) => break,
                (Some(a), Some(b)) => b < a,
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            let (k, v) = if take_seal { s.next() } else { r.next() }
                .transpose()
                .map_err(backend)?
                .ok_or_else(|| StoreError::Backend("audit tree: an entry vanished".into()))?;
            let kind = if take_seal { AuditKind::Seal } else { AuditKind::Record };
            files.put(kind, old_seq(&k), &v);
            if take_seal {
                seals += 1;
            } else {
                records += 1;
            }
            if (records + seals) % 4096 == 0 {
                files.flush()?;
            }
        }
        files.flush()?;
        drop(files);
        if dir.exists() {
            // An empty folder (nothing was ever written to it).
            std::fs::remove_dir_all(&dir)
                .map_err(|e| StoreError::Backend(format!("cannot remove {}: {e}", dir.display())))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| {
            StoreError::Backend(format!("cannot rename {} to {}: {e}", tmp.display(), dir.display()))
        })?;
        std::fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Backend(format!("cannot sync the folder {}: {e}", path.display())))?;
        tracing::info!(
            "moved the audit log ({records} records, {seals} seals) from the sled tree into {}",
            dir.display()
        );
    }
    if moved && !tree.is_empty() {
        // A move whose rename happened but not the rest (a crash): these
        // entries are in the folder already.
        tracing::warn!(
            "the old sled tree `audit` still held {} entries, moved already into {}; removing them",
            tree.len(),
            dir.display()
        );
    }
    drop(tree);
    db.drop_tree(OLD_TREE).map_err(backend)?;
    db.flush().map_err(backend)?;
    if wal.exists() {
        std::fs::remove_file(&wal)
            .map_err(|e| StoreError::Backend(format!("cannot remove {}: {e}", wal.display())))?;
    }
    AuditFiles::open(&dir)
}

/// The sequence number of an old audit tree key (0 when it has none).
fn old_seq(k: &[u8]) -> u64 {
    k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// The old daemon's start-up replay: puts into the tree the records of the
/// write-ahead file that continue the tree's chain (its `seq` is the last
/// plus one and its `prev` the hash of the last), and the seals among them,
/// stopping at the first frame that is torn, not a frame, or goes back (a
/// stale frame of an earlier run). Returns how many.
fn replay_old_wal(wal: &Path, tree: &sled::Tree) -> Result<u64, StoreError> {
    use sha2::{Digest, Sha256};
    #[derive(serde::Deserialize)]
    struct Link {
        seq: u64,
        prev: String,
    }
    let buf =
        std::fs::read(wal).map_err(|e| StoreError::Backend(format!("cannot read {}: {e}", wal.display())))?;
    let (mut last, mut head) = match tree.scan_prefix(b"r").next_back().transpose().map_err(backend)? {
        Some((k, v)) => (old_seq(&k), Sha256::digest(&v).into()),
        None => (0, [0u8; 32]),
    };
    let (mut at, mut n, mut previous) = (0, 0, 0);
    while let Some((kind, seq, value, len)) = buf.get(at..).and_then(audit_files::read_frame) {
        at += len;
        match kind {
            AuditKind::Record if seq < previous => break,
            AuditKind::Record if seq <= last => previous = seq,
            AuditKind::Record => {
                let links = seq == last + 1
                    && serde_json::from_slice::<Link>(value)
                        .is_ok_and(|r| r.seq == seq && r.prev == crate::audit::hex(&head));
                if !links {
                    break;
                }
                tree.insert(audit_key(AuditKind::Record, seq), value).map_err(backend)?;
                (previous, last) = (seq, seq);
                head = Sha256::digest(value).into();
                n += 1;
            }
            AuditKind::Seal => {
                let key = audit_key(AuditKind::Seal, seq);
                if seq <= last && !tree.contains_key(key).map_err(backend)? {
                    tree.insert(key, value).map_err(backend)?;
                    n += 1;
                }
            }
        }
    }
    tree.flush().map_err(backend)?;
    Ok(n)
}

/// The old audit tree's keys: `r` or `s`, then the sequence number
/// big-endian.
pub fn audit_key(kind: AuditKind, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = match kind {
        AuditKind::Record => b'r',
        AuditKind::Seal => b's',
    };
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn keyring_key(path: &KeyPath) -> Vec<u8> {
    format!("{}/{}", path.tenant(), path.key()).into_bytes()
}

/// The key of a scope's revocation record: `all`, `tenant/T`, `key/T/K`,
/// `version/T/K/N` or `datakey/ID`.
pub(super) fn revocation_key(scope: &Scope) -> Vec<u8> {
    match scope {
        Scope::All => "all".into(),
        Scope::Tenant { tenant } => format!("tenant/{tenant}"),
        Scope::Key { tenant, key, version: None } => format!("key/{tenant}/{key}"),
        Scope::Key { tenant, key, version: Some(v) } => format!("version/{tenant}/{key}/{v}"),
        Scope::Datakey { envelope_id } => format!("datakey/{envelope_id}"),
    }
    .into_bytes()
}

/// The operations, synchronous (sled's calls block); [`Backend`]'s
/// futures run them when polled. Writes go through
/// [`write`](SledStore::write), so that a failed one is handled as the
/// module docs say.
impl SledStore {
    fn err(&self, e: sled::Error) -> StoreError {
        sled_err(&self.path, e)
    }

    fn meta(&self) -> Result<Option<Meta>, StoreError> {
        // The database first (opening it may unpin), then the pin, held
        // across the read of sled. While the database cannot be opened,
        // only a pinned record is served.
        let trees = self.trees();
        let pin = self.meta_pin.read().unwrap_or_else(|e| e.into_inner());
        let value = match &*pin {
            Some(pinned) => pinned.clone(), // a write of it is under way
            None => trees?.meta.get(META_KEY).map_err(|e| self.err(e))?.map(|v| v.to_vec()),
        };
        drop(pin);
        value.map(|v| decode(META_KEY, &v)).transpose()
    }

    /// Pins the meta record at `old` until [`unpin_meta`](Self::unpin_meta),
    /// before a write of it reaches sled (see `meta_pin`).
    fn pin_meta(&self, old: Option<&[u8]>) {
        *self.meta_pin.write().unwrap_or_else(|e| e.into_inner()) = Some(old.map(<[u8]>::to_vec));
    }

    /// The write of the meta record is durable, or did not happen: readers
    /// read sled again.
    fn unpin_meta(&self) {
        *self.meta_pin.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn init_meta(&self, meta: &Meta) -> Result<(), StoreError> {
        self.write(|t, w| {
            let value = encode(meta);
            prepare(w, "meta", META_KEY, Some(&value))?;
            self.pin_meta(None);
            let swapped = t
                .meta
                .compare_and_swap(META_KEY, None as Option<&[u8]>, Some(value.clone()))
                .map_err(|e| self.err(e))?;
            if swapped.is_err() {
                self.unpin_meta();
                return Err(StoreError::AlreadyInitialised(self.path.display().to_string()));
            }
            // On a failure the pin stays until the database is opened
            // again from its files (`reopen`), which settles the write.
            t.db.flush().map_err(|e| self.err(e))?;
            self.unpin_meta();
            commit(w, "meta", META_KEY, Some(&value))
        })
    }

    fn update_meta(&self, change: MetaChange<'_>) -> Result<Meta, StoreError> {
        self.write(|t, w| loop {
            let old = t
                .meta
                .get(META_KEY)
                .map_err(|e| self.err(e))?
                .ok_or_else(|| StoreError::NotInitialised(self.path.display().to_string()))?;
            let mut meta: Meta = decode(META_KEY, &old)?;
            change(&mut meta);
            let value = encode(&meta);
            prepare(w, "meta", META_KEY, Some(&value))?;
            // Readers keep the old record until the new one is durable; on
            // a failure, until the database is opened again from its files
            // (`reopen`), which settles the write.
            self.pin_meta(Some(&old));
            let swapped =
                t.meta.compare_and_swap(META_KEY, Some(old), Some(value.clone())).map_err(|e| self.err(e))?;
            if swapped.is_ok() {
                if !self.meta_write_delay.is_zero() {
                    std::thread::sleep(self.meta_write_delay);
                }
                t.db.flush().map_err(|e| self.err(e))?;
                self.unpin_meta();
                commit(w, "meta", META_KEY, Some(&value))?;
                return Ok(meta);
            }
            self.unpin_meta();
        })
    }

    fn key(&self, path: &KeyPath) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let k = keyring_key(path);
        if let Some(rec) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(rec.clone());
        }
        let t = self.trees()?;
        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if let Some(rec) = cache.get(&k) {
            return Ok(rec.clone()); // pinned by a writer meanwhile
        }
        match t.keyring.get(&k).map_err(|e| self.err(e))? {
            Some(v) => {
                let rec: Arc<KeyRecord> = Arc::new(decode(&k, &v)?);
                cache.insert(k, Some(rec.clone()));
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    /// Pins key `k` in the cache at its record as it is (`old`; `None`:
    /// no key), so that readers see it, not sled's copy, until the write
    /// under way is durable.
    fn pin(&self, k: &[u8], old: Option<&[u8]>) -> Result<(), StoreError> {
        let old = match old {
            Some(v) => Some(Arc::new(decode::<KeyRecord>(k, v)?)),
            None => None,
        };
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(k.to_vec(), old);
        Ok(())
    }

    /// The cache after a durable write of key `k`.
    fn cached(&self, k: Vec<u8>, record: KeyRecord) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(k, Some(Arc::new(record)));
    }

    fn create_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let k = keyring_key(&record.path()?);
        self.write(|t, w| {
            let value = encode(record);
            if t.keyring.contains_key(&k).map_err(|e| self.err(e))? {
                return Err(StoreError::AlreadyExists(format!("key `{}/{}`", record.tenant, record.key)));
            }
            prepare(w, "keyring", &k, Some(&value))?;
            self.pin(&k, None)?;
            let swapped = t
                .keyring
                .compare_and_swap(&k, None as Option<&[u8]>, Some(value.clone()))
                .map_err(|e| self.err(e))?;
            if swapped.is_err() {
                // Only writers change the keyring, and they hold the lock.
                self.keys.write().unwrap_or_else(|e| e.into_inner()).remove(&k);
                return Err(StoreError::AlreadyExists(format!("key `{}/{}`", record.tenant, record.key)));
            }
            t.db.flush().map_err(|e| self.err(e))?;
            self.cached(k.clone(), record.clone());
            commit(w, "keyring", &k, Some(&value))
        })
    }

    fn update_key(&self, path: &KeyPath, change: KeyChange<'_>) -> Result<Option<KeyRecord>, StoreError> {
        let k = keyring_key(path);
        self.write(|t, w| loop {
            let Some(old) = t.keyring.get(&k).map_err(|e| self.err(e))? else { return Ok(None) };
            let mut record: KeyRecord = decode(&k, &old)?;
            change(&mut record);
            let value = encode(&record);
            if value[..] == old[..] {
                return Ok(Some(record)); // nothing changed: nothing to write
            }
            prepare(w, "keyring", &k, Some(&value))?;
            self.pin(&k, Some(&old))?;
            let swapped =
                t.keyring.compare_and_swap(&k, Some(old), Some(value.clone())).map_err(|e| self.err(e))?;
            if swapped.is_ok() {
                t.db.flush().map_err(|e| self.err(e))?;
                self.cached(k.clone(), record.clone());
                commit(w, "keyring", &k, Some(&value))?;
                return Ok(Some(record));
            }
        })
    }

    fn update_keys(&self, paths: &[KeyPath], change: KeysChange<'_>) -> Result<(), StoreError> {
        self.write(|t, w| {
            // Writers hold `w`, so nothing changes these records under us.
            let mut writes: Vec<(Vec<u8>, Vec<u8>, KeyRecord)> = Vec::new();
            let mut olds = Vec::new();
            for path in paths {
                let k = keyring_key(path);
                let Some(old) = t.keyring.get(&k).map_err(|e| self.err(e))? else { continue };
                let mut record: KeyRecord = decode(&k, &old)?;
                change(path, &mut record);
                let value = encode(&record);
                if value[..] != old[..] {
                    writes.push((k, value, record));
                    olds.push(old);
                }
            }
            if writes.is_empty() {
                return Ok(());
            }
            let changes: Vec<(&[u8], Option<&[u8]>)> =
                writes.iter().map(|(k, v, _)| (k.as_slice(), Some(v.as_slice()))).collect();
            prepare_all(w, "keyring", &changes)?;
            let mut batch = sled::Batch::default();
            for ((k, v, _), old) in writes.iter().zip(&olds) {
                self.pin(k, Some(old))?;
                batch.insert(k.as_slice(), v.as_slice());
            }
            t.keyring.apply_batch(batch).map_err(|e| self.err(e))?;
            t.db.flush().map_err(|e| self.err(e))?;
            for (k, _, record) in &writes {
                self.cached(k.clone(), record.clone());
            }
            commit_all(w, "keyring", &changes)
        })
    }

    fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let prefix = tenant.map(|t| format!("{t}/")).unwrap_or_default();
        let t = self.trees()?;
        let mut keys = t
            .keyring
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                decode(&k, &v)
            })
            .collect::<Result<Vec<KeyRecord>, _>>()?;
        // Byte order of `tenant/key` is not tenant-then-key order (`-` < `/`).
        keys.sort_by(|a, b| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
        Ok(keys)
    }

    fn key_count(&self) -> Result<u64, StoreError> {
        Ok(self.trees()?.keyring.len() as u64)
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.trees()?
            .revocations
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                decode(&k, &v)
            })
            .collect()
    }

    fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let k = revocation_key(&revocation.scope);
        let value = encode(revocation);
        self.write(|t, w| {
            prepare(w, "revocations", &k, Some(&value))?;
            t.revocations.insert(&k, value.clone()).map_err(|e| self.err(e))?;
            t.db.flush().map_err(|e| self.err(e))?;
            commit(w, "revocations", &k, Some(&value))
        })
    }

    fn remove_revocation(&self, scope: &Scope) -> Result<Option<Revocation>, StoreError> {
        let k = revocation_key(scope);
        self.write(|t, w| {
            if !t.revocations.contains_key(&k).map_err(|e| self.err(e))? {
                return Ok(None);
            }
            prepare(w, "revocations", &k, None)?;
            match t.revocations.remove(&k).map_err(|e| self.err(e))? {
                Some(v) => {
                    t.db.flush().map_err(|e| self.err(e))?;
                    commit(w, "revocations", &k, None)?;
                    Ok(Some(decode(&k, &v)?))
                }
                None => Ok(None),
            }
        })
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.write(|t, _| {
            t.db.flush().map_err(|e| self.err(e))?;
            Ok(())
        })
    }
}

impl Backend for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn is_cluster(&self) -> bool {
        false
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn meta(&self) -> StoreFuture<'_, Option<Meta>> {
        Box::pin(std::future::ready(SledStore::meta(self)))
    }

    fn init_meta<'a>(&'a self, meta: &'a Meta) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(SledStore::init_meta(self, meta)))
    }

    fn update_meta<'a>(&'a self, change: MetaChange<'a>) -> StoreFuture<'a, Meta> {
        Box::pin(std::future::ready(SledStore::update_meta(self, change)))
    }

    fn key<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<Arc<KeyRecord>>> {
        Box::pin(std::future::ready(SledStore::key(self, path)))
    }

    fn create_key<'a>(&'a self, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(SledStore::create_key(self, record)))
    }

    fn update_key<'a>(
        &'a self,
        path: &'a KeyPath,
        change: KeyChange<'a>,
    ) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(std::future::ready(SledStore::update_key(self, path, change)))
    }

    fn update_keys<'a>(&'a self, paths: &'a [KeyPath], change: KeysChange<'a>) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(SledStore::update_keys(self, paths, change)))
    }

    fn keys<'a>(&'a self, tenant: Option<&'a str>) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(std::future::ready(SledStore::keys(self, tenant)))
    }

    fn key_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(std::future::ready(SledStore::key_count(self)))
    }

    fn revocations(&self) -> StoreFuture<'_, Vec<Revocation>> {
        Box::pin(std::future::ready(SledStore::revocations(self)))
    }

    fn put_revocation<'a>(&'a self, revocation: &'a Revocation) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(SledStore::put_revocation(self, revocation)))
    }

    fn remove_revocation<'a>(&'a self, scope: &'a Scope) -> StoreFuture<'a, Option<Revocation>> {
        Box::pin(std::future::ready(SledStore::remove_revocation(self, scope)))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(self.durable()))
    }

    fn failure(&self) -> Option<super::StoreFailure> {
        self.probe_failure()
    }

    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.audit.put(kind, seq, bytes);
        Ok(())
    }

    fn audit_flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(self.audit.flush()))
    }

    fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        self.audit.scan(kind, from, reverse)
    }

    fn audit_files(&self) -> Option<&AuditFiles> {
        Some(&self.audit)
    }

    fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        SledStore::attach_anchor(self, anchor)
    }

    fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        SledStore::accept_as_is(self, anchor)
    }
}
