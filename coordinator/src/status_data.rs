//! Reading and writing the run status in the trigger ConfigMap's `data`.
use k8s_openapi::api::core::v1::ConfigMap;
use klm_protocol::RunRecord;
use klm_protocol::keys::status_data as keys;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

pub const OBSERVED_TRIGGER: &str = "observedTrigger";
pub const OBSERVED_ROLLBACK: &str = "observedRollbackNode";
/// The last request the coordinator refused outside a run (e.g. a `rollback-node` it cannot do).
pub const NOTICE: &str = "notice";

/// What a coordinator remembers across restarts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    pub run: Option<RunRecord>,
    pub observed_trigger: String,
    pub observed_rollback: String,
    pub notice: String,
}

pub fn load(cm: &ConfigMap) -> Persisted {
    let data = cm.data.clone().unwrap_or_default();
    Persisted {
        run: data
            .get(keys::RUN)
            .and_then(|s| match RunRecord::from_json(s) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring unreadable run record");
                    None
                }
            }),
        observed_trigger: data.get(OBSERVED_TRIGGER).cloned().unwrap_or_default(),
        observed_rollback: data.get(OBSERVED_ROLLBACK).cloned().unwrap_or_default(),
        notice: data.get(NOTICE).cloned().unwrap_or_default(),
    }
}

/// Writes the record plus the human-readable summary keys in one merge patch.
pub async fn save(api: &Api<ConfigMap>, name: &str, p: &Persisted) -> kube::Result<()> {
    let mut data = serde_json::Map::new();
    data.insert(OBSERVED_TRIGGER.into(), json!(p.observed_trigger));
    data.insert(OBSERVED_ROLLBACK.into(), json!(p.observed_rollback));
    data.insert(NOTICE.into(), json!(p.notice));
    if let Some(run) = &p.run {
        data.insert(keys::RUN.into(), json!(run.to_json()));
        data.insert(keys::PHASE.into(), json!(run.phase.as_str()));
        data.insert(keys::TARGET_VERSION.into(), json!(run.target_version));
        data.insert(keys::PROGRESS.into(), json!(run.progress()));
        data.insert(
            keys::CURRENT_NODE.into(),
            json!(
                run.turn
                    .as_ref()
                    .map(|t| t.node.clone())
                    .unwrap_or_default()
            ),
        );
        data.insert(keys::MESSAGE.into(), json!(run.message));
    }
    let patch = json!({ "data": data });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}
