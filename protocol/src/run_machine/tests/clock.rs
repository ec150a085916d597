//! Issue 9 (clock faults): the coordinator's wall clock steps (NTP correcting it, a VM resumed)
//! mid-turn. How long an agent has is measured on the monotonic clock, so a step neither fails
//! a healthy node nor delays declaring a silent one lost; `H::now` is the monotonic clock and
//! `H::wall_offset` the step.
use super::*;
use crate::TurnKind::Upgrade;

/// A step as NTP makes when it corrects a clock that was 10 minutes off.
const STEP: i64 = 10 * 60 * 1000;
/// `leaseDurationSeconds` (30 s) plus the expiry grace of [`config`] (10 s).
/// What a working agent's Node shows.
const V: Option<NodeStatus> = Some(NodeStatus::Verifying);
const LEASE_AND_GRACE: i64 = 40_000;

fn lease(holder: Option<&str>, renew_ms: i64) -> Input {
    Input::Lease(Some(LeaseView {
        holder: holder.map(|n| format!("{n}/agent-pod")),
        renew_ms: Some(renew_ms),
        duration_seconds: 30,
        transitions: 1,
    }))
}

/// The Node as the driver sees it; `None`: its agent never wrote a status for this run.
fn node_at(h: &H, name: &str, status: Option<NodeStatus>, direct: bool) -> Input {
    let (_, mut snap) = node(name);
    if status.is_some() {
        snap.observed.status = status;
        snap.observed.run_id = Some(h.run().id.clone());
        snap.observed.turn = Some(Upgrade);
    }
    Input::Node {
        name: name.into(),
        node: Some(snap),
        direct,
    }
}

/// Feeds `input` and answers each direct read it asks for with the node at `status`, as the
/// driver does; returns every effect.
fn feed_reading(h: &mut H, input: Input, status: Option<NodeStatus>) -> Vec<Effect> {
    let mut fx = h.feed(input);
    let reads: Vec<String> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::ReadNode(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    for n in reads {
        let answer = node_at(h, &n, status, true);
        fx.extend(h.feed(answer));
    }
    fx
}

fn lost(h: &H) -> usize {
    h.count(|e| matches!(e, Effect::MarkNodeFailed { .. }))
}

fn deadline_wakes(fx: &[Effect]) -> Vec<i64> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::WakeAt(w) if w.reason == WakeReason::TurnDeadline => Some(w.at_ms),
            _ => None,
        })
        .collect()
}

/// Both agents take their turn and renew every 10 s; the wall clock steps once in the middle
/// of the first turn, and what arrives next is not a renewal (a re-delivered Node event, a
/// wake-up), each answered by a direct read still showing `verifying`.
#[test]
fn a_wall_clock_step_mid_turn_fails_no_healthy_node() {
    for step in [STEP, -STEP] {
        let mut h = H::to_running(&["n1", "n2"]);
        let mut renew = 0;
        for name in ["n1", "n2"] {
            assert_eq!(h.run().turn.as_ref().map(|t| t.node.as_str()), Some(name));
            renew += 1;
            h.feed(lease(Some(name), renew));
            let verifying = node_at(&h, name, V, false);
            feed_reading(&mut h, verifying, V);
            for i in 0..6 {
                h.now += 10_000;
                if name == "n1" && i == 2 {
                    h.wall_offset += step;
                }
                feed_reading(&mut h, Input::Tick, V);
                let again = node_at(&h, name, V, false);
                feed_reading(&mut h, again, V);
                renew += 1;
                feed_reading(&mut h, lease(Some(name), renew), V);
                assert_eq!(lost(&h), 0, "step {step}: {name} declared lost");
            }
            at_status(&mut h, name, NodeStatus::Completed, Upgrade);
            h.feed(lease(None, renew));
        }
        let run = h.run();
        assert_eq!(
            run.phase,
            RunPhase::Succeeded,
            "step {step}: {}",
            run.message
        );
        assert_eq!(lost(&h), 0, "step {step}");
    }
}

/// An agent that really stops renewing is lost Lease duration + grace after its last renewal
/// was seen, on the monotonic clock, whether the wall clock stepped forward, back or not at all.
#[test]
fn a_silent_agent_is_lost_after_lease_and_grace_whatever_the_wall_clock_does() {
    for step in [STEP, -STEP, 0] {
        let mut h = H::to_running(&["n1", "n2"]);
        h.feed(lease(Some("n1"), 7));
        let silent_since = h.now;
        let verifying = node_at(&h, "n1", V, false);
        feed_reading(&mut h, verifying, V);
        h.now += 5_000;
        h.wall_offset += step;
        let fx = feed_reading(&mut h, Input::Tick, V);
        assert_eq!(lost(&h), 0, "step {step}: lost too early");
        // The wake-up the driver sleeps towards is on the monotonic clock too.
        assert_eq!(
            deadline_wakes(&fx),
            vec![silent_since + LEASE_AND_GRACE],
            "step {step}"
        );
        h.now = silent_since + LEASE_AND_GRACE - 1;
        let read = node_at(&h, "n1", V, true);
        feed_reading(&mut h, read, V);
        assert_eq!(lost(&h), 0, "step {step}: lost before the deadline");
        h.now = silent_since + LEASE_AND_GRACE;
        feed_reading(&mut h, Input::Tick, V);
        assert_eq!(
            lost(&h),
            1,
            "step {step}: the silent agent was not declared lost"
        );
        assert_eq!(h.run().phase, RunPhase::RollingBack, "step {step}");
    }
}

/// An agent that never takes its turn has the turn-start timeout from the grant, on the
/// monotonic clock, whatever the wall clock does meanwhile.
#[test]
fn an_agent_that_never_starts_is_lost_after_the_timeout_whatever_the_wall_clock_does() {
    let timeout = config().timing.turn_start_timeout_ms;
    for step in [STEP, -STEP, 0] {
        let mut h = H::to_running(&["n1", "n2"]);
        let granted = h.now;
        h.now += 1_000;
        h.wall_offset += step;
        feed_reading(&mut h, Input::Tick, None);
        h.now = granted + timeout - 1;
        feed_reading(&mut h, Input::Tick, None);
        let read = node_at(&h, "n1", None, true);
        feed_reading(&mut h, read, None);
        assert_eq!(lost(&h), 0, "step {step}: lost before the timeout");
        h.now = granted + timeout;
        feed_reading(&mut h, Input::Tick, None);
        assert_eq!(
            lost(&h),
            1,
            "step {step}: the idle agent was not declared lost"
        );
    }
}

/// A new leader reads the turn's grant time (wall clock, written by the old leader, whose clock
/// may differ): it gives the agent a whole turn-start timeout from when it first sees the turn,
/// so a grant time far in its past fails no node at once.
#[test]
fn a_new_leader_with_a_stepped_clock_gives_a_turn_the_whole_timeout() {
    let timeout = config().timing.turn_start_timeout_ms;
    // The old leader's clock was 10 minutes behind the new one's.
    let mut old = H::new(&["n1", "n2"]);
    old.wall_offset = -STEP;
    old.annotate(trigger::TARGET_VERSION, "3.28.0");
    old.feed(found(3, "3.27.0", "deployed"));
    old.feed(ds());
    old.feed(found(3, "3.27.0", "deployed"));
    old.feed(Input::HelmFinished(Ok(())));
    old.feed(found(4, "3.28.0", "deployed"));
    old.feed(ds());
    let mut h = H::with_data(&["n1", "n2"], old.data.clone());
    h.annotations = old.annotations.clone();
    h.trigger();
    assert_eq!(h.run().turn.as_ref().map(|t| t.node.as_str()), Some("n1"));
    let seen = h.now;
    let read = node_at(&h, "n1", None, true);
    feed_reading(&mut h, read, None);
    h.now = seen + timeout - 1;
    feed_reading(&mut h, Input::Tick, None);
    let read = node_at(&h, "n1", None, true);
    feed_reading(&mut h, read, None);
    assert_eq!(
        lost(&h),
        0,
        "lost before a whole timeout since the new leader saw the turn"
    );
    h.now = seen + timeout;
    feed_reading(&mut h, Input::Tick, None);
    assert_eq!(lost(&h), 1, "the idle agent was not declared lost");
}

/// A cancel takes back a turn its agent has not started on a direct read made after the cancel;
/// "after" is on the monotonic clock, so a wall clock stepped back since does not keep the turn
/// (and the run) waiting for the wall clock to catch up.
#[test]
fn a_cancel_takes_back_an_unstarted_turn_even_after_the_wall_clock_stepped_back() {
    let mut h = H::to_running(&["n1", "n2"]);
    h.annotate(trigger::ACTION, trigger::ACTION_CANCEL);
    assert!(
        h.run().turn.is_some(),
        "taken back only on a read made after the cancel"
    );
    h.now += 1_000;
    h.wall_offset -= STEP;
    let read = node_at(&h, "n1", None, true);
    h.feed(read);
    let run = h.run();
    assert_eq!(run.turn, None, "{}", run.message);
    assert_eq!(run.phase, RunPhase::RollingBack);
}

/// A failed `helm rollback` is retried after its backoff on the monotonic clock: a wall clock
/// stepped forward meanwhile does not bring the retry forward.
#[test]
fn a_rollback_retry_waits_its_backoff_whatever_the_wall_clock_does() {
    let mut h = H::to_running(&["n1", "n2"]);
    let failing = node_at(&h, "n1", Some(NodeStatus::RollingBack), false);
    h.feed(failing);
    assert_eq!(h.run().phase, RunPhase::RollingBack);
    h.feed(found(4, "3.28.0", "deployed"));
    let fx = h.feed(Input::HelmFinished(Err(
        "another operation is in progress".into()
    )));
    let at = fx
        .iter()
        .find_map(|e| match e {
            Effect::WakeAt(w) if w.reason == WakeReason::RetryRollback => Some(w.at_ms),
            _ => None,
        })
        .expect("a retry is scheduled");
    assert!(
        at > h.now,
        "the retry is in the future on the monotonic clock"
    );
    let retried = |fx: &[Effect]| {
        fx.iter()
            .any(|e| matches!(e, Effect::ReadRelease { .. } | Effect::HelmRollback { .. }))
    };
    h.wall_offset += STEP;
    let fx = h.feed(Input::Tick);
    assert!(
        !retried(&fx),
        "retried early after a wall-clock step: {fx:?}"
    );
    h.now = at;
    let fx = h.feed(Input::Tick);
    assert!(retried(&fx), "not retried once its backoff passed: {fx:?}");
}
