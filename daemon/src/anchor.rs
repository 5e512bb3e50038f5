//! The store's anchor in the token (docs/SECURITY.md §3): what joins the
//! store ([`crate::store::state`], which decides what is anchored and
//! when) to the HSM workers (which keep the anchor in a private token data
//! object).

use std::sync::Arc;

use crate::hsm::anchor::AnchorKind;
use crate::hsm::Hsm;
use crate::store::state::{Anchor, AnchorState};
use crate::store::StoreError;

/// The anchor kept in the token, through the HSM workers.
pub struct TokenAnchor {
    hsm: Arc<Hsm>,
}

impl TokenAnchor {
    /// An anchor reached through `hsm`.
    pub fn new(hsm: Arc<Hsm>) -> Arc<TokenAnchor> {
        Arc::new(TokenAnchor { hsm })
    }
}

/// `keyhavend accept-store`: anchors the store as it is now, over whatever
/// the token's anchor held (the operator restored a backup of the store, or
/// of the token, on purpose), and records who did it and why in the store,
/// for the audit log at the daemon's next start. Returns a line for the
/// operator.
pub fn accept_store(config: &crate::config::Config, reason: &str) -> anyhow::Result<String> {
    use anyhow::Context;

    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        anyhow::bail!("--reason must say why, in 1 to 500 characters");
    }
    let store = crate::store::open(config)?;
    let meta = store.check_initialised()?;
    let hsm_config = config.hsm_config().map_err(anyhow::Error::msg)?;
    let hsm = Arc::new(Hsm::start(hsm_config, meta.master_key_version).context("starting the HSM workers")?);
    let result = (|| {
        let old = store.accept_as_is(TokenAnchor::new(hsm.clone()))?;
        // The audit log restored with the store is accepted too: its next
        // seal is anchored afresh.
        let none = crate::audit::AuditAnchor { seq: 0, head: [0; 32] }.encode();
        hsm.run_blocking(move |w| w.write_anchor(AnchorKind::Audit, &none)).map_err(unavailable)?;
        let accepted = crate::store::StoreAccepted {
            at: crate::clock::now_unix(),
            uid: nix::unistd::getuid().as_raw(),
            reason: reason.to_owned(),
            replaced_generation: old.as_ref().map(|a| a.generation),
        };
        store.update_meta(&mut |m| m.store_accepted = Some(accepted.clone()))?;
        store.flush()?;
        Ok::<_, StoreError>(old)
    })();
    hsm.shutdown();
    let old = result?;
    Ok(match old {
        Some(a) => format!(
            "the store at {} is accepted as it is; it replaces the token's anchor of write {} (recorded in the audit log at the next start)",
            store.location(),
            a.generation
        ),
        None => format!("the store at {} is anchored as it is (the token held no anchor)", store.location()),
    })
}

fn unavailable(e: crate::hsm::HsmError) -> StoreError {
    StoreError::Backend(format!("cannot reach the store's anchor in the token: {e}"))
}

impl Anchor for TokenAnchor {
    fn read(&self) -> Result<Option<AnchorState>, StoreError> {
        match self.hsm.run_blocking(|w| w.read_anchor(AnchorKind::Store)).map_err(unavailable)? {
            Some(text) => AnchorState::decode(&text).map(Some),
            None => Ok(None),
        }
    }

    fn write(&self, state: &AnchorState) -> Result<(), StoreError> {
        let text = state.encode();
        self.hsm.run_blocking(move |w| w.write_anchor(AnchorKind::Store, &text)).map_err(unavailable)
    }
}
