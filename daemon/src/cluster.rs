//! A node's in-memory state following the other nodes of its cluster
//! (docs/CLUSTER.md): the store's change feed hands each change made
//! elsewhere to [`FollowOthers`] before the node reports it applied, so a
//! revocation made on any node is in this node's index before that
//! node's `revoke` returns.

use std::sync::Arc;

use keyhaven::revocation::{Revocation, Scope};
use keyhaven::KeyPath;

use crate::hsm::Hsm;
use crate::revocation::Index;
use crate::store::cluster::ChangeSink;
use crate::store::{KeyRecord, Meta};

/// Applies other nodes' changes to this daemon.
pub struct FollowOthers {
    /// The revocations in force.
    pub revocations: Arc<Index>,
    /// Connections subscribed to revocations (PROTOCOL.md §6).
    pub events: tokio::sync::broadcast::Sender<Scope>,
    /// For unloading the KEKs of destroyed and trimmed versions.
    pub hsm: Arc<Hsm>,
    /// The daemon's runtime (unloading is asynchronous).
    pub runtime: tokio::runtime::Handle,
}

impl ChangeSink for FollowOthers {
    fn revocation(&self, scope: &Scope, record: Option<&Revocation>) {
        match record {
            Some(r) => {
                self.revocations.put(r.clone());
                let _ = self.events.send(scope.clone());
            }
            None => self.revocations.remove(scope),
        }
    }

    fn key(&self, path: &KeyPath, record: Option<&KeyRecord>) {
        // KEKs of versions that are gone or destroyed are unloaded; the
        // record itself was refreshed in the store's cache already.
        let usable: Vec<u32> = record
            .map(|r| r.versions.iter().filter(|v| v.destroyed_at.is_none()).map(|v| v.version).collect())
            .unwrap_or_default();
        let (hsm, path) = (self.hsm.clone(), path.clone());
        self.runtime.spawn(async move {
            let covered = move |id: &crate::hsm::KekId| id.path == path && !usable.contains(&id.version);
            if let Err(e) = hsm
                .on_every_worker(move |w| {
                    w.evict(&covered);
                })
                .await
            {
                tracing::warn!(error = %e, "could not unload KEKs another node retired");
            }
        });
    }

    fn reload(&self, meta: Option<&Meta>, keys: &[KeyRecord], revocations: &[Revocation]) {
        // Subscribers hear of every revocation that is new or changed.
        let news: Vec<Scope> = revocations
            .iter()
            .filter(|r| self.revocations.get(&r.scope).as_ref() != Some(*r))
            .map(|r| r.scope.clone())
            .collect();
        self.revocations.replace_all(revocations.to_vec());
        for scope in news {
            let _ = self.events.send(scope);
        }
        // One pass over every worker: KEKs of keys that are gone, and of
        // versions destroyed or trimmed, are unloaded.
        let usable: std::collections::HashMap<(String, String), Vec<u32>> = keys
            .iter()
            .map(|r| {
                let live =
                    r.versions.iter().filter(|v| v.destroyed_at.is_none()).map(|v| v.version).collect();
                ((r.tenant.clone(), r.key.clone()), live)
            })
            .collect();
        let usable = Arc::new(usable);
        let hsm = self.hsm.clone();
        self.runtime.spawn(async move {
            let covered = move |id: &crate::hsm::KekId| {
                usable
                    .get(&(id.path.tenant().to_owned(), id.path.key().to_owned()))
                    .is_none_or(|live| !live.contains(&id.version))
            };
            if let Err(e) = hsm
                .on_every_worker(move |w| {
                    w.evict(&covered);
                })
                .await
            {
                tracing::warn!(error = %e, "could not unload KEKs retired while this node was away");
            }
        });
        if let Some(meta) = meta {
            self.meta(meta);
        }
    }

    fn meta(&self, meta: &Meta) {
        tracing::debug!(
            master_key_version = meta.master_key_version,
            "another node changed the store's meta"
        );
        // Every pinned master key's CKA_ID, for this node's workers too: a
        // key planted under a version's label is refused here as well.
        for pin in &meta.master_keys {
            self.hsm.pin_master_id(pin.version, &pin.id);
        }
        // A version another node retired (older than the current one, no
        // longer pinned) is forgotten.
        for (version, _) in self.hsm.confinement() {
            if meta.master_pin(version).is_none() && version < meta.master_key_version {
                self.hsm.forget_confinement(version);
                let hsm = self.hsm.clone();
                self.runtime.spawn(async move {
                    if let Err(e) = hsm.on_every_worker(move |w| w.forget_master_key(version)).await {
                        tracing::warn!(error = %e, "could not forget a master key another node retired");
                    }
                });
            }
        }
        // Another node started (or rolled back) a master-key rotation: new
        // KEKs go under the new current version here too, once its pin
        // checks out in this node's own token session.
        let version = meta.master_key_version;
        if version == self.hsm.master_key_version() {
            return;
        }
        let Some(pin) = meta.master_pin(version).cloned() else {
            return tracing::warn!(
                version,
                "another node made master key version {version} current, but the store holds no pin for it:                  this node keeps wrapping new keys under version {} until it restarts",
                self.hsm.master_key_version()
            );
        };
        let hsm = self.hsm.clone();
        self.runtime.spawn(async move {
            let (id, canary) = (pin.id.clone(), pin.canary.clone());
            match hsm.run(move |w| w.check_master_key(version, &id, &canary)).await {
                Ok(confined) => {
                    hsm.set_confinement(version, confined);
                    hsm.set_master_key_version(version);
                    tracing::warn!(version, "another node made this master key version current: using it");
                }
                Err(e) => tracing::error!(
                    version,
                    error = %e,
                    "another node made this master key version current, but it does not check out against its                      pin in this node's token session: new keys stay under the previous version"
                ),
            }
        });
    }
}
