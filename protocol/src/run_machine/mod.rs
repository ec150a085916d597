//! The whole run as one pure state machine: the coordinator feeds it what it observes (the
//! trigger ConfigMap, Nodes, the upgrade Lease, helm's view of the release, the DaemonSet, the
//! results of the effects it performed) with the time, and performs the effects it returns.
//! Every decision about a run lives here or in the pure modules it calls:
//!
//! - [`admission`]: whether a trigger starts a run, is ignored or refused; manual rollbacks;
//! - [`release`]: whether the release may be touched, adopting or undoing an earlier
//!   `helm upgrade`, whether the rollback already happened;
//! - [`crate::lifecycle`]: node turns in phases `Running` and `RollingBack`.
//!
//! Phases: `Pending` (read the release and the DaemonSet; touch nothing) → `Upgrading` (the one
//! `helm upgrade`, persisted as issued before it runs) → `Running` (turns) → `Succeeded`; on a
//! failure or cancel `RollingBack` (`helm rollback`, retried with backoff, then restore turns)
//! → `Failed` / `Cancelled`. A restarted coordinator is a new machine fed the persisted record.
pub mod admission;
pub mod release;

use crate::backoff;
use crate::keys::{status_data as keys, trigger};
use crate::lease::LeaseView;
use crate::lifecycle::{self, LeaseTrack, ObservedNode, Timing, Wake, WakeReason};
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
            d.insert(keys::RUN.into(), run.to_json());
            d.insert(keys::PHASE.into(), run.phase.as_str().into());
            d.insert(keys::TARGET_VERSION.into(), run.target_version.clone());
            d.insert(keys::PROGRESS.into(), run.progress());
            d.insert(
                keys::CURRENT_NODE.into(),
                run.turn
                    .as_ref()
                    .map(|t| t.node.clone())
                    .unwrap_or_default(),
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
    /// Answer to [`Effect::ReadRelease`].
    Release(ReleaseRead),
    /// Answer to [`Effect::HelmUpgrade`] / [`Effect::HelmRollback`]: the error text on failure.
    HelmFinished(Result<(), String>),
    /// Answer to [`Effect::ReadDaemonSet`].
    DaemonSet(Result<DaemonSetObservation, String>),
    /// Nothing changed; time passed (a wake-up).
    Tick,
}

/// The coordinator's environment at each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Env {
    /// Unix ms on the coordinator's clock.
    pub now_ms: i64,
    /// API requests the coordinator sent so far (reported per run).
    pub api_requests: u64,
}

/// What the driver must do, in order. If `Persist` fails, the driver performs none of the
/// effects after it and calls [`Machine::persist_failed`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Merge this into the trigger ConfigMap's data (create the ConfigMap if it was deleted).
    /// Granting and taking back a turn is this: agents read their turn from `run.json`.
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
    /// `helm get metadata`; answer with [`Input::Release`].
    ReadRelease { release: String, namespace: String },
    /// Wait until the DaemonSet controller observed the current template, then read its newest
    /// revision; answer with [`Input::DaemonSet`].
    ReadDaemonSet { namespace: String },
    /// The run's single `helm upgrade`; answer with [`Input::HelmFinished`].
    HelmUpgrade {
        release: String,
        namespace: String,
        version: String,
    },
    /// `helm rollback <release> <revision> --wait`; answer with [`Input::HelmFinished`].
    HelmRollback {
        release: String,
        namespace: String,
        revision: u32,
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
    /// Step again (with [`Input::Tick`]) at this time even if nothing changes.
    WakeAt(Wake),
}

/// A request whose answer the machine waits for (volatile: a restart forgets it, and the new
/// machine asks again from what it reads).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Awaiting {
    Release,
    DaemonSet,
    Helm,
}

pub struct Machine {
    cfg: Config,
    rng: rand::rngs::StdRng,
    state: Persisted,
    /// The data last handed out in a `Persist` (None: write on the next step).
    saved: Option<BTreeMap<String, String>>,
    /// The persisted state was read from the trigger ConfigMap.
    loaded: bool,
    /// `run.json` could not be read at start: act on nothing until it can, or is removed.
    paused: Option<String>,
    trigger_gone: bool,
    nodes: Option<BTreeMap<String, NodeSnapshot>>,
    lease: Option<LeaseTrack>,
    lease_missing: bool,
    awaiting: Option<Awaiting>,
    reading_node: Option<String>,
    release: Option<ReleaseRead>,
    daemonset: Option<Result<DaemonSetObservation, String>>,
    helm: Option<Result<(), String>>,
    /// The result of the upgrade attempt this process made, kept until the release was read.
    upgrade_error: Option<Option<String>>,
    action_seen_in: Option<String>,
    rollback_failures: u32,
    rollback_retry_at: Option<i64>,
    requests_at_start: u64,
    env: Env,
    fx: Vec<Effect>,
}

impl Machine {
    pub fn new(cfg: Config) -> Self {
        Machine {
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
            cfg,
            state: Persisted::default(),
            saved: None,
            loaded: false,
            paused: None,
            trigger_gone: false,
            nodes: None,
            lease: None,
            lease_missing: false,
            awaiting: None,
            reading_node: None,
            release: None,
            daemonset: None,
            helm: None,
            upgrade_error: None,
            action_seen_in: None,
            rollback_failures: 0,
            rollback_retry_at: None,
            requests_at_start: 0,
            env: Env::default(),
            fx: Vec::new(),
        }
    }

    /// The state as last decided (persisted or about to be).
    pub fn state(&self) -> &Persisted {
        &self.state
    }

    pub fn run(&self) -> Option<&RunRecord> {
        self.state.run.as_ref()
    }

    /// The driver could not perform a `Persist`: the effects after it were dropped, so forget
    /// what was asked and decide again on the next step.
    pub fn persist_failed(&mut self) {
        self.saved = None;
        self.awaiting = None;
        self.reading_node = None;
        self.action_seen_in = None;
    }

    /// Folds one observation in and decides.
    pub fn step(&mut self, input: Input, env: Env) -> Vec<Effect> {
        self.env = env;
        match input {
            Input::Trigger(view) => self.on_trigger(view),
            Input::NodesListed(all) => self.nodes = Some(all.into_iter().collect()),
            Input::Node { name, node, direct } => self.on_node(name, node, direct),
            Input::Lease(view) => self.on_lease(view),
            Input::Release(r) => self.answer(Awaiting::Release, |m| m.release = Some(r)),
            Input::HelmFinished(r) => self.answer(Awaiting::Helm, |m| m.helm = Some(r)),
            Input::DaemonSet(r) => self.answer(Awaiting::DaemonSet, |m| m.daemonset = Some(r)),
            Input::Tick => {}
        }
        if self.loaded && self.paused.is_none() && self.nodes.is_some() && self.lease.is_some() {
            self.advance();
        }
        self.persist();
        std::mem::take(&mut self.fx)
    }

    fn now(&self) -> i64 {
        self.env.now_ms
    }

    fn answer(&mut self, what: Awaiting, store: impl FnOnce(&mut Self)) {
        // An answer nobody waits for (asked before a persist failed) is dropped.
        if self.awaiting.as_ref() == Some(&what) {
            self.awaiting = None;
            store(self);
        }
    }

    fn event(&mut self, node: Option<&str>, warning: bool, reason: &'static str, message: String) {
        self.fx.push(Effect::Event {
            node: node.map(str::to_string),
            warning,
            reason,
            message,
        });
    }

    /// Emits `Persist` when the state differs from what was last handed out.
    fn persist(&mut self) {
        let data = self.state.to_data();
        if self.loaded && self.saved.as_ref() != Some(&data) {
            self.saved = Some(data.clone());
            self.fx.push(Effect::Persist(data));
        }
    }

    fn active(&self) -> bool {
        self.state
            .run
            .as_ref()
            .is_some_and(|r| !r.phase.is_finished())
    }

    // ---- observations -------------------------------------------------------------------

    fn on_node(&mut self, name: String, node: Option<NodeSnapshot>, direct: bool) {
        if direct && self.reading_node.as_deref() == Some(name.as_str()) {
            self.reading_node = None;
        }
        let Some(nodes) = self.nodes.as_mut() else {
            return; // not listed yet: the list brings it
        };
        match node {
            Some(mut snap) => {
                let previous_read = nodes.get(&name).and_then(|n| n.observed.read_at_ms);
                snap.observed.read_at_ms = if direct {
                    Some(self.env.now_ms)
                } else {
                    previous_read
                };
                nodes.insert(name, snap);
            }
            None => {
                nodes.remove(&name);
            }
        }
    }

    fn on_lease(&mut self, view: Option<LeaseView>) {
        let now = self.now();
        match view {
            Some(v) => {
                self.lease_missing = false;
                match self.lease.as_mut() {
                    Some(t) => t.observe(&v, now),
                    None => self.lease = Some(LeaseTrack::new(&v, now)),
                }
            }
            None => {
                if !self.lease_missing {
                    self.lease_missing = true;
                    self.fx.push(Effect::EnsureLease);
                    if self.active() {
                        self.event(
                            None,
                            true,
                            "UpgradeLeaseRecreated",
                            "the upgrade Lease was deleted mid-run; recreating it (an agent holding it keeps its turn only if it can take it again)".into(),
                        );
                    }
                }
                // A missing Lease is held by nobody.
                let free = LeaseView {
                    duration_seconds: self
                        .lease
                        .as_ref()
                        .map_or(30, |t| (t.duration_ms / 1000) as i32),
                    ..Default::default()
                };
                match self.lease.as_mut() {
                    Some(t) => t.observe(&free, now),
                    None => self.lease = Some(LeaseTrack::new(&free, now)),
                }
            }
        }
    }

    fn on_trigger(&mut self, view: Option<TriggerView>) {
        let Some(view) = view else {
            if self.active() && !self.trigger_gone {
                self.event(
                    None,
                    true,
                    "TriggerDeleted",
                    "the trigger ConfigMap was deleted mid-run; recreating it with the run record so the nodes' agents can finish (to stop a run, annotate action=cancel)".into(),
                );
                self.saved = None; // the next Persist recreates it
            }
            self.trigger_gone = true;
            return;
        };
        self.trigger_gone = false;
        if !self.loaded || self.paused.is_some() {
            self.load(&view);
            if !self.loaded || self.paused.is_some() {
                return;
            }
        } else if let Some(text) = view.data.get(keys::RUN)
            && RunRecord::from_json(text).is_err()
            && self.state.run.is_some()
        {
            // We are the only writer; someone overwrote the record. Put ours back.
            self.saved = None;
            self.event(
                None,
                true,
                "RunRecordRewritten",
                "data.run.json in the trigger ConfigMap was overwritten with something unreadable; restored the coordinator's record".into(),
            );
        }
        self.admit(&view);
    }

    /// Takes the persisted state from the ConfigMap (at start, or while paused).
    fn load(&mut self, view: &TriggerView) {
        let (state, error) = Persisted::from_data(&view.data);
        match error {
            Some(e) => {
                let msg = format!(
                    "the run record (data.run.json in the trigger ConfigMap) is unreadable: {e}. The coordinator is paused: \
                     restore the record, or delete the key to abandon that run (nodes it cordoned stay cordoned; check \
                     `kubectl get nodes -L katacontainers.io/kata-lifecycle-manager-status`)"
                );
                if self.paused.as_deref() != Some(msg.as_str()) {
                    self.event(None, true, "RunRecordUnreadable", msg.clone());
                }
                self.state = Persisted {
                    notice: msg.clone(),
                    ..state
                };
                self.paused = Some(msg);
                // Only the summary keys are written: never overwrite the unreadable record.
                self.loaded = true;
            }
            None => {
                if self.paused.take().is_some() {
                    self.event(
                        None,
                        false,
                        "RunRecordReadable",
                        "the run record is readable again; resuming".into(),
                    );
                }
                self.state = state;
                self.loaded = true;
                // What is stored is what we would write.
                self.saved = Some(self.state.to_data())
                    .filter(|d| d.iter().all(|(k, v)| view.data.get(k) == Some(v)));
                self.adopt_legacy_fingerprint(&view.annotations);
            }
        }
    }

    /// Fingerprints were once `DefaultHasher` values (not stable across builds): a stored one
    /// is taken to mean the current annotations, so an upgraded coordinator starts no run.
    fn adopt_legacy_fingerprint(&mut self, annotations: &BTreeMap<String, String>) {
        let legacy = |f: &str| !f.is_empty() && !f.starts_with(crate::run::FINGERPRINT_PREFIX);
        let current = crate::run::trigger_fingerprint(annotations);
        if legacy(&self.state.observed_trigger) {
            self.state.observed_trigger = current.clone();
        }
        if let Some(run) = self.state.run.as_mut()
            && legacy(&run.trigger)
        {
            run.trigger = current;
        }
    }

    // ---- requests on the trigger ----------------------------------------------------------

    fn admit(&mut self, view: &TriggerView) {
        let annotations = &view.annotations;
        if let Some(action) = annotations.get(trigger::ACTION)
            && view.resource_version != self.action_seen_in
        {
            // Until our removal shows up in the watch, views still carry the annotation.
            self.action_seen_in = view.resource_version.clone();
            self.take_action(action.trim());
        }
        let fingerprint = crate::run::trigger_fingerprint(annotations);
        let rollback_node = annotations
            .get(trigger::ROLLBACK_NODE)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if rollback_node.is_empty() {
            // Removed: the same node may be requested again later.
            self.state.observed_rollback.clear();
        }
        if self.active() {
            let run = self.state.run.as_ref().expect("active");
            if !fingerprint.is_empty()
                && fingerprint != run.trigger
                && fingerprint != self.state.observed_trigger
            {
                self.state.observed_trigger = fingerprint;
                let msg = format!(
                    "run {} is still in progress; the new trigger was not started (one run at a time). Re-annotate after it finishes.",
                    run.id
                );
                if let Some(r) = self.state.run.as_mut() {
                    r.warnings.push(msg.clone());
                }
                self.event(None, true, "TriggerIgnored", msg);
            }
            if !rollback_node.is_empty() && rollback_node != self.state.observed_rollback {
                self.refuse_rollback(
                    &rollback_node,
                    format!(
                        "manual rollback of {rollback_node} ignored: a run is in progress; annotate again after it finishes"
                    ),
                    "RollbackIgnored",
                );
            }
        } else if !fingerprint.is_empty() && fingerprint != self.state.observed_trigger {
            self.state.observed_trigger = fingerprint;
            self.start_run(annotations);
        } else if fingerprint.is_empty() && !self.state.observed_trigger.is_empty() {
            // Target removed: re-adding the same annotations later starts a fresh run.
            self.state.observed_trigger.clear();
        } else if !rollback_node.is_empty() && rollback_node != self.state.observed_rollback {
            self.start_manual_rollback(&rollback_node);
        }
    }

    /// A refused `rollback-node` is consumed (annotation removed), so the same request can be
    /// made again once it can succeed.
    fn refuse_rollback(&mut self, node: &str, note: String, reason: &'static str) {
        self.state.observed_rollback = node.to_string();
        self.state.notice = note.clone();
        self.event(Some(node), true, reason, note);
        self.persist();
        self.fx
            .push(Effect::RemoveAnnotation(trigger::ROLLBACK_NODE));
    }

    /// `lifecycle.katacontainers.io/action`, acted on once, then removed so it never applies
    /// to a later run. The cancel is persisted before the annotation goes.
    fn take_action(&mut self, action: &str) {
        let active = self.active();
        match action {
            trigger::ACTION_CANCEL if active => {
                let run = self.state.run.as_mut().expect("active");
                if !run.cancel_requested {
                    run.cancel_requested = true;
                    let msg = format!(
                        "run {}: cancel requested; no further node starts, and what the run did is rolled back",
                        run.id
                    );
                    self.event(None, true, "CancelRequested", msg);
                }
            }
            trigger::ACTION_CANCEL => self.event(
                None,
                false,
                "NothingToCancel",
                "action=cancel: no run is in progress".into(),
            ),
            other => {
                let note = format!("unknown action {other:?}: the only action is `cancel`");
                self.state.notice = note.clone();
                self.event(None, true, "UnknownAction", note);
            }
        }
        self.persist();
        self.fx.push(Effect::RemoveAnnotation(trigger::ACTION));
    }

    fn start_run(&mut self, annotations: &BTreeMap<String, String>) {
        let now = self.now();
        let target = annotations
            .get(trigger::TARGET_VERSION)
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .unwrap_or("run")
            .to_string();
        let id = new_run_id(&target, now, &mut self.rng);
        self.requests_at_start = self.env.api_requests;
        self.reset_volatile();
        let run = admission::new_run(annotations, &self.cfg.defaults, id.clone(), now);
        for w in &run.warnings {
            self.event(None, true, "UnknownAnnotation", format!("run {id}: {w}"));
        }
        if run.phase == RunPhase::Failed {
            self.event(
                None,
                true,
                "RunRejected",
                format!("run {id}: {}", run.message),
            );
        }
        self.state.run = Some(run);
        self.count_requests();
    }

    fn start_manual_rollback(&mut self, node: &str) {
        let now = self.now();
        let id = new_run_id("rollback", now, &mut self.rng);
        match admission::manual_rollback(self.state.run.as_ref(), node, id.clone(), now) {
            Ok(run) => {
                self.state.observed_rollback = node.to_string();
                self.requests_at_start = self.env.api_requests;
                self.reset_volatile();
                self.state.run = Some(run);
                self.event(
                    Some(node),
                    true,
                    "ManualRollbackStarted",
                    format!("run {id}: rolling {node} back"),
                );
            }
            Err(note) => self.refuse_rollback(node, note, "RollbackRejected"),
        }
    }

    fn reset_volatile(&mut self) {
        self.awaiting = None;
        self.release = None;
        self.daemonset = None;
        self.helm = None;
        self.upgrade_error = None;
        self.rollback_failures = 0;
        self.rollback_retry_at = None;
    }

    /// Sets the run's API request count once it finished (before its first write as finished).
    fn count_requests(&mut self) {
        let used = self.env.api_requests.saturating_sub(self.requests_at_start);
        if let Some(run) = self.state.run.as_mut()
            && run.phase.is_finished()
            && run.coordinator_api_requests.is_none()
        {
            run.coordinator_api_requests = Some(used);
        }
    }

    // ---- the run's phases -----------------------------------------------------------------

    fn advance(&mut self) {
        // Each pass either changes the phase (or the release's rolled-back flag) or stops.
        for _ in 0..8 {
            let Some(run) = self.state.run.as_ref() else {
                return;
            };
            let before = (run.phase, run.release.as_ref().map(|r| r.rolled_back));
            match run.phase {
                RunPhase::Pending => self.pending(),
                RunPhase::Upgrading => self.upgrading(),
                RunPhase::RollingBack if !run.release.as_ref().is_some_and(|r| r.rolled_back) => {
                    self.rollback()
                }
                RunPhase::Running | RunPhase::RollingBack => self.turns(),
                RunPhase::Succeeded | RunPhase::Failed | RunPhase::Cancelled => return,
            }
            self.count_requests();
            let run = self.state.run.as_ref().expect("run");
            if (run.phase, run.release.as_ref().map(|r| r.rolled_back)) == before {
                return;
            }
        }
    }

    fn run_mut(&mut self) -> &mut RunRecord {
        self.state.run.as_mut().expect("a run is active")
    }

    fn request(&mut self, what: Awaiting, effect: Effect) {
        self.awaiting = Some(what);
        self.fx.push(effect);
    }

    fn read_release(&mut self) {
        let p = self.run_mut().params.clone().unwrap_or_else(missing_params);
        self.request(
            Awaiting::Release,
            Effect::ReadRelease {
                release: p.helm_release,
                namespace: p.helm_namespace,
            },
        );
    }

    fn finish(&mut self, phase: RunPhase, reason: &'static str, msg: String) {
        let now = self.now();
        let run = self.run_mut();
        run.finish(phase, msg.clone(), now);
        let id = run.id.clone();
        self.event(
            None,
            phase != RunPhase::Succeeded,
            reason,
            format!("run {id}: {msg}"),
        );
    }

    /// Reads the release and the DaemonSet; touches nothing.
    fn pending(&mut self) {
        let run = self.state.run.as_ref().expect("run");
        if run.cancel_requested {
            return self.finish(
                RunPhase::Cancelled,
                "RunCancelled",
                "cancelled before any change was made".into(),
            );
        }
        let Some(p) = run.params.clone() else {
            return self.finish(
                RunPhase::Failed,
                "RunRejected",
                "the run has no parameters".into(),
            );
        };
        if self.awaiting.is_some() {
            return;
        }
        let have_release = run.release.is_some();
        if !have_release {
            let Some(read) = self.release.take() else {
                return self.read_release();
            };
            let rel = match read {
                ReleaseRead::Found(rel) => rel,
                ReleaseRead::NotFound => {
                    return self.finish(
                        RunPhase::Failed,
                        "RunRejected",
                        format!(
                            "release {:?} not found in namespace {:?}: install kata-deploy with helm first, or set \
                             lifecycle.katacontainers.io/helm-release / helm-namespace",
                            p.helm_release, p.helm_namespace
                        ),
                    );
                }
                ReleaseRead::Error(e) => return self.finish(RunPhase::Failed, "RunRejected", e),
            };
            if let Err(e) = release::admit_release(&rel, &p.helm_release, &p.helm_namespace) {
                return self.finish(RunPhase::Failed, "RunRejected", e);
            }
            let facts: Vec<NodeFacts> = self
                .nodes
                .iter()
                .flat_map(|n| n.values())
                .map(|s| s.facts.clone())
                .collect();
            let run = self.run_mut();
            run.plan = plan::select(&facts, &p);
            run.release = Some(ReleaseState {
                recorded_revision: rel.revision,
                recorded_version: rel.version.clone(),
                ..Default::default()
            });
            if rel.version == p.target_version {
                return self.finish(
                    RunPhase::Succeeded,
                    "RunSucceeded",
                    format!(
                        "release {}/{} is already at {}; nothing to do (no helm call, no node touched)",
                        p.helm_namespace, p.helm_release, p.target_version
                    ),
                );
            }
            if run.plan.is_empty() {
                return self.finish(
                    RunPhase::Succeeded,
                    "RunSucceeded",
                    format!(
                        "no nodes selected ({}); nothing to do, no helm call",
                        crate::params::describe(&p)
                    ),
                );
            }
        }
        let Some(ds) = self.daemonset.take() else {
            return self.request(
                Awaiting::DaemonSet,
                Effect::ReadDaemonSet {
                    namespace: p.helm_namespace.clone(),
                },
            );
        };
        let ds = match ds {
            Ok(ds) => ds,
            Err(e) => return self.finish(RunPhase::Failed, "RunRejected", e),
        };
        let run = self.run_mut();
        if let Some(r) = run.release.as_mut() {
            r.old_hash = ds.hash;
        }
        run.message = format!(
            "upgrading {} node(s): {}; {}",
            run.plan.len(),
            run.plan.join(", "),
            crate::params::describe(&p)
        );
        let msg = format!("run {}: {}", run.id, run.message);
        // Persisted before helm runs: a restarted coordinator must know helm may have run.
        run.phase = RunPhase::Upgrading;
        self.event(None, false, "RunStarted", msg);
    }

    /// The run's single `helm upgrade`, or adoption / undoing of one made before a restart.
    fn upgrading(&mut self) {
        if self.awaiting.is_some() {
            return;
        }
        if let Some(result) = self.helm.take() {
            // Whatever helm said, decide from what the release now is.
            self.upgrade_error = Some(result.err());
            return self.read_release();
        }
        let run = self.state.run.as_ref().expect("run");
        let p = run.params.clone().unwrap_or_else(missing_params);
        let recorded = run.release.clone().unwrap_or_default();
        if recorded.upgraded_revision.is_some()
            && let Some(ds) = self.daemonset.take()
        {
            return self.upgraded(ds, &p);
        }
        let rel = match self.release.take() {
            None => return self.read_release(),
            Some(ReleaseRead::Found(rel)) => rel,
            Some(ReleaseRead::NotFound) => {
                return self.fail_before_nodes(format!(
                    "release {}/{} disappeared during the upgrade",
                    p.helm_namespace, p.helm_release
                ));
            }
            Some(ReleaseRead::Error(e)) if !recorded.upgrade_issued => {
                return self.fail_before_nodes(format!("cannot read the release: {e}"));
            }
            Some(ReleaseRead::Error(e)) => {
                // helm may have changed the release: never give up blind, ask again.
                return self.retry_later(format!("cannot read the release after the upgrade: {e}"));
            }
        };
        match release::upgrade_step(&recorded, &p.target_version, recorded.upgrade_issued, &rel) {
            UpgradeStep::Upgrade if run.cancel_requested => self.finish(
                RunPhase::Cancelled,
                "RunCancelled",
                "cancelled before any change was made".into(),
            ),
            UpgradeStep::Upgrade => {
                if let Some(r) = self.run_mut().release.as_mut() {
                    r.upgrade_issued = true;
                }
                self.persist();
                self.request(
                    Awaiting::Helm,
                    Effect::HelmUpgrade {
                        release: p.helm_release.clone(),
                        namespace: p.helm_namespace.clone(),
                        version: p.target_version.clone(),
                    },
                );
            }
            UpgradeStep::Adopt { revision } => {
                if self.upgrade_error.is_none() {
                    let id = run.id.clone();
                    self.event(
                        None,
                        false,
                        "UpgradeAdopted",
                        format!("run {id}: adopting helm revision {revision}, made before a coordinator restart"),
                    );
                }
                self.upgrade_error = None;
                if let Some(r) = self.run_mut().release.as_mut() {
                    r.upgraded_revision = Some(revision);
                }
                self.request(
                    Awaiting::DaemonSet,
                    Effect::ReadDaemonSet {
                        namespace: p.helm_namespace.clone(),
                    },
                );
            }
            UpgradeStep::RollBack { reason } => {
                let reason = match self.upgrade_error.take().flatten() {
                    Some(e) => format!("helm upgrade failed: {e}"),
                    None => reason,
                };
                if let Some(r) = self.run_mut().release.as_mut() {
                    r.upgraded_revision = Some(rel.revision);
                }
                self.rollback_before_nodes(reason);
            }
            UpgradeStep::Abandon { reason } => {
                let msg = match self.upgrade_error.take().flatten() {
                    Some(e) => format!("helm upgrade failed, nothing was changed: {e}"),
                    None => reason,
                };
                self.fail_before_nodes(msg);
            }
        }
    }

    fn upgraded(&mut self, ds: Result<DaemonSetObservation, String>, p: &crate::params::RunParams) {
        let ds = match ds {
            Ok(ds) => ds,
            Err(e) => return self.rollback_before_nodes(e),
        };
        let run = self.run_mut();
        let release = run.release.as_mut().expect("release");
        release.new_hash = Some(ds.hash);
        release.on_delete = Some(ds.on_delete);
        let revision = release.upgraded_revision.unwrap_or_default();
        run.phase = RunPhase::Running;
        run.message = format!("helm revision {revision} deployed; upgrading node by node");
        if !ds.on_delete {
            let w = format!(
                "kata-deploy chart {} ignores updateStrategy (charts before 3.27.0 hard-code RollingUpdate): \
                 the DaemonSet replaces pods on all nodes by itself, so the runtime update is NOT paced node by node; \
                 nodes are still cordoned and verified one at a time in plan order, and the first failure still rolls back",
                p.target_version
            );
            run.warnings.push(w.clone());
            let id = run.id.clone();
            self.event(
                None,
                true,
                "UpdateStrategyIgnored",
                format!("run {id}: {w}"),
            );
        }
    }

    fn retry_later(&mut self, msg: String) {
        let at = self.now() + 5_000;
        self.run_mut().message = format!("{msg}; retrying");
        self.fx.push(Effect::WakeAt(Wake {
            at_ms: at,
            reason: WakeReason::RetryRollback,
        }));
    }

    fn fail_before_nodes(&mut self, msg: String) {
        self.finish(RunPhase::Failed, "RunFailed", msg);
    }

    fn rollback_before_nodes(&mut self, reason: String) {
        let run = self.run_mut();
        run.failure = Some(RunFailure {
            node: None,
            reason: reason.clone(),
            evidence: None,
        });
        run.phase = RunPhase::RollingBack;
        run.message = format!("{reason}; rolling back");
        let id = run.id.clone();
        self.event(None, true, "RunFailing", format!("run {id}: {reason}"));
    }

    /// `helm rollback` to the recorded revision unless the release history shows it happened;
    /// retried with backoff; after the budget the run ends saying what a human must do.
    fn rollback(&mut self) {
        if self.awaiting.is_some() {
            return;
        }
        let now = self.now();
        if let Some(at) = self.rollback_retry_at
            && now < at
        {
            self.fx.push(Effect::WakeAt(Wake {
                at_ms: at,
                reason: WakeReason::RetryRollback,
            }));
            return;
        }
        let run = self.state.run.as_ref().expect("run");
        let p = run.params.clone().unwrap_or_else(missing_params);
        let recorded = run.release.clone().unwrap_or_default();
        if let Some(result) = self.helm.take() {
            return match result {
                Ok(()) => self.rolled_back(&p, &recorded),
                Err(e) => self.rollback_failed(e, &p, &recorded),
            };
        }
        match self.release.take() {
            None => {
                self.rollback_retry_at = None;
                self.read_release()
            }
            Some(ReleaseRead::Found(rel)) if release::rolled_back(&recorded, &rel) => {
                self.rolled_back(&p, &recorded)
            }
            Some(ReleaseRead::Found(_)) => self.request(
                Awaiting::Helm,
                Effect::HelmRollback {
                    release: p.helm_release.clone(),
                    namespace: p.helm_namespace.clone(),
                    revision: recorded.recorded_revision,
                },
            ),
            Some(ReleaseRead::NotFound) => self.rollback_failed(
                format!("release {}/{} not found", p.helm_namespace, p.helm_release),
                &p,
                &recorded,
            ),
            Some(ReleaseRead::Error(e)) => self.rollback_failed(e, &p, &recorded),
        }
    }

    fn rolled_back(&mut self, p: &crate::params::RunParams, recorded: &ReleaseState) {
        self.rollback_failures = 0;
        self.rollback_retry_at = None;
        let run = self.run_mut();
        if let Some(r) = run.release.as_mut() {
            r.rolled_back = true;
        }
        if matches!(run.kind, RunKind::ManualRollback) || run.failure.is_some() {
            let id = run.id.clone();
            self.event(
                None,
                true,
                "ReleaseRolledBack",
                format!(
                    "run {id}: release {}/{} rolled back to revision {} ({})",
                    p.helm_namespace,
                    p.helm_release,
                    recorded.recorded_revision,
                    recorded.recorded_version
                ),
            );
        }
    }

    fn rollback_failed(
        &mut self,
        error: String,
        p: &crate::params::RunParams,
        recorded: &ReleaseState,
    ) {
        self.rollback_failures += 1;
        let policy = self.cfg.rollback_retry;
        let attempt = self.rollback_failures;
        if attempt < policy.attempts {
            let wait = backoff::jittered(attempt - 1, policy.base, policy.cap, 1.0);
            let at = self.now() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
            self.rollback_retry_at = Some(at);
            let run = self.run_mut();
            run.message = format!(
                "helm rollback to revision {} failed (attempt {attempt} of {}): {error}; retrying in {}s",
                recorded.recorded_revision,
                policy.attempts,
                wait.as_secs()
            );
            let (id, msg) = (run.id.clone(), run.message.clone());
            self.event(None, true, "RollbackRetrying", format!("run {id}: {msg}"));
            self.fx.push(Effect::WakeAt(Wake {
                at_ms: at,
                reason: WakeReason::RetryRollback,
            }));
            return;
        }
        let run = self.state.run.as_ref().expect("run");
        let touched: Vec<(String, NodeStatus)> = run
            .plan
            .iter()
            .filter_map(|n| Some((n.clone(), run.nodes.get(n)?.status?)))
            .collect();
        let touched_text = if touched.is_empty() {
            "none".to_string()
        } else {
            touched
                .iter()
                .map(|(n, s)| format!("{n} ({s})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let msg = format!(
            "helm rollback of {ns}/{rel} to revision {rev} ({ver}) failed {attempt} time(s), last: {error}. \
             Nothing more was done; nodes this run touched are left as they are: {touched_text}. \
             A human must: 1) run `helm rollback {rel} {rev} -n {ns} --wait` until it succeeds; 2) on each node listed, \
             delete its kata-deploy pod (`kubectl delete pod -n {ns} -l name=kata-deploy --field-selector spec.nodeName=<node>`) \
             and, once the new pod is Ready, `kubectl uncordon <node>` where the node carries the annotation \
             lifecycle.katacontainers.io/cordoned-by",
            ns = p.helm_namespace,
            rel = p.helm_release,
            rev = recorded.recorded_revision,
            ver = recorded.recorded_version,
        );
        for (node, status) in &touched {
            self.event(
                Some(node),
                true,
                "NodeNeedsAttention",
                format!(
                    "node {node} ({status}) was not restored: the release could not be rolled back; see the run's message"
                ),
            );
        }
        self.finish(RunPhase::Failed, "RollbackFailed", msg);
    }

    /// Node turns (phases Running and RollingBack after the release rollback).
    fn turns(&mut self) {
        let now = self.now();
        let nodes = self.nodes.clone().unwrap_or_default();
        let observe = move |n: &str| nodes.get(n).map(|s| s.observed.clone()).unwrap_or_default();
        let lease = self.lease.clone().unwrap_or_default();
        let run = self.state.run.as_mut().expect("run");
        let effects = lifecycle::reduce(run, &observe, &lease, now, self.cfg.timing);
        let id = run.id.clone();
        for effect in effects {
            match effect {
                lifecycle::Effect::Event {
                    node,
                    warning,
                    reason,
                    message,
                } => self.event(
                    node.as_deref(),
                    warning,
                    reason,
                    format!("run {id}: {message}"),
                ),
                // The rollback phase runs it (RollingBack with `rolled_back` unset).
                lifecycle::Effect::HelmRollback => {}
                lifecycle::Effect::MarkNodeFailed { node, kind, reason } => {
                    let evidence = Evidence {
                        run_id: id.clone(),
                        node: node.clone(),
                        step: "lost".into(),
                        succeeded: false,
                        failure: Some(FailureCause {
                            reason: "NodeLost".into(),
                            message: reason,
                            exit_code: None,
                        }),
                        ..Default::default()
                    };
                    self.fx.push(Effect::MarkNodeFailed {
                        node,
                        kind,
                        evidence,
                    });
                }
                lifecycle::Effect::ReadNode(node) => {
                    if self.reading_node.is_none() {
                        self.reading_node = Some(node.clone());
                        self.fx.push(Effect::ReadNode(node));
                    }
                }
                lifecycle::Effect::WakeAt(w) => self.fx.push(Effect::WakeAt(w)),
            }
        }
    }
}

/// Runs past `Pending` always carry validated parameters (a record without them is refused
/// before it leaves `Pending`); a hand-edited record that lost them gets empty ones and fails
/// at helm with a message rather than a panic.
fn missing_params() -> crate::params::RunParams {
    crate::params::RunParams {
        target_version: String::new(),
        helm_release: String::new(),
        helm_namespace: String::new(),
        node_selector: String::new(),
        node_taint_key: String::new(),
        node_taint_value: String::new(),
        verification_namespace: String::new(),
        verification_pod: String::new(),
        drain_enabled: false,
        drain_timeout_seconds: 1,
        verification_timeout_seconds: 1,
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
