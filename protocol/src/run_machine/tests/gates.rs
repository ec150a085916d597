//! Issue 14.2 and 14.4: the grant gate holds the run's start and each new upgrade turn, never a
//! turn in flight nor a restore turn, and lets go by itself (a timer wake, a pod list).
use super::*;
use crate::grant_gate::{BlockingPod, HoldReason};

fn utc(local: &str) -> i64 {
    let dt: jiff::civil::DateTime = local.parse().unwrap();
    dt.to_zoned(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_millisecond()
}

fn wakes(fx: &[Effect]) -> Vec<i64> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::WakeAt(w) if w.reason == WakeReason::WindowOpens => Some(w.at_ms),
            _ => None,
        })
        .collect()
}

fn events(h: &H, reason: &str) -> usize {
    h.count(|e| matches!(e, Effect::Event { reason: r, .. } if *r == reason))
}

fn observed(h: &H, name: &str, status: NodeStatus) -> Input {
    let (_, mut snap) = node(name);
    snap.observed.status = Some(status);
    snap.observed.run_id = Some(h.run().id.clone());
    snap.observed.turn = Some(crate::TurnKind::Upgrade);
    Input::Node {
        name: name.into(),
        node: Some(snap),
        direct: false,
    }
}

impl H {
    /// Prepare → upgrade → Running, with the window open (the turn of the first node granted).
    fn through_upgrade(&mut self) {
        self.feed(found(3, "3.27.0", "deployed"));
        self.feed(ds());
        self.feed(found(3, "3.27.0", "deployed"));
        self.feed(Input::HelmFinished(Ok(())));
        self.feed(found(4, "3.28.0", "deployed"));
        self.feed(ds());
        assert_eq!(
            self.run().phase,
            RunPhase::Running,
            "{}",
            self.run().message
        );
    }

    fn turn_node(&self) -> Option<String> {
        self.run().turn.map(|t| t.node)
    }
}

#[test]
fn a_closed_window_holds_the_start_and_its_opening_wakes_the_run() {
    let mut h = H::new(&["n1", "n2"]);
    h.now = utc("2026-11-30T12:00:00"); // a Monday
    h.annotations.insert(
        trigger::MAINTENANCE_WINDOW.into(),
        "Mon-Fri 22:00-06:00".into(),
    );
    let fx = h.annotate(trigger::TARGET_VERSION, "3.28.0");
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Pending);
    let hold = r.hold.clone().expect("held");
    assert_eq!(hold.reason, HoldReason::MaintenanceWindow);
    assert_eq!(hold.until_ms, Some(utc("2026-11-30T22:00:00")));
    assert!(
        r.message
            .contains("waiting for maintenance window until 2026-11-30T22:00:00+00:00"),
        "{}",
        r.message
    );
    assert_eq!(wakes(&fx), [utc("2026-11-30T22:00:00")]);
    // Nothing is read or touched while waiting, and the hold is said once.
    h.now = utc("2026-11-30T21:59:59");
    let fx = h.feed(Input::Tick);
    assert_eq!(wakes(&fx), [utc("2026-11-30T22:00:00")], "asks again");
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
    assert_eq!(events(&h, "RunHeld"), 1);
    // The timer wake at the opening starts the run.
    h.now = utc("2026-11-30T22:00:00");
    let fx = h.feed(Input::Tick);
    assert!(
        fx.iter().any(|e| matches!(e, Effect::ReadRelease { .. })),
        "{fx:?}"
    );
    assert!(h.run().hold.is_none());
    assert_eq!(events(&h, "RunHoldLifted"), 1);
    h.through_upgrade();
    assert_eq!(h.turn_node().as_deref(), Some("n1"));
}

#[test]
fn a_turn_in_flight_when_the_window_closes_finishes_and_the_next_is_held() {
    let mut h = H::new(&["n1", "n2"]);
    h.now = utc("2026-12-01T05:50:00"); // Tuesday, inside Monday night's window
    h.annotations.insert(
        trigger::MAINTENANCE_WINDOW.into(),
        "Mon-Fri 22:00-06:00".into(),
    );
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.through_upgrade();
    assert_eq!(h.turn_node().as_deref(), Some("n1"));
    // The window closes while n1 is mid-procedure: its turn stays.
    h.now = utc("2026-12-01T06:00:30");
    h.feed(observed(&h, "n1", NodeStatus::Verifying));
    h.feed(Input::Tick);
    assert_eq!(
        h.turn_node().as_deref(),
        Some("n1"),
        "a turn in flight is never held"
    );
    // What is held is the next grant, said while n1 finishes.
    assert_eq!(
        h.run().hold.and_then(|hold| hold.node).as_deref(),
        Some("n2")
    );
    // n1 completes; n2 waits for Tuesday night.
    let fx = h.feed(observed(&h, "n1", NodeStatus::Completed));
    let r = h.run();
    assert_eq!(r.nodes["n1"].status, Some(NodeStatus::Completed));
    assert_eq!(r.turn, None);
    assert_eq!(r.phase, RunPhase::Running);
    let hold = r.hold.expect("n2 held");
    assert_eq!(hold.node.as_deref(), Some("n2"));
    assert_eq!(hold.until_ms, Some(utc("2026-12-01T22:00:00")));
    assert_eq!(wakes(&fx), [utc("2026-12-01T22:00:00")]);
    assert_eq!(events(&h, "TurnGranted"), 1);
    h.now = utc("2026-12-01T22:00:00");
    h.feed(Input::Tick);
    assert_eq!(h.turn_node().as_deref(), Some("n2"));
    assert_eq!(events(&h, "TurnGranted"), 2);
}

#[test]
fn restore_turns_are_not_held_by_a_closed_window() {
    let mut h = H::new(&["n1", "n2"]);
    h.now = utc("2026-12-01T05:50:00");
    h.annotations.insert(
        trigger::MAINTENANCE_WINDOW.into(),
        "Mon-Fri 22:00-06:00".into(),
    );
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.through_upgrade();
    h.now = utc("2026-12-01T07:00:00");
    h.feed(observed(&h, "n1", NodeStatus::RollingBack));
    assert_eq!(h.run().phase, RunPhase::RollingBack);
    h.feed(found(4, "3.28.0", "deployed"));
    h.feed(Input::HelmFinished(Ok(())));
    h.feed(ds());
    let r = h.run();
    let turn = r.turn.expect("restore granted outside the window");
    assert_eq!(
        (turn.node.as_str(), turn.kind),
        ("n1", crate::TurnKind::Restore)
    );
    assert!(r.hold.is_none(), "a rollback is not held: {:?}", r.hold);
}

#[test]
fn a_blocking_pod_on_the_next_node_holds_its_turn_until_it_is_gone() {
    let mut h = H::new(&["n1", "n2"]);
    h.annotations
        .insert(trigger::BLOCKING_POD_SELECTOR.into(), "app=backup".into());
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.through_upgrade();
    // Before any pod list: a grant is never made on a guess (n1 waits for the list).
    let r = h.run();
    assert_eq!(r.turn, None);
    assert!(r.message.contains("waiting to list"), "{}", r.message);
    let pod = |name: &str, node: &str, phase: &str| BlockingPod {
        namespace: "ops".into(),
        name: name.into(),
        node: Some(node.into()),
        phase: phase.into(),
    };
    let on_n2 = vec![
        pod("backup", "n2", "Running"),
        pod("old", "n1", "Succeeded"),
    ];
    let list = |pods: &Vec<BlockingPod>| Input::BlockingPods {
        selector: "app=backup".into(),
        pods: pods.clone(),
    };
    // A list for another selector (a previous run's watch) does not count.
    h.feed(Input::BlockingPods {
        selector: "app=other".into(),
        pods: vec![],
    });
    assert_eq!(h.run().turn, None);
    h.feed(list(&on_n2));
    assert_eq!(h.turn_node().as_deref(), Some("n1"));
    h.feed(observed(&h, "n1", NodeStatus::Completed));
    let r = h.run();
    assert_eq!(r.turn, None);
    let hold = r.hold.expect("n2 held");
    assert_eq!(hold.reason, HoldReason::BlockingPod);
    assert_eq!(hold.blocking_pods, ["ops/backup"]);
    assert!(r.message.contains("ops/backup"), "{}", r.message);
    let held_events = events(&h, "RunHeld");
    // The same list again, and time passing: no new Event, no grant.
    h.feed(list(&on_n2));
    h.now += 3_600_000;
    h.feed(Input::Tick);
    assert_eq!(events(&h, "RunHeld"), held_events);
    assert_eq!(h.run().turn, None);
    // The pod is gone: n2 starts.
    h.feed(list(&vec![pod("old", "n1", "Succeeded")]));
    assert_eq!(h.turn_node().as_deref(), Some("n2"));
    assert!(h.run().hold.is_none());
    h.feed(observed(&h, "n2", NodeStatus::Completed));
    assert_eq!(h.run().phase, RunPhase::Succeeded);
}

#[test]
fn a_bad_window_refuses_the_run_before_anything_is_touched() {
    let mut h = H::new(&["n1"]);
    h.annotations
        .insert(trigger::MAINTENANCE_WINDOW.into(), "Mon-Fri 22:00".into());
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Failed);
    assert!(
        r.message.contains(trigger::MAINTENANCE_WINDOW) && r.message.contains("not a time range"),
        "{}",
        r.message
    );
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
}

#[test]
fn a_run_cancelled_while_held_ends_held_by_nothing() {
    let mut h = H::new(&["n1"]);
    h.now = utc("2026-11-30T12:00:00");
    h.annotations
        .insert(trigger::MAINTENANCE_WINDOW.into(), "22:00-23:00".into());
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    assert!(h.run().hold.is_some());
    h.annotate(trigger::ACTION, trigger::ACTION_CANCEL);
    let r = h.run();
    assert_eq!(r.phase, RunPhase::Cancelled, "{}", r.message);
    assert!(r.hold.is_none(), "{:?}", r.hold);
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
}

#[test]
fn firing_alerts_matching_the_filter_hold_the_start_and_each_turn() {
    let mut cfg = config();
    cfg.defaults.alert_filter = "Node.*".into();
    let mut h = H::new(&["n1", "n2"]);
    h.m = Machine::new(cfg);
    h.feed(Input::NodesListed(vec![node("n1"), node("n2")]));
    h.feed(Input::Lease(Some(LeaseView {
        duration_seconds: 30,
        ..Default::default()
    })));
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    // Not asked yet: held, nothing read.
    let hold = h.run().hold.expect("held until Prometheus answers");
    assert_eq!(hold.reason, HoldReason::PrometheusAlert);
    h.feed(Input::FiringAlerts(Ok(vec![
        "Watchdog".into(),
        "NodeDiskPressure".into(),
    ])));
    let hold = h.run().hold.expect("a matching alert fires");
    assert_eq!(hold.firing_alerts, ["NodeDiskPressure"]);
    assert!(h.run().message.contains("NodeDiskPressure"));
    assert_eq!(h.count(|e| matches!(e, Effect::ReadRelease { .. })), 0);
    // Only a non-matching alert left: the run starts.
    h.feed(Input::FiringAlerts(Ok(vec!["Watchdog".into()])));
    assert!(h.run().hold.is_none());
    h.through_upgrade();
    assert_eq!(h.turn_node().as_deref(), Some("n1"));
    // Prometheus unreachable: the next turn is held rather than granted on a guess.
    h.feed(Input::FiringAlerts(Err("connection refused".into())));
    h.feed(observed(&h, "n1", NodeStatus::Completed));
    let r = h.run();
    assert_eq!(r.turn, None);
    assert!(r.message.contains("connection refused"), "{}", r.message);
    h.feed(Input::FiringAlerts(Ok(vec![])));
    assert_eq!(h.turn_node().as_deref(), Some("n2"));
}

#[test]
fn a_new_run_waits_for_fresh_gate_observations() {
    let mut h = H::new(&["n1"]);
    h.annotations
        .insert(trigger::BLOCKING_POD_SELECTOR.into(), "app=backup".into());
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.through_upgrade();
    h.feed(Input::BlockingPods {
        selector: "app=backup".into(),
        pods: vec![],
    });
    h.feed(observed(&h, "n1", NodeStatus::Completed));
    assert_eq!(h.run().phase, RunPhase::Succeeded);
    // The next run, same selector: the list the first run saw is not reused.
    h.annotate(trigger::TARGET_VERSION, "3.29.0");
    h.feed(found(4, "3.28.0", "deployed"));
    h.feed(ds());
    h.feed(found(4, "3.28.0", "deployed"));
    h.feed(Input::HelmFinished(Ok(())));
    h.feed(found(5, "3.29.0", "deployed"));
    h.feed(ds());
    let r = h.run();
    assert_eq!(
        (r.phase, r.target_version.as_str()),
        (RunPhase::Running, "3.29.0")
    );
    assert_eq!(r.turn, None);
    assert!(r.message.contains("waiting to list"), "{}", r.message);
    h.feed(Input::BlockingPods {
        selector: "app=backup".into(),
        pods: vec![],
    });
    assert_eq!(h.turn_node().as_deref(), Some("n1"));
}

/// Seen after an API server outage: kube-controller-manager had not yet observed the restored
/// template when a restore turn deleted the node's kata-deploy pod, so the DaemonSet recreated
/// it at the upgraded revision and the node stayed cordoned. No restore turn is granted until
/// the DaemonSet read (which waits for `observedGeneration`) answers after the rollback.
#[test]
fn restore_turns_wait_until_the_daemonset_observed_the_restored_template() {
    let mut h = H::new(&["n1", "n2"]);
    h.annotate(trigger::TARGET_VERSION, "3.28.0");
    h.through_upgrade();
    h.feed(observed(&h, "n1", NodeStatus::RollingBack));
    h.feed(found(4, "3.28.0", "deployed"));
    let fx = h.feed(Input::HelmFinished(Ok(())));
    assert!(
        fx.iter().any(|e| matches!(e, Effect::ReadDaemonSet { .. })),
        "the DaemonSet is read after the rollback: {fx:?}"
    );
    assert_eq!(
        h.run().turn,
        None,
        "no restore turn before the DaemonSet is observed"
    );
    h.feed(Input::Tick);
    assert_eq!(
        h.run().turn,
        None,
        "nor on a tick while the read is outstanding"
    );
    h.feed(ds());
    let turn = h
        .run()
        .turn
        .expect("restore granted once the template is observed");
    assert_eq!(
        (turn.node.as_str(), turn.kind),
        ("n1", crate::TurnKind::Restore)
    );
}
