//! The control plane a test binary uses: started on first use, or attached to a running one.
//!
//! There is exactly one implementation of "start a cluster": `tests/cluster/cluster.sh`. The
//! testkit runs its foreground supervisor (`cluster.sh run`) as a child with parent-death signal
//! SIGTERM (see [`crate::process`]); when the test binary exits for any reason, the supervisor's
//! trap stops etcd, the apiserver, the controllers, kwok and the chart server, and removes the
//! cluster directory. A `static` needs no destructor that way — Rust never runs one at exit.
//!
//! With `KLM_KUBECONFIG` set (by `eval "$(tests/cluster/cluster.sh env)"`, or by
//! `make test-e2e-env`), test binaries attach to that cluster instead; whoever started it stops it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

use crate::paths;
use crate::process::{Proc, spawn_tied};
use crate::real_node::{REAL_NODE_NAME, RealNode};
use crate::slice::Slice;

/// A running loopback control plane (see `tests/cluster/cluster.sh`).
pub struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    chart_repo: String,
    tools_dir: PathBuf,
    /// The node run by a real kubelet, when the cluster has one ([`Cluster::with_real_node`]).
    real_node: Option<RealNode>,
    /// The supervisor, when this process started the cluster. Never dropped (it lives in a
    /// `static`): the kernel's parent-death signal ends it.
    supervisor: Option<Proc>,
}

/// How long a cluster may take to come up. Generous: on a machine whose tool cache is cold the
/// supervisor first builds the tools (`make tools` does that ahead of the tests).
const START_TIMEOUT: Duration = Duration::from_secs(90 * 60);

static SHARED: OnceCell<Cluster> = OnceCell::const_new();

impl Cluster {
    /// The cluster shared by every test of this test binary, started on first use.
    ///
    /// Panics when no cluster can be started: nothing in an end-to-end test can go on without one.
    pub async fn shared() -> &'static Cluster {
        Cluster::shared_started(false).await
    }

    /// The shared cluster, started with a real node (kubelet, containerd, runc; see
    /// `tests/cluster/real-node.sh`): needs root, Debian's containerd, runc and CNI plugins
    /// (`make deps`) and the images of `make images`. A test binary uses either this or
    /// [`Cluster::shared`], never both (whichever comes first starts the cluster).
    ///
    /// Panics when no such cluster can be started, or when the attached one has no real node.
    pub async fn with_real_node() -> &'static Cluster {
        let cluster = Cluster::shared_started(true).await;
        if cluster.real_node.is_none() {
            panic!(
                "the test cluster has no real node: an attached cluster (KLM_KUBECONFIG) must be \
                 started with KLM_REAL_NODE=<name>"
            );
        }
        cluster
    }

    async fn shared_started(real_node: bool) -> &'static Cluster {
        SHARED
            .get_or_try_init(|| async {
                match std::env::var_os("KLM_KUBECONFIG") {
                    Some(kc) if !kc.is_empty() => Cluster::attach(PathBuf::from(kc)),
                    _ => tokio::task::spawn_blocking(move || Cluster::start(real_node))
                        .await
                        .map_err(|e| anyhow!("cluster start-up panicked: {e}"))?,
                }
            })
            .await
            .unwrap_or_else(|e| panic!("no test cluster: {e:#}"))
    }

    /// A fresh, isolated slice of this cluster with `nodes` simulated nodes (see [`Slice`]).
    ///
    /// Panics when the slice cannot be set up.
    pub async fn slice(&'static self, name: &str, nodes: usize) -> Slice {
        Slice::create(self, name, nodes)
            .await
            .unwrap_or_else(|e| panic!("cannot set up slice {name:?}: {e:#}"))
    }

    fn attach(kubeconfig: PathBuf) -> Result<Cluster> {
        let dir = kubeconfig
            .parent()
            .context("KLM_KUBECONFIG has no parent directory")?
            .to_path_buf();
        let env = read_env_file(&dir.join("cluster.env")).unwrap_or_default();
        let var = |key: &str| {
            std::env::var(key)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| env.get(key).cloned())
                .with_context(|| {
                    format!(
                        "{key} is not set and {}/cluster.env does not name it",
                        dir.display()
                    )
                })
        };
        Ok(Cluster {
            chart_repo: var("KLM_CHART_REPO")?,
            tools_dir: PathBuf::from(var("KLM_TOOLS_DIR")?),
            real_node: RealNode::from_env(&env)?,
            dir,
            kubeconfig,
            supervisor: None,
        })
    }

    /// Runs `cluster.sh run` in a fresh directory and waits for its READY line.
    fn start(real_node: bool) -> Result<Cluster> {
        let dir = paths::unique_temp_dir("klm-test-cluster")?;
        let script = paths::workspace_root().join("tests/cluster/cluster.sh");
        let supervisor_log = dir.join("supervisor.log");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("run")
            .env("KLM_CLUSTER_DIR", &dir)
            // Slices make their own nodes.
            .env("KLM_NODES", "0")
            .env("KLM_REAL_NODE", if real_node { REAL_NODE_NAME } else { "" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&supervisor_log)?);
        // SIGTERM, not SIGKILL: the supervisor's trap must get to run to clean up.
        let mut child = spawn_tied(cmd, libc::SIGTERM).context("start tests/cluster/cluster.sh")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let supervisor = Proc::watch("cluster-supervisor", child, supervisor_log.clone());
        eprintln!(
            "klm-testkit: starting a test cluster in {} (log: {})",
            dir.display(),
            supervisor_log.display()
        );

        // The supervisor prints exactly one line, "READY <dir>", then nothing; a reader thread
        // keeps the pipe drained regardless, so a late write can never SIGPIPE it.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("READY ")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        if ready_rx.recv_timeout(START_TIMEOUT).is_err() {
            // SIGTERM lets the supervisor clean up after itself; dropping the Proc would SIGKILL it.
            supervisor.terminate();
            let status = supervisor.exit_status();
            std::mem::forget(supervisor);
            let log = std::fs::read_to_string(&supervisor_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "tests/cluster/cluster.sh run did not become ready ({}); last lines of its log:\n{}",
                match status {
                    Some(s) => format!("exited: {s}"),
                    None => format!("still starting after {START_TIMEOUT:?}"),
                },
                tail.join("\n")
            );
        }
        let env = read_env_file(&dir.join("cluster.env"))?;
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .with_context(|| format!("cluster.env has no {k}"))
        };
        Ok(Cluster {
            kubeconfig: PathBuf::from(get("KLM_KUBECONFIG")?),
            chart_repo: get("KLM_CHART_REPO")?,
            tools_dir: PathBuf::from(get("KLM_TOOLS_DIR")?),
            real_node: RealNode::from_env(&env)?,
            dir,
            supervisor: Some(supervisor),
        })
    }

    /// Stops the cluster now, if this process started it (an attached cluster is left to its
    /// owner): the supervisor gets SIGTERM, kills every component and removes the directory.
    /// Tests never need this — the cluster ends with the test binary — but a long-lived
    /// program (the demo) may want to stop it and report that it did.
    pub async fn shutdown(&self) -> Result<()> {
        if let Some(supervisor) = &self.supervisor {
            supervisor.terminate();
            supervisor.wait(Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    /// Stops kube-apiserver (SIGKILL: to every client, a crash) and keeps etcd, the controllers
    /// and kwok running, through the supervisor (`cluster.sh stop-apiserver`). Clients see
    /// connection refused until [`ApiServerOutage::end`] (or its drop) starts it again with the
    /// same command line: same port, certificates and etcd, so every object is still there.
    ///
    /// An outage hits every test sharing the cluster: run such tests in a binary of their own,
    /// one at a time (`tests/e2e/tests/faults.rs`).
    pub async fn stop_apiserver(&'static self) -> Result<ApiServerOutage> {
        self.apiserver_command("stop-apiserver").await?;
        Ok(ApiServerOutage {
            cluster: self,
            since: std::time::Instant::now(),
            ended: false,
        })
    }

    /// Starts kube-apiserver again after [`Cluster::stop_apiserver`] and waits until it is ready
    /// (a no-op when it runs).
    pub async fn start_apiserver(&self) -> Result<()> {
        self.apiserver_command("start-apiserver").await
    }

    async fn apiserver_command(&self, command: &str) -> Result<()> {
        let out = tokio::process::Command::new("bash")
            .arg(paths::workspace_root().join("tests/cluster/cluster.sh"))
            .arg(command)
            .env("KLM_CLUSTER_DIR", &self.dir)
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run cluster.sh {command}"))?;
        if !out.status.success() {
            bail!(
                "cluster.sh {command} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// True when this process started the cluster (it ends with this process).
    pub fn is_owned(&self) -> bool {
        self.supervisor.is_some()
    }

    /// The cluster directory (kubeconfig, logs/, pki/, slices/).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (client certificate in group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The loopback Helm chart repository serving the fixture kata-deploy charts
    /// (`helm install <rel> kata-deploy --repo <this> --version <v>`).
    pub fn chart_repo_url(&self) -> &str {
        &self.chart_repo
    }

    /// The directory holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
    /// kwok and helm.
    pub fn tools_dir(&self) -> &Path {
        &self.tools_dir
    }

    /// The node run by a real kubelet, if the cluster has one ([`Cluster::with_real_node`]).
    pub fn real_node(&self) -> Option<&RealNode> {
        self.real_node.as_ref()
    }

    pub fn helm_path(&self) -> PathBuf {
        self.tools_dir.join("helm")
    }

    /// A new admin client. Make one per tokio runtime: a client's connection pool belongs to
    /// the runtime it was made in, and every `#[tokio::test]` has its own. Unlike kube's
    /// default, it does not retry 429/503/504 responses: tests see them.
    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }
}

pub(crate) async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read kubeconfig {}", kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // kube's default client silently retries 429/503/504 with backoff of up to 1000 s (15
    // attempts): an eviction refused by a PodDisruptionBudget would block for minutes instead
    // of returning its 429. Tests must see what the API server answers.
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

/// An API server outage in progress (see [`Cluster::stop_apiserver`]). Dropping it without
/// [`ApiServerOutage::end`] (a test that failed mid-outage) starts the API server again, so the
/// next test of the binary finds a working cluster.
#[must_use = "the API server stays down until the outage is ended or dropped"]
pub struct ApiServerOutage {
    cluster: &'static Cluster,
    since: std::time::Instant,
    ended: bool,
}

impl ApiServerOutage {
    /// Starts the API server again and waits until it is ready; returns how long it was down.
    pub async fn end(mut self) -> Result<Duration> {
        self.cluster.start_apiserver().await?;
        self.ended = true;
        Ok(self.since.elapsed())
    }

    /// How long the API server has been down so far.
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for ApiServerOutage {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Drop cannot await; a blocking child process is fine in a test's teardown.
        let status = Command::new("bash")
            .arg(paths::workspace_root().join("tests/cluster/cluster.sh"))
            .arg("start-apiserver")
            .env("KLM_CLUSTER_DIR", self.cluster.dir())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!(
                "klm-testkit: could not start kube-apiserver again after an outage: {status:?}"
            );
        }
    }
}

fn read_env_file(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}
