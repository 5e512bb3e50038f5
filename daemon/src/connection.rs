//! One client connection: frames in, requests run concurrently (a client
//! may pipeline), responses out in completion order, paired by id.
//!
//! One task does all of it: it reads frames, runs each request as a future
//! of its own (polled by this task, not spawned), and writes each answer as
//! soon as it is ready, together with any others ready at that moment, in
//! one write. No request crosses to another task or thread on its way out
//! (on two cores, every such crossing was a wake-up waiting for a core).
//!
//! A frame that is well formed but holds a bad request gets an error and the
//! connection goes on; a frame over the size limit, or a torn one, ends the
//! reading, because the stream can no longer be trusted to be in step.
//! At most `max_in_flight` requests run at once per connection; past that
//! the connection stops reading, which pushes back on the client. Once the
//! client closes, or the daemon stops, the connection reads no more but
//! still finishes and answers every request it accepted.
//! After `subscribe_revocations`, revocation events (frames without an id,
//! PROTOCOL.md §6) are written on the connection as they come.

use std::io::Write as _;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use keyhaven::frame::{encode_frame, FrameBudget, FrameReader};
use keyhaven::revocation::Scope;
use keyhaven::socket::{ReadHalf, WriteHalf};
use keyhaven::wire::{EventFrame, Operation, ResponseFrame, SubscribeRevocations, WireError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::identity::Caller;
use crate::ops::{self, Daemon, Reply};
use crate::text::describe;

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

/// The `id` to echo for a frame that is not a valid request (PROTOCOL.md
/// §1): "the request's `id` if the body is a JSON object with an unsigned
/// integer `id`, else `null`". So a body that is not JSON text (not UTF-8
/// throughout, not well formed, trailing bytes) gets `null`, and so does an
/// object with `id` twice (which of them would be the request's?) or an
/// `id` that is not an unsigned integer.
pub(crate) fn echoed_id(body: &[u8]) -> Option<u64> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    struct Ids;
    impl<'de> Visitor<'de> for Ids {
        /// The `id` values found: `Some(n)` for an unsigned integer.
        type Value = Vec<Option<u64>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut ids = Vec::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == "id" {
                    let v: serde_json::Value = map.next_value()?;
                    ids.push(v.as_u64());
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(ids)
        }
    }
    // JSON text is UTF-8 throughout (RFC 8259 §8.1), in strings skipped too.
    std::str::from_utf8(body).ok()?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let ids = de.deserialize_map(Ids).ok()?;
    de.end().ok()?;
    match ids[..] {
        [Some(id)] => Some(id),
        _ => None,
    }
}

/// A finished request: its id, its operation and its result.
struct Done {
    id: u64,
    op: String,
    result: Result<Reply, Error>,
}

/// Answers waiting to be written, in one zeroizing buffer (answers carry
/// plaintext). Never reallocated in place: it grows by moving to a bigger
/// buffer and zeroing the old one.
struct Outbox(Zeroizing<Vec<u8>>);

/// An outbox grown past this is given back once written.
const OUTBOX_KEEP: usize = 64 << 10;

impl Outbox {
    fn reserve(&mut self, more: usize) {
        let need = self.0.len() + more;
        if need > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(2 * self.0.capacity()).max(512)));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger;
        }
    }

    fn push(&mut self, frame: &[u8]) {
        self.reserve(frame.len());
        self.0.extend_from_slice(frame);
    }

    /// `{"id":N,"ok":BODY}` as a frame, built around the already serialised body.
    fn push_ok(&mut self, id: u64, body: &[u8]) {
        self.reserve(body.len() + 40);
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        write!(&mut *self.0, "{{\"id\":{id},\"ok\":").expect("write to a Vec");
        self.0.extend_from_slice(body);
        self.0.push(b'}');
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    fn push_error(&mut self, id: Option<u64>, code: keyhaven::ErrorCode, e: &Error) {
        self.push(&error_frame(id, code, e));
    }

    fn clear(&mut self) {
        self.0.zeroize();
        if self.0.capacity() > OUTBOX_KEEP {
            self.0 = Zeroizing::new(Vec::new());
        }
    }
}

/// Why a connection is dropped before its client closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropReason {
    /// A frame started and did not arrive whole within the frame timeout.
    SlowFrame,
    /// Nothing happened on the connection for the idle timeout.
    Idle,
    /// Answers waited unread for the write timeout.
    Unread,
    /// Answers and events waiting went over the outbox cap.
    OutboxFull,
}

/// Serves one connection until the client closes it or shutdown is asked
/// for; returns once every request it accepted has been answered (or, for
/// a client dropped for one of the reasons of [`DropReason`], run to its end).
///
/// Bounds (OPERATIONS.md §2 `[limits]`): a partly received frame holds
/// buffer bytes as they arrive, taken from `budget`, shared by every
/// connection; it must arrive whole within `frame_timeout_seconds`; a
/// connection with nothing to do is closed after `idle_timeout_seconds`;
/// answers wait in an outbox of at most `outbox_bytes` (past it nothing
/// more is read), and a client that reads none of them for
/// `write_timeout_seconds` is dropped. The connection's task keeps running
/// requests while a write waits, so a client that does not read delays
/// nobody else's requests.
pub async fn serve(
    daemon: Arc<Daemon>,
    stream: UnixStream,
    shutdown: CancellationToken,
    budget: Arc<FrameBudget>,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot read the peer credentials of a connection, closing it: {e}");
            return;
        }
    };
    let caller = match daemon.identities.cached(cred.uid(), cred.gid(), cred.pid()) {
        Some(c) => c,
        None => {
            // User and group lookups may read files or ask a directory: off the async threads.
            let d = daemon.clone();
            let resolved =
                tokio::task::spawn_blocking(move || d.identities.resolve(cred.uid(), cred.gid(), cred.pid()));
            match resolved.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cannot resolve the identity of a connection, closing it: {e}");
                    return;
                }
            }
        }
    };
    tracing::debug!(%caller, "connection opened");
    let limits = &daemon.config.limits;
    let max_in_flight = limits.max_in_flight;
    let frame_timeout = Duration::from_secs(limits.frame_timeout_seconds);
    let idle_timeout = Duration::from_secs(limits.idle_timeout_seconds);
    let write_timeout = Duration::from_secs(limits.write_timeout_seconds);
    let outbox_max = limits.outbox_bytes;
    let (rd, wr) = match keyhaven::socket::split(stream) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::warn!("cannot watch a connection's socket, closing it: {e}");
            return;
        }
    };
    let mut frames = Some(FrameReader::with_budget(rd, budget));
    let mut wr = Some(wr);
    let mut running = FuturesUnordered::new();
    let mut events: Option<broadcast::Receiver<Scope>> = None;
    let mut out = Outbox(Zeroizing::new(Vec::new()));
    // Bytes of `out` already written.
    let mut written = 0usize;
    let (d, caller) = (&daemon, &caller);
    let mut reading = true;
    let mut dropped: Option<DropReason> = None;
    // Last time a frame arrived or the client took answers.
    let mut active = Instant::now();
    // Since when answers wait with none written.
    let mut unread_since: Option<Instant> = None;
    // When reading last resumed after a pause (in-flight or outbox cap):
    // time paused does not count against a partial frame.
    let mut paused = false;
    let mut resumed = Instant::now();
    // One timer, moved earlier when a deadline comes nearer and re-armed
    // when it fires (a deadline later than needed only means one more look).
    let far = || Instant::now() + Duration::from_secs(365 * 86_400);
    let mut armed = far();
    let timer = tokio::time::sleep_until(armed.into());
    tokio::pin!(timer);
    while reading || !running.is_empty() || (wr.is_some() && written < out.0.len()) {
        let can_read = reading && running.len() < max_in_flight && out.0.len() - written < outbox_max;
        if can_read && paused {
            resumed = Instant::now();
        }
        paused = !can_read;
        let now = Instant::now();
        let mut deadline = now + idle_timeout.max(frame_timeout);
        if let Some(t) = unread_since.filter(|_| wr.is_some()) {
            deadline = deadline.min(t + write_timeout);
        }
        if can_read {
            match frames.as_ref().and_then(|f| f.partial_since()) {
                Some(t) => deadline = deadline.min(t.max(resumed) + frame_timeout),
                None => {
                    // A frame may start during the wait: look again then.
                    deadline = deadline.min(now + frame_timeout);
                    if running.is_empty() && out.0.is_empty() && events.is_none() {
                        deadline = deadline.min(active + idle_timeout);
                    }
                }
            }
        }
        if deadline < armed {
            armed = deadline;
            timer.as_mut().reset(armed.into());
        }
        tokio::select! {
            biased;
            // First: a connection always busy must still meet its deadlines.
            _ = &mut timer => {
                armed = far();
                let now = Instant::now();
                let partial = frames.as_ref().and_then(|f| f.partial_since());
                if unread_since.is_some_and(|t| wr.is_some() && now >= t + write_timeout) {
                    dropped = Some(DropReason::Unread);
                } else if can_read && partial.is_some_and(|t| now >= t.max(resumed) + frame_timeout) {
                    dropped = Some(DropReason::SlowFrame);
                } else if can_read
                    && partial.is_none()
                    && running.is_empty()
                    && out.0.is_empty()
                    && events.is_none()
                    && now >= active + idle_timeout
                {
                    dropped = Some(DropReason::Idle);
                }
            },
            Some(done) = running.next(), if !running.is_empty() => answer(d, caller, done, &mut events, &mut out),
            event = next_event(&mut events), if events.is_some() => match event {
                Ok(scope) => push_event(&mut out, &ops::revocation_event(d, caller, &scope)),
                // Events were lost: the client must drop everything.
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(%caller, lost = n, "a subscriber fell behind on revocation events");
                    push_event(&mut out, &EventFrame { event: "lagged".into(), scope: None });
                }
                Err(broadcast::error::RecvError::Closed) => events = None,
            },
            r = write_some(&mut wr, &out.0[written..]), if wr.is_some() && written < out.0.len() => match r {
                Ok(n) => {
                    written += n;
                    active = Instant::now();
                    unread_since = None;
                }
                // A client that went away still has its requests finished.
                Err(_) => wr = None,
            },
            _ = shutdown.cancelled(), if reading => reading = false,
            frame = next_frame(&mut frames), if can_read => match frame {
                Ok(Some(body)) => {
                    active = Instant::now();
                    match read_request(body) {
                        Ok((id, op, params)) => running.push(request(d, caller, id, op, params)),
                        Err(answer) => out.push(&answer),
                    }
                }
                Ok(None) => reading = false,
                Err(keyhaven::Error::FrameTooLarge(n)) => {
                    let e = Error::BadRequest(format!(
                        "frame of {n} bytes is over the limit of {} bytes; closing the connection",
                        keyhaven::frame::MAX_FRAME_LEN
                    ));
                    out.push_error(None, keyhaven::ErrorCode::FrameTooLarge, &e);
                    reading = false;
                }
                Err(keyhaven::Error::FrameBudgetSpent(n)) => {
                    tracing::warn!(%caller, "closing a connection: [limits] request_buffer_bytes ({n}) is spent");
                    let e = Error::Busy(format!(
                        "the daemon holds its maximum of {n} bytes of partly received requests \
                         ([limits] request_buffer_bytes); closing the connection, try again later"
                    ));
                    out.push_error(None, keyhaven::ErrorCode::Busy, &e);
                    reading = false;
                }
                Err(_) => reading = false,
            },
        }
        // Every other answer ready now goes out in the same write.
        while let Some(Some(done)) = running.next().now_or_never() {
            answer(d, caller, done, &mut events, &mut out);
        }
        if written == out.0.len() || wr.is_none() {
            written = 0;
            out.clear();
        } else if unread_since.is_none() {
            unread_since = Some(Instant::now());
        }
        if dropped.is_none() && out.0.len() - written > outbox_max + MAX_OUTBOX_OVER {
            dropped = Some(DropReason::OutboxFull);
        }
        if let Some(why) = dropped.take() {
            drop_client(caller, why, &limits_text(limits, why), &mut wr, &mut frames, &mut out);
            written = 0;
            reading = false;
            events = None;
        }
    }
    tracing::debug!(%caller, "connection closed");
}

/// How far past `outbox_bytes` answers already running and events may
/// take the outbox before the client is dropped: as many largest answers
/// as `max_in_flight` allows would be too many to hold, so a fixed margin.
const MAX_OUTBOX_OVER: usize = 16 << 20;

fn limits_text(l: &crate::config::Limits, why: DropReason) -> String {
    match why {
        DropReason::SlowFrame => format!(
            "a frame did not arrive whole within {} s ([limits] frame_timeout_seconds); closing the connection",
            l.frame_timeout_seconds
        ),
        DropReason::Idle => format!("idle for {} s ([limits] idle_timeout_seconds)", l.idle_timeout_seconds),
        DropReason::Unread => {
            format!("answers unread for {} s ([limits] write_timeout_seconds)", l.write_timeout_seconds)
        }
        DropReason::OutboxFull => format!(
            "more than {} bytes of answers unread ([limits] outbox_bytes)",
            l.outbox_bytes + MAX_OUTBOX_OVER
        ),
    }
}

/// Drops a client: a frame too slow is told why (`bad_request`, no id,
/// without waiting for the client to read it); an idle connection is
/// closed cleanly between frames; a client that does not read is told
/// nothing. Its socket is closed at once; requests it started still run to
/// their end, their answers thrown away.
fn drop_client(
    caller: &Caller,
    why: DropReason,
    text: &str,
    wr: &mut Option<WriteHalf>,
    frames: &mut Option<FrameReader<ReadHalf>>,
    out: &mut Outbox,
) {
    match why {
        DropReason::Idle => tracing::debug!(%caller, "closing a connection: {text}"),
        _ => tracing::info!(%caller, "dropping a client: {text}"),
    }
    out.clear();
    if why == DropReason::SlowFrame {
        if let Some(w) = wr.as_ref() {
            let e = Error::BadRequest(text.to_owned());
            let _ = w.try_write(&error_frame(None, keyhaven::ErrorCode::BadRequest, &e));
        }
    }
    *wr = None;
    *frames = None;
}

/// Writes what it can of `buf`; `Ok(0)` is an error (the client is gone).
async fn write_some(wr: &mut Option<WriteHalf>, buf: &[u8]) -> std::io::Result<usize> {
    match wr {
        Some(w) => match w.write(buf).await? {
            0 => Err(std::io::ErrorKind::WriteZero.into()),
            n => Ok(n),
        },
        None => std::future::pending().await,
    }
}

/// The next frame, from a reader not yet dropped.
async fn next_frame(frames: &mut Option<FrameReader<ReadHalf>>) -> Result<Option<&[u8]>, keyhaven::Error> {
    match frames {
        Some(f) => f.next().await,
        None => Ok(None),
    }
}

/// Runs one request.
async fn request(d: &Arc<Daemon>, caller: &Caller, id: u64, op: String, params: Zeroizing<String>) -> Done {
    let result = ops::dispatch(d, caller, &op, &params).await;
    Done { id, op, result }
}

/// Puts the answer of a finished request in the outbox. A subscription
/// starts here, before its answer is written: every revocation durable
/// after the client reads the answer is delivered.
fn answer(
    d: &Daemon,
    caller: &Caller,
    done: Done,
    events: &mut Option<broadcast::Receiver<Scope>>,
    out: &mut Outbox,
) {
    match done.result {
        Ok(body) => {
            if done.op == SubscribeRevocations::OP && events.is_none() {
                *events = Some(d.revocation_events.subscribe());
            }
            out.push_ok(done.id, &body);
        }
        Err(e) => {
            log_failure(caller, &done.op, &e);
            out.push_error(Some(done.id), e.code(), &e);
        }
    }
}

/// The next revocation event of a subscribed connection.
async fn next_event(
    events: &mut Option<broadcast::Receiver<Scope>>,
) -> Result<Scope, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn push_event(out: &mut Outbox, event: &EventFrame) {
    out.push(&Zeroizing::new(encode_frame(event).unwrap_or_default()));
}

/// A frame body as a request to run (its id, operation and params, `{}`
/// when omitted), or else the error frame that answers it, with the id
/// PROTOCOL.md §1 says.
pub(crate) fn read_request(body: &[u8]) -> Result<(u64, String, Zeroizing<String>), Zeroizing<Vec<u8>>> {
    match parse_request(body) {
        Ok(f) => {
            let params = Zeroizing::new(f.params.map_or("{}", |p| p.get()).to_owned());
            Ok((f.id, f.op.into_owned(), params))
        }
        Err(err) => Err(error_frame(echoed_id(body), err.code(), &err)),
    }
}

/// Parses a request frame; the frame and its params must be JSON objects
/// (serde would also read a struct from an array).
fn parse_request(buf: &[u8]) -> Result<InFrame<'_>, Error> {
    if !is_object(buf) {
        return Err(Error::BadRequest("malformed request: a request must be a JSON object".into()));
    }
    // Without path tracking first (see `ops::parse`).
    let frame = match serde_json::from_slice::<InFrame>(buf) {
        Ok(frame) => frame,
        Err(_) => parse_request_slowly(buf)?,
    };
    if let Some(p) = frame.params {
        if !is_object(p.get().as_bytes()) && p.get() != "null" {
            return Err(Error::BadRequest("malformed request: `params` must be a JSON object".into()));
        }
    }
    Ok(frame)
}

/// Parses a frame that failed to parse, for an error that names the field.
fn parse_request_slowly(buf: &[u8]) -> Result<InFrame<'_>, Error> {
    let mut de = serde_json::Deserializer::from_slice(buf);
    let frame: InFrame = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| Error::BadRequest(format!("malformed request: {}", describe(&e))))?;
    de.end().map_err(|e| Error::BadRequest(format!("malformed request: {e}")))?;
    Ok(frame)
}

/// Whether JSON text starts as an object.
fn is_object(b: &[u8]) -> bool {
    b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{')
}

fn log_failure(caller: &Caller, op: &str, e: &Error) {
    match e {
        Error::Hsm(_) | Error::Store(_) | Error::Audit(_) | Error::Internal(_) => {
            tracing::warn!(%caller, op = %crate::text::printable(op), code = %e.code(), "request failed: {e}")
        }
        _ => {
            tracing::debug!(%caller, op = %crate::text::printable(op), code = %e.code(), "request refused: {e}")
        }
    }
}

pub(crate) fn error_frame(id: Option<u64>, code: keyhaven::ErrorCode, e: &Error) -> Zeroizing<Vec<u8>> {
    let resp = ResponseFrame { id, ok: None, error: Some(WireError { code, message: e.to_string() }) };
    Zeroizing::new(encode_frame(&resp).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params_error<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        let e = serde_path_to_error::deserialize::<_, T>(&mut serde_json::Deserializer::from_str(json));
        crate::text::describe(&e.unwrap_err())
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
    fn the_echoed_id_follows_protocol_1() {
        assert_eq!(echoed_id(br#"{"id":7,"op":1}"#), Some(7));
        assert_eq!(echoed_id(br#"{"op":"health","i\u0064":8,"x":[1,{"id":2}]}"#), Some(8));
        assert_eq!(echoed_id(br#"{"id":18446744073709551615}"#), Some(u64::MAX));
        assert_eq!(echoed_id(b"{\"id\":1,\"op\":\"he\xffalth\"}"), None, "invalid UTF-8");
        assert_eq!(echoed_id(br#"{"id":1,"id":1,"op":"health"}"#), None, "id twice");
        assert_eq!(echoed_id(br#"{"id":1,"op":"health"} x"#), None, "trailing bytes");
        assert_eq!(echoed_id(br#"{"id":1,"op":"health""#), None, "not well formed");
        for bad in [r#"{"id":-1}"#, r#"{"id":1.5}"#, r#"{"id":"1"}"#, r#"{"id":null}"#, "[1]", "1", ""] {
            assert_eq!(echoed_id(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn a_good_request_still_borrows_its_params() {
        let f = parse_request(br#"{"id":3,"op":"encrypt","params":{"tenant":"t"}}"#).unwrap();
        assert_eq!((f.id, &*f.op, f.params.map(|p| p.get())), (3, "encrypt", Some(r#"{"tenant":"t"}"#)));
    }
}
