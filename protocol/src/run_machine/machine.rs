//! The machine: folds observations, turns requests on the trigger into runs, and drives the
//! run's phases (in [`phases`]).
use super::*;
use crate::lifecycle::{LeaseTrack, Sightings};

mod job_mode;
mod phases;

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
    /// When this process first saw the turns in flight and the run's stop (monotonic).
    sightings: Sightings,
    /// The Leases of wave slots 1 and up, as observed (waves; slot 0 is `lease`).
    slot_leases: BTreeMap<u32, LeaseTrack>,
    /// Slot Leases asked to be created and not yet seen (asked once each).
    slot_leases_asked: std::collections::BTreeSet<u32>,
    awaiting: Option<Awaiting>,
    reading_node: Option<String>,
    release: Option<ReleaseRead>,
    daemonset: Option<Result<DaemonSetObservation, String>>,
    helm: Option<Result<(), String>>,
    /// The result of the upgrade attempt this process made, kept until the release was read.
    upgrade_error: Option<Option<String>>,
    action_seen_in: Option<String>,
    rollback_failures: u32,
    /// A retry (of a helm rollback or a release read) scheduled for this time.
    retry_at: Option<Wake>,
    requests_at_start: u64,
    /// The last list of pods matching a blocking-pod selector, with that selector.
    blocking_pods: Option<(String, Vec<crate::grant_gate::BlockingPod>)>,
    /// The last poll of Prometheus's firing alerts (`None`: not answered yet).
    firing_alerts: Option<Result<Vec<String>, String>>,
    /// Nodes whose grant annotation was last seen present (so revoking a grant needs no scan
    /// of the whole fleet).
    granted: std::collections::BTreeSet<String>,
    /// Grant writes asked and not yet seen, by node: the Node's version they were conditioned
    /// on and the grant. Asked again only once a newer version of the Node still differs.
    grants_asked: BTreeMap<String, (Option<String>, Option<crate::grant::Grant>)>,
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
            sightings: Sightings::default(),
            slot_leases: BTreeMap::new(),
            slot_leases_asked: Default::default(),
            awaiting: None,
            reading_node: None,
            release: None,
            daemonset: None,
            helm: None,
            upgrade_error: None,
            action_seen_in: None,
            rollback_failures: 0,
            retry_at: None,
            requests_at_start: 0,
            blocking_pods: None,
            firing_alerts: None,
            granted: Default::default(),
            grants_asked: BTreeMap::new(),
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
        self.grants_asked.clear();
    }

    /// Folds one observation in and decides.
    pub fn step(&mut self, input: Input, env: Env) -> Vec<Effect> {
        self.env = env;
        match input {
            Input::Trigger(view) => self.on_trigger(view),
            Input::NodesListed(all) => {
                self.granted = all
                    .iter()
                    .filter(|(name, n)| self.grant_is_ours(name, n.grant.as_deref()))
                    .map(|(name, _)| name.clone())
                    .collect();
                self.nodes = Some(all.into_iter().collect());
            }
            Input::Node { name, node, direct } => self.on_node(name, node, direct),
            Input::Lease(view) => self.on_lease(view),
            Input::SlotLease { slot: 0, lease } => self.on_lease(lease),
            Input::SlotLease { slot, lease } => self.on_slot_lease(slot, lease),
            Input::Release(r) => self.answer(Awaiting::Release, |m| m.release = Some(r)),
            Input::HelmFinished(r) => self.answer(Awaiting::Helm, |m| m.helm = Some(r)),
            Input::DaemonSet(r) => self.answer(Awaiting::DaemonSet, |m| m.daemonset = Some(r)),
            Input::BlockingPods { selector, pods } => self.blocking_pods = Some((selector, pods)),
            Input::FiringAlerts(alerts) => self.firing_alerts = Some(alerts),
            Input::Tick => {}
        }
        if self.loaded && self.paused.is_none() && self.nodes.is_some() && self.lease.is_some() {
            self.advance();
        }
        self.persist();
        if self.loaded && self.paused.is_none() {
            self.sync_grants();
        }
        // A step may pass a phase twice (a wave's upgrade turn ended mid-step) and ask for the
        // same wake twice: the driver needs each once.
        let mut fx = std::mem::take(&mut self.fx);
        let mut seen = Vec::new();
        fx.retain(|e| match e {
            Effect::WakeAt(w) if seen.contains(w) => false,
            Effect::WakeAt(w) => {
                seen.push(*w);
                true
            }
            _ => true,
        });
        fx
    }

    /// Wall clock: for what is recorded and shown.
    fn now(&self) -> i64 {
        self.env.now_ms
    }

    /// Monotonic clock: for durations (timeouts, Lease expiry, retry waits).
    fn mono(&self) -> i64 {
        self.env.mono_ms
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

    /// Writes on each Node the grant the run decides for it now ([`crate::grant::desired`]),
    /// after the record that decides it was persisted (a restarted coordinator derives the same
    /// grants from that record): set on the nodes whose turn it is, changed when the run asks a
    /// turn to stop, removed once the turn ended, was taken back, or the run finished. Only the
    /// nodes with a turn or a grant are looked at, not the whole fleet.
    fn sync_grants(&mut self) {
        let Some(nodes) = self.nodes.as_ref() else {
            return;
        };
        let mut want = crate::grant::desired(self.state.run.as_ref());
        for grant in want.values_mut() {
            grant.issuer = self.cfg.issuer.clone();
        }
        let names: std::collections::BTreeSet<String> =
            want.keys().chain(&self.granted).cloned().collect();
        for name in names {
            let grant = want.remove(&name);
            // A deleted Node carries nothing; the lifecycle deals with its turn.
            let Some(snap) = nodes.get(&name) else {
                self.grants_asked.remove(&name);
                continue;
            };
            if crate::grant::carries(snap.grant.as_deref(), grant.as_ref()) {
                self.grants_asked.remove(&name);
                continue;
            }
            // A grant is written on the version of the Node the decision saw; a removal at once,
            // unconditionally: the record has already taken the turn back, and a removal refused
            // because a stale view of the Node was in hand would leave the agent a grant the run
            // no longer has (the model test found that). Only the coordinator writes grants, and
            // in order, so an unconditional removal never takes away a newer grant.
            let version = grant.as_ref().and(snap.resource_version.clone());
            let ask = (version, grant);
            if self.grants_asked.get(&name) == Some(&ask) {
                continue;
            }
            self.grants_asked.insert(name.clone(), ask.clone());
            self.fx.push(Effect::WriteGrant {
                node: name,
                grant: ask.1,
                resource_version: ask.0,
            });
        }
    }

    // ---- observations -------------------------------------------------------------------

    /// A grant on `node` this coordinator must keep right: one it made, or text that is no
    /// grant at all on a node of its run's plan (an agent there reads nothing from it).
    fn grant_is_ours(&self, node: &str, annotation: Option<&str>) -> bool {
        let Some(text) = annotation else {
            return false;
        };
        match crate::grant::Grant::from_json(text) {
            Ok(g) => g.issuer == self.cfg.issuer,
            Err(_) => self
                .state
                .run
                .as_ref()
                .is_some_and(|r| r.plan.iter().any(|n| n == node)),
        }
    }

    fn on_node(&mut self, name: String, node: Option<NodeSnapshot>, direct: bool) {
        if direct && self.reading_node.as_deref() == Some(name.as_str()) {
            self.reading_node = None;
        }
        if self.nodes.is_none() {
            return; // not listed yet: the list brings it
        }
        // Only grants this coordinator made are its to take back: several installations may
        // share a cluster (the end-to-end tests run one coordinator per slice), and removing
        // another's grant would revoke a turn it gave (seen: an agent's turn revoked twice).
        match &node {
            Some(snap) if self.grant_is_ours(&name, snap.grant.as_deref()) => {
                self.granted.insert(name.clone())
            }
            _ => self.granted.remove(&name),
        };
        let nodes = self.nodes.as_mut().expect("listed");
        match node {
            Some(mut snap) => {
                let previous_read = nodes.get(&name).and_then(|n| n.observed.read_at_ms);
                snap.observed.read_at_ms = if direct {
                    Some(self.env.mono_ms)
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
        let now = self.mono();
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

    /// A wave slot's Lease (slot 1 and up) changed. A missing one is held by nobody; it is
    /// created when a turn is granted in its slot (see `phases::turns`).
    fn on_slot_lease(&mut self, slot: u32, view: Option<LeaseView>) {
        let now = self.mono();
        match view {
            Some(v) => {
                self.slot_leases_asked.remove(&slot);
                match self.slot_leases.get_mut(&slot) {
                    Some(t) => t.observe(&v, now),
                    None => {
                        self.slot_leases.insert(slot, LeaseTrack::new(&v, now));
                    }
                }
            }
            None => {
                if let Some(t) = self.slot_leases.remove(&slot) {
                    // Deleted: held by nobody from now on; recreated when its slot is used.
                    let free = LeaseView {
                        duration_seconds: (t.duration_ms / 1000) as i32,
                        ..Default::default()
                    };
                    let mut t = t;
                    t.observe(&free, now);
                    self.slot_leases.insert(slot, t);
                    self.slot_leases_asked.remove(&slot);
                }
            }
        }
    }

    /// The Lease tracks of slots `0..slots`, indexed by slot (a slot never seen is untracked:
    /// held by nobody since the start).
    pub(super) fn lease_tracks(&self, slots: usize) -> Vec<LeaseTrack> {
        (0..slots as u32)
            .map(|s| match s {
                0 => self.lease.clone().unwrap_or_default(),
                s => self.slot_leases.get(&s).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Asks for the Lease of every slot a turn uses that was never seen (each once).
    pub(super) fn ensure_slot_leases(&mut self) {
        let Some(run) = self.state.run.as_ref() else {
            return;
        };
        for slot in run.turns().iter().map(|t| t.slot).filter(|s| *s > 0) {
            let seen = self
                .slot_leases
                .get(&slot)
                .is_some_and(|t| t.duration_ms > 0);
            if !seen && self.slot_leases_asked.insert(slot) {
                self.fx.push(Effect::EnsureSlotLease(slot));
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
                    run.cancel_requested_at_ms = Some(self.env.now_ms);
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
            trigger::ACTION_PAUSE | trigger::ACTION_RESUME if active => {
                let pause = action == trigger::ACTION_PAUSE;
                let run = self.state.run.as_mut().expect("active");
                if run.paused != pause {
                    run.paused = pause;
                    let (reason, msg) = if pause {
                        run.message = format!(
                            "paused after {} of {} node(s): no further node starts (a node in progress \
                             finishes); annotate action=resume to continue",
                            run.completed(),
                            run.plan.len()
                        );
                        ("RunPaused", format!("run {}: {}", run.id, run.message))
                    } else {
                        run.message = format!(
                            "resumed after {} of {} node(s)",
                            run.completed(),
                            run.plan.len()
                        );
                        ("RunResumed", format!("run {}: {}", run.id, run.message))
                    };
                    self.event(None, pause, reason, msg);
                }
            }
            trigger::ACTION_PAUSE | trigger::ACTION_RESUME => self.event(
                None,
                false,
                "NothingToSteer",
                format!("action={action}: no run is in progress"),
            ),
            other => {
                let note = format!(
                    "unknown action {other:?}: the actions are `cancel`, `pause` and `resume`"
                );
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
        // A new run decides on fresh gate observations, not on what a finished run saw (the
        // driver feeds them again for every run).
        self.blocking_pods = None;
        self.firing_alerts = None;
        self.awaiting = None;
        self.release = None;
        self.daemonset = None;
        self.helm = None;
        self.upgrade_error = None;
        self.rollback_failures = 0;
        self.retry_at = None;
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
}
