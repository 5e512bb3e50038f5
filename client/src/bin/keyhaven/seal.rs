//! `keyhaven seal` and `keyhaven open`: client-side sealing of stdin to
//! stdout (docs/ENVELOPE.md §10), streamed in chunks so that memory stays
//! at a few chunks whatever the input's size.

use std::path::Path;
use std::time::Duration;

use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::seal::{SealedRecord, KIND_SEALED, KIND_STREAM, SEALED_PREFIX};
use keyhaven::{EncryptionContext, KeyPath, Sealer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Failure;

/// Largest sealed record `open` reads whole (streams have no limit).
const MAX_RECORD_INPUT: u64 = 1 << 30;

async fn sealer(socket: &Path) -> Result<Sealer, Failure> {
    // One stream or record per run: the caches hold at most one key.
    let seal = SealLimits::new(Duration::from_secs(60), 1, 1)?;
    let open = OpenLimits::new(Duration::from_secs(60), 1)?;
    Ok(Sealer::connect(socket, seal, open).await?)
}

/// Seals stdin as a stream.
pub async fn seal(
    socket: &Path,
    key: &KeyPath,
    context: &EncryptionContext,
    chunk: u32,
) -> Result<(), Failure> {
    let s = sealer(socket).await?;
    let mut input = tokio::io::stdin();
    let mut output = tokio::io::stdout();
    s.seal_stream(key, context, chunk, &mut input, &mut output).await?;
    output.flush().await?;
    Ok(())
}

/// Opens a sealed stream, a binary sealed record, or the `khs1:` text of
/// one, from stdin.
pub async fn open(socket: &Path, context: &EncryptionContext) -> Result<(), Failure> {
    let s = sealer(socket).await?;
    let mut stdin = tokio::io::stdin();
    let mut first = Vec::with_capacity(5);
    (&mut stdin).take(5).read_to_end(&mut first).await?;
    let mut output = tokio::io::stdout();
    if first.starts_with(b"KH") && first.get(3) == Some(&KIND_STREAM) {
        let mut input = (&first[..]).chain(stdin);
        s.open_stream(context, &mut input, &mut output).await.map_err(|e| {
            Failure::new(format!("{e}; the output written so far is not valid and must be discarded"))
        })?;
    } else {
        let mut all = zeroize::Zeroizing::new(first);
        (&mut stdin).take(MAX_RECORD_INPUT).read_to_end(&mut all).await?;
        let text_start = all.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(all.len());
        let bytes = if all[text_start..].starts_with(SEALED_PREFIX.as_bytes()) {
            let text = std::str::from_utf8(&all)
                .map_err(|_| Failure::new("sealed record on stdin is not text".into()))?;
            keyhaven::seal::sealed_from_text(text)?
        } else if all.starts_with(b"KH") && all.get(3) == Some(&KIND_SEALED) {
            all.to_vec()
        } else {
            return Err(Failure::new("stdin holds neither a sealed stream nor a sealed record".into()));
        };
        SealedRecord::parse(&bytes)?;
        let plain = s.open(&bytes, context).await?;
        output.write_all(&plain).await?;
    }
    output.flush().await?;
    Ok(())
}
