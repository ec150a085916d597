//! Issue 10, job mode: a scoped upgrade whose helm call failed before it changed the release
//! dispatched no install Job, so the node's turn fails at once (the coordinator marks the node
//! failed with the helm error as evidence and takes its Lease back, as for a lost node) instead
//! of when its agent's install wait times out. One whose release moved is left to the agent.
use super::*;
use crate::TurnKind::Upgrade;

fn marked_failed(fx: &[Effect]) -> Vec<(String, crate::TurnKind, Evidence)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::MarkNodeFailed {
                node,
                kind,
                evidence,
            } => Some((node.clone(), *kind, evidence.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_scoped_upgrade_that_changed_nothing_fails_its_node_at_once() {
    let mut h = H::new(&["n1", "n2"]);
    h.annotate(trigger::TARGET_VERSION, "4.0.0");
    h.feed(found_job(3, "3.32.0", "deployed"));
    at_status(&mut h, "n1", NodeStatus::Upgrading, Upgrade);
    h.feed(found_job(3, "3.32.0", "deployed"));
    assert_eq!(installs(&h.fx).len(), 1, "{:?}", h.fx);
    h.fx.clear();
    h.feed(Input::HelmFinished(Err(
        "chart \"kata-deploy\" version \"4.0.0\" not found".into(),
    )));
    h.feed(found_job(3, "3.32.0", "deployed"));
    assert!(h.has_event("InstallFailed"));
    let failed = marked_failed(&h.fx);
    let [(marked, kind, evidence)] = failed.as_slice() else {
        panic!("n1 marked failed once: {:?}", h.fx);
    };
    assert_eq!((marked.as_str(), *kind), ("n1", Upgrade));
    let cause = evidence.failure.as_ref().expect("a cause");
    assert_eq!(cause.reason, "InstallFailed");
    assert!(
        cause.message.contains("not found") && cause.message.contains("4.0.0"),
        "{cause:?}"
    );
    assert_eq!(
        (evidence.run_id.as_str(), evidence.succeeded),
        (h.run().id.as_str(), false)
    );
    assert!(
        h.fx.iter()
            .any(|e| matches!(e, Effect::RevokeLease { node, slot: 0 } if node == "n1")),
        "{:?}",
        h.fx
    );
    // Never a second install for n1, and never a second mark.
    h.fx.clear();
    h.feed(found_job(3, "3.32.0", "deployed"));
    h.feed(Input::Tick);
    assert!(
        installs(&h.fx).is_empty() && marked_failed(&h.fx).is_empty(),
        "{:?}",
        h.fx
    );

    // The Node shows the mark: the turn ends, the run rolls back with the helm error as its
    // cause; n2 is never reached.
    let id = h.run().id;
    h.feed(Input::Node {
        name: "n1".into(),
        node: Some(NodeSnapshot {
            observed: ObservedNode {
                exists: true,
                status: Some(NodeStatus::Failed),
                run_id: Some(id),
                turn: Some(Upgrade),
                evidence: Some(evidence.clone()),
                ..Default::default()
            },
            ..node("n1").1
        }),
        direct: false,
    });
    let r = h.run();
    assert!(
        matches!(r.phase, RunPhase::RollingBack | RunPhase::Failed),
        "{:?}: {}",
        r.phase,
        r.message
    );
    let failure = r.failure.expect("run failure");
    assert_eq!(failure.node.as_deref(), Some("n1"));
    assert!(failure.reason.contains("not found"), "{}", failure.reason);
    assert!(r.nodes.get("n2").is_none_or(|n| n.status.is_none()));
}

#[test]
fn a_scoped_upgrade_whose_release_moved_is_left_to_the_agent() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "4.0.0");
    h.feed(found_job(3, "3.32.0", "deployed"));
    at_status(&mut h, "n1", NodeStatus::Upgrading, Upgrade);
    h.feed(found_job(3, "3.32.0", "deployed"));
    h.feed(Input::HelmFinished(Err("post-upgrade hooks failed".into())));
    h.feed(found_job(4, "4.0.0", "failed"));
    assert!(h.has_event("InstallFailed"));
    assert!(marked_failed(&h.fx).is_empty(), "{:?}", h.fx);
    assert!(!h.fx.iter().any(|e| matches!(e, Effect::RevokeLease { .. })));
}
