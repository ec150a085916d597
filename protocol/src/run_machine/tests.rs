//! Scenario tests of the run machine: one per decision that used to live in the driver.
use super::release::{
    DaemonSetObservation, KATA_DEPLOY_CHART, ReleaseObservation, ReleaseRead, ReleaseStatus,
};
use super::*;
use crate::keys::node::WINDOW_LABEL;

use crate::params::tests::defaults;

/// Issue 9: the coordinator's wall clock stepping mid-turn.
mod clock;
/// The grant gate (maintenance window, blocking pods) in the run machine.
mod gates;
/// Job mode: a scoped upgrade that changed nothing fails its node at once.
mod job_mode;

pub(super) fn config() -> Config {
    Config {
        timing: Timing {
            turn_start_timeout_ms: 60_000,
            expiry_grace_ms: 10_000,
        },
        defaults: defaults(),
        rollback_retry: RetryPolicy {
            attempts: 3,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(60),
        },
        seed: 1,
        issuer: "kube-system/kata-lifecycle-manager".into(),
    }
}

/// A hand-driven coordinator: feed inputs, look at effects.
struct H {
    m: Machine,
    /// The coordinator's monotonic clock (and its wall clock, but for `wall_offset`).
    now: i64,
    /// How far the wall clock was stepped away from the monotonic one.
    wall_offset: i64,
    annotations: BTreeMap<String, String>,
    data: BTreeMap<String, String>,
    rv: u64,
    fx: Vec<Effect>,
    requests: u64,
}

fn found(revision: u32, version: &str, status: &str) -> Input {
    Input::Release(ReleaseRead::Found(ReleaseObservation {
        chart: KATA_DEPLOY_CHART.into(),
        version: version.into(),
        revision,
        status: ReleaseStatus::parse(status),
        deployment_mode: None,
    }))
}

fn ds() -> Input {
    Input::DaemonSet(Ok(DaemonSetObservation {
        hash: "h".into(),
        on_delete: true,
    }))
}

fn node(name: &str) -> (String, NodeSnapshot) {
    (
        name.to_string(),
        NodeSnapshot {
            facts: NodeFacts {
                name: name.into(),
                labels: [(WINDOW_LABEL.to_string(), "true".to_string())].into(),
                taints: vec![],
            },
            observed: ObservedNode {
                exists: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
}

impl H {
    fn new(nodes: &[&str]) -> Self {
        Self::with_data(nodes, BTreeMap::new())
    }

    fn with_data(nodes: &[&str], data: BTreeMap<String, String>) -> Self {
        let mut h = H {
            m: Machine::new(config()),
            now: 1_000_000,
            wall_offset: 0,
            annotations: BTreeMap::new(),
            data,
            rv: 1,
            fx: Vec::new(),
            requests: 0,
        };
        h.feed(Input::NodesListed(nodes.iter().map(|n| node(n)).collect()));
        h.feed(Input::Lease(Some(LeaseView {
            duration_seconds: 30,
            ..Default::default()
        })));
        h.trigger();
        h
    }

    fn feed(&mut self, input: Input) -> Vec<Effect> {
        self.requests += 3;
        let fx = self.m.step(
            input,
            Env {
                now_ms: self.now + self.wall_offset,
                mono_ms: self.now,
                api_requests: self.requests,
            },
        );
        for e in &fx {
            match e {
                Effect::Persist(d) => {
                    self.data.extend(d.clone());
                    self.rv += 1;
                }
                Effect::RemoveAnnotation(k) => {
                    self.annotations.remove(*k);
                    self.rv += 1;
                }
                _ => {}
            }
        }
        self.fx.extend(fx.clone());
        fx
    }

    fn trigger(&mut self) -> Vec<Effect> {
        let view = TriggerView {
            resource_version: Some(self.rv.to_string()),
            annotations: self.annotations.clone(),
            data: self.data.clone(),
        };
        self.feed(Input::Trigger(Some(view)))
    }

    fn annotate(&mut self, k: &str, v: &str) -> Vec<Effect> {
        self.annotations.insert(k.into(), v.into());
        self.rv += 1;
        self.trigger()
    }

    fn run(&self) -> RunRecord {
        self.m.run().cloned().expect("run")
    }

    fn count(&self, f: impl Fn(&Effect) -> bool) -> usize {
        self.fx.iter().filter(|e| f(e)).count()
    }

    fn has_event(&self, reason: &str) -> bool {
        self.fx
            .iter()
            .any(|e| matches!(e, Effect::Event { reason: r, .. } if *r == reason))
    }

    /// Trigger → prepare → upgrade → Running with the first turn granted.
    fn to_running(nodes: &[&str]) -> Self {
        let mut h = H::new(nodes);
        h.annotate(trigger::TARGET_VERSION, "3.28.0");
        h.feed(found(3, "3.27.0", "deployed"));
        h.feed(ds());
        h.feed(found(3, "3.27.0", "deployed"));
        h.feed(Input::HelmFinished(Ok(())));
        h.feed(found(4, "3.28.0", "deployed"));
        h.feed(ds());
        assert_eq!(h.run().phase, RunPhase::Running, "{}", h.run().message);
        h
    }
}

#[test]
fn a_trigger_runs_prepare_then_exactly_one_upgrade_persisted_before_helm() {
    let mut h = H::new(&["n1", "n2"]);
    let fx = h.annotate(trigger::TARGET_VERSION, "3.28.0");
    // The Pending run is on record before helm is asked anything (a coordinator that dies
    // while helm answers leaves a visible run, picked up by the next leader).
    let persist = fx
        .iter()
        .position(|e| matches!(e, Effect::Persist(d) if d[keys::RUN].contains("Pending")))
        .expect("the pending run persisted");
    let read = fx
        .iter()
        .position(|e| {
            *e == Effect::ReadRelease {
                release: "kata-deploy".into(),
                namespace: "kube-system".into(),
                mode: true,
            }
        })
        .expect("the release read");
    assert!(persist < read, "{fx:?}");
    assert_eq!(h.run().phase, RunPhase::Pending);
    let fx = h.feed(found(3, "3.27.0", "deployed"));
    assert!(fx.contains(&Effect::ReadDaemonSet {
        namespace: "kube-system".into()
    }));
    assert_eq!(h.run().plan, ["n1", "n2"]);
    h.feed(ds());
    let fx = h.feed(found(3, "3.27.0", "deployed"));
    // The record says "upgrade issued" before helm runs.
    let persist = fx
        .iter()
        .position(|e| matches!(e, Effect::Persist(d) if d[keys::RUN].contains("upgradeIssued")))
        .expect("persisted");
    let helm = fx
        .iter()
        .position(|e| matches!(e, Effect::HelmUpgrade { .. }))
        .expect("helm");
    assert!(persist < helm, "{fx:?}");
    h.feed(Input::HelmFinished(Ok(())));
    // The revision comes from the release history, not `recorded + 1`.
    h.feed(found(7, "3.28.0", "deployed"));
    h.feed(ds());
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Running);
    assert_eq!(r.release.as_ref().unwrap().upgraded_revision, Some(7));
    assert_eq!(r.turn.as_ref().unwrap().node, "n1");
    assert!(h.has_event("RunStarted") && h.has_event("TurnGranted"));
    assert_eq!(h.count(|e| matches!(e, Effect::HelmUpgrade { .. })), 1);
}

#[test]
fn prepare_refuses_or_finishes_without_touching_anything() {
    let cases: [(Input, &[&str], RunPhase, &str); 5] = [
        (
            found(3, "3.27.0", "pending-upgrade"),
            &["n1"],
            RunPhase::Failed,
            "not deployed",
        ),
        (
            found(3, "3.28.0", "deployed"),
            &["n1"],
            RunPhase::Succeeded,
            "already at 3.28.0",
        ),
        (
            found(3, "3.27.0", "deployed"),
            &[],
            RunPhase::Succeeded,
            "no nodes selected",
        ),
        (
            Input::Release(ReleaseRead::NotFound),
            &["n1"],
            RunPhase::Failed,
            "not found",
        ),
        (
            Input::Release(ReleaseRead::Found(ReleaseObservation {
                chart: "platform".into(),
                version: "1.0.0".into(),
                revision: 3,
                status: ReleaseStatus::Deployed,
                deployment_mode: None,
            })),
            &["n1"],
            RunPhase::Failed,
            "not \"kata-deploy\"",
        ),
    ];
    for (release, nodes, phase, needle) in cases {
        let mut h = H::new(nodes);
        h.annotate(trigger::TARGET_VERSION, "3.28.0");
        h.feed(release);
        let r = h.run();
        assert_eq!(r.phase, phase, "{needle}: {}", r.message);
        assert!(r.message.contains(needle), "{needle}: {}", r.message);
        assert_eq!(
            h.count(|e| matches!(e, Effect::HelmUpgrade { .. } | Effect::ReadDaemonSet { .. })),
            0
        );
        assert!(
            r.coordinator_api_requests.is_some(),
            "counted when finished"
        );
    }
}

#[test]
fn bad_input_is_rejected_and_typos_are_warned_about() {
    let mut h = H::new(&["n1"]);
    h.annotations.insert(
        "lifecycle.katacontainers.io/drain-enable".into(),
        "true".into(),
    );
    h.annotate(trigger::TARGET_VERSION, "latest");
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(
        r.message.contains("invalid input, nothing was changed"),
        "{}",
        r.message
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("drain-enable")),
        "{:?}",
        r.warnings
    );
    assert!(h.has_event("RunRejected") && h.has_event("UnknownAnnotation"));
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
}

#[test]
fn cancel_is_persisted_before_its_annotation_is_removed() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.annotations
        .insert(trigger::ACTION.into(), trigger::ACTION_CANCEL.into());
    h.rv += 1;
    let acted_on = TriggerView {
        resource_version: Some(h.rv.to_string()),
        annotations: h.annotations.clone(),
        data: h.data.clone(),
    };
    let fx = h.feed(Input::Trigger(Some(acted_on.clone())));
    let persisted = fx
        .iter()
        .position(|e| matches!(e, Effect::Persist(d) if d[keys::RUN].contains("cancelRequested")))
        .expect("cancel persisted");
    let removed = fx
        .iter()
        .position(|e| *e == Effect::RemoveAnnotation(trigger::ACTION))
        .expect("annotation removed");
    assert!(persisted < removed, "{fx:?}");
    // The same view delivered again (our removal not yet visible) is not acted on twice.
    let fx = h.feed(Input::Trigger(Some(acted_on)));
    assert!(
        !fx.contains(&Effect::RemoveAnnotation(trigger::ACTION)),
        "{fx:?}"
    );
    // Pending: nothing was changed, so the run ends at once, without helm.
    h.feed(found(3, "3.27.0", "deployed"));
    assert_eq!(h.run().phase, RunPhase::Cancelled);
    assert_eq!(h.count(|e| matches!(e, Effect::HelmUpgrade { .. })), 0);
}

#[test]
fn a_refused_manual_rollback_can_be_requested_again() {
    let mut h = H::to_running(&["n1"]);
    // Refused while the run is in progress: consumed, so the same request can come back.
    let fx = h.annotate(trigger::ROLLBACK_NODE, "n1");
    assert!(
        fx.contains(&Effect::RemoveAnnotation(trigger::ROLLBACK_NODE)),
        "{fx:?}"
    );
    assert!(h.has_event("RollbackIgnored"));
    h.trigger(); // the removal shows up
    // Finish the upgrade.
    let id = h.run().id;
    h.feed(Input::Node {
        name: "n1".into(),
        node: Some(NodeSnapshot {
            observed: ObservedNode {
                exists: true,
                status: Some(NodeStatus::Completed),
                run_id: Some(id),
                turn: Some(crate::TurnKind::Upgrade),
                ..Default::default()
            },
            ..node("n1").1
        }),
        direct: false,
    });
    assert_eq!(h.run().phase, RunPhase::Succeeded);
    h.annotate(trigger::ROLLBACK_NODE, "n1");
    let r = h.run();
    assert_eq!(r.kind, RunKind::ManualRollback, "{}", r.message);
    assert_eq!(r.phase, RunPhase::RollingBack);
}

#[test]
fn a_new_leader_finding_the_upgrade_pending_rolls_back_never_upgrades_again() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(ds());
    h.feed(found(3, "3.27.0", "deployed"));
    assert_eq!(h.count(|e| matches!(e, Effect::HelmUpgrade { .. })), 1);
    // The coordinator (and helm with it) is killed; the release is left pending-upgrade.
    let mut h2 = H::with_data(&["n1"], h.data.clone());
    h2.annotations = h.annotations.clone();
    h2.trigger();
    h2.feed(found(4, "3.28.0", "pending-upgrade"));
    assert_eq!(h2.run().phase, RunPhase::RollingBack);
    let fx = h2.feed(Input::Tick);
    assert!(fx.is_empty() || !fx.iter().any(|e| matches!(e, Effect::HelmUpgrade { .. })));
    h2.feed(found(4, "3.28.0", "pending-upgrade"));
    assert!(h2.fx.contains(&Effect::HelmRollback {
        release: "kata-deploy".into(),
        namespace: "kube-system".into(),
        revision: 3,
        version: "3.27.0".into(),
        clear_pending: Some(3),
    }));
    h2.feed(Input::HelmFinished(Ok(())));
    h2.feed(ds());
    let r = h2.run();
    assert_eq!(r.phase, RunPhase::Failed, "{}", r.message);
    assert!(r.message.contains("interrupted"), "{}", r.message);
    assert_eq!(h2.count(|e| matches!(e, Effect::HelmUpgrade { .. })), 0);
}

#[test]
fn an_upgrade_issued_that_never_changed_the_release_is_not_issued_again() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(ds());
    h.feed(found(3, "3.27.0", "deployed"));
    let mut h2 = H::with_data(&["n1"], h.data.clone());
    h2.annotations = h.annotations.clone();
    h2.trigger();
    h2.feed(found(3, "3.27.0", "deployed"));
    let r = h2.run();
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(r.message.contains("nothing was changed"), "{}", r.message);
    assert_eq!(h2.count(|e| matches!(e, Effect::HelmUpgrade { .. })), 0);
}

#[test]
fn a_failing_rollback_is_retried_then_says_what_a_human_must_do() {
    let mut h = H::to_running(&["n1", "n2"]);
    let id = h.run().id;
    let mut snap = node("n1").1;
    snap.observed = ObservedNode {
        exists: true,
        status: Some(NodeStatus::RollingBack),
        run_id: Some(id),
        turn: Some(crate::TurnKind::Upgrade),
        ..Default::default()
    };
    h.feed(watched("n1", snap));
    assert_eq!(h.run().phase, RunPhase::RollingBack);
    let mut waits = Vec::new();
    for attempt in 1..=3 {
        h.feed(found(4, "3.28.0", "deployed"));
        let fx = h.feed(Input::HelmFinished(Err(
            "another operation is in progress".into()
        )));
        if attempt < 3 {
            let wake = fx.iter().find_map(|e| match e {
                Effect::WakeAt(w) if w.reason == WakeReason::RetryRollback => Some(w.at_ms),
                _ => None,
            });
            let at = wake.expect("a retry is scheduled");
            waits.push(at - h.now);
            // Nothing happens before the retry time.
            let fx = h.feed(Input::Tick);
            assert!(
                !fx.iter()
                    .any(|e| matches!(e, Effect::ReadRelease { .. } | Effect::HelmRollback { .. }))
            );
            h.now = at;
            h.feed(Input::Tick);
        }
    }
    assert!(waits[1] > waits[0], "backoff grows: {waits:?}");
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(r.message.contains("A human must"), "{}", r.message);
    assert!(
        r.message
            .contains("helm rollback kata-deploy 3 -n kube-system"),
        "{}",
        r.message
    );
    assert!(r.message.contains("n1 (rolling-back)"), "{}", r.message);
    assert!(h.has_event("NodeNeedsAttention"));
}

#[test]
fn an_unreadable_record_pauses_until_it_is_readable() {
    let mut data = BTreeMap::new();
    data.insert(keys::RUN.to_string(), "{not json".to_string());
    let mut h = H::with_data(&["n1"], data);
    assert!(h.has_event("RunRecordUnreadable"));
    let notice = h.data.get(keys::NOTICE).cloned().unwrap_or_default();
    assert!(notice.contains("paused"), "{notice}");
    assert_eq!(h.data[keys::RUN], "{not json", "never overwritten");
    // While paused, triggers are not acted on.
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    assert!(h.m.run().is_none());
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
    // Removing the key resumes (the human abandoned that run).
    h.data.remove(keys::RUN);
    h.trigger();
    assert!(h.has_event("RunRecordReadable"));
    assert!(h.m.run().is_some(), "the trigger is acted on once resumed");
}

#[test]
fn a_deleted_lease_is_recreated_and_a_deleted_trigger_rewritten() {
    let mut h = H::to_running(&["n1"]);
    let fx = h.feed(Input::Lease(None));
    assert_eq!(fx.iter().filter(|e| **e == Effect::EnsureLease).count(), 1);
    let fx = h.feed(Input::Lease(None));
    assert!(
        !fx.contains(&Effect::EnsureLease),
        "asked once per disappearance"
    );
    let fx = h.feed(Input::Trigger(None));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Persist(d) if d.contains_key(keys::RUN))),
        "{fx:?}"
    );
    assert!(h.has_event("TriggerDeleted"));
}

#[test]
fn legacy_fingerprints_start_no_run() {
    let mut data = BTreeMap::new();
    data.insert(
        keys::OBSERVED_TRIGGER.to_string(),
        "0123456789abcdef".to_string(),
    );
    let mut h = H {
        annotations: [(trigger::TARGET_VERSION.to_string(), "3.28.0".to_string())].into(),
        ..H::with_data(&["n1"], BTreeMap::new())
    };
    h.m = Machine::new(config());
    h.data = data;
    h.feed(Input::NodesListed(vec![node("n1")]));
    h.feed(Input::Lease(Some(LeaseView::default())));
    h.trigger();
    assert!(
        h.m.run().is_none(),
        "an upgraded coordinator must not restart an old trigger"
    );
}

#[test]
fn an_unreadable_release_after_the_upgrade_is_asked_again_not_abandoned() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(ds());
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(Input::HelmFinished(Ok(())));
    let reads = |h: &H| h.count(|e| matches!(e, Effect::ReadRelease { .. }));
    let before = reads(&h);
    let fx = h.feed(Input::Release(ReleaseRead::Error(
        "connection refused".into(),
    )));
    let at = fx
        .iter()
        .find_map(|e| match e {
            Effect::WakeAt(w) if w.reason == WakeReason::RetryReleaseRead => Some(w.at_ms),
            _ => None,
        })
        .expect("a retry is scheduled");
    assert_eq!(h.run().phase, RunPhase::Upgrading, "{}", h.run().message);
    h.feed(Input::Tick);
    assert_eq!(reads(&h), before, "not before the retry time");
    h.now = at;
    h.feed(Input::Tick);
    assert_eq!(reads(&h), before + 1);
    h.feed(found(4, "3.28.0", "deployed"));
    h.feed(ds());
    assert_eq!(h.run().phase, RunPhase::Running);
}

/// Issue 9.7: declaring a node lost also takes the upgrade Lease back from it, so a paused
/// agent that wakes up fails its fence instead of acting on a turn the run gave up.
#[test]
fn a_node_declared_lost_has_its_lease_taken_back() {
    let mut h = H::to_running(&["n1", "n2"]);
    // The agent took the Lease and started, then went silent.
    h.feed(Input::Lease(Some(LeaseView {
        holder: Some("n1/pod-a".into()),
        renew_ms: Some(h.now),
        duration_seconds: 30,
        transitions: 1,
    })));
    let (_, mut n1) = node("n1");
    n1.observed.status = Some(NodeStatus::Verifying);
    n1.observed.run_id = Some(h.run().id.clone());
    n1.observed.turn = Some(crate::TurnKind::Upgrade);
    h.feed(watched("n1", n1.clone()));
    assert_eq!(h.count(|e| matches!(e, Effect::RevokeLease { .. })), 0);
    // Past the Lease duration and the grace, a direct read still shows the silent hold.
    h.now += 41_000;
    h.feed(Input::Tick);
    h.feed(Input::Lease(Some(LeaseView {
        holder: Some("n1/pod-a".into()),
        renew_ms: Some(h.now - 41_000),
        duration_seconds: 30,
        transitions: 1,
    })));
    h.feed(Input::Node {
        name: "n1".into(),
        node: Some(n1),
        direct: true,
    });
    let fx = &h.fx;
    let failed = fx
        .iter()
        .position(|e| matches!(e, Effect::MarkNodeFailed { node, .. } if node == "n1"))
        .expect("n1 declared lost");
    let revoked = fx
        .iter()
        .position(|e| matches!(e, Effect::RevokeLease { node, .. } if node == "n1"))
        .expect("its Lease taken back");
    assert!(failed < revoked, "{fx:?}");
    assert_eq!(h.run().phase, RunPhase::RollingBack);
}

/// Issue 14.3: `action=pause` lets the node in progress finish and grants no further turn until
/// `action=resume`; both are Events and show in the run's message.
#[test]
fn pause_holds_the_next_turn_until_resume() {
    let mut h = H::to_running(&["n1", "n2"]);
    assert_eq!(h.run().turn.as_ref().unwrap().node, "n1");
    h.annotate(trigger::ACTION, trigger::ACTION_PAUSE);
    assert!(h.run().paused && h.has_event("RunPaused"));
    assert!(h.run().message.contains("paused"), "{}", h.run().message);
    // The action annotation is consumed.
    assert!(h.fx.contains(&Effect::RemoveAnnotation(trigger::ACTION)));
    h.annotations.remove(trigger::ACTION);
    let (_, mut n1) = node("n1");
    n1.observed.status = Some(NodeStatus::Completed);
    n1.observed.run_id = Some(h.run().id.clone());
    n1.observed.turn = Some(crate::TurnKind::Upgrade);
    h.feed(watched("n1", n1));
    h.now += 600_000;
    h.feed(Input::Tick);
    let r = h.run();
    assert_eq!(r.nodes["n1"].status, Some(NodeStatus::Completed));
    assert!(r.turn.is_none(), "no turn while paused: {:?}", r.turn);
    assert_eq!(r.phase, RunPhase::Running);
    let granted = h.count(|e| {
        matches!(
            e,
            Effect::Event {
                reason: "TurnGranted",
                ..
            }
        )
    });
    h.annotate(trigger::ACTION, trigger::ACTION_RESUME);
    let r = h.run();
    assert!(!r.paused && h.has_event("RunResumed"));
    assert_eq!(r.turn.as_ref().map(|t| t.node.as_str()), Some("n2"));
    assert_eq!(
        h.count(|e| matches!(
            e,
            Effect::Event {
                reason: "TurnGranted",
                ..
            }
        )),
        granted + 1
    );
}

fn found_in_mode(version: &str, mode: Option<&str>) -> Input {
    Input::Release(ReleaseRead::Found(ReleaseObservation {
        chart: KATA_DEPLOY_CHART.into(),
        version: version.into(),
        revision: 3,
        status: ReleaseStatus::Deployed,
        deployment_mode: mode.map(str::to_string),
    }))
}

#[test]
fn the_deployment_mode_is_decided_against_the_release_before_anything_is_touched() {
    /// (release version, its deploymentMode, deployment-mode asked, target, message)
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, &'a str);
    let cases: [Case; 5] = [
        // A switch is refused with the migration command.
        (
            "3.32.0",
            Some("daemonset"),
            Some("job"),
            "4.0.0",
            "--set deploymentMode=job",
        ),
        (
            "4.0.0",
            Some("job"),
            Some("daemonset"),
            "4.1.0",
            "runs kata-deploy in job mode and this run asked for deployment-mode=daemonset",
        ),
        // Job mode below 3.32.0, at either end.
        ("3.32.0", Some("job"), None, "3.31.0", "older than 3.32.0"),
        ("3.31.0", None, Some("job"), "4.0.0", "older than 3.32.0"),
        // Daemonset pacing below 3.27.0.
        ("3.27.0", None, None, "3.26.0", "older than 3.27.0"),
    ];
    for (version, value, asked, target, needle) in cases {
        let mut h = H::new(&["n1"]);
        if let Some(asked) = asked {
            h.annotations
                .insert(trigger::DEPLOYMENT_MODE.into(), asked.into());
        }
        h.annotate(trigger::TARGET_VERSION, target);
        h.feed(found_in_mode(version, value));
        let r = h.run();
        assert_eq!(r.phase, RunPhase::Failed, "{needle}: {}", r.message);
        assert!(r.message.contains(needle), "{needle}: {}", r.message);
        assert_eq!(
            h.count(|e| matches!(e, Effect::HelmUpgrade { .. } | Effect::ReadDaemonSet { .. })),
            0,
            "{needle}"
        );
    }
}

#[test]
fn waves_in_job_mode_are_refused_before_anything_is_touched() {
    let mut h = H::new(&["n1", "n2"]);
    h.annotations.insert(trigger::BATCH_SIZE.into(), "2".into());
    h.annotate(trigger::TARGET_VERSION, "4.1.0");
    h.feed(found_in_mode("4.0.0", Some("job")));
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Failed, "{}", r.message);
    assert!(
        r.message
            .contains("batch-size 2 is not supported in job mode"),
        "{}",
        r.message
    );
    assert_eq!(
        h.count(|e| matches!(e, Effect::HelmUpgrade { .. } | Effect::HelmInstall { .. })),
        0
    );
}

#[test]
fn auto_follows_a_daemonset_release_and_records_the_mode() {
    let mut h = H::new(&["n1"]);
    h.annotate(trigger::TARGET_VERSION, "4.0.0");
    h.feed(found_in_mode("3.32.0", Some("daemonset")));
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Pending, "{}", r.message);
    assert_eq!(
        r.release.as_ref().map(|x| x.mode),
        Some(crate::kata_deploy::DeploymentMode::DaemonSet)
    );
    assert_eq!(h.count(|e| matches!(e, Effect::ReadDaemonSet { .. })), 1);
}

fn at_status(h: &mut H, name: &str, status: NodeStatus, kind: crate::TurnKind) -> Vec<Effect> {
    let id = h.run().id;
    h.feed(Input::Node {
        name: name.into(),
        node: Some(NodeSnapshot {
            observed: ObservedNode {
                exists: true,
                status: Some(status),
                run_id: Some(id),
                turn: Some(kind),
                ..Default::default()
            },
            ..node(name).1
        }),
        direct: false,
    })
}

fn found_job(revision: u32, version: &str, status: &str) -> Input {
    Input::Release(ReleaseRead::Found(ReleaseObservation {
        chart: KATA_DEPLOY_CHART.into(),
        version: version.into(),
        revision,
        status: ReleaseStatus::parse(status),
        deployment_mode: Some("job".into()),
    }))
}

fn installs(fx: &[Effect]) -> Vec<(std::collections::BTreeSet<String>, String, Option<u32>)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::HelmInstall {
                nodes,
                version,
                restore_values_of,
                ..
            } => Some((nodes.clone(), version.clone(), *restore_values_of)),
            _ => None,
        })
        .collect()
}

#[test]
fn job_mode_installs_node_by_node_once_each_and_restores_only_upgraded_nodes() {
    use crate::TurnKind::{Restore, Upgrade};
    let mut h = H::new(&["n1", "n2", "n3"]);
    h.annotate(trigger::TARGET_VERSION, "4.0.0");
    h.feed(found_job(3, "3.32.0", "deployed"));
    // No DaemonSet read, no cluster-wide upgrade: straight to the first turn.
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Running, "{}", r.message);
    assert_eq!(r.turn.as_ref().map(|t| t.node.as_str()), Some("n1"));
    assert_eq!(
        h.count(|e| matches!(e, Effect::HelmUpgrade { .. } | Effect::ReadDaemonSet { .. })),
        0
    );
    // Cordoned: nothing installs yet.
    at_status(&mut h, "n1", NodeStatus::Cordoned, Upgrade);
    assert!(installs(&h.fx).is_empty());
    // Waiting for its install: one scoped upgrade, persisted before helm runs.
    at_status(&mut h, "n1", NodeStatus::Upgrading, Upgrade);
    let fx = h.feed(found_job(3, "3.32.0", "deployed"));
    assert_eq!(
        installs(&fx),
        [(["n1".to_string()].into(), "4.0.0".to_string(), None)]
    );
    let persist = fx
        .iter()
        .position(|e| matches!(e, Effect::Persist(d) if d[keys::RUN].contains("issuedAtRevision")))
        .expect("persisted");
    let helm = fx
        .iter()
        .position(|e| matches!(e, Effect::HelmInstall { .. }))
        .expect("helm");
    assert!(persist < helm, "{fx:?}");
    // A restarted coordinator (a new machine on the persisted record) never issues it again:
    // the release history says it happened.
    let mut h2 = H::with_data(&["n1", "n2", "n3"], h.data.clone());
    h2.annotations = h.annotations.clone();
    h2.trigger();
    at_status(&mut h2, "n1", NodeStatus::Upgrading, Upgrade);
    h2.feed(found_job(4, "4.0.0", "deployed"));
    assert!(installs(&h2.fx).is_empty(), "{:?}", h2.fx);
    assert_eq!(
        h2.run().installs.requests[0].revision,
        Some(4),
        "adopted from the history"
    );
    // The first machine hears helm finish and reads the same.
    h.feed(Input::HelmFinished(Ok(())));
    h.feed(found_job(4, "4.0.0", "deployed"));
    assert_eq!(h.run().release.as_ref().unwrap().upgraded_revision, Some(4));
    at_status(&mut h, "n1", NodeStatus::Completed, Upgrade);
    // n2: its install fails (the dispatcher hook failed); the agent reports the failure.
    assert_eq!(h.run().turn.as_ref().map(|t| t.node.as_str()), Some("n2"));
    at_status(&mut h, "n2", NodeStatus::Upgrading, Upgrade);
    h.feed(found_job(4, "4.0.0", "deployed"));
    h.feed(Input::HelmFinished(Err("post-upgrade hooks failed".into())));
    h.feed(found_job(5, "4.0.0", "failed"));
    assert!(h.has_event("InstallFailed"));
    at_status(&mut h, "n2", NodeStatus::RollingBack, Upgrade);
    let r = h.run();
    assert_eq!(r.phase, RunPhase::RollingBack, "{}", r.message);
    // No release-level rollback: restore turns, failed node first, then n1; n3 untouched.
    assert_eq!(h.count(|e| matches!(e, Effect::HelmRollback { .. })), 0);
    assert_eq!(
        r.turn.as_ref().map(|t| (t.node.as_str(), t.kind)),
        Some(("n2", Restore))
    );
    h.fx.clear();
    at_status(&mut h, "n2", NodeStatus::RollingBack, Restore);
    h.feed(found_job(5, "4.0.0", "failed"));
    h.feed(Input::HelmFinished(Ok(())));
    h.feed(found_job(6, "3.32.0", "deployed"));
    at_status(&mut h, "n2", NodeStatus::RolledBack, Restore);
    at_status(&mut h, "n1", NodeStatus::RollingBack, Restore);
    h.feed(found_job(6, "3.32.0", "deployed"));
    h.feed(Input::HelmFinished(Ok(())));
    h.feed(found_job(7, "3.32.0", "deployed"));
    at_status(&mut h, "n1", NodeStatus::RolledBack, Restore);
    assert_eq!(
        installs(&h.fx),
        [
            (["n2".to_string()].into(), "3.32.0".to_string(), Some(3)),
            (["n1".to_string()].into(), "3.32.0".to_string(), Some(3)),
        ],
        "each restore is scoped to its node, back to the recorded version and values"
    );
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Failed, "{}", r.message);
    assert!(!r.nodes.contains_key("n3") || r.nodes["n3"].status.is_none());
}

/// Issue 12: the grant writes in `fx`, as (node, kind and cancel of the grant, or `None` for a
/// removal).
/// Node `name` as a watch delivers it.
fn watched(name: &str, snap: NodeSnapshot) -> Input {
    Input::Node {
        name: name.into(),
        node: Some(snap),
        direct: false,
    }
}

fn grant_writes(fx: &[Effect]) -> Vec<(String, Option<(crate::TurnKind, bool)>)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::WriteGrant { node, grant, .. } => Some((
                node.clone(),
                grant.as_ref().map(|g| (g.kind, g.cancel_requested)),
            )),
            _ => None,
        })
        .collect()
}

impl H {
    /// Node `name` as the watch shows it after the grant writes so far (the last one for it in
    /// `fx`) and, when given, with this status for the current run.
    fn node_seen(
        &self,
        name: &str,
        rv: u64,
        status: Option<(NodeStatus, crate::TurnKind)>,
    ) -> Input {
        let grant = self.fx.iter().rev().find_map(|e| match e {
            Effect::WriteGrant { node, grant, .. } if node == name => Some(grant.clone()),
            _ => None,
        });
        let (_, mut snap) = node(name);
        snap.grant = grant.flatten().map(|g| g.to_json());
        snap.resource_version = Some(rv.to_string());
        if let Some((st, kind)) = status {
            snap.observed.status = Some(st);
            snap.observed.run_id = Some(self.run().id);
            snap.observed.turn = Some(kind);
        }
        watched(name, snap)
    }
}

#[test]
fn a_grant_is_written_on_the_granted_node_after_the_record_and_removed_when_its_turn_ends() {
    use crate::TurnKind::Upgrade;
    let mut h = H::new(&["n1", "n2"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(ds());
    h.feed(found(3, "3.27.0", "deployed"));
    h.feed(Input::HelmFinished(Ok(())));
    assert!(grant_writes(&h.fx).is_empty(), "no grant before Running");
    h.feed(found(4, "3.28.0", "deployed"));
    let fx = h.feed(ds());
    assert_eq!(
        grant_writes(&fx),
        [("n1".to_string(), Some((Upgrade, false)))]
    );
    // The turn is on record before its grant is on the Node (a restarted coordinator derives
    // the grant from the record).
    let persisted = fx
        .iter()
        .position(|e| matches!(e, Effect::Persist(_)))
        .expect("the turn persisted");
    let written = fx
        .iter()
        .position(|e| matches!(e, Effect::WriteGrant { .. }))
        .unwrap();
    assert!(persisted < written, "{fx:?}");
    let Some(Effect::WriteGrant {
        grant: Some(g),
        resource_version,
        ..
    }) = fx.get(written)
    else {
        unreachable!()
    };
    assert_eq!(
        resource_version, &None,
        "conditioned on the version observed"
    );
    assert_eq!((g.run_id.as_str(), g.slot), (h.run().id.as_str(), 0));
    assert_eq!(g.release.new_hash.as_deref(), Some("h"));
    // Not asked again while the write is not observed yet; once observed, nothing to write.
    assert!(grant_writes(&h.feed(Input::Tick)).is_empty());
    assert!(grant_writes(&h.feed(h.node_seen("n1", 7, None))).is_empty());
    // n1 completes: its grant goes, n2's comes.
    let fx = h.feed(h.node_seen("n1", 8, Some((NodeStatus::Completed, Upgrade))));
    assert_eq!(
        grant_writes(&fx),
        [
            ("n1".to_string(), None),
            ("n2".to_string(), Some((Upgrade, false)))
        ]
    );
    // A removal is unconditional: the record already took the turn back.
    assert!(
        fx.iter().any(|e| matches!(e, Effect::WriteGrant { node, grant: None, resource_version: None } if node == "n1")),
        "{fx:?}"
    );
    h.feed(h.node_seen("n1", 9, Some((NodeStatus::Completed, Upgrade))));
    h.feed(h.node_seen("n2", 3, None));
    // n2 completes: the run is over and no node keeps a grant.
    let fx = h.feed(h.node_seen("n2", 4, Some((NodeStatus::Completed, Upgrade))));
    assert_eq!(h.run().phase, RunPhase::Succeeded);
    assert_eq!(grant_writes(&fx), [("n2".to_string(), None)]);
}

#[test]
fn a_refused_grant_write_is_asked_again_on_the_newer_node_and_garbage_is_replaced() {
    use crate::TurnKind::Upgrade;
    let mut h = H::to_running(&["n1", "n2"]);
    assert_eq!(grant_writes(&h.fx).len(), 1);
    // The write was refused (409): the Node moved on to version 5 without the grant.
    let (_, mut moved) = node("n1");
    moved.resource_version = Some("5".into());
    let fx = h.feed(watched("n1", moved.clone()));
    assert_eq!(
        grant_writes(&fx),
        [("n1".to_string(), Some((Upgrade, false)))]
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::WriteGrant { resource_version, .. }
            if resource_version.as_deref() == Some("5"))),
        "{fx:?}"
    );
    // Someone wrote garbage in its place: the coordinator puts its grant back.
    moved.grant = Some("{garbage".into());
    moved.resource_version = Some("6".into());
    let fx = h.feed(watched("n1", moved.clone()));
    assert_eq!(
        grant_writes(&fx),
        [("n1".to_string(), Some((Upgrade, false)))]
    );
    // Garbage on a node without a turn is removed; n2 has none.
    let (_, mut n2) = node("n2");
    n2.grant = Some("{garbage".into());
    let fx = h.feed(watched("n2", n2));
    assert_eq!(grant_writes(&fx), [("n2".to_string(), None)]);
}

#[test]
fn cancel_changes_the_grant_and_a_lost_node_has_its_grant_taken_back() {
    use crate::TurnKind::Upgrade;
    let mut h = H::to_running(&["n1", "n2"]);
    h.feed(h.node_seen("n1", 2, Some((NodeStatus::Verifying, Upgrade))));
    let fx = h.annotate(trigger::ACTION, trigger::ACTION_CANCEL);
    assert_eq!(
        grant_writes(&fx),
        [("n1".to_string(), Some((Upgrade, true)))]
    );
    h.annotations.remove(trigger::ACTION);
    h.feed(h.node_seen("n1", 3, Some((NodeStatus::Verifying, Upgrade))));

    // Another run: n1's agent goes silent mid-turn; once declared lost, its grant is removed.
    let mut h = H::to_running(&["n1", "n2"]);
    h.feed(Input::Lease(Some(LeaseView {
        holder: Some("n1/pod-a".into()),
        renew_ms: Some(h.now),
        duration_seconds: 30,
        transitions: 1,
    })));
    h.feed(h.node_seen("n1", 2, Some((NodeStatus::Verifying, Upgrade))));
    h.now += 41_000;
    h.feed(Input::Tick);
    h.feed(Input::Lease(Some(LeaseView {
        holder: Some("n1/pod-a".into()),
        renew_ms: Some(h.now - 41_000),
        duration_seconds: 30,
        transitions: 1,
    })));
    let Input::Node { node, .. } = h.node_seen("n1", 2, Some((NodeStatus::Verifying, Upgrade)))
    else {
        unreachable!()
    };
    let fx = h.feed(Input::Node {
        name: "n1".into(),
        node,
        direct: true,
    });
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::MarkNodeFailed { node, .. } if node == "n1")),
        "{fx:?}"
    );
    assert_eq!(grant_writes(&fx), [("n1".to_string(), None)]);
    assert!(
        grant_writes(&h.fx).iter().all(|(n, _)| n == "n1"),
        "n2 never granted"
    );
}

/// Several installations may share a cluster (the end-to-end tests run one coordinator per
/// slice): a coordinator takes back only grants it made. Before grants named their issuer, a
/// coordinator removed every grant on a Node outside its own run — another installation's agent
/// saw its turn revoked mid-verification and the run failed (`metrics.rs`, with its tests run
/// side by side). Its own stale grant is still removed, and garbage on a node it does not grant
/// is left alone.
#[test]
fn a_coordinator_takes_back_only_the_grants_it_made() {
    let mut h = H::new(&["n1"]);
    let theirs = crate::grant::Grant {
        issuer: "other-namespace/kata-lifecycle-manager".into(),
        ..crate::grant::Grant::from_json(
            r#"{"runId":"theirs","kind":"upgrade","grantedAtMs":1,"targetVersion":"3.28.0",
                "params":{"targetVersion":"3.28.0","helmRelease":"kata-deploy","helmNamespace":"kube-system",
                "nodeSelector":"","nodeTaintKey":"","nodeTaintValue":"","verificationNamespace":"default",
                "verificationPod":"","drainEnabled":false,"drainTimeoutSeconds":1,"verificationTimeoutSeconds":1},
                "release":{"recordedRevision":1,"recordedVersion":"3.27.0","oldHash":"h"}}"#,
        )
        .expect("a grant")
    };
    let mine_stale = crate::grant::Grant {
        run_id: "an-earlier-run-of-ours".into(),
        issuer: config().issuer,
        ..theirs.clone()
    };
    let seen = |name: &str, grant: Option<String>| {
        let (_, mut snap) = node(name);
        snap.grant = grant;
        snap.resource_version = Some("5".into());
        watched(name, snap)
    };
    let fx = h.feed(seen("other-1", Some(theirs.to_json())));
    assert!(
        grant_writes(&fx).is_empty(),
        "another installation's grant: {fx:?}"
    );
    let fx = h.feed(seen("other-2", Some("garbage".into())));
    assert!(
        grant_writes(&fx).is_empty(),
        "garbage nobody granted: {fx:?}"
    );
    let fx = h.feed(seen("n1", Some(mine_stale.to_json())));
    assert_eq!(
        grant_writes(&fx),
        [("n1".to_string(), None)],
        "our own stale grant goes"
    );
}
