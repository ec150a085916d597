//! The fence a holder checks before every mutating call (agents before each step's writes, the
//! coordinator before each helm call and record write): judged on the local monotonic clock
//! from the moment each successful renewal was *sent*, so it lapses before the server-side
//! Lease can expire, and declared lost at once when a renewal or the watch sees another holder.
use super::acquire::NamedLease;
use super::model::{LeaseLost, view_of};
use crate::time::{mono_instant, mono_ms};
use klm_protocol::lease::Fence;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub(crate) struct FenceState {
    pub(crate) fence: Fence,
    pub(crate) lost: Option<String>,
}

/// Cheap, clonable view of the fence, for every mutating step.
#[derive(Clone)]
pub struct FenceGuard {
    pub(crate) rx: watch::Receiver<FenceState>,
    /// The Lease this fence guards, for [`FenceGuard::confirm`].
    pub(crate) lease: Option<NamedLease>,
}

impl FenceGuard {
    fn judge(state: &FenceState) -> Result<(), LeaseLost> {
        if let Some(reason) = &state.lost {
            return Err(LeaseLost(reason.clone()));
        }
        if !state.fence.is_valid(mono_ms()) {
            return Err(LeaseLost(format!(
                "no renewal confirmed for {} ms (Lease duration {} ms)",
                mono_ms().saturating_sub(state.fence.renewed_at_ms),
                state.fence.duration_ms
            )));
        }
        Ok(())
    }

    /// `Ok` while we hold the Lease (holder us, same transitions, confirmed recently enough).
    /// Call it right before every mutating API call.
    pub fn check(&self) -> Result<(), LeaseLost> {
        Self::judge(&self.rx.borrow())
    }

    /// The `leaseTransitions` value this hold is fenced on.
    pub fn transitions(&self) -> i32 {
        self.rx.borrow().fence.transitions
    }

    /// [`FenceGuard::check`], then a fresh read of the Lease: still held by us with the same
    /// `leaseTransitions`. For the mutations a stale holder must never make (deleting the node's
    /// kata-deploy pod): a holder paused after its last check finds out here, from the API,
    /// not from its own clock. `Err` only when the API could not be read.
    pub async fn confirm(&self) -> kube::Result<Result<(), LeaseLost>> {
        if let Err(lost) = self.check() {
            return Ok(Err(lost));
        }
        let Some(lease) = &self.lease else {
            return Ok(Ok(()));
        };
        let transitions = self.transitions();
        let verdict = match lease.api.get_opt(&lease.name).await? {
            None => Err(LeaseLost("the Lease was deleted".into())),
            Some(l) => {
                let v = view_of(&l);
                if v.holder.as_deref() == Some(lease.identity.as_str())
                    && v.transitions == transitions
                {
                    Ok(())
                } else {
                    Err(LeaseLost(format!(
                        "a fresh read shows it held by {:?} (leaseTransitions {transitions} -> {})",
                        v.holder.unwrap_or_default(),
                        v.transitions
                    )))
                }
            }
        };
        // The fence may have lapsed while we read.
        Ok(verdict.and_then(|()| self.check()))
    }

    /// Resolves when the Lease is lost: a renewal found another holder, or renewals could not
    /// be confirmed before the fence lapsed.
    pub async fn lost(&self) -> LeaseLost {
        let mut rx = self.rx.clone();
        loop {
            let lapse = {
                let state = rx.borrow_and_update();
                if let Err(lost) = Self::judge(&state) {
                    return lost;
                }
                let f = state.fence;
                mono_instant(
                    f.renewed_at_ms
                        .saturating_add(f.duration_ms - f.duration_ms / 10),
                )
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The renewer stopped; the fence lapses on its own.
                        tokio::time::sleep_until(lapse).await;
                    }
                }
                _ = tokio::time::sleep_until(lapse) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    fn guard(duration_ms: i64) -> (watch::Sender<FenceState>, FenceGuard) {
        let (tx, rx) = watch::channel(FenceState {
            fence: Fence {
                transitions: 1,
                renewed_at_ms: mono_ms(),
                duration_ms,
            },
            lost: None,
        });
        (tx, FenceGuard { rx, lease: None })
    }

    #[tokio::test]
    async fn fence_guard_lapses_without_renewals() {
        let (tx, guard) = guard(300);
        assert!(guard.check().is_ok());
        let started = Instant::now();
        let lost = guard.lost().await;
        // Valid for the duration minus a tenth: 270 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(260),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() <= Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
        assert!(lost.0.contains("no renewal confirmed"), "{lost}");
        assert!(guard.check().is_err());
        assert!(guard.confirm().await.unwrap().is_err());
        drop(tx);
    }

    #[tokio::test]
    async fn fence_guard_reports_a_declared_loss_at_once() {
        let (tx, guard) = guard(30_000);
        let waiter = tokio::spawn({
            let g = guard.clone();
            async move { g.lost().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A renewal moves the lapse forward...
        tx.send_modify(|s| s.fence.renewed_at_ms = mono_ms());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        // ...and a renewal that found another holder ends it immediately.
        tx.send_modify(|s| s.lost = Some("it is now held by \"n2\"".into()));
        let lost = waiter.await.unwrap();
        assert!(lost.0.contains("n2"));
        assert_eq!(guard.check(), Err(lost));
    }
}
