//! `upgrading` (and the restore turn): move this node's kata-deploy pod to a revision. The
//! DaemonSet is `OnDelete`, so nothing happens until we delete our node's pod; then we watch
//! until the replacement at the wanted `controller-revision-hash` is Ready.
use crate::ctx::{StepError, TurnCtx, api_error, failure, is_status};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use klm_protocol::keys::kata_deploy;
use klm_protocol::procedure::{KataPod, PodRestart, describe_kata_pods, kata_pod_of, pod_restart};
use kube::api::DeleteParams;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// Restarts kata-deploy on our node to `want_hash`; returns how long it took.
pub async fn run(ctx: &mut TurnCtx<'_>, want_hash: &str) -> Result<Duration, StepError> {
    if want_hash.is_empty() {
        return Err(failure(
            "UnknownRevision",
            "the run record names no kata-deploy controller-revision-hash to restart to; \
             the coordinator records it after the helm upgrade — check the coordinator's logs",
        ));
    }
    let ns = ctx.a.params.helm_namespace.clone();
    let node = ctx.node_name().to_string();
    let api = ctx.agent.pods(&ns);
    let cfg = watcher::Config::default()
        .labels(kata_deploy::POD_SELECTOR)
        .fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api.clone(), cfg).default_backoff().boxed();
    let timeout = ctx.agent.config.pod_ready_timeout;
    let started = Instant::now();
    let deadline = started + timeout;

    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Pod>> = None;
    let mut listed = false;
    // Pods we deleted, by uid: terminating for our purposes even before the watch says so.
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let view = |pods: &BTreeMap<String, Pod>, deleted: &BTreeSet<String>| -> Vec<KataPod> {
        pods.values()
            .map(|p| {
                let mut k = kata_pod_of(p);
                if p.metadata.uid.as_ref().is_some_and(|u| deleted.contains(u)) {
                    k.terminating = true;
                }
                k
            })
            .collect()
    };

    loop {
        if listed {
            let current = view(&pods, &deleted);
            match pod_restart(&current, want_hash) {
                PodRestart::Done(name) => {
                    let took = started.elapsed();
                    info!(pod = %name, revision = %want_hash, took_ms = took.as_millis() as u64, "kata-deploy is Ready at the wanted revision");
                    return Ok(took);
                }
                PodRestart::Delete(name) => {
                    ctx.fenced()?;
                    let uid = pods.get(&name).and_then(|p| p.metadata.uid.clone());
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            info!(pod = %name, namespace = %ns, want = %want_hash, "deleted this node's kata-deploy pod so the DaemonSet replaces it");
                        }
                        Err(e) if is_status(&e, 404) => {}
                        Err(e) => {
                            return Err(
                                api_error(format!("deleting kata-deploy pod {ns}/{name}"))(e),
                            );
                        }
                    }
                    if let Some(uid) = uid {
                        deleted.insert(uid);
                    } else {
                        pods.remove(&name);
                    }
                    continue;
                }
                PodRestart::Wait => {}
            }
        }
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            _ = tokio::time::sleep_until(deadline) => {
                let current = view(&pods, &deleted);
                return Err(failure(
                    "KataDeployNotReady",
                    format!(
                        "kata-deploy on {node} was not Ready at revision {want_hash} within {}s: {}",
                        timeout.as_secs(),
                        describe_kata_pods(&current, want_hash)
                    ),
                ));
            }
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(p))) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(p.metadata.name.clone().unwrap_or_default(), p);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    pods = listing.take().unwrap_or_default();
                    listed = true;
                }
                Some(Ok(watcher::Event::Apply(p))) => {
                    pods.insert(p.metadata.name.clone().unwrap_or_default(), p);
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    pods.remove(p.metadata.name.as_deref().unwrap_or_default());
                }
                Some(Err(e)) => warn!(error = %e, namespace = %ns, "watch on kata-deploy pods failed; retrying"),
                None => {}
            },
        }
    }
}
