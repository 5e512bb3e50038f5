//! Anchors in the token (docs/SECURITY.md §3): small private token data
//! objects that say what the store's state and the audit log's last seal
//! are, so that a store or log altered or rolled back without the PIN is
//! found at start. Each is found by its `CKA_APPLICATION`; its text is kept
//! in its `CKA_LABEL`, because SoftHSM2 makes a data object's `CKA_VALUE`
//! read-only after creation, and a new object per write costs ~20 ms there
//! while a label update costs ~0.35 ms.

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::{HsmError, Worker};

/// Which anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorKind {
    /// The digest of the store's records (`crate::store::state`).
    Store,
    /// The audit log's last seal (`crate::audit`).
    Audit,
}

/// The node whose audit chain this process writes, when it is a node of a
/// cluster: each node's chain has its own anchor object in the shared token
/// (`keyhaven-audit-anchor:NODE`). Unset: the one log of a single daemon.
static AUDIT_CHAIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes the audit anchor this node's own (once, at start).
pub fn set_audit_chain(node: &str) {
    let _ = AUDIT_CHAIN.set(node.to_owned());
}

impl AnchorKind {
    /// The anchor object's `CKA_APPLICATION`.
    pub fn application(self) -> Vec<u8> {
        match (self, AUDIT_CHAIN.get()) {
            (AnchorKind::Store, _) => b"keyhaven-store-anchor".to_vec(),
            (AnchorKind::Audit, None) => b"keyhaven-audit-anchor".to_vec(),
            (AnchorKind::Audit, Some(node)) => format!("keyhaven-audit-anchor:{node}").into_bytes(),
        }
    }
}

impl Worker {
    /// The anchor's text, or `None` when the token holds none.
    pub fn read_anchor(&mut self, kind: AnchorKind) -> Result<Option<String>, HsmError> {
        self.retrying(|w| {
            let s = w.session()?;
            Ok(match find_anchor(s, kind)? {
                None => None,
                Some(h) => s.get_attributes(h, &[AttributeType::Label])?.into_iter().find_map(|a| match a {
                    Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                    _ => None,
                }),
            })
        })
    }

    /// Writes the anchor's text, creating the object the first time: a
    /// private token data object, so that nobody without the PIN can read
    /// or change it.
    pub fn write_anchor(&mut self, kind: AnchorKind, text: &str) -> Result<(), HsmError> {
        self.retrying(|w| {
            let s = w.session()?;
            let label = Attribute::Label(text.as_bytes().to_vec());
            match find_anchor(s, kind)? {
                Some(h) => s.update_attributes(h, &[label])?,
                None => {
                    s.create_object(&[
                        Attribute::Class(ObjectClass::DATA),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Modifiable(true),
                        Attribute::Application(kind.application()),
                        label,
                    ])?;
                }
            }
            Ok(())
        })
    }
}

/// The anchor's data object, if any; more than one is an error.
fn find_anchor(s: &Session, kind: AnchorKind) -> Result<Option<ObjectHandle>, HsmError> {
    let found = s.find_objects(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(kind.application()),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(HsmError::Library(format!(
            "{} token objects carry the anchor application `{}`; there must be one",
            found.len(),
            String::from_utf8_lossy(&kind.application())
        ))),
    }
}
