//! Secret values the daemon holds: the token PIN and plaintext data keys.
//! Neither prints: both have a redacting Debug and no Display. A data key
//! lives in one heap place for its whole life and is wiped when dropped.

use std::fmt;
use std::path::Path;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

/// A plaintext data key: 32 bytes in one heap allocation, wiped when
/// dropped. Moving a `DataKey` (out of an HSM job, through a channel, out
/// of a future) moves a pointer, never the key: a key held by value in a
/// `Zeroizing` array left a copy behind at every move, which a scan of the
/// daemon's memory found (tests/tests/memory.rs).
pub struct DataKey(Box<[u8; keyhaven::envelope::DEK_LEN]>);

impl DataKey {
    /// A key copied from `bytes`, which must be 32 bytes long; the copy is
    /// made straight into the heap.
    pub fn from_slice(bytes: &[u8]) -> Option<DataKey> {
        let mut key = DataKey(Box::new([0u8; keyhaven::envelope::DEK_LEN]));
        if bytes.len() != key.0.len() {
            return None;
        }
        key.0.copy_from_slice(bytes);
        Some(key)
    }
}

impl std::ops::Deref for DataKey {
    type Target = [u8; keyhaven::envelope::DEK_LEN];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.0.zeroize();
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The token user PIN.
pub struct Pin(AuthPin);

impl Pin {
    /// Wraps a PIN. The string is moved into a secret box without a copy.
    pub fn new(pin: &str) -> Pin {
        // Exact capacity, so that turning it into a boxed str does not
        // reallocate and leave a copy behind.
        let mut s = String::with_capacity(pin.len());
        s.push_str(pin);
        Pin(AuthPin::from(s))
    }

    /// Reads a PIN from a file: its first line, without the line end.
    pub fn from_file(path: &Path) -> std::io::Result<Pin> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Ok(Pin::new(text.lines().next().unwrap_or("").trim_end()))
    }

    /// Reads a PIN from an environment variable.
    pub fn from_env(var: &str) -> Option<Pin> {
        let value = Zeroizing::new(std::env::var(var).ok()?);
        Some(Pin::new(value.trim_end()))
    }

    /// The PIN for the PKCS#11 login call.
    pub fn auth_pin(&self) -> &AuthPin {
        &self.0
    }

    /// Exposes the PIN, for the checks that judge its strength and for
    /// writing a freshly generated dev PIN to its file.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_never_prints() {
        let pin = Pin::new("s3cr3t-pin-4242");
        let dbg = format!("{pin:?} {:#?}", pin);
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert_eq!(pin.expose(), "s3cr3t-pin-4242");
    }
}
