//! Everything PKCS#11. A fixed pool of worker threads, each owning one
//! logged-in session, takes jobs from a bounded queue: async callers never
//! block on the token and never open a session per request, and a full queue
//! answers `busy` instead of growing without bound.
//!
//! - [`token`]: module, slot, login, master key.
//! - [`worker`]: one session and its cached handles; the operations.
//! - [`anchor`]: the store's and the audit log's anchors, token data objects.
//! - [`confine`]: the unwrap template that keeps every KEK inside the token.
//! - [`signing`]: the audit signing key (ECDSA P-256).
//! - [`ec`]: ECDSA key pairs of signing keys, made in the token and
//!   stored wrapped.
//! - [`rsa`]: RSA key pairs of `rsa-3072-pss` keys, made in the token
//!   and stored wrapped.
//! - [`verify`]: signature checks in the token with a stored public key.
//! - [`error`]: PKCS#11 return codes to [`HsmError`], in one place.
//! - [`sizing`]: how many workers `[hsm] workers = "auto"` starts.
//! - [`queue`]: the jobs, one queue per tenant served round-robin.
//! - [`inline`]: `[hsm] inline`, short token calls on the I/O threads.

pub mod anchor;
pub mod confine;
pub mod ec;
pub mod error;
pub mod import;
pub mod inline;
pub mod queue;
pub mod rsa;
pub mod signing;
pub mod sizing;
pub mod token;
pub mod verify;
pub mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cryptoki::context::Pkcs11;
use tokio::sync::oneshot;

pub use error::{HsmError, LoginFailure};
pub use sizing::Workers;
pub use worker::{KekId, KekRef, Worker};

use crate::secret::Pin;

/// How to reach the token.
#[derive(Debug)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module.
    pub module: String,
    /// Label of the token.
    pub token_label: String,
    /// User PIN.
    pub pin: Pin,
    /// Base label of the master key; version N is `{base}-vN`.
    pub master_key_label: String,
    /// Label of the audit (HMAC) key.
    pub audit_key_label: String,
    /// Number of worker threads (sessions), or `auto` ([`sizing`]).
    pub workers: Workers,
    /// Short calls of requests on the I/O threads ([`inline`]).
    pub inline: bool,
    /// Capacity of the job queue.
    pub queue_depth: usize,
    /// The most KEKs unwrapped in the token at once, all workers together.
    pub loaded_keys: usize,
}

/// `[hsm] loaded_keys` by default: room for the keys in use on most
/// deployments (256 a worker with 64 workers), and under most network
/// HSMs' object capacity; a token that is full anyway is survived
/// ([`Worker::retrying`]).
pub const DEFAULT_LOADED_KEYS: usize = 16384;

/// The largest `[hsm] loaded_keys` accepted.
pub const MAX_LOADED_KEYS: usize = 1 << 20;

/// What every worker shares.
pub(crate) struct Shared {
    /// The module, re-initialised when the token has gone and come back
    /// (see [`Shared::reinitialise`]).
    pkcs11: Mutex<Pkcs11>,
    module: String,
    /// Sessions of the daemon, once chosen: the pool's workers and the I/O
    /// threads' ([`inline`]).
    workers: AtomicUsize,
    /// The pool's worker threads, once chosen.
    threads: AtomicUsize,
    /// How many times the module was re-initialised: a session opened in
    /// an earlier generation is stale, and its handles may name another
    /// session's objects in this one ([`Worker`] never closes or uses it).
    generation: AtomicU64,
    /// Held shared by every call on an I/O thread's session, and exclusive
    /// by a re-initialisation, so that no call is inside the module while
    /// it is finalised. Lock order: a slot of [`inline`], then this, then
    /// `login_refused`, `pin`, `pkcs11`; the worker that re-initialises
    /// holds no other lock while it waits for this one (a session waiting
    /// for `login_refused` under it would otherwise never let go).
    in_module: RwLock<()>,
    /// `[hsm] loaded_keys`: KEKs unwrapped at once, all workers together.
    loaded_keys: usize,
    last_reinit: Mutex<Option<std::time::Instant>>,
    token_label: String,
    pin: Mutex<Pin>,
    /// A login the token refused (wrong or locked PIN): no worker tries
    /// again, since every try counts against the token's retry limit and
    /// could lock it, until [`Hsm::set_pin`] gives a PIN to try.
    login_refused: Mutex<Option<(LoginFailure, String)>>,
    master_key_label: String,
    audit_key_label: String,
    /// The master key version new KEKs are wrapped under; changes during a
    /// master-key rotation.
    master_key_version: AtomicU32,
    /// The `CKA_ID` the store pinned for each master key version in use: a
    /// key found under a version's label with another id is refused.
    master_ids: Mutex<std::collections::HashMap<u32, Vec<u8>>>,
}

impl Shared {
    /// Refuses master key `version` found under `label` with `CKA_ID` `id`
    /// when the store pinned another id for it.
    fn check_master_id(&self, version: u32, label: &str, id: &[u8]) -> Result<(), HsmError> {
        let ids = self.master_ids.lock().unwrap_or_else(|e| e.into_inner());
        match ids.get(&version) {
            Some(pinned) if pinned.as_slice() != id => Err(HsmError::MasterKeyMismatch {
                label: label.to_owned(),
                reason:
                    "its CKA_ID is not the one the store pinned when the key was made: the key was replaced"
                        .into(),
            }),
            _ => Ok(()),
        }
    }

    fn pkcs11(&self) -> Pkcs11 {
        self.pkcs11.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Finalises and initialises the module again, at most once every two
    /// seconds. Some modules (SoftHSM2 among them) never see a token again
    /// that went away while they were initialised; a fresh C_Initialize
    /// does. Only with one worker thread, whose session is closed already:
    /// with more, C_Finalize would pull sessions from under the other
    /// workers in the middle of their calls, so a pool of several workers
    /// needs a restart for such a module. The I/O threads' sessions
    /// ([`inline`]) are held out of the module meanwhile ([`Shared::in_module`])
    /// and, being of an earlier [`Shared::generation`], dropped unclosed
    /// before their next call. Returns whether it re-initialised.
    fn reinitialise(&self) -> bool {
        if self.threads.load(Ordering::SeqCst) != 1 {
            return false;
        }
        let mut last = self.last_reinit.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2)) {
            return false;
        }
        // Only now, so that the I/O threads' calls are held back only for
        // a re-initialisation, not for every look while the token is away.
        let _quiet = self.in_module.write().unwrap_or_else(|e| e.into_inner());
        *last = Some(std::time::Instant::now());
        let mut current = self.pkcs11.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = current.clone().finalize() {
            tracing::debug!("C_Finalize before re-initialising: {e}");
        }
        match token::load_module(&self.module) {
            Ok(fresh) => {
                *current = fresh;
                self.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(module = %self.module, "PKCS#11 module re-initialised to look for the token again");
                true
            }
            Err(e) => {
                tracing::warn!("re-initialising the PKCS#11 module failed: {e}");
                false
            }
        }
    }
}

/// A job for a worker.
pub type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// The worker pool.
pub struct Hsm {
    jobs: Arc<queue::Queue<Job>>,
    /// The I/O threads' sessions, with `[hsm] inline` (else none).
    inline: inline::Sessions,
    /// When (Unix seconds) an I/O thread's session last had a worker probe
    /// the token ([`Hsm::nudge`]).
    nudged: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    token_label: String,
    workers: usize,
    shared: Arc<Shared>,
    /// For each master key version checked at start: whether the token
    /// refused to unwrap under it into an extractable key (`hsm::confine`).
    confinement: Mutex<std::collections::BTreeMap<u32, bool>>,
}

impl Hsm {
    /// Loads the module, finds the token, and starts the workers, each with
    /// its own logged-in session. Fails when the master key version
    /// `master_key_version` is missing or not sensitive and unextractable.
    pub fn start(cfg: HsmConfig, master_key_version: u32) -> Result<Hsm, HsmError> {
        Hsm::start_with(cfg, master_key_version, true)
    }

    /// Like [`start`](Self::start), but without looking for a master key
    /// (`probe` false): for `keyhavend init`, which makes the first one.
    fn start_with(cfg: HsmConfig, master_key_version: u32, probe: bool) -> Result<Hsm, HsmError> {
        let pkcs11 = token::load_module(&cfg.module)?;
        let shared = Arc::new(Shared {
            pkcs11: Mutex::new(pkcs11),
            module: cfg.module.clone(),
            workers: AtomicUsize::new(1),
            threads: AtomicUsize::new(1),
            generation: AtomicU64::new(0),
            in_module: RwLock::new(()),
            loaded_keys: cfg.loaded_keys.max(1),
            last_reinit: Mutex::new(None),
            token_label: cfg.token_label.clone(),
            pin: Mutex::new(cfg.pin),
            login_refused: Mutex::new(None),
            master_key_label: cfg.master_key_label,
            audit_key_label: cfg.audit_key_label,
            master_key_version: AtomicU32::new(master_key_version),
            master_ids: Mutex::new(Default::default()),
        });
        let jobs = Arc::new(queue::Queue::new(cfg.queue_depth));
        let mut threads = Vec::new();
        let mut first = Some(Worker::new(shared.clone())?);
        let workers = match cfg.workers {
            Workers::Fixed(n) => n.max(1),
            Workers::Auto => {
                let (n, why) = sizing::choose(first.as_mut().expect("first worker"))?;
                tracing::info!(workers = n, "HSM workers: {n} ([hsm] workers = \"auto\": {why})");
                n
            }
        };
        let inline_sessions = match cfg.inline {
            true => inline::sessions_wanted(),
            false => 0,
        };
        // Every session counts: for the KEKs each may keep, and so that no
        // worker re-initialises the module under the others' feet.
        shared.workers.store(workers + inline_sessions, Ordering::SeqCst);
        shared.threads.store(workers, Ordering::SeqCst);
        if cfg.inline {
            inline::warn_if_remote(first.as_mut().expect("first worker"))?;
        }
        // Before any worker thread starts: a token that refuses them fails the start cleanly.
        let inline = inline::Sessions::open(&shared, inline_sessions)?;
        for i in 0..workers {
            let mut worker = match first.take() {
                Some(w) => w,
                None => Worker::new(shared.clone())?,
            };
            if probe {
                worker.probe()?;
            }
            if i == 0 && probe {
                // Stores and tokens from before the audit log get their key now.
                worker.ensure_audit_key()?;
                worker.ensure_audit_signing_key()?;
            }
            let jobs = jobs.clone();
            let t = std::thread::Builder::new()
                .name(format!("keyhaven-hsm-{i}"))
                .spawn(move || worker.run(jobs))
                .map_err(|e| HsmError::Library(format!("cannot start an HSM thread: {e}")))?;
            threads.push(t);
        }
        if inline_sessions > 0 {
            tracing::info!(
                sessions = inline_sessions,
                "[hsm] inline: AES-GCM and HMAC calls of requests run on the I/O threads, each with its own session"
            );
        }
        Ok(Hsm {
            jobs,
            inline,
            nudged: AtomicU64::new(0),
            threads: Mutex::new(threads),
            token_label: cfg.token_label,
            workers,
            shared,
            confinement: Mutex::new(Default::default()),
        })
    }

    /// Puts a (re-read) PIN in place and lifts a refused login, so that the
    /// next request tries to log in once more (SIGHUP). Returns whether a
    /// refused login was lifted.
    pub fn set_pin(&self, pin: Pin) -> bool {
        *self.shared.pin.lock().unwrap_or_else(|e| e.into_inner()) = pin;
        self.shared.login_refused.lock().unwrap_or_else(|e| e.into_inner()).take().is_some()
    }

    /// Runs `f` on a worker and waits for its result: a request that
    /// names no tenant (health, master-key steps), queued in a lane of its
    /// own that takes its turn with the tenants'. Refuses with
    /// [`HsmError::Busy`] when the queue is full.
    pub async fn run<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, HsmError> + Send + 'static,
    {
        self.run_for("", f).await
    }

    /// Runs `f` on a worker for a request of `tenant` and waits for its
    /// result. Tenants take turns ([`queue`]); refuses with
    /// [`HsmError::Busy`] when the queue, or the tenant's half of it, is
    /// full.
    pub async fn run_for<T, F>(&self, tenant: &str, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, HsmError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |w| {
            let _ = tx.send(f(w));
        });
        self.jobs.push(tenant, job).map_err(refused)?;
        rx.await.map_err(|_| HsmError::Stopped)?
    }

    /// Runs `f`, a short call of a request of `tenant` (AES-GCM, HMAC:
    /// microseconds on a local token), on this thread's own session with
    /// `[hsm] inline`; otherwise as [`run_for`](Self::run_for) does.
    pub async fn run_short<T, F>(&self, tenant: &str, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, HsmError> + Send + 'static,
    {
        match self.inline.run(f) {
            Ok(Err(HsmError::TokenNotFound(label))) => {
                self.nudge();
                Err(HsmError::TokenNotFound(label))
            }
            Ok(r) => r,
            Err(f) => self.run_for(tenant, f).await,
        }
    }

    /// An I/O thread's session found the token gone; it may not
    /// re-initialise the module itself ([`inline`]), so a worker probes
    /// the token (re-initialising the module when it is back, at most
    /// every 2 s): the token is found again without waiting for `health`.
    /// At most one such probe a second.
    fn nudge(&self) {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.nudged.swap(now, Ordering::SeqCst) == now {
            return;
        }
        let job: Job = Box::new(|w| {
            if let Err(e) = w.probe() {
                tracing::debug!("probing the token for the I/O threads' sessions: {e}");
            }
        });
        let _ = self.jobs.push_system(job);
    }

    /// The HSM jobs waiting for a worker, and how many may wait.
    pub fn queue(&self) -> (usize, usize) {
        (self.jobs.waiting(), self.jobs.depth())
    }

    /// Runs `f` once on every worker and waits until all have. Each worker
    /// holds at its job until the others have theirs, so no worker takes two
    /// of them. Queued ahead of requests and never refused for load: a
    /// revocation must not wait behind tenants' bursts.
    pub async fn on_every_worker<F>(&self, f: F) -> Result<(), HsmError>
    where
        F: Fn(&mut Worker) + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let all_here = Arc::new(Rendezvous::new(self.workers));
        let mut done = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let (tx, rx) = oneshot::channel();
            let (f, all_here) = (f.clone(), all_here.clone());
            let job: Job = Box::new(move |w| {
                all_here.arrive();
                f(w);
                let _ = tx.send(());
            });
            self.jobs.push_system(job).map_err(refused)?;
            done.push(rx);
        }
        for rx in done {
            rx.await.map_err(|_| HsmError::Stopped)?;
        }
        self.inline.on_each(&*f);
        Ok(())
    }

    /// Like [`run`](Self::run), for a plain thread and the daemon's own
    /// work (start-up checks, audit sealing): queued ahead of requests,
    /// never refused for load, and blocks until the job is done.
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Worker) -> Result<T, HsmError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |w| {
            let _ = tx.send(f(w));
        });
        self.jobs.push_system(job).map_err(refused)?;
        rx.recv().map_err(|_| HsmError::Stopped)?
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The master key version new KEKs are wrapped under.
    pub fn master_key_version(&self) -> u32 {
        self.shared.master_key_version.load(Ordering::SeqCst)
    }

    /// Pins master key `version` to `CKA_ID` `id` for every worker (from the
    /// store's record, at start).
    pub fn pin_master_id(&self, version: u32, id: &[u8]) {
        self.shared.master_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(version, id.to_vec());
    }

    /// Records whether the token confines the KEKs that master key
    /// `version` unwraps (what `health` reports as `custody`).
    pub fn set_confinement(&self, version: u32, confined: bool) {
        self.confinement.lock().unwrap_or_else(|e| e.into_inner()).insert(version, confined);
    }

    /// Forgets master key `version`'s confinement (retired).
    pub fn forget_confinement(&self, version: u32) {
        self.confinement.lock().unwrap_or_else(|e| e.into_inner()).remove(&version);
    }

    /// Each checked master key version and whether the token confines the
    /// KEKs it unwraps, lowest version first.
    pub fn confinement(&self) -> Vec<(u32, bool)> {
        self.confinement.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(v, c)| (*v, *c)).collect()
    }

    /// Makes `version` the master key new KEKs are wrapped under.
    pub fn set_master_key_version(&self, version: u32) {
        self.shared.master_key_version.store(version, Ordering::SeqCst);
    }

    /// Closes the queue and waits for the workers to finish their jobs and
    /// close their sessions.
    pub fn shutdown(&self) {
        self.jobs.close();
        self.inline.close();
        let threads = std::mem::take(&mut *self.threads.lock().expect("thread list lock"));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn refused(r: queue::Refused) -> HsmError {
    match r {
        queue::Refused::Full(n) => {
            crate::metrics::hsm_busy();
            HsmError::Busy(n)
        }
        queue::Refused::Closed => HsmError::Stopped,
    }
}

/// Where `n` jobs wait for each other, for at most five seconds (a worker
/// that never comes must not hang the others).
struct Rendezvous {
    waiting: Mutex<usize>,
    arrived: std::sync::Condvar,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous { waiting: Mutex::new(n), arrived: std::sync::Condvar::new() }
    }

    fn arrive(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        *waiting = waiting.saturating_sub(1);
        self.arrived.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while *waiting > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("an HSM worker did not join a pool-wide job within 5 s");
                return;
            }
            waiting = self.arrived.wait_timeout(waiting, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Creates master key version 1, the audit key and the audit signing key
/// in the token (for `keyhavend init`); returns the master key's `CKA_ID`
/// and canary for the store to pin.
pub fn create_first_master_key(cfg: HsmConfig) -> Result<(Vec<u8>, Vec<u8>), HsmError> {
    let hsm = Hsm::start_with(HsmConfig { workers: Workers::Fixed(1), inline: false, ..cfg }, 1, false)?;
    let r = hsm.run_blocking(|w| {
        let id = w.random_id()?;
        let canary = w.make_master_key(1, &id, false)?;
        w.ensure_audit_key()?;
        w.ensure_audit_signing_key()?;
        Ok((id, canary))
    });
    hsm.shutdown();
    r
}
