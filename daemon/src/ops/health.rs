//! `hello` and `health`.

use std::sync::Arc;

use keyhaven::wire::{self, HealthResponse, HelloResponse, StoreHealth, TokenHealth};

use super::{reply, Daemon, Reply};
use crate::error::Error;

pub fn hello(req: wire::Hello) -> Result<Reply, Error> {
    if req.protocol != wire::PROTOCOL_VERSION {
        return Err(Error::UnsupportedProtocol(req.protocol));
    }
    let resp = HelloResponse {
        protocol: wire::PROTOCOL_VERSION,
        server: format!("keyhavend/{}", env!("CARGO_PKG_VERSION")),
    };
    reply(&resp, 0)
}

/// Probes the token (a session call and the master key lookup) and the
/// store; reports each rather than failing the call. A whole-system
/// suspension shows as status `suspended`.
pub async fn health(d: &Arc<Daemon>, _req: wire::Health) -> Result<Reply, Error> {
    let probe = d.hsm.run(|w| w.probe()).await;
    let keys = d.store.key_count();
    let token = TokenHealth {
        ok: probe.is_ok(),
        label: d.hsm.token_label().to_owned(),
        master_key_version: d.hsm.master_key_version(),
        workers: d.hsm.workers(),
        condition: probe.as_ref().err().map(|e| e.condition().to_owned()),
        error: probe.err().map(|e| e.to_string()),
    };
    let store = StoreHealth { ok: keys.is_ok(), keys: keys.unwrap_or(0) };
    let suspended = d.revocations.all(super::now_unix());
    let status = match (token.ok && store.ok, &suspended) {
        (false, _) => "degraded",
        (true, Some(_)) => "suspended",
        (true, None) => "ok",
    };
    let resp = HealthResponse {
        status: status.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        token,
        store,
        suspended,
    };
    reply(&resp, 0)
}
