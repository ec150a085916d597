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
        assert_eq!(p.node_labels(n).await?, (Some("completed".into()), Some("3.28.0".into())), "{n}");
    }
    // The node that did not opt in was not touched, and still runs the old kata-deploy pod.
    assert_eq!(p.node_labels("node-5").await?, (None, None));
    let (rev, version, status) = p.release().await?;
    assert_eq!((rev, version.as_str(), status.as_str()), (rev_before + 1, "3.28.0", "deployed"), "exactly one helm upgrade");
    // Every opted-in node's evidence records a verification.
    for n in &plan {
        let ev = run.nodes[n].evidence.clone().expect("evidence");
        assert!(ev.succeeded && ev.verification_ms.is_some(), "{ev:?}");
    }
    p.assert_safe(&plan).await?;
    let holders = p.observed.lock().unwrap().holders.clone();
    assert_eq!(holders, plan, "the upgrade Lease went to each node in plan order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_on_node_two_of_four_rolls_back_to_the_recorded_revision() -> anyhow::Result<()> {
    let p = Product::start("fail2", 4, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2", "node-3", "node-4"]).await?;
    p.slice.set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
    let (recorded, ..) = p.release().await?;
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");
    let failure = run.failure.clone().expect("failure recorded");
    assert_eq!(failure.node.as_deref(), Some(p.node("node-2").as_str()));
    let ev = failure.evidence.expect("evidence");
    assert_eq!(ev.failure.as_ref().and_then(|f| f.exit_code), Some(1), "{ev:?}");
    assert!(run.message.contains(&p.node("node-2")), "{}", run.message);
    for n in ["node-1", "node-2"] {
        assert_eq!(p.node_labels(n).await?, (Some("rolled-back".into()), Some("3.27.0".into())), "{n}");
    }
    for n in ["node-3", "node-4"] {
        assert_eq!(p.node_labels(n).await?, (None, None), "{n} must be untouched");
    }
    let (rev, version, status) = p.release().await?;
    assert_eq!((version.as_str(), status.as_str()), ("3.27.0", "deployed"));
    assert_eq!(rev, recorded + 2, "one upgrade, one rollback");
    assert_eq!(run.release.as_ref().unwrap().recorded_revision as u64, recorded);
    // Every node runs the old kata-deploy again.
    p.slice.wait_kata_deploy("3.27.0").await?;
    p.assert_safe(&names(&p, &["node-1", "node-2", "node-3", "node-4"])).await?;
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
        p.slice.set_verification_outcome("node-1", "3.28.0", outcome);
        let started = std::time::Instant::now();
        let run = p.run("3.28.0", &[(trigger::VERIFICATION_TIMEOUT, timeout)]).await?;
        assert_eq!(run.phase, RunPhase::Failed, "{outcome}: {run:#?}");
        let f = run.failure.clone().expect("failure");
        assert!(f.reason.contains(reason), "{outcome}: {}", f.reason);
        assert!(f.evidence.as_ref().is_some_and(|e| e.pod.is_some()), "{outcome}: {f:?}");
        // Fail fast: well before the 60s verification timeout (except the timeout case).
        eprintln!("{outcome}: run failed after {:?}", started.elapsed());
        assert_eq!(p.node_labels("node-1").await?.0.as_deref(), Some("rolled-back"));
        assert_eq!(p.release().await?.1, "3.27.0");
        // Re-arm: remove the target so the same annotations start a new run next time.
        p.annotate(&[(trigger::TARGET_VERSION, None), (trigger::VERIFICATION_TIMEOUT, None)]).await?;
    }
    p.assert_safe(&names(&p, &["node-1"])).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_end_the_run_with_a_message_and_change_nothing() -> anyhow::Result<()> {
    let p = Product::start("badinput", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let not_never = b64(&p.slice.verification_pod_template().replace("Never", "Always"));
    let not_pod = b64("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n");
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![(trigger::TARGET_VERSION, "not-a-version".into())], "bad target version"),
        (vec![(trigger::NODE_SELECTOR, "a in (b".into())], "node-selector"),
        (vec![(trigger::DRAIN_TIMEOUT, "ten minutes".into())], "drain-timeout"),
        (vec![(trigger::VERIFICATION_POD, "@@not base64@@".into())], "base64"),
        (vec![(trigger::VERIFICATION_POD, b64("a: [broken"))], "YAML"),
        (vec![(trigger::VERIFICATION_POD, not_pod)], "kind: Pod"),
        (vec![(trigger::VERIFICATION_POD, not_never)], "restartPolicy"),
        (vec![(trigger::HELM_RELEASE, "no-such-release".into())], "not found"),
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
        assert!(run.message.contains(needle), "{pairs:?}: message {:?}", run.message);
        // Clear everything for the next case.
        let clear: Vec<(&str, Option<&str>)> = ann.iter().map(|(k, _)| (*k, None)).collect();
        p.annotate(&clear).await?;
    }
    assert_eq!(p.release().await?.0, rev, "no helm call was made");
    assert_eq!(p.node_labels("node-1").await?, (None, None), "no node was touched");
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
    let run = p.run("3.27.0", &[(trigger::DRAIN_ENABLED, "false")]).await?;
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
        p.slice.taint_node(&p.node(n), "kata-lifecycle-manager", "pending", "NoSchedule").await?;
    }
    p.slice.taint_node(&p.node("node-3"), "kata-lifecycle-manager", "done", "NoSchedule").await?;
    // Taint-only: the slice label keeps the test isolated; no window label is needed.
    let sel = p.slice.node_selector();
    let run = p
        .run("3.28.0", &[(trigger::NODE_SELECTOR, &sel), (trigger::NODE_TAINT_KEY, "kata-lifecycle-manager"), (trigger::NODE_TAINT_VALUE, "pending")])
        .await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert_eq!(run.plan, names(&p, &["node-2", "node-4"]));
    assert_eq!(p.node_labels("node-1").await?.0, None);
    assert_eq!(p.node_labels("node-3").await?.0, None);
    // Combined: label AND taint key (any value).
    p.slice.label_node(&p.node("node-3"), "pool", "kata").await?;
    p.slice.label_node(&p.node("node-4"), "pool", "kata").await?;
    let run = p
        .run("3.29.0", &[(trigger::NODE_SELECTOR, &format!("{sel},pool=kata")), (trigger::NODE_TAINT_KEY, "kata-lifecycle-manager"), (trigger::NODE_TAINT_VALUE, "")])
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
    assert_eq!(n1.spec.and_then(|s| s.unschedulable), Some(true), "someone else's cordon must stay");
    let n2 = p.slice.node(&p.node("node-2")).await?;
    assert_ne!(n2.spec.and_then(|s| s.unschedulable), Some(true), "our cordon must be lifted");
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
    p.annotate(&[(trigger::ROLLBACK_NODE, Some(&p.node("node-2")))]).await?;
    let rb = p.wait_finished_after(before).await?;
    assert_eq!(rb.phase, RunPhase::Succeeded, "{rb:#?}");
    assert_eq!(p.node_labels("node-2").await?, (Some("rolled-back".into()), Some("3.27.0".into())));
    assert_eq!(p.node_labels("node-1").await?, (Some("completed".into()), Some("3.28.0".into())));
    assert_eq!(p.release().await?.1, "3.27.0");
    assert_eq!(rb.nodes[&p.node("node-2")].status, Some(NodeStatus::RolledBack));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_verification_resumes() -> anyhow::Result<()> {
    let mut p = Product::start("agentkill", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    // Hold node-1's verification pod Pending while we kill its agent, then let it succeed.
    p.slice.set_verification_outcome("node-1", "3.28.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))]).await?;
    let n1 = p.node("node-1");
    p.wait_run(|r| r.nodes.get(&n1).and_then(|n| n.status) == Some(NodeStatus::Verifying), product::RUN_TIMEOUT).await?;
    p.kill_agent(&n1);
    // The pod the dead agent created stays Pending; the restarted agent adopts it. Let the
    // next pod decision succeed and delete the stuck one so the adopted pod is replaced.
    p.slice.set_verification_outcome("node-1", "3.28.0", Outcome::Succeed);
    p.start_agent(&n1)?;
    let run = p.wait_finished_after(before).await?;
    // Either the adopted Pending pod times out (60s) — a failure — or the agent recreated it.
    // Both are safe; what must hold is that the node was not left half-done and the run ended.
    assert!(run.phase.is_finished());
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_after_helm_upgrade_resumes_without_a_second_upgrade() -> anyhow::Result<()> {
    let mut p = Product::start("coordkill", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let (recorded, ..) = p.release().await?;
    // Keep node-1's agent away so the run cannot progress past the upgrade before the kill.
    let n1 = p.node("node-1");
    p.kill_agent(&n1);
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))]).await?;
    p.wait_run(|r| r.phase == RunPhase::Running, product::RUN_TIMEOUT).await?;
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
async fn chart_ignoring_update_strategy_is_reported() -> anyhow::Result<()> {
    let p = Product::start("oldchart", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let run = p.run("3.26.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    assert!(run.warnings.iter().any(|w| w.contains("ignores updateStrategy")), "{:?}", run.warnings);
    p.assert_safe(&run.plan).await?;
    Ok(())
}
