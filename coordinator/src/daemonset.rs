//! The kata-deploy DaemonSet: which `controller-revision-hash` is current, and whether it
//! honours `updateStrategy: OnDelete` (charts before 3.27.0 hard-code RollingUpdate).
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use klm_protocol::keys::kata_deploy;
use kube::api::{Api, ListParams};
use kube::runtime::wait::{Condition, await_condition};
use std::time::Duration;

pub use klm_protocol::run_machine::release::DaemonSetObservation;

#[derive(Debug, thiserror::Error)]
pub enum DaemonSetError {
    #[error(
        "DaemonSet {namespace}/{name} not found: is the release really kata-deploy? ({source})"
    )]
    Missing {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error(
        "DaemonSet {0} did not observe its new template within {1:?}; is kube-controller-manager running?"
    )]
    NotObserved(String, Duration),
    #[error("no ControllerRevision found for DaemonSet {0}")]
    NoRevision(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

fn observed() -> impl Condition<DaemonSet> {
    |ds: Option<&DaemonSet>| {
        ds.is_some_and(|ds| {
            let generation = ds.metadata.generation.unwrap_or(0);
            ds.status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .is_some_and(|o| o >= generation)
        })
    }
}

/// Waits (by watch) until the DaemonSet controller has observed the current template, then
/// returns the newest ControllerRevision's hash: the revision pods must carry to be current.
pub async fn current_revision(
    client: kube::Client,
    namespace: &str,
    timeout: Duration,
) -> Result<DaemonSetObservation, DaemonSetError> {
    let name = kata_deploy::DAEMONSET;
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let ds = api
        .get(name)
        .await
        .map_err(|source| DaemonSetError::Missing {
            namespace: namespace.into(),
            name: name.into(),
            source,
        })?;
    let ds =
        match tokio::time::timeout(timeout, await_condition(api.clone(), name, observed())).await {
            Ok(Ok(Some(ds))) => ds,
            Ok(Ok(None)) => ds,
            Ok(Err(e)) => return Err(DaemonSetError::Kube(kube::Error::Service(Box::new(e)))),
            Err(_) => {
                return Err(DaemonSetError::NotObserved(
                    format!("{namespace}/{name}"),
                    timeout,
                ));
            }
        };
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let on_delete = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete");
    let selector = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let revisions: Api<ControllerRevision> = Api::namespaced(client, namespace);
    let newest = revisions
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|cr| {
            cr.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .max_by_key(|cr| cr.revision)
        .ok_or_else(|| DaemonSetError::NoRevision(format!("{namespace}/{name}")))?;
    let hash = newest
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(kata_deploy::REVISION_HASH_LABEL).cloned())
        .ok_or_else(|| DaemonSetError::NoRevision(format!("{namespace}/{name}")))?;
    Ok(DaemonSetObservation { hash, on_delete })
}
