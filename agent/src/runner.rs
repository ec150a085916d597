//! One turn, end to end: read the Node, decide where to (re)start, take the Lease, walk the
//! steps, release. Also the rules for stopping early:
//!
//! - **Lease lost** (a renewal or the watch saw another holder, or renewals failed until the
//!   fence lapsed — e.g. the API server was down longer than the Lease): stop mutating at once.
//!   Then read the Lease again (retrying until the API answers, for as long as the grant names
//!   this turn): if nobody took it meanwhile — same holder, same `leaseTransitions` — take it
//!   again and resume from the status on the Node (`klm_protocol::lease::after_lapse`); if
//!   someone did, stop for good and say whether the node is left cordoned by us.
//! - **SIGTERM**: stop between steps (an API call in flight finishes) and *park* the Lease —
//!   held by the bare node name, not renewed — so no other node can start while this one is half
//!   done. The node's next agent process takes a parked hold at once
//!   (`klm_protocol::lease::claim`), resumes at the status the Node shows
//!   (`procedure::resume`); if none comes back within the Lease duration plus the
//!   coordinator's grace, the coordinator fails the node.
//! - **Turn revoked** (the grant on our Node stops naming this turn before we finished):
//!   the coordinator has given up on us; stop and release the Lease so the run can go on.
//! - **Superseded** (a Node write found the coordinator's verdict on the Node): stop; the
//!   coordinator owns the node's outcome now.
use crate::ctx::{Agent, Stop, TurnCtx, TurnRecord, TurnSignal};
use crate::steps;
use crate::turn::{self, Assignment, Reading};
use backon::BackoffBuilder;
use k8s_openapi::api::core::v1::Node;
use klm_kube::lease::{HeldLease, RetakeError};
use klm_kube::time::mono_ms;
use klm_protocol::Evidence;
use klm_protocol::lease::TURN_RETRY_MAX_WAIT_MS;
use klm_protocol::node_record::NodeRecord;
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

/// What one attempt at the turn came to.
enum Attempt {
    End(TurnEnd),
    /// Nothing was mutated; try again after a backoff.
    Retry(String),
    /// Our hold lapsed or was taken mid-turn (fenced on these `leaseTransitions`): read the
    /// Lease again and take it back only if nobody else did.
    Lapsed(i32),
}

/// Runs one turn until it ends. Errors before the Lease is taken (reading the Node, RBAC
/// trouble, an API outage) are retried with backoff for as long as the turn is ours.
pub async fn run_turn(
    agent: &Agent,
    a: Assignment,
    signal: watch::Receiver<TurnSignal>,
    shutdown: CancellationToken,
) -> TurnEnd {
    let mut backoff = turn_retry_backoff();
    let mut lapsed: Option<i32> = None;
    loop {
        match attempt_turn(agent, &a, &signal, &shutdown, lapsed).await {
            Attempt::End(end) => return end,
            Attempt::Lapsed(transitions) => {
                warn!(
                    transitions,
                    "stopped mutating; reading the Lease again to resume if nobody took it"
                );
                lapsed = Some(transitions);
            }
            Attempt::Retry(why) => warn!(%why, "could not go on with the turn; retrying"),
        }
        let wait = backoff
            .next()
            .unwrap_or(Duration::from_millis(TURN_RETRY_MAX_WAIT_MS));
        let mut signal = signal.clone();
        tokio::select! {
            _ = shutdown.cancelled() => return TurnEnd::Shutdown,
            _ = signal.wait_for(|s| s.revoked) => return TurnEnd::Revoked,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Waits between attempts at a turn: short at first, never longer than the shortest Lease (see
/// [`TURN_RETRY_MAX_WAIT_MS`]), so an agent whose hold lapsed in an API outage takes it back
/// before a coordinator that came up with the API server declares the node lost.
fn turn_retry_backoff() -> backon::ExponentialBackoff {
    klm_kube::retry::backoff(
        Duration::from_millis(500),
        Duration::from_millis(TURN_RETRY_MAX_WAIT_MS),
    )
    .build()
}

async fn attempt_turn(
    agent: &Agent,
    a: &Assignment,
    signal: &watch::Receiver<TurnSignal>,
    shutdown: &CancellationToken,
    lapsed: Option<i32>,
) -> Attempt {
    let node_name = agent.node_name();
    let requests_at_start = agent.requests.get();
    let read_node = || async {
        agent.nodes.get_opt(node_name).await.map_err(|e| {
            format!("reading Node {node_name}: {e} (does the agent's RBAC allow get on nodes?)")
        })
    };
    let node = match read_node().await {
        Ok(Some(n)) => n,
        Ok(None) => {
            error!("Node {node_name} does not exist; is NODE_NAME right?");
            return Attempt::End(TurnEnd::NodeGone);
        }
        Err(e) => return Attempt::Retry(e),
    };
    if lapsed.is_none()
        && let Resume::Finished(status) = where_to_start(a, &node)
    {
        info!(%status, "this turn already ended on the node; making sure the Lease is free");
        release_stale_in(agent, a.slot).await;
        return Attempt::End(TurnEnd::Finished);
    }

    // The Lease of this turn's wave slot (the upgrade Lease itself with batch-size 1).
    let lease = agent.slot_lease(a.slot);
    let retaken = match lapsed {
        None => None,
        Some(transitions) => match lease.retake(transitions).await {
            Ok(held) => {
                info!("nobody took the Lease while our hold had lapsed; took it again");
                agent.metrics.lease_held();
                Some(held)
            }
            Err(RetakeError::Free) => {
                info!("the Lease is free (deleted and recreated, or cleared); taking it again");
                None
            }
            Err(RetakeError::Lost(why)) => {
                lost_for_good(agent, &node, &a.run_id, &why);
                return Attempt::End(TurnEnd::LeaseLost(why));
            }
            Err(RetakeError::Api(e)) => return Attempt::Retry(format!("reading the Lease: {e}")),
        },
    };
    let held = match retaken {
        Some(held) => held,
        None => {
            info!("our turn: waiting for the upgrade Lease");
            let mut revoked = signal.clone();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Attempt::End(TurnEnd::Shutdown),
                _ = revoked.wait_for(|s| s.revoked) => return Attempt::End(TurnEnd::Revoked),
                held = lease.acquire() => match held {
                    Ok(h) => {
                        agent.metrics.lease_taken(h.taken_over_from());
                        h
                    }
                    Err(e) => return Attempt::Retry(format!(
                        "taking the upgrade Lease {}: {e} (the agent needs get/watch/update on leases in its namespace)",
                        lease.name()
                    )),
                },
            }
        }
    };

    // Read the Node again: it may have changed while we waited for the Lease.
    let node = match read_node().await {
        Ok(Some(n)) => n,
        Ok(None) => {
            log_release(held.release().await);
            return Attempt::End(TurnEnd::NodeGone);
        }
        Err(e) => {
            // Still ours: the retry re-takes our own Lease without a transition.
            held.keep().await;
            return Attempt::Retry(e);
        }
    };
    // The grant must still name this turn on the Node as read now: the watch that started the
    // turn may lag behind a revocation (the coordinator removes the grant before our first
    // write, which is conditioned on this read, can land).
    // (An unreadable grant says nothing about the turn, as in the driver.)
    let revoked = match turn::read_node(Some(&node)) {
        Reading::Turn(now) => now.key() != a.key(),
        Reading::Idle => true,
        Reading::Unusable(_) => false,
    };
    if revoked {
        info!("the grant on our Node no longer names this turn; releasing the Lease");
        log_release(held.release().await);
        return Attempt::End(TurnEnd::Revoked);
    }
    let at = match where_to_start(a, &node) {
        Resume::Finished(_) => {
            log_release(held.release().await);
            return Attempt::End(TurnEnd::Finished);
        }
        Resume::At(at) => at,
    };
    let rec = NodeRecord::of(&node);
    let resumed = rec.is_turn(&a.run_id, a.kind);
    let mut ctx = TurnCtx {
        agent,
        rec: TurnRecord {
            a: a.clone(),
            node,
            evidence: Evidence {
                run_id: a.run_id.clone(),
                node: node_name.to_string(),
                ..Default::default()
            },
            began_ms: mono_ms(),
            requests_at_start,
        },
        fence: held.fence(),
        shutdown: shutdown.clone(),
        signal: signal.clone(),
    };
    if resumed {
        info!(status = %at, "resuming the turn where the Node says it stopped");
        let why = if lapsed.is_some() {
            "the Lease lapsed during the turn (API unreachable); resumed"
        } else {
            "agent restarted during the turn; resumed"
        };
        ctx.rec.note(format!("{why} at {at}"));
        ctx.event(
            false,
            "Resumed",
            format!("node {node_name}: agent resumed its turn at {at}"),
        );
    }
    let result = steps::execute(&mut ctx, at).await;
    let transitions = ctx.fence.transitions();
    let node = ctx.rec.node.clone();
    drop(ctx);
    finish(held, result, transitions, agent, &node, &a.run_id).await
}

async fn finish(
    held: HeldLease,
    result: Result<steps::Outcome, Stop>,
    transitions: i32,
    agent: &Agent,
    node: &Node,
    run_id: &str,
) -> Attempt {
    Attempt::End(match result {
        Ok(outcome) => {
            log_release(held.release().await);
            info!(?outcome, "turn finished; Lease released");
            TurnEnd::Finished
        }
        Err(Stop::Shutdown) => {
            held.park().await;
            TurnEnd::Shutdown
        }
        Err(Stop::Revoked) => {
            warn!(
                "the grant on our Node no longer names this turn; stopping and releasing the Lease"
            );
            log_release(held.release().await);
            TurnEnd::Revoked
        }
        Err(Stop::NodeGone) => {
            warn!("our Node object was deleted; stopping");
            log_release(held.release().await);
            TurnEnd::NodeGone
        }
        Err(Stop::Superseded(reason)) => {
            error!(%reason, "the coordinator has recorded this node's outcome; stopped");
            log_release(held.release().await);
            TurnEnd::LeaseLost(reason)
        }
        Err(Stop::LeaseLost(reason)) => {
            warn!(%reason, "the upgrade Lease is not confirmed; stopped mutating");
            agent.metrics.lease_lost();
            drop(held);
            return Attempt::Lapsed(transitions);
        }
        Err(Stop::Abandoned(reason)) => {
            error!(%reason, "abandoning the turn; the Lease expires and the coordinator fails the node");
            lease_lost_event(agent, node, run_id, &reason);
            drop(held);
            TurnEnd::LeaseLost(reason)
        }
    })
}

fn where_to_start(a: &Assignment, node: &Node) -> Resume {
    let rec = NodeRecord::of(node);
    resume(
        a.kind,
        &a.run_id,
        rec.run_id.as_deref(),
        rec.turn,
        rec.status,
    )
}

fn log_release(r: kube::Result<()>) {
    if let Err(e) = r {
        warn!(error = %e, "could not release the upgrade Lease; it expires by itself");
    }
}

/// A Lease still held by this node from an earlier process whose turn is over (slot 0: a
/// stale hold of another wave slot's Lease, not renewed, expires by itself).
pub async fn release_stale(agent: &Agent) {
    release_stale_in(agent, 0).await
}

/// A hold of wave slot `slot`'s Lease left by an earlier process whose turn is over.
pub async fn release_stale_in(agent: &Agent, slot: u32) {
    match agent.slot_lease(slot).release_if_held().await {
        Ok(true) => info!("released an upgrade Lease left held by an earlier agent process"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "could not check the upgrade Lease"),
    }
}

/// Someone else took the Lease while our hold had lapsed: we never mutate again in this turn,
/// and say what we leave behind.
fn lost_for_good(agent: &Agent, node: &Node, run_id: &str, why: &str) {
    let rec = NodeRecord::of(node);
    let cordoned = rec.cordoned_by_us && rec.unschedulable;
    let reason = if cordoned {
        format!(
            "{why}; node {} stays cordoned by kata-lifecycle-manager until the run restores it or an operator uncordons it",
            agent.node_name()
        )
    } else {
        why.to_string()
    };
    error!(%reason, "the upgrade Lease was taken while our hold had lapsed; stopped for good");
    lease_lost_event(agent, node, run_id, &reason);
}

fn lease_lost_event(agent: &Agent, node: &Node, run_id: &str, reason: &str) {
    let events = agent.events.clone();
    let target = klm_kube::events::node_ref(agent.node_name(), node.metadata.uid.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use klm_protocol::lease::MIN_DURATION_SECONDS;

    /// Issue 9 (API outage longer than the Lease): the waits between attempts at a lapsed turn
    /// grew to 15 s (30 s with jitter) during a long outage, so after the API server came back
    /// the agent could stay silent past a fresh coordinator's Lease duration plus grace (6 s +
    /// 10 s in the end-to-end test) and a healthy node was declared lost. However long the
    /// outage, every wait stays under the shortest Lease a coordinator may set.
    #[test]
    fn waits_between_turn_attempts_stay_under_the_shortest_lease() {
        let shortest_lease = Duration::from_secs(MIN_DURATION_SECONDS as u64);
        let waits: Vec<Duration> = turn_retry_backoff().take(200).collect();
        assert_eq!(waits.len(), 200, "retries for as long as the turn is ours");
        let longest = waits.iter().max().copied().unwrap_or_default();
        assert!(
            longest < shortest_lease,
            "a wait of {longest:?} may outlast a {shortest_lease:?} Lease"
        );
    }
}
