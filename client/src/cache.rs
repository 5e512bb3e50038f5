//! The two key caches of the [`Sealer`](crate::sealer::Sealer): plain data
//! structures, no I/O.
//!
//! - [`SealCache`]: data keys for sealing, one per partition (tenant, key
//!   and canonical encryption context), each used until it reaches any of
//!   its limits — age, messages, bytes — which must all be set (the AWS
//!   Encryption SDK's caching model). The message that would exceed a limit
//!   gets a new data key.
//! - [`OpenCache`]: unwrapped data keys for opening, by envelope id, with a
//!   maximum age and a maximum number of entries (oldest evicted first).
//!
//! Both drop every entry a revocation scope covers ([`SealCache::revoke`],
//! [`OpenCache::revoke`]). A dropped key is wiped as soon as no operation
//! that took it is still running (it is shared by `Arc`; [`DataKey`] wipes
//! itself on drop). Debug prints counts and limits, never key material.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::envelope::EnvelopeId;
use crate::error::Error;
use crate::names::KeyPath;
use crate::revocation::Scope;
use crate::seal::{DataKey, MAX_MESSAGES_PER_KEY};

/// Limits of one data key in the sealing cache. All three are required:
/// there is no default and no "unlimited".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealLimits {
    /// A key is not used once this old (measured from when the daemon
    /// returned it).
    pub max_age: Duration,
    /// Records one key may seal, 1 ..= 2^31 (docs/ENVELOPE.md §10.3).
    pub max_messages: u64,
    /// Plaintext bytes one key may seal, ≥ 1.
    pub max_bytes: u64,
}

impl SealLimits {
    /// Checks the ranges.
    pub fn new(max_age: Duration, max_messages: u64, max_bytes: u64) -> Result<SealLimits, Error> {
        if max_age.is_zero() {
            return Err(Error::Config("the sealing cache's max_age must be above zero".into()));
        }
        if !(1..=MAX_MESSAGES_PER_KEY).contains(&max_messages) {
            return Err(Error::Config(format!(
                "the sealing cache's max_messages must be 1..={MAX_MESSAGES_PER_KEY}, not {max_messages}"
            )));
        }
        if max_bytes == 0 {
            return Err(Error::Config("the sealing cache's max_bytes must be above zero".into()));
        }
        Ok(SealLimits { max_age, max_messages, max_bytes })
    }
}

/// Limits of the opening cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenLimits {
    /// An unwrapped key is dropped once this old.
    pub max_age: Duration,
    /// Most keys held; the oldest goes first. 0 turns the cache off.
    pub max_entries: usize,
}

impl OpenLimits {
    /// Checks the ranges.
    pub fn new(max_age: Duration, max_entries: usize) -> Result<OpenLimits, Error> {
        if max_age.is_zero() && max_entries > 0 {
            return Err(Error::Config("the opening cache's max_age must be above zero".into()));
        }
        Ok(OpenLimits { max_age, max_entries })
    }
}

/// Where a cached key came from: enough to match revocation scopes.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyOrigin {
    /// Tenant and key that wrapped it.
    pub path: KeyPath,
    /// Key version.
    pub version: u32,
    /// Its envelope id.
    pub id: EnvelopeId,
}

impl KeyOrigin {
    /// Whether `scope` covers this key; `None` is a scope the daemon did not
    /// show this client, which covers everything.
    pub fn in_scope(&self, scope: Option<&Scope>) -> bool {
        let Some(scope) = scope else { return true };
        match scope {
            Scope::All => true,
            Scope::Tenant { tenant } => self.path.tenant() == tenant,
            Scope::Key { tenant, key, version } => {
                self.path.tenant() == tenant
                    && self.path.key() == key
                    && version.is_none_or(|v| v == self.version)
            }
            Scope::Datakey { envelope_id } => *envelope_id == self.id.to_string(),
        }
    }
}

/// A key taken from a cache for one operation.
#[derive(Clone)]
pub struct Taken {
    /// The key.
    pub key: Arc<DataKey>,
    /// Its envelope, binary form.
    pub envelope: Arc<[u8]>,
    /// Where it came from.
    pub origin: KeyOrigin,
}

impl fmt::Debug for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Taken({}@{} {})", self.origin.path, self.origin.version, self.origin.id)
    }
}

struct SealEntry {
    taken: Taken,
    created: Instant,
    messages: u64,
    bytes: u64,
}

/// Data keys for sealing, by (tenant/key, canonical context).
pub struct SealCache {
    limits: SealLimits,
    entries: HashMap<(KeyPath, Vec<u8>), SealEntry>,
}

impl SealCache {
    /// An empty cache.
    pub fn new(limits: SealLimits) -> SealCache {
        SealCache { limits, entries: HashMap::new() }
    }

    /// The limits.
    pub fn limits(&self) -> SealLimits {
        self.limits
    }

    /// Takes the partition's key for one message of `len` bytes and counts
    /// it, or returns `None` (evicting the key) when it is missing, too old,
    /// or would pass its message or byte limit with this message.
    pub fn take(&mut self, path: &KeyPath, context: &[u8], len: u64, now: Instant) -> Option<Taken> {
        let part = (path.clone(), context.to_vec());
        let e = self.entries.get_mut(&part)?;
        let fits = now.duration_since(e.created) < self.limits.max_age
            && e.messages < self.limits.max_messages
            && e.bytes.saturating_add(len) <= self.limits.max_bytes;
        if !fits {
            self.entries.remove(&part);
            return None;
        }
        e.messages += 1;
        e.bytes += len;
        Some(e.taken.clone())
    }

    /// Whether a fresh key may be cached after sealing one message of `len`
    /// bytes (a message over `max_bytes` gets a key of its own, used once).
    pub fn admits(&self, len: u64) -> bool {
        len <= self.limits.max_bytes
    }

    /// Caches a fresh key for the partition, with its first message of
    /// `len` bytes counted; replaces (and so drops) any key there.
    pub fn insert(&mut self, path: &KeyPath, context: &[u8], taken: Taken, len: u64, created: Instant) {
        let e = SealEntry { taken, created, messages: 1, bytes: len };
        self.entries.insert((path.clone(), context.to_vec()), e);
    }

    /// Drops every key `scope` covers (`None`: all); returns how many.
    pub fn revoke(&mut self, scope: Option<&Scope>) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| !e.taken.origin.in_scope(scope));
        before - self.entries.len()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The origins of the keys held (for tests and tools).
    pub fn origins(&self) -> Vec<KeyOrigin> {
        self.entries.values().map(|e| e.taken.origin.clone()).collect()
    }
}

impl fmt::Debug for SealCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealCache").field("limits", &self.limits).field("keys", &self.entries.len()).finish()
    }
}

struct OpenEntry {
    taken: Taken,
    created: Instant,
    seq: u64,
}

/// Unwrapped data keys for opening, by envelope id.
pub struct OpenCache {
    limits: OpenLimits,
    entries: HashMap<EnvelopeId, OpenEntry>,
    order: VecDeque<(u64, EnvelopeId)>,
    seq: u64,
}

impl OpenCache {
    /// An empty cache.
    pub fn new(limits: OpenLimits) -> OpenCache {
        OpenCache { limits, entries: HashMap::new(), order: VecDeque::new(), seq: 0 }
    }

    /// The key of the envelope `envelope` (binary form, compared whole: a
    /// look-alike with the same id is a miss), unless missing or too old.
    pub fn get(&mut self, id: &EnvelopeId, envelope: &[u8], now: Instant) -> Option<Taken> {
        let e = self.entries.get(id)?;
        if now.duration_since(e.created) >= self.limits.max_age {
            self.entries.remove(id);
            return None;
        }
        (*e.taken.envelope == *envelope).then(|| e.taken.clone())
    }

    /// Caches an unwrapped key, evicting the oldest beyond `max_entries`.
    pub fn insert(&mut self, taken: Taken, created: Instant) {
        if self.limits.max_entries == 0 {
            return;
        }
        self.seq += 1;
        let id = taken.origin.id;
        self.order.push_back((self.seq, id));
        self.entries.insert(id, OpenEntry { taken, created, seq: self.seq });
        while self.entries.len() > self.limits.max_entries {
            let Some((seq, id)) = self.order.pop_front() else { break };
            if self.entries.get(&id).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&id);
            }
        }
        // Forget order records of entries gone otherwise.
        if self.order.len() > 2 * self.limits.max_entries + 16 {
            let entries = &self.entries;
            self.order.retain(|(seq, id)| entries.get(id).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Drops every key `scope` covers (`None`: all); returns how many.
    pub fn revoke(&mut self, scope: Option<&Scope>) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| !e.taken.origin.in_scope(scope));
        if self.entries.is_empty() {
            self.order.clear();
        }
        before - self.entries.len()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The origins of the keys held (for tests and tools).
    pub fn origins(&self) -> Vec<KeyOrigin> {
        self.entries.values().map(|e| e.taken.origin.clone()).collect()
    }
}

impl fmt::Debug for OpenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenCache").field("limits", &self.limits).field("keys", &self.entries.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(path: &str, version: u32, id: u8) -> Taken {
        Taken {
            key: Arc::new(DataKey::new(&[id; 32]).unwrap()),
            envelope: Arc::from(vec![id; 4]),
            origin: KeyOrigin { path: path.parse().unwrap(), version, id: EnvelopeId([id; 16]) },
        }
    }

    #[test]
    fn seal_limits_are_exact() {
        let limits = SealLimits::new(Duration::from_secs(60), 3, 100).unwrap();
        let mut c = SealCache::new(limits);
        let p: KeyPath = "acme/pii".parse().unwrap();
        let t0 = Instant::now();
        assert!(c.take(&p, b"", 1, t0).is_none());
        c.insert(&p, b"", taken("acme/pii", 1, 1), 10, t0);
        assert!(c.take(&p, b"", 10, t0).is_some()); // 2nd message
        assert!(c.take(&p, b"x", 10, t0).is_none()); // another partition
        assert!(c.take(&p, b"", 10, t0).is_some()); // 3rd
        assert!(c.take(&p, b"", 10, t0).is_none()); // 4th: new key
        assert!(c.is_empty());
        // Bytes: exactly max_bytes fits, one more does not.
        c.insert(&p, b"", taken("acme/pii", 1, 2), 50, t0);
        assert!(c.take(&p, b"", 50, t0).is_some());
        c.insert(&p, b"", taken("acme/pii", 1, 3), 50, t0);
        assert!(c.take(&p, b"", 51, t0).is_none());
        // Age.
        c.insert(&p, b"", taken("acme/pii", 1, 4), 1, t0);
        assert!(c.take(&p, b"", 1, t0 + Duration::from_millis(59_999)).is_some());
        assert!(c.take(&p, b"", 1, t0 + Duration::from_secs(60)).is_none());
        assert!(SealLimits::new(Duration::ZERO, 1, 1).is_err());
        assert!(SealLimits::new(Duration::from_secs(1), 0, 1).is_err());
        assert!(SealLimits::new(Duration::from_secs(1), (1 << 31) + 1, 1).is_err());
        assert!(SealLimits::new(Duration::from_secs(1), 1, 0).is_err());
    }

    #[test]
    fn scopes_drop_what_they_cover_and_nothing_else() {
        let limits = SealLimits::new(Duration::from_secs(60), 10, 1000).unwrap();
        let t0 = Instant::now();
        let fill = || {
            let mut c = SealCache::new(limits);
            for (i, (p, v)) in
                [("acme/pii", 1), ("acme/pii", 2), ("acme/smtp", 1), ("beta/pii", 1)].into_iter().enumerate()
            {
                c.insert(&p.parse().unwrap(), &[i as u8], taken(p, v, i as u8), 1, t0);
            }
            c
        };
        let key = |t: &str, k: &str, v| Scope::Key { tenant: t.into(), key: k.into(), version: v };
        for (scope, gone) in [
            (Some(Scope::Datakey { envelope_id: EnvelopeId([2; 16]).to_string() }), 1),
            (Some(key("acme", "pii", Some(2))), 1),
            (Some(key("acme", "pii", None)), 2),
            (Some(Scope::Tenant { tenant: "acme".into() }), 3),
            (Some(Scope::Tenant { tenant: "gamma".into() }), 0),
            (Some(Scope::All), 4),
            (None, 4),
        ] {
            let mut c = fill();
            assert_eq!(c.revoke(scope.as_ref()), gone, "{scope:?}");
            assert_eq!(c.len(), 4 - gone);
        }
    }

    #[test]
    fn open_cache_age_size_and_look_alikes() {
        let mut c = OpenCache::new(OpenLimits::new(Duration::from_secs(10), 2).unwrap());
        let t0 = Instant::now();
        for i in 1..=3u8 {
            c.insert(taken("acme/pii", 1, i), t0);
        }
        assert_eq!(c.len(), 2);
        assert!(c.get(&EnvelopeId([1; 16]), &[1; 4], t0).is_none()); // oldest evicted
        assert!(c.get(&EnvelopeId([2; 16]), &[2; 4], t0).is_some());
        assert!(c.get(&EnvelopeId([2; 16]), &[9; 4], t0).is_none()); // same id, other bytes
        assert!(c.get(&EnvelopeId([3; 16]), &[3; 4], t0 + Duration::from_secs(10)).is_none());
        assert_eq!(c.len(), 1);
        assert!(format!("{c:?}").contains("keys: 1"));
    }
}
