//! What the project knows about kata-deploy's own versions, as pure facts a run acts on (the
//! upstream charts' differences are listed in `tests/README.md` and the README's compatibility
//! table).
use semver::Version;
use serde::{Deserialize, Serialize};

/// The first chart whose DaemonSet honours `updateStrategy.type` (earlier charts hard-code
/// `RollingUpdate`, so the DaemonSet controller replaces every node's pod at once and a run
/// cannot pace the update node by node).
pub const PACING_SINCE: Version = Version::new(3, 27, 0);
/// The first chart with `deploymentMode: job` (the dispatcher hook and `job.nodes`).
pub const JOB_MODE_SINCE: Version = Version::new(3, 32, 0);
/// The first chart whose readiness probe (`/readyz`) means "Kata is installed on the node";
/// before it a Ready pod may still be installing.
pub const READY_MEANS_INSTALLED_SINCE: Version = Version::new(3, 31, 0);

/// How kata-deploy installs Kata on the nodes (the chart value `deploymentMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentMode {
    /// A long-running DaemonSet pod per node; a run restarts it node by node (`OnDelete`).
    #[default]
    DaemonSet,
    /// A dispatcher hook creates one install Job per node listed in `job.nodes`; a run issues
    /// one scoped `helm upgrade` per node.
    Job,
}

impl DeploymentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentMode::DaemonSet => "daemonset",
            DeploymentMode::Job => "job",
        }
    }

    /// The chart value as `helm get values --all` reports it. Charts before 3.32.0 have no
    /// such value, and every chart renders a missing or empty one as `daemonset`.
    pub fn from_release_value(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim).unwrap_or_default() {
            "" | "daemonset" => Ok(DeploymentMode::DaemonSet),
            "job" => Ok(DeploymentMode::Job),
            other => Err(format!(
                "the release's deploymentMode value is {other:?}, which kata-deploy does not know (daemonset | job)"
            )),
        }
    }
}

impl std::fmt::Display for DeploymentMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `deployment-mode` a run asks for (recorded as the annotation's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RequestedMode {
    /// Whatever the release runs (its `deploymentMode` value).
    #[default]
    Auto,
    /// This mode, refused if the release runs the other one.
    Exactly(DeploymentMode),
}

impl RequestedMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" | "" => Ok(RequestedMode::Auto),
            "daemonset" => Ok(RequestedMode::Exactly(DeploymentMode::DaemonSet)),
            "job" => Ok(RequestedMode::Exactly(DeploymentMode::Job)),
            other => Err(format!("{other:?} is not a mode: auto, daemonset or job")),
        }
    }

    pub fn is_auto(&self) -> bool {
        *self == RequestedMode::Auto
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestedMode::Auto => "auto",
            RequestedMode::Exactly(m) => m.as_str(),
        }
    }
}

impl TryFrom<String> for RequestedMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        RequestedMode::parse(&s)
    }
}

impl From<RequestedMode> for String {
    fn from(m: RequestedMode) -> String {
        m.as_str().to_string()
    }
}

/// What the run knows of the release when it decides the mode.
#[derive(Debug, Clone, Copy)]
pub struct ModeContext<'a> {
    pub release: &'a str,
    pub namespace: &'a str,
    /// The deployed chart version (the run's recorded version).
    pub recorded_version: &'a str,
    pub target_version: &'a str,
    /// The release's `deploymentMode` value (`None`: not set).
    pub release_value: Option<&'a str>,
}

/// The mode a run works in, or why it must not start (nothing touched yet). A run never
/// switches the release's mode: that reinstalls Kata on every node at once (the DaemonSet goes
/// and the dispatcher installs everywhere, or the reverse), which is a migration, not an upgrade.
pub fn resolve_mode(
    requested: RequestedMode,
    cx: ModeContext<'_>,
) -> Result<DeploymentMode, String> {
    let live = DeploymentMode::from_release_value(cx.release_value)
        .map_err(|e| format!("release {}/{}: {e}", cx.namespace, cx.release))?;
    let mode = match requested {
        RequestedMode::Auto => live,
        RequestedMode::Exactly(asked) => asked,
    };
    // The versions first: "job mode needs 3.32.0" says more than "that is a mode switch".
    let (since, why) = match mode {
        DeploymentMode::DaemonSet => (
            PACING_SINCE,
            "daemonset mode is paced node by node only from 3.27.0 (earlier charts ignore updateStrategy and \
             replace every node's pod at once)",
        ),
        DeploymentMode::Job => (
            JOB_MODE_SINCE,
            "job mode (deploymentMode: job, job.nodes) exists only from chart 3.32.0",
        ),
    };
    for (which, version) in [
        ("deployed", cx.recorded_version),
        ("target", cx.target_version),
    ] {
        let parsed = Version::parse(version).map_err(|e| {
            format!(
                "release {}/{}: the {which} chart version {version:?} is not a version ({e}); cannot tell what it supports",
                cx.namespace, cx.release
            )
        })?;
        if parsed < since {
            return Err(format!(
                "the {which} kata-deploy version {version} is older than {since}: {why}; nothing was changed"
            ));
        }
    }
    if mode != live {
        return Err(format!(
            "release {ns}/{rel} runs kata-deploy in {live} mode and this run asked for deployment-mode={mode}: \
             a run does not switch modes (that reinstalls Kata on every node at once). Migrate first, outside a run: \
             `helm upgrade {rel} kata-deploy --version {ver} -n {ns} --reuse-values --set deploymentMode={mode}`, \
             then trigger again (deployment-mode=auto follows the release)",
            ns = cx.namespace,
            rel = cx.release,
            ver = cx.recorded_version,
        ));
    }
    Ok(mode)
}

/// Whether a Ready kata-deploy pod of `version` may still be installing, so that the
/// `katacontainers.io/kata-runtime=true` node label (set by kata-deploy once installed; every
/// chart's RuntimeClasses select on it) is what says the install finished.
pub fn ready_may_precede_install(version: &str) -> bool {
    Version::parse(version).is_ok_and(|v| v < READY_MEANS_INSTALLED_SINCE)
}

/// A hazard of the deployed kata-deploy version that changes how a run must treat its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hazard {
    /// 3.27.0 and 3.28.0: the pod's preStop hook removes Kata from the node on every restart, so
    /// restarting it (the upgrade step) disrupts the Kata pods running there.
    PreStopCleanup { from: String },
}

impl Hazard {
    /// The warning a run records and publishes.
    pub fn warning(&self, drained: DrainChoice) -> String {
        match self {
            Hazard::PreStopCleanup { from } => {
                let what = match drained {
                    DrainChoice::ByHazard => {
                        "so this run drains each node before restarting it (drain-enabled was not set; set \
                         lifecycle.katacontainers.io/drain-enabled=false to skip the drain)"
                    }
                    DrainChoice::User(true) => "each node is drained first (drain-enabled=true)",
                    DrainChoice::User(false) => {
                        "and drain-enabled=false was asked for: Kata pods on each node are disrupted when it restarts"
                    }
                };
                format!(
                    "kata-deploy {from} removes Kata from a node whenever its pod restarts (preStop cleanup, fixed in \
                     3.29.0), disrupting the Kata pods running there; {what}"
                )
            }
        }
    }
}

/// Who decided whether a run drains its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainChoice {
    /// The user said so (the `drain-enabled` annotation).
    User(bool),
    /// Not said per run: a hazard of the deployed version turned the drain on.
    ByHazard,
}

/// Hazards of upgrading *from* `deployed`. An unparsable version has none we know of.
pub fn hazards(deployed: &str) -> Vec<Hazard> {
    let Ok(v) = Version::parse(deployed) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if v >= Version::new(3, 27, 0) && v < Version::new(3, 29, 0) {
        out.push(Hazard::PreStopCleanup {
            from: deployed.to_string(),
        });
    }
    out
}

/// Whether a run drains its nodes: the user's per-run choice when given; otherwise on when a
/// hazard disrupts running Kata pods, else the chart default.
pub fn drain_decision(
    user_choice: Option<bool>,
    default: bool,
    hazards: &[Hazard],
) -> (bool, Option<DrainChoice>) {
    match user_choice {
        Some(v) => (v, Some(DrainChoice::User(v))),
        None if !default && !hazards.is_empty() => (true, Some(DrainChoice::ByHazard)),
        None => (default, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx<'a>(recorded: &'a str, target: &'a str, value: Option<&'a str>) -> ModeContext<'a> {
        ModeContext {
            release: "kd",
            namespace: "kube-system",
            recorded_version: recorded,
            target_version: target,
            release_value: value,
        }
    }

    #[test]
    fn auto_follows_the_release_and_a_missing_value_is_daemonset() {
        let auto = RequestedMode::Auto;
        assert_eq!(
            resolve_mode(auto, cx("3.29.0", "3.31.0", None)),
            Ok(DeploymentMode::DaemonSet)
        );
        assert_eq!(
            resolve_mode(auto, cx("3.32.0", "4.0.0", Some("daemonset"))),
            Ok(DeploymentMode::DaemonSet)
        );
        assert_eq!(
            resolve_mode(auto, cx("3.32.0", "4.0.0", Some("job"))),
            Ok(DeploymentMode::Job)
        );
        let e = resolve_mode(auto, cx("3.32.0", "4.0.0", Some("jobs"))).unwrap_err();
        assert!(
            e.contains("\"jobs\"") && e.contains("daemonset | job"),
            "{e}"
        );
    }

    #[test]
    fn an_explicit_mode_that_differs_from_the_release_is_refused_with_the_migration() {
        for (asked, live) in [
            (DeploymentMode::Job, Some("daemonset")),
            (DeploymentMode::Job, None),
            (DeploymentMode::DaemonSet, Some("job")),
        ] {
            let e = resolve_mode(RequestedMode::Exactly(asked), cx("3.32.0", "4.0.0", live))
                .unwrap_err();
            assert!(
                e.contains(&format!("deployment-mode={asked}"))
                    && e.contains(&format!(
                        "helm upgrade kd kata-deploy --version 3.32.0 -n kube-system --reuse-values --set deploymentMode={asked}"
                    )),
                "{e}"
            );
        }
        assert_eq!(
            resolve_mode(
                RequestedMode::Exactly(DeploymentMode::Job),
                cx("3.32.0", "4.0.0", Some("job"))
            ),
            Ok(DeploymentMode::Job)
        );
    }

    #[test]
    fn minimum_versions_per_mode() {
        // Daemonset pacing: both ends from 3.27.0.
        for (recorded, target) in [("3.26.0", "3.29.0"), ("3.27.0", "3.26.0")] {
            let e = resolve_mode(RequestedMode::Auto, cx(recorded, target, None)).unwrap_err();
            assert!(
                e.contains("older than 3.27.0") && e.contains("3.26.0"),
                "{e}"
            );
        }
        assert!(resolve_mode(RequestedMode::Auto, cx("3.27.0", "3.28.0", None)).is_ok());
        // Job mode: both ends from 3.32.0 (a job-mode release asked down to 3.31.0).
        let e = resolve_mode(RequestedMode::Auto, cx("3.32.0", "3.31.0", Some("job"))).unwrap_err();
        assert!(
            e.contains("target") && e.contains("older than 3.32.0"),
            "{e}"
        );
        let e = resolve_mode(
            RequestedMode::Exactly(DeploymentMode::Job),
            cx("3.31.0", "4.0.0", Some("job")),
        )
        .unwrap_err();
        assert!(e.contains("deployed kata-deploy version 3.31.0"), "{e}");
        let e = resolve_mode(RequestedMode::Auto, cx("weird", "4.0.0", None)).unwrap_err();
        assert!(e.contains("\"weird\" is not a version"), "{e}");
    }

    #[test]
    fn requested_modes_parse() {
        assert_eq!(RequestedMode::parse(" auto "), Ok(RequestedMode::Auto));
        assert_eq!(
            RequestedMode::parse("job"),
            Ok(RequestedMode::Exactly(DeploymentMode::Job))
        );
        assert!(
            RequestedMode::parse("Job")
                .unwrap_err()
                .contains("auto, daemonset or job")
        );
    }

    #[test]
    fn before_3_31_a_ready_pod_may_still_be_installing() {
        for v in ["3.27.0", "3.30.0"] {
            assert!(ready_may_precede_install(v), "{v}");
        }
        for v in ["3.31.0", "4.1.0", "garbage"] {
            assert!(!ready_may_precede_install(v), "{v}");
        }
    }

    #[test]
    fn only_3_27_and_3_28_clean_the_node_on_restart() {
        for v in ["3.27.0", "3.28.0", "3.28.5"] {
            assert_eq!(hazards(v).len(), 1, "{v}");
        }
        for v in ["3.26.0", "3.29.0", "3.31.0", "4.1.0", "not-a-version"] {
            assert!(hazards(v).is_empty(), "{v}");
        }
    }

    #[test]
    fn the_hazard_turns_the_drain_on_unless_the_user_chose() {
        let h = hazards("3.27.0");
        assert_eq!(
            drain_decision(None, false, &h),
            (true, Some(DrainChoice::ByHazard))
        );
        assert_eq!(
            drain_decision(Some(false), false, &h),
            (false, Some(DrainChoice::User(false)))
        );
        assert_eq!(drain_decision(None, true, &h), (true, None));
        assert_eq!(drain_decision(None, false, &[]), (false, None));
        let w = h[0].warning(DrainChoice::ByHazard);
        assert!(
            w.contains("3.27.0") && w.contains("drain-enabled=false"),
            "{w}"
        );
    }
}
