//! The operations, one module per family. [`dispatch`] parses an operation's
//! params (refusing unknown fields) and runs it for a caller. Each returns
//! its response already serialised, in a zeroizing buffer, because some
//! responses carry plaintext.

mod datakey;
mod encrypt;
mod health;
mod keys;
mod revoke;

use std::sync::Arc;

use keyhaven::revocation::{Destroy, Revoke, RevokeLift, RevokeList};
use keyhaven::wire::{self, Operation};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::Error;
use crate::hsm::Hsm;
use crate::identity::Caller;
use crate::revocation;
use crate::store::Store;
use crate::wraps::WrapBudget;

/// What every request may use.
pub struct Daemon {
    /// The HSM worker pool.
    pub hsm: Hsm,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The configuration the daemon started with.
    pub config: Config,
    /// Data-key wraps counted per KEK version.
    pub wraps: WrapBudget,
    /// Revocations in force.
    pub revocations: revocation::Index,
}

impl Daemon {
    /// Puts the parts together, loading the revocations from the store.
    pub fn new(hsm: Hsm, store: Arc<dyn Store>, config: Config) -> Result<Daemon, Error> {
        let wraps = WrapBudget::new(store.clone(), config.limits.wraps_per_key_version);
        let revocations = revocation::Index::new(store.revocations()?);
        Ok(Daemon { hsm, store, config, wraps, revocations })
    }
}

/// A serialised `ok` body.
pub type Reply = Zeroizing<Vec<u8>>;

/// Runs operation `op` with raw JSON `params` for `caller`.
pub async fn dispatch(d: &Arc<Daemon>, caller: &Caller, op: &str, params: &str) -> Result<Reply, Error> {
    match op {
        wire::Hello::OP => health::hello(parse(op, params)?),
        wire::Health::OP => health::health(d, parse::<wire::Health>(op, params)?).await,
        wire::KeyCreate::OP => keys::create(d, parse(op, params)?).await,
        wire::KeyList::OP => keys::list(d, parse(op, params)?).await,
        wire::Encrypt::OP => encrypt::encrypt(d, parse(op, params)?).await,
        wire::Decrypt::OP => encrypt::decrypt(d, parse(op, params)?).await,
        wire::Datakey::OP => datakey::generate(d, parse(op, params)?).await,
        wire::DatakeyDecrypt::OP => datakey::decrypt(d, parse(op, params)?).await,
        Revoke::OP => revoke::revoke(d, caller, parse(op, params)?).await,
        RevokeLift::OP => revoke::lift(d, caller, parse(op, params)?).await,
        RevokeList::OP => revoke::list(d, parse(op, params)?),
        Destroy::OP => revoke::destroy(d, caller, parse(op, params)?).await,
        other => Err(Error::UnknownOperation(printable(other))),
    }
}

/// Parses `params` for `op`; the message names the field at fault, with any
/// name from the request shortened and escaped and no string value quoted.
fn parse<T: DeserializeOwned>(op: &str, params: &str) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_str(params);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Error::BadRequest(format!("params of `{op}`: {}", crate::connection::describe(&e))))?;
    de.end().map_err(|e| Error::BadRequest(format!("params of `{op}`: {e}")))?;
    Ok(value)
}

/// serde quotes a mistyped string value in its message (`invalid type:
/// string "…"`); that value might be a secret sent in the wrong field, so
/// it is cut out.
pub(crate) fn scrub(msg: &str) -> String {
    match (msg.find("string \""), msg.rfind("\", expected")) {
        (Some(a), Some(b)) if b > a + 8 => format!("{}string \"…{}", &msg[..a], &msg[b..]),
        _ => msg.to_owned(),
    }
}

/// Shortens hostile input before it goes into a message.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Serialises a response into a zeroizing buffer sized up front (`hint`),
/// so that growing it does not leave copies of a secret behind.
fn reply<T: Serialize>(value: &T, hint: usize) -> Result<Reply, Error> {
    let mut out = Zeroizing::new(Vec::with_capacity(hint + 256));
    serde_json::to_writer(&mut *out, value)
        .map_err(|e| Error::Internal(format!("serialising a response: {e}")))?;
    Ok(out)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_cuts_quoted_values() {
        let e = serde_json::from_str::<wire::Datakey>(
            r#"{"tenant":"a","key":"b","include_plaintext":"hunter2"}"#,
        )
        .unwrap_err();
        let s = scrub(&e.to_string());
        assert!(!s.contains("hunter2") && s.contains("expected"), "{s}");
    }
}
