//! The daemon's request error: every failure a client can see, each with a
//! stable wire code (docs/PROTOCOL.md §4) and a message that names the thing
//! concerned. Messages never hold key material, plaintext, PINs or context
//! values.

use keyhaven::ErrorCode;

use crate::hsm::HsmError;
use crate::store::StoreError;

/// A failed request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown `op`.
    #[error("unknown operation `{0}`")]
    UnknownOperation(String),
    /// Protocol version mismatch.
    #[error("protocol version {0} is not supported; this daemon speaks version {v}", v = keyhaven::wire::PROTOCOL_VERSION)]
    UnsupportedProtocol(u32),
    /// `encrypt` input over the limit.
    #[error("plaintext of {0} bytes is over the `encrypt` limit of 65536 bytes; seal it in the client (`keyhaven seal`, the clients' Sealer), or use `datakey` and encrypt locally")]
    PayloadTooLarge(usize),
    /// Another input over its operation's size limit (the message says
    /// which).
    #[error("{0}")]
    InputTooLarge(String),
    /// Envelope or ciphertext that does not parse.
    #[error("{0}")]
    BadEnvelope(String),
    /// Envelope or ciphertext that does not authenticate.
    #[error("{0}")]
    Integrity(String),
    /// Unknown tenant, key or version.
    #[error("{0}")]
    NotFound(String),
    /// Exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A key version has used its wrap budget (docs/ENVELOPE.md §7).
    #[error("{0}")]
    KeyExhausted(String),
    /// The key's state forbids this use.
    #[error("{0}")]
    KeyDisabled(String),
    /// The version is below the key's minimum decryption version.
    #[error("{0}")]
    VersionRetired(String),
    /// A revocation covers the key or data key.
    #[error("{0}")]
    Revoked(String),
    /// The key is of another type than the operation needs.
    #[error("{0}")]
    WrongKeyType(String),
    /// The policy does not grant this (docs/POLICY.md).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A reloaded configuration was refused; the old one stays in force.
    #[error("{0}")]
    InvalidConfig(String),
    /// The audit record of the request could not be made durable, so its
    /// result is withheld (fail closed).
    #[error("audit log: {0}")]
    Audit(String),
    /// The token failed.
    #[error("HSM: {0}")]
    Hsm(HsmError),
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
    /// The daemon is at a limit of its own (connections, buffered bytes);
    /// try again later.
    #[error("{0}")]
    Busy(String),
    /// A fault in the daemon.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Busy(_) => ErrorCode::Busy,
            Error::UnknownOperation(_) => ErrorCode::UnknownOperation,
            Error::UnsupportedProtocol(_) => ErrorCode::UnsupportedProtocol,
            Error::PayloadTooLarge(_) | Error::InputTooLarge(_) => ErrorCode::PayloadTooLarge,
            Error::BadEnvelope(_) => ErrorCode::BadEnvelope,
            Error::Integrity(_) => ErrorCode::Integrity,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::KeyExhausted(_) => ErrorCode::KeyExhausted,
            Error::Revoked(_) => ErrorCode::Revoked,
            Error::KeyDisabled(_) => ErrorCode::KeyDisabled,
            Error::VersionRetired(_) => ErrorCode::VersionRetired,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::WrongKeyType(_) => ErrorCode::WrongKeyType,
            Error::InvalidConfig(_) => ErrorCode::InvalidConfig,
            Error::Audit(_) => ErrorCode::StoreUnavailable,
            Error::Hsm(HsmError::Busy(_)) => ErrorCode::Busy,
            Error::Hsm(HsmError::Integrity(_)) => ErrorCode::Integrity,
            Error::Hsm(HsmError::Login { .. }) => ErrorCode::HsmLoginFailed,
            Error::Hsm(
                HsmError::KeyMissing { .. } | HsmError::MasterKey { .. } | HsmError::MasterKeyMismatch { .. },
            ) => ErrorCode::MasterKeyUnavailable,
            Error::Hsm(_) => ErrorCode::HsmUnavailable,
            Error::Store(_) => ErrorCode::StoreUnavailable,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<HsmError> for Error {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::Integrity(what) => Error::Integrity(what.to_owned()),
            other => Error::Hsm(other),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => Error::AlreadyExists(format!("{what} exists already")),
            other => Error::Store(other),
        }
    }
}

impl From<keyhaven::Error> for Error {
    /// Client-crate errors met while parsing a request's contents.
    fn from(e: keyhaven::Error) -> Self {
        match e {
            keyhaven::Error::Envelope(_) => Error::BadEnvelope(e.to_string()),
            other => Error::BadRequest(other.to_string()),
        }
    }
}
