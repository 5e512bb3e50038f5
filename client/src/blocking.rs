//! Blocking forms of [`Client`](crate::Client) and
//! [`Sealer`](crate::Sealer) for programs that do not run tokio.
//!
//! Each owns a small runtime with one worker thread, which keeps reading
//! the connection between calls, so revocation events reach the hook and
//! the caches while the program is doing something else. Do not call them
//! from inside a tokio runtime (tokio panics on a runtime blocked inside
//! another): use the async forms there.
//!
//! [`Client`] has every method of the async [`crate::Client`], with the same
//! name, arguments and result, minus the `async`: they are generated from
//! one list below, and a unit test fails when a method of the async client
//! is missing here (or one here has no async twin).
//!
//! ```no_run
//! use keyhaven::{blocking, EncryptionContext, KeyPath};
//!
//! let client = blocking::Client::connect("/run/keyhaven/keyhaven.sock")?;
//! let key: KeyPath = "acme/pii".parse()?;
//! let ctx = EncryptionContext::from_pairs(["table=users"])?;
//! let sealed = client.encrypt(&key, b"4111 1111 1111 1111", &ctx)?;
//! let opened = client.decrypt(&sealed.ciphertext, &ctx)?;
//! assert_eq!(opened.plaintext.expose(), b"4111 1111 1111 1111");
//! # Ok::<(), keyhaven::Error>(())
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::cache::{KeyOrigin, OpenLimits, SealLimits};
use crate::client::{ClientBuilder, EventHook, KeyOptions, Plaintext};
use crate::context::EncryptionContext;
use crate::error::Error;
use crate::names::KeyPath;
use crate::seal;
use crate::sealer::Stats;
use crate::typed::AsText;
use crate::wire::{self, Operation};

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("keyhaven-client")
        .enable_all()
        .build()?)
}

/// The blocking client: an async [`crate::Client`] on its own runtime.
pub struct Client {
    // Dropped before the runtime: the connection's tasks end first.
    inner: crate::Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::Client").field(&self.inner).finish()
    }
}

impl ClientBuilder {
    /// Connects a [`blocking::Client`](Client) with these settings.
    pub fn connect_blocking(self, path: impl AsRef<Path>) -> Result<Client, Error> {
        let runtime = runtime()?;
        let inner = runtime.block_on(self.connect(path))?;
        Ok(Client { inner, runtime })
    }
}

impl Client {
    /// Connects to the socket at `path` and says `hello`, with the default
    /// timeouts; see [`crate::Client::connect`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        crate::Client::builder().connect_blocking(path)
    }

    /// Connects with `hook` called for every event; see
    /// [`crate::Client::connect_with_events`].
    pub fn connect_with_events(path: impl AsRef<Path>, hook: EventHook) -> Result<Client, Error> {
        crate::Client::builder().events(hook).connect_blocking(path)
    }

    /// A builder for other settings; finish it with
    /// [`ClientBuilder::connect_blocking`].
    pub fn builder() -> ClientBuilder {
        crate::Client::builder()
    }

    /// The socket path from `$KEYHAVEN_SOCKET`, if set.
    pub fn socket_from_env() -> Option<PathBuf> {
        crate::Client::socket_from_env()
    }

    /// The async client inside (same connection).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// Sets the timeout of each request from now on (`None`: for ever).
    pub fn set_request_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_request_timeout(timeout)
    }

    /// Whether the connection has ended; see [`crate::Client::is_closed`].
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Connections made so far; see [`crate::Client::connections`].
    pub fn connections(&self) -> u64 {
        self.inner.connections()
    }

    /// Sends any operation and waits for its typed response; see
    /// [`crate::Client::call`].
    pub fn call<O: Operation + 'static>(&self, params: &O) -> Result<O::Response, Error> {
        self.runtime.block_on(self.inner.call(params))
    }
}

/// Generates the blocking twin of each async method: same name, same
/// arguments, same result.
macro_rules! blocking_methods {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Client {
            $(
                #[doc = concat!("The blocking [`Client::", stringify!($name), "`](crate::Client::", stringify!($name), ").")]
                pub fn $name(&self $(, $arg: $ty)*) -> Result<$ret, Error> {
                    self.runtime.block_on(self.inner.$name($($arg),*))
                }
            )*
        }

        /// The methods generated by `blocking_methods!`.
        #[cfg(test)]
        const GENERATED: &[&str] = &[$(stringify!($name)),*];
    };
}

blocking_methods! {
    fn subscribe_revocations(&self) -> wire::SubscribeResponse;
    fn call_raw(&self, op: &str, params: Value) -> Value;
    fn health(&self) -> wire::HealthResponse;
    fn metrics(&self) -> String;
    fn whoami(&self) -> wire::WhoamiResponse;
    fn key_create(&self, path: &KeyPath) -> wire::KeyInfo;
    fn key_create_of_type(&self, path: &KeyPath, key_type: crate::KeyType) -> wire::KeyInfo;
    fn key_create_with(&self, path: &KeyPath, options: &KeyOptions) -> wire::KeyInfo;
    fn key_show(&self, path: &KeyPath) -> crate::lifecycle::KeyDetails;
    fn key_rotate(&self, path: &KeyPath, idempotency_key: Option<&str>) -> crate::lifecycle::KeyDetails;
    fn key_list(&self, tenant: Option<&str>) -> Vec<wire::KeyInfo>;
    fn key_list_page(&self, tenant: Option<&str>, after: Option<String>, limit: Option<u32>) -> wire::KeyListResponse;
    fn revoke_list(&self, tenant: Option<&str>) -> Vec<crate::revocation::Revocation>;
    fn encrypt(&self, path: &KeyPath, plaintext: &[u8], context: &EncryptionContext) -> wire::EncryptResponse;
    fn decrypt(&self, ciphertext: &(impl AsText + ?Sized), context: &EncryptionContext) -> wire::DecryptResponse;
    fn datakey(&self, path: &KeyPath, context: &EncryptionContext, plaintext: Plaintext) -> wire::DatakeyResponse;
    fn datakey_decrypt(&self, envelope: &(impl AsText + ?Sized), context: &EncryptionContext) -> wire::DecryptResponse;
    fn mac(&self, path: &KeyPath, message: &[u8], version: Option<u32>) -> crate::mac::MacResponse;
    fn mac_verify(&self, path: &KeyPath, message: &[u8], tag: &(impl AsText + ?Sized)) -> bool;
    fn sign(&self, path: &KeyPath, message: &[u8]) -> crate::sign::SignResponse;
    fn public_key(&self, path: &KeyPath, version: Option<u32>) -> crate::sign::PublicKeyResponse;
    fn alias_create(&self, alias: &str, key: &KeyPath) -> crate::alias::AliasInfo;
    fn alias_update(&self, alias: &str, key: &KeyPath) -> crate::alias::AliasInfo;
    fn alias_delete(&self, tenant: &str, alias: &str) -> crate::alias::AliasInfo;
    fn alias_list(&self, tenant: Option<&str>) -> Vec<crate::alias::AliasInfo>;
    fn verify(&self, path: &KeyPath, message: &[u8], signature: &str, version: Option<u32>) -> crate::sign::VerifyResponse;
    fn revoke(&self, scope: &crate::revocation::Scope, reason: crate::revocation::Reason, expires_at: Option<u64>) -> crate::revocation::Revocation;
    fn revoke_lift(&self, scope: &crate::revocation::Scope, reason: crate::revocation::Reason) -> crate::revocation::Revocation;
    fn destroy(&self, scope: &crate::revocation::Scope, confirm: &str) -> crate::revocation::DestroyResponse;
    fn key_set(&self, path: &KeyPath, change: crate::lifecycle::KeySet) -> crate::lifecycle::KeyDetails;
    fn key_trim(&self, path: &KeyPath) -> crate::lifecycle::KeyTrimResponse;
    fn key_schedule_deletion(&self, path: &KeyPath, days: Option<u32>) -> crate::lifecycle::KeyDetails;
    fn key_cancel_deletion(&self, path: &KeyPath) -> crate::lifecycle::KeyDetails;
    fn rewrap(&self, text: &(impl AsText + ?Sized), context: &EncryptionContext) -> crate::lifecycle::RewrapResponse;
    fn key_import_params(&self, path: &KeyPath, key_type: crate::KeyType, expires_in_secs: Option<u64>) -> crate::import::KeyImportParamsResponse;
    fn key_import(&self, path: &KeyPath, import_token: &str, algorithm: crate::import::WrappingAlgorithm, wrapped: &str) -> crate::lifecycle::KeyDetails;
}

/// The blocking sealer.
pub struct Sealer {
    runtime: tokio::runtime::Runtime,
    inner: crate::sealer::Sealer,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("blocking::Sealer").field(&self.inner).finish()
    }
}

impl Sealer {
    /// Connects and subscribes to revocations; see
    /// [`crate::Sealer::connect`].
    pub fn connect(socket: impl AsRef<Path>, seal: SealLimits, open: OpenLimits) -> Result<Sealer, Error> {
        let runtime = runtime()?;
        let inner = runtime.block_on(crate::sealer::Sealer::connect(socket, seal, open))?;
        Ok(Sealer { runtime, inner })
    }

    /// The async sealer inside (shares caches and connection).
    pub fn as_async(&self) -> &crate::sealer::Sealer {
        &self.inner
    }

    /// See [`crate::Sealer::seal`].
    pub fn seal(
        &self,
        path: &KeyPath,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, Error> {
        self.runtime.block_on(self.inner.seal(path, plaintext, context))
    }

    /// See [`crate::Sealer::open`].
    pub fn open(&self, sealed: &[u8], context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, Error> {
        self.runtime.block_on(self.inner.open(sealed, context))
    }

    /// Seals `input` into `output` as a sealed stream, with std I/O; see
    /// [`crate::Sealer::seal_stream`].
    pub fn seal_stream<R: Read, W: Write>(
        &self,
        path: &KeyPath,
        context: &EncryptionContext,
        chunk: u32,
        input: &mut R,
        output: &mut W,
    ) -> Result<u64, Error> {
        let (mut cipher, header) = self.runtime.block_on(self.inner.stream_key(path, context, chunk))?;
        seal::seal_stream(&mut cipher, &header, input, output)
    }

    /// Opens a sealed stream with std I/O; see
    /// [`crate::Sealer::open_stream`].
    pub fn open_stream<R: Read, W: Write>(
        &self,
        context: &EncryptionContext,
        input: &mut R,
        output: &mut W,
    ) -> Result<u64, Error> {
        let header = seal::StreamHeader::read_from(input)?;
        let mut cipher = self.runtime.block_on(self.inner.stream_opener(&header, context))?;
        seal::open_stream(&mut cipher, &header, input, output)
    }

    /// See [`crate::Sealer::stats`].
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// See [`crate::Sealer::cached`].
    pub fn cached(&self) -> (Vec<KeyOrigin>, Vec<KeyOrigin>) {
        self.inner.cached()
    }

    /// See [`crate::Sealer::is_live`].
    pub fn is_live(&self) -> bool {
        self.inner.is_live()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The `pub fn` and `pub async fn` names in the `impl Client {` blocks
    /// (at the start of a line, up to the `}` that closes them) of `src`.
    fn methods_of_client(src: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut inside = false;
        for line in src.lines() {
            if line == "impl Client {" {
                inside = true;
            } else if line == "}" {
                inside = false;
            } else if inside {
                let rest =
                    line.strip_prefix("    pub async fn ").or_else(|| line.strip_prefix("    pub fn "));
                if let Some(rest) = rest {
                    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
                    names.insert(rest[..end].to_owned());
                }
            }
        }
        names
    }

    /// Every method of the async client, in whichever module it is
    /// defined, has a blocking twin of the same name, and the reverse. A
    /// method added to one alone fails this test.
    #[test]
    fn the_blocking_client_has_the_methods_of_the_async_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut async_side = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("blocking.rs") {
                async_side.extend(methods_of_client(&std::fs::read_to_string(&path).unwrap()));
            }
        }
        // These take a tokio `UnixStream`: a blocking program has none.
        for tokio_only in ["from_stream", "from_stream_with_events"] {
            assert!(async_side.remove(tokio_only), "{tokio_only} is gone: update this test");
        }
        let mut blocking_side = methods_of_client(include_str!("blocking.rs"));
        blocking_side.extend(super::GENERATED.iter().map(|s| s.to_string()));
        assert!(blocking_side.remove("as_async"));
        assert!(async_side.len() > 20, "{async_side:?}");
        let only_async: Vec<_> = async_side.difference(&blocking_side).collect();
        let only_blocking: Vec<_> = blocking_side.difference(&async_side).collect();
        assert!(
            only_async.is_empty() && only_blocking.is_empty(),
            "async only: {only_async:?}; blocking only: {only_blocking:?} (add them to `blocking_methods!`)"
        );
    }
}
