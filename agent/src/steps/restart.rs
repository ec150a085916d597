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

/// The pods as `pod_restart` should see them. Pods we already deleted count as terminating
/// even before the watch says so. Only pods present when the step started are ever deleted: a
/// pod the DaemonSet creates afterwards at another revision means its template is not at the
/// wanted revision, and deleting it again would only churn kata-deploy on this node (each
/// termination may clean the node's Kata install), so it counts as terminating too and the
/// step waits — until the timeout names the problem.
pub fn decision_view<'p>(
    pods: impl IntoIterator<Item = &'p Pod>,
    deleted: &BTreeSet<String>,
    initial: &BTreeSet<String>,
    want_hash: &str,
) -> Vec<KataPod> {
    pods.into_iter()
        .map(|p| {
            let mut k = kata_pod_of(p);
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if deleted.contains(&uid) || (k.revision_hash != want_hash && !initial.contains(&uid)) {
                k.terminating = true;
            }
            k
        })
        .collect()
}

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
    // Counted from when the Node entered this status, so the limit and the reported restart
    // time survive an agent restart mid-step.
    let (deadline, already) = super::step_deadline(ctx, timeout);
    let started = Instant::now()
        .checked_sub(already)
        .unwrap_or_else(Instant::now);

    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Pod>> = None;
    // Pods we deleted, by uid: terminating for our purposes even before the watch says so.
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    // Pods present when the step started (by uid); see `decision_view`.
    let mut initial: Option<BTreeSet<String>> = None;

    loop {
        if let Some(initial) = &initial {
            let current = decision_view(pods.values(), &deleted, initial, want_hash);
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
                let current: Vec<KataPod> = pods.values().map(kata_pod_of).collect();
                let initial = initial.unwrap_or_default();
                let recreated_elsewhere = pods.values().any(|p| {
                    let k = kata_pod_of(p);
                    !k.terminating
                        && k.revision_hash != want_hash
                        && !initial.contains(p.metadata.uid.as_deref().unwrap_or_default())
                });
                let hint = if recreated_elsewhere {
                    "; the DaemonSet recreated the pod at another revision, so its template is not \
                     at the wanted one (did the helm upgrade/rollback take effect? is \
                     updateStrategy OnDelete honoured by this chart version?)"
                } else {
                    ""
                };
                return Err(failure(
                    "KataDeployNotReady",
                    format!(
                        "kata-deploy on {node} was not Ready at revision {want_hash} within {}s: {}{hint}",
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
                    if initial.is_none() {
                        initial = Some(pods.values().filter_map(|p| p.metadata.uid.clone()).collect());
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, hash: &str, ready: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(uid.into());
        p.metadata.labels = Some(
            [(
                kata_deploy::REVISION_HASH_LABEL.to_string(),
                hash.to_string(),
            )]
            .into(),
        );
        if ready {
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
        }
        p
    }

    fn set(uids: &[&str]) -> BTreeSet<String> {
        uids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn deletes_the_original_pod_once_and_never_churns_replacements() {
        let old = pod("kd-a", "u1", "old", true);
        // Start: the original pod at the old revision is deleted.
        let v = decision_view([&old], &set(&[]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Delete("kd-a".into()));
        // Deleted, watch not caught up yet: wait.
        let v = decision_view([&old], &set(&["u1"]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Wait);
        // The DaemonSet recreated it at the OLD revision (template not updated): wait, no delete.
        let again = pod("kd-b", "u2", "old", true);
        let v = decision_view([&again], &set(&["u1"]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Wait);
        // Replacement at the wanted revision, Ready: done.
        let good = pod("kd-c", "u3", "new", true);
        let v = decision_view([&good], &set(&["u1"]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Done("kd-c".into()));
        // Not Ready yet: wait.
        let starting = pod("kd-c", "u3", "new", false);
        let v = decision_view([&starting], &set(&["u1"]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Wait);
    }

    #[test]
    fn already_at_the_wanted_revision_is_done_without_a_restart() {
        let p = pod("kd-a", "u1", "new", true);
        let v = decision_view([&p], &set(&[]), &set(&["u1"]), "new");
        assert_eq!(pod_restart(&v, "new"), PodRestart::Done("kd-a".into()));
    }
}
