//! Waiting on the API server with watches and an overall timeout — never a sleep-and-poll loop.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::wait::{Condition, await_condition};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// The default bound for waits on a healthy local cluster (everything normally takes well
/// under a couple of seconds; the margin is for a loaded 2-core CI machine).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the object `name` satisfies `cond`; returns it (None if it was deleted and
/// `cond` accepts deletion).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Condition<K>,
) -> Result<Option<K>>
where
    K: Clone + Debug + Send + DeserializeOwned + Resource + 'static,
{
    tokio::time::timeout(timeout, await_condition(api.clone(), name, cond))
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?} waiting for {what}"))?
        .with_context(|| format!("watching for {what}"))
}

/// Watches the objects matching `config` until `done(objects)` returns `Some`; returns that.
/// `done` sees complete listings only (after the initial list, then after every change).
pub async fn wait_list<K, T>(
    api: &Api<K>,
    config: watcher::Config,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Arc<K>]) -> Option<T>,
) -> Result<T>
where
    K: Clone + Debug + Send + Sync + DeserializeOwned + Resource + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let mut events =
        std::pin::pin!(reflector(writer, watcher(api.clone(), config)).default_backoff());
    let mut listed = false;
    let watch = async {
        while let Some(event) = events.try_next().await? {
            match event {
                watcher::Event::InitDone => listed = true,
                watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                _ => {}
            }
            if listed && let Some(t) = done(&store.state()) {
                return Ok(t);
            }
        }
        Err(anyhow!("watch ended"))
    };
    match tokio::time::timeout(timeout, watch).await {
        Ok(r) => r.with_context(|| format!("watching for {what}")),
        Err(_) => {
            let names: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
            Err(anyhow!(
                "timed out after {timeout:?} waiting for {what} (last seen: {names:?})"
            ))
        }
    }
}

pub fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn is_node_ready(node: &Node) -> bool {
    node_ready_status(node) == Some(true)
}

/// Some(true/false) from the node's Ready condition; None before any kubelet (kwok) reported.
pub fn node_ready_status(node: &Node) -> Option<bool> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True")
}

/// A [`Condition`] from a predicate on the (present) object.
pub fn when<K>(f: impl Fn(&K) -> bool) -> impl Condition<K> {
    move |obj: Option<&K>| obj.is_some_and(&f)
}
