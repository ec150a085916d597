//! Which requests on the trigger ConfigMap become runs: a new trigger, a manual
//! `rollback-node`, and the annotations nobody reads (typos).
use crate::keys::{TRIGGER_PREFIX, trigger};
use crate::params::{self, Defaults};
use crate::run::{RunKind, RunRecord, trigger_fingerprint};
use crate::status::{NodeStatus, RunPhase};
use std::collections::BTreeMap;

/// Annotation keys under `lifecycle.katacontainers.io/` this tool does not read (e.g. the typo
/// `drain-enable`): reported in the run rather than silently ignored.
pub fn unknown_trigger_keys(annotations: &BTreeMap<String, String>) -> Vec<String> {
    annotations
        .keys()
        .filter(|k| k.starts_with(TRIGGER_PREFIX))
        .filter(|k| {
            !trigger::RUN_DEFINING.contains(&k.as_str())
                && k.as_str() != trigger::ROLLBACK_NODE
                && k.as_str() != trigger::ACTION
        })
        .cloned()
        .collect()
}

/// The record of a run requested by `annotations`: `Pending` with validated parameters, or
/// already `Failed` with the validation message (nothing was touched).
pub fn new_run(
    annotations: &BTreeMap<String, String>,
    defaults: &Defaults,
    id: String,
    now_ms: i64,
) -> RunRecord {
    let target = annotations
        .get(trigger::TARGET_VERSION)
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    let mut run = RunRecord::new(id, trigger_fingerprint(annotations), target, now_ms);
    for key in unknown_trigger_keys(annotations) {
        run.warnings.push(format!(
            "annotation {key} is not a kata-lifecycle-manager setting and was ignored (a typo?)"
        ));
    }
    match params::resolve(annotations, defaults) {
        Ok(p) => run.params = Some(p),
        Err(e) => run.finish(
            RunPhase::Failed,
            format!("invalid input, nothing was changed: {e}"),
            now_ms,
        ),
    }
    run
}

/// A manual rollback of `node`, from the last run's record: allowed only for a node the last
/// upgrade left upgraded (and no manual rollback restored since). `Err` says why not.
pub fn manual_rollback(
    last: Option<&RunRecord>,
    node: &str,
    id: String,
    now_ms: i64,
) -> Result<RunRecord, String> {
    let usable = last.filter(|r| {
        r.params.is_some()
            && r.release
                .as_ref()
                .is_some_and(|x| x.upgraded_revision.is_some())
            && match r.kind {
                RunKind::Upgrade => r.phase == RunPhase::Succeeded,
                RunKind::ManualRollback => r.phase.is_finished(),
            }
    });
    let Some(last) = usable else {
        return Err(format!(
            "cannot roll back {node}: there is no recorded upgrade run to roll back from"
        ));
    };
    let candidates: Vec<String> = match last.kind {
        RunKind::Upgrade => last
            .plan
            .iter()
            .filter(|n| last.nodes.get(*n).and_then(|r| r.status) == Some(NodeStatus::Completed))
            .cloned()
            .collect(),
        RunKind::ManualRollback => last.rollback_candidates.clone(),
    };
    if !candidates.iter().any(|n| n == node) {
        return Err(format!(
            "cannot roll back {node}: the last upgrade did not leave it upgraded (nodes that can be rolled back: {})",
            if candidates.is_empty() {
                "none".to_string()
            } else {
                candidates.join(", ")
            }
        ));
    }
    let mut release = last.release.clone().unwrap_or_default();
    release.rolled_back = false;
    let mut run = RunRecord::new(
        id,
        last.trigger.clone(),
        release.recorded_version.clone(),
        now_ms,
    );
    run.kind = RunKind::ManualRollback;
    run.rollback_candidates = candidates.into_iter().filter(|n| n != node).collect();
    run.params = last.params.clone();
    run.plan = vec![node.to_string()];
    run.restore_queue = vec![node.to_string()];
    run.message = format!(
        "rolling {node} back to {} (helm revision {})",
        release.recorded_version, release.recorded_revision
    );
    run.release = Some(release);
    run.phase = RunPhase::RollingBack;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{NodeReport, ReleaseState};

    #[test]
    fn typos_under_our_prefix_are_reported_and_nothing_else() {
        let a: BTreeMap<String, String> = [
            (trigger::TARGET_VERSION, "3.28.0"),
            (trigger::ACTION, "cancel"),
            ("lifecycle.katacontainers.io/drain-enable", "true"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            unknown_trigger_keys(&a),
            ["lifecycle.katacontainers.io/drain-enable"]
        );
    }

    fn succeeded_upgrade() -> RunRecord {
        let mut r = RunRecord::new("up".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = RunPhase::Succeeded;
        r.params = Some(crate::params::RunParams {
            target_version: "3.28.0".into(),
            ..Default::default()
        });
        r.plan = vec!["a".into(), "b".into()];
        r.nodes.insert(
            "a".into(),
            NodeReport {
                status: Some(NodeStatus::Completed),
                ..Default::default()
            },
        );
        r.release = Some(ReleaseState {
            recorded_revision: 3,
            recorded_version: "3.27.0".into(),
            upgraded_revision: Some(4),
            rolled_back: true,
            ..Default::default()
        });
        r
    }

    #[test]
    fn manual_rollback_admission() {
        let up = succeeded_upgrade();
        let rb = manual_rollback(Some(&up), "a", "rb".into(), 1).unwrap();
        assert_eq!(rb.phase, RunPhase::RollingBack);
        assert_eq!(rb.restore_queue, ["a"]);
        assert!(!rb.release.as_ref().unwrap().rolled_back);
        let e = manual_rollback(Some(&up), "b", "rb".into(), 1).unwrap_err();
        assert!(e.contains("nodes that can be rolled back: a"), "{e}");
        let e = manual_rollback(Some(&rb), "a", "rb2".into(), 1).unwrap_err();
        assert!(e.contains("cannot roll back a"), "{e}");
        let e = manual_rollback(None, "a", "rb".into(), 1).unwrap_err();
        assert!(e.contains("no recorded upgrade run"), "{e}");
    }
}
