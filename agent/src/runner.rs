//! One turn, end to end: read the Node, decide where to (re)start, take the Lease, walk the
//! steps, release. Also the rules for stopping early:
//!
//! - **Lease lost**: stop mutating at once and go idle; the coordinator fails the node when the
//!   Lease expires (or has already moved on).
//! - **SIGTERM**: stop between steps (an API call in flight finishes) and deliberately KEEP the
//!   Lease — not renewed, not released — so no other node can start while this one is half
//!   done. The restarted agent finds the same turn in the run record, resumes at the status the
//!   Node shows (`procedure::resume`) and re-takes the Lease: its holder is already this node, so
//!   `may_acquire` is true and `leaseTransitions` does not change. If it does not come back
//!   within the Lease duration plus the coordinator's grace, the coordinator fails the node.
//! - **Turn revoked** (the run record stops naming this node for this turn before we finished):
//!   the coordinator has given up on us; stop and release the Lease so the run can go on.
use crate::ctx::{Agent, Stop, TurnCtx};
use crate::node_patch::Bookkeeping;
use crate::steps;
use crate::turn::Assignment;
use klm_protocol::Evidence;
use klm_protocol::backoff::jittered_with;
use klm_protocol::procedure::{Resume, resume};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How a turn task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEnd {
    /// The turn's final status is on the Node (now or from an earlier process).
    Finished,
    Shutdown,
    Revoked,
    LeaseLost(String),
    NodeGone,
}

/// Runs one turn until it ends. Errors before the Lease is taken (reading the Node, RBAC
/// trouble) are retried with backoff for as long as the turn is ours.
pub async fn run_turn(
    agent: &Agent,
    a: Assignment,
    revoked: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> TurnEnd {
    let mut attempt = 0u32;
    loop {
        match attempt_turn(agent, &a, revoked.clone(), shutdown.clone()).await {
            Ok(end) => return end,
            Err(why) => {
                let wait = jittered_with(
                    attempt,
                    Duration::from_millis(500),
                    Duration::from_secs(15),
                    &mut rand::rng(),
                );
                attempt += 1;
                warn!(%why, ?wait, "could not start the turn; retrying");
                let mut revoked = revoked.clone();
                tokio::select! {
                    _ = shutdown.cancelled() => return TurnEnd::Shutdown,
                    _ = revoked.wait_for(|r| *r) => return TurnEnd::Revoked,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// `Err` = retry later (nothing was mutated).
async fn attempt_turn(
    agent: &Agent,
    a: &Assignment,
    mut revoked: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> Result<TurnEnd, String> {
    let node_name = agent.node_name();
    let requests_at_start = agent.requests.get();
    let read_node = || async {
        agent.nodes.get_opt(node_name).await.map_err(|e| {
            format!("reading Node {node_name}: {e} (does the agent's RBAC allow get on nodes?)")
        })
    };
    let Some(node) = read_node().await? else {
        error!("Node {node_name} does not exist; is NODE_NAME right?");
        return Ok(TurnEnd::NodeGone);
    };
    if let Resume::Finished(status) = where_to_start(a, &node) {
        info!(%status, "this turn already ended on the node; making sure the Lease is free");
        release_stale(agent).await;
        return Ok(TurnEnd::Finished);
    }

    info!("our turn: waiting for the upgrade Lease");
    let held = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Ok(TurnEnd::Shutdown),
        _ = revoked.wait_for(|r| *r) => return Ok(TurnEnd::Revoked),
        held = agent.lease.acquire() => held.map_err(|e| format!(
            "taking the upgrade Lease {}: {e} (the agent needs get/watch/update on leases in its namespace)",
            agent.lease.name()
        ))?,
    };

    // Read the Node again: it may have changed while we waited for the Lease.
    let node = match read_node().await {
        Ok(Some(n)) => n,
        Ok(None) => {
            log_release(held.release().await);
            return Ok(TurnEnd::NodeGone);
        }
        Err(e) => {
            // Still ours: the retry re-takes our own Lease without a transition.
            held.keep().await;
            return Err(e);
        }
    };
    let at = match where_to_start(a, &node) {
        Resume::Finished(_) => {
            log_release(held.release().await);
            return Ok(TurnEnd::Finished);
        }
        Resume::At(at) => at,
    };
    let bk = Bookkeeping::of(&node);
    let mut evidence = Evidence {
        run_id: a.run_id.clone(),
        node: node_name.to_string(),
        ..Default::default()
    };
    if bk.is_turn(&a.run_id, a.kind) {
        info!(status = %at, "resuming the turn where the Node says it stopped");
        evidence
            .notes
            .push(format!("agent restarted during the turn; resumed at {at}"));
    }
    let mut ctx = TurnCtx {
        agent,
        a,
        fence: held.fence(),
        shutdown,
        revoked,
        node,
        evidence,
        began: tokio::time::Instant::now(),
        requests_at_start,
    };
    if bk.is_turn(&a.run_id, a.kind) {
        ctx.event(
            false,
            "Resumed",
            format!("node {node_name}: agent resumed its turn at {at}"),
        );
    }
    let result = steps::execute(&mut ctx, at).await;
    let node_uid = ctx.node.metadata.uid.clone();
    drop(ctx);
    Ok(match result {
        Ok(outcome) => {
            log_release(held.release().await);
            info!(?outcome, "turn finished; Lease released");
            TurnEnd::Finished
        }
        Err(Stop::Shutdown) => {
            // Deliberately keep the Lease (see the module docs).
            held.keep().await;
            TurnEnd::Shutdown
        }
        Err(Stop::Revoked) => {
            warn!(
                "the run no longer names this node for this turn; stopping and releasing the Lease"
            );
            log_release(held.release().await);
            TurnEnd::Revoked
        }
        Err(Stop::NodeGone) => {
            warn!("our Node object was deleted; stopping");
            log_release(held.release().await);
            TurnEnd::NodeGone
        }
        Err(Stop::LeaseLost(reason)) => {
            error!(%reason, "lost the upgrade Lease mid-turn; stopped mutating (the coordinator fails the node)");
            lease_lost_event(agent, node_uid, &a.run_id, &reason);
            drop(held);
            TurnEnd::LeaseLost(reason)
        }
        Err(Stop::Abandoned(reason)) => {
            error!(%reason, "abandoning the turn; the Lease expires and the coordinator fails the node");
            drop(held);
            TurnEnd::LeaseLost(reason)
        }
    })
}

fn where_to_start(a: &Assignment, node: &k8s_openapi::api::core::v1::Node) -> Resume {
    let bk = Bookkeeping::of(node);
    resume(a.kind, &a.run_id, bk.run_id.as_deref(), bk.turn, bk.status)
}

fn log_release(r: kube::Result<()>) {
    if let Err(e) = r {
        warn!(error = %e, "could not release the upgrade Lease; it expires by itself");
    }
}

/// A Lease still held by this node from an earlier process whose turn is over.
pub async fn release_stale(agent: &Agent) {
    match agent.lease.release_if_held().await {
        Ok(true) => info!("released an upgrade Lease left held by an earlier agent process"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not check the upgrade Lease"),
    }
}

fn lease_lost_event(agent: &Agent, node_uid: Option<String>, run_id: &str, reason: &str) {
    let events = agent.events.clone();
    let target = klm_kube::events::node_ref(agent.node_name(), node_uid);
    let note = format!(
        "node {}: lost the upgrade Lease during run {run_id} ({reason}); stopped",
        agent.node_name()
    );
    tokio::spawn(async move {
        events
            .publish(&target, true, "LeaseLost", "Upgrade", note)
            .await;
    });
}
