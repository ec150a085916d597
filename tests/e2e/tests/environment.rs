//! Proof that the test environment is a real Kubernetes, behaving the way the product relies on:
//! optimistic concurrency on Leases, helm installing the fixture chart onto simulated nodes, an
//! `OnDelete` DaemonSet that moves only when a pod is deleted, watches that see strategic-merge
//! patches, PodDisruptionBudgets refusing evictions, and the verification-pod scenarios.

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use klm_testkit::wait::{DEFAULT_TIMEOUT, is_pod_ready, wait_for, wait_list, when};
use klm_testkit::{ANY, Cluster, OUTCOME_LABEL, Outcome, Slice, VERIFICATION_LABEL};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

fn api_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn lease_update_with_stale_resource_version_is_refused_with_409() -> Result<()> {
    let slice = Cluster::shared().await.slice("lease-409", 0).await;
    let leases: Api<Lease> = Api::namespaced(slice.client(), &slice.namespace());
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "upgrade"},
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 30},
    }))?;
    let read = leases.create(&PostParams::default(), &lease).await?;

    // Two agents read the same version; the first update wins...
    let mut first = read.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("node-a".into());
    let won = leases
        .replace("upgrade", &PostParams::default(), &first)
        .await?;
    ensure!(won.resource_version() != read.resource_version());

    // ...the second carries the stale resourceVersion and is refused.
    let mut second = read.clone();
    second.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    let err = leases
        .replace("upgrade", &PostParams::default(), &second)
        .await
        .expect_err("an update with a stale resourceVersion must fail");
    ensure!(
        api_code(&err) == Some(409),
        "expected 409 Conflict, got {err}"
    );

    let now = leases.get("upgrade").await?;
    ensure!(now.spec.unwrap().holder_identity.as_deref() == Some("node-a"));
    Ok(())
}

#[tokio::test]
async fn helm_install_runs_kata_deploy_on_every_slice_node() -> Result<()> {
    let slice = Cluster::shared().await.slice("helm-install", 3).await;
    let pods = slice
        .install_kata_deploy("kata-deploy", "3.27.0", &[])
        .await?;

    let nodes = slice.nodes().await?;
    let mut on: Vec<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    on.sort();
    let mut expected = nodes.clone();
    expected.sort();
    ensure!(on == expected, "pods on {on:?}, slice nodes {nodes:?}");

    let ns = slice.kata_deploy_namespace();
    let ds = Api::<DaemonSet>::namespaced(slice.client(), &ns)
        .get("kata-deploy")
        .await?;
    let spec = ds.spec.clone().unwrap();
    let pod_spec = spec.template.spec.clone().unwrap();
    ensure!(pod_spec.containers[0].name == "kube-kata");
    ensure!(
        pod_spec.containers[0].image.as_deref()
            == Some("quay.io/kata-containers/kata-deploy:3.27.0")
    );
    ensure!(pod_spec.priority_class_name.as_deref() == Some("system-node-critical"));
    ensure!(spec.update_strategy.unwrap().type_.as_deref() == Some("RollingUpdate"));
    // Only this slice's nodes: other tests' nodes exist in the same cluster.
    let all = Api::<Pod>::namespaced(slice.client(), &ns)
        .list(&ListParams::default().labels("name=kata-deploy"))
        .await?;
    ensure!(all.items.len() == nodes.len());

    let status: serde_json::Value = serde_json::from_str(
        &slice
            .helm(&["status", "kata-deploy", "-n", &ns, "-o", "json"])
            .await?,
    )?;
    ensure!(status["info"]["status"] == "deployed", "{status}");
    Ok(())
}

/// The hash of the DaemonSet's newest ControllerRevision: what its pods carry once updated.
async fn current_revision_hash(slice: &Slice, ds: &DaemonSet) -> Result<String> {
    let revisions =
        Api::<ControllerRevision>::namespaced(slice.client(), &slice.kata_deploy_namespace())
            .list(&ListParams::default().labels("name=kata-deploy"))
            .await?;
    let uid = ds.meta().uid.clone();
    let newest = revisions
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .max_by_key(|r| r.revision)
        .context("the DaemonSet has no ControllerRevision")?;
    newest
        .labels()
        .get("controller-revision-hash")
        .cloned()
        .context("revision without controller-revision-hash")
}

fn revision_hash(pod: &Pod) -> Option<String> {
    pod.labels().get("controller-revision-hash").cloned()
}

#[tokio::test]
async fn on_delete_upgrade_moves_only_the_deleted_pod() -> Result<()> {
    let slice = Cluster::shared().await.slice("on-delete", 2).await;
    let ns = slice.kata_deploy_namespace();
    let before = slice
        .install_kata_deploy("kd", "3.27.0", &["updateStrategy.type=OnDelete"])
        .await?;
    let old_hash = revision_hash(&before[0]).context("pod without revision hash")?;

    // What the coordinator does (README, "How it works", step 3).
    slice
        .helm(&[
            "upgrade",
            "kd",
            "kata-deploy",
            "--repo",
            slice.chart_repo_url(),
            "--version",
            "3.28.0",
            "-n",
            &ns,
            "--reset-then-reuse-values",
            "--set",
            "updateStrategy.type=OnDelete",
            "--set",
            "verification.pod=",
        ])
        .await?;

    // Once the DaemonSet controller has observed the new template it would have started a
    // rollout if it were going to; under OnDelete it must report no updated pods.
    let dss: Api<DaemonSet> = Api::namespaced(slice.client(), &ns);
    let ds = wait_for(
        &dss,
        "kata-deploy",
        "DaemonSet controller observing the upgrade",
        DEFAULT_TIMEOUT,
        when(|ds: &DaemonSet| {
            let generation = ds.metadata.generation.unwrap_or(0);
            generation >= 2
                && ds.status.as_ref().and_then(|s| s.observed_generation) == Some(generation)
        }),
    )
    .await?
    .unwrap();
    ensure!(
        ds.spec
            .as_ref()
            .unwrap()
            .update_strategy
            .as_ref()
            .unwrap()
            .type_
            .as_deref()
            == Some("OnDelete")
    );
    // (The API omits a zero updatedNumberScheduled.)
    let updated = ds
        .status
        .as_ref()
        .unwrap()
        .updated_number_scheduled
        .unwrap_or(0);
    ensure!(updated == 0, "{:?}", ds.status);
    let new_hash = current_revision_hash(&slice, &ds).await?;
    ensure!(new_hash != old_hash);

    let pods: Api<Pod> = Api::namespaced(slice.client(), &ns);
    let now = pods
        .list(&ListParams::default().labels("name=kata-deploy"))
        .await?
        .items;
    let uids = |ps: &[Pod]| {
        let mut u: Vec<String> = ps.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        u.sort();
        u
    };
    ensure!(
        uids(&now) == uids(&before),
        "pods changed before any deletion"
    );
    ensure!(
        now.iter()
            .all(|p| revision_hash(p).as_deref() == Some(old_hash.as_str()))
    );

    // Delete node-1's pod: only node-1 moves, to the new revision.
    let node1 = slice.node_name("node-1");
    let node2 = slice.node_name("node-2");
    let on = |node: &str| {
        before
            .iter()
            .find(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(node))
            .unwrap()
            .clone()
    };
    let (old1, old2) = (on(&node1), on(&node2));
    pods.delete(&old1.name_any(), &DeleteParams::default())
        .await?;
    let replacement = wait_list(
        &pods,
        watcher::Config::default().labels("name=kata-deploy"),
        "a Ready replacement pod on node-1",
        DEFAULT_TIMEOUT,
        |ps| {
            ps.iter()
                .find(|p| {
                    p.spec.as_ref().unwrap().node_name.as_deref() == Some(node1.as_str())
                        && p.metadata.uid != old1.metadata.uid
                        && is_pod_ready(p)
                })
                .map(|p| (**p).clone())
        },
    )
    .await?;
    ensure!(revision_hash(&replacement).as_deref() == Some(new_hash.as_str()));
    ensure!(
        replacement.spec.unwrap().containers[0].image.as_deref()
            == Some("quay.io/kata-containers/kata-deploy:3.28.0")
    );
    let still = pods.get(&old2.name_any()).await?;
    ensure!(still.metadata.uid == old2.metadata.uid);
    ensure!(revision_hash(&still).as_deref() == Some(old_hash.as_str()));
    Ok(())
}

#[tokio::test]
async fn charts_before_3_27_ignore_the_update_strategy_value() -> Result<()> {
    let slice = Cluster::shared().await.slice("legacy-chart", 1).await;
    slice
        .install_kata_deploy("kd", "3.26.0", &["updateStrategy.type=OnDelete"])
        .await?;
    let ds = Api::<DaemonSet>::namespaced(slice.client(), &slice.kata_deploy_namespace())
        .get("kata-deploy")
        .await?;
    let strategy = ds.spec.unwrap().update_strategy.unwrap();
    ensure!(
        strategy.type_.as_deref() == Some("RollingUpdate"),
        "{strategy:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_strategic_merge_cordon_is_seen_by_a_watch() -> Result<()> {
    let slice = Cluster::shared().await.slice("cordon-watch", 1).await;
    let node = slice.node_name("node-1");
    let nodes: Api<Node> = Api::all(slice.client());
    let mut events = watcher(
        nodes.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
    )
    .boxed();
    // Start watching before the change, so the change must arrive as a watch event.
    while !matches!(events.try_next().await?, Some(watcher::Event::InitDone)) {}

    nodes
        .patch(
            &node,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await?;

    // The cordon itself, then the node lifecycle controller's unschedulable taint.
    let seen = async {
        let mut cordoned = false;
        while let Some(event) = events.try_next().await? {
            if let watcher::Event::Apply(n) = event {
                let spec = n.spec.unwrap_or_default();
                cordoned |= spec.unschedulable == Some(true);
                let tainted = spec.taints.unwrap_or_default().iter().any(|t| {
                    t.key == "node.kubernetes.io/unschedulable" && t.effect == "NoSchedule"
                });
                if cordoned && tainted {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("watch ended")
    };
    tokio::time::timeout(DEFAULT_TIMEOUT, seen)
        .await
        .context("cordon not seen by the watch")?
}

#[tokio::test]
async fn an_eviction_blocked_by_a_pdb_is_refused_with_429() -> Result<()> {
    let slice = Cluster::shared().await.slice("pdb-evict", 1).await;
    let ns = slice.namespace();
    let pods: Api<Pod> = Api::namespaced(slice.client(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "guarded", "labels": {"app": "guarded"}},
        "spec": {
            "nodeName": slice.node_name("node-1"),
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_for(
        &pods,
        "guarded",
        "pod guarded Ready",
        DEFAULT_TIMEOUT,
        when(is_pod_ready),
    )
    .await?;

    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(slice.client(), &ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "guard"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
    }))?;
    pdbs.create(&PostParams::default(), &pdb).await?;
    // The disruption controller must have computed the budget (else the refusal proves less).
    wait_for(
        &pdbs,
        "guard",
        "PDB status computed",
        DEFAULT_TIMEOUT,
        when(|p: &PodDisruptionBudget| {
            let s = p.status.clone().unwrap_or_default();
            s.observed_generation == p.metadata.generation && s.current_healthy == Some(1)
        }),
    )
    .await?;

    let err = pods
        .evict("guarded", &EvictParams::default())
        .await
        .expect_err("the PDB must block the eviction");
    ensure!(api_code(&err) == Some(429), "expected 429, got {err}");

    // Without the budget the same eviction goes through and the pod goes away.
    pdbs.delete("guard", &DeleteParams::default()).await?;
    let uid = pods.get("guarded").await?.metadata.uid.unwrap();
    pods.evict("guarded", &EvictParams::default()).await?;
    wait_for(
        &pods,
        "guarded",
        "evicted pod gone",
        DEFAULT_TIMEOUT,
        conditions::is_deleted(&uid),
    )
    .await?;
    Ok(())
}

/// Creates verification pod `name` on `node` in the slice's verification namespace.
async fn create_verification_pod(slice: &Slice, name: &str, node: &str) -> Result<()> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {VERIFICATION_LABEL: "true"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{"name": "verify", "image": "registry.example/verify:1"}],
        },
    }))?;
    Api::<Pod>::namespaced(slice.client(), &slice.verification_namespace())
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

/// Whether `pod` shows what `outcome` promises (README, "Failure modes detected").
fn shows(outcome: Outcome, pod: &Pod) -> bool {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref();
    let cs = status.container_statuses.unwrap_or_default();
    let Some(c) = cs.first() else { return false };
    let state = c.state.clone().unwrap_or_default();
    let waiting = state.waiting.as_ref().and_then(|w| w.reason.as_deref());
    let exit = state.terminated.as_ref().map(|t| t.exit_code);
    let labelled = pod.labels().get(OUTCOME_LABEL).map(String::as_str) == Some(outcome.label());
    labelled
        && match outcome {
            Outcome::Succeed => phase == Some("Succeeded") && exit == Some(0),
            Outcome::Fail => phase == Some("Failed") && exit == Some(1),
            Outcome::Pending => phase == Some("Pending") && waiting == Some("ContainerCreating"),
            Outcome::ImagePull => phase == Some("Pending") && waiting == Some("ImagePullBackOff"),
            Outcome::CrashLoop => {
                let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                phase == Some("Running")
                    && waiting == Some("CrashLoopBackOff")
                    && last.map(|t| t.exit_code) == Some(1)
            }
            Outcome::SucceedAfter(_) => phase == Some("Succeeded") && exit == Some(0),
        }
}

async fn expect_outcome(slice: &Slice, name: &str, outcome: Outcome) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(slice.client(), &slice.verification_namespace());
    wait_for(
        &pods,
        name,
        &format!("verification pod {name} to show {outcome}"),
        DEFAULT_TIMEOUT,
        when(move |p: &Pod| shows(outcome, p)),
    )
    .await
    .map(drop)
}

#[tokio::test]
async fn verification_pods_follow_the_scenario_per_node_and_version() -> Result<()> {
    let slice = Cluster::shared().await.slice("verify-outcomes", 2).await;
    let ns = slice.kata_deploy_namespace();
    slice.install_kata_deploy("kd", "3.27.0", &[]).await?;
    let (n1, n2) = (slice.node_name("node-1"), slice.node_name("node-2"));

    // Every outcome, on node-1 under 3.27.0.
    for outcome in Outcome::ALL {
        slice.set_verification_outcome("node-1", "3.27.0", outcome);
        let name = format!("v-{}", outcome.label());
        create_verification_pod(&slice, &name, &n1).await?;
        expect_outcome(&slice, &name, outcome).await?;
    }

    // Keyed by version: node-2 fails only under 3.28.0.
    slice.set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
    create_verification_pod(&slice, "before-upgrade", &n2).await?;
    expect_outcome(&slice, "before-upgrade", Outcome::Succeed).await?;
    slice
        .helm(&[
            "upgrade",
            "kd",
            "kata-deploy",
            "--repo",
            slice.chart_repo_url(),
            "--version",
            "3.28.0",
            "-n",
            &ns,
            "--reset-then-reuse-values",
        ])
        .await?;
    slice.wait_kata_deploy("3.28.0").await?;
    create_verification_pod(&slice, "after-upgrade", &n2).await?;
    expect_outcome(&slice, "after-upgrade", Outcome::Fail).await?;
    // node-1's rules were for 3.27.0; under 3.28.0 the default applies.
    create_verification_pod(&slice, "node-1-after-upgrade", &n1).await?;
    expect_outcome(&slice, "node-1-after-upgrade", Outcome::Succeed).await?;

    let decided = slice.verification_decisions();
    let last = decided
        .iter()
        .find(|d| d.pod.ends_with("/after-upgrade"))
        .unwrap();
    ensure!(last.version.as_deref() == Some("3.28.0"), "{last:?}");

    // Verification pods can be deleted in any state (kwok's pod-delete stage).
    let pods: Api<Pod> = Api::namespaced(slice.client(), &slice.verification_namespace());
    for name in ["v-pending", "v-crashloop"] {
        let uid = pods.get(name).await?.metadata.uid.unwrap();
        pods.delete(name, &DeleteParams::default()).await?;
        wait_for(
            &pods,
            name,
            &format!("{name} deleted"),
            DEFAULT_TIMEOUT,
            conditions::is_deleted(&uid),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn simulated_nodes_can_be_added_tainted_made_not_ready_and_deleted() -> Result<()> {
    let slice = Cluster::shared().await.slice("node-helpers", 1).await;
    let extra = slice.add_node("extra").await?;
    ensure!(extra == slice.node_name("extra"));
    let nodes = slice.nodes().await?;
    ensure!(
        nodes == vec![extra.clone(), slice.node_name("node-1")],
        "{nodes:?}"
    );

    slice
        .label_node(
            &extra,
            "katacontainers.io/kata-lifecycle-manager-window",
            "true",
        )
        .await?;
    slice
        .taint_node(&extra, "kata-lifecycle-manager", "pending", "NoSchedule")
        .await?;
    let n = slice.node(&extra).await?;
    ensure!(
        n.labels()
            .get("katacontainers.io/kata-lifecycle-manager-window")
            .map(String::as_str)
            == Some("true")
    );
    ensure!(
        n.spec
            .unwrap()
            .taints
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == "kata-lifecycle-manager")
    );
    slice.untaint_node(&extra, "kata-lifecycle-manager").await?;
    slice
        .unlabel_node(&extra, "katacontainers.io/kata-lifecycle-manager-window")
        .await?;

    slice.set_node_not_ready(&extra).await?;
    slice.set_node_ready(&extra).await?;
    slice.delete_node(&extra).await?;
    ensure!(slice.nodes().await? == vec![slice.node_name("node-1")]);
    Ok(())
}

#[tokio::test]
async fn spawned_processes_get_the_slice_environment_and_can_be_stopped() -> Result<()> {
    let slice = Cluster::shared().await.slice("spawn", 0).await;
    let script = "echo kubeconfig=$KUBECONFIG helm=$(command -v helm) node=$NODE_NAME; exit 3";
    let done = slice.spawn("/bin/sh", &["-c", script], &[("NODE_NAME", "n1")])?;
    let status = done.wait(DEFAULT_TIMEOUT).await?;
    ensure!(status.code() == Some(3), "{status}");
    let logs = done.logs();
    ensure!(
        logs.contains(&format!("kubeconfig={}", slice.kubeconfig_path().display())),
        "{logs}"
    );
    ensure!(
        logs.contains(&format!("helm={}/helm", slice.tools_dir().display())),
        "{logs}"
    );
    ensure!(logs.contains("node=n1"), "{logs}");

    use std::os::unix::process::ExitStatusExt;
    let sleeper = slice.spawn("/bin/sleep", &["600"], &[])?;
    sleeper.terminate();
    ensure!(sleeper.wait(DEFAULT_TIMEOUT).await?.signal() == Some(15));
    let sleeper = slice.spawn("/bin/sleep", &["600"], &[])?;
    sleeper.kill();
    ensure!(sleeper.wait(DEFAULT_TIMEOUT).await?.signal() == Some(9));
    Ok(())
}

#[tokio::test]
async fn a_verification_can_run_for_a_given_time_then_succeed() -> Result<()> {
    let slice = Cluster::shared().await.slice("verify-slow", 1).await;
    let n1 = slice.node_name("node-1");
    let after = std::time::Duration::from_secs(4);
    slice.set_verification_outcome("node-1", ANY, Outcome::SucceedAfter(after));
    let pods: Api<Pod> = Api::namespaced(slice.client(), &slice.verification_namespace());
    let created = std::time::Instant::now();
    create_verification_pod(&slice, "slow", &n1).await?;
    let running = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    wait_for(
        &pods,
        "slow",
        "slow Running",
        DEFAULT_TIMEOUT,
        when(running),
    )
    .await?;
    let running_at = created.elapsed();
    expect_outcome(&slice, "slow", Outcome::SucceedAfter(after)).await?;
    let done_at = created.elapsed();
    ensure!(
        running_at < after && done_at >= after,
        "Running after {running_at:?}, Succeeded after {done_at:?}; wanted Running, then \
         Succeeded once {after:?} had passed"
    );
    Ok(())
}

/// The first wall-clock timestamp a product binary logged (JSON logs), and its exit.
async fn logged_time(slice: &Slice, offset_secs: i64) -> Result<jiff::Timestamp> {
    // No kubeconfig: the agent logs its start, fails to reach any cluster and exits.
    let envs = [
        ("NODE_NAME", "n1"),
        ("POD_NAMESPACE", "nowhere"),
        ("KUBECONFIG", "/nonexistent/kubeconfig"),
    ];
    let args = ["--log-format", "json", "--health-addr", ""];
    let agent = if offset_secs == 0 {
        slice.spawn("klm-agent", &args, &envs)?
    } else {
        slice.spawn_with_clock_offset("klm-agent", &args, &envs, offset_secs)?
    };
    agent.wait(DEFAULT_TIMEOUT).await?;
    let logs = agent.logs();
    let first: serde_json::Value = serde_json::from_str(logs.lines().next().unwrap_or_default())
        .with_context(|| format!("a JSON log line: {logs}"))?;
    first["timestamp"]
        .as_str()
        .with_context(|| format!("a timestamp: {first}"))?
        .parse()
        .with_context(|| format!("an RFC 3339 timestamp: {first}"))
}

#[tokio::test]
async fn a_clock_offset_shifts_only_the_wall_clock_of_a_spawned_binary() -> Result<()> {
    let slice = Cluster::shared().await.slice("faketime", 0).await;
    for offset in [0i64, 45, -45] {
        let before = jiff::Timestamp::now();
        let logged = logged_time(&slice, offset).await?;
        let after = jiff::Timestamp::now();
        let shift = logged.as_millisecond() - before.as_millisecond();
        let window = after.as_millisecond() - before.as_millisecond();
        ensure!(
            shift >= offset * 1000 - 1000 && shift <= offset * 1000 + window + 1000,
            "offset {offset}s: klm-agent logged {logged}, real time {before}..{after}"
        );
    }
    // Only the wall clock: the monotonic clock (timers, timeouts) is the machine's.
    let probe = "import time; print(time.time(), time.monotonic())";
    let py = slice.spawn_with_clock_offset("/usr/bin/python3", &["-c", probe], &[], -45)?;
    let real_wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    py.wait(DEFAULT_TIMEOUT).await?;
    let out = py.logs();
    let v: Vec<f64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("python printed {out:?}"))?;
    let wall_shift = v[0] - real_wall.as_secs_f64();
    let mono_shift = v[1] - (ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9);
    ensure!(
        (-47.0..=-40.0).contains(&wall_shift) && (-2.0..=5.0).contains(&mono_shift),
        "wall clock shifted by {wall_shift:.1}s (want -45), monotonic by {mono_shift:.1}s (want 0)"
    );
    Ok(())
}

/// The state letter of /proc/<pid>/stat (R, S, T for stopped, …).
fn proc_state(pid: u32) -> Result<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .context("parse /proc/<pid>/stat")
}

#[tokio::test]
async fn a_spawned_process_can_be_paused_and_resumed() -> Result<()> {
    let slice = Cluster::shared().await.slice("pause", 0).await;
    let sleeper = slice.spawn("/bin/sleep", &["600"], &[])?;
    sleeper.pause().await?;
    ensure!(sleeper.is_paused() && proc_state(sleeper.pid())? == 'T');
    sleeper.resume().await?;
    ensure!(!sleeper.is_paused() && proc_state(sleeper.pid())? != 'T');
    ensure!(
        sleeper.exit_status().is_none(),
        "still running after SIGCONT"
    );
    sleeper.kill();
    use std::os::unix::process::ExitStatusExt;
    ensure!(sleeper.wait(DEFAULT_TIMEOUT).await?.signal() == Some(9));
    Ok(())
}

#[tokio::test]
async fn a_gated_helm_upgrade_holds_the_release_pending_upgrade() -> Result<()> {
    let slice = Cluster::shared().await.slice("helm-gate", 1).await;
    let ns = slice.kata_deploy_namespace();
    slice.install_kata_deploy("kd", "3.27.0", &[]).await?;
    let gate = slice.helm_gate()?;
    let wrapper = gate.helm_path().display().to_string();
    let upgrade = [
        "upgrade",
        "kd",
        "kata-deploy",
        "-n",
        &ns,
        "--version",
        "3.28.0",
        "--repo",
        slice.chart_repo_url(),
        "--reset-then-reuse-values",
    ];
    let held = slice.spawn(&wrapper, &upgrade, &[])?;
    gate.wait_held().await?;
    let meta = slice.release_metadata("kd").await?;
    ensure!(meta["status"] == "pending-upgrade", "{meta}");
    ensure!(meta["version"] == "3.28.0", "{meta}");
    ensure!(
        held.exit_status().is_none(),
        "helm is still inside the upgrade"
    );
    held.kill();
    held.wait(DEFAULT_TIMEOUT).await?;
    let meta = slice.release_metadata("kd").await?;
    ensure!(
        meta["status"] == "pending-upgrade",
        "killed helm leaves it: {meta}"
    );
    // Only the first upgrade is held; everything else passes straight through.
    let out = tokio::process::Command::new(gate.helm_path())
        .args(["status", "kd", "-n", &ns])
        .envs(slice.env())
        .output()
        .await?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(gate.upgrade_calls().len() == 1, "{:?}", gate.calls());
    ensure!(gate.calls().len() == 2, "{:?}", gate.calls());
    Ok(())
}
