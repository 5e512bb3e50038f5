//! The encryption context: caller-chosen key/value pairs that are bound to an
//! envelope as additional authenticated data but never stored in it. The same
//! pairs must be given again to decrypt (as with an AWS KMS encryption
//! context). Canonical encoding: docs/ENVELOPE.md §4.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Most pairs in one context.
pub const MAX_PAIRS: usize = 32;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// An encryption context. Keys are unique and kept in byte order, which is
/// the order of the canonical encoding.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EncryptionContext(BTreeMap<String, String>);

/// A JSON object of strings; a key given twice is refused rather than the
/// last one silently winning, so that a context means one thing only.
impl<'de> Deserialize<'de> for EncryptionContext {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = EncryptionContext;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if pairs.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "context key `{}` given twice",
                            shown(&key)
                        )));
                    }
                    pairs.insert(key, value);
                }
                Ok(EncryptionContext(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pair, refusing a duplicate key, a pair beyond the limits of
    /// docs/ENVELOPE.md §4, or one pair too many. A refused pair is not
    /// added: the context is as it was before the call.
    ///
    /// ```
    /// use keyhaven::EncryptionContext;
    ///
    /// let mut ctx = EncryptionContext::new();
    /// ctx.insert("table", "users")?;
    /// assert!(ctx.insert("table", "orders").is_err()); // given twice
    /// assert!(ctx.insert("", "x").is_err()); // empty key
    /// assert_eq!(ctx.keys().collect::<Vec<_>>(), ["table"]);
    /// # Ok::<(), keyhaven::Error>(())
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), Error> {
        if self.0.contains_key(key) {
            return Err(Error::InvalidContext(format!("key `{}` given twice", shown(key))));
        }
        check_pair(key, value)?;
        if self.0.len() >= MAX_PAIRS {
            return Err(Error::InvalidContext(format!(
                "{} pairs, at most {MAX_PAIRS} are allowed",
                self.0.len() + 1
            )));
        }
        self.0.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    /// Parses `key=value` arguments, as the CLI takes them.
    pub fn from_pairs<I, S>(pairs: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ctx = Self::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| Error::InvalidContext(format!("`{pair}` is not of the form key=value")))?;
            ctx.insert(k, v)?;
        }
        Ok(ctx)
    }

    /// Checks the limits of docs/ENVELOPE.md §4.
    pub fn validate(&self) -> Result<(), Error> {
        if self.0.len() > MAX_PAIRS {
            return Err(Error::InvalidContext(format!(
                "{} pairs, at most {MAX_PAIRS} are allowed",
                self.0.len()
            )));
        }
        for (k, v) in &self.0 {
            check_pair(k, v)?;
        }
        Ok(())
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, in canonical order (values are deliberately not exposed
    /// through this iterator, so that logging the keys is easy and safe).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The canonical encoding (docs/ENVELOPE.md §4): a u16 count, then for
    /// each pair in byte order of the key, a u16 key length, the key, a u16
    /// value length, the value; all lengths big-endian. Call
    /// [`validate`](Self::validate) first: the limits keep every length in a u16.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u16).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

/// The limits of one pair (docs/ENVELOPE.md §4).
fn check_pair(k: &str, v: &str) -> Result<(), Error> {
    if k.is_empty() || k.len() > MAX_KEY_LEN {
        return Err(Error::InvalidContext(format!(
            "key of {} bytes, keys are 1 to {MAX_KEY_LEN} bytes",
            k.len()
        )));
    }
    if v.len() > MAX_VALUE_LEN {
        return Err(Error::InvalidContext(format!(
            "value of key `{}` is {} bytes, at most {MAX_VALUE_LEN} are allowed",
            shown(k),
            v.len()
        )));
    }
    Ok(())
}

/// A context key as an error message quotes it: shortened and escaped, so
/// that hostile input cannot flood a log line or drive a terminal.
fn shown(key: &str) -> String {
    let mut s: String = key.chars().take(64).flat_map(char::escape_default).collect();
    if key.chars().count() > 64 {
        s.push('…');
    }
    s
}

/// Shows the keys only: values may be identifying data (a user id, an email).
impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_canonical_and_exact() {
        let a = EncryptionContext::from_pairs(["b=2", "a=1"]).unwrap();
        let b = EncryptionContext::from_pairs(["a=1", "b=2"]).unwrap();
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        a.encode(&mut ea);
        b.encode(&mut eb);
        assert_eq!(ea, eb);
        assert_eq!(ea, b"\x00\x02\x00\x01a\x00\x011\x00\x01b\x00\x012");
        let mut empty = Vec::new();
        EncryptionContext::new().encode(&mut empty);
        assert_eq!(empty, b"\x00\x00");
    }

    #[test]
    fn refuses_bad_pairs() {
        assert!(EncryptionContext::from_pairs(["novalue"]).is_err());
        assert!(EncryptionContext::from_pairs(["=v"]).is_err());
        assert!(EncryptionContext::from_pairs(["a=1", "a=2"]).is_err());
        let long = format!("k={}", "v".repeat(MAX_VALUE_LEN + 1));
        assert!(EncryptionContext::from_pairs([long]).is_err());
        let many: Vec<String> = (0..=MAX_PAIRS).map(|i| format!("k{i}=v")).collect();
        assert!(EncryptionContext::from_pairs(many).is_err());
    }

    /// A refused pair leaves the context as it was: it is not encoded,
    /// sent, or counted against the limit afterwards.
    #[test]
    fn a_refused_insert_keeps_nothing() {
        let mut c = EncryptionContext::from_pairs(["a=1"]).unwrap();
        let before = c.clone();
        assert!(c.insert("", "v").is_err());
        assert!(c.insert(&"k".repeat(MAX_KEY_LEN + 1), "v").is_err());
        assert!(c.insert("big", &"v".repeat(MAX_VALUE_LEN + 1)).is_err());
        assert!(c.insert("a", "2").is_err());
        assert_eq!(c, before);
        c.validate().unwrap();
        for i in 1..MAX_PAIRS {
            c.insert(&format!("k{i}"), "v").unwrap();
        }
        let full = c.clone();
        let e = c.insert("one-too-many", "v").unwrap_err().to_string();
        assert!(e.contains("33 pairs, at most 32"), "{e}");
        assert_eq!(c, full);
        c.validate().unwrap();
    }

    #[test]
    fn a_key_given_twice_in_json_is_refused() {
        let e = serde_json::from_str::<EncryptionContext>(r#"{"a":"1","a":"secret"}"#).unwrap_err();
        assert!(e.to_string().contains("`a` given twice") && !e.to_string().contains("secret"), "{e}");
        let ok: EncryptionContext = serde_json::from_str(r#"{"b":"2","a":"1"}"#).unwrap();
        assert_eq!(ok.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn messages_quote_keys_shortened_and_escaped() {
        let long = "k".repeat(MAX_KEY_LEN);
        let mut c = EncryptionContext::new();
        c.0.insert(long.clone(), "v".repeat(MAX_VALUE_LEN + 1));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("`{}…`", &long[..64])) && !e.contains(&long), "{e}");
        let mut c = EncryptionContext::new();
        c.0.insert("a\nb\u{1b}[31m".into(), "v".repeat(MAX_VALUE_LEN + 1));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(r"`a\nb\u{1b}[31m`") && !e.chars().any(char::is_control), "{e}");
        let e = EncryptionContext::from_pairs(["a\n=1", "a\n=2"]).unwrap_err().to_string();
        assert!(e.contains(r"`a\n`") && !e.chars().any(char::is_control), "{e}");
    }

    #[test]
    fn debug_hides_values() {
        let c = EncryptionContext::from_pairs(["user=alice@example.com"]).unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("user") && !s.contains("alice"), "{s}");
    }
}
