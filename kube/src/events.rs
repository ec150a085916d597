//! Kubernetes Events (`events.k8s.io/v1`), so `kubectl describe node` and `kubectl get events`
//! tell the story. One Event per occurrence: kube-runtime's `Recorder` folds repeats of the same
//! (reason, action, object) into a series that keeps the *first* message, which made a later
//! run's Event show an earlier run's text. Publishing is best effort: a refused Event must
//! never stop an upgrade.
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

/// The API limits `note` to 1 KiB.
const NOTE_LIMIT: usize = 1000;

#[derive(Clone)]
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Events {
            client,
            controller: controller.to_string(),
            instance: instance.unwrap_or_else(|| controller.to_string()),
        }
    }

    pub async fn publish(
        &self,
        target: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = build(
            target,
            &self.controller,
            &self.instance,
            warning,
            reason,
            action,
            note,
        );
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

/// The Event for one occurrence: in the object's namespace (`default` for cluster-scoped
/// objects, as kubectl expects), named `<object>.<hex time><hex random>` as client-go names
/// them (`generateName` is no use: a prefix ending in '.' is not a valid name).
pub fn build(
    target: &ObjectReference,
    controller: &str,
    instance: &str,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) -> Event {
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let object = target.name.clone().unwrap_or_else(|| "object".into());
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}{:04x}",
                object.chars().take(200).collect::<String>(),
                jiff::Timestamp::now().as_nanosecond(),
                rand::random::<u16>()
            )),
            namespace: Some(namespace),
            ..Default::default()
        },
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        type_: Some(if warning { "Warning" } else { "Normal" }.to_string()),
        reason: Some(reason.to_string()),
        action: Some(action.to_string()),
        note: Some(note.chars().take(NOTE_LIMIT).collect()),
        regarding: Some(target.clone()),
        reporting_controller: Some(controller.to_string()),
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Default::default()
    }
}

/// Reference to a Node (cluster-scoped).
pub fn node_ref(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.to_string()),
        uid,
        ..Default::default()
    }
}

/// Reference to a ConfigMap.
pub fn configmap_ref(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        uid,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_events_go_to_default_with_a_bounded_note() {
        let e = build(
            &node_ref("worker-1", None),
            "kata-lifecycle-manager",
            "coordinator-0",
            true,
            "NodeFailed",
            "Upgrade",
            "x".repeat(5000),
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
        let name = e.metadata.name.clone().unwrap();
        assert!(
            name.starts_with("worker-1.") && name.len() > "worker-1.".len() + 8,
            "{name}"
        );
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.note.unwrap().len(), NOTE_LIMIT);
        let e = build(
            &configmap_ref("klm", "kata-lifecycle-manager", None),
            "c",
            "i",
            false,
            "RunStarted",
            "Upgrade",
            "n".into(),
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("klm"));
        assert_eq!(e.type_.as_deref(), Some("Normal"));
    }
}
