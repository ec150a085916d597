//! `verifying`: run the user's verification pod on this node and judge it. Success only on
//! phase Succeeded; fail fast on states that will not heal; time out from the pod's creation.
//! The pod's name is written to the Node before the pod is created, so a restarted agent adopts
//! the pod in flight instead of starting another. Evidence (phase, reason, exit code, log tail,
//! duration) is kept before the pod is deleted. A cancelled run stops the verification at once
//! (evidence kept, pod deleted).
use super::drain::sleep_or_never;
use crate::ctx::{StepError, Stop, TurnCtx, api_error, failure, is_status};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use klm_kube::time::mono_ms;
use klm_protocol::NodeStatus;
use klm_protocol::keys::verification as labels;
use klm_protocol::procedure::{Budget, sleep_for};
use klm_protocol::verification::{
    Observation, PodTemplate, Verdict, judge, label_safe, log_container, log_tail, random_suffix,
    test_pod_name, tolerate_cordon,
};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::watch_object;
use tracing::{debug, info, warn};

/// Lines of the verification pod's log kept as evidence.
const LOG_LINES: i64 = 20;
/// Bytes of log kept (Node annotations share a 256 KiB budget).
const LOG_BYTES: usize = 2048;

fn wall_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

pub async fn run(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let params = ctx.rec.a.params.clone();
    let node = ctx.node_name().to_string();
    let template = PodTemplate::parse(&params.verification_pod)
        .map_err(|e| failure("InvalidVerificationPod", e.to_string()))?;

    // Adopt the pod a previous process of this agent started for this very turn.
    let name = match ctx
        .rec
        .record()
        .verification_pod_to_adopt(&ctx.rec.a.run_id, ctx.kind())
    {
        Some(adopted) => adopted.to_string(),
        None => test_pod_name(&node, &random_suffix(&mut rand::rng())),
    };
    let patch = ctx
        .rec
        .status(NodeStatus::Verifying)
        .verification_pod(Some(&name));
    ctx.patch_node("recording the verification pod on the node", &patch)
        .await?;
    ctx.event(
        false,
        "Verifying",
        format!(
            "node {node}: running verification pod {}/{name}",
            params.verification_namespace
        ),
    );

    let api = ctx.agent.pods(&params.verification_namespace);
    remove_stale_pods(ctx, &api, &name).await?;

    let mut pod = template
        .render(
            &node,
            &name,
            &params.verification_namespace,
            &ctx.rec.a.run_id,
        )
        .map_err(|e| failure("InvalidVerificationPod", e.to_string()))?;
    tolerate_cordon(&mut pod);
    let sent = mono_ms();
    let (created, ours) = create_or_adopt(ctx, &api, &pod, &name).await?;
    // Durations and the deadline run from the creation: measured locally when we created the
    // pod (creationTimestamp has one-second resolution), from creationTimestamp when adopted.
    let started = if ours {
        sent
    } else {
        let created_ms = created
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(wall_ms, |t| t.0.as_millisecond());
        mono_ms().saturating_sub(wall_ms().saturating_sub(created_ms).max(0))
    };
    let budget = Budget::new(started, params.verification_timeout());

    // Observe → judge → wait. Every verdict (timeout, deletion and cancel included) is
    // `verification::judge`'s.
    let mut last = created;
    let mut deleted = false;
    let mut events = watch_object(api.clone(), &name)
        .backoff(klm_kube::retry::watch_backoff())
        .boxed();
    let verdict = loop {
        let now = mono_ms();
        let cancel = ctx.cancel_requested();
        let seen = Observation {
            name: &name,
            pod: &last,
            deleted,
            budget,
            now_ms: now,
            cancel,
        };
        let verdict = judge(&seen);
        if verdict != Verdict::InProgress {
            break verdict;
        }
        tokio::select! {
            biased;
            stop = ctx.interrupted() => {
                // On shutdown the pod keeps running for the restarted agent to adopt. When
                // the coordinator has moved on, remove it while the Lease is still ours.
                if stop == Stop::Revoked && ctx.fenced().is_ok() {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
                return Err(stop.into());
            }
            _ = ctx.cancelled(), if !cancel => {}
            _ = sleep_or_never(sleep_for(budget.ends_at_ms(), now)) => {}
            ev = events.next() => match ev {
                Some(Ok(Some(p))) => last = p,
                Some(Ok(None)) => deleted = true,
                Some(Err(e)) => warn!(error = %e, pod = %name, "watch on the verification pod failed; retrying"),
                None => {}
            },
        }
    };
    drop(events);

    // Evidence first, then delete the pod.
    let took = u64::try_from(budget.elapsed(mono_ms()).as_millis()).unwrap_or(u64::MAX);
    ctx.rec.evidence.pod = Some(name.clone());
    ctx.rec.evidence.phase = last.status.as_ref().and_then(|s| s.phase.clone());
    ctx.rec.evidence.verification_ms = Some(took);
    let lp = LogParams {
        container: log_container(&last),
        tail_lines: Some(LOG_LINES),
        ..Default::default()
    };
    ctx.rec.evidence.log_tail = Some(match api.logs(&name, &lp).await {
        Ok(log) => log_tail(&log, LOG_BYTES),
        Err(e) => format!("logs unavailable: {}", short_error(&e)),
    });
    ctx.fenced()?;
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => debug!(pod = %name, "deleted the verification pod"),
        Err(e) if is_status(&e, 404) => {}
        Err(e) => {
            warn!(pod = %name, error = %e, "could not delete the verification pod; the next verification on this node removes it")
        }
    }

    match verdict {
        Verdict::Succeeded => {
            info!(pod = %name, took_ms = took, "verification succeeded");
            Ok(())
        }
        Verdict::Failed(cause) => {
            warn!(pod = %name, reason = %cause.reason, message = %cause.message, "verification failed");
            Err(StepError::Failed(cause))
        }
        Verdict::InProgress => Err(failure(
            "UnexpectedVerdict",
            "verification ended without a verdict; this is a bug in kata-lifecycle-manager",
        )),
    }
}

fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Creates the pod, or adopts it when it already exists (a restarted agent, or a retry);
/// `true` when we created it.
async fn create_or_adopt(
    ctx: &TurnCtx<'_>,
    api: &Api<Pod>,
    pod: &Pod,
    name: &str,
) -> Result<(Pod, bool), StepError> {
    ctx.fenced()?;
    match api.create(&PostParams::default(), pod).await {
        Ok(p) => {
            info!(pod = %name, namespace = pod.metadata.namespace.as_deref().unwrap_or_default(), "created the verification pod");
            Ok((p, true))
        }
        Err(e) if is_status(&e, 409) => {
            match api
                .get_opt(name)
                .await
                .map_err(api_error(format!("reading verification pod {name}")))?
            {
                Some(p) => {
                    info!(pod = %name, "adopted the verification pod already in flight");
                    Ok((p, false))
                }
                // Gone between the two calls: let the walk retry the step.
                None => Err(StepError::Api {
                    what: format!("creating verification pod {name}"),
                    error: kube::Error::Api(
                        kube::core::Status::failure(
                            "pod vanished while being adopted",
                            "ServiceUnavailable",
                        )
                        .with_code(503)
                        .boxed(),
                    ),
                }),
            }
        }
        Err(kube::Error::Api(s)) if (400..500).contains(&s.code) && s.code != 429 => Err(failure(
            "VerificationPodRejected",
            format!(
                "the API server refused verification pod {name} in namespace {:?}: {} (check the template and that the namespace exists)",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                s.message
            ),
        )),
        Err(e) => Err(api_error(format!("creating verification pod {name}"))(e)),
    }
}

/// Deletes verification pods for this node left by an earlier turn or a lost agent.
async fn remove_stale_pods(ctx: &TurnCtx<'_>, api: &Api<Pod>, keep: &str) -> Result<(), StepError> {
    let selector = format!(
        "{}={},{}={}",
        labels::MANAGED_BY_LABEL,
        labels::MANAGED_BY,
        labels::NODE_LABEL,
        label_safe(ctx.node_name())
    );
    let list = match api.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l,
        Err(e) => {
            debug!(error = %e, "could not list stale verification pods");
            return Ok(());
        }
    };
    for p in list.items {
        let Some(n) = p.metadata.name.as_deref() else {
            continue;
        };
        if n == keep || p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        ctx.fenced()?;
        match api.delete(n, &DeleteParams::default()).await {
            Ok(_) => info!(pod = %n, "removed a stale verification pod for this node"),
            Err(e) => debug!(pod = %n, error = %e, "could not remove a stale verification pod"),
        }
    }
    Ok(())
}
