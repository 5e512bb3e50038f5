//! Typed views of the wire answers, and the text forms requests accept.
//!
//! The wire structs ([`crate::wire`]) keep `String` fields, because the
//! daemon shares them and their JSON must not change. A client wants
//! [`Ciphertext`], [`Envelope`], [`EnvelopeId`], [`KeyPath`] and [`MacTag`]
//! instead: the accessors here parse the daemon's text once, and name the
//! field when a daemon sends something that is not what PROTOCOL.md says.
//! Requests take either the text form or the typed value ([`AsText`]).

use std::borrow::Cow;

use crate::envelope::{Ciphertext, Envelope, EnvelopeId};
use crate::error::Error;
use crate::lifecycle::{KeyDetails, RewrapResponse};
use crate::mac::{MacResponse, MacTag};
use crate::names::KeyPath;
use crate::wire::{DatakeyResponse, DecryptResponse, EncryptResponse, KeyInfo};

/// A value a request sends in its text form: the text itself (`&str`,
/// `String`) or the typed value ([`Ciphertext`], [`Envelope`], [`MacTag`]),
/// so that `client.decrypt(&ciphertext, &ctx)` and
/// `client.decrypt("khc1:…", &ctx)` both work.
pub trait AsText {
    /// The text form sent on the wire.
    fn as_text(&self) -> Cow<'_, str>;
}

impl AsText for str {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsText for String {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl<T: AsText + ?Sized> AsText for &T {
    fn as_text(&self) -> Cow<'_, str> {
        (**self).as_text()
    }
}

impl<T: AsText + ?Sized> AsText for std::sync::Arc<T> {
    fn as_text(&self) -> Cow<'_, str> {
        (**self).as_text()
    }
}

impl<T: AsText + ?Sized> AsText for Box<T> {
    fn as_text(&self) -> Cow<'_, str> {
        (**self).as_text()
    }
}

impl AsText for Cow<'_, str> {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsText for Ciphertext {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Owned(self.to_string())
    }
}

impl AsText for Envelope {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Owned(self.to_string())
    }
}

impl AsText for MacTag {
    fn as_text(&self) -> Cow<'_, str> {
        Cow::Owned(self.to_string())
    }
}

/// A field of an answer that does not parse: the daemon broke the protocol.
fn bad(op: &str, field: &str, e: Error) -> Error {
    Error::Protocol(format!("`{op}` answered a bad `{field}`: {e}"))
}

fn path(op: &str, tenant: &str, key: &str) -> Result<KeyPath, Error> {
    KeyPath::new(tenant, key).map_err(|e| bad(op, "tenant/key", e))
}

fn id(op: &str, text: &str) -> Result<EnvelopeId, Error> {
    text.parse().map_err(|e| bad(op, "envelope_id", e))
}

impl EncryptResponse {
    /// The ciphertext, parsed (its envelope names the key and version).
    pub fn to_ciphertext(&self) -> Result<Ciphertext, Error> {
        self.ciphertext.parse().map_err(|e| bad("encrypt", "ciphertext", e))
    }

    /// The id of the data key (what `revoke datakey` takes).
    pub fn id(&self) -> Result<EnvelopeId, Error> {
        id("encrypt", &self.envelope_id)
    }
}

impl DecryptResponse {
    /// The key that opened it.
    pub fn path(&self) -> Result<KeyPath, Error> {
        path("decrypt", &self.tenant, &self.key)
    }

    /// The id of the data key.
    pub fn id(&self) -> Result<EnvelopeId, Error> {
        id("decrypt", &self.envelope_id)
    }
}

impl DatakeyResponse {
    /// The envelope, parsed.
    pub fn to_envelope(&self) -> Result<Envelope, Error> {
        self.envelope.parse().map_err(|e| bad("datakey", "envelope", e))
    }

    /// The id of the data key.
    pub fn id(&self) -> Result<EnvelopeId, Error> {
        id("datakey", &self.envelope_id)
    }
}

impl KeyInfo {
    /// The key's `tenant/key`.
    pub fn path(&self) -> Result<KeyPath, Error> {
        path("key_list", &self.tenant, &self.key)
    }
}

impl KeyDetails {
    /// The key's `tenant/key`.
    pub fn path(&self) -> Result<KeyPath, Error> {
        path("key_show", &self.tenant, &self.key)
    }
}

impl RewrapResponse {
    /// The id of the data key (unchanged by a rewrap).
    pub fn id(&self) -> Result<EnvelopeId, Error> {
        id("rewrap", &self.envelope_id)
    }
}

impl MacResponse {
    /// The tag, parsed.
    pub fn to_tag(&self) -> Result<MacTag, Error> {
        self.tag.parse().map_err(|e| bad("mac", "tag", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ID_LEN, NONCE_LEN, WRAPPED_DEK_LEN};

    fn envelope() -> Envelope {
        Envelope::new(
            "acme/pii".parse().unwrap(),
            2,
            EnvelopeId([7; ID_LEN]),
            [1; NONCE_LEN],
            [2; WRAPPED_DEK_LEN],
        )
    }

    #[test]
    fn answers_parse_into_the_crate_types() {
        let ct = Ciphertext::new(envelope(), [3; NONCE_LEN], vec![4; 20]);
        let enc =
            EncryptResponse { ciphertext: ct.to_string(), envelope_id: "07".repeat(16), key_version: 2 };
        assert_eq!(enc.to_ciphertext().unwrap(), ct);
        assert_eq!(enc.id().unwrap(), EnvelopeId([7; ID_LEN]));
        assert_eq!(ct.as_text(), enc.ciphertext.as_text());
        let dk = DatakeyResponse {
            envelope: envelope().to_string(),
            envelope_id: "07".repeat(16),
            key_version: 2,
            plaintext: None,
        };
        assert_eq!(dk.to_envelope().unwrap(), envelope());
        assert_eq!(dk.to_envelope().unwrap().path().to_string(), "acme/pii");
    }

    #[test]
    fn a_bad_answer_names_the_operation_and_field() {
        let enc =
            EncryptResponse { ciphertext: "khe1:AAAA".into(), envelope_id: "0F".repeat(16), key_version: 1 };
        let e = enc.to_ciphertext().unwrap_err().to_string();
        assert!(e.contains("`encrypt` answered a bad `ciphertext`"), "{e}");
        let e = enc.id().unwrap_err().to_string();
        assert!(e.contains("`envelope_id`") && e.contains("lowercase hex"), "{e}");
        let dk = DatakeyResponse {
            envelope: "khc1:AAAA".into(),
            envelope_id: String::new(),
            key_version: 1,
            plaintext: None,
        };
        assert!(matches!(dk.to_envelope(), Err(Error::Protocol(_))));
    }
}
