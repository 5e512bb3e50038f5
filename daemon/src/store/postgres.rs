//! The PostgreSQL store: one database, a table per concern (`meta`,
//! `keyring`, `revocations`, `audit`), its schema made and migrated by the
//! daemon and versioned in `schema_version` (docs/CLUSTER.md).
//!
//! A record is kept as the exact JSON text the daemon wrote (`record text`),
//! next to the columns it is found by (`tenant`, `name`, `scope`) and a
//! `row_version` that every update bumps and checks: fields that a newer
//! daemon adds to a record flow through without a schema change, and the
//! token's anchor hashes the same bytes as with sled ([`super::state`]): a
//! writer of the database who is not this daemon is the "file writer" of
//! docs/SECURITY.md §3, and is detected the same way.
//!
//! The connections (a small deadpool pool, TLS through native-tls, i.e.
//! the system's OpenSSL) live on a runtime of their own, so that the
//! store's futures can be awaited from any thread, async or not; the
//! decrypt path reads key records from a cache kept in step with every
//! write, never from the database.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;
use serde::de::DeserializeOwned;
use tokio_postgres::config::Host;

use super::sled_store::{keyring_key, revocation_key};
use super::state::{
    commit, commit_all, in_doubt, prepare, prepare_all, settle, Anchor, AnchorState, Anchored, StateDigest,
};
use super::{
    AuditIter, AuditKind, Backend, KeyChange, KeyRecord, KeysChange, Meta, MetaChange, StoreError,
    StoreFuture,
};

/// The database schema this daemon makes and reads (`schema_version`).
pub const PG_SCHEMA_VERSION: i32 = 1;

/// Each migration, by the version it makes; applied in one transaction.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE meta (id text PRIMARY KEY, record text NOT NULL, row_version bigint NOT NULL);
     CREATE TABLE keyring (tenant text NOT NULL, name text NOT NULL, record text NOT NULL,
                           row_version bigint NOT NULL, PRIMARY KEY (tenant, name));
     CREATE TABLE revocations (scope text PRIMARY KEY, record text NOT NULL);
     CREATE TABLE audit (kind smallint NOT NULL, seq bigint NOT NULL, entry bytea NOT NULL,
                         PRIMARY KEY (kind, seq));",
)];

/// Serialises schema migrations of concurrent daemons
/// (`pg_advisory_xact_lock`): "khschema" in ASCII.
const MIGRATION_LOCK: i64 = 0x6b68_7363_6865_6d61;

/// Connections in the pool.
const POOL_SIZE: usize = 8;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Audit entries read per query by [`Backend::audit_scan`].
const AUDIT_PAGE: i64 = 512;

const META_ID: &str = "meta";

/// How the daemon connects to PostgreSQL.
pub struct PgOptions {
    /// Whether a TCP connection must use TLS (production: yes).
    pub require_tls: bool,
    /// A PEM file of CA certificates to trust, besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// PostgreSQL behind [`Backend`].
pub struct PgStore {
    pool: Pool,
    /// The connections' runtime; shut down (without waiting) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// Where, without the password.
    location: String,
    /// Decoded keyring records, kept in step with this store's writes
    /// (the request path never queries the database).
    keys: RwLock<HashMap<Vec<u8>, Arc<KeyRecord>>>,
    /// The token's anchor, once checked; also the writers' lock: every
    /// mutation holds it from its anchor's `pending` to its `committed`.
    anchored: tokio::sync::Mutex<Option<Anchored>>,
    /// Audit entries appended since the last flush.
    audit_pending: Mutex<Vec<(AuditKind, u64, Vec<u8>)>>,
}

fn db(e: tokio_postgres::Error) -> StoreError {
    // The error names what failed (connection, statement, constraint) and
    // why (the cause: refused, no such socket, timed out); it never holds
    // the connection string.
    let mut text = e.as_db_error().map_or_else(|| e.to_string(), |d| d.to_string());
    if let Some(cause) = std::error::Error::source(&e).filter(|_| e.as_db_error().is_none()) {
        text = format!("{text}: {cause}");
    }
    StoreError::Backend(format!("postgres: {text}"))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        e => StoreError::Backend(format!("postgres connection pool: {e}")),
    }
}

fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialise")
}

fn kind_code(kind: AuditKind) -> i16 {
    match kind {
        AuditKind::Record => 0,
        AuditKind::Seal => 1,
    }
}

/// `host[,host] / database` of a connection config, for messages.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!("postgres {} database {}", hosts.join(","), config.get_dbname().unwrap_or("(default)"))
}

impl PgStore {
    /// Connects to the database named by `url` (a libpq connection string
    /// or `postgresql://` URL), and makes or migrates its schema.
    pub fn open(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            // tokio-postgres's parse errors name the bad part, not the value.
            StoreError::Backend(format!("the PostgreSQL connection string does not parse: {e}"))
        })?;
        if config.get_hosts().is_empty() {
            return Err(StoreError::Backend("the PostgreSQL connection string names no host".into()));
        }
        let over_tcp = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
        if options.require_tls
            && over_tcp
            && config.get_ssl_mode() != tokio_postgres::config::SslMode::Require
        {
            return Err(StoreError::Backend(format!(
                "{}: a TCP connection to PostgreSQL must use TLS in production: add `sslmode=require` to the \
                 connection string, or connect over a Unix socket (docs/CLUSTER.md)",
                describe(&config)
            )));
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("keyhavend");
        let mut tls = native_tls::TlsConnector::builder();
        if let Some(ca) = &options.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| StoreError::Backend(format!("cannot read the CA file {}: {e}", ca.display())))?;
            let cert = native_tls::Certificate::from_pem(&pem)
                .map_err(|e| StoreError::Backend(format!("the CA file {} is not PEM: {e}", ca.display())))?;
            tls.add_root_certificate(cert);
        }
        let tls = tls.build().map_err(|e| StoreError::Backend(format!("cannot set up TLS: {e}")))?;
        let location = describe(&config);
        let manager = Manager::from_config(
            config,
            postgres_native_tls::MakeTlsConnector::new(tls),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("keyhaven-pg")
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let pool = {
            let _guard = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .build()
                .map_err(|e| StoreError::Backend(format!("postgres connection pool: {e}")))?
        };
        let store = PgStore {
            pool,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            location,
            keys: Default::default(),
            anchored: tokio::sync::Mutex::new(None),
            audit_pending: Mutex::new(Vec::new()),
        };
        super::wait(Box::pin(store.migrate())).map_err(|e| match e {
            StoreError::Backend(why) => StoreError::Backend(format!("{}: {why}", store.location)),
            other => other,
        })?;
        Ok(store)
    }

    /// Runs `f` with a pooled connection on the store's runtime.
    fn on_db<T, F, Fut>(&self, f: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let task = self.handle.spawn(async move {
            let client = pool.get().await.map_err(pool_error)?;
            f(client).await
        });
        async move { task.await.map_err(|e| StoreError::Backend(format!("postgres task: {e}")))? }
    }

    /// Makes the schema, or brings it up to [`PG_SCHEMA_VERSION`]; refuses
    /// a database whose schema is newer than this daemon knows.
    async fn migrate(&self) -> Result<(), StoreError> {
        let location = self.location.clone();
        self.on_db(move |mut c| async move {
            let tx = c.transaction().await.map_err(db)?;
            // `IF NOT EXISTS` on a made schema is not news.
            tx.batch_execute("SET LOCAL client_min_messages = warning").await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(db)?;
            let found: i32 = tx
                .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
                .await
                .map_err(db)?
                .get(0);
            if found > PG_SCHEMA_VERSION {
                return Err(StoreError::NewerSchema { store: location, found, known: PG_SCHEMA_VERSION });
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
                tx.batch_execute(sql).await.map_err(db)?;
                tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[version])
                    .await
                    .map_err(db)?;
                tracing::info!(version, "PostgreSQL schema migrated");
            }
            tx.commit().await.map_err(db)
        })
        .await
    }

    /// The digest of every anchored record as the database holds them now.
    fn state_digest(&self) -> Result<StateDigest, StoreError> {
        super::wait(Box::pin(self.read_digest()))
    }

    /// Before a write, under the writers' lock: when the last write's
    /// outcome is unknown (its commit may have happened before the
    /// connection broke), reads the database's state and settles the
    /// anchor on it ([`super::state::settle`]).
    async fn settle(&self, w: &mut Option<Anchored>) -> Result<(), StoreError> {
        if !in_doubt(w) {
            return Ok(());
        }
        let digest = self.read_digest().await?;
        settle(w, digest)?;
        // A key record the lost write did change is re-read.
        self.keys.write().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    async fn read_digest(&self) -> Result<StateDigest, StoreError> {
        let rows = (self.on_db(|c| async move {
            let mut rows: Vec<(&'static str, Vec<u8>, String)> = Vec::new();
            for r in c.query("SELECT id, record FROM meta", &[]).await.map_err(db)? {
                rows.push(("meta", r.get::<_, String>(0).into_bytes(), r.get(1)));
            }
            for r in c.query("SELECT tenant, name, record FROM keyring", &[]).await.map_err(db)? {
                let key = format!("{}/{}", r.get::<_, &str>(0), r.get::<_, &str>(1));
                rows.push(("keyring", key.into_bytes(), r.get(2)));
            }
            for r in c.query("SELECT scope, record FROM revocations", &[]).await.map_err(db)? {
                rows.push(("revocations", r.get::<_, String>(0).into_bytes(), r.get(1)));
            }
            Ok(rows)
        }))
        .await?;
        let mut digest = StateDigest::default();
        for (tree, key, value) in &rows {
            digest.load(tree, key, value.as_bytes());
        }
        digest.finish_load();
        Ok(digest)
    }

    fn cache_put(&self, k: Vec<u8>, record: KeyRecord) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(k, Arc::new(record));
    }

    async fn read_key(&self, path: &KeyPath) -> Result<Option<(KeyRecord, String, i64)>, StoreError> {
        let (tenant, name) = (path.tenant().to_owned(), path.key().to_owned());
        let row = self
            .on_db(move |c| async move {
                c.query_opt(
                    "SELECT record, row_version FROM keyring WHERE tenant = $1 AND name = $2",
                    &[&tenant, &name],
                )
                .await
                .map_err(db)
            })
            .await?;
        let Some(row) = row else { return Ok(None) };
        let text: String = row.get(0);
        let record: KeyRecord = decode(&format!("keyring {path}"), &text)?;
        Ok(Some((record, text, row.get(1))))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Backend for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn meta(&self) -> StoreFuture<'_, Option<Meta>> {
        Box::pin(async move {
            let text = self
                .on_db(|c| async move {
                    let row = c
                        .query_opt("SELECT record FROM meta WHERE id = $1", &[&META_ID])
                        .await
                        .map_err(db)?;
                    Ok(row.map(|r| r.get::<_, String>(0)))
                })
                .await?;
            text.map(|t| decode("meta", &t)).transpose()
        })
    }

    fn init_meta<'a>(&'a self, meta: &'a Meta) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            let value = encode(meta);
            prepare(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
            let v = value.clone();
            let inserted = self
                .on_db(move |c| async move {
                    c.execute(
                        "INSERT INTO meta (id, record, row_version) VALUES ($1, $2, 1) ON CONFLICT DO NOTHING",
                        &[&META_ID, &v],
                    )
                    .await
                    .map_err(db)
                })
                .await?;
            if inserted == 0 {
                return Err(StoreError::AlreadyInitialised(self.location.clone()));
            }
            commit(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))
        })
    }

    fn update_meta<'a>(&'a self, change: MetaChange<'a>) -> StoreFuture<'a, Meta> {
        Box::pin(async move {
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            loop {
                let row = self
                    .on_db(|c| async move {
                        let row = c
                            .query_opt("SELECT record, row_version FROM meta WHERE id = $1", &[&META_ID])
                            .await
                            .map_err(db)?;
                        Ok(row.map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))))
                    })
                    .await?;
                let (old, version) = row.ok_or_else(|| StoreError::NotInitialised(self.location.clone()))?;
                let mut meta: Meta = decode("meta", &old)?;
                change(&mut meta);
                let value = encode(&meta);
                prepare(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
                let v = value.clone();
                let swapped = self
                    .on_db(move |c| async move {
                        c.execute(
                            "UPDATE meta SET record = $2, row_version = row_version + 1 \
                             WHERE id = $1 AND row_version = $3",
                            &[&META_ID, &v, &version],
                        )
                        .await
                        .map_err(db)
                    })
                    .await?;
                if swapped == 1 {
                    commit(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
                    return Ok(meta);
                }
            }
        })
    }

    fn key<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<Arc<KeyRecord>>> {
        Box::pin(async move {
            let k = keyring_key(path);
            if let Some(rec) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
                return Ok(Some(rec.clone()));
            }
            // Read under the writers' lock, so that a write finishing
            // meanwhile cannot be overtaken in the cache by this older read.
            let _w = self.anchored.lock().await;
            if let Some(rec) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
                return Ok(Some(rec.clone()));
            }
            let Some((record, _, _)) = self.read_key(path).await? else { return Ok(None) };
            let record = Arc::new(record);
            self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(k, record.clone());
            Ok(Some(record))
        })
    }

    fn create_key<'a>(&'a self, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let path = record.path()?;
            let k = keyring_key(&path);
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            if self.read_key(&path).await?.is_some() {
                return Err(StoreError::AlreadyExists(format!("key `{path}`")));
            }
            let value = encode(record);
            prepare(&mut w, "keyring", &k, Some(value.as_bytes()))?;
            let (tenant, name, v) = (path.tenant().to_owned(), path.key().to_owned(), value.clone());
            let inserted = self
                .on_db(move |c| async move {
                    c.execute(
                        "INSERT INTO keyring (tenant, name, record, row_version) VALUES ($1, $2, $3, 1) \
                         ON CONFLICT DO NOTHING",
                        &[&tenant, &name, &v],
                    )
                    .await
                    .map_err(db)
                })
                .await?;
            if inserted == 0 {
                return Err(StoreError::AlreadyExists(format!("key `{path}`")));
            }
            self.cache_put(k.clone(), record.clone());
            commit(&mut w, "keyring", &k, Some(value.as_bytes()))
        })
    }

    fn update_key<'a>(
        &'a self,
        path: &'a KeyPath,
        change: KeyChange<'a>,
    ) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(async move {
            let k = keyring_key(path);
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            loop {
                let Some((mut record, old, version)) = self.read_key(path).await? else { return Ok(None) };
                change(&mut record);
                let value = encode(&record);
                if value == old {
                    return Ok(Some(record)); // nothing changed: nothing to write
                }
                prepare(&mut w, "keyring", &k, Some(value.as_bytes()))?;
                let (tenant, name, v) = (path.tenant().to_owned(), path.key().to_owned(), value.clone());
                // One statement, conditional on the row version read: a
                // change made meanwhile by another writer is never lost.
                let swapped = self
                    .on_db(move |c| async move {
                        c.execute(
                            "UPDATE keyring SET record = $3, row_version = row_version + 1 \
                             WHERE tenant = $1 AND name = $2 AND row_version = $4",
                            &[&tenant, &name, &v, &version],
                        )
                        .await
                        .map_err(db)
                    })
                    .await?;
                if swapped == 1 {
                    self.cache_put(k.clone(), record.clone());
                    commit(&mut w, "keyring", &k, Some(value.as_bytes()))?;
                    return Ok(Some(record));
                }
            }
        })
    }

    fn update_keys<'a>(&'a self, paths: &'a [KeyPath], change: KeysChange<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            // Writers hold `w`; the transaction's conditional updates refuse
            // rows another writer changed, and then nothing is written.
            let mut writes: Vec<(KeyPath, String, i64, KeyRecord)> = Vec::new();
            for path in paths {
                let Some((mut record, old, version)) = self.read_key(path).await? else { continue };
                change(path, &mut record);
                let value = encode(&record);
                if value != old {
                    writes.push((path.clone(), value, version, record));
                }
            }
            if writes.is_empty() {
                return Ok(());
            }
            let keys: Vec<Vec<u8>> = writes.iter().map(|(p, ..)| keyring_key(p)).collect();
            let changes: Vec<(&[u8], Option<&[u8]>)> =
                keys.iter().zip(&writes).map(|(k, (_, v, ..))| (k.as_slice(), Some(v.as_bytes()))).collect();
            prepare_all(&mut w, "keyring", &changes)?;
            let rows: Vec<(String, String, String, i64)> = writes
                .iter()
                .map(|(p, v, version, _)| (p.tenant().to_owned(), p.key().to_owned(), v.clone(), *version))
                .collect();
            self.on_db(move |mut c| async move {
                let tx = c.transaction().await.map_err(db)?;
                for (tenant, name, value, version) in &rows {
                    let n = tx
                        .execute(
                            "UPDATE keyring SET record = $3, row_version = row_version + 1 \
                             WHERE tenant = $1 AND name = $2 AND row_version = $4",
                            &[tenant, name, value, version],
                        )
                        .await
                        .map_err(db)?;
                    if n != 1 {
                        return Err(StoreError::Backend(format!(
                            "key `{tenant}/{name}` was changed by another writer during a batch update; \
                             nothing was written"
                        )));
                    }
                }
                tx.commit().await.map_err(db)
            })
            .await?;
            for (k, (_, _, _, record)) in keys.iter().zip(writes.iter()) {
                self.cache_put(k.clone(), record.clone());
            }
            commit_all(&mut w, "keyring", &changes)
        })
    }

    fn keys<'a>(&'a self, tenant: Option<&'a str>) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(async move {
            let tenant = tenant.map(str::to_owned);
            let rows = self
                .on_db(move |c| async move {
                    let rows = match &tenant {
                        Some(t) => {
                            c.query("SELECT tenant, name, record FROM keyring WHERE tenant = $1", &[t]).await
                        }
                        None => c.query("SELECT tenant, name, record FROM keyring", &[]).await,
                    }
                    .map_err(db)?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
                        .collect::<Vec<_>>())
                })
                .await?;
            let mut keys = rows
                .iter()
                .map(|(t, n, text)| decode(&format!("keyring {t}/{n}"), text))
                .collect::<Result<Vec<KeyRecord>, _>>()?;
            // Byte order, not the database's collation.
            keys.sort_by(|a, b| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key)));
            Ok(keys)
        })
    }

    fn key_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let n: i64 = self
                .on_db(|c| async move {
                    Ok(c.query_one("SELECT count(*) FROM keyring", &[]).await.map_err(db)?.get(0))
                })
                .await?;
            Ok(n as u64)
        })
    }

    fn revocations(&self) -> StoreFuture<'_, Vec<Revocation>> {
        Box::pin(async move {
            let rows = self
                .on_db(|c| async move {
                    let rows = c.query("SELECT scope, record FROM revocations", &[]).await.map_err(db)?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                        .collect::<Vec<_>>())
                })
                .await?;
            rows.iter().map(|(scope, text)| decode(&format!("revocation {scope}"), text)).collect()
        })
    }

    fn put_revocation<'a>(&'a self, revocation: &'a Revocation) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let k = revocation_key(&revocation.scope);
            let value = encode(revocation);
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            prepare(&mut w, "revocations", &k, Some(value.as_bytes()))?;
            let (scope, v) = (String::from_utf8_lossy(&k).into_owned(), value.clone());
            self.on_db(move |c| async move {
                c.execute(
                    "INSERT INTO revocations (scope, record) VALUES ($1, $2) \
                     ON CONFLICT (scope) DO UPDATE SET record = EXCLUDED.record",
                    &[&scope, &v],
                )
                .await
                .map_err(db)
            })
            .await?;
            commit(&mut w, "revocations", &k, Some(value.as_bytes()))
        })
    }

    fn remove_revocation<'a>(&'a self, scope: &'a Scope) -> StoreFuture<'a, Option<Revocation>> {
        Box::pin(async move {
            let k = revocation_key(scope);
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut w = self.anchored.lock().await;
            self.settle(&mut w).await?;
            let sc = key.clone();
            let present = self
                .on_db(move |c| async move {
                    let row = c
                        .query_opt("SELECT 1 FROM revocations WHERE scope = $1", &[&sc])
                        .await
                        .map_err(db)?;
                    Ok(row.is_some())
                })
                .await?;
            if !present {
                return Ok(None);
            }
            prepare(&mut w, "revocations", &k, None)?;
            let sc = key.clone();
            let removed = self
                .on_db(move |c| async move {
                    let row = c
                        .query_opt("DELETE FROM revocations WHERE scope = $1 RETURNING record", &[&sc])
                        .await
                        .map_err(db)?;
                    Ok(row.map(|r| r.get::<_, String>(0)))
                })
                .await?;
            match removed {
                Some(text) => {
                    commit(&mut w, "revocations", &k, None)?;
                    Ok(Some(decode(&format!("revocation {key}"), &text)?))
                }
                None => Ok(None),
            }
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        // Every write was committed (and so made durable by PostgreSQL)
        // before its future completed.
        Box::pin(std::future::ready(Ok(())))
    }

    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()).push((kind, seq, bytes.to_vec()));
        Ok(())
    }

    fn audit_flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let batch = std::mem::take(&mut *self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()));
            if batch.is_empty() {
                return Ok(());
            }
            let kinds: Vec<i16> = batch.iter().map(|(k, ..)| kind_code(*k)).collect();
            let seqs: Vec<i64> = batch.iter().map(|(_, s, _)| *s as i64).collect();
            let entries: Vec<Vec<u8>> = batch.iter().map(|(.., b)| b.clone()).collect();
            // One statement for the whole batch. An entry already there (a
            // flush whose commit succeeded but whose answer was lost) is
            // kept as it is: the chain check would notice any difference.
            let written = self
                .on_db(move |c| async move {
                    c.execute(
                        "INSERT INTO audit (kind, seq, entry) \
                         SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[]) \
                         ON CONFLICT (kind, seq) DO NOTHING",
                        &[&kinds, &seqs, &entries],
                    )
                    .await
                    .map_err(db)
                })
                .await;
            if written.is_err() {
                let mut pending = self.audit_pending.lock().unwrap_or_else(|e| e.into_inner());
                let newer = std::mem::take(&mut *pending);
                *pending = batch;
                pending.extend(newer);
            }
            written.map(|_| ())
        })
    }

    fn audit_scan(&self, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        let mut next = Some(from.min(i64::MAX as u64) as i64);
        let mut page: std::vec::IntoIter<(u64, Vec<u8>)> = Vec::new().into_iter();
        Box::new(std::iter::from_fn(move || loop {
            if let Some(entry) = page.next() {
                return Some(Ok(entry));
            }
            let at = next?;
            let code = kind_code(kind);
            let rows = super::wait(Box::pin(self.on_db(move |c| async move {
                let sql = if reverse {
                    "SELECT seq, entry FROM audit WHERE kind = $1 AND seq <= $2 ORDER BY seq DESC LIMIT $3"
                } else {
                    "SELECT seq, entry FROM audit WHERE kind = $1 AND seq >= $2 ORDER BY seq LIMIT $3"
                };
                let rows = c.query(sql, &[&code, &at, &AUDIT_PAGE]).await.map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
                    .collect::<Vec<_>>())
            })));
            match rows {
                Err(e) => {
                    next = None;
                    return Some(Err(e));
                }
                Ok(rows) => {
                    next = match rows.last() {
                        Some((last, _)) if (rows.len() as i64) == AUDIT_PAGE => {
                            if reverse {
                                (*last as i64).checked_sub(1).filter(|n| *n >= 0)
                            } else {
                                (*last as i64).checked_add(1)
                            }
                        }
                        _ => None,
                    };
                    if rows.is_empty() {
                        return None;
                    }
                    page = rows.into_iter();
                }
            }
        }))
    }

    fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        let mut guard = self.anchored.blocking_lock();
        let (anchored, state) = super::state::attach(anchor, self.state_digest()?)?;
        *guard = Some(anchored);
        Ok(state)
    }

    fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        let mut guard = self.anchored.blocking_lock();
        let (anchored, old) = super::state::accept(anchor, self.state_digest()?)?;
        *guard = Some(anchored);
        Ok(old)
    }
}
