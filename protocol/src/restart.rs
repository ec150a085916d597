//! The kata-deploy pod restart as a pure machine: the DaemonSet is `OnDelete`, so nothing moves
//! until the agent deletes its own node's kata-deploy pod; then it waits until the replacement
//! at the wanted `controller-revision-hash` is Ready, and — when the budget runs out — says
//! where the restart is stuck. The agent's driver feeds it the pods its watch sees and performs
//! the deletion it asks for.
use crate::procedure::{Budget, cancelled};
use crate::verification::FailureCause;
use std::collections::BTreeSet;
use std::time::Duration;

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

/// A kata-deploy pod on the node with its uid, as the watch delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPod {
    pub uid: String,
    pub pod: KataPod,
}

impl ObservedPod {
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Self {
        ObservedPod {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            pod: kata_pod_of(pod),
        }
    }
}

/// The restart's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartStep {
    /// Delete this pod (name, uid) so the DaemonSet replaces it at the current template.
    Delete {
        name: String,
        uid: String,
    },
    /// Wait for the watch, or until this time (driver clock, ms; `None`: only a change).
    WaitUntil(Option<i64>),
    /// A pod at the wanted revision is Ready; the restart took this long.
    Done {
        pod: String,
        took: Duration,
    },
    Failed(FailureCause),
}

/// The restart of one node's kata-deploy pod to one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    node: String,
    want_hash: String,
    budget: Budget,
    /// Pods present when the step first saw the node (by uid): only these are ever deleted.
    initial: Option<BTreeSet<String>>,
    /// Pods we deleted, by uid: terminating for our purposes even before the watch says so.
    deleted: BTreeSet<String>,
    /// Before 3.31.0 a Ready kata-deploy pod may still be installing: the restart is done only
    /// once the node also carries `katacontainers.io/kata-runtime=true` (set by kata-deploy
    /// when its install finished; see `kata_deploy::ready_may_precede_install`).
    await_runtime_label: bool,
    /// The node's `katacontainers.io/kata-runtime` label as last observed.
    runtime_label: Option<String>,
}

impl Restart {
    pub fn new(node: &str, want_hash: &str, budget: Budget) -> Self {
        Restart {
            node: node.to_string(),
            want_hash: want_hash.to_string(),
            budget,
            initial: None,
            deleted: BTreeSet::new(),
            await_runtime_label: false,
            runtime_label: None,
        }
    }

    /// The restart also waits for `katacontainers.io/kata-runtime=true` on the node (kata-deploy
    /// versions whose readiness does not mean installed).
    pub fn awaiting_runtime_label(mut self) -> Self {
        self.await_runtime_label = true;
        self
    }

    /// The node's `katacontainers.io/kata-runtime` label, as the agent's watch of its Node
    /// last saw it (`None`: absent).
    pub fn observe_runtime_label(&mut self, value: Option<&str>) {
        self.runtime_label = value.map(str::to_string);
    }

    fn installed(&self) -> bool {
        !self.await_runtime_label || self.runtime_label.as_deref() == Some("true")
    }

    /// The pods as [`pod_restart`] should see them. Pods we already deleted count as
    /// terminating even before the watch says so. Only pods present when the step started are
    /// ever deleted: a pod the DaemonSet creates afterwards at another revision means its
    /// template is not at the wanted revision, and deleting it again would only churn
    /// kata-deploy on this node (each termination may clean the node's Kata install), so it
    /// counts as terminating too and the step waits — until the timeout names the problem.
    fn decision_view(&self, pods: &[ObservedPod], initial: &BTreeSet<String>) -> Vec<KataPod> {
        pods.iter()
            .map(|p| {
                let mut k = p.pod.clone();
                if self.deleted.contains(&p.uid)
                    || (k.revision_hash != self.want_hash && !initial.contains(&p.uid))
                {
                    k.terminating = true;
                }
                k
            })
            .collect()
    }

    /// Decides from the kata-deploy pods now on the node (`None` until the watch has listed
    /// them once). A cancel stops the step only before our pod is deleted: once kata-deploy is
    /// restarting, the node is left in a known state (the new pod Ready) before the turn ends.
    pub fn next(&mut self, pods: Option<&[ObservedPod]>, now_ms: i64, cancel: bool) -> RestartStep {
        if self.want_hash.is_empty() {
            return RestartStep::Failed(FailureCause {
                reason: "UnknownRevision".into(),
                message: "the run record names no kata-deploy controller-revision-hash to restart to; \
                          the coordinator records it after the helm upgrade — check the coordinator's logs"
                    .into(),
                exit_code: None,
            });
        }
        if cancel && self.deleted.is_empty() {
            return RestartStep::Failed(cancelled(format!(
                "the run was cancelled before kata-deploy on {} was restarted",
                self.node
            )));
        }
        if let Some(pods) = pods {
            let initial = self
                .initial
                .get_or_insert_with(|| pods.iter().map(|p| p.uid.clone()).collect())
                .clone();
            let view = self.decision_view(pods, &initial);
            match pod_restart(&view, &self.want_hash) {
                PodRestart::Done(pod) if self.installed() => {
                    return RestartStep::Done {
                        pod,
                        took: self.budget.elapsed(now_ms),
                    };
                }
                // Ready, not yet installed: the label's change wakes the step.
                PodRestart::Done(_) => {}
                PodRestart::Delete(name) => {
                    let uid = pods
                        .iter()
                        .find(|p| p.pod.name == name)
                        .map(|p| p.uid.clone())
                        .unwrap_or_default();
                    return RestartStep::Delete { name, uid };
                }
                PodRestart::Wait => {}
            }
        }
        if self.budget.is_over(now_ms) {
            return RestartStep::Failed(self.timeout(pods.unwrap_or_default()));
        }
        RestartStep::WaitUntil(self.budget.ends_at_ms())
    }

    /// We deleted the pod with this uid (or it was already gone).
    pub fn deleted(&mut self, uid: &str) {
        self.deleted.insert(uid.to_string());
    }

    fn timeout(&self, pods: &[ObservedPod]) -> FailureCause {
        let initial_view = self.decision_view(pods, &self.initial.clone().unwrap_or_default());
        if let PodRestart::Done(pod) = pod_restart(&initial_view, &self.want_hash) {
            return FailureCause {
                reason: "KataRuntimeNotInstalled".into(),
                message: format!(
                    "kata-deploy pod {pod} on {} is Ready at revision {}, but the node's {} label is {} after {}s: \
                     this kata-deploy version reports Ready before its install finished, and the install did not finish",
                    self.node,
                    self.want_hash,
                    crate::keys::node::KATA_RUNTIME_LABEL,
                    self.runtime_label
                        .as_deref()
                        .map_or("absent".to_string(), |v| format!("{v:?}")),
                    self.budget.limit.as_secs()
                ),
                exit_code: None,
            };
        }
        let initial = self.initial.clone().unwrap_or_default();
        let recreated_elsewhere = pods.iter().any(|p| {
            !p.pod.terminating && p.pod.revision_hash != self.want_hash && !initial.contains(&p.uid)
        });
        let hint = if recreated_elsewhere {
            "; the DaemonSet recreated the pod at another revision, so its template is not \
             at the wanted one (did the helm upgrade/rollback take effect? is \
             updateStrategy OnDelete honoured by this chart version?)"
        } else {
            ""
        };
        let current: Vec<KataPod> = pods.iter().map(|p| p.pod.clone()).collect();
        FailureCause {
            reason: "KataDeployNotReady".into(),
            message: format!(
                "kata-deploy on {} was not Ready at revision {} within {}s: {}{hint}",
                self.node,
                self.want_hash,
                self.budget.limit.as_secs(),
                describe_kata_pods(&current, &self.want_hash)
            ),
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn obs(name: &str, uid: &str, hash: &str, ready: bool) -> ObservedPod {
        ObservedPod {
            uid: uid.into(),
            pod: pod(name, hash, ready, false),
        }
    }

    const LIMIT: Duration = Duration::from_secs(300);

    #[test]
    fn deletes_the_original_pod_once_and_never_churns_replacements() {
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT));
        assert_eq!(
            r.next(None, 0, false),
            RestartStep::WaitUntil(Some(300_000))
        );
        let old = obs("kd-a", "u1", "old", true);
        assert_eq!(
            r.next(Some(std::slice::from_ref(&old)), 0, false),
            RestartStep::Delete {
                name: "kd-a".into(),
                uid: "u1".into()
            }
        );
        r.deleted("u1");
        // Deleted, watch not caught up yet: wait.
        assert_eq!(
            r.next(Some(&[old]), 1, false),
            RestartStep::WaitUntil(Some(300_000))
        );
        // Cancel no longer stops a restart in flight.
        let again = obs("kd-b", "u2", "old", true);
        // The DaemonSet recreated it at the OLD revision (template not updated): wait, no delete.
        assert_eq!(
            r.next(Some(std::slice::from_ref(&again)), 2, true),
            RestartStep::WaitUntil(Some(300_000))
        );
        match r.next(Some(&[again]), 300_000, false) {
            RestartStep::Failed(c) => {
                assert_eq!(c.reason, "KataDeployNotReady");
                assert!(
                    c.message.contains("recreated the pod at another revision"),
                    "{}",
                    c.message
                );
                assert!(c.message.contains("within 300s"), "{}", c.message);
            }
            s => panic!("{s:?}"),
        }
        // Not Ready yet, then Ready at the wanted revision: done, with the time it took.
        let starting = obs("kd-c", "u3", "new", false);
        assert_eq!(
            r.next(Some(&[starting]), 3, false),
            RestartStep::WaitUntil(Some(300_000))
        );
        let good = obs("kd-c", "u3", "new", true);
        assert_eq!(
            r.next(Some(&[good]), 4_000, false),
            RestartStep::Done {
                pod: "kd-c".into(),
                took: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn already_at_the_wanted_revision_is_done_without_a_restart() {
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT));
        let p = obs("kd-a", "u1", "new", true);
        assert!(
            matches!(r.next(Some(&[p]), 0, true), RestartStep::Failed(_)),
            "cancel before the delete stops"
        );
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT));
        let p = obs("kd-a", "u1", "new", true);
        assert!(matches!(
            r.next(Some(&[p]), 0, false),
            RestartStep::Done { .. }
        ));
    }

    #[test]
    fn before_3_31_ready_is_not_done_until_the_node_is_labelled_installed() {
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT)).awaiting_runtime_label();
        r.observe_runtime_label(Some("true")); // the old install's label
        let old = obs("kd-a", "u1", "old", true);
        assert!(matches!(
            r.next(Some(std::slice::from_ref(&old)), 0, false),
            RestartStep::Delete { .. }
        ));
        r.deleted("u1");
        // kata-deploy's cleanup on restart takes the label off; the new pod is Ready first.
        r.observe_runtime_label(Some("false"));
        let ready = obs("kd-b", "u2", "new", true);
        assert_eq!(
            r.next(Some(std::slice::from_ref(&ready)), 1_000, false),
            RestartStep::WaitUntil(Some(300_000))
        );
        match r.next(Some(std::slice::from_ref(&ready)), 300_000, false) {
            RestartStep::Failed(c) => {
                assert_eq!(c.reason, "KataRuntimeNotInstalled");
                assert!(
                    c.message
                        .contains("katacontainers.io/kata-runtime label is \"false\""),
                    "{}",
                    c.message
                );
            }
            s => panic!("{s:?}"),
        }
        r.observe_runtime_label(Some("true"));
        assert_eq!(
            r.next(Some(&[ready]), 2_000, false),
            RestartStep::Done {
                pod: "kd-b".into(),
                took: Duration::from_secs(2)
            }
        );
        // Without the wait (3.31.0 and later), Ready is done whatever the label says.
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT));
        r.observe_runtime_label(None);
        assert!(matches!(
            r.next(Some(&[obs("kd-b", "u2", "new", true)]), 0, false),
            RestartStep::Done { .. }
        ));
    }

    #[test]
    fn no_revision_or_no_pod_fails_with_a_reason() {
        let mut r = Restart::new("n1", "", Budget::new(0, LIMIT));
        assert!(
            matches!(r.next(None, 0, false), RestartStep::Failed(c) if c.reason == "UnknownRevision")
        );
        let mut r = Restart::new("n1", "new", Budget::new(0, LIMIT));
        match r.next(Some(&[]), 300_000, false) {
            RestartStep::Failed(c) => {
                assert!(c.message.contains("no kata-deploy pod"), "{}", c.message)
            }
            s => panic!("{s:?}"),
        }
        let mut r = Restart::new("n1", "new", Budget::new(0, Duration::MAX));
        assert_eq!(r.next(None, i64::MAX, false), RestartStep::WaitUntil(None));
    }
}
