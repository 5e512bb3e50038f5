//! `audit_read`, `audit_verify`, `audit_export` and `audit_public_key`
//! (docs/AUDIT.md).

use std::sync::Arc;

use keyhaven::wire;

use super::{reply, route, tenant_target, Cx, Daemon, Op, Reply, Route};
use crate::error::Error;
use crate::policy::{Access, Permission, Target};

/// `audit_read`: this node's chain, or (on a cluster, with `node`) another
/// node's; on a cluster the answer names the chain read and every chain
/// the store holds (docs/CLUSTER.md §3).
pub async fn read(d: &Arc<Daemon>, req: wire::AuditRead) -> Result<Reply, Error> {
    let cluster = d.store.is_cluster();
    let (store, node, chains) = if cluster {
        let chains = d.store.backend().audit_chains().await?;
        let this = d.config.cluster.node_name().map_err(Error::Internal)?;
        match req.node.clone() {
            None => (d.store.clone(), this, chains),
            Some(node) if node == this => (d.store.clone(), node, chains),
            Some(node) => {
                if !chains.contains(&node) {
                    return Err(Error::NotFound(format!(
                        "no audit chain of node `{}` in this cluster's store (chains: {})",
                        node.escape_default(),
                        chains.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
                    )));
                }
                (d.store.for_audit_chain(&node), node, chains)
            }
        }
    } else {
        if req.node.is_some() {
            return Err(Error::BadRequest(
                "`node` names a node of a cluster, and this daemon's store is not one (it keeps one audit log): \
                 leave `node` out"
                    .into(),
            ));
        }
        (d.store.clone(), String::new(), Vec::new())
    };
    let mut resp = tokio::task::spawn_blocking(move || crate::audit::read(&store, &req))
        .await
        .map_err(|e| Error::Internal(format!("audit read task: {e}")))??;
    if cluster {
        resp.node = Some(node);
        resp.chains = chains;
    }
    reply(&resp, 0)
}

/// `audit_verify`.
pub async fn verify(d: &Arc<Daemon>) -> Result<Reply, Error> {
    let mut resp = crate::audit::verify(d.store.clone(), &d.hsm).await?;
    // A cluster's nodes each write a chain; any node checks them all.
    for node in d.store.backend().audit_chains().await? {
        let chain = crate::audit::verify(d.store.for_audit_chain(&node), &d.hsm).await?;
        if chain.status == "not_intact" && resp.status != "not_intact" {
            resp.intact = false;
            resp.status = chain.status.clone();
            resp.problem = chain.problem.clone().map(|mut p| {
                p.message = format!("node `{node}`'s audit chain: {}", p.message);
                p
            });
        }
        resp.chains.push(wire::AuditChainVerify {
            node,
            status: chain.status,
            records: chain.records,
            seals: chain.seals,
            problem: chain.problem,
        });
    }
    reply(&resp, 0)
}

/// `audit_export`.
pub async fn export(d: &Arc<Daemon>, req: wire::AuditExport) -> Result<Reply, Error> {
    let store = d.store.clone();
    let resp = tokio::task::spawn_blocking(move || crate::audit::export(&store, &req))
        .await
        .map_err(|e| Error::Internal(format!("audit export task: {e}")))??;
    reply(&resp, 0)
}

/// `audit_public_key`.
pub async fn public_key(d: &Arc<Daemon>) -> Result<Reply, Error> {
    let spki = d.hsm.run(|w| w.audit_public_key()).await?;
    let resp = wire::AuditPublicKeyResponse {
        algorithm: "ecdsa-p256-sha256".into(),
        label: d.hsm.audit_signing_key_label(),
        pem: crate::hsm::signing::pem(&spki),
    };
    reply(&resp, 0)
}

/// The audit operations, all `audit-read`.
pub(super) const OPS: &[Route] = &[
    route::<wire::AuditRead>(),
    route::<wire::AuditVerify>(),
    route::<wire::AuditExport>(),
    route::<wire::AuditPublicKey>(),
];

impl Op for wire::AuditRead {
    const ACCESS: Access = Access::Needs(Permission::AuditRead);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        let target = tenant_target(self.tenant.as_deref(), cx.s)?;
        cx.allow(target)?;
        read(cx.d, self).await
    }
}

impl Op for wire::AuditVerify {
    const ACCESS: Access = Access::Needs(Permission::AuditRead);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        verify(cx.d).await
    }
}

impl Op for wire::AuditExport {
    const ACCESS: Access = Access::Needs(Permission::AuditRead);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        export(cx.d, self).await
    }
}

impl Op for wire::AuditPublicKey {
    const ACCESS: Access = Access::Needs(Permission::AuditRead);
    async fn handle(self, mut cx: Cx<'_>) -> Result<Reply, Error> {
        cx.allow(Target::All)?;
        public_key(cx.d).await
    }
}
