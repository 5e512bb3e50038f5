//! The README's "Sealing records with cached data keys" program: seal a
//! record in this process under a cached data key, and open it again.
//!
//! ```sh
//! keyhaven key create acme/pii     # once, against the daemon of $KEYHAVEN_SOCKET
//! cargo run -p keyhaven --example seal_records
//! ```

use keyhaven::{Client, EncryptionContext, KeyPath, OpenLimits, SealLimits, Sealer};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), keyhaven::Error> {
    let socket = Client::socket_from_env().unwrap_or_else(|| "/run/keyhaven/keyhaven.sock".into());
    let sealer = Sealer::connect(
        &socket,
        // A data key seals for at most 5 minutes, 10 000 records, 100 MiB;
        // the record that would pass a limit gets a new data key.
        SealLimits::new(Duration::from_secs(300), 10_000, 100 << 20)?,
        // Unwrapped keys for opening: at most 5 minutes, 1 000 keys.
        OpenLimits::new(Duration::from_secs(300), 1_000)?,
    )
    .await?;
    let key: KeyPath = "acme/pii".parse()?;
    let mut context = EncryptionContext::new();
    context.insert("column", "iban")?;
    let sealed = sealer.seal(&key, b"DE89 3704 0044 0532 0130 00", &context).await?;
    let text = keyhaven::seal::sealed_to_text(&sealed); // `khs1:…`, for a text column
    let plain = sealer.open_text(&text, &context).await?;
    assert_eq!(&*plain, b"DE89 3704 0044 0532 0130 00");
    println!("sealed and opened {} bytes as {}…", plain.len(), &text[..12]);
    Ok(())
}
