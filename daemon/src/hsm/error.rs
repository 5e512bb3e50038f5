//! The one place where PKCS#11 return codes become Keyhaven errors.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// What can go wrong with the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("PKCS#11 module {module}: {reason}")]
    Module {
        /// Module path.
        module: String,
        /// Why.
        reason: String,
    },
    /// No token with this label is present.
    #[error("no token labelled `{0}` is present")]
    TokenNotFound(String),
    /// Login failed.
    #[error("login to token `{label}` failed: {reason}")]
    Login {
        /// Token label.
        label: String,
        /// Which failure.
        kind: LoginFailure,
        /// Why (wrong PIN, locked PIN…) and what to do.
        reason: String,
    },
    /// The master key (or the audit key) is not in the token.
    #[error(
        "key `{label}` is not in the token (deleted, or another token): restore it from the HSM's backup"
    )]
    KeyMissing {
        /// The key's label.
        label: String,
    },
    /// The master key object is unusable.
    #[error("master key `{label}`: {reason}")]
    MasterKey {
        /// The key's label.
        label: String,
        /// What is wrong.
        reason: String,
    },
    /// A master key version is not the key the store recorded when it was
    /// made (another `CKA_ID`, or its canary does not unwrap: replaced or
    /// planted), or a key carries its label that the store never recorded
    /// making. Never adopted silently (docs/SECURITY.md).
    #[error("master key `{label}` is not the one the store recorded: {reason}")]
    MasterKeyMismatch {
        /// The key's label.
        label: String,
        /// What differs, and what to do.
        reason: String,
    },
    /// The audit (HMAC) key is unusable (docs/AUDIT.md §3).
    #[error("audit key `{label}`: {reason}")]
    AuditKey {
        /// The key's label.
        label: String,
        /// What is wrong.
        reason: String,
    },
    /// Ciphertext or wrapped material did not authenticate.
    #[error("{0}")]
    Integrity(&'static str),
    /// The token could not store what it was asked to, and SoftHSM2's
    /// token directory has no room left: the cause named, then the
    /// module's own failure (CKR_GENERAL_ERROR says nothing of it).
    #[error("{problem}: {source}")]
    TokenFull {
        /// The full directory, what is free, what to do.
        problem: String,
        /// The module's own failure.
        source: Box<HsmError>,
    },
    /// The worker queue is full.
    #[error("the HSM queue is full ({0} requests waiting); retry shortly")]
    Busy(usize),
    /// Every worker has stopped.
    #[error("the HSM workers have stopped")]
    Stopped,
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {function:?} failed: {rv}")]
    Pkcs11 {
        /// The function that failed.
        function: Function,
        /// Its return value.
        rv: RvError,
    },
    /// A failure of the cryptoki layer itself.
    #[error("PKCS#11 library error: {0}")]
    Library(String),
}

/// Why a login failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// CKR_PIN_INCORRECT.
    Incorrect,
    /// CKR_PIN_LOCKED.
    Locked,
    /// Anything else (user PIN not initialised, PIN expired…).
    Other,
}

impl HsmError {
    /// True when the session, the login or a cached handle is gone and the
    /// worker must reconnect (and may retry the request once).
    pub fn session_lost(&self) -> bool {
        matches!(self, HsmError::TokenNotFound(_))
            || matches!(
                self,
                HsmError::Pkcs11 {
                    rv: RvError::SessionHandleInvalid
                        | RvError::SessionClosed
                        | RvError::UserNotLoggedIn
                        | RvError::DeviceRemoved
                        | RvError::TokenNotPresent
                        | RvError::TokenNotRecognized
                        | RvError::DeviceError
                        | RvError::ObjectHandleInvalid
                        | RvError::KeyHandleInvalid
                        | RvError::WrappingKeyHandleInvalid
                        | RvError::UnwrappingKeyHandleInvalid
                        | RvError::CryptokiNotInitialized,
                    ..
                }
            )
    }

    /// The failure mode, as `health` names it (docs/OPERATIONS.md §6).
    /// The token has no room for another object (`CKR_DEVICE_MEMORY`).
    pub fn out_of_room(&self) -> bool {
        matches!(self, HsmError::Pkcs11 { rv: RvError::DeviceMemory, .. })
    }

    pub fn condition(&self) -> &'static str {
        match self {
            HsmError::Module { .. } => "module_unavailable",
            HsmError::TokenNotFound(_) => "token_absent",
            HsmError::Login { kind: LoginFailure::Incorrect, .. } => "pin_incorrect",
            HsmError::Login { kind: LoginFailure::Locked, .. } => "pin_locked",
            HsmError::Login { .. } => "login_failed",
            HsmError::KeyMissing { .. } => "master_key_missing",
            HsmError::MasterKey { .. } => "master_key_unusable",
            HsmError::MasterKeyMismatch { .. } => "master_key_mismatch",
            HsmError::Integrity(_) => "integrity",
            HsmError::Busy(_) => "busy",
            HsmError::Stopped => "stopped",
            HsmError::Pkcs11 {
                rv: RvError::DeviceRemoved | RvError::TokenNotPresent | RvError::TokenNotRecognized,
                ..
            } => "token_absent",
            e if e.session_lost() => "session_lost",
            _ => "token_error",
        }
    }
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => HsmError::Pkcs11 { function, rv },
            other => HsmError::Library(other.to_string()),
        }
    }
}

/// Maps a failed authenticated decryption or unwrap to an integrity error;
/// other failures keep their PKCS#11 detail.
pub fn integrity_or(e: CkError, what: &'static str) -> HsmError {
    match e {
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::UnwrappingKeyTypeInconsistent
            | RvError::GeneralError,
            _,
        ) => HsmError::Integrity(what),
        other => other.into(),
    }
}
