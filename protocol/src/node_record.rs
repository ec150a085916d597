//! The Node bookkeeping contract: which label or annotation on a Node means what, read and
//! written in this one place (the keys themselves are `keys::node`). Agents write their turn's
//! progress with [`NodePatch`]; the agent (to resume) and the coordinator (to follow the run)
//! read it back with [`NodeRecord::of`].
//!
//! Each patch carries the status together with its run id and turn, so nobody ever sees a
//! status without knowing which run and turn it belongs to, and whatever else belongs to the
//! same moment (cordon, pod name, version, evidence), so one step transition is one API call.
use crate::drain_request::{DrainRequest, DrainResult};
use crate::keys::node as keys;
use crate::run::{Evidence, TurnKind};
use crate::selector::valid_value;
use crate::status::NodeStatus;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

/// A JSON merge patch of a Node's bookkeeping.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePatch {
    labels: Map<String, Value>,
    annotations: Map<String, Value>,
    unschedulable: Option<Value>,
    resource_version: Option<String>,
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

    /// The patch applies only to the Node at this `resourceVersion` (the API server answers 409
    /// otherwise). Used on the writes a stale process must not make: the final status and the
    /// uncordon, which a paused agent would otherwise write over the coordinator's verdict.
    pub fn precondition(mut self, resource_version: Option<&str>) -> Self {
        self.resource_version = resource_version.map(str::to_string);
        self
    }

    /// When the status this patch writes began (kept across agent restarts); see
    /// [`step_start_value`].
    pub fn step_started_at(mut self, status: NodeStatus, at: Timestamp) -> Self {
        self.annotations.insert(
            keys::STEP_STARTED_AT.into(),
            step_start_value(status, at).into(),
        );
        self
    }

    /// When the node's turn began.
    pub fn started_at(mut self, at: Timestamp) -> Self {
        self.annotations
            .insert(keys::STARTED_AT.into(), at.to_string().into());
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
        // Evidence is plain strings and numbers: serializing it cannot fail.
        let text = serde_json::to_string(evidence).unwrap_or_default();
        self.annotations.insert(keys::EVIDENCE.into(), text.into());
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

    /// The agent's drain request (`None` removes it).
    pub fn drain_request(mut self, request: Option<&DrainRequest>) -> Self {
        self.annotations.insert(
            keys::DRAIN_REQUEST.into(),
            request.map_or(Value::Null, |r| r.value().into()),
        );
        self
    }

    /// The coordinator's drain report (`None` removes it).
    pub fn drain_result(mut self, result: Option<&DrainResult>) -> Self {
        // A report is plain strings: serializing it cannot fail.
        let text = result.map(|r| serde_json::to_string(r).unwrap_or_default());
        self.annotations.insert(
            keys::DRAIN_RESULT.into(),
            text.map_or(Value::Null, Value::from),
        );
        self
    }

    /// Whether this patch makes the node schedulable again.
    pub fn uncordons(&self) -> bool {
        self.unschedulable == Some(Value::Null)
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
        if let Some(rv) = &self.resource_version {
            metadata.insert("resourceVersion".into(), rv.clone().into());
        }
        let mut patch = json!({ "metadata": metadata });
        if let Some(u) = &self.unschedulable {
            patch["spec"] = json!({ "unschedulable": u });
        }
        patch
    }
}

/// The patch the coordinator writes when a node's agent cannot (agent or node lost): `failed`
/// with its evidence. Keeps the cordon: a node that vanished mid-upgrade must be inspected
/// before it takes workloads.
pub fn failed_by_coordinator(run_id: &str, kind: TurnKind, evidence: &Evidence) -> NodePatch {
    NodePatch::status(run_id, kind, NodeStatus::Failed).evidence(evidence)
}

/// The `step-started-at` value: `<status>@<RFC 3339>`, so a start left by another status is
/// never mistaken for this one.
pub fn step_start_value(status: NodeStatus, at: Timestamp) -> String {
    format!("{status}@{at}")
}

/// When `status` began, if `value` records that status.
pub fn step_start_of(value: &str, status: NodeStatus) -> Option<Timestamp> {
    let (at_status, at) = value.split_once('@')?;
    (at_status == status.as_str())
        .then(|| at.parse().ok())
        .flatten()
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

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// A Node's bookkeeping, as read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// The Node exists and is not being deleted.
    pub exists: bool,
    pub resource_version: Option<String>,
    pub run_id: Option<String>,
    pub turn: Option<TurnKind>,
    pub status: Option<NodeStatus>,
    pub started_at: Option<Timestamp>,
    pub step_started_at: Option<String>,
    pub verification_pod: Option<String>,
    pub evidence: Option<Evidence>,
    pub cordoned_by_us: bool,
    pub unschedulable: bool,
    /// The agent's drain request, as written (checked by `drain_request::admit`).
    pub drain_request: Option<String>,
    /// The coordinator's drain report (unreadable JSON reads as none).
    pub drain_result: Option<DrainResult>,
}

impl NodeRecord {
    pub fn of(node: &Node) -> Self {
        let a = |k: &str| annotation(node, k).map(str::to_string);
        NodeRecord {
            exists: node.metadata.deletion_timestamp.is_none(),
            resource_version: node.metadata.resource_version.clone(),
            run_id: a(keys::RUN_ID),
            turn: a(keys::TURN).as_deref().and_then(TurnKind::parse),
            status: a(keys::STATUS).and_then(|s| s.parse().ok()),
            started_at: a(keys::STARTED_AT).and_then(|s| s.parse().ok()),
            step_started_at: a(keys::STEP_STARTED_AT),
            verification_pod: a(keys::VERIFICATION_POD).filter(|s| !s.is_empty()),
            evidence: a(keys::EVIDENCE).and_then(|e| serde_json::from_str(&e).ok()),
            cordoned_by_us: cordoned_by_us(node),
            unschedulable: is_unschedulable(node),
            drain_request: a(keys::DRAIN_REQUEST).filter(|s| !s.is_empty()),
            drain_result: a(keys::DRAIN_RESULT).and_then(|r| serde_json::from_str(&r).ok()),
        }
    }

    /// The bookkeeping belongs to this very turn (a restarted agent resumes it).
    pub fn is_turn(&self, run_id: &str, kind: TurnKind) -> bool {
        self.run_id.as_deref() == Some(run_id) && self.turn == Some(kind)
    }

    /// Someone else cordoned the node: we leave it cordoned.
    pub fn foreign_cordon(&self) -> bool {
        self.unschedulable && !self.cordoned_by_us
    }

    /// When `status` began in this turn, if the Node records it.
    pub fn step_started(
        &self,
        run_id: &str,
        kind: TurnKind,
        status: NodeStatus,
    ) -> Option<Timestamp> {
        if !self.is_turn(run_id, kind) {
            return None;
        }
        step_start_of(self.step_started_at.as_deref()?, status)
    }

    /// The verification pod a restarted agent adopts instead of starting another: the one this
    /// very turn recorded while verifying.
    pub fn verification_pod_to_adopt(&self, run_id: &str, kind: TurnKind) -> Option<&str> {
        self.verification_pod
            .as_deref()
            .filter(|_| self.is_turn(run_id, kind) && self.status == Some(NodeStatus::Verifying))
    }

    /// Whether an agent may still write its turn's outcome over what the Node now shows: the
    /// Node shows this turn, in a status the agent itself writes while working. A `failed`
    /// written by the coordinator (it declared the agent lost), or another run's status, means
    /// the turn was taken from us: a stale agent must not overwrite it.
    pub fn still_ours(&self, run_id: &str, kind: TurnKind) -> bool {
        let working = |s: NodeStatus| match kind {
            // An upgrade turn that failed ends in `rolling-back`; only a restore turn works in it.
            TurnKind::Upgrade => s.is_in_progress() && s != NodeStatus::RollingBack,
            TurnKind::Restore => s.is_in_progress(),
        };
        self.exists && self.is_turn(run_id, kind) && self.status.is_some_and(working)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_start_belongs_to_its_status_only() {
        let at: Timestamp = "2026-11-25T15:00:00Z".parse().unwrap();
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
        assert!(p["metadata"].get("resourceVersion").is_none());
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
        let patch = NodePatch::status("r1", TurnKind::Upgrade, NodeStatus::Completed)
            .current_version("3.28.0")
            .uncordon()
            .verification_pod(None)
            .evidence(&ev)
            .precondition(Some("42"));
        assert!(patch.uncordons());
        let p = patch.to_json();
        assert_eq!(p["metadata"]["resourceVersion"], "42");
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

    fn node(annotations: &[(&str, &str)], unschedulable: bool) -> Node {
        let mut node = Node::default();
        node.metadata.resource_version = Some("7".into());
        node.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(unschedulable),
            ..Default::default()
        });
        node
    }

    #[test]
    fn the_record_reads_back_what_we_write() {
        let at: Timestamp = "2026-11-25T15:00:00Z".parse().unwrap();
        let n = node(
            &[
                (keys::RUN_ID, "r1"),
                (keys::TURN, "upgrade"),
                (keys::STATUS, "verifying"),
                (keys::VERIFICATION_POD, "kata-verify-n1-x"),
                (
                    keys::STEP_STARTED_AT,
                    &step_start_value(NodeStatus::Verifying, at),
                ),
                (keys::STARTED_AT, "2026-11-25T14:59:00Z"),
            ],
            true,
        );
        let b = NodeRecord::of(&n);
        assert!(b.exists);
        assert_eq!(b.resource_version.as_deref(), Some("7"));
        assert!(b.is_turn("r1", TurnKind::Upgrade));
        assert!(!b.is_turn("r1", TurnKind::Restore));
        assert_eq!(b.status, Some(NodeStatus::Verifying));
        assert_eq!(b.verification_pod.as_deref(), Some("kata-verify-n1-x"));
        assert_eq!(
            b.verification_pod_to_adopt("r1", TurnKind::Upgrade),
            Some("kata-verify-n1-x")
        );
        assert_eq!(b.verification_pod_to_adopt("r0", TurnKind::Upgrade), None);
        assert!(b.foreign_cordon());
        assert_eq!(
            b.step_started("r1", TurnKind::Upgrade, NodeStatus::Verifying),
            Some(at)
        );
        assert_eq!(
            b.step_started("r2", TurnKind::Upgrade, NodeStatus::Verifying),
            None
        );
        assert_eq!(b.started_at, Some("2026-11-25T14:59:00Z".parse().unwrap()));
    }

    #[test]
    fn a_turn_taken_from_us_is_no_longer_ours_to_finish() {
        let ours = |status: &str| {
            NodeRecord::of(&node(
                &[
                    (keys::RUN_ID, "r1"),
                    (keys::TURN, "upgrade"),
                    (keys::STATUS, status),
                ],
                true,
            ))
        };
        assert!(ours("verifying").still_ours("r1", TurnKind::Upgrade));
        assert!(ours("cordoned").still_ours("r1", TurnKind::Upgrade));
        // The coordinator declared the agent lost and wrote `failed`.
        assert!(!ours("failed").still_ours("r1", TurnKind::Upgrade));
        assert!(!ours("completed").still_ours("r1", TurnKind::Upgrade));
        assert!(!ours("rolling-back").still_ours("r1", TurnKind::Upgrade));
        assert!(!ours("verifying").still_ours("r2", TurnKind::Upgrade));
        assert!(!NodeRecord::default().still_ours("r1", TurnKind::Upgrade));
        let p = failed_by_coordinator("r1", TurnKind::Upgrade, &Evidence::default()).to_json();
        assert_eq!(p["metadata"]["annotations"][keys::STATUS], "failed");
        assert!(p.get("spec").is_none(), "keeps the cordon");
    }

    #[test]
    fn the_drain_handshake_reads_back_and_clears() {
        let req = DrainRequest::new("r1", TurnKind::Upgrade);
        let result = DrainResult::done(&req, "2 pods evicted");
        let p = NodePatch::default()
            .drain_request(Some(&req))
            .drain_result(Some(&result))
            .to_json();
        assert_eq!(
            p["metadata"]["annotations"][keys::DRAIN_REQUEST],
            "upgrade/r1"
        );
        let written: Vec<(String, String)> = p["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = written
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let back = NodeRecord::of(&node(&refs, true));
        assert_eq!(back.drain_request.as_deref(), Some("upgrade/r1"));
        assert_eq!(back.drain_result, Some(result));
        let cleared = NodePatch::default()
            .drain_request(None)
            .drain_result(None)
            .to_json();
        assert_eq!(
            cleared["metadata"]["annotations"][keys::DRAIN_REQUEST],
            Value::Null
        );
        assert_eq!(
            cleared["metadata"]["annotations"][keys::DRAIN_RESULT],
            Value::Null
        );
        // A report that is not ours to read is no report.
        let garbage = NodeRecord::of(&node(&[(keys::DRAIN_RESULT, "{oops")], true));
        assert_eq!(garbage.drain_result, None);
    }
}
