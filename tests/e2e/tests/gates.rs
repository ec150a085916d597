//! Issue 14.2 and 14.4 end to end (real control plane, real helm, coordinator and agents as
//! processes, the safety monitor on): a maintenance window closed at trigger time holds the run
//! until it opens; a blocking pod on the next node holds that node's turn until it is deleted;
//! a firing Prometheus alert (a stand-in serving `/api/v1/alerts`) holds the run until it
//! resolves; a bad window is refused with nothing touched.
mod product;

use k8s_openapi::api::core::v1::Pod;
use klm_protocol::grant_gate::HoldReason;
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase};
use kube::api::{Api, DeleteParams, PostParams};
use product::{Product, RUN_TIMEOUT};

/// `HH:MM:SS` (UTC) of a Unix time in ms.
fn hms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .expect("a valid time")
        .to_zoned(jiff::tz::TimeZone::UTC)
        .strftime("%H:%M:%S")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_window_holds_the_run_until_it_opens() -> anyhow::Result<()> {
    let p = Product::start("window", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    // Opens 15 s from now (seconds precision), for 10 minutes, every day, UTC.
    let opens_ms = (jiff::Timestamp::now().as_millisecond() / 1000 + 15) * 1000;
    let window = format!("{}-{}", hms(opens_ms), hms(opens_ms + 600_000));
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::MAINTENANCE_WINDOW, Some(&window)),
        (trigger::TARGET_VERSION, Some("3.28.0")),
    ])
    .await?;
    let held = p
        .wait_run(
            |r| Some(&r.id) != before.as_ref() && r.hold.is_some(),
            RUN_TIMEOUT,
        )
        .await?;
    let hold = held.hold.clone().expect("held");
    assert_eq!(hold.reason, HoldReason::MaintenanceWindow, "{held:#?}");
    assert_eq!(hold.until_ms, Some(opens_ms), "{held:#?}");
    assert_eq!(held.phase, RunPhase::Pending);
    assert!(
        held.message
            .contains("waiting for maintenance window until ")
            && held.message.contains(&hms(opens_ms)),
        "{}",
        held.message
    );
    assert!(held.plan.is_empty() && held.turn.is_none(), "{held:#?}");
    // Nothing touched while waiting: no node status, the release unchanged.
    assert_eq!(p.node_labels("node-1").await?.0, None);
    assert_eq!(p.release().await?.1, "3.27.0");

    // The window opens: the coordinator's timer wake starts the run, which completes.
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert!(run.hold.is_none(), "{run:#?}");
    let first = run.nodes[&p.node("node-1")]
        .started_at_ms
        .expect("node-1 started");
    assert!(
        first >= opens_ms,
        "node-1 started at {first}, before the window opened at {opens_ms}"
    );
    assert_eq!(run.completed(), 2, "{run:#?}");
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pod_holds_its_nodes_turn_until_it_is_deleted() -> anyhow::Result<()> {
    let p = Product::start("blockpod", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let (n1, n2) = (p.node("node-1"), p.node("node-2"));
    let ns = p.slice.namespace();
    let selector = format!("klm-e2e-blocking={}", p.slice.id());
    let pods: Api<Pod> = Api::namespaced(p.slice.client(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "backup",
            "labels": {"klm-e2e-blocking": p.slice.id()},
        },
        "spec": {
            "nodeName": n2,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "backup", "image": "busybox"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;

    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::BLOCKING_POD_SELECTOR, Some(&selector)),
        (trigger::TARGET_VERSION, Some("3.28.0")),
    ])
    .await?;
    // node-1 goes through; node-2's turn is held, naming the pod.
    let held = p
        .wait_run(
            |r| {
                Some(&r.id) != before.as_ref()
                    && r.nodes.get(&n1).and_then(|n| n.status) == Some(NodeStatus::Completed)
                    && r.hold.is_some()
                    && r.turn.is_none()
            },
            RUN_TIMEOUT,
        )
        .await?;
    let hold = held.hold.clone().expect("held");
    assert_eq!(hold.reason, HoldReason::BlockingPod, "{held:#?}");
    assert_eq!(hold.node.as_deref(), Some(n2.as_str()));
    assert_eq!(hold.blocking_pods, [format!("{ns}/backup")]);
    assert!(
        held.message.contains(&format!("{ns}/backup")),
        "{}",
        held.message
    );
    assert_eq!(held.phase, RunPhase::Running);
    assert_eq!(p.node_labels("node-2").await?.0, None, "node-2 not touched");
    let n2_node = p.slice.node(&n2).await?;
    assert!(
        !n2_node.spec.and_then(|s| s.unschedulable).unwrap_or(false),
        "node-2 not cordoned"
    );

    // The pod goes: node-2 takes its turn and the run completes.
    pods.delete("backup", &DeleteParams::default().grace_period(0))
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert_eq!(run.completed(), 2);
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_window_is_refused_and_nothing_is_touched() -> anyhow::Result<()> {
    let p = Product::start("badwindow", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let release_before = p.release().await?;
    let run = p
        .run(
            "3.28.0",
            &[(trigger::MAINTENANCE_WINDOW, "Mon-Fri 22:00 Europe/Berlin")],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert!(
        run.message.contains("invalid input, nothing was changed")
            && run.message.contains(trigger::MAINTENANCE_WINDOW)
            && run.message.contains("not a time range"),
        "{}",
        run.message
    );
    assert_eq!(p.release().await?, release_before);
    assert_eq!(p.node_labels("node-1").await?, (None, None));
    Ok(())
}

/// A stand-in for Prometheus's `GET /api/v1/alerts`, answering with the alerts in `firing`.
async fn alerts_stand_in(
    firing: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/api/v1/alerts",
        axum::routing::get(move || {
            let names = firing.lock().unwrap().clone();
            async move {
                let alerts: Vec<serde_json::Value> = names
                    .iter()
                    .map(|n| serde_json::json!({"labels": {"alertname": n}, "state": "firing"}))
                    .collect();
                let body = serde_json::json!({"status": "success", "data": {"alerts": alerts}})
                    .to_string();
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_holds_the_run_until_it_resolves() -> anyhow::Result<()> {
    let firing = std::sync::Arc::new(std::sync::Mutex::new(vec![
        "NodeDiskPressure".to_string(),
        "Watchdog".to_string(),
    ]));
    let prometheus = alerts_stand_in(firing.clone()).await?;
    let url = format!("http://{prometheus}");
    let p = Product::start_with(
        "alerts",
        2,
        "3.27.0",
        &[
            "--prometheus-url",
            &url,
            "--prometheus-alert-filter",
            "Node.*",
            "--prometheus-poll-interval",
            "1s",
        ],
    )
    .await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    let held = p
        .wait_run(
            |r| {
                Some(&r.id) != before.as_ref()
                    && r.hold.as_ref().is_some_and(|h| !h.firing_alerts.is_empty())
            },
            RUN_TIMEOUT,
        )
        .await?;
    let hold = held.hold.clone().expect("held");
    assert_eq!(hold.reason, HoldReason::PrometheusAlert, "{held:#?}");
    assert_eq!(
        hold.firing_alerts,
        ["NodeDiskPressure"],
        "Watchdog does not match"
    );
    assert_eq!(held.phase, RunPhase::Pending);
    assert!(
        held.message.contains("NodeDiskPressure"),
        "{}",
        held.message
    );
    assert_eq!(p.node_labels("node-1").await?.0, None);
    assert_eq!(p.release().await?.1, "3.27.0");

    // The alert resolves (Watchdog keeps firing, it does not match): the run goes through.
    *firing.lock().unwrap() = vec!["Watchdog".to_string()];
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert_eq!(run.completed(), 2);
    p.assert_safe(&run.plan).await?;
    Ok(())
}
