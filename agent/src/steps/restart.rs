//! `upgrading` (and the restore turn): move this node's kata-deploy pod to a revision. The
//! decisions — which pod to delete (once), when the replacement is Ready at the wanted
//! `controller-revision-hash`, what a timeout means — are `klm_protocol::restart::Restart`; this
//! loop observes the node's kata-deploy pods (a reflector), asks the machine, and deletes the
//! pod it names after a fresh read of the Lease confirms the turn is still ours.
use super::drain::{AbortOnDrop, sleep_or_never};
use crate::ctx::{StepError, TurnCtx, api_error, is_status};
use klm_kube::time::mono_ms;
use klm_protocol::keys::kata_deploy;
use klm_protocol::procedure::sleep_for;
use klm_protocol::restart::{ObservedPod, Restart, RestartStep};
use klm_protocol::run::TurnKind;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::watcher;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// Restarts kata-deploy on our node to `want_hash`; returns how long it took.
pub async fn run(ctx: &mut TurnCtx<'_>, want_hash: &str) -> Result<Duration, StepError> {
    let ns = ctx.rec.a.params.helm_namespace.clone();
    let node = ctx.node_name().to_string();
    let api = ctx.agent.pods(&ns);
    // Counted from when the Node entered this status, so the limit and the reported restart
    // time survive an agent restart mid-step.
    let budget = ctx.rec.step_budget(ctx.agent.config.pod_ready_timeout);
    let mut machine = Restart::new(&node, want_hash, budget);
    // The version this restart brings the node to: before 3.31.0 Ready is not "installed".
    let version = match ctx.kind() {
        TurnKind::Upgrade => ctx.rec.a.target_version.clone(),
        TurnKind::Restore => ctx.rec.a.release.recorded_version.clone(),
    };
    let label_wait = klm_protocol::kata_deploy::ready_may_precede_install(&version);
    if label_wait {
        machine = machine.awaiting_runtime_label();
    }
    let changed = Arc::new(Notify::new());
    // Our own Node, watched only when its `katacontainers.io/kata-runtime` label matters.
    let node_watch = label_wait.then(|| {
        let (store, task) = klm_kube::watch::reflect(
            ctx.agent.nodes.clone(),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            changed.clone(),
        );
        (store, AbortOnDrop(task))
    });
    let (store, task) = klm_kube::watch::reflect(
        api.clone(),
        watcher::Config::default()
            .labels(kata_deploy::POD_SELECTOR)
            .fields(&format!("spec.nodeName={node}")),
        changed.clone(),
    );
    let _stop_watching = AbortOnDrop(task);
    let mut listed = false;
    let mut ready = std::pin::pin!(store.wait_until_ready());
    loop {
        let pods: Option<Vec<ObservedPod>> =
            listed.then(|| store.state().iter().map(|p| ObservedPod::of(p)).collect());
        if let Some((node_store, _)) = &node_watch {
            let label = node_store.state().first().and_then(|n| {
                n.metadata
                    .labels
                    .as_ref()?
                    .get(klm_protocol::keys::node::KATA_RUNTIME_LABEL)
                    .cloned()
            });
            machine.observe_runtime_label(label.as_deref());
        }
        let now = mono_ms();
        let cancel = ctx.cancel_requested();
        let wake = match machine.next(pods.as_deref(), now, cancel) {
            RestartStep::Done { pod, took } => {
                info!(pod = %pod, revision = %want_hash, took_ms = took.as_millis() as u64, "kata-deploy is Ready at the wanted revision");
                return Ok(took);
            }
            RestartStep::Failed(cause) => return Err(StepError::Failed(cause)),
            RestartStep::Delete { name, uid } => {
                // The one disruptive act of the turn: a holder paused since its last renewal
                // must find out from the API, not from its own clock.
                ctx.fence
                    .confirm()
                    .await
                    .map_err(api_error("confirming the upgrade Lease"))??;
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => {
                        info!(pod = %name, namespace = %ns, want = %want_hash, "deleted this node's kata-deploy pod so the DaemonSet replaces it");
                    }
                    // Gone already, or replaced (another uid) meanwhile: nothing to delete.
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                    Err(e) => {
                        return Err(api_error(format!("deleting kata-deploy pod {ns}/{name}"))(
                            e,
                        ));
                    }
                }
                machine.deleted(&uid);
                continue;
            }
            RestartStep::WaitUntil(at) => sleep_for(at, now),
        };
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            _ = ctx.cancelled(), if !cancel => {}
            r = &mut ready, if !listed => {
                if r.is_err() {
                    warn!(namespace = %ns, "the kata-deploy pod watch stopped");
                }
                listed = true;
            }
            _ = changed.notified() => {}
            _ = sleep_or_never(wake) => {}
        }
    }
}
