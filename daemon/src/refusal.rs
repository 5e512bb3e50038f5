//! A PIN the token refused at start is not presented again until the PIN
//! changes or an operator says so. Each refused login counts against the
//! token's retry limit, and a start can be repeated without anyone asking:
//! systemd restarts a failed unit, and its socket starts the service again
//! at the next client connection. So a refused login at start leaves a
//! note, `login-refused` in the store directory, and later starts that
//! would present the same PIN refuse before they log in (exit 78).
//!
//! The note keeps a 16-bit fingerprint of the refused PIN (salted SHA-256,
//! truncated): enough to see that the PIN changed (a new PIN is taken for
//! the same one once in 65536 times, and then the operator removes the
//! note), too little to help anyone guess a PIN from the note or a backup
//! of the store. Removing the note (as the message says) lets the same PIN
//! be tried once more, e.g. after the token's PIN was reset to it.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hsm::{HsmError, LoginFailure};
use crate::secret::Pin;

/// The note's file name, in the store directory.
pub const FILE: &str = "login-refused";

/// What the note holds.
#[derive(Debug, Serialize, Deserialize)]
struct Note {
    /// The token's label.
    token: String,
    /// `pin_incorrect` or `pin_locked`.
    condition: String,
    /// When, in Unix seconds.
    at: u64,
    /// Salt of the fingerprint, hex.
    salt: String,
    /// The refused PIN's fingerprint, hex (16 bits).
    fingerprint: String,
}

/// A start refused because the token refused this PIN before.
#[derive(Debug, thiserror::Error)]
#[error(
    "the token `{token}` refused this PIN at {when} ({condition}); it is not presented again, since every \
     refused login counts against the token's retry limit: put the right PIN in its source (a changed PIN is \
     tried once), or, if this PIN is right after all (the token's PIN was reset to it), remove {} and start again",
    note.display()
)]
pub struct RefusedBefore {
    /// The token's label.
    pub token: String,
    /// `pin_incorrect` or `pin_locked`.
    pub condition: String,
    /// When, RFC 3339.
    pub when: String,
    /// The note.
    pub note: PathBuf,
}

fn note_path(store: &Path) -> PathBuf {
    store.join(FILE)
}

fn fingerprint(salt: &[u8], pin: &Pin) -> String {
    let mut h = Sha256::new();
    h.update(b"keyhaven refused PIN v1\0");
    h.update(salt);
    h.update(pin.expose().as_bytes());
    let d = h.finalize();
    format!("{:02x}{:02x}", d[0], d[1])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Refuses when the store's note says the token `token` refused `pin`.
/// A note about another token, or one that does not parse, is ignored.
pub fn check(store: &Path, token: &str, pin: &Pin) -> Result<(), RefusedBefore> {
    let path = note_path(store);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let Ok(note) = serde_json::from_str::<Note>(&text) else { return Ok(()) };
    let Some(salt) = unhex(&note.salt) else { return Ok(()) };
    if note.token != token || fingerprint(&salt, pin) != note.fingerprint {
        return Ok(());
    }
    let when =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(note.at));
    let note_file = std::path::absolute(&path).unwrap_or(path);
    Err(RefusedBefore {
        token: note.token,
        condition: note.condition,
        when: when.to_string(),
        note: note_file,
    })
}

/// Removes the note (the login went through).
pub fn clear(store: &Path) {
    let path = note_path(store);
    if path.exists() {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// After a failed start: leaves a note when `error` is a refused login
/// (wrong or locked PIN).
pub fn note(store: &Path, token: &str, pin: &Pin, error: &HsmError) {
    let path = note_path(store);
    let condition = match error {
        HsmError::Login { kind: LoginFailure::Incorrect, .. } => "pin_incorrect",
        HsmError::Login { kind: LoginFailure::Locked, .. } => "pin_locked",
        _ => return,
    };
    let mut salt = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut salt)) {
        tracing::warn!(
            "cannot note the refused PIN (no /dev/urandom: {e}); a restart would present it again"
        );
        return;
    }
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let note = Note {
        token: token.to_owned(),
        condition: condition.to_owned(),
        at,
        salt: hex(&salt),
        fingerprint: fingerprint(&salt, pin),
    };
    let text = serde_json::to_string(&note).unwrap_or_default();
    match std::fs::write(&path, text) {
        Ok(()) => tracing::warn!(
            "the token refused the PIN ({condition}); noted in {}: later starts will not present this PIN again",
            path.display()
        ),
        Err(e) => tracing::warn!(
            "cannot note the refused PIN in {}: {e}; a restart would present it again",
            path.display()
        ),
    }
}
