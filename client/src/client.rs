//! An async client for `keyhavend` that pipelines: many requests may be in
//! flight on one connection, each answered through its own channel when its
//! response (matched by id) arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Mutex as AsyncMutex};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::frame::{write_frame, FrameReader};
use crate::names::KeyPath;
pub use crate::options::{KeyOptions, Plaintext};
use crate::revocation::Scope;
use crate::typed::AsText;
use crate::wire::{self, Operation, SecretBytes};

/// Environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "KEYHAVEN_SOCKET";

/// How long [`Client::connect`] waits, by default, for the socket to accept
/// and the daemon to answer `hello`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request waits, by default, for its answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client waits before giving up with [`Error::Timeout`]
/// (`None`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and the `hello` exchange: a socket that systemd holds
    /// while the service cannot start accepts, and then never answers.
    pub connect: Option<Duration>,
    /// Each request, from sending it to its answer.
    pub request: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Some(DEFAULT_CONNECT_TIMEOUT), request: Some(DEFAULT_REQUEST_TIMEOUT) }
    }
}

/// Connects a [`Client`] with other timeouts, reconnection or an event
/// hook: `Client::builder().reconnect(true).connect(path)`.
///
/// ```no_run
/// # async fn run() -> Result<(), keyhaven::Error> {
/// use std::time::Duration;
/// use keyhaven::Client;
///
/// let client = Client::builder()
///     .connect_timeout(Some(Duration::from_secs(2)))
///     .request_timeout(Some(Duration::from_secs(10)))
///     .reconnect(true)
///     .connect("/run/keyhaven/keyhaven.sock")
///     .await?;
/// println!("{:?}", client.health().await?.status);
/// # Ok(()) }
/// ```
#[derive(Default, Clone)]
pub struct ClientBuilder {
    timeouts: Timeouts,
    hook: Option<EventHook>,
    reconnect: bool,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("timeouts", &self.timeouts)
            .field("reconnect", &self.reconnect)
            .field("events", &self.hook.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

impl ClientBuilder {
    /// The connect (and `hello`) timeout; `None` waits for ever.
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// The timeout of each request; `None` waits for ever.
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeouts.request = timeout;
        self
    }

    /// Both timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Calls `hook` for every [`Event`] on the connection.
    pub fn events(mut self, hook: EventHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Whether the client connects again, to the same socket, when the
    /// daemon closed the connection (a restart, an idle timeout); off by
    /// default. With it on:
    ///
    /// - a request that never reached the daemon (the connection had
    ///   already ended, or writing it failed) is sent once more on a new
    ///   connection;
    /// - a request in flight when the connection died is sent again only
    ///   when that is safe ([`retry`](crate::retry): read-only operations,
    ///   and `key_create`/`key_rotate` with an idempotency key); any other
    ///   fails with [`Error::Closed`], as it may have run;
    /// - a client subscribed to revocations reconnects at once, in the
    ///   background, and subscribes again; the hook hears
    ///   [`Event::Closed`] then [`Event::Reconnected`] (events in between
    ///   are lost: treat `Reconnected` as "everything may be revoked").
    ///
    /// Each reconnection waits for the socket (a restarting daemon) up to
    /// the connect timeout. A request is sent at most twice.
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }

    /// Connects to the socket at `path` and says `hello`, within the
    /// connect timeout.
    pub async fn connect(self, path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref().to_owned();
        let request_timeout = self.timeouts.request;
        let shared = Arc::new(Shared::new(Some(path), self));
        let conn = shared.open(false).await?;
        *shared.conn.lock().expect("conn lock") = Some(conn);
        Ok(Client { shared, request_timeout })
    }
}

/// A timeout as errors say it: `5 s`, `0.25 s`.
pub(crate) fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

/// What timed out, in an [`Error::Timeout`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimedOut {
    /// Connecting to this socket, or the daemon's answer to `hello` on it.
    Connect(PathBuf),
    /// The answer to a request of this operation.
    Request(String),
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimedOut::Connect(path) => write!(
                f,
                "connecting to the daemon at {} (it accepted no connection, or did not answer `hello`; \
                 is keyhavend starting or failing? see `systemctl status keyhavend`)",
                path.display()
            ),
            TimedOut::Request(op) => write!(f, "the daemon's answer to `{op}`"),
        }
    }
}

/// A response's `ok` body, as text: it may hold a plaintext or a data key,
/// so it is wiped when dropped.
type Body = Zeroizing<String>;

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Body, Error>>>>>>;

/// Something the daemon or the connection tells a client unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A revocation is durable (PROTOCOL.md §6). `None`: a scope this
    /// client may not see, or events were lost; it covers everything.
    Revoked(Option<Scope>),
    /// The connection ended; no more events will come on it.
    Closed,
    /// A [reconnecting](ClientBuilder::reconnect) client is connected
    /// again, and subscribed again if it was. Events between
    /// [`Event::Closed`] and this one were lost.
    Reconnected,
}

/// Called by the connection's reader task for each [`Event`], in order,
/// before it reads the next frame. It must be quick and must not block.
pub type EventHook = Arc<dyn Fn(Event) + Send + Sync>;

/// Any frame from the daemon: a response (with `id`) or an event. `ok` is
/// borrowed from the frame buffer and copied once into a [`Body`], so no
/// generic JSON tree holds a secret that would not be wiped.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    ok: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<wire::WireError>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default, borrow)]
    scope: Option<&'a RawValue>,
}

/// Serialises a frame into a buffer of the exact size, counted first, so
/// that no reallocation leaves an unwiped copy of a secret behind.
fn encode_wiped<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_err(|e| Error::Protocol(e.to_string()))?;
    if count.0 > crate::frame::MAX_FRAME_LEN {
        return Err(Error::FrameTooLarge(count.0));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(4 + count.0));
    out.extend_from_slice(&(count.0 as u32).to_be_bytes());
    serde_json::to_writer(&mut *out, value).map_err(|e| Error::Protocol(e.to_string()))?;
    debug_assert_eq!(out.len(), 4 + count.0);
    Ok(out)
}

/// A request frame body, serialised straight from the typed params.
#[derive(Serialize)]
struct Outgoing<'a, P: Serialize> {
    id: u64,
    op: &'a str,
    params: &'a P,
}

/// A connection to the daemon. Cheap to share behind an `Arc`; every method
/// takes `&self` and calls may run concurrently (they are pipelined on one
/// connection). With [`ClientBuilder::reconnect`] it survives a daemon
/// restart.
///
/// ```no_run
/// # async fn run() -> Result<(), keyhaven::Error> {
/// use keyhaven::Client;
///
/// let socket = Client::socket_from_env().unwrap_or_else(|| "/run/keyhaven/keyhaven.sock".into());
/// let client = Client::connect(&socket).await?;
/// let health = client.health().await?;
/// assert_eq!(health.status, "ok");
/// # Ok(()) }
/// ```
pub struct Client {
    shared: Arc<Shared>,
    request_timeout: Option<Duration>,
}

/// What a client and its background reconnection share.
struct Shared {
    /// The current connection (`None` only while the first one is made).
    conn: Mutex<Option<Arc<Connection>>>,
    /// The socket it connected to (`None` for [`Client::from_stream`]).
    socket: Option<PathBuf>,
    settings: ClientBuilder,
    /// Set once `subscribe_revocations` succeeded: a new connection
    /// subscribes again.
    subscribed: AtomicBool,
    /// One reconnection at a time.
    reconnecting: AsyncMutex<()>,
    /// Connections made so far (1 + reconnections).
    connections: AtomicU64,
    /// The number of the last connection attempted (each has its own, so
    /// that the end of a failed one is never taken for the current one's).
    attempts: AtomicU64,
    next_id: AtomicU64,
}

/// One connection: its writer, its table of requests waiting for answers,
/// and the task that reads answers and events.
struct Connection {
    /// Which of the client's connections this is (1, 2, ...).
    number: u64,
    writer: AsyncMutex<crate::socket::WriteHalf>,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Why a request failed, as far as sending it again goes.
enum Failure {
    /// It never reached the daemon: the connection had ended, or writing
    /// it failed.
    NotSent(Error),
    /// The connection ended after it was written, before its answer: it
    /// may have run.
    Lost,
    /// An answer (an error code), a timeout, a bad request.
    Final(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::NotSent(e) | Failure::Final(e) => e,
            Failure::Lost => Error::Closed,
        }
    }
}

/// The socket, the settings and the connection's state; nothing a request
/// carried (plaintexts, keys and contexts never stay in a client).
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conn = self.shared.current();
        let in_flight = conn.as_ref().and_then(|c| c.in_flight());
        f.debug_struct("Client")
            .field("socket", &self.shared.socket)
            .field("request_timeout", &self.request_timeout)
            .field("reconnect", &self.shared.settings.reconnect)
            .field("subscribed", &self.shared.subscribed.load(Ordering::Relaxed))
            .field("connections", &self.shared.connections.load(Ordering::Relaxed))
            .field("closed", &in_flight.is_none())
            .field("in_flight", &in_flight.unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn new(socket: Option<PathBuf>, settings: ClientBuilder) -> Shared {
        Shared {
            conn: Mutex::new(None),
            socket,
            settings,
            subscribed: AtomicBool::new(false),
            reconnecting: AsyncMutex::new(()),
            connections: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    fn current(&self) -> Option<Arc<Connection>> {
        self.conn.lock().expect("conn lock").clone()
    }

    fn can_reconnect(&self) -> bool {
        self.settings.reconnect && self.socket.is_some()
    }

    /// The hook of connection `number`: the user's, and, for a
    /// reconnecting client that is subscribed, a reconnection in the
    /// background as soon as it ends.
    fn hook_for(self: &Arc<Self>, number: u64) -> Option<EventHook> {
        let user = self.settings.hook.clone();
        if !self.can_reconnect() {
            return user;
        }
        let weak = Arc::downgrade(self);
        Some(Arc::new(move |event: Event| {
            let closed = event == Event::Closed;
            if let Some(hook) = &user {
                hook(event);
            }
            if closed && weak.upgrade().is_some_and(|s| s.subscribed.load(Ordering::SeqCst)) {
                tokio::spawn(resubscribe(weak.clone(), number));
            }
        }))
    }

    /// Connects to the socket and says `hello`, within the connect
    /// timeout; `patient` waits for a socket that is missing, refuses, or
    /// resets the connection (a daemon restarting: one killed with the
    /// connection still in its listening queue resets it) until then.
    async fn open(self: &Arc<Self>, patient: bool) -> Result<Arc<Connection>, Error> {
        let path = self.socket.as_deref().ok_or(Error::Closed)?;
        let attempt = async {
            let mut pause = Duration::from_millis(20);
            loop {
                let stream = match UnixStream::connect(path).await {
                    Ok(stream) => stream,
                    Err(e)
                        if patient
                            && matches!(
                                e.kind(),
                                std::io::ErrorKind::NotFound
                                    | std::io::ErrorKind::ConnectionRefused
                                    | std::io::ErrorKind::ConnectionReset
                            ) =>
                    {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                        continue;
                    }
                    Err(source) => return Err(Error::Connect { path: path.to_owned(), source }),
                };
                let number = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
                let conn = Connection::open(stream, self.hook_for(number), number)
                    .map_err(|source| Error::Connect { path: path.to_owned(), source })?;
                let conn = Arc::new(conn);
                // `hello` is part of connecting: its wait counts against the
                // connect timeout, not the request timeout.
                let hello = wire::Hello {
                    protocol: wire::PROTOCOL_VERSION,
                    client: Some(format!("keyhaven/{}", env!("CARGO_PKG_VERSION"))),
                };
                match self.exchange(&conn, wire::Hello::OP, &hello, None).await {
                    Ok(_) => {
                        self.connections.fetch_add(1, Ordering::SeqCst);
                        return Ok::<_, Error>(conn);
                    }
                    // A daemon stopping or starting may accept and close
                    // before it answers: try again while waiting is allowed.
                    Err(Failure::Lost | Failure::NotSent(Error::Closed)) if patient => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                    }
                    Err(failure) => return Err(failure.into_error()),
                }
            }
        };
        match self.settings.timeouts.connect {
            None => attempt.await,
            Some(after) => tokio::time::timeout(after, attempt)
                .await
                .map_err(|_| Error::Timeout { what: TimedOut::Connect(path.to_owned()), after })?,
        }
    }

    /// Replaces connection number `dead` with a new one (subscribed again
    /// if the client was), unless another call did so already.
    async fn reconnect(self: &Arc<Self>, dead: u64) -> Result<Arc<Connection>, Error> {
        let _one_at_a_time = self.reconnecting.lock().await;
        if let Some(current) = self.current() {
            if current.number != dead {
                return Ok(current);
            }
        }
        let conn = self.open(true).await?;
        if self.subscribed.load(Ordering::SeqCst) {
            let subscribe = wire::SubscribeRevocations {};
            self.exchange(&conn, wire::SubscribeRevocations::OP, &subscribe, self.settings.timeouts.connect)
                .await
                .map_err(Failure::into_error)?;
        }
        *self.conn.lock().expect("conn lock") = Some(conn.clone());
        if let Some(hook) = &self.settings.hook {
            hook(Event::Reconnected);
        }
        Ok(conn)
    }

    /// Sends one request on `conn` and waits for its answer.
    async fn exchange<P: Serialize>(
        &self,
        conn: &Connection,
        op: &str,
        params: &P,
        timeout: Option<Duration>,
    ) -> Result<Body, Failure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_wiped(&Outgoing { id, op, params }).map_err(Failure::Final)?;
        conn.exchange(id, op, &frame, timeout).await
    }
}

/// Reconnects a subscribed client whose connection `dead` ended, until it
/// is connected again or dropped.
async fn resubscribe(weak: Weak<Shared>, dead: u64) {
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.reconnect(dead).await.is_ok() {
            return;
        }
        drop(shared);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

impl Connection {
    /// Starts the reader task of a connected stream.
    fn open(stream: UnixStream, hook: Option<EventHook>, number: u64) -> std::io::Result<Connection> {
        let (read, write) = crate::socket::split(stream)?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(read_frames(read, pending.clone(), hook));
        Ok(Connection { number, writer: AsyncMutex::new(write), pending, reader })
    }

    /// Requests waiting for their answer; `None` once the connection ended.
    fn in_flight(&self) -> Option<usize> {
        self.pending.lock().expect("pending lock").as_ref().map(HashMap::len)
    }

    async fn exchange(
        &self,
        id: u64,
        op: &str,
        frame: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Body, Failure> {
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(Failure::NotSent(Error::Closed)),
        };
        let exchange = async {
            // A daemon that closed the connection (at a stop, or after an
            // idle timeout) shows as a broken pipe or a reset when writing.
            write_frame(&mut *self.writer.lock().await, frame)
                .await
                .map_err(|e| Failure::NotSent(e.peer_gone()))?;
            match rx.await {
                Ok(Ok(body)) => Ok(body),
                Ok(Err(Error::Closed)) | Err(_) => Err(Failure::Lost),
                Ok(Err(e)) => Err(Failure::Final(e)),
            }
        };
        let result = match timeout {
            None => exchange.await,
            Some(after) => tokio::time::timeout(after, exchange).await.unwrap_or_else(|_| {
                Err(Failure::Final(Error::Timeout { what: TimedOut::Request(op.to_owned()), after }))
            }),
        };
        if result.is_err() {
            if let Some(map) = self.pending.lock().expect("pending lock").as_mut() {
                map.remove(&id);
            }
        }
        result
    }
}

/// The reader task of a connection: answers to their waiters, events to
/// the hook, and, at the end, [`Event::Closed`] and every waiter failed.
async fn read_frames(read: crate::socket::ReadHalf, table: Pending, hook: Option<EventHook>) {
    // The reader zeroes each frame's bytes once the next is asked for.
    let mut frames = FrameReader::new(read);
    let end = loop {
        let buf = match frames.next().await {
            Ok(Some(buf)) => buf,
            Ok(None) => break Error::Closed,
            Err(e) => break e.peer_gone(),
        };
        let frame: Incoming = match serde_json::from_slice(buf) {
            Ok(f) => f,
            Err(e) => break Error::Protocol(format!("undecodable response: {e}")),
        };
        if let (None, Some(event)) = (frame.id, &frame.event) {
            // PROTOCOL.md §6: `revoked` with a scope; without one (a
            // scope this client may not see) or `lagged` (events
            // lost), everything is covered. Other events are newer
            // than this client and ignored.
            let scope = frame.scope.and_then(|v| serde_json::from_str::<Scope>(v.get()).ok());
            match (event.as_str(), &hook) {
                ("revoked", Some(h)) => h(Event::Revoked(scope)),
                ("lagged", Some(h)) => h(Event::Revoked(None)),
                _ => {}
            }
            continue;
        }
        let result = match (frame.ok, frame.error) {
            (_, Some(e)) => Err(Error::Daemon { code: e.code, message: e.message }),
            (Some(v), None) => Ok(Zeroizing::new(v.get().to_owned())),
            (None, None) => Err(Error::Protocol("response without ok or error".into())),
        };
        let id = frame.id;
        let waiter =
            id.and_then(|id| table.lock().expect("pending lock").as_mut().and_then(|m| m.remove(&id)));
        match waiter {
            Some(tx) => {
                let _ = tx.send(result);
            }
            // An error without a request id concerns the connection as a whole.
            None => {
                if let Err(e) = result {
                    break e;
                }
            }
        }
    };
    // Tell the hook first, so that whoever sees `is_closed` knows
    // the hook has heard of it.
    if let Some(h) = &hook {
        h(Event::Closed);
    }
    // Fail every call still waiting, and refuse new ones.
    let waiters = table.lock().expect("pending lock").take().unwrap_or_default();
    for (_, tx) in waiters {
        let _ = tx.send(Err(match &end {
            Error::Daemon { code, message } => Error::Daemon { code: *code, message: message.clone() },
            _ => Error::Closed,
        }));
    }
}

impl Client {
    /// Connects to the socket at `path` and says `hello`, with the default
    /// [`Timeouts`] (5 s to connect and be greeted, 30 s per request).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::builder().connect(path).await
    }

    /// Connects like [`connect`](Self::connect), with `hook` called for
    /// every [`Event`] on the connection.
    pub async fn connect_with_events(path: impl AsRef<Path>, hook: EventHook) -> Result<Client, Error> {
        Client::builder().events(hook).connect(path).await
    }

    /// A builder for other timeouts, reconnection or an event hook
    /// ([`ClientBuilder`]).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The socket path from `$KEYHAVEN_SOCKET`, if set.
    pub fn socket_from_env() -> Option<PathBuf> {
        std::env::var_os(SOCKET_ENV).map(PathBuf::from)
    }

    /// Wraps an already connected stream (no `hello` is sent; it cannot
    /// reconnect).
    pub fn from_stream(stream: UnixStream) -> Client {
        Client::from_stream_with_events(stream, None)
    }

    /// Wraps an already connected stream, with an event hook.
    pub fn from_stream_with_events(stream: UnixStream, hook: Option<EventHook>) -> Client {
        let shared = Arc::new(Shared::new(None, ClientBuilder { hook: hook.clone(), ..Default::default() }));
        shared.connections.store(1, Ordering::SeqCst);
        shared.attempts.store(1, Ordering::SeqCst);
        // A stream the runtime cannot watch gives a client that is closed
        // from the start (every call fails `Closed`).
        *shared.conn.lock().expect("conn lock") = Connection::open(stream, hook, 1).ok().map(Arc::new);
        Client { shared, request_timeout: Timeouts::default().request }
    }

    /// Sets the timeout of each request from now on (`None`: for ever).
    pub fn set_request_timeout(&mut self, timeout: Option<Duration>) {
        self.request_timeout = timeout;
    }

    /// Whether the connection has ended. A client that does not
    /// reconnect fails every further call; one that does connects again
    /// at its next call (or at once, when subscribed).
    pub fn is_closed(&self) -> bool {
        self.shared.current().is_none_or(|c| c.in_flight().is_none())
    }

    /// How many connections this client has made: 1, plus one per
    /// reconnection.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Subscribes this connection to revocation events (PROTOCOL.md §3.26,
    /// §6); they reach the hook given to [`ClientBuilder::events`] or
    /// [`connect_with_events`](Self::connect_with_events). A reconnecting
    /// client subscribes again on each new connection.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), keyhaven::Error> {
    /// use std::sync::Arc;
    /// use keyhaven::client::Event;
    /// use keyhaven::Client;
    ///
    /// let hook = Arc::new(|event: Event| match event {
    ///     Event::Revoked(Some(scope)) => eprintln!("revoked: {scope:?}"),
    ///     Event::Revoked(None) | Event::Reconnected => eprintln!("drop every cached key"),
    ///     _ => {}
    /// });
    /// let client = Client::builder().events(hook).reconnect(true).connect("/run/keyhaven/keyhaven.sock").await?;
    /// client.subscribe_revocations().await?;
    /// # Ok(()) }
    /// ```
    pub async fn subscribe_revocations(&self) -> Result<wire::SubscribeResponse, Error> {
        let answer = self.call(&wire::SubscribeRevocations {}).await?;
        self.shared.subscribed.store(true, Ordering::SeqCst);
        Ok(answer)
    }

    /// Sends any operation and waits for its typed response.
    pub async fn call<O: Operation + 'static>(&self, params: &O) -> Result<O::Response, Error> {
        let body = self.send(O::OP, params, crate::retry::is_safe(params)).await?;
        serde_json::from_str(&body).map_err(|e| Error::Protocol(format!("bad `{}` response: {e}", O::OP)))
    }

    /// Sends an operation by name with raw JSON params (for tools and tests).
    pub async fn call_raw(&self, op: &str, params: Value) -> Result<Value, Error> {
        let safe = crate::retry::is_safe_raw(op, &params);
        let body = self.send(op, &params, safe).await?;
        serde_json::from_str(&body).map_err(|e| Error::Protocol(format!("bad `{op}` response: {e}")))
    }

    /// Sends a request, on a new connection when the last one ended and
    /// the client reconnects; once more after a failure when
    /// [`retry`](crate::retry) allows.
    async fn send<P: Serialize>(&self, op: &str, params: &P, retry_safe: bool) -> Result<Body, Error> {
        let shared = &self.shared;
        let mut conn = shared.current().ok_or(Error::Closed)?;
        if shared.can_reconnect() && conn.in_flight().is_none() {
            conn = shared.reconnect(conn.number).await?;
        }
        let first = shared.exchange(&conn, op, params, self.request_timeout).await;
        match first {
            Ok(body) => Ok(body),
            Err(Failure::NotSent(_)) if shared.can_reconnect() => {
                let conn = shared.reconnect(conn.number).await?;
                shared.exchange(&conn, op, params, self.request_timeout).await.map_err(Failure::into_error)
            }
            Err(Failure::Lost) if shared.can_reconnect() && retry_safe => {
                let conn = shared.reconnect(conn.number).await?;
                shared.exchange(&conn, op, params, self.request_timeout).await.map_err(Failure::into_error)
            }
            Err(failure) => Err(failure.into_error()),
        }
    }

    /// Daemon, token and store status.
    pub async fn health(&self) -> Result<wire::HealthResponse, Error> {
        self.call(&wire::Health {}).await
    }

    /// The daemon's metrics, in the Prometheus text format (needs the
    /// `metrics` permission).
    pub async fn metrics(&self) -> Result<String, Error> {
        Ok(self.call(&wire::Metrics {}).await?.text)
    }

    /// Creates a named key.
    pub async fn key_create(&self, path: &KeyPath) -> Result<wire::KeyInfo, Error> {
        self.key_create_of_type(path, crate::KeyType::default()).await
    }

    /// Creates a named key of type `key_type`.
    pub async fn key_create_of_type(
        &self,
        path: &KeyPath,
        key_type: crate::KeyType,
    ) -> Result<wire::KeyInfo, Error> {
        self.key_create_with(path, &KeyOptions::new().key_type(key_type)).await
    }

    /// Creates a named key with [`KeyOptions`] (type, automatic rotation,
    /// idempotency key), in one request and one write.
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use std::time::Duration;
    /// use keyhaven::{KeyOptions, KeyPath};
    ///
    /// let key: KeyPath = "acme/pii".parse()?;
    /// let options = KeyOptions::new().rotate_every(Duration::from_secs(90 * 86_400)).idempotency_key("setup-acme-pii");
    /// let created = client.key_create_with(&key, &options).await?;
    /// assert_eq!(created.current_version, 1);
    /// // A new version now; data keys made from here on use it.
    /// let rotated = client.key_rotate(&key, Some("rotate-2026-12")).await?;
    /// assert_eq!(rotated.current_version, 2);
    /// # Ok(()) }
    /// ```
    pub async fn key_create_with(
        &self,
        path: &KeyPath,
        options: &KeyOptions,
    ) -> Result<wire::KeyInfo, Error> {
        self.call(&wire::KeyCreate {
            tenant: path.tenant().into(),
            key: path.key().into(),
            key_type: options.key_type,
            rotate_every_secs: options.rotate_every.map(|d| d.as_secs()),
            idempotency_key: options.idempotency_key.clone(),
            description: options.description.clone(),
            tags: options.tags.clone(),
        })
        .await
    }

    /// A key's versions, states, dates, rotation period and usage
    /// (`key_show`).
    pub async fn key_show(&self, path: &KeyPath) -> Result<crate::lifecycle::KeyDetails, Error> {
        self.call(&crate::lifecycle::KeyShow { tenant: path.tenant().into(), key: path.key().into() }).await
    }

    /// Gives a key a new current version, made in the token (`key_rotate`).
    /// With an `idempotency_key`, a retry of the same rotation (after a
    /// lost answer) adds no second version, and a reconnecting client
    /// retries it by itself.
    pub async fn key_rotate(
        &self,
        path: &KeyPath,
        idempotency_key: Option<&str>,
    ) -> Result<crate::lifecycle::KeyDetails, Error> {
        self.call(&crate::lifecycle::KeyRotate {
            tenant: path.tenant().into(),
            key: path.key().into(),
            idempotency_key: idempotency_key.map(Into::into),
        })
        .await
    }

    /// An ECDSA signature (DER, base64 in the answer) of `message` under a
    /// signing key's current version; the daemon hashes it with the key
    /// type's hash.
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::{KeyOptions, KeyPath, KeyType};
    ///
    /// let key: KeyPath = "acme/tokens".parse()?;
    /// client.key_create_with(&key, &KeyOptions::new().key_type(KeyType::EcdsaP256)).await?;
    /// let signed = client.sign(&key, b"release-1.2.tar.gz digest").await?;
    /// // Anyone verifies it with the PEM public key (openssl, a JOSE library).
    /// let public = client.public_key(&key, Some(signed.key_version)).await?;
    /// assert!(public.pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    /// # Ok(()) }
    /// ```
    pub async fn sign(&self, path: &KeyPath, message: &[u8]) -> Result<crate::sign::SignResponse, Error> {
        self.call(&crate::sign::Sign {
            tenant: path.tenant().into(),
            key: path.key().into(),
            message: Some(SecretBytes::from_slice(message)),
            digest: None,
        })
        .await
    }

    /// The PEM public key of a signing key: its current version, or
    /// `version`.
    pub async fn public_key(
        &self,
        path: &KeyPath,
        version: Option<u32>,
    ) -> Result<crate::sign::PublicKeyResponse, Error> {
        self.call(&crate::sign::PublicKey { tenant: path.tenant().into(), key: path.key().into(), version })
            .await
    }

    /// Who the daemon takes this process for, and what it may do.
    pub async fn whoami(&self) -> Result<wire::WhoamiResponse, Error> {
        self.call(&wire::Whoami {}).await
    }

    /// The MAC tag (`khm1:…`) of `message` under an `hmac-sha256` key: its
    /// current version, or `version`.
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::{KeyOptions, KeyPath, KeyType};
    ///
    /// let key: KeyPath = "acme/email-index".parse()?;
    /// client.key_create_with(&key, &KeyOptions::new().key_type(KeyType::HmacSha256)).await?;
    /// // A blind index: equal emails give equal tags, the tag reveals nothing.
    /// let tag = client.mac(&key, b"alice@example.com", None).await?.to_tag()?;
    /// assert!(client.mac_verify(&key, b"alice@example.com", &tag).await?);
    /// # Ok(()) }
    /// ```
    pub async fn mac(
        &self,
        path: &KeyPath,
        message: &[u8],
        version: Option<u32>,
    ) -> Result<crate::mac::MacResponse, Error> {
        let req = crate::mac::Mac {
            tenant: path.tenant().into(),
            key: path.key().into(),
            message: SecretBytes::from_slice(message),
            version,
        };
        self.call(&req).await
    }

    /// Whether `tag` (`khm1:…` or a [`MacTag`](crate::mac::MacTag)) is the
    /// MAC of `message` under the version of `path` it names.
    pub async fn mac_verify(
        &self,
        path: &KeyPath,
        message: &[u8],
        tag: &(impl AsText + ?Sized),
    ) -> Result<bool, Error> {
        let req = crate::mac::MacVerify {
            tenant: path.tenant().into(),
            key: path.key().into(),
            message: SecretBytes::from_slice(message),
            tag: tag.as_text().into_owned(),
        };
        Ok(self.call(&req).await?.valid)
    }

    /// Checks `signature` (as `sign` gives it, base64) of `message` under
    /// `version` of the signing key `path` (the current one when `None`),
    /// in the daemon's token. `valid` says whether it verifies.
    pub async fn verify(
        &self,
        path: &KeyPath,
        message: &[u8],
        signature: &str,
        version: Option<u32>,
    ) -> Result<crate::sign::VerifyResponse, Error> {
        let req = crate::sign::Verify {
            tenant: path.tenant().into(),
            key: path.key().into(),
            version,
            message: Some(SecretBytes::from_slice(message)),
            digest: None,
            signature: signature.into(),
        };
        self.call(&req).await
    }

    /// Lists named keys, of one tenant or all, following every page.
    pub async fn key_list(&self, tenant: Option<&str>) -> Result<Vec<wire::KeyInfo>, Error> {
        let mut keys = Vec::new();
        let mut after = None;
        loop {
            let page = self.key_list_page(tenant, after.take(), None).await?;
            keys.extend(page.keys);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// One page of [`key_list`](Self::key_list): at most `limit` keys
    /// (default and most: [`wire::MAX_LIST_PAGE`]) after `after`.
    pub async fn key_list_page(
        &self,
        tenant: Option<&str>,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<wire::KeyListResponse, Error> {
        self.call(&wire::KeyList { tenant: tenant.map(Into::into), limit, after, tags: Default::default() })
            .await
    }

    /// Every revocation in force (of one tenant, or all), following every
    /// page of `revoke_list`.
    pub async fn revoke_list(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<crate::revocation::Revocation>, Error> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .call(&crate::revocation::RevokeList {
                    tenant: tenant.map(Into::into),
                    limit: None,
                    after: after.take(),
                })
                .await?;
            all.extend(page.revocations);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// Encrypts up to 64 KiB; returns the text ciphertext and its metadata
    /// (larger data: [`datakey`](Self::datakey) or a [`Sealer`](crate::Sealer)).
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::{EncryptionContext, KeyPath};
    ///
    /// let key: KeyPath = "acme/pii".parse()?;
    /// let ctx = EncryptionContext::from_pairs(["table=users", "row=42"])?;
    /// let sealed = client.encrypt(&key, b"4111 1111 1111 1111", &ctx).await?;
    /// // Store `sealed.ciphertext` (`khc1:…`); the context is given again to decrypt.
    /// let id = sealed.id()?; // what `keyhaven revoke datakey` takes
    /// let opened = client.decrypt(&sealed.ciphertext, &ctx).await?;
    /// assert_eq!(opened.plaintext.expose(), b"4111 1111 1111 1111");
    /// assert_eq!(opened.id()?, id);
    /// # Ok(()) }
    /// ```
    pub async fn encrypt(
        &self,
        path: &KeyPath,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<wire::EncryptResponse, Error> {
        let req = wire::Encrypt {
            tenant: path.tenant().into(),
            key: path.key().into(),
            plaintext: SecretBytes::from_slice(plaintext),
            context: context.clone(),
        };
        self.call(&req).await
    }

    /// Decrypts a ciphertext: its text form (`khc1:…`) or a
    /// [`Ciphertext`](crate::Ciphertext).
    pub async fn decrypt(
        &self,
        ciphertext: &(impl AsText + ?Sized),
        context: &EncryptionContext,
    ) -> Result<wire::DecryptResponse, Error> {
        self.call(&wire::Decrypt { ciphertext: ciphertext.as_text().into_owned(), context: context.clone() })
            .await
    }

    /// Generates a data key under `path`: the key and its envelope
    /// ([`Plaintext::Include`]), or only the envelope ([`Plaintext::Omit`]).
    ///
    /// ```no_run
    /// # async fn run(client: keyhaven::Client) -> Result<(), keyhaven::Error> {
    /// use keyhaven::{EncryptionContext, KeyPath, Plaintext};
    ///
    /// let key: KeyPath = "acme/backups".parse()?;
    /// let ctx = EncryptionContext::from_pairs(["backup=2026-12-01"])?;
    /// let fresh = client.datakey(&key, &ctx, Plaintext::Include).await?;
    /// let envelope = fresh.to_envelope()?; // store it next to the data
    /// let data_key = fresh.plaintext.expect("asked for it"); // 32 bytes, wiped on drop
    /// // Later: the daemon unwraps it again, under the same context.
    /// let again = client.datakey_decrypt(&envelope, &ctx).await?;
    /// assert_eq!(again.plaintext, data_key);
    /// # Ok(()) }
    /// ```
    pub async fn datakey(
        &self,
        path: &KeyPath,
        context: &EncryptionContext,
        plaintext: Plaintext,
    ) -> Result<wire::DatakeyResponse, Error> {
        let req = wire::Datakey {
            tenant: path.tenant().into(),
            key: path.key().into(),
            context: context.clone(),
            include_plaintext: plaintext == Plaintext::Include,
        };
        self.call(&req).await
    }

    /// Unwraps a data key from its envelope: the text form (`khe1:…`) or
    /// an [`Envelope`](crate::Envelope).
    pub async fn datakey_decrypt(
        &self,
        envelope: &(impl AsText + ?Sized),
        context: &EncryptionContext,
    ) -> Result<wire::DecryptResponse, Error> {
        self.call(&wire::DatakeyDecrypt {
            envelope: envelope.as_text().into_owned(),
            context: context.clone(),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wiped_frames_are_the_frames_of_encode_frame() {
        let params = wire::Encrypt {
            tenant: "acme".into(),
            key: "pii".into(),
            plaintext: SecretBytes::from_slice(b"hunter2"),
            context: EncryptionContext::from_pairs(["a=1"]).unwrap(),
        };
        let frame = encode_wiped(&Outgoing { id: 7, op: "encrypt", params: &params }).unwrap();
        let value = serde_json::json!({"id": 7, "op": "encrypt", "params": params});
        assert_eq!(frame[..4], ((frame.len() - 4) as u32).to_be_bytes());
        assert_eq!(serde_json::from_slice::<Value>(&frame[4..]).unwrap(), value);
        assert_eq!(frame.capacity(), frame.len());
    }

    /// Debug of a client with a request in flight, of its builder, and of
    /// the answers that carry keys shows no plaintext, data key or
    /// context value.
    #[tokio::test]
    async fn debug_shows_no_secret() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let client = Arc::new(Client::from_stream(ours));
        let ctx = EncryptionContext::from_pairs(["user=alice@example.com"]).unwrap();
        let path: KeyPath = "acme/pii".parse().unwrap();
        let c = client.clone();
        let ctx2 = ctx.clone();
        let call = tokio::spawn(async move { c.encrypt(&path, b"hunter2-plaintext", &ctx2).await });
        while client.shared.current().unwrap().in_flight() == Some(0) {
            tokio::task::yield_now().await;
        }
        let shown = format!("{client:?} {:?}", Client::builder().events(Arc::new(|_| {})));
        assert!(shown.contains("in_flight: 1") && shown.contains("<hook>"), "{shown}");
        let key = [0x5au8; 32];
        let dk = wire::DatakeyResponse {
            envelope: "khe1:AAAA".into(),
            envelope_id: "00".repeat(16),
            key_version: 1,
            plaintext: Some(SecretBytes::from_slice(&key)),
        };
        let shown = format!("{shown} {dk:?} {dk:#?} {ctx:?}");
        for secret in ["hunter2", "alice", "Wlpa", "5a, 5a", "90, 90"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("32 bytes redacted"), "{shown}");
        call.abort();
    }

    /// A daemon that closed the connection is `Closed` ("the daemon closed
    /// the connection"), never a raw "Broken pipe", whichever of the write
    /// and the read notices first.
    #[tokio::test]
    async fn a_connection_the_peer_closed_is_closed_not_a_broken_pipe() {
        for _ in 0..20 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            drop(theirs);
            let client = Client::from_stream(ours);
            let e = client.health().await.expect_err("nobody answers");
            assert!(matches!(e, Error::Closed), "{e:?}");
        }
    }
}
