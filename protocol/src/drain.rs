//! Which pods a drain evicts, as `kubectl drain --ignore-daemonsets` does.
use k8s_openapi::api::core::v1::Pod;

pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainDecision {
    Evict,
    Skip(&'static str),
}

pub fn decide(pod: &Pod) -> DrainDecision {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
    {
        return DrainDecision::Skip("mirror pod");
    }
    if meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet" && o.controller == Some(true))
    {
        return DrainDecision::Skip("DaemonSet pod");
    }
    if meta.deletion_timestamp.is_some() {
        return DrainDecision::Skip("already terminating");
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") | Some("Failed") => DrainDecision::Skip("already finished"),
        _ => DrainDecision::Evict,
    }
}

/// The PodDisruptionBudget named by an eviction refusal (HTTP 429). The API server says
/// "The disruption budget <name> needs <n> healthy pods and has <m> currently" in the
/// `DisruptionBudget` cause; older servers put it in the message.
pub fn blocking_budget(message: &str) -> Option<String> {
    const PREFIX: &str = "disruption budget ";
    let lower = message.to_ascii_lowercase();
    let at = lower.find(PREFIX)? + PREFIX.len();
    let name: String = message[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    let name = name.trim_end_matches('.');
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    fn owned(kind: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    kind: kind.into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        assert_eq!(
            decide(&owned("DaemonSet")),
            DrainDecision::Skip("DaemonSet pod")
        );
        assert_eq!(decide(&owned("ReplicaSet")), DrainDecision::Evict);
        assert_eq!(decide(&Pod::default()), DrainDecision::Evict);
        let mut mirror = Pod::default();
        mirror.metadata.annotations =
            Some([(MIRROR_POD_ANNOTATION.to_string(), "x".to_string())].into());
        assert_eq!(decide(&mirror), DrainDecision::Skip("mirror pod"));
        let mut gone = owned("ReplicaSet");
        gone.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(decide(&gone), DrainDecision::Skip("already terminating"));
    }

    #[test]
    fn budget_names_from_eviction_refusals() {
        let cases = [
            (
                "The disruption budget web-pdb needs 2 healthy pods and has 2 currently",
                Some("web-pdb"),
            ),
            (
                "Cannot evict pod as it would violate the pod's disruption budget.",
                None,
            ),
            ("too many requests", None),
        ];
        for (msg, want) in cases {
            assert_eq!(blocking_budget(msg).as_deref(), want, "{msg}");
        }
    }
}
