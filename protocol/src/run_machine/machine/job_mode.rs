//! Job mode (`deploymentMode: job`): no cluster-wide `helm upgrade` and no DaemonSet. The run
//! goes from `Pending` straight to its turns; when the node in turn waits for its install (its
//! agent cordoned and drained it and reports `upgrading`, or `rolling-back` in a restore turn),
//! the coordinator issues one scoped `helm upgrade --set job.nodes={node}` — decided by
//! [`crate::install::next_install`], recorded in the run before helm runs — and the agent judges
//! the install on its node. A rollback has no release-level step: each node an upgrade was
//! requested for gets a restore turn whose install is a scoped upgrade back to the recorded
//! version and values, so the release ends there too.
use super::*;
use crate::install::{InstallStep, ReleaseAt};
use crate::kata_deploy::DeploymentMode;
use crate::run::TurnKind;
use phases::missing_params;

impl Machine {
    pub(super) fn job_mode(&self) -> bool {
        self.state
            .run
            .as_ref()
            .and_then(|r| r.release.as_ref())
            .is_some_and(|r| r.mode == DeploymentMode::Job)
    }

    /// `Pending` → `Running` without touching anything: the first install is the first turn's.
    pub(super) fn start_job_mode(&mut self, p: &crate::params::RunParams) {
        let run = self.run_mut();
        run.message = format!(
            "job mode: installing {} node by node ({}), one scoped helm upgrade per node; {}",
            p.target_version,
            run.plan.join(", "),
            crate::params::describe(p)
        );
        let msg = format!("run {}: {}", run.id, run.message);
        run.phase = RunPhase::Running;
        self.event(None, false, "RunStarted", msg);
    }

    /// Nothing to undo at the release level: the restore turns' scoped upgrades put it back.
    pub(super) fn job_mode_rollback(&mut self) {
        let run = self.run_mut();
        let upgraded: Vec<String> = run.installs.upgraded_nodes().into_iter().collect();
        run.message = format!(
            "{}; job mode: restore turns reinstall {} on the nodes an install was requested for ({})",
            run.message,
            run.release
                .as_ref()
                .map(|r| r.recorded_version.clone())
                .unwrap_or_default(),
            if upgraded.is_empty() {
                "none".to_string()
            } else {
                upgraded.join(", ")
            }
        );
        if let Some(r) = run.release.as_mut() {
            r.rolled_back = true;
        }
    }

    /// The install for the node in turn, when its agent waits for one.
    pub(super) fn job_installs(&mut self) {
        let Some(run) = self.state.run.as_ref() else {
            return;
        };
        let Some(turn) = run.turn.clone() else {
            return;
        };
        let observed = self
            .nodes
            .as_ref()
            .and_then(|n| n.get(&turn.node))
            .map(|s| s.observed.clone())
            .unwrap_or_default();
        let waiting = observed.run_id.as_deref() == Some(run.id.as_str())
            && observed.turn == Some(turn.kind)
            && matches!(
                (turn.kind, observed.status),
                (TurnKind::Upgrade, Some(NodeStatus::Upgrading))
                    | (TurnKind::Restore, Some(NodeStatus::RollingBack))
            );
        if !waiting || self.awaiting.is_some() {
            return;
        }
        let p = run.params.clone().unwrap_or_else(missing_params);
        let recorded = run.release.clone().unwrap_or_default();
        let version = match turn.kind {
            TurnKind::Upgrade => p.target_version.clone(),
            TurnKind::Restore => recorded.recorded_version.clone(),
        };
        if run
            .installs
            .for_node(&turn.node, turn.kind)
            .is_some_and(|r| !r.is_open())
        {
            return; // decided; the agent judges its node
        }
        let helm_error = match self.helm.take() {
            Some(result) => {
                // Whatever helm said, decide from what the release now is.
                self.release = None;
                Some(result.err())
            }
            None => None,
        };
        if let Some(e) = helm_error {
            // Kept until the release was read (the field the daemonset upgrade uses the same way).
            self.upgrade_error = Some(e);
        }
        let rel = match self.release.take() {
            None => return self.read_release(),
            Some(ReleaseRead::Found(rel)) => rel,
            Some(ReleaseRead::NotFound) => {
                // No release, no dispatcher: no install Job will come.
                return self.install_failed(
                    &turn,
                    format!(
                        "release {}/{} disappeared",
                        p.helm_namespace, p.helm_release
                    ),
                    true,
                );
            }
            Some(ReleaseRead::Error(e)) => {
                return self.retry_later(format!("cannot read the release: {e}"));
            }
        };
        let at = ReleaseAt {
            revision: rel.revision,
            version: rel.version.clone(),
            deployed: rel.status == release::ReleaseStatus::Deployed,
        };
        let nodes: std::collections::BTreeSet<String> = [turn.node.clone()].into();
        let error = self.upgrade_error.take().flatten();
        let step = crate::install::next_install(
            &run.installs,
            &nodes,
            turn.kind,
            &version,
            &at,
            false,
            error.as_deref(),
        );
        match step {
            InstallStep::Issue(request) => {
                let id = run.id.clone();
                self.run_mut().installs.requests.push(request);
                self.persist();
                self.event(
                    Some(&turn.node),
                    turn.kind == TurnKind::Restore,
                    "InstallRequested",
                    format!(
                        "run {id}: helm upgrade to {version} scoped to {} (job.nodes)",
                        turn.node
                    ),
                );
                self.request(
                    Awaiting::Helm,
                    Effect::HelmInstall {
                        release: p.helm_release.clone(),
                        namespace: p.helm_namespace.clone(),
                        version,
                        nodes,
                        set_values: match turn.kind {
                            TurnKind::Upgrade => p.helm_set_values.clone(),
                            TurnKind::Restore => Vec::new(),
                        },
                        restore_values_of: (turn.kind == TurnKind::Restore)
                            .then_some(recorded.recorded_revision),
                    },
                );
            }
            InstallStep::Done { revision } => {
                let run = self.run_mut();
                if let Some(r) = run.installs.for_node_mut(&turn.node, turn.kind) {
                    r.revision = Some(revision);
                }
                if turn.kind == TurnKind::Upgrade
                    && let Some(rel) = run.release.as_mut()
                {
                    rel.upgraded_revision.get_or_insert(revision);
                }
            }
            InstallStep::Failed {
                reason,
                nothing_dispatched,
            } => self.install_failed(&turn, reason, nothing_dispatched),
            InstallStep::Wait => {}
        }
    }

    /// The scoped upgrade did not install: recorded, and said. When it may have dispatched
    /// anything, the node's agent sees its install Job fail and fails its step with that
    /// evidence. When it dispatched nothing (`nothing_dispatched`, see
    /// [`InstallStep::Failed`]), no Job will come and the agent would only time out: the node is
    /// marked failed now with the helm error as evidence and its Lease taken back, as for a lost
    /// node (the lifecycle then ends the turn from the Node's status; the node stays cordoned).
    fn install_failed(
        &mut self,
        turn: &crate::run::Turn,
        reason: String,
        nothing_dispatched: bool,
    ) {
        let run = self.run_mut();
        if let Some(r) = run.installs.for_node_mut(&turn.node, turn.kind) {
            r.failed = Some(reason.clone());
        }
        let id = run.id.clone();
        self.event(
            Some(&turn.node),
            true,
            "InstallFailed",
            format!("run {id}: {reason}"),
        );
        if !nothing_dispatched {
            return;
        }
        let evidence = Evidence {
            run_id: id,
            node: turn.node.clone(),
            step: "install".into(),
            succeeded: false,
            failure: Some(FailureCause {
                reason: "InstallFailed".into(),
                message: reason,
                exit_code: None,
            }),
            ..Default::default()
        };
        self.fx.push(Effect::MarkNodeFailed {
            node: turn.node.clone(),
            kind: turn.kind,
            evidence,
        });
        self.fx.push(Effect::RevokeLease {
            node: turn.node.clone(),
            slot: turn.slot,
        });
    }
}
