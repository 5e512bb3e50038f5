//! Keyhaven client: everything an application needs to talk to `keyhavend`,
//! without linking PKCS#11 or a database.
//!
//! ```no_run
//! use keyhaven::{Client, EncryptionContext, KeyPath};
//!
//! # async fn run() -> Result<(), keyhaven::Error> {
//! let client = Client::builder().reconnect(true).connect("/run/keyhaven/keyhaven.sock").await?;
//! let key: KeyPath = "acme/pii".parse()?;
//! let ctx = EncryptionContext::from_pairs(["table=users"])?;
//! let sealed = client.encrypt(&key, b"4111 1111 1111 1111", &ctx).await?;
//! let opened = client.decrypt(&sealed.ciphertext, &ctx).await?;
//! assert_eq!(opened.plaintext.expose(), b"4111 1111 1111 1111");
//! # Ok(()) }
//! ```
//!
//! What a program uses is at the root: [`Client`] (async, pipelined,
//! optionally reconnecting) and [`blocking::Client`] with the same methods;
//! [`Sealer`] (and [`blocking::Sealer`]) to seal records and streams in
//! this process with cached data keys; the typed values [`KeyPath`],
//! [`EncryptionContext`], [`Ciphertext`], [`Envelope`], [`EnvelopeId`],
//! [`MacTag`]; [`Error`] and its wire [`ErrorCode`]. Every text form parses
//! and prints without a daemon:
//!
//! ```
//! use keyhaven::{Ciphertext, EnvelopeId, KeyPath};
//!
//! let key: KeyPath = "acme/pii".parse()?;
//! assert_eq!((key.tenant(), key.key()), ("acme", "pii"));
//! assert!("Acme/pii".parse::<KeyPath>().is_err()); // names are lowercase
//!
//! // A ciphertext names its key, version and data key (docs/ENVELOPE.md §6),
//! // which `keyhaven inspect` prints; opening it needs the daemon.
//! let text = "khc1:S0gBAgEAXktIAQEBBGFjbWUDcGlpAAAAAqurq6urq6urq6urq6urq6sHBwcHBwcHBwcHBwcJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkBAQEBAQEBAQEBAQEFBQUFBQUFBQUFBQUFBQUFBQUFBQ";
//! let ct: Ciphertext = text.parse()?;
//! assert_eq!(ct.envelope().path(), &key);
//! assert_eq!(ct.envelope().key_version(), 2);
//! assert_eq!(ct.envelope().id(), "ab".repeat(16).parse::<EnvelopeId>()?);
//! assert_eq!(ct.to_string(), text);
//! # Ok::<(), keyhaven::Error>(())
//! ```
//!
//! # Modules
//!
//! - [`client`]: the async client, its builder, timeouts and events.
//! - [`blocking`]: the same client and sealer for programs without tokio.
//! - [`retry`]: which requests a reconnecting client sends again.
//! - [`sealer`]: [`Sealer`], which seals and opens with cached data keys
//!   that revocation events reach at once.
//! - [`seal`]: the sealed-record and sealed-stream formats and their
//!   AES-256-GCM in this process (docs/ENVELOPE.md §10).
//! - [`names`]: the rules for tenant and key names (`acme/pii`).
//! - [`context`]: the encryption context and its canonical encoding
//!   (docs/ENVELOPE.md §4).
//! - [`envelope`]: the data-key envelope and ciphertext formats, binary and
//!   text (docs/ENVELOPE.md). Parsing only checks structure; authenticity is
//!   the daemon's (or, for ciphertexts, the key holder's) business.
//! - [`keytype`]: the kinds of named key (`aes256-gcm`, `hmac-sha256`,
//!   `ecdsa-p256`...).
//! - [`mac`], [`sign`], [`jose`]: MAC tags, signatures and public keys, and
//!   JWKs / compact JWS built from them.
//! - [`lifecycle`], [`revocation`]: the requests and answers of key
//!   versions, rotation, states, rewrap, and of revocations.
//! - [`wire`]: every request and answer of docs/PROTOCOL.md, for
//!   [`Client::call`]. The daemon depends on this crate for these wire and
//!   envelope types, so the two can never disagree about the format; that
//!   is why they are public. Answers keep the wire's `String`s; their typed
//!   accessors (`to_ciphertext()`, `id()`, `path()`, `to_envelope()`,
//!   `to_tag()`) parse them.
//! - [`error`]: the crate's error type.
//!
//! Hidden from these docs but public because the daemon, the CLI or the
//! fuzzers use them: `frame` (length-prefixed frames, docs/PROTOCOL.md §1),
//! `cache` (the sealer's caches; their limits are re-exported here) and
//! `secret` ([`SecretBytes`], re-exported here).

pub mod alias;
pub mod blocking;
#[doc(hidden)]
pub mod cache;
pub mod client;
pub mod context;
pub mod envelope;
pub mod error;
#[doc(hidden)]
pub mod frame;
pub mod hybrid;
pub mod import;
pub mod jose;
pub mod keytype;
pub mod lifecycle;
pub mod mac;
mod manage;
pub mod names;
mod options;
pub mod retry;
pub mod revocation;
pub mod seal;
pub mod sealer;
#[doc(hidden)]
pub mod secret;
pub mod sign;
pub mod socket;
pub mod spki;
mod typed;
pub mod wire;

pub use cache::{OpenLimits, SealLimits};
pub use client::{Client, ClientBuilder, Event, EventHook, TimedOut, Timeouts};
pub use context::EncryptionContext;
pub use envelope::{Ciphertext, Envelope, EnvelopeId};
pub use error::{Error, ErrorCode};
pub use keytype::KeyType;
pub use mac::MacTag;
pub use names::KeyPath;
pub use options::{KeyOptions, Plaintext};
pub use sealer::Sealer;
pub use secret::SecretBytes;
pub use typed::AsText;
