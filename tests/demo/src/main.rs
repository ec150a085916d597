//! `make demo`: kata-lifecycle-manager upgrading a fleet node by node, then rolling back.
//!
//! On a real control plane started on this machine (etcd, kube-apiserver, controller-manager,
//! scheduler, kwok simulating 5 nodes; see `tests/cluster/cluster.sh`), with the fixture
//! kata-deploy chart at 3.27.0, the coordinator and one agent per node as local processes:
//!
//! 1. opt 4 of the 5 nodes in and trigger 3.28.0: the table shows each node going through
//!    preparing → cordoned → upgrading → verifying → completed, one at a time;
//! 2. trigger 3.29.0 with the verification pod set to fail on the third node: nodes 1-2 are
//!    upgraded, node 3 fails verification, the release is rolled back to the recorded revision,
//!    nodes 1-3 are restored, node 4 is never touched;
//! 3. print `kubectl get nodes -L …` (formatted here: there is no kubectl) and
//!    `kubectl kata-lifecycle status` (the plugin, which also made the triggers), tear
//!    everything down.
//!
//! Exits 0 only when the upgrade succeeded and the rollback happened exactly as expected.

mod kubectl;
mod live;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use klm_protocol::keys::{defaults, node as node_keys};
use klm_protocol::{RunPhase, RunRecord};
use klm_testkit::wait::{DEFAULT_TIMEOUT, wait_for, when};
use klm_testkit::{Cluster, Outcome, Proc, Slice};
use kube::api::{Api, ListParams, PostParams};

const NODES: usize = 5;
const OPTED_IN: usize = 4;
const INSTALLED: &str = "3.27.0";
const GOOD: &str = "3.28.0";
const BAD: &str = "3.29.0";
/// Verification of `BAD` fails on this node (the third opted-in node).
const FAILING_NODE: &str = "node-3";
const RELEASE: &str = "kata-deploy";
const LEASE_SECONDS: &str = "15";
const ACT_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let t0 = Instant::now();
    // Everything the demo creates on disk (the cluster directory, logs, helm state) goes under
    // one directory, removed at the end. Set before any thread exists.
    let scratch = std::env::temp_dir().join(format!("klm-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        eprintln!("demo: cannot create {}: {e}", scratch.display());
        return ExitCode::FAILURE;
    }
    // SAFETY: single-threaded here; nothing reads the environment concurrently.
    unsafe { std::env::set_var("TMPDIR", &scratch) };

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let pause = std::env::var_os("KLM_DEMO_PAUSE").is_some_and(|v| v == "1");
        let finished = tokio::select! {
            r = run(t0, &scratch) => Some(r),
            _ = tokio::signal::ctrl_c(), if !pause => None,
        };
        // Ctrl-C mid-demo: the product processes and the slice went with the dropped future;
        // stop the cluster all the same.
        match finished {
            Some(r) => r,
            None => {
                if let Some(cluster) = CLUSTER.get() {
                    stop_cluster(cluster).await;
                }
                Err(anyhow::anyhow!("interrupted"))
            }
        }
    });
    let code = match &result {
        Ok(()) => {
            println!(
                "\ndemo: OK — upgraded {OPTED_IN} nodes to {GOOD} one at a time, then {BAD} failed \
                 verification on the third node and everything was rolled back ({:.0}s in all)",
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(rt);
    let _ = std::fs::remove_dir_all(&scratch);
    code
}

fn step(t0: Instant, msg: impl AsRef<str>) {
    println!(
        "\n==> [{:>5.1}s] {}",
        t0.elapsed().as_secs_f64(),
        msg.as_ref()
    );
}

async fn run(t0: Instant, scratch: &Path) -> Result<()> {
    step(
        t0,
        "starting a local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, a chart repository",
    );
    let cluster = start_cluster(scratch).await?;
    let result = async {
        let slice = cluster.slice("demo", NODES).await;
        println!(
            "    ready; {NODES} simulated nodes (kwok): {}",
            slice.nodes().await?.join(", ")
        );
        let mut demo = Demo::new(slice, t0);
        let r = demo.play().await;
        if r.is_err() {
            demo.keep_logs();
        }
        if std::env::var_os("KLM_DEMO_PAUSE").is_some_and(|v| v == "1") {
            demo.pause().await;
        }
        demo.shutdown().await;
        r
    }
    .await;
    step(t0, "tearing down: agents, coordinator, control plane");
    stop_cluster(cluster).await;
    if std::env::var_os("KLM_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        println!(
            "    stopped; the cluster KLM_KUBECONFIG points at keeps running (its owner stops it)"
        );
    } else {
        println!("    stopped; nothing left running");
    }
    result
}

/// Starts the testkit's cluster (`tests/cluster/cluster.sh run`, tied to this process),
/// forwarding its progress lines.
async fn start_cluster(scratch: &Path) -> Result<&'static Cluster> {
    let tail = tokio::spawn(forward_supervisor_log(scratch.to_path_buf()));
    let started = tokio::spawn(Cluster::shared()).await;
    tail.abort();
    let cluster = started.map_err(|e| anyhow::anyhow!("the control plane did not start: {e}"))?;
    let _ = CLUSTER.set(cluster);
    Ok(cluster)
}

/// The cluster, once started (for the Ctrl-C path).
static CLUSTER: std::sync::OnceLock<&'static Cluster> = std::sync::OnceLock::new();

/// Prints the supervisor's log lines ("etcd: ready", …) while the cluster starts. The log is a
/// plain file written by a shell script, so this reads it on a short timer; it stops as soon as
/// the cluster is up.
async fn forward_supervisor_log(scratch: PathBuf) {
    let mut printed = 0usize;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(dirs) = std::fs::read_dir(&scratch) else {
            continue;
        };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("supervisor.log")) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            for l in lines.iter().skip(printed) {
                println!("    {l}");
            }
            printed = printed.max(lines.len());
        }
    }
}

/// Ends the cluster supervisor (it tears every component down and removes its directory) and
/// waits for it to exit.
async fn stop_cluster(cluster: &Cluster) {
    if std::env::var_os("KLM_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return; // attached to a cluster someone else started (the testkit's rule): theirs to stop
    }
    let pid_file = cluster.dir().join("supervisor.pid");
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
    else {
        return;
    };
    // A pidfd becomes readable when the process exits: wait on that, not on a timer.
    // SAFETY: plain syscalls on a pid this process started (the testkit's supervisor child).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if fd >= 0 {
        let _ = tokio::task::spawn_blocking(move || {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own; then close the fd we opened.
            unsafe {
                libc::poll(&mut pfd, 1, 30_000);
                libc::close(fd);
            }
        })
        .await;
    }
}

struct Demo {
    slice: Slice,
    t0: Instant,
    coordinator: Option<Proc>,
    agents: Vec<Proc>,
}

impl Demo {
    fn new(slice: Slice, t0: Instant) -> Demo {
        Demo {
            slice,
            t0,
            coordinator: None,
            agents: Vec::new(),
        }
    }

    fn step(&self, msg: impl AsRef<str>) {
        step(self.t0, msg)
    }

    fn ns(&self) -> String {
        self.slice.namespace()
    }

    /// The nodes the demo opts in, and the selector the coordinator uses: the default opt-in
    /// label, combined with this demo's own nodes (harmless here, and safe should the demo be
    /// pointed at a shared cluster with `KLM_KUBECONFIG`).
    fn selector(&self) -> String {
        format!(
            "{},{}",
            node_keys::DEFAULT_SELECTOR,
            self.slice.node_selector()
        )
    }

    async fn play(&mut self) -> Result<()> {
        let kd = self.slice.kata_deploy_namespace();
        self.step(format!(
            "helm install {RELEASE} (fixture kata-deploy chart {INSTALLED}) -n {kd}"
        ));
        self.slice
            .install_kata_deploy(RELEASE, INSTALLED, &[])
            .await?;
        println!("    kata-deploy {INSTALLED} Ready on all {NODES} nodes");

        self.start_product().await?;
        let s = &self.slice;

        self.step(format!(
            "opting {OPTED_IN} of {NODES} nodes in: kubectl label node <node> {}=true",
            node_keys::WINDOW_LABEL
        ));
        for i in 1..=OPTED_IN {
            s.label_node(&format!("node-{i}"), node_keys::WINDOW_LABEL, "true")
                .await?;
        }
        println!(
            "    {} is left out; the coordinator selects nodes by {}",
            s.node_name(&format!("node-{NODES}")),
            self.selector()
        );

        let live = live::Live::start(
            s.client(),
            &s.node_selector(),
            &kd,
            &self.ns(),
            defaults::TRIGGER_CONFIGMAP,
        )
        .await?;
        let result = self.acts(&live).await;
        live.stop();
        result
    }

    async fn acts(&self, live: &live::Live) -> Result<()> {
        // Act 1: a good version, node by node.
        let before = self.slice.nodes().await?;
        let run1 = self.trigger(live, GOOD).await?;
        self.check_upgrade(&run1, &before).await?;

        // Act 2: a version whose verification fails on the third node.
        let failing = self.slice.node_name(FAILING_NODE);
        self.slice
            .set_verification_outcome(FAILING_NODE, BAD, Outcome::Fail);
        self.step(format!(
            "scenario: the verification pod on {failing} will exit 1 once kata-deploy {BAD} runs there"
        ));
        let pods_before = self.kata_deploy_pods().await?;
        let revision_before = self.release_revision().await?;
        let run2 = self.trigger(live, BAD).await?;
        self.check_rollback(&run2, &pods_before, revision_before)
            .await?;

        self.step(format!(
            "kubectl get nodes -L {} -L {}   (printed by the demo in kubectl's format: there is no kubectl here)",
            node_keys::STATUS,
            node_keys::CURRENT_VERSION
        ));
        let nodes: Api<Node> = Api::all(self.slice.client());
        let mut list = nodes
            .list(&ListParams::default().labels(&self.slice.node_selector()))
            .await?
            .items;
        list.sort_by_key(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            (name.len(), name)
        });
        print!(
            "{}",
            kubectl::get_nodes(
                &list,
                &[node_keys::STATUS, node_keys::CURRENT_VERSION],
                live::now_ms()
            )
        );

        self.step(format!(
            "helm history {RELEASE} -n {}",
            self.slice.kata_deploy_namespace()
        ));
        print!(
            "{}",
            self.slice
                .helm(&[
                    "history",
                    RELEASE,
                    "-n",
                    &self.slice.kata_deploy_namespace()
                ])
                .await?
        );

        self.step(format!("kubectl kata-lifecycle status -n {}", self.ns()));
        print!("{}", self.plugin(&["status", "-n", &self.ns()]).await?);
        Ok(())
    }

    /// Creates the trigger ConfigMap, starts the coordinator and one agent per node.
    async fn start_product(&mut self) -> Result<()> {
        let s = &self.slice;
        let ns = self.ns();
        self.step(format!(
            "creating the trigger ConfigMap {ns}/{} (the chart creates it on a real cluster)",
            defaults::TRIGGER_CONFIGMAP
        ));
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": defaults::TRIGGER_CONFIGMAP,
                "labels": {
                    "app.kubernetes.io/name": "kata-lifecycle-manager",
                    "app.kubernetes.io/instance": "kata-lifecycle-manager",
                },
            },
        }))?;
        Api::<ConfigMap>::namespaced(s.client(), &ns)
            .create(&PostParams::default(), &cm)
            .await
            .context("create the trigger ConfigMap")?;
        let verify = s.dir().join("verification-pod.yaml");
        std::fs::write(&verify, s.verification_pod_template())?;

        self.step(format!(
            "starting klm-coordinator and {NODES} klm-agent processes (one per node, as the DaemonSet would), Lease {LEASE_SECONDS}s"
        ));
        let helm = s.cluster().helm_path().display().to_string();
        let verify = verify.display().to_string();
        let kd = s.kata_deploy_namespace();
        let vns = s.verification_namespace();
        let selector = self.selector();
        let coordinator = s.spawn(
            "klm-coordinator",
            &["run"],
            &[
                ("POD_NAMESPACE", &ns),
                ("POD_NAME", "klm-coordinator-demo"),
                ("KLM_HEALTH_ADDR", "127.0.0.1:0"),
                ("KLM_LOG_FORMAT", "text"),
                ("KLM_LEASE_DURATION_SECONDS", LEASE_SECONDS),
                ("KLM_CHART_REF", "kata-deploy"),
                ("KLM_CHART_REPO", s.chart_repo_url()),
                ("KLM_HELM_BIN", &helm),
                ("KLM_DEFAULT_HELM_RELEASE", RELEASE),
                ("KLM_DEFAULT_HELM_NAMESPACE", &kd),
                ("KLM_DEFAULT_NODE_SELECTOR", &selector),
                ("KLM_DEFAULT_VERIFICATION_NAMESPACE", &vns),
                ("KLM_DEFAULT_VERIFICATION_POD_FILE", &verify),
                ("KLM_DEFAULT_VERIFICATION_TIMEOUT", "60s"),
            ],
        )?;
        // The coordinator creates the upgrade Lease once it leads: then it is ready.
        let leases: Api<Lease> = Api::namespaced(s.client(), &ns);
        let ready = wait_for(
            &leases,
            defaults::UPGRADE_LEASE,
            "the coordinator to create the upgrade Lease",
            DEFAULT_TIMEOUT,
            when(|_: &Lease| true),
        )
        .await;
        self.coordinator = Some(coordinator);
        if let Err(e) = ready {
            self.exited_early();
            return Err(e);
        }
        for node in s.nodes().await? {
            self.agents.push(s.spawn(
                "klm-agent",
                &[],
                &[
                    ("NODE_NAME", &node),
                    ("POD_NAMESPACE", &ns),
                    ("KLM_HEALTH_ADDR", "127.0.0.1:0"),
                    ("KLM_LOG_FORMAT", "text"),
                    ("KLM_POD_READY_TIMEOUT", "60s"),
                ],
            )?);
        }
        println!(
            "    coordinator pid {}, agents pids {}; logs in {}",
            self.coordinator.as_ref().map(Proc::pid).unwrap_or(0),
            self.agents
                .iter()
                .map(|a| a.pid().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            s.dir().join("logs").display()
        );
        Ok(())
    }

    /// Triggers with the kubectl plugin (`kubectl kata-lifecycle upgrade <version>`, which
    /// writes the trigger annotations) and follows the run it starts until it ends.
    async fn trigger(&self, live: &live::Live, version: &str) -> Result<RunRecord> {
        let ns = self.ns();
        let previous = live.run().map(|r| r.id);
        self.step(format!("kubectl kata-lifecycle upgrade {version} -n {ns}"));
        self.plugin(&["upgrade", version, "-n", &ns])
            .await
            .context("trigger with the kubectl plugin")?;
        let run = live
            .follow(
                "    live (watching Nodes, kata-deploy pods and the trigger ConfigMap):",
                ACT_TIMEOUT,
                |r| Some(&r.id) != previous.as_ref() && r.phase.is_finished(),
            )
            .await;
        self.exited_early();
        let run = run?;
        println!("    run {} ended {}: {}", run.id, run.phase, run.message);
        Ok(run)
    }

    /// Says which product process died, if one did.
    fn exited_early(&self) {
        for p in self.coordinator.iter().chain(&self.agents) {
            if let Some(status) = p.exit_status() {
                eprintln!(
                    "demo: {} exited ({status}); last lines of its log:",
                    p.name()
                );
                eprintln!("{}", tail(&p.logs(), 25));
            }
        }
    }

    async fn check_upgrade(&self, run: &RunRecord, nodes: &[String]) -> Result<()> {
        let mut checks = Checks::new("upgrade to 3.28.0");
        checks.expect(
            run.phase == RunPhase::Succeeded,
            format!("run phase Succeeded (is {}: {})", run.phase, run.message),
        );
        let opted: Vec<String> = (1..=OPTED_IN)
            .map(|i| self.slice.node_name(&format!("node-{i}")))
            .collect();
        checks.expect(
            run.plan == opted,
            format!(
                "plan is the {OPTED_IN} opted-in nodes in order (is {:?})",
                run.plan
            ),
        );
        let pods = self.kata_deploy_pods().await?;
        for name in nodes {
            let node = self.slice.node(name).await?;
            let (status, version) = status_and_version(&node);
            let pod = pods.get(name).map(|(v, _)| v.as_str()).unwrap_or("-");
            if opted.contains(name) {
                checks.expect(
                    status == "completed" && version == GOOD && pod == GOOD,
                    format!("{name}: completed, version {GOOD}, kata-deploy pod {GOOD} (is {status:?}, {version:?}, pod {pod})"),
                );
            } else {
                checks.expect(
                    status.is_empty() && pod == INSTALLED,
                    format!("{name} (not opted in): untouched, kata-deploy pod still {INSTALLED} (is {status:?}, pod {pod})"),
                );
            }
            checks.expect(!is_cordoned(&node), format!("{name}: schedulable"));
        }
        checks.finish()
    }

    async fn check_rollback(
        &self,
        run: &RunRecord,
        pods_before: &std::collections::BTreeMap<String, (String, String)>,
        revision_before: u32,
    ) -> Result<()> {
        let mut checks = Checks::new("failed upgrade to 3.29.0 and rollback");
        let failing = self.slice.node_name(FAILING_NODE);
        checks.expect(
            run.phase == RunPhase::Failed,
            format!("run phase Failed (is {})", run.phase),
        );
        let failed_node = run.failure.as_ref().and_then(|f| f.node.clone());
        checks.expect(
            failed_node.as_deref() == Some(failing.as_str()),
            format!(
                "the failure names {failing} (names {:?}: {})",
                failed_node,
                run.failure
                    .as_ref()
                    .map(|f| f.reason.as_str())
                    .unwrap_or("-")
            ),
        );
        let recorded = run.release.as_ref().map(|r| r.recorded_revision);
        checks.expect(
            recorded == Some(revision_before),
            format!("recorded revision is the one deployed before the run, {revision_before} (is {recorded:?})"),
        );
        let meta = self.release_metadata().await?;
        let (version, status, revision) = (
            meta["version"].as_str().unwrap_or_default().to_owned(),
            meta["status"].as_str().unwrap_or_default().to_owned(),
            meta["revision"].as_u64().unwrap_or_default(),
        );
        checks.expect(
            version == GOOD && status == "deployed" && revision > u64::from(revision_before),
            format!(
                "release rolled back to revision {revision_before}: now revision {revision}, chart {version}, {status}"
            ),
        );
        let pods = self.kata_deploy_pods().await?;
        for i in 1..=NODES {
            let name = self.slice.node_name(&format!("node-{i}"));
            let node = self.slice.node(&name).await?;
            let (status, version) = status_and_version(&node);
            let (pod_version, pod_uid) = pods.get(&name).cloned().unwrap_or_default();
            let same_pod = pods_before.get(&name).map(|(_, uid)| uid) == Some(&pod_uid);
            match i {
                1..=3 => checks.expect(
                    status == "rolled-back" && version == GOOD && pod_version == GOOD,
                    format!(
                        "{name}: {}rolled back to {GOOD} (is {status:?}, version {version:?}, pod {pod_version})",
                        if i == 3 { "failed verification, " } else { "upgraded, then " }
                    ),
                ),
                4 => checks.expect(
                    status == "completed" && version == GOOD && pod_version == GOOD && same_pod,
                    format!("{name}: never reached, untouched (still {status:?} {version:?} from the first run, same kata-deploy pod: {same_pod})"),
                ),
                _ => checks.expect(
                    status.is_empty() && pod_version == INSTALLED && same_pod,
                    format!("{name} (not opted in): untouched (pod {pod_version}, same pod: {same_pod})"),
                ),
            }
            checks.expect(!is_cordoned(&node), format!("{name}: schedulable"));
        }
        checks.finish()
    }

    /// node → (image tag, uid) of its Ready kata-deploy pod.
    async fn kata_deploy_pods(
        &self,
    ) -> Result<std::collections::BTreeMap<String, (String, String)>> {
        let pods: Api<Pod> =
            Api::namespaced(self.slice.client(), &self.slice.kata_deploy_namespace());
        let mut out = std::collections::BTreeMap::new();
        for p in pods
            .list(&ListParams::default().labels("name=kata-deploy"))
            .await?
        {
            if p.metadata.deletion_timestamp.is_some() || !klm_testkit::wait::is_pod_ready(&p) {
                continue;
            }
            if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                out.insert(
                    node,
                    (
                        klm_testkit::verification::image_tag(&p).unwrap_or_default(),
                        p.metadata.uid.clone().unwrap_or_default(),
                    ),
                );
            }
        }
        Ok(out)
    }

    async fn release_metadata(&self) -> Result<serde_json::Value> {
        self.slice.release_metadata(RELEASE).await
    }

    async fn release_revision(&self) -> Result<u32> {
        Ok(self.release_metadata().await?["revision"]
            .as_u64()
            .context("no revision in `helm get metadata`")? as u32)
    }

    /// The real kubectl plugin (`kubectl-kata_lifecycle`), run against the demo cluster.
    async fn plugin(&self, args: &[&str]) -> Result<String> {
        let bin = klm_testkit::paths::binary("kubectl-kata_lifecycle")?;
        let out = tokio::process::Command::new(bin)
            .args(args)
            .envs(self.slice.env())
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "kubectl kata-lifecycle {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// On failure: copy the product's logs out of the cluster directory (removed at teardown).
    fn keep_logs(&self) {
        let from = self.slice.dir().join("logs");
        let to = klm_testkit::paths::workspace_root().join("target/demo-logs");
        let _ = std::fs::remove_dir_all(&to);
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        let mut copied = 0;
        if let Ok(entries) = std::fs::read_dir(&from) {
            for e in entries.flatten() {
                if std::fs::copy(e.path(), to.join(e.file_name())).is_ok() {
                    copied += 1;
                }
            }
        }
        if let Some(c) = &self.coordinator {
            eprintln!(
                "demo: last lines of the coordinator's log:\n{}",
                tail(&c.logs(), 40)
            );
        }
        eprintln!("demo: {copied} process logs kept in {}", to.display());
    }

    /// `KLM_DEMO_PAUSE=1`: keep everything running for a look around with kubectl until Ctrl-C.
    async fn pause(&self) {
        let s = &self.slice;
        println!(
            "\n==> paused (KLM_DEMO_PAUSE=1); the cluster, the coordinator and the agents keep running:\n\
             \x20   export KUBECONFIG={}\n\
             \x20   export PATH={}:$PATH   # helm\n\
             \x20   export HELM_CACHE_HOME={dir}/helm/cache HELM_CONFIG_HOME={dir}/helm/config HELM_DATA_HOME={dir}/helm/data\n\
             \x20   namespaces: {} (trigger ConfigMap), {} (kata-deploy), {} (verification pods)\n\
             \x20   process logs: {dir}/logs\n\
             Press Ctrl-C to tear down.",
            s.kubeconfig_path().display(),
            s.tools_dir().display(),
            self.ns(),
            s.kata_deploy_namespace(),
            s.verification_namespace(),
            dir = s.dir().display(),
        );
        let _ = tokio::signal::ctrl_c().await;
    }

    /// SIGTERM to every product process, then wait for them (a graceful stop, as on pod deletion).
    async fn shutdown(&mut self) {
        let procs: Vec<&Proc> = self.coordinator.iter().chain(&self.agents).collect();
        for p in &procs {
            p.terminate();
        }
        futures::future::join_all(procs.iter().map(|p| p.wait(Duration::from_secs(10)))).await;
        // Dropping a Proc SIGKILLs whatever is left of its process group.
        self.agents.clear();
        self.coordinator = None;
    }
}

fn status_and_version(node: &Node) -> (String, String) {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    (
        labels.get(node_keys::STATUS).cloned().unwrap_or_default(),
        labels
            .get(node_keys::CURRENT_VERSION)
            .cloned()
            .unwrap_or_default(),
    )
}

fn is_cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Named expectations, printed as a checklist; any miss fails the demo.
struct Checks {
    what: &'static str,
    failed: Vec<String>,
}

impl Checks {
    fn new(what: &'static str) -> Checks {
        println!("    checking the {what}:");
        Checks {
            what,
            failed: Vec::new(),
        }
    }

    fn expect(&mut self, ok: bool, what: String) {
        println!("      [{}] {what}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.failed.push(what);
        }
    }

    fn finish(self) -> Result<()> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!(
                "the {} did not go as expected:\n  {}",
                self.what,
                self.failed.join("\n  ")
            )
        }
    }
}
