//! The blocking-pod health gate's observation: a reflector on the pods matching the active run's
//! `blocking-pod-selector` (all namespaces, filtered by the API server), running only while such
//! a run is active, whose list is fed to the run machine (`Input::BlockingPods`) each time it
//! changes. What blocks which node is the machine's decision (`klm_protocol::grant_gate`).
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use klm_protocol::grant_gate::BlockingPod;
use klm_protocol::run_machine::Input;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The pod watch of the current selector, if any.
pub struct PodGate {
    api: Api<Pod>,
    notify: Arc<Notify>,
    watch: Option<Watch>,
}

struct Watch {
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

    /// Watches the pods matching `selector` (validated by the run's admission), or nothing
    /// (`None`: no active run with a pod gate). A changed selector restarts the watch.
    pub fn follow(&mut self, selector: Option<&str>) {
        if self.watch.as_ref().map(|w| w.selector.as_str()) == selector {
            return;
        }
        self.watch = selector.map(|selector| {
            tracing::info!(selector, "watching pods of the blocking-pod gate");
            let cfg = watcher::Config::default().labels(selector);
            let (store, task) =
                klm_kube::watch::reflect(self.api.clone(), cfg, self.notify.clone());
            Watch {
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
