//! Node reads and patches for the status label/annotation pair and our bookkeeping.
use k8s_openapi::api::core::v1::Node;
use klm_protocol::lifecycle::ObservedNode;
use klm_protocol::node_record::{self, NodeRecord};
use klm_protocol::plan::{NodeFacts, Taint};
use klm_protocol::run_machine::NodeSnapshot;
use klm_protocol::{Evidence, TurnKind};
use kube::api::{Api, Patch, PatchParams};

/// What the coordinator needs from a Node for the run lifecycle (the bookkeeping contract is
/// `klm_protocol::node_record`: read and written in that one place).
pub fn observe(node: Option<&Node>) -> ObservedNode {
    let Some(node) = node else {
        return ObservedNode::default();
    };
    let record = NodeRecord::of(node);
    ObservedNode {
        exists: record.exists,
        status: record.status,
        run_id: record.run_id,
        turn: record.turn,
        evidence: record.evidence,
        read_at_ms: None,
    }
}

/// Everything the run machine needs from a Node: planning facts and the lifecycle's view.
pub fn snapshot(node: &Node) -> NodeSnapshot {
    NodeSnapshot {
        facts: facts(node),
        observed: observe(Some(node)),
        grant: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(klm_protocol::grant::ANNOTATION).cloned()),
        resource_version: node.metadata.resource_version.clone(),
    }
}

/// Labels and taints for planning.
pub fn facts(node: &Node) -> NodeFacts {
    NodeFacts {
        name: node.metadata.name.clone().unwrap_or_default(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        taints: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| Taint {
                key: t.key,
                value: t.value.unwrap_or_default(),
                effect: t.effect,
            })
            .collect(),
    }
}

/// Marks a node `failed` for a run when its agent cannot (lost agent or node). Keeps the
/// cordon: a node that vanished mid-upgrade must be inspected before it takes workloads.
pub async fn mark_failed(
    api: &Api<Node>,
    node: &str,
    run_id: &str,
    turn: TurnKind,
    evidence: &Evidence,
) -> kube::Result<()> {
    let patch = node_record::failed_by_coordinator(run_id, turn, evidence).to_json();
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
