//! Node status values (the reference's names, in procedure order) and run phases.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The per-node status written to the Node's status label and annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStatus {
    Preparing,
    Cordoned,
    Draining,
    Upgrading,
    Verifying,
    Completed,
    RollingBack,
    RolledBack,
    /// The node could not even be restored; it is left cordoned for a human.
    Failed,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 9] = [
        NodeStatus::Preparing,
        NodeStatus::Cordoned,
        NodeStatus::Draining,
        NodeStatus::Upgrading,
        NodeStatus::Verifying,
        NodeStatus::Completed,
        NodeStatus::RollingBack,
        NodeStatus::RolledBack,
        NodeStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Preparing => "preparing",
            NodeStatus::Cordoned => "cordoned",
            NodeStatus::Draining => "draining",
            NodeStatus::Upgrading => "upgrading",
            NodeStatus::Verifying => "verifying",
            NodeStatus::Completed => "completed",
            NodeStatus::RollingBack => "rolling-back",
            NodeStatus::RolledBack => "rolled-back",
            NodeStatus::Failed => "failed",
        }
    }

    /// A node in one of these states is being worked on: at most one may exist at a time.
    pub fn is_in_progress(self) -> bool {
        !matches!(
            self,
            NodeStatus::Completed | NodeStatus::RolledBack | NodeStatus::Failed
        )
    }

    /// The node's turn is over (successfully or not).
    pub fn is_terminal(self) -> bool {
        !self.is_in_progress()
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown node status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for NodeStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The phase of a run, written to the trigger ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunPhase {
    /// Inputs accepted, release inspected, plan made; helm not yet called.
    Pending,
    /// `helm upgrade` issued; waiting for the DaemonSet to take the new template.
    Upgrading,
    /// Granting turns node by node.
    Running,
    /// A node failed: `helm rollback` to the recorded revision and restore turns.
    RollingBack,
    Succeeded,
    Failed,
    /// Stopped by `action=cancel`; what the run had done was rolled back.
    Cancelled,
}

impl RunPhase {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunPhase::Succeeded | RunPhase::Failed | RunPhase::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pending => "Pending",
            RunPhase::Upgrading => "Upgrading",
            RunPhase::Running => "Running",
            RunPhase::RollingBack => "RollingBack",
            RunPhase::Succeeded => "Succeeded",
            RunPhase::Failed => "Failed",
            RunPhase::Cancelled => "Cancelled",
        }
    }
}

impl fmt::Display for RunPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip_and_match_the_reference() {
        let names: Vec<_> = NodeStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "preparing",
                "cordoned",
                "draining",
                "upgrading",
                "verifying",
                "completed",
                "rolling-back",
                "rolled-back",
                "failed"
            ]
        );
        for s in NodeStatus::ALL {
            assert_eq!(s.as_str().parse::<NodeStatus>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("done".parse::<NodeStatus>().is_err());
    }

    #[test]
    fn only_final_states_are_terminal() {
        let terminal: Vec<_> = NodeStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                NodeStatus::Completed,
                NodeStatus::RolledBack,
                NodeStatus::Failed
            ]
        );
    }
}
