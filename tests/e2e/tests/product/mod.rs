//! The product under test: one coordinator and one agent per simulated node, as real processes,
//! on a slice of the real control plane; plus a safety monitor that watches every Node and
//! Lease update during the scenario.
#![allow(dead_code)]

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use klm_protocol::keys::{node as node_keys, status_data, trigger};
use klm_protocol::{NodeStatus, RunRecord};
use klm_testkit::{Proc, Slice};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const CM: &str = "kata-lifecycle-manager";
pub const RELEASE: &str = "kata-deploy";
pub const RUN_TIMEOUT: Duration = Duration::from_secs(240);
pub const UPGRADE_LEASE: &str = "kata-lifecycle-manager-upgrade";

/// What the monitor saw; checked by `assert_safe`.
#[derive(Debug, Default)]
pub struct Observed {
    /// Latest status label per node.
    pub status: BTreeMap<String, String>,
    /// Every (node, status) transition in watch order.
    pub transitions: Vec<(String, String)>,
    /// When the watch delivered each transition (same order as `transitions`).
    pub seen_at: Vec<std::time::Instant>,
    /// Violations of "at most one node in progress" (at most `in_progress_limit` with waves),
    /// with the offending states.
    pub concurrent: Vec<String>,
    /// Waves: how many nodes may be in progress at once (0 is read as 1: one by one).
    pub in_progress_limit: usize,
    /// The most nodes seen in progress at once.
    pub peak_in_progress: usize,
    /// Distinct consecutive Lease holders (their nodes).
    pub holders: Vec<String>,
    /// Every turn start seen on a Node: (node, run id, status) for each transition to
    /// `preparing` (an upgrade turn) or `rolling-back` (a restore turn).
    pub turn_starts: Vec<(String, String, String)>,
    /// Every kata-deploy pod (uid) seen per node: a node whose pod was restarted once has two.
    pub kata_deploy_pods: BTreeMap<String, BTreeSet<String>>,
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
        let args: Vec<String> = [
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
        // A flag in the extra arguments replaces its default above (clap refuses a repeat).
        let overridden = |flag: &str| {
            self.extra_coordinator_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut kept = vec![args[0].clone()];
        for pair in args[1..].chunks(2) {
            if !overridden(&pair[0]) {
                kept.extend(pair.iter().cloned());
            }
        }
        kept.extend(self.extra_coordinator_args.iter().cloned());
        kept
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
        self.start_agent_with_clock_offset(node, 0)
    }

    /// An agent whose wall clock is `offset_secs` ahead (negative: behind) of everyone else's
    /// (libfaketime; see `Slice::spawn_with_clock_offset`). 0 is a plain agent.
    pub fn start_agent_with_clock_offset(&mut self, node: &str, offset_secs: i64) -> Result<()> {
        let ns = self.slice.namespace();
        let args = [
            "--health-addr",
            "127.0.0.1:0",
            "--log-format",
            "text",
            "--pod-ready-timeout",
            "60s",
        ];
        let env = [
            ("NODE_NAME", node),
            ("POD_NAMESPACE", ns.as_str()),
            ("RUST_LOG", "info"),
        ];
        let proc = if offset_secs == 0 {
            self.slice.spawn("klm-agent", &args, &env)?
        } else {
            self.slice
                .spawn_with_clock_offset("klm-agent", &args, &env, offset_secs)?
        };
        self.agents.insert(node.to_string(), proc);
        Ok(())
    }

    /// What the coordinator's Deployment and the agents' DaemonSet do in a cluster: a product
    /// process that exited by itself (e.g. a coordinator that lost its leader Lease during an
    /// API outage exits so a fresh leader takes over) is started again. Returns what was
    /// restarted. Processes the test killed on purpose (`kill_*`) are not restarted.
    pub fn restart_exited_processes(&mut self) -> Result<Vec<String>> {
        let mut restarted = Vec::new();
        if self
            .coordinator
            .as_ref()
            .is_some_and(|c| c.exit_status().is_some())
        {
            restarted.push("coordinator".to_string());
            self.start_coordinator()?;
        }
        let exited: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.exit_status().is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for node in exited {
            restarted.push(format!("agent on {node}"));
            self.start_agent(&node)?;
        }
        Ok(restarted)
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
                let run = node
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(node_keys::RUN_ID))
                    .cloned()
                    .unwrap_or_default();
                let mut o = obs.lock().unwrap();
                if o.status.get(&name) != Some(&status) {
                    if status == "preparing" || status == "rolling-back" {
                        o.turn_starts
                            .push((name.clone(), run.clone(), status.clone()));
                    }
                    o.status.insert(name.clone(), status.clone());
                    o.transitions.push((name, status));
                    o.seen_at.push(std::time::Instant::now());
                    let busy: Vec<String> = o
                        .status
                        .iter()
                        .filter(|(_, s)| s.parse::<NodeStatus>().is_ok_and(|s| s.is_in_progress()))
                        .map(|(n, s)| format!("{n}={s}"))
                        .collect();
                    o.peak_in_progress = o.peak_in_progress.max(busy.len());
                    if busy.len() > o.in_progress_limit.max(1) {
                        o.concurrent.push(busy.join(","));
                    }
                }
            }
        }));
        let pods: Api<Pod> =
            Api::namespaced(self.slice.client(), &self.slice.kata_deploy_namespace());
        let obs = self.observed.clone();
        self.monitor.push(tokio::spawn(async move {
            let cfg = watcher::Config::default().labels("name=kata-deploy");
            let mut stream = std::pin::pin!(watcher(pods, cfg).default_backoff().applied_objects());
            while let Some(Ok(pod)) = stream.next().await {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                if let (Some(node), Some(uid)) = (node, pod.metadata.uid.clone()) {
                    let mut o = obs.lock().unwrap();
                    o.kata_deploy_pods.entry(node).or_default().insert(uid);
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

    /// Triggers `version`, asks for `action=pause` once a turn is granted, and waits until the run
    /// is paused with no node in progress. Returns the run id seen before the trigger and the
    /// paused record.
    pub async fn trigger_then_pause(&self, version: &str) -> Result<(Option<String>, RunRecord)> {
        let before = self.current_run().await?.map(|r| r.id);
        self.annotate(&[(trigger::TARGET_VERSION, Some(version))])
            .await?;
        self.wait_run(
            |r| Some(&r.id) != before.as_ref() && r.turn.is_some(),
            RUN_TIMEOUT,
        )
        .await?;
        self.annotate(&[(trigger::ACTION, Some(trigger::ACTION_PAUSE))])
            .await?;
        let paused = self
            .wait_run(|r| r.paused && r.turn.is_none(), RUN_TIMEOUT)
            .await?;
        Ok((before, paused))
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

    /// The full evidence its agent wrote on the Node (log tail and notes included; the run
    /// record keeps a short form per node).
    pub async fn node_evidence(&self, node: &str) -> Result<Option<klm_protocol::Evidence>> {
        let n = self.slice.node(&self.node(node)).await?;
        Ok(klm_protocol::node_record::NodeRecord::of(&n).evidence)
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

    /// Asserts that each node (by suffix) shows our status `status` at kata-deploy `version`.
    pub async fn assert_nodes_at(&self, nodes: &[&str], status: &str, version: &str) -> Result<()> {
        for n in nodes {
            let want = (Some(status.to_string()), Some(version.to_string()));
            anyhow::ensure!(self.node_labels(n).await? == want, "{n}: not {want:?}");
        }
        Ok(())
    }

    /// Asserts that no node (by suffix) carries our status or version label.
    pub async fn assert_untouched(&self, nodes: &[&str]) -> Result<()> {
        for n in nodes {
            let labels = self.node_labels(n).await?;
            anyhow::ensure!(labels == (None, None), "{n} must be untouched: {labels:?}");
        }
        Ok(())
    }

    /// Uninstalls the slice's kata-deploy release without its hooks (the next install reuses
    /// the hook Jobs' names), waiting until its objects are gone.
    pub async fn uninstall_kata_deploy(&self) -> Result<()> {
        let ns = self.slice.kata_deploy_namespace();
        self.slice
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
        Ok(())
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

    /// Waves: the monitor accepts up to `n` nodes in progress at once.
    pub fn allow_in_progress(&self, n: usize) {
        self.observed.lock().unwrap().in_progress_limit = n;
    }

    pub async fn assert_nothing_left_cordoned(&self) -> Result<()> {
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

    /// No node started the same kind of turn twice in one run: a turn that was interrupted is
    /// resumed, not started over (and a node upgraded once is not upgraded again).
    pub fn assert_no_node_processed_twice(&self) -> Result<()> {
        let o = self.observed.lock().unwrap();
        let mut seen = BTreeSet::new();
        for start in &o.turn_starts {
            if !seen.insert(start) {
                bail!(
                    "node {} started its {} turn twice in run {}; turns seen: {:?}\n{}",
                    start.0,
                    start.2,
                    start.1,
                    o.turn_starts,
                    self.logs()
                );
            }
        }
        Ok(())
    }

    /// How many distinct kata-deploy pods the monitor saw on `node` (1 + restarts).
    pub fn kata_deploy_pods_seen(&self, node: &str) -> usize {
        let o = self.observed.lock().unwrap();
        o.kata_deploy_pods.get(node).map_or(0, BTreeSet::len)
    }

    /// The Node's status label, read now.
    pub async fn node_status(&self, node: &str) -> Result<Option<String>> {
        Ok(self.node_labels(node).await?.0)
    }

    /// Waits (watch on the Node itself, not the run record) until `node`'s status label is
    /// `status`.
    pub async fn wait_node_label(&self, node: &str, status: NodeStatus) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.slice.client());
        let want = status.as_str();
        let waited = klm_testkit::wait::wait_for(
            &nodes,
            &self.node(node),
            &format!("node {node} status {want}"),
            RUN_TIMEOUT,
            klm_testkit::wait::when(move |n: &Node| {
                n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(node_keys::STATUS))
                    .is_some_and(|s| s == want)
            }),
        )
        .await;
        match waited {
            Ok(_) => Ok(()),
            // A wait that never ends is diagnosed by what the run and the processes said.
            Err(e) => {
                let run = self.current_run().await.ok().flatten();
                Err(e.context(format!("run record: {run:#?}\n{}", self.logs())))
            }
        }
    }

    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.slice.client(), &self.slice.namespace())
    }

    /// The upgrade Lease, if it exists.
    pub async fn upgrade_lease(&self) -> Result<Option<Lease>> {
        Ok(self.leases().get_opt(UPGRADE_LEASE).await?)
    }

    /// Deletes the trigger ConfigMap (run record included), as a careless `kubectl delete` would.
    pub async fn delete_trigger(&self) -> Result<()> {
        self.cms().delete(CM, &Default::default()).await?;
        Ok(())
    }

    /// Overwrites the run record with text that is not a run record.
    pub async fn corrupt_run_record(&self, garbage: &str) -> Result<()> {
        let patch = serde_json::json!({"data": {status_data::RUN: garbage}});
        self.cms()
            .patch(CM, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// The raw `run.json` text of the trigger ConfigMap.
    pub async fn raw_run_record(&self) -> Result<Option<String>> {
        let cm = self.cms().get_opt(CM).await?;
        Ok(cm
            .and_then(|c| c.data)
            .and_then(|d| d.get(status_data::RUN).cloned()))
    }

    /// `data.message` of the trigger ConfigMap (readable even when run.json is not).
    pub async fn status_message(&self) -> Result<Option<String>> {
        let cm = self.cms().get_opt(CM).await?;
        Ok(cm
            .and_then(|c| c.data)
            .and_then(|d| d.get(status_data::MESSAGE).cloned()))
    }

    /// Holds `node` at `status`: a ValidatingAdmissionPolicy refuses every update of that Node
    /// that would move its status label away from `status` (nothing else is refused). With it, a
    /// test can kill the agent "at" a status deterministically: the agent cannot get past it.
    /// Returns once the API server enforces the policy.
    pub async fn freeze_node_status(&self, node: &str, status: NodeStatus) -> Result<Freeze> {
        let name = format!("klm-test-freeze-{}", self.slice.id());
        let node = self.node(node);
        let key = node_keys::STATUS;
        let label = |obj: &str| {
            format!(
                "(has({obj}.metadata.labels) && '{key}' in {obj}.metadata.labels && \
                 {obj}.metadata.labels['{key}'] == '{}')",
                status.as_str()
            )
        };
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["UPDATE"], "resources": ["nodes"],
                }]},
                "matchConditions": [{
                    "name": "this-node",
                    "expression": format!("object.metadata.name == '{node}'"),
                }],
                "validations": [
                    {
                        "expression": format!("!{} || {}", label("oldObject"), label("object")),
                        "message": format!("klm-test: node {node} is held at {}", status.as_str()),
                    },
                    {
                        "expression": format!(
                            "!(has(object.metadata.labels) && '{FREEZE_PROBE}' in object.metadata.labels)"
                        ),
                        "message": "klm-test: freeze probe",
                    },
                ],
            },
        }))?;
        let binding: ValidatingAdmissionPolicyBinding =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"policyName": name, "validationActions": ["Deny"]},
            }))?;
        let client = self.slice.client();
        Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy)
            .await?;
        Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await?;
        let freeze = Freeze { name, node, client };
        freeze.wait_enforced(true).await?;
        Ok(freeze)
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

/// Label whose addition the freeze policy refuses: a dry-run update carrying it tells whether
/// the API server enforces the policy yet.
const FREEZE_PROBE: &str = "klm.test/freeze-probe";

/// A Node held at a status (see [`Product::freeze_node_status`]); [`Freeze::release`] lifts it.
pub struct Freeze {
    name: String,
    node: String,
    client: kube::Client,
}

impl Freeze {
    /// Removes the policy and returns once the API server no longer enforces it.
    pub async fn release(self) -> Result<()> {
        Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .delete(&self.name, &Default::default())
            .await?;
        Api::<ValidatingAdmissionPolicy>::all(self.client.clone())
            .delete(&self.name, &Default::default())
            .await?;
        self.wait_enforced(false).await
    }

    /// The API server loads admission policies from its own informer, with no signal a client
    /// can watch for; so probe with dry-run updates (they change nothing) until it answers as
    /// wanted, a tenth of a second apart, for at most 30 s.
    async fn wait_enforced(&self, enforced: bool) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let probe = serde_json::json!({"metadata": {"labels": {FREEZE_PROBE: "1"}}});
        let params = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let denied = match nodes
                .patch(&self.node, &params, &Patch::Merge(&probe))
                .await
            {
                Ok(_) => false,
                Err(kube::Error::Api(e)) if e.message.contains("freeze probe") => true,
                Err(e) => return Err(e.into()),
            };
            if denied == enforced {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the freeze policy {} is not {}",
                    self.name,
                    if enforced { "enforced" } else { "gone" }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
