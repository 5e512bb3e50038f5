//! [`Sealer`]: seal and open records and streams in this process with data
//! keys from the daemon, cached within required limits, and dropped the
//! moment the daemon reports a revocation that covers them.
//!
//! The sealer keeps one connection, subscribed to revocation events
//! (PROTOCOL.md §3.26, §6). The connection's reader task applies each event
//! to the caches before it reads the next frame, so once a revocation has
//! reached this process no operation uses a key in its scope again. Keys are
//! cached only while the subscription is live: when the connection ends the
//! caches are emptied, nothing is cached until the next operation has
//! reconnected and resubscribed, and a key fetched while a revocation event
//! arrived is used for its one operation but not cached.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Mutex as AsyncMutex;
use zeroize::Zeroizing;

use crate::cache::{KeyOrigin, OpenCache, OpenLimits, SealCache, SealLimits, Taken};
use crate::client::{Client, Event, EventHook};
use crate::context::EncryptionContext;
use crate::envelope::{Envelope, EnvelopeId};
use crate::error::Error;
use crate::names::KeyPath;
use crate::seal::{self, ChunkCipher, DataKey, SealedRecord, StreamHeader};

/// Counters of what the sealer did, for tests, tools and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `datakey` calls (new data keys fetched).
    pub datakeys: u64,
    /// `datakey_decrypt` calls (data keys unwrapped by the daemon).
    pub unwraps: u64,
    /// Records sealed with a cached key.
    pub seal_hits: u64,
    /// Records opened with a cached key.
    pub open_hits: u64,
    /// Keys dropped from either cache by revocation events.
    pub revoked: u64,
    /// Revocation events received.
    pub events: u64,
    /// Connections made (1 + reconnects).
    pub connections: u64,
    /// Keys now in the sealing cache.
    pub seal_keys: usize,
    /// Keys now in the opening cache.
    pub open_keys: usize,
}

struct State {
    /// True while the current connection is subscribed.
    live: bool,
    /// Bumped by every revocation event and every lost connection: a key
    /// fetched across a bump is not cached.
    epoch: u64,
    /// Which connection is current (its events about closing count).
    generation: u64,
    seal: SealCache,
    open: OpenCache,
    stats: Stats,
}

impl State {
    fn apply(&mut self, generation: u64, event: Event) {
        match event {
            Event::Revoked(scope) => {
                self.epoch += 1;
                self.stats.events += 1;
                let n = self.seal.revoke(scope.as_ref()) + self.open.revoke(scope.as_ref());
                self.stats.revoked += n as u64;
            }
            // The sealer's client does not reconnect by itself: it makes a
            // new one (and a new generation) at its next operation.
            Event::Reconnected => {}
            Event::Closed => {
                // Any connection that ends empties the caches (a late
                // notice from an old one only costs a refetch); only the
                // current one's end stops caching until resubscribed.
                self.epoch += 1;
                if generation == self.generation {
                    self.live = false;
                }
                self.seal.revoke(None);
                self.open.revoke(None);
            }
        }
    }
}

/// Seals and opens with cached data keys. Cheap to share (`Clone` shares
/// one connection and one pair of caches); every method takes `&self`.
#[derive(Clone)]
pub struct Sealer {
    socket: PathBuf,
    conn: Arc<AsyncMutex<Option<Arc<Client>>>>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Sealer")
            .field("socket", &self.socket)
            .field("live", &s.live)
            .field("seal", &s.seal)
            .field("open", &s.open)
            .finish()
    }
}

impl Sealer {
    /// Connects to the daemon at `socket` and subscribes to revocations.
    /// Both limits are required (docs/ENVELOPE.md §10.3).
    pub async fn connect(
        socket: impl AsRef<Path>,
        seal: SealLimits,
        open: OpenLimits,
    ) -> Result<Sealer, Error> {
        let s = Sealer {
            socket: socket.as_ref().to_owned(),
            conn: Arc::new(AsyncMutex::new(None)),
            state: Arc::new(Mutex::new(State {
                live: false,
                epoch: 0,
                generation: 0,
                seal: SealCache::new(seal),
                open: OpenCache::new(open),
                stats: Stats::default(),
            })),
        };
        s.client().await?;
        Ok(s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the sealer did so far, and what its caches hold now.
    pub fn stats(&self) -> Stats {
        let s = self.lock();
        Stats { seal_keys: s.seal.len(), open_keys: s.open.len(), ..s.stats }
    }

    /// Whether the current connection is subscribed (keys may be cached).
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    /// Where the cached keys came from: (sealing cache, opening cache).
    pub fn cached(&self) -> (Vec<KeyOrigin>, Vec<KeyOrigin>) {
        let s = self.lock();
        (s.seal.origins(), s.open.origins())
    }

    /// Drops every cached key now.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.epoch += 1;
        s.seal.revoke(None);
        s.open.revoke(None);
    }

    /// The subscribed connection, made (again) when there is none or it
    /// has ended.
    pub async fn client(&self) -> Result<Arc<Client>, Error> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *conn = None;
        let generation = {
            // Events may have been missed since the old connection ended:
            // nothing cached then may be used again.
            let mut s = self.lock();
            s.generation += 1;
            s.live = false;
            s.epoch += 1;
            s.seal.revoke(None);
            s.open.revoke(None);
            s.generation
        };
        let state = Arc::downgrade(&self.state);
        let hook: EventHook = Arc::new(move |event| {
            if let Some(state) = state.upgrade() {
                state.lock().unwrap_or_else(|e| e.into_inner()).apply(generation, event);
            }
        });
        let client = Arc::new(Client::connect_with_events(&self.socket, hook).await?);
        client.subscribe_revocations().await?;
        {
            let mut s = self.lock();
            s.stats.connections += 1;
            // Events that came before the answer are applied already; a
            // connection that ended meanwhile stays not live.
            s.live = s.generation == generation && !client.is_closed();
        }
        *conn = Some(client.clone());
        Ok(client)
    }

    /// Seals `plaintext` under `path` and `context` (ENVELOPE.md §10.1):
    /// with the partition's cached data key while its limits allow, else
    /// with a new one from the daemon. Returns the binary sealed record
    /// ([`seal::sealed_to_text`] gives the `khs1:` text form).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), keyhaven::Error> {
    /// use std::time::Duration;
    /// use keyhaven::{EncryptionContext, KeyPath, OpenLimits, SealLimits, Sealer};
    ///
    /// // One data key seals at most 10 000 records or 64 MiB, for 5 minutes.
    /// let seal = SealLimits::new(Duration::from_secs(300), 10_000, 64 << 20)?;
    /// let open = OpenLimits::new(Duration::from_secs(300), 1_000)?;
    /// let sealer = Sealer::connect("/run/keyhaven/keyhaven.sock", seal, open).await?;
    /// let key: KeyPath = "acme/events".parse()?;
    /// let ctx = EncryptionContext::from_pairs(["stream=clicks"])?;
    /// let record = sealer.seal(&key, b"{\"user\": 42}", &ctx).await?;
    /// assert_eq!(&sealer.open(&record, &ctx).await?[..], b"{\"user\": 42}");
    /// # Ok(()) }
    /// ```
    pub async fn seal(
        &self,
        path: &KeyPath,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, Error> {
        context.validate()?;
        let mut part = Vec::new();
        context.encode(&mut part);
        let len = plaintext.len() as u64;
        let client = self.client().await?;
        let epoch = {
            let mut s = self.lock();
            // A record over `max_bytes` leaves the cached key alone.
            if s.live && s.seal.admits(len) {
                if let Some(t) = s.seal.take(path, &part, len, Instant::now()) {
                    s.stats.seal_hits += 1;
                    drop(s);
                    return seal::seal_record(&t.key, &t.envelope, context, plaintext);
                }
            }
            s.epoch
        };
        let resp = client.datakey(path, context, crate::client::Plaintext::Include).await?;
        let created = Instant::now();
        let plain =
            resp.plaintext.ok_or_else(|| Error::Protocol("`datakey` returned no plaintext key".into()))?;
        let envelope: Envelope = resp.envelope.parse()?;
        let taken = Taken {
            key: Arc::new(DataKey::new(plain.expose())?),
            envelope: Arc::from(envelope.to_bytes()),
            origin: KeyOrigin {
                path: envelope.path().clone(),
                version: envelope.key_version(),
                id: envelope.id(),
            },
        };
        drop(plain);
        {
            let mut s = self.lock();
            s.stats.datakeys += 1;
            if s.live && s.epoch == epoch && s.seal.admits(len) {
                s.seal.insert(path, &part, taken.clone(), len, created);
            }
        }
        seal::seal_record(&taken.key, &taken.envelope, context, plaintext)
    }

    /// Opens a sealed record (binary form) under `context`.
    pub async fn open(
        &self,
        sealed: &[u8],
        context: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let record = SealedRecord::parse(sealed)?;
        let key = self.unwrap_key(record.envelope(), record.envelope_bytes(), context).await?;
        record.open(&key, context)
    }

    /// Opens the `khs1:` text form of a sealed record.
    pub async fn open_text(
        &self,
        text: &str,
        context: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.open(&seal::sealed_from_text(text)?, context).await
    }

    /// The data key of `envelope`: from the opening cache, else unwrapped
    /// by the daemon (`datakey_decrypt`) and cached.
    async fn unwrap_key(
        &self,
        envelope: &Envelope,
        bytes: &[u8],
        context: &EncryptionContext,
    ) -> Result<Arc<DataKey>, Error> {
        context.validate()?;
        let client = self.client().await?;
        let id: EnvelopeId = envelope.id();
        let epoch = {
            let mut s = self.lock();
            if s.live {
                if let Some(t) = s.open.get(&id, bytes, Instant::now()) {
                    s.stats.open_hits += 1;
                    return Ok(t.key);
                }
            }
            s.epoch
        };
        let resp = client.datakey_decrypt(&envelope.to_string(), context).await?;
        let created = Instant::now();
        let key = Arc::new(DataKey::new(resp.plaintext.expose())?);
        let mut s = self.lock();
        s.stats.unwraps += 1;
        if s.live && s.epoch == epoch {
            let origin = KeyOrigin {
                path: envelope.path().clone(),
                version: envelope.key_version(),
                id: envelope.id(),
            };
            s.open.insert(Taken { key: key.clone(), envelope: Arc::from(bytes), origin }, created);
        }
        Ok(key)
    }

    /// A new data key for one stream (never cached: a stream's chunk nonces
    /// are unique only under a key of its own).
    pub(crate) async fn stream_key(
        &self,
        path: &KeyPath,
        context: &EncryptionContext,
        chunk: u32,
    ) -> Result<(ChunkCipher, StreamHeader), Error> {
        context.validate()?;
        let client = self.client().await?;
        let resp = client.datakey(path, context, crate::client::Plaintext::Include).await?;
        self.lock().stats.datakeys += 1;
        let plain =
            resp.plaintext.ok_or_else(|| Error::Protocol("`datakey` returned no plaintext key".into()))?;
        let envelope: Envelope = resp.envelope.parse()?;
        let header = StreamHeader::new(&envelope, chunk)?;
        let cipher = ChunkCipher::new(Arc::new(DataKey::new(plain.expose())?), &header, context)?;
        Ok((cipher, header))
    }

    /// Seals everything `input` yields into `output` as a sealed stream
    /// (ENVELOPE.md §10.4) with chunks of `chunk` plaintext bytes
    /// ([`seal::DEFAULT_CHUNK`] is 64 KiB). Memory: about two chunks.
    /// Returns the plaintext length.
    pub async fn seal_stream<R, W>(
        &self,
        path: &KeyPath,
        context: &EncryptionContext,
        chunk: u32,
        input: &mut R,
        output: &mut W,
    ) -> Result<u64, Error>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let (mut cipher, header) = self.stream_key(path, context, chunk).await?;
        seal::seal_stream_async(&mut cipher, &header, input, output).await
    }

    /// Opens a sealed stream from `input` into `output`. Each chunk is
    /// written once it has authenticated, so on an error the output holds
    /// a prefix that must be discarded. Returns the plaintext length.
    pub async fn open_stream<R, W>(
        &self,
        context: &EncryptionContext,
        input: &mut R,
        output: &mut W,
    ) -> Result<u64, Error>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let header = StreamHeader::read_from_async(input).await?;
        let mut cipher = self.stream_opener(&header, context).await?;
        seal::open_stream_async(&mut cipher, &header, input, output).await
    }

    /// The chunk cipher to open the stream whose header is `header`.
    pub(crate) async fn stream_opener(
        &self,
        header: &StreamHeader,
        context: &EncryptionContext,
    ) -> Result<ChunkCipher, Error> {
        let env_bytes = header.envelope().to_bytes();
        let key = self.unwrap_key(header.envelope(), &env_bytes, context).await?;
        ChunkCipher::new(key, header, context)
    }
}
