//! The run lifecycle as a pure reducer: given the run record, what the Nodes and the upgrade
//! Lease say, and the time, it advances the record (grant the next turn, record a node's
//! outcome, fail over to rollback, finish) and returns the effects for the driver to perform.
//!
//! Waves: with `batch-size` N, up to N turns run at once, one per slot, each under its slot's
//! upgrade Lease (`crate::lease::slot_lease_name`); with a canary, the first wave is one node.
//! Batch-size 1 is one slot: one node at a time, exactly as before waves.
//!
//! Invariants enforced here (and property-tested in `run_machine/model.rs`): at most
//! `batch-size` turns at a time (one while the canary runs); upgrade turns are granted in plan
//! order; no upgrade turn is granted after a failure or cancel, and the nodes of the wave still
//! in flight end their current step (or stop at a safe point) before the release is rolled
//! back; only nodes this run touched are restored, up to `batch-size` at a time.
//!
//! Clocks ([`Now`]): what is written to the record (grant, start, finish, failure times) is
//! wall-clock, shown to users and read by a new leader; how long a node has (the Lease expiry,
//! the turn-start timeout, "a read made after the stop") is measured on this process's
//! monotonic clock, so a wall-clock step (NTP, a resumed VM) neither fails a healthy node nor
//! delays declaring a silent one lost.
use crate::lease::{LeaseView, holder_node};
use crate::run::{Evidence, RunFailure, RunKind, RunRecord, Turn, TurnKind};
use crate::status::{NodeStatus, RunPhase};

/// What the coordinator observes of one planned node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedNode {
    pub exists: bool,
    pub status: Option<NodeStatus>,
    pub run_id: Option<String>,
    pub turn: Option<TurnKind>,
    pub evidence: Option<Evidence>,
    /// Monotonic time (ms) of the last direct read of this Node (not a watch event), if any. A node
    /// is declared lost only on a view read after its deadline passed: a watch may deliver the
    /// Lease release before the `completed` the agent wrote just before it.
    pub read_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long an agent has to take its turn before the node counts as failed.
    pub turn_start_timeout_ms: i64,
    /// Extra time after the Lease expired before the node counts as lost.
    pub expiry_grace_ms: i64,
}

/// The coordinator's two clocks at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Unix ms: for what is recorded and shown.
    pub wall_ms: i64,
    /// This process's monotonic ms: for how long something took or may take.
    pub mono_ms: i64,
}

impl From<i64> for Now {
    /// One clock that never steps (tests and simulations): both readings are `ms`.
    fn from(ms: i64) -> Self {
        Now {
            wall_ms: ms,
            mono_ms: ms,
        }
    }
}

/// The upgrade Lease as this coordinator watched it, on its own monotonic clock: expiry is
/// measured from when *we saw* the holder renew (as client-go's leader election does), never by
/// comparing our clock with the agent's `renewTime`, and never on the wall clock, which may
/// step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseTrack {
    /// The node named by the holder identity (`<node>/<instance>`), if held.
    pub holder: Option<String>,
    /// `leaseDurationSeconds` in ms, clamped to sane bounds.
    pub duration_ms: i64,
    /// Monotonic time the current holder was first seen.
    pub holder_since_ms: i64,
    /// Monotonic time the current `renewTime` was first seen.
    pub renew_seen_ms: i64,
    renew_ms: Option<i64>,
}

impl LeaseTrack {
    /// Bounds on a (possibly hand-edited) `leaseDurationSeconds`.
    pub const MIN_DURATION_MS: i64 = crate::lease::MIN_DURATION_SECONDS as i64 * 1000;
    pub const MAX_DURATION_MS: i64 = crate::lease::MAX_DURATION_SECONDS as i64 * 1000;

    /// A track starting from the first observation, at monotonic `now_ms`.
    pub fn new(view: &LeaseView, now_ms: i64) -> Self {
        let mut t = LeaseTrack {
            holder: None,
            duration_ms: 0,
            holder_since_ms: now_ms,
            renew_seen_ms: now_ms,
            renew_ms: None,
        };
        t.observe(view, now_ms);
        t.holder_since_ms = now_ms;
        t.renew_seen_ms = now_ms;
        t
    }

    /// Folds one observation in (at monotonic `now_ms`); only a change of holder or `renewTime` moves the times, so
    /// duplicates and re-deliveries change nothing.
    pub fn observe(&mut self, view: &LeaseView, now_ms: i64) {
        let holder = view
            .holder
            .as_deref()
            .filter(|h| !h.is_empty())
            .map(|h| holder_node(h).to_string());
        if holder != self.holder {
            self.holder = holder;
            self.holder_since_ms = now_ms;
            self.renew_seen_ms = now_ms;
        } else if view.renew_ms != self.renew_ms {
            self.renew_seen_ms = now_ms;
        }
        self.renew_ms = view.renew_ms;
        self.duration_ms = (i64::from(view.duration_seconds) * 1000)
            .clamp(Self::MIN_DURATION_MS, Self::MAX_DURATION_MS);
    }

    pub fn held_by(&self, node: &str) -> bool {
        self.holder.as_deref() == Some(node)
    }
}

/// When this coordinator first saw each turn in flight, and the run stop (a cancel or the first
/// failure), on its monotonic clock: the turn-start timeout and "a read made after the stop" are
/// measured from these, not from the wall-clock times in the record. Kept by the driver for the
/// life of the process, never persisted: a new leader (or a restarted coordinator) starts its own
/// measure when it first sees a turn, so it gives an agent a whole turn-start timeout from then
/// (at most one timeout more than the old leader would have, never less, whatever either
/// leader's clock said), and counts every read it makes itself as made after the stop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sightings {
    run_id: String,
    turns: Vec<(Turn, i64)>,
    stop_ms: Option<i64>,
}

impl Sightings {
    /// For callers whose wall and monotonic clocks are one clock that never steps (tests): the
    /// record's grant and stop times are taken as the sightings.
    pub fn from_record(run: &RunRecord) -> Self {
        Sightings {
            run_id: run.id.clone(),
            turns: run
                .turns()
                .into_iter()
                .map(|t| {
                    let at = t.granted_at_ms;
                    (t, at)
                })
                .collect(),
            stop_ms: run
                .cancel_requested_at_ms
                .into_iter()
                .chain(run.failed_at_ms)
                .min(),
        }
    }

    /// Forgets what belongs to another run or to turns that ended.
    fn tidy(&mut self, run: &RunRecord) {
        if self.run_id != run.id {
            *self = Sightings {
                run_id: run.id.clone(),
                ..Default::default()
            };
        }
        let turns = run.turns();
        self.turns.retain(|(t, _)| turns.contains(t));
    }

    /// When `turn` was first seen (now, if this is the first time).
    fn turn(&mut self, turn: &Turn, mono_ms: i64) -> i64 {
        if let Some((_, at)) = self.turns.iter().find(|(t, _)| t == turn) {
            return *at;
        }
        self.turns.push((turn.clone(), mono_ms));
        mono_ms
    }

    /// When the run's stop was first seen (now, if this is the first time).
    fn stop(&mut self, mono_ms: i64) -> i64 {
        *self.stop_ms.get_or_insert(mono_ms)
    }
}

/// Why the lifecycle asked to be called again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeReason {
    /// The node in turn counts as lost at this time unless something changes.
    TurnDeadline,
    /// A failed `helm rollback` is retried at this time.
    RetryRollback,
    /// helm could not say what the release is; it is asked again at this time.
    RetryReleaseRead,
    /// The driver's last reconcile failed (an API error); try again.
    RetryAfterError,
    /// The maintenance window holding the run opens at this time.
    WindowOpens,
}

impl WakeReason {
    /// Whether the wake is a time of day (unix ms) rather than the end of a duration
    /// (monotonic ms): only a maintenance window's opening is.
    pub fn on_wall_clock(self) -> bool {
        matches!(self, WakeReason::WindowOpens)
    }
}

/// "Call `reduce` again at this time even if nothing changes": unix ms when
/// [`WakeReason::on_wall_clock`], else monotonic ms (both on the coordinator's clocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    pub at_ms: i64,
    pub reason: WakeReason,
}

impl Wake {
    /// How long from `now` until the wake is due (zero when it is past), on its own clock.
    pub fn sleep_for(&self, now: Now) -> std::time::Duration {
        let from = if self.reason.on_wall_clock() {
            now.wall_ms
        } else {
            now.mono_ms
        };
        std::time::Duration::from_millis(
            u64::try_from(self.at_ms.saturating_sub(from)).unwrap_or(0),
        )
    }

    pub fn turn_deadline(at_ms: i64) -> Self {
        Wake {
            at_ms,
            reason: WakeReason::TurnDeadline,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish a Kubernetes Event (on the node when given, and on the trigger ConfigMap).
    Event {
        node: Option<String>,
        warning: bool,
        reason: &'static str,
        message: String,
    },
    /// Run `helm rollback <release> <recorded revision> --wait`, then set `release.rolled_back`.
    HelmRollback,
    /// The agent cannot report (lost): mark the node `failed` ourselves.
    MarkNodeFailed {
        node: String,
        kind: TurnKind,
        reason: String,
    },
    /// Read this Node directly (not from the watch) and observe it again with `read_at_ms`.
    ReadNode(String),
    /// Call `reduce` again at this time even if nothing changes.
    WakeAt(Wake),
}

fn event(node: Option<&str>, warning: bool, reason: &'static str, message: String) -> Effect {
    Effect::Event {
        node: node.map(str::to_string),
        warning,
        reason,
        message,
    }
}

/// Advances a run in phase Running or RollingBack (the turns) with the one upgrade Lease of
/// batch-size 1, for a caller with one clock that never steps (see [`Sightings::from_record`]);
/// `run_machine` calls [`reduce_waves`].
pub fn reduce(
    run: &mut RunRecord,
    observe: &dyn Fn(&str) -> ObservedNode,
    lease: &LeaseTrack,
    now: impl Into<Now>,
    timing: Timing,
) -> Vec<Effect> {
    let mut seen = Sightings::from_record(run);
    let leases = std::slice::from_ref(lease);
    reduce_waves(run, observe, leases, &mut seen, now.into(), timing)
}

/// Advances a run in phase Running or RollingBack: every turn in flight is checked against its
/// node and its slot's Lease (`leases[slot]`; a slot without a track is one nobody was seen to
/// hold), then free slots are filled (upgrade turns in plan order, or restore turns).
pub fn reduce_waves(
    run: &mut RunRecord,
    observe: &dyn Fn(&str) -> ObservedNode,
    leases: &[LeaseTrack],
    seen: &mut Sightings,
    now: Now,
    timing: Timing,
) -> Vec<Effect> {
    seen.tidy(run);
    let now_ms = now.wall_ms;
    let unseen = LeaseTrack::default();
    let lease_of = |slot: u32| leases.get(slot as usize).unwrap_or(&unseen);
    let mut effects = Vec::new();
    // Each pass either returns or makes progress (a turn ends, is granted or taken back, the
    // phase moves), so the loop is bounded by the number of nodes.
    for _ in 0..=(run.plan.len() * 4 + 8) {
        // What the turns still in flight ask for; only the last pass's count (earlier passes
        // saw a state that has since moved).
        let mut in_flight = Vec::new();
        let mut progressed = false;
        for turn in run.turns() {
            let watched = Watched {
                lease: lease_of(turn.slot),
                turn_seen_ms: seen.turn(&turn, now.mono_ms),
                stop_seen_ms: stopping(run).then(|| seen.stop(now.mono_ms)),
            };
            match check_turn(run, &turn, observe, watched, now, timing, &mut effects) {
                Check::Ended => progressed = true,
                Check::InFlight(fx) => in_flight.extend(fx),
            }
        }
        if progressed || fill_slots(run, observe, now_ms, &mut effects) {
            continue;
        }
        effects.extend(in_flight);
        return effects;
    }
    effects
}

/// What checking one turn in flight came to.
enum Check {
    /// The turn ended (or was taken back): its slot is free and the run may have moved on.
    Ended,
    /// Still going; these effects watch over it (a direct read, a wake-up at its deadline).
    InFlight(Vec<Effect>),
}

/// Whether the run stopped (a cancel, or a failure): no upgrade turn starts any more.
fn stopping(run: &RunRecord) -> bool {
    run.cancel_requested || run.phase == RunPhase::RollingBack
}

/// What this coordinator watched of one turn in flight, on its monotonic clock.
struct Watched<'a> {
    /// The Lease of the turn's slot.
    lease: &'a LeaseTrack,
    /// When this process first saw the turn (see [`Sightings`]).
    turn_seen_ms: i64,
    /// When this process first saw the run stop, if it stopped.
    stop_seen_ms: Option<i64>,
}

/// One turn in flight: has its node finished, failed, or been lost?
fn check_turn(
    run: &mut RunRecord,
    turn: &Turn,
    observe: &dyn Fn(&str) -> ObservedNode,
    watched: Watched<'_>,
    now: Now,
    timing: Timing,
    effects: &mut Vec<Effect>,
) -> Check {
    let now_ms = now.wall_ms;
    let lease = watched.lease;
    let obs = observe(&turn.node);
    let ours = obs.run_id.as_deref() == Some(run.id.as_str()) && obs.turn == Some(turn.kind);
    // No upgrade starts once the run stops (a cancel, or a failure elsewhere in the wave).
    let stopping = stopping(run);
    let stop_seen = watched.stop_seen_ms;
    // A node this run already saw in its upgrade turn (the record has its status) started,
    // whatever an older view of it delivered since says.
    let seen_started = run
        .nodes
        .get(&turn.node)
        .is_some_and(|r| r.status.is_some());
    if stopping
        && turn.kind == TurnKind::Upgrade
        && !ours
        && !seen_started
        && !lease.held_by(&turn.node)
    {
        // Not started, as far as we can see: take the turn back rather than let the node
        // begin, but only on a direct read made after the stop (the watch may not show yet
        // that the agent started).
        if obs
            .read_at_ms
            .is_some_and(|at| stop_seen.is_some_and(|since| at >= since))
        {
            let report = run.nodes.entry(turn.node.clone()).or_default();
            report.started_at_ms = None;
            run.end_turn(turn.slot);
            return Check::Ended;
        }
        return Check::InFlight(vec![Effect::ReadNode(turn.node.clone())]);
    }
    let report = run.nodes.entry(turn.node.clone()).or_default();
    // The evidence in short: its log tail and notes stay on the Node (the record stays bounded).
    if ours && obs.status.is_some() {
        report.status = obs.status;
        if let Some(e) = obs.evidence.as_ref().filter(|e| e.run_id == run.id) {
            report.evidence = Some(e.short());
        }
    }
    if !obs.exists {
        let reason = format!("node {} was deleted during its turn", turn.node);
        node_lost(run, turn, reason, now_ms, effects);
        return Check::Ended;
    }
    match (turn.kind, ours, obs.status) {
        (TurnKind::Upgrade, true, Some(NodeStatus::Completed)) => {
            report.finished_at_ms = Some(now_ms);
            run.end_turn(turn.slot);
            effects.push(event(
                Some(&turn.node),
                false,
                "NodeUpgraded",
                format!(
                    "node {} upgraded to {} and verified",
                    turn.node, run.target_version
                ),
            ));
            if run.phase == RunPhase::RollingBack {
                // It finished while the rest of its wave stopped: it is restored too.
                queue_for_restore(run, &turn.node);
            }
            return Check::Ended;
        }
        (TurnKind::Upgrade, true, Some(NodeStatus::RollingBack | NodeStatus::Failed))
            if stopping
                && obs.evidence.as_ref().is_some_and(|e| {
                    e.run_id == run.id && e.failure.as_ref().is_some_and(|f| f.reason == CANCELLED)
                }) =>
        {
            // The agent stopped its step because the run stopped: not a failure.
            report.finished_at_ms = Some(now_ms);
            if run.phase == RunPhase::Running {
                start_cancel(run, Some(turn), effects);
            } else {
                run.end_turn(turn.slot);
                queue_for_restore(run, &turn.node);
                effects.push(event(
                    Some(&turn.node),
                    true,
                    "NodeStopped",
                    format!(
                        "node {} stopped its upgrade at a safe point because the run is rolling back",
                        turn.node
                    ),
                ));
            }
            return Check::Ended;
        }
        (TurnKind::Upgrade, true, Some(NodeStatus::RollingBack | NodeStatus::Failed)) => {
            let evidence = obs.evidence.filter(|e| e.run_id == run.id);
            let reason = evidence
                .as_ref()
                .and_then(|e| e.failure.as_ref())
                .map(|f| {
                    format!(
                        "{} at {}: {}",
                        f.reason,
                        evidence.as_ref().map(|e| e.step.as_str()).unwrap_or("?"),
                        f.message
                    )
                })
                .unwrap_or_else(|| "the agent reported a failure".into());
            start_rollback(run, turn, reason, evidence, now_ms, effects);
            return Check::Ended;
        }
        (TurnKind::Restore, true, Some(s @ (NodeStatus::RolledBack | NodeStatus::Failed))) => {
            report.finished_at_ms = Some(now_ms);
            run.end_turn(turn.slot);
            effects.push(event(
                Some(&turn.node),
                s == NodeStatus::Failed,
                if s == NodeStatus::Failed {
                    "NodeRestoreFailed"
                } else {
                    "NodeRolledBack"
                },
                format!(
                    "node {} {}",
                    turn.node,
                    if s == NodeStatus::Failed {
                        "could not be restored; left cordoned for inspection"
                    } else {
                        "restored to the recorded revision and uncordoned"
                    }
                ),
            ));
            return Check::Ended;
        }
        _ => {}
    }
    // The turn is in flight: is its agent alive?
    let started = ours && obs.status.is_some_and(NodeStatus::is_in_progress);
    let (deadline, reason) = liveness_deadline(turn, watched.turn_seen_ms, started, lease, timing);
    // Loss is declared only on a direct read made after the deadline: the watch may still
    // hold a status the agent has since moved past.
    let confirmed = obs.read_at_ms.is_some_and(|at| at >= deadline);
    if now.mono_ms >= deadline && confirmed {
        node_lost(run, turn, reason, now_ms, effects);
        return Check::Ended;
    }
    let mut watch = Vec::new();
    let released_unread = started
        && !lease.held_by(&turn.node)
        && obs.read_at_ms.is_none_or(|at| at < lease.holder_since_ms);
    if now.mono_ms >= deadline || released_unread {
        // Deadline passed, or the agent let go of the Lease mid-turn (it writes its outcome
        // before releasing): look at the Node itself before deciding anything.
        watch.push(Effect::ReadNode(turn.node.clone()));
    }
    if now.mono_ms < deadline {
        watch.push(Effect::WakeAt(Wake::turn_deadline(deadline)));
    }
    Check::InFlight(watch)
}

/// Fills free slots once no turn changed: grants upgrade turns (or restore turns), starts the
/// cancel, or finishes the run. Returns whether anything changed.
fn fill_slots(
    run: &mut RunRecord,
    observe: &dyn Fn(&str) -> ObservedNode,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) -> bool {
    match run.phase {
        RunPhase::Running if run.cancel_requested => {
            // Turns in flight are taken back or stop first (see `check_turn`).
            if !run.turns().is_empty() {
                return false;
            }
            start_cancel(run, None, effects);
            true
        }
        // Paused: no new turn until `action=resume` (no wake needed: the resume is an
        // observation of its own).
        RunPhase::Running if run.paused => false,
        // Held by the grant gate (`run_machine` decides it before calling us and clears it
        // when the gate opens, which is an observation or a timer wake); turns in flight go on.
        RunPhase::Running if run.hold.is_some() => false,
        RunPhase::Running => {
            let mut granted = false;
            while let Some(slot) = upgrade_slot(run) {
                if next_upgrade(run, slot, observe, now_ms, effects).is_none() {
                    break;
                }
                granted = true;
            }
            if granted {
                return true;
            }
            if run.turns().is_empty() && next_upgrade_node(run).is_none() {
                finish_success(run, now_ms, effects);
                return true;
            }
            false
        }
        RunPhase::RollingBack => {
            // Upgrades still in flight end their step first; then the driver runs the helm
            // rollback; only then are nodes restored.
            if run.turns().iter().any(|t| t.kind == TurnKind::Upgrade)
                || !run.release.as_ref().is_some_and(|r| r.rolled_back)
            {
                return false;
            }
            let mut granted = false;
            while let Some(slot) = run.free_slot(run.wave_size()) {
                if next_restore(run, slot, observe, now_ms, effects).is_none() {
                    break;
                }
                granted = true;
            }
            if granted {
                return true;
            }
            if run.turns().is_empty() {
                finish_rollback(run, now_ms, effects);
                return true;
            }
            false
        }
        _ => false,
    }
}

/// The slot the next upgrade turn may take, if the wave has room: at most `batch-size` nodes
/// in progress, and only one until a first node completed when the run has a canary. The one
/// place an upgrade grant is allowed; a gate that holds grants belongs before it.
fn upgrade_slot(run: &RunRecord) -> Option<u32> {
    let size = run.wave_size();
    let canary = size > 1 && run.params.as_ref().is_some_and(|p| p.canary) && run.completed() == 0;
    let room = if canary { 1 } else { size };
    if run.turns().len() >= room {
        return None;
    }
    run.free_slot(size)
}

/// Puts a node whose upgrade turn ended after the run started rolling back into the restore
/// queue: after the nodes that failed or stopped, before the nodes completed earlier (the most
/// recent upgrade is undone first).
fn queue_for_restore(run: &mut RunRecord, node: &str) {
    if run.restore_queue.iter().any(|n| n == node) {
        return;
    }
    let pos = run
        .restore_queue
        .iter()
        .position(|n| run.nodes.get(n).and_then(|r| r.status) == Some(NodeStatus::Completed))
        .unwrap_or(run.restore_queue.len());
    run.restore_queue.insert(pos, node.to_string());
}

/// When the node in turn counts as lost if nothing changes (monotonic ms), and what the loss
/// would say. Once the agent holds the Lease, only the Lease decides (its duration plus a grace,
/// from when we last saw it renewed); otherwise it has the turn-start timeout to (re)take it,
/// counted from when we first saw the turn (`turn_seen`: its grant, for the leader that granted
/// it) or from when we saw it let go, whichever is later.
fn liveness_deadline(
    turn: &Turn,
    turn_seen: i64,
    started: bool,
    lease: &LeaseTrack,
    timing: Timing,
) -> (i64, String) {
    if lease.held_by(&turn.node) {
        return (
            lease.renew_seen_ms + lease.duration_ms + timing.expiry_grace_ms,
            format!(
                "the agent on {} stopped renewing the upgrade Lease (agent or node lost)",
                turn.node
            ),
        );
    }
    let deadline = turn_seen.max(lease.holder_since_ms) + timing.turn_start_timeout_ms;
    let reason = if started {
        format!(
            "the agent on {} let go of the upgrade Lease mid-turn and did not take it back within {}s (agent or node lost)",
            turn.node,
            timing.turn_start_timeout_ms / 1000
        )
    } else {
        format!(
            "the agent on {} did not take its turn within {}s; check that the agent pod runs on that node",
            turn.node,
            timing.turn_start_timeout_ms / 1000
        )
    };
    (deadline, reason)
}

/// The first planned node not yet done, skipped or in progress.
fn next_upgrade_node(run: &RunRecord) -> Option<String> {
    run.plan
        .iter()
        .find(|n| {
            run.turn_of(n).is_none()
                && run
                    .nodes
                    .get(*n)
                    .is_none_or(|r| r.status.is_none() && r.note.is_none())
        })
        .cloned()
}

/// Grants the next planned node an upgrade turn in `slot` (nodes deleted before their turn
/// are skipped); `None` when no node is left.
fn next_upgrade(
    run: &mut RunRecord,
    slot: u32,
    observe: &dyn Fn(&str) -> ObservedNode,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) -> Option<Turn> {
    while let Some(node) = next_upgrade_node(run) {
        let report = run.nodes.entry(node.clone()).or_default();
        if !observe(&node).exists {
            report.note = Some("node was deleted before its turn; skipped".into());
            effects.push(event(
                None,
                true,
                "NodeSkipped",
                format!("node {node} no longer exists; skipped (not upgraded)"),
            ));
            continue;
        }
        report.started_at_ms = Some(now_ms);
        let turn = Turn {
            node: node.clone(),
            kind: TurnKind::Upgrade,
            granted_at_ms: now_ms,
            slot,
        };
        let ordinal = run.completed() + run.turns().len() + 1;
        run.set_turn(turn.clone());
        effects.push(event(
            Some(&node),
            false,
            "TurnGranted",
            format!(
                "node {node}: upgrade to {} started ({} of {})",
                run.target_version,
                ordinal,
                run.plan.len()
            ),
        ));
        return Some(turn);
    }
    None
}

fn next_restore(
    run: &mut RunRecord,
    slot: u32,
    observe: &dyn Fn(&str) -> ObservedNode,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) -> Option<Turn> {
    while !run.restore_queue.is_empty() {
        let node = run.restore_queue.remove(0);
        if !observe(&node).exists {
            run.nodes.entry(node.clone()).or_default().note =
                Some("node was deleted; nothing to restore".into());
            continue;
        }
        let turn = Turn {
            node: node.clone(),
            kind: TurnKind::Restore,
            granted_at_ms: now_ms,
            slot,
        };
        run.set_turn(turn.clone());
        effects.push(event(
            Some(&node),
            true,
            "RestoreGranted",
            format!("node {node}: restoring kata-deploy to the recorded revision"),
        ));
        return Some(turn);
    }
    None
}

/// A node failed or was lost during its turn.
fn node_lost(
    run: &mut RunRecord,
    turn: &Turn,
    reason: String,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) {
    match turn.kind {
        TurnKind::Upgrade => {
            let report = run.nodes.entry(turn.node.clone()).or_default();
            report.status = Some(NodeStatus::Failed);
            report.finished_at_ms = Some(now_ms);
            effects.push(Effect::MarkNodeFailed {
                node: turn.node.clone(),
                kind: turn.kind,
                reason: reason.clone(),
            });
            // A lost node cannot restore itself; restore the others.
            start_rollback(run, turn, reason, None, now_ms, effects);
        }
        TurnKind::Restore => {
            let report = run.nodes.entry(turn.node.clone()).or_default();
            report.status = Some(NodeStatus::Failed);
            report.finished_at_ms = Some(now_ms);
            report.note = Some(reason.clone());
            run.end_turn(turn.slot);
            effects.push(Effect::MarkNodeFailed {
                node: turn.node.clone(),
                kind: turn.kind,
                reason: reason.clone(),
            });
            effects.push(event(Some(&turn.node), true, "NodeRestoreFailed", reason));
        }
    }
}

/// A node's upgrade turn failed. The first failure stops granting upgrade turns, rolls the
/// release back (once the rest of the wave ended its step) and restores the nodes this run
/// touched; a later failure in the same wave only joins the restore queue.
fn start_rollback(
    run: &mut RunRecord,
    turn: &Turn,
    reason: String,
    evidence: Option<Evidence>,
    now_ms: i64,
    effects: &mut Vec<Effect>,
) {
    let failed = turn.node.as_str();
    run.end_turn(turn.slot);
    let report = run.nodes.entry(failed.to_string()).or_default();
    report.finished_at_ms.get_or_insert(now_ms);
    if report.status.is_none() {
        report.status = Some(NodeStatus::Failed);
    }
    // A node marked `failed` (lost or deleted) has no agent to restore it.
    let restorable = report.status != Some(NodeStatus::Failed);
    effects.push(event(
        Some(failed),
        true,
        "NodeFailed",
        format!("node {failed} failed: {reason}"),
    ));
    if run.failure.is_none() {
        run.failure = Some(RunFailure {
            node: Some(failed.to_string()),
            reason: reason.clone(),
            evidence,
        });
    }
    if run.phase == RunPhase::RollingBack {
        if restorable {
            queue_for_restore(run, failed);
        }
        return;
    }
    run.phase = RunPhase::RollingBack;
    run.failed_at_ms = Some(now_ms);
    // The failed node first (if its agent is there to restore it), then the nodes this run
    // completed, most recent first. Nodes never reached are not touched; nodes still in
    // flight join the queue when their step ends.
    let mut queue = Vec::new();
    if restorable {
        queue.push(failed.to_string());
    }
    for node in run.plan.iter().rev() {
        if node != failed
            && run.nodes.get(node).and_then(|r| r.status) == Some(NodeStatus::Completed)
        {
            queue.push(node.clone());
        }
    }
    run.restore_queue = queue;
    run.message = format!("node {failed} failed: {reason}; rolling back");
    effects.push(Effect::HelmRollback);
}

/// The `reason` an agent's evidence carries when it stopped its step because the run was
/// cancelled, or because another node of its wave failed (contract with the agent).
pub const CANCELLED: &str = "Cancelled";

/// `action=cancel` with no node mid-procedure (or `stopped`, whose agent halted its step for the
/// cancel): roll back what this run did, the stopped node first. Other nodes of the wave still
/// in flight join the restore queue when their step ends.
fn start_cancel(run: &mut RunRecord, stopped: Option<&Turn>, effects: &mut Vec<Effect>) {
    run.phase = RunPhase::RollingBack;
    let stopped = stopped.map(|t| {
        run.end_turn(t.slot);
        t.node.as_str()
    });
    let mut queue: Vec<String> = stopped.map(str::to_string).into_iter().collect();
    queue.extend(
        run.plan
            .iter()
            .rev()
            .filter(|n| run.nodes.get(*n).and_then(|r| r.status) == Some(NodeStatus::Completed))
            .filter(|n| Some(n.as_str()) != stopped)
            .cloned(),
    );
    run.restore_queue = queue;
    run.message = format!(
        "cancelled after {} of {} node(s); rolling back",
        run.completed(),
        run.plan.len()
    );
    effects.push(event(None, true, "RunCancelling", run.message.clone()));
    effects.push(Effect::HelmRollback);
}

fn finish_success(run: &mut RunRecord, now_ms: i64, effects: &mut Vec<Effect>) {
    let skipped: Vec<&String> = run
        .plan
        .iter()
        .filter(|n| {
            run.nodes
                .get(*n)
                .is_some_and(|r| r.note.is_some() && r.status.is_none())
        })
        .collect();
    let mut msg = format!(
        "upgraded {} node(s) to {}",
        run.completed(),
        run.target_version
    );
    if !skipped.is_empty() {
        msg.push_str(&format!(
            "; skipped (deleted before their turn): {}",
            skipped
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    run.finish(RunPhase::Succeeded, msg.clone(), now_ms);
    effects.push(event(None, false, "RunSucceeded", msg));
}

fn finish_rollback(run: &mut RunRecord, now_ms: i64, effects: &mut Vec<Effect>) {
    let restored: Vec<String> = run
        .plan
        .iter()
        .filter(|n| run.nodes.get(*n).and_then(|r| r.status) == Some(NodeStatus::RolledBack))
        .cloned()
        .collect();
    let restored_text = if restored.is_empty() {
        "none".to_string()
    } else {
        restored.join(", ")
    };
    let release = run.release.clone().unwrap_or_default();
    match run.kind {
        RunKind::ManualRollback => {
            let node = run.plan.first().cloned().unwrap_or_default();
            let ok = restored.contains(&node);
            let msg = format!(
                "node {node} {} (release rolled back to revision {}, version {})",
                if ok {
                    "rolled back"
                } else {
                    "could not be rolled back"
                },
                release.recorded_revision,
                release.recorded_version
            );
            run.finish(
                if ok {
                    RunPhase::Succeeded
                } else {
                    RunPhase::Failed
                },
                msg.clone(),
                now_ms,
            );
            effects.push(event(None, !ok, "ManualRollbackFinished", msg));
        }
        RunKind::Upgrade if run.failure.is_none() && run.cancel_requested => {
            let msg = format!(
                "cancelled; release rolled back to revision {} ({}); restored: {}",
                release.recorded_revision, release.recorded_version, restored_text
            );
            run.finish(RunPhase::Cancelled, msg.clone(), now_ms);
            effects.push(event(None, true, "RunCancelled", msg));
        }
        RunKind::Upgrade => {
            let failure = run.failure.clone();
            let msg = format!(
                "node {} failed: {}; release rolled back to revision {} ({}); restored: {}",
                failure
                    .as_ref()
                    .and_then(|f| f.node.clone())
                    .unwrap_or_default(),
                failure.map(|f| f.reason).unwrap_or_default(),
                release.recorded_revision,
                release.recorded_version,
                restored_text
            );
            run.finish(RunPhase::Failed, msg.clone(), now_ms);
            effects.push(event(None, true, "RunFailed", msg));
        }
    }
}

#[cfg(test)]
mod tests;
