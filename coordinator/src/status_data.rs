//! The trigger ConfigMap as the coordinator's store: its `data` holds what the run machine
//! persists (`klm_protocol::run_machine::Persisted::to_data`), its annotations the requests.
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use std::collections::BTreeMap;

/// Merges `data` into the ConfigMap; recreates the ConfigMap if it was deleted mid-run, so the
/// agents can still read their turns.
pub async fn save(
    api: &Api<ConfigMap>,
    name: &str,
    data: &BTreeMap<String, String>,
) -> kube::Result<()> {
    let patch = json!({ "data": data });
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
            api.create(&PostParams::default(), &cm).await.map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

/// Removes one annotation (a request the coordinator consumed).
pub async fn remove_annotation(api: &Api<ConfigMap>, name: &str, key: &str) -> kube::Result<()> {
    let patch = json!({"metadata": {"annotations": {key: null}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
