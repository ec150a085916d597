//! The verification pod: template validation, `${NODE}`/`${TEST_POD}` substitution, unique
//! names, and the verdict read from an observed pod. Fail fast on states that will not heal.
use crate::keys::verification as labels;
use crate::procedure::{Budget, cancelled};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde::{Deserialize, Serialize};

pub const NODE_PLACEHOLDER: &str = "${NODE}";
pub const TEST_POD_PLACEHOLDER: &str = "${TEST_POD}";

/// Waiting reasons that do not heal by themselves: fail now instead of at the timeout.
pub const FATAL_WAITING_REASONS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the verification pod is not valid YAML: {0}")]
    Yaml(String),
    #[error("the verification pod must be kind: Pod (apiVersion: v1), found kind {0:?}")]
    NotAPod(String),
    #[error(
        "the verification pod must set spec.restartPolicy: Never (found {0:?}); \
         otherwise a failed check restarts instead of failing"
    )]
    RestartPolicy(String),
    #[error("the verification pod has no containers")]
    NoContainers,
}

/// A validated verification pod template (the YAML text with placeholders).
#[derive(Debug, Clone, PartialEq)]
pub struct PodTemplate {
    text: String,
}

impl PodTemplate {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let template = PodTemplate {
            text: text.to_string(),
        };
        // Validate with representative substitutions so the placeholders never break parsing.
        let pod = template.render_unchecked("node-placeholder", "test-pod-placeholder")?;
        let spec = pod.spec.unwrap_or_default();
        match spec.restart_policy.as_deref() {
            Some("Never") => {}
            other => {
                return Err(TemplateError::RestartPolicy(
                    other.unwrap_or("<unset, Always>").to_string(),
                ));
            }
        }
        if spec.containers.is_empty() {
            return Err(TemplateError::NoContainers);
        }
        Ok(template)
    }

    fn render_unchecked(&self, node: &str, test_pod: &str) -> Result<Pod, TemplateError> {
        let text = self
            .text
            .replace(NODE_PLACEHOLDER, node)
            .replace(TEST_POD_PLACEHOLDER, test_pod);
        let value: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| TemplateError::Yaml(e.to_string()))?;
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        if kind != "Pod" || api != "v1" {
            return Err(TemplateError::NotAPod(format!("{api}/{kind}")));
        }
        serde_json::from_value(value).map_err(|e| TemplateError::Yaml(e.to_string()))
    }

    /// The pod to create for `node`: placeholders substituted, name/namespace forced, and labels
    /// added so our pods can be found (and cleaned up) whatever the template says.
    pub fn render(
        &self,
        node: &str,
        test_pod: &str,
        namespace: &str,
        run_id: &str,
    ) -> Result<Pod, TemplateError> {
        let mut pod = self.render_unchecked(node, test_pod)?;
        pod.metadata.name = Some(test_pod.to_string());
        pod.metadata.generate_name = None;
        pod.metadata.namespace = Some(namespace.to_string());
        let l = pod.metadata.labels.get_or_insert_with(Default::default);
        l.insert(labels::RUN_LABEL.into(), label_safe(run_id));
        l.insert(labels::NODE_LABEL.into(), label_safe(node));
        l.insert(labels::MANAGED_BY_LABEL.into(), labels::MANAGED_BY.into());
        Ok(pod)
    }
}

/// The taint a cordoned node carries (`spec.unschedulable` makes the control plane add it).
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Lets the verification pod schedule onto its node while we keep that node cordoned: the
/// scheduler refuses a cordoned node to pods that do not tolerate the unschedulable taint, so a
/// template that pins the node with `nodeSelector`/affinity would otherwise stay Pending until
/// the timeout. Idempotent; a template that already tolerates it is left as is. (Templates
/// using `nodeName` bypass the scheduler and are unaffected.)
pub fn tolerate_cordon(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::Toleration;
    let spec = pod.spec.get_or_insert_with(Default::default);
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    let covered = tolerations.iter().any(|t| {
        let op_exists = t.operator.as_deref() == Some("Exists");
        let key_ok =
            t.key.as_deref() == Some(UNSCHEDULABLE_TAINT) || (t.key.is_none() && op_exists);
        let effect_ok = matches!(t.effect.as_deref(), None | Some("") | Some("NoSchedule"));
        key_ok && op_exists && effect_ok
    });
    if !covered {
        tolerations.push(Toleration {
            key: Some(UNSCHEDULABLE_TAINT.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
}

/// The container whose log best explains a verdict: the first one that terminated non-zero,
/// else the first one waiting, else the first container of the spec.
pub fn log_container(pod: &Pod) -> Option<String> {
    let statuses: Vec<&ContainerStatus> = pod
        .status
        .as_ref()
        .map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
                .collect()
        })
        .unwrap_or_default();
    let failed = statuses.iter().find(|cs| {
        cs.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0)
    });
    let waiting = statuses
        .iter()
        .find(|cs| cs.state.as_ref().is_some_and(|s| s.waiting.is_some()));
    failed.or(waiting).map(|cs| cs.name.clone()).or_else(|| {
        pod.spec
            .as_ref()?
            .containers
            .first()
            .map(|c| c.name.clone())
    })
}

/// The last `max_bytes` of a log (cut on a character boundary), so evidence stays small enough
/// for a Node annotation.
pub fn log_tail(log: &str, max_bytes: usize) -> String {
    let log = log.trim_end();
    if log.len() <= max_bytes {
        return log.to_string();
    }
    let mut start = log.len() - max_bytes;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &log[start..])
}

/// Label values are ≤ 63 chars; node names may be longer (DNS subdomains).
pub fn label_safe(s: &str) -> String {
    let t: String = s.chars().take(63).collect();
    t.trim_end_matches(['-', '.', '_']).to_string()
}

/// A unique, DNS-1123-label pod name (≤ 63 chars) for verifying `node`.
pub fn test_pod_name(node: &str, suffix: &str) -> String {
    const PREFIX: &str = "kata-verify-";
    let budget = 63 - PREFIX.len() - 1 - suffix.len();
    let node_part: String = node
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(budget)
        .collect();
    let node_part = node_part.trim_matches('-');
    format!("{PREFIX}{node_part}-{suffix}")
}

/// A random lowercase suffix for test pod names.
pub fn random_suffix(rng: &mut impl rand::Rng) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..6)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// What an observed verification pod says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still pending or running; keep watching until the timeout.
    InProgress,
    Succeeded,
    Failed(FailureCause),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureCause {
    /// Short machine-friendly reason: `PodFailed`, `NonZeroExit`, `ErrImagePull`, `Timeout`, …
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Everything a verdict on a verification pod depends on.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub name: &'a str,
    /// The pod as last seen (the created object until the watch says more).
    pub pod: &'a Pod,
    /// The watch saw the pod deleted.
    pub deleted: bool,
    /// The verification timeout, counted from the pod's creation.
    pub budget: Budget,
    pub now_ms: i64,
    /// The run was cancelled.
    pub cancel: bool,
}

impl<'a> Observation<'a> {
    /// The pod as seen now, not deleted, no cancel.
    pub fn of(name: &'a str, pod: &'a Pod, budget: Budget, now_ms: i64) -> Self {
        Observation {
            name,
            pod,
            deleted: false,
            budget,
            now_ms,
            cancel: false,
        }
    }
}

/// Every verdict on a verification pod. In order: a cancelled run stops it (the pod is deleted
/// after its evidence is kept); a pod that finished (or will not heal) is judged by its status;
/// a pod deleted before it finished fails; a pod still pending or running past the timeout
/// fails naming where it is stuck; otherwise it is in progress.
pub fn judge(o: &Observation<'_>) -> Verdict {
    if o.cancel {
        return Verdict::Failed(cancelled(format!(
            "the run was cancelled during verification; verification pod {} stopped ({})",
            o.name,
            describe_progress(o.pod)
        )));
    }
    let verdict = judge_status(o.pod);
    if verdict != Verdict::InProgress {
        return verdict;
    }
    if o.deleted {
        return Verdict::Failed(FailureCause {
            reason: "VerificationPodDeleted".into(),
            message: format!(
                "verification pod {} was deleted before it finished (last seen: {})",
                o.name,
                describe_progress(o.pod)
            ),
            exit_code: None,
        });
    }
    if o.budget.is_over(o.now_ms) {
        return Verdict::Failed(FailureCause {
            reason: "Timeout".into(),
            message: format!(
                "verification pod {} did not finish within {}s: {}",
                o.name,
                o.budget.limit.as_secs(),
                describe_progress(o.pod)
            ),
            exit_code: None,
        });
    }
    Verdict::InProgress
}

/// The verdict a pod's status alone gives.
fn judge_status(pod: &Pod) -> Verdict {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let containers: Vec<&ContainerStatus> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .collect();
    if phase == "Succeeded" {
        return Verdict::Succeeded;
    }
    for cs in &containers {
        let state = cs.state.clone().unwrap_or_default();
        if let Some(t) = state.terminated
            && t.exit_code != 0
        {
            return Verdict::Failed(FailureCause {
                reason: "NonZeroExit".into(),
                message: format!(
                    "container {} exited with code {}{}",
                    cs.name,
                    t.exit_code,
                    t.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                ),
                exit_code: Some(t.exit_code),
            });
        }
        if let Some(w) = state.waiting
            && let Some(reason) = w.reason
            && FATAL_WAITING_REASONS.contains(&reason.as_str())
        {
            return Verdict::Failed(FailureCause {
                message: format!(
                    "container {} is waiting with {reason}{}",
                    cs.name,
                    w.message.map(|m| format!(": {m}")).unwrap_or_default()
                ),
                reason,
                exit_code: None,
            });
        }
    }
    if phase == "Failed" {
        return Verdict::Failed(FailureCause {
            reason: status.reason.clone().unwrap_or_else(|| "PodFailed".into()),
            message: status
                .message
                .clone()
                .unwrap_or_else(|| "the verification pod's phase is Failed".into()),
            exit_code: None,
        });
    }
    Verdict::InProgress
}

/// A one-line description of where a pod is stuck, for timeout evidence.
pub fn describe_progress(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Pending".into());
    let waiting: Vec<String> = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|cs| {
            let w = cs.state.as_ref()?.waiting.as_ref()?;
            Some(format!(
                "{} waiting ({})",
                cs.name,
                w.reason.as_deref().unwrap_or("no reason")
            ))
        })
        .collect();
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "unschedulable: {}",
                c.message.as_deref().unwrap_or("no reason given")
            )
        });
    let mut parts = vec![format!("phase {phase}")];
    parts.extend(unscheduled);
    parts.extend(waiting);
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodStatus,
    };

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ${TEST_POD}\n  labels:\n    app: verify\nspec:\n  restartPolicy: Never\n  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n  containers:\n  - name: verify\n    image: busybox\n    command: [sh, -c, 'echo ${NODE}']\n";

    #[test]
    fn render_substitutes_and_labels() {
        let t = PodTemplate::parse(POD).unwrap();
        let pod = t
            .render("worker-1", "kata-verify-worker-1-abc", "verify", "run-1")
            .unwrap();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("kata-verify-worker-1-abc")
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some("verify"));
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.node_selector.unwrap()["kubernetes.io/hostname"],
            "worker-1"
        );
        assert_eq!(
            spec.containers[0].command.as_ref().unwrap()[2],
            "echo worker-1"
        );
        let l = pod.metadata.labels.unwrap();
        assert_eq!(l["app"], "verify");
        assert_eq!(l[labels::NODE_LABEL], "worker-1");
        assert_eq!(l[labels::RUN_LABEL], "run-1");
    }

    #[test]
    fn template_errors() {
        assert!(matches!(
            PodTemplate::parse("a: [x"),
            Err(TemplateError::Yaml(_))
        ));
        assert!(matches!(
            PodTemplate::parse("apiVersion: v1\nkind: ConfigMap\n"),
            Err(TemplateError::NotAPod(_))
        ));
        assert!(matches!(
            PodTemplate::parse(&POD.replace("  restartPolicy: Never\n", "")),
            Err(TemplateError::RestartPolicy(_))
        ));
        assert!(matches!(
            PodTemplate::parse(&POD.replace("Never", "OnFailure")),
            Err(TemplateError::RestartPolicy(_))
        ));
    }

    #[test]
    fn cordon_toleration_is_added_once() {
        let t = PodTemplate::parse(POD).unwrap();
        let mut pod = t.render("w", "p", "ns", "r").unwrap();
        tolerate_cordon(&mut pod);
        tolerate_cordon(&mut pod);
        let tol = pod.spec.as_ref().unwrap().tolerations.clone().unwrap();
        assert_eq!(tol.len(), 1);
        assert_eq!(tol[0].key.as_deref(), Some(UNSCHEDULABLE_TAINT));
        // A template that tolerates everything is left alone.
        let mut all = t.render("w", "p", "ns", "r").unwrap();
        all.spec.as_mut().unwrap().tolerations =
            Some(vec![k8s_openapi::api::core::v1::Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]);
        tolerate_cordon(&mut all);
        assert_eq!(all.spec.unwrap().tolerations.unwrap().len(), 1);
    }

    #[test]
    fn log_container_prefers_the_failed_one() {
        let mut p = pod("Failed", exited(2));
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            containers: vec![
                k8s_openapi::api::core::v1::Container {
                    name: "sidecar".into(),
                    ..Default::default()
                },
                k8s_openapi::api::core::v1::Container {
                    name: "verify".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        assert_eq!(log_container(&p).as_deref(), Some("verify"));
        p.status = None;
        assert_eq!(log_container(&p).as_deref(), Some("sidecar"));
        assert_eq!(log_container(&Pod::default()), None);
    }

    #[test]
    fn log_tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(log_tail("ok\n", 10), "ok");
        let t = log_tail("ééééé", 3);
        assert!(t.starts_with('…') && t.ends_with('é'), "{t}");
        assert_eq!(log_tail("abcdef", 3), "…def");
    }

    #[test]
    fn test_pod_names_are_dns_labels_within_63() {
        let mut rng = rand::rng();
        for node in [
            "worker-1",
            "ip-10-0-0-1.eu-west-1.compute.internal",
            &"n".repeat(250),
            "UPPER.case",
        ] {
            let name = test_pod_name(node, &random_suffix(&mut rng));
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
                "{name}"
            );
            assert!(!name.ends_with('-') && !name.contains("--"), "{name}");
        }
        let a = test_pod_name("w", &random_suffix(&mut rng));
        let b = test_pod_name("w", &random_suffix(&mut rng));
        assert_ne!(a, b);
    }

    fn pod(phase: &str, cs: Option<ContainerState>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: cs.map(|state| {
                    vec![ContainerStatus {
                        name: "verify".into(),
                        state: Some(state),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn waiting(reason: &str) -> Option<ContainerState> {
        Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: None,
            }),
            ..Default::default()
        })
    }

    fn exited(code: i32) -> Option<ContainerState> {
        Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn verdict_table() {
        let cases: Vec<(Pod, Option<&str>)> = vec![
            (pod("Pending", None), None),
            (pod("Pending", waiting("ContainerCreating")), None),
            (pod("Running", None), None),
            (pod("Succeeded", exited(0)), Some("ok")),
            (pod("Failed", exited(3)), Some("NonZeroExit")),
            (pod("Running", exited(1)), Some("NonZeroExit")),
            (pod("Failed", None), Some("PodFailed")),
            (
                pod("Pending", waiting("ErrImagePull")),
                Some("ErrImagePull"),
            ),
            (
                pod("Pending", waiting("ImagePullBackOff")),
                Some("ImagePullBackOff"),
            ),
            (
                pod("Pending", waiting("InvalidImageName")),
                Some("InvalidImageName"),
            ),
            (
                pod("Pending", waiting("CreateContainerConfigError")),
                Some("CreateContainerConfigError"),
            ),
            (
                pod("Running", waiting("CrashLoopBackOff")),
                Some("CrashLoopBackOff"),
            ),
        ];
        let budget = Budget::new(0, std::time::Duration::from_secs(300));
        for (p, want) in cases {
            let got = judge(&Observation::of("v", &p, budget, 0));
            match (want, &got) {
                (None, Verdict::InProgress) | (Some("ok"), Verdict::Succeeded) => {}
                (Some(r), Verdict::Failed(c)) if c.reason == r => {}
                _ => panic!("{:?}: want {want:?}, got {got:?}", p.status),
            }
        }
        match judge(&Observation::of("v", &pod("Failed", exited(3)), budget, 0)) {
            Verdict::Failed(c) => assert_eq!(c.exit_code, Some(3)),
            v => panic!("{v:?}"),
        }
    }

    fn reason(v: Verdict) -> String {
        match v {
            Verdict::Failed(c) => c.reason,
            v => format!("{v:?}"),
        }
    }

    #[test]
    fn timeout_deletion_and_cancel_are_verdicts_too() {
        let budget = Budget::new(1_000, std::time::Duration::from_secs(60));
        let pending = pod("Pending", waiting("ContainerCreating"));
        let o = Observation::of("kata-verify-n1-x", &pending, budget, 60_999);
        assert_eq!(judge(&o), Verdict::InProgress);
        let late = Observation {
            now_ms: 61_000,
            ..o.clone()
        };
        match judge(&late) {
            Verdict::Failed(c) => {
                assert_eq!(c.reason, "Timeout");
                assert!(
                    c.message.contains("within 60s") && c.message.contains("ContainerCreating"),
                    "{}",
                    c.message
                );
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            reason(judge(&Observation {
                deleted: true,
                ..o.clone()
            })),
            "VerificationPodDeleted"
        );
        assert_eq!(
            reason(judge(&Observation {
                cancel: true,
                ..late.clone()
            })),
            "Cancelled"
        );
        // A pod that finished is judged by its status, even when the watch then saw it deleted
        // or the timeout passed meanwhile.
        let done = pod("Succeeded", exited(0));
        let finished = Observation {
            pod: &done,
            deleted: true,
            now_ms: 1_000_000,
            ..o.clone()
        };
        assert_eq!(judge(&finished), Verdict::Succeeded);
        // A timeout of centuries never overflows.
        let forever = Observation::of(
            "v",
            &pending,
            Budget::new(0, std::time::Duration::MAX),
            i64::MAX,
        );
        assert_eq!(judge(&forever), Verdict::InProgress);
    }
}
