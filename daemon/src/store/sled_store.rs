//! The embedded store: one sled database, a tree per concern (`meta`,
//! `keyring`, `revocations`, `audit`). Records are JSON. Keyring keys are
//! `tenant/key`, so that one tenant's keys are a prefix scan; revocation keys
//! name their scope (see [`revocation_key`]). Audit keys are `r` or `s`
//! followed by the sequence number as 8 big-endian bytes (docs/AUDIT.md §4).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;
use serde::de::DeserializeOwned;

use super::{AuditIter, AuditKind, KeyRecord, Meta, Store, StoreError, SCHEMA_VERSION};

/// sled behind [`Store`].
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    keyring: sled::Tree,
    revocations: sled::Tree,
    audit: sled::Tree,
    /// Decoded keyring records, kept in step with every write made through
    /// this store, so that the request path does not decode JSON and base64
    /// for every request. Writers hold the lock across their
    /// compare-and-swap, so the cache never goes back to an older record.
    keys: RwLock<HashMap<Vec<u8>, KeyRecord>>,
}

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
        // A bounded page cache: the audit tree only grows, and sled would
        // otherwise keep up to 1 GiB of it in memory.
        let db =
            sled::Config::new().cache_capacity(CACHE_BYTES).path(path).open().map_err(|e| {
                StoreError::Backend(format!("cannot open the store at {}: {e}", path.display()))
            })?;
        let meta = db.open_tree("meta").map_err(backend)?;
        let keyring = db.open_tree("keyring").map_err(backend)?;
        let revocations = db.open_tree("revocations").map_err(backend)?;
        let audit = db.open_tree("audit").map_err(backend)?;
        Ok(SledStore {
            path: path.to_owned(),
            db,
            meta,
            keyring,
            revocations,
            audit,
            keys: Default::default(),
        })
    }

    /// Opens a store that `init` has prepared, checking its schema.
    pub fn open_initialised(path: &Path) -> Result<(SledStore, Meta), StoreError> {
        SledStore::check_initialised(SledStore::open(path)?)
    }

    /// Checks that an open store was initialised, with a known schema.
    pub fn check_initialised(store: SledStore) -> Result<(SledStore, Meta), StoreError> {
        let meta =
            store.meta()?.ok_or_else(|| StoreError::NotInitialised(store.path.display().to_string()))?;
        if meta.schema_version != SCHEMA_VERSION {
            return Err(StoreError::Schema { found: meta.schema_version, expected: SCHEMA_VERSION });
        }
        Ok((store, meta))
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }
}

/// `r` or `s`, then the sequence number big-endian.
pub fn audit_key(kind: AuditKind, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = match kind {
        AuditKind::Record => b'r',
        AuditKind::Seal => b's',
    };
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn keyring_key(path: &KeyPath) -> Vec<u8> {
    format!("{}/{}", path.tenant(), path.key()).into_bytes()
}

/// The key of a scope's revocation record: `all`, `tenant/T`, `key/T/K`,
/// `version/T/K/N` or `datakey/ID`.
fn revocation_key(scope: &Scope) -> Vec<u8> {
    match scope {
        Scope::All => "all".into(),
        Scope::Tenant { tenant } => format!("tenant/{tenant}"),
        Scope::Key { tenant, key, version: None } => format!("key/{tenant}/{key}"),
        Scope::Key { tenant, key, version: Some(v) } => format!("version/{tenant}/{key}/{v}"),
        Scope::Datakey { envelope_id } => format!("datakey/{envelope_id}"),
    }
    .into_bytes()
}

impl Store for SledStore {
    fn meta(&self) -> Result<Option<Meta>, StoreError> {
        match self.meta.get(META_KEY).map_err(backend)? {
            Some(v) => Ok(Some(decode(META_KEY, &v)?)),
            None => Ok(None),
        }
    }

    fn init_meta(&self, meta: &Meta) -> Result<(), StoreError> {
        let swapped = self
            .meta
            .compare_and_swap(META_KEY, None as Option<&[u8]>, Some(encode(meta)))
            .map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::AlreadyInitialised(self.path.display().to_string()));
        }
        self.durable()
    }

    fn update_meta(&self, change: &mut dyn FnMut(&mut Meta)) -> Result<Meta, StoreError> {
        loop {
            let old = self
                .meta
                .get(META_KEY)
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotInitialised(self.path.display().to_string()))?;
            let mut meta: Meta = decode(META_KEY, &old)?;
            change(&mut meta);
            let swapped =
                self.meta.compare_and_swap(META_KEY, Some(old), Some(encode(&meta))).map_err(backend)?;
            if swapped.is_ok() {
                self.durable()?;
                return Ok(meta);
            }
        }
    }

    fn key(&self, path: &KeyPath) -> Result<Option<KeyRecord>, StoreError> {
        let k = keyring_key(path);
        if let Some(rec) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Ok(Some(rec.clone()));
        }
        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
        match self.keyring.get(&k).map_err(backend)? {
            Some(v) => {
                let rec: KeyRecord = decode(&k, &v)?;
                cache.insert(k, rec.clone());
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    fn create_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let k = keyring_key(&record.path()?);
        {
            let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
            let swapped = self
                .keyring
                .compare_and_swap(&k, None as Option<&[u8]>, Some(encode(record)))
                .map_err(backend)?;
            if swapped.is_err() {
                return Err(StoreError::AlreadyExists(format!("key `{}/{}`", record.tenant, record.key)));
            }
            cache.insert(k, record.clone());
        }
        self.durable()
    }

    fn update_key(
        &self,
        path: &KeyPath,
        change: &mut dyn FnMut(&mut KeyRecord),
    ) -> Result<Option<KeyRecord>, StoreError> {
        let k = keyring_key(path);
        loop {
            let Some(old) = self.keyring.get(&k).map_err(backend)? else { return Ok(None) };
            let mut record: KeyRecord = decode(&k, &old)?;
            change(&mut record);
            let swapped = {
                let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
                let swapped =
                    self.keyring.compare_and_swap(&k, Some(old), Some(encode(&record))).map_err(backend)?;
                if swapped.is_ok() {
                    cache.insert(k.clone(), record.clone());
                }
                swapped.is_ok()
            };
            if swapped {
                self.durable()?;
                return Ok(Some(record));
            }
        }
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
        self.revocations.insert(revocation_key(&revocation.scope), encode(revocation)).map_err(backend)?;
        self.durable()
    }

    fn remove_revocation(&self, scope: &Scope) -> Result<Option<Revocation>, StoreError> {
        let k = revocation_key(scope);
        match self.revocations.remove(&k).map_err(backend)? {
            Some(v) => {
                self.durable()?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.durable()
    }

    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.audit.insert(audit_key(kind, seq), bytes).map_err(backend)?;
        Ok(())
    }

    fn audit_flush(&self) -> Result<(), StoreError> {
        self.durable()
    }

    fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        let (lo, hi) = if reverse { (0, from) } else { (from, u64::MAX) };
        let range = self.audit.range(audit_key(kind, lo)..=audit_key(kind, hi));
        let entry = |kv: sled::Result<(sled::IVec, sled::IVec)>| {
            let (k, v) = kv.map_err(backend)?;
            let seq =
                k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(|| {
                    StoreError::Corrupt {
                        key: format!("audit {:?}", &k[..]),
                        reason: "not a sequence number".into(),
                    }
                })?;
            Ok((seq, v.to_vec()))
        };
        if reverse {
            Box::new(range.rev().map(entry))
        } else {
            Box::new(range.map(entry))
        }
    }
}
