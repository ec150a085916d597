//! What a turn works with, in two parts: [`Agent`], the long-lived handles of the process (API
//! client, Lease, Events), and [`TurnCtx`], one turn — its record ([`TurnRecord`]: the
//! assignment, the Node as last read, the evidence so far), its fence and the signals that stop
//! it. Every Node write goes through [`TurnCtx::patch_node`]: fenced, and preconditioned on the
//! Node's `resourceVersion`, so a stale agent's write fails instead of landing.
use crate::config::Config;
use crate::metrics::Metrics;
use crate::turn::Assignment;
use k8s_openapi::api::core::v1::{Node, Pod};
use klm_kube::events::{Events, node_ref};
use klm_kube::lease::{FenceGuard, LeaseLost, NamedLease};
use klm_kube::time::mono_ms;
use klm_protocol::node_record::{NodePatch, NodeRecord};
use klm_protocol::procedure::Budget;
use klm_protocol::verification::FailureCause;
use klm_protocol::{Evidence, NodeStatus, TurnKind};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Field manager recorded on everything the agent writes.
pub const FIELD_MANAGER: &str = "kata-lifecycle-manager-agent";
/// Reporting controller of the agent's Events.
pub const EVENT_REPORTER: &str = "kata-lifecycle-manager-agent";

/// API requests sent by this process (a watch counts once).
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl RequestCounter {
    pub fn add(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Long-lived handles, one per process.
pub struct Agent {
    pub client: Client,
    pub requests: RequestCounter,
    pub config: Config,
    pub nodes: Api<Node>,
    /// The upgrade Lease (wave slot 0), held as `<node>/<instance>`; see [`Agent::slot_lease`].
    pub lease: NamedLease,
    pub events: Events,
    pub metrics: Metrics,
}

impl Agent {
    pub fn new(client: Client, requests: RequestCounter, config: Config, metrics: Metrics) -> Self {
        let identity = config.identity();
        Agent {
            requests,
            metrics,
            nodes: Api::all(client.clone()),
            lease: NamedLease::new(
                client.clone(),
                &config.namespace,
                &config.lease_name,
                &identity,
            ),
            events: Events::new(
                client.clone(),
                EVENT_REPORTER,
                Some(config.node_name.clone()),
            ),
            client,
            config,
        }
    }

    pub fn node_name(&self) -> &str {
        &self.config.node_name
    }

    /// The upgrade Lease of a wave slot, held as this process: slot 0 is `lease`, the others
    /// are named by `klm_protocol::lease::slot_lease_name` (the grant on our Node says
    /// which slot is this node's).
    pub fn slot_lease(&self, slot: u32) -> NamedLease {
        if slot == 0 {
            return self.lease.clone();
        }
        NamedLease::new(
            self.client.clone(),
            &self.config.namespace,
            &klm_protocol::lease::slot_lease_name(&self.config.lease_name, slot),
            self.lease.identity(),
        )
    }

    pub fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// What the grant on our Node currently says about a running turn (sent by the driver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnSignal {
    /// The grant no longer names this turn (removed, or now another turn).
    pub revoked: bool,
    /// The run asks this (upgrade) turn to stop at its next safe point.
    pub cancel: bool,
}

/// Why a turn stops before it is over. None of these writes anything further to the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The Lease is no longer ours (or not confirmed): stop mutating at once.
    LeaseLost(String),
    /// SIGTERM: stop between steps and park the Lease for the restarted agent.
    Shutdown,
    /// The grant no longer names this turn (the coordinator moved on).
    Revoked,
    /// Our Node object is gone.
    NodeGone,
    /// The Node no longer shows our turn in progress (the coordinator recorded a verdict):
    /// a stale write was refused.
    Superseded(String),
    /// The turn cannot record its outcome (the API keeps failing): stop renewing and let the
    /// Lease expire, so the coordinator fails the node rather than see no status.
    Abandoned(String),
}

/// How a step ends when it does not succeed.
#[derive(Debug)]
pub enum StepError {
    /// The node failed this step; the cause goes into the evidence.
    Failed(FailureCause),
    /// An API call failed; the walk retries transient errors and fails the node on others.
    Api {
        what: String,
        error: kube::Error,
    },
    Stop(Stop),
}

impl From<Stop> for StepError {
    fn from(s: Stop) -> Self {
        StepError::Stop(s)
    }
}

impl From<LeaseLost> for StepError {
    fn from(l: LeaseLost) -> Self {
        StepError::Stop(Stop::LeaseLost(l.0))
    }
}

pub fn failure(reason: &str, message: impl Into<String>) -> StepError {
    StepError::Failed(FailureCause {
        reason: reason.into(),
        message: message.into(),
        exit_code: None,
    })
}

pub fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> StepError {
    let what = what.into();
    move |error| StepError::Api { what, error }
}

pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The per-turn record: what this turn is, the Node as last read or written, and the evidence.
pub struct TurnRecord {
    pub a: Assignment,
    /// The Node as last read or patched (patches return it, so no extra reads).
    pub node: Node,
    pub evidence: Evidence,
    /// When this process took the turn (local monotonic ms), for durations without started-at.
    pub began_ms: i64,
    /// The request counter when this process started the turn (before taking the Lease).
    pub requests_at_start: u64,
}

impl TurnRecord {
    pub fn record(&self) -> NodeRecord {
        NodeRecord::of(&self.node)
    }

    /// A status patch for this turn.
    pub fn status(&self, status: NodeStatus) -> NodePatch {
        NodePatch::status(&self.a.run_id, self.a.kind, status)
    }

    /// When `status` began on this Node in this turn, if recorded.
    pub fn step_started(&self, status: NodeStatus) -> Option<jiff::Timestamp> {
        self.record()
            .step_started(&self.a.run_id, self.a.kind, status)
    }

    /// The time limit of the step the Node is in, counted from the step's recorded start (on
    /// this process's monotonic clock), so an agent restarted mid-step keeps the same budget.
    pub fn step_budget(&self, limit: Duration) -> Budget {
        let elapsed_ms = self
            .record()
            .status
            .and_then(|st| self.step_started(st))
            .map_or(0, |t| {
                jiff::Timestamp::now()
                    .as_millisecond()
                    .saturating_sub(t.as_millisecond())
                    .max(0)
            });
        Budget::new(mono_ms().saturating_sub(elapsed_ms), limit)
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.evidence.notes.contains(&note) {
            self.evidence.notes.push(note);
        }
    }
}

/// One turn: the process's handles, the turn's record, its fence and its stop signals.
pub struct TurnCtx<'a> {
    pub agent: &'a Agent,
    pub rec: TurnRecord,
    pub fence: FenceGuard,
    pub shutdown: CancellationToken,
    pub signal: watch::Receiver<TurnSignal>,
}

impl TurnCtx<'_> {
    pub fn node_name(&self) -> &str {
        self.agent.node_name()
    }

    pub fn kind(&self) -> TurnKind {
        self.rec.a.kind
    }

    /// Before every mutating call: do we still hold the Lease?
    pub fn fenced(&self) -> Result<(), StepError> {
        self.fence.check().map_err(StepError::from)
    }

    /// The run asks this upgrade turn to stop (restore turns always finish).
    pub fn cancel_requested(&self) -> bool {
        self.kind() == TurnKind::Upgrade && self.signal.borrow().cancel
    }

    /// Between steps: stop for shutdown or a revoked turn, as well as a lost Lease.
    pub fn between_steps(&self) -> Result<(), Stop> {
        if let Err(l) = self.fence.check() {
            return Err(Stop::LeaseLost(l.0));
        }
        if self.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        if self.signal.borrow().revoked {
            return Err(Stop::Revoked);
        }
        Ok(())
    }

    /// Resolves when the turn must stop waiting: Lease lost, shutdown, or turn revoked.
    pub async fn interrupted(&self) -> Stop {
        let mut signal = self.signal.clone();
        tokio::select! {
            lost = self.fence.lost() => Stop::LeaseLost(lost.0),
            _ = self.shutdown.cancelled() => Stop::Shutdown,
            r = signal.wait_for(|s| s.revoked) => match r {
                Ok(_) => Stop::Revoked,
                // The driver is gone: only happens at shutdown.
                Err(_) => Stop::Shutdown,
            },
        }
    }

    /// Resolves once the run asks this turn to stop (never for restore turns). Steps wait on
    /// it with their watches, so a cancel is noticed at once, not at the step's timeout.
    pub async fn cancelled(&self) {
        if self.kind() != TurnKind::Upgrade {
            return std::future::pending().await;
        }
        let mut signal = self.signal.clone();
        if signal.wait_for(|s| s.cancel).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps `wait` unless the turn is interrupted first.
    pub async fn pause(&self, wait: Duration) -> Result<(), Stop> {
        tokio::select! {
            stop = self.interrupted() => Err(stop),
            _ = tokio::time::sleep(wait) => Ok(()),
        }
    }

    /// Fenced merge patch of our Node, preconditioned on the `resourceVersion` we last saw;
    /// keeps the returned Node. A conflict (someone else wrote the Node since) re-reads it and
    /// writes again only if the Node still shows this turn as ours to write
    /// (`NodeRecord::still_ours`, or any other run's status for the turn's opening write) and a
    /// fresh read of the Lease still names us: a paused agent whose turn the coordinator has
    /// declared lost meanwhile finds its write refused, not applied.
    pub async fn patch_node(&mut self, what: &str, patch: &NodePatch) -> Result<(), StepError> {
        const CONFLICT_RETRIES: usize = 5;
        let opening = !self.rec.record().is_turn(&self.rec.a.run_id, self.kind());
        for _ in 0..CONFLICT_RETRIES {
            self.fenced()?;
            let rv = self.rec.node.metadata.resource_version.clone();
            let body = patch.clone().precondition(rv.as_deref()).to_json();
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match self
                .agent
                .nodes
                .patch(self.node_name(), &pp, &Patch::Merge(body))
                .await
            {
                Ok(node) => {
                    self.rec.node = node;
                    return Ok(());
                }
                Err(e) if is_status(&e, 404) => return Err(Stop::NodeGone.into()),
                Err(e) if is_status(&e, 409) => {
                    let fresh = self
                        .agent
                        .nodes
                        .get_opt(self.node_name())
                        .await
                        .map_err(api_error(format!("{what}: re-reading the Node")))?
                        .ok_or(StepError::Stop(Stop::NodeGone))?;
                    let rec = NodeRecord::of(&fresh);
                    let (run, kind) = (self.rec.a.run_id.as_str(), self.kind());
                    let ours = rec.still_ours(run, kind) || (opening && !rec.is_turn(run, kind));
                    if !ours {
                        return Err(Stop::Superseded(format!(
                            "{what}: the Node now shows {} for run {} ({} turn); not overwriting it",
                            rec.status.map_or("no status".into(), |s| s.to_string()),
                            rec.run_id.as_deref().unwrap_or("none"),
                            rec.turn.map_or("no", TurnKind::as_str)
                        ))
                        .into());
                    }
                    match self.fence.confirm().await {
                        Ok(Ok(())) => {}
                        Ok(Err(lost)) => return Err(lost.into()),
                        Err(error) => {
                            return Err(StepError::Api {
                                what: format!("{what}: confirming the Lease"),
                                error,
                            });
                        }
                    }
                    self.rec.node = fresh;
                }
                Err(error) => {
                    return Err(StepError::Api {
                        what: what.to_string(),
                        error,
                    });
                }
            }
        }
        Err(StepError::Api {
            what: what.to_string(),
            error: kube::Error::Api(
                kube::core::Status::failure("the Node keeps changing under us", "Conflict")
                    .with_code(409)
                    .boxed(),
            ),
        })
    }

    /// Publishes an Event on our Node in the background (best effort, never delays a step).
    pub fn event(&self, warning: bool, reason: &'static str, note: String) {
        let events = self.agent.events.clone();
        let target = node_ref(self.node_name(), self.rec.node.meta().uid.clone());
        let action = match self.kind() {
            TurnKind::Upgrade => "Upgrade",
            TurnKind::Restore => "Restore",
        };
        tokio::spawn(async move {
            events.publish(&target, warning, reason, action, note).await;
        });
    }

    /// API requests this turn has sent so far, plus the one about to carry the evidence.
    pub fn requests_so_far(&self) -> u64 {
        self.agent
            .requests
            .get()
            .saturating_sub(self.rec.requests_at_start)
            + 1
    }
}
