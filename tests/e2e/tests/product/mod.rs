//! The product under test: one coordinator and one agent per simulated node, as real processes,
//! on a slice of the real control plane; plus a safety monitor that watches every Node and
//! Lease update during the scenario.
#![allow(dead_code)]

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_protocol::keys::{node as node_keys, status_data, trigger};
use klm_protocol::{NodeStatus, RunRecord};
use klm_testkit::{Proc, Slice};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const CM: &str = "kata-lifecycle-manager";
pub const RELEASE: &str = "kata-deploy";
pub const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// What the monitor saw; checked by `assert_safe`.
#[derive(Debug, Default)]
pub struct Observed {
    /// Latest status label per node.
    pub status: BTreeMap<String, String>,
    /// Every (node, status) transition in watch order.
    pub transitions: Vec<(String, String)>,
    /// When the watch delivered each transition (same order as `transitions`).
    pub seen_at: Vec<std::time::Instant>,
    /// Violations of "at most one node in progress", with the offending states.
    pub concurrent: Vec<String>,
    /// Distinct consecutive Lease holders (their nodes).
    pub holders: Vec<String>,
}

pub struct Product {
    pub slice: Slice,
    pub coordinator: Option<Proc>,
    pub agents: HashMap<String, Proc>,
    pub observed: Arc<Mutex<Observed>>,
    pub extra_coordinator_args: Vec<String>,
    monitor: Vec<tokio::task::JoinHandle<()>>,
}

impl Product {
    /// A slice with `nodes` simulated nodes, kata-deploy `version` installed, the trigger
    /// ConfigMap, the coordinator and one agent per node running.
    pub async fn start(name: &str, nodes: usize, version: &str) -> Result<Product> {
        Self::start_with(name, nodes, version, &[]).await
    }

    pub async fn start_with(
        name: &str,
        nodes: usize,
        version: &str,
        coordinator_args: &[&str],
    ) -> Result<Product> {
        let slice = klm_testkit::Cluster::shared()
            .await
            .slice(name, nodes)
            .await;
        slice.install_kata_deploy(RELEASE, version, &[]).await?;
        let cms: Api<ConfigMap> = Api::namespaced(slice.client(), &slice.namespace());
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": CM}}))?;
        cms.create(&PostParams::default(), &cm).await?;
        std::fs::write(
            slice.dir().join("verify.yaml"),
            slice.verification_pod_template(),
        )?;
        let mut p = Product {
            slice,
            coordinator: None,
            agents: HashMap::new(),
            observed: Arc::default(),
            extra_coordinator_args: coordinator_args.iter().map(|s| s.to_string()).collect(),
            monitor: Vec::new(),
        };
        p.start_monitor();
        p.start_coordinator()?;
        for n in p.slice.nodes().await? {
            p.start_agent(&n)?;
        }
        Ok(p)
    }

    pub fn node(&self, suffix: &str) -> String {
        self.slice.node_name(suffix)
    }

    fn coordinator_args(&self) -> Vec<String> {
        self.coordinator_args_as("coordinator-test")
    }

    fn coordinator_args_as(&self, identity: &str) -> Vec<String> {
        let s = &self.slice;
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            &s.namespace(),
            "--identity",
            identity,
            "--lease-duration-seconds",
            "6",
            "--turn-start-timeout",
            "20s",
            "--chart-ref",
            "kata-deploy",
            "--chart-repo",
            s.chart_repo_url(),
            "--health-addr",
            "127.0.0.1:0",
            "--log-format",
            "text",
            "--default-helm-release",
            RELEASE,
            "--default-helm-namespace",
            &s.kata_deploy_namespace(),
            "--default-verification-namespace",
            &s.verification_namespace(),
            "--default-verification-pod-file",
            &s.dir().join("verify.yaml").display().to_string(),
            // Only this slice's nodes that opted in.
            "--default-node-selector",
            &format!("{},{}", s.node_selector(), node_keys::DEFAULT_SELECTOR),
            "--default-verification-timeout",
            "60s",
            "--default-drain-timeout",
            "20s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra_coordinator_args.iter().cloned());
        args
    }

    pub fn start_coordinator(&mut self) -> Result<()> {
        let args = self.coordinator_args();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.coordinator = Some(self.slice.spawn(
            "klm-coordinator",
            &refs,
            &[("RUST_LOG", "info")],
        )?);
        Ok(())
    }

    /// A second coordinator replica with its own identity (it must stay on standby while the
    /// first one leads).
    pub fn spawn_coordinator_as(&self, identity: &str) -> Result<Proc> {
        let args = self.coordinator_args_as(identity);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.slice
            .spawn("klm-coordinator", &refs, &[("RUST_LOG", "info")])
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.kill();
        }
    }

    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let ns = self.slice.namespace();
        let proc = self.slice.spawn(
            "klm-agent",
            &[
                "--health-addr",
                "127.0.0.1:0",
                "--log-format",
                "text",
                "--pod-ready-timeout",
                "60s",
            ],
            &[
                ("NODE_NAME", node),
                ("POD_NAMESPACE", &ns),
                ("RUST_LOG", "info"),
            ],
        )?;
        self.agents.insert(node.to_string(), proc);
        Ok(())
    }

    pub fn kill_agent(&mut self, node: &str) {
        if let Some(a) = self.agents.remove(node) {
            a.kill();
        }
    }

    fn start_monitor(&mut self) {
        let nodes: Api<Node> = Api::all(self.slice.client());
        let sel = self.slice.node_selector();
        let obs = self.observed.clone();
        self.monitor.push(tokio::spawn(async move {
            let mut stream = std::pin::pin!(
                watcher(nodes, watcher::Config::default().labels(&sel))
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(Ok(node)) = stream.next().await {
                let name = node.metadata.name.clone().unwrap_or_default();
                let status = node
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(node_keys::STATUS))
                    .cloned()
                    .unwrap_or_default();
                let mut o = obs.lock().unwrap();
                if o.status.get(&name) != Some(&status) {
                    o.status.insert(name.clone(), status.clone());
                    o.transitions.push((name, status));
                    o.seen_at.push(std::time::Instant::now());
                    let busy: Vec<String> = o
                        .status
                        .iter()
                        .filter(|(_, s)| s.parse::<NodeStatus>().is_ok_and(|s| s.is_in_progress()))
                        .map(|(n, s)| format!("{n}={s}"))
                        .collect();
                    if busy.len() > 1 {
                        o.concurrent.push(busy.join(","));
                    }
                }
            }
        }));
        let leases: Api<Lease> = Api::namespaced(self.slice.client(), &self.slice.namespace());
        let obs = self.observed.clone();
        self.monitor.push(tokio::spawn(async move {
            let cfg =
                watcher::Config::default().fields("metadata.name=kata-lifecycle-manager-upgrade");
            let mut stream =
                std::pin::pin!(watcher(leases, cfg).default_backoff().applied_objects());
            while let Some(Ok(lease)) = stream.next().await {
                // Holders are `<node>/<instance>`: the node is what the plan orders.
                let holder = lease
                    .spec
                    .and_then(|s| s.holder_identity)
                    .map(|h| klm_protocol::lease::holder_node(&h).to_string())
                    .unwrap_or_default();
                let mut o = obs.lock().unwrap();
                if !holder.is_empty() && o.holders.last() != Some(&holder) {
                    o.holders.push(holder);
                }
            }
        }));
    }

    pub async fn opt_in(&self, suffixes: &[&str]) -> Result<()> {
        for s in suffixes {
            self.slice
                .label_node(&self.node(s), node_keys::WINDOW_LABEL, "true")
                .await?;
        }
        Ok(())
    }

    fn cms(&self) -> Api<ConfigMap> {
        Api::namespaced(self.slice.client(), &self.slice.namespace())
    }

    /// Sets trigger annotations (a `None` value removes the annotation).
    pub async fn annotate(&self, pairs: &[(&str, Option<&str>)]) -> Result<()> {
        let ann: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.map(|v| serde_json::json!(v))
                        .unwrap_or(serde_json::Value::Null),
                )
            })
            .collect();
        self.cms()
            .patch(
                CM,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": ann}})),
            )
            .await?;
        Ok(())
    }

    /// Starts a run to `version` with extra per-run parameters and waits for it to finish.
    pub async fn run(&self, version: &str, params: &[(&str, &str)]) -> Result<RunRecord> {
        let before = self.current_run().await?.map(|r| r.id);
        let mut pairs: Vec<(&str, Option<&str>)> = vec![(trigger::TARGET_VERSION, Some(version))];
        pairs.extend(params.iter().map(|(k, v)| (*k, Some(*v))));
        self.annotate(&pairs).await?;
        self.wait_finished_after(before).await
    }

    pub async fn current_run(&self) -> Result<Option<RunRecord>> {
        let cm = self.cms().get(CM).await?;
        Ok(read_run(&cm))
    }

    /// Waits (watch) until a run other than `before` has finished.
    pub async fn wait_finished_after(&self, before: Option<String>) -> Result<RunRecord> {
        self.wait_run(
            |r| Some(&r.id) != before.as_ref() && r.phase.is_finished(),
            RUN_TIMEOUT,
        )
        .await
    }

    /// Waits (watch) until the run record shows `node` at `status`.
    pub async fn wait_node_status(&self, node: &str, status: NodeStatus) -> Result<RunRecord> {
        self.wait_run(
            |r| r.nodes.get(node).and_then(|n| n.status) == Some(status),
            RUN_TIMEOUT,
        )
        .await
    }

    /// Waits (watch) until the run record satisfies `f`.
    pub async fn wait_run(
        &self,
        f: impl Fn(&RunRecord) -> bool,
        timeout: Duration,
    ) -> Result<RunRecord> {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={CM}"));
        let stream = watcher(self.cms(), cfg).default_backoff().applied_objects();
        let found = tokio::time::timeout(timeout, async {
            let mut stream = std::pin::pin!(stream);
            while let Some(cm) = stream.next().await {
                if let Some(r) = cm.ok().as_ref().and_then(read_run)
                    && f(&r)
                {
                    return Some(r);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(r)) => Ok(r),
            _ => {
                let now = self.current_run().await.ok().flatten();
                bail!(
                    "run did not reach the expected state within {timeout:?}; last record: {now:#?}\n{}",
                    self.logs()
                )
            }
        }
    }

    /// Status label and current-version label of a node.
    pub async fn node_labels(&self, suffix: &str) -> Result<(Option<String>, Option<String>)> {
        let n = self.slice.node(&self.node(suffix)).await?;
        let l = n.metadata.labels.unwrap_or_default();
        Ok((
            l.get(node_keys::STATUS).cloned(),
            l.get(node_keys::CURRENT_VERSION).cloned(),
        ))
    }

    /// (revision, chart version, status) of the kata-deploy release's latest revision.
    pub async fn release(&self) -> Result<(u64, String, String)> {
        let v = self.slice.release_metadata(RELEASE).await?;
        Ok((
            v["revision"].as_u64().unwrap_or(0),
            v["version"].as_str().unwrap_or("").to_string(),
            v["status"].as_str().unwrap_or("").to_string(),
        ))
    }

    /// The safety invariants every scenario must keep.
    pub async fn assert_safe(&self, plan: &[String]) -> Result<()> {
        self.assert_order(plan)?;
        self.assert_nothing_left_cordoned().await
    }

    /// At most one node in progress at any observed instant; upgrades in plan order.
    fn assert_order(&self, plan: &[String]) -> Result<()> {
        let o = self.observed.lock().unwrap();
        if !o.concurrent.is_empty() {
            bail!(
                "more than one node in progress at once: {:?}\n{}",
                o.concurrent,
                self.logs()
            );
        }
        // Nodes entered `preparing` in plan order, each once per run at most.
        let prepared: Vec<&String> = o
            .transitions
            .iter()
            .filter(|(_, s)| s == "preparing")
            .map(|(n, _)| n)
            .collect();
        let mut expected = plan.iter();
        for n in &prepared {
            if !plan.contains(n) {
                bail!("node {n} was upgraded although it was not in the plan {plan:?}");
            }
            // Runs may repeat the plan: restart the expected order when it starts over.
            if expected.clone().next() != Some(n) {
                expected = plan.iter();
            }
            if expected.next() != Some(n) {
                bail!("node {n} upgraded out of turn; order seen {prepared:?}, plan {plan:?}");
            }
        }
        Ok(())
    }

    async fn assert_nothing_left_cordoned(&self) -> Result<()> {
        for n in self.slice.nodes().await? {
            let node = self.slice.node(&n).await?;
            let ours = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(node_keys::CORDONED_BY))
                .is_some();
            let unschedulable = node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let status = node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(node_keys::STATUS))
                .cloned();
            if ours && unschedulable && status.as_deref() != Some("failed") {
                bail!("node {n} left cordoned by us (status {status:?})");
            }
        }
        Ok(())
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.coordinator {
            s.push_str(&format!("--- {} ---\n{}\n", c.name(), tail(&c.logs(), 60)));
        }
        for a in self.agents.values() {
            s.push_str(&format!("--- {} ---\n{}\n", a.name(), tail(&a.logs(), 30)));
        }
        s
    }
}

/// The address a process logged as "health endpoint listening" (the binaries take
/// `--health-addr 127.0.0.1:0`, so the port is only known from that line).
pub fn health_addr(proc: &Proc) -> Option<std::net::SocketAddr> {
    // Text logs may carry ANSI colour codes around field names.
    let mut plain = String::new();
    let mut chars = proc.logs().chars().collect::<Vec<_>>().into_iter();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let line = plain
        .lines()
        .find(|l| l.contains("health endpoint listening"))?;
    let at = line.find("addr=")? + "addr=".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Product {
    fn drop(&mut self) {
        for m in &self.monitor {
            m.abort();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

pub fn read_run(cm: &ConfigMap) -> Option<RunRecord> {
    cm.data
        .as_ref()?
        .get(status_data::RUN)
        .and_then(|s| RunRecord::from_json(s).ok())
}
