//! The per-node procedure an agent runs on its own node, as pure decisions. The agent's driver
//! performs the step each status names; these functions decide order, resumption and the
//! cordon/kata-deploy-pod questions, so every branch is unit-tested without a cluster.
use crate::run::TurnKind;
use crate::status::NodeStatus;

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

/// A kata-deploy pod on this node, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KataPod {
    pub name: String,
    pub revision_hash: String,
    pub ready: bool,
    pub terminating: bool,
}

/// The next move to get this node's kata-deploy pod to `want_hash` and Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRestart {
    /// Delete this pod so the DaemonSet replaces it at the current template.
    Delete(String),
    /// Wait for the replacement (or readiness).
    Wait,
    /// A pod at `want_hash` is Ready.
    Done(String),
}

pub fn pod_restart(pods: &[KataPod], want_hash: &str) -> PodRestart {
    let live = || pods.iter().filter(|p| !p.terminating);
    if let Some(p) = live().find(|p| p.revision_hash == want_hash && p.ready) {
        return PodRestart::Done(p.name.clone());
    }
    if let Some(p) = live().find(|p| p.revision_hash != want_hash) {
        return PodRestart::Delete(p.name.clone());
    }
    PodRestart::Wait
}

/// How a kata-deploy pod looks to [`pod_restart`]: revision from its `controller-revision-hash`
/// label, readiness from its `Ready` condition, terminating once it has a deletion timestamp.
pub fn kata_pod_of(pod: &k8s_openapi::api::core::v1::Pod) -> KataPod {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    KataPod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        revision_hash: pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::keys::kata_deploy::REVISION_HASH_LABEL))
            .cloned()
            .unwrap_or_default(),
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
    }
}

/// Where a kata-deploy restart stands, for the evidence of a restart that timed out.
pub fn describe_kata_pods(pods: &[KataPod], want_hash: &str) -> String {
    if pods.is_empty() {
        return "no kata-deploy pod on the node (is the DaemonSet scheduling here?)".into();
    }
    pods.iter()
        .map(|p| {
            let mut s = format!("pod {} at revision {}", p.name, p.revision_hash);
            if p.revision_hash != want_hash {
                s.push_str(&format!(" (want {want_hash})"));
            }
            s.push_str(if p.ready { ", Ready" } else { ", not Ready" });
            if p.terminating {
                s.push_str(", terminating");
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeStatus::*;

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

    fn pod(name: &str, hash: &str, ready: bool, terminating: bool) -> KataPod {
        KataPod {
            name: name.into(),
            revision_hash: hash.into(),
            ready,
            terminating,
        }
    }

    #[test]
    fn pod_restart_table() {
        let cases = [
            (vec![], PodRestart::Wait),
            (
                vec![pod("a", "old", true, false)],
                PodRestart::Delete("a".into()),
            ),
            (vec![pod("a", "old", true, true)], PodRestart::Wait),
            (
                vec![pod("a", "old", true, true), pod("b", "new", false, false)],
                PodRestart::Wait,
            ),
            (
                vec![pod("a", "old", true, true), pod("b", "new", true, false)],
                PodRestart::Done("b".into()),
            ),
            (vec![pod("b", "new", true, true)], PodRestart::Wait),
        ];
        for (pods, want) in cases {
            assert_eq!(pod_restart(&pods, "new"), want, "{pods:?}");
        }
    }

    #[test]
    fn kata_pods_are_read_from_labels_conditions_and_deletion() {
        use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let mut p = Pod::default();
        p.metadata.name = Some("kata-deploy-x".into());
        p.metadata.labels =
            Some([("controller-revision-hash".to_string(), "h1".to_string())].into());
        assert_eq!(kata_pod_of(&p), pod("kata-deploy-x", "h1", false, false));
        p.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(kata_pod_of(&p), pod("kata-deploy-x", "h1", true, true));
        let text = describe_kata_pods(&[kata_pod_of(&p)], "h2");
        assert!(
            text.contains("want h2") && text.contains("terminating"),
            "{text}"
        );
        assert!(describe_kata_pods(&[], "h2").contains("no kata-deploy pod"));
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
