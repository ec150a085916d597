//! The coordinator's I/O loop: observe (the trigger ConfigMap, Nodes and the upgrade Lease from
//! reflector stores; helm, the DaemonSet and direct reads when asked) → step the pure run
//! machine (`klm_protocol::run_machine`) → perform its effects → feed the answers back. Every
//! decision about the run is the machine's; this file only translates.
use crate::daemonset;
use crate::helm::{Helm, HelmError};
use crate::metrics::{HelmOp, LeaseEvent, Metrics};
use crate::status_data;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_kube::events::{Events, configmap_ref, node_ref};
use klm_kube::nodes;
use klm_kube::time::now_ms;
use klm_protocol::lease::LeaseView;
use klm_protocol::lifecycle::Wake;
use klm_protocol::run_machine::release::{ReleaseObservation, ReleaseRead, ReleaseStatus};
use klm_protocol::run_machine::{self, Effect, Env, Input, Machine, TriggerView};
use kube::api::Api;
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
}

/// What was last fed to the machine, so only changes are fed (the machine folds them).
#[derive(Default)]
struct Fed {
    trigger: Option<Option<String>>,
    lease: Option<Option<LeaseView>>,
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
    leases: Store<Lease>,
    machine: Machine,
    requests: klm_kube::client::RequestCounter,
    fed: Fed,
    /// The turn last seen in the run record, to count grants (`klm_lease_events_total`).
    seen_turn: Option<klm_protocol::Turn>,
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
        let (leases, _) =
            klm_kube::watch::reflect(lease_api.clone(), by_name(&s.lease_name), notify);
        nodes.wait_until_ready().await?;
        trigger.wait_until_ready().await?;
        leases.wait_until_ready().await?;
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
            leases,
            requests,
            fed: Fed::default(),
            seen_turn: None,
        })
    }

    fn env(&self) -> Env {
        Env {
            now_ms: now_ms(),
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
        let lease = self
            .leases
            .get(&ObjectRef::new(&self.s.lease_name).within(&self.s.namespace))
            .map(|l| klm_kube::lease::view_of(&l));
        if self.fed.lease.as_ref() != Some(&lease) {
            self.fed.lease = Some(lease.clone());
            inputs.push_back(Input::Lease(lease));
        }
        let cm = self
            .trigger
            .get(&ObjectRef::new(&self.s.trigger_configmap).within(&self.s.namespace));
        let rv = cm
            .as_ref()
            .map(|c| c.metadata.resource_version.clone().unwrap_or_default());
        if self.fed.trigger.as_ref() != Some(&rv) {
            self.fed.trigger = Some(rv);
            inputs.push_back(Input::Trigger(cm.map(|c| TriggerView {
                resource_version: c.metadata.resource_version.clone(),
                annotations: c.metadata.annotations.clone().unwrap_or_default(),
                data: c.data.clone().unwrap_or_default(),
            })));
        }
        inputs.push_back(Input::Tick);
        inputs
    }

    /// One reconciliation: feed what changed, perform what the machine decides, feed the
    /// answers, until it asks for nothing more. Returns when it next wants to be woken.
    pub async fn reconcile(&mut self) -> anyhow::Result<Option<Wake>> {
        let result = self.reconcile_inner().await;
        self.s.metrics.observe_run(self.machine.run());
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
                        wake = Some(wake.map_or(w, |x| if w.at_ms < x.at_ms { w } else { x }))
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
        let turn = self.machine.run().and_then(|r| r.turn.clone());
        if turn.is_some() && turn != self.seen_turn {
            self.s.metrics.lease_event(LeaseEvent::Granted);
        }
        self.seen_turn = turn;
    }

    fn check_leader(&self) -> anyhow::Result<()> {
        match &self.s.leadership {
            Some(fence) => fence
                .check()
                .map_err(|lost| anyhow::anyhow!("not acting: {lost}")),
            None => Ok(()),
        }
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
                status_data::save(&self.configmaps, cm, &data).await?;
            }
            Effect::RemoveAnnotation(key) => {
                self.check_leader()?;
                status_data::remove_annotation(&self.configmaps, cm, key).await?;
            }
            Effect::Event {
                node,
                warning,
                reason,
                message,
            } => self.event(node.as_deref(), warning, reason, message).await,
            Effect::ReadRelease { release, namespace } => {
                let began = Instant::now();
                let read = match self.s.helm.metadata(&release, &namespace).await {
                    Ok(m) => self
                        .s
                        .helm
                        .deployment_mode(&release, &namespace)
                        .await
                        .map(|mode| (m, mode)),
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
                // The Lease too: a loss is declared only on what both say right now.
                let lease = self.lease_api.get_opt(&self.s.lease_name).await?;
                answers.push(Input::Lease(lease.map(|l| klm_kube::lease::view_of(&l))));
                let node = self.node_api.get_opt(&name).await?;
                answers.push(Input::Node {
                    name,
                    node: node.as_ref().map(nodes::snapshot),
                    direct: true,
                });
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
                klm_kube::lease::UpgradeLease::new(
                    self.client.clone(),
                    &self.s.namespace,
                    &self.s.lease_name,
                    "coordinator",
                )
                .ensure_exists(self.s.lease_duration_seconds)
                .await?;
            }
            Effect::RevokeLease { node } => {
                self.check_leader()?;
                let revoked = klm_kube::lease::UpgradeLease::new(
                    self.client.clone(),
                    &self.s.namespace,
                    &self.s.lease_name,
                    "coordinator",
                )
                .revoke_from_node(&node)
                .await?;
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
        tracing::info!(reason, node, warning, "{note}");
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
