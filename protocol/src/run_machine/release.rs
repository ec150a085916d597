//! What helm says about the kata-deploy release, typed, and the pure decisions the run makes
//! from it: whether a trigger may start, whether an earlier `helm upgrade` is to be adopted or
//! undone, whether the rollback already happened.
use crate::kata_deploy::{self, DeploymentMode};
use crate::run::ReleaseState;

/// The chart a release must be built from: `helm upgrade <release> <kata-deploy chart>` on a
/// release of another chart (an umbrella chart with kata-deploy as a subchart) would strip it
/// of everything else.
pub const KATA_DEPLOY_CHART: &str = "kata-deploy";

/// Helm's release status (`helm get metadata` / `helm status`), typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseStatus {
    Deployed,
    Failed,
    PendingInstall,
    PendingUpgrade,
    PendingRollback,
    Superseded,
    Uninstalling,
    Uninstalled,
    Unknown(String),
}

impl ReleaseStatus {
    pub fn parse(s: &str) -> Self {
        match s {
            "deployed" => ReleaseStatus::Deployed,
            "failed" => ReleaseStatus::Failed,
            "pending-install" => ReleaseStatus::PendingInstall,
            "pending-upgrade" => ReleaseStatus::PendingUpgrade,
            "pending-rollback" => ReleaseStatus::PendingRollback,
            "superseded" => ReleaseStatus::Superseded,
            "uninstalling" => ReleaseStatus::Uninstalling,
            "uninstalled" => ReleaseStatus::Uninstalled,
            other => ReleaseStatus::Unknown(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ReleaseStatus::Deployed => "deployed",
            ReleaseStatus::Failed => "failed",
            ReleaseStatus::PendingInstall => "pending-install",
            ReleaseStatus::PendingUpgrade => "pending-upgrade",
            ReleaseStatus::PendingRollback => "pending-rollback",
            ReleaseStatus::Superseded => "superseded",
            ReleaseStatus::Uninstalling => "uninstalling",
            ReleaseStatus::Uninstalled => "uninstalled",
            ReleaseStatus::Unknown(s) => s,
        }
    }

    /// A helm operation was started and has not finished (or its process was killed).
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            ReleaseStatus::PendingInstall
                | ReleaseStatus::PendingUpgrade
                | ReleaseStatus::PendingRollback
        )
    }
}

impl std::fmt::Display for ReleaseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The latest revision of the release, as helm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseObservation {
    pub chart: String,
    pub version: String,
    pub revision: u32,
    pub status: ReleaseStatus,
    /// The release's `deploymentMode` value (`helm get values --all`); `None` when the chart
    /// has none (before 3.32.0) or it was not read.
    pub deployment_mode: Option<String>,
}

/// What a read of the release returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseRead {
    Found(ReleaseObservation),
    /// No such release in that namespace.
    NotFound,
    /// helm could not be asked (not installed, API error): the message says why.
    Error(String),
}

/// The kata-deploy DaemonSet once its controller observed the current template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetObservation {
    /// `controller-revision-hash` of the newest ControllerRevision.
    pub hash: String,
    /// `updateStrategy.type == OnDelete`.
    pub on_delete: bool,
}

/// Whether a new run may touch the release (before any change). `Err` is the reason to refuse.
pub fn admit_release(
    release: &ReleaseObservation,
    name: &str,
    namespace: &str,
) -> Result<(), String> {
    if release.chart != KATA_DEPLOY_CHART {
        return Err(format!(
            "release {namespace}/{name} is built from chart {:?}, not {KATA_DEPLOY_CHART:?}: upgrading it with the \
             kata-deploy chart would replace everything else it installs; point \
             lifecycle.katacontainers.io/helm-release at the kata-deploy release",
            release.chart
        ));
    }
    if release.status != ReleaseStatus::Deployed {
        return Err(format!(
            "release {namespace}/{name} is {:?} (revision {}), not deployed: another helm operation is running or failed; \
             resolve it (helm history / helm rollback) and trigger again",
            release.status.as_str(),
            release.revision
        ));
    }
    Ok(())
}

/// The mode a new run works in, or why it must not start (see `kata_deploy::resolve_mode`).
/// Checked before "already at the target": a refused mode is a mistake worth saying.
pub fn admit_mode(
    release: &ReleaseObservation,
    params: &crate::params::RunParams,
) -> Result<DeploymentMode, String> {
    let mode = kata_deploy::resolve_mode(
        params.deployment_mode,
        kata_deploy::ModeContext {
            release: &params.helm_release,
            namespace: &params.helm_namespace,
            recorded_version: &release.version,
            target_version: &params.target_version,
            release_value: release.deployment_mode.as_deref(),
        },
    )?;
    if mode == DeploymentMode::Job && params.wave_size() > 1 {
        // Each scoped upgrade re-renders the dispatcher for its own `job.nodes`: one helm call
        // per wave is needed, and until that is built a wave would be installed node by node
        // through overlapping releases. Refused rather than half done.
        return Err(format!(
            "batch-size {} is not supported in job mode yet (kata-deploy's per-node install Jobs \
             come from one scoped helm upgrade per node); run job-mode upgrades with batch-size 1",
            params.batch_size
        ));
    }
    Ok(mode)
}

/// What to do in phase `Upgrading`, given the latest release revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeStep {
    /// The release is still at the recorded revision and no upgrade was issued: issue it.
    Upgrade,
    /// Our upgrade produced this revision (deployed at the target version): adopt it.
    Adopt { revision: u32 },
    /// The release moved but not to a deployed revision of the target (helm killed mid-way,
    /// or a failed upgrade): roll back to the recorded revision.
    RollBack { reason: String },
    /// An upgrade was issued and the release never moved: nothing was changed, stop.
    Abandon { reason: String },
}

/// Decides the `Upgrading` phase from the record and a fresh read. `issued` says whether this
/// run already started a `helm upgrade` (persisted before the call): never a second one.
pub fn upgrade_step(
    recorded: &ReleaseState,
    target_version: &str,
    issued: bool,
    release: &ReleaseObservation,
) -> UpgradeStep {
    if release.revision > recorded.recorded_revision {
        if release.status == ReleaseStatus::Deployed && release.version == target_version {
            return UpgradeStep::Adopt {
                revision: release.revision,
            };
        }
        return UpgradeStep::RollBack {
            reason: format!(
                "the release is {} at revision {} (version {}), not a deployed {target_version}: \
                 a helm upgrade was interrupted or failed",
                release.status, release.revision, release.version
            ),
        };
    }
    if issued {
        return UpgradeStep::Abandon {
            reason: format!(
                "the helm upgrade to {target_version} was interrupted before it changed the release \
                 (still revision {}, {}); nothing was changed, trigger again",
                release.revision, release.status
            ),
        };
    }
    UpgradeStep::Upgrade
}

/// Helm refuses to upgrade a release left `pending-*` by a killed helm process; `helm rollback`
/// clears that state. Roll back to the run's own deployed upgrade when the pending revision came
/// after it (a killed restore): it has `OnDelete`, so no pod moves by itself before the restore
/// that follows. Otherwise the pending revision is the run's own killed upgrade, no node was
/// upgraded yet, and the recorded revision moves nothing either.
pub fn unpending_revision(recorded: &ReleaseState, pending: &ReleaseObservation) -> u32 {
    match recorded.upgraded_revision {
        Some(upgraded) if upgraded < pending.revision => upgraded,
        _ => recorded.recorded_revision,
    }
}

/// Whether the release already is where a rollback to the recorded revision puts it.
pub fn rolled_back(recorded: &ReleaseState, release: &ReleaseObservation) -> bool {
    if release.status != ReleaseStatus::Deployed || release.version != recorded.recorded_version {
        return false;
    }
    let moved_past = recorded
        .upgraded_revision
        .unwrap_or(recorded.recorded_revision);
    // Still at the recorded revision (helm never changed anything) or a newer revision made by
    // a rollback to it.
    release.revision == recorded.recorded_revision || release.revision > moved_past
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(revision: u32, version: &str, status: &str) -> ReleaseObservation {
        ReleaseObservation {
            chart: KATA_DEPLOY_CHART.into(),
            version: version.into(),
            revision,
            status: ReleaseStatus::parse(status),
            deployment_mode: None,
        }
    }

    fn recorded() -> ReleaseState {
        ReleaseState {
            recorded_revision: 3,
            recorded_version: "3.27.0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pending_release_is_unblocked_without_bringing_back_rolling_update() {
        // Killed during the run's own upgrade: nothing was upgraded, the recorded revision.
        let mut r = recorded();
        r.upgraded_revision = Some(4);
        assert_eq!(
            unpending_revision(&r, &obs(4, "3.28.0", "pending-upgrade")),
            3
        );
        assert_eq!(
            unpending_revision(&recorded(), &obs(4, "3.28.0", "pending-upgrade")),
            3
        );
        // Killed during the restore that followed the upgrade: the upgrade's own revision,
        // which has OnDelete.
        assert_eq!(
            unpending_revision(&r, &obs(5, "3.27.0", "pending-upgrade")),
            4
        );
        assert_eq!(
            unpending_revision(&r, &obs(5, "3.27.0", "pending-rollback")),
            4
        );
    }

    #[test]
    fn statuses_parse_and_print_back() {
        for s in [
            "deployed",
            "failed",
            "pending-install",
            "pending-upgrade",
            "pending-rollback",
            "superseded",
            "uninstalling",
            "uninstalled",
            "weird",
        ] {
            assert_eq!(ReleaseStatus::parse(s).as_str(), s);
        }
        assert!(ReleaseStatus::parse("pending-rollback").is_pending());
        assert!(!ReleaseStatus::parse("deployed").is_pending());
    }

    #[test]
    fn only_a_deployed_kata_deploy_release_is_admitted() {
        assert!(admit_release(&obs(3, "3.27.0", "deployed"), "kd", "ns").is_ok());
        let e = admit_release(&obs(3, "3.27.0", "pending-upgrade"), "kd", "ns").unwrap_err();
        assert!(
            e.contains("pending-upgrade") && e.contains("not deployed"),
            "{e}"
        );
        let mut umbrella = obs(3, "1.0.0", "deployed");
        umbrella.chart = "platform".into();
        let e = admit_release(&umbrella, "kd", "ns").unwrap_err();
        assert!(
            e.contains("\"platform\"") && e.contains("kata-deploy"),
            "{e}"
        );
    }

    #[test]
    fn upgrade_step_table() {
        let r = recorded();
        let t = "3.28.0";
        assert_eq!(
            upgrade_step(&r, t, false, &obs(3, "3.27.0", "deployed")),
            UpgradeStep::Upgrade
        );
        assert!(matches!(
            upgrade_step(&r, t, true, &obs(3, "3.27.0", "deployed")),
            UpgradeStep::Abandon { .. }
        ));
        // Adopt what the release history says, not recorded + 1.
        assert_eq!(
            upgrade_step(&r, t, true, &obs(5, t, "deployed")),
            UpgradeStep::Adopt { revision: 5 }
        );
        for status in ["pending-upgrade", "pending-rollback", "failed"] {
            assert!(
                matches!(
                    upgrade_step(&r, t, true, &obs(4, t, status)),
                    UpgradeStep::RollBack { .. }
                ),
                "{status}"
            );
        }
        assert!(matches!(
            upgrade_step(&r, t, true, &obs(4, "3.29.0", "deployed")),
            UpgradeStep::RollBack { .. }
        ));
    }

    #[test]
    fn rollback_is_recognised_from_the_release_history() {
        let mut r = recorded();
        assert!(rolled_back(&r, &obs(3, "3.27.0", "deployed")));
        r.upgraded_revision = Some(4);
        assert!(!rolled_back(&r, &obs(4, "3.28.0", "deployed")));
        assert!(!rolled_back(&r, &obs(5, "3.27.0", "pending-rollback")));
        assert!(rolled_back(&r, &obs(5, "3.27.0", "deployed")));
        // Interrupted upgrade, never adopted: anything deployed at the recorded version past
        // the recorded revision is the rollback.
        r.upgraded_revision = None;
        assert!(!rolled_back(&r, &obs(4, "3.28.0", "pending-upgrade")));
        assert!(rolled_back(&r, &obs(5, "3.27.0", "deployed")));
    }
}
