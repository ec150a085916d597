//! The upgrade Lease (`coordination.k8s.io/v1`): at most one node in progress, cluster-wide.
//!
//! The coordinator creates the Lease and names the node whose turn it is; that node's agent
//! takes it, renews it every third of its duration while it works, and clears the holder when
//! its turn's final status is written. This module is the I/O; the arithmetic (free/expired,
//! transitions, fence validity) is `klm_protocol::lease`.
//!
//! - [`UpgradeLease::acquire`] waits on a **watch** of the Lease (plus a timer at the holder's
//!   expiry), never a poll loop; a missing Lease (404) is waited for the same way, since only the
//!   coordinator may create it. Taking it is a `replace` carrying the read `resourceVersion`, so
//!   two takers cannot both win; a 409 re-reads after a jittered backoff.
//! - [`HeldLease`] renews in a background task and publishes a [`FenceGuard`]: every mutating
//!   step checks it first. The fence is judged on the local monotonic clock from the moment each
//!   successful renewal was *sent*, so it lapses before the server-side Lease can expire. A
//!   renewal that finds another holder or a different `leaseTransitions` declares the Lease lost.
//! - [`HeldLease::release`] clears the holder; [`HeldLease::keep`] stops renewing and leaves the
//!   holder in place (SIGTERM: the restarted agent re-takes its own Lease and resumes).
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use klm_protocol::backoff::jittered_with;
use klm_protocol::keys::defaults::LEASE_DURATION_SECONDS;
use klm_protocol::lease::{Fence, LeaseView};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Local monotonic milliseconds (since the first call in this process). Fences use this clock,
/// never the wall clock, so a clock step cannot extend a fence.
pub fn mono_ms() -> i64 {
    i64::try_from(epoch().elapsed().as_millis()).unwrap_or(i64::MAX)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn mono_instant(ms: i64) -> Instant {
    epoch() + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn wall_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What a Lease says, for the pure decisions (`renewTime`, else `acquireTime`, as the expiry
/// base; `leaseDurationSeconds` defaulting to 30).
pub fn view_of(lease: &Lease) -> LeaseView {
    let spec = lease.spec.as_ref();
    LeaseView {
        holder: spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        renew_ms: spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| t.0.as_millisecond()),
        duration_seconds: spec
            .and_then(|s| s.lease_duration_seconds)
            .filter(|d| *d > 0)
            .unwrap_or(LEASE_DURATION_SECONDS),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    }
}

/// The Lease as `who` takes it from `lease` (holder, times, duration kept, transitions counted).
pub fn taken_by(lease: &Lease, who: &str) -> Lease {
    let view = view_of(lease);
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    let now = now_micro();
    if view.holder.as_deref() != Some(who) || spec.acquire_time.is_none() {
        spec.acquire_time = Some(now.clone());
    }
    spec.holder_identity = Some(who.to_string());
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(view.duration_seconds);
    spec.lease_transitions = Some(view.transitions_after_acquire(who));
    next
}

/// The Lease with its holder cleared (duration and transitions kept).
pub fn released(lease: &Lease) -> Lease {
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    next
}

/// A new, free upgrade Lease (what the coordinator creates).
pub fn new_lease(name: &str, duration_seconds: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            lease_duration_seconds: Some(duration_seconds),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Jittered exponential backoff after a lost race (409) or a failed call.
fn backoff(attempt: u32) -> Duration {
    jittered_with(
        attempt,
        Duration::from_millis(50),
        Duration::from_secs(2),
        &mut rand::rng(),
    )
}

/// The Lease was lost (or could not be confirmed in time): stop mutating.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lost the upgrade Lease: {0}")]
pub struct LeaseLost(pub String);

/// Handle on the named upgrade Lease for one identity (the node name).
#[derive(Clone)]
pub struct UpgradeLease {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl UpgradeLease {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Self {
        UpgradeLease {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
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

    /// Waits until the Lease may be taken (free, expired, or already ours) and takes it.
    ///
    /// Waiting is a watch on the Lease plus a timer at the current holder's expiry. Cancel by
    /// dropping the future (callers `select!` it against "no longer our turn" and shutdown).
    /// Returns only API errors that retrying cannot fix (e.g. 403: RBAC is missing).
    pub async fn acquire(&self) -> kube::Result<HeldLease> {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(self.api.clone(), cfg).default_backoff().boxed();
        // The latest object seen, and whether the initial list has completed.
        let mut latest: Option<Lease> = None;
        let mut listing: Option<Option<Lease>> = None;
        let mut listed = false;
        let mut conflicts = 0u32;
        let mut said_waiting = String::new();
        loop {
            if listed {
                match &latest {
                    None => {
                        let msg = format!(
                            "waiting for the coordinator to create the upgrade Lease {}",
                            self.name
                        );
                        if said_waiting != msg {
                            info!(lease = %self.name, "{msg}");
                            said_waiting = msg;
                        }
                    }
                    Some(lease) => {
                        let view = view_of(lease);
                        let now = wall_ms();
                        if view.may_acquire(&self.identity, now) {
                            match self.take(lease).await {
                                Ok(held) => return Ok(held),
                                Err(e) if is_status(&e, 409) || is_status(&e, 404) => {
                                    // Lost a race: back off, then re-read.
                                    let wait = backoff(conflicts);
                                    conflicts += 1;
                                    debug!(lease = %self.name, ?wait, "Lease changed under us; re-reading");
                                    tokio::time::sleep(wait).await;
                                    latest = self.api.get_opt(&self.name).await?;
                                    continue;
                                }
                                Err(e) if transient(&e) => {
                                    let wait = backoff(conflicts.max(3));
                                    conflicts += 1;
                                    warn!(lease = %self.name, error = %e, ?wait, "could not take the upgrade Lease; retrying");
                                    tokio::time::sleep(wait).await;
                                    latest = self.api.get_opt(&self.name).await.unwrap_or(latest);
                                    continue;
                                }
                                Err(e) => return Err(e),
                            }
                        }
                        let holder = view.holder.clone().unwrap_or_default();
                        let msg = format!("waiting for {holder} to release the upgrade Lease");
                        if said_waiting != msg {
                            info!(lease = %self.name, holder = %holder, "{msg}");
                            said_waiting = msg;
                        }
                        // Held by someone else: wake on the next change or at its expiry.
                        let expiry = view.expires_at_ms().unwrap_or(now) - now + 20;
                        let timer = tokio::time::sleep(Duration::from_millis(
                            u64::try_from(expiry.max(0)).unwrap_or(0),
                        ));
                        tokio::select! {
                            ev = events.next() => {
                                apply_event(ev, &mut latest, &mut listing, &mut listed, &self.name);
                            }
                            _ = timer => {}
                        }
                        continue;
                    }
                }
            }
            let ev = events.next().await;
            apply_event(ev, &mut latest, &mut listing, &mut listed, &self.name);
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
        info!(lease = %self.name, holder = %self.identity, transitions = view.transitions, "took the upgrade Lease");
        Ok(HeldLease::start(self.clone(), stored, fence))
    }

    /// Clears the holder if it is us: a hold left by a previous process of this agent whose turn
    /// is over (e.g. it was stopped with SIGTERM and the coordinator moved on). Returns whether
    /// it released anything.
    pub async fn release_if_held(&self) -> kube::Result<bool> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        self.clear_holder(lease).await
    }

    async fn clear_holder(&self, mut lease: Lease) -> kube::Result<bool> {
        for attempt in 0..5 {
            if view_of(&lease).holder.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            match self
                .api
                .replace(&self.name, &PostParams::default(), &released(&lease))
                .await
            {
                Ok(_) => {
                    info!(lease = %self.name, holder = %self.identity, "released the upgrade Lease");
                    return Ok(true);
                }
                Err(e) if is_status(&e, 404) => return Ok(false),
                Err(e) if is_status(&e, 409) || transient(&e) => {
                    tokio::time::sleep(backoff(attempt)).await;
                    match self.api.get_opt(&self.name).await? {
                        Some(fresh) => lease = fresh,
                        None => return Ok(false),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        // Still ours after repeated conflicts: it expires on its own within its duration.
        warn!(lease = %self.name, "could not clear the upgrade Lease; it will expire by itself");
        Ok(false)
    }
}

fn apply_event(
    ev: Option<Result<watcher::Event<Lease>, watcher::Error>>,
    latest: &mut Option<Lease>,
    listing: &mut Option<Option<Lease>>,
    listed: &mut bool,
    name: &str,
) {
    match ev {
        Some(Ok(watcher::Event::Init)) => *listing = Some(None),
        Some(Ok(watcher::Event::InitApply(l))) => *listing = Some(Some(l)),
        Some(Ok(watcher::Event::InitDone)) => {
            *latest = listing.take().flatten();
            *listed = true;
        }
        Some(Ok(watcher::Event::Apply(l))) => *latest = Some(l),
        Some(Ok(watcher::Event::Delete(_))) => *latest = None,
        Some(Err(e)) => {
            warn!(lease = %name, error = %e, "watch on the upgrade Lease failed; retrying")
        }
        None => {}
    }
}

/// Network trouble, throttling or a server error: worth retrying.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 408 | 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

#[derive(Debug, Clone)]
struct FenceState {
    fence: Fence,
    lost: Option<String>,
}

/// Cheap, clonable view of the fence, for every mutating step.
#[derive(Clone)]
pub struct FenceGuard {
    rx: watch::Receiver<FenceState>,
}

impl FenceGuard {
    fn judge(state: &FenceState) -> Result<(), LeaseLost> {
        if let Some(reason) = &state.lost {
            return Err(LeaseLost(reason.clone()));
        }
        if !state.fence.is_valid(mono_ms()) {
            return Err(LeaseLost(format!(
                "no renewal confirmed for {} ms (Lease duration {} ms)",
                mono_ms() - state.fence.renewed_at_ms,
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
                mono_instant(f.renewed_at_ms + f.duration_ms - f.duration_ms / 10)
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

/// A Lease we hold, renewed in the background until released, kept or dropped.
pub struct HeldLease {
    lease: UpgradeLease,
    fence: FenceGuard,
    stop: Option<oneshot::Sender<()>>,
    renewer: Option<JoinHandle<Lease>>,
}

impl HeldLease {
    fn start(lease: UpgradeLease, stored: Lease, fence: Fence) -> Self {
        let (tx, rx) = watch::channel(FenceState { fence, lost: None });
        let (stop_tx, stop_rx) = oneshot::channel();
        let renewer = tokio::spawn(renew_loop(lease.clone(), stored, tx, stop_rx));
        HeldLease {
            lease,
            fence: FenceGuard { rx },
            stop: Some(stop_tx),
            renewer: Some(renewer),
        }
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

    /// Ends the turn: stops renewing and clears the holder (if the Lease is still ours).
    pub async fn release(mut self) -> kube::Result<()> {
        let last = self.stop_renewing().await;
        let lost = self.fence.rx.borrow().lost.clone();
        if let Some(reason) = lost {
            debug!(lease = %self.lease.name, %reason, "not releasing a Lease we no longer hold");
            return Ok(());
        }
        let lease = match last {
            Some(l) => l,
            None => match self.lease.api.get_opt(&self.lease.name).await? {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        self.lease.clear_holder(lease).await.map(|_| ())
    }

    /// Stops renewing and deliberately leaves the holder in place (graceful shutdown
    /// mid-procedure): no other node can start while this node is half done, and the restarted
    /// agent re-takes its own Lease (`may_acquire` is true for the holder) and resumes.
    pub async fn keep(mut self) {
        self.stop_renewing().await;
        info!(lease = %self.lease.name, "keeping the upgrade Lease (not renewed) for the restarted agent to resume");
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
    lease: UpgradeLease,
    mut current: Lease,
    state: watch::Sender<FenceState>,
    mut stop: oneshot::Receiver<()>,
) -> Lease {
    let fence = state.borrow().fence;
    let period = (fence.duration_ms / 3).max(100);
    let mut next = mono_instant(fence.renewed_at_ms + period);
    let mut failures = 0u32;
    // Watch the Lease while we hold it: a takeover (holder or leaseTransitions changed) is
    // noticed at once instead of at the next renewal.
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", lease.name));
    let mut events = watcher(lease.api.clone(), cfg).default_backoff().boxed();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return current,
            ev = events.next() => {
                if let Some(reason) = takeover(ev, &lease.identity, fence.transitions) {
                    warn!(lease = %lease.name, %reason, "lost the upgrade Lease");
                    state.send_modify(|s| s.lost = Some(reason));
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
                failures = 0;
                state.send_modify(|s| s.fence.renewed_at_ms = sent);
                next = mono_instant(sent + period);
                debug!(lease = %lease.name, "renewed the upgrade Lease");
            }
            Err(Renew::Lost(reason)) => {
                warn!(lease = %lease.name, %reason, "lost the upgrade Lease");
                state.send_modify(|s| s.lost = Some(reason));
                return current;
            }
            Err(Renew::Failed(e)) => {
                let valid = state.borrow().fence.is_valid(mono_ms());
                if !valid {
                    let reason = format!("could not renew it before it lapsed: {e}");
                    warn!(lease = %lease.name, %reason, "lost the upgrade Lease");
                    state.send_modify(|s| s.lost = Some(reason));
                    return current;
                }
                let wait = backoff(failures + 2).min(Duration::from_millis(
                    u64::try_from(period / 2).unwrap_or(1000),
                ));
                failures += 1;
                warn!(lease = %lease.name, error = %e, ?wait, "could not renew the upgrade Lease; retrying");
                next = Instant::now() + wait;
            }
        }
    }
}

/// A watch event that shows the Lease is no longer ours.
fn takeover(
    ev: Option<Result<watcher::Event<Lease>, watcher::Error>>,
    me: &str,
    transitions: i32,
) -> Option<String> {
    match ev {
        Some(Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l))) => {
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
        Some(Ok(watcher::Event::Delete(_))) => Some("the Lease was deleted".into()),
        _ => None,
    }
}

enum Renew {
    Lost(String),
    Failed(kube::Error),
}

async fn renew_once(
    lease: &UpgradeLease,
    current: &Lease,
    transitions: i32,
) -> Result<Lease, Renew> {
    let mut body = current.clone();
    for _ in 0..3 {
        let mut next = body.clone();
        next.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(now_micro());
        match lease
            .api
            .replace(&lease.name, &PostParams::default(), &next)
            .await
        {
            Ok(stored) => return Ok(stored),
            Err(e) if is_status(&e, 404) => {
                return Err(Renew::Lost("the Lease was deleted".into()));
            }
            Err(e) if is_status(&e, 409) => {
                // Someone wrote the Lease: still ours (same holder, same transitions)?
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
                body = fresh;
            }
            Err(e) => return Err(Renew::Failed(e)),
        }
    }
    Err(Renew::Failed(kube::Error::Api(
        kube::core::Status::failure("repeated conflicts while renewing", "Conflict")
            .with_code(409)
            .boxed(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, transitions: i32) -> Lease {
        let mut l = new_lease("up", 30);
        let spec = l.spec.as_mut().unwrap();
        spec.holder_identity = holder.map(str::to_string);
        spec.lease_transitions = Some(transitions);
        if holder.is_some() {
            spec.renew_time = Some(now_micro());
            spec.acquire_time = Some(MicroTime(jiff::Timestamp::UNIX_EPOCH));
        }
        l
    }

    #[test]
    fn taking_counts_transitions_and_keeps_duration() {
        let free = lease(None, 3);
        let taken = taken_by(&free, "n1");
        let v = view_of(&taken);
        assert_eq!(v.holder.as_deref(), Some("n1"));
        assert_eq!(v.transitions, 4);
        assert_eq!(v.duration_seconds, 30);
        assert!(taken.spec.as_ref().unwrap().acquire_time.is_some());

        // Re-taking our own Lease (a restarted agent) is not a transition and keeps acquireTime.
        let ours = lease(Some("n1"), 7);
        let again = taken_by(&ours, "n1");
        assert_eq!(view_of(&again).transitions, 7);
        assert_eq!(
            again.spec.as_ref().unwrap().acquire_time,
            ours.spec.as_ref().unwrap().acquire_time
        );
    }

    #[test]
    fn releasing_clears_only_the_holder() {
        let r = released(&lease(Some("n1"), 2));
        let v = view_of(&r);
        assert_eq!(v.holder, None);
        assert_eq!(v.transitions, 2);
        assert!(v.is_free(0));
    }

    #[test]
    fn view_defaults() {
        let mut l = new_lease("up", 0);
        l.spec.as_mut().unwrap().holder_identity = Some(String::new());
        let v = view_of(&l);
        assert_eq!(v.duration_seconds, LEASE_DURATION_SECONDS);
        assert_eq!(v.holder, None);
        assert_eq!(view_of(&Lease::default()).transitions, 0);
    }

    #[tokio::test]
    async fn fence_guard_lapses_without_renewals() {
        let (tx, rx) = watch::channel(FenceState {
            fence: Fence {
                transitions: 1,
                renewed_at_ms: mono_ms(),
                duration_ms: 300,
            },
            lost: None,
        });
        let guard = FenceGuard { rx };
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
        drop(tx);
    }

    #[tokio::test]
    async fn fence_guard_reports_a_declared_loss_at_once() {
        let (tx, rx) = watch::channel(FenceState {
            fence: Fence {
                transitions: 1,
                renewed_at_ms: mono_ms(),
                duration_ms: 30_000,
            },
            lost: None,
        });
        let guard = FenceGuard { rx };
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

    #[test]
    fn takeovers_seen_on_the_watch() {
        let ev = |l: Lease| Some(Ok(watcher::Event::Apply(l)));
        assert_eq!(takeover(ev(lease(Some("n1"), 4)), "n1", 4), None);
        assert!(
            takeover(ev(lease(Some("n2"), 5)), "n1", 4)
                .unwrap()
                .contains("\"n2\"")
        );
        // Same holder but another transition: someone took it and we re-took it elsewhere.
        assert!(takeover(ev(lease(Some("n1"), 5)), "n1", 4).is_some());
        assert!(takeover(ev(lease(None, 4)), "n1", 4).is_some());
        assert!(takeover(Some(Ok(watcher::Event::Delete(lease(None, 4)))), "n1", 4).is_some());
        assert_eq!(takeover(Some(Ok(watcher::Event::InitDone)), "n1", 4), None);
    }

    #[test]
    fn transient_errors() {
        let api = |code| {
            kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(transient(&api(503)));
        assert!(transient(&api(429)));
        assert!(!transient(&api(403)));
        assert!(!transient(&api(404)));
    }
}
