//! The health gates' observations, fed to the run machine; what holds the run is the machine's
//! decision (`klm_protocol::grant_gate`):
//! - [`PodGate`]: a reflector on the pods matching the active run's `blocking-pod-selector`
//!   (all namespaces, filtered by the API server), running only while such a run is active; its
//!   list is fed (`Input::BlockingPods`) each time it changes;
//! - [`AlertGate`]: Prometheus's `GET /api/v1/alerts`, polled every interval while a run with the
//!   alert gate is active (an HTTP API offers no watch); fed (`Input::FiringAlerts`) when the
//!   answer changes.
use bytes::Bytes;
use futures::FutureExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use klm_protocol::grant_gate::BlockingPod;
use klm_protocol::run_machine::Input;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The pod watch of the current selector, if any.
pub struct PodGate {
    api: Api<Pod>,
    notify: Arc<Notify>,
    watch: Option<Watch>,
}

struct Watch {
    /// The run it observes for: a new run is fed the list again.
    run: String,
    selector: String,
    store: Store<Pod>,
    task: JoinHandle<()>,
    /// The list last fed to the machine (fed again only when it changes).
    fed: Option<Vec<BlockingPod>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodGate {
    pub fn new(client: kube::Client, notify: Arc<Notify>) -> Self {
        PodGate {
            api: Api::all(client),
            notify,
            watch: None,
        }
    }

    /// Watches the pods matching the active run's `selector` (validated by the run's
    /// admission), or nothing (`None`: no active run with a pod gate). A changed selector
    /// restarts the watch; a new run with the same selector is fed the current list again.
    pub fn follow(&mut self, wanted: Option<(&str, &str)>) {
        if let (Some(w), Some((run, selector))) = (self.watch.as_mut(), wanted)
            && w.selector == selector
        {
            if w.run != run {
                w.run = run.to_string();
                w.fed = None;
            }
            return;
        }
        if self.watch.is_none() && wanted.is_none() {
            return;
        }
        self.watch = wanted.map(|(run, selector)| {
            tracing::info!(selector, "watching pods of the blocking-pod gate");
            let cfg = watcher::Config::default().labels(selector);
            let (store, task) =
                klm_kube::watch::reflect(self.api.clone(), cfg, self.notify.clone());
            Watch {
                run: run.to_string(),
                selector: selector.to_string(),
                store,
                task,
                fed: None,
            }
        });
        if self.watch.is_none() {
            tracing::info!("blocking-pod gate watch stopped");
        }
    }

    /// The current list, if the watch has listed and it changed since it was last fed.
    pub fn observe(&mut self) -> Option<Input> {
        let w = self.watch.as_mut()?;
        // Until the first list arrived the machine knows nothing (and holds the turn); the
        // reflector's first list wakes the main loop, which asks again.
        w.store.wait_until_ready().now_or_never()?.ok()?;
        let mut pods: Vec<BlockingPod> = w.store.state().iter().map(|p| blocking_pod(p)).collect();
        pods.sort();
        if w.fed.as_ref() == Some(&pods) {
            return None;
        }
        w.fed = Some(pods.clone());
        Some(Input::BlockingPods {
            selector: w.selector.clone(),
            pods,
        })
    }
}

fn blocking_pod(p: &Pod) -> BlockingPod {
    BlockingPod {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        phase: p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
    }
}

/// The Prometheus alert gate's poller.
pub struct AlertGate {
    url: String,
    interval: Duration,
    notify: Arc<Notify>,
    poll: Option<Poll>,
}

type Polled = Result<Vec<String>, String>;

struct Poll {
    /// The run it polls for: a new run is fed the last answer again.
    run: String,
    latest: Arc<Mutex<Option<Polled>>>,
    task: JoinHandle<()>,
    fed: Option<Polled>,
}

impl Drop for Poll {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bound of one request to Prometheus (a hung one must not stall the gate).
const ALERTS_TIMEOUT: Duration = Duration::from_secs(10);

impl AlertGate {
    /// `url`: Prometheus's base URL (empty: no alert gate, [`AlertGate::follow`] never polls).
    pub fn new(url: &str, interval: Duration, notify: Arc<Notify>) -> Self {
        AlertGate {
            url: url.trim().trim_end_matches('/').to_string(),
            interval,
            notify,
            poll: None,
        }
    }

    /// Polls while a run with the alert gate is active (`run`: its id), stops otherwise.
    pub fn follow(&mut self, run: Option<&str>) {
        let run = run.filter(|_| !self.url.is_empty());
        match (self.poll.as_mut(), run) {
            (Some(p), Some(run)) => {
                if p.run != run {
                    p.run = run.to_string();
                    p.fed = None;
                }
            }
            (Some(_), None) => {
                tracing::info!("Prometheus alert gate: polling stopped");
                self.poll = None;
            }
            (None, None) => {}
            (None, Some(run)) => {
                tracing::info!(url = %self.url, interval = ?self.interval, "Prometheus alert gate: polling alerts");
                let latest: Arc<Mutex<Option<Polled>>> = Arc::default();
                let task = tokio::spawn(poll_loop(
                    format!("{}/api/v1/alerts", self.url),
                    self.interval,
                    latest.clone(),
                    self.notify.clone(),
                ));
                self.poll = Some(Poll {
                    run: run.to_string(),
                    latest,
                    task,
                    fed: None,
                });
            }
        }
    }

    /// The last answer, if it changed since it was last fed.
    pub fn observe(&mut self) -> Option<Input> {
        let poll = self.poll.as_mut()?;
        let latest = poll.latest.lock().ok()?.clone()?;
        if poll.fed.as_ref() == Some(&latest) {
            return None;
        }
        poll.fed = Some(latest.clone());
        Some(Input::FiringAlerts(latest))
    }
}

async fn poll_loop(
    url: String,
    interval: Duration,
    latest: Arc<Mutex<Option<Polled>>>,
    notify: Arc<Notify>,
) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let answer = firing_alerts(&client, &url).await;
        if let Err(e) = &answer {
            tracing::warn!(url, error = %e, "Prometheus alert gate: cannot read the alerts");
        }
        let changed = match latest.lock() {
            Ok(mut l) => {
                let changed = l.as_ref() != Some(&answer);
                *l = Some(answer);
                changed
            }
            Err(_) => false,
        };
        if changed {
            notify.notify_one();
        }
        tokio::time::sleep(interval).await;
    }
}

async fn firing_alerts(client: &Client<HttpConnector, Empty<Bytes>>, url: &str) -> Polled {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("bad Prometheus URL {url:?}: {e}"))?;
    let response = tokio::time::timeout(ALERTS_TIMEOUT, client.get(uri))
        .await
        .map_err(|_| format!("no answer from {url} within {ALERTS_TIMEOUT:?}"))?
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    let body = tokio::time::timeout(ALERTS_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| format!("{url}: the answer did not complete within {ALERTS_TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("GET {url} answered {status}"));
    }
    klm_protocol::grant_gate::firing_alert_names(&String::from_utf8_lossy(&body))
}
