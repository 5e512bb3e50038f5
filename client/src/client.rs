//! An async client for `keyhavend` that pipelines: many requests may be in
//! flight on one connection, each answered through its own channel when its
//! response (matched by id) arrives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Mutex as AsyncMutex};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::error::Error;
use crate::frame::{write_frame, FrameReader};
use crate::names::KeyPath;
use crate::revocation::Scope;
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

/// Connects a [`Client`] with other timeouts or an event hook:
/// `Client::builder().request_timeout(None).connect(path)`.
#[derive(Default, Clone)]
pub struct ClientBuilder {
    timeouts: Timeouts,
    hook: Option<EventHook>,
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

    /// Connects to the socket at `path` and says `hello`, within the
    /// connect timeout.
    pub async fn connect(self, path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref();
        let timeouts = self.timeouts;
        let attempt = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| Error::Connect { path: path.to_owned(), source })?;
            let mut client = Client::from_stream_with_events(stream, self.hook);
            // `hello` is part of connecting: its wait counts against the
            // connect timeout, not the request timeout.
            client.request_timeout = None;
            let client = Client::hello(client).await?;
            Ok::<Client, Error>(client)
        };
        let mut client = match timeouts.connect {
            None => attempt.await?,
            Some(after) => tokio::time::timeout(after, attempt)
                .await
                .map_err(|_| Error::Timeout { what: TimedOut::Connect(path.to_owned()), after })??,
        };
        client.request_timeout = timeouts.request;
        Ok(client)
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
/// takes `&self` and calls may run concurrently.
pub struct Client {
    writer: AsyncMutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    request_timeout: Option<Duration>,
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

    /// A builder for other timeouts ([`ClientBuilder`]).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    async fn hello(client: Client) -> Result<Client, Error> {
        let hello = wire::Hello {
            protocol: wire::PROTOCOL_VERSION,
            client: Some(format!("keyhaven/{}", env!("CARGO_PKG_VERSION"))),
        };
        client.call(&hello).await?;
        Ok(client)
    }

    /// The socket path from `$KEYHAVEN_SOCKET`, if set.
    pub fn socket_from_env() -> Option<PathBuf> {
        std::env::var_os(SOCKET_ENV).map(PathBuf::from)
    }

    /// Wraps an already connected stream (no `hello` is sent).
    pub fn from_stream(stream: UnixStream) -> Client {
        Client::from_stream_with_events(stream, None)
    }

    /// Wraps an already connected stream, with an event hook.
    pub fn from_stream_with_events(stream: UnixStream, hook: Option<EventHook>) -> Client {
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let table = pending.clone();
        let reader = tokio::spawn(async move {
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
                let waiter = id
                    .and_then(|id| table.lock().expect("pending lock").as_mut().and_then(|m| m.remove(&id)));
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
                    Error::Daemon { code, message } => {
                        Error::Daemon { code: *code, message: message.clone() }
                    }
                    _ => Error::Closed,
                }));
            }
        });
        Client {
            writer: AsyncMutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            request_timeout: Timeouts::default().request,
        }
    }

    /// Sets the timeout of each request from now on (`None`: for ever).
    pub fn set_request_timeout(&mut self, timeout: Option<Duration>) {
        self.request_timeout = timeout;
    }

    /// Whether the connection has ended (every further call fails).
    pub fn is_closed(&self) -> bool {
        self.pending.lock().expect("pending lock").is_none()
    }

    /// Subscribes this connection to revocation events (PROTOCOL.md §3.26,
    /// §6); they reach the hook given to
    /// [`connect_with_events`](Self::connect_with_events).
    pub async fn subscribe_revocations(&self) -> Result<wire::SubscribeResponse, Error> {
        self.call(&wire::SubscribeRevocations {}).await
    }

    /// Sends any operation and waits for its typed response.
    pub async fn call<O: Operation>(&self, params: &O) -> Result<O::Response, Error> {
        let body = self.send(O::OP, params).await?;
        serde_json::from_str(&body).map_err(|e| Error::Protocol(format!("bad `{}` response: {e}", O::OP)))
    }

    /// Sends an operation by name with raw JSON params (for tools and tests).
    pub async fn call_raw(&self, op: &str, params: Value) -> Result<Value, Error> {
        let body = self.send(op, &params).await?;
        serde_json::from_str(&body).map_err(|e| Error::Protocol(format!("bad `{op}` response: {e}")))
    }

    async fn send<P: Serialize>(&self, op: &str, params: &P) -> Result<Body, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_wiped(&Outgoing { id, op, params })?;
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(Error::Closed),
        };
        let exchange = async {
            // A daemon that closed the connection (at a stop, or after an
            // idle timeout) shows as a broken pipe or a reset when writing.
            write_frame(&mut *self.writer.lock().await, &frame).await.map_err(Error::peer_gone)?;
            rx.await.map_err(|_| Error::Closed)?
        };
        let result = match self.request_timeout {
            None => exchange.await,
            Some(after) => tokio::time::timeout(after, exchange)
                .await
                .unwrap_or_else(|_| Err(Error::Timeout { what: TimedOut::Request(op.to_owned()), after })),
        };
        if result.is_err() {
            if let Some(map) = self.pending.lock().expect("pending lock").as_mut() {
                map.remove(&id);
            }
        }
        result
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
        self.key_create_with(path, key_type, None).await
    }

    /// Creates a named key of type `key_type` that rotates automatically
    /// every `rotate_every_secs` seconds (none when `None`), in one write.
    pub async fn key_create_with(
        &self,
        path: &KeyPath,
        key_type: crate::KeyType,
        rotate_every_secs: Option<u64>,
    ) -> Result<wire::KeyInfo, Error> {
        self.call(&wire::KeyCreate {
            tenant: path.tenant().into(),
            key: path.key().into(),
            key_type,
            rotate_every_secs,
            idempotency_key: None,
        })
        .await
    }

    /// The MAC tag (`khm1:…`) of `message` under an `hmac-sha256` key: its
    /// current version, or `version`.
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

    /// Whether `tag` is the MAC of `message` under the version of `path` it
    /// names.
    pub async fn mac_verify(&self, path: &KeyPath, message: &[u8], tag: &str) -> Result<bool, Error> {
        let req = crate::mac::MacVerify {
            tenant: path.tenant().into(),
            key: path.key().into(),
            message: SecretBytes::from_slice(message),
            tag: tag.into(),
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
        self.call(&wire::KeyList { tenant: tenant.map(Into::into), limit, after }).await
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

    /// Encrypts up to 64 KiB; returns the text ciphertext and its metadata.
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

    /// Decrypts a text ciphertext.
    pub async fn decrypt(
        &self,
        ciphertext: &str,
        context: &EncryptionContext,
    ) -> Result<wire::DecryptResponse, Error> {
        self.call(&wire::Decrypt { ciphertext: ciphertext.into(), context: context.clone() }).await
    }

    /// Generates a data key under `path`; with `include_plaintext` false
    /// only the envelope comes back.
    pub async fn datakey(
        &self,
        path: &KeyPath,
        context: &EncryptionContext,
        include_plaintext: bool,
    ) -> Result<wire::DatakeyResponse, Error> {
        let req = wire::Datakey {
            tenant: path.tenant().into(),
            key: path.key().into(),
            context: context.clone(),
            include_plaintext,
        };
        self.call(&req).await
    }

    /// Unwraps a data key from its text envelope.
    pub async fn datakey_decrypt(
        &self,
        envelope: &str,
        context: &EncryptionContext,
    ) -> Result<wire::DecryptResponse, Error> {
        self.call(&wire::DatakeyDecrypt { envelope: envelope.into(), context: context.clone() }).await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
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
