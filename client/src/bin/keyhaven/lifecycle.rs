//! `keyhaven key rotate|show|usage|set|trim|schedule-deletion|cancel-deletion`
//! and `keyhaven rewrap` (docs/PROTOCOL.md §3.17–3.23, runbook in
//! docs/OPERATIONS.md).

use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::Subcommand;
use keyhaven::lifecycle::{
    AdminRotateMaster, KeyCancelDeletion, KeyRotate, KeyScheduleDeletion, KeySet, KeyShow, KeyState, KeyTrim,
    Rewrap,
};
use keyhaven::{Client, EncryptionContext, KeyPath};
use serde_json::json;

use crate::{print_json, usage, Failure};

/// The lifecycle subcommands of `keyhaven key`.
#[derive(Subcommand)]
pub enum Lifecycle {
    /// Add a version (generated in the HSM); new data keys use it, older versions still decrypt.
    Rotate {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Makes a retry safe: a rotation with the same key as one that was made adds no version.
        #[arg(long, value_name = "KEY", value_parser = crate::idempotency_key)]
        idempotency_key: Option<String>,
    },
    /// A key's versions, states, dates, rotation period and usage.
    Show {
        /// The key, as TENANT/KEY.
        key: KeyPath,
    },
    /// Decryptions, rewraps and last use per version: is an old version still needed?
    Usage {
        /// The key, as TENANT/KEY.
        key: KeyPath,
    },
    /// Change a key's settings.
    Set {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Refuse decryption under versions below N (retirement).
        #[arg(long, value_name = "N", value_parser = crate::version)]
        min_decryption_version: Option<u32>,
        /// Rotate automatically this often (90d, 12h, …), or `off`.
        #[arg(long, value_name = "PERIOD")]
        rotate_every: Option<String>,
        /// No new data keys; existing ones still decrypt.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Back to normal use.
        #[arg(long)]
        enable: bool,
        /// A new description (`""` removes it).
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Add a tag or give it a new value, NAME=VALUE; repeat for more.
        #[arg(long = "tag", value_name = "NAME=VALUE")]
        tags: Vec<String>,
        /// Remove a tag, by name; repeat for more.
        #[arg(long = "untag", value_name = "NAME")]
        untags: Vec<String>,
    },
    /// Delete for good the versions below the minimum decryption version. Cannot be undone: needs --confirm
    /// TENANT/KEY.
    Trim {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// The key's name typed again: what is under the trimmed versions never opens again.
        #[arg(long, value_name = "TENANT/KEY")]
        confirm: Option<String>,
    },
    /// Stop every use now and erase the key after a waiting period (7–30 days).
    ScheduleDeletion {
        /// The key, as TENANT/KEY.
        key: KeyPath,
        /// Days to wait.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion; the key comes back disabled.
    CancelDeletion {
        /// The key, as TENANT/KEY.
        key: KeyPath,
    },
}

/// The longest automatic rotation period the daemon takes (PROTOCOL.md §3.3).
const MAX_ROTATE_EVERY_SECS: u64 = 100 * 365 * 86_400;

/// `--rotate-every` in seconds (0 for `off`).
pub fn period(text: &str) -> Result<u64, Failure> {
    if text == "off" || text == "none" {
        return Ok(0);
    }
    let d = humantime::parse_duration(text)
        .map_err(|_| usage(format!("--rotate-every `{text}` is not a period like 90d, 12h or `off`")))?;
    if d.as_secs() == 0 {
        return Err(usage(format!("--rotate-every `{text}` is under one second")));
    }
    if d.as_secs() > MAX_ROTATE_EVERY_SECS {
        return Err(usage(format!("--rotate-every `{text}` is over 100 years, the longest period")));
    }
    Ok(d.as_secs())
}

/// `--tag NAME=VALUE` arguments as a map (split at the first `=`; the
/// daemon checks the names and values).
pub fn tags(args: &[String]) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    let mut map = std::collections::BTreeMap::new();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            return Err(usage(format!("--tag `{}` is not NAME=VALUE", arg.escape_debug())));
        };
        if map.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(usage(format!("--tag `{}` is given twice", name.escape_debug())));
        }
    }
    Ok(map)
}

/// Every key (of one tenant), following the daemon's pages; only those
/// with every tag of `tags` when it is not empty.
pub async fn list(
    client: &Client,
    tenant: Option<String>,
    tags: std::collections::BTreeMap<String, String>,
) -> Result<Vec<keyhaven::wire::KeyInfo>, Failure> {
    let mut keys = Vec::new();
    let mut after = None;
    loop {
        let req = keyhaven::wire::KeyList {
            tenant: tenant.clone(),
            limit: None,
            after: after.take(),
            tags: tags.clone(),
        };
        let page = client.call(&req).await?;
        keys.extend(page.keys);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(keys),
        }
    }
}

/// Checks the arguments before anything is sent.
pub fn check(cmd: &Lifecycle) -> Result<(), Failure> {
    match cmd {
        Lifecycle::Set {
            min_decryption_version,
            rotate_every,
            disable,
            enable,
            description,
            tags: t,
            untags,
            ..
        } => {
            if let Some(p) = rotate_every {
                period(p)?;
            }
            tags(t)?;
            if *min_decryption_version == Some(0) {
                return Err(usage("--min-decryption-version starts at 1"));
            }
            if min_decryption_version.is_none()
                && rotate_every.is_none()
                && !disable
                && !enable
                && description.is_none()
                && t.is_empty()
                && untags.is_empty()
            {
                return Err(usage(
                    "nothing to set: give --min-decryption-version, --rotate-every, --disable, --enable, \
                     --description, --tag or --untag",
                ));
            }
            Ok(())
        }
        Lifecycle::Trim { key, confirm } => {
            crate::confirmed("trimming", &key.to_string(), confirm.as_deref())
        }
        Lifecycle::ScheduleDeletion { days, .. } if !(7..=30).contains(days) => {
            Err(usage(format!("--days {days}: a deletion waits 7 to 30 days")))
        }
        _ => Ok(()),
    }
}

fn names(key: &KeyPath) -> (String, String) {
    (key.tenant().to_owned(), key.key().to_owned())
}

pub async fn run(client: &Client, cmd: Lifecycle) -> Result<(), Failure> {
    match cmd {
        Lifecycle::Rotate { key, idempotency_key } => {
            let (tenant, key) = names(&key);
            print_json(&view(&client.call(&KeyRotate { tenant, key, idempotency_key }).await?))
        }
        Lifecycle::Show { key } => {
            let (tenant, key) = names(&key);
            print_json(&view(&client.call(&KeyShow { tenant, key }).await?))
        }
        Lifecycle::Usage { key } => {
            let (tenant, key) = names(&key);
            let d = client.call(&KeyShow { tenant, key }).await?;
            let versions: Vec<_> = d
                .versions
                .iter()
                .map(|v| {
                    json!({
                        "version": v.version,
                        "state": v.state,
                        "decryptions": v.decryptions,
                        "rewraps": v.rewraps,
                        "wrap_budget_reserved": v.wrap_budget_reserved,
                        "last_used_at": v.last_used_at,
                    })
                })
                .collect();
            print_json(&view(&json!({ "tenant": d.tenant, "key": d.key, "versions": versions })))
        }
        Lifecycle::Set {
            key,
            min_decryption_version,
            rotate_every,
            disable,
            enable,
            description,
            tags: t,
            untags,
        } => {
            let (tenant, key) = names(&key);
            let state = if disable { Some(KeyState::Disabled) } else { enable.then_some(KeyState::Enabled) };
            let rotate_every_secs = rotate_every.as_deref().map(period).transpose()?;
            let set_tags = tags(&t)?;
            let req = KeySet {
                tenant,
                key,
                min_decryption_version,
                rotate_every_secs,
                state,
                description,
                set_tags: (!set_tags.is_empty()).then_some(set_tags),
                remove_tags: (!untags.is_empty()).then_some(untags),
            };
            print_json(&view(&client.call(&req).await?))
        }
        Lifecycle::Trim { key, .. } => {
            let (tenant, key) = names(&key);
            let r = client.call(&KeyTrim { tenant, key }).await?;
            // The key in the shape every key command prints, and what went.
            let mut out = view(&r.details);
            out["trimmed"] = json!(r.trimmed);
            print_json(&out)
        }
        Lifecycle::ScheduleDeletion { key, days } => {
            let (tenant, key) = names(&key);
            print_json(&view(&client.call(&KeyScheduleDeletion { tenant, key, days: Some(days) }).await?))
        }
        Lifecycle::CancelDeletion { key } => {
            let (tenant, key) = names(&key);
            print_json(&view(&client.call(&KeyCancelDeletion { tenant, key }).await?))
        }
    }
}

/// `keyhaven rewrap`: one envelope or ciphertext per line on stdin, the
/// rewrapped one per line on stdout, in order; a progress line on a terminal.
/// A line that fails stops the run with its line number (nothing after it is
/// written), so a partial output is never mistaken for a whole one.
pub async fn rewrap(client: &Client, context: EncryptionContext) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let progress = std::io::stderr().is_terminal();
    let (start, mut last) = (Instant::now(), Instant::now());
    let mut done = 0u64;
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.map_err(|e| Failure::new(format!("cannot read line {}: {e}", n + 1)))?;
        let text = line.trim();
        if text.is_empty() {
            writeln!(out)?;
            continue;
        }
        let r = client
            .call(&Rewrap { text: text.to_owned(), context: context.clone() })
            .await
            .map_err(|e| Failure::new(format!("line {}: {e}", n + 1)))?;
        writeln!(out, "{}", r.text)?;
        done += 1;
        if progress && last.elapsed() > Duration::from_millis(500) {
            last = Instant::now();
            let rate = done as f64 / start.elapsed().as_secs_f64();
            eprint!("\rrewrapped {done} ({rate:.0}/s)");
        }
    }
    out.flush()?;
    if progress && done > 0 {
        eprintln!("\rrewrapped {done}            ");
    }
    Ok(())
}

/// `keyhaven admin rotate-master`: batches until done, with a progress
/// line per batch on stderr. Interrupted, it is resumed by running it again.
pub async fn rotate_master(client: &Client, batch: u32, rollback: bool) -> Result<(), Failure> {
    let mut total = 0u64;
    let mut req = AdminRotateMaster { batch: Some(batch), rollback };
    loop {
        let status = client.call(&req).await?;
        req.rollback = false; // the first call turns it round; the rest carry on
        total += status.rotated;
        eprintln!(
            "master key {} -> {}: {total} keys given a new version, {} to go",
            status.from, status.to, status.remaining
        );
        if status.finished {
            if status.left_under_from > 0 {
                eprintln!(
                    "{} older key versions stay under master key {} until their data is rewrapped and they are \
                     trimmed (docs/OPERATIONS.md); then retire it",
                    status.left_under_from, status.from
                );
            }
            return print_json(&json!({
                "from": status.from,
                "to": status.to,
                "rotated": total,
                "finished": true,
                "left_under_from": status.left_under_from,
            }));
        }
        if status.rotated == 0 {
            return Err(Failure::new(format!(
                "master-key rotation made no progress with {} keys left; see the daemon's log",
                status.remaining
            )));
        }
    }
}

fn utc(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A key answer as the CLI prints it (one shape for `key create`, `list`,
/// `show`, `rotate`, `usage`, …): the daemon's fields, and next to every
/// `X_at` time in Unix seconds its readable `X_utc` (RFC 3339); a field the
/// daemon left out (`last_used_at` of an unused version) is `null`.
pub fn view(d: &impl serde::Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(d).unwrap_or_default();
    add_utc(&mut v);
    v
}

fn add_utc(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let times: Vec<(String, Option<u64>)> = map
                .iter()
                .filter_map(|(k, t)| k.strip_suffix("_at").map(|stem| (format!("{stem}_utc"), t.as_u64())))
                .collect();
            for (name, t) in times {
                map.insert(name, json!(t.map(utc)));
            }
            map.values_mut().for_each(add_utc);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(add_utc),
        _ => {}
    }
}
