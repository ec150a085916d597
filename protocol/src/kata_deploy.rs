//! What the project knows about kata-deploy's own versions, as pure facts a run acts on (the
//! upstream charts' differences are listed in `tests/README.md` and the README's compatibility
//! table).
use semver::Version;

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
