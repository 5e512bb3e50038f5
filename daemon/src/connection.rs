//! One client connection: frames in, requests dispatched concurrently (a
//! client may pipeline), responses out in completion order, paired by id.
//!
//! A frame that is well formed but holds a bad request gets an error and the
//! connection goes on; a frame over the size limit, or a torn one, ends the
//! connection, because the stream can no longer be trusted to be in step.
//! At most `max_in_flight` requests run at once per connection; past that
//! the connection stops reading, which pushes back on the client.
//! After `subscribe_revocations`, a forwarder task also writes revocation
//! events (frames without an id, PROTOCOL.md §6) until the connection ends.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keyhaven::frame::{encode_frame, read_frame};
use keyhaven::wire::{EventFrame, Operation, ResponseFrame, SubscribeRevocations, WireError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::identity::Caller;
use crate::ops::{self, Daemon};

/// A request frame as the daemon reads it: params are kept as raw JSON so
/// that each operation parses its own (and no secret passes through a
/// generic JSON tree that would not be wiped).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InFrame<'a> {
    id: u64,
    op: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

/// Just the id, to answer a frame that is otherwise broken.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

type Frame = Zeroizing<Vec<u8>>;

/// Serves one connection until the client closes it or shutdown is asked
/// for; returns once every request it accepted has been answered.
pub async fn serve(daemon: Arc<Daemon>, stream: UnixStream, shutdown: CancellationToken) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot read the peer credentials of a connection, closing it: {e}");
            return;
        }
    };
    // User and group lookups may read files or ask a directory: off the async threads.
    let resolved = tokio::task::spawn_blocking(move || Caller::resolve(cred.uid(), cred.gid(), cred.pid()));
    let caller = match resolved.await {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!("cannot resolve the identity of a connection, closing it: {e}");
            return;
        }
    };
    tracing::debug!(%caller, "connection opened");
    let max_in_flight = daemon.config.limits.max_in_flight;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Frame>(max_in_flight);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let events = Arc::new(Events { started: AtomicBool::new(false), done: CancellationToken::new() });
    let mut buf = Vec::new();
    loop {
        let read = tokio::select! {
            r = read_frame(&mut rd, &mut buf) => r,
            _ = shutdown.cancelled() => break,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break,
            Err(keyhaven::Error::FrameTooLarge(n)) => {
                let e = Error::BadRequest(format!(
                    "frame of {n} bytes is over the limit of {} bytes; closing the connection",
                    keyhaven::frame::MAX_FRAME_LEN
                ));
                let _ = tx.send(error_frame(None, keyhaven::ErrorCode::FrameTooLarge, &e)).await;
                break;
            }
            Err(_) => break,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        match parse_request(&buf) {
            Ok(frame) => {
                let id = frame.id;
                let op = frame.op.into_owned();
                let params = Zeroizing::new(frame.params.map_or("{}", |p| p.get()).to_owned());
                let (d, tx, caller, events) = (daemon.clone(), tx.clone(), caller.clone(), events.clone());
                tokio::spawn(async move {
                    let result = ops::dispatch(&d, &caller, &op, &params).await;
                    if result.is_ok() && op == SubscribeRevocations::OP {
                        // Before the answer goes out: every revocation
                        // durable after the client reads it is delivered.
                        events.start(&d, &caller, &tx);
                    }
                    let frame = match result {
                        Ok(body) => ok_frame(id, &body),
                        Err(e) => {
                            log_failure(&caller, &op, &e);
                            error_frame(Some(id), e.code(), &e)
                        }
                    };
                    let _ = tx.send(frame).await;
                    drop(permit);
                });
            }
            Err(err) => {
                let id = serde_json::from_slice::<IdOnly>(&buf).ok().and_then(|f| f.id);
                let _ = tx.send(error_frame(id, err.code(), &err)).await;
            }
        }
        buf.zeroize();
    }
    buf.zeroize();
    events.done.cancel();
    // Every spawned request (and the event forwarder, until cancelled) holds
    // a sender: the writer ends after the last answer.
    drop(tx);
    let _ = writer.await;
    tracing::debug!(%caller, "connection closed");
}

/// The connection's subscription to revocation events (PROTOCOL.md §6).
struct Events {
    started: AtomicBool,
    /// Cancelled when the connection stops reading.
    done: CancellationToken,
}

impl Events {
    /// Starts forwarding revocation events to this connection, once: a
    /// second `subscribe_revocations` is answered but changes nothing.
    fn start(&self, d: &Arc<Daemon>, caller: &Arc<Caller>, tx: &mpsc::Sender<Frame>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut rx = d.revocation_events.subscribe();
        let (d, caller, tx, done) = (d.clone(), caller.clone(), tx.clone(), self.done.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = done.cancelled() => break,
                    e = rx.recv() => e,
                };
                let frame = match event {
                    Ok(scope) => ops::revocation_event(&d, &caller, &scope),
                    // Events were lost: the client must drop everything.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(%caller, lost = n, "a subscriber fell behind on revocation events");
                        EventFrame { event: "lagged".into(), scope: None }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let frame = Zeroizing::new(encode_frame(&frame).unwrap_or_default());
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Parses a request frame; the frame and its params must be JSON objects
/// (serde would also read a struct from an array).
fn parse_request(buf: &[u8]) -> Result<InFrame<'_>, Error> {
    let is_object = |b: &[u8]| b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{');
    if !is_object(buf) {
        return Err(Error::BadRequest("malformed request: a request must be a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(buf);
    let frame: InFrame = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Error::BadRequest(format!("malformed request: {}", describe(&e))))?;
    de.end().map_err(|e| Error::BadRequest(format!("malformed request: {e}")))?;
    if let Some(p) = frame.params {
        if !is_object(p.get().as_bytes()) && p.get() != "null" {
            return Err(Error::BadRequest("malformed request: `params` must be a JSON object".into()));
        }
    }
    Ok(frame)
}

/// What is wrong with a request or its params, for an error message
/// (PROTOCOL.md §4): the field at fault is named, names taken from the
/// request (unknown fields, context keys) are shortened and escaped, a
/// mistyped string value is cut out (it may be a secret sent in the wrong
/// field), and for a type error the position, which says nothing more than
/// the field, is left off.
pub(crate) fn describe(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_path_to_error::Segment;
    let mut path: Vec<String> = e
        .path()
        .iter()
        .map(|s| match s {
            Segment::Map { key } => ops::printable(key),
            Segment::Enum { variant } => ops::printable(variant),
            Segment::Seq { index } => index.to_string(),
            Segment::Unknown => "?".to_owned(),
        })
        .collect();
    let inner = e.inner();
    let mut msg = inner.to_string();
    if inner.is_data() {
        let at = format!(" at line {} column {}", inner.line(), inner.column());
        if msg.ends_with(&at) {
            msg.truncate(msg.len() - at.len());
        }
    }
    // serde quotes an unknown field name raw, and it is the last segment of
    // the path: show it escaped, once.
    if let Some(Segment::Map { key }) = e.path().iter().next_back() {
        if let Some(rest) = msg.strip_prefix(&format!("unknown field `{key}`")) {
            msg = format!("unknown field `{}`{rest}", ops::printable(key));
            path.pop();
        }
    }
    let msg = ops::scrub(&msg);
    if path.is_empty() {
        msg
    } else {
        format!("field `{}`: {msg}", path.join("."))
    }
}

fn log_failure(caller: &Caller, op: &str, e: &Error) {
    match e {
        Error::Hsm(_) | Error::Store(_) | Error::Audit(_) | Error::Internal(_) => {
            tracing::warn!(%caller, op = %ops::printable(op), code = %e.code(), "request failed: {e}")
        }
        _ => tracing::debug!(%caller, op = %ops::printable(op), code = %e.code(), "request refused: {e}"),
    }
}

/// `{"id":N,"ok":BODY}` as a frame, built around the already serialised body.
fn ok_frame(id: u64, body: &[u8]) -> Frame {
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + 40));
    out.extend_from_slice(&[0; 4]);
    write!(&mut *out, "{{\"id\":{id},\"ok\":").expect("write to a Vec");
    out.extend_from_slice(body);
    out.push(b'}');
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

fn error_frame(id: Option<u64>, code: keyhaven::ErrorCode, e: &Error) -> Frame {
    let resp = ResponseFrame { id, ok: None, error: Some(WireError { code, message: e.to_string() }) };
    Zeroizing::new(encode_frame(&resp).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params_error<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        let e = serde_path_to_error::deserialize::<_, T>(&mut serde_json::Deserializer::from_str(json));
        describe(&e.unwrap_err())
    }

    fn request_error(json: &str) -> String {
        match parse_request(json.as_bytes()) {
            Ok(_) => panic!("{json} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn messages_name_the_field_and_quote_no_string_value() {
        use keyhaven::wire::{Datakey, Encrypt};
        let m = params_error::<Encrypt>(r#"{"tenant":1,"key":"k","plaintext":"aGk="}"#);
        assert_eq!(m, "field `tenant`: invalid type: integer `1`, expected a string");
        let m = params_error::<Encrypt>(r#"{"tenant":"t","key":"k","plaintext":"hunter2!"}"#);
        assert!(m.starts_with("field `plaintext`: bad base64") && !m.contains("hunter2"), "{m}");
        let m = params_error::<Encrypt>(r#"{"tenant":"t","key":"k","plaintext":"aGk=","context":{"u":4}}"#);
        assert_eq!(m, "field `context.u`: invalid type: integer `4`, expected a string");
        let m = params_error::<Datakey>(r#"{"tenant":"t","key":"k","include_plaintext":"hunter2"}"#);
        assert!(
            m.starts_with("field `include_plaintext`: invalid type: string") && !m.contains("hunter2"),
            "{m}"
        );
        let m = request_error(r#"{"id":1,"op":"health"} x"#);
        assert!(m.starts_with("malformed request: trailing characters"), "{m}");
        let m = request_error(r#"{"id":"hunter2","op":"health"}"#);
        assert!(m.contains("field `id`") && m.contains("u64") && !m.contains("hunter2"), "{m}");
    }

    #[test]
    fn unknown_fields_are_shortened_and_escaped() {
        let long = "x".repeat(5000);
        let m = request_error(&serde_json::json!({"id": 1, "op": "health", long: 1}).to_string());
        assert!(
            m.starts_with(&format!("malformed request: unknown field `{}…`, expected", "x".repeat(64))),
            "{m}"
        );
        let m = params_error::<keyhaven::wire::Health>(r#"{"a\nb\u001b[31m":1}"#);
        assert_eq!(m, r"unknown field `a\nb\u{1b}[31m`, there are no fields");
    }

    #[test]
    fn a_good_request_still_borrows_its_params() {
        let f = parse_request(br#"{"id":3,"op":"encrypt","params":{"tenant":"t"}}"#).unwrap();
        assert_eq!((f.id, &*f.op, f.params.map(|p| p.get())), (3, "encrypt", Some(r#"{"tenant":"t"}"#)));
    }
}
