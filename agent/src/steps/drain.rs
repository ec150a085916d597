//! `draining`: evict this node's pods through the Eviction API (PodDisruptionBudgets respected),
//! skipping DaemonSet and mirror pods, retrying refusals (429) with jittered exponential backoff,
//! and waiting — on a watch — until the evicted pods are gone. Bounded by `drain-timeout`; on
//! timeout the evidence names the pod (and PodDisruptionBudget) that blocked it.
use crate::ctx::{StepError, TurnCtx, failure, is_status};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use klm_protocol::backoff::jittered_with;
use klm_protocol::drain::{DrainDecision, blocking_budget, decide};
use kube::api::{Api, EvictParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// `namespace/name`.
type Key = String;

#[derive(Debug, Default)]
struct Tracked {
    /// uid of the pod we evicted under this key (a recreated pod has another uid).
    evicted_uid: Option<String>,
    attempts: u32,
    next_try: Option<Instant>,
    /// Why the last eviction was refused.
    blocked: Option<String>,
}

fn key(p: &Pod) -> Key {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// We evicted this very pod (same uid) already.
fn was_evicted(tracked: &BTreeMap<Key, Tracked>, k: &Key, p: &Pod) -> bool {
    tracked
        .get(k)
        .and_then(|t| t.evicted_uid.as_ref())
        .is_some_and(|u| Some(u) == p.metadata.uid.as_ref())
}

/// Why an eviction was refused, naming the PodDisruptionBudget when the server does.
pub fn refusal(status: &kube::core::Status) -> String {
    let causes: Vec<&str> = status
        .details
        .as_ref()
        .map(|d| d.causes.iter().map(|c| c.message.as_str()).collect())
        .unwrap_or_default();
    let budget = causes
        .iter()
        .copied()
        .chain([status.message.as_str()])
        .find_map(blocking_budget);
    let detail = causes
        .first()
        .copied()
        .filter(|c| !c.is_empty())
        .unwrap_or(status.message.as_str());
    match budget {
        Some(b) => format!("blocked by PodDisruptionBudget {b}: {detail}"),
        None => format!("eviction refused: {detail}"),
    }
}

/// The timeout message: which pods are still there and why.
fn blocking_summary(remaining: &[(Key, Option<String>, bool)]) -> String {
    let mut parts: Vec<String> = remaining
        .iter()
        .take(3)
        .map(|(k, blocked, evicted)| match (blocked, evicted) {
            (Some(why), _) => format!("pod {k} {why}"),
            (None, true) => format!("pod {k} was evicted but is still terminating"),
            (None, false) => format!("pod {k} not evicted yet"),
        })
        .collect();
    if remaining.len() > 3 {
        parts.push(format!("and {} more", remaining.len() - 3));
    }
    parts.join("; ")
}

pub async fn run(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let node = ctx.node_name().to_string();
    let timeout = ctx.a.params.drain_timeout();
    let all: Api<Pod> = Api::all(ctx.agent.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(all, cfg).default_backoff().boxed();
    // Counted from when the Node entered `draining`: a restarted agent keeps the same budget.
    let (deadline, _) = super::step_deadline(ctx, timeout);

    let mut pods: BTreeMap<Key, Pod> = BTreeMap::new();
    let mut listing: Option<BTreeMap<Key, Pod>> = None;
    let mut listed = false;
    let mut tracked: BTreeMap<Key, Tracked> = BTreeMap::new();

    loop {
        let mut next_wake: Option<Instant> = None;
        if listed {
            // Evict what is due.
            let now = Instant::now();
            let due: Vec<Pod> = pods
                .iter()
                .filter(|(k, p)| !was_evicted(&tracked, k, p) && decide(p) == DrainDecision::Evict)
                .map(|(_, p)| p.clone())
                .collect();
            for pod in due {
                let k = key(&pod);
                let t = tracked.entry(k.clone()).or_default();
                if let Some(at) = t.next_try
                    && at > now
                {
                    next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                    continue;
                }
                ctx.fenced()?;
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                let api: Api<Pod> = ctx.agent.pods(&ns);
                match api.evict(&name, &EvictParams::default()).await {
                    Ok(_) => {
                        info!(pod = %k, "evicted");
                        t.evicted_uid = pod.metadata.uid.clone();
                        t.blocked = None;
                    }
                    Err(e) if is_status(&e, 404) => {
                        debug!(pod = %k, "already gone");
                        pods.remove(&k);
                    }
                    Err(kube::Error::Api(status)) if status.code == 429 || status.code >= 500 => {
                        let why = if status.code == 429 {
                            refusal(&status)
                        } else {
                            format!("eviction failed: {}", status.message)
                        };
                        let wait = jittered_with(
                            t.attempts,
                            Duration::from_millis(500),
                            Duration::from_secs(10),
                            &mut rand::rng(),
                        );
                        t.attempts += 1;
                        if t.blocked.as_deref() != Some(why.as_str()) {
                            warn!(pod = %k, ?wait, "{why}; retrying");
                            ctx.event(true, "EvictionBlocked", format!("pod {k}: {why}"));
                        }
                        t.blocked = Some(why);
                        let at = Instant::now() + wait;
                        t.next_try = Some(at);
                        next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                    }
                    Err(e) => {
                        return Err(StepError::Api {
                            what: format!("evicting pod {k}"),
                            error: e,
                        });
                    }
                }
            }
            // Done when nothing evictable is left and every pod we evicted is gone.
            let remaining: Vec<(Key, Option<String>, bool)> = pods
                .iter()
                .filter_map(|(k, p)| {
                    let t = tracked.get(k);
                    let evicted = was_evicted(&tracked, k, p);
                    (evicted || decide(p) == DrainDecision::Evict)
                        .then(|| (k.clone(), t.and_then(|t| t.blocked.clone()), evicted))
                })
                .collect();
            if remaining.is_empty() {
                info!("node drained");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failure(
                    "DrainTimeout",
                    format!(
                        "drain of {node} did not finish within {}s: {}",
                        timeout.as_secs(),
                        blocking_summary(&remaining)
                    ),
                ));
            }
        }
        let wake = next_wake.map_or(deadline, |w| w.min(deadline));
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            _ = tokio::time::sleep_until(wake) => {
                if !listed && Instant::now() >= deadline {
                    return Err(failure(
                        "DrainTimeout",
                        format!("could not list the pods on {node} within {}s", timeout.as_secs()),
                    ));
                }
            }
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(p))) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(key(&p), p);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    pods = listing.take().unwrap_or_default();
                    listed = true;
                }
                Some(Ok(watcher::Event::Apply(p))) => {
                    pods.insert(key(&p), p);
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    pods.remove(&key(&p));
                }
                Some(Err(e)) => warn!(error = %e, "watch on this node's pods failed; retrying"),
                None => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    #[test]
    fn refusals_name_the_budget() {
        // What kube-apiserver answers when a PodDisruptionBudget refuses an eviction.
        let s: Status = serde_json::from_value(serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": "Cannot evict pod as it would violate the pod's disruption budget.",
            "reason": "TooManyRequests",
            "details": {
                "causes": [{
                    "reason": "DisruptionBudget",
                    "message": "The disruption budget web-pdb needs 1 healthy pods and has 1 currently"
                }]
            },
            "code": 429
        }))
        .unwrap();
        let r = refusal(&s);
        assert!(
            r.starts_with("blocked by PodDisruptionBudget web-pdb:"),
            "{r}"
        );
        let plain = Status::failure("Too many requests", "TooManyRequests").with_code(429);
        assert_eq!(refusal(&plain), "eviction refused: Too many requests");
    }

    #[test]
    fn summary_names_up_to_three_pods() {
        let rem: Vec<(Key, Option<String>, bool)> = vec![
            (
                "a/web-1".into(),
                Some("blocked by PodDisruptionBudget web-pdb: x".into()),
                false,
            ),
            ("a/db-0".into(), None, true),
            ("b/job".into(), None, false),
            ("b/other".into(), None, false),
        ];
        let s = blocking_summary(&rem);
        assert!(
            s.contains("pod a/web-1 blocked by PodDisruptionBudget web-pdb"),
            "{s}"
        );
        assert!(
            s.contains("a/db-0 was evicted but is still terminating"),
            "{s}"
        );
        assert!(s.ends_with("and 1 more"), "{s}");
    }
}
