//! `keyhavend init`: master key version 1 in the token, and an empty store
//! that records it. Refuses to touch a store or token that has them already.

use anyhow::{bail, Context};

use crate::config::Config;
use crate::hsm;
use crate::store::{MasterKeyPin, Meta, Store, SCHEMA_VERSION};

/// Creates the master key and initialises the store, which stays open
/// and is returned (sled holds a lock on it that is released only lazily
/// after a drop, so the daemon reuses this handle rather than reopening).
pub fn initialise(config: &Config) -> anyhow::Result<Store> {
    let store = crate::store::open(config)?;
    if store.meta()?.is_some() {
        bail!("the store at {} is initialised already; nothing to do", store.location());
    }
    let hsm_config = config.hsm_config().map_err(anyhow::Error::msg)?;
    let (id, canary) = hsm::create_first_master_key(hsm_config).context("creating the master key")?;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let meta = Meta {
        schema_version: SCHEMA_VERSION,
        master_key_version: 1,
        token_label: config.hsm.token_label.clone(),
        created_at: now,
        master_rotation: None,
        master_keys: vec![MasterKeyPin { version: 1, id, canary, pinned_at: now }],
        master_pending: None,
        store_accepted: None,
        aliases: Default::default(),
    };
    store.init_meta(&meta)?;
    Ok(store)
}
