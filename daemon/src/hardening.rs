//! Production mode: the start-up checks that refuse an install that is easy
//! to attack (a software token, a weak or exposed PIN, a socket, store or
//! config that others may read or change), and the process hygiene applied
//! before any secret is read (no core dumps, memory locked where the limit
//! allows). Dev mode skips the checks; the hygiene applies to every mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, Mode};

/// Shortest PIN production mode accepts.
pub const MIN_PIN_LEN: usize = 8;

/// PINs that are published as defaults or examples (SoftHSM2's and OpenSC's
/// documentation and test scripts, smart-card and HSM vendors' factory
/// defaults, our own docs), compared without regard to case. Short ones
/// (`1234`, `0000`, `123456`…) are refused by the length rule already and
/// are listed for clarity.
const KNOWN_PINS: &[&str] = &[
    "0000",
    "1111",
    "1234",
    "12345",
    "123456",
    "1234567",
    "12345678",
    "123456789",
    "1234567890",
    "0123456789",
    "87654321",
    "648219",                                           // OpenSC: SmartCard-HSM user PIN
    "3537363231383830",                                 // OpenSC: SmartCard-HSM SO PIN
    "010203040506070801020304050607080102030405060708", // PIV management key
    "fedcba9876543210",
    "changeme",
    "change-me",
    "changeit",
    "password",
    "passw0rd",
    "password1",
    "secret",
    "default",
    "userpin",
    "user-pin",
    "sopin",
    "so-pin",
    "keyhaven",
    "softhsm",
    "softhsm2",
    "qwertyui",
    "qwerty123",
    "abcdefgh",
    "abcd1234",
    "test1234",
    "admin123",
];

/// Why a PIN is weak, or `None`. Never returns or logs the PIN itself.
pub fn weak_pin(pin: &str) -> Option<String> {
    let chars: Vec<char> = pin.chars().collect();
    if chars.is_empty() {
        return Some("it is empty".into());
    }
    if KNOWN_PINS.iter().any(|k| k.eq_ignore_ascii_case(pin)) {
        return Some("it is a well-known default or example PIN".into());
    }
    if chars.len() < MIN_PIN_LEN {
        return Some(format!("it is shorter than {MIN_PIN_LEN} characters"));
    }
    if chars.iter().all(|c| *c == chars[0]) {
        return Some("it is one character repeated".into());
    }
    if chars.len() >= 4 && chars.chunks(2).all(|c| c == &chars[..c.len()]) {
        return Some("it is two characters repeated".into());
    }
    let steps: Vec<i64> = chars.windows(2).map(|w| w[1] as i64 - w[0] as i64).collect();
    if steps.iter().all(|s| *s == 1) || steps.iter().all(|s| *s == -1) {
        return Some("it is a run of consecutive characters".into());
    }
    None
}

/// Production mode's refusals: every problem found, each saying what to
/// change.
#[derive(Debug, thiserror::Error)]
#[error("production mode refuses to start (config {}):\n  - {}", config.display(), problems.join("\n  - "))]
pub struct Refused {
    /// The configuration file.
    pub config: PathBuf,
    /// What is wrong, and what to change.
    pub problems: Vec<String>,
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// Checks a production configuration before anything starts. Dev mode
/// passes without checks. Reads the PIN to judge it (and drops it).
pub fn check(config: &Config) -> Result<(), Refused> {
    if config.mode != Mode::Production {
        return Ok(());
    }
    let mut problems = Vec::new();
    let module_name =
        config.hsm.module.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if module_name.contains("softhsm") && !config.hsm.allow_softhsm {
        problems.push(format!(
            "[hsm] module {} is SoftHSM2, a software token with no hardware boundary: point `module` at \
             your HSM's PKCS#11 module, or set `allow_softhsm = true` in [hsm] to accept it knowingly",
            config.hsm.module.display()
        ));
    }
    match config.pin_path() {
        Ok(Some(file)) => match std::fs::metadata(&file) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o027 != 0 {
                    problems.push(format!(
                        "the PIN file {} has mode {mode:04o}: others may read it or its group may change it; \
                         run `chmod 0400 {}` (or 0440 for a group the daemon is in)",
                        file.display(),
                        file.display()
                    ));
                }
                if meta.uid() != nix::unistd::geteuid().as_raw() && meta.uid() != 0 {
                    problems.push(format!(
                        "the PIN file {} belongs to uid {}: it must belong to the daemon's user or to root",
                        file.display(),
                        meta.uid()
                    ));
                }
            }
            Err(e) => problems.push(format!("cannot read the PIN file {}: {e}", file.display())),
        },
        Ok(None) => {}
        Err(e) => problems.push(e),
    }
    match config.read_pin() {
        Ok(pin) => {
            if let Some(why) = weak_pin(pin.expose()) {
                problems.push(format!(
                    "the token's user PIN is weak ({why}): give the token a PIN of at least {MIN_PIN_LEN} \
                     characters that is not a default, with your HSM's tools, and update {}",
                    pin_source(config)
                ));
            }
        }
        Err(e) if !problems.iter().any(|p| p.contains("PIN file")) => problems.push(e),
        Err(_) => {}
    }
    if let Some(dir) = config.socket.parent() {
        if let Some(mode) = mode_of(dir) {
            if mode & 0o006 != 0 {
                problems.push(format!(
                    "the socket directory {} has mode {mode:04o}: others may list or change it; run \
                     `chmod o-rw {}` (0750 with the clients' group, or 0711 with `socket_mode = 0o666`)",
                    dir.display(),
                    dir.display()
                ));
            }
        }
    }
    if let Some(mode) = mode_of(&config.store) {
        if mode & 0o007 != 0 {
            problems.push(format!(
                "the store directory {} has mode {mode:04o}: others may read or change it; run `chmod 0700 {}`",
                config.store.display(),
                config.store.display()
            ));
        }
    }
    if let Some(file) = &config.source {
        if let Some(mode) = mode_of(file) {
            if mode & 0o022 != 0 {
                problems.push(format!(
                    "the config file {} has mode {mode:04o}: its group or others may change it (and so the \
                     policy); run `chmod go-w {}`",
                    file.display(),
                    file.display()
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refused { config: config.source.clone().unwrap_or_default(), problems })
    }
}

fn pin_source(config: &Config) -> String {
    match (&config.hsm.pin_file, &config.hsm.pin_env, &config.hsm.pin_credential) {
        (Some(f), _, _) => format!("the PIN file {}", f.display()),
        (_, Some(v), _) => format!("the variable `{v}`"),
        (_, _, Some(c)) => format!("the systemd credential `{c}`"),
        _ => "the PIN".into(),
    }
}

/// What [`process_hygiene`] did about memory locking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// All current and future pages are locked (`mlockall`).
    Locked,
    /// Not locked, and why.
    NotLocked(String),
    /// Not attempted (dev mode).
    Skipped,
}

/// Turns core dumps off (RLIMIT_CORE 0, PR_SET_DUMPABLE 0: no core file,
/// no ptrace or /proc/PID/mem by other processes of the same user) and, in
/// production mode, locks the process's memory so that PINs and data keys
/// are never written to swap.
///
/// Memory is locked with `mlockall(MCL_CURRENT | MCL_FUTURE)` only when
/// RLIMIT_MEMLOCK is unlimited (the unit sets `LimitMEMLOCK=infinity`):
/// under a finite limit, MCL_FUTURE would make allocations fail once the
/// daemon grows past it, which is worse than swap. Locking single buffers
/// would need raw pointers (`unsafe`, forbidden here) and would still miss
/// copies made by the PKCS#11 module and the allocator.
///
/// Fails only when core dumps cannot be turned off.
pub fn process_hygiene(mode: Mode) -> Result<MemoryLock, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("cannot set RLIMIT_CORE to 0: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("cannot clear PR_SET_DUMPABLE: {e}"))?;
    if mode != Mode::Production {
        return Ok(MemoryLock::Skipped);
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| format!("getrlimit: {e}"))?;
    if soft != RLIM_INFINITY {
        return Ok(MemoryLock::NotLocked(format!(
            "RLIMIT_MEMLOCK is {soft} bytes, not unlimited; set `LimitMEMLOCK=infinity` in the unit \
             (or `ulimit -l unlimited`) to keep secrets out of swap"
        )));
    }
    use nix::sys::mman::{mlockall, MlockAllFlags};
    match mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        Ok(()) => Ok(MemoryLock::Locked),
        Err(e) => Ok(MemoryLock::NotLocked(format!("mlockall failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_pins_are_named_without_the_pin() {
        for pin in [
            "",
            "1234",
            "0000",
            "123456",
            "changeme",
            "ChangeMe",
            "12345678",
            "87654321",
            "abcdefgh",
            "aaaaaaaaaaaa",
            "0000000000",
            "1212121212",
            "3537363231383830",
            "xk3q",
        ] {
            let why = weak_pin(pin).unwrap_or_else(|| panic!("`{pin}` must be weak"));
            assert!(pin.is_empty() || !why.contains(pin), "{why}");
        }
        for pin in ["9f3c2a7e51d04b8c", "correct horse battery", "Zk4!pq9rT"] {
            assert_eq!(weak_pin(pin), None, "{pin}");
        }
    }

    #[test]
    fn the_hsm_config_debug_never_shows_the_pin() {
        let cfg = crate::hsm::HsmConfig {
            module: "m.so".into(),
            token_label: "t".into(),
            pin: crate::secret::Pin::new("debug-Pin-9271"),
            master_key_label: "keyhaven-mk".into(),
            audit_key_label: "keyhaven-audit".into(),
            workers: 1,
            queue_depth: 1,
        };
        let dbg = format!("{cfg:?} {cfg:#?}");
        assert!(!dbg.contains("debug-Pin-9271") && dbg.contains("redacted"), "{dbg}");
    }
}
