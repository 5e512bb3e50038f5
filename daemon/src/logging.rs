//! Where log lines go: stderr, and under systemd the journal, which learns
//! each line's priority from the sd-daemon prefix `<N>` (sd-daemon(3)):
//! `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace. Without
//! it every line reaches the journal at the unit's default (info), and
//! `journalctl -p warning` shows none of the daemon's warnings.

use std::io::Write;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Whether stderr is the journal: `$JOURNAL_STREAM` (set by systemd for a
/// unit whose stderr is the journal) names the device and inode of stderr.
/// A process that inherited the variable but writes elsewhere (a pipe, a
/// file) does not match, and gets no prefixes.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    match nix::sys::stat::fstat(2) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The sd-daemon prefix of a level.
pub fn prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// Writes `text` to stderr, every line prefixed with `prefix` when stderr
/// is the journal (for messages printed outside the log, like the final
/// error of a failed start).
pub fn eprint_lines(journal: bool, prefix: &'static str, text: &str) {
    let mut w = Lines { prefix: journal.then_some(prefix), at_start: true };
    let _ = w.write_all(text.as_bytes());
    let _ = w.write_all(b"\n");
}

/// The log's writer: stderr, with each line prefixed by its event's
/// priority when `journal` is set.
#[derive(Clone, Copy, Debug)]
pub struct Stderr {
    /// Prefix lines with their priority.
    pub journal: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Lines;

    fn make_writer(&'a self) -> Lines {
        Lines { prefix: self.journal.then_some("<6>"), at_start: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Lines {
        Lines { prefix: self.journal.then(|| prefix(*meta.level())), at_start: true }
    }
}

/// One event's writer: puts the prefix before every line it writes, and
/// writes each piece it is given to stderr at once.
#[derive(Debug)]
pub struct Lines {
    prefix: Option<&'static str>,
    at_start: bool,
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(prefix) = self.prefix else {
            std::io::stderr().write_all(buf)?;
            return Ok(buf.len());
        };
        let mut out = Vec::with_capacity(buf.len() + 8);
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_start {
                out.extend_from_slice(prefix.as_bytes());
            }
            out.extend_from_slice(line);
            self.at_start = line.ends_with(b"\n");
        }
        std::io::stderr().write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
