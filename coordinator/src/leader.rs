//! Leader election on the coordinator's own Lease, so two replicas never both run helm.
//! Losing the Lease ends the process: a restarted pod re-reads everything from the cluster.
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use klm_kube::time::now_ms;
use klm_protocol::lease::LeaseView;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::watcher;
use rand::Rng;
use std::time::Duration;

pub fn view(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        renew_ms: spec.renew_time.map(|t| t.0.as_millisecond()),
        duration_seconds: spec.lease_duration_seconds.unwrap_or(30),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

/// Creates the Lease without a holder if it does not exist yet.
pub async fn ensure_lease(api: &Api<Lease>, name: &str, duration_seconds: i32) -> kube::Result<()> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            lease_duration_seconds: Some(duration_seconds),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    match api.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Tries once to take or renew the Lease for `me`; `Ok(false)` when someone else holds it.
pub async fn try_hold(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration_seconds: i32,
) -> kube::Result<bool> {
    let mut lease = api.get(name).await?;
    let v = view(&lease);
    let now = now_ms();
    if !v.may_acquire(me, now) {
        return Ok(false);
    }
    let ts = MicroTime(jiff::Timestamp::now());
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        spec.acquire_time = Some(ts.clone());
        spec.lease_transitions = Some(v.transitions_after_acquire(me));
    }
    spec.holder_identity = Some(me.to_string());
    spec.renew_time = Some(ts);
    spec.lease_duration_seconds = Some(duration_seconds);
    // Replace carries the resourceVersion we read: a concurrent writer gets 409.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocks until `me` holds the leader Lease.
pub async fn acquire(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration_seconds: i32,
) -> kube::Result<()> {
    ensure_lease(api, name, duration_seconds).await?;
    loop {
        if try_hold(api, name, me, duration_seconds).await? {
            tracing::info!(lease = name, identity = me, "became leader");
            return Ok(());
        }
        // Wait for a change of the Lease or for the holder's expiry, whichever comes first.
        let lease = api.get(name).await?;
        let expiry = view(&lease).expires_at_ms().unwrap_or_else(now_ms);
        let wait_ms = (expiry - now_ms()).max(0) as u64 + rand::rng().random_range(0..500);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut changes = std::pin::pin!(watcher(api.clone(), cfg));
        let _ = tokio::time::timeout(Duration::from_millis(wait_ms), async {
            // Init* events replay the current state; Apply/Delete are real changes.
            while let Some(ev) = changes.next().await {
                if matches!(
                    ev,
                    Ok(watcher::Event::Apply(_)) | Ok(watcher::Event::Delete(_))
                ) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Renews every third of the duration; returns when leadership is lost.
pub async fn keep(api: Api<Lease>, name: String, me: String, duration_seconds: i32) {
    let period = Duration::from_millis((duration_seconds.max(3) as u64 * 1000) / 3);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match try_hold(&api, &name, &me, duration_seconds).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %name, "leadership lost to another coordinator");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the leader Lease");
                if last_ok.elapsed() >= Duration::from_secs(duration_seconds as u64) {
                    tracing::error!("leader Lease expired while the API was unreachable");
                    return;
                }
            }
        }
    }
}

/// Gives the Lease up on shutdown so a standby takes over at once instead of after expiry.
pub async fn release(api: &Api<Lease>, name: &str, me: &str) -> kube::Result<()> {
    let mut lease = api.get(name).await?;
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}
