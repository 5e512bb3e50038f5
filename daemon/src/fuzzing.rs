//! Entry points for the fuzz targets in `fuzz/` (docs/SECURITY.md §6):
//! the daemon's own code for what a client's frame or a database row goes
//! through, reachable without a running daemon. Not an API: nothing else
//! calls these, and they change with the code they expose.

use crate::policy::Access;
use crate::store::{KeyRecord, Meta, StoreError};
use keyhaven::revocation::Revocation;

/// What the daemon makes of one request frame's body before anything that
/// needs its state (the audit log's, the store's, the policy's).
pub enum Request {
    /// Parsed: the request's id and operation, its params parsed into the
    /// operation's type, and what the operation needs from the policy.
    Parsed { id: u64, op: String, access: Access },
    /// Refused before the handler runs: the whole answer frame (length
    /// prefix and JSON body), as the connection would write it.
    Refused(Vec<u8>),
}

/// A frame body as [`crate::connection`] reads it and [`crate::ops::dispatch`]
/// finds and parses its operation: the answer to a refused request is built
/// exactly as the connection builds it.
pub fn request(body: &[u8]) -> Request {
    match crate::connection::read_request(body) {
        Err(answer) => Request::Refused(answer.to_vec()),
        Ok((id, op, params)) => match crate::ops::parse_request_params(&op, &params) {
            Ok(access) => Request::Parsed { id, op, access },
            Err(e) => Request::Refused(crate::connection::error_frame(Some(id), e.code(), &e).to_vec()),
        },
    }
}

/// The `id` the daemon echoes for a body that is not a valid request
/// (PROTOCOL.md §1).
pub fn echoed_id(body: &[u8]) -> Option<u64> {
    crate::connection::echoed_id(body)
}

/// A record as PostgreSQL returns it, decoded as the store decodes it.
pub enum Row {
    Meta(Box<Meta>),
    Key(Box<KeyRecord>),
    Revocation(Box<Revocation>),
}

/// Decodes one row of table `tree` (`meta`, `keyring` with key
/// `tenant/name`, `revocations` with its scope key) as the PostgreSQL store
/// does when it reads or catches up on it, and runs on a key record what
/// the daemon computes from one it serves (details, rotation schedule).
/// A row that does not decode is [`StoreError::Corrupt`], never a panic.
pub fn postgres_row(tree: &str, key: &str, text: &str) -> Result<Row, StoreError> {
    use crate::store::postgres::decode;
    match tree {
        "meta" => Ok(Row::Meta(Box::new(decode::<Meta>("meta", text)?))),
        "keyring" => {
            let record: KeyRecord = decode(&format!("keyring {key}"), text)?;
            if let Some((tenant, name)) = key.split_once('/') {
                let _ = keyhaven::KeyPath::new(tenant, name);
            }
            let _ = record.path();
            crate::ops::key_record_views(&record)
                .map_err(|e| StoreError::Corrupt { key: format!("keyring {key}"), reason: e.to_string() })?;
            Ok(Row::Key(Box::new(record)))
        }
        "revocations" => {
            let record: Revocation = decode(&format!("revocation {key}"), text)?;
            let _ = crate::store::cluster::scope_of_key(key);
            Ok(Row::Revocation(Box::new(record)))
        }
        other => Err(StoreError::Corrupt { key: other.to_owned(), reason: "no such table".into() }),
    }
}
