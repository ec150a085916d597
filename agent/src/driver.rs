//! The agent's main loop: one watch on its own Node (by name: a field selector, so it receives
//! only that object's changes, whatever the size of the fleet). When the grant the coordinator
//! wrote there (`klm_protocol::grant`) names a turn, a turn task runs it; the task is told when
//! the grant is taken back or changed, and when the run asks it to stop (cancel).
//! Idle cost: that single watch. The upgrade Lease is watched only while a turn takes or holds it.
use crate::ctx::{Agent, TurnSignal};
use crate::runner::{self, TurnEnd};
use crate::turn::{Assignment, Reading, TurnKey, read_node};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use klm_kube::health::Heartbeat;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::watch_object;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

struct Running {
    key: TurnKey,
    signal: watch::Sender<TurnSignal>,
    task: JoinHandle<TurnEnd>,
}

/// Runs until `shutdown`; then waits for a turn in progress to stop between steps.
pub async fn run(
    agent: Arc<Agent>,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
    heartbeat: Heartbeat,
) {
    let cfg = &agent.config;
    let api: Api<Node> = Api::all(agent.client.clone());
    let mut events = watch_object(api, &cfg.node_name)
        .backoff(klm_kube::retry::watch_backoff())
        .boxed();
    info!(
        node = %cfg.node_name,
        namespace = %cfg.namespace,
        lease = %cfg.lease_name,
        "watching this node's Node for its turn (the coordinator's grant)"
    );

    let mut reading = Reading::Idle;
    let mut listed = false;
    let mut running: Option<Running> = None;
    // The last turn a task ran to its end: not started again for the same grant.
    let mut ended: Option<TurnKey> = None;
    let mut swept = false;
    let mut said = String::new();

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            end = async { (&mut running.as_mut().expect("guarded").task).await }, if running.is_some() => {
                let r = running.take().expect("guarded");
                match end {
                    Ok(end) => info!(run = %r.key.0, turn = r.key.1.as_str(), ?end, "turn task ended"),
                    Err(e) => error!(run = %r.key.0, error = %e, "turn task panicked"),
                }
                ended = Some(r.key);
            }
            ev = events.next() => {
                let changed = match ev {
                    Some(Ok(node)) => {
                        // A deleted Node carries no grant: a turn in progress stops (its next
                        // Node write finds the Node gone too).
                        reading = read_node(node.as_ref());
                        if !listed {
                            listed = true;
                            let _ = ready.send(true);
                        }
                        true
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "watch on this node's Node failed; retrying (the agent needs get/list/watch on nodes)");
                        false
                    }
                    None => false,
                };
                if !changed {
                    continue;
                }
            }
        }
        // Busy from here to the end of the iteration: what follows acts on the change.
        let _busy = heartbeat.busy();

        let assignment: Option<&Assignment> = match &reading {
            Reading::Turn(a) => Some(a),
            Reading::Unusable(msg) => {
                if *msg != said {
                    error!("{msg}");
                    said = msg.clone();
                }
                None
            }
            Reading::Idle => None,
        };
        let want = assignment.map(Assignment::key);

        // Tell a running turn whether it is still ours, and whether the run asks it to stop. An
        // unreadable grant says nothing about the turn (someone overwrote it; the coordinator,
        // its only writer, puts it back): a running turn keeps going rather than being revoked.
        if let Some(r) = &running
            && !matches!(reading, Reading::Unusable(_))
        {
            let now = TurnSignal {
                revoked: want.as_ref() != Some(&r.key),
                cancel: assignment.is_some_and(|a| a.cancel_requested),
            };
            r.signal.send_if_modified(|v| {
                let changed = *v != now;
                *v = now;
                changed
            });
        }
        if ended.is_some() && ended != want {
            ended = None;
        }
        if running.is_none()
            && let Some(a) = assignment
            && ended.as_ref() != Some(&a.key())
        {
            running = Some(spawn_turn(agent.clone(), a.clone(), shutdown.clone()));
        }
        // Once, after start: a Lease this node still holds while no turn is ours is left over
        // from an earlier process (e.g. stopped with SIGTERM after which the run moved on).
        if listed && !swept && reading == Reading::Idle && running.is_none() {
            swept = true;
            runner::release_stale(&agent).await;
        }
    }

    let _ = ready.send(false);
    if let Some(r) = running {
        info!(
            "shutting down: stopping the turn between steps (the upgrade Lease is kept for the restarted agent)"
        );
        match r.task.await {
            Ok(end) => info!(?end, "turn stopped"),
            Err(e) => error!(error = %e, "turn task panicked"),
        }
    }
}

fn spawn_turn(agent: Arc<Agent>, a: Assignment, shutdown: CancellationToken) -> Running {
    let (tx, rx) = watch::channel(TurnSignal {
        revoked: false,
        cancel: a.cancel_requested,
    });
    let key = a.key();
    let span = info_span!(
        "turn",
        node = %agent.config.node_name,
        run = %a.run_id,
        turn = a.kind.as_str(),
    );
    info!(run = %a.run_id, turn = a.kind.as_str(), target = %a.target_version, "this node's turn");
    let task = tokio::spawn(
        async move { runner::run_turn(&agent, a, rx, shutdown).await }.instrument(span),
    );
    Running {
        key,
        signal: tx,
        task,
    }
}
