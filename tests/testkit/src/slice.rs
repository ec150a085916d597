//! An isolated slice of the shared cluster: one per test.
//!
//! A slice `<id>` (`<name>-<random hex>`) owns
//! - namespaces `klm-<id>` (the product), `kd-<id>` (kata-deploy), `verify-<id>` (verification pods),
//!   all labelled `klm.test/slice=<id>`;
//! - simulated nodes `<id>-node-1..n` (and any added later, always named `<id>-…`), labelled
//!   `klm.test/slice=<id>`.
//!
//! Tests running concurrently on the same cluster therefore never share nodes, releases or
//! Leases, as long as they select nodes with [`Slice::node_selector`] (every node in the cluster
//! is a kwok node; a bare `katacontainers.io/kata-lifecycle-manager-window=true` selector would
//! reach other slices' nodes too).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;

use crate::cluster::{Cluster, client_for};
use crate::paths;
use crate::process::Proc;
use crate::verification::{self, Decision, Outcome, Scenario};
use crate::wait::{DEFAULT_TIMEOUT, is_pod_ready, node_ready_status, wait_for, wait_list, when};

/// Bound on a slice's drop-time report and cleanup.
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Label carried by every node and namespace of a slice.
pub const SLICE_LABEL: &str = "klm.test/slice";

pub struct Slice {
    pub(crate) cluster: &'static Cluster,
    pub(crate) id: String,
    pub(crate) client: kube::Client,
    dir: PathBuf,
    scenario: Arc<Scenario>,
    verifier: tokio::task::JoinHandle<()>,
    installs: Arc<crate::kata_deploy_sim::InstallScenario>,
    kata_deploy_sim: tokio::task::JoinHandle<()>,
    spawned: AtomicUsize,
}

impl Slice {
    pub(crate) async fn create(
        cluster: &'static Cluster,
        name: &str,
        nodes: usize,
    ) -> Result<Slice> {
        let id = slice_id(name);
        let dir = cluster.dir().join("slices").join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let client = client_for(cluster.kubeconfig_path()).await?;
        let scenario = Arc::new(Scenario::default());
        let verifier = tokio::spawn(verification::run(
            client.clone(),
            id.clone(),
            format!("kd-{id}"),
            scenario.clone(),
        ));
        let installs = Arc::new(crate::kata_deploy_sim::InstallScenario::default());
        let kata_deploy_sim = tokio::spawn(crate::kata_deploy_sim::run(
            client.clone(),
            id.clone(),
            format!("kd-{id}"),
            installs.clone(),
        ));
        let slice = Slice {
            cluster,
            id,
            client,
            dir,
            scenario,
            verifier,
            installs,
            kata_deploy_sim,
            spawned: AtomicUsize::new(0),
        };

        let namespaces: Api<Namespace> = Api::all(slice.client.clone());
        for ns in slice.namespaces() {
            let obj: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": {"name": ns, "labels": {SLICE_LABEL: slice.id}}
            }))?;
            namespaces
                .create(&PostParams::default(), &obj)
                .await
                .with_context(|| format!("create namespace {ns}"))?;
        }
        let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        futures::future::try_join_all(names.iter().map(|n| slice.add_node(n))).await?;
        // Pods are refused until the namespace's `default` ServiceAccount exists.
        for ns in slice.namespaces() {
            let sas: Api<ServiceAccount> = Api::namespaced(slice.client.clone(), &ns);
            wait_for(
                &sas,
                "default",
                &format!("ServiceAccount {ns}/default"),
                DEFAULT_TIMEOUT,
                when(|_: &ServiceAccount| true),
            )
            .await?;
        }
        Ok(slice)
    }

    /// `<name>-<random hex>`: unique even across test binaries attached to one cluster.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn cluster(&self) -> &'static Cluster {
        self.cluster
    }

    /// An admin client, made in the runtime that created the slice.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The admin kubeconfig (shared by all slices: isolation is by namespace and node).
    pub fn kubeconfig_path(&self) -> &Path {
        self.cluster.kubeconfig_path()
    }

    /// This slice's scratch directory (process logs, helm state), inside the cluster directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `klm-<id>`: where the product (coordinator, agents' Leases, trigger ConfigMap) goes.
    pub fn namespace(&self) -> String {
        format!("klm-{}", self.id)
    }

    /// `kd-<id>`: where kata-deploy releases go.
    pub fn kata_deploy_namespace(&self) -> String {
        format!("kd-{}", self.id)
    }

    /// `verify-<id>`: where verification pods go.
    pub fn verification_namespace(&self) -> String {
        format!("verify-{}", self.id)
    }

    fn namespaces(&self) -> [String; 3] {
        [
            self.namespace(),
            self.kata_deploy_namespace(),
            self.verification_namespace(),
        ]
    }

    /// `klm.test/slice=<id>`: selects exactly this slice's nodes.
    pub fn node_selector(&self) -> String {
        format!("{SLICE_LABEL}={}", self.id)
    }

    /// The full name of slice node `suffix` (`node-1` → `<id>-node-1`); full names pass through.
    pub fn node_name(&self, suffix: &str) -> String {
        if suffix.starts_with(&format!("{}-", self.id)) {
            suffix.to_owned()
        } else {
            format!("{}-{suffix}", self.id)
        }
    }

    /// The chart repository URL (see [`Cluster::chart_repo_url`]).
    pub fn chart_repo_url(&self) -> &str {
        self.cluster.chart_repo_url()
    }

    /// The directory with helm, kwok and the control-plane binaries.
    pub fn tools_dir(&self) -> &Path {
        self.cluster.tools_dir()
    }

    /// The environment for helm and for the product's binaries: the admin `KUBECONFIG`, helm
    /// state isolated in the slice directory, and the tools directory first on `PATH` (so the
    /// coordinator finds this `helm`).
    pub fn env(&self) -> Vec<(String, String)> {
        let helm = self.dir.join("helm");
        let path = std::env::var("PATH").unwrap_or_default();
        vec![
            (
                "KUBECONFIG".into(),
                self.kubeconfig_path().display().to_string(),
            ),
            (
                "HELM_CACHE_HOME".into(),
                helm.join("cache").display().to_string(),
            ),
            (
                "HELM_CONFIG_HOME".into(),
                helm.join("config").display().to_string(),
            ),
            (
                "HELM_DATA_HOME".into(),
                helm.join("data").display().to_string(),
            ),
            (
                "PATH".into(),
                format!("{}:{path}", self.tools_dir().display()),
            ),
        ]
    }

    /// Runs `helm <args>` with [`Slice::env`]; returns its stdout, or an error carrying its stderr.
    pub async fn helm(&self, args: &[&str]) -> Result<String> {
        let out = self.helm_output(args).await?;
        if !out.status.success() {
            bail!(
                "helm {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `helm <args>` with [`Slice::env`], whatever its exit status.
    pub async fn helm_output(&self, args: &[&str]) -> Result<std::process::Output> {
        tokio::process::Command::new(self.cluster.helm_path())
            .args(args)
            .envs(self.env())
            .kill_on_drop(true)
            .output()
            .await
            .context("run helm")
    }

    /// `helm get metadata <release> -o json` in `kd-<id>`: the latest revision's `revision`,
    /// `version`, `status`, ….
    pub async fn release_metadata(&self, release: &str) -> Result<serde_json::Value> {
        let ns = self.kata_deploy_namespace();
        let out = self
            .helm(&["get", "metadata", release, "-n", &ns, "-o", "json"])
            .await?;
        serde_json::from_str(&out).context("parse `helm get metadata` output")
    }

    /// `helm install <release> kata-deploy --repo <chart repo> --version <version>` into
    /// `kd-<id>`, with the DaemonSet restricted to this slice's nodes and `extra_set` passed as
    /// `--set` values; then waits until a kata-deploy pod of that version is Ready on every
    /// node of the slice.
    pub async fn install_kata_deploy(
        &self,
        release: &str,
        version: &str,
        extra_set: &[&str],
    ) -> Result<Vec<Pod>> {
        self.install_kata_deploy_from(self.chart_repo_url(), release, version, extra_set)
            .await
    }

    /// [`Slice::install_kata_deploy`] from another chart repository (e.g. the upstream charts,
    /// [`crate::upstream::UpstreamRepo`]).
    pub async fn install_kata_deploy_from(
        &self,
        repo: &str,
        release: &str,
        version: &str,
        extra_set: &[&str],
    ) -> Result<Vec<Pod>> {
        let ns = self.kata_deploy_namespace();
        let node_selector = format!(r#"nodeSelector={{"{SLICE_LABEL}":"{}"}}"#, self.id);
        let mut args = vec![
            "install",
            release,
            "kata-deploy",
            "--repo",
            repo,
            "--version",
            version,
            "--namespace",
            &ns,
            "--set-json",
            &node_selector,
        ];
        for s in extra_set {
            args.extend(["--set", s]);
        }
        self.helm(&args).await?;
        self.wait_kata_deploy(version).await
    }

    /// Waits until every node of the slice runs a Ready, non-terminating kata-deploy pod whose
    /// image tag is `version`; returns those pods, in node order.
    pub async fn wait_kata_deploy(&self, version: &str) -> Result<Vec<Pod>> {
        let nodes = self.nodes().await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.kata_deploy_namespace());
        wait_list(
            &pods,
            watcher::Config::default().labels("name=kata-deploy"),
            &format!("kata-deploy {version} Ready on {nodes:?}"),
            DEFAULT_TIMEOUT,
            |pods| {
                nodes
                    .iter()
                    .map(|node| {
                        let v = verification::kata_deploy_version_on(pods, node);
                        (v.as_deref() == Some(version))
                            .then(|| {
                                pods.iter()
                                    .filter(|p| {
                                        p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                                            == Some(node.as_str())
                                            && p.metadata.deletion_timestamp.is_none()
                                            && is_pod_ready(p)
                                    })
                                    .max_by_key(|p| p.metadata.creation_timestamp.clone())
                                    .map(|p| (**p).clone())
                            })
                            .flatten()
                    })
                    .collect::<Option<Vec<Pod>>>()
            },
        )
        .await
    }

    /// Runs one of the project's binaries (`klm-agent`, `klm-coordinator`; see
    /// [`paths::binary`]) with [`Slice::env`] plus `envs`, logging to `<slice dir>/logs/`.
    /// The process is killed when the returned [`Proc`] is dropped, and dies with the test.
    pub fn spawn(&self, binary: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Proc> {
        let program = if binary.contains('/') {
            PathBuf::from(binary)
        } else {
            paths::binary(binary)?
        };
        let base = Path::new(binary)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| binary.to_owned());
        let n = self.spawned.fetch_add(1, Ordering::Relaxed) + 1;
        let name = match envs.iter().find(|(k, _)| *k == "NODE_NAME") {
            Some((_, node)) => format!("{base}-{n}-{node}"),
            None => format!("{base}-{n}"),
        };
        let mut all = self.env();
        all.extend(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let log = self.dir.join("logs").join(format!("{name}.log"));
        Proc::start(&name, &program, args, &all, log)
    }

    /// [`Slice::spawn`] with the process's wall clock shifted by `offset_secs` (negative: behind)
    /// through libfaketime ([`paths::libfaketime`]): what a node whose clock drifted looks like
    /// to the product. Only the wall clock moves (`CLOCK_REALTIME`: timestamps it writes, Lease
    /// renew times, log times); the monotonic clock its timers use stays true. The API server's
    /// certificates are valid from a day back (`tests/cluster/cluster.sh`), so TLS still works.
    pub fn spawn_with_clock_offset(
        &self,
        binary: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        offset_secs: i64,
    ) -> Result<Proc> {
        let lib = paths::libfaketime()?.display().to_string();
        let offset = format!("{offset_secs:+}");
        let mut all: Vec<(&str, &str)> = envs.to_vec();
        all.extend([
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME", offset.as_str()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ]);
        self.spawn(binary, args, &all)
    }

    /// Sets what verification pods on `node` do while kata-deploy `version` runs there.
    /// Either may be [`verification::ANY`] (`"*"`). Applies to pods created afterwards.
    pub fn set_verification_outcome(&self, node: &str, version: &str, outcome: Outcome) {
        let node = if node == verification::ANY {
            node.to_owned()
        } else {
            self.node_name(node)
        };
        self.scenario
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rules
            .insert((node, version.to_owned()), outcome);
    }

    /// Sets what kata-deploy's per-node install Job (job mode) does on `node` for chart
    /// `version` (either may be [`verification::ANY`]); the default is to succeed. See
    /// [`crate::kata_deploy_sim`].
    pub fn set_install_outcome(
        &self,
        node: &str,
        version: &str,
        outcome: crate::kata_deploy_sim::InstallOutcome,
    ) {
        let node = if node == verification::ANY {
            node.to_owned()
        } else {
            self.node_name(node)
        };
        self.installs.set(node, version, outcome);
    }

    /// Every per-node install Job the simulated dispatcher created, in order.
    pub fn dispatched_install_jobs(&self) -> Vec<crate::kata_deploy_sim::DispatchedJob> {
        self.installs.dispatched()
    }

    /// The outcome when no rule matches (initially [`Outcome::Succeed`]).
    pub fn set_default_verification_outcome(&self, outcome: Outcome) {
        self.scenario
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .default = outcome;
    }

    /// Every outcome chosen so far, in order.
    pub fn verification_decisions(&self) -> Vec<Decision> {
        self.scenario
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A verification pod template for the product: `${NODE}` and `${TEST_POD}` placeholders,
    /// `restartPolicy: Never`, pinned to the node by `nodeName` (it must run on a cordoned
    /// node), labelled so this slice's scenario controls its outcome.
    pub fn verification_pod_template(&self) -> String {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: ${{TEST_POD}}
  labels:
    {label}: "true"
spec:
  nodeName: ${{NODE}}
  restartPolicy: Never
  tolerations:
  - operator: Exists
  containers:
  - name: verify
    image: quay.io/kata-containers/kata-verify:latest
    command: ["sh", "-c", "echo kata works"]
"#,
            label = verification::VERIFICATION_LABEL
        )
    }

    /// The slice's nodes and pods and the verification outcomes chosen so far, as text
    /// (printed automatically when a test panics while holding the slice).
    pub async fn report(&self) -> Result<String> {
        report(
            &self.client,
            &self.id,
            &self.namespaces(),
            &self.verification_decisions(),
        )
        .await
    }

    /// Deletes the slice's namespaces and nodes. Runs on its own thread and runtime: `Drop`
    /// cannot await, and the test's runtime may be the one being torn down.
    fn cleanup_blocking(&self, print_report: bool) {
        let kubeconfig = self.kubeconfig_path().to_path_buf();
        let id = self.id.clone();
        let namespaces = self.namespaces();
        let dir = self.dir.clone();
        let decisions = self.verification_decisions();
        let keep = std::env::var_os("KLM_KEEP_SLICES").is_some_and(|v| v == "1");
        let result = std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                // Bounded: a dead API server must not hang the test's teardown.
                rt.block_on(async {
                    tokio::time::timeout(CLEANUP_TIMEOUT, async {
                        let client = client_for(&kubeconfig).await?;
                        if print_report {
                            // A fresh client: `self.client` belongs to the test's runtime.
                            match report(&client, &id, &namespaces, &decisions).await {
                                Ok(r) => eprintln!(
                                    "----- slice {id} -----\n{r}----- end of slice {id} -----"
                                ),
                                Err(e) => eprintln!("klm-testkit: cannot report slice {id}: {e:#}"),
                            }
                        }
                        if keep {
                            eprintln!("klm-testkit: KLM_KEEP_SLICES=1, slice {id} left in place");
                            return Ok(());
                        }
                        let dp = DeleteParams::background();
                        let nss: Api<Namespace> = Api::all(client.clone());
                        for ns in &namespaces {
                            let _ = nss.delete(ns, &dp).await;
                        }
                        let nodes: Api<Node> = Api::all(client);
                        let _ = nodes
                            .delete_collection(
                                &dp,
                                &ListParams::default().labels(&format!("{SLICE_LABEL}={id}")),
                            )
                            .await;
                        Ok(())
                    })
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {CLEANUP_TIMEOUT:?}")))
                })
            })
            .join()
        });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("klm-testkit: cleaning up slice {}: {e:#}", self.id),
            Err(_) => eprintln!("klm-testkit: cleaning up slice {} panicked", self.id),
        }
        if !print_report && !keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        self.verifier.abort();
        self.kata_deploy_sim.abort();
        self.cleanup_blocking(std::thread::panicking());
    }
}

/// `<name, sanitised>-<5 hex digits>`, short enough for `verify-<id>` and `<id>-node-NN` names.
fn slice_id(name: &str) -> String {
    let mut base: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.truncate(24);
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "slice" } else { base };
    format!("{base}-{:05x}", rand::random::<u32>() & 0xfffff)
}

async fn report(
    client: &kube::Client,
    id: &str,
    namespaces: &[String],
    decisions: &[Decision],
) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{SLICE_LABEL}={id}"));
    for n in nodes.list(&lp).await? {
        let ready = node_ready_status(&n);
        let unschedulable = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let taints: Vec<String> = taints
            .iter()
            .map(|t| {
                format!(
                    "{}={}:{}",
                    t.key,
                    t.value.clone().unwrap_or_default(),
                    t.effect
                )
            })
            .collect();
        writeln!(
            out,
            "node {} ready={ready:?} unschedulable={unschedulable} taints={taints:?} labels={:?}",
            n.metadata.name.clone().unwrap_or_default(),
            n.metadata.labels.clone().unwrap_or_default()
        )?;
    }
    for ns in namespaces {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        for p in pods.list(&ListParams::default()).await? {
            let status = p.status.clone().unwrap_or_default();
            writeln!(
                out,
                "pod {ns}/{} node={:?} phase={:?} ready={} image-tag={:?} deleting={}",
                p.metadata.name.clone().unwrap_or_default(),
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
                status.phase,
                is_pod_ready(&p),
                verification::image_tag(&p),
                p.metadata.deletion_timestamp.is_some()
            )?;
        }
    }
    for d in decisions {
        writeln!(
            out,
            "verification pod {} on {} (kata-deploy {:?}) -> {}",
            d.pod, d.node, d.version, d.outcome
        )?;
    }
    Ok(out)
}
