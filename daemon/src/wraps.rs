//! The wrap budget of each KEK version (docs/ENVELOPE.md §7). Every data key
//! is wrapped with AES-256-GCM under a random 96-bit nonce, which is safe for
//! a bounded number of wraps per key; this module counts them and refuses a
//! wrap past the limit.
//!
//! Counting costs no store write per wrap: the daemon reserves a range of
//! the persisted counter (`KeyVersion::wraps_reserved`) and hands wraps out
//! of it in memory. A range cut short by a restart stays counted, so the
//! persisted figure never underestimates the nonces used.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Error;
use crate::hsm::KekId;
use crate::store::Store;

/// The hard limit per KEK version: half the NIST SP 800-38D bound of 2^32.
pub const MAX_WRAPS_PER_VERSION: u64 = 1 << 31;

/// The largest range reserved at once.
const MAX_RESERVATION: u64 = 1 << 20;

/// Wraps reserved in the store and not yet used: `next..end`.
#[derive(Clone, Copy, Default)]
struct Range {
    next: u64,
    end: u64,
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
    /// budget. Call before the wrap: a failed wrap still counts.
    pub fn take(&self, kek: &KekId) -> Result<(), Error> {
        if self.take_reserved(kek) {
            return Ok(());
        }
        let range = self.reserve(kek)?;
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        ranges.insert(kek.clone(), Range { next: range.next + 1, end: range.end });
        Ok(())
    }

    fn take_reserved(&self, kek: &KekId) -> bool {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        match ranges.get_mut(kek) {
            Some(r) if r.next < r.end => {
                r.next += 1;
                true
            }
            _ => false,
        }
    }

    /// Reserves the next range in the store (durably) and returns it.
    fn reserve(&self, kek: &KekId) -> Result<Range, Error> {
        let mut granted = None;
        let (limit, reservation) = (self.limit, self.reservation);
        let written = self.store.update_key(&kek.path, &mut |rec| {
            granted = None;
            if let Some(v) = rec.version_mut(kek.version) {
                if v.wraps_reserved < limit {
                    let end = v.wraps_reserved + reservation.min(limit - v.wraps_reserved);
                    granted = Some(Range { next: v.wraps_reserved, end });
                    v.wraps_reserved = end;
                }
            }
        })?;
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
