//! Shared handles (`Agent`) and the per-turn context every step works through (`TurnCtx`):
//! fencing before mutations, interruption while waiting, Node patches and Events.
use crate::config::Config;
use crate::node_patch::NodePatch;
use crate::turn::Assignment;
use k8s_openapi::api::core::v1::{Node, Pod};
use klm_kube::events::{Events, node_ref};
use klm_kube::lease::{FenceGuard, LeaseLost, UpgradeLease};
use klm_protocol::Evidence;
use klm_protocol::verification::FailureCause;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
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
    pub lease: UpgradeLease,
    pub events: Events,
}

impl Agent {
    pub fn new(client: Client, requests: RequestCounter, config: Config) -> Self {
        Agent {
            requests,
            nodes: Api::all(client.clone()),
            lease: UpgradeLease::new(
                client.clone(),
                &config.namespace,
                &config.lease_name,
                &config.node_name,
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

    pub fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

/// Why a turn stops before it is over. None of these writes anything further to the Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The Lease is no longer ours: stop mutating at once; the coordinator fails the node.
    LeaseLost(String),
    /// SIGTERM: stop between steps and keep the Lease for the restarted agent.
    Shutdown,
    /// The run no longer names this node (the coordinator moved on).
    Revoked,
    /// Our Node object is gone.
    NodeGone,
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

/// Everything one turn works with.
pub struct TurnCtx<'a> {
    pub agent: &'a Agent,
    pub a: &'a Assignment,
    pub fence: FenceGuard,
    pub shutdown: CancellationToken,
    pub revoked: watch::Receiver<bool>,
    /// The Node as last read or patched (patches return it, so no extra reads).
    pub node: Node,
    pub evidence: Evidence,
    /// When this process took the turn (local monotonic), for durations without started-at.
    pub began: tokio::time::Instant,
    /// The request counter when this process started the turn (before taking the Lease).
    pub requests_at_start: u64,
}

impl TurnCtx<'_> {
    pub fn node_name(&self) -> &str {
        self.agent.node_name()
    }

    /// Before every mutating call: do we still hold the Lease?
    pub fn fenced(&self) -> Result<(), StepError> {
        self.fence.check().map_err(StepError::from)
    }

    /// Between steps: stop for shutdown or a revoked turn, as well as a lost Lease.
    pub fn between_steps(&self) -> Result<(), Stop> {
        if let Err(l) = self.fence.check() {
            return Err(Stop::LeaseLost(l.0));
        }
        if self.shutdown.is_cancelled() {
            return Err(Stop::Shutdown);
        }
        if *self.revoked.borrow() {
            return Err(Stop::Revoked);
        }
        Ok(())
    }

    /// Resolves when the turn must stop waiting: Lease lost, shutdown, or turn revoked.
    pub async fn interrupted(&self) -> Stop {
        let mut revoked = self.revoked.clone();
        tokio::select! {
            lost = self.fence.lost() => Stop::LeaseLost(lost.0),
            _ = self.shutdown.cancelled() => Stop::Shutdown,
            r = revoked.wait_for(|r| *r) => match r {
                Ok(_) => Stop::Revoked,
                // The driver is gone: only happens at shutdown.
                Err(_) => Stop::Shutdown,
            },
        }
    }

    /// Fenced merge patch of our Node; keeps the returned Node.
    pub async fn patch_node(&mut self, what: &str, patch: &NodePatch) -> Result<(), StepError> {
        self.fenced()?;
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self
            .agent
            .nodes
            .patch(self.node_name(), &pp, &Patch::Merge(patch.to_json()))
            .await
        {
            Ok(node) => {
                self.node = node;
                Ok(())
            }
            Err(e) if is_status(&e, 404) => Err(Stop::NodeGone.into()),
            Err(error) => Err(StepError::Api {
                what: what.to_string(),
                error,
            }),
        }
    }

    /// Publishes an Event on our Node in the background (best effort, never delays a step).
    pub fn event(&self, warning: bool, reason: &'static str, note: String) {
        let events = self.agent.events.clone();
        let target = node_ref(self.node_name(), self.node.meta().uid.clone());
        let action = match self.a.kind {
            klm_protocol::TurnKind::Upgrade => "Upgrade",
            klm_protocol::TurnKind::Restore => "Restore",
        };
        tokio::spawn(async move {
            events.publish(&target, warning, reason, action, note).await;
        });
    }

    /// API requests this turn has sent so far, plus the one about to carry the evidence.
    pub fn requests_so_far(&self) -> u64 {
        self.agent.requests.get() - self.requests_at_start + 1
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.evidence.notes.contains(&note) {
            self.evidence.notes.push(note);
        }
    }
}
