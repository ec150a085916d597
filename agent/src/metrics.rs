//! The agent's Prometheus metrics, bumped where the steps run (`steps::execute`), where the
//! upgrade Lease is taken or lost (`runner`) and where the API client answers (`main`'s client
//! layer). Served on `/metrics` by `klm_kube::health`.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The `klm_api_errors_total` kind of an API answer (`None`: no response at all), or `None`
/// when it is not an error. Only failures count: a 404 (`get_opt`), a 409 (a lost update
/// race) or a 410 (an expired watch) are answers the agent's code expects and acts on.
pub fn api_error_kind(status: Option<u16>) -> Option<&'static str> {
    match status {
        None => Some("transport"),
        Some(401 | 403) => Some("denied"),
        Some(429) => Some("throttled"),
        Some(s) if s >= 500 => Some("server"),
        Some(_) => None,
    }
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
    lease_takeovers: Counter,
    api_errors: Family<KindLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            step_duration: Family::new_with_constructor(|| Histogram::new(slow_buckets())),
            verification: Family::default(),
            lease_holds: Counter::default(),
            lease_lost: Counter::default(),
            lease_takeovers: Counter::default(),
            api_errors: Family::default(),
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
        registry.register(
            "klm_lease_takeovers",
            "Times this agent took the upgrade Lease over from another process whose hold had expired.",
            m.lease_takeovers.clone(),
        );
        registry.register(
            "klm_api_errors",
            "API requests of this agent that failed, by kind: transport (no answer), denied (401/403), throttled (429), server (5xx).",
            m.api_errors.clone(),
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

    /// The Lease was just taken: a hold, and a takeover when it replaced another process's
    /// expired hold (`HeldLease::taken_over_from`).
    pub fn lease_taken(&self, taken_over_from: Option<&str>) {
        self.lease_holds.inc();
        if taken_over_from.is_some() {
            self.lease_takeovers.inc();
        }
    }

    /// One API answer (`None`: the request got no response): counted when it is a failure.
    pub fn api_response(&self, status: Option<u16>) {
        if let Some(kind) = api_error_kind(status) {
            self.api_errors.get_or_create(&KindLabel { kind }).inc();
        }
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

    #[test]
    fn takeovers_and_api_errors_count() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.lease_taken(None);
        m.lease_taken(Some("node-1/previous-process"));
        for status in [
            Some(200),
            Some(404),
            Some(409),
            Some(410),
            None,
            Some(403),
            Some(503),
            Some(500),
            Some(429),
        ] {
            m.api_response(status);
        }
        let text = render(&reg);
        for line in [
            "klm_lease_holds_total 2",
            "klm_lease_takeovers_total 1",
            "klm_api_errors_total{kind=\"transport\"} 1",
            "klm_api_errors_total{kind=\"denied\"} 1",
            "klm_api_errors_total{kind=\"server\"} 2",
            "klm_api_errors_total{kind=\"throttled\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert_eq!(text.matches("klm_api_errors_total{").count(), 4, "{text}");
    }
}
