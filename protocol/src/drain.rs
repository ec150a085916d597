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
}
