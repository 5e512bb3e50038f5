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

/// sled behind [`Store`].
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    keyring: sled::Tree,
    revocations: sled::Tree,
    audit: AuditFiles,
    /// Decoded keyring records, kept in step with every write made through
    /// this store, so that the request path does not decode JSON and base64
    /// for every request. Writers hold the lock across their
    /// compare-and-swap, so the cache never goes back to an older record.
    keys: RwLock<HashMap<Vec<u8>, Arc<KeyRecord>>>,
    /// The token's anchor and the digest of every record, once
    /// [`attach_anchor`](SledStore::attach_anchor) has checked the store
    /// against it (docs/SECURITY.md §3). Also the writers' lock: every
    /// mutation holds it from its anchor's `pending` to its `committed`.
    anchored: Mutex<Option<Anchored>>,
}

/// The trees whose records the anchor covers.
const ANCHORED_TREES: [&str; 3] = ["meta", "keyring", "revocations"];

const META_KEY: &[u8] = b"meta";

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

impl SledStore {
    /// Opens (or creates) the store directory.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        // A bounded page cache (sled would otherwise keep up to 1 GiB).
        let db =
            sled::Config::new().cache_capacity(CACHE_BYTES).path(path).open().map_err(|e| match e {
                // sled says "could not acquire lock on …: Os { code: 11, kind: WouldBlock, … }".
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    StoreError::Backend(format!(
                    "another keyhavend holds the store at {} (its lock is taken): stop it first, or use its socket",
                    path.display()
                ))
                }
                sled::Error::Io(io) => {
                    StoreError::Backend(format!("cannot open the store at {}: {io}", path.display()))
                }
                other => StoreError::Backend(format!("cannot open the store at {}: {other}", path.display())),
            })?;
        let meta = db.open_tree("meta").map_err(backend)?;
        let keyring = db.open_tree("keyring").map_err(backend)?;
        let revocations = db.open_tree("revocations").map_err(backend)?;
        let audit = migrate_audit(path, &db)?;
        Ok(SledStore {
            path: path.to_owned(),
            db,
            meta,
            keyring,
            revocations,
            audit,
            keys: Default::default(),
            anchored: Mutex::new(None),
        })
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Checks the store against the token's anchor, then anchors every
    /// write from now on (see [`Backend::attach_anchor`]).
    pub fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        let mut guard = self.writer();
        let (anchored, state) = super::state::attach(anchor, self.state_digest()?)?;
        *guard = Some(anchored);
        Ok(state)
    }

    /// Anchors the store as it is now, whatever the token held (see
    /// [`Backend::accept_as_is`]).
    pub fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        let (anchored, old) = super::state::accept(anchor, self.state_digest()?)?;
        *self.writer() = Some(anchored);
        Ok(old)
    }

    /// The digest of every anchored record as the store holds them now.
    fn state_digest(&self) -> Result<StateDigest, StoreError> {
        let mut digest = StateDigest::default();
        for (name, tree) in ANCHORED_TREES.iter().zip([&self.meta, &self.keyring, &self.revocations]) {
            for kv in tree.iter() {
                let (k, v) = kv.map_err(backend)?;
                digest.load(name, &k, &v);
            }
        }
        digest.finish_load();
        Ok(digest)
    }

    /// The writers' lock (see `anchored`).
    fn writer(&self) -> MutexGuard<'_, Option<Anchored>> {
        self.anchored.lock().unwrap_or_else(|e| e.into_inner())
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
/// futures run them when polled.
impl SledStore {
    fn meta(&self) -> Result<Option<Meta>, StoreError> {
        match self.meta.get(META_KEY).map_err(backend)? {
            Some(v) => Ok(Some(decode(META_KEY, &v)?)),
            None => Ok(None),
        }
    }

    fn init_meta(&self, meta: &Meta) -> Result<(), StoreError> {
        let mut w = self.writer();
        let value = encode(meta);
        prepare(&mut w, "meta", META_KEY, Some(&value))?;
        let swapped = self
            .meta
            .compare_and_swap(META_KEY, None as Option<&[u8]>, Some(value.clone()))
            .map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::AlreadyInitialised(self.path.display().to_string()));
        }
        self.durable()?;
        commit(&mut w, "meta", META_KEY, Some(&value))
    }

    fn update_meta(&self, change: MetaChange<'_>) -> Result<Meta, StoreError> {
        let mut w = self.writer();
        loop {
            let old = self
                .meta
                .get(META_KEY)
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotInitialised(self.path.display().to_string()))?;
            let mut meta: Meta = decode(META_KEY, &old)?;
            change(&mut meta);
            let value = encode(&meta);
            prepare(&mut w, "meta", META_KEY, Some(&value))?;
            let swapped =
                self.meta.compare_and_swap(META_KEY, Some(old), Some(value.clone())).map_err(backend)?;
            if swapped.is_ok() {
                self.durable()?;
                commit(&mut w, "meta", META_KEY, Some(&value))?;
                return Ok(meta);
            }
        }
    }

    fn key(&self, path: &KeyPath) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let k = keyring_key(path);
        if let Some(rec) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(Some(rec.clone()));
        }
        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
        match self.keyring.get(&k).map_err(backend)? {
            Some(v) => {
                let rec: Arc<KeyRecord> = Arc::new(decode(&k, &v)?);
                cache.insert(k, rec.clone());
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    fn create_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let k = keyring_key(&record.path()?);
        let mut w = self.writer();
        let value = encode(record);
        if self.keyring.contains_key(&k).map_err(backend)? {
            return Err(StoreError::AlreadyExists(format!("key `{}/{}`", record.tenant, record.key)));
        }
        prepare(&mut w, "keyring", &k, Some(&value))?;
        {
            let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
            let swapped = self
                .keyring
                .compare_and_swap(&k, None as Option<&[u8]>, Some(value.clone()))
                .map_err(backend)?;
            if swapped.is_err() {
                return Err(StoreError::AlreadyExists(format!("key `{}/{}`", record.tenant, record.key)));
            }
            cache.insert(k.clone(), Arc::new(record.clone()));
        }
        self.durable()?;
        commit(&mut w, "keyring", &k, Some(&value))
    }

    fn update_key(&self, path: &KeyPath, change: KeyChange<'_>) -> Result<Option<KeyRecord>, StoreError> {
        let k = keyring_key(path);
        let mut w = self.writer();
        loop {
            let Some(old) = self.keyring.get(&k).map_err(backend)? else { return Ok(None) };
            let mut record: KeyRecord = decode(&k, &old)?;
            change(&mut record);
            let value = encode(&record);
            if value[..] == old[..] {
                return Ok(Some(record)); // nothing changed: nothing to write
            }
            prepare(&mut w, "keyring", &k, Some(&value))?;
            let swapped = {
                let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
                let swapped =
                    self.keyring.compare_and_swap(&k, Some(old), Some(value.clone())).map_err(backend)?;
                if swapped.is_ok() {
                    cache.insert(k.clone(), Arc::new(record.clone()));
                }
                swapped.is_ok()
            };
            if swapped {
                self.durable()?;
                commit(&mut w, "keyring", &k, Some(&value))?;
                return Ok(Some(record));
            }
        }
    }

    fn update_keys(&self, paths: &[KeyPath], change: KeysChange<'_>) -> Result<(), StoreError> {
        let mut w = self.writer();
        // Writers hold `w`, so nothing changes these records under us.
        let mut writes: Vec<(Vec<u8>, Vec<u8>, KeyRecord)> = Vec::new();
        for path in paths {
            let k = keyring_key(path);
            let Some(old) = self.keyring.get(&k).map_err(backend)? else { continue };
            let mut record: KeyRecord = decode(&k, &old)?;
            change(path, &mut record);
            let value = encode(&record);
            if value[..] != old[..] {
                writes.push((k, value, record));
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        let changes: Vec<(&[u8], Option<&[u8]>)> =
            writes.iter().map(|(k, v, _)| (k.as_slice(), Some(v.as_slice()))).collect();
        prepare_all(&mut w, "keyring", &changes)?;
        let mut batch = sled::Batch::default();
        for (k, v, _) in &writes {
            batch.insert(k.as_slice(), v.as_slice());
        }
        {
            let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
            self.keyring.apply_batch(batch).map_err(backend)?;
            for (k, _, record) in &writes {
                cache.insert(k.clone(), Arc::new(record.clone()));
            }
        }
        self.durable()?;
        commit_all(&mut w, "keyring", &changes)
    }

    fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let prefix = tenant.map(|t| format!("{t}/")).unwrap_or_default();
        let mut keys = self
            .keyring
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect::<Result<Vec<KeyRecord>, _>>()?;
        // Byte order of `tenant/key` is not tenant-then-key order (`-` < `/`).
        keys.sort_by(|a, b| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
        Ok(keys)
    }

    fn key_count(&self) -> Result<u64, StoreError> {
        Ok(self.keyring.len() as u64)
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.revocations
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let k = revocation_key(&revocation.scope);
        let value = encode(revocation);
        let mut w = self.writer();
        prepare(&mut w, "revocations", &k, Some(&value))?;
        self.revocations.insert(&k, value.clone()).map_err(backend)?;
        self.durable()?;
        commit(&mut w, "revocations", &k, Some(&value))
    }

    fn remove_revocation(&self, scope: &Scope) -> Result<Option<Revocation>, StoreError> {
        let k = revocation_key(scope);
        let mut w = self.writer();
        if !self.revocations.contains_key(&k).map_err(backend)? {
            return Ok(None);
        }
        prepare(&mut w, "revocations", &k, None)?;
        match self.revocations.remove(&k).map_err(backend)? {
            Some(v) => {
                self.durable()?;
                commit(&mut w, "revocations", &k, None)?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }
}

impl Backend for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
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
