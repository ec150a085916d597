//! Holding a Lease: [`HeldLease`] renews it in a background task every third of its duration
//! and publishes the [`FenceGuard`]. A renewal — or the watch kept on the Lease meanwhile —
//! that finds another holder or a different `leaseTransitions` declares the Lease lost; so do
//! renewals that keep failing until the fence lapses. The hold ends by [`HeldLease::release`]
//! (holder cleared), [`HeldLease::park`] (graceful shutdown mid-turn: held by the bare node name
//! for the node's next agent process) or [`HeldLease::keep`] (this process takes it again).
use super::acquire::NamedLease;
use super::fence::{FenceGuard, FenceState};
use super::model::{is_status, now_micro, parked_by, view_of};
use crate::retry;
use crate::time::{mono_instant, mono_ms};
use backon::{BackoffBuilder, Retryable};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use klm_protocol::lease::Fence;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watch_object};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// A Lease we hold, renewed in the background until released, parked, kept or dropped.
pub struct HeldLease {
    lease: NamedLease,
    fence: FenceGuard,
    stop: Option<oneshot::Sender<()>>,
    renewer: Option<JoinHandle<Lease>>,
    /// The holder whose expired hold this one replaced (another process), if any.
    pub(crate) taken_over_from: Option<String>,
}

impl HeldLease {
    pub(crate) fn start(lease: NamedLease, stored: Lease, fence: Fence) -> Self {
        let (tx, rx) = watch::channel(FenceState { fence, lost: None });
        let (stop_tx, stop_rx) = oneshot::channel();
        let renewer = tokio::spawn(renew_loop(lease.clone(), stored, tx, stop_rx));
        HeldLease {
            fence: FenceGuard {
                rx,
                lease: Some(lease.clone()),
            },
            lease,
            stop: Some(stop_tx),
            renewer: Some(renewer),
            taken_over_from: None,
        }
    }

    /// The holder whose expired hold this one replaced: another process (a crashed agent of
    /// the same node, or any holder that stopped renewing), not a free or parked Lease.
    pub fn taken_over_from(&self) -> Option<&str> {
        self.taken_over_from.as_deref()
    }

    pub fn fence(&self) -> FenceGuard {
        self.fence.clone()
    }

    /// Stops renewing (after any renewal in flight) and returns the last stored Lease.
    async fn stop_renewing(&mut self) -> Option<Lease> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.renewer.take() {
            Some(task) => task.await.ok(),
            None => None,
        }
    }

    /// The last stored Lease if we still hold it (`None`: lost, or gone).
    async fn still_held(&mut self) -> kube::Result<Option<Lease>> {
        let last = self.stop_renewing().await;
        let lost = self.fence.rx.borrow().lost.clone();
        if let Some(reason) = lost {
            debug!(lease = %self.lease.name, %reason, "not writing a Lease we no longer hold");
            return Ok(None);
        }
        match last {
            Some(l) => Ok(Some(l)),
            None => self.lease.api.get_opt(&self.lease.name).await,
        }
    }

    /// Ends the turn: stops renewing and clears the holder (if the Lease is still ours).
    pub async fn release(mut self) -> kube::Result<()> {
        let Some(lease) = self.still_held().await? else {
            return Ok(());
        };
        let me = self.lease.identity.clone();
        self.lease
            .clear_holder(lease, move |h| h == me)
            .await
            .map(|_| ())
    }

    /// Graceful shutdown mid-turn: stops renewing and parks the Lease on the bare node name
    /// (`klm_protocol::lease::parked`), so no other node can start while this one is half done
    /// and the node's next agent process takes it at once and resumes. Nobody renews a parked
    /// Lease: if no agent comes back, it expires and the coordinator fails the node. The write
    /// carries the read `resourceVersion`; if it fails the hold simply expires.
    pub async fn park(mut self) {
        let lease = match self.still_held().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                warn!(lease = %self.lease.name, error = %e, "could not park the Lease; it expires by itself");
                return;
            }
        };
        let body = parked_by(&lease, &self.lease.identity);
        match self
            .lease
            .api
            .replace(&self.lease.name, &PostParams::default(), &body)
            .await
        {
            Ok(_) => {
                info!(lease = %self.lease.name, "parked the Lease for this node's next agent process to resume the turn")
            }
            Err(e) => {
                warn!(lease = %self.lease.name, error = %e, "could not park the Lease; it expires by itself")
            }
        }
    }

    /// Stops renewing and leaves the holder as it is: this same process takes it again
    /// ([`NamedLease::acquire`] lets a holder re-take its own hold without a transition).
    pub async fn keep(mut self) {
        self.stop_renewing().await;
        debug!(lease = %self.lease.name, "keeping the Lease (not renewed) for this process to take again");
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Renews every third of the duration; declares the Lease lost when a renewal finds another
/// holder or other transitions, or when renewals keep failing until the fence lapses.
async fn renew_loop(
    lease: NamedLease,
    mut current: Lease,
    state: watch::Sender<FenceState>,
    mut stop: oneshot::Receiver<()>,
) -> Lease {
    let fence = state.borrow().fence;
    let period = (fence.duration_ms / 3).max(100);
    let mut next = mono_instant(fence.renewed_at_ms.saturating_add(period));
    let mut failures = retry::backoff(
        Duration::from_millis(100),
        Duration::from_millis(u64::try_from(period / 2).unwrap_or(1000)),
    )
    .build();
    // Watch the Lease while we hold it: a takeover (holder or leaseTransitions changed) is
    // noticed at once instead of at the next renewal.
    let mut events = watch_object(lease.api.clone(), &lease.name)
        .backoff(crate::retry::watch_backoff())
        .boxed();
    let lose = |reason: String| {
        warn!(lease = %lease.name, %reason, "lost the Lease");
        state.send_modify(|s| s.lost = Some(reason));
    };
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return current,
            ev = events.next() => {
                if let Some(reason) = takeover(ev, &lease.identity, fence.transitions) {
                    lose(reason);
                    return current;
                }
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let sent = mono_ms();
        match renew_once(&lease, &current, fence.transitions).await {
            Ok(stored) => {
                current = stored;
                failures = retry::backoff(
                    Duration::from_millis(100),
                    Duration::from_millis(u64::try_from(period / 2).unwrap_or(1000)),
                )
                .build();
                state.send_modify(|s| s.fence.renewed_at_ms = sent);
                next = mono_instant(sent.saturating_add(period));
                debug!(lease = %lease.name, "renewed the Lease");
            }
            Err(Renew::Lost(reason)) => {
                lose(reason);
                return current;
            }
            Err(Renew::Failed(e) | Renew::Conflict(e)) => {
                if !state.borrow().fence.is_valid(mono_ms()) {
                    lose(format!("could not renew it before it lapsed: {e}"));
                    return current;
                }
                let wait = failures.next().unwrap_or(Duration::from_secs(1));
                warn!(lease = %lease.name, error = %e, ?wait, "could not renew the Lease; retrying");
                next = Instant::now() + wait;
            }
        }
    }
}

/// A watch event that shows the Lease is no longer ours.
pub(crate) fn takeover(
    ev: Option<Result<Option<Lease>, watcher::Error>>,
    me: &str,
    transitions: i32,
) -> Option<String> {
    match ev {
        Some(Ok(Some(l))) => {
            let v = view_of(&l);
            (v.holder.as_deref() != Some(me) || v.transitions != transitions).then(|| {
                format!(
                    "it is now held by {:?} (leaseTransitions {} -> {})",
                    v.holder.unwrap_or_default(),
                    transitions,
                    v.transitions
                )
            })
        }
        Some(Ok(None)) => Some("the Lease was deleted".into()),
        _ => None,
    }
}

enum Renew {
    Lost(String),
    /// Someone wrote the Lease but it is still ours: retry on the fresh copy.
    Conflict(kube::Error),
    Failed(kube::Error),
}

/// One renewal: a `replace` of the last stored Lease with a new renewTime. A conflict re-reads
/// and, while the Lease is still ours, retries on the fresh copy (a couple of times).
async fn renew_once(lease: &NamedLease, current: &Lease, transitions: i32) -> Result<Lease, Renew> {
    let body = Mutex::new(current.clone());
    let attempt = || async {
        let mut next = body
            .lock()
            .map(|b| b.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        next.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(now_micro());
        match lease
            .api
            .replace(&lease.name, &PostParams::default(), &next)
            .await
        {
            Ok(stored) => Ok(stored),
            Err(e) if is_status(&e, 404) => Err(Renew::Lost("the Lease was deleted".into())),
            Err(e) if is_status(&e, 409) => {
                let fresh = match lease.api.get_opt(&lease.name).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Err(Renew::Lost("the Lease was deleted".into())),
                    Err(e) => return Err(Renew::Failed(e)),
                };
                let view = view_of(&fresh);
                if view.holder.as_deref() != Some(lease.identity.as_str())
                    || view.transitions != transitions
                {
                    return Err(Renew::Lost(format!(
                        "it is now held by {:?} (leaseTransitions {} -> {})",
                        view.holder.unwrap_or_default(),
                        transitions,
                        view.transitions
                    )));
                }
                if let Ok(mut b) = body.lock() {
                    *b = fresh;
                }
                Err(Renew::Conflict(e))
            }
            Err(e) => Err(Renew::Failed(e)),
        }
    };
    attempt
        .retry(
            retry::backoff(Duration::from_millis(10), Duration::from_millis(100)).with_max_times(2),
        )
        .sleep(tokio::time::sleep)
        .when(|e| matches!(e, Renew::Conflict(_)))
        .await
}

#[cfg(test)]
mod tests {
    use super::super::model::tests::lease;
    use super::*;

    #[test]
    fn takeovers_seen_on_the_watch() {
        let ev = |l: Lease| Some(Ok(Some(l)));
        assert_eq!(takeover(ev(lease(Some("n1/a"), 4)), "n1/a", 4), None);
        assert!(
            takeover(ev(lease(Some("n2/b"), 5)), "n1/a", 4)
                .unwrap()
                .contains("\"n2/b\"")
        );
        // Same holder but another transition: someone took it and we re-took it elsewhere.
        assert!(takeover(ev(lease(Some("n1/a"), 5)), "n1/a", 4).is_some());
        // Another process of our own node is not us.
        assert!(takeover(ev(lease(Some("n1/b"), 4)), "n1/a", 4).is_some());
        assert!(takeover(ev(lease(None, 4)), "n1/a", 4).is_some());
        // Deleted.
        assert!(takeover(Some(Ok(None)), "n1/a", 4).is_some());
        assert_eq!(takeover(None, "n1/a", 4), None);
    }
}
