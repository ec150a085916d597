//! `draining`: evict this node's pods through the Eviction API (PodDisruptionBudgets respected).
//! The decisions — which pods, when to retry a refusal, when it is done, what blocked it — are
//! `klm_protocol::drain::Drain`; this loop observes the node's pods (a reflector), asks the
//! machine, and performs the eviction it names.
use crate::ctx::{StepError, TurnCtx, is_status};
use k8s_openapi::api::core::v1::Pod;
use klm_kube::time::mono_ms;
use klm_protocol::drain::{Drain, DrainPod, DrainStep, Eviction, refusal};
use klm_protocol::procedure::sleep_for;
use kube::api::{Api, EvictParams};
use kube::runtime::watcher;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::{info, warn};

pub async fn run(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let node = ctx.node_name().to_string();
    // Counted from when the Node entered `draining`: a restarted agent keeps the same budget.
    let budget = ctx.rec.step_budget(ctx.rec.a.params.drain_timeout());
    let mut machine = Drain::new(&node, budget);
    let changed = Arc::new(Notify::new());
    let (store, task) = klm_kube::watch::reflect(
        Api::<Pod>::all(ctx.agent.client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        changed.clone(),
    );
    let _stop_watching = AbortOnDrop(task);
    let mut listed = false;
    let mut ready = std::pin::pin!(store.wait_until_ready());
    loop {
        let pods: Option<Vec<DrainPod>> =
            listed.then(|| store.state().iter().map(|p| DrainPod::of(p)).collect());
        let now = mono_ms();
        let cancel = ctx.cancel_requested();
        let wake = match machine.next(pods.as_deref(), now, cancel) {
            DrainStep::Done => {
                info!("node drained");
                return Ok(());
            }
            DrainStep::Failed(cause) => return Err(StepError::Failed(cause)),
            DrainStep::Evict(key) => {
                let Some(pod) = pods.iter().flatten().find(|p| p.key == key).cloned() else {
                    continue;
                };
                let outcome = evict(ctx, &key).await?;
                if let Some(why) = machine.record(&pod, outcome, mono_ms(), rand::random()) {
                    warn!(pod = %key, "{why}; retrying");
                    ctx.event(true, "EvictionBlocked", format!("pod {key}: {why}"));
                }
                continue;
            }
            DrainStep::WaitUntil(at) => sleep_for(at, now),
        };
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            _ = ctx.cancelled(), if !cancel => {}
            r = &mut ready, if !listed => {
                if r.is_err() {
                    warn!("the pod watch stopped");
                }
                listed = true;
            }
            _ = changed.notified() => {}
            _ = sleep_or_never(wake) => {}
        }
    }
}

/// One eviction (fenced), as the machine needs to hear about it.
async fn evict(ctx: &TurnCtx<'_>, key: &str) -> Result<Eviction, StepError> {
    ctx.fenced()?;
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let api: Api<Pod> = ctx.agent.pods(ns);
    match api.evict(name, &EvictParams::default()).await {
        Ok(_) => {
            info!(pod = %key, "evicted");
            Ok(Eviction::Evicted)
        }
        Err(e) if is_status(&e, 404) => Ok(Eviction::Gone),
        Err(kube::Error::Api(status)) if status.code == 429 || status.code >= 500 => {
            Ok(Eviction::Refused(if status.code == 429 {
                let causes: Vec<&str> = status
                    .details
                    .as_ref()
                    .map(|d| d.causes.iter().map(|c| c.message.as_str()).collect())
                    .unwrap_or_default();
                refusal(&status.message, &causes)
            } else {
                format!("eviction failed: {}", status.message)
            }))
        }
        Err(e) => Err(StepError::Api {
            what: format!("evicting pod {key}"),
            error: e,
        }),
    }
}

/// Sleeps for `wait`, or forever when there is nothing to wake for.
pub async fn sleep_or_never(wait: Option<std::time::Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Stops a watch task when the step ends, however it ends.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
