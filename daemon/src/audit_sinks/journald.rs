//! The journald sink: one journal entry per record, by journald's native
//! protocol (a datagram of fields to `/run/systemd/journal/socket`):
//! `MESSAGE` (a one-line summary), `PRIORITY` by outcome (as syslog's),
//! `SYSLOG_IDENTIFIER=keyhaven`, `KEYHAVEN_SEQ`, `KEYHAVEN_HASH`,
//! `KEYHAVEN_NODE`, `KEYHAVEN_OP`, `KEYHAVEN_OUTCOME`, `KEYHAVEN_TENANT`,
//! `KEYHAVEN_KEY` (when the record has them) and `KEYHAVEN_RECORD` (the
//! record as stored). Records larger than a datagram (journald would need
//! a memfd) are not expected: a record is a few hundred bytes.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use super::{Deliver, Shipped, SinkConfig};

pub(super) struct JournaldSink {
    path: PathBuf,
    socket: Option<UnixDatagram>,
}

impl JournaldSink {
    pub(super) fn new(cfg: &SinkConfig) -> JournaldSink {
        JournaldSink {
            path: cfg.path.clone().unwrap_or_else(|| "/run/systemd/journal/socket".into()),
            socket: None,
        }
    }
}

/// Appends field `name` = `value`: the simple form, or the binary form
/// (name, newline, little-endian u64 length, bytes) when the value holds a
/// newline.
fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl Deliver for JournaldSink {
    fn deliver(&mut self, node: &str, records: &[Shipped<'_>]) -> Result<(), String> {
        if self.socket.is_none() {
            let s = UnixDatagram::unbound().map_err(|e| format!("cannot make a datagram socket: {e}"))?;
            s.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            self.socket = Some(s);
        }
        let socket = self.socket.as_ref().expect("just made");
        for r in records {
            let v = serde_json::from_slice::<serde_json::Value>(r.bytes).unwrap_or_default();
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            let mut d = Vec::with_capacity(r.bytes.len() + 256);
            let summary = format!("keyhaven audit #{} {} {}", r.seq, s("op"), r.outcome);
            field(&mut d, "MESSAGE", summary.as_bytes());
            field(&mut d, "PRIORITY", super::syslog::severity(&r.outcome).to_string().as_bytes());
            field(&mut d, "SYSLOG_IDENTIFIER", b"keyhaven");
            field(&mut d, "KEYHAVEN_SEQ", r.seq.to_string().as_bytes());
            field(&mut d, "KEYHAVEN_HASH", r.hash.as_bytes());
            field(&mut d, "KEYHAVEN_NODE", node.as_bytes());
            field(&mut d, "KEYHAVEN_OP", s("op").as_bytes());
            field(&mut d, "KEYHAVEN_OUTCOME", r.outcome.as_bytes());
            for (k, name) in [("tenant", "KEYHAVEN_TENANT"), ("key", "KEYHAVEN_KEY")] {
                if let Some(t) = v[k].as_str() {
                    field(&mut d, name, t.as_bytes());
                }
            }
            field(&mut d, "KEYHAVEN_RECORD", r.bytes);
            if let Err(e) = socket.send_to(&d, &self.path) {
                self.socket = None;
                return Err(format!("cannot send to {}: {e}", self.path.display()));
            }
        }
        Ok(())
    }
}
