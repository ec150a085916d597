//! The per-node procedure an agent runs on its own node, as pure decisions. The agent's driver
//! performs the step each status names; these functions decide order, resumption and the
//! cordon/kata-deploy-pod questions, so every branch is unit-tested without a cluster.
use crate::run::TurnKind;
use crate::status::NodeStatus;
use crate::verification::FailureCause;
use std::time::Duration;

/// The failure reason of a turn the run's cancel stopped (the coordinator's reducer ends such a
/// run `Cancelled`, not `Failed`).
pub const CANCELLED_REASON: &str = "Cancelled";

/// The failure cause of a step stopped by the run's cancel.
pub fn cancelled(message: impl Into<String>) -> FailureCause {
    FailureCause {
        reason: CANCELLED_REASON.into(),
        message: message.into(),
        exit_code: None,
    }
}

/// A step's time limit, counted from when the step began (perhaps in an earlier process of the
/// agent, so a restart does not get a fresh budget). Times are milliseconds on the driver's
/// clock; every operation saturates, so no limit — however large — can overflow or panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub started_ms: i64,
    pub limit: Duration,
}

impl Budget {
    pub fn new(started_ms: i64, limit: Duration) -> Self {
        Budget { started_ms, limit }
    }

    /// Time spent since the step began (zero if `now_ms` is before it).
    pub fn elapsed(&self, now_ms: i64) -> Duration {
        Duration::from_millis(u64::try_from(now_ms.saturating_sub(self.started_ms)).unwrap_or(0))
    }

    pub fn remaining(&self, now_ms: i64) -> Duration {
        self.limit.saturating_sub(self.elapsed(now_ms))
    }

    pub fn is_over(&self, now_ms: i64) -> bool {
        self.elapsed(now_ms) >= self.limit
    }

    /// When the budget ends on the driver's clock; `None` when that is beyond the clock's range
    /// (a limit of centuries: never, in practice).
    pub fn ends_at_ms(&self) -> Option<i64> {
        i64::try_from(self.limit.as_millis())
            .ok()
            .and_then(|l| self.started_ms.checked_add(l))
    }
}

/// How long to sleep from `now_ms` until `at_ms` (`None`: no wake-up wanted). Saturates.
pub fn sleep_for(at_ms: Option<i64>, now_ms: i64) -> Option<Duration> {
    at_ms.map(|at| Duration::from_millis(u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0)))
}

/// The statuses an upgrade turn walks through, in order.
pub fn upgrade_steps(drain_enabled: bool) -> Vec<NodeStatus> {
    let mut s = vec![NodeStatus::Preparing, NodeStatus::Cordoned];
    if drain_enabled {
        s.push(NodeStatus::Draining);
    }
    s.extend([
        NodeStatus::Upgrading,
        NodeStatus::Verifying,
        NodeStatus::Completed,
    ]);
    s
}

/// The status after `current` succeeds, `None` at the end.
pub fn next_status(kind: TurnKind, drain_enabled: bool, current: NodeStatus) -> Option<NodeStatus> {
    match kind {
        TurnKind::Upgrade => {
            let steps = upgrade_steps(drain_enabled);
            let i = steps.iter().position(|s| *s == current)?;
            steps.get(i + 1).copied()
        }
        TurnKind::Restore => match current {
            NodeStatus::RollingBack => Some(NodeStatus::RolledBack),
            _ => None,
        },
    }
}

/// Where a turn's walk is: running the step of a status, or recording that it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    Step(NodeStatus),
    /// The step of this status failed with this cause; the failure status is being written.
    Failing(NodeStatus, FailureCause),
}

/// How one attempt of the walk's current move went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done,
    /// The step failed the node.
    Failed(FailureCause),
    /// An API call failed; `transient` errors are worth retrying.
    ApiError {
        message: String,
        transient: bool,
    },
}

/// The walk's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkNext {
    /// Go on with this move (a fresh retry budget).
    Go(Walk),
    /// Try the same move again after a backoff.
    Retry(Walk),
    /// The final status is written: `completed`/`rolled-back` (true) or the failure (false).
    Finished { succeeded: bool },
    /// The outcome cannot be recorded: stop renewing and let the Lease expire, so the
    /// coordinator fails the node rather than see no status.
    Abandon(String),
}

/// The walk through a turn: after a step succeeds, the next status (or the end); after it
/// fails, the failure is recorded; a transient API error is retried while `may_retry` (the
/// retry budget is not spent), otherwise the step fails the node with `ApiError`; a failure
/// that cannot be recorded abandons the turn.
pub fn after_attempt(
    kind: TurnKind,
    drain_enabled: bool,
    walk: Walk,
    attempt: Attempt,
    may_retry: bool,
) -> WalkNext {
    match (walk, attempt) {
        (Walk::Step(at), Attempt::Done) => match next_status(kind, drain_enabled, at) {
            Some(next) => WalkNext::Go(Walk::Step(next)),
            None => WalkNext::Finished { succeeded: true },
        },
        (Walk::Failing(..), Attempt::Done) => WalkNext::Finished { succeeded: false },
        (Walk::Step(at), Attempt::Failed(cause)) => WalkNext::Go(Walk::Failing(at, cause)),
        (Walk::Failing(_, cause), Attempt::Failed(_)) => {
            WalkNext::Abandon(format!("could not record the failure: {}", cause.message))
        }
        (
            walk,
            Attempt::ApiError {
                transient: true, ..
            },
        ) if may_retry => WalkNext::Retry(walk),
        (Walk::Step(at), Attempt::ApiError { message, .. }) => WalkNext::Go(Walk::Failing(
            at,
            FailureCause {
                reason: "ApiError".into(),
                message,
                exit_code: None,
            },
        )),
        (Walk::Failing(..), Attempt::ApiError { message, .. }) => {
            WalkNext::Abandon(format!("could not record the failure: {message}"))
        }
    }
}

/// Where an agent (re)starts a turn, given what its Node says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Run the step of this status (fresh start or resume; every step is idempotent).
    At(NodeStatus),
    /// This turn already ended on the node with this status; just report it.
    Finished(NodeStatus),
}

/// `node_run`/`node_turn`/`node_status` are the Node's bookkeeping annotations.
pub fn resume(
    kind: TurnKind,
    run_id: &str,
    node_run: Option<&str>,
    node_turn: Option<TurnKind>,
    node_status: Option<NodeStatus>,
) -> Resume {
    let same_turn = node_run == Some(run_id) && node_turn == Some(kind);
    let first = match kind {
        TurnKind::Upgrade => NodeStatus::Preparing,
        TurnKind::Restore => NodeStatus::RollingBack,
    };
    match (same_turn, node_status) {
        (true, Some(s)) if s.is_terminal() => Resume::Finished(s),
        // An upgrade that already failed verification waits in rolling-back for its restore turn.
        (true, Some(NodeStatus::RollingBack)) if kind == TurnKind::Upgrade => {
            Resume::Finished(NodeStatus::RollingBack)
        }
        (true, Some(s)) => Resume::At(s),
        _ => Resume::At(first),
    }
}

/// What to do about the node's schedulability when the turn starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CordonPlan {
    /// Schedulable: cordon it and mark the cordon as ours.
    Cordon,
    /// Already cordoned by us (a resumed turn): nothing to do.
    AlreadyOurs,
    /// Someone else cordoned it: leave it alone now and afterwards.
    Foreign,
}

pub fn cordon_plan(unschedulable: bool, cordoned_by_us: bool) -> CordonPlan {
    match (unschedulable, cordoned_by_us) {
        (true, true) => CordonPlan::AlreadyOurs,
        (true, false) => CordonPlan::Foreign,
        // Our mark without the cordon (someone uncordoned meanwhile): cordon again, still ours.
        (false, _) => CordonPlan::Cordon,
    }
}

/// We uncordon only what we cordoned.
pub fn may_uncordon(cordoned_by_us: bool) -> bool {
    cordoned_by_us
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeStatus::*;

    /// `drain-timeout=10000000000000000000` once panicked the agent on `Instant` overflow and
    /// left the node cordoned: the budget arithmetic must hold for any duration.
    #[test]
    fn budgets_never_overflow() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        let b = Budget::new(1_000, huge);
        assert!(!b.is_over(i64::MAX));
        assert_eq!(b.ends_at_ms(), None);
        assert_eq!(b.remaining(1_000), huge);
        let max = Budget::new(i64::MIN, Duration::MAX);
        assert!(!max.is_over(i64::MAX));
        assert_eq!(max.ends_at_ms(), None);
        let small = Budget::new(-5_000, Duration::from_secs(10));
        assert_eq!(small.ends_at_ms(), Some(5_000));
        assert!(!small.is_over(4_999));
        assert!(small.is_over(5_000));
        assert_eq!(small.elapsed(-10_000), Duration::ZERO);
        assert_eq!(
            sleep_for(Some(i64::MAX), i64::MIN),
            Some(Duration::from_millis(i64::MAX as u64))
        );
        assert_eq!(sleep_for(Some(0), 10), Some(Duration::ZERO));
        assert_eq!(sleep_for(None, 10), None);
    }

    proptest::proptest! {
        #[test]
        fn budget_arithmetic_is_total(start in proptest::num::i64::ANY, now in proptest::num::i64::ANY, secs in proptest::num::u64::ANY, nanos in 0u32..1_000_000_000) {
            let b = Budget::new(start, Duration::new(secs, nanos));
            let _ = (b.elapsed(now), b.remaining(now), b.ends_at_ms());
            proptest::prop_assert_eq!(b.is_over(now), b.remaining(now).is_zero() && b.elapsed(now) >= b.limit);
        }
    }

    #[test]
    fn the_walk_retries_transient_errors_then_fails_then_abandons() {
        use TurnKind::Upgrade;
        let api = |transient| Attempt::ApiError {
            message: "m".into(),
            transient,
        };
        let cause = cancelled("c");
        let failing = Walk::Failing(Verifying, cause.clone());
        let cases = [
            (
                Walk::Step(Cordoned),
                Attempt::Done,
                true,
                WalkNext::Go(Walk::Step(Upgrading)),
            ),
            (
                Walk::Step(Completed),
                Attempt::Done,
                true,
                WalkNext::Finished { succeeded: true },
            ),
            (
                failing.clone(),
                Attempt::Done,
                true,
                WalkNext::Finished { succeeded: false },
            ),
            (
                Walk::Step(Verifying),
                Attempt::Failed(cause.clone()),
                true,
                WalkNext::Go(failing.clone()),
            ),
            (
                Walk::Step(Upgrading),
                api(true),
                true,
                WalkNext::Retry(Walk::Step(Upgrading)),
            ),
            (
                failing.clone(),
                api(true),
                true,
                WalkNext::Retry(failing.clone()),
            ),
            (
                Walk::Step(Upgrading),
                api(false),
                true,
                WalkNext::Go(Walk::Failing(
                    Upgrading,
                    FailureCause {
                        reason: "ApiError".into(),
                        message: "m".into(),
                        exit_code: None,
                    },
                )),
            ),
            (
                Walk::Step(Upgrading),
                api(true),
                false,
                WalkNext::Go(Walk::Failing(
                    Upgrading,
                    FailureCause {
                        reason: "ApiError".into(),
                        message: "m".into(),
                        exit_code: None,
                    },
                )),
            ),
            (
                failing.clone(),
                api(true),
                false,
                WalkNext::Abandon("could not record the failure: m".into()),
            ),
            (
                failing.clone(),
                Attempt::Failed(cause.clone()),
                true,
                WalkNext::Abandon("could not record the failure: c".into()),
            ),
        ];
        for (walk, attempt, may_retry, want) in cases {
            assert_eq!(
                after_attempt(Upgrade, false, walk.clone(), attempt.clone(), may_retry),
                want,
                "{walk:?} {attempt:?} {may_retry}"
            );
        }
    }

    #[test]
    fn step_order_follows_the_reference() {
        assert_eq!(
            upgrade_steps(true),
            [
                Preparing, Cordoned, Draining, Upgrading, Verifying, Completed
            ]
        );
        assert_eq!(
            upgrade_steps(false),
            [Preparing, Cordoned, Upgrading, Verifying, Completed]
        );
        assert_eq!(
            next_status(TurnKind::Upgrade, false, Cordoned),
            Some(Upgrading)
        );
        assert_eq!(
            next_status(TurnKind::Upgrade, true, Cordoned),
            Some(Draining)
        );
        assert_eq!(next_status(TurnKind::Upgrade, true, Completed), None);
        assert_eq!(
            next_status(TurnKind::Restore, true, RollingBack),
            Some(RolledBack)
        );
    }

    #[test]
    fn resume_table() {
        use TurnKind::*;
        let cases = [
            (Upgrade, None, None, None, Resume::At(Preparing)),
            // A status from an older run is not ours to resume.
            (
                Upgrade,
                Some("old"),
                Some(Upgrade),
                Some(Verifying),
                Resume::At(Preparing),
            ),
            (
                Upgrade,
                Some("r"),
                Some(Upgrade),
                Some(Verifying),
                Resume::At(Verifying),
            ),
            (
                Upgrade,
                Some("r"),
                Some(Upgrade),
                Some(Completed),
                Resume::Finished(Completed),
            ),
            (
                Upgrade,
                Some("r"),
                Some(Upgrade),
                Some(RollingBack),
                Resume::Finished(RollingBack),
            ),
            (
                Restore,
                Some("r"),
                Some(Upgrade),
                Some(RollingBack),
                Resume::At(RollingBack),
            ),
            (
                Restore,
                Some("r"),
                Some(Upgrade),
                Some(Completed),
                Resume::At(RollingBack),
            ),
            (
                Restore,
                Some("r"),
                Some(Restore),
                Some(RolledBack),
                Resume::Finished(RolledBack),
            ),
            (
                Restore,
                Some("r"),
                Some(Restore),
                Some(Failed),
                Resume::Finished(Failed),
            ),
        ];
        for (kind, run, turn, status, want) in cases {
            assert_eq!(
                resume(kind, "r", run, turn, status),
                want,
                "{kind:?} {run:?} {turn:?} {status:?}"
            );
        }
    }

    #[test]
    fn never_uncordon_a_foreign_cordon() {
        assert_eq!(cordon_plan(false, false), CordonPlan::Cordon);
        assert_eq!(cordon_plan(true, false), CordonPlan::Foreign);
        assert_eq!(cordon_plan(true, true), CordonPlan::AlreadyOurs);
        assert!(!may_uncordon(false));
    }

    proptest::proptest! {
        /// Walking the steps from any resume point always ends at Completed, never skips
        /// verification, and visits each status at most once.
        #[test]
        fn upgrade_walk_always_verifies(drain in proptest::bool::ANY, start in 0usize..5) {
            let steps = upgrade_steps(drain);
            let mut at = steps[start.min(steps.len() - 1)];
            let mut seen = vec![at];
            while let Some(n) = next_status(TurnKind::Upgrade, drain, at) {
                proptest::prop_assert!(!seen.contains(&n));
                seen.push(n);
                at = n;
            }
            proptest::prop_assert_eq!(at, Completed);
            proptest::prop_assert!(seen.contains(&Verifying) || seen == vec![Completed]);
        }
    }
}
