//! The Node bookkeeping this agent writes, as JSON merge patches. Each patch carries the status
//! together with its run id and turn (the coordinator never sees a status without them), and
//! whatever else belongs to the same moment (cordon, pod name, version, evidence), so one step
//! transition is one API call.
use k8s_openapi::api::core::v1::Node;
use klm_protocol::keys::node as keys;
use klm_protocol::selector::valid_value;
use klm_protocol::{Evidence, NodeStatus, TurnKind};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePatch {
    labels: Map<String, Value>,
    annotations: Map<String, Value>,
    unschedulable: Option<Value>,
}

impl NodePatch {
    /// Status (label and annotation), run id and turn.
    pub fn status(run_id: &str, kind: TurnKind, status: NodeStatus) -> Self {
        let mut p = NodePatch::default();
        p.labels.insert(keys::STATUS.into(), status.as_str().into());
        p.annotations
            .insert(keys::STATUS.into(), status.as_str().into());
        p.annotations.insert(keys::RUN_ID.into(), run_id.into());
        p.annotations
            .insert(keys::TURN.into(), kind.as_str().into());
        p
    }

    /// When the status this patch writes began (kept across agent restarts).
    pub fn step_started_at(mut self, rfc3339: &str) -> Self {
        self.annotations
            .insert(keys::STEP_STARTED_AT.into(), rfc3339.into());
        self
    }

    pub fn started_at(mut self, rfc3339: &str) -> Self {
        self.annotations
            .insert(keys::STARTED_AT.into(), rfc3339.into());
        self
    }

    /// Cordon and mark the cordon as ours.
    pub fn cordon(mut self) -> Self {
        self.unschedulable = Some(Value::Bool(true));
        self.annotations
            .insert(keys::CORDONED_BY.into(), keys::CORDON_OWNER.into());
        self
    }

    /// Uncordon and drop our mark (only ever called when the mark is present).
    pub fn uncordon(mut self) -> Self {
        self.unschedulable = Some(Value::Null);
        self.annotations
            .insert(keys::CORDONED_BY.into(), Value::Null);
        self
    }

    /// The kata version now on the node, as label and annotation. A version that is not a valid
    /// label value (e.g. with `+build` metadata) is written as the annotation only.
    pub fn current_version(mut self, version: &str) -> Self {
        if version.is_empty() {
            return self;
        }
        if valid_value(version).is_ok() {
            self.labels
                .insert(keys::CURRENT_VERSION.into(), version.into());
        }
        self.annotations
            .insert(keys::CURRENT_VERSION.into(), version.into());
        self
    }

    pub fn evidence(mut self, evidence: &Evidence) -> Self {
        self.annotations.insert(
            keys::EVIDENCE.into(),
            serde_json::to_string(evidence)
                .expect("evidence serializes")
                .into(),
        );
        self
    }

    /// The verification pod in flight (`None` removes the annotation).
    pub fn verification_pod(mut self, name: Option<&str>) -> Self {
        self.annotations.insert(
            keys::VERIFICATION_POD.into(),
            name.map_or(Value::Null, Value::from),
        );
        self
    }

    pub fn to_json(&self) -> Value {
        let mut metadata = Map::new();
        if !self.labels.is_empty() {
            metadata.insert("labels".into(), Value::Object(self.labels.clone()));
        }
        if !self.annotations.is_empty() {
            metadata.insert(
                "annotations".into(),
                Value::Object(self.annotations.clone()),
            );
        }
        let mut patch = json!({ "metadata": metadata });
        if let Some(u) = &self.unschedulable {
            patch["spec"] = json!({ "unschedulable": u });
        }
        patch
    }
}

/// The `step-started-at` value: `<status>@<RFC 3339>`.
pub fn step_start_value(status: NodeStatus, at: jiff::Timestamp) -> String {
    format!("{status}@{at}")
}

/// When `status` began, if `value` records that status (a start left by another status is
/// not this step's).
pub fn step_start_of(value: &str, status: NodeStatus) -> Option<jiff::Timestamp> {
    let (at_status, at) = value.split_once('@')?;
    (at_status == status.as_str())
        .then(|| at.parse().ok())
        .flatten()
}

/// The bookkeeping annotations of a Node, as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bookkeeping {
    pub run_id: Option<String>,
    pub turn: Option<TurnKind>,
    pub status: Option<NodeStatus>,
    pub started_at: Option<String>,
    pub step_started_at: Option<String>,
    pub verification_pod: Option<String>,
    pub evidence: Option<Evidence>,
    pub cordoned_by_us: bool,
    pub unschedulable: bool,
}

impl Bookkeeping {
    pub fn of(node: &Node) -> Self {
        let a = |k: &str| {
            node.metadata
                .annotations
                .as_ref()
                .and_then(|m| m.get(k))
                .cloned()
        };
        Bookkeeping {
            run_id: a(keys::RUN_ID),
            turn: a(keys::TURN).as_deref().and_then(TurnKind::parse),
            status: a(keys::STATUS).and_then(|s| s.parse().ok()),
            started_at: a(keys::STARTED_AT),
            step_started_at: a(keys::STEP_STARTED_AT),
            verification_pod: a(keys::VERIFICATION_POD).filter(|s| !s.is_empty()),
            evidence: a(keys::EVIDENCE).and_then(|e| serde_json::from_str(&e).ok()),
            cordoned_by_us: klm_kube::nodes::cordoned_by_us(node),
            unschedulable: klm_kube::nodes::is_unschedulable(node),
        }
    }

    /// The Node's bookkeeping belongs to this very turn (a restarted agent resumes it).
    pub fn is_turn(&self, run_id: &str, kind: TurnKind) -> bool {
        self.run_id.as_deref() == Some(run_id) && self.turn == Some(kind)
    }

    /// Someone else cordoned the node: we leave it cordoned.
    pub fn foreign_cordon(&self) -> bool {
        self.unschedulable && !self.cordoned_by_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_start_belongs_to_its_status_only() {
        let at: jiff::Timestamp = "2026-11-25T15:00:00Z".parse().unwrap();
        let v = step_start_value(NodeStatus::Draining, at);
        assert_eq!(step_start_of(&v, NodeStatus::Draining), Some(at));
        assert_eq!(step_start_of(&v, NodeStatus::Upgrading), None);
        assert_eq!(step_start_of("garbage", NodeStatus::Draining), None);
        assert_eq!(
            step_start_of("draining@not-a-time", NodeStatus::Draining),
            None
        );
    }

    #[test]
    fn status_patch_carries_run_and_turn() {
        let p = NodePatch::status("r1", TurnKind::Upgrade, NodeStatus::Cordoned)
            .cordon()
            .to_json();
        assert_eq!(p["metadata"]["labels"][keys::STATUS], "cordoned");
        assert_eq!(p["metadata"]["annotations"][keys::STATUS], "cordoned");
        assert_eq!(p["metadata"]["annotations"][keys::RUN_ID], "r1");
        assert_eq!(p["metadata"]["annotations"][keys::TURN], "upgrade");
        assert_eq!(
            p["metadata"]["annotations"][keys::CORDONED_BY],
            "kata-lifecycle-manager"
        );
        assert_eq!(p["spec"]["unschedulable"], true);
    }

    #[test]
    fn final_patch_uncordons_and_records_version_and_evidence() {
        let ev = Evidence {
            run_id: "r1".into(),
            node: "n1".into(),
            step: "completed".into(),
            succeeded: true,
            ..Default::default()
        };
        let p = NodePatch::status("r1", TurnKind::Upgrade, NodeStatus::Completed)
            .current_version("3.28.0")
            .uncordon()
            .verification_pod(None)
            .evidence(&ev)
            .to_json();
        assert_eq!(p["spec"]["unschedulable"], Value::Null);
        assert!(p["spec"].as_object().unwrap().contains_key("unschedulable"));
        assert_eq!(p["metadata"]["annotations"][keys::CORDONED_BY], Value::Null);
        assert_eq!(p["metadata"]["labels"][keys::CURRENT_VERSION], "3.28.0");
        assert_eq!(
            p["metadata"]["annotations"][keys::CURRENT_VERSION],
            "3.28.0"
        );
        assert_eq!(
            p["metadata"]["annotations"][keys::VERIFICATION_POD],
            Value::Null
        );
        let back: Evidence = serde_json::from_str(
            p["metadata"]["annotations"][keys::EVIDENCE]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn no_spec_unless_schedulability_changes_and_bad_label_versions_stay_annotations() {
        let p = NodePatch::status("r", TurnKind::Restore, NodeStatus::RollingBack)
            .current_version("3.28.0+build.1")
            .to_json();
        assert!(p.get("spec").is_none());
        assert!(
            p["metadata"]["labels"]
                .as_object()
                .unwrap()
                .get(keys::CURRENT_VERSION)
                .is_none()
        );
        assert_eq!(
            p["metadata"]["annotations"][keys::CURRENT_VERSION],
            "3.28.0+build.1"
        );
        assert_eq!(p["metadata"]["annotations"][keys::TURN], "restore");
    }

    #[test]
    fn bookkeeping_reads_back_what_we_write() {
        let mut node = Node::default();
        node.metadata.annotations = Some(
            [
                (keys::RUN_ID.to_string(), "r1".to_string()),
                (keys::TURN.to_string(), "upgrade".to_string()),
                (keys::STATUS.to_string(), "verifying".to_string()),
                (
                    keys::VERIFICATION_POD.to_string(),
                    "kata-verify-n1-x".to_string(),
                ),
            ]
            .into(),
        );
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let b = Bookkeeping::of(&node);
        assert!(b.is_turn("r1", TurnKind::Upgrade));
        assert!(!b.is_turn("r1", TurnKind::Restore));
        assert_eq!(b.status, Some(NodeStatus::Verifying));
        assert_eq!(b.verification_pod.as_deref(), Some("kata-verify-n1-x"));
        assert!(b.foreign_cordon());
    }
}
