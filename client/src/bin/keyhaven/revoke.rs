//! `keyhaven revoke …` and `keyhaven destroy …`: emergency revocation
//! (runbook: docs/OPERATIONS.md, wire: docs/PROTOCOL.md §3.13–3.16).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use keyhaven::revocation::{Destroy, Reason, Revocation, Revoke, RevokeLift, Scope};
use keyhaven::{Client, KeyPath};
use serde_json::{json, Value};

use crate::{print_json, usage, Failure};

#[derive(Args)]
pub struct RevokeArgs {
    #[command(subcommand)]
    what: RevokeWhat,
    /// Why (to suspend or lift; not with `list`): unspecified, key-compromise, affiliation-changed,
    /// superseded, cessation-of-operation or privilege-withdrawn.
    #[arg(long, global = true)]
    reason: Option<Reason>,
    /// To suspend only (`lift` and `list` refuse it): when the suspension ends by itself, an RFC 3339 UTC
    /// time (2026-12-01T00:00:00Z) or a duration from now (24h, 7d).
    #[arg(long, global = true, value_name = "TIME")]
    expires: Option<String>,
}

#[derive(Subcommand)]
enum RevokeWhat {
    #[command(flatten)]
    Suspend(ScopeArg),
    /// List the revocations in force.
    List {
        /// Only those that touch this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lift a suspension: name the scope as it was suspended.
    Lift {
        #[command(subcommand)]
        scope: ScopeArg,
    },
}

/// An envelope id from 32 hex digits in either case, or from a stored
/// value's embedded envelope (read offline, as `keyhaven inspect` does).
fn envelope_id(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.contains(':') {
        return crate::inspect::text(s).map(|found| found.envelope_id);
    }
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(s.to_ascii_lowercase());
    }
    Err(format!(
        "an envelope id is 32 hex digits, or give the khe1:/khc1:/khs1: value itself (got {} characters)",
        s.chars().count()
    ))
}

/// A scope on the command line.
#[derive(Subcommand)]
enum ScopeArg {
    /// One data key: its envelope id (as `datakey`, `encrypt --json` and `inspect` print it), or the stored
    /// value itself (a khe1: envelope, khc1: ciphertext or khs1: record), whose envelope id is used.
    Datakey {
        /// 32 hex digits (either case), or a khe1:/khc1:/khs1: text form.
        #[arg(value_name = "ENVELOPE_ID|VALUE", value_parser = envelope_id)]
        envelope_id: String,
    },
    /// One key, or one version of it.
    Key {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Only this version.
        #[arg(long, value_parser = crate::version)]
        version: Option<u32>,
    },
    /// Every key of a tenant.
    Tenant {
        /// The tenant.
        tenant: String,
    },
    /// Everything: every encrypt, decrypt and data key stops. Lifting it is break-glass.
    All,
}

impl ScopeArg {
    fn scope(&self) -> Scope {
        match self {
            ScopeArg::Datakey { envelope_id } => Scope::Datakey { envelope_id: envelope_id.clone() },
            ScopeArg::Key { key, version } => {
                Scope::Key { tenant: key.tenant().into(), key: key.key().into(), version: *version }
            }
            ScopeArg::Tenant { tenant } => Scope::Tenant { tenant: tenant.clone() },
            ScopeArg::All => Scope::All,
        }
    }
}

#[derive(Args)]
pub struct DestroyArgs {
    #[command(subcommand)]
    what: DestroyWhat,
    /// The name typed again (TENANT/KEY or TENANT): destruction cannot be undone.
    #[arg(long, global = true, value_name = "NAME")]
    confirm: Option<String>,
}

#[derive(Subcommand)]
enum DestroyWhat {
    /// Erase a suspended key's material (or one version's) for good.
    Key {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Only this version.
        #[arg(long, value_parser = crate::version)]
        version: Option<u32>,
    },
    /// Erase every key of a suspended tenant for good.
    Tenant {
        /// The tenant.
        tenant: String,
    },
}

/// Checks the arguments before anything is sent.
pub fn check_revoke(args: &RevokeArgs) -> Result<(), Failure> {
    match &args.what {
        RevokeWhat::List { .. } => {
            if args.reason.is_some() || args.expires.is_some() {
                return Err(usage("`revoke list` takes neither --reason nor --expires"));
            }
        }
        RevokeWhat::Lift { scope } => {
            reason(args)?;
            if args.expires.is_some() {
                return Err(usage("`revoke lift` takes no --expires"));
            }
            scope.scope().validate().map_err(usage)?;
        }
        RevokeWhat::Suspend(scope) => {
            reason(args)?;
            expires_at(args.expires.as_deref())?;
            scope.scope().validate().map_err(usage)?;
        }
    }
    Ok(())
}

fn reason(args: &RevokeArgs) -> Result<Reason, Failure> {
    args.reason.ok_or_else(|| usage(format!("--reason is required: one of {}", Reason::ALL.join(", "))))
}

/// `--expires` as Unix seconds.
fn expires_at(text: Option<&str>) -> Result<Option<u64>, Failure> {
    let Some(text) = text else { return Ok(None) };
    let when = humantime::parse_rfc3339_weak(text)
        .or_else(|_| humantime::parse_duration(text).map(|d| SystemTime::now() + d))
        .map_err(|_| {
            usage(format!("--expires `{text}` is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor a duration (24h, 7d)"))
        })?;
    if when <= SystemTime::now() {
        return Err(usage(format!("--expires `{text}` is not in the future")));
    }
    let secs = when.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
    Ok(Some(secs))
}

pub async fn revoke(client: &Client, args: RevokeArgs) -> Result<(), Failure> {
    match &args.what {
        RevokeWhat::List { tenant } => {
            let list: Vec<Value> = client.revoke_list(tenant.as_deref()).await?.iter().map(view).collect();
            print_json(&json!({ "revocations": list }))
        }
        RevokeWhat::Lift { scope } => {
            let resp = client.call(&RevokeLift { scope: scope.scope(), reason: reason(&args)? }).await?;
            eprintln!("lifted: {}", scope.scope());
            print_json(&json!({ "lifted": view(&resp.lifted) }))
        }
        RevokeWhat::Suspend(scope) => {
            let req = Revoke {
                scope: scope.scope(),
                reason: reason(&args)?,
                expires_at: expires_at(args.expires.as_deref())?,
            };
            let r = client.call(&req).await?;
            if let (Scope::Datakey { envelope_id }, Some(false)) = (&r.scope, r.envelope_seen) {
                eprintln!(
                    "keyhaven: warning: no audit record names envelope id {envelope_id}: check it for a typo \
                     (the suspension is in force all the same)"
                );
            }
            print_json(&view(&r))
        }
    }
}

pub fn check_destroy(args: &DestroyArgs) -> Result<(), Failure> {
    let (scope, name) = destroy_scope(&args.what);
    scope.validate().map_err(usage)?;
    crate::confirmed("destruction", &name, args.confirm.as_deref())
}

fn destroy_scope(what: &DestroyWhat) -> (Scope, String) {
    match what {
        DestroyWhat::Key { key, version } => (
            Scope::Key { tenant: key.tenant().into(), key: key.key().into(), version: *version },
            key.to_string(),
        ),
        DestroyWhat::Tenant { tenant } => (Scope::Tenant { tenant: tenant.clone() }, tenant.clone()),
    }
}

pub async fn destroy(client: &Client, args: DestroyArgs) -> Result<(), Failure> {
    let (scope, _) = destroy_scope(&args.what);
    let resp = client.call(&Destroy { scope, confirm: args.confirm.unwrap_or_default() }).await?;
    print_json(&json!({ "revocation": view(&resp.revocation), "erased": resp.erased }))
}

/// A revocation with readable times next to the Unix ones.
fn view(r: &Revocation) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    let utc =
        |secs: u64| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    v["since_utc"] = json!(utc(r.since));
    if let Some(t) = r.expires_at {
        v["expires_utc"] = json!(utc(t));
    }
    v["scope_text"] = json!(r.scope.to_string());
    v
}
