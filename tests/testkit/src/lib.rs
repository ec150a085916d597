//! End-to-end test support for kata-lifecycle-manager: a real control plane on loopback
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok — see
//! `tests/cluster/cluster.sh`), isolated slices of it per test, the fixture kata-deploy charts
//! in a loopback Helm repository, scenario control of verification pods, and the project's
//! binaries as child processes.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use klm_testkit::{Cluster, Outcome};
//! let slice = Cluster::shared().await.slice("upgrade-happy", 3).await;
//! slice.install_kata_deploy("kata-deploy", "3.27.0", &[]).await?;
//! slice.set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
//! let node = slice.node_name("node-1");
//! let agent = slice.spawn("klm-agent", &[], &[("NODE_NAME", &node)])?;
//! # Ok(()) }
//! ```
//!
//! Cluster lifetime: [`Cluster::shared`] starts one cluster per test binary (or attaches to the
//! one `KLM_KUBECONFIG` points at); its processes die with the test binary, however it ends.

mod cluster;
mod helm_gate;
pub mod kata_deploy_sim;
mod nodes;
pub mod paths;
mod process;
pub mod real_node;
mod slice;
pub mod upstream;
pub mod verification;
pub mod wait;

pub use cluster::{ApiServerOutage, Cluster};
pub use helm_gate::{HELM_GATE_JOB, HelmGate};
pub use kata_deploy_sim::{DispatchedJob, InstallOutcome};
pub use nodes::NOT_READY_LABEL;
pub use process::Proc;
pub use real_node::RealNode;
pub use slice::{SLICE_LABEL, Slice};
pub use verification::{ANY, Decision, FINISH_LABEL, OUTCOME_LABEL, Outcome, VERIFICATION_LABEL};
