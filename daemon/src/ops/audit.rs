//! `audit_read` and `audit_verify` (docs/AUDIT.md).

use std::sync::Arc;

use keyhaven::wire;

use super::{reply, Daemon, Reply};
use crate::error::Error;

/// `audit_read`.
pub async fn read(d: &Arc<Daemon>, req: wire::AuditRead) -> Result<Reply, Error> {
    let store = d.store.clone();
    let resp = tokio::task::spawn_blocking(move || crate::audit::read(&*store, &req))
        .await
        .map_err(|e| Error::Internal(format!("audit read task: {e}")))??;
    reply(&resp, 0)
}

/// `audit_verify`.
pub async fn verify(d: &Arc<Daemon>) -> Result<Reply, Error> {
    let resp = crate::audit::verify(d.store.clone(), &d.hsm).await?;
    reply(&resp, 0)
}
