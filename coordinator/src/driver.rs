//! The coordinator's I/O loop: watch the trigger ConfigMap, the Nodes and the upgrade Lease;
//! on every change (or at the deadline the lifecycle asked for) reconcile once. Decisions are
//! `klm_protocol::lifecycle::reduce`; this file performs helm calls, patches and Events.
use crate::daemonset;
use crate::helm::Helm;
use crate::status_data::{self, Persisted};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_kube::events::{Events, configmap_ref, node_ref};
use klm_kube::nodes;
use klm_kube::time::now_ms;
use klm_protocol::keys::trigger;
use klm_protocol::lifecycle::{Effect, Timing, reduce};
use klm_protocol::params::{self, Defaults};
use klm_protocol::run::{
    Evidence, ReleaseState, RunKind, RunRecord, new_run_id, trigger_fingerprint,
};
use klm_protocol::{RunPhase, plan};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

pub struct Settings {
    pub namespace: String,
    pub trigger_configmap: String,
    pub lease_name: String,
    pub lease_duration_seconds: i32,
    pub timing: Timing,
    pub rollout_observe_timeout: Duration,
    pub rollback_timeout: Duration,
    pub helm: Helm,
    pub defaults: Defaults,
    /// The leader Lease we hold: checked before every write and every helm call, so a
    /// coordinator that lost leadership stops acting even before its main loop notices.
    pub leadership: Option<klm_kube::lease::FenceGuard>,
}

pub struct Coordinator {
    client: kube::Client,
    s: Settings,
    events: Events,
    configmaps: Api<ConfigMap>,
    node_api: Api<Node>,
    nodes: Store<Node>,
    trigger: Store<ConfigMap>,
    leases: Store<Lease>,
    state: Persisted,
    saved: Persisted,
    requests: klm_kube::client::RequestCounter,
    /// Counter value when the active run started (for its `coordinatorApiRequests`).
    requests_at_start: u64,
    /// resourceVersion of the trigger in which we last acted on an `action` annotation.
    action_seen_in: Option<String>,
}

impl Coordinator {
    pub async fn start(
        client: kube::Client,
        requests: klm_kube::client::RequestCounter,
        s: Settings,
        identity: String,
        notify: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let ns = s.namespace.clone();
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        klm_kube::lease::UpgradeLease::new(client.clone(), &ns, &s.lease_name, "coordinator")
            .ensure_exists(s.lease_duration_seconds)
            .await?;
        let node_api: Api<Node> = Api::all(client.clone());
        let nodes =
            klm_kube::watch::reflect(node_api.clone(), watcher::Config::default(), notify.clone())
                .0;
        let trigger = klm_kube::watch::reflect(
            configmaps.clone(),
            watcher::Config::default().fields(&format!("metadata.name={}", s.trigger_configmap)),
            notify.clone(),
        )
        .0;
        let lease_store = klm_kube::watch::reflect(
            leases,
            watcher::Config::default().fields(&format!("metadata.name={}", s.lease_name)),
            notify,
        )
        .0;
        nodes.wait_until_ready().await?;
        trigger.wait_until_ready().await?;
        lease_store.wait_until_ready().await?;
        let cm = trigger
            .get(&ObjectRef::new(&s.trigger_configmap).within(&ns))
            .ok_or_else(|| anyhow::anyhow!(
                "trigger ConfigMap {ns}/{} not found: install the chart, or pass --trigger-configmap", s.trigger_configmap
            ))?;
        let state = status_data::load(&cm);
        let events = Events::new(
            client.clone(),
            klm_protocol::keys::defaults::EVENT_REPORTER,
            Some(identity),
        );
        Ok(Coordinator {
            client,
            saved: state.clone(),
            state,
            s,
            events,
            configmaps,
            node_api,
            nodes,
            trigger,
            leases: lease_store,
            requests_at_start: requests.get(),
            action_seen_in: None,
            requests,
        })
    }

    fn trigger_cm(&self) -> Option<Arc<ConfigMap>> {
        self.trigger
            .get(&ObjectRef::new(&self.s.trigger_configmap).within(&self.s.namespace))
    }

    /// A refused request outside a run: an Event plus the `notice` key of the status data.
    async fn refuse(&mut self, node: Option<&str>, reason: &str, note: String) {
        self.state.notice = note.clone();
        self.event(node, true, reason, note).await;
    }

    async fn event(&self, node: Option<&str>, warning: bool, reason: &str, note: String) {
        tracing::info!(reason, node, warning, "{note}");
        let cm_uid = self.trigger_cm().and_then(|c| c.metadata.uid.clone());
        let cm = configmap_ref(&self.s.namespace, &self.s.trigger_configmap, cm_uid);
        self.events
            .publish(&cm, warning, reason, "Upgrade", note.clone())
            .await;
        if let Some(n) = node {
            let uid = self
                .nodes
                .get(&ObjectRef::new(n))
                .and_then(|x| x.metadata.uid.clone());
            self.events
                .publish(&node_ref(n, uid), warning, reason, "Upgrade", note)
                .await;
        }
    }

    fn check_leader(&self) -> anyhow::Result<()> {
        match &self.s.leadership {
            Some(fence) => fence
                .check()
                .map_err(|lost| anyhow::anyhow!("not acting: {lost}")),
            None => Ok(()),
        }
    }

    async fn persist(&mut self) -> anyhow::Result<()> {
        if self.state != self.saved {
            self.check_leader()?;
            status_data::save(&self.configmaps, &self.s.trigger_configmap, &self.state).await?;
            self.saved = self.state.clone();
        }
        Ok(())
    }

    /// One reconciliation. Returns when it next wants to run even without a change.
    pub async fn reconcile(&mut self) -> anyhow::Result<Option<i64>> {
        let Some(cm) = self.trigger_cm() else {
            tracing::warn!("trigger ConfigMap is gone; waiting for it to come back");
            return Ok(None);
        };
        let annotations: BTreeMap<String, String> =
            cm.metadata.annotations.clone().unwrap_or_default();
        let fingerprint = trigger_fingerprint(&annotations);
        let rollback_node = annotations
            .get(trigger::ROLLBACK_NODE)
            .cloned()
            .unwrap_or_default();
        if let Some(action) = annotations.get(trigger::ACTION)
            && cm.metadata.resource_version != self.action_seen_in
        {
            // Until our removal shows up in the watch, the store still has the annotation.
            self.action_seen_in = cm.metadata.resource_version.clone();
            self.take_action(action.trim()).await?;
        }
        let active = self
            .state
            .run
            .as_ref()
            .is_some_and(|r| !r.phase.is_finished());

        if active {
            let run_trigger = self
                .state
                .run
                .as_ref()
                .map(|r| r.trigger.clone())
                .unwrap_or_default();
            if fingerprint != run_trigger && fingerprint != self.state.observed_trigger {
                self.state.observed_trigger = fingerprint.clone();
                let id = self
                    .state
                    .run
                    .as_ref()
                    .map(|r| r.id.clone())
                    .unwrap_or_default();
                let msg = format!(
                    "run {id} is still in progress; the new trigger was not started (one run at a time). Re-annotate after it finishes."
                );
                if let Some(r) = self.state.run.as_mut() {
                    r.warnings.push(msg.clone());
                }
                self.event(None, true, "TriggerIgnored", msg).await;
            }
            if !rollback_node.is_empty() && rollback_node != self.state.observed_rollback {
                self.state.observed_rollback = rollback_node.clone();
                self.refuse(
                Some(&rollback_node),
                "RollbackIgnored", format!(
                    "manual rollback of {rollback_node} ignored: a run is in progress; annotate again after it finishes"
                )).await;
            }
        } else if !fingerprint.is_empty() && fingerprint != self.state.observed_trigger {
            self.state.observed_trigger = fingerprint.clone();
            self.start_run(&annotations, fingerprint).await;
        } else if fingerprint.is_empty() && !self.state.observed_trigger.is_empty() {
            // Target removed: re-adding the same annotations later starts a fresh run.
            self.state.observed_trigger.clear();
        } else if !rollback_node.is_empty() && rollback_node != self.state.observed_rollback {
            self.state.observed_rollback = rollback_node.clone();
            self.start_manual_rollback(&rollback_node).await;
        }
        self.persist().await?;
        let wake = self.drive().await?;
        self.persist().await?;
        Ok(wake)
    }

    /// Acts on `lifecycle.katacontainers.io/action` once, then removes it, so it never
    /// applies to a later run by accident.
    async fn take_action(&mut self, action: &str) -> anyhow::Result<()> {
        let patch = serde_json::json!({"metadata": {"annotations": {trigger::ACTION: null}}});
        self.configmaps
            .patch(
                &self.s.trigger_configmap,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await?;
        let active = self.state.run.as_mut().filter(|r| !r.phase.is_finished());
        match (action, active) {
            (trigger::ACTION_CANCEL, Some(run)) => {
                let msg = format!(
                    "run {}: cancel requested; no further node starts, and what the run did is rolled back",
                    run.id
                );
                run.cancel_requested = true;
                self.event(None, true, "CancelRequested", msg).await;
            }
            (trigger::ACTION_CANCEL, None) => {
                self.event(
                    None,
                    false,
                    "NothingToCancel",
                    "action=cancel: no run is in progress".into(),
                )
                .await;
            }
            (other, _) => {
                self.refuse(
                    None,
                    "UnknownAction",
                    format!("unknown action {other:?}: the only action is `cancel`"),
                )
                .await;
            }
        }
        Ok(())
    }

    async fn start_run(&mut self, annotations: &BTreeMap<String, String>, fingerprint: String) {
        let now = now_ms();
        let target = annotations
            .get(trigger::TARGET_VERSION)
            .cloned()
            .unwrap_or_default();
        let id = new_run_id(
            if target.is_empty() { "run" } else { &target },
            now,
            &mut rand::rng(),
        );
        self.requests_at_start = self.requests.get();
        let mut run = RunRecord::new(id.clone(), fingerprint, target.trim().to_string(), now);
        let outcome = self.prepare(&mut run, annotations).await;
        if let Err(msg) = outcome {
            run.finish(RunPhase::Failed, msg.clone(), now_ms());
            self.state.run = Some(run);
            self.event(None, true, "RunRejected", format!("run {id}: {msg}"))
                .await;
            return;
        }
        let finished = run.phase.is_finished();
        let msg = run.message.clone();
        self.state.run = Some(run);
        self.event(
            None,
            false,
            if finished {
                "RunSucceeded"
            } else {
                "RunStarted"
            },
            format!("run {id}: {msg}"),
        )
        .await;
    }

    /// Validates inputs and inspects the release; touches nothing.
    async fn prepare(
        &self,
        run: &mut RunRecord,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let p = params::resolve(annotations, &self.s.defaults)
            .map_err(|e| format!("invalid input, nothing was changed: {e}"))?;
        run.params = Some(p.clone());
        let meta = self
            .s
            .helm
            .metadata(&p.helm_release, &p.helm_namespace)
            .await
            .map_err(|e| e.to_string())?;
        if meta.status != "deployed" {
            return Err(format!(
                "release {}/{} is {:?} (revision {}), not deployed: another helm operation is running or failed; \
                 resolve it (helm history / helm rollback) and trigger again",
                p.helm_namespace, p.helm_release, meta.status, meta.revision
            ));
        }
        let mut release = ReleaseState {
            recorded_revision: meta.revision,
            recorded_version: meta.version.clone(),
            ..Default::default()
        };
        let facts: Vec<_> = self.nodes.state().iter().map(|n| nodes::facts(n)).collect();
        run.plan = plan::select(&facts, &p);
        if meta.version == p.target_version {
            run.release = Some(release);
            run.finish(
                RunPhase::Succeeded,
                format!(
                    "release {}/{} is already at {}; nothing to do (no helm call, no node touched)",
                    p.helm_namespace, p.helm_release, p.target_version
                ),
                now_ms(),
            );
            return Ok(());
        }
        if run.plan.is_empty() {
            run.release = Some(release);
            run.finish(
                RunPhase::Succeeded,
                format!(
                    "no nodes selected ({}); nothing to do, no helm call",
                    params::describe(&p)
                ),
                now_ms(),
            );
            return Ok(());
        }
        let ds = daemonset::current_revision(
            self.client.clone(),
            &p.helm_namespace,
            self.s.rollout_observe_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        release.old_hash = ds.hash;
        run.release = Some(release);
        run.message = format!(
            "upgrading {} node(s): {}; {}",
            run.plan.len(),
            run.plan.join(", "),
            params::describe(&p)
        );
        Ok(())
    }

    async fn start_manual_rollback(&mut self, node: &str) {
        let now = now_ms();
        self.requests_at_start = self.requests.get();
        let last = self.state.run.clone();
        // What the last upgrade left upgraded: a succeeded upgrade run's completed nodes, or
        // what a previous manual rollback left of them.
        let usable = last.as_ref().filter(|r| {
            r.params.is_some()
                && r.release
                    .as_ref()
                    .is_some_and(|x| x.upgraded_revision.is_some())
                && match r.kind {
                    RunKind::Upgrade => r.phase == RunPhase::Succeeded,
                    RunKind::ManualRollback => r.phase.is_finished(),
                }
        });
        let Some(last) = usable else {
            self.refuse(
                Some(node),
                "RollbackRejected",
                format!(
                    "cannot roll back {node}: there is no recorded upgrade run to roll back from"
                ),
            )
            .await;
            return;
        };
        let candidates: Vec<String> = match last.kind {
            RunKind::Upgrade => last
                .plan
                .iter()
                .filter(|n| {
                    last.nodes.get(*n).and_then(|r| r.status)
                        == Some(klm_protocol::NodeStatus::Completed)
                })
                .cloned()
                .collect(),
            RunKind::ManualRollback => last.rollback_candidates.clone(),
        };
        if !candidates.iter().any(|n| n == node) {
            self.refuse(
                Some(node),
                "RollbackRejected",
                format!(
                    "cannot roll back {node}: the last upgrade did not leave it upgraded (nodes that can be rolled back: {})",
                    if candidates.is_empty() { "none".to_string() } else { candidates.join(", ") }
                ),
            )
            .await;
            return;
        }
        let mut release = last.release.clone().unwrap_or_default();
        release.rolled_back = false;
        let id = new_run_id("rollback", now, &mut rand::rng());
        let mut run = RunRecord::new(
            id.clone(),
            last.trigger.clone(),
            release.recorded_version.clone(),
            now,
        );
        run.kind = RunKind::ManualRollback;
        run.rollback_candidates = candidates.into_iter().filter(|n| n != node).collect();
        run.params = last.params.clone();
        run.plan = vec![node.to_string()];
        run.restore_queue = vec![node.to_string()];
        run.release = Some(release.clone());
        run.phase = RunPhase::RollingBack;
        run.message = format!(
            "rolling {node} back to {} (helm revision {})",
            release.recorded_version, release.recorded_revision
        );
        self.state.run = Some(run);
        self.event(
            Some(node),
            true,
            "ManualRollbackStarted",
            format!("run {id}: rolling {node} back"),
        )
        .await;
    }

    /// Advances the active run as far as it can go now.
    async fn drive(&mut self) -> anyhow::Result<Option<i64>> {
        let Some(mut run) = self.state.run.clone() else {
            return Ok(None);
        };
        let mut wake = None;
        if run.phase == RunPhase::Pending && run.cancel_requested {
            run.finish(
                RunPhase::Cancelled,
                "cancelled before any change was made",
                now_ms(),
            );
        }
        if run.phase == RunPhase::Pending {
            run.phase = RunPhase::Upgrading;
            self.state.run = Some(run.clone());
            // Persist before helm: a restarted coordinator must know helm may have run.
            self.persist().await?;
        }
        if run.phase == RunPhase::Upgrading {
            self.upgrade(&mut run).await;
        }
        for _ in 0..4 {
            if run.phase == RunPhase::RollingBack
                && !run.release.as_ref().is_some_and(|r| r.rolled_back)
            {
                self.rollback_release(&mut run).await;
            }
            if !matches!(run.phase, RunPhase::Running | RunPhase::RollingBack) {
                break;
            }
            let lease = self
                .leases
                .get(&ObjectRef::new(&self.s.lease_name).within(&self.s.namespace))
                .map(|l| klm_kube::lease::view_of(&l))
                .unwrap_or_default();
            let store = self.nodes.clone();
            let observe = move |n: &str| nodes::observe(store.get(&ObjectRef::new(n)).as_deref());
            let effects = reduce(&mut run, &observe, &lease, now_ms(), self.s.timing);
            // Count before the finished record is first written, so readers see it.
            if run.phase.is_finished() && run.coordinator_api_requests.is_none() {
                run.coordinator_api_requests =
                    Some(self.requests.get().saturating_sub(self.requests_at_start));
            }
            let mut again = false;
            for effect in effects {
                match effect {
                    Effect::Event {
                        node,
                        warning,
                        reason,
                        message,
                    } => {
                        self.event(
                            node.as_deref(),
                            warning,
                            reason,
                            format!("run {}: {message}", run.id),
                        )
                        .await
                    }
                    Effect::MarkNodeFailed { node, kind, reason } => {
                        let ev = Evidence {
                            run_id: run.id.clone(),
                            node: node.clone(),
                            step: "lost".into(),
                            succeeded: false,
                            failure: Some(klm_protocol::verification::FailureCause {
                                reason: "NodeLost".into(),
                                message: reason,
                                exit_code: None,
                            }),
                            ..Default::default()
                        };
                        if self.nodes.get(&ObjectRef::new(&node)).is_some()
                            && let Err(e) =
                                nodes::mark_failed(&self.node_api, &node, &run.id, kind, &ev).await
                        {
                            tracing::warn!(error = %e, node, "could not mark node failed");
                        }
                    }
                    Effect::HelmRollback => again = true,
                    Effect::WakeAt(t) => wake = Some(wake.map_or(t, |w: i64| w.min(t))),
                }
            }
            self.state.run = Some(run.clone());
            self.persist().await?;
            if !again {
                break;
            }
        }
        if run.phase.is_finished() && run.coordinator_api_requests.is_none() {
            run.coordinator_api_requests =
                Some(self.requests.get().saturating_sub(self.requests_at_start));
        }
        self.state.run = Some(run);
        Ok(wake)
    }

    async fn release_metadata(
        &self,
        p: &klm_protocol::params::RunParams,
    ) -> Result<crate::helm::ReleaseMetadata, crate::helm::HelmError> {
        self.s
            .helm
            .metadata(&p.helm_release, &p.helm_namespace)
            .await
    }

    /// The run's single `helm upgrade`, or adoption of one a previous leader already made.
    async fn upgrade(&mut self, run: &mut RunRecord) {
        let p = run.params.clone().expect("validated run has params");
        let mut release = run.release.clone().unwrap_or_default();
        let meta = match self.release_metadata(&p).await {
            Ok(m) => m,
            Err(e) => {
                return self
                    .fail_before_nodes(run, format!("cannot read the release: {e}"))
                    .await;
            }
        };
        let already = meta.revision > release.recorded_revision && meta.version == p.target_version;
        if already && meta.status == "deployed" {
            tracing::info!(
                revision = meta.revision,
                "adopting the upgrade made before a coordinator restart"
            );
        } else if meta.revision > release.recorded_revision && meta.status.starts_with("pending") {
            return self.fail_before_nodes(run, format!(
                "the release is {:?} at revision {}: a helm upgrade was interrupted; run `helm rollback {} {} -n {}` and trigger again",
                meta.status, meta.revision, p.helm_release, release.recorded_revision, p.helm_namespace
            )).await;
        } else if let Err(lost) = self.check_leader() {
            tracing::warn!(%lost, "not running helm upgrade");
            return;
        } else if let Err(e) = self
            .s
            .helm
            .upgrade(&p.helm_release, &p.helm_namespace, &p.target_version)
            .await
        {
            // A failed upgrade may still have written a revision: roll back to be sure.
            let changed = matches!(self.s.helm.metadata(&p.helm_release, &p.helm_namespace).await, Ok(m) if m.revision > release.recorded_revision);
            if changed {
                release.upgraded_revision = Some(release.recorded_revision + 1);
                run.release = Some(release);
                return self
                    .rollback_before_nodes(run, format!("helm upgrade failed: {e}"))
                    .await;
            }
            return self
                .fail_before_nodes(
                    run,
                    format!("helm upgrade failed, nothing was changed: {e}"),
                )
                .await;
        }
        let meta = match self.release_metadata(&p).await {
            Ok(m) => m,
            Err(e) => {
                return self
                    .fail_before_nodes(
                        run,
                        format!("cannot read the release after the upgrade: {e}"),
                    )
                    .await;
            }
        };
        release.upgraded_revision = Some(meta.revision);
        run.release = Some(release.clone());
        match daemonset::current_revision(
            self.client.clone(),
            &p.helm_namespace,
            self.s.rollout_observe_timeout,
        )
        .await
        {
            Ok(ds) => {
                release.new_hash = Some(ds.hash);
                release.on_delete = Some(ds.on_delete);
                if !ds.on_delete {
                    let w = format!(
                        "kata-deploy chart {} ignores updateStrategy (charts before 3.27.0 hard-code RollingUpdate): \
                         the DaemonSet replaces pods on all nodes by itself, so the runtime update is NOT paced node by node; \
                         nodes are still cordoned and verified one at a time in plan order, and the first failure still rolls back",
                        p.target_version
                    );
                    run.warnings.push(w.clone());
                    self.event(
                        None,
                        true,
                        "UpdateStrategyIgnored",
                        format!("run {}: {w}", run.id),
                    )
                    .await;
                }
                run.release = Some(release);
                run.phase = RunPhase::Running;
                run.message = format!(
                    "helm revision {} deployed; upgrading node by node",
                    meta.revision
                );
            }
            Err(e) => self.rollback_before_nodes(run, e.to_string()).await,
        }
    }

    async fn fail_before_nodes(&mut self, run: &mut RunRecord, msg: String) {
        run.finish(RunPhase::Failed, msg.clone(), now_ms());
        self.event(None, true, "RunFailed", format!("run {}: {msg}", run.id))
            .await;
    }

    async fn rollback_before_nodes(&mut self, run: &mut RunRecord, reason: String) {
        run.failure = Some(klm_protocol::run::RunFailure {
            node: None,
            reason: reason.clone(),
            evidence: None,
        });
        run.phase = RunPhase::RollingBack;
        run.message = format!("{reason}; rolling back");
        self.event(
            None,
            true,
            "RunFailing",
            format!("run {}: {reason}", run.id),
        )
        .await;
    }

    /// `helm rollback <release> <recorded revision> --wait`, idempotent across restarts.
    async fn rollback_release(&mut self, run: &mut RunRecord) {
        let p = run.params.clone().expect("run has params");
        let Some(mut release) = run.release.clone() else {
            return;
        };
        if release.upgraded_revision.is_none() {
            release.rolled_back = true; // helm never changed anything
            run.release = Some(release);
            return;
        }
        let done = matches!(
            self.s.helm.metadata(&p.helm_release, &p.helm_namespace).await,
            Ok(m) if m.status == "deployed" && m.version == release.recorded_version
                && m.revision > release.upgraded_revision.unwrap_or(0)
        );
        if !done && let Err(lost) = self.check_leader() {
            tracing::warn!(%lost, "not running helm rollback");
            return;
        }
        if !done
            && let Err(e) = self
                .s
                .helm
                .rollback(
                    &p.helm_release,
                    &p.helm_namespace,
                    release.recorded_revision,
                    self.s.rollback_timeout,
                )
                .await
        {
            let msg = format!(
                "helm rollback to revision {} failed: {e}; nodes were left as they are (cordoned where the run cordoned them) — \
                     fix the release by hand (helm history {} -n {})",
                release.recorded_revision, p.helm_release, p.helm_namespace
            );
            run.finish(RunPhase::Failed, msg.clone(), now_ms());
            self.event(
                None,
                true,
                "RollbackFailed",
                format!("run {}: {msg}", run.id),
            )
            .await;
            return;
        }
        release.rolled_back = true;
        run.release = Some(release.clone());
        if matches!(run.kind, RunKind::ManualRollback) || run.failure.is_some() {
            self.event(
                None,
                true,
                "ReleaseRolledBack",
                format!(
                    "run {}: release {}/{} rolled back to revision {} ({})",
                    run.id,
                    p.helm_namespace,
                    p.helm_release,
                    release.recorded_revision,
                    release.recorded_version
                ),
            )
            .await;
        }
    }
}
