//! The whole run as one pure state machine: the coordinator feeds it what it observes (the
//! trigger ConfigMap, Nodes, the upgrade Lease, helm's view of the release, the DaemonSet, the
//! results of the effects it performed) with the time, and performs the effects it returns.
//! Every decision about a run lives here or in the pure modules it calls:
//!
//! - [`admission`]: whether a trigger starts a run, is ignored or refused; manual rollbacks;
//! - [`release`]: whether the release may be touched, adopting or undoing an earlier
//!   `helm upgrade`, whether the rollback already happened;
//! - [`crate::lifecycle`]: node turns in phases `Running` and `RollingBack`;
//! - [`crate::grant_gate`]: whether the run's start and each new upgrade turn may begin now
//!   (maintenance window, blocking pods), called from [`machine`]'s `gate`.
//!
//! Phases: `Pending` (read the release and the DaemonSet; touch nothing) → `Upgrading` (the one
//! `helm upgrade`, persisted as issued before it runs) → `Running` (turns) → `Succeeded`; on a
//! failure or cancel `RollingBack` (`helm rollback`, retried with backoff, then restore turns)
//! → `Failed` / `Cancelled`. A restarted coordinator is a new machine fed the persisted record.
pub mod admission;
mod machine;
pub mod release;

pub use machine::Machine;

use crate::backoff;
use crate::grant_gate;
use crate::keys::{status_data as keys, trigger};
use crate::lease::LeaseView;
use crate::lifecycle::{self, ObservedNode, Timing, Wake, WakeReason};
use crate::params::Defaults;
use crate::plan::{self, NodeFacts};
use crate::run::{Evidence, ReleaseState, RunFailure, RunKind, RunRecord, new_run_id};
use crate::status::{NodeStatus, RunPhase};
use crate::verification::FailureCause;
use rand::SeedableRng;
use release::{DaemonSetObservation, ReleaseRead, UpgradeStep};
use std::collections::BTreeMap;
use std::time::Duration;

/// How often and how patiently a failed `helm rollback` is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub timing: Timing,
    pub defaults: Defaults,
    pub rollback_retry: RetryPolicy,
    /// Seeds run ids (tests pass a fixed seed).
    pub seed: u64,
    /// Who this coordinator is, written into every grant it makes (its trigger ConfigMap,
    /// `<namespace>/<name>`): it removes only grants it made, never another installation's.
    pub issuer: String,
}

/// What the coordinator keeps across restarts, in the trigger ConfigMap's `data`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    pub run: Option<RunRecord>,
    pub observed_trigger: String,
    pub observed_rollback: String,
    pub notice: String,
}

impl Persisted {
    /// Reads the ConfigMap's `data`; an unreadable `run.json` comes back as the error beside
    /// everything else that could be read.
    pub fn from_data(data: &BTreeMap<String, String>) -> (Self, Option<String>) {
        let text = |k: &str| data.get(k).cloned().unwrap_or_default();
        let (run, error) = match data.get(keys::RUN) {
            None => (None, None),
            Some(s) => match RunRecord::from_json(s) {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        (
            Persisted {
                run,
                observed_trigger: text(keys::OBSERVED_TRIGGER),
                observed_rollback: text(keys::OBSERVED_ROLLBACK),
                notice: text(keys::NOTICE),
            },
            error,
        )
    }

    /// The `data` keys to merge into the ConfigMap: the record plus a human-readable summary.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        d.insert(keys::OBSERVED_TRIGGER.into(), self.observed_trigger.clone());
        d.insert(
            keys::OBSERVED_ROLLBACK.into(),
            self.observed_rollback.clone(),
        );
        d.insert(keys::NOTICE.into(), self.notice.clone());
        if let Some(run) = &self.run {
            d.insert(keys::RUN.into(), run.to_stored_json());
            d.insert(keys::PHASE.into(), run.phase.as_str().into());
            d.insert(keys::TARGET_VERSION.into(), run.target_version.clone());
            d.insert(keys::PROGRESS.into(), run.progress());
            d.insert(
                keys::CURRENT_NODE.into(),
                run.turns()
                    .iter()
                    .map(|t| t.node.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            d.insert(keys::MESSAGE.into(), run.message.clone());
        }
        d
    }
}

/// The trigger ConfigMap as observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerView {
    pub resource_version: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub data: BTreeMap<String, String>,
}

/// One Node as observed: planning facts and the lifecycle's view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSnapshot {
    pub facts: NodeFacts,
    pub observed: ObservedNode,
    /// The Node's grant annotation as written ([`crate::grant::ANNOTATION`]; `None`: absent).
    pub grant: Option<String>,
    /// The Node's `resourceVersion`: a grant is written on condition that it is unchanged.
    pub resource_version: Option<String>,
}

/// Everything the machine is told. (Each input is built and consumed once per step, so the
/// variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The trigger ConfigMap changed (`None`: it was deleted).
    Trigger(Option<TriggerView>),
    /// Every Node, as a fresh list (the first observation, and after a re-list).
    NodesListed(Vec<(String, NodeSnapshot)>),
    /// One Node changed (`None`: deleted). `direct` when it answers [`Effect::ReadNode`].
    Node {
        name: String,
        node: Option<NodeSnapshot>,
        direct: bool,
    },
    /// The upgrade Lease changed (`None`: it does not exist).
    Lease(Option<LeaseView>),
    /// The upgrade Lease of a wave slot changed (`None`: it does not exist); slot 0 is the
    /// upgrade Lease itself (see [`crate::lease::slot_lease_name`]).
    SlotLease { slot: u32, lease: Option<LeaseView> },
    /// Answer to [`Effect::ReadRelease`].
    Release(ReleaseRead),
    /// Answer to [`Effect::HelmUpgrade`] / [`Effect::HelmRollback`]: the error text on failure.
    HelmFinished(Result<(), String>),
    /// Answer to [`Effect::ReadDaemonSet`].
    DaemonSet(Result<DaemonSetObservation, String>),
    /// Every pod matching `selector` (the active run's blocking-pod selector), as a fresh list
    /// from the driver's watch, each time it changes.
    BlockingPods {
        selector: String,
        pods: Vec<crate::grant_gate::BlockingPod>,
    },
    /// The last poll of Prometheus's alerts: the names of the firing alerts, or why it failed.
    FiringAlerts(Result<Vec<String>, String>),
    /// Nothing changed; time passed (a wake-up).
    Tick,
}

/// The coordinator's environment at each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Env {
    /// Unix ms on the coordinator's wall clock: what is recorded and shown, and the time of day
    /// a maintenance window is judged by.
    pub now_ms: i64,
    /// The coordinator's monotonic ms: what durations within this process (Lease expiry, the
    /// turn-start timeout, retry backoffs) are measured on, so that a wall-clock step changes
    /// none of them.
    pub mono_ms: i64,
    /// API requests the coordinator sent so far (reported per run).
    pub api_requests: u64,
}

/// What the driver must do, in order. If `Persist` fails, the driver performs none of the
/// effects after it and calls [`Machine::persist_failed`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Merge this into the trigger ConfigMap's data (create the ConfigMap if it was deleted).
    /// A granted or taken-back turn is persisted here first, then written on its Node
    /// ([`Effect::WriteGrant`]).
    Persist(BTreeMap<String, String>),
    /// Remove this annotation from the trigger ConfigMap (a consumed request).
    RemoveAnnotation(&'static str),
    /// Publish an Event on the trigger ConfigMap (and on the node when given).
    Event {
        node: Option<String>,
        warning: bool,
        reason: &'static str,
        message: String,
    },
    /// `helm get metadata` (and with `mode`, `helm get values --all` for `deploymentMode`);
    /// answer with [`Input::Release`].
    ReadRelease {
        release: String,
        namespace: String,
        /// Read the release's `deploymentMode` too: only before the run is admitted, where the
        /// mode is decided once; later reads need the revision and status only.
        mode: bool,
    },
    /// Wait until the DaemonSet controller observed the current template, then read its newest
    /// revision; answer with [`Input::DaemonSet`].
    ReadDaemonSet { namespace: String },
    /// The run's single `helm upgrade`; answer with [`Input::HelmFinished`].
    HelmUpgrade {
        release: String,
        namespace: String,
        version: String,
        /// The run's validated `helm-set-values`, each passed as its own `--set`.
        set_values: Vec<String>,
    },
    /// Put the release back to the recorded revision's chart `version` and user values, still
    /// with `updateStrategy.type=OnDelete` (a plain `helm rollback` to a default install's
    /// revision brings back `RollingUpdate`, and the DaemonSet controller would then replace
    /// every upgraded node's pod at once, uncordoned and unverified); answer with
    /// [`Input::HelmFinished`].
    HelmRollback {
        release: String,
        namespace: String,
        revision: u32,
        version: String,
        /// The release is `pending-*` (a helm process was killed): first `helm rollback` to
        /// this revision, which clears the pending state without bringing back `RollingUpdate`
        /// (see [`release::unpending_revision`]).
        clear_pending: Option<u32>,
    },
    /// Set (or with `None` remove) the grant on this Node: the node's agent learns about its
    /// turn, its revocation and the run's cancel from it ([`crate::grant`]). Conditioned on
    /// `resource_version` when given (a grant; a removal is unconditional); a refused write
    /// (409) needs no answer: the newer Node, once observed, is compared again.
    WriteGrant {
        node: String,
        grant: Option<crate::grant::Grant>,
        resource_version: Option<String>,
    },
    /// Read the Node directly; answer with [`Input::Node`] `direct: true`.
    ReadNode(String),
    /// The node's agent cannot report: write `failed` with this evidence on the Node.
    MarkNodeFailed {
        node: String,
        kind: crate::TurnKind,
        evidence: Evidence,
    },
    /// The upgrade Lease is missing: create it (free).
    EnsureLease,
    /// Waves: a turn was granted in this slot (1 and up) and its Lease was never seen: create
    /// it (free) if it does not exist.
    EnsureSlotLease(u32),
    /// A node was declared lost: clear its slot's upgrade Lease if a process of that node still
    /// holds it, so that its agent, if it was only paused, fails its fence on waking (its fresh
    /// read no longer shows its hold) instead of acting on a turn the run has given up.
    RevokeLease { node: String, slot: u32 },
    /// Step again (with [`Input::Tick`]) at this time even if nothing changes.
    WakeAt(Wake),
    /// Job mode: one scoped `helm upgrade … --set job.nodes={nodes}` (see [`crate::install`]);
    /// answer with [`Input::HelmFinished`].
    HelmInstall {
        release: String,
        namespace: String,
        version: String,
        nodes: std::collections::BTreeSet<String>,
        /// Upgrade: the run's validated `helm-set-values` over the release's values
        /// (`--reset-then-reuse-values`, as the daemonset upgrade).
        set_values: Vec<String>,
        /// Restore: the recorded revision whose user values the release goes back to
        /// (`--reset-values -f <those values>`, as the daemonset restore).
        restore_values_of: Option<u32>,
    },
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
