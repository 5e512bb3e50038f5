//! `keyhavend`'s exit statuses (sysexits.h), so that systemd (and a
//! script) can tell a start that an operator must fix from one that may
//! succeed if tried again: the unit does not restart on [`EX_CONFIG`]
//! (`RestartPreventExitStatus=78`), so a refused PIN is presented to the
//! token once, not every few seconds until the token locks it.
//!
//! | status | meaning | examples |
//! |---|---|---|
//! | 0 | clean stop | SIGTERM, drained |
//! | 78 `EX_CONFIG` | an operator must act | wrong or locked PIN (or one the token refused at an earlier start), config that does not load, production checks refused, PIN unreadable, module that cannot be loaded, master or audit key missing or not the one recorded, store not initialised or not matching its anchor |
//! | 69 `EX_UNAVAILABLE` | the token is not there (yet) | no token with the label, the token failing (unless SoftHSM2's token files are the cause: 78) |
//! | 75 `EX_TEMPFAIL` | try again later | store locked by another process, socket in use by another daemon, store I/O, a full disk under the store or its audit log, PostgreSQL unreachable or not answering within its time limit |
//! | 1 | anything else | |

use crate::config::ConfigError;
use crate::error::Error as OpError;
use crate::hardening::Refused;
use crate::hsm::HsmError;
use crate::store::StoreError;

/// An operator must act before a start can succeed.
pub const EX_CONFIG: u8 = 78;
/// A service the daemon needs (the token) is not available.
pub const EX_UNAVAILABLE: u8 = 69;
/// A temporary failure: trying again later may succeed.
pub const EX_TEMPFAIL: u8 = 75;

/// A start-up failure that is not one of the layers' own errors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The PIN cannot be found or read (`pin_file`, `pin_env`,
    /// `pin_credential`). Never holds the PIN.
    #[error("{0}")]
    Pin(String),
    /// Core dumps cannot be turned off.
    #[error("{0}")]
    Hygiene(String),
    /// `--config FILE` is missing.
    #[error("--config FILE is required")]
    NoConfig,
}

/// The exit status for a failed start or command: the first error in the
/// chain (outermost first) that says which kind it is, else 1.
pub fn status(error: &anyhow::Error) -> u8 {
    error.chain().find_map(kind).unwrap_or(1)
}

fn kind(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if e.is::<ConfigError>()
        || e.is::<Refused>()
        || e.is::<StartError>()
        || e.is::<crate::refusal::RefusedBefore>()
        || e.is::<crate::softhsm::TokenFiles>()
    {
        return Some(EX_CONFIG);
    }
    if let Some(h) = e.downcast_ref::<HsmError>() {
        return Some(hsm(h));
    }
    if let Some(s) = e.downcast_ref::<StoreError>() {
        return store(s);
    }
    if let Some(o) = e.downcast_ref::<OpError>() {
        return match o {
            OpError::Hsm(h) => Some(hsm(h)),
            OpError::Store(s) => store(s),
            OpError::Integrity(_) | OpError::InvalidConfig(_) => Some(EX_CONFIG),
            _ => None,
        };
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return match io.kind() {
            std::io::ErrorKind::AddrInUse => Some(EX_TEMPFAIL),
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::PermissionDenied => Some(EX_CONFIG),
            _ => None,
        };
    }
    None
}

fn hsm(e: &HsmError) -> u8 {
    match e {
        HsmError::Login { .. }
        | HsmError::Module { .. }
        | HsmError::KeyMissing { .. }
        | HsmError::MasterKey { .. }
        | HsmError::MasterKeyMismatch { .. }
        | HsmError::AuditKey { .. }
        | HsmError::Integrity(_) => EX_CONFIG,
        HsmError::Busy(_) => EX_TEMPFAIL,
        _ => EX_UNAVAILABLE,
    }
}

fn store(e: &StoreError) -> Option<u8> {
    match e {
        // A full disk: the start succeeds once there is room (systemd
        // restarts the unit meanwhile).
        // A PostgreSQL server that does not answer: the start succeeds once
        // it answers again.
        StoreError::Backend(_) | StoreError::NoAnswer { .. } | StoreError::Unwritable { .. } => {
            Some(EX_TEMPFAIL)
        }
        StoreError::AlreadyExists(_) => None,
        _ => Some(EX_CONFIG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_innermost_kind_under_context() {
        use anyhow::Context;
        let login: anyhow::Result<()> = Err(HsmError::Login {
            label: "t".into(),
            kind: crate::hsm::LoginFailure::Incorrect,
            reason: "the PIN is incorrect".into(),
        })
        .context("starting the HSM workers");
        assert_eq!(status(&login.unwrap_err()), EX_CONFIG);
        let absent: anyhow::Result<()> = Err(HsmError::TokenNotFound("t".into())).context("starting");
        assert_eq!(status(&absent.unwrap_err()), EX_UNAVAILABLE);
        let tampered: anyhow::Result<()> = Err(StoreError::Tampered("x".into())).context("anchor");
        assert_eq!(status(&tampered.unwrap_err()), EX_CONFIG);
        assert_eq!(status(&anyhow::anyhow!("something else")), 1);
        let full = std::io::Error::from_raw_os_error(28);
        let full: anyhow::Result<()> =
            Err(crate::store::unwritable(std::path::Path::new("/s"), "writing", &full)).context("opening");
        assert_eq!(status(&full.unwrap_err()), EX_TEMPFAIL);
    }
}
