//! The wrap budget of each KEK version (docs/ENVELOPE.md §7). Every data key
//! is wrapped with AES-256-GCM under a random 96-bit nonce, which is safe for
//! a bounded number of wraps per key; this module counts them and refuses a
//! wrap past the limit.
//!
//! Counting costs no store write per wrap: the daemon reserves a range of
//! the persisted counter (`KeyVersion::wraps_reserved`) and hands wraps out
//! of it in memory. A range cut short by a crash stays counted, so the
//! persisted figure never underestimates the nonces used; a clean shutdown
//! gives the unused part back ([`WrapBudget::release`]). Ranges are sized to
//! the rate they are used at: small at first, doubling while each is used up
//! within a minute, halving when one lasted longer.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Error;
use crate::hsm::KekId;
use crate::store::Store;

/// The hard limit per KEK version: half the NIST SP 800-38D bound of 2^32.
pub const MAX_WRAPS_PER_VERSION: u64 = 1 << 31;

/// The largest range reserved at once.
const MAX_RESERVATION: u64 = 1 << 20;

/// The first range of a version (unless the limit makes ranges smaller).
const FIRST_RESERVATION: u64 = 256;

/// A range used up faster than this makes the next one twice as large; a
/// range that lasted longer makes it half as large.
const BUSY: std::time::Duration = std::time::Duration::from_secs(60);

/// Wraps reserved in the store and not yet used: `next..end`, reserved at
/// `at` with `size` wraps.
#[derive(Clone, Copy)]
struct Range {
    next: u64,
    end: u64,
    size: u64,
    at: std::time::Instant,
}

/// Counts wraps per KEK version.
pub struct WrapBudget {
    store: Store,
    limit: u64,
    reservation: u64,
    ranges: Mutex<HashMap<KekId, Range>>,
}

impl WrapBudget {
    /// A budget of `limit` wraps per version (at most
    /// [`MAX_WRAPS_PER_VERSION`]).
    pub fn new(store: Store, limit: u64) -> WrapBudget {
        let limit = limit.clamp(1, MAX_WRAPS_PER_VERSION);
        // At most 2048 ranges per version: restarts can waste little.
        let reservation = (limit / 2048).clamp(1, MAX_RESERVATION);
        WrapBudget { store, limit, reservation, ranges: Mutex::new(HashMap::new()) }
    }

    /// Takes one wrap under `kek`, or refuses when the version has used its
    /// budget. Call before the wrap: a failed wrap still counts. A new range
    /// is written through the store's async call: on PostgreSQL the write
    /// waits for the database and for this node's own change feed, which
    /// run on the runtime's threads, so blocking one of them here could
    /// stop the daemon (every runtime thread waiting in a reservation).
    pub async fn take(&self, kek: &KekId) -> Result<(), Error> {
        let size = match self.take_reserved(kek) {
            Ok(()) => return Ok(()),
            Err(size) => size,
        };
        let (next, end) = self.reserve(kek, size).await?;
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        ranges.insert(kek.clone(), Range { next: next + 1, end, size, at: std::time::Instant::now() });
        Ok(())
    }

    /// Takes a wrap from the version's range in memory, or says how large
    /// the next range should be.
    fn take_reserved(&self, kek: &KekId) -> Result<(), u64> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        match ranges.get_mut(kek) {
            Some(r) if r.next < r.end => {
                r.next += 1;
                Ok(())
            }
            Some(r) if r.at.elapsed() < BUSY => Err((r.size * 2).min(self.reservation)),
            Some(r) => Err((r.size / 2).clamp(FIRST_RESERVATION.min(self.reservation), self.reservation)),
            None => Err(FIRST_RESERVATION.min(self.reservation)),
        }
    }

    /// Wraps allowed per version.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The versions used since start that have taken more than `over`
    /// wraps, with their count, fullest first (for the metrics).
    pub fn near_bound(&self, over: u64) -> Vec<(KekId, u64)> {
        let ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let mut near: Vec<(KekId, u64)> =
            ranges.iter().filter(|(_, r)| r.next > over).map(|(k, r)| (k.clone(), r.next)).collect();
        near.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
        near
    }

    /// Gives back what was reserved and not used, for a clean shutdown:
    /// each version's persisted count goes back to the wraps taken, where
    /// it is still the end of this daemon's range (nobody reserved after
    /// it). Returns the number of wraps given back. Takes after this
    /// reserve afresh, from the persisted count.
    pub fn release(&self) -> Result<u64, Error> {
        let ranges: Vec<(KekId, Range)> = self
            .ranges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .filter(|(_, r)| r.next < r.end)
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let mut paths: Vec<_> = ranges.iter().map(|(kek, _)| kek.path.clone()).collect();
        paths.sort_by(|a, b| (a.tenant(), a.key()).cmp(&(b.tenant(), b.key())));
        paths.dedup();
        // Per key, as the change may run again on a newer record.
        let mut returned = HashMap::new();
        self.store.update_keys(&paths, &mut |path, rec| {
            let mut given = 0;
            for (kek, range) in ranges.iter().filter(|(kek, _)| &kek.path == path) {
                if let Some(v) = rec.version_mut(kek.version) {
                    if v.wraps_reserved == range.end {
                        v.wraps_reserved = range.next;
                        given += range.end - range.next;
                    }
                }
            }
            returned.insert(path.clone(), given);
        })?;
        Ok(returned.values().sum())
    }

    /// Reserves the next range of `size` wraps in the store (durably) and
    /// returns it as `(first, end)`.
    async fn reserve(&self, kek: &KekId, size: u64) -> Result<(u64, u64), Error> {
        let mut granted = None;
        let (limit, reservation) = (self.limit, size.max(1));
        let mut change = |rec: &mut crate::store::KeyRecord| {
            granted = None;
            if let Some(v) = rec.version_mut(kek.version) {
                if v.wraps_reserved < limit {
                    let end = v.wraps_reserved + reservation.min(limit - v.wraps_reserved);
                    granted = Some((v.wraps_reserved, end));
                    v.wraps_reserved = end;
                }
            }
        };
        let written = self.store.backend().update_key(&kek.path, &mut change).await?;
        if written.as_ref().and_then(|rec| rec.version(kek.version)).is_none() {
            return Err(Error::NotFound(format!("key `{}` has no version {}", kek.path, kek.version)));
        }
        granted.ok_or_else(|| {
            Error::KeyExhausted(format!(
                "key `{}` version {} has wrapped {limit} data keys, the limit for one key version; \
                 it needs a new version before it can make more",
                kek.path, kek.version
            ))
        })
    }
}
