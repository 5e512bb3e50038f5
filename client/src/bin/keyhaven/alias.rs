//! `keyhaven alias`: second names for keys, movable from one key to
//! another (docs/PROTOCOL.md §3.37–3.40).

use clap::Subcommand;
use keyhaven::{Client, KeyPath};

use crate::{print_json, usage, Failure};

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Make ALIAS (TENANT/ALIAS) a second name for KEY (TENANT/KEY, the same tenant).
    Create {
        /// The alias, as TENANT/ALIAS (no key may have this name).
        alias: KeyPath,
        /// The key it names, as TENANT/KEY.
        key: KeyPath,
    },
    /// Move ALIAS to another key of its tenant; data encrypted through it still decrypts.
    Update {
        /// The alias, as TENANT/ALIAS.
        alias: KeyPath,
        /// The key it names from now on, as TENANT/KEY.
        key: KeyPath,
    },
    /// Remove ALIAS (its key is untouched).
    Delete {
        /// The alias, as TENANT/ALIAS.
        alias: KeyPath,
    },
    /// List aliases (one tenant's, or all).
    List {
        /// Only this tenant's aliases.
        tenant: Option<String>,
    },
}

/// Refuses, before connecting, an alias and a key of different tenants.
pub fn check(cmd: &AliasCommand) -> Result<(), Failure> {
    match cmd {
        AliasCommand::Create { alias, key } | AliasCommand::Update { alias, key }
            if alias.tenant() != key.tenant() =>
        {
            Err(usage(format!(
                "alias `{alias}` and key `{key}` are of different tenants; an alias names a key of its own tenant"
            )))
        }
        _ => Ok(()),
    }
}

pub async fn run(client: &Client, cmd: AliasCommand) -> Result<(), Failure> {
    match cmd {
        AliasCommand::Create { alias, key } => print_json(&client.alias_create(alias.key(), &key).await?),
        AliasCommand::Update { alias, key } => print_json(&client.alias_update(alias.key(), &key).await?),
        AliasCommand::Delete { alias } => {
            print_json(&client.alias_delete(alias.tenant(), alias.key()).await?)
        }
        AliasCommand::List { tenant } => print_json(&client.alias_list(tenant.as_deref()).await?),
    }
}
