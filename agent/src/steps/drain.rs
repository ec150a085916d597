//! `draining`: the agent asks the coordinator to drain this node and waits for its report. The
//! agent holds no eviction right (an admission policy cannot tie an eviction to a node, so the
//! right would reach every pod in the cluster); the coordinator's drainer checks the request
//! against the run record and evicts (`klm_protocol::drain_request`). This loop writes the
//! request on our own Node, watches that Node, and lets `drain_request::agent_next` decide.
use crate::ctx::{StepError, TurnCtx};
use k8s_openapi::api::core::v1::Node;
use klm_kube::time::mono_ms;
use klm_protocol::drain_request::{AgentWait, DrainRequest, DrainState, agent_next};
use klm_protocol::node_record::{NodePatch, NodeRecord};
use klm_protocol::procedure::sleep_for;
use kube::runtime::watcher;
use std::sync::Arc;
use tokio::sync::Notify;
use tracing::info;

/// This turn's drain request.
pub fn request(ctx: &TurnCtx<'_>) -> DrainRequest {
    DrainRequest::new(&ctx.rec.a.run_id, ctx.kind())
}

/// Waits for the coordinator's report on the request the `draining` status write carried
/// (written again here if the Node lost it).
pub async fn run(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let node = ctx.node_name().to_string();
    let request = request(ctx);
    // Counted from when the Node entered `draining`: a restarted agent keeps the same budget.
    let budget = ctx.rec.step_budget(ctx.rec.a.params.drain_timeout());
    let changed = Arc::new(Notify::new());
    let (store, task) = klm_kube::watch::reflect(
        ctx.agent.nodes.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
        changed.clone(),
    );
    let _stop_watching = AbortOnDrop(task);
    if ctx.rec.record().drain_request.as_deref() != Some(request.value().as_str()) {
        let patch = NodePatch::default().drain_request(Some(&request));
        ctx.patch_node("requesting the drain", &patch).await?;
        info!(request = %request.value(), "asked the coordinator to drain the node");
    }
    let mut reported = None;
    loop {
        // The watch's copy once it has one; until then the Node as we last wrote it.
        let latest: Option<Arc<Node>> = store.state().into_iter().next();
        let record = latest
            .as_deref()
            .map_or_else(|| ctx.rec.record(), NodeRecord::of);
        let result = record
            .drain_result
            .as_ref()
            .filter(|r| request.answered_by(r));
        if let Some(r) = result.filter(|r| r.state == DrainState::Draining)
            && reported.as_ref() != Some(&r.message)
        {
            info!(progress = %r.message, "the coordinator is draining the node");
            reported = Some(r.message.clone());
        }
        let now = mono_ms();
        let wake = match agent_next(&request, result, &budget, now, ctx.cancel_requested()) {
            AgentWait::Done => {
                info!("node drained by the coordinator");
                finish(ctx, latest).await?;
                return Ok(());
            }
            AgentWait::Failed(cause) => {
                finish(ctx, latest).await?;
                return Err(StepError::Failed(cause));
            }
            AgentWait::Until(at) => sleep_for(at, now),
        };
        tokio::select! {
            biased;
            stop = ctx.interrupted() => return Err(stop.into()),
            _ = ctx.cancelled(), if !ctx.cancel_requested() => {}
            _ = changed.notified() => {}
            _ = sleep_or_never(wake) => {}
        }
    }
}

/// Withdraws the request and its report (fenced): the drain of this turn is over, and the Node
/// carries no request the drainer could be asked about again.
async fn finish(ctx: &mut TurnCtx<'_>, latest: Option<Arc<Node>>) -> Result<(), StepError> {
    // Write on top of the Node the watch saw (the coordinator's report changed it since our
    // last write), so the resourceVersion precondition does not conflict needlessly; an older
    // copy only costs the re-read `patch_node` does on a conflict.
    if let Some(node) = latest {
        ctx.rec.node = (*node).clone();
    }
    let patch = NodePatch::default().drain_request(None).drain_result(None);
    ctx.patch_node("withdrawing the drain request", &patch)
        .await
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
