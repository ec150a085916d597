//! Taking a Lease: [`NamedLease::acquire`] waits on a **watch** of the Lease (plus a timer at the
//! holder's expiry as this process measures it), never a poll loop; a missing Lease (404) is
//! waited for the same way, since only the coordinator may create it. Taking it is a `replace`
//! carrying the read `resourceVersion`, so two takers cannot both win; a 409 re-reads after a
//! jittered backoff. Who may take it is `klm_protocol::lease::claim`; expiry is measured from
//! when this process saw the Lease change (`LeaseClock`), never from the holder's timestamps.
use super::model::{is_status, new_lease, released, taken_by, transient, view_of};
use super::renew::HeldLease;
use crate::retry;
use crate::time::mono_ms;
use backon::{BackoffBuilder, Retryable};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use klm_protocol::lease::{
    AfterLapse, Claim, Fence, LeaseClock, LeaseView, after_lapse, claim, holder_node,
};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watch_object};
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Handle on one named Lease for one holder identity: an agent's upgrade Lease
/// (`<node>/<instance>`) or the coordinator's leader Lease (its pod name).
#[derive(Clone)]
pub struct NamedLease {
    pub(crate) api: Api<Lease>,
    pub(crate) name: String,
    pub(crate) identity: String,
}

/// The upgrade Lease handle (the same client also serves the coordinator's leader election).
pub type UpgradeLease = NamedLease;

/// Why a lapsed hold could not be taken again.
#[derive(Debug, thiserror::Error)]
pub enum RetakeError {
    /// Nobody holds the Lease (or it does not exist yet): take it with [`NamedLease::acquire`].
    #[error("the Lease is free")]
    Free,
    #[error("{0}")]
    Lost(String),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

fn conflict_backoff() -> impl Iterator<Item = Duration> {
    retry::backoff(Duration::from_millis(50), Duration::from_secs(2)).build()
}

impl NamedLease {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Self {
        NamedLease {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The Lease as it is now (`None` when it does not exist).
    pub async fn view(&self) -> kube::Result<Option<LeaseView>> {
        Ok(self.api.get_opt(&self.name).await?.as_ref().map(view_of))
    }

    /// Creates the Lease if it does not exist (the coordinator's job; the agent has no `create`).
    pub async fn ensure_exists(&self, duration_seconds: i32) -> kube::Result<()> {
        match self
            .api
            .create(
                &PostParams::default(),
                &new_lease(&self.name, duration_seconds),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until the Lease may be taken ([`claim`]) and takes it.
    ///
    /// Waiting is a watch on the Lease plus a timer at the current holder's expiry. Cancel by
    /// dropping the future (callers `select!` it against "no longer our turn" and shutdown).
    /// Returns only API errors that retrying cannot fix (e.g. 403: RBAC is missing).
    pub async fn acquire(&self) -> kube::Result<HeldLease> {
        let mut events = watch_object(self.api.clone(), &self.name)
            .backoff(crate::retry::watch_backoff())
            .boxed();
        let mut clock = LeaseClock::default();
        // The latest object seen, and whether the watch has delivered it once.
        let mut latest: Option<Lease> = None;
        let mut listed = false;
        let mut conflicts = conflict_backoff();
        let mut said_waiting = String::new();
        loop {
            if let (true, Some(lease)) = (listed, &latest) {
                let view = view_of(lease);
                clock.observe(&view, mono_ms());
                match claim(&view, &clock, &self.identity, mono_ms()) {
                    Claim::Take => match self.take(lease).await {
                        Ok(held) => return Ok(held),
                        Err(e) if is_status(&e, 409) || is_status(&e, 404) || transient(&e) => {
                            // Lost a race (or a hiccup): back off, then re-read.
                            let wait = conflicts.next().unwrap_or(Duration::from_secs(2));
                            debug!(lease = %self.name, error = %e, ?wait, "could not take the Lease; re-reading");
                            tokio::time::sleep(wait).await;
                            match self.api.get_opt(&self.name).await {
                                Ok(l) => latest = l,
                                Err(e) if transient(&e) => {}
                                Err(e) => return Err(e),
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    },
                    Claim::WaitUntil(expiry) => {
                        let holder = view.holder.clone().unwrap_or_default();
                        let msg = format!("waiting for {holder} to release the Lease");
                        if said_waiting != msg {
                            info!(lease = %self.name, holder = %holder, "{msg}");
                            said_waiting = msg;
                        }
                        let wait = Duration::from_millis(
                            u64::try_from(expiry.saturating_sub(mono_ms()).saturating_add(20))
                                .unwrap_or(0),
                        );
                        tokio::select! {
                            ev = events.next() => {
                                apply_event(ev, &mut latest, &mut listed, &self.name);
                            }
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                }
            }
            if listed && latest.is_none() {
                let msg = format!(
                    "waiting for the coordinator to create the Lease {}",
                    self.name
                );
                if said_waiting != msg {
                    info!(lease = %self.name, "{msg}");
                    said_waiting = msg;
                }
            }
            let ev = events.next().await;
            apply_event(ev, &mut latest, &mut listed, &self.name);
        }
    }

    async fn take(&self, lease: &Lease) -> kube::Result<HeldLease> {
        let body = taken_by(lease, &self.identity);
        let view = view_of(&body);
        let sent = mono_ms();
        let stored = self
            .api
            .replace(&self.name, &PostParams::default(), &body)
            .await?;
        let fence = Fence {
            transitions: view.transitions,
            renewed_at_ms: sent,
            duration_ms: i64::from(view.duration_seconds) * 1000,
        };
        // `claim` let us take a Lease another process held only once its hold expired.
        let previous = view_of(lease)
            .holder
            .filter(|h| !h.is_empty() && *h != self.identity && h != holder_node(&self.identity));
        info!(lease = %self.name, holder = %self.identity, transitions = view.transitions, taken_over_from = ?previous, "took the Lease");
        let mut held = HeldLease::start(self.clone(), stored, fence);
        held.taken_over_from = previous;
        Ok(held)
    }

    /// After our hold lapsed (renewals failed, e.g. the API server was down): a fresh read, and
    /// the hold is taken again only if nobody touched it meanwhile; `Free` when nobody holds it
    /// (the caller then acquires it like any turn start) (holder us, `transitions`
    /// unchanged — `klm_protocol::lease::after_lapse`). The write carries the read
    /// `resourceVersion`, so a takeover racing with us wins and we get `Lost`.
    pub async fn retake(&self, transitions: i32) -> Result<HeldLease, RetakeError> {
        let lease = self.api.get_opt(&self.name).await?;
        match after_lapse(
            lease.as_ref().map(view_of).as_ref(),
            &self.identity,
            transitions,
        ) {
            AfterLapse::Lost(why) => Err(RetakeError::Lost(why)),
            AfterLapse::Acquire => Err(RetakeError::Free),
            AfterLapse::Retake => {
                let Some(lease) = lease else {
                    return Err(RetakeError::Free);
                };
                match self.take(&lease).await {
                    Ok(held) => Ok(held),
                    Err(e) if is_status(&e, 409) || is_status(&e, 404) => Err(RetakeError::Lost(
                        "the Lease changed while we took it again".into(),
                    )),
                    Err(e) => Err(RetakeError::Api(e)),
                }
            }
        }
    }

    /// Clears the holder if it is a process of `node` (the coordinator, declaring that node
    /// lost). The write carries the read `resourceVersion`. Returns whether it cleared anything.
    pub async fn revoke_from_node(&self, node: &str) -> kube::Result<bool> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let node = node.to_string();
        self.clear_holder(lease, move |h| holder_node(h) == node)
            .await
    }

    /// Clears the holder if it is a process of our node (ourselves, a parked hold, or an
    /// earlier process whose turn is over — e.g. stopped with SIGTERM after which the
    /// coordinator moved on). Returns whether it released anything.
    pub async fn release_if_held(&self) -> kube::Result<bool> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let node = holder_node(&self.identity).to_string();
        self.clear_holder(lease, move |h| holder_node(h) == node)
            .await
    }

    /// Clears the holder while `ours(holder)`; each write carries the read `resourceVersion`,
    /// and a conflict re-reads and decides again (bounded; the Lease expires by itself anyway).
    pub(crate) async fn clear_holder(
        &self,
        lease: Lease,
        ours: impl Fn(&str) -> bool,
    ) -> kube::Result<bool> {
        let known = Mutex::new(Some(lease));
        let attempt = || async {
            let cached = known.lock().map(|mut k| k.take()).unwrap_or(None);
            let lease = match cached {
                Some(l) => l,
                None => match self.api.get_opt(&self.name).await? {
                    Some(l) => l,
                    None => return Ok(false),
                },
            };
            if !view_of(&lease).holder.as_deref().is_some_and(&ours) {
                return Ok(false);
            }
            match self
                .api
                .replace(&self.name, &PostParams::default(), &released(&lease))
                .await
            {
                Ok(_) => {
                    info!(lease = %self.name, identity = %self.identity, "released the Lease");
                    Ok(true)
                }
                Err(e) if is_status(&e, 404) => Ok(false),
                Err(e) => Err(e),
            }
        };
        let result = attempt
            .retry(
                retry::backoff(Duration::from_millis(50), Duration::from_secs(2)).with_max_times(4),
            )
            .sleep(tokio::time::sleep)
            .when(|e: &kube::Error| is_status(e, 409) || transient(e))
            .await;
        match result {
            Err(e) if is_status(&e, 409) || transient(&e) => {
                warn!(lease = %self.name, error = %e, "could not clear the Lease; it will expire by itself");
                Ok(false)
            }
            other => other,
        }
    }
}

fn apply_event(
    ev: Option<Result<Option<Lease>, watcher::Error>>,
    latest: &mut Option<Lease>,
    listed: &mut bool,
    name: &str,
) {
    match ev {
        Some(Ok(lease)) => {
            *latest = lease;
            *listed = true;
        }
        Some(Err(e)) => {
            warn!(lease = %name, error = %e, "watch on the Lease failed; retrying")
        }
        None => {}
    }
}
