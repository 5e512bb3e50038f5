//! The README's "Using the Rust crate" program: connect, make a key,
//! encrypt and decrypt a secret, and keep a data key's envelope for later.
//!
//! ```sh
//! eval "$(keyhavend dev --dir /tmp/kh &)"   # prints export KEYHAVEN_SOCKET=...
//! cargo run -p keyhaven --example quickstart
//! ```

use keyhaven::{Client, EncryptionContext, ErrorCode, KeyPath, Plaintext};

#[tokio::main]
async fn main() -> Result<(), keyhaven::Error> {
    let socket = Client::socket_from_env().unwrap_or_else(|| "/run/keyhaven/keyhaven.sock".into());
    // Reconnects by itself when the daemon restarts (see `keyhaven::retry`).
    let client = Client::builder().reconnect(true).connect(&socket).await?;

    let key: KeyPath = "acme/pii".parse()?;
    match client.key_create(&key).await {
        Ok(info) => println!("created {key} at version {}", info.current_version),
        Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => println!("{key} exists already"),
        Err(e) => return Err(e),
    }

    // The context is bound to the ciphertext and must be given again.
    let ctx = EncryptionContext::from_pairs(["table=users", "column=card"])?;
    let sealed = client.encrypt(&key, b"4111 1111 1111 1111", &ctx).await?;
    println!("ciphertext {} (data key {})", sealed.ciphertext, sealed.id()?);
    let opened = client.decrypt(&sealed.ciphertext, &ctx).await?;
    assert_eq!(opened.plaintext.expose(), b"4111 1111 1111 1111");

    // Envelope encryption of larger data: keep only the envelope.
    let envelope = client.datakey(&key, &ctx, Plaintext::Omit).await?.to_envelope()?;
    let data_key = client.datakey_decrypt(&envelope, &ctx).await?.plaintext;
    println!("envelope {envelope:?} unwraps to a {}-byte key", data_key.len());
    Ok(())
}
