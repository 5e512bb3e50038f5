//! The HSM workers' job queue: one queue per tenant, served round-robin,
//! so that one tenant's burst does not starve another's requests, and a
//! queue of the daemon's own jobs (revocation, audit sealing, master-key
//! steps) served first.
//!
//! A first-in-first-out queue would make a request of tenant B wait behind
//! every request tenant A queued before it: on a token of 1 ms per call
//! with 4096 requests waiting, seconds. Round-robin makes it wait for at
//! most one job of each other tenant with work queued. Admission is fair
//! too: a tenant may hold at most half of the queue (`queue_depth`), so a
//! burst gets `busy` before it fills the queue for everyone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue, or the tenant's share of it, is full: the limit.
    Full(usize),
    /// The queue was closed (the daemon is stopping).
    Closed,
}

struct State<J> {
    /// The daemon's own jobs, not counted against the depth.
    system: VecDeque<J>,
    /// Each tenant's waiting jobs.
    tenants: HashMap<String, VecDeque<J>>,
    /// Tenants with jobs waiting, in the order they are served.
    turn: VecDeque<String>,
    /// Tenant jobs waiting, in all.
    waiting: usize,
    closed: bool,
}

/// The queue (see the module doc) of jobs `J` (the pool's `Job`).
pub struct Queue<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
    depth: usize,
    per_tenant: usize,
}

impl<J> Queue<J> {
    /// A queue holding at most `depth` tenant jobs, at most half of them
    /// one tenant's.
    pub fn new(depth: usize) -> Queue<J> {
        let depth = depth.max(1);
        Queue {
            state: Mutex::new(State {
                system: VecDeque::new(),
                tenants: HashMap::new(),
                turn: VecDeque::new(),
                waiting: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            depth,
            per_tenant: depth.div_ceil(2),
        }
    }

    /// Tenant jobs waiting for a worker (the metrics' queue depth).
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// How many tenant jobs may wait.
    pub fn depth(&self) -> usize {
        self.depth
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job of `tenant`, or refuses it when the queue or the
    /// tenant's share is full.
    pub fn push(&self, tenant: &str, job: J) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        if s.waiting >= self.depth {
            return Err(Refused::Full(self.depth));
        }
        let queued = s.tenants.get(tenant).map_or(0, VecDeque::len);
        if queued >= self.per_tenant {
            return Err(Refused::Full(self.per_tenant));
        }
        if queued == 0 {
            s.turn.push_back(tenant.to_owned());
        }
        s.tenants.entry(tenant.to_owned()).or_default().push_back(job);
        s.waiting += 1;
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues one of the daemon's own jobs; never refused for load.
    pub fn push_system(&self, job: J) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        s.system.push_back(job);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job (the daemon's own first, then the tenant whose turn it
    /// is), waiting for one; `None` once the queue is closed and empty.
    pub fn pop(&self) -> Option<J> {
        let mut s = self.lock();
        loop {
            if let Some(job) = s.system.pop_front() {
                return Some(job);
            }
            if let Some(tenant) = s.turn.pop_front() {
                let jobs = s.tenants.get_mut(&tenant).expect("a tenant in turn has jobs");
                let job = jobs.pop_front().expect("a tenant in turn has jobs");
                if jobs.is_empty() {
                    s.tenants.remove(&tenant);
                } else {
                    s.turn.push_back(tenant);
                }
                s.waiting -= 1;
                return Some(job);
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Refuses new jobs; workers finish the waiting ones, then [`pop`](Self::pop)
    /// answers `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closes the queue and pops every waiting job, in the order served.
    fn served(q: &Queue<String>) -> Vec<String> {
        q.close();
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn a_burst_of_one_tenant_does_not_delay_another_beyond_one_turn() {
        let q = Queue::new(1000);
        for i in 0..100 {
            q.push("a", format!("a{i}")).unwrap();
        }
        q.push("b", "b0".to_owned()).unwrap();
        q.push_system("system".to_owned()).unwrap();
        let order = served(&q);
        assert_eq!(order[0], "system", "the daemon's own jobs first: {order:?}");
        assert_eq!(&order[1..4], ["a0", "b0", "a1"], "b waits for one job of a, not 100: {order:?}");
        assert_eq!(order.len(), 102);
        let a: Vec<_> = order.iter().filter(|l| l.starts_with('a')).cloned().collect();
        assert_eq!(a, (0..100).map(|i| format!("a{i}")).collect::<Vec<_>>(), "a tenant's own order is kept");
    }

    #[test]
    fn a_tenant_may_fill_half_the_queue_and_others_still_get_in() {
        let q = Queue::new(8);
        for i in 0..4 {
            q.push("a", format!("a{i}")).unwrap();
        }
        assert_eq!(q.push("a", "a4".into()).unwrap_err(), Refused::Full(4));
        for i in 0..4 {
            q.push(&format!("t{i}"), "t".into()).unwrap();
        }
        assert_eq!(q.push("b", "b".into()).unwrap_err(), Refused::Full(8));
        // The daemon's own jobs are never refused for load.
        q.push_system("system".into()).unwrap();
        q.close();
        assert_eq!(q.push("c", "c".into()).unwrap_err(), Refused::Closed);
        assert_eq!(q.push_system("s".into()).unwrap_err(), Refused::Closed);
        assert_eq!(served(&q).len(), 9, "closed, the waiting jobs are still served");
    }

    #[test]
    fn a_waiting_worker_wakes_for_a_job_and_for_the_close() {
        let q = std::sync::Arc::new(Queue::<String>::new(4));
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || std::iter::from_fn(|| q.pop()).collect::<Vec<_>>())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.push("a", "a0".into()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        q.close();
        assert_eq!(worker.join().unwrap(), ["a0"]);
    }
}
