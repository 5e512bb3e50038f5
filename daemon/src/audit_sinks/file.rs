//! The JSON-lines file sink: one line per record,
//! `{"seq":N,"hash":"…","node":"…","record":{…as stored…}}`, and after the
//! record a seal covers, `{"seq":S,"node":"…","seal":{…}}`; rotated to
//! `FILE.1` … `FILE.keep` by size and age. Each delivery is one write and
//! one `fdatasync` before the cursor moves.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{text, Deliver, Shipped, SinkConfig};

pub(super) struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_age: Option<Duration>,
    keep: u32,
    open: Option<Open>,
}

struct Open {
    file: File,
    /// Device and inode, to notice the file moved or removed from outside.
    id: (u64, u64),
    size: u64,
    since: SystemTime,
}

impl FileSink {
    pub(super) fn new(cfg: &SinkConfig) -> FileSink {
        FileSink {
            path: cfg.path.clone().unwrap_or_default(),
            max_bytes: cfg.max_bytes,
            max_age: (cfg.max_age_secs > 0).then(|| Duration::from_secs(cfg.max_age_secs)),
            keep: cfg.keep,
            open: None,
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    /// Opens (or reopens, when the file at the path is not the one held
    /// open any more) the file for appending.
    fn ensure_open(&mut self) -> Result<&mut Open, String> {
        let at_path = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if self.open.as_ref().is_some_and(|o| Some(o.id) != at_path) {
            self.open = None;
        }
        if self.open.is_none() {
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)
                .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
            let m = file.metadata().map_err(|e| format!("{}: {e}", self.path.display()))?;
            let since =
                if m.len() == 0 { SystemTime::now() } else { m.modified().unwrap_or(SystemTime::now()) };
            self.open = Some(Open { file, id: (m.dev(), m.ino()), size: m.len(), since });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    /// Moves FILE to FILE.1 (and each FILE.n to FILE.n+1, the oldest out).
    fn rotate(&mut self) -> Result<(), String> {
        self.open = None;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
        }
        std::fs::rename(&self.path, self.rotated(1))
            .map_err(|e| format!("cannot rotate {}: {e}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl FileSink {
    /// Writes `buf` at the end of the file (rotating first when due) and
    /// makes it durable.
    fn append(&mut self, buf: &[u8]) -> Result<(), String> {
        let (max_bytes, max_age) = (self.max_bytes, self.max_age);
        let o = self.ensure_open()?;
        let old = max_age.is_some_and(|a| o.since.elapsed().unwrap_or_default() >= a);
        if o.size > 0 && (o.size >= max_bytes || old) {
            self.rotate()?;
        }
        let path = self.path.clone();
        let o = self.ensure_open()?;
        o.file.write_all(buf).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        o.file.sync_data().map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
        o.size += buf.len() as u64;
        Ok(())
    }
}

fn seal_line(node: &str, seq: u64, seal: &[u8]) -> String {
    format!("{{\"seq\":{seq},\"node\":{node},\"seal\":{}}}\n", text(seal))
}

impl Deliver for FileSink {
    fn deliver_seals(&mut self, node: &str, seals: &[super::Entry]) -> Result<(), String> {
        let node = serde_json::to_string(node).map_err(|e| e.to_string())?;
        let buf: String = seals.iter().map(|(seq, s)| seal_line(&node, *seq, s)).collect();
        self.append(buf.as_bytes())
    }

    fn deliver(&mut self, node: &str, records: &[Shipped<'_>]) -> Result<(), String> {
        let node = serde_json::to_string(node).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(
                format!(
                    "{{\"seq\":{},\"hash\":\"{}\",\"node\":{node},\"record\":{}}}\n",
                    r.seq,
                    r.hash,
                    text(r.bytes)
                )
                .as_bytes(),
            );
            for (seq, s) in &r.seals {
                buf.extend_from_slice(seal_line(&node, *seq, s).as_bytes());
            }
        }
        self.append(&buf)
    }
}
