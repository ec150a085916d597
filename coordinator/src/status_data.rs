//! The trigger ConfigMap as the coordinator's store: its `data` holds what the run machine
//! persists (`klm_protocol::run_machine::Persisted::to_data`), its annotations the requests.
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;

/// Merges `data` into the ConfigMap, on condition that it is still at `expected_rv` (the last
/// version this coordinator saw or wrote): the leader never writes over a change it has not read
/// (a hand-edited or corrupted record, a new request), it gets 409 and reads first. Recreates the
/// ConfigMap if it was deleted mid-run, so the agents can still read their turns. Returns the
/// new `resourceVersion`.
pub async fn save(
    api: &Api<ConfigMap>,
    name: &str,
    data: &BTreeMap<String, String>,
    expected_rv: Option<&str>,
) -> kube::Result<Option<String>> {
    let patch = match expected_rv {
        Some(rv) => json!({ "metadata": { "resourceVersion": rv }, "data": data }),
        None => json!({ "data": data }),
    };
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                data: Some(data.clone()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .map(|c| c.metadata.resource_version)
        }
        other => other.map(|c| c.metadata.resource_version),
    }
}

/// Removes one annotation (a request the coordinator consumed).
/// Conditioned on `expected_rv` like [`save`]. Returns the new `resourceVersion`.
pub async fn remove_annotation(
    api: &Api<ConfigMap>,
    name: &str,
    key: &str,
    expected_rv: Option<&str>,
) -> kube::Result<Option<String>> {
    let patch = match expected_rv {
        Some(rv) => json!({"metadata": {"resourceVersion": rv, "annotations": {key: null}}}),
        None => json!({"metadata": {"annotations": {key: null}}}),
    };
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|c| c.metadata.resource_version)
}
