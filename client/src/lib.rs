//! Keyhaven client: everything an application needs to talk to `keyhavend`,
//! without linking PKCS#11 or a database.
//!
//! # Layout
//!
//! - [`names`]: the rules for tenant and key names (`acme/pii`).
//! - [`context`]: the encryption context and its canonical encoding
//!   (docs/ENVELOPE.md §4).
//! - [`envelope`]: the data-key envelope and ciphertext formats, binary and
//!   text (docs/ENVELOPE.md). Parsing only checks structure; authenticity is
//!   the daemon's (or, for ciphertexts, the key holder's) business.
//! - [`frame`]: length-prefixed frames on the socket (docs/PROTOCOL.md §1).
//! - [`wire`]: the JSON requests, responses and error codes
//!   (docs/PROTOCOL.md §2–4).
//! - [`keytype`]: the kinds of named key (`aes256-gcm`, `hmac-sha256`).
//! - [`mac`]: MACs under HMAC keys, and the tag's text form.
//! - [`sign`]: signatures under ECDSA keys, and their public keys.
//! - [`jose`]: JWKs, JWKS and compact JWS (JWT) from those answers.
//! - [`lifecycle`]: key versions, rotation, retirement, states, rewrap.
//! - [`revocation`]: revocation scopes, reasons and operations.
//! - [`client`]: an async client that pipelines requests on one connection,
//!   and receives revocation events.
//! - [`seal`]: the sealed-record and sealed-stream formats and their
//!   AES-256-GCM in this process (docs/ENVELOPE.md §10).
//! - [`cache`]: the sealing and opening caches of data keys, with their
//!   limits.
//! - [`sealer`]: [`Sealer`], which seals and opens with cached data keys
//!   that revocation events reach at once.
//! - [`blocking`]: the same for programs that do not run tokio.
//! - [`error`]: the crate's error type.
//!
//! The daemon depends on this crate for the wire and envelope types, so the
//! two can never disagree about the format.

pub mod blocking;
pub mod cache;
pub mod client;
pub mod context;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod import;
pub mod jose;
pub mod keytype;
pub mod lifecycle;
pub mod mac;
pub mod names;
pub mod revocation;
pub mod seal;
pub mod sealer;
pub mod secret;
pub mod sign;
pub mod wire;

pub use client::{Client, ClientBuilder, TimedOut, Timeouts};
pub use context::EncryptionContext;
pub use envelope::{Ciphertext, Envelope, EnvelopeId};
pub use error::{Error, ErrorCode};
pub use keytype::KeyType;
pub use names::KeyPath;
pub use sealer::Sealer;
