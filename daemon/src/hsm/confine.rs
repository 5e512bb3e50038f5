//! How the token confines the keys a master key unwraps (docs/SECURITY.md,
//! "PIN holder").
//!
//! Every master key is generated with a `CKA_UNWRAP_TEMPLATE`: a key it
//! unwraps must be a sensitive, non-extractable AES session object that can
//! neither wrap, unwrap nor derive. A token that enforces the template (SoftHSM2
//! 2.6 does: any other template is `CKR_TEMPLATE_INCONSISTENT`) refuses a PIN
//! holder who unwraps a stored KEK with a template of their own choosing, so
//! no KEK ever exists outside the token in plaintext, whoever holds the PIN.
//!
//! The price: a KEK cannot be rewrapped under another master key (that needs
//! it extractable), so a master-key rotation gives every key a new version
//! under the new master key instead (`ops::master`). PKCS#11's other route,
//! `CKA_WRAP_WITH_TRUSTED` with a `CKA_TRUSTED` master key, needs the SO to
//! mark the master key trusted; SoftHSM2 lets the SO touch only public
//! objects, whose values it stores unencrypted, so that route is not used.
//!
//! cryptoki 0.12 has no array-valued attributes, so the template's value (an
//! array of `CK_ATTRIBUTE`) is laid out here by hand and passed as raw bytes.
//! The pointers in it refer to `static`s, which live for the whole process.

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki_sys::{
    CKA_CLASS, CKA_EXTRACTABLE, CKA_KEY_TYPE, CKA_SENSITIVE, CKA_TOKEN, CKA_UNWRAP, CKA_UNWRAP_TEMPLATE,
    CKA_WRAP, CKK_AES, CKO_SECRET_KEY, CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_BBOOL, CK_FALSE, CK_TRUE,
    CK_ULONG,
};

static CLASS_SECRET_KEY: CK_ULONG = CKO_SECRET_KEY;
static KEY_TYPE_AES: CK_ULONG = CKK_AES;
static TRUE: CK_BBOOL = CK_TRUE;
static FALSE: CK_BBOOL = CK_FALSE;

/// The attributes every key unwrapped under a master key must carry: the
/// master key's `CKA_UNWRAP_TEMPLATE`, and exactly what
/// [`kek_unwrap_template`] asks for.
fn confined() -> [(CK_ATTRIBUTE_TYPE, usize, usize); 7] {
    let ulong = std::mem::size_of::<CK_ULONG>();
    let bool_ = std::mem::size_of::<CK_BBOOL>();
    let p = |r: &'static CK_ULONG| r as *const CK_ULONG as usize;
    let b = |r: &'static CK_BBOOL| r as *const CK_BBOOL as usize;
    [
        (CKA_CLASS, p(&CLASS_SECRET_KEY), ulong),
        (CKA_KEY_TYPE, p(&KEY_TYPE_AES), ulong),
        (CKA_TOKEN, b(&FALSE), bool_),
        (CKA_SENSITIVE, b(&TRUE), bool_),
        (CKA_EXTRACTABLE, b(&FALSE), bool_),
        (CKA_WRAP, b(&FALSE), bool_),
        (CKA_UNWRAP, b(&FALSE), bool_),
    ]
}

/// The template a KEK is unwrapped with: [`confined`] plus what the key is
/// for (encrypt and decrypt with AES-GCM; never derive).
pub fn kek_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Private(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Derive(false),
    ]
}

/// `CKA_UNWRAP_TEMPLATE` = [`confined`], as an attribute for C_GenerateKey.
pub fn master_unwrap_template() -> Attribute {
    const _: () = assert!(
        std::mem::size_of::<CK_ATTRIBUTE>()
            == 2 * std::mem::size_of::<CK_ULONG>() + std::mem::size_of::<usize>(),
        "CK_ATTRIBUTE is type, pointer, length, without padding"
    );
    let mut bytes = Vec::with_capacity(7 * std::mem::size_of::<CK_ATTRIBUTE>());
    for (kind, pointer, len) in confined() {
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&pointer.to_ne_bytes());
        bytes.extend_from_slice(&(len as CK_ULONG).to_ne_bytes());
    }
    Attribute::VendorDefined((AttributeType::VendorDefined(CKA_UNWRAP_TEMPLATE), bytes))
}

/// A template that asks for what the master key's unwrap template forbids
/// (an extractable, non-sensitive copy): the probe that tells whether the
/// token enforces the template.
pub fn forbidden_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}
