//! What kata-deploy's images do on a node, played by the testkit (pods on kwok nodes run no
//! image). Read from the upstream chart templates (3.32.0 … 4.1.0):
//!
//! - **Job mode** (`deploymentMode: job`): helm runs the dispatcher hook Job
//!   `<chart>-install-dispatcher` (label `kata-deploy/dispatcher=install`, post-install /
//!   post-upgrade, `backoffLimit: 0`) and waits for it. The real dispatcher reads its
//!   `--nodes=a,b` (from `job.nodes`) or `--node-selector=…`, clones the `install-job.yaml`
//!   template of the `<chart>-job-templates` ConfigMap once per node with `metadata.name` and
//!   `spec.template.spec.nodeName` set and an ownerReference to `--owner-job-name`, and exits
//!   non-zero when a node's Job failed. Each per-node Job (label `kata-deploy/stage=install`) runs
//!   the install stages; its last one labels the node `katacontainers.io/kata-runtime=true`.
//!   This controller does the dispatcher's part, holds and releases the pods (see below), and
//!   writes the label: `false` when a node's install starts, `true` when its Job completed.
//!   Per-node Jobs are named `<--name-prefix>-<node>` (cut to 63): the dispatcher image's own
//!   naming is not part of the chart, so tests find the Jobs by label and `nodeName`, as the
//!   agent does.
//! - **Daemonset mode**: kata-deploy labels its node `katacontainers.io/kata-runtime=true` once
//!   installed (every chart's RuntimeClasses select on it); 3.27.0/3.28.0's preStop cleanup takes
//!   the label off when the pod stops. Here: `true` once a kata-deploy pod on the node is Ready,
//!   removed when a 3.27/3.28 pod starts terminating.
//!
//! Holding pods: kwok moves every Job pod to Succeeded at once. A cluster-wide
//! MutatingAdmissionPolicy gives the dispatcher's and the per-node Jobs' pods, at creation, the
//! verification labels with the outcome `held` — no kwok stage matches it, so they stay Pending —
//! and this controller sets the outcome (`succeed` / `fail`) when the simulated image would finish.
//! The verification controller leaves them alone (they already carry an outcome).
//!
//! Outcomes of per-node installs come from a (node, version) table like
//! [`crate::Slice::set_verification_outcome`]'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, stream};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};

use crate::verification::{ANY, OUTCOME_LABEL, VERIFICATION_LABEL, image_tag};

/// kata-deploy's node label: `true` once Kata is installed on the node.
pub const KATA_RUNTIME_LABEL: &str = "katacontainers.io/kata-runtime";
/// The per-node Jobs' stage label (`install` / `cleanup`).
pub const STAGE_LABEL: &str = "kata-deploy/stage";
/// The dispatcher hook Job's label (`install` / `cleanup`).
pub const DISPATCHER_LABEL: &str = "kata-deploy/dispatcher";
/// The outcome no kwok stage matches: the pod stays Pending until this controller decides.
const HELD: &str = "held";
/// Name of the cluster-wide policy that holds kata-deploy's Job pods (shared by all slices).
const HOLD_POLICY: &str = "klm-test-hold-kata-deploy-job-pods";

/// What a per-node install Job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Its pod succeeds; the node is labelled installed.
    Succeed,
    /// Its pod fails (each retry too); the Job fails after `job.backoffLimit` retries and the
    /// dispatcher, hence the helm hook, fails.
    Fail,
}

/// A per-node install Job this controller created for a dispatcher (for the tests' asserts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchedJob {
    pub job: String,
    pub node: String,
    /// The dispatcher image's tag: the chart version that dispatched it.
    pub version: String,
}

#[derive(Default)]
pub(crate) struct InstallScenario {
    rules: Mutex<HashMap<(String, String), InstallOutcome>>,
    dispatched: Mutex<Vec<DispatchedJob>>,
}

impl InstallScenario {
    pub(crate) fn set(&self, node: String, version: &str, outcome: InstallOutcome) {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((node, version.to_owned()), outcome);
    }

    fn decide(&self, node: &str, version: &str) -> InstallOutcome {
        let rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        [(node, version), (node, ANY), (ANY, version)]
            .iter()
            .find_map(|(n, v)| rules.get(&((*n).to_owned(), (*v).to_owned())).copied())
            .unwrap_or(InstallOutcome::Succeed)
    }

    pub(crate) fn dispatched(&self) -> Vec<DispatchedJob> {
        self.dispatched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The policy (and binding) that holds kata-deploy's Job pods; created once per cluster.
async fn ensure_hold_policy(client: &kube::Client) -> anyhow::Result<()> {
    let policy: MutatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": HOLD_POLICY},
        "spec": {
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["pods"]
            }]},
            "matchConditions": [{
                "name": "kata-deploy-job-pod",
                "expression": format!(
                    "has(object.metadata.labels) && ('{DISPATCHER_LABEL}' in object.metadata.labels || '{STAGE_LABEL}' in object.metadata.labels)"
                )
            }],
            "mutations": [{
                "patchType": "ApplyConfiguration",
                "applyConfiguration": {"expression": format!(
                    "Object{{metadata: Object.metadata{{labels: {{'{VERIFICATION_LABEL}': 'true', '{OUTCOME_LABEL}': '{HELD}'}}}}}}"
                )}
            }]
        }
    }))?;
    let binding: MutatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": HOLD_POLICY},
        "spec": {"policyName": HOLD_POLICY}
    }))?;
    created(
        Api::<MutatingAdmissionPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy)
            .await,
    )?;
    created(
        Api::<MutatingAdmissionPolicyBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await,
    )?;
    Ok(())
}

/// A create that may find the object made already (by another slice of the cluster).
fn created<K>(r: Result<K, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The dispatcher's command-line, as the chart renders it.
#[derive(Debug, Default)]
struct DispatcherArgs {
    nodes: Option<Vec<String>>,
    node_selector: Option<String>,
    name_prefix: String,
}

fn dispatcher_args(job: &Job) -> DispatcherArgs {
    let command = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.command.clone())
        .unwrap_or_default();
    let mut args = DispatcherArgs::default();
    for a in command {
        if let Some(v) = a.strip_prefix("--nodes=") {
            args.nodes = Some(
                v.split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        } else if let Some(v) = a.strip_prefix("--node-selector=") {
            args.node_selector = Some(v.to_owned());
        } else if let Some(v) = a.strip_prefix("--name-prefix=") {
            args.name_prefix = v.to_owned();
        }
    }
    args
}

fn job_image_tag(job: &Job) -> String {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|spec| {
            image_tag(&Pod {
                spec: Some(spec.clone()),
                ..Default::default()
            })
        })
        .unwrap_or_default()
}

fn labels(meta: &kube::api::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// A Job's outcome from its conditions: `Some(true)` complete, `Some(false)` failed, `None`
/// still running.
pub fn finished(job: &Job) -> Option<bool> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    if conds
        .iter()
        .any(|c| c.type_ == "Complete" && c.status == "True")
    {
        Some(true)
    } else if conds
        .iter()
        .any(|c| c.type_ == "Failed" && c.status == "True")
    {
        Some(false)
    } else {
        None
    }
}

fn owner_uid(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Job")
        .map(|o| o.uid.clone())
}

struct Sim {
    client: kube::Client,
    slice_id: String,
    ns: String,
    scenario: Arc<InstallScenario>,
    /// Dispatcher Jobs (uid) whose per-node Jobs were created, with those Jobs' names.
    dispatched: HashMap<String, BTreeSet<String>>,
    /// Pods (uid) whose outcome was set.
    released: BTreeSet<String>,
    /// Per-node Jobs (uid) whose end was written on the node.
    noted: BTreeSet<String>,
    /// The slice's Nodes as watched: a label is written only where it differs (a Node
    /// recreated by a test gets it again).
    nodes: reflector::Store<Node>,
    /// The value last written per node: the store may not show it yet, so an equal stored
    /// value only counts when it is also what we last wrote.
    written: HashMap<String, Option<String>>,
}

impl Sim {
    async fn set_node_label(&mut self, node: &str, value: Option<&str>) {
        // A keyed lookup, not a scan: this runs for every ready pod on every event, so a scan
        // of the slice's Nodes made each event cost N² at fleet size (the fleet benchmark).
        let current = self
            .nodes
            .get(&reflector::ObjectRef::new(node))
            .map(|n| labels(&n.metadata).get(KATA_RUNTIME_LABEL).cloned());
        let want = value.map(str::to_owned);
        let ours = self.written.get(node).is_none_or(|w| *w == want);
        match current {
            Some(now) if now == want && ours => return,
            Some(_) => {}
            None => return, // not a node of this slice (or not listed yet: its event comes)
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"labels": {KATA_RUNTIME_LABEL: value}}});
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.written.insert(node.to_owned(), want);
            }
            Err(e) => eprintln!("klm-testkit: kata-deploy simulator: labelling {node}: {e}"),
        }
    }

    async fn release_pod(&mut self, pod: &Pod, outcome: &str) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let patch = serde_json::json!({"metadata": {"labels": {OUTCOME_LABEL: outcome}}});
        match pods
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.released.insert(uid);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.released.insert(uid);
            }
            Err(e) => eprintln!("klm-testkit: kata-deploy simulator: releasing pod {name}: {e}"),
        }
    }

    /// The dispatcher's fan-out: one node-pinned install Job per target node.
    async fn dispatch(&mut self, dispatcher: &Job) -> anyhow::Result<BTreeSet<String>> {
        let args = dispatcher_args(dispatcher);
        let version = job_image_tag(dispatcher);
        let base = args
            .name_prefix
            .strip_suffix("-install")
            .unwrap_or(&args.name_prefix)
            .to_owned();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let cm = cms.get(&format!("{base}-job-templates")).await?;
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get("install-job.yaml"))
            .cloned()
            .unwrap_or_default();
        let template: Job =
            serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("install-job.yaml: {e}"))?;
        // Selected nodes stay inside the slice: the shared cluster's other nodes belong to
        // other tests (the real dispatcher would look at every node).
        let slice_nodes = format!("{}={}", crate::SLICE_LABEL, self.slice_id);
        let nodes: Vec<String> = match (&args.nodes, &args.node_selector) {
            (Some(list), _) => list.clone(),
            (None, selector) => {
                let sel = match selector {
                    Some(s) if !s.is_empty() => format!("{s},{slice_nodes}"),
                    _ => slice_nodes,
                };
                Api::<Node>::all(self.client.clone())
                    .list(&ListParams::default().labels(&sel))
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|n| n.metadata.name)
                    .collect()
            }
        };
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        let mut created = BTreeSet::new();
        for node in nodes {
            let mut name = format!("{}-{node}", args.name_prefix);
            name.truncate(63);
            let name = name.trim_end_matches('-').to_owned();
            let mut job = template.clone();
            job.metadata.name = Some(name.clone());
            job.metadata.namespace = Some(self.ns.clone());
            job.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: dispatcher.metadata.name.clone().unwrap_or_default(),
                uid: dispatcher.metadata.uid.clone().unwrap_or_default(),
                controller: Some(false),
                block_owner_deletion: None,
            }]);
            if let Some(spec) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
                spec.node_name = Some(node.clone());
            }
            // An earlier run's Job of the same name (its dispatcher is gone, garbage collection
            // may lag): the real dispatcher replaces leftovers too.
            match jobs.get_opt(&name).await? {
                Some(old) if owner_uid(&old.metadata) != dispatcher.metadata.uid => {
                    jobs.delete(&name, &DeleteParams::background()).await.ok();
                    crate::wait::wait_for(
                        &jobs,
                        &name,
                        &format!("old install Job {name} gone"),
                        crate::wait::DEFAULT_TIMEOUT,
                        kube::runtime::conditions::is_deleted(
                            &old.metadata.uid.clone().unwrap_or_default(),
                        ),
                    )
                    .await?;
                }
                Some(_) => {
                    created.insert(name);
                    continue; // ours already
                }
                None => {}
            }
            self.set_node_label(&node, Some("false")).await;
            jobs.create(&PostParams::default(), &job).await?;
            created.insert(name.clone());
            self.scenario
                .dispatched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(DispatchedJob {
                    job: name,
                    node,
                    version: version.clone(),
                });
        }
        Ok(created)
    }

    /// One level-triggered pass over what the watches show.
    async fn pass(&mut self, jobs: &[Arc<Job>], pods: &[Arc<Pod>]) {
        // The dispatcher: fan out once per dispatcher Job.
        for job in jobs {
            let l = labels(&job.metadata);
            let uid = job.metadata.uid.clone().unwrap_or_default();
            if l.get(DISPATCHER_LABEL).map(String::as_str) != Some("install")
                || self.dispatched.contains_key(&uid)
                || finished(job).is_some()
            {
                continue;
            }
            match self.dispatch(job).await {
                Ok(children) => {
                    self.dispatched.insert(uid, children);
                }
                Err(e) => eprintln!("klm-testkit: kata-deploy simulator: dispatching: {e:#}"),
            }
        }
        // Per-node install Jobs that ended: the label stage ran, or did not.
        for job in jobs {
            let uid = job.metadata.uid.clone().unwrap_or_default();
            if labels(&job.metadata).get(STAGE_LABEL).map(String::as_str) != Some("install")
                || self.noted.contains(&uid)
            {
                continue;
            }
            let Some(ok) = finished(job) else { continue };
            let node = job
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            if ok {
                self.set_node_label(&node, Some("true")).await;
            }
            self.noted.insert(uid);
        }
        // Held pods: per-node install pods by the table; dispatcher pods once all their
        // per-node Jobs ended (failing when one failed, as the dispatcher exits non-zero).
        for pod in pods {
            let l = labels(&pod.metadata);
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if l.get(OUTCOME_LABEL).map(String::as_str) != Some(HELD)
                || self.released.contains(&uid)
                || pod.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            if l.contains_key(STAGE_LABEL) {
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                let version = image_tag(pod).unwrap_or_default();
                let outcome = self.scenario.decide(&node, &version);
                let label = match outcome {
                    InstallOutcome::Succeed => "succeed",
                    InstallOutcome::Fail => "fail",
                };
                self.release_pod(pod, label).await;
                continue;
            }
            match l.get(DISPATCHER_LABEL).map(String::as_str) {
                Some("install") => {
                    let Some(owner) = owner_uid(&pod.metadata) else {
                        continue;
                    };
                    let Some(expected) = self.dispatched.get(&owner) else {
                        continue;
                    };
                    // Every Job it created, as the watch shows them (a Job just created may
                    // not be in the store yet: then it is not finished either).
                    let children: Vec<Option<bool>> = expected
                        .iter()
                        .map(|name| {
                            jobs.iter()
                                .find(|j| {
                                    j.metadata.name.as_ref() == Some(name)
                                        && owner_uid(&j.metadata).as_ref() == Some(&owner)
                                })
                                .and_then(|j| finished(j))
                        })
                        .collect();
                    if children.iter().any(Option::is_none) {
                        continue;
                    }
                    let all_ok = children.iter().all(|c| *c == Some(true));
                    self.release_pod(pod, if all_ok { "succeed" } else { "fail" })
                        .await;
                }
                // The cleanup dispatcher (helm uninstall): nothing installed here to remove.
                Some(_) => self.release_pod(pod, "succeed").await,
                None => {}
            }
        }
        // Daemonset mode: kata-deploy labels its node once installed.
        let mut ready_nodes = BTreeSet::new();
        for pod in pods {
            if labels(&pod.metadata).get("name").map(String::as_str) != Some("kata-deploy") {
                continue;
            }
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let version = image_tag(pod).unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                if version.starts_with("3.27.") || version.starts_with("3.28.") {
                    self.set_node_label(&node, None).await;
                }
            } else if crate::wait::is_pod_ready(pod) {
                ready_nodes.insert(node);
            }
        }
        for node in ready_nodes {
            self.set_node_label(&node, Some("true")).await;
        }
    }
}

/// Runs until aborted (the slice aborts it on drop).
pub(crate) async fn run(
    client: kube::Client,
    slice_id: String,
    kata_deploy_ns: String,
    scenario: Arc<InstallScenario>,
) {
    if let Err(e) = ensure_hold_policy(&client).await {
        eprintln!("klm-testkit: kata-deploy simulator: cannot create {HOLD_POLICY}: {e}");
    }
    let job_api: Api<Job> = Api::namespaced(client.clone(), &kata_deploy_ns);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &kata_deploy_ns);
    let (job_store, job_writer) = reflector::store();
    let (pod_store, pod_writer) = reflector::store();
    let job_events = reflector(job_writer, watcher(job_api, watcher::Config::default()))
        .default_backoff()
        .map(|ev| ev.map(|_| ()));
    let pod_events = reflector(pod_writer, watcher(pod_api, watcher::Config::default()))
        .default_backoff()
        .map(|ev| ev.map(|_| ()));
    let node_api: Api<Node> = Api::all(client.clone());
    let (node_store, node_writer) = reflector::store();
    let node_events = reflector(
        node_writer,
        watcher(
            node_api,
            watcher::Config::default().labels(&format!("{}={slice_id}", crate::SLICE_LABEL)),
        ),
    )
    .default_backoff()
    .map(|ev| ev.map(|_| ()));
    let mut events = std::pin::pin!(stream::select(
        stream::select(job_events, pod_events),
        node_events
    ));
    let mut sim = Sim {
        client,
        slice_id,
        ns: kata_deploy_ns,
        scenario,
        dispatched: HashMap::new(),
        released: BTreeSet::new(),
        noted: BTreeSet::new(),
        nodes: node_store,
        written: HashMap::new(),
    };
    while let Some(event) = events.next().await {
        if let Err(e) = event {
            eprintln!("klm-testkit: kata-deploy simulator watch: {e}");
        }
        let jobs = job_store.state();
        let pods = pod_store.state();
        sim.pass(&jobs, &pods).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dispatcher_command_line_is_read_as_the_chart_renders_it() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "spec": {"template": {"spec": {"containers": [{
                "name": "dispatcher",
                "image": "quay.io/kata-containers/kata-deploy-job-dispatcher:4.0.0",
                "command": [
                    "/usr/bin/kata-deploy-job-dispatcher",
                    "--job-template=/etc/kata-job/install-job.yaml",
                    "--name-prefix=kata-deploy-install",
                    "--owner-job-name=kata-deploy-install-dispatcher",
                    "--parallelism=100",
                    "--nodes=n1,n2"
                ]
            }]}}}
        }))
        .unwrap();
        let args = dispatcher_args(&job);
        assert_eq!(args.nodes, Some(vec!["n1".to_string(), "n2".to_string()]));
        assert_eq!(args.name_prefix, "kata-deploy-install");
        assert_eq!(args.node_selector, None);
        assert_eq!(job_image_tag(&job), "4.0.0");
    }

    #[test]
    fn install_outcomes_most_specific_first() {
        let s = InstallScenario::default();
        s.set("n2".into(), "4.0.0", InstallOutcome::Fail);
        s.set(ANY.into(), "4.1.0", InstallOutcome::Fail);
        assert_eq!(s.decide("n2", "4.0.0"), InstallOutcome::Fail);
        assert_eq!(s.decide("n1", "4.0.0"), InstallOutcome::Succeed);
        assert_eq!(s.decide("n1", "4.1.0"), InstallOutcome::Fail);
    }
}
