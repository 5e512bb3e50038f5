//! keyhavend: a key-management daemon whose master key lives in a PKCS#11
//! token. See ../shared/DESIGN.md for the architecture and docs/ for the
//! wire protocol and envelope format.
//!
//! # Layout
//!
//! A request travels down this list:
//!
//! - [`server`]: binds the Unix socket, accepts, caps connections, drains
//!   on shutdown.
//! - [`connection`]: frames in and out, caller identity, pipelining.
//! - [`ops`]: one module per operation family, each declaring its
//!   operations (wire type, permission, policy target, audit subject,
//!   handler); [`ops::dispatch`] finds the declaration, which asks
//!   [`policy`] first, and records every request in [`audit`].
//! - [`hsm`]: the PKCS#11 worker pool; every wrap and unwrap happens there.
//! - [`revocation`]: the in-memory index of revocations every key use
//!   checks first.
//! - [`usage`]: decryptions and rewraps per key version, for retirement.
//! - [`upkeep`]: periodic jobs: usage flush, automatic rotation, scheduled
//!   deletions.
//! - [`wraps`]: counts data-key wraps per KEK version against the GCM
//!   nonce bound.
//! - [`store`]: the keyring (wrapped key material only) behind a trait;
//!   [`anchor`] keeps the digest of its state in the token, so that an
//!   altered or rolled-back store is refused at start.
//!
//! - [`audit`]: the hash-chained, HSM-sealed audit log, group-committed.
//!
//! Around them: [`config`] (the TOML file), [`identity`] (SO_PEERCRED,
//! user and groups), [`policy`] (who may do what),
//! [`error`] (wire error codes), [`exit`] (exit statuses), [`logging`] (stderr and the journal), [`metrics`] (counts for Prometheus, `GET /metrics`), [`softhsm`] (its token files), [`refusal`] (a refused PIN is not presented again), [`hardening`] (production checks, no core dumps), [`secret`] (PIN and data-key types that
//! never print), [`init`] and [`dev`] (setting an install up), [`systemd`] (socket
//! activation, sd_notify), [`text`] (client input made safe for messages), [`clock`]
//! (Unix time), and [`daemon`] (starting and stopping it all).

pub mod anchor;
pub mod audit;
pub mod audit_sinks;
pub mod bench;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod dev;
pub mod error;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod hardening;
pub mod hsm;
pub mod identity;
pub mod init;
pub mod labels;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod refusal;
pub mod retention;
pub mod revocation;
pub mod secret;
pub mod server;
pub mod softhsm;
pub mod store;
pub mod systemd;
pub mod text;
pub mod upkeep;
pub mod usage;
pub mod wraps;
