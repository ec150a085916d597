//! Lease holding for both of the project's Leases: the upgrade Lease (`coordination.k8s.io/v1`,
//! at most one node in progress cluster-wide; held by `<node>/<instance>`) and the
//! coordinator's leader Lease (held by its pod name). The coordinator creates the upgrade Lease
//! and names the node whose turn it is; that node's agent takes it, renews it every third of its
//! duration while it works, and clears the holder when its turn's final status is written.
//!
//! - `model`: the Lease object ⇄ `klm_protocol::lease::LeaseView`, the monotonic clock, errors;
//! - `acquire`: [`NamedLease`] — waiting for and taking a Lease, re-taking a lapsed hold;
//! - `renew`: [`HeldLease`] — renewal in the background, release, park, keep;
//! - `fence`: [`FenceGuard`] — checked before every mutating call.
//!
//! The decisions (who may take it, expiry as seen by this reader, what to do after a lapse) are
//! pure, in `klm_protocol::lease`; this module is the I/O.
mod acquire;
mod fence;
mod model;
mod renew;

pub use acquire::{NamedLease, RetakeError, UpgradeLease};
pub use fence::FenceGuard;
pub use model::{LeaseLost, new_lease, parked_by, released, taken_by, transient, view_of};
pub use renew::HeldLease;
