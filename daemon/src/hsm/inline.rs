//! `[hsm] inline`: the short token calls of requests (AES-GCM, HMAC) made
//! on the I/O thread that runs the request, each I/O thread with a session
//! of its own, instead of on a worker thread.
//!
//! On a local token (SoftHSM2, a PCIe card) such a call takes microseconds,
//! about as long as handing it to a worker and being woken with the
//! answer; a worker that empties its queue parks, and each request then
//! costs two thread wake-ups. Made on the I/O thread, the call costs no
//! wake-up at all: at 8 clients the daemon's CPU per request fell by a
//! third (PERFORMANCE.md, "Token calls on the I/O threads"). On a network
//! HSM a call takes a round trip that would stall every connection of the
//! thread, so the daemon warns when the token answers slowly, and the
//! setting stays off by default.
//!
//! Everything else (key generation, RSA and ECDSA, `health`'s probes, the
//! audit log's seals, master-key steps) still goes through the workers'
//! queue, and so does a short call when the thread's session is busy with
//! a pool-wide job. Each session keeps its own KEKs, counted in
//! `[hsm] loaded_keys` with the workers'; a revocation evicts from every
//! session ([`Sessions::on_each`]). These sessions never re-initialise the
//! module themselves: every call holds it shared ([`in_module`]) so that a
//! worker's re-initialisation waits for them, and a session opened before
//! one is dropped unclosed ([`Worker::stale`]) and reopened.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use super::{sizing, HsmError, Shared, Worker};

/// The I/O threads' sessions (none without `[hsm] inline`).
pub(crate) struct Sessions {
    sessions: Vec<Mutex<Option<Worker>>>,
}

/// How many sessions `[hsm] inline` opens: one per I/O thread of the
/// runtime (tokio's default, one per CPU, or `TOKIO_WORKER_THREADS`).
pub(crate) fn sessions_wanted() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Warns when the token answers as a network HSM does: each inline call
/// would then hold an I/O thread for a round trip.
pub(crate) fn warn_if_remote(worker: &mut Worker) -> Result<(), HsmError> {
    let latency = sizing::call_latency(worker)?;
    if latency >= sizing::REMOTE_CALL {
        tracing::warn!(
            "[hsm] inline is set, but a token call takes {} µs (median of a probe): each request's call \
             holds an I/O thread, and every connection on it waits, for that long. Keep inline for a \
             local token (docs/OPERATIONS.md §2)",
            latency.as_micros()
        );
    }
    Ok(())
}

thread_local! {
    /// This thread's session: an index into [`Sessions::sessions`], taken
    /// in turn at a thread's first call.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` on `worker` while no re-initialisation of the module can
/// happen ([`Shared::in_module`]), first dropping a session that one made
/// stale (it is reopened in the module as it is now).
fn in_module<T>(
    worker: &mut Worker,
    f: impl FnOnce(&mut Worker) -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    let shared = worker.shared.clone();
    let _inside = shared.in_module.read().unwrap_or_else(|e| e.into_inner());
    if worker.stale() {
        worker.reset();
    }
    let r = f(worker);
    worker.after_job();
    r
}

/// The next slot to hand out.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

impl Sessions {
    /// Opens and logs in `n` sessions.
    pub(crate) fn open(shared: &Arc<Shared>, n: usize) -> Result<Sessions, HsmError> {
        let sessions = (0..n)
            .map(|_| Worker::for_io_thread(shared.clone()).map(|w| Mutex::new(Some(w))))
            .collect::<Result<_, _>>()?;
        Ok(Sessions { sessions })
    }

    /// Runs `f` on this thread's session, or gives `f` back when there is
    /// none (inline is off, the daemon is stopping) or it is busy (a
    /// pool-wide job holds it, or another thread shares its slot).
    pub(crate) fn run<T, F>(&self, f: F) -> Result<Result<T, HsmError>, F>
    where
        F: FnOnce(&mut Worker) -> Result<T, HsmError>,
    {
        if self.sessions.is_empty() {
            return Err(f);
        }
        let slot = SLOT.with(|s| match s.get() {
            Some(i) => i,
            None => {
                let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
                s.set(Some(i));
                i
            }
        }) % self.sessions.len();
        let mut held = match self.sessions[slot].try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(f),
        };
        let Some(worker) = held.as_mut() else { return Err(f) };
        Ok(in_module(worker, f))
    }

    /// Runs `f` on every session, waiting for each that is in use.
    pub(crate) fn on_each(&self, f: &(dyn Fn(&mut Worker) + Send + Sync)) {
        for s in &self.sessions {
            let mut held = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(worker) = held.as_mut() {
                let _ = in_module(worker, |w| {
                    f(w);
                    Ok(())
                });
            }
        }
    }

    /// Closes every session; later calls go to the workers' queue (closed
    /// too by then).
    pub(crate) fn close(&self) {
        for s in &self.sessions {
            if let Some(mut worker) = s.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let shared = worker.shared.clone();
                let _inside = shared.in_module.read().unwrap_or_else(|e| e.into_inner());
                worker.reset();
            }
        }
    }
}
