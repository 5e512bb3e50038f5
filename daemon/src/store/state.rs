//! The store's state, anchored in the token (docs/SECURITY.md §3).
//!
//! Every record the store holds (meta, keyring, revocations) is a leaf:
//! SHA-256 over its tree, key and value. Leaves fall into 256 buckets by
//! the first byte of their path's hash; a bucket's hash covers its leaves
//! in path order, and the state digest covers the 256 bucket hashes: a hash
//! tree of depth two, so a write rehashes one bucket, not the whole store.
//!
//! The digest of the last acknowledged state lives in the token
//! ([`Anchor`]), where nobody without the PIN can change it. Each write
//! records the digest it is about to make as `pending`, writes the store,
//! makes it durable, then records it as `committed`. At start the store's
//! digest must be the committed one, or the pending one (a crash between
//! the store's write and the commit; it is committed then). Anything else is
//! an altered, swapped, removed or rolled-back record, or an older copy of
//! the store, and the daemon refuses to start ([`StoreError::Tampered`]).
//! The audit log is not part of this state: its own hash chain and seals
//! protect it (docs/AUDIT.md).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::StoreError;

/// Domain separation of the state digest.
const STATE_CONTEXT: &[u8] = b"keyhaven-store-state-v1\0";

/// A record's path in the digest: its tree and key.
fn path(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(tree.len() + 1 + key.len());
    p.extend_from_slice(tree.as_bytes());
    p.push(0);
    p.extend_from_slice(key);
    p
}

/// The digest of every record's path and value, kept up to date write by
/// write.
#[derive(Clone)]
pub struct StateDigest {
    buckets: Vec<BTreeMap<Vec<u8>, [u8; 32]>>,
    bucket_hashes: Vec<[u8; 32]>,
}

impl Default for StateDigest {
    fn default() -> Self {
        let buckets: Vec<BTreeMap<Vec<u8>, [u8; 32]>> = vec![BTreeMap::new(); 256];
        let bucket_hashes = buckets.iter().map(bucket_hash).collect();
        StateDigest { buckets, bucket_hashes }
    }
}

fn bucket_of(path: &[u8]) -> usize {
    Sha256::digest(path)[0] as usize
}

fn leaf(path: &[u8], value: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((path.len() as u64).to_be_bytes());
    h.update(path);
    h.update(value);
    h.finalize().into()
}

fn bucket_hash(bucket: &BTreeMap<Vec<u8>, [u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (path, leaf) in bucket {
        h.update((path.len() as u64).to_be_bytes());
        h.update(path);
        h.update(leaf);
    }
    h.finalize().into()
}

impl StateDigest {
    /// Adds (or replaces) a record while loading the store: call
    /// [`finish_load`](Self::finish_load) after the last one.
    pub fn load(&mut self, tree: &str, key: &[u8], value: &[u8]) {
        let p = path(tree, key);
        let l = leaf(&p, value);
        self.buckets[bucket_of(&p)].insert(p, l);
    }

    /// Hashes every bucket after [`load`](Self::load).
    pub fn finish_load(&mut self) {
        self.bucket_hashes = self.buckets.iter().map(bucket_hash).collect();
    }

    /// The digest of the whole state.
    pub fn digest(&self) -> [u8; 32] {
        top(&self.bucket_hashes)
    }

    /// The digest the state would have with record `tree`/`key` set to
    /// `value` (`None`: removed); nothing changes.
    pub fn with(&self, tree: &str, key: &[u8], value: Option<&[u8]>) -> [u8; 32] {
        self.with_all(tree, &[(key, value)])
    }

    /// The digest the state would have with every record of `changes` (in
    /// `tree`) set to its value (`None`: removed); nothing changes.
    pub fn with_all(&self, tree: &str, changes: &[(&[u8], Option<&[u8]>)]) -> [u8; 32] {
        let mut touched: BTreeMap<usize, BTreeMap<Vec<u8>, [u8; 32]>> = BTreeMap::new();
        for (key, value) in changes {
            let p = path(tree, key);
            let b = bucket_of(&p);
            let bucket = touched.entry(b).or_insert_with(|| self.buckets[b].clone());
            match value {
                Some(v) => bucket.insert(p.clone(), leaf(&p, v)),
                None => bucket.remove(&p),
            };
        }
        let mut hashes = self.bucket_hashes.clone();
        for (b, bucket) in &touched {
            hashes[*b] = bucket_hash(bucket);
        }
        top(&hashes)
    }

    /// Whether record `tree`/`key` is `value` in this digest.
    pub fn holds(&self, tree: &str, key: &[u8], value: &[u8]) -> bool {
        let p = path(tree, key);
        self.buckets[bucket_of(&p)].get(&p) == Some(&leaf(&p, value))
    }

    /// Sets record `tree`/`key` to `value` (`None`: removed).
    pub fn set(&mut self, tree: &str, key: &[u8], value: Option<&[u8]>) {
        let p = path(tree, key);
        let b = bucket_of(&p);
        match value {
            Some(v) => {
                let l = leaf(&p, v);
                self.buckets[b].insert(p, l)
            }
            None => self.buckets[b].remove(&p),
        };
        self.bucket_hashes[b] = bucket_hash(&self.buckets[b]);
    }
}

fn top(bucket_hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(STATE_CONTEXT);
    for b in bucket_hashes {
        h.update(b);
    }
    h.finalize().into()
}

/// What the token holds about the store: the digest of the last
/// acknowledged state, the one a write is making, and how many writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorState {
    /// Writes anchored so far.
    pub generation: u64,
    /// When the anchor was last written, Unix seconds.
    pub written_at: u64,
    /// The digest of the last acknowledged state.
    pub committed: [u8; 32],
    /// The digest a write under way is making.
    pub pending: Option<[u8; 32]>,
}

/// The prefix of an anchor's text form.
const ANCHOR_PREFIX: &str = "khanchor1";

impl AnchorState {
    /// Text form (it is kept in a token object's label):
    /// `khanchor1 GEN TIME COMMITTED PENDING`, digests in hex, `-` for no
    /// pending digest.
    pub fn encode(&self) -> String {
        let pending = self.pending.map_or_else(|| "-".to_owned(), |p| crate::audit::hex(&p));
        format!(
            "{ANCHOR_PREFIX} {} {} {} {pending}",
            self.generation,
            self.written_at,
            crate::audit::hex(&self.committed)
        )
    }

    /// Parses [`encode`](Self::encode)'s form.
    pub fn decode(text: &str) -> Result<AnchorState, StoreError> {
        let bad = || StoreError::Tampered(format!("the token's store anchor does not parse: {text:?}"));
        let parts: Vec<&str> = text.split(' ').collect();
        let [prefix, generation, written_at, committed, pending] = parts.as_slice() else {
            return Err(bad());
        };
        if *prefix != ANCHOR_PREFIX {
            return Err(bad());
        }
        let digest = |s: &str| crate::audit::unhex32(s).ok_or_else(bad);
        Ok(AnchorState {
            generation: generation.parse().map_err(|_| bad())?,
            written_at: written_at.parse().map_err(|_| bad())?,
            committed: digest(committed)?,
            pending: if *pending == "-" { None } else { Some(digest(pending)?) },
        })
    }
}

/// Where the anchor is kept: in the token ([`crate::anchor::TokenAnchor`]).
pub trait Anchor: Send + Sync {
    /// The anchor, or `None` when the token holds none yet.
    fn read(&self) -> Result<Option<AnchorState>, StoreError>;
    /// Replaces the anchor; returns once the token has it.
    fn write(&self, state: &AnchorState) -> Result<(), StoreError>;
}

/// A store checked against its anchor: the anchor, the digest of every
/// record as the store holds them, and the writes anchored so far. Each
/// backend keeps one behind its writers' lock, and every mutation holds
/// that lock from its [`prepare`] to its [`commit`].
pub struct Anchored {
    anchor: std::sync::Arc<dyn Anchor>,
    digest: StateDigest,
    generation: u64,
    /// The digest of a write prepared and not committed: the write failed,
    /// or its outcome is unknown (a networked store whose answer was lost
    /// after its commit). See [`in_doubt`].
    pending: Option<[u8; 32]>,
}

/// Checks a store whose records have `digest` against the token's anchor
/// (docs/SECURITY.md §3). The digest must be the anchor's committed one,
/// or its pending one (a crash after the store's write; committed now).
/// With no anchor in the token yet (a new install, or a store from before
/// anchoring), the store is anchored as it is. Returns what anchors every
/// write from now on, and the anchor as it stands.
pub fn attach(
    anchor: std::sync::Arc<dyn Anchor>,
    digest: StateDigest,
) -> Result<(Anchored, AnchorState), StoreError> {
    let now = crate::clock::now_unix();
    let state = match anchor.read()? {
        None => {
            tracing::warn!(
                "the token holds no anchor for this store: anchoring the store as it is now \
                 (a new install, or the first start of a store from before anchoring)"
            );
            AnchorState { generation: 0, written_at: now, committed: digest.digest(), pending: None }
        }
        Some(a) if a.committed == digest.digest() => a,
        Some(a) if a.pending == Some(digest.digest()) => {
            tracing::info!(generation = a.generation + 1, "committing the store write a stop cut short");
            AnchorState {
                generation: a.generation + 1,
                written_at: now,
                committed: digest.digest(),
                pending: None,
            }
        }
        Some(a) => {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(a.written_at),
            );
            return Err(StoreError::Tampered(format!(
                "its records are not the state the token vouches for (write {}, at {when}): a record was \
                 altered, removed, added or swapped, or this is an older copy of the store. If you \
                 restored a backup on purpose, run `keyhavend accept-store --reason TEXT` \
                 (docs/OPERATIONS.md §7)",
                a.generation
            )));
        }
    };
    anchor.write(&state)?;
    let generation = state.generation;
    Ok((Anchored { anchor, digest, generation, pending: None }, state))
}

/// Anchors a store whose records have `digest` as it is, whatever the
/// token held (`keyhavend accept-store`). Returns the anchor it replaced.
pub fn accept(
    anchor: std::sync::Arc<dyn Anchor>,
    digest: StateDigest,
) -> Result<(Anchored, Option<AnchorState>), StoreError> {
    let old = anchor.read()?;
    let generation = old.as_ref().map_or(0, |a| a.generation + 1);
    let state = AnchorState {
        generation,
        written_at: crate::clock::now_unix(),
        committed: digest.digest(),
        pending: None,
    };
    anchor.write(&state)?;
    Ok((Anchored { anchor, digest, generation, pending: None }, old))
}

/// Before a write of `tree`/`key` (`None`: a removal): records in the token
/// the digest the store is about to have, next to the one it has.
pub fn prepare(
    anchored: &mut Option<Anchored>,
    tree: &str,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    prepare_all(anchored, tree, &[(key, value)])
}

/// [`prepare`] for several records of `tree`, written together.
pub fn prepare_all(
    anchored: &mut Option<Anchored>,
    tree: &str,
    changes: &[(&[u8], Option<&[u8]>)],
) -> Result<(), StoreError> {
    let Some(a) = anchored else { return Ok(()) };
    let pending = a.digest.with_all(tree, changes);
    a.pending = Some(pending);
    let state = AnchorState {
        generation: a.generation,
        written_at: crate::clock::now_unix(),
        committed: a.digest.digest(),
        pending: Some(pending),
    };
    a.anchor.write(&state)
}

/// Whether a write was prepared and not committed since: the store may
/// hold its state or the one before, and the digest kept in memory may be
/// wrong. The next write must [`settle`] first.
pub fn in_doubt(anchored: &Option<Anchored>) -> bool {
    anchored.as_ref().is_some_and(|a| a.pending.is_some())
}

/// After a write in doubt: `digest` is the store's state read afresh. It
/// is the committed state (the write did not happen), or the pending one
/// (it did: committed now, as at a start after a crash); anything else is
/// a change nobody anchored, refused as at start.
pub fn settle(anchored: &mut Option<Anchored>, digest: StateDigest) -> Result<(), StoreError> {
    let Some(a) = anchored else { return Ok(()) };
    let Some(pending) = a.pending else { return Ok(()) };
    let now = digest.digest();
    if now == a.digest.digest() {
        tracing::info!("a store write that failed did not happen");
    } else if now == pending {
        tracing::info!(
            generation = a.generation + 1,
            "a store write whose answer was lost did happen: committing it"
        );
        a.generation += 1;
        a.digest = digest;
    } else {
        return Err(StoreError::Tampered(
            "after a store write that failed, the store holds neither the state before it nor the state it was \
             making: another writer changed it"
                .into(),
        ));
    }
    a.pending = None;
    a.anchor.write(&AnchorState {
        generation: a.generation,
        written_at: crate::clock::now_unix(),
        committed: a.digest.digest(),
        pending: None,
    })
}

/// Another node's write, read back from the change feed: record
/// `tree`/`key` is now `value` (`None`: removed). Nothing is anchored
/// here: the writer anchors its own writes, and [`reconcile`] checks the
/// result before this node writes.
pub fn learn(anchored: &mut Option<Anchored>, tree: &str, key: &[u8], value: Option<&[u8]>) {
    if let Some(a) = anchored {
        a.digest.set(tree, key, value);
    }
}

/// The feed no longer holds every change this node missed (trimmed while
/// it was away): `digest`, the store's records read afresh, replaces the
/// digest this node kept. Nothing is anchored here either: [`reconcile`]
/// checks the result before this node writes.
pub fn relearn(anchored: &mut Option<Anchored>, digest: StateDigest) {
    if let Some(a) = anchored {
        a.digest = digest;
    }
}

/// Whether a record read from the store is the one the anchored state
/// holds (always, before the anchor is attached).
pub fn vouches(anchored: &Option<Anchored>, tree: &str, key: &[u8], value: &[u8]) -> bool {
    anchored.as_ref().is_none_or(|a| a.digest.holds(tree, key, value))
}

/// Before a write by a node of a cluster, under the cluster's write lock
/// and after catching up on the change feed: the token's anchor, read now
/// (another node may have written it), must vouch for the digest of the
/// records as this node now knows them: as committed, or as pending (its
/// writer, maybe this node, stopped after the database's commit and before
/// the anchor's: committed now). Anything else is a change no node
/// anchored: a database writer who is not a node ([`StoreError::Tampered`]).
pub fn reconcile(anchored: &mut Option<Anchored>) -> Result<(), StoreError> {
    let Some(a) = anchored else { return Ok(()) };
    let now = a.digest.digest();
    let token = a.anchor.read()?.ok_or_else(|| {
        StoreError::Tampered("the token no longer holds the store's anchor (removed or replaced)".into())
    })?;
    if token.committed == now && token.pending.is_none() {
        a.generation = token.generation;
        a.pending = None;
        return Ok(());
    }
    if token.committed == now || token.pending == Some(now) {
        // A write prepared and not done (its digest is not the records'),
        // or done and not committed in the token: settled either way.
        a.generation = if token.committed == now { token.generation } else { token.generation + 1 };
        a.pending = None;
        return a.anchor.write(&AnchorState {
            generation: a.generation,
            written_at: crate::clock::now_unix(),
            committed: now,
            pending: None,
        });
    }
    Err(StoreError::Tampered(format!(
        "the records this node reads are not the state the token vouches for (write {}): a record was \
         altered, removed, added or swapped by a database writer who is not a node of the cluster",
        token.generation
    )))
}

/// After the write is durable: the store has the new state; records it in
/// the token as the committed one.
pub fn commit(
    anchored: &mut Option<Anchored>,
    tree: &str,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    commit_all(anchored, tree, &[(key, value)])
}

/// [`commit`] for several records of `tree`, written together.
pub fn commit_all(
    anchored: &mut Option<Anchored>,
    tree: &str,
    changes: &[(&[u8], Option<&[u8]>)],
) -> Result<(), StoreError> {
    let Some(a) = anchored else { return Ok(()) };
    for (key, value) in changes {
        a.digest.set(tree, key, *value);
    }
    a.generation += 1;
    a.pending = None;
    let state = AnchorState {
        generation: a.generation,
        written_at: crate::clock::now_unix(),
        committed: a.digest.digest(),
        pending: None,
    };
    a.anchor.write(&state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_every_change_and_only_them() {
        let mut d = StateDigest::default();
        let empty = d.digest();
        let with_a = d.with("keyring", b"acme/pii", Some(b"v1"));
        assert_ne!(with_a, empty);
        assert_eq!(d.digest(), empty, "`with` changes nothing");
        d.set("keyring", b"acme/pii", Some(b"v1"));
        assert_eq!(d.digest(), with_a);
        // Another value, another tree, or the same bytes moved: another digest.
        assert_ne!(d.with("keyring", b"acme/pii", Some(b"v2")), with_a);
        // Several changes at once give what they give one by one.
        let both = d.with_all("keyring", &[(b"acme/pii", Some(b"v2")), (b"beta/x", Some(b"v3"))]);
        let mut one_by_one = StateDigest::default();
        one_by_one.set("keyring", b"acme/pii", Some(b"v2"));
        one_by_one.set("keyring", b"beta/x", Some(b"v3"));
        assert_eq!(both, one_by_one.digest());
        let mut moved = StateDigest::default();
        moved.set("revocations", b"acme/pii", Some(b"v1"));
        assert_ne!(moved.digest(), with_a);
        // Loading gives what setting gives; removing goes back.
        let mut loaded = StateDigest::default();
        loaded.load("keyring", b"acme/pii", b"v1");
        loaded.finish_load();
        assert_eq!(loaded.digest(), with_a);
        d.set("keyring", b"acme/pii", None);
        assert_eq!(d.digest(), empty);
    }

    #[test]
    fn the_anchor_text_round_trips_and_refuses_garbage() {
        let a = AnchorState {
            generation: 7,
            written_at: 1_700_000_000,
            committed: [1; 32],
            pending: Some([2; 32]),
        };
        assert_eq!(AnchorState::decode(&a.encode()).unwrap(), a);
        let b = AnchorState { pending: None, ..a };
        assert_eq!(AnchorState::decode(&b.encode()).unwrap(), b);
        for bad in ["", "khanchor1 1 2 3 4", "khanchor2 7 1 - -", &a.encode().replace("khanchor1", "x")] {
            assert!(AnchorState::decode(bad).is_err(), "{bad}");
        }
    }

    struct Memory(std::sync::Mutex<Option<AnchorState>>);
    impl Anchor for Memory {
        fn read(&self) -> Result<Option<AnchorState>, StoreError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn write(&self, state: &AnchorState) -> Result<(), StoreError> {
            *self.0.lock().unwrap() = Some(state.clone());
            Ok(())
        }
    }

    fn loaded(records: &[(&[u8], &[u8])]) -> StateDigest {
        let mut d = StateDigest::default();
        for (k, v) in records {
            d.load("keyring", k, v);
        }
        d.finish_load();
        d
    }

    #[test]
    fn a_write_in_doubt_settles_to_what_the_store_holds_and_nothing_else() {
        let before: &[(&[u8], &[u8])] = &[(b"acme/a", b"1")];
        let after: &[(&[u8], &[u8])] = &[(b"acme/a", b"2")];
        let other: &[(&[u8], &[u8])] = &[(b"acme/a", b"3")];
        for (store_holds, settles, generation) in [(before, true, 0), (after, true, 1), (other, false, 0)] {
            let memory = std::sync::Arc::new(Memory(Default::default()));
            let (a, _) = attach(memory.clone(), loaded(before)).unwrap();
            let mut anchored = Some(a);
            let base = memory.read().unwrap().unwrap().generation;
            prepare(&mut anchored, "keyring", b"acme/a", Some(b"2")).unwrap();
            assert!(in_doubt(&anchored));
            // The write's answer is lost: the store holds one state or another.
            let result = settle(&mut anchored, loaded(store_holds));
            assert_eq!(result.is_ok(), settles, "{result:?}");
            if settles {
                assert!(!in_doubt(&anchored));
                let anchor = memory.read().unwrap().unwrap();
                assert_eq!((anchor.generation - base, anchor.pending), (generation, None));
                assert_eq!(anchor.committed, loaded(store_holds).digest());
                // And a start on that store is accepted.
                attach(memory.clone(), loaded(store_holds)).unwrap();
            }
        }
    }
}
