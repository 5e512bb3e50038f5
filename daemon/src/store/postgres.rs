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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;
use serde::de::DeserializeOwned;
use tokio_postgres::config::Host;

use super::cluster::{scope_of_key, takes_away, ChangeSink};
use super::sled_store::{keyring_key, revocation_key};
use super::state::{
    commit, commit_all, learn, prepare, prepare_all, reconcile, relearn, vouches, Anchor, AnchorState,
    Anchored, StateDigest,
};
use super::{
    alias_of, Aliases, AuditIter, AuditKind, Backend, ClusterView, KeyChange, KeyRecord, KeysChange, Meta,
    MetaChange, NodeView, StoreError, StoreFuture,
};

/// The database schema this daemon makes and reads (`schema_version`).
pub const PG_SCHEMA_VERSION: i32 = 2;

/// Each migration, by the version it makes; applied in one transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE meta (id text PRIMARY KEY, record text NOT NULL, row_version bigint NOT NULL);
     CREATE TABLE keyring (tenant text NOT NULL, name text NOT NULL, record text NOT NULL,
                           row_version bigint NOT NULL, PRIMARY KEY (tenant, name));
     CREATE TABLE revocations (scope text PRIMARY KEY, record text NOT NULL);
     CREATE TABLE audit (kind smallint NOT NULL, seq bigint NOT NULL, entry bytea NOT NULL,
                         PRIMARY KEY (kind, seq));",
    ),
    (
        2,
        // The cluster (docs/CLUSTER.md): nodes and their leases, the
        // change feed, and one audit chain per node (the chain written
        // before is node '', anchored as before).
        "CREATE TABLE nodes (name text PRIMARY KEY, lease_until timestamptz NOT NULL,
                             applied bigint NOT NULL, started timestamptz NOT NULL DEFAULT now(),
                             version text NOT NULL, instance text NOT NULL);
         CREATE TABLE changes (revision bigint NOT NULL, node text NOT NULL, tree text NOT NULL,
                               key text NOT NULL, at timestamptz NOT NULL DEFAULT now(),
                               PRIMARY KEY (revision, tree, key));
         ALTER TABLE audit ADD COLUMN node text NOT NULL DEFAULT '';
         ALTER TABLE audit DROP CONSTRAINT audit_pkey;
         ALTER TABLE audit ADD PRIMARY KEY (node, kind, seq);",
    ),
];

/// Serialises schema migrations of concurrent daemons
/// (`pg_advisory_xact_lock`): "khschema" in ASCII.
const MIGRATION_LOCK: i64 = 0x6b68_7363_6865_6d61;

/// Serialises the writes of every node (`pg_advisory_lock`, held from the
/// catch-up to the token anchor's commit): "khwrite" in ASCII.
const WRITE_LOCK: i64 = 0x6b_6877_7269_7465;

/// How long a write waits for the cluster's write lock.
const WRITE_LOCK_TIMEOUT: Duration = Duration::from_secs(15);

/// Held by the node running the periodic jobs (`pg_try_advisory_lock`):
/// "khjobs" in ASCII.
const JOBS_LOCK: i64 = 0x6b68_6a6f_6273;

/// The channel of the change feed's `NOTIFY`.
const FEED_CHANNEL: &str = "keyhaven_changes";

/// How often a node reads the change feed when no `NOTIFY` woke it (the
/// fallback: a notification is lost while its connection is down).
const FEED_POLL: Duration = Duration::from_millis(250);

/// How often, at most, a writer asks whether every live node applied its
/// revocation: first 1 ms after its commit, then after twice the previous
/// pause, up to this (a node applies a change a few milliseconds after its
/// `NOTIFY`).
const APPLIED_POLL: Duration = Duration::from_millis(10);

/// The first of those pauses.
const APPLIED_POLL_FIRST: Duration = Duration::from_millis(1);

/// The most revisions of the change feed one trimming round deletes.
const TRIM_BATCH: i64 = 10_000;

/// A node whose lease ran out more than this many of the trimming node's
/// leases ago no longer holds the change feed's trimming back: if it comes
/// back without a restart, it finds the feed trimmed past what it applied,
/// and reloads everything (docs/CLUSTER.md §4).
const TRIM_GRACE_LEASES: u32 = 10;

/// Connections in the pool.
const POOL_SIZE: usize = 8;

/// How long the schema's migration may take (at start, only when the
/// database's schema is older than this daemon's).
const MIGRATION_LIMIT: Duration = Duration::from_secs(300);

/// What tokio-postgres takes for TCP keepalives when the connection string
/// says nothing (`keepalives_idle`): two hours, libpq's and the kernel's.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Audit entries read per query by [`Backend::audit_scan`].
const AUDIT_PAGE: i64 = 512;

const META_ID: &str = "meta";

/// The most names a node remembers as having no key ([`KeyCache::absent`]);
/// past it, the set starts again empty (a name forgotten is read again).
const MAX_ABSENT: usize = 10_000;

/// The keyring as this node knows it, kept in step with its own writes and
/// the change feed (docs/CLUSTER.md §4). Changed only under the writers'
/// lock ([`PgStore::anchored`]), which the feed's reader holds too.
#[derive(Default)]
struct KeyCache {
    /// Records read or written, by `tenant/name`.
    present: HashMap<Vec<u8>, Arc<KeyRecord>>,
    /// Names read and found to have no key while the node follows the
    /// feed: a key made on any node afterwards comes through the feed (or
    /// this node's own write), which moves its name to `present`.
    absent: HashSet<Vec<u8>>,
}

impl KeyCache {
    /// `Some(Some(_))`: the key; `Some(None)`: known to have none; `None`:
    /// unknown (read the database).
    fn get(&self, k: &[u8]) -> Option<Option<Arc<KeyRecord>>> {
        match self.present.get(k) {
            Some(r) => Some(Some(r.clone())),
            None => self.absent.contains(k).then_some(None),
        }
    }

    fn put(&mut self, k: Vec<u8>, record: Arc<KeyRecord>) {
        self.absent.remove(&k);
        self.present.insert(k, record);
    }

    /// Forgets `k` either way (read again on its next use).
    fn forget(&mut self, k: &[u8]) {
        self.present.remove(k);
        self.absent.remove(k);
    }

    fn put_absent(&mut self, k: Vec<u8>) {
        self.present.remove(&k);
        if self.absent.len() >= MAX_ABSENT {
            self.absent.clear();
        }
        self.absent.insert(k);
    }
}

/// How the daemon connects to PostgreSQL.
pub struct PgOptions {
    /// Whether a TCP connection must use TLS (production: yes).
    pub require_tls: bool,
    /// A PEM file of CA certificates to trust, besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// How long opening a connection may take, authentication included
    /// (`[store] connect_timeout_seconds`); also part of every call's
    /// time limit ([`PgStore`]'s `limit`).
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    /// No TLS required, the system's CAs, the default connection timeout.
    fn default() -> PgOptions {
        PgOptions {
            require_tls: false,
            ca_file: None,
            connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// A time limit on a database call, and what sets it (named in the
/// message of a call given up: [`StoreError::NoAnswer`]).
#[derive(Clone, Debug)]
struct Limit {
    total: Duration,
    set_by: String,
}

/// This node of a cluster: its name and lease (`[cluster]`).
pub struct NodeOptions {
    /// The node's name.
    pub name: String,
    /// Its lease's length.
    pub lease: Duration,
}

/// An audit entry not yet flushed: its chain (node), kind, `seq` and bytes.
type PendingAudit = (String, AuditKind, u64, Vec<u8>);

/// PostgreSQL behind [`Backend`].
pub struct PgStore {
    pool: Pool,
    /// The connections' runtime; shut down (without waiting) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    /// Where, without the password.
    location: String,
    /// The server (`host:port` or the socket's path) and the database,
    /// for [`StoreError::NoAnswer`].
    server: String,
    /// How long opening a connection may take.
    connect_timeout: Duration,
    /// Decoded keyring records, and names known to have no key, kept in
    /// step with this store's writes and the change feed (the request path
    /// never queries the database for a name it met before).
    keys: RwLock<KeyCache>,
    /// The alias table as the meta record holds it, kept in step the same
    /// way; `None` until first read (under the writers' lock).
    aliases: RwLock<Option<Arc<Aliases>>>,
    /// The token's anchor, once checked; also this node's writers' lock:
    /// every mutation holds it from its anchor's `pending` to its
    /// `committed`, and the change feed's reader while it applies changes.
    anchored: tokio::sync::Mutex<Option<Anchored>>,
    /// Audit entries appended since the last flush, each with its chain.
    audit_pending: Mutex<Vec<PendingAudit>>,
    /// This node.
    node: NodeOptions,
    /// The change revision whose changes (and all before) this node has
    /// applied to its caches, digest and sink.
    applied: AtomicI64,
    /// The daemon's state that follows other nodes' writes; set by
    /// [`Backend::start_cluster`].
    sink: OnceLock<Arc<dyn ChangeSink>>,
    /// Until when this node may serve key operations (its lease, by its
    /// own monotonic clock, minus the margin); `None`: no lease.
    serving_until: Mutex<Option<Instant>>,
    /// The background tasks (lease, feed) stop when this is dropped.
    stop: tokio_util::sync::CancellationToken,
    /// This store, for its background tasks ([`PgStore::shared`]).
    me: OnceLock<Weak<PgStore>>,
    /// How to open the change feed's `LISTEN` connection (outside the pool).
    listen: (tokio_postgres::Config, postgres_native_tls::MakeTlsConnector),
    /// Woken by a `NOTIFY` of the change feed.
    woken: Arc<tokio::sync::Notify>,
    /// This daemon among any that claim the node's name (process id and
    /// start time): the lease row is one daemon's.
    instance: String,
}

/// A task aborted when this is dropped (a [`PgStore::bounded`] call's timer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The cluster's write lock, held on a connection of its own. Dropped
/// without [`WriteLock::release`] (an error, a cancelled write), its
/// connection is closed rather than pooled, which releases the lock.
struct WriteLock {
    conn: Option<Object>,
}

impl WriteLock {
    fn client(&mut self) -> &mut tokio_postgres::Client {
        self.conn.as_mut().expect("held until released")
    }

    async fn release(mut self) {
        if let Some(mut c) = self.conn.take() {
            let client: &mut tokio_postgres::Client = &mut c;
            if client.execute("SELECT pg_advisory_unlock($1)", &[&WRITE_LOCK]).await.is_err() {
                drop(Object::take(c));
            }
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            drop(Object::take(c));
        }
    }
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

/// A conditional write that missed under the cluster's lock: only a
/// database writer outside the cluster can have changed the row.
fn outside_writer(what: &str) -> StoreError {
    StoreError::Tampered(format!(
        "{what} changed under the cluster's write lock: a database writer who is not a node; nothing was written"
    ))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        e => StoreError::Backend(format!("postgres connection pool: {e}")),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, StoreError> {
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

/// `host:port` (or the Unix socket's path) of every host of a connection
/// config, and the database: `127.0.0.1:5432 (database kh)`. Never the
/// user or the password.
fn servers(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            // As tokio-postgres picks it: the host's own, else the first.
            let port = ports.get(i).or_else(|| ports.first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
            }
        })
        .collect();
    format!("{} (database {})", hosts.join(", "), config.get_dbname().unwrap_or("(default)"))
}

/// Whether a failed connection attempt failed on tokio-postgres's own
/// connect timeout (the socket's connect): reported as the call's
/// [`StoreError::NoAnswer`], naming the limit.
fn timed_out(e: &deadpool_postgres::PoolError) -> bool {
    let deadpool_postgres::PoolError::Backend(e) = e else { return false };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = s.source();
    }
    false
}

/// Over TCP, a connection whose packets vanish (a partition, a dead link,
/// a host gone without a reset) fails nothing by itself: a call on it waits
/// until the kernel gives up on retransmitting (about 15 minutes), and an
/// idle one looks alive for ever. Unless the connection string sets them,
/// a connection whose sent data stays unacknowledged for a lease is closed
/// (`tcp_user_timeout`), and an idle one is probed after a lease
/// (`keepalives_idle`, then every third of it, at least 1 s), so that every
/// call on a dead link fails within about a lease (docs/CLUSTER.md §5).
/// Only the peer's kernel has to answer: a slow query is not cut short.
fn bound_dead_links(config: &mut tokio_postgres::Config, lease: Duration) {
    let bound = lease.max(Duration::from_secs(1));
    // The kernel takes keepalive times in whole seconds.
    let seconds = |d: Duration| Duration::from_secs(d.as_secs().max(1));
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(bound);
    }
    if config.get_keepalives() && config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
        config.keepalives_idle(seconds(bound));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(seconds(bound / 3));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
}

/// A database call's future, borrowing its connection.
type DbFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

impl PgStore {
    /// Connects to the database named by `url` (a libpq connection string
    /// or `postgresql://` URL), and makes or migrates its schema: a store
    /// outside any cluster (tools, tests), whose audit chain is node `''`.
    pub fn open(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        PgStore::open_node(
            url,
            options,
            NodeOptions { name: String::new(), lease: crate::config::DEFAULT_LEASE },
        )
    }

    /// [`PgStore::open`] for node `node` of a cluster.
    pub fn open_node(url: &str, options: &PgOptions, node: NodeOptions) -> Result<PgStore, StoreError> {
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
        // The socket's connect (tokio-postgres's `connect_timeout`, which
        // this overrides); the whole opening, authentication included, is
        // bounded by the calls' limits (`PgStore::on_db_limit`).
        config.connect_timeout(options.connect_timeout);
        bound_dead_links(&mut config, node.lease);
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
        let server = servers(&config);
        let tls = postgres_native_tls::MakeTlsConnector::new(tls);
        let listen = (config.clone(), tls.clone());
        let manager =
            Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
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
            server,
            connect_timeout: options.connect_timeout,
            keys: Default::default(),
            aliases: RwLock::new(None),
            anchored: tokio::sync::Mutex::new(None),
            audit_pending: Mutex::new(Vec::new()),
            node,
            applied: AtomicI64::new(0),
            sink: OnceLock::new(),
            serving_until: Mutex::new(None),
            stop: tokio_util::sync::CancellationToken::new(),
            me: OnceLock::new(),
            listen,
            woken: Default::default(),
            instance: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ),
        };
        super::wait(Box::pin(store.migrate())).map_err(|e| match e {
            StoreError::Backend(why) => StoreError::Backend(format!("{}: {why}", store.location)),
            other => other,
        })?;
        Ok(store)
    }

    /// How long opening a connection may take (`[store]
    /// connect_timeout_seconds`).
    fn connect_limit(&self) -> Limit {
        Limit {
            total: self.connect_timeout,
            set_by: format!("[store] connect_timeout_seconds = {}", self.connect_timeout.as_secs()),
        }
    }

    /// How long one database call may take, a new connection included:
    /// a server that stops answering (paused, hung) over a Unix socket has
    /// no TCP bound, and a call on it would wait for ever (docs/CLUSTER.md
    /// §5).
    fn limit(&self) -> Limit {
        Limit {
            total: self.connect_timeout + self.node.lease,
            set_by: format!(
                "[store] connect_timeout_seconds = {} plus [cluster] lease = {}",
                self.connect_timeout.as_secs(),
                humantime::format_duration(self.node.lease)
            ),
        }
    }

    /// How long a write may take: the cluster's write lock may be waited
    /// for (`lock_timeout`), then its statements.
    fn write_limit(&self) -> Limit {
        let call = self.limit();
        Limit {
            total: WRITE_LOCK_TIMEOUT + call.total,
            set_by: format!(
                "{} plus {} for the cluster's write lock",
                call.set_by,
                super::seconds_text(WRITE_LOCK_TIMEOUT)
            ),
        }
    }

    /// A lease (`health`'s queries).
    fn lease_limit(&self) -> Limit {
        Limit {
            total: self.node.lease,
            set_by: format!("[cluster] lease = {}", humantime::format_duration(self.node.lease)),
        }
    }

    /// The call named `what`, given up after `limit`.
    fn no_answer(server: &str, what: &str, limit: &Limit) -> StoreError {
        StoreError::NoAnswer {
            server: server.to_owned(),
            what: what.to_owned(),
            limit: limit.total,
            set_by: limit.set_by.clone(),
        }
    }

    /// A connection attempt for the call named `what` that gave up on
    /// its socket's connect (tokio-postgres's `connect_timeout`).
    fn connect_late(server: &str, what: &str, connect: &Limit) -> StoreError {
        match what {
            "opening a connection" => PgStore::no_answer(server, what, connect),
            _ => PgStore::no_answer(server, &format!("opening a connection ({what})"), connect),
        }
    }

    /// Runs `f` with a pooled connection on the store's runtime, given up
    /// after [`PgStore::limit`]; `what` names the call in its error.
    fn on_db<T, F, Fut>(
        &self,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        self.on_db_limit(self.limit(), what, f)
    }

    /// Runs `f` with a pooled connection on the store's runtime, giving up
    /// after `limit` (waiting for the connection included) with
    /// [`StoreError::NoAnswer`] (`store_unavailable`) naming the server,
    /// `what` and the limit. The connection goes back to the pool; the
    /// late answer of a call given up is discarded when it comes.
    fn on_db_limit<T, F, Fut>(
        &self,
        limit: Limit,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (server, connect) = (self.server.clone(), self.connect_limit());
        let task = self.handle.spawn(async move {
            let deadline = tokio::time::Instant::now() + limit.total;
            let late = || PgStore::no_answer(&server, what, &limit);
            let client = match tokio::time::timeout_at(deadline, pool.get()).await {
                Err(_) => return Err(late()),
                Ok(Err(e)) if timed_out(&e) => return Err(PgStore::connect_late(&server, what, &connect)),
                Ok(got) => got.map_err(pool_error)?,
            };
            tokio::time::timeout_at(deadline, f(client)).await.map_err(|_| late())?
        });
        async move { task.await.map_err(|e| StoreError::Backend(format!("postgres task: {e}")))? }
    }

    /// `fut`, given up after `limit` with [`StoreError::NoAnswer`]
    /// (`store_unavailable`; `what` names it): for calls on connections
    /// held outside [`PgStore::on_db`] (the write lock's, the change
    /// feed's). Dropping the call releases what it held: the write lock's
    /// connection is closed, the cluster's lock with it. Pollable from any
    /// thread: the timer runs on the store's runtime.
    fn bounded<'a, T: Send + 'a>(
        &self,
        limit: Limit,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'a {
        let total = limit.total;
        let timer = AbortOnDrop(self.handle.spawn(async move { tokio::time::sleep(total).await }));
        let server = self.server.clone();
        async move {
            let mut timer = timer;
            let mut fut = std::pin::pin!(fut);
            std::future::poll_fn(move |cx| {
                if let std::task::Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return std::task::Poll::Ready(r);
                }
                match std::pin::Pin::new(&mut timer.0).poll(cx) {
                    std::task::Poll::Ready(_) => {
                        std::task::Poll::Ready(Err(PgStore::no_answer(&server, what, &limit)))
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            })
            .await
        }
    }

    /// Runs `f` with a pooled connection on the store's runtime, giving up
    /// after `limit` (waiting for a connection included): a connection whose
    /// call outlived it is closed, never pooled again (the call may still
    /// have been applied; the next one runs on another connection).
    fn on_db_within<T, F>(
        &self,
        limit: Limit,
        what: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a tokio_postgres::Client) -> DbFuture<'a, T> + Send + 'static,
    {
        let pool = self.pool.clone();
        let (server, connect) = (self.server.clone(), self.connect_limit());
        let task = self.handle.spawn(async move {
            let late = || PgStore::no_answer(&server, what, &limit);
            let deadline = tokio::time::Instant::now() + limit.total;
            let conn = match tokio::time::timeout_at(deadline, pool.get()).await {
                Err(_) => return Err(late()),
                Ok(Err(e)) if timed_out(&e) => return Err(PgStore::connect_late(&server, what, &connect)),
                Ok(got) => got.map_err(pool_error)?,
            };
            let done = tokio::time::timeout_at(deadline, f(&conn)).await;
            match done {
                Ok(result) => result,
                Err(_) => {
                    drop(Object::take(conn));
                    Err(late())
                }
            }
        });
        async move { task.await.map_err(|e| StoreError::Backend(format!("postgres task: {e}")))? }
    }

    /// Makes the schema, or brings it up to [`PG_SCHEMA_VERSION`]; refuses
    /// a database whose schema is newer than this daemon knows. A server
    /// that does not answer fails it within the connection's time limit
    /// (opening the first connection), then the call's (reading the
    /// schema's version); only a migration itself, when the schema is
    /// older, may take up to [`MIGRATION_LIMIT`].
    async fn migrate(&self) -> Result<(), StoreError> {
        self.on_db_limit(self.connect_limit(), "opening a connection", |_| async { Ok(()) }).await?;
        let found: i32 = self
            .on_db("reading the schema's version", |c| async move {
                let made: bool = c
                    .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
                    .await
                    .map_err(db)?
                    .get(0);
                if !made {
                    return Ok(0);
                }
                Ok(c.query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
                    .await
                    .map_err(db)?
                    .get(0))
            })
            .await?;
        let location = self.location.clone();
        if found > PG_SCHEMA_VERSION {
            return Err(StoreError::NewerSchema { store: location, found, known: PG_SCHEMA_VERSION });
        }
        if found == PG_SCHEMA_VERSION {
            return Ok(());
        }
        let limit = Limit {
            total: MIGRATION_LIMIT,
            set_by: format!("{} for a migration of the schema", super::seconds_text(MIGRATION_LIMIT)),
        };
        self.on_db_limit(limit, "migrating the schema", move |mut c| async move {
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
    async fn read_digest(c: &tokio_postgres::Client) -> Result<StateDigest, StoreError> {
        Ok(PgStore::digest_of(&PgStore::read_rows(c).await?))
    }

    fn digest_of(rows: &[(&'static str, Vec<u8>, String)]) -> StateDigest {
        let mut digest = StateDigest::default();
        for (tree, key, value) in rows {
            digest.load(tree, key, value.as_bytes());
        }
        digest.finish_load();
        digest
    }

    /// Every anchored record (`tree`, key, record text) as the database
    /// holds them now (`c` must see one state).
    async fn read_rows<C: tokio_postgres::GenericClient + Sync>(
        c: &C,
    ) -> Result<Vec<(&'static str, Vec<u8>, String)>, StoreError> {
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
    }

    /// This store behind an `Arc`, known to itself (its background tasks
    /// hold it weakly).
    pub fn shared(self) -> Arc<PgStore> {
        let me = Arc::new(self);
        let _ = me.me.set(Arc::downgrade(&me));
        me
    }

    /// A pooled connection for this task.
    async fn conn(&self) -> Result<Object, StoreError> {
        self.on_db("getting a connection", |c| async move { Ok(c) }).await
    }

    /// Takes the cluster's write lock: every node's writes, and the
    /// anchor's check at start, are serialised by it.
    async fn lock_cluster(&self) -> Result<WriteLock, StoreError> {
        let mut lock = WriteLock { conn: Some(self.conn().await?) };
        // A node that holds the lock and stopped answering (paused, cut
        // off with its connection still open) fails the others' writes
        // after this long, rather than hanging them.
        let timeout = format!("SET lock_timeout = '{}ms'", WRITE_LOCK_TIMEOUT.as_millis());
        lock.client().batch_execute(&timeout).await.map_err(db)?;
        lock.client().execute("SELECT pg_advisory_lock($1)", &[&WRITE_LOCK]).await.map_err(db)?;
        Ok(lock)
    }

    /// Before a write: takes the cluster's write lock, catches up on the
    /// change feed (other nodes' writes, and this node's own write in
    /// doubt), and checks the result against the token's anchor as the
    /// token holds it now ([`reconcile`]).
    async fn begin_write(&self, w: &mut Option<Anchored>) -> Result<WriteLock, StoreError> {
        let mut lock = self.lock_cluster().await?;
        self.catch_up(&*lock.client(), w).await?;
        reconcile(w)?;
        Ok(lock)
    }

    /// In a write's transaction: the next revision of the change feed,
    /// naming the records of `tree` it changes, and a `NOTIFY`.
    async fn record_change(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tree: &str,
        keys: Vec<String>,
    ) -> Result<i64, StoreError> {
        let rows = tx
            .query(
                "WITH r AS (SELECT coalesce(max(revision), 0) + 1 AS rev FROM changes) \
                 INSERT INTO changes (revision, node, tree, key) \
                 SELECT r.rev, $1, $2, k FROM r, unnest($3::text[]) AS k RETURNING revision",
                &[&self.node.name, &tree, &keys],
            )
            .await
            .map_err(db)?;
        let rev: i64 =
            rows.first().map(|r| r.get(0)).ok_or_else(|| StoreError::Backend("empty change".into()))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&FEED_CHANNEL, &rev.to_string()]).await.map_err(db)?;
        Ok(rev)
    }

    /// Applies the change feed from this node's revision on: reloads each
    /// record named into the caches, the digest and the sink, then moves
    /// the applied revision. Returns whether anything was new. `c` must see
    /// one state (the write lock, or a repeatable-read transaction).
    async fn catch_up<C: tokio_postgres::GenericClient + Sync>(
        &self,
        c: &C,
        w: &mut Option<Anchored>,
    ) -> Result<bool, StoreError> {
        let from = self.applied.load(Ordering::SeqCst);
        // With the oldest revision the feed still holds, in the same
        // statement (so the same state, whatever `c` is): the feed is
        // trimmed, but never its newest revision, so no row newer than
        // `from` means nothing was missed.
        let rows = c
            .query(
                "SELECT revision, tree, key, (SELECT min(revision) FROM changes) FROM changes \
                 WHERE revision > $1 ORDER BY revision",
                &[&from],
            )
            .await
            .map_err(db)?;
        let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else { return Ok(false) };
        let oldest: i64 = rows[0].get(3);
        if oldest > from + 1 {
            // Revisions after `from` were trimmed before this node applied
            // them (it was away longer than the trimming waits for): what
            // they changed is unknown, so everything is read afresh.
            self.reload(c, w).await?;
            tracing::warn!(
                node = %self.node.name,
                applied = from,
                oldest,
                revision = last,
                "the change feed was trimmed past this node's revision: reloaded every record"
            );
            self.applied.store(last, Ordering::SeqCst);
            return Ok(true);
        }
        let touched: BTreeSet<(String, String)> =
            rows.iter().map(|r| (r.get::<_, String>(1), r.get::<_, String>(2))).collect();
        let sink = self.sink.get();
        for (tree, key) in &touched {
            match tree.as_str() {
                "meta" => {
                    let row =
                        c.query_opt("SELECT record FROM meta WHERE id = $1", &[key]).await.map_err(db)?;
                    let text = row.map(|r| r.get::<_, String>(0));
                    learn(w, "meta", key.as_bytes(), text.as_deref().map(str::as_bytes));
                    let meta: Option<Meta> = text.as_deref().map(|t| decode("meta", t)).transpose()?;
                    if key == META_ID {
                        self.cache_aliases(meta.as_ref());
                    }
                    if let (Some(sink), Some(meta)) = (sink, &meta) {
                        sink.meta(meta);
                    }
                }
                "keyring" => {
                    let Some((tenant, name)) = key.split_once('/') else { continue };
                    let row = c
                        .query_opt(
                            "SELECT record FROM keyring WHERE tenant = $1 AND name = $2",
                            &[&tenant, &name],
                        )
                        .await
                        .map_err(db)?;
                    let text = row.map(|r| r.get::<_, String>(0));
                    learn(w, "keyring", key.as_bytes(), text.as_deref().map(str::as_bytes));
                    let record: Option<KeyRecord> =
                        text.as_deref().map(|t| decode(&format!("keyring {key}"), t)).transpose()?;
                    {
                        let mut cache = self.keys.write().unwrap_or_else(|e| e.into_inner());
                        match &record {
                            Some(r) => cache.put(key.clone().into_bytes(), Arc::new(r.clone())),
                            None => cache.forget(key.as_bytes()),
                        };
                    }
                    if let (Some(sink), Ok(path)) = (sink, KeyPath::new(tenant, name)) {
                        sink.key(&path, record.as_ref());
                    }
                }
                "revocations" => {
                    let row = c
                        .query_opt("SELECT record FROM revocations WHERE scope = $1", &[key])
                        .await
                        .map_err(db)?;
                    let text = row.map(|r| r.get::<_, String>(0));
                    learn(w, "revocations", key.as_bytes(), text.as_deref().map(str::as_bytes));
                    let record: Option<Revocation> =
                        text.as_deref().map(|t| decode(&format!("revocation {key}"), t)).transpose()?;
                    if let (Some(sink), Some(scope)) = (sink, scope_of_key(key)) {
                        sink.revocation(&scope, record.as_ref());
                    }
                }
                _ => {}
            }
        }
        self.applied.store(last, Ordering::SeqCst);
        Ok(true)
    }

    /// Reads every record afresh into the caches, the digest and the sink
    /// (the feed was trimmed past this node's revision). `c` must see one
    /// state, as for [`PgStore::catch_up`].
    async fn reload<C: tokio_postgres::GenericClient + Sync>(
        &self,
        c: &C,
        w: &mut Option<Anchored>,
    ) -> Result<(), StoreError> {
        let rows = PgStore::read_rows(c).await?;
        let (mut meta, mut keys, mut revocations) = (None, Vec::new(), Vec::new());
        let mut fresh: HashMap<Vec<u8>, Arc<KeyRecord>> = HashMap::new();
        {
            let cached = self.keys.read().unwrap_or_else(|e| e.into_inner());
            for (tree, key, text) in &rows {
                let name = String::from_utf8_lossy(key);
                match *tree {
                    "meta" if key == META_ID.as_bytes() => meta = Some(decode::<Meta>("meta", text)?),
                    "keyring" => {
                        let record: KeyRecord = decode(&format!("keyring {name}"), text)?;
                        // The cache keeps the keys it held, each as it is now.
                        if cached.present.contains_key(key) {
                            fresh.insert(key.clone(), Arc::new(record.clone()));
                        }
                        keys.push(record);
                    }
                    "revocations" => revocations.push(decode(&format!("revocation {name}"), text)?),
                    _ => {}
                }
            }
        }
        relearn(w, PgStore::digest_of(&rows));
        // Names known to have no key are forgotten: any may have one now.
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) =
            KeyCache { present: fresh, absent: HashSet::new() };
        self.cache_aliases(meta.as_ref());
        if let Some(sink) = self.sink.get() {
            sink.reload(meta.as_ref(), &keys, &revocations);
        }
        Ok(())
    }

    /// Deletes the change feed's oldest revisions that no node needs any
    /// more (docs/CLUSTER.md §4): those below the revision every node
    /// applied, counting the nodes whose lease is live or ran out less than
    /// [`TRIM_GRACE_LEASES`] leases ago; never the newest revision (the
    /// next write numbers its revision after it); at most [`TRIM_BATCH`]
    /// revisions a round. Returns the rows deleted.
    async fn trim_feed(&self) -> Result<u64, StoreError> {
        let grace = (self.node.lease * TRIM_GRACE_LEASES).as_millis() as i64;
        self.on_db("trimming the change feed", move |c| async move {
            c.execute(
                "DELETE FROM changes WHERE revision < (SELECT least( \
                   (SELECT coalesce(min(applied), 0) FROM nodes \
                    WHERE lease_until > now() - $1::bigint * interval '1 millisecond'), \
                   (SELECT coalesce(max(revision), 0) FROM changes), \
                   (SELECT coalesce(min(revision), 0) FROM changes) + $2::bigint))",
                &[&grace, &TRIM_BATCH],
            )
            .await
            .map_err(db)
        })
        .await
    }

    /// Reads the change feed (the background task, and a node coming back
    /// from a lapsed lease), then reports the revision applied.
    /// Returns the revision reported when anything was new.
    async fn poll_feed(&self) -> Result<Option<i64>, StoreError> {
        self.bounded(self.limit(), "reading the change feed", self.read_feed()).await
    }

    /// [`PgStore::poll_feed`], without its time limit.
    async fn read_feed(&self) -> Result<Option<i64>, StoreError> {
        let mut w = self.anchored.lock().await;
        let mut conn = self.conn().await?;
        let client: &mut tokio_postgres::Client = &mut conn;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let advanced = self.catch_up(&tx, &mut w).await?;
        tx.commit().await.map_err(db)?;
        drop(w);
        if advanced {
            let applied = self.applied.load(Ordering::SeqCst);
            client
                // Never backwards: a concurrent reader of the feed (a
                // renewal's, a cache miss's) may report a newer revision
                // first. Only this daemon's row (not a successor's that took
                // the name once this one's lease ran out).
                .execute(
                    "UPDATE nodes SET applied = greatest(applied, $2) WHERE name = $1 AND instance = $3",
                    &[&self.node.name, &applied, &self.instance],
                )
                .await
                .map_err(db)?;
            return Ok(Some(applied));
        }
        Ok(None)
    }

    /// The safety margin taken off the lease when deciding to serve.
    fn margin(&self) -> Duration {
        (self.node.lease / 5).max(Duration::from_millis(100))
    }

    /// Renews this node's lease (PostgreSQL's clock) with the revision it
    /// applied; a node whose lease had lapsed (or never was) catches up on
    /// the feed before it serves again. The lease counts, by this node's
    /// clock, from before the renewal was sent.
    async fn renew(&self, first: bool) -> Result<(), StoreError> {
        let sent = Instant::now();
        let lapsed = self.serving().is_err() || first;
        self.write_lease(first).await?;
        if lapsed {
            self.poll_feed().await?;
        }
        *self.serving_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(sent + self.node.lease - self.margin());
        Ok(())
    }

    /// Writes this node's lease row: `lease_until = now() + lease` and the
    /// revision applied (`first`: a start, which also sets `started`). A
    /// renewal gives up once the lease it would give could no longer be
    /// used (the lease less the margin): one stuck on a dead connection
    /// must not hold the next back. A start may also open a connection.
    async fn write_lease(&self, first: bool) -> Result<(), StoreError> {
        let (name, ms, applied) =
            (self.node.name.clone(), self.node.lease.as_millis() as i64, self.applied.load(Ordering::SeqCst));
        let instance = self.instance.clone();
        let limit = match first {
            true => self.limit(),
            false => Limit {
                total: self.node.lease.saturating_sub(self.margin()),
                set_by: format!(
                    "[cluster] lease = {} less its margin of {}",
                    humantime::format_duration(self.node.lease),
                    humantime::format_duration(self.margin())
                ),
            },
        };
        // The row is this daemon's while its lease lasts: another daemon
        // with the same name takes it only once that lease has run out.
        // The revision applied never goes backwards for the same daemon:
        // `applied` was read before this statement, and the change feed's
        // reader may have reported a newer one meanwhile (a writer waiting
        // for it would then wait for the next renewal).
        let renewed = self
            .on_db_within(limit, "renewing the lease", move |c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO nodes (name, lease_until, applied, version, instance) \
                         VALUES ($1, now() + $2::bigint * interval '1 millisecond', $3, $4, $6) \
                         ON CONFLICT (name) DO UPDATE SET lease_until = EXCLUDED.lease_until, \
                         applied = CASE WHEN nodes.instance = EXCLUDED.instance \
                           THEN greatest(nodes.applied, EXCLUDED.applied) ELSE EXCLUDED.applied END, \
                         version = EXCLUDED.version, instance = EXCLUDED.instance, \
                         started = CASE WHEN $5 THEN now() ELSE nodes.started END \
                         WHERE nodes.instance = EXCLUDED.instance OR nodes.lease_until < now()",
                        &[&name, &ms, &applied, &env!("CARGO_PKG_VERSION"), &first, &instance],
                    )
                    .await
                    .map_err(db)
                })
            })
            .await?;
        if renewed == 0 {
            return Err(StoreError::NodeNameTaken(self.node.name.clone()));
        }
        Ok(())
    }

    /// After a write that takes a right away, committed as revision `rev`:
    /// returns once every other node with a live lease has applied it, or
    /// its lease has run out (at most the longest lease).
    async fn wait_applied(&self, rev: i64) -> Result<(), StoreError> {
        let name = self.node.name.clone();
        let call = self.limit();
        let limit = Limit {
            total: crate::config::LEASE_BOUNDS.1 + Duration::from_secs(2) + call.total,
            set_by: format!(
                "the longest lease, {}, plus 2 s plus {}",
                super::seconds_text(crate::config::LEASE_BOUNDS.1),
                call.set_by
            ),
        };
        self.on_db_limit(limit, "waiting for the nodes to apply a change", move |c| async move {
            let deadline = Instant::now() + crate::config::LEASE_BOUNDS.1 + Duration::from_secs(1);
            let mut pause = APPLIED_POLL_FIRST;
            loop {
                let behind: i64 = c
                    .query_one(
                        "SELECT count(*) FROM nodes WHERE name <> $1 AND lease_until > now() AND applied < $2",
                        &[&name, &rev],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                if behind == 0 {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(StoreError::Backend(format!(
                        "{behind} node(s) with a live lease have not applied change {rev}"
                    )));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(APPLIED_POLL);
            }
        })
        .await
    }

    fn cache_put(&self, k: Vec<u8>, record: KeyRecord) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).put(k, Arc::new(record));
    }

    /// The alias table is now `meta`'s (under the writers' lock: a write
    /// of the meta record, or the feed's reader applying one).
    fn cache_aliases(&self, meta: Option<&Meta>) {
        let table = meta.map(|m| m.aliases.clone()).unwrap_or_default();
        *self.aliases.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(table));
    }

    /// Whether this node follows the change feed ([`Backend::start_cluster`]
    /// ran): only then do its caches answer that a name is no key
    /// ([`KeyCache::absent`]) and what an alias names, since only then does
    /// every other node's change reach them.
    fn following(&self) -> bool {
        self.sink.get().is_some()
    }

    /// The alias table, from the cache; read from the database the first
    /// time, under the writers' lock (so that the feed's reader, which
    /// holds it too, cannot apply an older meta record over it).
    async fn alias_table(&self) -> Result<Arc<Aliases>, StoreError> {
        if let Some(table) = self.aliases.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(table);
        }
        let _w = self.anchored.lock().await;
        if let Some(table) = self.aliases.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(table);
        }
        let meta = self.meta().await?;
        self.cache_aliases(meta.as_ref());
        Ok(Arc::new(meta.map(|m| m.aliases).unwrap_or_default()))
    }

    async fn read_key(&self, path: &KeyPath) -> Result<Option<(KeyRecord, String, i64)>, StoreError> {
        let (tenant, name) = (path.tenant().to_owned(), path.key().to_owned());
        let row = self
            .on_db("reading a key", move |c| async move {
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
        self.stop.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Backend for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn is_cluster(&self) -> bool {
        true
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn meta(&self) -> StoreFuture<'_, Option<Meta>> {
        Box::pin(async move {
            let text = self
                .on_db("reading the global facts", |c| async move {
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
        Box::pin(self.bounded(self.write_limit(), "writing", async move {
            let mut w = self.anchored.lock().await;
            let mut lock = self.begin_write(&mut w).await?;
            let value = encode(meta);
            prepare(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
            let tx = lock.client().transaction().await.map_err(db)?;
            let inserted = tx
                .execute(
                    "INSERT INTO meta (id, record, row_version) VALUES ($1, $2, 1) ON CONFLICT DO NOTHING",
                    &[&META_ID, &value],
                )
                .await
                .map_err(db)?;
            if inserted == 0 {
                return Err(StoreError::AlreadyInitialised(self.location.clone()));
            }
            let rev = self.record_change(&tx, "meta", vec![META_ID.to_owned()]).await?;
            tx.commit().await.map_err(db)?;
            self.cache_aliases(Some(meta));
            commit(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
            self.applied.store(rev, Ordering::SeqCst);
            lock.release().await;
            Ok(())
        }))
    }

    fn update_meta<'a>(&'a self, change: MetaChange<'a>) -> StoreFuture<'a, Meta> {
        Box::pin(self.bounded(self.write_limit(), "writing", async move {
            let mut w = self.anchored.lock().await;
            let mut lock = self.begin_write(&mut w).await?;
            let tx = lock.client().transaction().await.map_err(db)?;
            let row = tx
                .query_opt("SELECT record, row_version FROM meta WHERE id = $1", &[&META_ID])
                .await
                .map_err(db)?;
            let (old, version): (String, i64) = row
                .map(|r| (r.get(0), r.get(1)))
                .ok_or_else(|| StoreError::NotInitialised(self.location.clone()))?;
            let mut meta: Meta = decode("meta", &old)?;
            change(&mut meta);
            let value = encode(&meta);
            if value == old {
                drop(tx);
                lock.release().await;
                return Ok(meta);
            }
            prepare(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
            let swapped = tx
                .execute(
                    "UPDATE meta SET record = $2, row_version = row_version + 1 WHERE id = $1 AND row_version = $3",
                    &[&META_ID, &value, &version],
                )
                .await
                .map_err(db)?;
            if swapped != 1 {
                return Err(outside_writer("meta"));
            }
            let rev = self.record_change(&tx, "meta", vec![META_ID.to_owned()]).await?;
            tx.commit().await.map_err(db)?;
            self.cache_aliases(Some(&meta));
            commit(&mut w, "meta", META_ID.as_bytes(), Some(value.as_bytes()))?;
            self.applied.store(rev, Ordering::SeqCst);
            lock.release().await;
            Ok(meta)
        }))
    }

    fn key<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<Arc<KeyRecord>>> {
        Box::pin(async move {
            let k = keyring_key(path);
            if let Some(known) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
                return Ok(known);
            }
            let mut caught_up = false;
            loop {
                // Read under the writers' lock, so that a write finishing
                // meanwhile cannot be overtaken in the cache by this older read.
                let w = self.anchored.lock().await;
                if let Some(known) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(&k) {
                    return Ok(known);
                }
                let Some((record, text, _)) = self.read_key(path).await? else {
                    // No key now: one made after this read has a revision
                    // past the one this node applied (the feed's reader
                    // waits for this lock), so the feed brings it.
                    if self.following() {
                        self.keys.write().unwrap_or_else(|e| e.into_inner()).put_absent(k);
                    }
                    return Ok(None);
                };
                // The row must be the one the anchored state holds: a row
                // changed by a database writer who is not a node is refused
                // (after one catch-up on the feed, in case another node
                // wrote it since this node last read the feed).
                if !vouches(&w, "keyring", &k, text.as_bytes()) {
                    drop(w);
                    if !caught_up {
                        self.poll_feed().await?;
                        caught_up = true;
                        continue;
                    }
                    return Err(StoreError::Tampered(format!(
                        "key `{path}`: its record in the database is not the one the token's anchor vouches \
                         for: a database writer who is not a node changed it"
                    )));
                }
                let record = Arc::new(record);
                self.keys.write().unwrap_or_else(|e| e.into_inner()).put(k, record.clone());
                return Ok(Some(record));
            }
        })
    }

    fn alias_target<'a>(&'a self, path: &'a KeyPath) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            if self.key(path).await?.is_some() {
                return Ok(None);
            }
            if !self.following() {
                return Ok(self.meta().await?.and_then(|m| alias_of(&m.aliases, path)));
            }
            Ok(alias_of(&*self.alias_table().await?, path))
        })
    }

    fn create_key<'a>(&'a self, record: &'a KeyRecord) -> StoreFuture<'a, ()> {
        Box::pin(self.bounded(self.write_limit(), "writing", async move {
            let path = record.path()?;
            let k = keyring_key(&path);
            let mut w = self.anchored.lock().await;
            let mut lock = self.begin_write(&mut w).await?;
            let value = encode(record);
            let tx = lock.client().transaction().await.map_err(db)?;
            let (tenant, name) = (path.tenant(), path.key());
            let inserted = tx
                .execute(
                    "INSERT INTO keyring (tenant, name, record, row_version) VALUES ($1, $2, $3, 1) \
                     ON CONFLICT DO NOTHING",
                    &[&tenant, &name, &value],
                )
                .await
                .map_err(db)?;
            if inserted == 0 {
                drop(tx);
                lock.release().await;
                return Err(StoreError::AlreadyExists(format!("key `{path}`")));
            }
            prepare(&mut w, "keyring", &k, Some(value.as_bytes()))?;
            let rev = self.record_change(&tx, "keyring", vec![path.to_string()]).await?;
            tx.commit().await.map_err(db)?;
            self.cache_put(k.clone(), record.clone());
            commit(&mut w, "keyring", &k, Some(value.as_bytes()))?;
            self.applied.store(rev, Ordering::SeqCst);
            lock.release().await;
            Ok(())
        }))
    }

    fn update_key<'a>(
        &'a self,
        path: &'a KeyPath,
        change: KeyChange<'a>,
    ) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(async move {
            // The write, bounded; then (when it takes a right away) the wait
            // for every live node to apply it, bounded by the leases.
            let written = self
                .bounded(self.write_limit(), "writing", async move {
                    let k = keyring_key(path);
                    let mut w = self.anchored.lock().await;
                    let mut lock = self.begin_write(&mut w).await?;
                    let tx = lock.client().transaction().await.map_err(db)?;
                    let (tenant, name) = (path.tenant(), path.key());
                    let row = tx
                        .query_opt(
                            "SELECT record, row_version FROM keyring WHERE tenant = $1 AND name = $2",
                            &[&tenant, &name],
                        )
                        .await
                        .map_err(db)?;
                    let Some(row) = row else {
                        drop(tx);
                        lock.release().await;
                        return Ok(None);
                    };
                    let (old, version): (String, i64) = (row.get(0), row.get(1));
                    let before: KeyRecord = decode(&format!("keyring {path}"), &old)?;
                    let mut record = before.clone();
                    change(&mut record);
                    let value = encode(&record);
                    if value == old {
                        drop(tx);
                        lock.release().await;
                        return Ok(Some((record, None))); // nothing changed: nothing to write
                    }
                    prepare(&mut w, "keyring", &k, Some(value.as_bytes()))?;
                    // Conditional on the row version read: the cluster's lock
                    // serialises the nodes, so a miss is a writer outside it.
                    let swapped = tx
                        .execute(
                            "UPDATE keyring SET record = $3, row_version = row_version + 1 \
                     WHERE tenant = $1 AND name = $2 AND row_version = $4",
                            &[&tenant, &name, &value, &version],
                        )
                        .await
                        .map_err(db)?;
                    if swapped != 1 {
                        return Err(outside_writer(&format!("key `{path}`")));
                    }
                    let rev = self.record_change(&tx, "keyring", vec![path.to_string()]).await?;
                    tx.commit().await.map_err(db)?;
                    self.cache_put(k.clone(), record.clone());
                    commit(&mut w, "keyring", &k, Some(value.as_bytes()))?;
                    self.applied.store(rev, Ordering::SeqCst);
                    lock.release().await;
                    drop(w);
                    let wait = takes_away(&before, &record).then_some(rev);
                    Ok(Some((record, wait)))
                })
                .await?;
            let Some((record, wait)) = written else { return Ok(None) };
            if let Some(rev) = wait {
                self.wait_applied(rev).await?;
            }
            Ok(Some(record))
        })
    }

    fn update_keys<'a>(&'a self, paths: &'a [KeyPath], change: KeysChange<'a>) -> StoreFuture<'a, ()> {
        Box::pin(self.bounded(self.write_limit(), "writing", async move {
            let mut w = self.anchored.lock().await;
            let mut lock = self.begin_write(&mut w).await?;
            let tx = lock.client().transaction().await.map_err(db)?;
            let mut writes: Vec<(KeyPath, String, i64, KeyRecord)> = Vec::new();
            for path in paths {
                let (tenant, name) = (path.tenant(), path.key());
                let row = tx
                    .query_opt(
                        "SELECT record, row_version FROM keyring WHERE tenant = $1 AND name = $2",
                        &[&tenant, &name],
                    )
                    .await
                    .map_err(db)?;
                let Some(row) = row else { continue };
                let (old, version): (String, i64) = (row.get(0), row.get(1));
                let mut record: KeyRecord = decode(&format!("keyring {path}"), &old)?;
                change(path, &mut record);
                let value = encode(&record);
                if value != old {
                    writes.push((path.clone(), value, version, record));
                }
            }
            if writes.is_empty() {
                drop(tx);
                lock.release().await;
                return Ok(());
            }
            let keys: Vec<Vec<u8>> = writes.iter().map(|(p, ..)| keyring_key(p)).collect();
            let changes: Vec<(&[u8], Option<&[u8]>)> =
                keys.iter().zip(&writes).map(|(k, (_, v, ..))| (k.as_slice(), Some(v.as_bytes()))).collect();
            prepare_all(&mut w, "keyring", &changes)?;
            for (path, value, version, _) in &writes {
                let (tenant, name) = (path.tenant(), path.key());
                let n = tx
                    .execute(
                        "UPDATE keyring SET record = $3, row_version = row_version + 1 \
                         WHERE tenant = $1 AND name = $2 AND row_version = $4",
                        &[&tenant, &name, value, version],
                    )
                    .await
                    .map_err(db)?;
                if n != 1 {
                    return Err(outside_writer(&format!("key `{path}`")));
                }
            }
            let names = writes.iter().map(|(p, ..)| p.to_string()).collect();
            let rev = self.record_change(&tx, "keyring", names).await?;
            tx.commit().await.map_err(db)?;
            for (k, (_, _, _, record)) in keys.iter().zip(writes.iter()) {
                self.cache_put(k.clone(), record.clone());
            }
            commit_all(&mut w, "keyring", &changes)?;
            self.applied.store(rev, Ordering::SeqCst);
            lock.release().await;
            Ok(())
        }))
    }

    fn keys<'a>(&'a self, tenant: Option<&'a str>) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(async move {
            let tenant = tenant.map(str::to_owned);
            let rows = self
                .on_db("listing the keys", move |c| async move {
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
            // `health` asks: answered within a lease, whatever the server.
            let n: i64 = self
                .on_db_limit(self.lease_limit(), "counting the keys", |c| async move {
                    Ok(c.query_one("SELECT count(*) FROM keyring", &[]).await.map_err(db)?.get(0))
                })
                .await?;
            Ok(n as u64)
        })
    }

    fn revocations(&self) -> StoreFuture<'_, Vec<Revocation>> {
        Box::pin(async move {
            let rows = self
                .on_db("reading the revocations", |c| async move {
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
            let scope = String::from_utf8_lossy(&k).into_owned();
            let value = encode(revocation);
            let rev = self
                .bounded(self.write_limit(), "writing", async {
                    let mut w = self.anchored.lock().await;
                    let mut lock = self.begin_write(&mut w).await?;
                    prepare(&mut w, "revocations", &k, Some(value.as_bytes()))?;
                    let tx = lock.client().transaction().await.map_err(db)?;
                    tx.execute(
                        "INSERT INTO revocations (scope, record) VALUES ($1, $2) \
                 ON CONFLICT (scope) DO UPDATE SET record = EXCLUDED.record",
                        &[&scope, &value],
                    )
                    .await
                    .map_err(db)?;
                    let rev = self.record_change(&tx, "revocations", vec![scope]).await?;
                    tx.commit().await.map_err(db)?;
                    commit(&mut w, "revocations", &k, Some(value.as_bytes()))?;
                    self.applied.store(rev, Ordering::SeqCst);
                    lock.release().await;
                    drop(w);
                    Ok(rev)
                })
                .await?;
            // The guarantee (docs/CLUSTER.md §4): no live node serves what
            // this covers once it returns.
            self.wait_applied(rev).await
        })
    }

    fn remove_revocation<'a>(&'a self, scope: &'a Scope) -> StoreFuture<'a, Option<Revocation>> {
        Box::pin(self.bounded(self.write_limit(), "writing", async move {
            let k = revocation_key(scope);
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut w = self.anchored.lock().await;
            let mut lock = self.begin_write(&mut w).await?;
            let tx = lock.client().transaction().await.map_err(db)?;
            let present =
                tx.query_opt("SELECT 1 FROM revocations WHERE scope = $1", &[&key]).await.map_err(db)?;
            if present.is_none() {
                drop(tx);
                lock.release().await;
                return Ok(None);
            }
            prepare(&mut w, "revocations", &k, None)?;
            let removed = tx
                .query_opt("DELETE FROM revocations WHERE scope = $1 RETURNING record", &[&key])
                .await
                .map_err(db)?
                .map(|r| r.get::<_, String>(0))
                .ok_or_else(|| outside_writer(&format!("revocation {key}")))?;
            let rev = self.record_change(&tx, "revocations", vec![key.clone()]).await?;
            tx.commit().await.map_err(db)?;
            commit(&mut w, "revocations", &k, None)?;
            self.applied.store(rev, Ordering::SeqCst);
            lock.release().await;
            Ok(Some(decode(&format!("revocation {key}"), &removed)?))
        }))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        // Every write was committed (and so made durable by PostgreSQL)
        // before its future completed.
        Box::pin(std::future::ready(Ok(())))
    }

    fn audit_put(&self, kind: AuditKind, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let entry = (self.node.name.clone(), kind, seq, bytes.to_vec());
        self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        Ok(())
    }

    fn audit_put_chain(
        &self,
        chain: &str,
        kind: AuditKind,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let entry = (chain.to_owned(), kind, seq, bytes.to_vec());
        self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        Ok(())
    }

    fn audit_flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let batch = std::mem::take(&mut *self.audit_pending.lock().unwrap_or_else(|e| e.into_inner()));
            if batch.is_empty() {
                return Ok(());
            }
            let chains: Vec<String> = batch.iter().map(|(c, ..)| c.clone()).collect();
            let kinds: Vec<i16> = batch.iter().map(|(_, k, ..)| kind_code(*k)).collect();
            let seqs: Vec<i64> = batch.iter().map(|(_, _, s, _)| *s as i64).collect();
            let entries: Vec<Vec<u8>> = batch.iter().map(|(.., b)| b.clone()).collect();
            // One statement for the whole batch. An entry already there (a
            // flush whose commit succeeded but whose answer was lost) is
            // kept as it is: the chain check would notice any difference.
            let written = self
                .on_db("writing audit records", move |c| async move {
                    c.execute(
                        "INSERT INTO audit (node, kind, seq, entry) \
                         SELECT * FROM unnest($4::text[], $1::smallint[], $2::bigint[], $3::bytea[]) \
                         ON CONFLICT (node, kind, seq) DO NOTHING",
                        &[&kinds, &seqs, &entries, &chains],
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
        self.audit_scan_chain(&self.node.name.clone(), kind, from, reverse)
    }

    fn audit_scan_chain(&self, chain: &str, kind: AuditKind, from: u64, reverse: bool) -> AuditIter<'_> {
        // A page is one range of `AUDIT_PAGE` values of `seq` whose bounds
        // the query names, so that whatever plan PostgreSQL picks, a page
        // reads at most that many entries. (`ORDER BY seq LIMIT`, with
        // statistics from before the table filled, let the planner read and
        // sort every entry of the chain past the cursor for each page:
        // docs/CLUSTER.md §4.) The range is placed at the nearest entry
        // first, and again past a gap wider than a page.
        let chain = chain.to_owned();
        let mut next = Some(from.min(i64::MAX as u64) as i64);
        // Whether `next` needs placing at the nearest entry first.
        let mut place = true;
        let mut page: std::vec::IntoIter<(u64, Vec<u8>)> = Vec::new().into_iter();
        Box::new(std::iter::from_fn(move || loop {
            if let Some(entry) = page.next() {
                return Some(Ok(entry));
            }
            let at = next?;
            let code = kind_code(kind);
            let chain = chain.clone();
            let placing = place;
            let rows = super::wait(Box::pin(self.on_db("reading the audit log", move |c| async move {
                let mut at = at;
                if placing {
                    let nearest = if reverse {
                        "SELECT seq FROM audit WHERE node = $3 AND kind = $1 AND seq <= $2 ORDER BY seq DESC LIMIT 1"
                    } else {
                        "SELECT seq FROM audit WHERE node = $3 AND kind = $1 AND seq >= $2 ORDER BY seq LIMIT 1"
                    };
                    match c.query_opt(nearest, &[&code, &at, &chain]).await.map_err(db)? {
                        Some(row) => at = row.get(0),
                        None => return Ok(None),
                    }
                }
                // [at - AUDIT_PAGE + 1, at] or [at, at + AUDIT_PAGE - 1],
                // without overflowing.
                let (low, high) = match reverse {
                    true => (at.saturating_sub(AUDIT_PAGE - 1), at),
                    false => (at, at.saturating_add(AUDIT_PAGE - 1)),
                };
                let sql = if reverse {
                    "SELECT seq, entry FROM audit WHERE node = $4 AND kind = $1 AND seq >= $2 AND seq <= $3 \
                     ORDER BY seq DESC"
                } else {
                    "SELECT seq, entry FROM audit WHERE node = $4 AND kind = $1 AND seq >= $2 AND seq <= $3 \
                     ORDER BY seq"
                };
                let rows = c.query(sql, &[&code, &low, &high, &chain]).await.map_err(db)?;
                let rows: Vec<(u64, Vec<u8>)> =
                    rows.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1))).collect();
                Ok(Some((at, rows)))
            })));
            match rows {
                Err(e) => {
                    next = None;
                    return Some(Err(e));
                }
                // No entry left on that side.
                Ok(None) => return None,
                Ok(Some((at, rows))) => {
                    // On from the last entry read (one appended meanwhile
                    // past it is read too). An empty range (a gap wider
                    // than a page): on from the nearest entry, looked for
                    // from the same place (or past it, when that place was
                    // an entry deleted meanwhile).
                    let last = rows.last().map_or(at, |(seq, _)| *seq as i64);
                    let step = !rows.is_empty() || placing;
                    next = match (reverse, step) {
                        (_, false) => Some(last),
                        (true, true) => last.checked_sub(1).filter(|n| *n >= 0),
                        (false, true) => last.checked_add(1),
                    };
                    place = rows.is_empty();
                    page = rows.into_iter();
                }
            }
        }))
    }

    fn attach_anchor(&self, anchor: Arc<dyn Anchor>) -> Result<AnchorState, StoreError> {
        let mut guard = self.anchored.blocking_lock();
        // Bounded like a write (it waits for the cluster's write lock, then
        // reads every record): a server that stops answering fails the
        // start, naming it, rather than hanging it.
        let what = "checking the store against its anchor in the token";
        super::wait(Box::pin(self.bounded(self.write_limit(), what, async {
            // Under the cluster's lock: no node writes between this read of
            // the records and the check of the token's anchor.
            let mut lock = self.lock_cluster().await?;
            let rev: i64 = lock
                .client()
                .query_one("SELECT coalesce(max(revision), 0) FROM changes", &[])
                .await
                .map_err(db)?
                .get(0);
            let digest = PgStore::read_digest(lock.client()).await?;
            let (anchored, state) = super::state::attach(anchor, digest)?;
            lock.release().await;
            self.applied.store(rev, Ordering::SeqCst);
            *guard = Some(anchored);
            Ok(state)
        })))
    }

    fn accept_as_is(&self, anchor: Arc<dyn Anchor>) -> Result<Option<AnchorState>, StoreError> {
        let mut guard = self.anchored.blocking_lock();
        let what = "reading the store to anchor it as it is";
        super::wait(Box::pin(self.bounded(self.write_limit(), what, async {
            let mut lock = self.lock_cluster().await?;
            let rev: i64 = lock
                .client()
                .query_one("SELECT coalesce(max(revision), 0) FROM changes", &[])
                .await
                .map_err(db)?
                .get(0);
            let digest = PgStore::read_digest(lock.client()).await?;
            let (anchored, old) = super::state::accept(anchor, digest)?;
            lock.release().await;
            self.applied.store(rev, Ordering::SeqCst);
            *guard = Some(anchored);
            Ok(old)
        })))
    }

    fn start_cluster(&self, sink: Arc<dyn ChangeSink>) -> Result<(), StoreError> {
        let me =
            self.me.get().cloned().ok_or_else(|| StoreError::Backend("the store is not shared".into()))?;
        if self.sink.set(sink).is_err() {
            return Ok(());
        }
        // Claimed by `claim_node`; not serving yet, so this renewal
        // catches up on the feed before the node serves.
        super::wait(Box::pin(self.renew(false)))?;
        tracing::info!(node = %self.node.name, lease = ?self.node.lease, "joined the cluster");
        let every = self.node.lease / 3;
        let (stop, weak) = (self.stop.clone(), me.clone());
        self.handle.spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(s) = weak.upgrade() else { break };
                let renewed = s.renew(false).await;
                if renewed.is_ok() {
                    // Rows every node applied are deleted as the lease is renewed.
                    match s.trim_feed().await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(rows = n, "change feed trimmed"),
                        Err(e) => tracing::debug!(error = %e, "cannot trim the change feed"),
                    }
                }
                match renewed {
                    Ok(()) if failing => {
                        tracing::info!("the lease is renewed again: serving");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "cannot renew this node's lease: key operations stop when it ends");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        let (stop, weak, woken) = (self.stop.clone(), me.clone(), self.woken.clone());
        self.handle.spawn(async move {
            // The feed's `LISTEN` connection, opened again whenever it drops.
            loop {
                let Some(s) = weak.upgrade() else { break };
                let (config, tls) = s.listen.clone();
                let connect_timeout = s.connect_timeout;
                drop(s);
                // A server that accepts and never answers does not hold
                // this loop (nor the store's drop) for ever.
                let opened = tokio::select! {
                    _ = stop.cancelled() => return,
                    o = tokio::time::timeout(connect_timeout, config.connect(tls)) => o,
                };
                if let Ok(Ok((client, mut connection))) = opened {
                    let listen = format!("LISTEN {FEED_CHANNEL}");
                    let listening = client.batch_execute(&listen);
                    let mut listening = std::pin::pin!(listening);
                    let mut subscribed = false;
                    loop {
                        let message = std::future::poll_fn(|cx| {
                            if !subscribed {
                                if let std::task::Poll::Ready(r) = listening.as_mut().poll(cx) {
                                    subscribed = true;
                                    if r.is_err() {
                                        return std::task::Poll::Ready(None);
                                    }
                                }
                            }
                            connection.poll_message(cx)
                        });
                        let message = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = message => m,
                        };
                        match message {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                tracing::trace!(revision = n.payload(), "change feed: NOTIFY received");
                                woken.notify_one()
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        let (stop, weak, woken) = (self.stop.clone(), me, self.woken.clone());
        self.handle.spawn(async move {
            let mut failing = false;
            loop {
                let by = tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(FEED_POLL) => "poll",
                    _ = woken.notified() => "notify",
                };
                let Some(s) = weak.upgrade() else { break };
                match s.poll_feed().await {
                    Ok(advanced) => {
                        if let Some(applied) = advanced {
                            // `poll`: a NOTIFY was lost (or came late).
                            tracing::debug!(applied, by, "change feed: applied and reported");
                        }
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "cannot read the change feed");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        Ok(())
    }

    fn claim_node(&self) -> Result<(), StoreError> {
        // A daemon of the same name that stopped without giving its lease
        // up (killed) holds it for at most a lease: wait that long.
        let deadline = Instant::now() + self.node.lease + Duration::from_secs(1);
        loop {
            match super::wait(Box::pin(self.write_lease(true))) {
                Err(StoreError::NodeNameTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    fn serving(&self) -> Result<(), StoreError> {
        if self.sink.get().is_none() {
            return Ok(());
        }
        match *self.serving_until.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(until) if Instant::now() < until => Ok(()),
            _ => Err(StoreError::Backend(format!(
                "node `{}` holds no valid lease in PostgreSQL: it serves nothing but `hello` and `health` until \
                 it renews its lease and catches up on the cluster's changes (docs/CLUSTER.md)",
                self.node.name
            ))),
        }
    }

    fn until_not_serving(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if self.sink.get().is_none() {
                return std::future::pending().await;
            }
            // Renewals move the end on; each wake-up reads it again.
            loop {
                let until = *self.serving_until.lock().unwrap_or_else(|e| e.into_inner());
                match until {
                    Some(t) if Instant::now() < t => tokio::time::sleep_until(t.into()).await,
                    _ => return,
                }
            }
        })
    }

    fn cluster(&self) -> StoreFuture<'_, Option<ClusterView>> {
        Box::pin(async move {
            // `health` asks: answered within a lease, whatever the server.
            let rows = self
                .on_db_limit(self.lease_limit(), "reading the cluster's nodes", |c| async move {
                    let rev: i64 = c
                        .query_one("SELECT coalesce(max(revision), 0) FROM changes", &[])
                        .await
                        .map_err(db)?
                        .get(0);
                    let nodes = c
                        .query(
                            "SELECT name, lease_until > now(), \
                             (extract(epoch FROM lease_until - now()) * 1000)::bigint, applied, \
                             extract(epoch FROM started)::bigint, version FROM nodes ORDER BY name",
                            &[],
                        )
                        .await
                        .map_err(db)?
                        .iter()
                        .map(|r| NodeView {
                            name: r.get(0),
                            live: r.get(1),
                            lease_left_ms: r.get(2),
                            applied: r.get(3),
                            started: r.get(4),
                            version: r.get(5),
                        })
                        .collect::<Vec<_>>();
                    Ok((rev, nodes))
                })
                .await?;
            Ok(Some(ClusterView {
                node: self.node.name.clone(),
                applied: self.applied.load(Ordering::SeqCst),
                revision: rows.0,
                serving: self.serving().is_ok(),
                nodes: rows.1,
            }))
        })
    }

    fn leave(&self) {
        self.stop.cancel();
        if self.sink.get().is_none() {
            return;
        }
        *self.serving_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let (name, instance) = (self.node.name.clone(), self.instance.clone());
        let left = super::wait(Box::pin(self.on_db("giving up the lease", move |c| async move {
            c.execute(
                "UPDATE nodes SET lease_until = now() WHERE name = $1 AND instance = $2",
                &[&name, &instance],
            )
            .await
            .map_err(db)
        })));
        if let Err(e) = left {
            tracing::warn!(error = %e, "cannot give up this node's lease (it runs out by itself)");
        }
    }

    fn jobs_lock(&self) -> StoreFuture<'_, Option<super::JobsGuard>> {
        Box::pin(async move {
            let mut lock = WriteLock { conn: Some(self.conn().await?) };
            let got: bool = self
                .bounded(self.limit(), "taking the periodic jobs' lock", async {
                    Ok(lock
                        .client()
                        .query_one("SELECT pg_try_advisory_lock($1)", &[&JOBS_LOCK])
                        .await
                        .map_err(db)?
                        .get::<_, bool>(0))
                })
                .await?;
            // Dropped, the guard closes its connection, which releases the lock.
            Ok(got.then(|| super::JobsGuard(Box::new(lock))))
        })
    }

    fn live_nodes(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.on_db("reading the live nodes", |c| async move {
            let rows = c
                .query("SELECT name FROM nodes WHERE lease_until > now() ORDER BY name", &[])
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        }))
    }

    fn audit_chains(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.on_db("listing the audit chains", |c| async move {
            // One index probe per chain (the primary key starts with
            // `node`), not a scan of every entry: `audit_read` asks on
            // every call.
            let rows = c
                .query(
                    "WITH RECURSIVE chains AS ( \
                       (SELECT node FROM audit ORDER BY node LIMIT 1) \
                       UNION ALL \
                       SELECT (SELECT a.node FROM audit a WHERE a.node > chains.node ORDER BY a.node LIMIT 1) \
                       FROM chains WHERE chains.node IS NOT NULL) \
                     SELECT node FROM chains WHERE node IS NOT NULL",
                    &[],
                )
                .await
                .map_err(db)?;
            let mut chains: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            // Byte order, not the database's collation.
            chains.sort();
            Ok(chains)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_named_by_address_and_database_never_by_its_password() {
        let named = |url: &str| servers(&url.parse().unwrap());
        assert_eq!(
            named("host=127.0.0.1 port=6543 user=k password=S3cret dbname=kh"),
            "127.0.0.1:6543 (database kh)"
        );
        assert_eq!(
            named("host=/run/postgresql user=k dbname=kh"),
            "/run/postgresql/.s.PGSQL.5432 (database kh)"
        );
        assert_eq!(named("postgresql://k:S3cret@db1,db2:5433/kh"), "db1:5432, db2:5433 (database kh)");
        assert_eq!(named("host=::1 port=1,2 dbname=kh"), "[::1]:1 (database kh)");
        let e = PgStore::no_answer(
            "127.0.0.1:6543 (database kh)",
            "opening a connection",
            &Limit {
                total: Duration::from_millis(2400),
                set_by: "[store] connect_timeout_seconds = 2".into(),
            },
        );
        assert_eq!(
            e.to_string(),
            "the PostgreSQL server at 127.0.0.1:6543 (database kh) did not answer within 2.4 s while opening a \
             connection (the limit: [store] connect_timeout_seconds = 2)"
        );
        let e = anyhow::Error::new(e).context("opening the store");
        assert_eq!(crate::exit::status(&e), crate::exit::EX_TEMPFAIL);
    }

    #[test]
    fn dead_links_are_bounded_by_the_lease_unless_the_connection_string_says_otherwise() {
        let mut c: tokio_postgres::Config = "host=db.example user=k dbname=k".parse().unwrap();
        bound_dead_links(&mut c, Duration::from_secs(5));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(1)));
        assert_eq!(c.get_keepalives_retries(), Some(3));
        // A 60 s lease probes every 20 s.
        let mut c: tokio_postgres::Config = "host=db.example user=k dbname=k".parse().unwrap();
        bound_dead_links(&mut c, Duration::from_secs(60));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(20)));

        let mut c: tokio_postgres::Config = "host=db.example user=k dbname=k tcp_user_timeout=30 \
             keepalives_idle=40 keepalives_interval=7 keepalives_retries=9"
            .parse()
            .unwrap();
        bound_dead_links(&mut c, Duration::from_secs(5));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(40));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
        let mut c: tokio_postgres::Config = "host=db.example user=k dbname=k keepalives=0".parse().unwrap();
        bound_dead_links(&mut c, Duration::from_secs(5));
        assert!(!c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), DEFAULT_KEEPALIVES_IDLE);
    }
}
