//! The syslog sink: one RFC 5424 message per record, as a datagram to a
//! local Unix socket (`/dev/log` by default):
//!
//! ```text
//! <PRI>1 TIME HOST keyhaven PID audit [keyhaven@32473 seq="N" hash="…" node="…"] {record as stored}
//! ```
//!
//! Facility `authpriv` (10); severity by outcome: `ok` info, `denied`
//! notice, `error` warning, `alert` err.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use super::{text, Deliver, Shipped, SinkConfig};

pub(super) struct SyslogSink {
    path: PathBuf,
    socket: Option<UnixDatagram>,
    host: String,
}

impl SyslogSink {
    pub(super) fn new(cfg: &SinkConfig) -> SyslogSink {
        SyslogSink {
            path: cfg.path.clone().unwrap_or_else(|| "/dev/log".into()),
            socket: None,
            host: super::node_name(),
        }
    }
}

/// The severity of a record's outcome (RFC 5424 §6.2.1).
pub(super) fn severity(outcome: &str) -> u8 {
    match outcome {
        "ok" => 6,
        "denied" => 5,
        "alert" => 3,
        _ => 4,
    }
}

/// An SD-PARAM value with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn param(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace(']', "\\]")
}

/// The record's time as RFC 3339 UTC with milliseconds.
fn time_of(bytes: &[u8]) -> String {
    let ms = serde_json::from_slice::<serde_json::Value>(bytes).ok().and_then(|v| v["time_ms"].as_u64());
    match ms {
        Some(ms) => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        None => "-".into(),
    }
}

impl Deliver for SyslogSink {
    fn deliver(&mut self, node: &str, records: &[Shipped<'_>]) -> Result<(), String> {
        if self.socket.is_none() {
            let s = UnixDatagram::unbound().map_err(|e| format!("cannot make a datagram socket: {e}"))?;
            s.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            self.socket = Some(s);
        }
        let socket = self.socket.as_ref().expect("just made");
        let pid = std::process::id();
        for r in records {
            let pri = 10 * 8 + u32::from(severity(&r.outcome));
            let msg = format!(
                "<{pri}>1 {} {} keyhaven {pid} audit [keyhaven@32473 seq=\"{}\" hash=\"{}\" node=\"{}\"] {}",
                time_of(r.bytes),
                self.host,
                r.seq,
                r.hash,
                param(node),
                text(r.bytes)
            );
            if let Err(e) = socket.send_to(msg.as_bytes(), &self.path) {
                self.socket = None;
                return Err(format!("cannot send to {}: {e}", self.path.display()));
            }
        }
        Ok(())
    }
}
