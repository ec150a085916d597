//! Job mode: wait for kata-deploy's install on this node. The coordinator issues the scoped
//! `helm upgrade --set job.nodes={this node}` once this node reports `upgrading` (or
//! `rolling-back` in a restore turn); kata-deploy's dispatcher then creates this node's install
//! Job. The verdict — Job failed, Job completed and `katacontainers.io/kata-runtime=true` on the
//! Node, or still waiting — is `klm_protocol::install::judge`; this loop watches the release's
//! install Jobs and this Node and asks it, until the step's budget runs out.
use crate::ctx::{StepError, TurnCtx, api_error};
use crate::steps::drain::{AbortOnDrop, sleep_or_never};
use k8s_openapi::api::batch::v1::Job;
use klm_kube::time::mono_ms;
use klm_protocol::install::{INSTANCE_LABEL, InstallJob, InstallVerdict, STAGE_LABEL, judge};
use klm_protocol::keys::node::KATA_RUNTIME_LABEL;
use klm_protocol::procedure::sleep_for;
use klm_protocol::verification::FailureCause;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

fn install_jobs(ctx: &TurnCtx<'_>) -> (Api<Job>, String) {
    let ns = ctx.rec.a.params.helm_namespace.clone();
    let selector = format!(
        "{STAGE_LABEL}=install,{INSTANCE_LABEL}={}",
        ctx.rec.a.params.helm_release
    );
    (Api::namespaced(ctx.agent.client.clone(), &ns), selector)
}

fn install_job_of(job: &Job) -> InstallJob {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let is = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    InstallJob {
        uid: job.metadata.uid.clone().unwrap_or_default(),
        name: job.metadata.name.clone().unwrap_or_default(),
        node: job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        complete: is("Complete").is_some(),
        failed: is("Failed").map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        }),
    }
}

/// The install Jobs of this node that exist now: before the node reports that it waits for an
/// install, none of them can be that install's (an earlier one stays until its TTL).
pub async fn earlier_jobs(ctx: &TurnCtx<'_>) -> Result<BTreeSet<String>, StepError> {
    let (api, selector) = install_jobs(ctx);
    let node = ctx.node_name().to_string();
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_error("listing kata-deploy's install Jobs"))?;
    Ok(list
        .items
        .iter()
        .map(install_job_of)
        .filter(|j| j.node == node)
        .map(|j| j.uid)
        .collect())
}

/// Waits until kata-deploy's install finished on this node; returns how long it took.
pub async fn wait(
    ctx: &mut TurnCtx<'_>,
    earlier: &BTreeSet<String>,
    version: &str,
) -> Result<Duration, StepError> {
    let node = ctx.node_name().to_string();
    let (api, selector) = install_jobs(ctx);
    let budget = ctx.rec.step_budget(ctx.agent.config.pod_ready_timeout);
    let changed = Arc::new(Notify::new());
    let (jobs, task) = klm_kube::watch::reflect(
        api,
        watcher::Config::default().labels(&selector),
        changed.clone(),
    );
    let _stop_jobs = AbortOnDrop(task);
    let (nodes, task) = klm_kube::watch::reflect(
        ctx.agent.nodes.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
        changed.clone(),
    );
    let _stop_node = AbortOnDrop(task);
    let mut ready = std::pin::pin!(async {
        let a = jobs.wait_until_ready().await;
        let b = nodes.wait_until_ready().await;
        a.and(b)
    });
    let mut listed = false;
    loop {
        let now = mono_ms();
        let verdict = listed.then(|| {
            let all: Vec<InstallJob> = jobs.state().iter().map(|j| install_job_of(j)).collect();
            let label = nodes
                .state()
                .first()
                .and_then(|n| n.metadata.labels.as_ref()?.get(KATA_RUNTIME_LABEL).cloned());
            judge(&node, &all, earlier, label.as_deref())
        });
        match verdict {
            Some(InstallVerdict::Installed { job }) => {
                let took = budget.elapsed(now);
                info!(%job, %version, took_ms = took.as_millis() as u64, "kata-deploy installed on this node");
                return Ok(took);
            }
            Some(InstallVerdict::Failed(cause)) => return Err(StepError::Failed(cause)),
            Some(InstallVerdict::Waiting(what)) if budget.is_over(now) => {
                return Err(StepError::Failed(FailureCause {
                    reason: "InstallTimeout".into(),
                    message: format!(
                        "kata-deploy {version} was not installed on {node} within {}s: {what}",
                        budget.limit.as_secs()
                    ),
                    exit_code: None,
                }));
            }
            _ => {}
        }
        let wake = sleep_for(budget.ends_at_ms(), now);
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            r = &mut ready, if !listed => {
                if r.is_err() {
                    warn!(%node, "the install Job / Node watch stopped");
                }
                listed = true;
            }
            _ = changed.notified() => {}
            _ = sleep_or_never(wake) => {}
        }
    }
}
