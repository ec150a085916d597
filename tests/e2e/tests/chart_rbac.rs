//! The Helm chart on a real control plane: `helm install --wait` succeeds, the two
//! ServiceAccounts have exactly the rights the design needs (asked of the API server's own
//! authorizer with SubjectAccessReviews), the coordinator's ServiceAccount can really
//! `helm upgrade` and `helm rollback` a kata-deploy-shaped release (helm impersonating it), and a
//! `helm upgrade` of our chart keeps the trigger's annotations and the run status.
//!
//! Everything lives in this test's own namespaces and on its own two simulated nodes
//! (label `klm.test/chart-e2e=true`), so it can share the cluster with the other tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use klm_protocol::keys::node::{DRAIN_REQUEST, GRANT, STATUS as STATUS_LABEL};
use klm_testkit::Cluster;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use tokio::sync::OnceCell;

const RELEASE: &str = "klm-chart-e2e";
const NS: &str = "klm-chart-e2e";
/// `<release>-<chart>`: the release name does not contain the chart name.
const FULLNAME: &str = "klm-chart-e2e-kata-lifecycle-manager";
const KD_NS: &str = "klm-chart-kd";
const VERIFY_NS: &str = "klm-chart-verify";
const NODE_LABEL: &str = "klm.test/chart-e2e";
const NODES: [&str; 2] = ["klm-chart-e2e-1", "klm-chart-e2e-2"];
const HELM_TIMEOUT: &str = "5m";
/// A ClusterRole/ClusterRoleBinding pair the chart treats as kata-deploy's (by name), so the
/// escalation test does not race the helm test over the real `kata-deploy-role`.
const PROBE_ROLE: &str = "klm-chart-e2e-probe-role";
const PROBE_BINDING: &str = "klm-chart-e2e-probe-rb";

const VERIFICATION_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: ${TEST_POD}
spec:
  restartPolicy: Never
  nodeSelector:
    kubernetes.io/hostname: ${NODE}
  containers:
    - name: verify
      image: quay.io/kata-containers/alpine-bash-curl:latest
      command: ["sh", "-c", "echo ${NODE}"]
"#;

/// The workspace root (this crate lives in `<root>/tests/e2e`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/e2e is two levels below the workspace root")
        .to_path_buf()
}

fn agent_sa() -> String {
    format!("{FULLNAME}-agent")
}

fn coordinator_sa() -> String {
    format!("{FULLNAME}-coordinator")
}

/// The identity a pod of that ServiceAccount authenticates as.
fn identity(sa: &str) -> (String, Vec<String>) {
    (
        format!("system:serviceaccount:{NS}:{sa}"),
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{NS}"),
            "system:authenticated".into(),
        ],
    )
}

/// What the chart install left behind, shared by the tests of this file.
struct Installed {
    cluster: &'static Cluster,
    /// helm's own state (cache, config, data) and packaged fixture charts.
    work: PathBuf,
    install_output: String,
}

static INSTALLED: OnceCell<Installed> = OnceCell::const_new();

/// kata-deploy's cluster-scoped objects (`kata-deploy-role`, `kata-deploy-rb`, RuntimeClasses)
/// belong to one release at a time: the tests that install a kata-deploy release take turns.
static KATA_DEPLOY_RELEASE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn installed() -> &'static Installed {
    INSTALLED
        .get_or_try_init(install)
        .await
        .unwrap_or_else(|e| panic!("installing the chart failed: {e:#}"))
}

async fn install() -> Result<Installed> {
    let cluster = Cluster::shared().await;
    let client = cluster.client().await?;
    // Inside the cluster directory: removed with the cluster.
    let work = cluster
        .dir()
        .join(format!("chart-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    // Namespaces the chart's RBAC points into must exist before the install.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [KD_NS, VERIFY_NS] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        created_or_exists(namespaces.create(&PostParams::default(), &obj).await)?;
    }
    // Two simulated nodes of our own (kwok makes them Ready), so our pods don't land on the
    // nodes of other tests.
    let nodes: Api<Node> = Api::all(client.clone());
    for name in NODES {
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", NODE_LABEL: "true", "type": "kwok"},
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"}
            }
        }))?;
        created_or_exists(nodes.create(&PostParams::default(), &node).await)?;
    }
    for name in NODES {
        wait_node_ready(&nodes, name).await?;
    }

    let pod_file = work.join("verification-pod.yaml");
    std::fs::write(&pod_file, VERIFICATION_POD)?;
    let helm = Helm::new(cluster, &work);
    // A cluster attached with KLM_KUBECONFIG may still have the release of an earlier run.
    helm.run(&[
        "uninstall",
        RELEASE,
        "-n",
        NS,
        "--ignore-not-found",
        "--wait",
    ])?;
    let chart = root().join("charts/kata-lifecycle-manager");
    let on_our_nodes = format!(r#"{{"{NODE_LABEL}":"true"}}"#);
    let install_output = helm.run(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "-n",
        NS,
        "--create-namespace",
        "--set-file",
        &format!("defaults.verificationPod={}", pod_file.display()),
        "--set",
        &format!("defaults.helmNamespace={KD_NS}"),
        "--set",
        &format!("defaults.verificationNamespace={VERIFY_NS}"),
        "--set-json",
        &format!("agent.nodeSelector={on_our_nodes}"),
        "--set-json",
        &format!("coordinator.nodeSelector={on_our_nodes}"),
        // The chart's kata-deploy RBAC names plus a probe pair for the escalation test.
        "--set-json",
        &format!(
            r#"rbac.kataDeployClusterRoles=["kata-deploy-role","kata-deploy-dispatcher-noderole","{PROBE_ROLE}"]"#
        ),
        "--set-json",
        &format!(
            r#"rbac.kataDeployClusterRoleBindings=["kata-deploy-rb","kata-deploy-dispatcher-noderb","{PROBE_BINDING}"]"#
        ),
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;
    Ok(Installed {
        cluster,
        work,
        install_output,
    })
}

#[tokio::test]
async fn chart_installs_with_wait_and_prints_next_steps() -> Result<()> {
    let inst = installed().await;
    let out = &inst.install_output;
    ensure!(
        out.contains("STATUS: deployed"),
        "helm install output:\n{out}"
    );
    for expected in [
        "kubectl label node <node> katacontainers.io/kata-lifecycle-manager-window=true".to_string(),
        format!("kubectl annotate configmap {FULLNAME} -n {NS}"),
        "lifecycle.katacontainers.io/target-version=<version> --overwrite".to_string(),
        "kubectl get nodes -L katacontainers.io/kata-lifecycle-manager-status -L katacontainers.io/kata-current-version".to_string(),
        format!("kubectl get configmap {FULLNAME} -n {NS} -o yaml"),
    ] {
        ensure!(out.contains(&expected), "NOTES lack {expected:?}:\n{out}");
    }

    let client = inst.cluster.client().await?;
    // --wait returned: one agent per node of ours, both coordinator replicas ready.
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .get(&format!("{FULLNAME}-agent"))
        .await?;
    let status = ds.status.context("agent DaemonSet has no status")?;
    ensure!(
        status.desired_number_scheduled == NODES.len() as i32
            && status.number_ready == NODES.len() as i32,
        "agent DaemonSet: {status:?}"
    );
    // The trigger exists under the name users annotate (its data is the upgrade test's).
    Api::<ConfigMap>::namespaced(client, NS)
        .get(FULLNAME)
        .await?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Who {
    Agent,
    Coordinator,
}

/// One row of the authorization matrix: can `who` do `verb` on group/resource[/sub] in
/// namespace (empty = cluster-wide) [by name]?
struct Can {
    who: Who,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: String,
    allowed: bool,
}

fn row(
    who: Who,
    allowed: bool,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &str,
) -> Can {
    Can {
        who,
        verb,
        group,
        resource,
        namespace,
        name: name.to_string(),
        allowed,
    }
}

#[tokio::test]
async fn service_accounts_have_least_privilege() -> Result<()> {
    use Who::*;
    let inst = installed().await;
    let client = inst.cluster.client().await?;
    let upgrade_lease = format!("{FULLNAME}-upgrade");
    let leader_lease = format!("{FULLNAME}-coordinator");
    // Waves: the Leases of wave slots 1..49 (batch-size up to 50), and one beyond them.
    let first_slot_lease = format!("{upgrade_lease}-1");
    let last_slot_lease = format!("{upgrade_lease}-49");
    let beyond_slot_lease = format!("{upgrade_lease}-50");
    let verification_cm = format!("{FULLNAME}-verification-pod");
    #[rustfmt::skip]
    let matrix = vec![
        // ---- agent: what one node's upgrade needs
        row(Agent, true,  "patch",  "", "nodes", "", "klm-chart-e2e-1"),
        row(Agent, true,  "watch",  "", "nodes", "", ""),
        row(Agent, false, "delete", "", "nodes", "", "klm-chart-e2e-1"),
        // The coordinator drains: the agent neither reads pods cluster-wide nor evicts any.
        row(Agent, false, "list",   "", "pods", "", ""),
        row(Agent, false, "watch",  "", "pods", "", ""),
        row(Agent, false, "create", "", "pods/eviction", "default", "x"),
        row(Agent, false, "create", "", "pods/eviction", NS, "x"),
        row(Agent, false, "create", "", "pods/eviction", KD_NS, "x"),
        row(Agent, false, "create", "", "pods/eviction", VERIFY_NS, "x"),
        row(Agent, false, "delete", "", "pods", "default", "x"),
        row(Agent, true,  "delete", "", "pods", KD_NS, "kata-deploy-abcde"),
        row(Agent, false, "create", "", "pods", KD_NS, ""),
        row(Agent, true,  "create", "", "pods", VERIFY_NS, ""),
        row(Agent, true,  "get",    "", "pods/log", VERIFY_NS, "verify-x"),
        row(Agent, true,  "delete", "", "pods", VERIFY_NS, "verify-x"),
        row(Agent, false, "create", "", "pods", "default", ""),
        row(Agent, false, "create", "", "pods", NS, ""),
        row(Agent, false, "create", "", "pods", "kube-system", ""),
        row(Agent, true,  "update", "coordination.k8s.io", "leases", NS, &upgrade_lease),
        row(Agent, true,  "watch",  "coordination.k8s.io", "leases", NS, &upgrade_lease),
        row(Agent, false, "update", "coordination.k8s.io", "leases", NS, &leader_lease),
        row(Agent, true,  "update", "coordination.k8s.io", "leases", NS, &first_slot_lease),
        row(Agent, true,  "watch",  "coordination.k8s.io", "leases", NS, &last_slot_lease),
        row(Agent, false, "update", "coordination.k8s.io", "leases", NS, &beyond_slot_lease),
        row(Agent, false, "create", "coordination.k8s.io", "leases", NS, ""),
        // Issue 12: the agent's turn is the grant on its own Node; the run record is not its.
        row(Agent, false, "watch",  "", "configmaps", NS, FULLNAME),
        row(Agent, false, "get",    "", "configmaps", NS, FULLNAME),
        row(Agent, false, "update", "", "configmaps", NS, FULLNAME),
        row(Agent, false, "get",    "", "configmaps", NS, &verification_cm),
        row(Agent, true,  "create", "", "events", "default", ""),
        row(Agent, true,  "create", "events.k8s.io", "events", NS, ""),
        row(Agent, false, "get",    "", "secrets", NS, "x"),
        row(Agent, false, "list",   "", "secrets", KD_NS, ""),
        row(Agent, false, "list",   "", "secrets", "", ""),
        row(Agent, false, "patch",  "apps", "daemonsets", KD_NS, "kata-deploy"),
        row(Agent, false, "get",    "apps", "daemonsets", KD_NS, "kata-deploy"),
        row(Agent, false, "create", "rbac.authorization.k8s.io", "clusterrolebindings", "", ""),
        // RBAC grants these on every node; the chart's admission policies narrow them to the
        // agent's own node (agent_token_reaches_only_its_own_node)...
        row(Agent, true,  "patch",  "", "nodes", "", "klm-chart-e2e-2"),
        row(Agent, true,  "delete", "", "pods", KD_NS, "kata-deploy-on-another-node"),
        // Evictions, which no admission policy can tie to a node, are not the agent's at all.
        row(Agent, false, "create", "", "pods/eviction", "kube-system", "x"),
        // Nothing that could mint another identity or reach into a pod.
        row(Agent, false, "update", "", "nodes/status", "", "klm-chart-e2e-1"),
        row(Agent, false, "create", "", "serviceaccounts/token", NS, &agent_sa()),
        row(Agent, false, "create", "", "pods/exec", VERIFY_NS, "verify-x"),
        row(Agent, false, "create", "", "pods/ephemeralcontainers", VERIFY_NS, "verify-x"),
        row(Agent, false, "deletecollection", "", "pods", KD_NS, ""),
        row(Agent, false, "impersonate", "", "serviceaccounts", NS, &coordinator_sa()),
        row(Agent, false, "create", "", "secrets", VERIFY_NS, ""),
        // ---- coordinator: helm upgrade/rollback of kata-deploy, run bookkeeping
        row(Coordinator, true,  "list",   "", "secrets", KD_NS, ""),
        row(Coordinator, true,  "get",    "", "secrets", KD_NS, "sh.helm.release.v1.kata-deploy.v1"),
        row(Coordinator, true,  "create", "", "secrets", KD_NS, ""),
        row(Coordinator, true,  "update", "", "secrets", KD_NS, "sh.helm.release.v1.kata-deploy.v1"),
        row(Coordinator, false, "get",    "", "secrets", NS, "x"),
        row(Coordinator, false, "get",    "", "secrets", "kube-system", "x"),
        row(Coordinator, false, "list",   "", "secrets", "", ""),
        row(Coordinator, true,  "patch",  "apps", "daemonsets", KD_NS, "kata-deploy"),
        row(Coordinator, true,  "create", "apps", "daemonsets", KD_NS, ""),
        row(Coordinator, false, "patch",  "apps", "daemonsets", "kube-system", "kube-proxy"),
        row(Coordinator, true,  "list",   "apps", "daemonsets", "", ""),  // kata-deploy's lookups
        row(Coordinator, true,  "list",   "apps", "controllerrevisions", KD_NS, ""),
        row(Coordinator, true,  "update", "", "configmaps", KD_NS, "kata-deploy-settings"),
        row(Coordinator, true,  "create", "batch", "jobs", KD_NS, ""),
        row(Coordinator, true,  "list",   "", "pods", KD_NS, ""),
        // The drain is the coordinator's: the node's pods in any namespace, evicted (never deleted).
        row(Coordinator, true,  "list",   "", "pods", "", ""),
        row(Coordinator, true,  "watch",  "", "pods", "", ""),
        row(Coordinator, true,  "create", "", "pods/eviction", "default", "x"),
        row(Coordinator, true,  "create", "", "pods/eviction", "kube-system", "x"),
        row(Coordinator, false, "delete", "", "pods", "default", "x"),
        row(Coordinator, false, "deletecollection", "", "pods", "default", ""),
        row(Coordinator, false, "delete", "", "pods", KD_NS, "x"),
        row(Coordinator, false, "create", "", "pods", KD_NS, ""),
        row(Coordinator, false, "create", "", "pods", VERIFY_NS, ""),
        row(Coordinator, true,  "create", "node.k8s.io", "runtimeclasses", "", ""),
        row(Coordinator, true,  "patch",  "", "nodes", "", "klm-chart-e2e-1"),
        row(Coordinator, true,  "escalate", "rbac.authorization.k8s.io", "clusterroles", "", "kata-deploy-role"),
        row(Coordinator, false, "escalate", "rbac.authorization.k8s.io", "clusterroles", "", "cluster-admin"),
        row(Coordinator, false, "bind",   "rbac.authorization.k8s.io", "clusterroles", "", "cluster-admin"),
        row(Coordinator, true,  "update", "rbac.authorization.k8s.io", "clusterrolebindings", "", "kata-deploy-rb"),
        row(Coordinator, false, "update", "rbac.authorization.k8s.io", "clusterrolebindings", "", "cluster-admin"),
        // kata-deploy's job mode (deploymentMode=job, 3.32+) RBAC, by name too. Its dispatcher's
        // Role and RoleBinding: created in the kata-deploy namespace only (within the
        // coordinator's own rights there: no escalate/bind), changed only by name.
        row(Coordinator, true,  "create", "rbac.authorization.k8s.io", "roles", KD_NS, ""),
        row(Coordinator, true,  "create", "rbac.authorization.k8s.io", "rolebindings", KD_NS, ""),
        row(Coordinator, true,  "patch",  "rbac.authorization.k8s.io", "roles", KD_NS, "kata-deploy-dispatcher-role"),
        row(Coordinator, true,  "delete", "rbac.authorization.k8s.io", "rolebindings", KD_NS, "kata-deploy-dispatcher-rb"),
        row(Coordinator, false, "patch",  "rbac.authorization.k8s.io", "roles", KD_NS, "someone-else"),
        row(Coordinator, false, "update", "rbac.authorization.k8s.io", "rolebindings", KD_NS, "someone-else"),
        row(Coordinator, false, "escalate", "rbac.authorization.k8s.io", "roles", KD_NS, "kata-deploy-dispatcher-role"),
        row(Coordinator, false, "bind",   "rbac.authorization.k8s.io", "roles", KD_NS, "kata-deploy-dispatcher-role"),
        row(Coordinator, false, "create", "rbac.authorization.k8s.io", "roles", NS, ""),
        row(Coordinator, false, "create", "rbac.authorization.k8s.io", "rolebindings", "kube-system", ""),
        row(Coordinator, true,  "escalate", "rbac.authorization.k8s.io", "clusterroles", "", "kata-deploy-dispatcher-noderole"),
        row(Coordinator, true,  "bind",   "rbac.authorization.k8s.io", "clusterroles", "", "kata-deploy-dispatcher-noderole"),
        row(Coordinator, true,  "update", "rbac.authorization.k8s.io", "clusterrolebindings", "", "kata-deploy-dispatcher-noderb"),
        // Post-delete hooks run only on uninstall, which the coordinator never does.
        row(Coordinator, false, "escalate", "rbac.authorization.k8s.io", "clusterroles", "", "kata-deploy-cleanup-role"),
        row(Coordinator, false, "bind",   "rbac.authorization.k8s.io", "clusterroles", "", "kata-deploy-cleanup-role"),
        // escalate/bind by name only: a new ClusterRole (no name yet) cannot exceed its rights.
        row(Coordinator, false, "escalate", "rbac.authorization.k8s.io", "clusterroles", "", ""),
        row(Coordinator, false, "bind",   "rbac.authorization.k8s.io", "clusterroles", "", ""),
        row(Coordinator, false, "impersonate", "", "serviceaccounts", KD_NS, "kata-deploy-sa"),
        row(Coordinator, false, "create", "", "serviceaccounts/token", KD_NS, "kata-deploy-sa"),
        row(Coordinator, false, "create", "", "pods/exec", KD_NS, "kata-deploy-abcde"),
        row(Coordinator, true,  "create", "coordination.k8s.io", "leases", NS, ""),
        row(Coordinator, true,  "update", "coordination.k8s.io", "leases", NS, &upgrade_lease),
        row(Coordinator, true,  "update", "coordination.k8s.io", "leases", NS, &leader_lease),
        row(Coordinator, false, "update", "coordination.k8s.io", "leases", NS, "someone-else"),
        row(Coordinator, true,  "update", "coordination.k8s.io", "leases", NS, &last_slot_lease),
        row(Coordinator, true,  "watch",  "coordination.k8s.io", "leases", NS, &first_slot_lease),
        row(Coordinator, false, "update", "coordination.k8s.io", "leases", NS, &beyond_slot_lease),
        row(Coordinator, true,  "update", "", "configmaps", NS, FULLNAME),
        row(Coordinator, true,  "watch",  "", "configmaps", NS, FULLNAME),
        row(Coordinator, false, "update", "", "configmaps", NS, &verification_cm),
        // Recreating the trigger ConfigMap deleted mid-run (faults.rs
        // a_deleted_trigger_configmap_mid_run_leaves_no_orphan).
        row(Coordinator, true,  "create", "", "configmaps", NS, ""),
        row(Coordinator, true,  "create", "", "events", NS, ""),
    ];

    let reviews: Api<SubjectAccessReview> = Api::all(client);
    let mut wrong = Vec::new();
    for can in &matrix {
        let sa = match can.who {
            Who::Agent => agent_sa(),
            Who::Coordinator => coordinator_sa(),
        };
        let (user, groups) = identity(&sa);
        let (resource, subresource) = match can.resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_string())),
            None => (can.resource, None),
        };
        let review = SubjectAccessReview {
            metadata: Default::default(),
            spec: SubjectAccessReviewSpec {
                user: Some(user),
                groups: Some(groups),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(can.verb.into()),
                    group: Some(can.group.into()),
                    resource: Some(resource.into()),
                    subresource,
                    namespace: (!can.namespace.is_empty()).then(|| can.namespace.into()),
                    name: (!can.name.is_empty()).then(|| can.name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            status: None,
        };
        let answer = reviews.create(&PostParams::default(), &review).await?;
        let allowed = answer.status.map(|s| s.allowed).unwrap_or(false);
        if allowed != can.allowed {
            let word = |b: bool| if b { "allowed" } else { "denied" };
            let target = match (can.group, can.namespace) {
                ("", "") => format!("{} (cluster)", can.resource),
                ("", ns) => format!("{} in {ns}", can.resource),
                (g, "") => format!("{g}/{} (cluster)", can.resource),
                (g, ns) => format!("{g}/{} in {ns}", can.resource),
            };
            wrong.push(format!(
                "{sa}: {} {target} name {:?}: want {}, got {}",
                can.verb,
                can.name,
                word(can.allowed),
                word(allowed)
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {} authorization checks are wrong:\n{}",
        wrong.len(),
        matrix.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// The rights are enough for the real thing: helm, impersonating the coordinator's
/// ServiceAccount, upgrades a kata-deploy-shaped release the way the coordinator does (its
/// ClusterRole gains a right the coordinator lacks, a RuntimeClass is added, a cluster-wide
/// `lookup` runs) and rolls it back to the recorded revision. The agent cannot even read it.
#[tokio::test]
async fn coordinator_can_upgrade_and_roll_back_kata_deploy_and_the_agent_cannot() -> Result<()> {
    let _one_release = KATA_DEPLOY_RELEASE.lock().await;
    let inst = installed().await;
    let helm = Helm::new(inst.cluster, &inst.work);
    let charts = inst.work.join("kata-deploy-charts");
    std::fs::create_dir_all(&charts)?;
    let fixture = root().join("tests/chart/fixtures/kata-deploy");
    for v in ["1.0.0", "2.0.0"] {
        helm.run(&[
            "package",
            fixture.to_str().unwrap(),
            "--version",
            v,
            "--app-version",
            v,
            "--destination",
            charts.to_str().unwrap(),
        ])?;
    }
    let chart = |v: &str| {
        charts
            .join(format!("kata-deploy-{v}.tgz"))
            .display()
            .to_string()
    };
    let on_our_nodes = format!(r#"nodeSelector={{"{NODE_LABEL}":"true"}}"#);

    // The release as an admin installed it, with kata-deploy's own verification pod set.
    helm.run(&[
        "uninstall",
        "kata-deploy",
        "-n",
        KD_NS,
        "--ignore-not-found",
        "--wait",
    ])?;
    helm.run(&[
        "install",
        "kata-deploy",
        &chart("1.0.0"),
        "-n",
        KD_NS,
        "--set-json",
        &on_our_nodes,
        "--set",
        "verification.pod=apiVersion: v1",
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;

    let coordinator = helm.impersonating(&coordinator_sa());
    coordinator.run(&[
        "upgrade",
        "kata-deploy",
        &chart("2.0.0"),
        "-n",
        KD_NS,
        "--reset-then-reuse-values",
        "--set",
        "updateStrategy.type=OnDelete",
        "--set",
        "verification.pod=",
    ])?;
    let client = inst.cluster.client().await?;
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), KD_NS);
    let strategy = |ds: DaemonSet| {
        ds.spec
            .and_then(|s| s.update_strategy)
            .and_then(|u| u.type_)
    };
    ensure!(strategy(ds_api.get("kata-deploy").await?).as_deref() == Some("OnDelete"));
    let role = Api::<ClusterRole>::all(client.clone())
        .get("kata-deploy-role")
        .await?;
    let grants_configmaps = |role: &ClusterRole| {
        role.rules
            .iter()
            .flatten()
            .any(|r| r.resources.iter().flatten().any(|x| x == "configmaps"))
    };
    ensure!(
        grants_configmaps(&role),
        "the upgrade did not escalate kata-deploy-role: {role:?}"
    );
    let rcs: Api<RuntimeClass> = Api::all(client.clone());
    ensure!(
        rcs.get_opt("klm-chart-e2e-kata-clh").await?.is_some(),
        "2.0.0's RuntimeClass is missing"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), KD_NS);
    ensure!(
        cms.get_opt("kata-deploy-verification-spec")
            .await?
            .is_none(),
        "verification.pod= did not turn kata-deploy's verification off"
    );

    // Roll back to the recorded revision, waiting like the coordinator does.
    coordinator.run(&[
        "rollback",
        "kata-deploy",
        "1",
        "-n",
        KD_NS,
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;
    ensure!(strategy(ds_api.get("kata-deploy").await?).as_deref() == Some("RollingUpdate"));
    let role = Api::<ClusterRole>::all(client.clone())
        .get("kata-deploy-role")
        .await?;
    ensure!(
        !grants_configmaps(&role),
        "the rollback did not restore kata-deploy-role"
    );
    ensure!(
        rcs.get_opt("klm-chart-e2e-kata-clh").await?.is_none(),
        "the rollback left 2.0.0's RuntimeClass"
    );
    let history = coordinator.run(&["history", "kata-deploy", "-n", KD_NS])?;
    ensure!(
        history.lines().count() == 4,
        "expected 3 revisions:\n{history}"
    );

    // The agent cannot touch the release: helm's records are Secrets.
    let err = helm
        .impersonating(&agent_sa())
        .run(&["status", "kata-deploy", "-n", KD_NS])
        .expect_err("the agent must not read the kata-deploy release");
    ensure!(
        format!("{err:#}").contains("forbidden"),
        "unexpected error: {err:#}"
    );

    helm.run(&["uninstall", "kata-deploy", "-n", KD_NS, "--wait"])?;
    Ok(())
}

/// The upstream kata-deploy charts (`../shared/kata-deploy-charts`, packaged unmodified), each
/// upgrade path users take, with the coordinator's ServiceAccount rights (helm impersonating it):
/// the upgrade as the coordinator makes it (`--reset-then-reuse-values`, `OnDelete`, kata-deploy's
/// own verification off), then the restore the coordinator makes on failure — back to the
/// recorded chart version with the recorded user values, still `OnDelete`, so that no pod moves
/// by itself. The release's user values (narrowed shims, a pinned default shim, a mirrored
/// image) are asserted on the rendered DaemonSet, and the pods never move during either step.
#[tokio::test]
async fn coordinator_rights_upgrade_and_restore_the_real_kata_deploy_charts() -> Result<()> {
    let _one_release = KATA_DEPLOY_RELEASE.lock().await;
    let inst = installed().await;
    let helm = Helm::new(inst.cluster, &inst.work);
    let coordinator = helm.impersonating(&coordinator_sa());
    let charts = klm_testkit::upstream::charts_dir();
    let chart = |v: &str| {
        charts
            .join(format!("kata-deploy-{v}.tgz"))
            .display()
            .to_string()
    };
    let client = inst.cluster.client().await?;
    let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), KD_NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), KD_NS);
    let on_our_nodes = format!(r#"nodeSelector={{"{NODE_LABEL}":"true"}}"#);
    const MIRROR: &str = "registry.example/mirror/kata-deploy";

    for (from, to) in klm_testkit::upstream::UPGRADE_PATHS {
        let path = format!("{from} -> {to}");
        // Post-delete hooks would start cleanup Jobs; the next install reuses the names.
        helm.run(&[
            "uninstall",
            "kata-deploy",
            "-n",
            KD_NS,
            "--ignore-not-found",
            "--no-hooks",
            "--wait",
        ])?;
        // As users install it: default RollingUpdate, their own values.
        helm.run(&[
            "install",
            "kata-deploy",
            &chart(from),
            "-n",
            KD_NS,
            "--set-json",
            &on_our_nodes,
            "--set",
            "shims.disableAll=true",
            "--set",
            "shims.qemu.enabled=true",
            "--set",
            "shims.clh.enabled=true",
            "--set",
            "defaultShim.amd64=clh",
            "--set",
            &format!("image.reference={MIRROR}"),
            "--wait",
            "--timeout",
            HELM_TIMEOUT,
        ])
        .with_context(|| format!("{path}: install {from}"))?;
        let before = pod_images(&pods).await?;
        ensure!(
            before.len() == NODES.len() && before.iter().all(|i| i == &format!("{MIRROR}:{from}")),
            "{path}: kata-deploy pods after the install: {before:?}"
        );

        coordinator
            .run(&[
                "upgrade",
                "kata-deploy",
                &chart(to),
                "-n",
                KD_NS,
                "--reset-then-reuse-values",
                "--set",
                "updateStrategy.type=OnDelete",
                "--set",
                "verification.pod=",
            ])
            .with_context(|| format!("{path}: upgrade as the coordinator"))?;
        let ds = ds_api.get("kata-deploy").await?;
        check_rendered(&ds, &format!("{MIRROR}:{to}"))
            .with_context(|| format!("{path}: after the upgrade"))?;
        ensure!(
            pod_images(&pods).await? == before,
            "{path}: a pod moved by itself after the upgrade"
        );

        // The restore: the recorded revision's user values, the recorded chart, still OnDelete.
        let values = coordinator.run(&[
            "get",
            "values",
            "kata-deploy",
            "-n",
            KD_NS,
            "--revision",
            "1",
            "-o",
            "json",
        ])?;
        let values_file = inst.work.join(format!("recorded-values-{from}.json"));
        std::fs::write(&values_file, values)?;
        coordinator
            .run(&[
                "upgrade",
                "kata-deploy",
                &chart(from),
                "-n",
                KD_NS,
                "--reset-values",
                "-f",
                values_file.to_str().context("utf-8 path")?,
                "--set",
                "updateStrategy.type=OnDelete",
                "--set",
                "verification.pod=",
            ])
            .with_context(|| format!("{path}: restore as the coordinator"))?;
        let ds = ds_api.get("kata-deploy").await?;
        check_rendered(&ds, &format!("{MIRROR}:{from}"))
            .with_context(|| format!("{path}: after the restore"))?;
        ensure!(
            pod_images(&pods).await? == before,
            "{path}: a pod moved by itself after the restore"
        );
        let history = coordinator.run(&["history", "kata-deploy", "-n", KD_NS, "-o", "json"])?;
        let history: Vec<Value> = serde_json::from_str(&history)?;
        let charts_seen: Vec<&str> = history.iter().filter_map(|r| r["chart"].as_str()).collect();
        ensure!(
            charts_seen
                == [
                    format!("kata-deploy-{from}"),
                    format!("kata-deploy-{to}"),
                    format!("kata-deploy-{from}")
                ],
            "{path}: helm history {charts_seen:?}"
        );
    }
    helm.run(&[
        "uninstall",
        "kata-deploy",
        "-n",
        KD_NS,
        "--no-hooks",
        "--wait",
    ])?;
    Ok(())
}

/// Job mode (`deploymentMode: job`, upstream 3.32.0 → 4.0.0) with the coordinator's
/// ServiceAccount rights (helm impersonating it): the scoped upgrade of one node as
/// `coordinator/src/helm.rs` builds it (the run's upgrade argv plus `--set job.nodes={<node>}`,
/// chart from a classic repository), then the scoped restore back to 3.32.0 with the recorded
/// revision's values. Job mode renders what daemonset mode does not: the dispatcher's
/// ServiceAccount, Role and RoleBinding, the job-templates ConfigMap and the dispatcher hook Job,
/// which helm waits for (kwok completes its pod). The dispatcher's `--nodes` and the install
/// template's image prove the scope and the user's values reached the chart.
#[tokio::test]
async fn coordinator_rights_run_job_mode_scoped_upgrade_and_restore() -> Result<()> {
    const FROM: &str = "3.32.0";
    const TO: &str = "4.0.0";
    const MIRROR: &str = "registry.example/mirror/kata-deploy";
    let _one_release = KATA_DEPLOY_RELEASE.lock().await;
    let inst = installed().await;
    let helm = Helm::new(inst.cluster, &inst.work);
    let coordinator = helm.impersonating(&coordinator_sa());
    let repo = klm_testkit::upstream::UpstreamRepo::serve().await?;
    let client = inst.cluster.client().await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), KD_NS);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), KD_NS);
    let node = NODES[0];
    let scope = klm_protocol::install::job_nodes_set_value(&[node.to_string()].into());

    helm.run(&[
        "uninstall",
        "kata-deploy",
        "-n",
        KD_NS,
        "--ignore-not-found",
        "--no-hooks",
        "--wait",
    ])?;
    // As a user installs job mode: every node of ours, a mirrored image.
    helm.run(&[
        "install",
        "kata-deploy",
        "kata-deploy",
        "--repo",
        repo.url(),
        "--version",
        FROM,
        "-n",
        KD_NS,
        "--set",
        "deploymentMode=job",
        "--set-json",
        &format!(r#"job.nodeSelector={{"{NODE_LABEL}":"true"}}"#),
        "--set",
        &format!("image.reference={MIRROR}"),
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])
    .context("install 3.32.0 in job mode")?;

    // The scoped upgrade: `Helm::upgrade_args` (no run values) + the scope.
    coordinator
        .run(&[
            "upgrade",
            "kata-deploy",
            "kata-deploy",
            "-n",
            KD_NS,
            "--version",
            TO,
            "--repo",
            repo.url(),
            "--reset-then-reuse-values",
            "--set",
            "updateStrategy.type=OnDelete",
            "--set",
            "verification.pod=",
            "--set",
            &scope,
        ])
        .context("scoped upgrade as the coordinator")?;
    check_dispatched(&jobs, &cms, node, &format!("{MIRROR}:{TO}"), TO)
        .await
        .context("after the scoped upgrade")?;

    // The scoped restore: `Helm::restore_args` with the recorded revision's values + the scope.
    let values = coordinator.run(&[
        "get",
        "values",
        "kata-deploy",
        "-n",
        KD_NS,
        "--revision",
        "1",
        "-o",
        "json",
    ])?;
    let values_file = inst.work.join("recorded-values-job-mode.json");
    std::fs::write(&values_file, values)?;
    coordinator
        .run(&[
            "upgrade",
            "kata-deploy",
            "kata-deploy",
            "-n",
            KD_NS,
            "--version",
            FROM,
            "--repo",
            repo.url(),
            "--reset-values",
            "-f",
            values_file.to_str().context("utf-8 path")?,
            "--set",
            "updateStrategy.type=OnDelete",
            "--set",
            "verification.pod=",
            "--timeout",
            "300s",
            "--set",
            &scope,
        ])
        .context("scoped restore as the coordinator")?;
    check_dispatched(&jobs, &cms, node, &format!("{MIRROR}:{FROM}"), FROM)
        .await
        .context("after the scoped restore")?;

    let history = coordinator.run(&["history", "kata-deploy", "-n", KD_NS, "-o", "json"])?;
    let history: Vec<Value> = serde_json::from_str(&history)?;
    let seen: Vec<(&str, &str)> = history
        .iter()
        .filter_map(|r| Some((r["chart"].as_str()?, r["status"].as_str()?)))
        .collect();
    ensure!(
        seen == [
            ("kata-deploy-3.32.0", "superseded"),
            ("kata-deploy-4.0.0", "superseded"),
            ("kata-deploy-3.32.0", "deployed"),
        ],
        "helm history {seen:?}"
    );
    helm.run(&[
        "uninstall",
        "kata-deploy",
        "-n",
        KD_NS,
        "--no-hooks",
        "--wait",
    ])?;
    Ok(())
}

/// The release's dispatcher hook Job completed, dispatches `node` only, at `version`, and the
/// per-node install template it clones runs `image` (the user's mirror kept).
async fn check_dispatched(
    jobs: &Api<Job>,
    cms: &Api<ConfigMap>,
    node: &str,
    image: &str,
    version: &str,
) -> Result<()> {
    let dispatcher = jobs.get("kata-deploy-install-dispatcher").await?;
    let complete = klm_testkit::kata_deploy_sim::finished(&dispatcher) == Some(true);
    ensure!(complete, "dispatcher not complete: {:?}", dispatcher.status);
    let container = dispatcher
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .context("dispatcher without a container")?;
    let args: Vec<&str> = container
        .command
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let nodes_arg = format!("--nodes={node}");
    ensure!(
        args.contains(&nodes_arg.as_str())
            && !args.iter().any(|a| a.starts_with("--node-selector")),
        "dispatcher argv {args:?}, expected {nodes_arg}"
    );
    ensure!(
        container
            .image
            .as_deref()
            .is_some_and(|i| i.ends_with(&format!(":{version}"))),
        "dispatcher image {:?}, expected version {version}",
        container.image
    );
    let templates = cms.get("kata-deploy-job-templates").await?;
    let template = templates
        .data
        .as_ref()
        .and_then(|d| d.get("install-job.yaml"))
        .context("job-templates ConfigMap without install-job.yaml")?;
    ensure!(
        template.contains(&format!("image: {image}"))
            || template.contains(&format!("image: \"{image}\"")),
        "install-job.yaml does not run {image}:\n{template}"
    );
    Ok(())
}

/// Images of the kata-deploy pods, sorted.
async fn pod_images(pods: &Api<Pod>) -> Result<Vec<String>> {
    let mut images: Vec<String> = pods
        .list(&ListParams::default().labels("name=kata-deploy"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec?.containers.first()?.image.clone())
        .collect();
    images.sort();
    Ok(images)
}

/// The rendered DaemonSet keeps pacing (`OnDelete`) and the user's values.
fn check_rendered(ds: &DaemonSet, image: &str) -> Result<()> {
    let spec = ds.spec.as_ref().context("DaemonSet without spec")?;
    let strategy = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref());
    ensure!(strategy == Some("OnDelete"), "updateStrategy {strategy:?}");
    let container = spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.containers.first())
        .context("DaemonSet without a container")?;
    ensure!(
        container.image.as_deref() == Some(image),
        "image {:?}, expected {image}",
        container.image
    );
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    ensure!(
        env("SHIMS_X86_64").as_deref() == Some("clh qemu"),
        "SHIMS_X86_64 {:?}",
        env("SHIMS_X86_64")
    );
    ensure!(
        env("DEFAULT_SHIM_X86_64").as_deref() == Some("clh"),
        "DEFAULT_SHIM_X86_64 {:?}",
        env("DEFAULT_SHIM_X86_64")
    );
    Ok(())
}

/// RBAC lets every agent patch every Node; the chart's admission policy narrows that to the
/// agent's own Node. Checked with a real agent credential: a token bound to the agent pod on
/// node 1, as the kubelet would mount it.
#[tokio::test]
async fn agent_token_may_change_only_its_own_node() -> Result<()> {
    let inst = installed().await;
    let client = inst.cluster.client().await?;
    let (own, other) = (NODES[0], NODES[1]);
    let pods = Api::<Pod>::namespaced(client.clone(), NS)
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/component=agent")
                .fields(&format!("spec.nodeName={own}")),
        )
        .await?;
    let pod = pods
        .items
        .first()
        .context("no agent pod on our first node")?;
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": [],
            "expirationSeconds": 600,
            "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod",
                "name": pod.metadata.name, "uid": pod.metadata.uid,
            }
        }
    }))?;
    let token = Api::<ServiceAccount>::namespaced(client, NS)
        .create_token_request(&agent_sa(), &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest without status")?
        .token
        .context("TokenRequest without a token")?;
    let agent = client_with_token(inst.cluster.kubeconfig_path(), &token).await?;
    let nodes: Api<Node> = Api::all(agent);
    // A label the agent owns: since the policy also limits the fields, a foreign one would be
    // refused on its own Node too (agent_token_reaches_only_its_own_node).
    let mark = |v: &str| Patch::Merge(json!({"metadata": {"labels": {STATUS_LABEL: v}}}));

    nodes
        .patch(own, &PatchParams::default(), &mark("own"))
        .await
        .with_context(|| format!("the agent on {own} could not patch its own Node"))?;
    // The policy is live once its informer has seen it: allow a short settling time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match nodes
            .patch(other, &PatchParams::default(), &mark("other"))
            .await
        {
            Err(kube::Error::Api(e))
                if e.code == 403 && e.message.contains("may only change its own Node") =>
            {
                break;
            }
            Err(e) => bail!("patching {other} failed, but not by the policy: {e}"),
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Ok(_) => {
                bail!("the agent on {own} could patch {other}: the own-node policy is not enforced")
            }
        }
    }
    Ok(())
}

/// A client for the test cluster authenticating with a bearer token.
async fn client_with_token(admin_kubeconfig: &Path, token: &str) -> Result<kube::Client> {
    let admin = Kubeconfig::read_from(admin_kubeconfig)?;
    let cluster = admin
        .clusters
        .first()
        .context("kubeconfig has no cluster")?;
    let mut kubeconfig = serde_json::to_value(&admin)?;
    kubeconfig["users"] = json!([{"name": "agent", "user": {"token": token}}]);
    kubeconfig["contexts"] =
        json!([{"name": "agent", "context": {"cluster": cluster.name, "user": "agent"}}]);
    kubeconfig["current-context"] = json!("agent");
    let kubeconfig = Kubeconfig::from_yaml(&kubeconfig.to_string())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A request as an attacker would send it, and the refusal it must meet.
struct Attack<'a> {
    what: String,
    /// A fragment of the admission policy's message (the API server answers 403 with it).
    refused_with: &'static str,
    call: Box<dyn Fn() -> ApiCall<'a> + 'a>,
}

type ApiCall<'a> = Pin<Box<dyn Future<Output = std::result::Result<(), kube::Error>> + Send + 'a>>;

fn attack<'a, F, Fut, T>(what: impl Into<String>, refused_with: &'static str, call: F) -> Attack<'a>
where
    F: Fn() -> Fut + 'a,
    Fut: Future<Output = std::result::Result<T, kube::Error>> + Send + 'a,
{
    Attack {
        what: what.into(),
        refused_with,
        call: Box::new(move || {
            let fut = call();
            Box::pin(async move { fut.await.map(|_| ()) })
        }),
    }
}

/// Runs every attack (each is a dry run, so one that gets through changes nothing) and lists
/// those not refused with 403 and the expected message. Admission policies take effect once
/// the API server's informer has them, shortly after `helm install` returned: an attack that
/// gets through is retried until `settle`, after which its answer stands.
async fn unrefused(attacks: &[Attack<'_>], settle: tokio::time::Instant) -> Vec<String> {
    let mut wrong = Vec::new();
    for a in attacks {
        loop {
            let answer = (a.call)().await;
            let refused = matches!(&answer, Err(kube::Error::Api(e))
                if e.code == 403 && e.message.contains(a.refused_with));
            if refused {
                break;
            }
            if tokio::time::Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            wrong.push(match answer {
                Ok(()) => format!("{}: ALLOWED", a.what),
                Err(kube::Error::Api(e)) => {
                    format!(
                        "{}: {} {:?} (wanted 403 with {:?})",
                        a.what, e.code, e.message, a.refused_with
                    )
                }
                Err(e) => format!("{}: {e}", a.what),
            });
            break;
        }
    }
    wrong
}

/// A token of the agent ServiceAccount: bound to the agent pod on `node`, as the kubelet holds
/// it (the API server records the node in it), or bound to nothing when `node` is None.
async fn agent_token(client: &kube::Client, node: Option<&str>) -> Result<String> {
    let mut spec = json!({"audiences": [], "expirationSeconds": 600});
    if let Some(node) = node {
        let pods = Api::<Pod>::namespaced(client.clone(), NS)
            .list(
                &ListParams::default()
                    .labels("app.kubernetes.io/component=agent")
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await?;
        let pod = pods
            .items
            .first()
            .with_context(|| format!("no agent pod on {node}"))?;
        spec["boundObjectRef"] = json!({
            "apiVersion": "v1", "kind": "Pod",
            "name": pod.metadata.name, "uid": pod.metadata.uid,
        });
    }
    let request: TokenRequest = serde_json::from_value(json!({ "spec": spec }))?;
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .create_token_request(&agent_sa(), &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest without status")?
        .token
        .context("TokenRequest without a token")
}

/// A pod the agent could create: the README's verification pod, with `spec` merged into its
/// spec (a `containers` entry replaces the container list).
fn probe_pod(name: &str, spec: Value) -> Pod {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"klm.test/security-probe": "true"}},
        "spec": {
            "restartPolicy": "Never",
            "tolerations": [{"operator": "Exists"}],
            "containers": [{
                "name": "verify",
                "image": "quay.io/kata-containers/alpine-bash-curl:latest",
                "command": ["sh", "-c", "true"],
            }],
        },
    });
    for (k, v) in spec.as_object().cloned().unwrap_or_default() {
        pod["spec"][k] = v;
    }
    serde_json::from_value(pod).expect("probe pod is a Pod")
}

fn pinned_to(node: &str) -> Value {
    json!({"nodeSelector": {"kubernetes.io/hostname": node}})
}

/// `pinned_to(node)` with more spec fields.
fn pinned_with(node: &str, more: Value) -> Value {
    let mut spec = pinned_to(node);
    for (k, v) in more.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    spec
}

fn container(extra: Value) -> Value {
    let mut c =
        json!({"name": "verify", "image": "quay.io/kata-containers/alpine-bash-curl:latest"});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        c[k] = v;
    }
    json!([c])
}

fn dry_post() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

fn dry_delete() -> DeleteParams {
    DeleteParams {
        dry_run: true,
        ..Default::default()
    }
}

/// With the agent's real credential (a token bound to the agent pod on node A), everything RBAC
/// grants it on every node is refused by the API server outside node A: pods on another node,
/// pods with host access or Secrets, kata-deploy pods elsewhere, foreign Node fields, other
/// Nodes, a drain request for another Node; evictions are refused everywhere (the coordinator
/// drains); a token bound to no pod can do nothing. The agent's own work on node A — including
/// asking for its own drain — still passes.
#[tokio::test]
async fn agent_token_reaches_only_its_own_node() -> Result<()> {
    let inst = installed().await;
    let admin = inst.cluster.client().await?;
    let (own, other) = (NODES[0], NODES[1]);
    let settle = tokio::time::Instant::now() + Duration::from_secs(30);

    // A kata-deploy-namespace pod on each node, as the kata-deploy DaemonSet has.
    let kd_admin: Api<Pod> = Api::namespaced(admin.clone(), KD_NS);
    let kd_pod = |node: &str| {
        let mut p = probe_pod(
            &format!("klm-security-probe-{node}"),
            json!({"nodeName": node}),
        );
        p.spec.as_mut().unwrap().tolerations = None;
        p
    };
    for node in NODES {
        created_or_exists(kd_admin.create(&PostParams::default(), &kd_pod(node)).await)?;
    }
    let kd_name = |node: &str| format!("klm-security-probe-{node}");
    // A ServiceAccount in the verification namespace that is not `default` (e.g. one with
    // rights the verification pod must not borrow); absent, the API server would refuse the
    // pod for that reason before our policy is asked.
    let builder: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "builder"}}))?;
    created_or_exists(
        Api::<ServiceAccount>::namespaced(admin.clone(), VERIFY_NS)
            .create(&PostParams::default(), &builder)
            .await,
    )?;
    // The upgrade Lease, held by the other node (the coordinator that would create it is a
    // simulated pod here).
    let upgrade_lease = format!("{FULLNAME}-upgrade");
    let held_by_other: Lease = serde_json::from_value(json!({
        "metadata": {"name": upgrade_lease},
        "spec": {"holderIdentity": other, "leaseDurationSeconds": 30}
    }))?;
    let leases_admin: Api<Lease> = Api::namespaced(admin.clone(), NS);
    created_or_exists(
        leases_admin
            .create(&PostParams::default(), &held_by_other)
            .await,
    )?;
    leases_admin
        .patch(
            &upgrade_lease,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": other}})),
        )
        .await?;
    // Waves: a wave slot's Lease, held by the other node too.
    let slot_lease = format!("{upgrade_lease}-1");
    let slot_held_by_other: Lease = serde_json::from_value(json!({
        "metadata": {"name": slot_lease},
        "spec": {"holderIdentity": other, "leaseDurationSeconds": 30}
    }))?;
    created_or_exists(
        leases_admin
            .create(&PostParams::default(), &slot_held_by_other)
            .await,
    )?;
    leases_admin
        .patch(
            &slot_lease,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": other}})),
        )
        .await?;

    let bound = client_with_token(
        inst.cluster.kubeconfig_path(),
        &agent_token(&admin, Some(own)).await?,
    )
    .await?;
    let unbound = client_with_token(
        inst.cluster.kubeconfig_path(),
        &agent_token(&admin, None).await?,
    )
    .await?;
    let verify: Api<Pod> = Api::namespaced(bound.clone(), VERIFY_NS);
    let kd: Api<Pod> = Api::namespaced(bound.clone(), KD_NS);
    let nodes: Api<Node> = Api::all(bound.clone());
    let verify_unbound: Api<Pod> = Api::namespaced(unbound.clone(), VERIFY_NS);
    let kd_unbound: Api<Pod> = Api::namespaced(unbound.clone(), KD_NS);
    let nodes_unbound: Api<Node> = Api::all(unbound.clone());
    let leases: Api<Lease> = Api::namespaced(bound.clone(), NS);
    let dry_patch = PatchParams::default().dry_run();

    const PIN: &str = "may only create pods pinned to that node";
    const PRIVILEGED: &str = "may not create privileged pods";
    const SECRETS: &str = "may not create pods that mount Secrets";
    const NO_NODE: &str = "carries no node";
    // RBAC's refusal (the agent's ClusterRole has no pods/eviction).
    const EVICT: &str = "cannot create resource \"pods/eviction\"";
    let create = |api: &Api<Pod>, spec: Value| {
        let api = api.clone();
        move || {
            let (api, pod) = (api.clone(), probe_pod("klm-security-attack", spec.clone()));
            async move { api.create(&dry_post(), &pod).await }
        }
    };
    let patch_node = |api: &Api<Node>, node: &str, patch: Value| {
        let (api, node, dry) = (api.clone(), node.to_string(), dry_patch.clone());
        move || {
            let (api, node, patch) = (api.clone(), node.clone(), Patch::Merge(patch.clone()));
            let pp = dry.clone();
            async move { api.patch(&node, &pp, &patch).await }
        }
    };
    let delete = |api: &Api<Pod>, name: String| {
        let api = api.clone();
        move || {
            let (api, name) = (api.clone(), name.clone());
            async move { api.delete(&name, &dry_delete()).await }
        }
    };
    let evict = |api: &Api<Pod>, name: String| {
        let api = api.clone();
        move || {
            let (api, name) = (api.clone(), name.clone());
            let ep = EvictParams {
                post_options: dry_post(),
                ..Default::default()
            };
            async move { api.evict(&name, &ep).await }
        }
    };
    let conforming = pinned_with(
        own,
        json!({"containers": container(json!({
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
        }))}),
    );
    let status_label = json!({"metadata": {"labels": {STATUS_LABEL: "verifying"}}});

    #[rustfmt::skip]
    let attacks = vec![
        attack(format!("pod pinned to {other} by nodeSelector"), PIN, create(&verify, pinned_to(other))),
        attack(format!("pod with spec.nodeName {other}"), PIN, create(&verify, json!({"nodeName": other}))),
        attack("pod pinned to no node", PIN, create(&verify, json!({}))),
        attack(format!("pod on {own} by affinity that also allows {other}"), PIN, create(&verify, json!({
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [own, other]}]}
            ]}}}}))),
        attack("privileged pod", PRIVILEGED, create(&verify, pinned_with(own, json!({
            "containers": container(json!({"securityContext": {"privileged": true}}))})))),
        attack("pod adding CAP_SYS_ADMIN", PRIVILEGED, create(&verify, pinned_with(own, json!({
            "containers": container(json!({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}))})))),
        attack("pod in the host's network namespace", "host namespaces", create(&verify, pinned_with(own, json!({"hostNetwork": true})))),
        attack("pod mounting hostPath /", "hostPath", create(&verify, pinned_with(own, json!({
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "containers": container(json!({"volumeMounts": [{"name": "root", "mountPath": "/host"}]}))})))),
        attack("pod mounting a Secret", SECRETS, create(&verify, pinned_with(own, json!({
            "volumes": [{"name": "creds", "secret": {"secretName": "anything"}}],
            "containers": container(json!({"volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}))})))),
        attack("pod with a token for another audience", SECRETS, create(&verify, pinned_with(own, json!({
            "volumes": [{"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "t", "audience": "vault"}}]}}]})))),
        attack("pod reading a Secret into its environment", SECRETS, create(&verify, pinned_with(own, json!({
            "containers": container(json!({"env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "anything", "key": "k"}}}]}))})))),
        attack("pod running as another ServiceAccount", "running as ServiceAccount", create(&verify, pinned_with(own, json!({"serviceAccountName": "builder"})))),
        attack(format!("delete the kata-deploy pod on {other}"), "may only delete pods on that node", delete(&kd, kd_name(other))),
        // No eviction at all: an eviction request does not show the pod's node to admission,
        // so the right moved to the coordinator (which drains only a node in its turn).
        attack(format!("evict the kata-deploy pod on {other}"), EVICT, evict(&kd, kd_name(other))),
        attack(format!("evict the kata-deploy pod on {own} (its own node)"), EVICT, evict(&kd, kd_name(own))),
        attack("evict a pod in kube-system", EVICT, evict(&Api::namespaced(bound.clone(), "kube-system"), "kube-apiserver".into())),
        attack(format!("ask for the drain of {other}"), "may only change its own Node",
            patch_node(&nodes, other, json!({"metadata": {"annotations": {DRAIN_REQUEST: "upgrade/security-probe"}}}))),
        // Issue 12: a node's turn is the coordinator's grant on its Node; an agent that could
        // write it could give its node a turn (and with it the upgrade Lease) nobody granted.
        attack(format!("grant {own} a turn"), "only the coordinator grants a node its turn",
            patch_node(&nodes, own, json!({"metadata": {"annotations": {GRANT: r#"{"runId":"forged","kind":"upgrade"}"#}}}))),
        attack(format!("grant {other} a turn"), "may only change its own Node",
            patch_node(&nodes, other, json!({"metadata": {"annotations": {GRANT: r#"{"runId":"forged","kind":"upgrade"}"#}}}))),
        // Nor does it read the run record any more: its turn is on its own Node.
        attack("read the trigger ConfigMap (the run record)", "cannot get resource \"configmaps\"", {
            let api: Api<ConfigMap> = Api::namespaced(bound.clone(), NS);
            move || {
                let api = api.clone();
                async move { api.get(FULLNAME).await }
            }
        }),
        attack(format!("node-restriction.kubernetes.io label on {own}"), "may only change its own Node labels",
            patch_node(&nodes, own, json!({"metadata": {"labels": {"node-restriction.kubernetes.io/trusted": "true"}}}))),
        attack(format!("foreign annotation on {own}"), "may only change its own Node annotations",
            patch_node(&nodes, own, json!({"metadata": {"annotations": {"example.com/owner": "me"}}}))),
        attack(format!("taint {own}"), "spec.unschedulable",
            patch_node(&nodes, own, json!({"spec": {"taints": [{"key": "evil", "effect": "NoExecute"}]}}))),
        attack(format!("cordon {other}"), "may only change its own Node",
            patch_node(&nodes, other, json!({"spec": {"unschedulable": true}}))),
        attack(format!("status label on {other}"), "may only change its own Node", patch_node(&nodes, other, status_label.clone())),
        attack(format!("release {other}'s hold of the upgrade Lease"), "its own hold of the upgrade Lease", {
            let (api, name, pp) = (leases.clone(), upgrade_lease.clone(), dry_patch.clone());
            move || {
                let (api, name, pp) = (api.clone(), name.clone(), pp.clone());
                async move { api.patch(&name, &pp, &Patch::Merge(json!({"spec": {"holderIdentity": null}}))).await }
            }
        }),
        attack(format!("release {other}'s hold of a wave slot's Lease"), "its own hold of the upgrade Lease", {
            let (api, name, pp) = (leases.clone(), slot_lease.clone(), dry_patch.clone());
            move || {
                let (api, name, pp) = (api.clone(), name.clone(), pp.clone());
                async move { api.patch(&name, &pp, &Patch::Merge(json!({"spec": {"holderIdentity": null}}))).await }
            }
        }),
        attack(format!("renew {other}'s hold of the upgrade Lease"), "its own hold of the upgrade Lease", {
            let (api, name, pp) = (leases.clone(), upgrade_lease.clone(), dry_patch.clone());
            move || {
                let (api, name, pp) = (api.clone(), name.clone(), pp.clone());
                async move { api.patch(&name, &pp, &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 3600}}))).await }
            }
        }),
        // A token bound to no pod carries no node: nothing at all.
        attack(format!("unbound token: conforming pod on {own}"), NO_NODE, create(&verify_unbound, conforming.clone())),
        attack(format!("unbound token: status label on {own}"), NO_NODE, patch_node(&nodes_unbound, own, status_label.clone())),
        attack(format!("unbound token: delete the kata-deploy pod on {own}"), NO_NODE, delete(&kd_unbound, kd_name(own))),
        attack(format!("unbound token: evict the kata-deploy pod on {own}"), EVICT, evict(&kd_unbound, kd_name(own))),
    ];
    let wrong = unrefused(&attacks, settle).await;
    ensure!(
        wrong.is_empty(),
        "{} of {} attacks were not refused by the API server:\n{}",
        wrong.len(),
        attacks.len(),
        wrong.join("\n")
    );

    // The agent's own work on its node goes through, for real.
    let pod = verify
        .create(
            &PostParams::default(),
            &probe_pod("klm-security-legit", conforming.clone()),
        )
        .await
        .context("the agent could not create a conforming verification pod on its node")?;
    verify
        .delete(
            pod.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .context("the agent could not delete its verification pod")?;
    verify
        .create(
            &dry_post(),
            &probe_pod("klm-security-legit-nodename", json!({"nodeName": own})),
        )
        .await
        .context("the agent could not create a pod pinned by nodeName to its node")?;
    let cordon = json!({
        "metadata": {
            "labels": {STATUS_LABEL: "verifying"},
            "annotations": {STATUS_LABEL: "verifying", "lifecycle.katacontainers.io/run": "security-probe",
                            "lifecycle.katacontainers.io/cordoned-by": "kata-lifecycle-manager",
                            DRAIN_REQUEST: "upgrade/security-probe"}
        },
        "spec": {"unschedulable": true}
    });
    nodes
        .patch(own, &PatchParams::default(), &Patch::Merge(cordon))
        .await
        .context("the agent could not cordon, mark and ask for the drain of its own node")?;
    let uncordon = json!({
        "metadata": {
            "labels": {STATUS_LABEL: null},
            "annotations": {STATUS_LABEL: null, "lifecycle.katacontainers.io/run": null,
                            "lifecycle.katacontainers.io/cordoned-by": null, DRAIN_REQUEST: null}
        },
        "spec": {"unschedulable": null}
    });
    nodes
        .patch(own, &PatchParams::default(), &Patch::Merge(uncordon))
        .await
        .context("the agent could not uncordon its own node")?;
    kd.delete(&kd_name(own), &DeleteParams::default())
        .await
        .context("the agent could not delete the kata-deploy pod on its node")?;
    // Taking the Lease for its own node (when the holder's hold expired) and releasing it.
    leases
        .patch(
            &upgrade_lease,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": own}})),
        )
        .await
        .context("the agent could not take the upgrade Lease")?;
    leases
        .patch(
            &upgrade_lease,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": null}})),
        )
        .await
        .context("the agent could not release its hold of the upgrade Lease")?;
    kd_admin
        .delete(&kd_name(other), &DeleteParams::default())
        .await?;
    Ok(())
}

/// The eviction right moved from the agents to the coordinator: a workload pod on the agent's own
/// node cannot be evicted with the agent's pod-bound token, and is evicted for real by the
/// coordinator's ServiceAccount (as its drainer does, for a node in its draining turn).
#[tokio::test]
async fn the_coordinator_evicts_what_no_agent_may() -> Result<()> {
    let inst = installed().await;
    let admin = inst.cluster.client().await?;
    let own = NODES[0];
    let name = "klm-chart-e2e-drain-probe";
    let workloads: Api<Pod> = Api::namespaced(admin.clone(), "default");
    let mut pod = probe_pod(name, json!({"nodeName": own}));
    pod.metadata.namespace = Some("default".into());
    created_or_exists(workloads.create(&PostParams::default(), &pod).await)?;

    let agent = client_with_token(
        inst.cluster.kubeconfig_path(),
        &agent_token(&admin, Some(own)).await?,
    )
    .await?;
    match Api::<Pod>::namespaced(agent, "default")
        .evict(name, &EvictParams::default())
        .await
    {
        Err(kube::Error::Api(e))
            if e.code == 403
                && e.message
                    .contains("cannot create resource \"pods/eviction\"") => {}
        other => bail!(
            "the agent's eviction of a pod on its own node was not refused by RBAC: {other:?}"
        ),
    }
    ensure!(
        workloads
            .get_opt(name)
            .await?
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "the pod survived the agent's attempt"
    );

    let coordinator = as_coordinator(inst).await?;
    Api::<Pod>::namespaced(coordinator, "default")
        .evict(name, &EvictParams::default())
        .await
        .context("the coordinator could not evict a pod")?;
    ensure!(
        workloads
            .get_opt(name)
            .await?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "the coordinator's eviction went through"
    );
    workloads.delete(name, &DeleteParams::default()).await.ok();
    Ok(())
}

/// The coordinator's template check (`klm_protocol::pod_policy`) and the agents' admission policy
/// must agree: a template the coordinator accepts is never refused when the agent creates its
/// pod (a run would fail on its first node), and one it refuses is refused by the API server too
/// (the policy is the backstop for a forged run record or a compromised node).
#[tokio::test]
async fn template_check_and_agent_admission_policy_agree() -> Result<()> {
    use klm_protocol::pod_policy;
    use klm_protocol::verification::{PodTemplate, tolerate_cordon};
    let inst = installed().await;
    let admin = inst.cluster.client().await?;
    let own = NODES[0];
    let settle = tokio::time::Instant::now() + Duration::from_secs(30);
    let builder: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "builder"}}))?;
    created_or_exists(
        Api::<ServiceAccount>::namespaced(admin.clone(), VERIFY_NS)
            .create(&PostParams::default(), &builder)
            .await,
    )?;
    let agent = client_with_token(
        inst.cluster.kubeconfig_path(),
        &agent_token(&admin, Some(own)).await?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(agent, VERIFY_NS);

    let head = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ${TEST_POD}\nspec:\n  restartPolicy: Never\n";
    let pin = "  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n";
    let verify = "  containers:\n    - name: verify\n      image: quay.io/kata-containers/alpine-bash-curl:latest\n";
    let template = |spec: &str, container: &str| format!("{head}{spec}{verify}{container}");
    #[rustfmt::skip]
    let templates = vec![
        ("this file's verification pod", VERIFICATION_POD.to_string()),
        ("nodeName", template("  nodeName: ${NODE}\n", "")),
        ("hostname affinity", template("  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchExpressions:\n              - {key: kubernetes.io/hostname, operator: In, values: [\"${NODE}\"]}\n", "")),
        ("metadata.name affinity", template("  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n          - matchFields:\n              - {key: metadata.name, operator: In, values: [\"${NODE}\"]}\n", "")),
        ("harmless volumes", template(&format!("{pin}  volumes:\n    - {{name: a, emptyDir: {{}}}}\n    - {{name: b, configMap: {{name: c}}}}\n    - name: d\n      projected:\n        sources:\n          - configMap: {{name: c}}\n"), "")),
        ("locked-down container", template(pin, "      securityContext: {allowPrivilegeEscalation: false, privileged: false, capabilities: {drop: [ALL]}}\n")),
        ("unpinned", template("", "")),
        ("pinned elsewhere", template("  nodeSelector:\n    kubernetes.io/hostname: klm-chart-e2e-2\n", "")),
        ("privileged", template(pin, "      securityContext: {privileged: true}\n")),
        ("added capability", template(pin, "      securityContext: {capabilities: {add: [NET_ADMIN]}}\n")),
        ("privilege escalation", template(pin, "      securityContext: {allowPrivilegeEscalation: true}\n")),
        ("hostPID", template(&format!("{pin}  hostPID: true\n"), "")),
        ("hostPort", template(pin, "      ports: [{containerPort: 80, hostPort: 80}]\n")),
        ("hostPath", template(&format!("{pin}  volumes:\n    - {{name: h, hostPath: {{path: /etc}}}}\n"), "")),
        ("secret volume", template(&format!("{pin}  volumes:\n    - {{name: s, secret: {{secretName: x}}}}\n"), "")),
        ("projected secret", template(&format!("{pin}  volumes:\n    - name: p\n      projected:\n        sources:\n          - secret: {{name: x}}\n"), "")),
        ("env from a Secret", template(pin, "      envFrom: [{secretRef: {name: x}}]\n")),
        ("another ServiceAccount", template(&format!("{pin}  serviceAccountName: builder\n"), "")),
    ];
    let mut disagree = Vec::new();
    for (what, text) in &templates {
        let parsed = PodTemplate::parse(text).with_context(|| format!("{what}: {text}"))?;
        let check = pod_policy::check(&parsed, &[]);
        let mut pod = parsed.render(own, "klm-policy-agreement", VERIFY_NS, "agreement")?;
        tolerate_cordon(&mut pod);
        loop {
            let answer = pods.create(&dry_post(), &pod).await;
            let api_accepts = match &answer {
                Ok(_) => true,
                Err(kube::Error::Api(e))
                    if e.code == 403 && e.message.contains("kata-lifecycle-manager agent") =>
                {
                    false
                }
                Err(e) => bail!("{what}: the API server refused for another reason: {e}"),
            };
            if api_accepts == check.is_ok() {
                break;
            }
            // An accepted-but-should-be-refused answer may come before the policy is live.
            if api_accepts && tokio::time::Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            disagree.push(format!(
                "{what}: template check {:?}, API server {}",
                check.as_ref().map_err(ToString::to_string),
                match answer {
                    Ok(_) => "accepted".to_string(),
                    Err(e) => e.to_string(),
                }
            ));
            break;
        }
    }
    ensure!(
        disagree.is_empty(),
        "{} of {} templates are judged differently:\n{}",
        disagree.len(),
        templates.len(),
        disagree.join("\n")
    );
    Ok(())
}

/// A client for the test cluster acting as `user` (the admin impersonating it).
/// A client with the coordinator ServiceAccount's rights (impersonated).
async fn as_coordinator(inst: &Installed) -> Result<kube::Client> {
    impersonating(
        inst.cluster.kubeconfig_path(),
        &identity(&coordinator_sa()).0,
    )
    .await
}

async fn impersonating(admin_kubeconfig: &Path, user: &str) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(admin_kubeconfig)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(identity(&coordinator_sa()).1);
    Ok(kube::Client::try_from(config)?)
}

/// The coordinator's `escalate`/`bind` on kata-deploy's ClusterRoles (needed: a kata-deploy
/// upgrade may grant its ServiceAccount a right the coordinator lacks) no longer make it
/// cluster-admin in two calls: the chart's admission policy refuses wildcards, Secrets and RBAC
/// rights in those roles, and bindings to anyone but kata-deploy's ServiceAccounts. A legitimate
/// escalation (a right kata-deploy may need) still goes through.
#[tokio::test]
async fn coordinator_cannot_make_itself_cluster_admin_through_kata_deploy_rbac() -> Result<()> {
    let inst = installed().await;
    let admin = inst.cluster.client().await?;
    let settle = tokio::time::Instant::now() + Duration::from_secs(30);
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": PROBE_ROLE},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    }))?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": PROBE_BINDING},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROBE_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "kata-deploy-sa", "namespace": KD_NS}]
    }))?;
    created_or_exists(
        Api::<ClusterRole>::all(admin.clone())
            .create(&PostParams::default(), &role)
            .await,
    )?;
    created_or_exists(
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await,
    )?;

    let coordinator = as_coordinator(inst).await?;
    let roles: Api<ClusterRole> = Api::all(coordinator.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(coordinator.clone());
    let dry_patch = PatchParams::default().dry_run();
    let set_rules = |rules: Value| {
        let (api, pp) = (roles.clone(), dry_patch.clone());
        move || {
            let (api, pp, patch) = (
                api.clone(),
                pp.clone(),
                Patch::Merge(json!({ "rules": rules.clone() })),
            );
            async move { api.patch(PROBE_ROLE, &pp, &patch).await }
        }
    };
    let set_subjects = |subjects: Value| {
        let (api, pp) = (bindings.clone(), dry_patch.clone());
        move || {
            let (api, pp, patch) = (
                api.clone(),
                pp.clone(),
                Patch::Merge(json!({ "subjects": subjects.clone() })),
            );
            async move { api.patch(PROBE_BINDING, &pp, &patch).await }
        }
    };
    const RULES: &str = "may not write ClusterRole";
    const SUBJECTS: &str = "may bind kata-deploy roles only to ServiceAccounts in";
    let rule = |group: &str, resource: &str, verb: &str| json!([{"apiGroups": [group], "resources": [resource], "verbs": [verb]}]);
    let admin_binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "klm-chart-e2e-probe-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": coordinator_sa(), "namespace": NS}]
    }))?;
    #[rustfmt::skip]
    let attacks = vec![
        attack("write * into a kata-deploy ClusterRole", RULES, set_rules(rule("*", "*", "*"))),
        attack("grant Secrets through a kata-deploy ClusterRole", RULES, set_rules(rule("", "secrets", "get"))),
        attack("grant RBAC writes through a kata-deploy ClusterRole", RULES, set_rules(rule("rbac.authorization.k8s.io", "clusterrolebindings", "create"))),
        attack("grant impersonation through a kata-deploy ClusterRole", RULES, set_rules(rule("", "users", "impersonate"))),
        attack("grant token minting through a kata-deploy ClusterRole", RULES, set_rules(rule("", "serviceaccounts/token", "create"))),
        attack("bind a kata-deploy ClusterRole to the coordinator", SUBJECTS, set_subjects(json!([
            {"kind": "ServiceAccount", "name": coordinator_sa(), "namespace": NS}]))),
        attack("bind a kata-deploy ClusterRole to a user", SUBJECTS, set_subjects(json!([
            {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "mallory"}]))),
        attack("bind a kata-deploy ClusterRole to a ServiceAccount elsewhere", SUBJECTS, set_subjects(json!([
            {"kind": "ServiceAccount", "name": "default", "namespace": "default"}]))),
        // RBAC itself: bind only by name.
        attack("bind cluster-admin to the coordinator", "attempting to grant RBAC permissions not currently held", {
            let api = bindings.clone();
            move || { let (api, b) = (api.clone(), admin_binding.clone()); async move { api.create(&dry_post(), &b).await } }
        }),
    ];
    let wrong = unrefused(&attacks, settle).await;
    ensure!(
        wrong.is_empty(),
        "{} of {} escalations were not refused:\n{}",
        wrong.len(),
        attacks.len(),
        wrong.join("\n")
    );

    // What an upgrade legitimately does: give kata-deploy a right the coordinator lacks, bind it
    // to kata-deploy's own ServiceAccounts.
    (set_rules(json!([
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
    ])))()
    .await
    .context(
        "the coordinator could not escalate a kata-deploy ClusterRole to kata-deploy's needs",
    )?;
    (set_subjects(json!([
        {"kind": "ServiceAccount", "name": "kata-deploy-sa", "namespace": KD_NS},
        {"kind": "ServiceAccount", "name": "kata-deploy-dispatcher", "namespace": KD_NS},
    ])))()
    .await
    .context(
        "the coordinator could not bind a kata-deploy ClusterRole to kata-deploy's ServiceAccounts",
    )?;
    Ok(())
}

/// Job mode needs `create` on Roles and RoleBindings in the kata-deploy namespace (the
/// dispatcher's), which cannot be limited by name. RBAC alone keeps what the coordinator writes
/// there within its own rights there, Secrets included: the chart's admission policy refuses
/// Secrets, RBAC and wildcards in such a Role and bindings to anyone but kata-deploy's
/// ServiceAccounts. The dispatcher's own Role and RoleBinding still go through.
#[tokio::test]
async fn coordinator_cannot_hand_out_its_kata_deploy_namespace_rights() -> Result<()> {
    let inst = installed().await;
    let settle = tokio::time::Instant::now() + Duration::from_secs(30);
    let coordinator = as_coordinator(inst).await?;
    let roles: Api<Role> = Api::namespaced(coordinator.clone(), KD_NS);
    let bindings: Api<RoleBinding> = Api::namespaced(coordinator.clone(), KD_NS);
    let role = |rules: Value| -> Result<Role> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": "kata-deploy-dispatcher-role"},
            "rules": rules
        }))?)
    };
    let binding = |kind: &str, name: &str, subject: Value| -> Result<RoleBinding> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": "kata-deploy-dispatcher-rb"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
            "subjects": [subject]
        }))?)
    };
    let create_role = |r: Role| {
        let api = roles.clone();
        move || {
            let (api, r) = (api.clone(), r.clone());
            async move { api.create(&dry_post(), &r).await }
        }
    };
    let create_binding = |b: RoleBinding| {
        let api = bindings.clone();
        move || {
            let (api, b) = (api.clone(), b.clone());
            async move { api.create(&dry_post(), &b).await }
        }
    };
    // The coordinator's own Role there: Secrets (helm's release records) and more.
    let own_role = format!("{FULLNAME}-coordinator-kata-deploy");
    let dispatcher_sa =
        json!({"kind": "ServiceAccount", "name": "kata-deploy-dispatcher-sa", "namespace": KD_NS});
    const RULES: &str = "may not write Role";
    const SUBJECTS: &str = "may bind kata-deploy roles only to ServiceAccounts in";
    #[rustfmt::skip]
    let attacks = vec![
        attack("a Role granting Secrets", RULES, create_role(role(json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]))?)),
        attack("a Role granting RBAC writes", RULES, create_role(role(json!([
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["create"]}]))?)),
        attack("bind the coordinator's Role to a user", SUBJECTS, create_binding(binding("Role", &own_role, json!(
            {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "mallory"}))?)),
        attack("bind the coordinator's Role to a ServiceAccount elsewhere", SUBJECTS, create_binding(binding("Role", &own_role, json!(
            {"kind": "ServiceAccount", "name": "default", "namespace": "default"}))?)),
        attack("bind the coordinator's Role to the agent", SUBJECTS, create_binding(binding("Role", &own_role, json!(
            {"kind": "ServiceAccount", "name": agent_sa(), "namespace": NS}))?)),
        // RBAC itself: nothing beyond the coordinator's own rights there.
        attack("bind cluster-admin in the kata-deploy namespace", "attempting to grant RBAC permissions not currently held",
            create_binding(binding("ClusterRole", "cluster-admin", dispatcher_sa.clone())?)),
    ];
    let wrong = unrefused(&attacks, settle).await;
    ensure!(
        wrong.is_empty(),
        "{} of {} hand-outs were not refused:\n{}",
        wrong.len(),
        attacks.len(),
        wrong.join("\n")
    );

    // What a job-mode upgrade writes (kata-deploy 3.32-4.1's dispatcher Role and RoleBinding),
    // under probe names (the job-mode test installs the real ones). The Role for real: a
    // binding's escalation check resolves the Role it names.
    const PROBE_NS_ROLE: &str = "klm-chart-e2e-probe-dispatcher-role";
    let admin_roles: Api<Role> = Api::namespaced(inst.cluster.client().await?, KD_NS);
    admin_roles
        .delete(PROBE_NS_ROLE, &DeleteParams::default())
        .await
        .map(|_| ())
        .or_else(|e| match e {
            kube::Error::Api(e) if e.code == 404 => Ok(()),
            e => Err(e),
        })?;
    let mut dispatcher_role = role(json!([
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "delete"]}
    ]))?;
    dispatcher_role.metadata.name = Some(PROBE_NS_ROLE.into());
    roles
        .create(&PostParams::default(), &dispatcher_role)
        .await
        .context("the coordinator could not create kata-deploy's dispatcher Role")?;
    let created = (create_binding(binding("Role", PROBE_NS_ROLE, dispatcher_sa)?))().await;
    admin_roles
        .delete(PROBE_NS_ROLE, &DeleteParams::default())
        .await?;
    created.context("the coordinator could not create kata-deploy's dispatcher RoleBinding")?;
    Ok(())
}

/// `helm upgrade` of our chart must not wipe a run: the trigger is rendered without `data`, so
/// helm's three-way merge leaves the users' annotations and the coordinator's status alone.
#[tokio::test]
async fn chart_upgrade_keeps_the_trigger_annotations_and_run_status() -> Result<()> {
    let inst = installed().await;
    let client = inst.cluster.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let target = "lifecycle.katacontainers.io/target-version";
    cms.patch(
        FULLNAME,
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"annotations": {target: "3.28.0"}},
            "data": {"phase": "Running", "run.json": "{}"}
        })),
    )
    .await?;

    let helm = Helm::new(inst.cluster, &inst.work);
    let chart = root().join("charts/kata-lifecycle-manager");
    helm.run(&[
        "upgrade",
        RELEASE,
        chart.to_str().unwrap(),
        "-n",
        NS,
        // A change outside the pod templates: nothing restarts under the other tests' feet.
        "--reuse-values",
        "--set",
        "agent.serviceAccountAnnotations.klm-test/upgraded=yes",
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;

    let sa = Api::<ServiceAccount>::namespaced(client, NS)
        .get(&agent_sa())
        .await?;
    ensure!(
        sa.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("klm-test/upgraded"),
        "the chart upgrade was not applied"
    );
    let cm = cms.get(FULLNAME).await?;
    let annotations = cm.metadata.annotations.unwrap_or_default();
    ensure!(
        annotations.get(target).map(String::as_str) == Some("3.28.0"),
        "annotations after upgrade: {annotations:?}"
    );
    let data = cm.data.unwrap_or_default();
    ensure!(
        data.get("phase").map(String::as_str) == Some("Running"),
        "data after upgrade: {data:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// The pinned helm against the test cluster, with its own state directories.
struct Helm {
    bin: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
    impersonate: Option<String>,
}

impl Helm {
    fn new(cluster: &Cluster, work: &Path) -> Helm {
        Helm {
            bin: cluster.helm_path(),
            kubeconfig: cluster.kubeconfig_path().to_path_buf(),
            home: work.join("helm"),
            impersonate: None,
        }
    }

    fn impersonating(&self, sa: &str) -> Helm {
        Helm {
            bin: self.bin.clone(),
            kubeconfig: self.kubeconfig.clone(),
            home: self.home.clone(),
            impersonate: Some(sa.to_string()),
        }
    }

    /// Runs helm; Ok(stdout) on success, an error with its stderr otherwise.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .env_remove("KUBECONFIG");
        if let Some(sa) = &self.impersonate {
            // The API server adds a ServiceAccount user's groups itself.
            cmd.arg("--kube-as-user").arg(identity(sa).0);
        }
        let out = cmd
            .output()
            .with_context(|| format!("run {}", self.bin.display()))?;
        let who = self.impersonate.as_deref().unwrap_or("admin");
        if !out.status.success() {
            bail!(
                "helm {} (as {who}) failed: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Creating what already exists is fine (a cluster attached with KLM_KUBECONFIG may have it).
fn created_or_exists<T>(result: std::result::Result<T, kube::Error>) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn node_ready(node: Option<&Node>) -> bool {
    node.and_then(|n| n.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_node_ready(api: &Api<Node>, name: &str) -> Result<()> {
    tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(api.clone(), name, node_ready),
    )
    .await
    .with_context(|| format!("node {name} not Ready within 120s"))??;
    Ok(())
}

/// Issue 12: the coordinator writes each node's grant on its Node. Its `patch nodes` right
/// cannot be narrowed by RBAC; the chart's admission policy lets it change only its bookkeeping
/// there (the grant, the drain report, a lost node's status and evidence), never a Node's spec,
/// other labels or annotations.
#[tokio::test]
async fn coordinator_may_change_only_its_bookkeeping_on_nodes() -> Result<()> {
    let inst = installed().await;
    let settle = tokio::time::Instant::now() + Duration::from_secs(30);
    let coordinator = as_coordinator(inst).await?;
    let nodes: Api<Node> = Api::all(coordinator.clone());
    let node = NODES[0];
    let dry_patch = PatchParams::default().dry_run();
    let patch_node = |patch: Value| {
        let (api, pp) = (nodes.clone(), dry_patch.clone());
        move || {
            let (api, pp, patch) = (api.clone(), pp.clone(), Patch::Merge(patch.clone()));
            async move { api.patch(node, &pp, &patch).await }
        }
    };
    const SPEC: &str = "may not change a Node's spec";
    #[rustfmt::skip]
    let attacks = vec![
        attack(format!("cordon {node}"), SPEC, patch_node(json!({"spec": {"unschedulable": true}}))),
        attack(format!("taint {node}"), SPEC,
            patch_node(json!({"spec": {"taints": [{"key": "evil", "effect": "NoExecute"}]}}))),
        attack(format!("node-restriction.kubernetes.io label on {node}"), "may only change its own Node labels",
            patch_node(json!({"metadata": {"labels": {"node-restriction.kubernetes.io/trusted": "true"}}}))),
        attack(format!("foreign annotation on {node}"), "may only change its own Node annotations",
            patch_node(json!({"metadata": {"annotations": {"example.com/owner": "me"}}}))),
    ];
    let wrong = unrefused(&attacks, settle).await;
    ensure!(
        wrong.is_empty(),
        "{} of {} attempts were not refused by the API server:\n{}",
        wrong.len(),
        attacks.len(),
        wrong.join("\n")
    );
    // Its bookkeeping goes through (a dry run: nothing changes).
    let grant = json!({"metadata": {
        "annotations": {GRANT: r#"{"runId":"probe","kind":"upgrade"}"#,
                        "lifecycle.katacontainers.io/drain-result": "{}"},
        "labels": {STATUS_LABEL: "failed"}
    }});
    nodes
        .patch(node, &dry_patch, &Patch::Merge(grant))
        .await
        .context("the coordinator could not write a grant, a drain report and a status")?;
    Ok(())
}
