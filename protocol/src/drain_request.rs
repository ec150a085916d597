//! The drain handshake between a node's agent and the leading coordinator. The agent may not
//! evict (an admission policy cannot see an evicted pod's node, so an eviction right would reach
//! every pod in the cluster); it asks for its own node's drain on its own Node, and the
//! coordinator's drainer evicts — but only for a node that is, right now, in a turn of the
//! active run that drains (see the chart README's RBAC section and attack table):
//!
//! 1. the agent writes `draining` and the request `<turn>/<run id>` (`keys::node::DRAIN_REQUEST`);
//! 2. the drainer checks the request with [`admit`] against the run record and the Node, drains
//!    with `drain::Drain`, and reports on the Node ([`DrainResult`], `keys::node::DRAIN_RESULT`):
//!    progress (`draining`, naming what blocks it), then `done` or `failed`;
//! 3. the agent waits for that result with [`agent_next`], bounded by the drain timeout plus
//!    [`REPORT_GRACE`] in case no coordinator answers.
//!
//! A request that does not pass [`admit`] evicts nothing: a compromised agent can at most ask
//! for the drain of its own node during its own turn — which the run would do anyway.
use crate::node_record::NodeRecord;
use crate::procedure::{Budget, cancelled};
use crate::run::{RunRecord, TurnKind};
use crate::status::NodeStatus;
use crate::verification::FailureCause;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// How long past the drain timeout the agent waits for the coordinator's verdict before it
/// fails the node itself: the coordinator names the blocking pod at the timeout, and its
/// report must have time to arrive; a coordinator that never answers must not hold the turn.
pub const REPORT_GRACE: Duration = Duration::from_secs(30);

/// What an agent asks for: the drain of its node for this run's turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainRequest {
    pub run_id: String,
    pub turn: TurnKind,
}

impl DrainRequest {
    pub fn new(run_id: &str, turn: TurnKind) -> Self {
        DrainRequest {
            run_id: run_id.to_string(),
            turn,
        }
    }

    /// The annotation value: `<turn>/<run id>` (the turn first: its vocabulary is fixed).
    pub fn value(&self) -> String {
        format!("{}/{}", self.turn.as_str(), self.run_id)
    }

    pub fn parse(value: &str) -> Option<Self> {
        let (turn, run_id) = value.split_once('/')?;
        let turn = TurnKind::parse(turn)?;
        (!run_id.is_empty()).then(|| DrainRequest::new(run_id, turn))
    }

    /// Whether `result` answers this very request (not an earlier run's or turn's).
    pub fn answered_by(&self, result: &DrainResult) -> bool {
        result.run_id == self.run_id && result.turn == self.turn
    }
}

/// Where the coordinator's drain of a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainState {
    /// Accepted and evicting; `message` says what it waits for (e.g. the blocking PDB).
    Draining,
    /// Every evictable pod is gone.
    Done,
    /// Timed out or cancelled; `failure` names the blocking pod/PDB.
    Failed,
    /// Not admitted (yet): `message` says why. Judged again whenever the run record or the Node
    /// changes, so the agent keeps waiting (bounded) rather than fail on a momentary view.
    Refused,
}

impl DrainState {
    /// The drain is over (nothing more will be reported for that request).
    pub fn is_final(self) -> bool {
        matches!(self, DrainState::Done | DrainState::Failed)
    }
}

/// The coordinator's report on a Node (JSON in `keys::node::DRAIN_RESULT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainResult {
    pub run_id: String,
    pub turn: TurnKind,
    pub state: DrainState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureCause>,
}

impl DrainResult {
    pub fn progress(request: &DrainRequest, message: impl Into<String>) -> Self {
        DrainResult {
            run_id: request.run_id.clone(),
            turn: request.turn,
            state: DrainState::Draining,
            message: message.into(),
            failure: None,
        }
    }

    pub fn done(request: &DrainRequest, message: impl Into<String>) -> Self {
        DrainResult {
            state: DrainState::Done,
            ..DrainResult::progress(request, message)
        }
    }

    pub fn refused(request: &DrainRequest, why: &Rejection) -> Self {
        DrainResult {
            state: DrainState::Refused,
            ..DrainResult::progress(request, format!("drain request refused: {why}"))
        }
    }

    pub fn failed(request: &DrainRequest, cause: FailureCause) -> Self {
        DrainResult {
            state: DrainState::Failed,
            message: cause.message.clone(),
            failure: Some(cause),
            ..DrainResult::progress(request, "")
        }
    }
}

/// Why the drainer does not act on a request. Every variant but [`Rejection::NotInPlan`] is
/// worth a warning: a node of this run asking to be drained out of turn is either a bug or a
/// compromised agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The value is not `<turn>/<run id>`.
    Malformed(String),
    /// No run record, or the run is over.
    NoActiveRun,
    /// The node is not in this run's plan (another installation's node, or not opted in).
    NotInPlan,
    /// The request names another run than the active one.
    OtherRun { requested: String, active: String },
    /// The run does not grant this node this turn now.
    NotItsTurn,
    /// The run does not drain.
    DrainDisabled,
    /// The Node's own bookkeeping does not show this run's turn in `draining`.
    NotDraining(String),
    /// The node is schedulable: pods evicted now could land on it again.
    NotCordoned,
}

impl Rejection {
    /// The request comes from a node of the active run: worth a warning and a refusal written
    /// back on the Node. Otherwise it may be another installation's node (several may share a
    /// cluster), whose bookkeeping is not ours to write.
    pub fn concerns_our_run(&self) -> bool {
        !matches!(
            self,
            Rejection::Malformed(_) | Rejection::NoActiveRun | Rejection::NotInPlan
        )
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Malformed(v) => write!(f, "the request {v:?} is not <turn>/<run id>"),
            Rejection::NoActiveRun => write!(f, "no run is in progress"),
            Rejection::NotInPlan => write!(f, "the node is not in the active run's plan"),
            Rejection::OtherRun { requested, active } => write!(
                f,
                "the request is for run {requested}, but the active run is {active}"
            ),
            Rejection::NotItsTurn => write!(f, "the run has not granted this node that turn"),
            Rejection::DrainDisabled => write!(f, "the active run does not drain"),
            Rejection::NotDraining(shows) => {
                write!(f, "the node does not show that turn in draining ({shows})")
            }
            Rejection::NotCordoned => write!(f, "the node is not cordoned"),
        }
    }
}

/// The turn the run grants `node` now, if any. One place, so concurrent turns (waves) change
/// only this.
pub fn current_turn(run: &RunRecord, node: &str) -> Option<TurnKind> {
    run.turn_of(node).map(|t| t.kind)
}

/// Whether the drainer may evict the pods of `node` for the request `value`: the active run
/// (`run`, the record in the trigger ConfigMap) grants the node the requested turn now and
/// drains, and the Node (`record`) shows that turn in `draining` and is cordoned.
pub fn admit(
    value: &str,
    node: &str,
    record: &NodeRecord,
    run: Option<&RunRecord>,
) -> Result<DrainRequest, Rejection> {
    let request = DrainRequest::parse(value).ok_or_else(|| Rejection::Malformed(value.into()))?;
    let run = run
        .filter(|r| !r.phase.is_finished())
        .ok_or(Rejection::NoActiveRun)?;
    if !run.plan.iter().any(|n| n == node) {
        return Err(Rejection::NotInPlan);
    }
    if request.run_id != run.id {
        return Err(Rejection::OtherRun {
            requested: request.run_id,
            active: run.id.clone(),
        });
    }
    if current_turn(run, node) != Some(request.turn) {
        return Err(Rejection::NotItsTurn);
    }
    if !run.params.as_ref().is_some_and(|p| p.drain_enabled) {
        return Err(Rejection::DrainDisabled);
    }
    if !record.is_turn(&request.run_id, request.turn) || record.status != Some(NodeStatus::Draining)
    {
        return Err(Rejection::NotDraining(format!(
            "status {}, run {}, turn {}",
            record.status.map_or("none".into(), |s| s.to_string()),
            record.run_id.as_deref().unwrap_or("none"),
            record.turn.map_or("none", TurnKind::as_str)
        )));
    }
    if !record.unschedulable {
        return Err(Rejection::NotCordoned);
    }
    Ok(request)
}

/// What the drainer does about the request a Node carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted and not answered yet: drain (or keep draining) the node.
    Drain(DrainRequest),
    /// Admitted, and the Node already carries the final report: nothing more to do.
    Answered,
    /// Not admitted: evict nothing. `report` is the refusal to write back on the Node — only
    /// for a node of the active run, whose bookkeeping is ours to write.
    Refuse {
        why: Rejection,
        report: Option<DrainResult>,
    },
}

/// Judges the request `value` on `node` (see [`admit`]) and whether it was answered already.
pub fn judge(value: &str, node: &str, record: &NodeRecord, run: Option<&RunRecord>) -> Verdict {
    match admit(value, node, record, run) {
        Ok(request) => {
            let answered = record
                .drain_result
                .as_ref()
                .is_some_and(|r| request.answered_by(r) && r.state.is_final());
            if answered {
                Verdict::Answered
            } else {
                Verdict::Drain(request)
            }
        }
        Err(why) => {
            let report = DrainRequest::parse(value)
                .filter(|_| why.concerns_our_run())
                .map(|request| DrainResult::refused(&request, &why));
            Verdict::Refuse { why, report }
        }
    }
}

/// Whether the run asks the drain of this turn to stop (restore turns always finish, as the
/// agent's own steps do).
pub fn cancel_requested(run: &RunRecord, request: &DrainRequest) -> bool {
    request.turn == TurnKind::Upgrade && run.cancel_requested
}

/// The agent's next move while it waits for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentWait {
    /// Wait for the Node to change, or until this time (driver clock, ms; `None`: only a
    /// change wakes us).
    Until(Option<i64>),
    Done,
    Failed(FailureCause),
}

/// What the agent does with what its Node shows. `budget` is the drain timeout counted from
/// when the Node entered `draining`; the agent gives up [`REPORT_GRACE`] after it. A cancelled
/// run stops the wait at once (the drainer stops evicting on its own when it sees the cancel).
pub fn agent_next(
    request: &DrainRequest,
    result: Option<&DrainResult>,
    budget: &Budget,
    now_ms: i64,
    cancel: bool,
) -> AgentWait {
    let result = result.filter(|r| request.answered_by(r));
    match result.map(|r| r.state) {
        Some(DrainState::Done) => return AgentWait::Done,
        Some(DrainState::Failed) => {
            let r = result.expect("a state comes from a result");
            return AgentWait::Failed(r.failure.clone().unwrap_or_else(|| FailureCause {
                reason: "DrainFailed".into(),
                message: r.message.clone(),
                exit_code: None,
            }));
        }
        Some(DrainState::Draining | DrainState::Refused) | None => {}
    }
    if cancel {
        return AgentWait::Failed(cancelled(
            "the run was cancelled while draining; the coordinator stops evicting",
        ));
    }
    let waited = Budget::new(budget.started_ms, budget.limit.saturating_add(REPORT_GRACE));
    if waited.is_over(now_ms) {
        let last = result
            .map(|r| r.message.as_str())
            .filter(|m| !m.is_empty())
            .map_or(String::new(), |m| format!("; its last report: {m}"));
        let heard = if result.is_some() {
            "accepted the drain but did not report its end"
        } else {
            "did not answer the drain request"
        };
        return AgentWait::Failed(FailureCause {
            reason: "DrainTimeout".into(),
            message: format!(
                "the coordinator {heard} within {}s (drain timeout {}s){last}",
                waited.limit.as_secs(),
                budget.limit.as_secs()
            ),
            exit_code: None,
        });
    }
    AgentWait::Until(waited.ends_at_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::node as keys;
    use crate::params::RunParams;
    use crate::run::Turn;
    use crate::status::RunPhase;
    use k8s_openapi::api::core::v1::{Node, NodeSpec};

    fn run(drain: bool) -> RunRecord {
        let mut r = RunRecord::new("r1".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = RunPhase::Running;
        r.plan = vec!["n1".into(), "n2".into()];
        r.turn = Some(Turn {
            node: "n1".into(),
            kind: TurnKind::Upgrade,
            granted_at_ms: 0,
            slot: 0,
        });
        r.params = Some(RunParams {
            drain_enabled: drain,
            drain_timeout_seconds: 30,
            ..Default::default()
        });
        r
    }

    fn node(annotations: &[(&str, &str)], cordoned: bool) -> NodeRecord {
        let mut n = Node::default();
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n.spec = Some(NodeSpec {
            unschedulable: Some(cordoned),
            ..Default::default()
        });
        NodeRecord::of(&n)
    }

    fn draining(run: &str, turn: &str) -> Vec<(&'static str, String)> {
        vec![
            (keys::RUN_ID, run.to_string()),
            (keys::TURN, turn.to_string()),
            (keys::STATUS, "draining".to_string()),
        ]
    }

    fn rec(pairs: &[(&'static str, String)], cordoned: bool) -> NodeRecord {
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node(&refs, cordoned)
    }

    #[test]
    fn the_request_round_trips_and_garbage_is_malformed() {
        let r = DrainRequest::new("3.28.0-abc-x1", TurnKind::Upgrade);
        assert_eq!(r.value(), "upgrade/3.28.0-abc-x1");
        assert_eq!(DrainRequest::parse(&r.value()), Some(r));
        for bad in ["", "upgrade", "upgrade/", "sideways/r1", "r1"] {
            assert_eq!(DrainRequest::parse(bad), None, "{bad}");
        }
        let n = rec(&draining("r1", "upgrade"), true);
        assert_eq!(
            admit("r1", "n1", &n, Some(&run(true))),
            Err(Rejection::Malformed("r1".into()))
        );
    }

    #[test]
    fn the_node_in_its_draining_turn_is_admitted() {
        let n = rec(&draining("r1", "upgrade"), true);
        assert_eq!(
            admit("upgrade/r1", "n1", &n, Some(&run(true))),
            Ok(DrainRequest::new("r1", TurnKind::Upgrade))
        );
    }

    #[test]
    fn a_node_out_of_turn_is_refused_whatever_its_own_node_claims() {
        // n2 is in the plan, writes the same bookkeeping as a draining node, and is cordoned:
        // its agent controls all of that, but not the run record.
        let n2 = rec(&draining("r1", "upgrade"), true);
        assert_eq!(
            admit("upgrade/r1", "n2", &n2, Some(&run(true))),
            Err(Rejection::NotItsTurn)
        );
        // The right node, the wrong turn kind.
        let n1 = rec(&draining("r1", "restore"), true);
        assert_eq!(
            admit("restore/r1", "n1", &n1, Some(&run(true))),
            Err(Rejection::NotItsTurn)
        );
        // Another run's id.
        let n1 = rec(&draining("r0", "upgrade"), true);
        assert_eq!(
            admit("upgrade/r0", "n1", &n1, Some(&run(true))),
            Err(Rejection::OtherRun {
                requested: "r0".into(),
                active: "r1".into()
            })
        );
    }

    #[test]
    fn no_run_a_finished_run_or_a_foreign_node_evicts_nothing() {
        let n = rec(&draining("r1", "upgrade"), true);
        assert_eq!(
            admit("upgrade/r1", "n1", &n, None),
            Err(Rejection::NoActiveRun)
        );
        let mut done = run(true);
        done.finish(RunPhase::Succeeded, "ok", 1);
        assert_eq!(
            admit("upgrade/r1", "n1", &n, Some(&done)),
            Err(Rejection::NoActiveRun)
        );
        let foreign = admit("upgrade/r1", "elsewhere", &n, Some(&run(true)));
        assert_eq!(foreign, Err(Rejection::NotInPlan));
        assert!(!foreign.unwrap_err().concerns_our_run());
        assert!(!Rejection::NoActiveRun.concerns_our_run());
        assert!(Rejection::NotItsTurn.concerns_our_run());
    }

    #[test]
    fn the_turn_must_drain_be_draining_and_cordoned() {
        let n = rec(&draining("r1", "upgrade"), true);
        assert_eq!(
            admit("upgrade/r1", "n1", &n, Some(&run(false))),
            Err(Rejection::DrainDisabled)
        );
        let mut cordoned = draining("r1", "upgrade");
        cordoned[2].1 = "cordoned".into();
        let e = admit("upgrade/r1", "n1", &rec(&cordoned, true), Some(&run(true))).unwrap_err();
        assert!(
            matches!(&e, Rejection::NotDraining(s) if s.contains("status cordoned")),
            "{e}"
        );
        let mut other_run = draining("r0", "upgrade");
        other_run.truncate(2);
        assert!(matches!(
            admit("upgrade/r1", "n1", &rec(&other_run, true), Some(&run(true))),
            Err(Rejection::NotDraining(_))
        ));
        assert_eq!(
            admit("upgrade/r1", "n1", &n_uncordoned(), Some(&run(true))),
            Err(Rejection::NotCordoned)
        );
    }

    fn n_uncordoned() -> NodeRecord {
        rec(&draining("r1", "upgrade"), false)
    }

    #[test]
    fn the_verdict_drains_once_and_reports_refusals_only_on_nodes_of_the_run() {
        let req = DrainRequest::new("r1", TurnKind::Upgrade);
        let mut pairs = draining("r1", "upgrade");
        assert_eq!(
            judge("upgrade/r1", "n1", &rec(&pairs, true), Some(&run(true))),
            Verdict::Drain(req.clone())
        );
        // Progress (a restarted coordinator continues) and an earlier run's report: drain.
        for result in [
            DrainResult::progress(&req, "x"),
            DrainResult::done(&DrainRequest::new("r0", TurnKind::Upgrade), ""),
        ] {
            pairs.push((keys::DRAIN_RESULT, serde_json::to_string(&result).unwrap()));
            assert_eq!(
                judge("upgrade/r1", "n1", &rec(&pairs, true), Some(&run(true))),
                Verdict::Drain(req.clone())
            );
            pairs.pop();
        }
        for result in [
            DrainResult::done(&req, ""),
            DrainResult::failed(&req, cancelled("x")),
        ] {
            pairs.push((keys::DRAIN_RESULT, serde_json::to_string(&result).unwrap()));
            assert_eq!(
                judge("upgrade/r1", "n1", &rec(&pairs, true), Some(&run(true))),
                Verdict::Answered
            );
            pairs.pop();
        }
        // Out of turn: refused, and the refusal goes back on the Node.
        match judge("upgrade/r1", "n2", &rec(&pairs, true), Some(&run(true))) {
            Verdict::Refuse { why, report } => {
                assert_eq!(why, Rejection::NotItsTurn);
                let report = report.expect("a node of the run hears why");
                assert_eq!(report.state, DrainState::Refused);
                assert!(req.answered_by(&report));
            }
            v => panic!("{v:?}"),
        }
        // Another installation's node, or no run: refused without a word on the Node.
        for (node, r) in [("elsewhere", Some(run(true))), ("n1", None)] {
            match judge("upgrade/r1", node, &rec(&pairs, true), r.as_ref()) {
                Verdict::Refuse { report, .. } => assert_eq!(report, None, "{node}"),
                v => panic!("{v:?}"),
            }
        }
        match judge("garbage", "n1", &rec(&pairs, true), Some(&run(true))) {
            Verdict::Refuse { why, report } => {
                assert!(matches!(why, Rejection::Malformed(_)));
                assert_eq!(report, None);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn cancel_applies_to_upgrade_turns_only() {
        let mut r = run(true);
        r.cancel_requested = true;
        assert!(cancel_requested(
            &r,
            &DrainRequest::new("r1", TurnKind::Upgrade)
        ));
        assert!(!cancel_requested(
            &r,
            &DrainRequest::new("r1", TurnKind::Restore)
        ));
    }

    const LIMIT: Duration = Duration::from_secs(20);

    #[test]
    fn the_agent_follows_the_result_for_its_own_request_only() {
        let req = DrainRequest::new("r1", TurnKind::Upgrade);
        let budget = Budget::new(0, LIMIT);
        let ends = 20_000 + REPORT_GRACE.as_millis() as i64;
        assert_eq!(
            agent_next(&req, None, &budget, 0, false),
            AgentWait::Until(Some(ends))
        );
        let progress = DrainResult::progress(&req, "evicting 2 pods");
        assert_eq!(
            agent_next(&req, Some(&progress), &budget, 5, false),
            AgentWait::Until(Some(ends))
        );
        // A refusal may be a momentary view (it is judged again on every change): keep waiting.
        let refused = DrainResult::refused(&req, &Rejection::NotCordoned);
        assert_eq!(
            refused.message,
            "drain request refused: the node is not cordoned"
        );
        assert_eq!(
            agent_next(&req, Some(&refused), &budget, 5, false),
            AgentWait::Until(Some(ends))
        );
        // A result left by an earlier run is not an answer.
        let old = DrainResult::done(&DrainRequest::new("r0", TurnKind::Upgrade), "");
        assert_eq!(
            agent_next(&req, Some(&old), &budget, 5, false),
            AgentWait::Until(Some(ends))
        );
        assert_eq!(
            agent_next(&req, Some(&DrainResult::done(&req, "")), &budget, 5, false),
            AgentWait::Done
        );
        let cause = FailureCause {
            reason: "DrainTimeout".into(),
            message: "pod a/db blocked by PodDisruptionBudget db".into(),
            exit_code: None,
        };
        assert_eq!(
            agent_next(
                &req,
                Some(&DrainResult::failed(&req, cause.clone())),
                &budget,
                5,
                false
            ),
            AgentWait::Failed(cause)
        );
    }

    #[test]
    fn the_agent_gives_up_after_the_grace_and_on_cancel() {
        let req = DrainRequest::new("r1", TurnKind::Upgrade);
        let budget = Budget::new(0, LIMIT);
        // At the drain timeout the coordinator's verdict is still awaited.
        assert!(matches!(
            agent_next(&req, None, &budget, 20_000, false),
            AgentWait::Until(_)
        ));
        let over = 20_000 + REPORT_GRACE.as_millis() as i64;
        match agent_next(&req, None, &budget, over, false) {
            AgentWait::Failed(c) => {
                assert_eq!(c.reason, "DrainTimeout");
                assert!(c.message.contains("did not answer"), "{}", c.message);
            }
            w => panic!("{w:?}"),
        }
        let progress = DrainResult::progress(&req, "blocked by PodDisruptionBudget db: x");
        match agent_next(&req, Some(&progress), &budget, over, false) {
            AgentWait::Failed(c) => {
                assert!(
                    c.message.contains("did not report its end"),
                    "{}",
                    c.message
                );
                assert!(
                    c.message.contains("PodDisruptionBudget db"),
                    "{}",
                    c.message
                );
            }
            w => panic!("{w:?}"),
        }
        match agent_next(&req, None, &budget, 0, true) {
            AgentWait::Failed(c) => assert_eq!(c.reason, crate::procedure::CANCELLED_REASON),
            w => panic!("{w:?}"),
        }
        // A verdict already given wins over a cancel seen afterwards.
        assert_eq!(
            agent_next(&req, Some(&DrainResult::done(&req, "")), &budget, 0, true),
            AgentWait::Done
        );
        // A budget of centuries never overflows.
        let huge = Budget::new(0, Duration::from_secs(u64::MAX));
        assert_eq!(
            agent_next(&req, None, &huge, i64::MAX, false),
            AgentWait::Until(None)
        );
    }

    #[test]
    fn the_result_is_json_with_kebab_states() {
        let req = DrainRequest::new("r1", TurnKind::Upgrade);
        let text = serde_json::to_string(&DrainResult::done(&req, "3 pods evicted")).unwrap();
        assert_eq!(
            text,
            r#"{"runId":"r1","turn":"upgrade","state":"done","message":"3 pods evicted"}"#
        );
        let back: DrainResult = serde_json::from_str(&text).unwrap();
        assert!(req.answered_by(&back));
    }
}
