//! `keyhaven key jwks` and `keyhaven jwt sign`: JOSE around the daemon's
//! `public_key` and `sign` (keyhaven::jose), for verifiers that never call
//! the daemon.

use keyhaven::jose;
use keyhaven::sign::{PublicKey, PublicKeyResponse, Sign};
use keyhaven::wire::SecretBytes;
use keyhaven::{Client, ErrorCode, KeyPath};
use serde_json::Value;

use super::{print_json, Failure};

async fn public_key(
    client: &Client,
    key: &KeyPath,
    version: Option<u32>,
) -> Result<PublicKeyResponse, keyhaven::Error> {
    client.call(&PublicKey { tenant: key.tenant().into(), key: key.key().into(), version }).await
}

/// Every version of `key` whose public key is still served (not retired,
/// trimmed or revoked), newest first, as a JWKS.
pub async fn jwks(client: &Client, key: &KeyPath) -> Result<(), Failure> {
    let current = public_key(client, key, None).await?;
    let mut keys = vec![jose::jwk(&current.pem, current.key_type, &jose::kid(key, current.key_version))?];
    for v in (1..current.key_version).rev() {
        match public_key(client, key, Some(v)).await {
            Ok(r) => keys.push(jose::jwk(&r.pem, r.key_type, &jose::kid(key, v))?),
            // Everything below a retired version is retired too.
            Err(e) if e.code() == Some(ErrorCode::VersionRetired) => break,
            Err(e) if matches!(e.code(), Some(ErrorCode::NotFound | ErrorCode::Revoked)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    print_json(&serde_json::json!({ "keys": keys }))
}

/// A compact JWS of the JSON object in `claims_file`, signed by the
/// current version of `key`, whose id is the header's `kid`.
pub async fn sign(client: &Client, key: &KeyPath, claims_file: &std::path::Path) -> Result<(), Failure> {
    let text = std::fs::read(claims_file)
        .map_err(|e| Failure::new(format!("cannot read the claims file {}: {e}", claims_file.display())))?;
    let claims: Value = serde_json::from_slice(&text)
        .map_err(|e| Failure::new(format!("the claims file {} is not JSON: {e}", claims_file.display())))?;
    if !claims.is_object() {
        return Err(Failure::new(format!(
            "the claims file {} must hold a JSON object",
            claims_file.display()
        )));
    }
    // The kid names the version before it signs: a rotation in between is
    // seen in the answer, and the token is made again.
    for _ in 0..3 {
        let current = public_key(client, key, None).await?;
        let kid = jose::kid(key, current.key_version);
        let input = jose::signing_input(current.key_type, &kid, &claims)?;
        let req = Sign {
            tenant: key.tenant().into(),
            key: key.key().into(),
            message: Some(SecretBytes::from_slice(input.as_bytes())),
            digest: None,
        };
        let resp = client.call(&req).await?;
        if resp.key_version == current.key_version {
            outln!("{}", jose::compact(&input, &resp.signature, current.key_type)?);
            return Ok(());
        }
    }
    Err(Failure::new(format!("key `{key}` kept rotating while the token was signed; try again")))
}
