//! The contract between the kata-lifecycle-manager agent and coordinator: every user-facing
//! name, the run record they share through the trigger ConfigMap, and the pure decisions both
//! binaries drive (node procedure, run lifecycle, verification verdicts, Lease arithmetic).
//! Nothing here performs I/O, so every branch is unit-tested.

pub mod backoff;
pub mod drain;
pub mod drain_request;
pub mod duration;
pub mod grant;
pub mod grant_gate;
pub mod helm_values;
pub mod install;
pub mod kata_deploy;
pub mod keys;
pub mod lease;
pub mod lifecycle;
pub mod maintenance_window;
pub mod node_record;
pub mod params;
pub mod plan;
pub mod pod_policy;
pub mod procedure;
pub mod restart;
pub mod run;
pub mod run_machine;
pub mod selector;
pub mod status;
pub mod verification;

pub use run::{Evidence, RunRecord, Turn, TurnKind};
pub use status::{NodeStatus, RunPhase};
