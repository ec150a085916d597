//! kata-deploy's job mode (`deploymentMode: job`, chart ≥ 3.32.0) on the **upstream** charts,
//! with kata-deploy's images played by the testkit (`klm_testkit::kata_deploy_sim`: the
//! dispatcher hook's fan-out into per-node install Jobs, their outcomes, the
//! `katacontainers.io/kata-runtime` node label) and the safety monitor on.
//!
//! kata-deploy's cluster-scoped objects belong to one release at a time, so the scenarios run
//! one after another in this binary's single test.
mod product;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use klm_protocol::RunPhase;
use klm_protocol::keys::trigger;
use klm_testkit::InstallOutcome;
use klm_testkit::kata_deploy_sim::{KATA_RUNTIME_LABEL, STAGE_LABEL};
use klm_testkit::upstream::UpstreamRepo;
use klm_testkit::wait::{DEFAULT_TIMEOUT, wait_list};
use kube::api::Api;
use kube::runtime::watcher;
use product::{Product, RELEASE};

/// Replaces the slice's release by the upstream chart at `version` with `sets`, without
/// waiting for a DaemonSet (job mode has none).
async fn install_upstream(p: &Product, repo: &str, version: &str, sets: &[&str]) -> Result<()> {
    let ns = p.slice.kata_deploy_namespace();
    p.slice
        .helm(&[
            "uninstall",
            RELEASE,
            "-n",
            &ns,
            "--ignore-not-found",
            "--no-hooks",
            "--wait",
        ])
        .await?;
    let mut args = vec![
        "install",
        RELEASE,
        "kata-deploy",
        "--repo",
        repo,
        "--version",
        version,
        "-n",
        &ns,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    p.slice.helm(&args).await?;
    Ok(())
}

/// Waits until every one of `nodes` carries `katacontainers.io/kata-runtime=<value>`.
async fn wait_runtime_label(p: &Product, nodes: &[String], value: &str) -> Result<()> {
    let api: Api<Node> = Api::all(p.slice.client());
    wait_list(
        &api,
        watcher::Config::default().labels(&p.slice.node_selector()),
        &format!("{KATA_RUNTIME_LABEL}={value} on {nodes:?}"),
        DEFAULT_TIMEOUT,
        |all| {
            nodes
                .iter()
                .all(|n| {
                    all.iter().any(|node| {
                        node.metadata.name.as_ref() == Some(n)
                            && node
                                .metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get(KATA_RUNTIME_LABEL))
                                .map(String::as_str)
                                == Some(value)
                    })
                })
                .then_some(())
        },
    )
    .await
}

/// The release's per-node install Jobs: (node, image tag, outcome) — `Some(true)` complete,
/// `Some(false)` failed.
async fn install_jobs(p: &Product) -> Result<Vec<(String, String, Option<bool>)>> {
    let jobs: Api<Job> = Api::namespaced(p.slice.client(), &p.slice.kata_deploy_namespace());
    let list = jobs
        .list(&kube::api::ListParams::default().labels(&format!("{STAGE_LABEL}=install")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|j| {
            let spec = j.spec.as_ref().and_then(|s| s.template.spec.as_ref());
            let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
            let image = spec
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let tag = image.rsplit(':').next().unwrap_or_default().to_string();
            let conds = j
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let done = if conds
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
            {
                Some(true)
            } else if conds
                .iter()
                .any(|c| c.type_ == "Failed" && c.status == "True")
            {
                Some(false)
            } else {
                None
            };
            (node, tag, done)
        })
        .collect())
}

/// A refused run: failed with `needle` in its message, the release and the nodes untouched.
async fn assert_refused(
    p: &Product,
    target: &str,
    params: &[(&str, &str)],
    needle: &str,
) -> Result<()> {
    let before = p.release().await?;
    let jobs_before = p.slice.dispatched_install_jobs().len();
    let run = p.run(target, params).await?;
    ensure!(run.phase == RunPhase::Failed, "{needle}: {run:#?}");
    ensure!(
        run.message.contains(needle) && run.message.contains("nothing was changed")
            || run.message.contains(needle) && run.message.contains("Migrate first"),
        "{needle}: {}",
        run.message
    );
    ensure!(p.release().await? == before, "{needle}: no helm call");
    ensure!(run.nodes.is_empty(), "{needle}: no node touched");
    ensure!(
        p.slice.dispatched_install_jobs().len() == jobs_before,
        "{needle}: nothing installed"
    );
    p.assert_safe(&run.plan).await?;
    // Off the trigger, so that the next request is a new run.
    let mut off: Vec<(&str, Option<&str>)> = vec![(trigger::TARGET_VERSION, None)];
    off.extend(params.iter().map(|(k, _)| (*k, None)));
    p.annotate(&off).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_mode_on_the_upstream_charts() -> Result<()> {
    let upstream = UpstreamRepo::serve().await?;
    let repo = upstream.url().to_string();
    let p = Product::start_with("jobmode", 3, "3.27.0", &["--chart-repo", &repo]).await?;
    p.opt_in(&["node-1", "node-2", "node-3"]).await?;
    let nodes: Vec<String> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| p.node(n))
        .collect();

    // A job-mode release at 3.32.0: helm waits on the dispatcher hook, which installs on every
    // node of the slice (no job.nodes: the chart's node selector).
    install_upstream(
        &p,
        &repo,
        "3.32.0",
        &["deploymentMode=job", "job.backoffLimit=0"],
    )
    .await
    .context("job-mode install")?;
    wait_runtime_label(&p, &nodes, "true").await?;
    let jobs = install_jobs(&p).await?;
    for n in &nodes {
        ensure!(
            jobs.contains(&(n.clone(), "3.32.0".into(), Some(true))),
            "{n}: {jobs:?}"
        );
    }

    // Refusals, nothing touched: a switch to daemonset, job mode down to 3.31.0, and (for now)
    // any job-mode run — the per-node scoped upgrades are decided but not yet driven.
    assert_refused(
        &p,
        "4.0.0",
        &[(trigger::DEPLOYMENT_MODE, "daemonset")],
        "--set deploymentMode=daemonset",
    )
    .await?;
    assert_refused(&p, "3.31.0", &[], "older than 3.32.0").await?;
    assert_refused(&p, "4.0.0", &[], "job-mode runs").await?;

    // The scoped install the coordinator is to issue per node: `job.nodes={node}` makes the
    // dispatcher install on that node only.
    let ns = p.slice.kata_deploy_namespace();
    let one = format!("job.nodes={{{}}}", nodes[0]);
    p.slice
        .helm(&[
            "upgrade",
            RELEASE,
            "kata-deploy",
            "--repo",
            &repo,
            "--version",
            "4.0.0",
            "-n",
            &ns,
            "--reset-then-reuse-values",
            "--set",
            &one,
        ])
        .await
        .context("scoped upgrade of node-1")?;
    let at_4: Vec<_> = install_jobs(&p)
        .await?
        .into_iter()
        .filter(|j| j.1 == "4.0.0")
        .collect();
    ensure!(
        at_4 == [(nodes[0].clone(), "4.0.0".to_string(), Some(true))],
        "only node-1 installs 4.0.0: {at_4:?}"
    );

    // node-2's install fails: its Job fails, the dispatcher (hence helm) fails, node-2 keeps
    // kata-runtime=false, node-3 has no install Job at 4.0.0.
    p.slice
        .set_install_outcome("node-2", "4.0.0", InstallOutcome::Fail);
    let two = format!("job.nodes={{{}}}", nodes[1]);
    let out = p
        .slice
        .helm_output(&[
            "upgrade",
            RELEASE,
            "kata-deploy",
            "--repo",
            &repo,
            "--version",
            "4.0.0",
            "-n",
            &ns,
            "--reset-then-reuse-values",
            "--set",
            &two,
        ])
        .await?;
    ensure!(!out.status.success(), "the failed install fails the hook");
    let jobs = install_jobs(&p).await?;
    ensure!(
        jobs.contains(&(nodes[1].clone(), "4.0.0".into(), Some(false))),
        "{jobs:?}"
    );
    ensure!(
        !jobs.iter().any(|j| j.0 == nodes[2] && j.1 == "4.0.0"),
        "node-3 untouched: {jobs:?}"
    );
    wait_runtime_label(&p, &nodes[1..2], "false").await?;
    p.assert_safe(&[]).await?;

    // A daemonset-mode release at 3.32.0: asking for job mode is a switch, refused.
    p.slice
        .helm(&["uninstall", RELEASE, "-n", &ns, "--no-hooks", "--wait"])
        .await?;
    p.slice
        .install_kata_deploy_from(&repo, RELEASE, "3.32.0", &[])
        .await?;
    assert_refused(
        &p,
        "4.0.0",
        &[(trigger::DEPLOYMENT_MODE, "job")],
        "--set deploymentMode=job",
    )
    .await?;
    Ok(())
}
