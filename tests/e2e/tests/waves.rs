//! Waves (`batch-size`): the coordinator and one agent per simulated node, as real processes,
//! against the real control plane with the fixture kata-deploy charts, the safety monitor set
//! to "at most batch-size nodes in progress". Each scenario also asserts that waves are real
//! (the monitor saw that many nodes in progress at once) and that grants follow the plan.
mod product;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase, RunRecord};
use klm_testkit::Outcome;
use product::Product;
use std::collections::BTreeMap;
use std::time::Duration;

fn names(p: &Product, suffixes: &[&str]) -> Vec<String> {
    suffixes.iter().map(|s| p.node(s)).collect()
}

/// The `controller-revision-hash` of the kata-deploy pod on each node.
async fn kata_deploy_hashes(p: &Product) -> Result<BTreeMap<String, String>> {
    let pods: kube::Api<Pod> =
        kube::Api::namespaced(p.slice.client(), &p.slice.kata_deploy_namespace());
    let list = pods
        .list(&kube::api::ListParams::default().labels("name=kata-deploy"))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let hash = pod
                .metadata
                .labels?
                .get("controller-revision-hash")?
                .clone();
            Some((pod.spec?.node_name?, hash))
        })
        .collect())
}

/// Upgrade turns were granted in plan order: the grant times (`startedAtMs`) of the nodes that
/// were granted one never decrease along the plan, and no node after an ungranted one was
/// granted.
fn assert_grants_in_plan_order(run: &RunRecord) -> Result<()> {
    let started: Vec<Option<i64>> = run
        .plan
        .iter()
        .map(|n| run.nodes.get(n).and_then(|r| r.started_at_ms))
        .collect();
    let granted = started.iter().take_while(|s| s.is_some()).count();
    ensure!(
        started[granted..].iter().all(Option::is_none),
        "a node was granted after an earlier one that never was: {started:?}"
    );
    ensure!(
        started[..granted].windows(2).all(|w| w[0] <= w[1]),
        "grants out of plan order: {started:?}"
    );
    Ok(())
}

/// The safety monitor never saw more than two nodes in progress, and did see two at once (the
/// waves were real).
fn assert_waves_of_two(p: &Product) {
    let o = p.observed.lock().unwrap();
    assert!(
        o.concurrent.is_empty(),
        "more than 2 in progress: {:?}",
        o.concurrent
    );
    assert_eq!(
        o.peak_in_progress, 2,
        "waves of two were seen: {:?}",
        o.transitions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_the_second_wave_reverts_both_waves() -> Result<()> {
    let all = ["node-1", "node-2", "node-3", "node-4", "node-5", "node-6"];
    let p = Product::start("wavefail", 6, "3.27.0").await?;
    p.allow_in_progress(2);
    p.opt_in(&all).await?;
    // Second wave: node-3 fails its verification while node-4 is still verifying (slowly), so
    // node-4 is in progress when the run stops and must end its step, then be restored.
    p.slice
        .set_verification_outcome("node-3", "3.28.0", Outcome::Fail);
    p.slice.set_verification_outcome(
        "node-4",
        "3.28.0",
        Outcome::SucceedAfter(Duration::from_secs(20)),
    );
    let (recorded, ..) = p.release().await?;
    let before = kata_deploy_hashes(&p).await?;
    let run = p
        .run(
            "3.28.0",
            &[(trigger::BATCH_SIZE, "2"), (trigger::CANARY, "false")],
        )
        .await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}\n{}", p.logs());
    assert_eq!(
        run.failure.as_ref().and_then(|f| f.node.as_deref()),
        Some(p.node("node-3").as_str()),
        "{run:#?}"
    );
    // Both waves restored: the first (completed), the failed node and its wave-mate.
    for n in ["node-1", "node-2", "node-3", "node-4"] {
        assert_eq!(
            run.nodes[&p.node(n)].status,
            Some(NodeStatus::RolledBack),
            "{n}: {run:#?}"
        );
        p.assert_nodes_at(&[n], "rolled-back", "3.27.0").await?;
    }
    p.assert_untouched(&["node-5", "node-6"]).await?;
    let (rev, version, status) = p.release().await?;
    assert_eq!((version.as_str(), status.as_str()), ("3.27.0", "deployed"));
    assert_eq!(rev, recorded + 2, "one upgrade, one rollback");
    // Every node runs kata-deploy at the recorded DaemonSet revision again.
    p.slice.wait_kata_deploy("3.27.0").await?;
    let old_hash = run.release.as_ref().expect("release").old_hash.clone();
    let after = kata_deploy_hashes(&p).await?;
    for n in names(&p, &all) {
        assert_eq!(after.get(&n), Some(&old_hash), "{n}: pods {after:?}");
        assert_eq!(
            before.get(&n),
            Some(&old_hash),
            "{n} before the run: {before:?}"
        );
    }
    // node-4 was still verifying when node-3 failed: it stopped at its safe point (the
    // coordinator's `NodeStopped` Event), before the release was rolled back.
    use k8s_openapi::api::events::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(p.slice.client(), &p.slice.namespace());
    let notes: Vec<String> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| Some(format!("{}: {}", e.reason?, e.note?)))
        .collect();
    let stopped = format!(
        "NodeStopped: run {}: node {} stopped",
        run.id,
        p.node("node-4")
    );
    assert!(
        notes.iter().any(|n| n.starts_with(&stopped)),
        "{stopped}: {notes:#?}"
    );
    assert_grants_in_plan_order(&run)?;
    p.assert_nothing_left_cordoned().await?;
    p.assert_no_node_processed_twice()?;
    assert_waves_of_two(&p);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_goes_alone_then_waves_of_two() -> Result<()> {
    let all = ["node-1", "node-2", "node-3", "node-4", "node-5"];
    let p = Product::start("wavecanary", 5, "3.27.0").await?;
    p.allow_in_progress(2);
    p.opt_in(&all).await?;
    let (rev_before, ..) = p.release().await?;
    // The canary is the default with a batch size above one.
    let run = p.run("3.28.0", &[(trigger::BATCH_SIZE, "2")]).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert_eq!(run.progress(), "5/5");
    for n in all {
        assert_eq!(
            p.node_labels(n).await?,
            (Some("completed".into()), Some("3.28.0".into())),
            "{n}"
        );
    }
    let (rev, version, _) = p.release().await?;
    assert_eq!((rev, version.as_str()), (rev_before + 1, "3.28.0"));
    assert_grants_in_plan_order(&run)?;
    p.assert_nothing_left_cordoned().await?;
    assert_waves_of_two(&p);
    let o = p.observed.lock().unwrap();
    // The canary: node-1 went alone, from its start until it completed.
    let canary = p.node("node-1");
    let done = o
        .transitions
        .iter()
        .position(|(n, s)| *n == canary && s == "completed")
        .expect("the canary completed");
    let started_meanwhile: Vec<&String> = o.transitions[..done]
        .iter()
        .filter(|(n, s)| *n != canary && s == "preparing")
        .map(|(n, _)| n)
        .collect();
    assert!(
        started_meanwhile.is_empty(),
        "nodes started before the canary completed: {started_meanwhile:?}; {:?}",
        o.transitions
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_size_is_refused_and_changes_nothing() -> Result<()> {
    let p = Product::start("wavebad", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let (rev, ..) = p.release().await?;
    let cases = [
        (trigger::BATCH_SIZE, "0"),
        (trigger::BATCH_SIZE, "51"),
        (trigger::BATCH_SIZE, "two"),
        (trigger::CANARY, "sometimes"),
    ];
    for (key, value) in cases {
        let before = p.current_run().await?.map(|r| r.id);
        p.annotate(&[
            (trigger::TARGET_VERSION, Some("3.28.0")),
            (key, Some(value)),
        ])
        .await?;
        let run = p.wait_finished_after(before).await?;
        assert_eq!(run.phase, RunPhase::Failed, "{key}={value}: {run:#?}");
        assert!(
            run.message.contains(key),
            "{key}={value}: message {:?}",
            run.message
        );
        assert!(run.plan.is_empty(), "{key}={value}: nothing planned");
        p.annotate(&[(trigger::TARGET_VERSION, None), (key, None)])
            .await?;
    }
    assert_eq!(p.release().await?.0, rev, "no helm call was made");
    for n in ["node-1", "node-2"] {
        assert_eq!(p.node_labels(n).await?, (None, None), "{n} was not touched");
    }
    Ok(())
}

/// `action=pause` while a wave of two is in progress: both nodes finish their procedure, no
/// node of the next wave starts while paused (its nodes carry no label of ours), and `resume`
/// runs the next wave; never more than two in progress, grants in plan order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_mid_wave_lets_the_wave_finish_and_starts_no_new_node() -> Result<()> {
    let all = ["node-1", "node-2", "node-3", "node-4"];
    let p = Product::start("wavepause", 4, "3.27.0").await?;
    p.allow_in_progress(2);
    p.opt_in(&all).await?;
    // The first wave verifies long enough for the pause to land while both are in progress.
    for n in ["node-1", "node-2"] {
        p.slice.set_verification_outcome(
            n,
            "3.28.0",
            Outcome::SucceedAfter(Duration::from_secs(8)),
        );
    }
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[
        (trigger::BATCH_SIZE, Some("2")),
        (trigger::CANARY, Some("false")),
        (trigger::TARGET_VERSION, Some("3.28.0")),
    ])
    .await?;
    let in_wave = p
        .wait_run(
            |r| Some(&r.id) != before.as_ref() && r.turns().len() == 2,
            product::RUN_TIMEOUT,
        )
        .await?;
    p.annotate(&[(trigger::ACTION, Some(trigger::ACTION_PAUSE))])
        .await?;
    let paused = p
        .wait_run(|r| r.paused && r.turns().is_empty(), product::RUN_TIMEOUT)
        .await?;
    assert_eq!(paused.id, in_wave.id);
    assert_eq!(paused.phase, RunPhase::Running, "{paused:#?}");
    assert!(paused.message.contains("paused"), "{}", paused.message);
    p.assert_nodes_at(&["node-1", "node-2"], "completed", "3.28.0")
        .await?;
    p.assert_untouched(&["node-3", "node-4"]).await?;

    p.annotate(&[(trigger::ACTION, Some(trigger::ACTION_RESUME))])
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert_eq!(run.progress(), "4/4");
    p.assert_nodes_at(&all, "completed", "3.28.0").await?;
    assert_grants_in_plan_order(&run)?;
    p.assert_nothing_left_cordoned().await?;
    assert_waves_of_two(&p);
    Ok(())
}
