//! How the token confines the keys a master key unwraps (docs/SECURITY.md,
//! "PIN holder").
//!
//! Every master key is generated with a `CKA_UNWRAP_TEMPLATE`: a key it
//! unwraps must be a sensitive, non-extractable session object that cannot
//! derive. The template names no class or key type, so that the key types
//! still to come (HMAC, EC and RSA private keys, stored wrapped the same
//! way) fit under the same master key; derivation is refused because some
//! tokens' derivation mechanisms (`CKM_CONCATENATE_BASE_AND_DATA`,
//! `CKM_XOR_BASE_AND_DATA`) would copy a key's bits into an extractable one. A token that enforces the template (SoftHSM2
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
    CKA_DERIVE, CKA_EXTRACTABLE, CKA_SENSITIVE, CKA_TOKEN, CKA_UNWRAP_TEMPLATE, CK_ATTRIBUTE,
    CK_ATTRIBUTE_TYPE, CK_BBOOL, CK_FALSE, CK_TRUE, CK_ULONG,
};

static TRUE: CK_BBOOL = CK_TRUE;
static FALSE: CK_BBOOL = CK_FALSE;

/// The attributes every key unwrapped under a master key must carry: the
/// master key's `CKA_UNWRAP_TEMPLATE`, which [`kek_unwrap_template`]
/// includes.
fn confined() -> [(CK_ATTRIBUTE_TYPE, usize, usize); 4] {
    let bool_ = std::mem::size_of::<CK_BBOOL>();
    let b = |r: &'static CK_BBOOL| r as *const CK_BBOOL as usize;
    [
        (CKA_TOKEN, b(&FALSE), bool_),
        (CKA_SENSITIVE, b(&TRUE), bool_),
        (CKA_EXTRACTABLE, b(&FALSE), bool_),
        (CKA_DERIVE, b(&FALSE), bool_),
    ]
}

/// The template a KEK is unwrapped with: [`confined`] plus what the key is
/// for (an AES key for encrypt and decrypt with AES-GCM; it never wraps or
/// unwraps).
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

/// The template an HMAC key version is unwrapped with: [`confined`] plus
/// what the key is for (a generic secret that signs and verifies with
/// CKM_SHA256_HMAC; it encrypts, wraps and unwraps nothing).
pub fn hmac_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Private(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Derive(false),
    ]
}

/// The template a signing key version's EC private key is unwrapped with:
/// [`confined`] plus what the key is for (it signs, and nothing else).
pub fn ec_private_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Private(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// The template an `rsa-3072-pss` version's RSA private key is unwrapped
/// with: [`confined`] plus what the key is for (it signs, and nothing else).
pub fn rsa_sign_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Private(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// The template an `rsa-4096-oaep` version's RSA private key is unwrapped
/// with: [`confined`] plus what the key is for (it decrypts data keys with
/// RSA-OAEP, and nothing else).
pub fn rsa_decrypt_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Private(true),
        Attribute::Sign(false),
        Attribute::Decrypt(true),
        Attribute::Unwrap(false),
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
    let mut bytes = Vec::with_capacity(confined().len() * std::mem::size_of::<CK_ATTRIBUTE>());
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
