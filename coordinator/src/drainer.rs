//! The drainer: the leading coordinator evicts the pods of a node whose agent asked for it —
//! the agent itself holds no eviction right, since no admission policy can tie an eviction to
//! the evicted pod's node (chart README, RBAC). It watches the Nodes in `draining` (by our status
//! label) and the run record; `drain_request::judge` admits a request only for a node the
//! active run has granted that turn, in `draining`, cordoned, with the drain on. Each admitted
//! node gets its own task (several nodes may drain at once), driving the pure `drain::Drain`
//! machine over a watch of that node's pods and reporting on the Node
//! (`drain_request::DrainResult`), which the agent waits for. A refused request evicts nothing
//! and is logged (and, for a node of the run, reported on that Node and as an Event).
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use klm_kube::events::{Events, node_ref};
use klm_kube::lease::FenceGuard;
use klm_kube::time::mono_ms;
use klm_protocol::backoff::jittered;
use klm_protocol::drain::{Drain, DrainPod, DrainStep, Eviction, refusal};
use klm_protocol::drain_request::{
    DrainRequest, DrainResult, Verdict, admit, cancel_requested, judge,
};
use klm_protocol::keys::{node as node_keys, status_data};
use klm_protocol::node_record::{NodePatch, NodeRecord};
use klm_protocol::procedure::{Budget, sleep_for};
use klm_protocol::{NodeStatus, RunRecord};
use kube::api::{Api, EvictParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Field manager of the drainer's Node writes.
const FIELD_MANAGER: &str = "kata-lifecycle-manager-drainer";
/// Attempts at writing a final report before giving up (the agent then times out by itself).
const FINAL_REPORT_ATTEMPTS: u32 = 8;
/// Attempts at a progress report or a refusal (the next change brings another).
const REPORT_ATTEMPTS: u32 = 3;
const REPORT_RETRY_BASE: Duration = Duration::from_millis(250);
const REPORT_RETRY_CAP: Duration = Duration::from_secs(4);

/// What every drain task shares: the watches and the handles to act.
#[derive(Clone)]
struct Shared {
    client: kube::Client,
    node_api: Api<Node>,
    nodes: Store<Node>,
    trigger: Store<ConfigMap>,
    trigger_ref: ObjectRef<ConfigMap>,
    events: Events,
    /// The leader Lease: no eviction or report once it is lost.
    leadership: Option<FenceGuard>,
}

impl Shared {
    /// The run record as the trigger ConfigMap shows it now (an unreadable one: no run).
    fn run(&self) -> Option<RunRecord> {
        let cm = self.trigger.get(&self.trigger_ref)?;
        let text = cm.data.as_ref()?.get(status_data::RUN)?;
        RunRecord::from_json(text).ok()
    }

    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    fn leading(&self) -> bool {
        match self.leadership.as_ref().map(FenceGuard::check) {
            Some(Err(lost)) => {
                warn!(why = %lost.0, "leadership lost: the drainer stops acting");
                false
            }
            _ => true,
        }
    }

    /// Writes `result` on the Node, unless the Node no longer asks for it: preconditioned on
    /// the Node's `resourceVersion` as last seen (`seen`, else read), and judged again on a
    /// conflict, so a report never lands on top of a withdrawn request or a final answer the
    /// watch had not shown yet (which would leave a stale report behind).
    async fn report(
        &self,
        node: &str,
        result: &DrainResult,
        seen: Option<Arc<Node>>,
        attempts: u32,
    ) -> Reported {
        let request = DrainRequest::new(&result.run_id, result.turn);
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let mut current = seen;
        for attempt in 0..attempts {
            if !self.leading() {
                return Reported::Moot;
            }
            let fresh = match current.take() {
                Some(n) => n,
                None => match self.node_api.get_opt(node).await {
                    Ok(Some(n)) => Arc::new(n),
                    Ok(None) => return Reported::Moot,
                    Err(e) => {
                        retry_wait(attempt, &e).await;
                        continue;
                    }
                },
            };
            let record = NodeRecord::of(&fresh);
            let answered = record
                .drain_result
                .as_ref()
                .is_some_and(|r| request.answered_by(r) && r.state.is_final());
            if record.drain_request.as_deref() != Some(request.value().as_str()) || answered {
                return Reported::Moot;
            }
            let patch = NodePatch::default()
                .drain_result(Some(result))
                .precondition(record.resource_version.as_deref())
                .to_json();
            match self.node_api.patch(node, &pp, &Patch::Merge(patch)).await {
                Ok(_) => return Reported::Written,
                Err(e) if is_status(&e, 404) => return Reported::Moot,
                // Changed since we looked: read it again and judge again.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => retry_wait(attempt, &e).await,
            }
        }
        Reported::Failed
    }

    fn event(&self, node: &Node, warning: bool, reason: &'static str, note: String) {
        let events = self.events.clone();
        let target = node_ref(
            node.metadata.name.as_deref().unwrap_or_default(),
            node.metadata.uid.clone(),
        );
        tokio::spawn(async move {
            events
                .publish(&target, warning, reason, "Drain", note)
                .await;
        });
    }
}

/// Starts the drainer next to the run driver; it runs until the process ends (leadership lost
/// ends the process).
pub fn spawn(
    client: kube::Client,
    namespace: &str,
    trigger_configmap: &str,
    events: Events,
    leadership: Option<FenceGuard>,
) -> JoinHandle<()> {
    let changed = Arc::new(Notify::new());
    let node_api: Api<Node> = Api::all(client.clone());
    // Only Nodes our agents mark `draining` carry a request worth reading.
    let draining = format!("{}={}", node_keys::STATUS, NodeStatus::Draining.as_str());
    let (nodes, _) = klm_kube::watch::reflect(
        node_api.clone(),
        watcher::Config::default().labels(&draining),
        changed.clone(),
    );
    let (trigger, _) = klm_kube::watch::reflect(
        Api::<ConfigMap>::namespaced(client.clone(), namespace),
        watcher::Config::default().fields(&format!("metadata.name={trigger_configmap}")),
        changed.clone(),
    );
    let shared = Shared {
        client,
        node_api,
        nodes,
        trigger,
        trigger_ref: ObjectRef::new(trigger_configmap).within(namespace),
        events,
        leadership,
    };
    tokio::spawn(supervise(shared, changed).instrument(info_span!("drainer")))
}

/// How a report ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reported {
    Written,
    /// The Node no longer asks (request withdrawn or already answered, Node gone, leadership
    /// lost): nothing to say.
    Moot,
    /// The API kept failing.
    Failed,
}

/// Waits before another attempt at a report after an API error.
async fn retry_wait(attempt: u32, e: &kube::Error) {
    let wait = jittered(attempt, REPORT_RETRY_BASE, REPORT_RETRY_CAP, rand::random());
    warn!(error = %e, ?wait, "could not write the drain report; retrying");
    tokio::time::sleep(wait).await;
}

/// One node's drain in progress.
struct Task {
    handle: JoinHandle<()>,
    /// Wakes the task to judge its request again (the run record or the Node changed).
    wake: Arc<Notify>,
}

/// On every change of the draining Nodes or the run record: start a task for each newly
/// admitted request, wake the running ones, and log (once per request and reason) the refused.
async fn supervise(sh: Shared, changed: Arc<Notify>) {
    if let Err(e) = sh.nodes.wait_until_ready().await {
        error!(error = %e, "the Node watch stopped before listing; no drains");
        return;
    }
    if let Err(e) = sh.trigger.wait_until_ready().await {
        error!(error = %e, "the trigger watch stopped before listing; no drains");
        return;
    }
    let mut tasks: BTreeMap<String, Task> = BTreeMap::new();
    // The last refusal logged per node (request and reason), so a repeated request is not news.
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let run = sh.run();
        tasks.retain(|_, t| !t.handle.is_finished());
        for t in tasks.values() {
            t.wake.notify_one();
        }
        let nodes = sh.nodes.state();
        refused.retain(|name, _| nodes.iter().any(|n| n.metadata.name.as_ref() == Some(name)));
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let record = NodeRecord::of(&node);
            let Some(value) = record.drain_request.clone() else {
                continue;
            };
            match judge(&value, &name, &record, run.as_ref()) {
                Verdict::Drain(request) => {
                    refused.remove(&name);
                    if !tasks.contains_key(&name) && sh.leading() {
                        let wake = Arc::new(Notify::new());
                        let span = info_span!("drain", node = %name, run = %request.run_id);
                        let handle = tokio::spawn(
                            drain_node(sh.clone(), name.clone(), request, wake.clone(), {
                                let changed = changed.clone();
                                move || changed.notify_one()
                            })
                            .instrument(span),
                        );
                        tasks.insert(name, Task { handle, wake });
                    }
                }
                Verdict::Answered => {
                    refused.remove(&name);
                }
                Verdict::Refuse { why, report } => {
                    let key = format!("{value}: {why}");
                    if refused.get(&name) == Some(&key) {
                        continue;
                    }
                    refused.insert(name.clone(), key);
                    let Some(report) = report else {
                        debug!(node = %name, request = %value, %why, "ignoring a drain request");
                        continue;
                    };
                    warn!(node = %name, request = %value, %why, "refusing a drain request: nothing evicted");
                    if sh.leading() {
                        sh.event(
                            &node,
                            true,
                            "DrainRequestRefused",
                            format!("node {name}: drain request {value} refused: {why}"),
                        );
                        sh.report(&name, &report, Some(node.clone()), REPORT_ATTEMPTS)
                            .await;
                    }
                }
            }
        }
        changed.notified().await;
    }
}

/// One node's drain, while its request stays admitted: evict what `Drain` names, report
/// progress when something new blocks it, and the outcome. Calls `ended` when it stops, so the
/// supervisor judges the Node again.
async fn drain_node(
    sh: Shared,
    node: String,
    request: DrainRequest,
    wake: Arc<Notify>,
    ended: impl FnOnce(),
) {
    drain(&sh, &node, &request, &wake).await;
    ended();
}

async fn drain(sh: &Shared, node: &str, request: &DrainRequest, wake: &Arc<Notify>) {
    let Some((budget, limit)) = budget(sh) else {
        return;
    };
    info!(
        timeout_s = limit.as_secs(),
        "drain request admitted: evicting the node's pods"
    );
    let mut machine = Drain::new(node, budget);
    let (pods, task) = klm_kube::watch::reflect(
        Api::<Pod>::all(sh.client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        wake.clone(),
    );
    let _stop_watching = AbortOnDrop(task);
    let start = DrainResult::progress(request, "evicting the node's pods");
    if sh
        .report(node, &start, sh.node(node), REPORT_ATTEMPTS)
        .await
        == Reported::Moot
    {
        // Answered already (our watch had not shown it yet) or withdrawn meanwhile.
        info!("the request needs no drain any more");
        return;
    }
    let mut listed = false;
    let mut ready = std::pin::pin!(pods.wait_until_ready());
    let mut evicted = 0usize;
    loop {
        // Judged again at every move: a cancelled run, a turn taken back or a Node that left
        // `draining` stops the evictions at once.
        let (Some(current), run) = (sh.node(node), sh.run()) else {
            info!("the node left draining: drain stopped");
            return;
        };
        let record = NodeRecord::of(&current);
        let still = record
            .drain_request
            .as_deref()
            .map(|v| admit(v, node, &record, run.as_ref()));
        let cancel = match (still, &run) {
            (Some(Ok(r)), Some(run)) if r == *request => cancel_requested(run, request),
            (other, _) => {
                let why = match other {
                    Some(Err(why)) => why.to_string(),
                    _ => "the request was withdrawn".into(),
                };
                info!(%why, "drain stopped");
                return;
            }
        };
        let seen: Option<Vec<DrainPod>> =
            listed.then(|| pods.state().iter().map(|p| DrainPod::of(p)).collect());
        let now = mono_ms();
        let wait = match machine.next(seen.as_deref(), now, cancel) {
            DrainStep::Done => {
                info!(evicted, "node drained");
                let msg = format!("{evicted} pod(s) evicted");
                let done = DrainResult::done(request, msg.clone());
                final_report(sh, node, &done, current.clone()).await;
                sh.event(
                    &current,
                    false,
                    "Drained",
                    format!("node {node}: drained, {msg}"),
                );
                return;
            }
            DrainStep::Failed(cause) => {
                warn!(reason = %cause.reason, message = %cause.message, "drain failed");
                sh.event(
                    &current,
                    true,
                    "DrainFailed",
                    format!("node {node}: {}: {}", cause.reason, cause.message),
                );
                let failed = DrainResult::failed(request, cause);
                final_report(sh, node, &failed, current.clone()).await;
                return;
            }
            DrainStep::Evict(key) => {
                let Some(pod) = seen.iter().flatten().find(|p| p.key == key).cloned() else {
                    continue;
                };
                if !sh.leading() {
                    return;
                }
                let outcome = evict(&sh.client, &key).await;
                if outcome == Eviction::Evicted {
                    evicted += 1;
                }
                if let Some(why) = machine.record(&pod, outcome, mono_ms(), rand::random()) {
                    warn!(pod = %key, "{why}; retrying");
                    sh.event(
                        &current,
                        true,
                        "EvictionBlocked",
                        format!("pod {key}: {why}"),
                    );
                    let progress = DrainResult::progress(request, format!("pod {key} {why}"));
                    sh.report(node, &progress, sh.node(node), REPORT_ATTEMPTS)
                        .await;
                }
                continue;
            }
            DrainStep::WaitUntil(at) => sleep_for(at, now),
        };
        tokio::select! {
            r = &mut ready, if !listed => {
                if r.is_err() {
                    warn!("the pod watch stopped");
                }
                listed = true;
            }
            _ = wake.notified() => {}
            _ = sleep_or_never(wait) => {}
        }
    }
}

/// The outcome must reach the agent, which waits for it.
async fn final_report(sh: &Shared, node: &str, result: &DrainResult, seen: Arc<Node>) {
    if sh
        .report(node, result, Some(seen), FINAL_REPORT_ATTEMPTS)
        .await
        == Reported::Failed
    {
        error!("could not report the drain's outcome; the agent will time out waiting for it");
    }
}

/// The drain timeout of the run, counted on this process's monotonic clock from when it admitted
/// the request. Never from the Node's recorded `draining` start: that time is the agent's clock,
/// and an agent 45 s behind made every drain time out at once (`faults.rs`
/// `agents_with_skewed_clocks_keep_their_turns_and_never_share_the_lease`). A new leader gives a
/// fresh budget; the agent's own wait (drain timeout plus a grace, on its clock) bounds the whole.
fn budget(sh: &Shared) -> Option<(Budget, Duration)> {
    let limit = sh.run()?.params.as_ref()?.drain_timeout();
    Some((Budget::new(mono_ms(), limit), limit))
}

/// One eviction, as the machine needs to hear about it. Every failure but "gone" is retried
/// with backoff and, at the timeout, named: a PodDisruptionBudget (429), a server error, or a
/// refusal such as a missing RBAC right.
async fn evict(client: &kube::Client, key: &str) -> Eviction {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api.evict(name, &EvictParams::default()).await {
        Ok(_) => {
            info!(pod = %key, "evicted");
            Eviction::Evicted
        }
        Err(e) if is_status(&e, 404) => Eviction::Gone,
        Err(kube::Error::Api(status)) if status.code == 429 => {
            let causes: Vec<&str> = status
                .details
                .as_ref()
                .map(|d| d.causes.iter().map(|c| c.message.as_str()).collect())
                .unwrap_or_default();
            Eviction::Refused(refusal(&status.message, &causes))
        }
        Err(kube::Error::Api(status)) => Eviction::Refused(format!(
            "eviction failed ({}): {}",
            status.code, status.message
        )),
        Err(e) => Eviction::Refused(format!("eviction failed: {e}")),
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Sleeps for `wait`, or forever when there is nothing to wake for.
async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Stops a watch task when the drain ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
