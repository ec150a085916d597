//! Node reads and patches for the status label/annotation pair and our bookkeeping.
use k8s_openapi::api::core::v1::Node;
use klm_protocol::keys::node as keys;
use klm_protocol::lifecycle::ObservedNode;
use klm_protocol::plan::{NodeFacts, Taint};
use klm_protocol::run_machine::NodeSnapshot;
use klm_protocol::{Evidence, NodeStatus, TurnKind};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What the coordinator needs from a Node for the run lifecycle.
pub fn observe(node: Option<&Node>) -> ObservedNode {
    let Some(node) = node else {
        return ObservedNode::default();
    };
    ObservedNode {
        exists: node.metadata.deletion_timestamp.is_none(),
        status: annotation(node, keys::STATUS).and_then(|s| s.parse::<NodeStatus>().ok()),
        run_id: annotation(node, keys::RUN_ID).map(str::to_string),
        turn: annotation(node, keys::TURN).and_then(TurnKind::parse),
        evidence: annotation(node, keys::EVIDENCE)
            .and_then(|e| serde_json::from_str::<Evidence>(e).ok()),
        read_at_ms: None,
    }
}

/// Everything the run machine needs from a Node: planning facts and the lifecycle's view.
pub fn snapshot(node: &Node) -> NodeSnapshot {
    NodeSnapshot {
        facts: facts(node),
        observed: observe(Some(node)),
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

pub fn is_unschedulable(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

pub fn cordoned_by_us(node: &Node) -> bool {
    annotation(node, keys::CORDONED_BY) == Some(keys::CORDON_OWNER)
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
    let patch = json!({
        "metadata": {
            "labels": { keys::STATUS: NodeStatus::Failed.as_str() },
            "annotations": {
                keys::STATUS: NodeStatus::Failed.as_str(),
                keys::RUN_ID: run_id,
                keys::TURN: turn.as_str(),
                keys::EVIDENCE: serde_json::to_string(evidence).unwrap_or_default(),
            }
        }
    });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
