//! Audit segment files (AUDIT.md §4): a log directory holding one segment of
//! arbitrary bytes is opened (torn or damaged tails are found and cut) and
//! scanned both ways; damage comes back as typed errors, never a panic.
#![no_main]

use keyhavend::store::audit_files::{read_frame, AuditFiles};
use keyhavend::store::AuditKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Some((_, _, value, size)) = read_frame(rest) {
        assert!(value.len() < size && size <= rest.len());
        rest = &rest[size..];
    }
    // In memory where there is a tmpfs: the open syncs what it cuts.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    std::fs::write(dir.path().join("00000000000000000001.log"), data).unwrap();
    let Ok(files) = AuditFiles::open(dir.path()) else { return };
    for kind in [AuditKind::Record, AuditKind::Seal] {
        for item in files.scan(kind, 0, false).take(10_000) {
            let _ = item;
        }
        for item in files.scan(kind, u64::MAX, true).take(10_000) {
            let _ = item;
        }
    }
});
