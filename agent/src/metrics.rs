//! The agent's Prometheus metrics, bumped where the steps run (`steps::execute`) and where the
//! upgrade Lease is taken or lost (`runner`). Served on `/metrics` by `klm_kube::health`.
use klm_kube::metrics::{Registry, slow_buckets};
use klm_protocol::NodeStatus;
use klm_protocol::procedure::CANCELLED_REASON;
use klm_protocol::verification::{FATAL_WAITING_REASONS, FailureCause};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// `klm_verification_outcomes_total` result of a verification that passed.
pub const SUCCESS: &str = "success";
/// Failure reasons outside the known set (a pod's own `status.reason` can be anything).
const OTHER: &str = "Other";

/// The failure reasons a verification can end with (`klm_protocol::verification::judge` and
/// the verify step): the label's bounded set. Anything else is counted as `Other`.
const KNOWN_REASONS: [&str; 7] = [
    "NonZeroExit",
    "PodFailed",
    "Timeout",
    "VerificationPodDeleted",
    "InvalidVerificationPod",
    "VerificationPodRejected",
    CANCELLED_REASON,
];

fn bounded_reason(reason: &str) -> &'static str {
    KNOWN_REASONS
        .iter()
        .chain(FATAL_WAITING_REASONS.iter())
        .find(|r| **r == reason)
        .copied()
        .unwrap_or(OTHER)
}

/// The histogram's `step` label for the statuses that do timed work; the bookkeeping statuses
/// (preparing, completed, rolled-back…) take one Node write and are not measured.
pub fn step_label(status: NodeStatus) -> Option<&'static str> {
    match status {
        NodeStatus::Cordoned => Some("cordon"),
        NodeStatus::Draining => Some("drain"),
        NodeStatus::Upgrading => Some("upgrade"),
        NodeStatus::Verifying => Some("verify"),
        // A restore turn's restart of kata-deploy at the recorded revision.
        NodeStatus::RollingBack => Some("restore"),
        _ => None,
    }
}

#[derive(Clone)]
pub struct Metrics {
    step_duration: Family<StepLabel, Histogram>,
    verification: Family<ResultLabel, Counter>,
    lease_holds: Counter,
    lease_lost: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            step_duration: Family::new_with_constructor(|| Histogram::new(slow_buckets())),
            verification: Family::default(),
            lease_holds: Counter::default(),
            lease_lost: Counter::default(),
        };
        registry.register(
            "klm_node_step_duration_seconds",
            "Duration of the steps of this node's turns that ran to an end (success or failure).",
            m.step_duration.clone(),
        );
        registry.register(
            "klm_verification_outcomes",
            "Verifications on this node by result: success, or the failure reason.",
            m.verification.clone(),
        );
        registry.register(
            "klm_lease_holds",
            "Times this agent took the upgrade Lease (a turn, or retaken after a lapse).",
            m.lease_holds.clone(),
        );
        registry.register(
            "klm_lease_lost",
            "Times this agent's hold on the upgrade Lease lapsed or was taken mid-turn.",
            m.lease_lost.clone(),
        );
        m
    }

    pub fn step(&self, step: &'static str, took: Duration) {
        self.step_duration
            .get_or_create(&StepLabel { step })
            .observe(took.as_secs_f64());
    }

    /// One verification's outcome: `None` for success, the failure otherwise.
    pub fn verification(&self, failure: Option<&FailureCause>) {
        let result = failure.map_or(SUCCESS, |f| bounded_reason(&f.reason));
        self.verification
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn lease_held(&self) {
        self.lease_holds.inc();
    }

    pub fn lease_lost(&self) {
        self.lease_lost.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_kube::metrics::render;

    fn cause(reason: &str) -> FailureCause {
        FailureCause {
            reason: reason.into(),
            message: String::new(),
            exit_code: None,
        }
    }

    #[test]
    fn outcomes_keep_a_bounded_label_set() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.verification(None);
        m.verification(Some(&cause("NonZeroExit")));
        m.verification(Some(&cause("ImagePullBackOff")));
        m.verification(Some(&cause("Evicted")));
        m.verification(Some(&cause("SomethingNew")));
        let text = render(&reg);
        for line in [
            "klm_verification_outcomes_total{result=\"success\"} 1",
            "klm_verification_outcomes_total{result=\"NonZeroExit\"} 1",
            "klm_verification_outcomes_total{result=\"ImagePullBackOff\"} 1",
            "klm_verification_outcomes_total{result=\"Other\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("Evicted"), "{text}");
    }

    #[test]
    fn steps_and_lease_counts() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.step("drain", Duration::from_millis(1500));
        m.lease_held();
        m.lease_held();
        m.lease_lost();
        let text = render(&reg);
        for line in [
            "klm_node_step_duration_seconds_count{step=\"drain\"} 1",
            "klm_node_step_duration_seconds_sum{step=\"drain\"} 1.5",
            "klm_lease_holds_total 2",
            "klm_lease_lost_total 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert_eq!(step_label(NodeStatus::Preparing), None);
        assert_eq!(step_label(NodeStatus::Verifying), Some("verify"));
    }
}
