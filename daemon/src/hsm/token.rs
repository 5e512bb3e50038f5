//! Finding the token and the master key: module loading, the slot by token
//! label (SoftHSM renumbers slots when a token is initialised), login, and
//! the master key's creation and checks.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use super::HsmError;
use crate::secret::Pin;

/// Loads and initialises a PKCS#11 module. OS locking is asked for: without
/// it SoftHSM turns its own locking off.
pub fn load_module(module: &str) -> Result<Pkcs11, HsmError> {
    let fail = |reason: String| HsmError::Module { module: module.to_owned(), reason };
    let pkcs11 = Pkcs11::new(module).map_err(|e| fail(format!("cannot be loaded: {e}")))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(pkcs11),
        Err(e) => Err(fail(format!("C_Initialize failed: {e}"))),
    }
}

/// The slot whose token carries `label`.
pub fn find_token(pkcs11: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    let slots = pkcs11.get_slots_with_initialized_token().map_err(|e| {
        tracing::debug!("C_GetSlotList: {e}");
        HsmError::TokenNotFound(label.to_owned())
    })?;
    for slot in slots {
        // A token that cannot be read (gone, device error) is not the one.
        match pkcs11.get_token_info(slot) {
            Ok(info) if info.label().trim_end() == label => return Ok(slot),
            Ok(_) => {}
            Err(e) => tracing::debug!("C_GetTokenInfo on slot {slot}: {e}"),
        }
    }
    Err(HsmError::TokenNotFound(label.to_owned()))
}

/// Opens a read-write session and logs the user in. The login belongs to the
/// application, so a second session finds it done already: that is success.
pub fn open_session(pkcs11: &Pkcs11, slot: Slot, label: &str, pin: &Pin) -> Result<Session, HsmError> {
    let session = pkcs11.open_rw_session(slot)?;
    match session.login(UserType::User, Some(pin.auth_pin())) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(rv, _)) => {
            use super::error::LoginFailure;
            let (kind, reason) = match rv {
                RvError::PinIncorrect => (
                    LoginFailure::Incorrect,
                    "the PIN is incorrect (each failure counts against the token's retry limit)".to_owned(),
                ),
                RvError::PinLocked => {
                    (LoginFailure::Locked, "the PIN is locked; unlock it with the SO PIN".to_owned())
                }
                RvError::UserPinNotInitialized => {
                    (LoginFailure::Other, "the user PIN is not initialised".to_owned())
                }
                other => (LoginFailure::Other, other.to_string()),
            };
            Err(HsmError::Login { label: label.to_owned(), kind, reason })
        }
        Err(e) => Err(e.into()),
    }
}

/// The label of master key version `version`: `{base}-v{version}`.
pub fn master_key_label(base: &str, version: u32) -> String {
    format!("{base}-v{version}")
}

/// The one secret-key token object labelled `label`, if any; more than
/// one is an error (`fail`).
fn find_secret_key(
    session: &Session,
    label: &str,
    fail: impl Fn(&str) -> HsmError,
) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(fail("more than one object carries this label")),
    }
}

/// Finds a master key version and checks that it is an AES key the token
/// made and will never reveal: sensitive and never extractable since it was
/// generated (`CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE`), generated in
/// the token (`CKA_LOCAL`, where the token reports it), and able to unwrap.
/// A key a PIN holder imported with a value of their choosing
/// (C_CreateObject) fails the first two. Returns the handle and the key's
/// `CKA_ID`, which the store pins (`ops::master`).
pub fn find_master_key(session: &Session, label: &str) -> Result<(ObjectHandle, Vec<u8>), HsmError> {
    let fail = |reason: &str| HsmError::MasterKey { label: label.to_owned(), reason: reason.to_owned() };
    let handle = find_secret_key(session, label, fail)?
        .ok_or_else(|| HsmError::KeyMissing { label: label.to_owned() })?;
    let attrs = session.get_attributes(
        handle,
        &[
            AttributeType::KeyType,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Unwrap,
            AttributeType::Wrap,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Local,
            AttributeType::Id,
        ],
    )?;
    let mut id = Vec::new();
    let (mut always_sensitive, mut never_extractable) = (false, false);
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) if t != KeyType::AES => return Err(fail("is not an AES key")),
            Attribute::Sensitive(false) => return Err(fail("is not sensitive (CKA_SENSITIVE is false)")),
            Attribute::Extractable(true) => return Err(fail("is extractable (CKA_EXTRACTABLE is true)")),
            Attribute::Unwrap(false) => return Err(fail("may not unwrap (CKA_UNWRAP is false)")),
            Attribute::Wrap(false) => return Err(fail("may not wrap (CKA_WRAP is false)")),
            Attribute::AlwaysSensitive(v) => always_sensitive = v,
            Attribute::NeverExtractable(v) => never_extractable = v,
            Attribute::Local(false) => {
                return Err(fail(
                    "was not generated inside the token (CKA_LOCAL is false): its value may be known outside it; refusing to use it",
                ))
            }
            Attribute::Id(v) => id = v,
            _ => {}
        }
    }
    if !always_sensitive || !never_extractable {
        return Err(fail(
            "was not generated as a secret inside the token (CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE is false): \
             it may have been imported with a value someone knows; refusing to use it",
        ));
    }
    Ok((handle, id))
}

/// Generates a master key version inside the token: AES-256, a token
/// object, private, sensitive, never extractable, not copyable, for wrapping
/// only, with `id` as its `CKA_ID` and the unwrap template that confines
/// every KEK it unwraps ([`super::confine`]). Refuses when an object with
/// that label exists already.
pub fn create_master_key(session: &Session, label: &str, id: &[u8]) -> Result<ObjectHandle, HsmError> {
    let existing = session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
    if !existing.is_empty() {
        return Err(HsmError::MasterKey {
            label: label.to_owned(),
            reason: "exists already in the token; refusing to create a second one".to_owned(),
        });
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        super::confine::master_unwrap_template(),
    ];
    Ok(session.generate_key(&Mechanism::AesKeyGen, &template)?)
}

/// Finds the audit key (docs/AUDIT.md §3) and checks that the token will
/// never reveal it; `None` when no object carries the label.
pub fn find_audit_key(session: &Session, label: &str) -> Result<Option<ObjectHandle>, HsmError> {
    let fail = |reason: &str| HsmError::AuditKey { label: label.to_owned(), reason: reason.to_owned() };
    let Some(handle) = find_secret_key(session, label, fail)? else { return Ok(None) };
    let attrs = session.get_attributes(
        handle,
        &[AttributeType::KeyType, AttributeType::Sensitive, AttributeType::Extractable, AttributeType::Sign],
    )?;
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) if t != KeyType::GENERIC_SECRET => {
                return Err(fail("is not a generic secret (HMAC) key"))
            }
            Attribute::Sensitive(false) => return Err(fail("is not sensitive (CKA_SENSITIVE is false)")),
            Attribute::Extractable(true) => return Err(fail("is extractable (CKA_EXTRACTABLE is true)")),
            Attribute::Sign(false) => return Err(fail("may not sign (CKA_SIGN is false)")),
            _ => {}
        }
    }
    Ok(Some(handle))
}

/// Finds the audit key, generating it first when the token has none: a
/// 256-bit generic secret, a token object, private, sensitive, never
/// extractable, for CKM_SHA256_HMAC sign and verify only.
pub fn ensure_audit_key(session: &Session, label: &str) -> Result<ObjectHandle, HsmError> {
    if let Some(h) = find_audit_key(session, label)? {
        return Ok(h);
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(32.into()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    session.generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
    tracing::info!(label, "created the audit key in the token");
    find_audit_key(session, label)?.ok_or_else(|| HsmError::KeyMissing { label: label.to_owned() })
}

/// Initialises a fresh token in the first free slot (dev mode only): SO PIN,
/// label, then the user PIN.
pub fn init_token(pkcs11: &Pkcs11, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<(), HsmError> {
    let mut free = None;
    for slot in pkcs11.get_slots_with_token()? {
        if !pkcs11.get_token_info(slot)?.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or_else(|| HsmError::Library("no free slot to initialise a token in".into()))?;
    pkcs11.init_token(slot, so_pin.auth_pin(), label)?;
    let slot = find_token(pkcs11, label)?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin.auth_pin()))?;
    session.init_pin(user_pin.auth_pin())?;
    session.logout()?;
    Ok(())
}
