//! Reads the run record from the trigger ConfigMap and decides whether this node has a turn.
//! Pure: the driver feeds it what the watch delivered.
use k8s_openapi::api::core::v1::ConfigMap;
use klm_protocol::keys::status_data;
use klm_protocol::params::RunParams;
use klm_protocol::run::{ReleaseState, RunRecord};
use klm_protocol::{RunPhase, TurnKind};

/// Everything the agent needs for one turn, copied out of the run record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub run_id: String,
    pub kind: TurnKind,
    pub params: RunParams,
    pub release: ReleaseState,
    pub target_version: String,
    pub granted_at_ms: i64,
    /// The wave slot: which upgrade Lease this turn holds (0 with batch-size 1).
    pub slot: u32,
    /// The coordinator asks this run's turns to stop (`action=cancel`, or another node of the
    /// wave failed and the run is rolling back): an upgrade turn stops at its next safe point
    /// and ends `rolling-back` with the reason `Cancelled`.
    pub cancel_requested: bool,
}

/// A turn is identified by its run and kind: an upgrade turn and the later restore turn of the
/// same run are different turns.
pub type TurnKey = (String, TurnKind);

impl Assignment {
    pub fn key(&self) -> TurnKey {
        (self.run_id.clone(), self.kind)
    }

    /// The `controller-revision-hash` this turn restarts kata-deploy to (empty when the record
    /// does not say, which the restart step reports as a failure).
    pub fn want_hash(&self) -> &str {
        match self.kind {
            TurnKind::Upgrade => self.release.new_hash.as_deref().unwrap_or(""),
            TurnKind::Restore => &self.release.old_hash,
        }
    }
}

/// What the trigger ConfigMap says about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// No run, or a run that does not name this node now.
    Idle,
    Turn(Box<Assignment>),
    /// The record names this node but cannot be acted on; the message says why.
    Unusable(String),
}

pub fn read_configmap(cm: &ConfigMap, node: &str) -> Reading {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(status_data::RUN)) else {
        return Reading::Idle;
    };
    match RunRecord::from_json(text) {
        Ok(record) => {
            let mut reading = read_record(&record, node);
            if let Reading::Turn(a) = &mut reading {
                a.cancel_requested |= record.cancel_requested;
            }
            reading
        }
        Err(e) => Reading::Unusable(format!(
            "data[{:?}] of the trigger ConfigMap is not a run record ({e}); it is written by the coordinator — check its version and logs",
            status_data::RUN
        )),
    }
}

pub fn read_record(record: &RunRecord, node: &str) -> Reading {
    let Some(turn) = record.turn_of(node) else {
        return Reading::Idle;
    };
    // Waves: an upgrade turn still in the record while the run rolls back belongs to a node
    // whose wave-mate failed; it goes on only to stop at its next safe point.
    let stopping = match (turn.kind, record.phase) {
        (TurnKind::Upgrade, RunPhase::Running) | (TurnKind::Restore, RunPhase::RollingBack) => {
            false
        }
        (TurnKind::Upgrade, RunPhase::RollingBack) => true,
        _ => return Reading::Idle,
    };
    let Some(params) = record.params.clone() else {
        return Reading::Unusable(format!(
            "run {} gives this node a {} turn but carries no parameters",
            record.id,
            turn.kind.as_str()
        ));
    };
    Reading::Turn(Box::new(Assignment {
        run_id: record.id.clone(),
        kind: turn.kind,
        params,
        release: record.release.clone().unwrap_or_default(),
        target_version: record.target_version.clone(),
        granted_at_ms: turn.granted_at_ms,
        slot: turn.slot,
        cancel_requested: stopping,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_protocol::Turn;

    fn params() -> RunParams {
        RunParams {
            target_version: "3.28.0".into(),
            helm_release: "kata-deploy".into(),
            helm_namespace: "kube-system".into(),
            verification_namespace: "default".into(),
            drain_timeout_seconds: 300,
            verification_timeout_seconds: 300,
            ..Default::default()
        }
    }

    fn record(phase: RunPhase, turn: Option<(&str, TurnKind)>) -> RunRecord {
        let mut r = RunRecord::new("r1".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = phase;
        r.params = Some(params());
        r.release = Some(ReleaseState {
            old_hash: "old".into(),
            new_hash: Some("new".into()),
            ..Default::default()
        });
        r.turn = turn.map(|(n, k)| Turn {
            node: n.into(),
            kind: k,
            granted_at_ms: 5,
            slot: 0,
        });
        r
    }

    #[test]
    fn only_our_current_turn_in_the_matching_phase_counts() {
        use RunPhase::*;
        use TurnKind::*;
        let cases = [
            (Running, Some(("n1", Upgrade)), Some(Upgrade)),
            (Running, Some(("n2", Upgrade)), None),
            (Running, None, None),
            (RollingBack, Some(("n1", Restore)), Some(Restore)),
            // A turn in a phase that does not match its kind is not acted on (an upgrade turn
            // of a rolling-back run only to stop: see the wave test below).
            (RollingBack, Some(("n1", Upgrade)), Some(Upgrade)),
            (Running, Some(("n1", Restore)), None),
            (Succeeded, Some(("n1", Upgrade)), None),
            (Pending, Some(("n1", Upgrade)), None),
        ];
        for (phase, turn, want) in cases {
            let got = match read_record(&record(phase, turn), "n1") {
                Reading::Turn(a) => Some(a.kind),
                Reading::Idle => None,
                Reading::Unusable(m) => panic!("{m}"),
            };
            assert_eq!(got, want, "{phase:?} {turn:?}");
        }
    }

    #[test]
    fn want_hash_follows_the_turn_kind() {
        let Reading::Turn(a) = read_record(
            &record(RunPhase::Running, Some(("n1", TurnKind::Upgrade))),
            "n1",
        ) else {
            panic!()
        };
        assert_eq!(a.want_hash(), "new");
        assert_eq!(a.key(), ("r1".to_string(), TurnKind::Upgrade));
        let Reading::Turn(b) = read_record(
            &record(RunPhase::RollingBack, Some(("n1", TurnKind::Restore))),
            "n1",
        ) else {
            panic!()
        };
        assert_eq!(b.want_hash(), "old");
    }

    #[test]
    fn configmaps_without_or_with_bad_records() {
        let mut cm = ConfigMap::default();
        assert_eq!(read_configmap(&cm, "n1"), Reading::Idle);
        cm.data = Some([(status_data::RUN.to_string(), "{".to_string())].into());
        assert!(matches!(read_configmap(&cm, "n1"), Reading::Unusable(_)));
        let r = record(RunPhase::Running, Some(("n1", TurnKind::Upgrade)));
        cm.data = Some([(status_data::RUN.to_string(), r.to_json())].into());
        assert!(matches!(read_configmap(&cm, "n1"), Reading::Turn(_)));
        // The coordinator's cancel reaches the turn.
        let Reading::Turn(a) = read_configmap(&cm, "n1") else {
            panic!()
        };
        assert!(!a.cancel_requested);
        let mut cancelled = r.clone();
        cancelled.cancel_requested = true;
        cm.data = Some([(status_data::RUN.to_string(), cancelled.to_json())].into());
        let Reading::Turn(a) = read_configmap(&cm, "n1") else {
            panic!()
        };
        assert!(a.cancel_requested);
        let mut no_params = r.clone();
        no_params.params = None;
        assert!(matches!(
            read_record(&no_params, "n1"),
            Reading::Unusable(_)
        ));
    }

    #[test]
    fn a_wave_turn_names_its_slot_and_stops_when_the_run_rolls_back() {
        let mut r = record(RunPhase::Running, Some(("n1", TurnKind::Upgrade)));
        r.set_turn(Turn {
            node: "n2".into(),
            kind: TurnKind::Upgrade,
            granted_at_ms: 6,
            slot: 1,
        });
        let Reading::Turn(a) = read_record(&r, "n2") else {
            panic!("n2 has a turn in slot 1")
        };
        assert_eq!((a.slot, a.cancel_requested), (1, false));
        assert_eq!(read_record(&r, "n3"), Reading::Idle);
        // n1 failed: the run rolls back; n2 is told to stop at its next safe point.
        r.phase = RunPhase::RollingBack;
        r.end_turn(0);
        let Reading::Turn(a) = read_record(&r, "n2") else {
            panic!("n2 keeps its turn to stop")
        };
        assert!(a.cancel_requested);
        assert_eq!(read_record(&r, "n1"), Reading::Idle);
    }
}
