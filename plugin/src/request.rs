//! What each command writes on the trigger ConfigMap, as pure functions of its arguments and
//! the ConfigMap's current state, so the annotation contract (README "Trigger a run", "Cancel a
//! run", "Roll one node back by hand") is unit-tested without a cluster.
use base64::Engine;
use klm_protocol::RunRecord;
use klm_protocol::duration::parse_timeout;
use klm_protocol::keys::trigger;
use klm_protocol::maintenance_window::MaintenanceWindow;
use klm_protocol::params::{MAX_BATCH_SIZE, ParamError, validate_version};
use klm_protocol::run::trigger_fingerprint;
use klm_protocol::selector::{LabelSelector, valid_key, valid_value};
use klm_protocol::verification::PodTemplate;
use std::collections::BTreeMap;

/// Annotation changes of one merge patch: `Some(v)` sets the annotation, `None` removes it.
pub type Changes = BTreeMap<&'static str, Option<String>>;

/// The parameters of `upgrade`, as given on the command line (`None`: not given, the
/// annotation keeps its current value, as it would with `kubectl annotate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub version: String,
    pub selector: Option<String>,
    pub taint_key: Option<String>,
    pub taint_value: Option<String>,
    pub drain: Option<bool>,
    pub drain_timeout: Option<String>,
    pub verification_timeout: Option<String>,
    /// The verification pod YAML (the command reads the file); written base64-encoded.
    pub verification_pod: Option<String>,
    /// `key=value` entries for the run's `helm upgrade`.
    pub set_values: Vec<String>,
    pub release: Option<String>,
    pub release_namespace: Option<String>,
    /// When node turns may start, e.g. `Mon-Fri 22:00-06:00 Europe/Berlin` (empty: always).
    pub maintenance_window: Option<String>,
    /// Pods that hold their node's turn while one runs there (empty: none).
    pub blocking_pod_selector: Option<String>,
    /// Waves: nodes in progress at once.
    pub batch_size: Option<u32>,
    /// Waves: a one-node first wave.
    pub canary: Option<bool>,
}

fn invalid(key: &'static str, reason: impl ToString) -> ParamError {
    ParamError::Invalid {
        key,
        reason: reason.to_string(),
    }
}

/// Validates what can be checked without the cluster (the coordinator checks the rest, with the
/// chart defaults) and returns the annotations to set, `target-version` included: they go in one
/// patch so the coordinator never sees the new target with half of its parameters.
pub fn upgrade_changes(req: &UpgradeRequest) -> Result<Changes, ParamError> {
    validate_version(&req.version)?;
    let mut c = Changes::new();
    c.insert(trigger::TARGET_VERSION, Some(req.version.clone()));
    if let Some(s) = &req.selector {
        LabelSelector::parse(s).map_err(|e| invalid(trigger::NODE_SELECTOR, e))?;
        c.insert(trigger::NODE_SELECTOR, Some(s.clone()));
    }
    if let Some(k) = &req.taint_key {
        valid_key(k).map_err(|r| invalid(trigger::NODE_TAINT_KEY, r))?;
        c.insert(trigger::NODE_TAINT_KEY, Some(k.clone()));
    }
    if let Some(v) = &req.taint_value {
        valid_value(v).map_err(|r| invalid(trigger::NODE_TAINT_VALUE, r))?;
        c.insert(trigger::NODE_TAINT_VALUE, Some(v.clone()));
    }
    if let Some(d) = req.drain {
        c.insert(trigger::DRAIN_ENABLED, Some(d.to_string()));
    }
    for (key, value) in [
        (trigger::DRAIN_TIMEOUT, &req.drain_timeout),
        (trigger::VERIFICATION_TIMEOUT, &req.verification_timeout),
    ] {
        if let Some(v) = value {
            parse_timeout(v).map_err(|e| invalid(key, e))?;
            c.insert(key, Some(v.clone()));
        }
    }
    if let Some(pod) = &req.verification_pod {
        PodTemplate::parse(pod).map_err(|e| invalid(trigger::VERIFICATION_POD, e))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(pod.as_bytes());
        c.insert(trigger::VERIFICATION_POD, Some(b64));
    }
    if !req.set_values.is_empty() {
        let joined = req.set_values.join("\n");
        klm_protocol::helm_values::parse(&joined)
            .map_err(|e| invalid(trigger::HELM_SET_VALUES, e))?;
        c.insert(trigger::HELM_SET_VALUES, Some(joined));
    }
    if let Some(r) = &req.release {
        c.insert(trigger::HELM_RELEASE, Some(r.clone()));
    }
    if let Some(ns) = &req.release_namespace {
        c.insert(trigger::HELM_NAMESPACE, Some(ns.clone()));
    }
    if let Some(w) = &req.maintenance_window {
        MaintenanceWindow::parse(w).map_err(|e| invalid(trigger::MAINTENANCE_WINDOW, e))?;
        c.insert(trigger::MAINTENANCE_WINDOW, Some(w.clone()));
    }
    if let Some(s) = &req.blocking_pod_selector {
        LabelSelector::parse(s).map_err(|e| invalid(trigger::BLOCKING_POD_SELECTOR, e))?;
        c.insert(trigger::BLOCKING_POD_SELECTOR, Some(s.clone()));
    }
    if let Some(n) = req.batch_size {
        if !(1..=MAX_BATCH_SIZE).contains(&n) {
            return Err(invalid(
                trigger::BATCH_SIZE,
                format!(
                    "{n} is out of range: at least 1 and at most {MAX_BATCH_SIZE} nodes in progress at once"
                ),
            ));
        }
        c.insert(trigger::BATCH_SIZE, Some(n.to_string()));
    }
    if let Some(canary) = req.canary {
        c.insert(trigger::CANARY, Some(canary.to_string()));
    }
    Ok(c)
}

/// The annotations as they will be once `changes` is applied.
pub fn apply(current: &BTreeMap<String, String>, changes: &Changes) -> BTreeMap<String, String> {
    let mut after = current.clone();
    for (k, v) in changes {
        match v {
            Some(v) => after.insert(k.to_string(), v.clone()),
            None => after.remove(*k),
        };
    }
    after
}

/// How an upgrade request reaches the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradePlan {
    /// The patched annotations differ from the last trigger the coordinator acted on: one patch.
    Patch(Changes),
    /// They are exactly the last trigger acted on (e.g. the same version again after a failed
    /// run), which the coordinator would ignore: remove `target-version` first, wait until the
    /// coordinator has seen that (its `observedTrigger` clears), then patch.
    RemoveTargetThenPatch(Changes),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(
        "run {id} is still {phase}; one run at a time: wait for it (`kubectl kata-lifecycle status --watch`) or cancel it"
    )]
    RunActive { id: String, phase: String },
}

/// Decides the patches of `upgrade` from the ConfigMap's annotations, the fingerprint of the
/// trigger the coordinator last acted on (`data.observedTrigger`) and the current run.
pub fn plan_upgrade(
    req: &UpgradeRequest,
    annotations: &BTreeMap<String, String>,
    observed_trigger: &str,
    run: Option<&RunRecord>,
) -> Result<UpgradePlan, RequestError> {
    let changes = upgrade_changes(req)?;
    // A trigger during a run is ignored by the coordinator (and remembered as seen, so it would
    // not start afterwards either): refuse it here, where the user is.
    if let Some(r) = run.filter(|r| !r.phase.is_finished()) {
        return Err(RequestError::RunActive {
            id: r.id.clone(),
            phase: r.phase.to_string(),
        });
    }
    let after = apply(annotations, &changes);
    if trigger_fingerprint(&after) == observed_trigger {
        Ok(UpgradePlan::RemoveTargetThenPatch(changes))
    } else {
        Ok(UpgradePlan::Patch(changes))
    }
}

/// The change removing `target-version` (the coordinator starts nothing on it).
pub fn remove_target() -> Changes {
    Changes::from([(trigger::TARGET_VERSION, None)])
}

/// `cancel`, `pause`, `resume`: the `action` annotation (the coordinator removes it once acted on).
pub fn action(verb: &'static str) -> Changes {
    Changes::from([(trigger::ACTION, Some(verb.to_string()))])
}

/// `rollback <node>`: restore one node of the last upgrade run by hand.
pub fn rollback(node: &str) -> Result<Changes, ParamError> {
    let node = node.trim();
    if node.is_empty() {
        return Err(invalid(trigger::ROLLBACK_NODE, "a node name is required"));
    }
    Ok(Changes::from([(
        trigger::ROLLBACK_NODE,
        Some(node.to_string()),
    )]))
}

/// The JSON merge patch of the ConfigMap's annotations (`null` removes one).
pub fn merge_patch(changes: &Changes) -> serde_json::Value {
    let ann: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.as_ref()
                    .map(|v| serde_json::Value::String(v.clone()))
                    .unwrap_or(serde_json::Value::Null),
            )
        })
        .collect();
    serde_json::json!({ "metadata": { "annotations": ann } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_protocol::RunPhase;

    fn req(version: &str) -> UpgradeRequest {
        UpgradeRequest {
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn upgrade_sets_target_and_only_the_given_parameters() {
        let r = UpgradeRequest {
            selector: Some("pool=kata".into()),
            drain: Some(true),
            drain_timeout: Some("10m".into()),
            set_values: vec!["a.b=1".into(), "c=x".into()],
            release: Some("kd".into()),
            ..req("3.28.0")
        };
        let c = upgrade_changes(&r).unwrap();
        let expected = Changes::from([
            (trigger::TARGET_VERSION, Some("3.28.0".to_string())),
            (trigger::NODE_SELECTOR, Some("pool=kata".to_string())),
            (trigger::DRAIN_ENABLED, Some("true".to_string())),
            (trigger::DRAIN_TIMEOUT, Some("10m".to_string())),
            (trigger::HELM_SET_VALUES, Some("a.b=1\nc=x".to_string())),
            (trigger::HELM_RELEASE, Some("kd".to_string())),
        ]);
        assert_eq!(c, expected);
        assert_eq!(
            merge_patch(&c)["metadata"]["annotations"][trigger::DRAIN_ENABLED],
            "true"
        );
    }

    #[test]
    fn batch_size_and_canary_are_written_and_bounded() {
        let c = upgrade_changes(&UpgradeRequest {
            batch_size: Some(5),
            canary: Some(false),
            ..req("3.28.0")
        })
        .unwrap();
        assert_eq!(c[trigger::BATCH_SIZE].as_deref(), Some("5"));
        assert_eq!(c[trigger::CANARY].as_deref(), Some("false"));
        assert!(
            !upgrade_changes(&req("3.28.0"))
                .unwrap()
                .contains_key(trigger::BATCH_SIZE)
        );
        for bad in [0, 51] {
            let err = upgrade_changes(&UpgradeRequest {
                batch_size: Some(bad),
                ..req("3.28.0")
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(trigger::BATCH_SIZE), "{bad}: {err}");
        }
    }

    #[test]
    fn verification_pod_is_written_base64() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: v\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: busybox\n";
        let c = upgrade_changes(&UpgradeRequest {
            verification_pod: Some(yaml.into()),
            ..req("3.28.0")
        })
        .unwrap();
        let b64 = c[trigger::VERIFICATION_POD].clone().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), yaml);
    }

    #[test]
    fn window_and_blocking_selector_are_written_as_given() {
        let c = upgrade_changes(&UpgradeRequest {
            maintenance_window: Some("Sat,Sun 00:00-24:00 Europe/Berlin".into()),
            blocking_pod_selector: Some("app=backup".into()),
            ..req("3.28.0")
        })
        .unwrap();
        assert_eq!(
            c[trigger::MAINTENANCE_WINDOW].as_deref(),
            Some("Sat,Sun 00:00-24:00 Europe/Berlin")
        );
        assert_eq!(
            c[trigger::BLOCKING_POD_SELECTOR].as_deref(),
            Some("app=backup")
        );
    }

    #[test]
    fn bad_input_is_refused_naming_the_annotation() {
        let cases: Vec<(UpgradeRequest, &str)> = vec![
            (req("v3.28"), "bad target version"),
            (
                UpgradeRequest {
                    selector: Some("a in (".into()),
                    ..req("3.28.0")
                },
                trigger::NODE_SELECTOR,
            ),
            (
                UpgradeRequest {
                    drain_timeout: Some("soon".into()),
                    ..req("3.28.0")
                },
                trigger::DRAIN_TIMEOUT,
            ),
            (
                UpgradeRequest {
                    verification_timeout: Some("-5s".into()),
                    ..req("3.28.0")
                },
                trigger::VERIFICATION_TIMEOUT,
            ),
            (
                UpgradeRequest {
                    taint_key: Some("bad key".into()),
                    ..req("3.28.0")
                },
                trigger::NODE_TAINT_KEY,
            ),
            (
                UpgradeRequest {
                    set_values: vec!["novalue".into()],
                    ..req("3.28.0")
                },
                trigger::HELM_SET_VALUES,
            ),
            (
                UpgradeRequest {
                    maintenance_window: Some("Mon-Fri 22:00".into()),
                    ..req("3.28.0")
                },
                trigger::MAINTENANCE_WINDOW,
            ),
            (
                UpgradeRequest {
                    blocking_pod_selector: Some("app in (".into()),
                    ..req("3.28.0")
                },
                trigger::BLOCKING_POD_SELECTOR,
            ),
            (
                UpgradeRequest {
                    verification_pod: Some("kind: [".into()),
                    ..req("3.28.0")
                },
                trigger::VERIFICATION_POD,
            ),
        ];
        for (r, needle) in cases {
            let err = upgrade_changes(&r).unwrap_err().to_string();
            assert!(err.contains(needle), "{r:?}: {err}");
        }
    }

    #[test]
    fn a_new_request_is_one_patch() {
        let current = BTreeMap::from([(trigger::TARGET_VERSION.to_string(), "3.27.0".to_string())]);
        let observed = trigger_fingerprint(&current);
        let plan = plan_upgrade(&req("3.28.0"), &current, &observed, None).unwrap();
        assert!(matches!(plan, UpgradePlan::Patch(_)), "{plan:?}");
    }

    #[test]
    fn the_same_trigger_again_removes_the_target_first() {
        let current = BTreeMap::from([
            (trigger::TARGET_VERSION.to_string(), "3.28.0".to_string()),
            (trigger::DRAIN_ENABLED.to_string(), "true".to_string()),
        ]);
        let observed = trigger_fingerprint(&current);
        let plan = plan_upgrade(&req("3.28.0"), &current, &observed, None).unwrap();
        assert!(
            matches!(plan, UpgradePlan::RemoveTargetThenPatch(_)),
            "{plan:?}"
        );
        // A changed parameter makes it a new request on its own.
        let r = UpgradeRequest {
            drain: Some(false),
            ..req("3.28.0")
        };
        let plan = plan_upgrade(&r, &current, &observed, None).unwrap();
        assert!(matches!(plan, UpgradePlan::Patch(_)), "{plan:?}");
        // The target removed by hand and not yet re-added: setting it is a new request.
        let plan = plan_upgrade(&req("3.28.0"), &current, "", None).unwrap();
        assert!(matches!(plan, UpgradePlan::Patch(_)), "{plan:?}");
    }

    #[test]
    fn no_trigger_while_a_run_is_active() {
        let mut run = RunRecord::new("r1".into(), "t".into(), "3.28.0".into(), 0);
        run.phase = RunPhase::Running;
        let err = plan_upgrade(&req("3.29.0"), &BTreeMap::new(), "", Some(&run)).unwrap_err();
        assert!(matches!(err, RequestError::RunActive { .. }), "{err}");
        run.phase = RunPhase::Failed;
        assert!(plan_upgrade(&req("3.29.0"), &BTreeMap::new(), "", Some(&run)).is_ok());
    }

    #[test]
    fn steering_annotations() {
        assert_eq!(
            action(trigger::ACTION_PAUSE),
            Changes::from([(trigger::ACTION, Some("pause".to_string()))])
        );
        assert_eq!(
            rollback(" worker-1 ").unwrap(),
            Changes::from([(trigger::ROLLBACK_NODE, Some("worker-1".to_string()))])
        );
        assert!(rollback("").is_err());
        let removal = merge_patch(&remove_target());
        assert!(removal["metadata"]["annotations"][trigger::TARGET_VERSION].is_null());
        assert_eq!(
            apply(
                &BTreeMap::from([(trigger::TARGET_VERSION.to_string(), "1.0.0".to_string())]),
                &remove_target()
            ),
            BTreeMap::new()
        );
    }
}
