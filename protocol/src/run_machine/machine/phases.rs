//! The run's phases: `Pending` → `Upgrading` → `Running` → finished, or `RollingBack`.
use super::*;

/// Wait before asking helm about the release again after it could not answer.
const RELEASE_READ_RETRY_MS: i64 = 5_000;

impl Machine {
    pub(super) fn advance(&mut self) {
        // Each pass either changes the phase (or the release's rolled-back flag) or stops.
        for _ in 0..8 {
            let Some(run) = self.state.run.as_ref() else {
                return;
            };
            let upgrades_in_flight =
                |r: &RunRecord| r.turns().iter().any(|t| t.kind == crate::TurnKind::Upgrade);
            let before = (
                run.phase,
                run.release.as_ref().map(|r| r.rolled_back),
                upgrades_in_flight(run),
            );
            match run.phase {
                RunPhase::Pending => self.pending(),
                RunPhase::Upgrading => self.upgrading(),
                // Waves: the nodes still in flight end their step before the release moves.
                RunPhase::RollingBack
                    if !run.release.as_ref().is_some_and(|r| r.rolled_back)
                        && !upgrades_in_flight(run) =>
                {
                    self.rollback()
                }
                RunPhase::Running | RunPhase::RollingBack => self.turns(),
                RunPhase::Succeeded | RunPhase::Failed | RunPhase::Cancelled => return,
            }
            self.count_requests();
            let run = self.state.run.as_ref().expect("run");
            if (
                run.phase,
                run.release.as_ref().map(|r| r.rolled_back),
                upgrades_in_flight(run),
            ) == before
            {
                return;
            }
        }
    }

    pub(super) fn run_mut(&mut self) -> &mut RunRecord {
        self.state.run.as_mut().expect("a run is active")
    }

    pub(super) fn request(&mut self, what: Awaiting, effect: Effect) {
        self.awaiting = Some(what);
        self.fx.push(effect);
    }

    pub(super) fn read_release(&mut self) {
        // Write-ahead: helm may take long to answer (or the coordinator may die while it does);
        // the run is visible as it stands before we wait on it.
        self.persist();
        let run = self.run_mut();
        let mode = run.release.is_none();
        let p = run.params.clone().unwrap_or_else(missing_params);
        self.request(
            Awaiting::Release,
            Effect::ReadRelease {
                release: p.helm_release,
                namespace: p.helm_namespace,
                mode,
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
        let Some(mut p) = run.params.clone() else {
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
        // Outside the maintenance window the run touches nothing, not even the release (a
        // chart that ignores OnDelete would restart every node at the helm upgrade): it reads
        // the release and plans when the window opens.
        if !have_release && self.gate(None) {
            return;
        }
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
            let mode = match release::admit_mode(&rel, &p) {
                Ok(mode) => mode,
                Err(e) => return self.finish(RunPhase::Failed, "RunRejected", e),
            };
            let facts: Vec<NodeFacts> = self
                .nodes
                .iter()
                .flat_map(|n| n.values())
                .map(|s| s.facts.clone())
                .collect();
            let hazards = crate::kata_deploy::hazards(&rel.version);
            let (drain, choice) = crate::kata_deploy::drain_decision(
                p.drain_chosen.then_some(p.drain_enabled),
                p.drain_enabled,
                &hazards,
            );
            if let Some(choice) = choice {
                p.drain_enabled = drain;
                for h in &hazards {
                    let w = h.warning(choice);
                    self.run_mut().warnings.push(w.clone());
                    self.event(None, true, "KataDeployHazard", w);
                }
            }
            let run = self.run_mut();
            run.params = Some(p.clone());
            run.plan = plan::select(&facts, &p);
            run.release = Some(ReleaseState {
                recorded_revision: rel.revision,
                recorded_version: rel.version.clone(),
                mode,
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
        if self.job_mode() {
            return self.start_job_mode(&p);
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
        if self.awaiting.is_some() || self.waiting_to_retry() {
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
                        set_values: p.helm_set_values.clone(),
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

    /// Asks the release again in a few seconds (helm or the API server is briefly unhappy).
    pub(super) fn retry_later(&mut self, msg: String) {
        let wake = Wake {
            at_ms: self.mono() + RELEASE_READ_RETRY_MS,
            reason: WakeReason::RetryReleaseRead,
        };
        self.retry_at = Some(wake);
        self.run_mut().message = format!("{msg}; retrying");
        self.fx.push(Effect::WakeAt(wake));
    }

    /// A retry is scheduled and its time has not come: ask to be woken then, do nothing now.
    fn waiting_to_retry(&mut self) -> bool {
        match self.retry_at {
            Some(w) if self.mono() < w.at_ms => {
                self.fx.push(Effect::WakeAt(w));
                true
            }
            _ => {
                self.retry_at = None;
                false
            }
        }
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
        if self.awaiting.is_some() || self.waiting_to_retry() {
            return;
        }
        if self.job_mode() {
            return self.job_mode_rollback();
        }
        let run = self.state.run.as_ref().expect("run");
        let p = run.params.clone().unwrap_or_else(missing_params);
        let recorded = run.release.clone().unwrap_or_default();
        if let Some(ds) = self.daemonset.take() {
            return self.restored_template_observed(ds, &p, &recorded);
        }
        if let Some(result) = self.helm.take() {
            return match result {
                Ok(()) => self.observe_restored_template(&p),
                Err(e) => self.rollback_failed(e, &p, &recorded),
            };
        }
        match self.release.take() {
            None => self.read_release(),
            Some(ReleaseRead::Found(rel)) if release::rolled_back(&recorded, &rel) => {
                self.observe_restored_template(&p)
            }
            Some(ReleaseRead::Found(rel)) => self.request(
                Awaiting::Helm,
                Effect::HelmRollback {
                    release: p.helm_release.clone(),
                    namespace: p.helm_namespace.clone(),
                    revision: recorded.recorded_revision,
                    version: recorded.recorded_version.clone(),
                    clear_pending: rel
                        .status
                        .is_pending()
                        .then(|| release::unpending_revision(&recorded, &rel)),
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

    /// The release is back at the recorded revision; before any restore turn deletes a pod,
    /// the DaemonSet controller must have observed the restored template
    /// (`observedGeneration`), or the pod it recreates could be at the upgraded revision — seen
    /// after an API server outage, when kube-controller-manager's informers were still
    /// reconnecting: the restore turn then failed and the node stayed cordoned.
    fn observe_restored_template(&mut self, p: &crate::params::RunParams) {
        self.request(
            Awaiting::DaemonSet,
            Effect::ReadDaemonSet {
                namespace: p.helm_namespace.clone(),
            },
        );
    }

    fn restored_template_observed(
        &mut self,
        ds: Result<DaemonSetObservation, String>,
        p: &crate::params::RunParams,
        recorded: &ReleaseState,
    ) {
        let id = self.run_mut().id.clone();
        match ds {
            Ok(ds) if ds.hash == recorded.old_hash => {}
            // Restore turns want the recorded revision; say why they will not find it.
            Ok(ds) => self.event(
                None,
                true,
                "RestoredTemplateDiffers",
                format!(
                    "run {id}: after the rollback the DaemonSet's revision is {}, not the recorded {}; restore turns wait for the recorded one",
                    ds.hash, recorded.old_hash
                ),
            ),
            // Restoring the nodes is still the best move; each restore turn reports what it sees.
            Err(e) => self.event(
                None,
                true,
                "RestoredTemplateNotObserved",
                format!("run {id}: could not confirm the DaemonSet observed the restored template: {e}"),
            ),
        }
        self.rolled_back(p, recorded);
    }

    fn rolled_back(&mut self, p: &crate::params::RunParams, recorded: &ReleaseState) {
        self.rollback_failures = 0;
        self.retry_at = None;
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
            let at = self.mono() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
            self.retry_at = Some(Wake {
                at_ms: at,
                reason: WakeReason::RetryRollback,
            });
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
        self.gate_next_upgrade_turn();
        let now = lifecycle::Now {
            wall_ms: self.now(),
            mono_ms: self.mono(),
        };
        let nodes = self.nodes.clone().unwrap_or_default();
        let observe = move |n: &str| nodes.get(n).map(|s| s.observed.clone()).unwrap_or_default();
        let slots = self.state.run.as_ref().map_or(1, |r| {
            // Slots in use may exceed the wave size only in a hand-edited record.
            let used = r.turns().iter().map(|t| t.slot as usize + 1).max();
            r.wave_size().max(used.unwrap_or(0))
        });
        let leases = self.lease_tracks(slots);
        let run = self.state.run.as_mut().expect("run");
        let turns_before = run.turns();
        let effects = lifecycle::reduce_waves(
            run,
            &observe,
            &leases,
            &mut self.sightings,
            now,
            self.cfg.timing,
        );
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
                        node: node.clone(),
                        kind,
                        evidence,
                    });
                    let slot = turns_before
                        .iter()
                        .find(|t| t.node == node)
                        .map_or(0, |t| t.slot);
                    self.fx.push(Effect::RevokeLease { node, slot });
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
        if self.job_mode() {
            self.job_installs();
        }
        self.ensure_slot_leases();
    }
}

impl Machine {
    /// Before the lifecycle may grant a new upgrade turn: the grant gate for the node next in
    /// the plan, recorded in `run.hold`, which the lifecycle honours when it would grant (also
    /// right after a turn in flight ends, in the same step). A turn in flight is never held: it
    /// finishes whatever the window says. Not asked while paused or cancelling, nor for restore
    /// turns (never held: the fleet goes back to one version first).
    fn gate_next_upgrade_turn(&mut self) {
        let run = self.state.run.as_ref().expect("run");
        if run.phase != RunPhase::Running || run.paused || run.cancel_requested {
            if let Some(r) = self.state.run.as_mut() {
                r.hold = None;
            }
            return;
        }
        let nodes = self.nodes.as_ref();
        let exists = |n: &str| {
            nodes
                .and_then(|m| m.get(n))
                .is_some_and(|s| s.observed.exists)
        };
        // The node `lifecycle` grants next: the first in the plan not done, skipped or started
        // (one that vanished is skipped there, not gated here).
        let candidate = run
            .plan
            .iter()
            .find(|n| {
                run.turn_of(n).is_none()
                    && run.nodes.get(*n).is_none_or(|r| {
                        r.status.is_none() && r.note.is_none() && r.started_at_ms.is_none()
                    })
                    && exists(n)
            })
            .cloned();
        match candidate {
            Some(node) => {
                self.gate(Some(node));
            }
            // Nothing left to grant: the lifecycle finishes the run.
            None => self.run_mut().hold = None,
        }
    }

    /// The grant gate for the run's start (`node` None) or `node`'s upgrade turn: records the
    /// hold (an Event when it changes, a wake at the window's opening) or lifts it. True while
    /// held.
    fn gate(&mut self, node: Option<String>) -> bool {
        let now = self.now();
        let run = self.state.run.as_ref().expect("run");
        let no_params;
        let p = match run.params.as_ref() {
            Some(p) => p,
            None => {
                no_params = missing_params();
                &no_params
            }
        };
        let window = p.window();
        let listed = self
            .blocking_pods
            .as_ref()
            .filter(|(selector, _)| *selector == p.blocking_pod_selector)
            .map(|(_, pods)| pods.as_slice());
        let pods = (!p.blocking_pod_selector.is_empty()).then_some(grant_gate::PodCheck {
            selector: &p.blocking_pod_selector,
            pods: listed,
        });
        let blocking_alerts = self.firing_alerts.as_ref().map(|polled| match polled {
            Ok(names) => Ok(p.blocking_alerts(names)),
            Err(e) => Err(e.as_str()),
        });
        let alerts = match (&blocking_alerts, p.alert_filter.is_empty()) {
            (_, true) => grant_gate::Alerts::NotGated,
            (None, false) => grant_gate::Alerts::NotAsked,
            (Some(Err(e)), false) => grant_gate::Alerts::Unreachable(e),
            (Some(Ok(names)), false) => grant_gate::Alerts::Firing(names),
        };
        let gate = grant_gate::decide(&window, node.as_deref(), pods, alerts, now);
        let run = self.run_mut();
        let id = run.id.clone();
        match gate {
            grant_gate::Gate::Open => {
                if run.hold.take().is_some() {
                    run.message = match &node {
                        Some(n) => format!("no longer held; node {n} is next"),
                        None => "no longer held; starting".into(),
                    };
                    let msg = format!("run {id}: {}", run.message);
                    self.event(node.as_deref(), false, "RunHoldLifted", msg);
                }
                false
            }
            grant_gate::Gate::Hold(hold) => {
                let wake = hold.until_ms.map(|at_ms| Wake {
                    at_ms,
                    reason: WakeReason::WindowOpens,
                });
                if run.hold.as_ref() != Some(&hold) {
                    run.message = hold.message.clone();
                    let msg = format!("run {id}: {}", hold.message);
                    run.hold = Some(hold);
                    self.event(node.as_deref(), false, "RunHeld", msg);
                }
                // Asked on every step while held: the driver sleeps until the earliest wake
                // of its last reconcile.
                self.fx.extend(wake.map(Effect::WakeAt));
                true
            }
        }
    }
}

/// Runs past `Pending` always carry validated parameters (a record without them is refused
/// before it leaves `Pending`); a hand-edited record that lost them gets empty ones and fails
/// at helm with a message rather than a panic.
pub(super) fn missing_params() -> crate::params::RunParams {
    crate::params::RunParams::default()
}
