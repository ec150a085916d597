//! The coordinator's I/O loop: observe (the trigger ConfigMap, Nodes and the upgrade Leases —
//! one per wave slot — from reflector stores; helm, the DaemonSet and direct reads when asked) → step the pure run
//! machine (`klm_protocol::run_machine`) → perform its effects (among them the grants written
//! on each Node, which is how an agent learns about its turn) → feed the answers back. Every
//! decision about the run is the machine's; this file only translates.
use crate::daemonset;
use crate::gates::{AlertGate, PodGate};
use crate::helm::{Helm, HelmError};
use crate::metrics::{HelmOp, LeaseEvent, Metrics};
use crate::status_data;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_kube::events::{Events, configmap_ref, node_ref};
use klm_kube::nodes;
use klm_kube::time;
use klm_protocol::lease::{LeaseView, slot_lease_name};
use klm_protocol::lifecycle::Wake;
use klm_protocol::params::MAX_BATCH_SIZE;
use klm_protocol::run_machine::release::{ReleaseObservation, ReleaseRead, ReleaseStatus};
use klm_protocol::run_machine::{self, Effect, Env, Input, Machine, TriggerView};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub struct Settings {
    pub namespace: String,
    pub trigger_configmap: String,
    pub lease_name: String,
    pub lease_duration_seconds: i32,
    pub machine: run_machine::Config,
    pub rollout_observe_timeout: Duration,
    pub rollback_timeout: Duration,
    pub helm: Helm,
    /// The leader Lease we hold: checked before every write and every helm call, so a
    /// coordinator that lost leadership stops acting even before its main loop notices.
    pub leadership: Option<klm_kube::lease::FenceGuard>,
    /// Updated as the run moves and effects are performed; served on `/metrics`.
    pub metrics: Metrics,
    /// Prometheus base URL for the alert gate (empty: none) and how often it is asked.
    pub prometheus_url: String,
    pub prometheus_poll_interval: Duration,
}

/// What was last fed to the machine, so only changes are fed (the machine folds them).
#[derive(Default)]
struct Fed {
    trigger: Option<Option<String>>,
    /// The trigger ConfigMap's version the next write is conditioned on: the last one read
    /// from the watch that this coordinator did not write itself, or its own last write.
    trigger_rv: Option<String>,
    /// Versions this coordinator wrote (the latest few): seeing one of them on the watch, which
    /// may lag, tells nothing newer than our own last write.
    own_writes: std::collections::VecDeque<String>,
    /// Per wave slot (0: the upgrade Lease).
    leases: BTreeMap<u32, Option<LeaseView>>,
    nodes: Option<BTreeMap<String, String>>,
}

pub struct Coordinator {
    client: kube::Client,
    s: Settings,
    events: Events,
    configmaps: Api<ConfigMap>,
    node_api: Api<Node>,
    lease_api: Api<Lease>,
    nodes: Store<Node>,
    trigger: Store<ConfigMap>,
    /// One by-name watch per wave slot's Lease (slot 0: the upgrade Lease), started as a run
    /// needs the slot: the chart's RBAC names each Lease, and a name cannot be watched by prefix.
    leases: BTreeMap<u32, Store<Lease>>,
    notify: Arc<Notify>,
    machine: Machine,
    requests: klm_kube::client::RequestCounter,
    fed: Fed,
    /// The turns last seen in the run record, to count grants (`klm_lease_events_total`).
    seen_turns: Vec<klm_protocol::Turn>,
    /// The blocking-pod gate's pod watch (only while a run with a selector is active).
    pod_gate: PodGate,
    /// The Prometheus alert gate's poller (only while a run with the alert gate is active).
    alert_gate: AlertGate,
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
        let lease_api: Api<Lease> = Api::namespaced(client.clone(), &ns);
        klm_kube::lease::UpgradeLease::new(client.clone(), &ns, &s.lease_name, "coordinator")
            .ensure_exists(s.lease_duration_seconds)
            .await?;
        let node_api: Api<Node> = Api::all(client.clone());
        let by_name =
            |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (nodes, _) =
            klm_kube::watch::reflect(node_api.clone(), watcher::Config::default(), notify.clone());
        let (trigger, _) = klm_kube::watch::reflect(
            configmaps.clone(),
            by_name(&s.trigger_configmap),
            notify.clone(),
        );
        let (upgrade_lease, _) =
            klm_kube::watch::reflect(lease_api.clone(), by_name(&s.lease_name), notify.clone());
        let pod_gate = PodGate::new(client.clone(), notify.clone());
        let alert_gate = AlertGate::new(
            &s.prometheus_url,
            s.prometheus_poll_interval,
            notify.clone(),
        );
        nodes.wait_until_ready().await?;
        trigger.wait_until_ready().await?;
        upgrade_lease.wait_until_ready().await?;
        if trigger
            .get(&ObjectRef::new(&s.trigger_configmap).within(&ns))
            .is_none()
        {
            anyhow::bail!(
                "trigger ConfigMap {ns}/{} not found: install the chart, or pass --trigger-configmap",
                s.trigger_configmap
            );
        }
        let events = Events::new(
            client.clone(),
            klm_protocol::keys::defaults::EVENT_REPORTER,
            Some(identity),
        );
        Ok(Coordinator {
            client,
            machine: Machine::new(s.machine.clone()),
            s,
            events,
            configmaps,
            node_api,
            lease_api,
            nodes,
            trigger,
            leases: BTreeMap::from([(0, upgrade_lease)]),
            notify,
            requests,
            fed: Fed::default(),
            seen_turns: Vec::new(),
            pod_gate,
            alert_gate,
        })
    }

    fn env(&self) -> Env {
        let now = time::now();
        Env {
            now_ms: now.wall_ms,
            mono_ms: now.mono_ms,
            api_requests: self.requests.get(),
        }
    }

    /// What changed in the stores since the last feed.
    fn observe(&mut self) -> VecDeque<Input> {
        let mut inputs = VecDeque::new();
        let nodes: BTreeMap<String, Arc<Node>> = self
            .nodes
            .state()
            .into_iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n)))
            .collect();
        let versions: BTreeMap<String, String> = nodes
            .iter()
            .map(|(k, n)| {
                (
                    k.clone(),
                    n.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
        match &self.fed.nodes {
            None => inputs.push_back(Input::NodesListed(
                nodes
                    .iter()
                    .map(|(k, n)| (k.clone(), nodes::snapshot(n)))
                    .collect(),
            )),
            Some(before) => {
                for (name, n) in &nodes {
                    if before.get(name) != versions.get(name) {
                        inputs.push_back(Input::Node {
                            name: name.clone(),
                            node: Some(nodes::snapshot(n)),
                            direct: false,
                        });
                    }
                }
                for name in before.keys().filter(|k| !nodes.contains_key(*k)) {
                    inputs.push_back(Input::Node {
                        name: name.clone(),
                        node: None,
                        direct: false,
                    });
                }
            }
        }
        self.fed.nodes = Some(versions);
        self.watch_slot_leases();
        for (slot, store) in &self.leases {
            let name = slot_lease_name(&self.s.lease_name, *slot);
            let lease = store
                .get(&ObjectRef::new(&name).within(&self.s.namespace))
                .map(|l| klm_kube::lease::view_of(&l));
            // The upgrade Lease is always reported (missing: the machine recreates it); a slot
            // Lease once it was seen (then its deletion too), as its watch may not have
            // listed yet.
            let seen = *slot == 0 || lease.is_some() || self.fed.leases.contains_key(slot);
            if seen && self.fed.leases.get(slot) != Some(&lease) {
                self.fed.leases.insert(*slot, lease.clone());
                inputs.push_back(lease_input(*slot, lease));
            }
        }
        let cm = self
            .trigger
            .get(&ObjectRef::new(&self.s.trigger_configmap).within(&self.s.namespace));
        let rv = cm
            .as_ref()
            .map(|c| c.metadata.resource_version.clone().unwrap_or_default());
        if self.fed.trigger.as_ref() != Some(&rv) {
            if !rv.as_ref().is_some_and(|v| self.fed.own_writes.contains(v)) {
                self.fed.trigger_rv = rv.clone();
            }
            self.fed.trigger = Some(rv);
            inputs.push_back(Input::Trigger(cm.map(|c| TriggerView {
                resource_version: c.metadata.resource_version.clone(),
                annotations: c.metadata.annotations.clone().unwrap_or_default(),
                data: c.data.clone().unwrap_or_default(),
            })));
        }
        inputs.extend(self.pod_gate.observe());
        inputs.extend(self.alert_gate.observe());
        inputs.push_back(Input::Tick);
        inputs
    }

    /// One reconciliation: feed what changed, perform what the machine decides, feed the
    /// answers, until it asks for nothing more. Returns when it next wants to be woken.
    pub async fn reconcile(&mut self) -> anyhow::Result<Option<Wake>> {
        let result = self.reconcile_inner().await;
        self.s.metrics.observe_run(self.machine.run());
        self.pod_gate
            .follow(blocking_pod_selector(self.machine.run()));
        self.alert_gate.follow(alert_gated(self.machine.run()));
        result
    }

    async fn reconcile_inner(&mut self) -> anyhow::Result<Option<Wake>> {
        let mut inputs = self.observe();
        let mut wake: Option<Wake> = None;
        while let Some(input) = inputs.pop_front() {
            let effects = self.machine.step(input, self.env());
            self.count_grant();
            let mut answers = Vec::new();
            for effect in effects {
                match self.perform(effect, &mut answers).await {
                    Ok(Some(w)) => {
                        // Wakes are on different clocks (a window's opening is a time of day,
                        // the rest durations): compare what is left until each.
                        let now = time::now();
                        wake = Some(wake.map_or(w, |x| {
                            if w.sleep_for(now) < x.sleep_for(now) {
                                w
                            } else {
                                x
                            }
                        }))
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // The effects after a failed write are dropped; the machine re-decides.
                        self.machine.persist_failed();
                        return Err(e);
                    }
                }
            }
            inputs.extend(answers);
        }
        Ok(wake)
    }

    /// A turn in the record that was not there after the previous step was just granted.
    fn count_grant(&mut self) {
        let turns = self.machine.run().map(|r| r.turns()).unwrap_or_default();
        for _ in turns.iter().filter(|t| !self.seen_turns.contains(t)) {
            self.s.metrics.lease_event(LeaseEvent::Granted);
        }
        self.seen_turns = turns;
    }

    /// Starts the watch of every wave slot's Lease the current run may use (once per slot).
    fn watch_slot_leases(&mut self) {
        let slots = self.machine.run().map_or(1, |r| {
            let used = r.turns().iter().map(|t| t.slot + 1).max().unwrap_or(0);
            (r.wave_size() as u32).max(used)
        });
        for slot in 1..slots.min(MAX_BATCH_SIZE) {
            if self.leases.contains_key(&slot) {
                continue;
            }
            let name = slot_lease_name(&self.s.lease_name, slot);
            let (store, _) = klm_kube::watch::reflect(
                self.lease_api.clone(),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
                self.notify.clone(),
            );
            tracing::info!(lease = %name, slot, "watching a wave slot's upgrade Lease");
            self.leases.insert(slot, store);
        }
    }

    /// The name of a wave slot's upgrade Lease.
    fn slot_lease(&self, slot: u32) -> klm_kube::lease::UpgradeLease {
        klm_kube::lease::UpgradeLease::new(
            self.client.clone(),
            &self.s.namespace,
            &slot_lease_name(&self.s.lease_name, slot),
            "coordinator",
        )
    }

    fn check_leader(&self) -> anyhow::Result<()> {
        match &self.s.leadership {
            Some(fence) => fence
                .check()
                .map_err(|lost| anyhow::anyhow!("not acting: {lost}")),
            None => Ok(()),
        }
    }

    /// Our own write moved the trigger ConfigMap to `rv`.
    fn wrote_trigger(&mut self, rv: Option<String>) {
        if let Some(v) = &rv {
            self.fed.own_writes.push_back(v.clone());
            if self.fed.own_writes.len() > 16 {
                self.fed.own_writes.pop_front();
            }
        }
        self.fed.trigger_rv = rv;
    }

    /// Performs one effect; answers go to `answers` (fed after the batch, in order).
    async fn perform(
        &mut self,
        effect: Effect,
        answers: &mut Vec<Input>,
    ) -> anyhow::Result<Option<Wake>> {
        let cm = &self.s.trigger_configmap;
        match effect {
            Effect::Persist(data) => {
                self.check_leader()?;
                let expected = self.fed.trigger_rv.as_deref();
                let written = status_data::save(&self.configmaps, cm, &data, expected)
                    .await
                    .map_err(changed_since_read)?;
                self.wrote_trigger(written);
            }
            Effect::RemoveAnnotation(key) => {
                self.check_leader()?;
                let expected = self.fed.trigger_rv.as_deref();
                let written = status_data::remove_annotation(&self.configmaps, cm, key, expected)
                    .await
                    .map_err(changed_since_read)?;
                self.wrote_trigger(written);
            }
            Effect::Event {
                node,
                warning,
                reason,
                message,
            } => self.event(node.as_deref(), warning, reason, message).await,
            Effect::ReadRelease {
                release,
                namespace,
                mode,
            } => {
                let began = Instant::now();
                let read = match self.s.helm.metadata(&release, &namespace).await {
                    Ok(m) if mode => self
                        .s
                        .helm
                        .deployment_mode(&release, &namespace)
                        .await
                        .map(|mode| (m, mode)),
                    Ok(m) => Ok((m, None)),
                    Err(e) => Err(e),
                };
                // A release that does not exist is an answer, not a failed call.
                let counted = match &read {
                    Err(HelmError::NotFound { .. }) => Ok(()),
                    Err(_) => Err(()),
                    Ok(_) => Ok(()),
                };
                self.s
                    .metrics
                    .helm_call(HelmOp::Status, began.elapsed(), &counted);
                answers.push(Input::Release(match read {
                    Ok((m, deployment_mode)) => ReleaseRead::Found(ReleaseObservation {
                        chart: m.chart,
                        version: m.version,
                        revision: m.revision,
                        status: ReleaseStatus::parse(&m.status),
                        deployment_mode,
                    }),
                    Err(HelmError::NotFound { .. }) => ReleaseRead::NotFound,
                    Err(e) => ReleaseRead::Error(e.to_string()),
                }));
            }
            Effect::ReadDaemonSet { namespace } => {
                let ds = daemonset::current_revision(
                    self.client.clone(),
                    &namespace,
                    self.s.rollout_observe_timeout,
                )
                .await
                .map_err(|e| e.to_string());
                answers.push(Input::DaemonSet(ds));
            }
            Effect::HelmUpgrade {
                release,
                namespace,
                version,
                set_values,
            } => {
                self.check_leader()?;
                let began = Instant::now();
                let r = self
                    .s
                    .helm
                    .upgrade(&release, &namespace, &version, &set_values)
                    .await;
                self.s
                    .metrics
                    .helm_call(HelmOp::Upgrade, began.elapsed(), &r);
                answers.push(Input::HelmFinished(r.map_err(|e| e.to_string())));
            }
            Effect::HelmRollback {
                release,
                namespace,
                revision,
                version,
                clear_pending,
            } => {
                self.check_leader()?;
                let began = Instant::now();
                let r = self
                    .s
                    .helm
                    .restore(
                        &release,
                        &namespace,
                        revision,
                        &version,
                        clear_pending,
                        self.s.rollback_timeout,
                    )
                    .await;
                self.s
                    .metrics
                    .helm_call(HelmOp::Rollback, began.elapsed(), &r);
                answers.push(Input::HelmFinished(r.map_err(|e| e.to_string())));
            }
            Effect::HelmInstall {
                release,
                namespace,
                version,
                nodes,
                set_values,
                restore_values_of,
            } => {
                self.check_leader()?;
                let began = Instant::now();
                let r = self
                    .s
                    .helm
                    .scoped_install(
                        &release,
                        &namespace,
                        &version,
                        &nodes,
                        &set_values,
                        restore_values_of,
                        self.s.rollback_timeout,
                    )
                    .await;
                let op = if restore_values_of.is_some() {
                    HelmOp::Rollback
                } else {
                    HelmOp::Upgrade
                };
                self.s.metrics.helm_call(op, began.elapsed(), &r);
                answers.push(Input::HelmFinished(r.map_err(|e| e.to_string())));
            }
            Effect::ReadNode(name) => {
                // The node's slot Lease too: a loss is declared only on what both say right now.
                let slot = self
                    .machine
                    .run()
                    .and_then(|r| r.turn_of(&name).map(|t| t.slot))
                    .unwrap_or(0);
                let lease = self
                    .lease_api
                    .get_opt(&slot_lease_name(&self.s.lease_name, slot))
                    .await?;
                answers.push(lease_input(
                    slot,
                    lease.map(|l| klm_kube::lease::view_of(&l)),
                ));
                let node = self.node_api.get_opt(&name).await?;
                answers.push(Input::Node {
                    name,
                    node: node.as_ref().map(nodes::snapshot),
                    direct: true,
                });
            }
            Effect::WriteGrant {
                node,
                grant,
                resource_version,
            } => {
                self.check_leader()?;
                let patch = klm_protocol::grant::patch(grant.as_ref(), resource_version.as_deref());
                match self
                    .node_api
                    .patch(&node, &grant_params(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tracing::debug!(
                        node,
                        granted = grant.is_some(),
                        "grant written on the Node"
                    ),
                    // Deleted: nothing to grant on. Changed since observed (409): the newer
                    // Node, once the watch delivers it, is compared again by the machine.
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                        tracing::debug!(node, code = e.code, "grant not written; the Node moved on")
                    }
                    Err(e) => return Err(anyhow::Error::from(e).context(format!(
                        "writing the grant on Node {node} (the coordinator needs patch on nodes)"
                    ))),
                }
            }
            Effect::MarkNodeFailed {
                node,
                kind,
                evidence,
            } => {
                self.check_leader()?;
                self.s.metrics.lease_event(LeaseEvent::Lost);
                match nodes::mark_failed(&self.node_api, &node, &evidence.run_id, kind, &evidence)
                    .await
                {
                    Ok(()) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => tracing::warn!(error = %e, node, "could not mark node failed"),
                }
            }
            Effect::EnsureLease => {
                self.slot_lease(0)
                    .ensure_exists(self.s.lease_duration_seconds)
                    .await?;
            }
            Effect::EnsureSlotLease(slot) => {
                self.check_leader()?;
                self.slot_lease(slot)
                    .ensure_exists(self.s.lease_duration_seconds)
                    .await?;
                tracing::info!(slot, "wave slot Lease ensured");
            }
            Effect::RevokeLease { node, slot } => {
                self.check_leader()?;
                let revoked = self.slot_lease(slot).revoke_from_node(&node).await?;
                if revoked {
                    self.s.metrics.lease_event(LeaseEvent::Revoked);
                }
                tracing::info!(node, revoked, "upgrade Lease taken back from a lost node");
            }
            Effect::WakeAt(w) => return Ok(Some(w)),
        }
        Ok(None)
    }

    async fn event(&self, node: Option<&str>, warning: bool, reason: &str, note: String) {
        // The log level follows the Event's type, so `Warning` Events stand out in the logs too.
        if warning {
            tracing::warn!(reason, node, "{note}");
        } else {
            tracing::info!(reason, node, "{note}");
        }
        let cm_uid = self
            .trigger
            .get(&ObjectRef::new(&self.s.trigger_configmap).within(&self.s.namespace))
            .and_then(|c| c.metadata.uid.clone());
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
}

/// The active run's id and blocking-pod selector, if it has one (the pods to watch).
fn blocking_pod_selector(run: Option<&klm_protocol::RunRecord>) -> Option<(&str, &str)> {
    let run = run.filter(|r| !r.phase.is_finished())?;
    let selector = run.params.as_ref()?.blocking_pod_selector.as_str();
    (!selector.is_empty()).then_some((run.id.as_str(), selector))
}

/// The active run's id if it has the Prometheus alert gate.
fn alert_gated(run: Option<&klm_protocol::RunRecord>) -> Option<&str> {
    run.filter(|r| !r.phase.is_finished())
        .filter(|r| {
            r.params
                .as_ref()
                .is_some_and(|p| !p.alert_filter.is_empty())
        })
        .map(|r| r.id.as_str())
}

/// Grants are written as the coordinator (the chart's admission policy lets only it write them).
fn grant_params() -> PatchParams {
    PatchParams {
        field_manager: Some("kata-lifecycle-manager-coordinator".into()),
        ..Default::default()
    }
}

/// What the machine is told of wave slot `slot`'s Lease.
fn lease_input(slot: u32, lease: Option<LeaseView>) -> Input {
    match slot {
        0 => Input::Lease(lease),
        slot => Input::SlotLease { slot, lease },
    }
}

/// A conditional write of the trigger ConfigMap refused with 409: someone changed it since we
/// read it. The reconcile ends; the next one reads the change (its watch event wakes us) first.
fn changed_since_read(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(ref ae) if ae.code == 409 => anyhow::anyhow!(
            "the trigger ConfigMap changed since it was read; reading it again before writing"
        ),
        e => e.into(),
    }
}
