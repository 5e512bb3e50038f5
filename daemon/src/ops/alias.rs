//! Key aliases: `alias_create`, `alias_update`, `alias_delete`,
//! `alias_list` (`alias`). An alias is a second name for a key of the same
//! tenant, kept in the store's global facts ([`crate::store::Meta`]) so
//! that both backends hold it in one atomic, anchored record. Key-use
//! requests resolve it in [`super::Cx::key_path`].

use keyhaven::alias::{AliasCreate, AliasDelete, AliasInfo, AliasList, AliasListResponse, AliasUpdate};
use keyhaven::lifecycle::KeyStatus;
use keyhaven::KeyPath;

use super::{blocking, key_target, reply, route, tenant_target, Cx, Daemon, Op, Reply, Route};
use crate::clock::now_unix;
use crate::error::Error;
use crate::policy::{Access, Permission};
use crate::store::AliasRecord;

/// The most aliases a store holds: they live in one record, rewritten at
/// every change, and `alias_list` answers them all in one frame (1 MiB;
/// an alias takes at most ~250 bytes of it).
pub const MAX_ALIASES: usize = 1000;

/// The alias operations (`alias`).
pub(super) const OPS: &[Route] =
    &[route::<AliasCreate>(), route::<AliasUpdate>(), route::<AliasDelete>(), route::<AliasList>()];

/// The alias of name `path`, if there is one.
pub(super) async fn find(d: &Daemon, path: &KeyPath) -> Result<Option<AliasRecord>, Error> {
    let meta = d.store.backend().meta().await?;
    Ok(meta.and_then(|m| m.aliases.get(path.tenant()).and_then(|t| t.get(path.key())).cloned()))
}

/// The alias's name as a path; checked as key names are, and named
/// `alias` in the error.
fn alias_path(tenant: &str, alias: &str) -> Result<KeyPath, Error> {
    keyhaven::names::validate_name("tenant", tenant)?;
    keyhaven::names::validate_name("alias", alias)?;
    Ok(KeyPath::new(tenant, alias)?)
}

/// Refuses a target that is not a usable key of the tenant: absent (or
/// itself an alias: aliases do not chain), destroyed or deleted.
async fn check_target(d: &Daemon, key: &KeyPath) -> Result<(), Error> {
    let Some(rec) = d.store.backend().key(key).await? else {
        let what = match find(d, key).await? {
            Some(_) => "is an alias; an alias names a key, not another alias",
            None => "does not exist",
        };
        return Err(Error::NotFound(format!("key `{key}` {what}")));
    };
    match super::keys::status(&rec, &d.revocations).0 {
        KeyStatus::Destroyed | KeyStatus::Deleted => {
            Err(Error::Revoked(format!("key `{key}` is destroyed; an alias cannot name it")))
        }
        _ => Ok(()),
    }
}

/// Refuses an alias name that a key has.
async fn check_not_a_key(d: &Daemon, name: &KeyPath) -> Result<(), Error> {
    if d.store.backend().key(name).await?.is_some() {
        return Err(Error::AlreadyExists(format!("`{name}` is a key; an alias cannot have a key's name")));
    }
    Ok(())
}

fn info(tenant: &str, alias: &str, rec: &AliasRecord, previous_key: Option<String>) -> AliasInfo {
    AliasInfo {
        tenant: tenant.into(),
        alias: alias.into(),
        key: rec.key.clone(),
        created_at: rec.created_at,
        updated_at: rec.updated_at,
        previous_key,
    }
}

/// The audit record's view of an alias: names and times only.
fn audit_json(name: &KeyPath, rec: &AliasRecord) -> serde_json::Value {
    serde_json::json!({ "alias": name.to_string(), "key": rec.key })
}

/// What a change of the alias table decided.
enum Outcome {
    Done { before: Option<AliasRecord>, after: Option<AliasRecord> },
    Refused(Error),
}

/// Changes alias `name` in one atomic write of the global facts: `change`
/// gets the current alias (if any) and returns the new one (or `None` to
/// remove it), or refuses.
async fn change_alias(
    d: &std::sync::Arc<Daemon>,
    name: &KeyPath,
    change: impl Fn(Option<&AliasRecord>, usize) -> Result<Option<AliasRecord>, Error> + Send + Sync + 'static,
) -> Result<(Option<AliasRecord>, Option<AliasRecord>), Error> {
    let (tenant, alias) = (name.tenant().to_owned(), name.key().to_owned());
    let outcome = blocking(d, move |store| {
        let mut outcome = Outcome::Refused(Error::Internal("alias change did not run".into()));
        store.update_meta(&mut |meta| {
            let count = meta.aliases.values().map(|t| t.len()).sum();
            let table = meta.aliases.entry(tenant.clone()).or_default();
            let before = table.get(&alias).cloned();
            outcome = match change(before.as_ref(), count) {
                Ok(after) => {
                    match &after {
                        Some(rec) => table.insert(alias.clone(), rec.clone()),
                        None => table.remove(&alias),
                    };
                    Outcome::Done { before, after }
                }
                Err(e) => Outcome::Refused(e),
            };
            if table.is_empty() {
                meta.aliases.remove(&tenant);
            }
        })?;
        Ok(outcome)
    })
    .await?;
    match outcome {
        Outcome::Done { before, after } => Ok((before, after)),
        Outcome::Refused(e) => Err(e),
    }
}

impl Op for AliasCreate {
    const ACCESS: Access = Access::Needs(Permission::Alias);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let name = alias_path(&self.tenant, &self.alias)?;
        let key = KeyPath::new(&self.tenant, &self.key)?;
        cx.s.key(&key);
        cx.s.change.detail = Some(format!("alias `{name}`"));
        cx.allow(key_target(&name))?;
        cx.allow(key_target(&key))?;
        check_not_a_key(cx.d, &name).await?;
        check_target(cx.d, &key).await?;
        let shown = name.to_string();
        let target = key.key().to_owned();
        let (_, after) = change_alias(cx.d, &name, move |old, count| match old {
            Some(_) => Err(Error::AlreadyExists(format!(
                "alias `{shown}` exists already; `alias_update` moves it to another key"
            ))),
            None if count >= MAX_ALIASES => Err(Error::BadRequest(format!(
                "the store holds {count} aliases, the most it takes; delete unused ones first (`keyhaven alias list`)"
            ))),
            None => Ok(Some(AliasRecord { key: target.clone(), created_at: now_unix(), updated_at: None })),
        })
        .await?;
        let rec = after.ok_or_else(|| Error::Internal("alias not written".into()))?;
        cx.s.change.after = Some(audit_json(&name, &rec));
        tracing::info!(alias = %name, key = %key, "alias created");
        reply(&info(name.tenant(), name.key(), &rec, None), 0)
    }
}

impl Op for AliasUpdate {
    const ACCESS: Access = Access::Needs(Permission::Alias);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let name = alias_path(&self.tenant, &self.alias)?;
        let key = KeyPath::new(&self.tenant, &self.key)?;
        cx.s.key(&key);
        cx.s.change.detail = Some(format!("alias `{name}`"));
        cx.allow(key_target(&name))?;
        cx.allow(key_target(&key))?;
        check_target(cx.d, &key).await?;
        let shown = name.to_string();
        let target = key.key().to_owned();
        let (before, after) = change_alias(cx.d, &name, move |old, _| match old {
            None => Err(Error::NotFound(format!("alias `{shown}` does not exist; `alias_create` makes it"))),
            Some(old) => {
                Ok(Some(AliasRecord { key: target.clone(), updated_at: Some(now_unix()), ..old.clone() }))
            }
        })
        .await?;
        let rec = after.ok_or_else(|| Error::Internal("alias not written".into()))?;
        cx.s.change.before = before.as_ref().map(|b| audit_json(&name, b));
        cx.s.change.after = Some(audit_json(&name, &rec));
        let previous = before.map(|b| b.key);
        tracing::info!(alias = %name, key = %key, "alias moved");
        reply(&info(name.tenant(), name.key(), &rec, previous), 0)
    }
}

impl Op for AliasDelete {
    const ACCESS: Access = Access::Needs(Permission::Alias);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let name = alias_path(&self.tenant, &self.alias)?;
        cx.s.tenant = Some(name.tenant().to_owned());
        cx.s.change.detail = Some(format!("alias `{name}`"));
        cx.allow(key_target(&name))?;
        let shown = name.to_string();
        let (before, _) = change_alias(cx.d, &name, move |old, _| match old {
            None => Err(Error::NotFound(format!("alias `{shown}` does not exist"))),
            Some(_) => Ok(None),
        })
        .await?;
        let rec = before.ok_or_else(|| Error::Internal("alias not found".into()))?;
        cx.s.key = Some(rec.key.clone());
        cx.s.change.before = Some(audit_json(&name, &rec));
        tracing::info!(alias = %name, "alias deleted");
        reply(&info(name.tenant(), name.key(), &rec, None), 0)
    }
}

impl Op for AliasList {
    const ACCESS: Access = Access::Needs(Permission::Alias);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let target = tenant_target(self.tenant.as_deref(), cx.s)?;
        cx.allow(target)?;
        let meta = cx.d.store.backend().meta().await?;
        let aliases = meta
            .map(|m| m.aliases)
            .unwrap_or_default()
            .into_iter()
            .filter(|(t, _)| self.tenant.as_ref().is_none_or(|want| want == t))
            .flat_map(|(t, table)| {
                table.into_iter().map(move |(a, rec)| info(&t, &a, &rec, None)).collect::<Vec<_>>()
            })
            .collect();
        reply(&AliasListResponse { aliases }, 0)
    }
}
