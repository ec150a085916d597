#!/usr/bin/env python3
"""Rendering tests of the kata-lifecycle-manager chart.

Each test renders the chart with `helm template` (or lints it) and checks the parsed manifests,
not their text. Prints one line per test and closes with "N passed, N failed"; exits non-zero
on any failure.

    python3 tests/chart/render_test.py --helm /path/to/helm --chart charts/kata-lifecycle-manager
"""
import argparse
import os
import subprocess
import sys
import tempfile
import traceback

import yaml

# helm built without release ldflags assumes Kubernetes 1.20 for `template`/`lint`; say which
# version we mean (the one the e2e control plane runs) so the chart's kubeVersion applies.
KUBE_VERSION = "1.36.3"
RELEASE = "kata-lifecycle-manager"
NAMESPACE = "klm-system"

VERIFICATION_POD = """\
apiVersion: v1
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
      command: ["sh", "-c", "echo ${NODE}"]
"""

ARGS = None
TMP = None
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


class Rendered:
    """The parsed output of one `helm template`."""

    def __init__(self, docs):
        self.docs = [d for d in docs if d]

    def all(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind, name, namespace=None):
        found = [
            d for d in self.docs
            if d["kind"] == kind and d["metadata"]["name"] == name
            and (namespace is None or d["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"expected one {kind} {namespace or ''}/{name}, found {len(found)}: {names(self.docs)}"
        return found[0]

    def workloads(self):
        return self.all("DaemonSet") + self.all("Deployment")


def names(docs):
    return sorted(f'{d["kind"]}/{d["metadata"].get("namespace", "")}/{d["metadata"]["name"]}' for d in docs)


def write(name, text):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def helm(*args):
    return subprocess.run([ARGS.helm, *args], capture_output=True, text=True)


def template(*extra, pod=True, release=RELEASE, namespace=NAMESPACE, expect_ok=True):
    args = ["template", release, ARGS.chart, "-n", namespace, "--kube-version", KUBE_VERSION]
    if pod:
        args += ["--set-file", f"defaults.verificationPod={write('pod.yaml', VERIFICATION_POD)}"]
    args += list(extra)
    out = helm(*args)
    if expect_ok:
        assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stderr}"
        return Rendered(yaml.safe_load_all(out.stdout))
    assert out.returncode != 0, f"helm {' '.join(args)} succeeded but should have failed"
    return out.stderr


def env_of(workload, container=0):
    c = workload["spec"]["template"]["spec"]["containers"][container]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def rules_of(rendered, kind, name, namespace=None):
    return rendered.get(kind, name, namespace)["rules"]


def allows(rules, group, resource, verb, name=None):
    for r in rules:
        if (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", [])) \
                and (resource in r.get("resources", []) or "*" in r.get("resources", [])) \
                and (verb in r["verbs"] or "*" in r["verbs"]):
            rn = r.get("resourceNames")
            if not rn or name in rn:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# lint and the required verification pod

@test
def lint_strict():
    pod = write("pod.yaml", VERIFICATION_POD)
    out = helm("lint", "--strict", "--kube-version", KUBE_VERSION, ARGS.chart,
               "--set-file", f"defaults.verificationPod={pod}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout, out.stdout


@test
def refuses_without_verification_pod_and_says_how():
    err = template(pod=False, expect_ok=False)
    assert "defaults.verificationPod is required" in err, err
    assert "--set-file defaults.verificationPod=" in err, err
    err = template("--set", "defaults.verificationPod=  ", pod=False, expect_ok=False)
    assert "--set-file defaults.verificationPod=" in err, err


@test
def refuses_a_verification_pod_that_is_not_a_never_restarting_pod():
    bad_kind = write("deploy.yaml", VERIFICATION_POD.replace("kind: Pod", "kind: Deployment"))
    err = template("--set-file", f"defaults.verificationPod={bad_kind}", pod=False, expect_ok=False)
    assert "kind: Pod" in err, err
    restarting = write("restart.yaml", VERIFICATION_POD.replace("Never", "OnFailure"))
    err = template("--set-file", f"defaults.verificationPod={restarting}", pod=False, expect_ok=False)
    assert "restartPolicy: Never" in err, err
    broken = write("broken.yaml", "kind: [\n")
    err = template("--set-file", f"defaults.verificationPod={broken}", pod=False, expect_ok=False)
    assert "not valid YAML" in err, err


@test
def refuses_a_verification_pod_not_pinned_to_its_node():
    unpinned = write("unpinned.yaml", VERIFICATION_POD.replace(
        "  nodeSelector:\n    kubernetes.io/hostname: ${NODE}\n", ""))
    assert "${NODE}\n  tolerations" not in open(unpinned).read()
    err = template("--set-file", f"defaults.verificationPod={unpinned}", pod=False, expect_ok=False)
    assert "must run on the node it verifies" in err and "kubernetes.io/hostname: ${NODE}" in err, err
    elsewhere = write("elsewhere.yaml", VERIFICATION_POD.replace("hostname: ${NODE}", "hostname: worker-1"))
    template("--set-file", f"defaults.verificationPod={elsewhere}", pod=False, expect_ok=False)
    for pin in ["  nodeName: ${NODE}\n",
                "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n"
                "        nodeSelectorTerms:\n          - matchFields:\n"
                "              - {key: metadata.name, operator: In, values: [\"${NODE}\"]}\n"]:
        pinned = write("pinned.yaml", open(unpinned).read().replace("  restartPolicy: Never\n",
                                                                   "  restartPolicy: Never\n" + pin))
        template("--set-file", f"defaults.verificationPod={pinned}", pod=False)


@test
def renders_the_expected_objects():
    r = template()
    expected = sorted([
        f"ServiceAccount/{NAMESPACE}/{RELEASE}-agent",
        f"ServiceAccount/{NAMESPACE}/{RELEASE}-coordinator",
        f"ConfigMap/{NAMESPACE}/{RELEASE}",
        f"ConfigMap/{NAMESPACE}/{RELEASE}-verification-pod",
        f"DaemonSet/{NAMESPACE}/{RELEASE}-agent",
        f"Deployment/{NAMESPACE}/{RELEASE}-coordinator",
        f"PodDisruptionBudget/{NAMESPACE}/{RELEASE}-coordinator",
        f"ClusterRole//{RELEASE}-agent",
        f"ClusterRoleBinding//{RELEASE}-agent",
        f"ClusterRole//{RELEASE}-coordinator",
        f"ClusterRoleBinding//{RELEASE}-coordinator",
        f"Role/{NAMESPACE}/{RELEASE}-agent",
        f"RoleBinding/{NAMESPACE}/{RELEASE}-agent",
        f"Role/{NAMESPACE}/{RELEASE}-coordinator",
        f"RoleBinding/{NAMESPACE}/{RELEASE}-coordinator",
        f"Role/kube-system/{RELEASE}-agent-kata-deploy",
        f"RoleBinding/kube-system/{RELEASE}-agent-kata-deploy",
        f"Role/kube-system/{RELEASE}-coordinator-kata-deploy",
        f"RoleBinding/kube-system/{RELEASE}-coordinator-kata-deploy",
        f"Role/default/{RELEASE}-agent-verification",
        f"RoleBinding/default/{RELEASE}-agent-verification",
    ])
    assert names(r.docs) == expected, f"got {names(r.docs)}"


@test
def verification_pod_is_carried_verbatim_and_mounted_by_the_coordinator():
    r = template()
    cm = r.get("ConfigMap", f"{RELEASE}-verification-pod")
    assert cm["data"]["pod.yaml"].strip() == VERIFICATION_POD.strip()
    dep = r.get("Deployment", f"{RELEASE}-coordinator")
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    (vol_name,) = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == f"{RELEASE}-verification-pod"]
    path = env_of(dep)["KLM_DEFAULT_VERIFICATION_POD_FILE"]
    assert path == mounts[vol_name]["mountPath"].rstrip("/") + "/pod.yaml", path
    assert mounts[vol_name].get("readOnly") is True


# ---------------------------------------------------------------------------------------------
# the trigger ConfigMap

@test
def trigger_configmap_is_named_after_the_release_and_has_no_data():
    r = template()
    cm = r.get("ConfigMap", "kata-lifecycle-manager", NAMESPACE)
    # No data: helm upgrades of this chart must not wipe the coordinator's run status.
    assert "data" not in cm and "binaryData" not in cm, cm
    assert "helm.sh/resource-policy" not in (cm["metadata"].get("annotations") or {})
    r = template(release="klm")
    r.get("ConfigMap", "klm-kata-lifecycle-manager", NAMESPACE)


@test
def names_handed_to_the_binaries_match_the_objects_and_rbac():
    for release in (RELEASE, "klm"):
        r = template(release=release)
        fullname = RELEASE if release == RELEASE else f"{release}-{RELEASE}"
        agent = env_of(r.get("DaemonSet", f"{fullname}-agent"))
        coord = env_of(r.get("Deployment", f"{fullname}-coordinator"))
        for env in (agent, coord):
            assert env["KLM_LEASE_NAME"] == f"{fullname}-upgrade"
        assert coord["KLM_TRIGGER_CONFIGMAP"] == fullname
        # Issue 12: the agent learns about its turn from its own Node, never from the record.
        assert "KLM_TRIGGER_CONFIGMAP" not in agent
        assert coord["KLM_LEADER_LEASE_NAME"] == f"{fullname}-coordinator"
        agent_rules = rules_of(r, "Role", f"{fullname}-agent", NAMESPACE)
        assert allows(agent_rules, "coordination.k8s.io", "leases", "update", f"{fullname}-upgrade")
        assert not allows(agent_rules, "", "configmaps", "watch", fullname)
        assert not allows(agent_rules, "", "configmaps", "get", fullname)
        coord_rules = rules_of(r, "Role", f"{fullname}-coordinator", NAMESPACE)
        for lease in (f"{fullname}-upgrade", f"{fullname}-coordinator"):
            assert allows(coord_rules, "coordination.k8s.io", "leases", "update", lease), lease
        assert allows(coord_rules, "", "configmaps", "update", fullname)


# ---------------------------------------------------------------------------------------------
# values land where expected

@test
def default_values_reach_the_coordinator():
    env = env_of(template().get("Deployment", f"{RELEASE}-coordinator"))
    expected = {
        "KLM_DEFAULT_HELM_RELEASE": "kata-deploy",
        "KLM_DEFAULT_HELM_NAMESPACE": "kube-system",
        "KLM_DEFAULT_NODE_SELECTOR": "",
        "KLM_DEFAULT_NODE_TAINT_KEY": "",
        "KLM_DEFAULT_NODE_TAINT_VALUE": "",
        "KLM_DEFAULT_VERIFICATION_NAMESPACE": "default",
        "KLM_DEFAULT_DRAIN_ENABLED": "false",
        "KLM_DEFAULT_DRAIN_TIMEOUT": "300s",
        "KLM_DEFAULT_VERIFICATION_TIMEOUT": "300s",
        "KLM_DEFAULT_MAINTENANCE_WINDOW": "",
        "KLM_DEFAULT_BLOCKING_POD_SELECTOR": "",
        "KLM_PROMETHEUS_URL": "",
        "KLM_PROMETHEUS_ALERT_FILTER": "",
        "KLM_PROMETHEUS_POLL_INTERVAL": "30s",
        "KLM_LEASE_DURATION_SECONDS": "30",
        "KLM_CHART_REF": "oci://ghcr.io/kata-containers/kata-deploy-charts/kata-deploy",
        "KLM_CHART_REPO": "",
        "KLM_HEALTH_ADDR": "0.0.0.0:8080",
        "KLM_LOG_FORMAT": "json",
        "RUST_LOG": "info",
    }
    for k, v in expected.items():
        assert env.get(k) == v, f"{k}={env.get(k)!r}, want {v!r}"
    # Every value is a string: Kubernetes rejects non-string env values.
    assert all(isinstance(v, (str, dict)) for v in env.values()), env
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


@test
def overridden_values_reach_the_coordinator():
    r = template(
        "--set", "defaults.drainEnabled=true",
        "--set", "defaults.drainTimeout=10m",
        "--set", "defaults.verificationTimeout=1h30m",
        "--set", "defaults.helmRelease=kd",
        "--set", "defaults.nodeSelector=pool=kata",
        "--set", "defaults.nodeTaintKey=kata-lifecycle-manager",
        "--set", "defaults.nodeTaintValue=pending",
        "--set", "defaults.maintenanceWindow=Mon-Fri 22:00-06:00 Europe/Berlin",
        "--set", "defaults.blockingPodSelector=app=backup",
        "--set", "defaults.prometheus.url=http://prometheus.monitoring:9090",
        "--set", "defaults.prometheus.alertFilter=Node.*",
        "--set", "defaults.prometheus.pollInterval=1m",
        "--set", "leaseDurationSeconds=15",
        "--set", "kataDeployChart.ref=kata-deploy",
        "--set", "kataDeployChart.repo=http://127.0.0.1:8879",
        "--set", "logFormat=text",
        "--set", "logLevel=debug",
    )
    env = env_of(r.get("Deployment", f"{RELEASE}-coordinator"))
    for k, v in {
        "KLM_DEFAULT_DRAIN_ENABLED": "true",
        "KLM_DEFAULT_DRAIN_TIMEOUT": "10m",
        "KLM_DEFAULT_VERIFICATION_TIMEOUT": "1h30m",
        "KLM_DEFAULT_HELM_RELEASE": "kd",
        "KLM_DEFAULT_NODE_SELECTOR": "pool=kata",
        "KLM_DEFAULT_NODE_TAINT_KEY": "kata-lifecycle-manager",
        "KLM_DEFAULT_NODE_TAINT_VALUE": "pending",
        "KLM_DEFAULT_MAINTENANCE_WINDOW": "Mon-Fri 22:00-06:00 Europe/Berlin",
        "KLM_DEFAULT_BLOCKING_POD_SELECTOR": "app=backup",
        "KLM_PROMETHEUS_URL": "http://prometheus.monitoring:9090",
        "KLM_PROMETHEUS_ALERT_FILTER": "Node.*",
        "KLM_PROMETHEUS_POLL_INTERVAL": "1m",
        "KLM_LEASE_DURATION_SECONDS": "15",
        "KLM_CHART_REF": "kata-deploy",
        "KLM_CHART_REPO": "http://127.0.0.1:8879",
        "KLM_LOG_FORMAT": "text",
        "RUST_LOG": "debug",
    }.items():
        assert env.get(k) == v, f"{k}={env.get(k)!r}, want {v!r}"
    agent_env = env_of(r.get("DaemonSet", f"{RELEASE}-agent"))
    assert agent_env["KLM_LOG_FORMAT"] == "text" and agent_env["RUST_LOG"] == "debug"


@test
def kata_deploy_namespace_moves_the_rbac():
    r = template("--set", "defaults.helmNamespace=kata-system")
    assert env_of(r.get("Deployment", f"{RELEASE}-coordinator"))["KLM_DEFAULT_HELM_NAMESPACE"] == "kata-system"
    agent = rules_of(r, "Role", f"{RELEASE}-agent-kata-deploy", "kata-system")
    assert allows(agent, "", "pods", "delete")
    coord = rules_of(r, "Role", f"{RELEASE}-coordinator-kata-deploy", "kata-system")
    assert allows(coord, "", "secrets", "update") and allows(coord, "apps", "daemonsets", "patch")
    assert not [d for d in r.docs if d["metadata"].get("namespace") == "kube-system"], \
        "nothing should be left in kube-system"
    rb = r.get("RoleBinding", f"{RELEASE}-agent-kata-deploy", "kata-system")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-agent", "namespace": NAMESPACE}]


@test
def verification_namespace_moves_the_rbac():
    r = template("--set", "defaults.verificationNamespace=kata-verify")
    rules = rules_of(r, "Role", f"{RELEASE}-agent-verification", "kata-verify")
    assert allows(rules, "", "pods", "create") and allows(rules, "", "pods/log", "get")
    assert not [d for d in r.docs if d["metadata"].get("namespace") == "default"]


@test
def extra_namespaces_get_the_same_roles_once():
    r = template(
        "--set", "rbac.extraKataDeployNamespaces={kata-a,kube-system}",
        "--set", "rbac.extraVerificationNamespaces={verify-a}",
    )
    for ns in ("kube-system", "kata-a"):
        r.get("Role", f"{RELEASE}-agent-kata-deploy", ns)
        r.get("Role", f"{RELEASE}-coordinator-kata-deploy", ns)  # once, despite the duplicate
    for ns in ("default", "verify-a"):
        r.get("Role", f"{RELEASE}-agent-verification", ns)


@test
def same_namespace_for_everything_does_not_collide():
    r = template("--set", f"defaults.helmNamespace={NAMESPACE}",
                 "--set", f"defaults.verificationNamespace={NAMESPACE}")
    assert len(names(r.docs)) == len(set(names(r.docs))), names(r.docs)


@test
def images_default_to_the_app_version():
    r = template()
    chart = yaml.safe_load(open(os.path.join(ARGS.chart, "Chart.yaml")))
    ds = r.get("DaemonSet", f"{RELEASE}-agent")["spec"]["template"]["spec"]["containers"][0]
    dep = r.get("Deployment", f"{RELEASE}-coordinator")["spec"]["template"]["spec"]["containers"][0]
    assert ds["image"].endswith(":" + chart["appVersion"]) and "agent" in ds["image"], ds["image"]
    assert dep["image"].endswith(":" + chart["appVersion"]) and "coordinator" in dep["image"], dep["image"]
    assert ds["command"] == ["/usr/local/bin/klm-agent"]
    assert dep["command"] == ["/usr/local/bin/klm-coordinator", "run"]
    r = template("--set", "images.agent.tag=dev", "--set", "images.coordinator.repository=example.org/c",
                 "--set", "imagePullSecrets[0].name=regcred")
    ds = r.get("DaemonSet", f"{RELEASE}-agent")["spec"]["template"]["spec"]
    dep = r.get("Deployment", f"{RELEASE}-coordinator")["spec"]["template"]["spec"]
    assert ds["containers"][0]["image"].endswith(":dev")
    assert dep["containers"][0]["image"] == "example.org/c:" + chart["appVersion"]
    assert ds["imagePullSecrets"] == [{"name": "regcred"}] == dep["imagePullSecrets"]


@test
def chart_metadata():
    chart = yaml.safe_load(open(os.path.join(ARGS.chart, "Chart.yaml")))
    assert chart["name"] == "kata-lifecycle-manager"
    assert chart["version"] == "0.1.0" and chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.27.0-0"
    err = template("--kube-version", "1.26.0", expect_ok=False)
    assert "kubeVersion" in err, err


# ---------------------------------------------------------------------------------------------
# values schema

@test
def schema_rejects_wrong_types():
    cases = [
        ("defaults.drainEnabled=notabool", "drainEnabled"),
        ("leaseDurationSeconds=abc", "leaseDurationSeconds"),
        ("leaseDurationSeconds=2", "leaseDurationSeconds"),
        ("defaults.drainTimeout=5min", "drainTimeout"),
        ("defaults.verificationTimeout=0s", "verificationTimeout"),
        ("logFormat=xml", "logFormat"),
        ("coordinator.replicas=0", "replicas"),
        ("defaults.helmNamespace=Not_A_Namespace", "helmNamespace"),
        ("defaults.drainEnable=true", "drainEnable"),  # a typo'd key is an error, not ignored
        ("apiServer.host=https://10.0.0.1", "host"),  # a host, not a URL
        ("apiServer.port=0", "port"),
    ]
    for setting, key in cases:
        err = template("--set", setting, expect_ok=False)
        assert "schema" in err and key in err, f"{setting}: {err}"


@test
def schema_accepts_the_documented_forms():
    template("--set", "defaults.drainTimeout=1h30m", "--set", "defaults.verificationTimeout=1500ms",
             "--set", "defaults.drainEnabled=false", "--set", "leaseDurationSeconds=5")
    template("--set", "defaults.drainTimeout=300")  # bare seconds, as the coordinator reads it


# ---------------------------------------------------------------------------------------------
# workloads

@test
def every_workload_is_locked_down():
    r = template()
    assert len(r.workloads()) == 2
    for w in r.workloads():
        where = f'{w["kind"]}/{w["metadata"]["name"]}'
        spec = w["spec"]["template"]["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is True, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged") is not True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["port"] in ports, where
            assert env_of(w)["KLM_HEALTH_ADDR"].endswith(f':{ports["health"]}'), where
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
            assert c["resources"]["limits"]["memory"], where


@test
def agent_runs_everywhere_and_knows_its_node():
    ds = template().get("DaemonSet", f"{RELEASE}-agent")
    spec = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in spec["tolerations"], spec["tolerations"]
    assert spec["serviceAccountName"] == f"{RELEASE}-agent"
    env = env_of(ds)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    res = spec["containers"][0]["resources"]
    assert res["requests"] == {"cpu": "10m", "memory": "32Mi"} and res["limits"] == {"memory": "64Mi"}, res
    # agent placement values
    ds = template("--set", "agent.nodeSelector.kata=yes", "--set", "agent.priorityClassName=system-node-critical",
                  "--set", "agent.tolerations=null").get("DaemonSet", f"{RELEASE}-agent")
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kata": "yes"} and spec["priorityClassName"] == "system-node-critical"
    assert "tolerations" not in spec


@test
def api_server_address_is_the_in_cluster_default_unless_given():
    # Default: nothing set, the kubelet's KUBERNETES_SERVICE_HOST/PORT (the `kubernetes` Service).
    for w in template().workloads():
        env = env_of(w)
        assert "KUBERNETES_SERVICE_HOST" not in env and "KUBERNETES_SERVICE_PORT" not in env, env
    # Without kube-proxy: both binaries are pointed at the given address.
    r = template("--set", "apiServer.host=10.0.0.10", "--set", "apiServer.port=6443")
    assert len(r.workloads()) == 2
    for w in r.workloads():
        env = env_of(w)
        assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.10", w["metadata"]["name"]
        assert env["KUBERNETES_SERVICE_PORT"] == "6443", w["metadata"]["name"]
    env = env_of(template("--set", "apiServer.host=api.example.org").get("Deployment", f"{RELEASE}-coordinator"))
    assert env["KUBERNETES_SERVICE_PORT"] == "443"


@test
def coordinator_is_leader_elected_with_a_standby_and_writable_helm_homes():
    r = template()
    dep = r.get("Deployment", f"{RELEASE}-coordinator")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"{RELEASE}-coordinator"
    env = env_of(dep)
    tmp = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "no writable /tmp"
    (vol,) = [v for v in spec["volumes"] if v["name"] == tmp[0]["name"]]
    assert "emptyDir" in vol
    for k in ("HOME", "HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        assert env[k].startswith("/tmp"), k
    assert env["KLM_HELM_BIN"]
    pdb = r.get("PodDisruptionBudget", f"{RELEASE}-coordinator")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # one replica: no PDB (it would block every drain of that node)
    r = template("--set", "coordinator.replicas=1")
    assert not r.all("PodDisruptionBudget")


@test
def verification_pod_change_restarts_the_coordinator():
    a = template().get("Deployment", f"{RELEASE}-coordinator")
    other = write("other.yaml", VERIFICATION_POD.replace("echo", "true; echo"))
    b = template("--set-file", f"defaults.verificationPod={other}", pod=False).get("Deployment", f"{RELEASE}-coordinator")
    key = "checksum/verification-pod"
    assert a["spec"]["template"]["metadata"]["annotations"][key] != b["spec"]["template"]["metadata"]["annotations"][key]


@test
def standard_labels_everywhere():
    r = template()
    for d in r.docs:
        labels = d["metadata"]["labels"]
        for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                  "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "app.kubernetes.io/component",
                  "helm.sh/chart"):
            assert labels.get(k), f'{d["kind"]}/{d["metadata"]["name"]} lacks {k}'
        assert labels["app.kubernetes.io/instance"] == RELEASE
    for w in r.workloads():
        sel = w["spec"]["selector"]["matchLabels"]
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in sel.items())
        assert "app.kubernetes.io/version" not in sel, "selectors are immutable: no version in them"
    agent_sel = r.get("DaemonSet", f"{RELEASE}-agent")["spec"]["selector"]["matchLabels"]
    coord_sel = r.get("Deployment", f"{RELEASE}-coordinator")["spec"]["selector"]["matchLabels"]
    assert agent_sel != coord_sel


# ---------------------------------------------------------------------------------------------
# least privilege, statically (the e2e test asks the API server the same questions)

def component_rules(r, component):
    """All rules bound to the component's ServiceAccount, as (namespace or None, rule)."""
    sa = f"{RELEASE}-{component}"
    out = []
    for b in r.all("RoleBinding") + r.all("ClusterRoleBinding"):
        if not any(s["name"] == sa and s["namespace"] == NAMESPACE for s in b["subjects"]):
            continue
        ns = b["metadata"].get("namespace")
        role = r.get(b["roleRef"]["kind"], b["roleRef"]["name"], ns if b["roleRef"]["kind"] == "Role" else None)
        out += [(ns, rule) for rule in role["rules"]]
    return out


@test
def no_wildcards_and_no_secrets_for_the_agent():
    r = template()
    for comp in ("agent", "coordinator"):
        for ns, rule in component_rules(r, comp):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{comp}: wildcard in {rule}"
    agent = component_rules(r, "agent")
    resources = {res for _, rule in agent for res in rule["resources"]}
    # jobs: kata-deploy's per-node install Jobs in job mode, read only, in its namespace only.
    assert resources == {"nodes", "pods", "pods/log", "events", "leases", "jobs"}, resources
    assert not any("apps" in rule["apiGroups"] for _, rule in agent)
    for ns, rule in agent:
        if "jobs" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
            assert ns == "kube-system", f"jobs read outside the kata-deploy namespace: {ns}"


@test
def agent_pod_writes_only_where_it_must():
    r = template()
    for ns, rule in component_rules(r, "agent"):
        if "pods" in rule["resources"] and set(rule["verbs"]) - {"get", "list", "watch"}:
            assert ns in ("kube-system", "default"), f"pod writes in {ns}: {rule}"
            if "create" in rule["verbs"]:
                assert ns == "default", f"pod create outside the verification namespace: {ns}"
    cluster = rules_of(r, "ClusterRole", f"{RELEASE}-agent")
    # The coordinator drains: the agent may neither evict nor read pods cluster-wide.
    assert not allows(cluster, "", "pods/eviction", "create")
    assert not allows(cluster, "", "pods", "list")
    assert allows(cluster, "", "nodes", "patch")
    assert not allows(cluster, "", "pods", "delete") and not allows(cluster, "", "nodes", "delete")


@test
def named_objects_are_limited_by_name():
    r = template()
    for comp in ("agent", "coordinator"):
        for ns, rule in component_rules(r, comp):
            if ns == NAMESPACE and ({"leases", "configmaps"} & set(rule["resources"])) and rule["verbs"] != ["create"]:
                assert rule.get("resourceNames"), f"{comp}: unnamed {rule}"
    for ns, rule in component_rules(r, "agent"):
        if "leases" in rule["resources"]:
            assert "create" not in rule["verbs"] and "delete" not in rule["verbs"]


@test
def coordinator_can_upgrade_kata_deploy_but_reads_secrets_only_there():
    r = template()
    rules = component_rules(r, "coordinator")
    for ns, rule in rules:
        if "secrets" in rule["resources"]:
            assert ns == "kube-system", f"secrets outside the kata-deploy namespace: {ns}"
    kd = rules_of(r, "Role", f"{RELEASE}-coordinator-kata-deploy", "kube-system")
    for group, res, verb in [("", "secrets", "create"), ("", "secrets", "list"), ("apps", "daemonsets", "patch"),
                             ("", "configmaps", "update"), ("", "serviceaccounts", "patch"),
                             ("batch", "jobs", "create"), ("apps", "controllerrevisions", "list")]:
        assert allows(kd, group, res, verb), (group, res, verb)
    cluster = rules_of(r, "ClusterRole", f"{RELEASE}-coordinator")
    assert allows(cluster, "node.k8s.io", "runtimeclasses", "create")
    assert allows(cluster, "rbac.authorization.k8s.io", "clusterroles", "escalate", "kata-deploy-role")
    assert not allows(cluster, "rbac.authorization.k8s.io", "clusterroles", "escalate", "cluster-admin")
    assert allows(cluster, "rbac.authorization.k8s.io", "clusterrolebindings", "update", "kata-deploy-rb")
    assert not allows(cluster, "rbac.authorization.k8s.io", "clusterrolebindings", "update", "cluster-admin")
    assert not allows(cluster, "apps", "daemonsets", "patch")
    # The blocking-pod gate reads pods anywhere, and only reads.
    assert allows(cluster, "", "pods", "watch") and allows(cluster, "", "pods", "list")
    assert not allows(cluster, "", "pods", "delete") and not allows(cluster, "", "pods", "create")
    lease = rules_of(r, "Role", f"{RELEASE}-coordinator", NAMESPACE)
    assert allows(lease, "coordination.k8s.io", "leases", "create")


@test
def extra_rules_are_appended():
    rule = '{"apiGroups":["nfd.k8s-sigs.io"],"resources":["nodefeaturerules"],"verbs":["get","create"]}'
    r = template("--set-json", f"rbac.coordinatorExtraClusterRules=[{rule}]",
                 "--set-json", f"rbac.coordinatorExtraRules=[{rule}]",
                 "--set", "rbac.kataDeployClusterRoles={kata-deploy-role,kata-deploy-role-x}")
    assert allows(rules_of(r, "ClusterRole", f"{RELEASE}-coordinator"), "nfd.k8s-sigs.io", "nodefeaturerules", "create")
    assert allows(rules_of(r, "Role", f"{RELEASE}-coordinator-kata-deploy", "kube-system"),
                  "nfd.k8s-sigs.io", "nodefeaturerules", "create")
    assert allows(rules_of(r, "ClusterRole", f"{RELEASE}-coordinator"), "rbac.authorization.k8s.io",
                  "clusterroles", "bind", "kata-deploy-role-x")


VAP = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"


@test
def agent_may_change_only_its_own_node_where_admission_policies_exist():
    r = template("--api-versions", VAP)
    policy = r.get("ValidatingAdmissionPolicy", f"{RELEASE}-agent-own-node")
    binding = r.get("ValidatingAdmissionPolicyBinding", f"{RELEASE}-agent-own-node")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (cond,) = policy["spec"]["matchConditions"]
    assert f'"system:serviceaccount:{NAMESPACE}:{RELEASE}-agent"' in cond["expression"], cond
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["nodes"] and rule["operations"] == ["UPDATE"], rule
    assert policy["spec"]["failurePolicy"] == "Fail"
    # Not on clusters without ValidatingAdmissionPolicy v1, nor when turned off.
    assert not template().all("ValidatingAdmissionPolicy")
    assert not template("--api-versions", VAP, "--set", "agent.restrictToOwnNode=false").all("ValidatingAdmissionPolicy")


def policy_and_binding(r, name):
    policy = r.get("ValidatingAdmissionPolicy", name)
    binding = r.get("ValidatingAdmissionPolicyBinding", name)
    assert binding["spec"]["policyName"] == name
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    return policy


def cel(policy):
    """Every CEL expression of a policy, one text (for presence checks; the API server compiles
    and runs them in tests/e2e/tests/chart_rbac.rs)."""
    spec = policy["spec"]
    parts = [c["expression"] for c in spec.get("matchConditions", [])]
    parts += [v["expression"] for v in spec.get("variables", [])]
    parts += [v["expression"] for v in spec["validations"]]
    return "\n".join(parts)


@test
def every_agent_policy_needs_the_tokens_node_and_matches_only_the_agent():
    r = template("--api-versions", VAP)
    agent_user = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-agent"
    for name, resource, operation in [("own-node", "nodes", "UPDATE"),
                                      ("verification-pods", "pods", "CREATE"),
                                      ("pod-deletions", "pods", "DELETE"),
                                      ("own-lease-hold", "leases", "UPDATE")]:
        policy = policy_and_binding(r, f"{RELEASE}-agent-{name}")
        (cond,) = policy["spec"]["matchConditions"]
        assert f'"{agent_user}"' in cond["expression"], cond
        (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
        assert rule["resources"] == [resource] and rule["operations"] == [operation], rule
        node_var = [v for v in policy["spec"]["variables"] if v["name"] == "nodeName"]
        assert node_var and "authentication.kubernetes.io/node-name" in node_var[0]["expression"], name
        # No way through without the node claim (the old node policy waved such tokens through).
        first = policy["spec"]["validations"][0]
        assert first["expression"] == "variables.nodeName != ''", (name, first)
        assert "size(variables.nodeNames) == 0" not in cel(policy), name


@test
def agent_node_policy_limits_the_fields_to_the_agents_own():
    policy = policy_and_binding(template("--api-versions", VAP), f"{RELEASE}-agent-own-node")
    text = cel(policy)
    # The keys of protocol/src/keys.rs `node` and nothing wider.
    for owned in ["'katacontainers.io/kata-lifecycle-manager-'", "'katacontainers.io/kata-current-version'",
                  "'lifecycle.katacontainers.io/'"]:
        assert owned in text, owned
    assert "object.metadata.name == variables.nodeName" in text
    for field in ["taints", "podCIDR", "providerID", "finalizers", "ownerReferences"]:
        assert f"object.spec.?{field}" in text or f"object.metadata.?{field}" in text, field


@test
def agent_pod_policies_pin_pods_to_the_agents_node_and_refuse_host_access_and_secrets():
    r = template("--api-versions", VAP, "--set", "verification.serviceAccounts={verifier}")
    create = cel(policy_and_binding(r, f"{RELEASE}-agent-verification-pods"))
    for needle in ["object.spec.?nodeName", "'kubernetes.io/hostname'", "matchFields", "privileged",
                   "allowPrivilegeEscalation", "capabilities.?add", "hostNetwork", "hostPID", "hostIPC",
                   "hostPort", "has(v.hostPath)", "secretKeyRef", "secretRef", "serviceAccountToken"]:
        assert needle in create, needle
    sas = [v for v in policy_and_binding(r, f"{RELEASE}-agent-verification-pods")["spec"]["variables"]
           if v["name"] == "serviceAccounts"]
    assert yaml.safe_load(sas[0]["expression"]) == ["default", "verifier"], sas
    delete = cel(policy_and_binding(r, f"{RELEASE}-agent-pod-deletions"))
    assert "oldObject.spec.?nodeName" in delete and "object.spec" not in delete.replace("oldObject.spec", "")


@test
def coordinator_rbac_policy_binds_kata_deploy_roles_only_in_kata_deploy_namespaces():
    r = template("--api-versions", VAP, "--set", "rbac.extraKataDeployNamespaces={kata-2}")
    policy = policy_and_binding(r, f"{RELEASE}-coordinator-kata-deploy-rbac")
    (cond,) = policy["spec"]["matchConditions"]
    assert f'"system:serviceaccount:{NAMESPACE}:{RELEASE}-coordinator"' in cond["expression"]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    # And job mode's dispatcher Role/RoleBinding, which the coordinator creates in the
    # kata-deploy namespace (create cannot be limited by name).
    assert rule["resources"] == ["clusterroles", "clusterrolebindings", "roles", "rolebindings"], rule
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert yaml.safe_load(variables["kataDeployNamespaces"]) == ["kube-system", "kata-2"]
    assert yaml.safe_load(variables["ownServiceAccounts"]) == [f"{RELEASE}-coordinator", f"{RELEASE}-agent"]
    text = cel(policy)
    for needle in ["'*' in r.?verbs", "'escalate', 'bind', 'impersonate'", "'secrets'",
                   "'rbac.authorization.k8s.io' in r.?apiGroups", "nonResourceURLs"]:
        assert needle in text, needle
    # Like the agent's: only where ValidatingAdmissionPolicy exists, and switched with it.
    assert not template().all("ValidatingAdmissionPolicy")
    assert not template("--api-versions", VAP, "--set", "agent.restrictToOwnNode=false").all(
        "ValidatingAdmissionPolicyBinding")


@test
def coordinator_may_update_kata_deploys_job_mode_rbac_by_name():
    cluster = rules_of(template(), "ClusterRole", f"{RELEASE}-coordinator")
    for verb in ["update", "escalate", "bind"]:
        assert allows(cluster, "rbac.authorization.k8s.io", "clusterroles", verb, "kata-deploy-dispatcher-noderole")
        # Post-delete hooks run on uninstall only, which the coordinator never does.
        assert not allows(cluster, "rbac.authorization.k8s.io", "clusterroles", verb, "kata-deploy-cleanup-role")
    assert allows(cluster, "rbac.authorization.k8s.io", "clusterrolebindings", "update", "kata-deploy-dispatcher-noderb")


@test
def coordinator_writes_kata_deploys_dispatcher_role_in_its_namespace_only():
    r = template("--set", "rbac.extraKataDeployNamespaces={kata-2}")
    rbac = "rbac.authorization.k8s.io"
    for ns in ("kube-system", "kata-2"):
        kd = rules_of(r, "Role", f"{RELEASE}-coordinator-kata-deploy", ns)
        for res in ("roles", "rolebindings"):
            assert allows(kd, rbac, res, "create") and allows(kd, rbac, res, "get"), (ns, res)
            # Never beyond its own rights there, and no changing someone else's.
            assert not allows(kd, rbac, res, "escalate", "kata-deploy-dispatcher-role"), (ns, res)
            assert not allows(kd, rbac, res, "bind", "kata-deploy-dispatcher-role"), (ns, res)
            assert not allows(kd, rbac, res, "update", "someone-else"), (ns, res)
        assert allows(kd, rbac, "roles", "update", "kata-deploy-dispatcher-role")
        assert allows(kd, rbac, "roles", "delete", "kata-deploy-dispatcher-role")
        assert allows(kd, rbac, "rolebindings", "patch", "kata-deploy-dispatcher-rb")
        assert not allows(kd, rbac, "roles", "update", "kata-deploy-dispatcher-rb")
    for ns, rule in component_rules(r, "coordinator"):
        if {"roles", "rolebindings"} & set(rule["resources"]):
            assert ns in ("kube-system", "kata-2"), f"namespaced RBAC outside the kata-deploy namespaces: {ns}"
    # With env.multiInstallSuffix the names change: the values name them.
    kd = rules_of(template("--set", "rbac.kataDeployRoles={kata-deploy-dispatcher-role-x}"),
                  "Role", f"{RELEASE}-coordinator-kata-deploy", "kube-system")
    assert allows(kd, rbac, "roles", "update", "kata-deploy-dispatcher-role-x")
    assert not allows(kd, rbac, "roles", "update", "kata-deploy-dispatcher-role")


@test
def evictions_are_the_coordinators_and_the_removed_agent_value_says_so():
    r = template()
    agent = [rule for _, rule in component_rules(r, "agent")]
    assert not allows(agent, "", "pods/eviction", "create")
    cluster = rules_of(r, "ClusterRole", f"{RELEASE}-coordinator")
    assert allows(cluster, "", "pods/eviction", "create")
    assert allows(cluster, "", "pods", "list")
    assert not allows(cluster, "", "pods", "delete")
    for value in ("true", "false"):
        out = template("--set", f"rbac.agentEvictions={value}", expect_ok=False)
        assert "rbac.agentEvictions was removed" in out and "coordinator drains" in out, out


@test
def verification_service_accounts_reach_the_coordinator():
    coordinator = template("--set", "verification.serviceAccounts={a,b}").get("Deployment", f"{RELEASE}-coordinator")
    assert env_of(coordinator)["KLM_VERIFICATION_SERVICE_ACCOUNTS"] == "a,b"
    coordinator = template().get("Deployment", f"{RELEASE}-coordinator")
    assert env_of(coordinator)["KLM_VERIFICATION_SERVICE_ACCOUNTS"] == ""


@test
def verification_namespace_is_created_under_pod_security_only_on_request():
    assert not template("--set", "defaults.verificationNamespace=klm-verify").all("Namespace")
    r = template("--set", "verification.createNamespace=true", "--set", "defaults.verificationNamespace=klm-verify",
                 "--set", "rbac.extraVerificationNamespaces={klm-verify-2}")
    for ns in ["klm-verify", "klm-verify-2"]:
        labels = r.get("Namespace", ns)["metadata"]["labels"]
        for mode in ["enforce", "warn", "audit"]:
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "baseline", labels
    r = template("--set", "verification.createNamespace=true", "--set", "defaults.verificationNamespace=klm-verify",
                 "--set", "verification.podSecurity=restricted")
    assert r.get("Namespace", "klm-verify")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Never a namespace that exists already or holds other workloads.
    for ns in ["default", NAMESPACE, "kube-system"]:
        err = template("--set", "verification.createNamespace=true", "--set", f"defaults.verificationNamespace={ns}",
                       expect_ok=False)
        assert "dedicated verification namespace" in err and "kubectl label namespace" in err, err
    err = template("--set", "verification.podSecurity=privileged", expect_ok=False)
    assert "podSecurity" in err, err


# ---------------------------------------------------------------------------------------------
# metrics: Services, ServiceMonitors and the PrometheusRule (all off by default)

METRICS_KINDS = ("Service", "ServiceMonitor", "PrometheusRule")


@test
def metrics_objects_are_off_by_default():
    r = template()
    for kind in METRICS_KINDS:
        assert r.all(kind) == [], f"{kind} rendered by default: {names(r.all(kind))}"


@test
def service_monitor_scrapes_the_health_port_of_both_components():
    r = template("--set", "metrics.serviceMonitor.enabled=true",
                 "--set", "metrics.serviceMonitor.labels.release=prom",
                 "--set", "metrics.serviceMonitor.interval=15s")
    assert r.all("PrometheusRule") == []
    workloads = {"coordinator": r.get("Deployment", f"{RELEASE}-coordinator"),
                 "agent": r.get("DaemonSet", f"{RELEASE}-agent")}
    for component, workload in workloads.items():
        svc = r.get("Service", f"{RELEASE}-{component}-metrics", NAMESPACE)
        pod = workload["spec"]["template"]
        # The Service selects exactly this component's pods, on the port that serves /metrics.
        sel = svc["spec"]["selector"]
        assert sel.items() <= pod["metadata"]["labels"].items(), (sel, pod["metadata"]["labels"])
        assert sel["app.kubernetes.io/component"] == component
        [port] = svc["spec"]["ports"]
        assert port["name"] == "metrics" and port["targetPort"] == "health", port
        container_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert port["port"] == container_ports["health"], (port, container_ports)
        env = env_of(workload)
        assert env["KLM_HEALTH_ADDR"].endswith(f":{container_ports['health']}"), env
        assert (svc["spec"].get("clusterIP") == "None") == (component == "agent"), svc["spec"]

        sm = r.get("ServiceMonitor", f"{RELEASE}-{component}", NAMESPACE)
        assert sm["metadata"]["labels"]["release"] == "prom"
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        [ep] = sm["spec"]["endpoints"]
        assert (ep["port"], ep["path"], ep["interval"]) == ("metrics", "/metrics", "15s"), ep
        relabel = ep.get("relabelings", [])
        if component == "agent":
            assert relabel == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
        else:
            assert relabel == []
    # Each ServiceMonitor picks only its own component's Service.
    coord_sm = r.get("ServiceMonitor", f"{RELEASE}-coordinator")["spec"]["selector"]["matchLabels"]
    agent_svc = r.get("Service", f"{RELEASE}-agent-metrics")["metadata"]["labels"]
    assert not coord_sm.items() <= agent_svc.items()
    err = template("--set", "metrics.serviceMonitor.interval=often", expect_ok=False)
    assert "interval" in err, err


@test
def prometheus_rule_alerts_on_failed_runs_failed_nodes_and_stalls():
    r = template("--set", "metrics.prometheusRule.enabled=true",
                 "--set", "metrics.prometheusRule.stalledFor=45m",
                 "--set", "metrics.prometheusRule.labels.release=prom")
    assert r.all("ServiceMonitor") == [] and r.all("Service") == []
    rule = r.get("PrometheusRule", RELEASE, NAMESPACE)
    assert rule["metadata"]["labels"]["release"] == "prom"
    [group] = rule["spec"]["groups"]
    alerts = {a["alert"]: a for a in group["rules"]}
    assert sorted(alerts) == ["KataLifecycleNodeFailed", "KataLifecycleRunFailed", "KataLifecycleRunStalled"]
    scope = f'namespace="{NAMESPACE}"'
    failed = alerts["KataLifecycleRunFailed"]["expr"]
    assert f'klm_run_last_result{{result="Failed",{scope}}}' in failed and failed.endswith("== 1"), failed
    node = alerts["KataLifecycleNodeFailed"]["expr"]
    assert f'klm_run_nodes{{status="failed",{scope}}}' in node and node.endswith("> 0"), node
    assert alerts["KataLifecycleNodeFailed"]["labels"]["severity"] == "critical"
    assert "{{ $value }}" in alerts["KataLifecycleNodeFailed"]["annotations"]["description"]
    stalled = alerts["KataLifecycleRunStalled"]["expr"]
    for part in [f'min_over_time(klm_run_phase{{phase="Running",{scope}}}[45m])',
                 f"max_over_time(klm_run_paused{{{scope}}}[45m])) == 0",
                 f"sum(changes(klm_run_nodes{{{scope}}}[45m])) == 0"]:
        assert part in stalled, f"{part!r} not in {stalled!r}"
    err = template("--set", "metrics.prometheusRule.stalledFor=soon", expect_ok=False)
    assert "stalledFor" in err, err


# ---------------------------------------------------------------------------------------------

def main():
    global ARGS, TMP
    p = argparse.ArgumentParser()
    p.add_argument("--helm", required=True)
    p.add_argument("--chart", required=True)
    p.add_argument("-k", dest="only", help="run only tests whose name contains this")
    ARGS = p.parse_args()
    passed = failed = 0
    with tempfile.TemporaryDirectory() as TMP:
        for fn in TESTS:
            if ARGS.only and ARGS.only not in fn.__name__:
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failed += 1
                print(f"FAIL chart::{fn.__name__}: {e}")
                if not isinstance(e, AssertionError):
                    traceback.print_exc()
            else:
                passed += 1
                print(f"ok   chart::{fn.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
