//! A reflector whose every event — apply, delete, relist — wakes one `Notify`, so a single
//! loop can re-decide from consistent stores whenever anything it looks at changes.
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Starts a reflector for `api` filtered by `cfg`; returns its store and the task driving it
/// (abort it to stop watching). Watch errors are logged and retried with backoff.
pub fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Arc<Notify>,
) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .backoff(crate::retry::watch_backoff())
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watch error (retrying)");
            }
            // Deletions matter as much as updates (a vanished Node fails its turn).
            changed.notify_one();
        }
    });
    (reader, task)
}
