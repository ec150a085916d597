//! The coordinator's Prometheus metrics. The run gauges are a projection of the run record the
//! machine decided (`observe_run`, called by the driver after each reconcile); the helm and
//! Lease counters are bumped where the driver performs those effects.
use klm_kube::metrics::{Registry, slow_buckets};
use klm_protocol::grant_gate::HoldReason;
use klm_protocol::run::RunRecord;
use klm_protocol::{NodeStatus, RunPhase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

/// A helm invocation, by what it does.
#[derive(Debug, Clone, Copy)]
pub enum HelmOp {
    /// `helm upgrade` of the run.
    Upgrade,
    /// `helm rollback` (or the re-upgrade that restores the recorded chart).
    Rollback,
    /// Reading the release (`helm status`/`history`).
    Status,
}

impl HelmOp {
    fn as_str(self) -> &'static str {
        match self {
            HelmOp::Upgrade => "upgrade",
            HelmOp::Rollback => "rollback",
            HelmOp::Status => "status",
        }
    }
}

/// What happened to the upgrade Lease, as the coordinator sees it.
#[derive(Debug, Clone, Copy)]
pub enum LeaseEvent {
    /// A node was given its turn (and so may take the Lease).
    Granted,
    /// A node was declared lost (its agent stopped renewing the Lease).
    Lost,
    /// The Lease was taken back from a lost node's process.
    Revoked,
}

impl LeaseEvent {
    fn as_str(self) -> &'static str {
        match self {
            LeaseEvent::Granted => "granted",
            LeaseEvent::Lost => "lost",
            LeaseEvent::Revoked => "revoked",
        }
    }
}

const PHASES: [RunPhase; 7] = [
    RunPhase::Pending,
    RunPhase::Upgrading,
    RunPhase::Running,
    RunPhase::RollingBack,
    RunPhase::Succeeded,
    RunPhase::Failed,
    RunPhase::Cancelled,
];
/// `klm_run_nodes` status of a planned node that has not had its turn yet.
const NOT_STARTED: &str = "pending";

#[derive(Clone)]
pub struct Metrics {
    run_phase: Family<PhaseLabel, Gauge>,
    run_nodes: Family<StatusLabel, Gauge>,
    run_paused: Gauge,
    run_held: Family<ReasonLabel, Gauge>,
    last_result: Family<ResultLabel, Gauge>,
    last_finished: Gauge<f64, AtomicU64>,
    helm_duration: Family<OpLabel, Histogram>,
    helm_failures: Family<OpLabel, Counter>,
    lease_events: Family<EventLabel, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            run_phase: Family::default(),
            run_nodes: Family::default(),
            run_paused: Gauge::default(),
            run_held: Family::default(),
            last_result: Family::default(),
            last_finished: Gauge::default(),
            helm_duration: Family::new_with_constructor(|| Histogram::new(slow_buckets())),
            helm_failures: Family::default(),
            lease_events: Family::default(),
        };
        registry.register(
            "klm_run_phase",
            "1 for the phase of the current (or last) run, 0 for the others.",
            m.run_phase.clone(),
        );
        registry.register(
            "klm_run_nodes",
            "Nodes of the current (or last) run by status (pending: not started yet).",
            m.run_nodes.clone(),
        );
        registry.register(
            "klm_run_paused",
            "1 while the run is paused (action=pause).",
            m.run_paused.clone(),
        );
        registry.register(
            "klm_run_held",
            "1 while the grant gate holds the run, by reason (maintenance_window, blocking_pod, prometheus_alert).",
            m.run_held.clone(),
        );
        registry.register(
            "klm_run_last_result",
            "1 for the result of the last finished run, 0 for the other results.",
            m.last_result.clone(),
        );
        registry.register(
            "klm_run_last_finished_timestamp_seconds",
            "When the last finished run finished (Unix seconds).",
            m.last_finished.clone(),
        );
        registry.register(
            "klm_helm_call_duration_seconds",
            "Duration of helm calls by operation.",
            m.helm_duration.clone(),
        );
        registry.register(
            "klm_helm_call_failures",
            "Helm calls that failed, by operation.",
            m.helm_failures.clone(),
        );
        registry.register(
            "klm_lease_events",
            "Upgrade Lease events: turns granted, nodes declared lost, Leases taken back.",
            m.lease_events.clone(),
        );
        m
    }

    /// Sets the run gauges from the run record (None: no run yet).
    pub fn observe_run(&self, run: Option<&RunRecord>) {
        let Some(run) = run else {
            return;
        };
        for p in PHASES {
            self.run_phase
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .set(i64::from(p == run.phase));
        }
        let mut counts: Vec<(&'static str, i64)> = NodeStatus::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .chain([(NOT_STARTED, 0)])
            .collect();
        for name in run.plan.iter() {
            let status = run
                .nodes
                .get(name)
                .and_then(|r| r.status)
                .map_or(NOT_STARTED, NodeStatus::as_str);
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == status) {
                c.1 += 1;
            }
        }
        for (status, n) in counts {
            self.run_nodes.get_or_create(&StatusLabel { status }).set(n);
        }
        self.run_paused.set(i64::from(run.paused));
        let held = run.hold.as_ref().filter(|_| !run.phase.is_finished());
        for reason in HoldReason::ALL {
            self.run_held
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .set(i64::from(held.is_some_and(|h| h.reason == reason)));
        }
        if run.phase.is_finished() {
            for p in PHASES.iter().filter(|p| p.is_finished()) {
                self.last_result
                    .get_or_create(&ResultLabel { result: p.as_str() })
                    .set(i64::from(*p == run.phase));
            }
            if let Some(ms) = run.finished_at_ms {
                self.last_finished.set(ms as f64 / 1000.0);
            }
        }
    }

    /// Records one helm call.
    pub fn helm_call<T, E>(&self, op: HelmOp, took: Duration, result: &Result<T, E>) {
        let label = OpLabel { op: op.as_str() };
        self.helm_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if result.is_err() {
            self.helm_failures.get_or_create(&label).inc();
        }
    }

    pub fn lease_event(&self, event: LeaseEvent) {
        self.lease_events
            .get_or_create(&EventLabel {
                event: event.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_kube::metrics::render;
    use klm_protocol::run::NodeReport;

    fn run(phase: RunPhase, statuses: &[Option<NodeStatus>]) -> RunRecord {
        let mut r = RunRecord::new("r1".into(), "t".into(), "3.29.0".into(), 1_000);
        r.phase = phase;
        for (i, s) in statuses.iter().enumerate() {
            let name = format!("n{i}");
            r.plan.push(name.clone());
            r.nodes.insert(
                name,
                NodeReport {
                    status: *s,
                    ..Default::default()
                },
            );
        }
        r
    }

    #[test]
    fn run_gauges_follow_the_record() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.observe_run(Some(&run(
            RunPhase::Running,
            &[
                Some(NodeStatus::Completed),
                Some(NodeStatus::Draining),
                None,
            ],
        )));
        let text = render(&reg);
        for line in [
            "klm_run_phase{phase=\"Running\"} 1",
            "klm_run_phase{phase=\"Pending\"} 0",
            "klm_run_nodes{status=\"completed\"} 1",
            "klm_run_nodes{status=\"draining\"} 1",
            "klm_run_nodes{status=\"pending\"} 1",
            "klm_run_nodes{status=\"failed\"} 0",
            "klm_run_paused 0",
            "klm_run_held{reason=\"maintenance_window\"} 0",
            "klm_run_held{reason=\"blocking_pod\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("klm_run_last_result{"), "{text}");

        let mut done = run(
            RunPhase::Failed,
            &[Some(NodeStatus::RolledBack), Some(NodeStatus::Failed)],
        );
        done.finished_at_ms = Some(1_700_000_000_500);
        m.observe_run(Some(&done));
        let text = render(&reg);
        for line in [
            "klm_run_last_result{result=\"Failed\"} 1",
            "klm_run_last_result{result=\"Succeeded\"} 0",
            "klm_run_last_finished_timestamp_seconds 1700000000.5",
            "klm_run_nodes{status=\"failed\"} 1",
            "klm_run_nodes{status=\"completed\"} 0",
            "klm_run_nodes{status=\"pending\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn the_held_gauge_names_the_reason_of_the_hold() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let mut held = run(RunPhase::Running, &[Some(NodeStatus::Completed), None]);
        held.hold = Some(klm_protocol::grant_gate::Hold {
            reason: HoldReason::BlockingPod,
            until_ms: None,
            node: Some("n1".into()),
            blocking_pods: vec!["ops/backup".into()],
            firing_alerts: vec![],
            message: String::new(),
        });
        m.observe_run(Some(&held));
        let text = render(&reg);
        assert!(
            text.contains("klm_run_held{reason=\"blocking_pod\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("klm_run_held{reason=\"maintenance_window\"} 0"),
            "{text}"
        );
        held.hold = None;
        m.observe_run(Some(&held));
        assert!(render(&reg).contains("klm_run_held{reason=\"blocking_pod\"} 0"));
    }

    #[test]
    fn helm_calls_and_lease_events_count() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.helm_call::<(), ()>(HelmOp::Upgrade, Duration::from_secs(2), &Ok(()));
        m.helm_call::<(), ()>(HelmOp::Rollback, Duration::from_secs(1), &Err(()));
        m.lease_event(LeaseEvent::Granted);
        m.lease_event(LeaseEvent::Granted);
        let text = render(&reg);
        for line in [
            "klm_helm_call_duration_seconds_count{op=\"upgrade\"} 1",
            "klm_helm_call_duration_seconds_sum{op=\"upgrade\"} 2.0",
            "klm_helm_call_failures_total{op=\"rollback\"} 1",
            "klm_lease_events_total{event=\"granted\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("klm_helm_call_failures_total{op=\"upgrade\"}"));
    }
}
