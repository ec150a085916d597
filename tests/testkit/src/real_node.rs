//! The real node of a test cluster: a kubelet on containerd and runc next to the kwok nodes
//! (`tests/cluster/real-node.sh`), where the project's images (`make images`) run as real pods.

use std::collections::HashMap;

use anyhow::{Context, Result};

/// The node name the testkit gives the real node.
pub const REAL_NODE_NAME: &str = "real-node";

/// The label the real node's kubelet registers with (`--node-labels`): charts schedule onto it
/// by `nodeSelector`, and kwok nodes never carry it.
pub const REAL_NODE_LABEL: (&str, &str) = ("klm.test/real-node", "true");

/// Where pods on the real node reach things on this host.
#[derive(Debug, Clone)]
pub struct RealNode {
    /// The Node's name.
    pub name: String,
    /// The API server as pods see it (no kube-proxy: the `kubernetes` Service's ClusterIP does
    /// not answer): the node's bridge address, in the API server's certificate.
    pub apiserver_host: String,
    pub apiserver_port: u16,
}

impl RealNode {
    /// Reads it from `cluster.env` (`KLM_REAL_NODE`, `KLM_REAL_NODE_APISERVER`); None when the
    /// cluster has no real node.
    pub(crate) fn from_env(env: &HashMap<String, String>) -> Result<Option<RealNode>> {
        let Some(name) = env.get("KLM_REAL_NODE").filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        let addr = env
            .get("KLM_REAL_NODE_APISERVER")
            .filter(|a| !a.is_empty())
            .context("cluster.env names a real node but no KLM_REAL_NODE_APISERVER")?;
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("KLM_REAL_NODE_APISERVER={addr:?} is not host:port"))?;
        Ok(Some(RealNode {
            name: name.clone(),
            apiserver_host: host.to_owned(),
            apiserver_port: port
                .parse()
                .with_context(|| format!("KLM_REAL_NODE_APISERVER={addr:?}: bad port"))?,
        }))
    }

    /// This host as the real node's pods reach it (the bridge's gateway address).
    pub fn host_address(&self) -> &str {
        &self.apiserver_host
    }
}
