//! SoftHSM2, the software token used in development and as a stand-in for
//! an HSM, keeps each token in files under its `directories.tokendir`.
//! When the daemon's user cannot read and write them (they belong to
//! whoever ran `softhsm2-util --init-token`, or `ProtectSystem=strict`
//! made them read-only) SoftHSM2 says only that the token is not there, or
//! fails with CKR_GENERAL_ERROR on the first write. This finds the file
//! that is the cause, so that the error can name it.

use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

use crate::config::Config;

/// Whether `[hsm] module` is SoftHSM2 (by its file name, as the production
/// check judges it).
pub fn is_softhsm(config: &Config) -> bool {
    config.hsm.module.file_name().is_some_and(|n| n.to_string_lossy().to_lowercase().contains("softhsm"))
}

/// SoftHSM2's configuration file: `[hsm] softhsm2_conf`, else
/// `$SOFTHSM2_CONF`, else its default.
fn conf_file(config: &Config) -> PathBuf {
    config
        .hsm
        .softhsm2_conf
        .clone()
        .or_else(|| std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/softhsm/softhsm2.conf"))
}

/// The token directory its configuration names (`directories.tokendir`).
pub fn token_dir(config: &Config) -> Option<PathBuf> {
    let text = std::fs::read_to_string(conf_file(config)).ok()?;
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let (key, value) = line.split_once('=')?;
        (key.trim() == "directories.tokendir").then(|| PathBuf::from(value.trim()))
    })
}

/// The first of the token directory, its token folders and their files
/// that this process cannot read and write (folders: and enter), with why:
/// `/var/lib/softhsm/tokens/…/token.object: Read-only file system`. `None`
/// when the module is not SoftHSM2 or everything is accessible.
pub fn token_files_problem(config: &Config) -> Option<String> {
    if !is_softhsm(config) {
        return None;
    }
    let dir = token_dir(config)?;
    let rwx = AccessFlags::R_OK | AccessFlags::W_OK | AccessFlags::X_OK;
    let check = |p: &Path, flags: AccessFlags| access(p, flags).err().map(|e| (p.to_owned(), e));
    let mut found = check(&dir, rwx);
    if found.is_none() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        found = entries.iter().find_map(|token| {
            if !token.is_dir() {
                return None;
            }
            check(token, rwx).or_else(|| {
                let mut files: Vec<PathBuf> =
                    std::fs::read_dir(token).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
                files.sort();
                files.iter().find_map(|f| check(f, AccessFlags::R_OK | AccessFlags::W_OK))
            })
        });
    }
    let (path, errno) = found?;
    let uid = nix::unistd::geteuid();
    let fix = if errno == nix::errno::Errno::EROFS {
        format!(
            "read-only file system: under systemd's ProtectSystem=strict add `ReadWritePaths={}` to the unit \
             (docs/OPERATIONS.md §1)",
            dir.display()
        )
    } else {
        format!(
            "uid {uid} may not read and write it: `chown -R` the token directory {} to the daemon's user \
             (docs/OPERATIONS.md §1)",
            dir.display()
        )
    };
    Some(format!("SoftHSM2 could not open its token files ({}: {}; {fix})", path.display(), errno.desc()))
}

/// Below this much free space, a write to the token directory is taken to
/// have failed for want of room (SoftHSM2 writes each object to a file of
/// a few KiB).
const TOKEN_ROOM_MIN: u64 = 64 << 10;

/// When SoftHSM2's token directory is (nearly) full, says so, with its
/// path, what is free and what to do: the cause of a token failure that
/// SoftHSM2 reports only as CKR_GENERAL_ERROR. `None` when the module is
/// not SoftHSM2, the directory is unknown, or it has room.
pub fn token_room_problem(config: &Config) -> Option<String> {
    if !is_softhsm(config) {
        return None;
    }
    let dir = token_dir(config)?;
    let fs = nix::sys::statvfs::statvfs(&dir).ok()?;
    let free = fs.blocks_available().saturating_mul(fs.fragment_size());
    let no_inodes = fs.files() > 0 && fs.files_available() == 0;
    if free >= TOKEN_ROOM_MIN && !no_inodes {
        return None;
    }
    let what = if no_inodes { "no free inodes".to_owned() } else { format!("{free} bytes free") };
    Some(format!(
        "no space left on device in SoftHSM2's token directory {} ({what}): the token cannot store a new \
         object; make room there (docs/OPERATIONS.md §7.1)",
        dir.display()
    ))
}

/// A failure of the token whose cause is SoftHSM2's token files: an
/// operator must fix their owner or mount (exit 78, not the 69 of a token
/// that is merely absent).
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct TokenFiles {
    /// What is wrong with the files, and the fix.
    pub problem: String,
    /// The module's own failure.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// `error`, with the token-file problem in front when there is one, so that
/// "no token labelled … is present" says why.
pub fn explain<E>(config: &Config, error: E) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    match token_files_problem(config) {
        Some(problem) => anyhow::Error::new(TokenFiles { problem, source: Box::new(error) }),
        None => anyhow::Error::new(error),
    }
}
