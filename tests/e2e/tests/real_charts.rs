//! The product on the **upstream** kata-deploy charts (`../shared/kata-deploy-charts`, packaged
//! unmodified, served by a loopback chart repository): for each upgrade path users take, the
//! coordinator and one agent per node upgrade a node and, when the next node's verification
//! fails, restore both to the recorded chart — with the safety monitor on. kata-deploy's
//! cluster-scoped objects (its ClusterRole, RuntimeClasses) belong to one release at a time, so
//! the paths run one after another in this binary's single test.
mod product;

use anyhow::{Context, Result};
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase};
use klm_testkit::Outcome;
use klm_testkit::upstream::{UPGRADE_PATHS, UpstreamRepo};
use product::{Product, RELEASE};

/// Replaces the slice's release by the upstream chart at `version`.
async fn install_upstream(p: &Product, repo: &str, version: &str) -> Result<()> {
    p.uninstall_kata_deploy().await?;
    p.slice
        .install_kata_deploy_from(repo, RELEASE, version, &[])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_charts_upgrade_and_roll_back_node_by_node() -> Result<()> {
    let upstream = UpstreamRepo::serve().await?;
    let repo = upstream.url().to_string();
    let p = Product::start_with("upstream", 2, "3.27.0", &["--chart-repo", &repo]).await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let nodes = [p.node("node-1"), p.node("node-2")];
    for (from, to) in UPGRADE_PATHS {
        let path = format!("{from} -> {to}");
        install_upstream(&p, &repo, from)
            .await
            .with_context(|| path.clone())?;
        p.slice
            .set_verification_outcome("node-2", to, Outcome::Fail);
        let run = p.run(to, &[(trigger::DRAIN_ENABLED, "false")]).await?;
        assert_eq!(run.phase, RunPhase::Failed, "{path}: {run:#?}");
        assert_eq!(
            run.failure.as_ref().and_then(|f| f.node.as_deref()),
            Some(nodes[1].as_str()),
            "{path}"
        );
        // node-1 was upgraded to `to` and verified before node-2 failed; both are restored.
        assert_eq!(
            run.nodes[&nodes[0]].evidence.as_ref().map(|e| e.succeeded),
            Some(true),
            "{path}: node-1's verification at {to}"
        );
        for n in &nodes {
            assert_eq!(
                run.nodes[n].status,
                Some(NodeStatus::RolledBack),
                "{path}: {n}"
            );
        }
        let (_, version, status) = p.release().await?;
        assert_eq!(
            (version.as_str(), status.as_str()),
            (from, "deployed"),
            "{path}"
        );
        p.slice
            .wait_kata_deploy(from)
            .await
            .with_context(|| path.clone())?;
        p.assert_safe(&nodes).await.with_context(|| path.clone())?;
        // The record of each path, for the reader of the test's output (`--nocapture`).
        let history = p
            .slice
            .helm(&[
                "history",
                RELEASE,
                "-n",
                &p.slice.kata_deploy_namespace(),
                "--max",
                "4",
            ])
            .await?;
        eprintln!("== {path}: helm history\n{history}");
        for n in &nodes {
            let r = &run.nodes[n];
            let took = r.started_at_ms.zip(r.finished_at_ms).map(|(a, b)| b - a);
            let evidence = r.evidence.as_ref();
            eprintln!(
                "   {n}: {:?}, turn {took:?} ms, restart {:?} ms, verification {:?} ms",
                r.status,
                evidence.and_then(|e| e.restart_ms),
                evidence.and_then(|e| e.verification_ms),
            );
        }
        // Off the trigger, so the next path's run is a new request even for the same version.
        p.annotate(&[(trigger::TARGET_VERSION, None)]).await?;
    }
    Ok(())
}
