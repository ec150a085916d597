//! Simulated nodes of a slice. kwok manages every node annotated `kwok.x-k8s.io/node=fake`
//! (see `tests/cluster/kwok-stages.yaml` for how they become Ready, or NotReady on request).
//!
//! Every method takes a node's full name or its suffix (`node-1` ≡ `<id>-node-1`).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;

use crate::slice::{SLICE_LABEL, Slice};
use crate::wait::{DEFAULT_TIMEOUT, is_node_ready, node_ready_status, wait_for, when};

/// Label that makes kwok report a node NotReady (the `node-not-ready` stage).
pub const NOT_READY_LABEL: &str = "klm.test/not-ready";

impl Slice {
    fn node_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Creates simulated node `<id>-<name>` in this slice and waits until it is Ready.
    /// Returns its full name.
    pub async fn add_node(&self, name: &str) -> Result<String> {
        let name = self.node_name(name);
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    SLICE_LABEL: self.id,
                },
                "annotations": {
                    "kwok.x-k8s.io/node": "fake",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
            },
        }))?;
        let api = self.node_api();
        api.create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {name}"))?;
        wait_for(
            &api,
            &name,
            &format!("node {name} Ready"),
            DEFAULT_TIMEOUT,
            when(is_node_ready),
        )
        .await?;
        Ok(name)
    }

    /// The slice's nodes' names, sorted naturally (`node-2` before `node-10`).
    pub async fn nodes(&self) -> Result<Vec<String>> {
        let mut nodes = self
            .node_api()
            .list(&ListParams::default().labels(&self.node_selector()))
            .await?
            .items;
        nodes.sort_by_key(natural_key);
        Ok(nodes.into_iter().filter_map(|n| n.metadata.name).collect())
    }

    /// Reads one node.
    pub async fn node(&self, name: &str) -> Result<Node> {
        Ok(self.node_api().get(&self.node_name(name)).await?)
    }

    async fn patch_node(&self, name: &str, patch: serde_json::Value) -> Result<Node> {
        let name = self.node_name(name);
        self.node_api()
            .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .with_context(|| format!("patch node {name} with {patch}"))
    }

    pub async fn label_node(&self, name: &str, key: &str, value: &str) -> Result<()> {
        self.patch_node(
            name,
            serde_json::json!({"metadata": {"labels": {key: value}}}),
        )
        .await
        .map(drop)
    }

    pub async fn unlabel_node(&self, name: &str, key: &str) -> Result<()> {
        self.patch_node(
            name,
            serde_json::json!({"metadata": {"labels": {key: null}}}),
        )
        .await
        .map(drop)
    }

    /// Adds (or replaces) the taint `key[=value]:effect`.
    pub async fn taint_node(&self, name: &str, key: &str, value: &str, effect: &str) -> Result<()> {
        let taint = Taint {
            key: key.to_owned(),
            value: (!value.is_empty()).then(|| value.to_owned()),
            effect: effect.to_owned(),
            time_added: None,
        };
        self.update_taints(name, |taints| {
            taints.retain(|t| !(t.key == taint.key && t.effect == taint.effect));
            taints.push(taint.clone());
        })
        .await
    }

    /// Removes every taint with `key`.
    pub async fn untaint_node(&self, name: &str, key: &str) -> Result<()> {
        self.update_taints(name, |taints| taints.retain(|t| t.key != key))
            .await
    }

    /// `spec.taints` has no merge key, so a patch would replace the list wholesale and could
    /// drop a taint the node controller added meanwhile: read-modify-write with the
    /// resourceVersion instead, retrying on 409.
    async fn update_taints(&self, name: &str, edit: impl Fn(&mut Vec<Taint>)) -> Result<()> {
        let name = self.node_name(name);
        let api = self.node_api();
        loop {
            let mut node = api.get(&name).await?;
            let spec = node.spec.get_or_insert_with(Default::default);
            let mut taints = spec.taints.take().unwrap_or_default();
            edit(&mut taints);
            spec.taints = Some(taints);
            match api.replace(&name, &PostParams::default(), &node).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("update taints of {name}")),
            }
        }
    }

    /// `kubectl cordon`: a strategic-merge patch of `spec.unschedulable`.
    pub async fn cordon(&self, name: &str) -> Result<()> {
        self.patch_node(name, serde_json::json!({"spec": {"unschedulable": true}}))
            .await
            .map(drop)
    }

    pub async fn uncordon(&self, name: &str) -> Result<()> {
        self.patch_node(name, serde_json::json!({"spec": {"unschedulable": null}}))
            .await
            .map(drop)
    }

    /// Deletes the node and waits until it is gone.
    pub async fn delete_node(&self, name: &str) -> Result<()> {
        let name = self.node_name(name);
        let api = self.node_api();
        let uid = api.get(&name).await?.metadata.uid.unwrap_or_default();
        api.delete(&name, &DeleteParams::default()).await?;
        wait_for(
            &api,
            &name,
            &format!("node {name} deleted"),
            DEFAULT_TIMEOUT,
            conditions::is_deleted(&uid),
        )
        .await
        .map(drop)
    }

    /// Makes kwok report the node NotReady (as a node whose kubelet stopped), and waits for it.
    /// The node lifecycle controller then taints it `node.kubernetes.io/not-ready`.
    pub async fn set_node_not_ready(&self, name: &str) -> Result<()> {
        self.label_node(name, NOT_READY_LABEL, "true").await?;
        self.wait_node_ready(name, false).await
    }

    /// Undoes [`Slice::set_node_not_ready`] and waits until the node is Ready again.
    pub async fn set_node_ready(&self, name: &str) -> Result<()> {
        self.unlabel_node(name, NOT_READY_LABEL).await?;
        self.wait_node_ready(name, true).await
    }

    async fn wait_node_ready(&self, name: &str, ready: bool) -> Result<()> {
        let name = self.node_name(name);
        wait_for(
            &self.node_api(),
            &name,
            &format!("node {name} Ready={ready}"),
            DEFAULT_TIMEOUT,
            when(move |n: &Node| node_ready_status(n) == Some(ready)),
        )
        .await
        .map(drop)
    }
}

/// Sort key that orders `x-node-2` before `x-node-10`: digit runs compare as numbers.
fn natural_key(node: &Node) -> String {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut key = String::new();
    let mut digits = String::new();
    for c in name.chars().chain(std::iter::once('\0')) {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if !digits.is_empty() {
            key.push_str(&format!("{digits:0>20}"));
            digits.clear();
        }
        key.push(c);
    }
    key
}
