//! The product as users run it: `helm install` of `charts/kata-lifecycle-manager` with the
//! images of `make images`, on a node run by a real kubelet, containerd and runc
//! (`tests/cluster/real-node.sh`). The agent DaemonSet and two coordinator replicas run as real
//! pods with their real ServiceAccount tokens, downward-API environment, probes and read-only
//! root filesystems; the upstream kata-deploy chart runs a stand-in image with kata-deploy's pod
//! contract (`tests/images/kata-deploy.c`); the verification pod is a real container
//! (`tests/images/verify.c`). Everything is observed from outside, with reads and watches a
//! `kubectl` user would make.
//!
//! One upgrade (3.31.0 → 3.32.0: cordon, kata-deploy pod restarted at the new revision,
//! verification, uncordon; the agent's pod replaced mid-verification), a leader failover, and
//! one automatic rollback (4.0.0 with a failing verification: the release and the node back at
//! 3.32.0).
//!
//! Needs root, Debian's containerd, runc and containernetworking-plugins (`make deps`) and
//! `make images` (which `make e2e` runs first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use klm_protocol::keys::{node as node_keys, status_data, trigger};
use klm_protocol::{NodeStatus, RunPhase, RunRecord};
use klm_testkit::real_node::REAL_NODE_LABEL;
use klm_testkit::upstream::UpstreamRepo;
use klm_testkit::wait::{is_pod_ready, wait_list};
use klm_testkit::{Cluster, RealNode};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

/// The release name of the README's install: the trigger ConfigMap is named after it.
const RELEASE: &str = "kata-lifecycle-manager";
const NS: &str = "kata-lifecycle-manager";
const KD_RELEASE: &str = "kata-deploy";
const KD_NS: &str = "kata-deploy";
const VERIFY_NS: &str = "default";
/// The stand-in kata-deploy image (`make images` tags it with each chart version).
const KD_IMAGE: &str = "klm.test/kata-deploy";
const FROM: &str = "3.31.0";
const TO: &str = "3.32.0";
const BAD: &str = "4.0.0";
/// Generous: everything here runs as real containers on a shared 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// The verification pod users give (`--set-file defaults.verificationPod=...`): the real
/// container exits 0 (`pass`) or 1 (`fail`), after `seconds`.
fn verification_pod(verdict: &str, seconds: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: ${{TEST_POD}}
spec:
  restartPolicy: Never
  nodeSelector:
    kubernetes.io/hostname: ${{NODE}}
  containers:
    - name: verify
      image: klm.test/verify:1
      imagePullPolicy: IfNotPresent
      args: ["{verdict}", "{seconds}"]
      env:
        - name: NODE_NAME
          value: ${{NODE}}
"#
    )
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/e2e is two levels below the workspace root")
        .to_path_buf()
}

fn helm(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = Command::new(cluster.helm_path())
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .output()
        .context("run helm")?;
    ensure!(
        out.status.success(),
        "helm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chart version of the kata-deploy release, from `helm list` (what an operator would ask).
fn release_chart_version(cluster: &Cluster) -> Result<String> {
    let list: serde_json::Value = serde_json::from_str(&helm(
        cluster,
        &[
            "list",
            "-n",
            KD_NS,
            "--filter",
            &format!("^{KD_RELEASE}$"),
            "-o",
            "json",
        ],
    )?)?;
    // "chart": "<name>-<version>"
    list[0]["chart"]
        .as_str()
        .and_then(|c| c.strip_prefix("kata-deploy-"))
        .map(str::to_owned)
        .with_context(|| format!("helm list shows no kata-deploy chart: {list}"))
}

/// A pod as seen by the watch: what the assertions need.
#[derive(Debug, Clone)]
struct SeenPod {
    name: String,
    node: String,
    image: String,
    revision: Option<String>,
    ready: bool,
    phase: String,
    exit_code: Option<i32>,
}

impl SeenPod {
    fn of(p: &Pod) -> SeenPod {
        let status = p.status.clone().unwrap_or_default();
        let container = status
            .container_statuses
            .as_ref()
            .and_then(|cs| cs.first().cloned());
        SeenPod {
            name: p.metadata.name.clone().unwrap_or_default(),
            node: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            image: p
                .spec
                .as_ref()
                .map(|s| s.containers[0].image.clone().unwrap_or_default())
                .unwrap_or_default(),
            revision: p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("controller-revision-hash").cloned()),
            ready: is_pod_ready(p),
            phase: status.phase.unwrap_or_default(),
            exit_code: container
                .and_then(|c| c.state)
                .and_then(|s| s.terminated)
                .map(|t| t.exit_code),
        }
    }
}

/// What the watches saw during the scenario, from outside the product.
#[derive(Debug, Default)]
struct Seen {
    /// Every pod (by uid) of the kata-deploy and verification namespaces, latest state.
    pods: BTreeMap<String, SeenPod>,
    /// Uids of kata-deploy pods on the real node that were ever Ready, per image.
    ready_kata_deploy: BTreeMap<String, BTreeSet<String>>,
    /// The real node's status label transitions and whether it was ever seen cordoned.
    statuses: Vec<String>,
    cordoned_seen: bool,
}

/// Watches `api` in the background, handing every object seen to `f`; returns once the initial
/// listing is done, so nothing that happens after the call is missed.
async fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    mut f: impl FnMut(&K) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listed_tx = Some(listed_tx);
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => f(&o),
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                // Deletions change nothing seen; errors are retried by the backoff.
                _ => {}
            }
        }
    });
    tokio::time::timeout(POD_TIMEOUT, listed_rx)
        .await
        .context("a watch did not list in time")?
        .context("a watch ended before listing")?;
    Ok(task)
}

/// Starts the outside observers: pods of the kata-deploy and verification namespaces, and the
/// real node's status label and cordon.
async fn watch_into(
    seen: Arc<Mutex<Seen>>,
    client: kube::Client,
    node: String,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for ns in [KD_NS, VERIFY_NS] {
        let seen = seen.clone();
        let node = node.clone();
        tasks.push(
            spawn_watch(
                Api::<Pod>::namespaced(client.clone(), ns),
                watcher::Config::default(),
                move |p: &Pod| {
                    let uid = p.metadata.uid.clone().unwrap_or_default();
                    let s = SeenPod::of(p);
                    let mut seen = seen.lock().unwrap();
                    // The kwok node's kata-deploy pod runs the same image: only the real node's.
                    if s.ready && s.name.starts_with("kata-deploy") && s.node == node {
                        seen.ready_kata_deploy
                            .entry(s.image.clone())
                            .or_default()
                            .insert(uid.clone());
                    }
                    seen.pods.insert(uid, s);
                },
            )
            .await?,
        );
    }
    tasks.push(
        spawn_watch(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            move |n: &Node| {
                let status = n
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(node_keys::STATUS).cloned());
                let mut seen = seen.lock().unwrap();
                if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
                    seen.cordoned_seen = true;
                }
                if let Some(status) = status
                    && seen.statuses.last() != Some(&status)
                {
                    seen.statuses.push(status);
                }
            },
        )
        .await?,
    );
    Ok(tasks)
}

/// Installs the chart as the README says, plus this cluster's specifics: the real node as the
/// only place for both workloads, the API server address (no kube-proxy) and the loopback
/// chart repository.
fn install_product(cluster: &Cluster, real: &RealNode, repo: &str, dir: &Path) -> Result<()> {
    let pod_file = dir.join("verify-pod.yaml");
    std::fs::write(&pod_file, verification_pod("pass", 0))?;
    let chart = root().join("charts/kata-lifecycle-manager");
    let selector = format!(
        "{}={}",
        REAL_NODE_LABEL.0.replace('.', "\\."),
        REAL_NODE_LABEL.1
    );
    helm(
        cluster,
        &[
            "install",
            RELEASE,
            chart.to_str().unwrap(),
            "-n",
            NS,
            "--create-namespace",
            "--set-file",
            &format!("defaults.verificationPod={}", pod_file.display()),
            "--set",
            &format!("defaults.helmRelease={KD_RELEASE}"),
            "--set",
            &format!("defaults.helmNamespace={KD_NS}"),
            "--set",
            "kataDeployChart.ref=kata-deploy",
            "--set",
            &format!("kataDeployChart.repo={repo}"),
            "--set-string",
            &format!("agent.nodeSelector.{selector}"),
            "--set-string",
            &format!("coordinator.nodeSelector.{selector}"),
            "--set",
            &format!("apiServer.host={}", real.apiserver_host),
            "--set",
            &format!("apiServer.port={}", real.apiserver_port),
            "--set",
            "logFormat=text",
            "--wait",
            "--timeout",
            "4m",
        ],
    )?;
    Ok(())
}

async fn wait_run(
    cms: &Api<ConfigMap>,
    what: &str,
    f: impl Fn(&RunRecord) -> bool,
) -> Result<RunRecord> {
    wait_list(
        cms,
        watcher::Config::default().fields(&format!("metadata.name={RELEASE}")),
        what,
        RUN_TIMEOUT,
        |cms| {
            cms.first()
                .and_then(|cm| cm.data.as_ref()?.get(status_data::RUN).cloned())
                .and_then(|s| RunRecord::from_json(&s).ok())
                .filter(|r| f(r))
        },
    )
    .await
}

async fn trigger(cms: &Api<ConfigMap>, annotations: serde_json::Value) -> Result<()> {
    cms.patch(
        RELEASE,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
    )
    .await?;
    Ok(())
}

/// The kata-deploy pod on the node once exactly one is live there and Ready with `image`.
async fn kata_deploy_ready(client: &kube::Client, node: &str, image: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), KD_NS);
    let cfg = watcher::Config::default()
        .labels("name=kata-deploy")
        .fields(&format!("spec.nodeName={node}"));
    wait_list(
        &pods,
        cfg,
        &format!("kata-deploy Ready at {image} on {node}"),
        POD_TIMEOUT,
        |ps| {
            let live: Vec<_> = ps
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            match live.as_slice() {
                [p] if is_pod_ready(p) && SeenPod::of(p).image == image => Some(Pod::clone(p)),
                _ => None,
            }
        },
    )
    .await
}

/// Waits (watch) until the three product pods (one agent, two coordinators) are Ready. `helm
/// install --wait` is not enough: it counts the agent DaemonSet ready while `maxUnavailable`
/// (10%, so one pod of one node) pods are not.
async fn wait_product_pods_ready(client: &kube::Client) -> Result<()> {
    wait_list(
        &Api::<Pod>::namespaced(client.clone(), NS),
        watcher::Config::default(),
        "the agent and both coordinators Ready",
        POD_TIMEOUT,
        |ps| (ps.len() == 3 && ps.iter().all(|p| is_pod_ready(p))).then_some(()),
    )
    .await
}

/// Every product pod Ready on the real node, never restarted (liveness held), with the
/// ServiceAccount token the kubelet projected and the locked-down security context.
async fn assert_product_pods_healthy(
    client: &kube::Client,
    real: &RealNode,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut coordinators = Vec::new();
    let mut agents = 0;
    for p in pods.list(&ListParams::default()).await? {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.clone().unwrap_or_default();
        let status = p.status.clone().unwrap_or_default();
        ensure!(is_pod_ready(&p), "{name} is not Ready: {status:?}");
        ensure!(
            status.phase.as_deref() == Some("Running"),
            "{name}: {:?}",
            status.phase
        );
        ensure!(
            spec.node_name.as_deref() == Some(real.name.as_str()),
            "{name} runs on {:?}",
            spec.node_name
        );
        for c in status.container_statuses.unwrap_or_default() {
            ensure!(
                c.restart_count == 0,
                "{name}/{} restarted {} times",
                c.name,
                c.restart_count
            );
        }
        let c = &spec.containers[0];
        let sc = c.security_context.clone().unwrap_or_default();
        ensure!(
            sc.read_only_root_filesystem == Some(true),
            "{name}: root filesystem not read-only"
        );
        ensure!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"),
            "{name}: no projected ServiceAccount token"
        );
        match p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .map(String::as_str)
        {
            Some("coordinator") => coordinators.push(name),
            Some("agent") => agents += 1,
            other => bail!("unexpected pod {name} (component {other:?})"),
        }
    }
    ensure!(
        agents == 1,
        "expected one agent pod (the real node only), found {agents}"
    );
    ensure!(
        coordinators.len() == 2,
        "expected two coordinator replicas, found {coordinators:?}"
    );
    Ok(coordinators)
}

/// `kubectl logs` of every product pod, installed with `logFormat=text`: plain text (the
/// container's stderr is a file, not a terminal: no ANSI colour codes) that says what happened.
async fn assert_logs_readable(client: &kube::Client) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut leader_logged = false;
    for p in pods.list(&ListParams::default()).await? {
        let name = p.metadata.name.clone().unwrap_or_default();
        let log = pods.logs(&name, &Default::default()).await?;
        ensure!(!log.is_empty(), "{name} logged nothing");
        ensure!(
            !log.contains('\u{1b}'),
            "{name}'s log has terminal escape codes: {:?}",
            log.lines().next()
        );
        leader_logged |= log.contains("became leader");
    }
    ensure!(
        leader_logged,
        "no coordinator pod logged that it became leader"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_upgrades_then_rolls_back_kata_deploy_on_a_real_node() -> Result<()> {
    let cluster = Cluster::with_real_node().await;
    let real = cluster.real_node().expect("with_real_node").clone();
    let client = cluster.client().await?;
    // A kwok node next to the real one: the chart's scheduling values keep the agent off it.
    let slice = cluster.slice("real-node-kwok", 1).await;
    let kwok_node = slice.node_name("node-1");
    let dir = tempdir()?;

    // The charts users pull, served where the coordinator's pod reaches them.
    let repo = UpstreamRepo::serve_on(real.host_address()).await?;
    helm(
        cluster,
        &[
            "install",
            KD_RELEASE,
            "kata-deploy",
            "--repo",
            repo.url(),
            "--version",
            FROM,
            "-n",
            KD_NS,
            "--create-namespace",
            "--set",
            &format!("image.reference={KD_IMAGE}"),
            "--set",
            "imagePullPolicy=IfNotPresent",
        ],
    )?;
    let first = kata_deploy_ready(&client, &real.name, &format!("{KD_IMAGE}:{FROM}")).await?;

    install_product(cluster, &real, repo.url(), &dir)?;
    wait_product_pods_ready(&client).await?;
    let coordinators = assert_product_pods_healthy(&client, &real).await?;
    let agents_on_kwok = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().fields(&format!("spec.nodeName={kwok_node}")))
        .await?;
    ensure!(
        agents_on_kwok.items.is_empty(),
        "product pods on the kwok node: {:?}",
        agents_on_kwok.items.len()
    );

    // Leader election between the two real coordinator pods: one holds the Lease, by pod name.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let leader = wait_list(
        &leases,
        watcher::Config::default().fields(&format!("metadata.name={RELEASE}-coordinator")),
        "the coordinators' leader Lease",
        POD_TIMEOUT,
        |ls| {
            ls.first()
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
        },
    )
    .await?;
    ensure!(
        coordinators.contains(&leader),
        "leader {leader} is not one of {coordinators:?}"
    );

    // The agent's writes to its Node below pass this policy only with a token that names the
    // node (the bound token of a pod on it): the real kubelet's projected token is one.
    let policy = format!("{RELEASE}-agent-own-node");
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .get(&policy)
        .await
        .with_context(|| format!("admission policy binding {policy}"))?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let watches = watch_into(seen.clone(), client.clone(), real.name.clone()).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &real.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {node_keys::WINDOW_LABEL: "true"}}})),
        )
        .await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);

    // 1. The upgrade: cordon, kata-deploy restarted at the new revision, verified, uncordoned.
    // Mid-verification the agent's pod is deleted: the DaemonSet's replacement (a new pod uid,
    // so a new Lease identity from the downward API) must finish the node's turn.
    let slow = base64::engine::general_purpose::STANDARD.encode(verification_pod("pass", 20));
    trigger(
        &cms,
        json!({ trigger::TARGET_VERSION: TO, trigger::VERIFICATION_POD: slow }),
    )
    .await?;
    wait_list(
        &nodes,
        watcher::Config::default().fields(&format!("metadata.name={}", real.name)),
        "the node to be verifying",
        RUN_TIMEOUT,
        |ns| {
            ns.first()
                .and_then(|n| n.metadata.labels.as_ref()?.get(node_keys::STATUS).cloned())
                .filter(|s| s == "verifying")
        },
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let agent_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await?;
    let [old_agent] = agent_pods.items.as_slice() else {
        bail!("expected one agent pod, found {}", agent_pods.items.len());
    };
    let old_agent = old_agent.metadata.name.clone().unwrap_or_default();
    pods.delete(&old_agent, &DeleteParams::default()).await?;
    let run = wait_run(&cms, "the upgrade run to finish", |r| {
        r.target_version == TO && r.phase.is_finished()
    })
    .await?;
    ensure!(run.phase == RunPhase::Succeeded, "upgrade run: {run:#?}");
    let agent_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await?;
    ensure!(
        agent_pods
            .items
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(old_agent.as_str())),
        "the agent pod was not replaced"
    );
    ensure!(run.plan == vec![real.name.clone()], "plan {:?}", run.plan);
    let report = &run.nodes[&real.name];
    ensure!(report.status == Some(NodeStatus::Completed), "{report:?}");
    // The run record keeps short evidence; the whole of it, log tail included, is on the Node.
    let evidence = klm_protocol::node_record::NodeRecord::of(&nodes.get(&real.name).await?)
        .evidence
        .context("no evidence on the Node")?;
    ensure!(evidence.succeeded, "{evidence:?}");
    let tail = evidence.log_tail.clone().unwrap_or_default();
    ensure!(
        tail.contains(&format!("verification passed on {}", real.name)),
        "the verification pod's log, read through the kubelet, is not in the evidence: {tail:?}"
    );
    let upgraded = kata_deploy_ready(&client, &real.name, &format!("{KD_IMAGE}:{TO}")).await?;
    ensure!(
        upgraded.metadata.uid != first.metadata.uid,
        "kata-deploy pod was not restarted"
    );
    ensure!(
        SeenPod::of(&upgraded).revision != SeenPod::of(&first).revision,
        "the restarted kata-deploy pod is at the old controller-revision-hash"
    );
    let ds: DaemonSet = Api::namespaced(client.clone(), KD_NS)
        .get("kata-deploy")
        .await?;
    ensure!(
        ds.spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|u| u.type_.as_deref())
            == Some("OnDelete"),
        "the run's helm upgrade did not set OnDelete"
    );
    assert_node_at(&nodes, &real.name, "completed", TO).await?;
    ensure!(release_chart_version(cluster)? == TO);
    {
        let seen = seen.lock().unwrap();
        ensure!(seen.cordoned_seen, "the node was never seen cordoned");
        for s in ["cordoned", "upgrading", "verifying", "completed"] {
            ensure!(
                seen.statuses.iter().any(|x| x == s),
                "status {s} never seen: {:?}",
                seen.statuses
            );
        }
        let verified: Vec<_> = seen
            .pods
            .values()
            .filter(|p| p.image == "klm.test/verify:1" && p.node == real.name)
            .collect();
        ensure!(
            verified
                .iter()
                .any(|p| p.phase == "Succeeded" && p.exit_code == Some(0)),
            "no verification container exited 0 on the real node: {verified:?}"
        );
        ensure!(
            seen.ready_kata_deploy
                .get(&format!("{KD_IMAGE}:{TO}"))
                .is_some_and(|u| !u.is_empty()),
            "kata-deploy at {TO} never seen Ready"
        );
    }

    // Leader failover between the real pods: the leader, PID 1 of its container, stops on the
    // kubelet's SIGTERM and hands the Lease over well within its 60 s grace period (a process
    // ignoring SIGTERM, as PID 1 does without a handler, would be killed only after it); the
    // standby leads the next run.
    let stopped_at = std::time::Instant::now();
    let leader_uid = pods.get(&leader).await?.metadata.uid.unwrap_or_default();
    pods.delete(&leader, &DeleteParams::default()).await?;
    let new_leader = wait_list(
        &leases,
        watcher::Config::default().fields(&format!("metadata.name={RELEASE}-coordinator")),
        "the standby to take the leader Lease",
        POD_TIMEOUT,
        |ls| {
            ls.first()
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
                .filter(|h| *h != leader)
        },
    )
    .await?;
    ensure!(
        coordinators.contains(&new_leader),
        "new leader {new_leader} is not the standby"
    );
    tokio::time::timeout(
        POD_TIMEOUT,
        await_condition(pods.clone(), &leader, conditions::is_deleted(&leader_uid)),
    )
    .await
    .context("the old leader pod was not deleted")??;
    let stop_took = stopped_at.elapsed();
    ensure!(
        stop_took < Duration::from_secs(30),
        "the leader pod took {stop_took:?} to stop: SIGTERM did not end it"
    );
    // The Deployment's replacement is Ready before the next run.
    wait_list(
        &pods,
        watcher::Config::default().labels("app.kubernetes.io/component=coordinator"),
        "two Ready coordinator pods again",
        POD_TIMEOUT,
        |ps| (ps.iter().filter(|p| is_pod_ready(p)).count() == 2).then_some(()),
    )
    .await?;

    // 2. The automatic rollback: the next version fails its verification on the node; the
    // release and the node are restored to the version recorded before the run.
    let failing = base64::engine::general_purpose::STANDARD.encode(verification_pod("fail", 0));
    trigger(
        &cms,
        json!({ trigger::TARGET_VERSION: BAD, trigger::VERIFICATION_POD: failing }),
    )
    .await?;
    let run = wait_run(&cms, "the failing run to finish", |r| {
        r.target_version == BAD && r.phase.is_finished()
    })
    .await?;
    ensure!(run.phase == RunPhase::Failed, "failing run: {run:#?}");
    let failure = run
        .failure
        .as_ref()
        .context("a failed run names its failure")?;
    ensure!(
        failure.node.as_deref() == Some(real.name.as_str()),
        "{failure:?}"
    );
    let evidence = failure.evidence.as_ref().context("no evidence")?;
    ensure!(
        evidence
            .log_tail
            .as_deref()
            .unwrap_or_default()
            .contains("verification failed"),
        "{evidence:?}"
    );
    ensure!(
        run.nodes[&real.name].status == Some(NodeStatus::RolledBack),
        "{:?}",
        run.nodes
    );
    let restored = kata_deploy_ready(&client, &real.name, &format!("{KD_IMAGE}:{TO}")).await?;
    ensure!(
        restored.metadata.uid != upgraded.metadata.uid,
        "kata-deploy pod was not restored by a restart"
    );
    ensure!(
        release_chart_version(cluster)? == TO,
        "release not restored to {TO}"
    );
    assert_node_at(&nodes, &real.name, "rolled-back", TO).await?;
    {
        let seen = seen.lock().unwrap();
        ensure!(
            seen.ready_kata_deploy
                .get(&format!("{KD_IMAGE}:{BAD}"))
                .is_some_and(|u| !u.is_empty()),
            "kata-deploy at {BAD} never ran before the rollback"
        );
        ensure!(
            seen.pods.values().any(|p| p.image == "klm.test/verify:1"
                && p.phase == "Failed"
                && p.exit_code == Some(1)),
            "no verification container exited 1"
        );
    }

    // The product pods went through both runs without a restart (probes held).
    wait_product_pods_ready(&client).await?;
    assert_product_pods_healthy(&client, &real).await?;
    assert_logs_readable(&client).await?;
    for w in watches {
        w.abort();
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("klm-real-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The node carries our status and version labels and is not left cordoned.
async fn assert_node_at(nodes: &Api<Node>, name: &str, status: &str, version: &str) -> Result<()> {
    let n = nodes.get(name).await?;
    let labels = n.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get(node_keys::STATUS).map(String::as_str) == Some(status),
        "{labels:?}"
    );
    ensure!(
        labels.get(node_keys::CURRENT_VERSION).map(String::as_str) == Some(version),
        "{labels:?}"
    );
    ensure!(
        n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true),
        "node left cordoned"
    );
    Ok(())
}
