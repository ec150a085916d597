//! End-to-end scenarios: the coordinator and one agent per simulated node, as real processes,
//! against the real control plane, with a real helm and fixture kata-deploy charts. Every
//! scenario also checks the safety invariants (one node in progress at most, plan order,
//! nothing left cordoned by us).
mod product;

use base64::Engine;
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase};
use klm_testkit::Outcome;
use product::Product;

fn names(p: &Product, suffixes: &[&str]) -> Vec<String> {
    suffixes.iter().map(|s| p.node(s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_upgrades_opted_in_nodes_one_by_one() -> anyhow::Result<()> {
    let p = Product::start("happy", 5, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3", "node-4"]).await?;
    let (rev_before, ..) = p.release().await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    let plan = names(&p, &["node-1", "node-2", "node-3", "node-4"]);
    assert_eq!(run.plan, plan);
    assert_eq!(run.progress(), "4/4");
    for n in ["node-1", "node-2", "node-3", "node-4"] {
        assert_eq!(
            p.node_labels(n).await?,
            (Some("completed".into()), Some("3.28.0".into())),
            "{n}"
        );
    }
    // The node that did not opt in was not touched, and still runs the old kata-deploy pod.
    assert_eq!(p.node_labels("node-5").await?, (None, None));
    let (rev, version, status) = p.release().await?;
    assert_eq!(
        (rev, version.as_str(), status.as_str()),
        (rev_before + 1, "3.28.0", "deployed"),
        "exactly one helm upgrade"
    );
    // Every opted-in node's evidence records a verification.
    for n in &plan {
        let ev = run.nodes[n].evidence.clone().expect("evidence");
        assert!(ev.succeeded && ev.verification_ms.is_some(), "{ev:?}");
    }
    p.assert_safe(&plan).await?;
    let holders = p.observed.lock().unwrap().holders.clone();
    assert_eq!(
        holders, plan,
        "the upgrade Lease went to each node in plan order"
    );
    // Events tell the story on the trigger ConfigMap and on each Node, with this run's text.
    use k8s_openapi::api::events::v1::Event;
    let cm_events: kube::Api<Event> = kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    let notes: Vec<String> = cm_events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| Some(format!("{}: {}", e.reason?, e.note?)))
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("RunSucceeded") && n.contains("4 node(s) to 3.28.0")),
        "{notes:#?}"
    );
    let granted = notes
        .iter()
        .filter(|n| n.starts_with("TurnGranted"))
        .count();
    assert_eq!(
        granted, 4,
        "one TurnGranted Event per node, each with its own text: {notes:#?}"
    );
    let node_events: kube::Api<Event> = kube::Api::namespaced(p.slice.client(), "default");
    let n1 = p.node("node-1");
    let on_n1: Vec<String> = node_events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(n1.as_str()))
        .filter_map(|e| e.reason)
        .collect();
    assert!(on_n1.iter().any(|r| r == "NodeUpgraded"), "{on_n1:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_on_node_two_of_four_rolls_back_to_the_recorded_revision() -> anyhow::Result<()> {
    let p = Product::start("fail2", 4, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3", "node-4"]).await?;
    p.slice
        .set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
    let (recorded, ..) = p.release().await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let failure = run.failure.clone().expect("failure recorded");
    assert_eq!(failure.node.as_deref(), Some(p.node("node-2").as_str()));
    let ev = failure.evidence.expect("evidence");
    assert_eq!(
        ev.failure.as_ref().and_then(|f| f.exit_code),
        Some(1),
        "{ev:?}"
    );
    assert!(run.message.contains(&p.node("node-2")), "{}", run.message);
    p.assert_nodes_at(&["node-1", "node-2"], "rolled-back", "3.27.0")
        .await?;
    p.assert_untouched(&["node-3", "node-4"]).await?;
    let (rev, version, status) = p.release().await?;
    assert_eq!((version.as_str(), status.as_str()), ("3.27.0", "deployed"));
    assert_eq!(rev, recorded + 2, "one upgrade, one rollback");
    assert_eq!(
        run.release.as_ref().unwrap().recorded_revision as u64,
        recorded
    );
    // Every node runs the old kata-deploy again.
    p.slice.wait_kata_deploy("3.27.0").await?;
    p.assert_safe(&names(&p, &["node-1", "node-2", "node-3", "node-4"]))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_failure_modes_fail_fast_with_evidence() -> anyhow::Result<()> {
    let p = Product::start("modes", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let cases = [
        (Outcome::ImagePull, "ImagePull", "60s"),
        (Outcome::CrashLoop, "CrashLoopBackOff", "60s"),
        (Outcome::Pending, "Timeout", "4s"),
        (Outcome::Fail, "NonZeroExit", "60s"),
    ];
    for (outcome, reason, timeout) in cases {
        p.slice
            .set_verification_outcome("node-1", "3.28.0", outcome);
        let started = std::time::Instant::now();
        let run = p
            .run("3.28.0", &[(trigger::VERIFICATION_TIMEOUT, timeout)])
            .await?;
        assert_eq!(run.phase, RunPhase::Failed, "{outcome}: {run:#?}");
        let f = run.failure.clone().expect("failure");
        assert!(f.reason.contains(reason), "{outcome}: {}", f.reason);
        assert!(
            f.evidence.as_ref().is_some_and(|e| e.pod.is_some()),
            "{outcome}: {f:?}"
        );
        // Fail fast: well before the 60s verification timeout (except the timeout case).
        eprintln!("{outcome}: run failed after {:?}", started.elapsed());
        assert_eq!(
            p.node_labels("node-1").await?.0.as_deref(),
            Some("rolled-back")
        );
        assert_eq!(p.release().await?.1, "3.27.0");
        // Re-arm: remove the target so the same annotations start a new run next time.
        p.annotate(&[
            (trigger::TARGET_VERSION, None),
            (trigger::VERIFICATION_TIMEOUT, None),
        ])
        .await?;
    }
    p.assert_safe(&names(&p, &["node-1"])).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_end_the_run_with_a_message_and_change_nothing() -> anyhow::Result<()> {
    let p = Product::start("badinput", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let not_never = b64(&p
        .slice
        .verification_pod_template()
        .replace("Never", "Always"));
    let not_pod = b64("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n");
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![(trigger::TARGET_VERSION, "not-a-version".into())],
            "bad target version",
        ),
        (
            vec![(trigger::NODE_SELECTOR, "a in (b".into())],
            "node-selector",
        ),
        (
            vec![(trigger::DRAIN_TIMEOUT, "ten minutes".into())],
            "drain-timeout",
        ),
        (
            vec![(trigger::VERIFICATION_POD, "@@not base64@@".into())],
            "base64",
        ),
        (vec![(trigger::VERIFICATION_POD, b64("a: [broken"))], "YAML"),
        (vec![(trigger::VERIFICATION_POD, not_pod)], "kind: Pod"),
        (
            vec![(trigger::VERIFICATION_POD, not_never)],
            "restartPolicy",
        ),
        (
            vec![(trigger::HELM_RELEASE, "no-such-release".into())],
            "not found",
        ),
    ];
    let (rev, ..) = p.release().await?;
    for (pairs, needle) in cases {
        let mut ann: Vec<(&str, Option<&str>)> = vec![(trigger::TARGET_VERSION, Some("3.28.0"))];
        for (k, v) in &pairs {
            ann.retain(|(key, _)| key != k);
            ann.push((k, Some(v.as_str())));
        }
        let before = p.current_run().await?.map(|r| r.id);
        p.annotate(&ann).await?;
        let run = p.wait_finished_after(before).await?;
        assert_eq!(run.phase, RunPhase::Failed, "{pairs:?}");
        assert!(
            run.message.contains(needle),
            "{pairs:?}: message {:?}",
            run.message
        );
        // Clear everything for the next case.
        let clear: Vec<(&str, Option<&str>)> = ann.iter().map(|(k, _)| (*k, None)).collect();
        p.annotate(&clear).await?;
    }
    assert_eq!(p.release().await?.0, rev, "no helm call was made");
    assert_eq!(
        p.node_labels("node-1").await?,
        (None, None),
        "no node was touched"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_nodes_and_same_version_succeed_without_helm() -> anyhow::Result<()> {
    let p = Product::start("noop", 2, "3.27.0").await?;
    let (rev, ..) = p.release().await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded);
    assert!(run.message.contains("no nodes selected"), "{}", run.message);
    p.opt_in(&["node-1"]).await?;
    let run = p
        .run("3.27.0", &[(trigger::DRAIN_ENABLED, "false")])
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded);
    assert!(run.message.contains("already at 3.27.0"), "{}", run.message);
    assert_eq!(p.release().await?.0, rev);
    assert_eq!(p.node_labels("node-1").await?, (None, None));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_only_and_combined_selection() -> anyhow::Result<()> {
    let p = Product::start("taints", 4, "3.27.0").await?;
    for n in ["node-2", "node-4"] {
        p.slice
            .taint_node(
                &p.node(n),
                "kata-lifecycle-manager",
                "pending",
                "NoSchedule",
            )
            .await?;
    }
    p.slice
        .taint_node(
            &p.node("node-3"),
            "kata-lifecycle-manager",
            "done",
            "NoSchedule",
        )
        .await?;
    // Taint-only: the slice label keeps the test isolated; no window label is needed.
    let sel = p.slice.node_selector();
    let run = p
        .run(
            "3.28.0",
            &[
                (trigger::NODE_SELECTOR, &sel),
                (trigger::NODE_TAINT_KEY, "kata-lifecycle-manager"),
                (trigger::NODE_TAINT_VALUE, "pending"),
            ],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(run.plan, names(&p, &["node-2", "node-4"]));
    assert_eq!(p.node_labels("node-1").await?.0, None);
    assert_eq!(p.node_labels("node-3").await?.0, None);
    // Combined: label AND taint key (any value).
    p.slice
        .label_node(&p.node("node-3"), "pool", "kata")
        .await?;
    p.slice
        .label_node(&p.node("node-4"), "pool", "kata")
        .await?;
    let run = p
        .run(
            "3.29.0",
            &[
                (trigger::NODE_SELECTOR, &format!("{sel},pool=kata")),
                (trigger::NODE_TAINT_KEY, "kata-lifecycle-manager"),
                (trigger::NODE_TAINT_VALUE, ""),
            ],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(run.plan, names(&p, &["node-3", "node-4"]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_cordon_survives_the_upgrade() -> anyhow::Result<()> {
    let p = Product::start("foreign", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice.cordon(&p.node("node-1")).await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let n1 = p.slice.node(&p.node("node-1")).await?;
    assert_eq!(
        n1.spec.and_then(|s| s.unschedulable),
        Some(true),
        "someone else's cordon must stay"
    );
    let n2 = p.slice.node(&p.node("node-2")).await?;
    assert_ne!(
        n2.spec.and_then(|s| s.unschedulable),
        Some(true),
        "our cordon must be lifted"
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rollback_of_one_node() -> anyhow::Result<()> {
    let p = Product::start("manual", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let before = Some(run.id.clone());
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&p.node("node-2")))])
        .await?;
    let rb = p.wait_finished_after(before).await?;
    assert_eq!(rb.phase, RunPhase::Succeeded, "{rb:#?}");
    assert_eq!(
        p.node_labels("node-2").await?,
        (Some("rolled-back".into()), Some("3.27.0".into()))
    );
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("completed".into()), Some("3.28.0".into()))
    );
    assert_eq!(p.release().await?.1, "3.27.0");
    assert_eq!(
        rb.nodes[&p.node("node-2")].status,
        Some(NodeStatus::RolledBack)
    );
    // A second node can be rolled back after the first; a node already rolled back cannot.
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&p.node("node-1")))])
        .await?;
    let rb2 = p.wait_finished_after(Some(rb.id.clone())).await?;
    assert_eq!(rb2.phase, RunPhase::Succeeded, "{rb2:#?}");
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("rolled-back".into()), Some("3.27.0".into()))
    );
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&p.node("node-2")))])
        .await?;
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    let n2 = p.node("node-2");
    klm_testkit::wait::wait_for(
        &cms,
        product::CM,
        "a notice refusing the second rollback of node-2",
        std::time::Duration::from_secs(30),
        klm_testkit::wait::when(move |cm: &k8s_openapi::api::core::v1::ConfigMap| {
            cm.data
                .as_ref()
                .and_then(|d| d.get("notice"))
                .is_some_and(|n| n.contains(&n2) && n.contains("cannot roll back"))
        }),
    )
    .await?;
    assert_eq!(
        p.current_run().await?.unwrap().id,
        rb2.id,
        "no new run started"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_verification_resumes() -> anyhow::Result<()> {
    let mut p = Product::start("agentkill", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    let n1 = p.node("node-1");
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    // SIGKILL mid-verification: the verification pod's name is already on the Node, so the
    // restarted agent adopts that pod (whatever it did meanwhile) instead of starting over.
    p.kill_agent(&n1);
    p.start_agent(&n1)?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("completed".into()), Some("3.28.0".into()))
    );
    let pods = p.slice.verification_decisions();
    let on_n1 = pods.iter().filter(|d| d.node == n1).count();
    assert_eq!(
        on_n1, 1,
        "one verification pod for node-1, adopted after the restart: {pods:?}"
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_helm_upgrade_resumes_without_a_second_upgrade()
-> anyhow::Result<()> {
    let mut p = Product::start("coordkill", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let (recorded, ..) = p.release().await?;
    // Keep node-1's agent away so the run cannot progress past the upgrade before the kill.
    let n1 = p.node("node-1");
    p.kill_agent(&n1);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_run(|r| r.phase == RunPhase::Running, product::RUN_TIMEOUT)
        .await?;
    p.kill_coordinator();
    p.start_coordinator()?;
    p.start_agent(&n1)?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(p.release().await?.0, recorded + 1, "no second helm upgrade");
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_ignoring_update_strategy_is_refused() -> anyhow::Result<()> {
    // 3.26.0 hard-codes RollingUpdate: a run could not pace it node by node, so it is refused
    // before anything is touched (it used to run with a warning).
    let p = Product::start("oldchart", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let before = p.release().await?;
    let run = p.run("3.26.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert!(
        run.message.contains("older than 3.27.0") && run.message.contains("nothing was changed"),
        "{}",
        run.message
    );
    assert_eq!(p.release().await?, before, "no helm call");
    assert!(run.nodes.is_empty(), "no node touched: {:?}", run.nodes);
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// A plain workload pod pinned to `node` (kwok runs it), labelled `app=<app>`.
async fn workload(p: &Product, node: &str, name: &str, app: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> = kube::Api::namespaced(p.slice.client(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": p.node(node), "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "c", "image": "registry.example/web:1"}]}
    }))?;
    pods.create(&Default::default(), &pod).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_evicts_workloads_and_a_blocking_pdb_fails_the_node_by_name() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let p = Product::start("drain", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let id = p.slice.id().to_string();
    let (evictable, guarded) = (format!("web-{id}"), format!("db-{id}"));
    workload(&p, "node-1", &evictable, &evictable).await?;
    let run = p.run("3.28.0", &[(trigger::DRAIN_ENABLED, "true")]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let pods: kube::Api<Pod> = kube::Api::namespaced(p.slice.client(), "default");
    assert!(
        pods.get_opt(&evictable)
            .await?
            .is_none_or(|x| x.metadata.deletion_timestamp.is_some()),
        "drain evicted the workload"
    );
    let drained = p
        .observed
        .lock()
        .unwrap()
        .transitions
        .iter()
        .any(|(_, s)| s == "draining");
    assert!(drained, "nodes went through draining");

    // Now a PDB that allows no disruption guards a pod on node-1: the drain must time out,
    // name the pod, and the run must roll back.
    workload(&p, "node-1", &guarded, &guarded).await?;
    let pdbs: kube::Api<PodDisruptionBudget> = kube::Api::namespaced(p.slice.client(), "default");
    let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
        "metadata": {"name": guarded},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": guarded}}}
    }))?;
    pdbs.create(&Default::default(), &pdb).await?;
    let run = p
        .run(
            "3.29.0",
            &[
                (trigger::DRAIN_ENABLED, "true"),
                (trigger::DRAIN_TIMEOUT, "8s"),
            ],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let f = run.failure.clone().expect("failure");
    assert!(
        f.reason.contains("DrainTimeout") && f.reason.contains(&guarded),
        "{}",
        f.reason
    );
    assert!(
        pods.get_opt(&guarded)
            .await?
            .is_some_and(|x| x.metadata.deletion_timestamp.is_none()),
        "the guarded pod survived"
    );
    assert_eq!(
        p.release().await?.1,
        "3.28.0",
        "rolled back to the recorded revision (3.28.0)"
    );
    assert_eq!(
        p.node_labels("node-2").await?.0.as_deref(),
        Some("completed"),
        "node-2 untouched by the failed run"
    );
    p.assert_safe(&names(&p, &["node-1", "node-2"])).await?;
    pods.delete(&evictable, &Default::default()).await.ok();
    pdbs.delete(&guarded, &Default::default()).await.ok();
    pods.delete(&guarded, &Default::default()).await.ok();
    Ok(())
}

/// The agent holds no eviction right: it asks the coordinator to drain its node, and the
/// coordinator's drainer checks the request against the run record. A node of the run that is
/// not in its turn (as a compromised agent would: it may write its own Node's draining label,
/// run, turn and request, and cordon itself) while another node is in its turn gets a refusal on
/// its Node and nothing evicted; when the run later grants it its turn, it is drained for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_request_out_of_turn_evicts_nothing() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::{Node, Pod};
    use klm_protocol::drain_request::{DrainResult, DrainState};
    use klm_protocol::keys::node as node_keys;
    use klm_protocol::node_record::NodeRecord;
    let p = Product::start("drainreq", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    // Each turn holds in `verifying` until the test lets it pass.
    for n in ["node-1", "node-2"] {
        p.slice
            .set_verification_outcome(n, "3.28.0", Outcome::Pending);
    }
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::TARGET_VERSION, Some("3.28.0")),
        (trigger::DRAIN_ENABLED, Some("true")),
    ])
    .await?;
    let granted = p
        .wait_run(
            |r| Some(&r.id) != before.as_ref() && r.turn.is_some(),
            product::RUN_TIMEOUT,
        )
        .await?;
    let in_turn = granted.turn.clone().expect("a turn").node;
    let waiting = granted
        .plan
        .iter()
        .find(|n| **n != in_turn)
        .expect("a second node")
        .clone();
    // Held in `verifying` once its (pending) verification pod exists.
    let verification: kube::Api<Pod> =
        kube::Api::namespaced(p.slice.client(), &p.slice.verification_namespace());
    klm_testkit::wait::wait_list(
        &verification,
        kube::runtime::watcher::Config::default().labels(&format!(
            "{}={in_turn}",
            klm_protocol::keys::verification::NODE_LABEL
        )),
        "the verification pod of the node in its turn",
        product::RUN_TIMEOUT,
        |pods| (!pods.is_empty()).then_some(()),
    )
    .await?;
    let run = granted;
    let victim = format!("web-{}", p.slice.id());
    let pods: kube::Api<Pod> = kube::Api::namespaced(p.slice.client(), "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": victim, "labels": {"app": victim}},
        "spec": {"nodeName": waiting, "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "c", "image": "registry.example/web:1"}]}
    }))?;
    pods.create(&Default::default(), &pod).await?;

    // What the agent on `waiting` may write on its own Node (the chart's own-node policy lets
    // it): our draining label, this run and turn, a drain request, a cordon. The status
    // annotation the run machine reads is left alone, so the run itself goes on undisturbed.
    let request = format!("upgrade/{}", run.id);
    let nodes: kube::Api<Node> = kube::Api::all(p.slice.client());
    let forge = |on: bool| {
        let v = |s: &str| on.then(|| s.to_string());
        serde_json::json!({
            "metadata": {
                "labels": {node_keys::STATUS: v("draining")},
                "annotations": {node_keys::RUN_ID: v(&run.id), node_keys::TURN: v("upgrade"),
                                node_keys::DRAIN_REQUEST: v(&request), node_keys::DRAIN_RESULT: None::<String>},
            },
            "spec": {"unschedulable": on.then_some(true)},
        })
    };
    nodes
        .patch(
            &waiting,
            &Default::default(),
            &kube::api::Patch::Merge(forge(true)),
        )
        .await?;
    let refused = klm_testkit::wait::wait_for(
        &nodes,
        &waiting,
        "the coordinator's answer to the out-of-turn drain request",
        klm_testkit::wait::DEFAULT_TIMEOUT,
        klm_testkit::wait::when(|n: &Node| NodeRecord::of(n).drain_result.is_some()),
    )
    .await?
    .and_then(|n| NodeRecord::of(&n).drain_result)
    .expect("a drain result");
    assert_eq!(refused.state, DrainState::Refused, "{refused:?}");
    assert!(
        refused.message.contains("has not granted this node"),
        "{}",
        refused.message
    );
    // The request has been judged and refused; the drainer evicts only for admitted ones.
    assert!(
        pods.get_opt(&victim)
            .await?
            .is_some_and(|x| x.metadata.deletion_timestamp.is_none()),
        "the pod on {waiting} was not evicted"
    );

    // Undo the forgery; once the turn in progress ends, the run grants `waiting` its turn and
    // the coordinator drains it for real.
    nodes
        .patch(
            &waiting,
            &Default::default(),
            &kube::api::Patch::Merge(forge(false)),
        )
        .await?;
    p.slice
        .set_verification_outcome(&waiting, "3.28.0", Outcome::Succeed);
    let_verification_succeed(&p, &in_turn).await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert!(
        pods.get_opt(&victim)
            .await?
            .is_none_or(|x| x.metadata.deletion_timestamp.is_some()),
        "the coordinator drained {waiting} in its turn"
    );
    let after = NodeRecord::of(&nodes.get(&waiting).await?);
    assert_eq!(after.drain_request, None, "the agent withdrew its request");
    assert_eq!(after.drain_result, None::<DrainResult>);
    pods.delete(&victim, &Default::default()).await.ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_trigger_during_a_run_is_reported_not_interleaved() -> anyhow::Result<()> {
    let p = Product::start("second", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice
        .set_verification_outcome("node-1", "3.28.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::TARGET_VERSION, Some("3.28.0")),
        (trigger::VERIFICATION_TIMEOUT, Some("6s")),
    ])
    .await?;
    let n1 = p.node("node-1");
    let first = p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.29.0"))])
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.id, first.id, "the running run continued");
    assert_eq!(run.target_version, "3.28.0");
    assert!(
        run.warnings.iter().any(|w| w.contains("still in progress")),
        "{:?}",
        run.warnings
    );
    // The ignored trigger does not start by itself afterwards.
    let now = p.current_run().await?.unwrap();
    assert_eq!(now.id, first.id);
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_before_its_turn_is_skipped_and_reported() -> anyhow::Result<()> {
    let mut p = Product::start("vanish", 3, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3"]).await?;
    p.slice
        .set_verification_outcome("node-1", "3.28.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::TARGET_VERSION, Some("3.28.0")),
        (trigger::VERIFICATION_TIMEOUT, Some("5s")),
    ])
    .await?;
    let n1 = p.node("node-1");
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    // A new node opting in mid-run is not added to the plan; a planned node that vanishes is skipped.
    p.slice.add_node("node-4").await?;
    p.opt_in(&["node-4"]).await?;
    let n3 = p.node("node-3");
    p.kill_agent(&n3);
    p.slice.delete_node(&n3).await?;
    let run = p.wait_finished_after(before).await?;
    // node-1 timed out (Pending) → the run failed and rolled back; node-3 never got a turn.
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert!(
        !run.plan.contains(&p.node("node-4")),
        "plan is fixed at start"
    );
    assert_eq!(p.node_labels("node-4").await?, (None, None));
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_run_and_rolls_back_what_it_did() -> anyhow::Result<()> {
    let mut p = Product::start("cancel", 3, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3"]).await?;
    // node-2's agent is away, so its turn is granted but not taken when we cancel.
    let n2 = p.node("node-2");
    p.kill_agent(&n2);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_run(
        |r| r.turn.as_ref().is_some_and(|t| t.node == n2),
        product::RUN_TIMEOUT,
    )
    .await?;
    p.annotate(&[(trigger::ACTION, Some(trigger::ACTION_CANCEL))])
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Cancelled, "{run:#?}");
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("rolled-back".into()), Some("3.27.0".into()))
    );
    assert_eq!(p.node_labels("node-2").await?, (None, None));
    assert_eq!(p.node_labels("node-3").await?, (None, None));
    assert_eq!(p.release().await?.1, "3.27.0");
    // The coordinator consumed the action, so it cannot cancel a later run by accident.
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        kube::Api::namespaced(p.slice.client(), &p.slice.namespace())
            .get(product::CM)
            .await?;
    let annotations = cm.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key(trigger::ACTION),
        "{annotations:?}"
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() -> anyhow::Result<()> {
    let mut p = Product::start("leader", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let standby = p.spawn_coordinator_as("coordinator-standby")?;
    let (recorded, ..) = p.release().await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(
        p.release().await?.0,
        recorded + 1,
        "two replicas, one helm upgrade"
    );
    assert!(
        !standby.logs().contains("became leader"),
        "the standby must not lead while the leader lives:\n{}",
        standby.logs()
    );
    // The leader dies without releasing its Lease; the standby takes over after expiry.
    p.kill_coordinator();
    let run = p.run("3.29.0", &[]).await?;
    assert_eq!(
        run.phase,
        RunPhase::Succeeded,
        "{run:#?}\n{}",
        standby.logs()
    );
    assert!(standby.logs().contains("became leader"));
    assert_eq!(p.release().await?.0, recorded + 2);
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_mid_turn_fails_safely_when_its_lease_expires() -> anyhow::Result<()> {
    let mut p = Product::start("lost", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice
        .set_verification_outcome("node-1", "3.28.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    let n1 = p.node("node-1");
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    // The node goes NotReady and its agent with it: nobody renews the upgrade Lease.
    p.slice.set_node_not_ready(&n1).await?;
    p.kill_agent(&n1);
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let f = run.failure.clone().expect("failure");
    assert_eq!(f.node.as_deref(), Some(n1.as_str()));
    assert!(f.reason.contains("stopped renewing"), "{}", f.reason);
    // Never silently skipped: the node is marked failed and stays cordoned for a human.
    let (status, _) = p.node_labels("node-1").await?;
    assert_eq!(status.as_deref(), Some("failed"));
    assert_eq!(
        p.node_labels("node-2").await?,
        (None, None),
        "node-2 untouched"
    );
    assert_eq!(p.release().await?.1, "3.27.0");
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// node-2's agent is gone before its turn (its DaemonSet pod not running there): nobody takes
/// the granted turn, so after the turn-start timeout (20 s here) the node is failed by name,
/// the run rolls back, node-1 is restored — and node-2, never touched by an agent, is not left
/// cordoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_absent_when_its_turn_comes_fails_the_node_after_the_turn_start_timeout()
-> anyhow::Result<()> {
    let mut p = Product::start("absent", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let n2 = p.node("node-2");
    p.kill_agent(&n2);
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let f = run.failure.clone().expect("failure");
    assert_eq!(f.node.as_deref(), Some(n2.as_str()), "{run:#?}");
    assert!(
        f.reason.contains("did not take its turn within 20s"),
        "{}",
        f.reason
    );
    p.assert_nodes_at(&["node-1"], "rolled-back", "3.27.0")
        .await?;
    let (status, _) = p.node_labels("node-2").await?;
    assert_eq!(status.as_deref(), Some("failed"), "never silently skipped");
    assert_eq!(p.release().await?.1, "3.27.0");
    p.assert_nothing_left_cordoned().await?;
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_pod_that_never_schedules_fails_with_the_reason() -> anyhow::Result<()> {
    let p = Product::start("unsched", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    // Scheduled by the real scheduler (no nodeName): pinned to its node by hostname, as the
    // verification template policy requires, plus a label no node has.
    let template = p.slice.verification_pod_template().replace(
        "  nodeName: ${NODE}\n",
        "  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n    no-such-label: \"true\"\n",
    );
    assert!(template.contains("no-such-label"), "{template}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(template);
    let run = p
        .run(
            "3.28.0",
            &[
                (trigger::VERIFICATION_POD, &b64),
                (trigger::VERIFICATION_TIMEOUT, "5s"),
            ],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let f = run.failure.clone().expect("failure");
    assert!(f.reason.contains("Timeout"), "{}", f.reason);
    assert!(
        f.reason.contains("unschedulable"),
        "the reason says why: {}",
        f.reason
    );
    assert_eq!(
        p.node_labels("node-1").await?.0.as_deref(),
        Some("rolled-back")
    );
    assert_eq!(p.release().await?.1, "3.27.0");
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// Leaves the release as an interrupted `helm upgrade` does: a newer revision in helm's storage
/// with status `pending-upgrade` (helm stores each revision as a Secret holding gzipped JSON).
async fn leave_release_pending(p: &Product) -> anyhow::Result<()> {
    use flate2::Compression;
    use flate2::read::GzDecoder;
    use flate2::write::GzEncoder;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use std::io::{Read, Write};
    let ns = p.slice.kata_deploy_namespace();
    let secrets: kube::Api<Secret> = kube::Api::namespaced(p.slice.client(), &ns);
    let (rev, ..) = p.release().await?;
    let name = format!("sh.helm.release.v1.{}.v{rev}", product::RELEASE);
    let mut secret = secrets.get(&name).await?;
    let b64 = &secret.data.as_ref().expect("data")["release"].0;
    let gz = base64::engine::general_purpose::STANDARD.decode(b64)?;
    let mut json = String::new();
    GzDecoder::new(&gz[..]).read_to_string(&mut json)?;
    let mut release: serde_json::Value = serde_json::from_str(&json)?;
    let next = rev + 1;
    release["version"] = serde_json::json!(next);
    release["info"]["status"] = serde_json::json!("pending-upgrade");
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(serde_json::to_string(&release)?.as_bytes())?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(enc.finish()?);
    let new_name = format!("sh.helm.release.v1.{}.v{next}", product::RELEASE);
    secret.metadata = kube::api::ObjectMeta {
        name: Some(new_name),
        namespace: Some(ns),
        labels: secret.metadata.labels.take().map(|mut l| {
            l.insert("status".into(), "pending-upgrade".into());
            l.insert("version".into(), next.to_string());
            l
        }),
        ..Default::default()
    };
    secret.data = Some([("release".to_string(), ByteString(encoded.into_bytes()))].into());
    secrets.create(&Default::default(), &secret).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_left_pending_is_refused_and_nothing_changes() -> anyhow::Result<()> {
    let p = Product::start("pending", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    leave_release_pending(&p).await?;
    let (rev, _, status) = p.release().await?;
    assert_eq!(
        status, "pending-upgrade",
        "the fixture is what an interrupted upgrade leaves"
    );
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert!(
        run.message.contains("pending-upgrade") && run.message.contains("not deployed"),
        "{}",
        run.message
    );
    assert_eq!(p.release().await?.0, rev, "no helm call was made");
    assert_eq!(p.node_labels("node-1").await?, (None, None));
    Ok(())
}

/// Lets the (pending) verification pod on `node` succeed now.
async fn let_verification_succeed(p: &Product, node: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> =
        kube::Api::namespaced(p.slice.client(), &p.slice.verification_namespace());
    // The agent shows `verifying` before its pod exists: wait (watch) for the one pod.
    let selector = format!("{}={node}", klm_protocol::keys::verification::NODE_LABEL);
    let name = klm_testkit::wait::wait_list(
        &pods,
        kube::runtime::watcher::Config::default().labels(&selector),
        &format!("the verification pod on {node}"),
        std::time::Duration::from_secs(60),
        |pods| match pods {
            [one] => one.metadata.name.clone(),
            _ => None,
        },
    )
    .await?;
    pods.patch(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "metadata": {"labels": {klm_testkit::verification::OUTCOME_LABEL: Outcome::Succeed.label()}}
        })),
    )
    .await?;
    Ok(())
}

/// Issue 9.1: a healthy turn much longer than the turn-start timeout and the Lease duration
/// (the verification pod runs ~20 s; turn-start timeout 3 s, Lease 6 s) must not be declared
/// lost, whatever order the coordinator sees "completed" and the Lease release in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_longer_than_the_turn_start_timeout_and_the_lease_succeeds() -> anyhow::Result<()> {
    let p = Product::start_with("longturn", 2, "3.27.0", &["--turn-start-timeout", "3s"]).await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let n1 = p.node("node-1");
    // The scenario is a long verification: it runs well past every coordinator bound.
    p.slice.set_verification_outcome(
        "node-1",
        "3.28.0",
        Outcome::SucceedAfter(std::time::Duration::from_secs(20)),
    );
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("completed".into()), Some("3.28.0".into()))
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// A helm wrapper whose `verb` subcommand never returns; every other call runs the real helm.
fn hanging_helm(verb: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path =
        std::env::temp_dir().join(format!("klm-helm-hanging-on-{verb}-{}", std::process::id()));
    std::fs::write(
        &path,
        format!("#!/bin/sh\nif [ \"$1\" = {verb} ]; then exec sleep 300; fi\nexec helm \"$@\"\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Issue 9.3: the leader is killed while its `helm upgrade` runs, leaving the release
/// `pending-upgrade` one revision above the recorded one. The next leader rolls back to the
/// recorded revision: never a second upgrade, never stuck, no node touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helm_upgrade_killed_midway_is_rolled_back_by_the_next_leader() -> anyhow::Result<()> {
    // A helm whose `upgrade` never returns (the process the SIGKILL interrupts).
    let hang = hanging_helm("upgrade")?;
    let hang_arg = hang.display().to_string();
    let mut p = Product::start_with("helmkill", 1, "3.27.0", &["--helm", &hang_arg]).await?;
    p.opt_in(&["node-1"]).await?;
    let (recorded, ..) = p.release().await?;
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_run(
        |r| r.phase == RunPhase::Upgrading && r.release.as_ref().is_some_and(|x| x.upgrade_issued),
        product::RUN_TIMEOUT,
    )
    .await?;
    // What helm had written when it was killed.
    leave_release_pending(&p).await?;
    p.kill_coordinator();
    p.extra_coordinator_args.clear();
    p.start_coordinator()?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert!(run.message.contains("interrupted"), "{}", run.message);
    let (rev, version, status) = p.release().await?;
    assert_eq!(
        (version.as_str(), status.as_str()),
        ("3.27.0", "deployed"),
        "rolled back to the recorded version"
    );
    assert_eq!(
        rev,
        recorded + 3,
        "the interrupted revision, a rollback clearing its pending state, then the restore: \
         no second upgrade"
    );
    assert_eq!(p.node_labels("node-1").await?, (None, None));
    p.assert_safe(&run.plan).await?;
    let _ = std::fs::remove_file(&hang);
    Ok(())
}

/// Issue 9.5: an unreadable run record pauses the coordinator with a clear message; it is
/// never overwritten, and no new run starts on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_run_record_pauses_with_a_message() -> anyhow::Result<()> {
    let mut p = Product::start("corrupt", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    p.kill_coordinator();
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    cms.patch(
        product::CM,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"data": {"run.json": "{truncated"}})),
    )
    .await?;
    p.start_coordinator()?;
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    klm_testkit::wait::wait_for(
        &cms,
        product::CM,
        "a notice saying the coordinator is paused",
        std::time::Duration::from_secs(60),
        klm_testkit::wait::when(|cm: &k8s_openapi::api::core::v1::ConfigMap| {
            cm.data
                .as_ref()
                .and_then(|d| d.get("notice"))
                .is_some_and(|n| n.contains("unreadable") && n.contains("paused"))
        }),
    )
    .await?;
    let cm = cms.get(product::CM).await?;
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("run.json")
            .map(String::as_str),
        Some("{truncated"),
        "the record is left for a human"
    );
    assert_eq!(p.release().await?.1, "3.27.0", "no run started");
    assert_eq!(p.node_labels("node-1").await?, (None, None));
    Ok(())
}

/// Issue 9.5: the upgrade Lease deleted while the coordinator runs is recreated without a
/// restart, and the next run works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_upgrade_lease_is_recreated_without_a_restart() -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let p = Product::start("leasegone", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let leases: kube::Api<Lease> = kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    let name = klm_protocol::keys::defaults::UPGRADE_LEASE;
    klm_testkit::wait::wait_for(
        &leases,
        name,
        "the coordinator's upgrade Lease",
        std::time::Duration::from_secs(60),
        klm_testkit::wait::when(|_: &Lease| true),
    )
    .await?;
    let uid = leases.get(name).await?.metadata.uid;
    leases.delete(name, &Default::default()).await?;
    klm_testkit::wait::wait_for(
        &leases,
        name,
        "the upgrade Lease recreated",
        std::time::Duration::from_secs(60),
        klm_testkit::wait::when(move |l: &Lease| l.metadata.uid != uid),
    )
    .await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// Issue 9.8: a `rollback-node` refused while a run is in progress is consumed, so the same
/// request made again once the run is over is acted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rollback_node_can_be_requested_again() -> anyhow::Result<()> {
    let p = Product::start("rbagain", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let n1 = p.node("node-1");
    p.slice
        .set_verification_outcome("node-1", "3.28.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&n1))]).await?;
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    klm_testkit::wait::wait_for(
        &cms,
        product::CM,
        "the refused rollback-node consumed",
        std::time::Duration::from_secs(60),
        klm_testkit::wait::when(|cm: &k8s_openapi::api::core::v1::ConfigMap| {
            let refused = cm
                .data
                .as_ref()
                .and_then(|d| d.get("notice"))
                .is_some_and(|n| n.contains("ignored"));
            let gone = !cm
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(trigger::ROLLBACK_NODE));
            refused && gone
        }),
    )
    .await?;
    let_verification_succeed(&p, &n1).await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    // The same request again.
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&n1))]).await?;
    let rb = p.wait_finished_after(Some(run.id.clone())).await?;
    assert_eq!(rb.phase, RunPhase::Succeeded, "{rb:#?}");
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("rolled-back".into()), Some("3.27.0".into()))
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// Issue 9.3: the leader is killed while its `helm rollback` runs; the next leader finishes the
/// rollback (one rollback revision, no second upgrade) and restores the touched nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_during_helm_rollback_is_finished_by_the_next_leader()
-> anyhow::Result<()> {
    let hang = hanging_helm("rollback")?;
    let hang_arg = hang.display().to_string();
    let mut p = Product::start_with("rbkill", 2, "3.27.0", &["--helm", &hang_arg]).await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice
        .set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
    let (recorded, ..) = p.release().await?;
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_run(|r| r.phase == RunPhase::RollingBack, product::RUN_TIMEOUT)
        .await?;
    p.kill_coordinator();
    p.extra_coordinator_args.clear();
    p.start_coordinator()?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    assert_eq!(
        run.failure.as_ref().and_then(|f| f.node.clone()),
        Some(p.node("node-2"))
    );
    for n in ["node-1", "node-2"] {
        assert_eq!(
            p.node_labels(n).await?,
            (Some("rolled-back".into()), Some("3.27.0".into())),
            "{n}"
        );
    }
    let (rev, version, status) = p.release().await?;
    assert_eq!((version.as_str(), status.as_str()), ("3.27.0", "deployed"));
    assert_eq!(rev, recorded + 2, "one upgrade, one rollback");
    p.assert_safe(&names(&p, &["node-1", "node-2"])).await?;
    let _ = std::fs::remove_file(&hang);
    Ok(())
}

/// Issue 11: an annotation under our prefix that nothing reads (a typo) is reported in the run,
/// not silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_a_trigger_annotation_is_reported_in_the_run() -> anyhow::Result<()> {
    let p = Product::start("typo", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let run = p
        .run(
            "3.28.0",
            &[("lifecycle.katacontainers.io/drain-enable", "true")],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert!(
        run.warnings
            .iter()
            .any(|w| w.contains("lifecycle.katacontainers.io/drain-enable")),
        "{:?}",
        run.warnings
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}

/// Each slice node's kata-deploy pod: (uid, image), by node.
async fn kata_deploy_pods(
    p: &Product,
) -> anyhow::Result<std::collections::BTreeMap<String, (String, String)>> {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(p.slice.client(), &p.slice.kata_deploy_namespace());
    let list = pods
        .list(&kube::api::ListParams::default().labels("name=kata-deploy"))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let spec = pod.spec?;
            Some((
                spec.node_name?,
                (pod.metadata.uid?, spec.containers.first()?.image.clone()?),
            ))
        })
        .collect())
}

/// The slice's kata-deploy DaemonSet as the API server has it.
async fn kata_deploy_daemonset(
    p: &Product,
) -> anyhow::Result<k8s_openapi::api::apps::v1::DaemonSet> {
    let ds: kube::Api<k8s_openapi::api::apps::v1::DaemonSet> =
        kube::Api::namespaced(p.slice.client(), &p.slice.kata_deploy_namespace());
    Ok(ds.get("kata-deploy").await?)
}

async fn update_strategy(p: &Product) -> anyhow::Result<Option<String>> {
    Ok(kata_deploy_daemonset(p)
        .await?
        .spec
        .and_then(|s| s.update_strategy)
        .and_then(|u| u.type_))
}

/// Issue 9.2. The recorded revision of a default install has `RollingUpdate`: restoring it
/// with `helm rollback` let the DaemonSet controller replace every upgraded node's pod by
/// itself. The restore keeps `OnDelete`, so a manual `rollback-node` moves that node's pod and
/// no other, and an automatic rollback moves pods only in restore turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_a_rolling_update_revision_moves_only_the_restored_nodes_pods()
-> anyhow::Result<()> {
    let p = Product::start("paced-rollback", 3, "3.27.0").await?;
    assert_eq!(update_strategy(&p).await?.as_deref(), Some("RollingUpdate"));
    p.opt_in(&["node-1", "node-2", "node-3"]).await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let upgraded = kata_deploy_pods(&p).await?;

    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&p.node("node-2")))])
        .await?;
    let rb = p.wait_finished_after(Some(run.id.clone())).await?;
    assert_eq!(rb.phase, RunPhase::Succeeded, "{rb:#?}");
    // The release is back at the recorded chart version, still paced.
    assert_eq!(p.release().await?.1, "3.27.0");
    assert_eq!(update_strategy(&p).await?.as_deref(), Some("OnDelete"));
    let after = kata_deploy_pods(&p).await?;
    let n2 = p.node("node-2");
    assert_ne!(after[&n2].0, upgraded[&n2].0, "node-2's pod was restored");
    assert!(after[&n2].1.ends_with(":3.27.0"), "{:?}", after[&n2]);
    for n in ["node-1", "node-3"] {
        let n = p.node(n);
        assert_eq!(after[&n], upgraded[&n], "{n}'s pod must not move");
    }

    // An automatic rollback to the same revision: only restore turns move pods.
    p.slice
        .set_verification_outcome("node-2", "3.29.0", Outcome::Fail);
    let before = kata_deploy_pods(&p).await?;
    let failed = p.run("3.29.0", &[]).await?;
    assert_eq!(failed.phase, RunPhase::Failed, "{failed:#?}");
    assert_eq!(update_strategy(&p).await?.as_deref(), Some("OnDelete"));
    let end = kata_deploy_pods(&p).await?;
    let n3 = p.node("node-3");
    assert_eq!(end[&n3], before[&n3], "node-3 was never reached");
    p.assert_safe(&names(&p, &["node-1", "node-2", "node-3"]))
        .await?;
    Ok(())
}

/// Issue 10.4: `helm-set-values` reach the rendered DaemonSet as separate `--set` entries; a
/// key pacing depends on is refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_set_values_reach_the_daemonset_and_pacing_keys_are_refused() -> anyhow::Result<()> {
    let p = Product::start("setvalues", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let run = p
        .run(
            "3.28.0",
            &[(
                trigger::HELM_SET_VALUES,
                "image.reference=mirror.example/kata-deploy\nenv.debug=true",
            )],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let container = kata_deploy_daemonset(&p)
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].clone())
        .expect("a container");
    assert_eq!(
        container.image.as_deref(),
        Some("mirror.example/kata-deploy:3.28.0")
    );
    let pods = kata_deploy_pods(&p).await?;
    assert_eq!(
        pods[&p.node("node-1")].1,
        "mirror.example/kata-deploy:3.28.0"
    );
    assert_eq!(update_strategy(&p).await?.as_deref(), Some("OnDelete"));

    let (revision, ..) = p.release().await?;
    let refused = p
        .run(
            "3.29.0",
            &[(
                trigger::HELM_SET_VALUES,
                "updateStrategy.type=RollingUpdate",
            )],
        )
        .await?;
    assert_eq!(refused.phase, RunPhase::Failed, "{refused:#?}");
    assert!(
        refused.message.contains("helm-set-values")
            && refused.message.contains("cannot be set per run"),
        "{}",
        refused.message
    );
    assert_eq!(p.release().await?.0, revision, "no helm call");
    assert_eq!(kata_deploy_pods(&p).await?, pods, "nothing moved");
    p.assert_safe(&names(&p, &["node-1"])).await?;
    Ok(())
}

/// Issue 10.6: kata-deploy 3.27.0/3.28.0 cleans Kata off a node whenever its pod restarts, so a
/// run upgrading *from* them drains each node first unless `drain-enabled` says otherwise, and
/// says why in its warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_a_cleaning_kata_deploy_drains_unless_told_not_to() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let p = Product::start("hazard", 2, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let id = p.slice.id().to_string();
    let (drained, kept) = (format!("kata-a-{id}"), format!("kata-b-{id}"));
    workload(&p, "node-1", &drained, &drained).await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert!(
        run.warnings
            .iter()
            .any(|w| w.contains("preStop") && w.contains("drains each node")),
        "{:?}",
        run.warnings
    );
    let pods: kube::Api<Pod> = kube::Api::namespaced(p.slice.client(), "default");
    assert!(
        pods.get_opt(&drained)
            .await?
            .is_none_or(|x| x.metadata.deletion_timestamp.is_some()),
        "the drain evicted the Kata workload before the restart"
    );

    // From 3.28.0 too, but the user said no drain: the workload stays, the warning says so.
    workload(&p, "node-1", &kept, &kept).await?;
    let run = p
        .run("3.29.0", &[(trigger::DRAIN_ENABLED, "false")])
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert!(
        run.warnings
            .iter()
            .any(|w| w.contains("drain-enabled=false was asked for")),
        "{:?}",
        run.warnings
    );
    assert!(
        pods.get_opt(&kept)
            .await?
            .is_some_and(|x| x.metadata.deletion_timestamp.is_none()),
        "no drain when the user said so"
    );
    p.assert_safe(&names(&p, &["node-1"])).await?;
    Ok(())
}

/// Issue 10.5: Helm 4 is what the tests (and the coordinator image) run; Helm 3 keeps working:
/// the same upgrade and automatic restore with the coordinator on Helm 3.22.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_helm_3_upgrades_and_restores() -> anyhow::Result<()> {
    let probe = klm_testkit::Cluster::shared().await;
    let helm3 = probe.tools_dir().join("helm3").display().to_string();
    let p = Product::start_with("helm3", 2, "3.27.0", &["--helm", &helm3]).await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice
        .set_verification_outcome("node-2", "3.29.0", Outcome::Fail);
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let upgraded = kata_deploy_pods(&p).await?;
    let (recorded, ..) = p.release().await?;
    let failed = p.run("3.29.0", &[]).await?;
    assert_eq!(failed.phase, RunPhase::Failed, "{failed:#?}");
    let (revision, version, status) = p.release().await?;
    assert_eq!((version.as_str(), status.as_str()), ("3.28.0", "deployed"));
    assert_eq!(revision, recorded + 2, "one upgrade, one restore");
    assert_eq!(update_strategy(&p).await?.as_deref(), Some("OnDelete"));
    for n in ["node-1", "node-2"] {
        assert_eq!(
            p.node_labels(n).await?,
            (Some("rolled-back".into()), Some("3.28.0".into())),
            "{n}"
        );
    }
    let restored = kata_deploy_pods(&p).await?;
    for (node, (uid, image)) in &restored {
        assert!(image.ends_with(":3.28.0"), "{node}: {image}");
        assert_ne!(
            uid, &upgraded[node].0,
            "{node} went through 3.29.0 and back"
        );
    }
    p.assert_safe(&names(&p, &["node-1", "node-2"])).await?;
    Ok(())
}

/// Issue 14.3: `action=pause` stops granting turns once the node in progress finishes, visibly
/// (run message, Event); `action=resume` continues from where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_resume_continues_where_it_stopped() -> anyhow::Result<()> {
    let p = Product::start("pause", 3, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3"]).await?;
    // Paused, and the node that was in progress has finished.
    let (before, paused) = p.trigger_then_pause("3.28.0").await?;
    assert_eq!(paused.phase, RunPhase::Running, "{paused:#?}");
    assert!(paused.message.contains("paused"), "{}", paused.message);
    let started: Vec<&String> = paused
        .plan
        .iter()
        .filter(|n| paused.nodes.get(*n).and_then(|r| r.status).is_some())
        .collect();
    assert!(
        !started.is_empty() && started.len() < paused.plan.len(),
        "some node done, some not started: {started:?}"
    );
    for n in &started {
        assert_eq!(paused.nodes[*n].status, Some(NodeStatus::Completed), "{n}");
    }
    // Full node names pass through `Product::node`.
    let unstarted = paused.plan[started.len()].clone();
    assert_eq!(
        p.node_labels(&unstarted).await?,
        (None, None),
        "{unstarted}"
    );

    p.annotate(&[(trigger::ACTION, Some(trigger::ACTION_RESUME))])
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(run.completed(), 3);
    assert!(!run.paused);
    p.assert_safe(&names(&p, &["node-1", "node-2", "node-3"]))
        .await?;
    Ok(())
}
