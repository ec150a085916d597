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
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use klm_testkit::Cluster;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use serde_json::json;
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
    let verification_cm = format!("{FULLNAME}-verification-pod");
    #[rustfmt::skip]
    let matrix = vec![
        // ---- agent: what one node's upgrade needs
        row(Agent, true,  "patch",  "", "nodes", "", "klm-chart-e2e-1"),
        row(Agent, true,  "watch",  "", "nodes", "", ""),
        row(Agent, false, "delete", "", "nodes", "", "klm-chart-e2e-1"),
        row(Agent, true,  "list",   "", "pods", "", ""),                 // drain: pods on its node, all namespaces
        row(Agent, true,  "create", "", "pods/eviction", "default", "x"),
        row(Agent, true,  "create", "", "pods/eviction", NS, "x"),
        row(Agent, false, "delete", "", "pods", "default", "x"),         // drain evicts, never deletes
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
        row(Agent, false, "create", "coordination.k8s.io", "leases", NS, ""),
        row(Agent, true,  "watch",  "", "configmaps", NS, FULLNAME),
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
        row(Coordinator, false, "create", "rbac.authorization.k8s.io", "roles", KD_NS, ""),
        row(Coordinator, true,  "create", "coordination.k8s.io", "leases", NS, ""),
        row(Coordinator, true,  "update", "coordination.k8s.io", "leases", NS, &upgrade_lease),
        row(Coordinator, true,  "update", "coordination.k8s.io", "leases", NS, &leader_lease),
        row(Coordinator, false, "update", "coordination.k8s.io", "leases", NS, "someone-else"),
        row(Coordinator, true,  "update", "", "configmaps", NS, FULLNAME),
        row(Coordinator, true,  "watch",  "", "configmaps", NS, FULLNAME),
        row(Coordinator, false, "update", "", "configmaps", NS, &verification_cm),
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
    let mark =
        |v: &str| Patch::Merge(json!({"metadata": {"labels": {"klm.test/agent-touched": v}}}));

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
