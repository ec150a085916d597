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
use klm_protocol::keys::{node as node_keys, trigger};
use klm_protocol::{NodeStatus, RunPhase};
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
    p.uninstall_kata_deploy().await?;
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
            (node, tag, klm_testkit::kata_deploy_sim::finished(&j))
        })
        .collect())
}

/// The chart versions of the release's revisions after `recorded`, oldest first.
async fn upgrades_since(p: &Product, recorded: u64) -> Result<Vec<String>> {
    let ns = p.slice.kata_deploy_namespace();
    let out = p
        .slice
        .helm(&["history", RELEASE, "-n", &ns, "-o", "json", "--max", "100"])
        .await?;
    let history: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(history
        .iter()
        .filter(|r| r["revision"].as_u64().unwrap_or(0) > recorded)
        .map(|r| {
            r["chart"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("kata-deploy-")
                .to_string()
        })
        .collect())
}

/// A refused run: failed with `needle` in its message, the release and the nodes untouched.
async fn assert_refused(
    p: &Product,
    nodes: &[String],
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
    // The monitor's whole history (earlier runs upgraded these nodes, in this order).
    p.assert_safe(nodes).await?;
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
    let mut p = Product::start_with("jobmode", 3, "3.27.0", &["--chart-repo", &repo]).await?;
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

    // An upgrade run: one scoped helm upgrade per node, in plan order, each installing on its
    // node only when that node's turn came (a node not yet in a turn has no 4.0.0 install Job).
    let recorded = p.release().await?.0;
    let run = p.run("4.0.0", &[]).await?;
    ensure!(run.phase == RunPhase::Succeeded, "{run:#?}");
    ensure!(run.plan == nodes, "{:?}", run.plan);
    let dispatched: Vec<String> = p
        .slice
        .dispatched_install_jobs()
        .into_iter()
        .filter(|j| j.version == "4.0.0")
        .map(|j| j.node)
        .collect();
    ensure!(
        dispatched == nodes,
        "one install per node, in turn order: {dispatched:?}"
    );
    let history = upgrades_since(&p, recorded).await?;
    ensure!(
        history == ["4.0.0", "4.0.0", "4.0.0"],
        "one helm upgrade per node: {history:?}"
    );
    ensure!(p.release().await?.1 == "4.0.0");
    p.assert_safe(&run.plan).await?;
    p.annotate(&[(trigger::TARGET_VERSION, None)]).await?;

    // A failure on node-2 (its install Job fails): node-1 and node-2 get restore turns that
    // reinstall 3.32.0 on each, node-3 is never touched, the release ends at 3.32.0.
    install_upstream(
        &p,
        &repo,
        "3.32.0",
        &["deploymentMode=job", "job.backoffLimit=0"],
    )
    .await
    .context("job-mode reinstall")?;
    wait_runtime_label(&p, &nodes, "true").await?;
    p.slice
        .set_install_outcome("node-2", "4.0.0", InstallOutcome::Fail);
    let recorded = p.release().await?.0;
    let before = p.slice.dispatched_install_jobs().len();
    let run = p.run("4.0.0", &[]).await?;
    ensure!(run.phase == RunPhase::Failed, "{run:#?}");
    ensure!(
        run.failure.as_ref().and_then(|f| f.node.as_deref()) == Some(nodes[1].as_str()),
        "{:?}",
        run.failure
    );
    for n in &nodes[..2] {
        ensure!(
            run.nodes[n].status == Some(NodeStatus::RolledBack),
            "{n}: {:?}",
            run.nodes[n]
        );
    }
    ensure!(
        run.nodes.get(&nodes[2]).and_then(|r| r.status).is_none(),
        "node-3 untouched: {:?}",
        run.nodes.get(&nodes[2])
    );
    let dispatched: Vec<(String, String)> = p.slice.dispatched_install_jobs()[before..]
        .iter()
        .map(|j| (j.node.clone(), j.version.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        (&nodes[0], "4.0.0"),
        (&nodes[1], "4.0.0"),
        (&nodes[1], "3.32.0"),
        (&nodes[0], "3.32.0"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    ensure!(dispatched == want, "installs and restores: {dispatched:?}");
    let (_, version, status) = p.release().await?;
    ensure!(
        (version.as_str(), status.as_str()) == ("3.32.0", "deployed"),
        "{version} {status}"
    );
    let history = upgrades_since(&p, recorded).await?;
    ensure!(
        history == ["4.0.0", "4.0.0", "3.32.0", "3.32.0"],
        "{history:?}"
    );
    wait_runtime_label(&p, &nodes, "true").await?;
    p.assert_safe(&run.plan).await?;
    p.annotate(&[(trigger::TARGET_VERSION, None)]).await?;

    // Refusals, nothing touched: a switch to daemonset, and job mode down to 3.31.0.
    assert_refused(
        &p,
        &nodes,
        "4.0.0",
        &[(trigger::DEPLOYMENT_MODE, "daemonset")],
        "--set deploymentMode=daemonset",
    )
    .await?;
    assert_refused(&p, &nodes, "3.31.0", &[], "older than 3.32.0").await?;

    // A daemonset-mode release at 3.32.0: asking for job mode is a switch, refused.
    let ns = p.slice.kata_deploy_namespace();
    p.slice
        .helm(&["uninstall", RELEASE, "-n", &ns, "--no-hooks", "--wait"])
        .await?;
    p.slice
        .install_kata_deploy_from(&repo, RELEASE, "3.32.0", &[])
        .await?;
    assert_refused(
        &p,
        &nodes,
        "4.0.0",
        &[(trigger::DEPLOYMENT_MODE, "job")],
        "--set deploymentMode=job",
    )
    .await?;

    scoped_upgrade_that_changes_nothing(&mut p, &repo, &nodes).await
}

/// What the failing helm wrapper writes to stderr (the evidence the run must carry).
const SCOPED_HELM_ERROR: &str = "klm-test: scoped upgrade refused before it changed the release";

/// A `helm` for the coordinator that fails the first forward `helm upgrade` carrying `job.nodes`
/// (not a restore: those carry `--reset-values`) with [`SCOPED_HELM_ERROR`], before the real helm
/// runs — so the release never moves and no dispatcher runs, as when the chart is missing or the
/// API refuses. Every other call goes to the real helm. Each call's argv is logged to
/// `<dir>/calls.log`. Returns the wrapper's path.
fn scoped_upgrade_failing_helm(p: &Product) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = p.slice.dir().join("helm-fail-scoped");
    std::fs::create_dir_all(&dir)?;
    let script = format!(
        r#"#!/usr/bin/env bash
set -euo pipefail
dir='{dir}'
printf '%s\n' "$*" >>"$dir/calls.log"
if [[ "${{1:-}}" == upgrade && " $* " == *" job.nodes="* && " $* " != *" --reset-values "* ]] \
  && mkdir "$dir/failed" 2>/dev/null; then
  echo 'Error: UPGRADE FAILED: {SCOPED_HELM_ERROR}' >&2
  exit 1
fi
exec '{real}' "$@"
"#,
        dir = dir.display(),
        real = p.slice.cluster().helm_path().display(),
    );
    let wrapper = dir.join("helm");
    std::fs::write(&wrapper, script)?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

/// The helm calls made through [`scoped_upgrade_failing_helm`] so far.
fn wrapped_helm_calls(p: &Product) -> Vec<String> {
    std::fs::read_to_string(p.slice.dir().join("helm-fail-scoped/calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A job-mode run whose first scoped `helm upgrade` fails without changing the release: the
/// coordinator fails that node at once (`InstallFailed`, helm's error as evidence) instead of
/// leaving its agent to wait for an install Job that will never come. The release keeps its
/// history, no other node is touched, and the failed node stays cordoned (README, Limitations).
async fn scoped_upgrade_that_changes_nothing(
    p: &mut Product,
    repo: &str,
    nodes: &[String],
) -> Result<()> {
    install_upstream(
        p,
        repo,
        "3.32.0",
        &["deploymentMode=job", "job.backoffLimit=0"],
    )
    .await
    .context("job-mode install for the failing scoped upgrade")?;
    wait_runtime_label(p, nodes, "true").await?;
    let wrapper = scoped_upgrade_failing_helm(p)?;
    p.kill_coordinator();
    p.extra_coordinator_args
        .extend(["--helm".to_string(), wrapper.display().to_string()]);
    p.start_coordinator()?;

    let before = p.release().await?;
    let jobs_before = p.slice.dispatched_install_jobs().len();
    let run = p.run("4.0.0", &[]).await?;
    ensure!(run.phase == RunPhase::Failed, "{run:#?}");

    // The first node in turn fails, by the coordinator, with helm's error — not by a timeout.
    let failed = &nodes[0];
    ensure!(run.plan[0] == *failed, "{:?}", run.plan);
    let failure = run
        .failure
        .as_ref()
        .context("a failed run names its failure")?;
    ensure!(
        failure.node.as_deref() == Some(failed.as_str()),
        "{failure:?}"
    );
    let cause = failure
        .evidence
        .as_ref()
        .and_then(|e| e.failure.as_ref())
        .with_context(|| format!("the failure carries evidence: {failure:?}"))?;
    ensure!(cause.reason == "InstallFailed", "not a timeout: {cause:?}");
    ensure!(
        cause.message.contains(SCOPED_HELM_ERROR) && cause.message.contains(failed.as_str()),
        "helm's error as evidence: {cause:?}"
    );
    ensure!(
        run.message.contains(failed.as_str()),
        "the run's message names the node: {}",
        run.message
    );
    let report = &run.nodes[failed];
    ensure!(report.status == Some(NodeStatus::Failed), "{report:?}");
    ensure!(
        report
            .evidence
            .as_ref()
            .and_then(|e| e.failure.as_ref())
            .is_some_and(|c| c.reason == "InstallFailed" && c.message.contains(SCOPED_HELM_ERROR)),
        "the node's evidence: {report:?}"
    );

    // One scoped upgrade attempted, never retried, and no restore turn for the failed node.
    let calls = wrapped_helm_calls(p);
    let scoped: Vec<&String> = calls.iter().filter(|c| c.contains("job.nodes=")).collect();
    ensure!(
        scoped.len() == 1 && scoped[0].contains(&format!("job.nodes={{{failed}}}")),
        "one scoped upgrade, for {failed}: {calls:#?}"
    );

    // The release did not move; nothing was installed anywhere; no other node was touched.
    ensure!(p.release().await? == before, "release unchanged");
    ensure!(
        upgrades_since(p, before.0).await?.is_empty(),
        "no new revision in helm history"
    );
    ensure!(
        p.slice.dispatched_install_jobs().len() == jobs_before,
        "no install Job dispatched"
    );
    for n in &nodes[1..] {
        ensure!(
            run.nodes.get(n).and_then(|r| r.status).is_none(),
            "{n} untouched: {:?}",
            run.nodes.get(n)
        );
    }
    let unschedulable = |node: &Node| {
        node.spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
    };
    for n in nodes {
        let node = p.slice.node(n).await?;
        ensure!(
            unschedulable(&node) == (n == failed),
            "{n}: only the failed node stays cordoned: {:?}",
            node.spec
        );
    }
    // Cordoned by us and labelled failed, for inspection (README, Limitations, job mode).
    let node = p.slice.node(failed).await?;
    let label = |k: &str| {
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .cloned()
    };
    let ours = node
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(node_keys::CORDONED_BY));
    ensure!(
        ours && label(node_keys::STATUS).as_deref() == Some("failed"),
        "{failed}: {:?}",
        node.metadata
    );
    p.assert_safe(&run.plan).await?;
    Ok(())
}
