//! What a verification pod may be. The template (the chart's default or a run's
//! `verification-pod` annotation) is created by the agents with their own rights on every
//! upgraded node, so whoever may annotate the trigger would otherwise run a pod of their choosing
//! there. It is checked when the run is resolved, before anything is touched: it must run on the
//! node being verified (`${NODE}`) and get no host access and no Secrets.
//!
//! The chart's admission policy `<fullname>-agent-verification-pods`
//! (`charts/kata-lifecycle-manager/templates/agent-pod-policy.yaml`) enforces the same rules on
//! the API server for every pod an agent creates; keep the two in step.
use crate::verification::PodTemplate;
use k8s_openapi::api::core::v1::{
    Container, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Volume,
};
use std::fmt;

/// The node label that pins a pod by `nodeSelector` or node affinity.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The ServiceAccount every namespace has; always allowed.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Substituted for `${NODE}` while checking: a name no real template spells out, so a pin to it
/// can only come from the placeholder.
const NODE_SENTINEL: &str = "klm-pod-policy-node-sentinel";
const TEST_POD_SENTINEL: &str = "klm-pod-policy-test-pod";

/// Volume kinds that give a pod no host access and no Secrets.
const ALLOWED_VOLUME_KINDS: [&str; 4] = ["emptyDir", "configMap", "downwardAPI", "projected"];
/// Sources of a `projected` volume that carry no Secret and no token.
const ALLOWED_PROJECTED_SOURCES: [&str; 2] = ["configMap", "downwardAPI"];

/// One reason a verification pod is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Neither `nodeName` nor a `kubernetes.io/hostname` selector/affinity names `${NODE}`.
    NotPinned,
    /// `spec.nodeName` names something other than `${NODE}`.
    NodeNameNotNode(String),
    Privileged {
        container: String,
    },
    AllowPrivilegeEscalation {
        container: String,
    },
    AddedCapabilities {
        container: String,
        added: Vec<String>,
    },
    HostNamespace(&'static str),
    HostPort {
        container: String,
        port: i32,
    },
    HostPath {
        volume: String,
    },
    /// A volume of a kind outside [`ALLOWED_VOLUME_KINDS`] (secret, persistentVolumeClaim, csi…).
    VolumeKind {
        volume: String,
        kind: String,
    },
    /// A `projected` source outside [`ALLOWED_PROJECTED_SOURCES`] (secret, serviceAccountToken…).
    ProjectedSource {
        volume: String,
        source: String,
    },
    /// An environment variable read from a Secret.
    SecretEnv {
        container: String,
    },
    ServiceAccount(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotPinned => write!(
                f,
                "it is not pinned to the node being verified: set `nodeSelector: {{{HOSTNAME_LABEL}: ${{NODE}}}}` \
                 (or spec.nodeName: ${{NODE}}, or a required node affinity on {HOSTNAME_LABEL} In [${{NODE}}])"
            ),
            Violation::NodeNameNotNode(n) => {
                write!(f, "spec.nodeName is {n:?}; it may only be ${{NODE}}")
            }
            Violation::Privileged { container } => {
                write!(f, "container {container:?} is privileged")
            }
            Violation::AllowPrivilegeEscalation { container } => {
                write!(
                    f,
                    "container {container:?} sets allowPrivilegeEscalation: true"
                )
            }
            Violation::AddedCapabilities { container, added } => write!(
                f,
                "container {container:?} adds capabilities {}",
                added.join(", ")
            ),
            Violation::HostNamespace(field) => write!(f, "spec.{field} is true"),
            Violation::HostPort { container, port } => {
                write!(f, "container {container:?} uses hostPort {port}")
            }
            Violation::HostPath { volume } => write!(f, "volume {volume:?} is a hostPath"),
            Violation::VolumeKind { volume, kind } => write!(
                f,
                "volume {volume:?} is a {kind} volume (allowed: {})",
                ALLOWED_VOLUME_KINDS.join(", ")
            ),
            Violation::ProjectedSource { volume, source } => write!(
                f,
                "projected volume {volume:?} has a {source} source (allowed: {})",
                ALLOWED_PROJECTED_SOURCES.join(", ")
            ),
            Violation::SecretEnv { container } => {
                write!(f, "container {container:?} reads environment from a Secret")
            }
            Violation::ServiceAccount(sa) => write!(
                f,
                "serviceAccountName {sa:?} is not allowed (only {DEFAULT_SERVICE_ACCOUNT:?} and the \
                 chart value verification.serviceAccounts)"
            ),
        }
    }
}

/// A verification pod refused by the policy, with every reason found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError(pub Vec<Violation>);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reasons: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "the verification pod is refused: {}", reasons.join("; "))
    }
}

/// Checks a parsed verification pod template; `allowed_service_accounts` are the names besides
/// `default` the chart allows (`verification.serviceAccounts`).
pub fn check(
    template: &PodTemplate,
    allowed_service_accounts: &[String],
) -> Result<(), PolicyError> {
    // The template parsed already, so rendering it cannot fail for another reason; a failure
    // here would be a parse bug, reported rather than waved through.
    let pod = template
        .render(
            NODE_SENTINEL,
            TEST_POD_SENTINEL,
            "policy-check",
            "policy-check",
        )
        .map_err(|_| PolicyError(vec![Violation::NotPinned]))?;
    let spec = pod.spec.unwrap_or_default();
    let mut found = Vec::new();
    check_pinned(&spec, &mut found);
    check_host_access(&spec, &mut found);
    for c in all_containers(&spec) {
        check_container(c, &mut found);
    }
    for v in spec.volumes.iter().flatten() {
        check_volume(v, &mut found);
    }
    let sa = spec
        .service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
        .filter(|s| !s.is_empty());
    if let Some(sa) = sa
        && sa != DEFAULT_SERVICE_ACCOUNT
        && !allowed_service_accounts.iter().any(|a| a == sa)
    {
        found.push(Violation::ServiceAccount(sa.to_string()));
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(PolicyError(found))
    }
}

fn check_pinned(spec: &PodSpec, found: &mut Vec<Violation>) {
    if let Some(n) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        if n == NODE_SENTINEL {
            return;
        }
        found.push(Violation::NodeNameNotNode(n.to_string()));
        return;
    }
    let by_selector = spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get(HOSTNAME_LABEL))
        .is_some_and(|v| v == NODE_SENTINEL);
    let by_affinity = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|sel| {
            // Terms are ORed: every one of them must pin the node.
            !sel.node_selector_terms.is_empty() && sel.node_selector_terms.iter().all(term_pins)
        });
    if !(by_selector || by_affinity) {
        found.push(Violation::NotPinned);
    }
}

/// A node selector term (its requirements are ANDed) that only the node being verified matches.
fn term_pins(term: &NodeSelectorTerm) -> bool {
    let pins = |r: &NodeSelectorRequirement, key: &str| {
        r.key == key
            && r.operator == "In"
            && r.values.as_deref() == Some(&[NODE_SENTINEL.to_string()][..])
    };
    term.match_expressions
        .iter()
        .flatten()
        .any(|r| pins(r, HOSTNAME_LABEL))
        || term
            .match_fields
            .iter()
            .flatten()
            .any(|r| pins(r, "metadata.name"))
}

fn check_host_access(spec: &PodSpec, found: &mut Vec<Violation>) {
    for (field, on) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if on == Some(true) {
            found.push(Violation::HostNamespace(field));
        }
    }
}

fn all_containers(spec: &PodSpec) -> Vec<&Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect()
}

fn check_container(c: &Container, found: &mut Vec<Violation>) {
    let name = || c.name.clone();
    if let Some(sc) = &c.security_context {
        if sc.privileged == Some(true) {
            found.push(Violation::Privileged { container: name() });
        }
        if sc.allow_privilege_escalation == Some(true) {
            found.push(Violation::AllowPrivilegeEscalation { container: name() });
        }
        let added: Vec<String> = sc
            .capabilities
            .as_ref()
            .and_then(|caps| caps.add.clone())
            .unwrap_or_default();
        if !added.is_empty() {
            found.push(Violation::AddedCapabilities {
                container: name(),
                added,
            });
        }
    }
    for p in c.ports.iter().flatten() {
        if let Some(port) = p.host_port.filter(|p| *p != 0) {
            found.push(Violation::HostPort {
                container: name(),
                port,
            });
        }
    }
    let secret_env = c.env.iter().flatten().any(|e| {
        e.value_from
            .as_ref()
            .is_some_and(|v| v.secret_key_ref.is_some())
    }) || c.env_from.iter().flatten().any(|e| e.secret_ref.is_some());
    if secret_env {
        found.push(Violation::SecretEnv { container: name() });
    }
}

fn check_volume(v: &Volume, found: &mut Vec<Violation>) {
    // The volume's kind is its one field besides `name`; read it generically so a kind this
    // crate's API version does not know is refused too, not missed.
    let value = serde_json::to_value(v).unwrap_or_default();
    let kinds: Vec<&String> = value
        .as_object()
        .map(|o| o.keys().filter(|k| *k != "name").collect())
        .unwrap_or_default();
    for kind in kinds {
        if kind == "hostPath" {
            found.push(Violation::HostPath {
                volume: v.name.clone(),
            });
        } else if !ALLOWED_VOLUME_KINDS.contains(&kind.as_str()) {
            found.push(Violation::VolumeKind {
                volume: v.name.clone(),
                kind: kind.clone(),
            });
        }
    }
    let sources = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
    for source in sources {
        let value = serde_json::to_value(source).unwrap_or_default();
        for key in value.as_object().map(|o| o.keys()).into_iter().flatten() {
            if !ALLOWED_PROJECTED_SOURCES.contains(&key.as_str()) {
                found.push(Violation::ProjectedSource {
                    volume: v.name.clone(),
                    source: key.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the top-level README ("Verification pod") and the chart README.
    const README_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: ${TEST_POD}
spec:
  runtimeClassName: kata-qemu
  restartPolicy: Never
  nodeSelector:
    kubernetes.io/hostname: ${NODE}
  tolerations:
    - operator: Exists
  containers:
    - name: verify
      image: quay.io/kata-containers/alpine-bash-curl:latest
      command: ["sh", "-c", "echo node ${NODE}; uname -r"]
"#;

    /// A minimal pod whose `spec:` ends with `extra` (indented two spaces) and whose container
    /// ends with `container_extra` (indented six).
    fn pod(pin: &str, extra: &str, container_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ${{TEST_POD}}\nspec:\n  restartPolicy: Never\n{pin}{extra}  containers:\n    - name: verify\n      image: busybox\n{container_extra}"
        )
    }

    const PIN: &str = "  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n";

    fn verdict(text: &str, allowed: &[&str]) -> Result<(), PolicyError> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        check(
            &PodTemplate::parse(text).expect("test template parses"),
            &allowed,
        )
    }

    fn refused(text: &str) -> PolicyError {
        verdict(text, &[]).expect_err("the policy must refuse this pod")
    }

    #[test]
    fn the_readme_example_is_accepted() {
        assert_eq!(verdict(README_POD, &[]), Ok(()));
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(README_POD),
            "the README's verification pod changed: update README_POD here"
        );
    }

    #[test]
    fn every_way_of_pinning_to_the_node_is_accepted() {
        for pin in [
            PIN,
            "  nodeName: ${NODE}\n",
            "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchExpressions:\n              - {key: kubernetes.io/hostname, operator: In, values: [\"${NODE}\"]}\n",
            "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchFields:\n              - {key: metadata.name, operator: In, values: [\"${NODE}\"]}\n",
        ] {
            assert_eq!(verdict(&pod(pin, "", ""), &[]), Ok(()), "{pin}");
        }
    }

    #[test]
    fn a_pod_not_pinned_to_the_node_is_refused() {
        for pin in [
            "",
            "  nodeSelector:\n    kubernetes.io/hostname: worker-7\n",
            "  nodeSelector:\n    pool: ${NODE}\n",
            // One term of two pins; the other lets the pod go anywhere.
            "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchExpressions:\n              - {key: kubernetes.io/hostname, operator: In, values: [\"${NODE}\"]}\n          - matchExpressions:\n              - {key: pool, operator: Exists}\n",
            "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchExpressions:\n              - {key: kubernetes.io/hostname, operator: In, values: [\"${NODE}\", worker-7]}\n",
            "  affinity:\n    nodeAffinity:\n      preferredDuringSchedulingIgnoredDuringExecution:\n        - weight: 1\n          preference:\n            matchExpressions:\n              - {key: kubernetes.io/hostname, operator: In, values: [\"${NODE}\"]}\n",
        ] {
            let err = refused(&pod(pin, "", ""));
            assert_eq!(err.0, vec![Violation::NotPinned], "{pin}");
            assert!(err.to_string().contains("not pinned"), "{err}");
        }
    }

    #[test]
    fn a_node_name_other_than_the_node_is_refused_even_with_a_selector() {
        let err = refused(&pod(&format!("  nodeName: worker-7\n{PIN}"), "", ""));
        assert_eq!(err.0, vec![Violation::NodeNameNotNode("worker-7".into())]);
        assert!(err.to_string().contains("worker-7"), "{err}");
    }

    #[test]
    fn privileged_escalation_and_capabilities_are_refused() {
        let err = refused(&pod(
            PIN,
            "",
            "      securityContext:\n        privileged: true\n        allowPrivilegeEscalation: true\n        capabilities:\n          add: [SYS_ADMIN, NET_ADMIN]\n",
        ));
        assert_eq!(
            err.0,
            vec![
                Violation::Privileged {
                    container: "verify".into()
                },
                Violation::AllowPrivilegeEscalation {
                    container: "verify".into()
                },
                Violation::AddedCapabilities {
                    container: "verify".into(),
                    added: vec!["SYS_ADMIN".into(), "NET_ADMIN".into()]
                },
            ]
        );
        let msg = err.to_string();
        assert!(
            msg.contains("privileged") && msg.contains("SYS_ADMIN, NET_ADMIN"),
            "{msg}"
        );
    }

    #[test]
    fn dropping_capabilities_and_a_locked_down_context_are_fine() {
        let ok = pod(
            PIN,
            "",
            "      securityContext:\n        privileged: false\n        allowPrivilegeEscalation: false\n        capabilities:\n          drop: [ALL]\n",
        );
        assert_eq!(verdict(&ok, &[]), Ok(()));
    }

    #[test]
    fn init_containers_are_checked_too() {
        let err = refused(&pod(
            PIN,
            "  initContainers:\n    - name: setup\n      image: busybox\n      securityContext:\n        privileged: true\n",
            "",
        ));
        assert_eq!(
            err.0,
            vec![Violation::Privileged {
                container: "setup".into()
            }]
        );
    }

    #[test]
    fn host_namespaces_and_host_ports_are_refused() {
        let err = refused(&pod(
            PIN,
            "  hostNetwork: true\n  hostPID: true\n  hostIPC: true\n",
            "      ports:\n        - containerPort: 80\n          hostPort: 8080\n",
        ));
        assert_eq!(
            err.0,
            vec![
                Violation::HostNamespace("hostNetwork"),
                Violation::HostNamespace("hostPID"),
                Violation::HostNamespace("hostIPC"),
                Violation::HostPort {
                    container: "verify".into(),
                    port: 8080
                },
            ]
        );
        assert!(err.to_string().contains("spec.hostPID is true"), "{err}");
    }

    #[test]
    fn host_path_volumes_are_refused() {
        let err = refused(&pod(
            PIN,
            "  volumes:\n    - name: root\n      hostPath:\n        path: /\n",
            "",
        ));
        assert_eq!(
            err.0,
            vec![Violation::HostPath {
                volume: "root".into()
            }]
        );
        assert!(err.to_string().contains("\"root\" is a hostPath"), "{err}");
    }

    #[test]
    fn secrets_in_volumes_projections_and_env_are_refused() {
        let err = refused(&pod(
            PIN,
            "  volumes:\n    - name: creds\n      secret:\n        secretName: db\n    - name: data\n      persistentVolumeClaim:\n        claimName: data\n    - name: mix\n      projected:\n        sources:\n          - configMap: {name: settings}\n          - secret: {name: db}\n          - serviceAccountToken: {path: token, audience: vault}\n",
            "      env:\n        - name: PASSWORD\n          valueFrom:\n            secretKeyRef: {name: db, key: password}\n",
        ));
        assert_eq!(
            err.0,
            vec![
                Violation::SecretEnv {
                    container: "verify".into()
                },
                Violation::VolumeKind {
                    volume: "creds".into(),
                    kind: "secret".into()
                },
                Violation::VolumeKind {
                    volume: "data".into(),
                    kind: "persistentVolumeClaim".into()
                },
                Violation::ProjectedSource {
                    volume: "mix".into(),
                    source: "secret".into()
                },
                Violation::ProjectedSource {
                    volume: "mix".into(),
                    source: "serviceAccountToken".into()
                },
            ]
        );
        let env_from = refused(&pod(
            PIN,
            "",
            "      envFrom:\n        - secretRef: {name: db}\n",
        ));
        assert_eq!(
            env_from.0,
            vec![Violation::SecretEnv {
                container: "verify".into()
            }]
        );
    }

    #[test]
    fn harmless_volumes_are_fine() {
        let ok = pod(
            PIN,
            "  volumes:\n    - name: scratch\n      emptyDir: {}\n    - name: cfg\n      configMap: {name: settings}\n    - name: info\n      downwardAPI:\n        items:\n          - {path: name, fieldRef: {fieldPath: metadata.name}}\n    - name: both\n      projected:\n        sources:\n          - configMap: {name: settings}\n          - downwardAPI:\n              items:\n                - {path: ns, fieldRef: {fieldPath: metadata.namespace}}\n",
            "      env:\n        - name: MODE\n          valueFrom:\n            configMapKeyRef: {name: settings, key: mode}\n",
        );
        assert_eq!(verdict(&ok, &[]), Ok(()));
    }

    #[test]
    fn only_the_default_or_an_allowed_service_account() {
        let named = |sa: &str| pod(PIN, &format!("  serviceAccountName: {sa}\n"), "");
        assert_eq!(verdict(&named("default"), &[]), Ok(()));
        let err = refused(&named("ci-runner"));
        assert_eq!(err.0, vec![Violation::ServiceAccount("ci-runner".into())]);
        assert!(
            err.to_string().contains("verification.serviceAccounts"),
            "{err}"
        );
        assert_eq!(verdict(&named("ci-runner"), &["ci-runner"]), Ok(()));
        // The deprecated field counts as well.
        let old = pod(PIN, "  serviceAccount: admin\n", "");
        assert_eq!(
            verdict(&old, &["ci-runner"]).unwrap_err().0,
            vec![Violation::ServiceAccount("admin".into())]
        );
    }

    /// The check runs where a run's parameters are resolved, for the annotation and the
    /// chart's default alike, and names the trigger key.
    #[test]
    fn resolving_a_run_refuses_a_template_that_breaks_the_policy() {
        use crate::keys::trigger;
        use crate::params::{Defaults, resolve};
        use base64::Engine;
        use std::collections::BTreeMap;
        let defaults = |pod: &str, allowed: &[&str]| Defaults {
            verification_pod: pod.into(),
            verification_service_accounts: allowed.iter().map(|s| s.to_string()).collect(),
            ..crate::params::tests::defaults()
        };
        let target: BTreeMap<String, String> =
            [(trigger::TARGET_VERSION.to_string(), "3.28.0".to_string())].into();
        let unpinned = pod("", "", "");
        let err = resolve(&target, &defaults(&unpinned, &[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(trigger::VERIFICATION_POD) && err.contains("not pinned"),
            "{err}"
        );
        let mut annotated = target.clone();
        annotated.insert(
            trigger::VERIFICATION_POD.into(),
            base64::engine::general_purpose::STANDARD.encode(pod(
                PIN,
                "  serviceAccountName: ci-runner\n",
                "",
            )),
        );
        let err = resolve(&annotated, &defaults(README_POD, &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"ci-runner\" is not allowed"), "{err}");
        assert!(resolve(&annotated, &defaults(README_POD, &["ci-runner"])).is_ok());
        assert!(resolve(&target, &defaults(README_POD, &[])).is_ok());
    }

    #[test]
    fn all_reasons_are_reported_at_once() {
        let err = refused(&pod(
            "",
            "  hostNetwork: true\n",
            "      securityContext:\n        privileged: true\n",
        ));
        assert_eq!(err.0.len(), 3, "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("the verification pod is refused: it is not pinned"),
            "{msg}"
        );
    }
}
