//! `keyhaven key import-params` and `keyhaven key import`: bring your own
//! key material (docs/OPERATIONS.md §16 has the customer's openssl side).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::Args;
use keyhaven::import::{KeyImport, KeyImportParams, WrappingAlgorithm};
use keyhaven::{Client, KeyPath};

use super::{print_json, Failure};

/// Largest file `--wrapped` reads (wrapped material is a few hundred bytes).
const MAX_WRAPPED_FILE: u64 = 4096;

/// `key import-params`.
#[derive(Args, Debug)]
pub struct ParamsArgs {
    /// The key to import into, as TENANT/KEY (a new key, or an imported key for a new version).
    pub key: KeyPath,
    /// What kind of key the material is (32 bytes either way).
    #[arg(long = "type", value_name = "TYPE", default_value = "aes256-gcm", value_parser = crate::KeyTypeParser::IMPORTABLE)]
    pub key_type: keyhaven::KeyType,
    /// Seconds the import token stays good, 1 to 86400 (the default, 24 hours).
    #[arg(long, value_name = "SECS")]
    pub expires_in: Option<u64>,
    /// Write the wrapping public key (PEM) to FILE and print only the import token.
    #[arg(long, value_name = "FILE")]
    pub public_key_out: Option<PathBuf>,
}

/// `key import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The key, as TENANT/KEY: the one the import token was issued for.
    pub key: KeyPath,
    /// The file of wrapped material (binary, as openssl wrote it).
    #[arg(long, value_name = "FILE")]
    pub wrapped: PathBuf,
    /// The import token `key import-params` printed.
    #[arg(long, value_name = "TOKEN")]
    pub import_token: String,
    /// How the material was wrapped: rsaes-oaep-sha1, rsaes-oaep-sha256, rsa-aes-key-wrap-sha1 or
    /// rsa-aes-key-wrap-sha256.
    #[arg(long, value_name = "ALGORITHM", default_value = "rsaes-oaep-sha1")]
    pub algorithm: WrappingAlgorithm,
}

fn read_wrapped(path: &Path) -> Result<Vec<u8>, Failure> {
    let meta =
        std::fs::metadata(path).map_err(|e| Failure::new(format!("--wrapped {}: {e}", path.display())))?;
    if meta.len() > MAX_WRAPPED_FILE {
        return Err(Failure::new(format!(
            "--wrapped {}: {} bytes; wrapped key material is a few hundred bytes (at most {MAX_WRAPPED_FILE})",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| Failure::new(format!("--wrapped {}: {e}", path.display())))
}

/// Runs `key import-params`.
pub async fn params(client: &Client, args: ParamsArgs) -> Result<(), Failure> {
    let req = KeyImportParams {
        tenant: args.key.tenant().into(),
        key: args.key.key().into(),
        key_type: args.key_type,
        expires_in_secs: args.expires_in,
    };
    let resp = client.call(&req).await?;
    match args.public_key_out {
        Some(file) => {
            std::fs::write(&file, resp.public_key.as_bytes())
                .map_err(|e| Failure::new(format!("--public-key-out {}: {e}", file.display())))?;
            writeln!(std::io::stdout().lock(), "{}", resp.import_token)?;
            Ok(())
        }
        None => print_json(&resp),
    }
}

/// Runs `key import`.
pub async fn import(client: &Client, args: ImportArgs) -> Result<(), Failure> {
    let wrapped = read_wrapped(&args.wrapped)?;
    let req = KeyImport {
        tenant: args.key.tenant().into(),
        key: args.key.key().into(),
        import_token: args.import_token,
        algorithm: args.algorithm,
        wrapped: base64::engine::general_purpose::STANDARD.encode(wrapped),
    };
    print_json(&client.call(&req).await?)
}
