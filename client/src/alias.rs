//! Key aliases on the wire (docs/PROTOCOL.md §3.37–3.40): a second name
//! for a key of the same tenant that can be moved to another key, as AWS
//! KMS aliases are. The key-use operations accept an alias wherever they
//! take a key name; the daemon resolves it and answers with the real key.

use serde::{Deserialize, Serialize};

use crate::wire::Operation;

/// An alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasInfo {
    /// The tenant (of the alias and of its key).
    pub tenant: String,
    /// The alias's name.
    pub alias: String,
    /// The key it names.
    pub key: String,
    /// When it was made, Unix seconds.
    pub created_at: u64,
    /// When it was last moved to another key, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<u64>,
    /// `alias_update`: the key it named before the move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<String>,
}

/// `alias_create`: a new alias `tenant/alias` for key `tenant/key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasCreate {
    /// The tenant.
    pub tenant: String,
    /// The alias's name (checked as a key name; no key may have it).
    pub alias: String,
    /// The key it names: an existing, not destroyed key of the tenant.
    pub key: String,
}
impl Operation for AliasCreate {
    const OP: &'static str = "alias_create";
    type Response = AliasInfo;
}

/// `alias_update`: moves an alias to another key of the same tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasUpdate {
    /// The tenant.
    pub tenant: String,
    /// The alias.
    pub alias: String,
    /// The key it names from now on.
    pub key: String,
}
impl Operation for AliasUpdate {
    const OP: &'static str = "alias_update";
    type Response = AliasInfo;
}

/// `alias_delete`: removes an alias (its key is untouched).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasDelete {
    /// The tenant.
    pub tenant: String,
    /// The alias.
    pub alias: String,
}
impl Operation for AliasDelete {
    const OP: &'static str = "alias_delete";
    type Response = AliasInfo;
}

/// `alias_list`: aliases, of one tenant or all.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasList {
    /// Only this tenant's aliases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Answer to `alias_list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasListResponse {
    /// The aliases, sorted by tenant then alias.
    pub aliases: Vec<AliasInfo>,
}
impl Operation for AliasList {
    const OP: &'static str = "alias_list";
    type Response = AliasListResponse;
}

use crate::{Client, Error, KeyPath};

impl Client {
    /// Makes alias `alias` (in `key`'s tenant) for `key` (`alias_create`).
    pub async fn alias_create(&self, alias: &str, key: &KeyPath) -> Result<AliasInfo, Error> {
        self.call(&AliasCreate { tenant: key.tenant().into(), alias: alias.into(), key: key.key().into() })
            .await
    }

    /// Moves alias `alias` (in `key`'s tenant) to `key` (`alias_update`).
    pub async fn alias_update(&self, alias: &str, key: &KeyPath) -> Result<AliasInfo, Error> {
        self.call(&AliasUpdate { tenant: key.tenant().into(), alias: alias.into(), key: key.key().into() })
            .await
    }

    /// Removes alias `alias` of `tenant` (`alias_delete`); its key stays.
    pub async fn alias_delete(&self, tenant: &str, alias: &str) -> Result<AliasInfo, Error> {
        self.call(&AliasDelete { tenant: tenant.into(), alias: alias.into() }).await
    }

    /// Lists aliases, of one tenant or all (`alias_list`).
    pub async fn alias_list(&self, tenant: Option<&str>) -> Result<Vec<AliasInfo>, Error> {
        Ok(self.call(&AliasList { tenant: tenant.map(Into::into) }).await?.aliases)
    }
}
