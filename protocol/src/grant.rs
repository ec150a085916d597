//! The grant: a node's turn, written by the coordinator on that node's own Node object
//! (annotation [`ANNOTATION`]), so that an agent learns about its turn from its own Node and
//! nothing else (README, "How it works": per-agent traffic does not grow with the fleet).
//!
//! The run record stays the coordinator's source of truth; [`desired`] derives from it the grant
//! each node must carry right now, and the run machine writes the difference (an
//! `Effect::WriteGrant`) after every step. A restarted coordinator derives the same grants from
//! the persisted record, so nothing about grants needs persisting on its own. The agent never
//! writes this annotation (the chart's admission policy refuses it): taking the upgrade Lease
//! still needs the grant to name this node's turn, and the Lease stays the mutual exclusion.
use crate::params::RunParams;
use crate::run::{ReleaseState, RunRecord, TurnKind};
use crate::status::RunPhase;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The Node annotation carrying the grant (JSON [`Grant`]); absent: no turn.
pub const ANNOTATION: &str = crate::keys::node::GRANT;

/// Everything an agent needs for one turn: exactly what it used to read from the run record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub run_id: String,
    pub kind: TurnKind,
    /// The wave slot: which upgrade Lease this turn holds (0, the upgrade Lease itself, with
    /// batch-size 1; see [`crate::lease::slot_lease_name`]).
    #[serde(default)]
    pub slot: u32,
    /// Unix milliseconds when the coordinator granted the turn.
    pub granted_at_ms: i64,
    pub target_version: String,
    pub params: RunParams,
    pub release: ReleaseState,
    /// The run asks this turn to stop (`action=cancel`, or a wave-mate failed and the run rolls
    /// back): an upgrade turn stops at its next safe point and ends `rolling-back` with the
    /// reason `Cancelled`. A restore turn always finishes.
    #[serde(default, rename = "cancel")]
    pub cancel_requested: bool,
    /// The coordinator that made it (its trigger ConfigMap, `<namespace>/<name>`): one
    /// coordinator never takes back another installation's grants.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer: String,
}

/// A turn is identified by its run and kind: an upgrade turn and the later restore turn of the
/// same run are different turns.
pub type TurnKey = (String, TurnKind);

impl Grant {
    pub fn key(&self) -> TurnKey {
        (self.run_id.clone(), self.kind)
    }

    /// The `controller-revision-hash` this turn restarts kata-deploy to (empty when the run
    /// does not know it, which the restart step reports as a failure).
    pub fn want_hash(&self) -> &str {
        match self.kind {
            TurnKind::Upgrade => self.release.new_hash.as_deref().unwrap_or(""),
            TurnKind::Restore => &self.release.old_hash,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a grant serializes")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The grant every node must carry now, by node: one per turn of an active run in the phase its
/// kind belongs to. An upgrade turn still in the record while the run rolls back belongs to a
/// node whose wave-mate failed: it keeps its grant only to stop at its next safe point. A run
/// without parameters (refused before they could be resolved) grants nothing.
pub fn desired(run: Option<&RunRecord>) -> BTreeMap<String, Grant> {
    let Some(run) = run else {
        return BTreeMap::new();
    };
    let Some(params) = run.params.as_ref() else {
        return BTreeMap::new();
    };
    run.turns()
        .into_iter()
        .filter_map(|t| {
            let stopping = match (t.kind, run.phase) {
                (TurnKind::Upgrade, RunPhase::Running)
                | (TurnKind::Restore, RunPhase::RollingBack) => false,
                (TurnKind::Upgrade, RunPhase::RollingBack) => true,
                _ => return None,
            };
            let grant = Grant {
                run_id: run.id.clone(),
                kind: t.kind,
                slot: t.slot,
                granted_at_ms: t.granted_at_ms,
                target_version: run.target_version.clone(),
                params: params.clone(),
                release: run.release.clone().unwrap_or_default(),
                cancel_requested: stopping || run.cancel_requested,
                issuer: String::new(),
            };
            Some((t.node, grant))
        })
        .collect()
}

/// Whether the annotation `observed` on a Node already says `want` (absent for no grant). Text
/// that does not parse never does: the coordinator, its only writer, puts its own back.
pub fn carries(observed: Option<&str>, want: Option<&Grant>) -> bool {
    match (observed, want) {
        (None, None) => true,
        (Some(text), Some(want)) => Grant::from_json(text).is_ok_and(|g| g == *want),
        _ => false,
    }
}

/// The merge patch that sets (or, with `None`, removes) a Node's grant, on condition that the
/// Node is still at `resource_version`: a grant is never written over a change not read yet.
pub fn patch(grant: Option<&Grant>, resource_version: Option<&str>) -> serde_json::Value {
    let mut meta = serde_json::json!({
        "annotations": { ANNOTATION: grant.map(Grant::to_json) },
    });
    if let Some(rv) = resource_version {
        meta["resourceVersion"] = rv.into();
    }
    serde_json::json!({ "metadata": meta })
}

/// What a Node's grant annotation tells its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// No grant: no turn (or the turn was taken back).
    Idle,
    Turn(Box<Grant>),
    /// The annotation is there but is not a grant; the message says why. It gives no turn,
    /// and takes none back: the coordinator, its only writer, puts a readable one back.
    Unusable(String),
}

/// Reads a Node's grant annotation (`None`: absent).
pub fn read(annotation: Option<&str>) -> Reading {
    match annotation {
        None => Reading::Idle,
        Some(text) => match Grant::from_json(text) {
            Ok(g) => Reading::Turn(Box::new(g)),
            Err(e) => Reading::Unusable(format!(
                "annotation {ANNOTATION} on this node is not a grant ({e}); it is written by the coordinator — check its version and logs"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Turn;

    fn params() -> RunParams {
        RunParams {
            target_version: "3.28.0".into(),
            helm_release: "kata-deploy".into(),
            verification_namespace: "default".into(),
            ..Default::default()
        }
    }

    fn record(phase: RunPhase, turns: &[(&str, TurnKind, u32)]) -> RunRecord {
        let mut r = RunRecord::new("r1".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = phase;
        r.params = Some(params());
        r.release = Some(ReleaseState {
            old_hash: "old".into(),
            new_hash: Some("new".into()),
            ..Default::default()
        });
        for (node, kind, slot) in turns {
            r.set_turn(Turn {
                node: node.to_string(),
                kind: *kind,
                granted_at_ms: 5,
                slot: *slot,
            });
        }
        r
    }

    fn granted(r: &RunRecord) -> Vec<(String, TurnKind, u32, bool)> {
        desired(Some(r))
            .into_iter()
            .map(|(n, g)| (n, g.kind, g.slot, g.cancel_requested))
            .collect()
    }

    #[test]
    fn exactly_the_turns_of_an_active_run_in_their_phase_are_granted() {
        use RunPhase::*;
        use TurnKind::*;
        type Case<'a> = (
            RunPhase,
            Vec<(&'a str, TurnKind, u32)>,
            Vec<(&'a str, TurnKind, u32, bool)>,
        );
        let cases: Vec<Case> = vec![
            (
                Running,
                vec![("n1", Upgrade, 0)],
                vec![("n1", Upgrade, 0, false)],
            ),
            (Running, vec![], vec![]),
            (
                Running,
                vec![("n1", Upgrade, 0), ("n2", Upgrade, 1)],
                vec![("n1", Upgrade, 0, false), ("n2", Upgrade, 1, false)],
            ),
            (
                RollingBack,
                vec![("n1", Restore, 0)],
                vec![("n1", Restore, 0, false)],
            ),
            // A wave-mate of a failed node keeps its grant only to stop at its next safe point.
            (
                RollingBack,
                vec![("n2", Upgrade, 1)],
                vec![("n2", Upgrade, 1, true)],
            ),
            // A turn in a phase its kind does not belong to, or in a finished run: no grant.
            (Running, vec![("n1", Restore, 0)], vec![]),
            (Pending, vec![("n1", Upgrade, 0)], vec![]),
            (Upgrading, vec![("n1", Upgrade, 0)], vec![]),
            (Succeeded, vec![("n1", Upgrade, 0)], vec![]),
            (Failed, vec![("n1", Restore, 0)], vec![]),
            (Cancelled, vec![("n1", Restore, 0)], vec![]),
        ];
        for (phase, turns, want) in cases {
            let want: Vec<_> = want
                .into_iter()
                .map(|(n, k, s, c)| (n.to_string(), k, s, c))
                .collect();
            assert_eq!(granted(&record(phase, &turns)), want, "{phase:?} {turns:?}");
        }
        assert!(desired(None).is_empty());
    }

    #[test]
    fn a_grant_carries_what_the_agent_needs_and_the_runs_cancel() {
        let mut r = record(RunPhase::Running, &[("n1", TurnKind::Upgrade, 0)]);
        let g = &desired(Some(&r))["n1"];
        assert_eq!(g.run_id, "r1");
        assert_eq!(g.params, params());
        assert_eq!(g.target_version, "3.28.0");
        assert_eq!(g.granted_at_ms, 5);
        assert_eq!(g.want_hash(), "new");
        assert_eq!(g.key(), ("r1".to_string(), TurnKind::Upgrade));
        r.cancel_requested = true;
        assert!(desired(Some(&r))["n1"].cancel_requested);
        let restore = record(RunPhase::RollingBack, &[("n1", TurnKind::Restore, 0)]);
        assert_eq!(desired(Some(&restore))["n1"].want_hash(), "old");
        // Refused before its parameters were resolved: nothing to act on, nothing granted.
        r.params = None;
        assert!(desired(Some(&r)).is_empty());
    }

    #[test]
    fn a_node_carries_its_grant_only_when_the_annotation_says_exactly_it() {
        let r = record(RunPhase::Running, &[("n1", TurnKind::Upgrade, 0)]);
        let g = desired(Some(&r))["n1"].clone();
        let text = g.to_json();
        assert!(carries(None, None));
        assert!(carries(Some(&text), Some(&g)));
        assert!(!carries(None, Some(&g)));
        assert!(!carries(Some(&text), None));
        assert!(!carries(Some("{garbage"), Some(&g)));
        assert!(!carries(Some("{garbage"), None));
        let mut cancelled = g.clone();
        cancelled.cancel_requested = true;
        assert!(!carries(Some(&text), Some(&cancelled)));
    }

    #[test]
    fn the_agent_reads_its_annotation() {
        let r = record(RunPhase::Running, &[("n1", TurnKind::Upgrade, 0)]);
        let g = desired(Some(&r))["n1"].clone();
        let other_run = Grant {
            run_id: "r2".into(),
            ..g.clone()
        };
        let cases: Vec<(Option<String>, Option<TurnKey>, bool)> = vec![
            (None, None, false),
            (Some("{garbage".into()), None, true),
            (Some("{}".into()), None, true),
            (Some(g.to_json()), Some(g.key()), false),
            (Some(other_run.to_json()), Some(other_run.key()), false),
        ];
        for (annotation, want, unusable) in cases {
            let got = read(annotation.as_deref());
            match (&got, &want) {
                (Reading::Turn(a), Some(k)) => assert_eq!(a.key(), *k),
                (Reading::Idle, None) => assert!(!unusable, "{annotation:?}"),
                (Reading::Unusable(m), None) => {
                    assert!(unusable, "{annotation:?}");
                    assert!(m.contains(ANNOTATION), "{m}");
                }
                _ => panic!("{annotation:?}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn the_patch_sets_or_removes_the_annotation_on_the_version_read() {
        let r = record(RunPhase::Running, &[("n1", TurnKind::Upgrade, 0)]);
        let g = desired(Some(&r))["n1"].clone();
        let set = patch(Some(&g), Some("42"));
        assert_eq!(set["metadata"]["resourceVersion"], "42");
        let text = set["metadata"]["annotations"][ANNOTATION].as_str().unwrap();
        assert_eq!(Grant::from_json(text).unwrap(), g);
        let removed = patch(None, None);
        assert!(removed["metadata"]["annotations"][ANNOTATION].is_null());
        assert!(removed["metadata"].get("resourceVersion").is_none());
    }
}
