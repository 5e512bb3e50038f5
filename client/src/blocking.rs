//! A blocking facade over [`Sealer`](crate::sealer::Sealer) for programs
//! that do not run tokio. It owns a small runtime with one worker thread,
//! which keeps reading the connection between calls, so revocation events
//! reach the caches while the program is doing something else. Do not call
//! it from inside a tokio runtime (use the async [`Sealer`](crate::Sealer)
//! there).

use std::io::{Read, Write};
use std::path::Path;

use zeroize::Zeroizing;

use crate::cache::{KeyOrigin, OpenLimits, SealLimits};
use crate::context::EncryptionContext;
use crate::error::Error;
use crate::names::KeyPath;
use crate::seal;
use crate::sealer::Stats;

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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keyhaven-client")
            .enable_all()
            .build()?;
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
