//! The usage inventory: decryptions and rewraps per key version and the
//! time of last use, so that an operator can see that an old version is no
//! longer needed before retiring it (`keyhaven key usage`).
//!
//! Counting happens in memory on the request path (one short lock); the
//! counts are added to the store every few seconds and at shutdown, so a
//! crash loses at most the last interval's counts, never the keys.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::hsm::KekId;
use crate::store::{Store, StoreError};

/// Counts since the last flush.
#[derive(Default, Clone, Copy)]
struct Delta {
    decryptions: u64,
    rewraps: u64,
    last_used_at: u64,
}

/// Usage counts not yet in the store.
#[derive(Default)]
pub struct UsageBook {
    pending: Mutex<HashMap<KekId, Delta>>,
}

impl UsageBook {
    fn note(&self, kek: &KekId, now: u64, f: impl FnOnce(&mut Delta)) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // The key's names are cloned only for its first use in a flush interval.
        if !pending.contains_key(kek) {
            pending.insert(kek.clone(), Delta::default());
        }
        let d = pending.get_mut(kek).expect("just inserted");
        f(d);
        d.last_used_at = d.last_used_at.max(now);
    }

    /// Counts a decryption (a data key unwrapped) under `kek`.
    pub fn decrypted(&self, kek: &KekId, now: u64) {
        self.note(kek, now, |d| d.decryptions += 1);
    }

    /// Counts a rewrap away from `kek`.
    pub fn rewrapped(&self, kek: &KekId, now: u64) {
        self.note(kek, now, |d| d.rewraps += 1);
    }

    /// Adds the pending counts to the store. Counts of a key or version that
    /// no longer exists are dropped; counts that could not be written are
    /// kept for the next flush.
    pub fn flush(&self, store: &Store) -> Result<(), StoreError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_key: HashMap<keyhaven::KeyPath, Vec<(u32, Delta)>> = HashMap::new();
        for (id, delta) in pending {
            by_key.entry(id.path).or_default().push((id.version, delta));
        }
        // One write for every key (one anchor update in the token).
        let paths: Vec<keyhaven::KeyPath> = by_key.keys().cloned().collect();
        let result = store.update_keys(&paths, &mut |path, rec| {
            for (version, delta) in by_key.get(path).map(Vec::as_slice).unwrap_or_default() {
                if let Some(v) = rec.version_mut(*version) {
                    v.decryptions += delta.decryptions;
                    v.rewraps += delta.rewraps;
                    v.last_used_at = v.last_used_at.max(Some(delta.last_used_at));
                }
            }
        });
        if result.is_ok() {
            return result;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (path, deltas) in by_key {
            for (version, delta) in deltas {
                let d = pending.entry(KekId { path: path.clone(), version }).or_default();
                d.decryptions += delta.decryptions;
                d.rewraps += delta.rewraps;
                d.last_used_at = d.last_used_at.max(delta.last_used_at);
            }
        }
        result
    }
}
