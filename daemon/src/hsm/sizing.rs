//! How many HSM workers (sessions) to run: `[hsm] workers = "auto"` sizes
//! the pool at start from what the token says and what a probe measures.
//!
//! A local token (SoftHSM2, a PCIe card) answers in microseconds and spends
//! this machine's CPU: more sessions only contend for its lock, and one
//! worker is the measured best (PERFORMANCE.md, "HSM workers"). A network
//! HSM answers in 0.2–2 ms and runs many sessions in parallel: each worker
//! then mostly waits, and the pool must be large enough that the waiting
//! covers what the CPUs can prepare, or the token's latency caps the
//! daemon at `workers / latency`.

use std::time::{Duration, Instant};

use cryptoki::slot::Limit;
use serde::{Deserialize, Serialize};

use super::{token, HsmError, Worker};

/// `[hsm] workers`: `"auto"` or a fixed number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    /// Sized at start ([`size_for`]).
    #[default]
    Auto,
    /// This many.
    Fixed(usize),
}

/// The most workers a pool may have (each a thread and a session).
pub const MAX_WORKERS: usize = 256;

/// A token call slower than this is a round trip to another machine.
pub const REMOTE_CALL: Duration = Duration::from_micros(100);

/// The daemon's CPU time per request, measured on SoftHSM2 (PERFORMANCE.md,
/// "CPU time per request": about 24 µs): how long one CPU needs to prepare
/// a request while others wait on the token.
pub const CPU_PER_REQUEST: Duration = Duration::from_micros(25);

/// Most workers `"auto"` chooses: enough for 1 ms at 64 clients in flight.
pub const AUTO_MAX: usize = 64;

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad =
            || serde::de::Error::custom(format!("must be \"auto\" or a number from 1 to {MAX_WORKERS}"));
        match Raw::deserialize(d)? {
            Raw::Text(t) if t == "auto" => Ok(Workers::Auto),
            // The range is checked with the rest of the config, which names the line.
            Raw::Number(n) if n >= 0 => Ok(Workers::Fixed(usize::try_from(n).unwrap_or(usize::MAX))),
            _ => Err(bad()),
        }
    }
}

impl Workers {
    /// Refuses a count out of range, with the message the config shows.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Workers::Fixed(n) if *n == 0 || *n > MAX_WORKERS => {
                Err(format!("must be \"auto\" or a number from 1 to {MAX_WORKERS}"))
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// The pool size for a token whose calls take `latency` (median of a
/// probe), on `cpus` CPUs, with `session_limit` sessions at most (the
/// token's `ulMaxRwSessionCount`, when it states one), and why.
pub fn size_for(latency: Duration, cpus: usize, session_limit: Option<u64>) -> (usize, String) {
    let cpus = cpus.max(1);
    let mut why =
        format!("token call {:.0} µs (median of a probe), {cpus} CPUs", latency.as_secs_f64() * 1e6);
    let mut n = if latency < REMOTE_CALL {
        why.push_str(&format!(
            "; under {} µs the token is local and spends this machine's CPU: one worker",
            REMOTE_CALL.as_micros()
        ));
        1
    } else {
        // While one call is in flight, each CPU prepares latency / CPU_PER_REQUEST requests.
        let want = (cpus as f64 * latency.as_secs_f64() / CPU_PER_REQUEST.as_secs_f64()).ceil() as usize;
        let n = want.clamp(2, AUTO_MAX);
        why.push_str(&format!(
            "; a remote token: {cpus} CPUs × {:.0} µs / {} µs of CPU per request = {want} requests in flight",
            latency.as_secs_f64() * 1e6,
            CPU_PER_REQUEST.as_micros()
        ));
        if n != want {
            why.push_str(&format!(", kept within 2..={AUTO_MAX}"));
        }
        n
    };
    if let Some(limit) = session_limit {
        // Leave a quarter of the token's sessions to others (tools, another node).
        let cap = ((limit as usize) * 3 / 4).max(1);
        if n > cap {
            n = cap;
            why.push_str(&format!("; the token allows {limit} sessions, three quarters of them: {cap}"));
        }
    }
    (n, why)
}

/// Sizes the pool for `"auto"` with the first worker's session: the
/// median of [`PROBE_CALLS`] random-number calls (the cheapest call that
/// reaches the token) and the token's stated session limits.
pub(super) fn choose(first: &mut Worker) -> Result<(usize, String), HsmError> {
    let latency = call_latency(first)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shared = first.shared.clone();
    let pkcs11 = shared.pkcs11();
    let limit = token::find_token(&pkcs11, &shared.token_label)
        .ok()
        .and_then(|slot| pkcs11.get_token_info(slot).ok())
        .and_then(|info| {
            [info.max_session_count(), info.max_rw_session_count()]
                .into_iter()
                .filter_map(|l| match l {
                    Limit::Max(n) if n > 0 => Some(n),
                    _ => None,
                })
                .min()
        });
    Ok(size_for(latency, cpus, limit))
}

/// The median time of [`PROBE_CALLS`] random-number calls on `worker`'s
/// session: the cheapest call that reaches the token.
pub(super) fn call_latency(worker: &mut Worker) -> Result<Duration, HsmError> {
    let mut times = Vec::with_capacity(PROBE_CALLS);
    let mut buf = [0u8; 16];
    for _ in 0..PROBE_CALLS {
        let start = Instant::now();
        worker.random(&mut buf)?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Token calls timed by [`choose`].
pub const PROBE_CALLS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_token_gets_one_worker() {
        let (n, why) = size_for(Duration::from_micros(8), 2, None);
        assert_eq!(n, 1);
        assert!(why.contains("local"), "{why}");
    }

    #[test]
    fn a_remote_token_gets_enough_workers_to_cover_its_latency() {
        assert_eq!(size_for(Duration::from_micros(200), 2, None).0, 16);
        assert_eq!(size_for(Duration::from_millis(1), 2, None).0, AUTO_MAX);
        assert_eq!(size_for(Duration::from_micros(110), 1, None).0, 5);
    }

    #[test]
    fn the_token_session_limit_caps_the_pool() {
        let (n, why) = size_for(Duration::from_millis(1), 8, Some(20));
        assert_eq!(n, 15);
        assert!(why.contains("allows 20 sessions"), "{why}");
        assert_eq!(size_for(Duration::from_millis(1), 8, Some(1)).0, 1);
    }

    #[test]
    fn workers_parse_as_auto_or_a_number_in_range() {
        #[derive(Deserialize)]
        struct T {
            workers: Workers,
        }
        let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.workers);
        assert_eq!(parse("workers = \"auto\"").unwrap(), Workers::Auto);
        assert_eq!(parse("workers = 8").unwrap(), Workers::Fixed(8));
        for bad in ["workers = \"many\"", "workers = -1"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("must be \"auto\" or a number from 1 to 256"), "{bad}: {e}");
        }
        assert!(Workers::Fixed(0).check().is_err() && Workers::Fixed(257).check().is_err());
        assert!(Workers::Fixed(256).check().is_ok() && Workers::Auto.check().is_ok());
    }
}
