use super::*;
use crate::run::ReleaseState;
use std::cell::RefCell;
use std::collections::BTreeMap;

const TIMING: Timing = Timing {
    turn_start_timeout_ms: 60_000,
    expiry_grace_ms: 10_000,
};

/// A world whose every Node observation counts as a direct read made just now (the 9.1 tests
/// below use `LaggingWorld`-style explicit read times instead).
struct World {
    nodes: RefCell<BTreeMap<String, ObservedNode>>,
    lease: LeaseTrack,
}

impl World {
    fn new(names: &[&str]) -> Self {
        World {
            nodes: RefCell::new(
                names
                    .iter()
                    .map(|n| {
                        (
                            n.to_string(),
                            ObservedNode {
                                exists: true,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            ),
            lease: LeaseTrack::new(
                &LeaseView {
                    duration_seconds: 30,
                    ..Default::default()
                },
                0,
            ),
        }
    }
    fn observe(&self) -> impl Fn(&str) -> ObservedNode + '_ {
        |n| {
            let mut o = self.nodes.borrow().get(n).cloned().unwrap_or_default();
            o.read_at_ms = Some(i64::MAX);
            o
        }
    }
    fn set(&self, run: &RunRecord, node: &str, kind: TurnKind, status: NodeStatus) {
        let mut nodes = self.nodes.borrow_mut();
        let o = nodes.get_mut(node).unwrap();
        o.run_id = Some(run.id.clone());
        o.turn = Some(kind);
        o.status = Some(status);
        if matches!(status, NodeStatus::RollingBack | NodeStatus::Failed)
            && kind == TurnKind::Upgrade
        {
            o.evidence = Some(Evidence {
                run_id: run.id.clone(),
                node: node.into(),
                step: "verifying".into(),
                failure: Some(crate::verification::FailureCause {
                    reason: "NonZeroExit".into(),
                    message: "container verify exited with code 1".into(),
                    exit_code: Some(1),
                }),
                ..Default::default()
            });
        }
    }
    fn hold(&mut self, node: &str, now: i64) {
        let view = LeaseView {
            holder: Some(format!("{node}/agent-pod-uid")),
            renew_ms: Some(now),
            duration_seconds: 30,
            transitions: 0,
        };
        self.lease.observe(&view, now);
    }
}

fn running(plan: &[&str]) -> RunRecord {
    let mut r = RunRecord::new("r1".into(), "t".into(), "3.28.0".into(), 0);
    r.phase = RunPhase::Running;
    r.plan = plan.iter().map(|s| s.to_string()).collect();
    r.release = Some(ReleaseState {
        recorded_revision: 3,
        recorded_version: "3.27.0".into(),
        old_hash: "old".into(),
        upgraded_revision: Some(4),
        new_hash: Some("new".into()),
        on_delete: Some(true),
        rolled_back: false,
        upgrade_issued: true,
        mode: Default::default(),
    });
    r
}

fn turn_of(r: &RunRecord) -> Option<(String, TurnKind)> {
    r.turn.as_ref().map(|t| (t.node.clone(), t.kind))
}

#[test]
fn happy_path_grants_turns_in_plan_order_and_succeeds() {
    let w = World::new(&["n1", "n2", "n3"]);
    let mut r = running(&["n1", "n2", "n3"]);
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
        reduce(&mut r, &w.observe(), &w.lease, i as i64, TIMING);
        assert_eq!(turn_of(&r), Some((n.to_string(), TurnKind::Upgrade)));
        w.set(&r, n, TurnKind::Upgrade, NodeStatus::Verifying);
        reduce(&mut r, &w.observe(), &w.lease, i as i64, TIMING);
        assert_eq!(r.nodes[*n].status, Some(NodeStatus::Verifying));
        w.set(&r, n, TurnKind::Upgrade, NodeStatus::Completed);
    }
    let effects = reduce(&mut r, &w.observe(), &w.lease, 10, TIMING);
    assert_eq!(r.phase, RunPhase::Succeeded);
    assert_eq!(r.progress(), "3/3");
    assert!(r.turn.is_none());
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Event {
            reason: "RunSucceeded",
            ..
        }
    )));
}

#[test]
fn zero_nodes_succeeds_at_once() {
    let w = World::new(&[]);
    let mut r = running(&[]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    assert_eq!(r.phase, RunPhase::Succeeded);
}

#[test]
fn failure_on_node_two_of_four_rolls_back_touched_nodes_only() {
    let w = World::new(&["n1", "n2", "n3", "n4"]);
    let mut r = running(&["n1", "n2", "n3", "n4"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Completed);
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    assert_eq!(turn_of(&r), Some(("n2".into(), TurnKind::Upgrade)));
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::RollingBack);
    let effects = reduce(&mut r, &w.observe(), &w.lease, 2, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(effects.contains(&Effect::HelmRollback));
    assert_eq!(r.restore_queue, ["n2", "n1"]);
    assert!(r.turn.is_none(), "no turn before helm rollback is done");
    let f = r.failure.clone().unwrap();
    assert_eq!(f.node.as_deref(), Some("n2"));
    assert!(f.reason.contains("NonZeroExit"), "{}", f.reason);
    assert_eq!(f.evidence.unwrap().failure.unwrap().exit_code, Some(1));

    // Until the driver reports the helm rollback, nothing moves.
    reduce(&mut r, &w.observe(), &w.lease, 3, TIMING);
    assert!(r.turn.is_none());
    r.release.as_mut().unwrap().rolled_back = true;
    reduce(&mut r, &w.observe(), &w.lease, 4, TIMING);
    assert_eq!(turn_of(&r), Some(("n2".into(), TurnKind::Restore)));
    w.set(&r, "n2", TurnKind::Restore, NodeStatus::RolledBack);
    reduce(&mut r, &w.observe(), &w.lease, 5, TIMING);
    assert_eq!(turn_of(&r), Some(("n1".into(), TurnKind::Restore)));
    w.set(&r, "n1", TurnKind::Restore, NodeStatus::RolledBack);
    reduce(&mut r, &w.observe(), &w.lease, 6, TIMING);
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(r.message.contains("node n2 failed"), "{}", r.message);
    assert!(r.message.contains("revision 3"), "{}", r.message);
    assert!(r.nodes.get("n3").and_then(|n| n.status).is_none());
    assert!(r.nodes.get("n4").and_then(|n| n.status).is_none());
}

#[test]
fn an_agent_that_never_takes_its_turn_fails_the_node() {
    let w = World::new(&["n1", "n2"]);
    let mut r = running(&["n1", "n2"]);
    let effects = reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    assert!(effects.contains(&Effect::WakeAt(Wake::turn_deadline(60_000))));
    reduce(&mut r, &w.observe(), &w.lease, 59_999, TIMING);
    assert_eq!(r.phase, RunPhase::Running);
    let effects = reduce(&mut r, &w.observe(), &w.lease, 60_000, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::MarkNodeFailed { node, .. } if node == "n1"))
    );
    assert!(r.failure.unwrap().reason.contains("did not take its turn"));
    assert!(r.restore_queue.is_empty());
}

#[test]
fn lease_expiry_mid_node_is_a_failure_after_the_grace() {
    let mut w = World::new(&["n1"]);
    let mut r = running(&["n1"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.hold("n1", 1_000);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Verifying);
    // Renewed at 1s, expires at 31s, grace 10s: lost at 41s. Once the agent holds the Lease,
    // only the Lease decides (issue 9.10: this was `max(41s, turn-start timeout 60s)`).
    let effects = reduce(&mut r, &w.observe(), &w.lease, 2_000, TIMING);
    assert!(effects.contains(&Effect::WakeAt(Wake::turn_deadline(41_000))));
    w.hold("n1", 50_000);
    let effects = reduce(&mut r, &w.observe(), &w.lease, 55_000, TIMING);
    assert!(effects.contains(&Effect::WakeAt(Wake::turn_deadline(90_000))));
    reduce(&mut r, &w.observe(), &w.lease, 90_000, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(r.failure.unwrap().reason.contains("stopped renewing"));
}

#[test]
fn deleted_nodes() {
    let w = World::new(&["n1", "n2", "n3"]);
    let mut r = running(&["n1", "n2", "n3"]);
    w.nodes.borrow_mut().get_mut("n1").unwrap().exists = false;
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    assert_eq!(turn_of(&r), Some(("n2".into(), TurnKind::Upgrade)));
    assert!(r.nodes["n1"].note.as_ref().unwrap().contains("skipped"));
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::Upgrading);
    w.nodes.borrow_mut().get_mut("n2").unwrap().exists = false;
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(
        r.failure
            .clone()
            .unwrap()
            .reason
            .contains("deleted during its turn")
    );
    r.release.as_mut().unwrap().rolled_back = true;
    reduce(&mut r, &w.observe(), &w.lease, 2, TIMING);
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(r.nodes.get("n3").and_then(|n| n.status).is_none());
}

#[test]
fn statuses_of_other_runs_are_ignored() {
    let w = World::new(&["n1"]);
    let mut r = running(&["n1"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    let mut old = r.clone();
    old.id = "old-run".into();
    w.set(&old, "n1", TurnKind::Upgrade, NodeStatus::Completed);
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    assert_eq!(r.phase, RunPhase::Running);
    assert_eq!(r.nodes["n1"].status, None);
}

#[test]
fn cancel_waits_for_the_node_in_progress_then_rolls_back_what_was_done() {
    let mut w = World::new(&["n1", "n2", "n3"]);
    let mut r = running(&["n1", "n2", "n3"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Completed);
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    w.hold("n2", 1);
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::Verifying);
    r.cancel_requested = true;
    reduce(&mut r, &w.observe(), &w.lease, 2, TIMING);
    assert_eq!(
        turn_of(&r),
        Some(("n2".into(), TurnKind::Upgrade)),
        "n2 finishes first"
    );
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::Completed);
    let effects = reduce(&mut r, &w.observe(), &w.lease, 3, TIMING);
    assert!(effects.contains(&Effect::HelmRollback));
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert_eq!(r.restore_queue, ["n2", "n1"]);
    r.release.as_mut().unwrap().rolled_back = true;
    for n in ["n2", "n1"] {
        reduce(&mut r, &w.observe(), &w.lease, 4, TIMING);
        assert_eq!(turn_of(&r), Some((n.into(), TurnKind::Restore)));
        w.set(&r, n, TurnKind::Restore, NodeStatus::RolledBack);
    }
    reduce(&mut r, &w.observe(), &w.lease, 5, TIMING);
    assert_eq!(r.phase, RunPhase::Cancelled);
    assert!(
        r.nodes.get("n3").and_then(|n| n.status).is_none(),
        "n3 never touched"
    );
}

#[test]
fn cancel_takes_back_a_turn_not_yet_started() {
    let w = World::new(&["n1", "n2"]);
    let mut r = running(&["n1", "n2"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    assert_eq!(turn_of(&r), Some(("n1".into(), TurnKind::Upgrade)));
    r.cancel_requested = true;
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(r.restore_queue.is_empty());
    r.release.as_mut().unwrap().rolled_back = true;
    reduce(&mut r, &w.observe(), &w.lease, 2, TIMING);
    assert_eq!(r.phase, RunPhase::Cancelled);
    assert!(r.nodes.get("n1").and_then(|n| n.status).is_none());
}

/// Observations where n1 looks like `o` and every other node exists, untouched.
fn n1_is(o: &ObservedNode) -> impl Fn(&str) -> ObservedNode + '_ {
    move |n| {
        if n == "n1" {
            o.clone()
        } else {
            ObservedNode {
                exists: true,
                ..Default::default()
            }
        }
    }
}

/// Issue 9.1: the agent writes `completed`, then releases the Lease; the coordinator's watches
/// may deliver these in either order, long after the turn-start timeout. Every ordering (and
/// the release alone, `completed` never delivered by the watch) must end the turn as completed,
/// never as lost: loss is declared only on a direct read, and the direct read shows `completed`.
#[test]
fn completed_and_lease_release_in_any_order_never_declare_a_long_turn_lost() {
    #[derive(Clone, Copy, Debug)]
    enum Delivery {
        Completed,
        Released,
    }
    let orderings: [&[Delivery]; 3] = [
        &[Delivery::Completed, Delivery::Released],
        &[Delivery::Released, Delivery::Completed],
        &[Delivery::Released],
    ];
    for order in orderings {
        let mut r = running(&["n1", "n2"]);
        let lease_view = |holder: Option<&str>, renew: i64| LeaseView {
            holder: holder.map(|h| format!("{h}/uid-1")),
            renew_ms: Some(renew),
            duration_seconds: 15,
            transitions: 1,
        };
        let mut lease = LeaseTrack::new(&lease_view(None, 0), 0);
        // What the watch shows, and what a direct read returns.
        let mut watched = ObservedNode {
            exists: true,
            ..Default::default()
        };
        reduce(&mut r, &n1_is(&watched), &lease, 0, TIMING);
        assert_eq!(turn_of(&r), Some(("n1".into(), TurnKind::Upgrade)));
        watched.run_id = Some(r.id.clone());
        watched.turn = Some(TurnKind::Upgrade);
        watched.status = Some(NodeStatus::Verifying);
        // A long, healthy turn: the Lease is renewed every 5 s for 100 s.
        let mut now = 0;
        while now < 100_000 {
            now += 5_000;
            lease.observe(&lease_view(Some("n1"), now), now);
            let fx = reduce(&mut r, &n1_is(&watched), &lease, now, TIMING);
            assert_eq!(r.phase, RunPhase::Running, "{order:?} at {now}: {fx:?}");
        }
        let mut truth = watched.clone();
        truth.status = Some(NodeStatus::Completed);
        let mut direct: Option<ObservedNode> = None;
        for d in order {
            now += 100;
            match d {
                Delivery::Completed => watched.status = Some(NodeStatus::Completed),
                Delivery::Released => lease.observe(&lease_view(None, now), now),
            }
            // Feed the step, then answer any direct read the reducer asks for.
            for _ in 0..3 {
                let view = direct.clone().unwrap_or_else(|| watched.clone());
                let fx = reduce(&mut r, &n1_is(&view), &lease, now, TIMING);
                assert!(
                    !fx.iter()
                        .any(|e| matches!(e, Effect::MarkNodeFailed { .. })),
                    "{order:?}: n1 declared lost: {fx:?}"
                );
                if fx.contains(&Effect::ReadNode("n1".into())) {
                    let mut read = truth.clone();
                    read.read_at_ms = Some(now);
                    direct = Some(read);
                    watched = truth.clone();
                }
            }
        }
        assert_eq!(
            r.nodes["n1"].status,
            Some(NodeStatus::Completed),
            "{order:?}"
        );
        assert_eq!(
            turn_of(&r),
            Some(("n2".into(), TurnKind::Upgrade)),
            "{order:?}"
        );
        assert!(r.failure.is_none(), "{order:?}: {:?}", r.failure);
    }
}

/// Issue 9.10: with a 15 s Lease, a dead agent that held it is noticed about 15 s + grace after
/// its last renewal, not at a fixed minute after its turn was granted.
#[test]
fn a_dead_agent_is_noticed_by_its_lease_not_a_fixed_minute() {
    let mut r = running(&["n1"]);
    let mut lease = LeaseTrack::new(
        &LeaseView {
            duration_seconds: 15,
            ..Default::default()
        },
        0,
    );
    let node = |read_at: Option<i64>| ObservedNode {
        exists: true,
        run_id: Some("r1".into()),
        turn: Some(TurnKind::Upgrade),
        status: Some(NodeStatus::Upgrading),
        read_at_ms: read_at,
        ..Default::default()
    };
    reduce(&mut r, &|_| node(None), &lease, 0, TIMING);
    let held = LeaseView {
        holder: Some("n1/uid".into()),
        renew_ms: Some(1_000),
        duration_seconds: 15,
        transitions: 1,
    };
    lease.observe(&held, 1_000);
    let fx = reduce(&mut r, &|_| node(None), &lease, 2_000, TIMING);
    // 1 s (seen renewed) + 15 s + 10 s grace.
    assert!(
        fx.contains(&Effect::WakeAt(Wake::turn_deadline(26_000))),
        "{fx:?}"
    );
    let fx = reduce(&mut r, &|_| node(None), &lease, 26_000, TIMING);
    assert!(fx.contains(&Effect::ReadNode("n1".into())), "{fx:?}");
    assert_eq!(r.phase, RunPhase::Running, "not before a direct read");
    reduce(&mut r, &|_| node(Some(26_050)), &lease, 26_050, TIMING);
    assert_eq!(r.phase, RunPhase::RollingBack);
    assert!(r.failure.unwrap().reason.contains("stopped renewing"));
}

/// Issue 9.6: the agent's `renewTime` is written by its own (skewed) clock; expiry counts from
/// when the coordinator saw it change, so a renewTime far in the past is no loss.
#[test]
fn lease_expiry_is_measured_on_the_coordinators_clock() {
    let mut lease = LeaseTrack::new(&LeaseView::default(), 0);
    let behind = |renew: i64| LeaseView {
        holder: Some("n1/uid".into()),
        renew_ms: Some(renew),
        duration_seconds: 30,
        transitions: 1,
    };
    lease.observe(&behind(-45_000), 100_000);
    assert_eq!(lease.renew_seen_ms, 100_000);
    lease.observe(&behind(-45_000), 120_000);
    assert_eq!(lease.renew_seen_ms, 100_000, "a duplicate is no renewal");
    lease.observe(&behind(-35_000), 130_000);
    assert_eq!(lease.renew_seen_ms, 130_000);
    // A hand-edited duration is clamped.
    lease.observe(
        &LeaseView {
            duration_seconds: 0,
            ..behind(-35_000)
        },
        131_000,
    );
    assert_eq!(lease.duration_ms, LeaseTrack::MIN_DURATION_MS);
}

/// Issue 9.9: an agent that stopped its step because of the cancel ends the run `Cancelled`,
/// after restoring that node and every node the run completed.
#[test]
fn a_step_stopped_by_cancel_ends_the_run_cancelled() {
    let w = World::new(&["n1", "n2", "n3"]);
    let mut r = running(&["n1", "n2", "n3"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Completed);
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::Verifying);
    r.cancel_requested = true;
    reduce(&mut r, &w.observe(), &w.lease, 2, TIMING);
    assert_eq!(turn_of(&r), Some(("n2".into(), TurnKind::Upgrade)));
    w.set(&r, "n2", TurnKind::Upgrade, NodeStatus::RollingBack);
    w.nodes.borrow_mut().get_mut("n2").unwrap().evidence = Some(Evidence {
        run_id: r.id.clone(),
        node: "n2".into(),
        step: "verifying".into(),
        failure: Some(crate::verification::FailureCause {
            reason: CANCELLED.into(),
            message: "the run was cancelled".into(),
            exit_code: None,
        }),
        ..Default::default()
    });
    let effects = reduce(&mut r, &w.observe(), &w.lease, 3, TIMING);
    assert!(effects.contains(&Effect::HelmRollback));
    assert_eq!(r.restore_queue, ["n2", "n1"]);
    assert!(r.failure.is_none());
    r.release.as_mut().unwrap().rolled_back = true;
    for n in ["n2", "n1"] {
        reduce(&mut r, &w.observe(), &w.lease, 4, TIMING);
        assert_eq!(turn_of(&r), Some((n.into(), TurnKind::Restore)));
        w.set(&r, n, TurnKind::Restore, NodeStatus::RolledBack);
    }
    reduce(&mut r, &w.observe(), &w.lease, 5, TIMING);
    assert_eq!(r.phase, RunPhase::Cancelled, "{}", r.message);
    assert!(r.nodes.get("n3").and_then(|n| n.status).is_none());
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// What an agent does when it gets a turn, per node.
    #[derive(Debug, Clone, Copy)]
    enum Agent {
        Succeeds,
        FailsVerification,
        Absent,
        DiesMidTurn,
    }

    fn agent() -> impl Strategy<Value = Agent> {
        prop_oneof![
            6 => Just(Agent::Succeeds),
            2 => Just(Agent::FailsVerification),
            1 => Just(Agent::Absent),
            1 => Just(Agent::DiesMidTurn),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_agent_behaviour(agents in proptest::collection::vec(agent(), 0..7)) {
            let names: Vec<String> = (1..=agents.len()).map(|i| format!("n{i}")).collect();
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let mut w = World::new(&refs);
            let mut r = running(&refs);
            let mut now = 0i64;
            let mut upgrade_turns: Vec<String> = Vec::new();
            let mut restore_turns: Vec<String> = Vec::new();
            let mut failed_seen = false;
            for _ in 0..200 {
                let effects = reduce(&mut r, &w.observe(), &w.lease, now, TIMING);
                if effects.contains(&Effect::HelmRollback) {
                    r.release.as_mut().unwrap().rolled_back = true;
                }
                if r.phase == RunPhase::RollingBack { failed_seen = true; }
                if r.phase.is_finished() { break; }
                match r.turn.clone() {
                    Some(t) => {
                        let list = if t.kind == TurnKind::Upgrade { &mut upgrade_turns } else { &mut restore_turns };
                        if list.last() != Some(&t.node) { list.push(t.node.clone()); }
                        prop_assert!(!(failed_seen && t.kind == TurnKind::Upgrade), "upgrade turn after a failure");
                        let i: usize = t.node[1..].parse::<usize>().unwrap() - 1;
                        match (t.kind, agents[i]) {
                            (_, Agent::Absent) => now += TIMING.turn_start_timeout_ms,
                            (TurnKind::Upgrade, Agent::DiesMidTurn) => {
                                w.hold(&t.node, now);
                                w.set(&r, &t.node, t.kind, NodeStatus::Upgrading);
                                now += 100_000;
                            }
                            (TurnKind::Upgrade, Agent::FailsVerification) => w.set(&r, &t.node, t.kind, NodeStatus::RollingBack),
                            (TurnKind::Upgrade, _) => w.set(&r, &t.node, t.kind, NodeStatus::Completed),
                            (TurnKind::Restore, _) => w.set(&r, &t.node, t.kind, NodeStatus::RolledBack),
                        }
                    }
                    None => now += 1,
                }
            }
            prop_assert!(r.phase.is_finished(), "run did not finish: {:?}", r.phase);
            // Upgrade turns follow the plan order, each node at most once.
            let expected: Vec<String> = names.iter().take(upgrade_turns.len()).cloned().collect();
            prop_assert_eq!(&upgrade_turns, &expected);
            // Only nodes that had an upgrade turn are restored, each at most once.
            for n in &restore_turns {
                prop_assert!(upgrade_turns.contains(n));
            }
            let mut dedup = restore_turns.clone();
            dedup.sort();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), restore_turns.len());
            // Success iff every agent succeeded.
            let all_ok = agents.iter().all(|a| matches!(a, Agent::Succeeds));
            prop_assert_eq!(r.phase == RunPhase::Succeeded, all_ok);
        }
    }
}

/// A wake is on the clock its reason says: a maintenance window's opening on the wall clock
/// (time of day), a deadline or a retry on the monotonic clock.
#[test]
fn a_wake_sleeps_on_its_own_clock() {
    let now = Now {
        wall_ms: 1_000_000,
        mono_ms: 5_000,
    };
    let window = Wake {
        at_ms: 1_060_000,
        reason: WakeReason::WindowOpens,
    };
    assert_eq!(window.sleep_for(now), std::time::Duration::from_secs(60));
    let deadline = Wake::turn_deadline(45_000);
    assert_eq!(deadline.sleep_for(now), std::time::Duration::from_secs(40));
    let retry = Wake {
        at_ms: 4_000,
        reason: WakeReason::RetryRollback,
    };
    assert_eq!(
        retry.sleep_for(now),
        std::time::Duration::ZERO,
        "a past wake is due now"
    );
}

/// Issue 12 (found by the run machine's model test with grants): once the run saw a node in its
/// upgrade turn, an older view of that node delivered after the stop (not started yet, Lease
/// already released as the turn ended) does not take the turn back: the node would otherwise
/// be left upgraded and never restored.
#[test]
fn a_stale_view_never_takes_back_a_turn_the_run_saw_started() {
    let w = World::new(&["n1", "n2"]);
    let mut r = running(&["n1", "n2"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Verifying);
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    assert_eq!(r.nodes["n1"].status, Some(NodeStatus::Verifying));
    r.cancel_requested = true;
    // A view of n1 from before its turn, read "after" the stop, with the Lease free.
    let stale = ObservedNode {
        exists: true,
        read_at_ms: Some(i64::MAX),
        ..Default::default()
    };
    reduce(&mut r, &n1_is(&stale), &w.lease, 2, TIMING);
    assert_eq!(
        turn_of(&r),
        Some(("n1".into(), TurnKind::Upgrade)),
        "the turn stays until n1 itself is seen to end it"
    );
    // n1 finished its step after all: it is restored with the rest.
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::Completed);
    reduce(&mut r, &w.observe(), &w.lease, 3, TIMING);
    assert_eq!(r.nodes["n1"].status, Some(NodeStatus::Completed));
    assert_eq!(r.restore_queue, ["n1"]);
}

/// Issue 12: the record keeps each node's evidence short; the failing node's full evidence
/// (its log tail) stays in the run's failure.
#[test]
fn the_record_keeps_short_evidence_per_node_and_the_failure_in_full() {
    let w = World::new(&["n1", "n2"]);
    let mut r = running(&["n1", "n2"]);
    reduce(&mut r, &w.observe(), &w.lease, 0, TIMING);
    w.set(&r, "n1", TurnKind::Upgrade, NodeStatus::RollingBack);
    w.nodes
        .borrow_mut()
        .get_mut("n1")
        .unwrap()
        .evidence
        .as_mut()
        .unwrap()
        .log_tail = Some("log line\n".repeat(200));
    reduce(&mut r, &w.observe(), &w.lease, 1, TIMING);
    let kept = r.nodes["n1"].evidence.as_ref().expect("short evidence");
    assert_eq!(kept.log_tail, None);
    assert_eq!(kept.failure.as_ref().unwrap().reason, "NonZeroExit");
    let failure = r.failure.as_ref().expect("the run failed");
    assert!(
        failure
            .evidence
            .as_ref()
            .and_then(|e| e.log_tail.as_ref())
            .is_some_and(|t| t.len() > 1000)
    );
}
