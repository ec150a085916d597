//! The drain step as a pure machine: which pods a drain evicts (as `kubectl drain
//! --ignore-daemonsets` does), when to retry a refused eviction (jittered exponential backoff),
//! when the node is drained, and — when the budget runs out — which pod and which
//! PodDisruptionBudget blocked it. The coordinator's drainer (which alone holds the eviction
//! right, see `drain_request`) feeds it the pods its watch sees on the node and the outcome of
//! each eviction, and performs the eviction it asks for.
use crate::backoff::jittered;
use crate::procedure::{Budget, cancelled};
use crate::verification::FailureCause;
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;
use std::time::Duration;

pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainDecision {
    Evict,
    Skip(&'static str),
}

pub fn decide(pod: &Pod) -> DrainDecision {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
    {
        return DrainDecision::Skip("mirror pod");
    }
    if meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true))
    {
        return DrainDecision::Skip("DaemonSet pod");
    }
    if meta.deletion_timestamp.is_some() {
        return DrainDecision::Skip("already terminating");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") | Some("Failed") => DrainDecision::Skip("already finished"),
        _ => DrainDecision::Evict,
    }
}

/// The PodDisruptionBudget named by an eviction refusal (HTTP 429). The API server says
/// "The disruption budget <name> needs <n> healthy pods and has <m> currently" in the
/// `DisruptionBudget` cause; older servers put it in the message.
pub fn blocking_budget(message: &str) -> Option<String> {
    const PREFIX: &str = "disruption budget ";
    let lower = message.to_ascii_lowercase();
    let at = lower.find(PREFIX)? + PREFIX.len();
    let name: String = message[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    let name = name.trim_end_matches('.');
    (!name.is_empty()).then(|| name.to_string())
}

/// Why an eviction was refused (HTTP 429), naming the PodDisruptionBudget when the server does:
/// from the status `message` and its `details.causes[].message`.
pub fn refusal(message: &str, causes: &[&str]) -> String {
    let budget = causes
        .iter()
        .copied()
        .chain([message])
        .find_map(blocking_budget);
    let detail = causes
        .first()
        .copied()
        .filter(|c| !c.is_empty())
        .unwrap_or(message);
    match budget {
        Some(b) => format!("blocked by PodDisruptionBudget {b}: {detail}"),
        None => format!("eviction refused: {detail}"),
    }
}

/// A pod on the node, as the drain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPod {
    /// `namespace/name`.
    pub key: String,
    pub uid: String,
    pub decision: DrainDecision,
}

impl DrainPod {
    pub fn of(pod: &Pod) -> Self {
        DrainPod {
            key: format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                pod.metadata.name.as_deref().unwrap_or("")
            ),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            decision: decide(pod),
        }
    }
}

/// What became of one eviction request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// Accepted: the pod is terminating.
    Evicted,
    /// The pod was already gone (404).
    Gone,
    /// Refused or failed in a way worth retrying (429 from a PodDisruptionBudget, 5xx); the text
    /// says why (see [`refusal`]).
    Refused(String),
}

/// The drain's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStep {
    /// Evict this pod (by `namespace/name`) now.
    Evict(String),
    /// Nothing to do until something changes on the watch, or until this time (driver clock,
    /// milliseconds; `None`: only a change wakes us).
    WaitUntil(Option<i64>),
    /// Nothing evictable is left and every pod we evicted is gone.
    Done,
    Failed(FailureCause),
}

/// Backoff between eviction attempts of one pod.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tracked {
    /// uid of the pod we evicted under this key (a recreated pod has another uid).
    evicted_uid: Option<String>,
    attempts: u32,
    next_try_ms: Option<i64>,
    /// Why the last eviction was refused.
    blocked: Option<String>,
}

/// The drain of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drain {
    node: String,
    budget: Budget,
    tracked: BTreeMap<String, Tracked>,
}

impl Drain {
    pub fn new(node: &str, budget: Budget) -> Self {
        Drain {
            node: node.to_string(),
            budget,
            tracked: BTreeMap::new(),
        }
    }

    fn was_evicted(&self, p: &DrainPod) -> bool {
        self.tracked
            .get(&p.key)
            .and_then(|t| t.evicted_uid.as_ref())
            .is_some_and(|u| *u == p.uid)
    }

    /// Decides from the pods now on the node (`None` until the watch has listed them once).
    /// A cancelled run stops evicting at once.
    pub fn next(&self, pods: Option<&[DrainPod]>, now_ms: i64, cancel: bool) -> DrainStep {
        if cancel {
            return DrainStep::Failed(cancelled(format!(
                "the run was cancelled while draining {}; stopped evicting",
                self.node
            )));
        }
        let Some(pods) = pods else {
            if self.budget.is_over(now_ms) {
                return DrainStep::Failed(self.timeout(format!(
                    "could not list the pods on {} within {}s",
                    self.node,
                    self.budget.limit.as_secs()
                )));
            }
            return DrainStep::WaitUntil(self.budget.ends_at_ms());
        };
        let mut wake = self.budget.ends_at_ms();
        let mut due = None;
        let mut remaining = Vec::new();
        for p in pods {
            let evicted = self.was_evicted(p);
            if !evicted && p.decision == DrainDecision::Evict {
                match self.tracked.get(&p.key).and_then(|t| t.next_try_ms) {
                    Some(at) if at > now_ms => wake = Some(wake.map_or(at, |w| w.min(at))),
                    _ => {
                        due.get_or_insert(p.key.clone());
                    }
                }
            }
            if evicted || p.decision == DrainDecision::Evict {
                remaining.push(p);
            }
        }
        if remaining.is_empty() {
            return DrainStep::Done;
        }
        if self.budget.is_over(now_ms) {
            return DrainStep::Failed(self.timeout(format!(
                "drain of {} did not finish within {}s: {}",
                self.node,
                self.budget.limit.as_secs(),
                self.blocking_summary(&remaining)
            )));
        }
        if let Some(key) = due {
            return DrainStep::Evict(key);
        }
        DrainStep::WaitUntil(wake)
    }

    /// Records what an eviction of `pod` did. `unit` is a uniform draw from `[0, 1)` for the
    /// retry jitter. Returns the refusal text when it is new for this pod (worth an Event).
    pub fn record(
        &mut self,
        pod: &DrainPod,
        outcome: Eviction,
        now_ms: i64,
        unit: f64,
    ) -> Option<String> {
        let t = self.tracked.entry(pod.key.clone()).or_default();
        match outcome {
            Eviction::Evicted | Eviction::Gone => {
                t.evicted_uid = Some(pod.uid.clone());
                t.blocked = None;
                None
            }
            Eviction::Refused(why) => {
                let wait = jittered(t.attempts, RETRY_BASE, RETRY_CAP, unit);
                t.attempts = t.attempts.saturating_add(1);
                t.next_try_ms = Some(
                    now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
                );
                let new = t.blocked.as_deref() != Some(why.as_str());
                t.blocked = Some(why.clone());
                new.then_some(why)
            }
        }
    }

    fn timeout(&self, message: String) -> FailureCause {
        FailureCause {
            reason: "DrainTimeout".into(),
            message,
            exit_code: None,
        }
    }

    /// Which pods are still there and why (up to three named).
    fn blocking_summary(&self, remaining: &[&DrainPod]) -> String {
        let mut parts: Vec<String> = remaining
            .iter()
            .take(3)
            .map(|p| {
                let blocked = self.tracked.get(&p.key).and_then(|t| t.blocked.as_deref());
                match (blocked, self.was_evicted(p)) {
                    (Some(why), _) => format!("pod {} {why}", p.key),
                    (None, true) => format!("pod {} was evicted but is still terminating", p.key),
                    (None, false) => format!("pod {} not evicted yet", p.key),
                }
            })
            .collect();
        if remaining.len() > 3 {
            parts.push(format!("and {} more", remaining.len() - 3));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    fn dp(key: &str, uid: &str, decision: DrainDecision) -> DrainPod {
        DrainPod {
            key: key.into(),
            uid: uid.into(),
            decision,
        }
    }

    const LIMIT: Duration = Duration::from_secs(20);

    #[test]
    fn evicts_then_waits_for_the_pods_to_go() {
        let mut d = Drain::new("n1", Budget::new(0, LIMIT));
        let web = dp("a/web", "u1", DrainDecision::Evict);
        let ds = dp("kube-system/kd", "u2", DrainDecision::Skip("DaemonSet pod"));
        assert_eq!(d.next(None, 0, false), DrainStep::WaitUntil(Some(20_000)));
        let pods = vec![web.clone(), ds.clone()];
        assert_eq!(
            d.next(Some(&pods), 0, false),
            DrainStep::Evict("a/web".into())
        );
        assert_eq!(d.record(&web, Eviction::Evicted, 0, 0.5), None);
        // Evicted but still on the node: wait for the watch (or the budget).
        assert_eq!(
            d.next(Some(&pods), 1, false),
            DrainStep::WaitUntil(Some(20_000))
        );
        // Gone: drained (the DaemonSet pod stays).
        assert_eq!(
            d.next(Some(std::slice::from_ref(&ds)), 2, false),
            DrainStep::Done
        );
        // A pod recreated under the same name (another uid) is evicted again.
        let again = dp("a/web", "u3", DrainDecision::Evict);
        assert_eq!(
            d.next(Some(&[again, ds]), 3, false),
            DrainStep::Evict("a/web".into())
        );
    }

    #[test]
    fn a_blocking_budget_is_retried_with_backoff_and_named_at_the_timeout() {
        let mut d = Drain::new("n1", Budget::new(0, LIMIT));
        let web = dp("a/web", "u1", DrainDecision::Evict);
        let pods = vec![web.clone()];
        let why = refusal(
            "Cannot evict pod as it would violate the pod's disruption budget.",
            &["The disruption budget web-pdb needs 1 healthy pods and has 1 currently"],
        );
        assert_eq!(
            d.next(Some(&pods), 0, false),
            DrainStep::Evict("a/web".into())
        );
        assert_eq!(
            d.record(&web, Eviction::Refused(why.clone()), 0, 0.0),
            Some(why.clone())
        );
        // Half of the first ceiling (500 ms) with a zero draw.
        assert_eq!(
            d.next(Some(&pods), 10, false),
            DrainStep::WaitUntil(Some(250))
        );
        assert_eq!(
            d.next(Some(&pods), 250, false),
            DrainStep::Evict("a/web".into())
        );
        // The same refusal again is not news.
        assert_eq!(
            d.record(&web, Eviction::Refused(why.clone()), 250, 0.0),
            None
        );
        match d.next(Some(&pods), 20_000, false) {
            DrainStep::Failed(c) => {
                assert_eq!(c.reason, "DrainTimeout");
                assert!(
                    c.message
                        .contains("pod a/web blocked by PodDisruptionBudget web-pdb"),
                    "{}",
                    c.message
                );
                assert!(c.message.contains("within 20s"), "{}", c.message);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn cancel_stops_evicting_and_an_unlisted_node_times_out() {
        let d = Drain::new("n1", Budget::new(0, LIMIT));
        let pods = vec![dp("a/web", "u1", DrainDecision::Evict)];
        match d.next(Some(&pods), 0, true) {
            DrainStep::Failed(c) => assert_eq!(c.reason, crate::procedure::CANCELLED_REASON),
            s => panic!("{s:?}"),
        }
        match d.next(None, 20_000, false) {
            DrainStep::Failed(c) => assert!(c.message.contains("could not list"), "{}", c.message),
            s => panic!("{s:?}"),
        }
        // A budget of centuries never overflows.
        let huge = Drain::new("n1", Budget::new(0, Duration::from_secs(u64::MAX)));
        assert_eq!(
            huge.next(Some(&pods), i64::MAX, false),
            DrainStep::Evict("a/web".into())
        );
        assert_eq!(huge.next(Some(&[]), i64::MAX, false), DrainStep::Done);
        assert_eq!(huge.next(None, i64::MAX, false), DrainStep::WaitUntil(None));
    }

    #[test]
    fn summary_names_up_to_three_pods() {
        let mut d = Drain::new("n1", Budget::new(0, LIMIT));
        let pods: Vec<DrainPod> = ["a/web-1", "a/db-0", "b/job", "b/other"]
            .iter()
            .enumerate()
            .map(|(i, k)| dp(k, &i.to_string(), DrainDecision::Evict))
            .collect();
        d.record(
            &pods[0],
            Eviction::Refused("blocked by PodDisruptionBudget web-pdb: x".into()),
            0,
            0.0,
        );
        d.record(&pods[1], Eviction::Evicted, 0, 0.0);
        let refs: Vec<&DrainPod> = pods.iter().collect();
        let s = d.blocking_summary(&refs);
        assert!(
            s.contains("pod a/web-1 blocked by PodDisruptionBudget web-pdb"),
            "{s}"
        );
        assert!(
            s.contains("a/db-0 was evicted but is still terminating"),
            "{s}"
        );
        assert!(s.contains("b/job not evicted yet"), "{s}");
        assert!(s.ends_with("and 1 more"), "{s}");
    }

    #[test]
    fn refusals_name_the_budget() {
        let r = refusal(
            "Cannot evict pod as it would violate the pod's disruption budget.",
            &["The disruption budget web-pdb needs 1 healthy pods and has 1 currently"],
        );
        assert!(
            r.starts_with("blocked by PodDisruptionBudget web-pdb:"),
            "{r}"
        );
        assert_eq!(
            refusal("Too many requests", &[]),
            "eviction refused: Too many requests"
        );
    }

    proptest::proptest! {
        /// Whatever the pods and outcomes, the drain never asks to evict a pod it must skip,
        /// never evicts the same pod (uid) twice after it was accepted, and is done only when
        /// nothing evictable is left.
        #[test]
        fn never_evicts_skipped_or_already_evicted_pods(
            kinds in proptest::collection::vec(0u8..3, 0..6),
            outcomes in proptest::collection::vec(0u8..3, 0..30),
        ) {
            let pods: Vec<DrainPod> = kinds.iter().enumerate().map(|(i, k)| dp(
                &format!("ns/p{i}"), &format!("u{i}"),
                if *k == 0 { DrainDecision::Skip("DaemonSet pod") } else { DrainDecision::Evict },
            )).collect();
            let mut d = Drain::new("n", Budget::new(0, LIMIT));
            let mut accepted = std::collections::BTreeSet::new();
            let mut now = 0i64;
            for o in outcomes {
                match d.next(Some(&pods), now, false) {
                    DrainStep::Evict(k) => {
                        let p = pods.iter().find(|p| p.key == k).unwrap();
                        proptest::prop_assert_eq!(&p.decision, &DrainDecision::Evict);
                        proptest::prop_assert!(!accepted.contains(&p.uid));
                        let outcome = match o { 0 => Eviction::Evicted, 1 => Eviction::Gone, _ => Eviction::Refused("x".into()) };
                        if o < 2 { accepted.insert(p.uid.clone()); }
                        d.record(p, outcome, now, 0.5);
                    }
                    DrainStep::WaitUntil(Some(at)) => now = at.max(now + 1),
                    DrainStep::WaitUntil(None) => break,
                    DrainStep::Done => {
                        proptest::prop_assert!(pods.iter().all(|p| p.decision != DrainDecision::Evict));
                        break;
                    }
                    DrainStep::Failed(c) => { proptest::prop_assert_eq!(c.reason, "DrainTimeout"); break; }
                }
            }
        }
    }

    fn owned(kind: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    kind: kind.into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        assert_eq!(
            decide(&owned("DaemonSet")),
            DrainDecision::Skip("DaemonSet pod")
        );
        assert_eq!(decide(&owned("ReplicaSet")), DrainDecision::Evict);
        assert_eq!(decide(&Pod::default()), DrainDecision::Evict);
        let mut mirror = Pod::default();
        mirror.metadata.annotations =
            Some([(MIRROR_POD_ANNOTATION.to_string(), "x".to_string())].into());
        assert_eq!(decide(&mirror), DrainDecision::Skip("mirror pod"));
        let mut gone = owned("ReplicaSet");
        gone.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(decide(&gone), DrainDecision::Skip("already terminating"));
    }

    #[test]
    fn budget_names_from_eviction_refusals() {
        let cases = [
            (
                "The disruption budget web-pdb needs 2 healthy pods and has 2 currently",
                Some("web-pdb"),
            ),
            (
                "Cannot evict pod as it would violate the pod's disruption budget.",
                None,
            ),
            ("too many requests", None),
        ];
        for (msg, want) in cases {
            assert_eq!(blocking_budget(msg).as_deref(), want, "{msg}");
        }
    }
}
