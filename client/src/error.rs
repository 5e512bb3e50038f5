//! The client crate's error type and the daemon's wire error codes.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code, as sent on the wire
/// (docs/PROTOCOL.md §4). Codes are never renamed; new ones may be added,
/// and an older client reads them as [`ErrorCode::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed: bad JSON, a missing or mistyped field, bad
    /// base64, an invalid name or context.
    BadRequest,
    /// The `op` is not one the daemon knows.
    UnknownOperation,
    /// The client speaks a protocol version the daemon does not.
    UnsupportedProtocol,
    /// A frame was longer than the maximum; the connection is closed.
    FrameTooLarge,
    /// A plaintext over the `encrypt` limit (use data keys instead).
    PayloadTooLarge,
    /// An envelope or ciphertext that does not parse.
    BadEnvelope,
    /// An envelope or ciphertext that parses but does not authenticate:
    /// altered, or a wrong encryption context.
    Integrity,
    /// The tenant, key or key version does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// A key version has wrapped as many data keys as its GCM nonce bound
    /// allows (docs/ENVELOPE.md §7); it needs a new version.
    KeyExhausted,
    /// The key's state forbids this use: disabled (no new data keys),
    /// pending deletion or deleted (no use at all).
    KeyDisabled,
    /// The key version is below the key's minimum decryption version.
    VersionRetired,
    /// The caller may not do this.
    PermissionDenied,
    /// The key is of another type than the operation needs (e.g. `mac`
    /// under an `aes256-gcm` key).
    WrongKeyType,
    /// The key or scope has been revoked.
    Revoked,
    /// A configuration to reload was refused (the old one stays in force).
    InvalidConfig,
    /// The daemon is overloaded; retry later.
    Busy,
    /// The HSM cannot be used right now (module, token absent, session
    /// lost); the daemon reconnects by itself.
    HsmUnavailable,
    /// The token refused the daemon's login (wrong or locked PIN); the
    /// daemon does not retry until an operator fixes the PIN and reloads.
    HsmLoginFailed,
    /// The master key is missing from the token or unusable.
    MasterKeyUnavailable,
    /// The store cannot be read or written.
    StoreUnavailable,
    /// A fault inside the daemon; its log says more.
    Internal,
    /// A code this client version does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOperation => "unknown_operation",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BadEnvelope => "bad_envelope",
            ErrorCode::Integrity => "integrity",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::KeyExhausted => "key_exhausted",
            ErrorCode::KeyDisabled => "key_disabled",
            ErrorCode::VersionRetired => "version_retired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::WrongKeyType => "wrong_key_type",
            ErrorCode::Revoked => "revoked",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::Busy => "busy",
            ErrorCode::HsmUnavailable => "hsm_unavailable",
            ErrorCode::HsmLoginFailed => "hsm_login_failed",
            ErrorCode::MasterKeyUnavailable => "master_key_unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in the client crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tenant or key name breaks the naming rules.
    #[error("invalid {0}")]
    InvalidName(String),
    /// An encryption context breaks the rules of docs/ENVELOPE.md §4.
    #[error("invalid encryption context: {0}")]
    InvalidContext(String),
    /// An envelope or ciphertext does not parse.
    #[error("malformed {0}")]
    Envelope(String),
    /// The daemon's socket could not be reached.
    #[error("daemon not reachable at {}: {source}", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon closed the connection.
    #[error("the daemon closed the connection")]
    Closed,
    /// No answer within a timeout ([`crate::client::Timeouts`]).
    #[error("timed out after {} waiting for {what}", crate::client::seconds(*after))]
    Timeout {
        /// What was waited for.
        what: crate::client::TimedOut,
        /// The timeout.
        after: std::time::Duration,
    },
    /// A frame over the size limit.
    #[error("frame of {0} bytes is over the limit of {max} bytes", max = crate::frame::MAX_FRAME_LEN)]
    FrameTooLarge(usize),
    /// A frame reader would grow its buffer past a shared budget
    /// ([`crate::frame::FrameBudget`]) to hold a partly received frame.
    #[error("the budget of {0} bytes for partly received frames is spent")]
    FrameBudgetSpent(usize),
    /// The peer sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A sealed record or stream does not authenticate under its data key
    /// and the encryption context given: altered, truncated, reordered, or
    /// a different context (checked in this process, docs/ENVELOPE.md §10).
    #[error("{0} (integrity)")]
    Integrity(String),
    /// A setting given to the client is out of range (cache limits, chunk size).
    #[error("invalid setting: {0}")]
    Config(String),
    /// The daemon answered with an error.
    #[error("{message} ({code})")]
    Daemon {
        /// The stable code.
        code: ErrorCode,
        /// The daemon's human-readable message.
        message: String,
    },
}

impl Error {
    /// [`Error::Closed`] for a socket error that means the daemon closed
    /// the connection (a broken pipe or a reset); any other error as it is.
    pub(crate) fn peer_gone(self) -> Error {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            Error::Io(e) if matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) => {
                Error::Closed
            }
            other => other,
        }
    }

    /// The daemon's error code, when the daemon answered with an error;
    /// [`ErrorCode::Integrity`] also for a local authentication failure.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Daemon { code, .. } => Some(*code),
            Error::Integrity(_) => Some(ErrorCode::Integrity),
            _ => None,
        }
    }
}
