//! The run record: the coordinator's source of truth for a run, stored as JSON in the trigger
//! ConfigMap (`data["run.json"]`). Only the coordinator reads and writes it: an agent learns
//! about its turn from the grant on its own Node (`crate::grant`). Per node it keeps a short
//! report (status, times, [`Evidence::short`]: no log tail, no notes), so its size per node is
//! bounded; the failing node's full evidence is in [`RunFailure`]. Each node's full evidence
//! (log tail, notes) lives on its Node (`lifecycle.katacontainers.io/evidence`) and in Events,
//! where the status views read it.
use crate::params::RunParams;
use crate::status::{NodeStatus, RunPhase};
use crate::verification::FailureCause;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TurnKind {
    /// cordon → (drain) → restart kata-deploy at the new revision → verify → uncordon.
    Upgrade,
    /// after the release was rolled back: restart kata-deploy at the old revision → uncordon.
    Restore,
}

impl TurnKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnKind::Upgrade => "upgrade",
            TurnKind::Restore => "restore",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upgrade" => Some(TurnKind::Upgrade),
            "restore" => Some(TurnKind::Restore),
            _ => None,
        }
    }
}

/// Why a run exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    #[default]
    Upgrade,
    /// `rollback-node=<node>`: roll the release back and restore one node.
    ManualRollback,
}

/// A node whose turn it is. Only this node's agent may take its slot's upgrade Lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Turn {
    pub node: String,
    pub kind: TurnKind,
    /// Unix milliseconds when the coordinator granted the turn.
    pub granted_at_ms: i64,
    /// The wave slot: the agent holds the slot's Lease
    /// ([`crate::lease::slot_lease_name`]); 0 (the only slot with batch-size 1) is not written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slot: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What we know about the kata-deploy release and its DaemonSet revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseState {
    /// Helm revision deployed before the run: the rollback target.
    pub recorded_revision: u32,
    pub recorded_version: String,
    /// `controller-revision-hash` of the DaemonSet before the upgrade (pods restored to it).
    pub old_hash: String,
    /// Helm revision our upgrade produced (set once the upgrade is done or adopted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded_revision: Option<u32>,
    /// `controller-revision-hash` of the DaemonSet after the upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_hash: Option<String>,
    /// Whether the upgraded DaemonSet honours `updateStrategy.type=OnDelete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_delete: Option<bool>,
    /// Set once `helm rollback` to `recorded_revision` has completed.
    #[serde(default)]
    pub rolled_back: bool,
    /// Set (and persisted) just before the run's `helm upgrade` starts, so a restarted
    /// coordinator never issues a second one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upgrade_issued: bool,
    /// The mode the run works in, decided against the release before anything was touched
    /// (`kata_deploy::resolve_mode`); records from before job mode are daemonset runs.
    #[serde(default)]
    pub mode: crate::kata_deploy::DeploymentMode,
}

/// Evidence of a node's outcome, written by its agent to the Node; the run record keeps its
/// [`Evidence::short`] form per node and the failing node's in full ([`RunFailure`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    pub run_id: String,
    pub node: String,
    /// The step the outcome belongs to (e.g. `verifying`, `draining`, `upgrading`).
    pub step: String,
    pub succeeded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureCause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// Time from pod creation to its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_ms: Option<u64>,
    /// Time the kata-deploy pod restart took (delete → new revision Ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_ms: Option<u64>,
    /// Whole node turn, Lease taken → turn finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ms: Option<u64>,
    /// API requests the agent sent during this turn (a watch counts once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_requests: Option<u64>,
    /// Free-form notes (e.g. "node was already cordoned by someone else; left cordoned").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Evidence {
    /// The evidence without its bulk: no log tail (up to 2 KiB a node), no notes. Kept per node
    /// in the run record; the failure's cause (reason, message, exit code) and the figures stay.
    pub fn short(&self) -> Evidence {
        let mut e = self.clone();
        e.log_tail = None;
        e.notes.clear();
        e
    }
}

/// The coordinator's view of one planned node: bounded in size (no log tail, no notes), so the
/// record grows by a few hundred bytes per node, not by each node's log tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// [`Evidence::short`] of the node's last outcome in this run (the full one is on the Node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunFailure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub id: String,
    #[serde(default)]
    pub kind: RunKind,
    pub phase: RunPhase,
    /// Fingerprint of the trigger annotations that started this run.
    pub trigger: String,
    /// `None` when the inputs were rejected before they could be resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<RunParams>,
    pub target_version: String,
    /// Nodes in the order they get their turn.
    #[serde(default)]
    pub plan: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseState>,
    /// The turn in slot 0: the only one with batch-size 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<Turn>,
    /// Waves (batch-size > 1): the turns in slots 1 and up. Slot 0 stays in `turn`, so a
    /// batch-size 1 record is what it always was (an agent of the previous release, during an
    /// upgrade of this tool, still reads it). Use [`RunRecord::turns`] to see them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wave_turns: Vec<Turn>,
    /// When the first node failed (coordinator clock): from then on no upgrade turn starts; one
    /// granted but not started is taken back only on a direct read of its node made after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<i64>,
    /// Nodes still to restore, in order, while rolling back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_queue: Vec<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeReport>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<RunFailure>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub started_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// Nodes a manual `rollback-node` may still restore: those this run's upgrade completed
    /// (carried over to the manual-rollback records that follow, minus the node restored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_candidates: Vec<String>,
    /// `action=cancel` was given: no further turns; roll back what was done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// When the cancel was taken (coordinator clock): a turn is taken back only on a direct
    /// read of its node made after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at_ms: Option<i64>,
    /// `action=pause` was given (and no `resume` since): no new upgrade turn is granted. A node
    /// in progress finishes; restore turns of a rollback are never paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Set while the grant gate (maintenance window, blocking pods) holds the run's start or
    /// its next upgrade turn: why, until when, which node and pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<crate::grant_gate::Hold>,
    /// API requests the coordinator sent for this run (set when it finishes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_api_requests: Option<u64>,
    /// Job mode: every scoped `helm upgrade --set job.nodes={…}` the run issued (recorded
    /// before helm runs, so none is issued twice).
    #[serde(
        default,
        skip_serializing_if = "crate::install::InstallLedger::is_empty"
    )]
    pub installs: crate::install::InstallLedger,
}

impl RunRecord {
    pub fn new(id: String, trigger: String, target: String, now_ms: i64) -> Self {
        RunRecord {
            id,
            kind: RunKind::Upgrade,
            phase: RunPhase::Pending,
            trigger,
            params: None,
            target_version: target,
            plan: Vec::new(),
            release: None,
            turn: None,
            wave_turns: Vec::new(),
            failed_at_ms: None,
            restore_queue: Vec::new(),
            nodes: BTreeMap::new(),
            message: String::new(),
            failure: None,
            warnings: Vec::new(),
            started_at_ms: now_ms,
            finished_at_ms: None,
            rollback_candidates: Vec::new(),
            cancel_requested: false,
            cancel_requested_at_ms: None,
            paused: false,
            hold: None,
            coordinator_api_requests: None,
            installs: Default::default(),
        }
    }

    /// Nodes whose upgrade turn completed.
    pub fn completed(&self) -> usize {
        self.nodes
            .values()
            .filter(|r| r.status == Some(NodeStatus::Completed))
            .count()
    }

    /// "2/4": completed nodes over planned nodes.
    pub fn progress(&self) -> String {
        format!("{}/{}", self.completed(), self.plan.len())
    }

    /// Ends the run with `phase` and a message.
    pub fn finish(&mut self, phase: RunPhase, message: impl Into<String>, now_ms: i64) {
        self.phase = phase;
        self.message = message.into();
        // A finished run is held by nothing.
        self.hold = None;
        self.clear_turns();
        self.finished_at_ms = Some(now_ms);
    }

    /// Every turn in progress, by slot.
    pub fn turns(&self) -> Vec<Turn> {
        self.turn.iter().chain(&self.wave_turns).cloned().collect()
    }

    /// The turn this node has, if any.
    pub fn turn_of(&self, node: &str) -> Option<&Turn> {
        self.turn
            .iter()
            .chain(&self.wave_turns)
            .find(|t| t.node == node)
    }

    /// Records a granted turn in its slot.
    pub fn set_turn(&mut self, turn: Turn) {
        self.end_turn(turn.slot);
        if turn.slot == 0 {
            self.turn = Some(turn);
        } else {
            self.wave_turns.push(turn);
            self.wave_turns.sort_by_key(|t| t.slot);
        }
    }

    /// Frees a slot (its turn ended or was taken back).
    pub fn end_turn(&mut self, slot: u32) {
        if slot == 0 {
            self.turn = None;
        } else {
            self.wave_turns.retain(|t| t.slot != slot);
        }
    }

    pub fn clear_turns(&mut self) {
        self.turn = None;
        self.wave_turns.clear();
    }

    /// The lowest slot below `slots` without a turn.
    pub fn free_slot(&self, slots: usize) -> Option<u32> {
        (0..slots as u32).find(|s| {
            self.turn
                .iter()
                .chain(&self.wave_turns)
                .all(|t| t.slot != *s)
        })
    }

    /// Nodes in progress at once at most, as the run's parameters say (1 without them).
    pub fn wave_size(&self) -> usize {
        self.params.as_ref().map_or(1, RunParams::wave_size)
    }

    /// Pretty JSON, for people (`status --json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("run record serializes")
    }

    /// Compact JSON, as stored in the trigger ConfigMap: the record is rewritten on every step
    /// and sent to each of its watchers, so its indentation alone would cost a third more bytes.
    pub fn to_stored_json(&self) -> String {
        serde_json::to_string(self).expect("run record serializes")
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// A short, sortable, unique run id: `<target>-<unix seconds base36>-<random>`.
pub fn new_run_id(target: &str, now_ms: i64, rng: &mut impl rand::Rng) -> String {
    let mut secs = (now_ms / 1000).max(0) as u64;
    let mut b36 = Vec::new();
    loop {
        b36.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(secs % 36) as usize]);
        secs /= 36;
        if secs == 0 {
            break;
        }
    }
    b36.reverse();
    let target: String = target
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    format!(
        "{}-{}-{:04x}",
        target.trim_matches('-'),
        String::from_utf8(b36).expect("ascii"),
        rng.random::<u16>()
    )
}

/// Prefix of trigger fingerprints (earlier builds stored unprefixed `DefaultHasher` values).
pub const FINGERPRINT_PREFIX: &str = "sha256:";

/// Fingerprint of the run-defining trigger annotations: order-independent and stable across
/// builds and platforms (SHA-256 over `key=value` lines in a fixed key order).
pub fn trigger_fingerprint(annotations: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    if !annotations.contains_key(crate::keys::trigger::TARGET_VERSION) {
        return String::new();
    }
    let mut h = Sha256::new();
    for key in crate::keys::trigger::RUN_DEFINING {
        if let Some(v) = annotations.get(key) {
            h.update(key.as_bytes());
            h.update(b"=");
            h.update(v.trim().as_bytes());
            h.update(b"\n");
        }
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{FINGERPRINT_PREFIX}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_label_safe_and_unique() {
        let mut rng = rand::rng();
        let a = new_run_id("3.28.0", 1_764_000_000_000, &mut rng);
        let b = new_run_id("3.28.0", 1_764_000_000_000, &mut rng);
        assert!(a.starts_with("3-28-0-"), "{a}");
        assert!(a.len() <= 63);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
        assert_ne!(a, b);
    }

    #[test]
    fn fingerprint_ignores_unrelated_annotations() {
        let mut a = BTreeMap::new();
        assert_eq!(trigger_fingerprint(&a), "");
        a.insert(
            crate::keys::trigger::TARGET_VERSION.to_string(),
            "3.28.0".to_string(),
        );
        let f1 = trigger_fingerprint(&a);
        a.insert("kubectl.kubernetes.io/last-applied".into(), "x".into());
        a.insert(crate::keys::trigger::ROLLBACK_NODE.into(), "n1".into());
        assert_eq!(trigger_fingerprint(&a), f1);
        a.insert(crate::keys::trigger::DRAIN_ENABLED.into(), "true".into());
        assert_ne!(trigger_fingerprint(&a), f1);
    }

    #[test]
    fn fingerprint_is_stable_across_builds() {
        // A fixed value: `DefaultHasher` output may change between Rust releases, which made
        // an upgraded coordinator see a "new" trigger and start a run nobody asked for.
        let a: BTreeMap<String, String> = [(
            crate::keys::trigger::TARGET_VERSION.to_string(),
            " 3.28.0".to_string(),
        )]
        .into();
        assert_eq!(trigger_fingerprint(&a), "sha256:66f9f03b10967579");
    }

    #[test]
    fn turns_live_in_slots_and_batch_size_one_records_are_unchanged() {
        let turn = |node: &str, slot| Turn {
            node: node.into(),
            kind: TurnKind::Upgrade,
            granted_at_ms: 1,
            slot,
        };
        let mut r = RunRecord::new("id".into(), "t".into(), "3.28.0".into(), 5);
        r.set_turn(turn("a", 0));
        let json = r.to_json();
        assert!(
            !json.contains("slot") && !json.contains("waveTurns"),
            "{json}"
        );
        assert_eq!(r.free_slot(1), None);
        assert_eq!(r.free_slot(3), Some(1));
        r.set_turn(turn("c", 2));
        r.set_turn(turn("b", 1));
        assert_eq!(
            r.turns()
                .iter()
                .map(|t| t.node.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(r.turn_of("c").map(|t| t.slot), Some(2));
        assert_eq!(RunRecord::from_json(&r.to_json()).unwrap(), r);
        r.end_turn(0);
        assert_eq!(r.free_slot(3), Some(0));
        assert_eq!(r.turn_of("a"), None);
        r.finish(RunPhase::Succeeded, "done", 9);
        assert!(r.turns().is_empty());
    }

    /// Issue 12: the record's per-node evidence has a bounded size whatever the node's log.
    #[test]
    fn short_evidence_drops_what_grows_and_keeps_the_figures() {
        let full = Evidence {
            run_id: "r".into(),
            node: "n1".into(),
            step: "verifying".into(),
            pod: Some("verify-n1".into()),
            log_tail: Some("x".repeat(2048)),
            verification_ms: Some(1500),
            node_ms: Some(2500),
            notes: vec!["resumed".into()],
            failure: Some(crate::verification::FailureCause {
                reason: "NonZeroExit".into(),
                message: "container verify exited with code 1".into(),
                exit_code: Some(1),
            }),
            ..Default::default()
        };
        let short = full.short();
        assert_eq!(short.log_tail, None);
        assert!(short.notes.is_empty());
        assert_eq!(short.failure, full.failure);
        assert_eq!(short.pod, full.pod);
        assert_eq!(
            (short.verification_ms, short.node_ms),
            (Some(1500), Some(2500))
        );
        assert!(serde_json::to_string(&short).unwrap().len() < 500);
    }

    #[test]
    fn record_round_trips() {
        let mut r = RunRecord::new("id".into(), "t".into(), "3.28.0".into(), 5);
        r.plan = vec!["a".into(), "b".into()];
        r.nodes.insert(
            "a".into(),
            NodeReport {
                status: Some(NodeStatus::Completed),
                ..Default::default()
            },
        );
        assert_eq!(r.progress(), "1/2");
        assert_eq!(RunRecord::from_json(&r.to_json()).unwrap(), r);
    }
}
