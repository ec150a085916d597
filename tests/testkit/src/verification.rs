//! Scenario control of verification pods.
//!
//! A test decides what a verification pod does, per node and per kata-deploy version. The pods
//! themselves are simulated by kwok (`tests/cluster/kwok-stages.yaml`): a pod labelled
//! `klm.test/verification=true` stays Pending until it also carries `klm.test/outcome=<outcome>`,
//! and then follows that outcome's chain of stages. This module is the small controller that
//! chooses the outcome label: it watches verification pods on the slice's nodes and the
//! slice's kata-deploy pods, and labels each new verification pod from the table the test filled
//! in, keyed by its node and by the version of the Ready kata-deploy pod on that node (the image
//! tag of its `kube-kata` container) at the moment the pod is seen.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};

/// Label a test puts on verification pods (in the pod template it gives the product).
pub const VERIFICATION_LABEL: &str = "klm.test/verification";
/// Label the controller sets; kwok stages select on it.
pub const OUTCOME_LABEL: &str = "klm.test/outcome";
/// Label the controller adds to a [`Outcome::SucceedAfter`] pod once its duration is up.
pub const FINISH_LABEL: &str = "klm.test/finish";

/// What a verification pod does once it is on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Pending → Running → Succeeded, container exit code 0.
    Succeed,
    /// Pending → Running → Failed, container exit code 1.
    Fail,
    /// Stays Pending, container waiting in ContainerCreating, forever.
    Pending,
    /// Stays Pending, container waiting in ErrImagePull, then ImagePullBackOff.
    ImagePull,
    /// Pending → Running → container exited 1, waiting in CrashLoopBackOff (phase Running).
    CrashLoop,
    /// Pending → Running for the given duration (counted from when the pod is labelled) →
    /// Succeeded, exit code 0: a healthy verification as slow as a real one (a Kata VM boot and
    /// image pull take 30–120 s).
    SucceedAfter(Duration),
}

impl Outcome {
    /// Every outcome that needs no parameter.
    pub const ALL: [Outcome; 5] = [
        Outcome::Succeed,
        Outcome::Fail,
        Outcome::Pending,
        Outcome::ImagePull,
        Outcome::CrashLoop,
    ];

    /// The `klm.test/outcome` label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Succeed => "succeed",
            Outcome::Fail => "fail",
            Outcome::Pending => "pending",
            Outcome::ImagePull => "image-pull",
            Outcome::CrashLoop => "crashloop",
            Outcome::SucceedAfter(_) => "succeed-after",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::SucceedAfter(d) => write!(f, "{}({d:?})", self.label()),
            _ => f.write_str(self.label()),
        }
    }
}

/// Wildcard for a node or a version in [`crate::Slice::set_verification_outcome`].
pub const ANY: &str = "*";

/// The test's table: (node | `*`, version | `*`) → outcome, plus a default.
#[derive(Debug)]
pub(crate) struct Outcomes {
    pub(crate) default: Outcome,
    pub(crate) rules: HashMap<(String, String), Outcome>,
}

impl Default for Outcomes {
    fn default() -> Self {
        Outcomes {
            default: Outcome::Succeed,
            rules: HashMap::new(),
        }
    }
}

impl Outcomes {
    /// Most specific rule first: (node, version), (node, *), (*, version), then the default.
    /// `version` is None when no Ready kata-deploy pod runs on the node.
    pub(crate) fn decide(&self, node: &str, version: Option<&str>) -> Outcome {
        let get = |n: &str, v: &str| self.rules.get(&(n.to_owned(), v.to_owned())).copied();
        version
            .and_then(|v| get(node, v))
            .or_else(|| get(node, ANY))
            .or_else(|| version.and_then(|v| get(ANY, v)))
            .unwrap_or(self.default)
    }
}

/// One labelling, kept for the failure report.
#[derive(Clone, Debug)]
pub struct Decision {
    pub pod: String,
    pub node: String,
    pub version: Option<String>,
    pub outcome: Outcome,
}

/// Shared between a [`crate::Slice`] and its controller task.
#[derive(Default)]
pub(crate) struct Scenario {
    pub(crate) outcomes: Mutex<Outcomes>,
    pub(crate) decisions: Mutex<Vec<Decision>>,
}

/// The version of the kata-deploy pod serving `node`: the newest Ready, non-terminating
/// `name=kata-deploy` pod there, read from its `kube-kata` image tag.
pub(crate) fn kata_deploy_version_on(pods: &[Arc<Pod>], node: &str) -> Option<String> {
    pods.iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| p.metadata.deletion_timestamp.is_none() && crate::wait::is_pod_ready(p))
        .max_by_key(|p| p.metadata.creation_timestamp.clone())
        .and_then(|p| image_tag(p))
}

/// The image tag of a kata-deploy pod's `kube-kata` container (its kata-deploy version).
pub fn image_tag(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == "kube-kata")
        .or(spec.containers.first())?;
    let image = c.image.as_deref()?;
    // The tag follows the last ':' after the last '/' (a registry host may carry a port).
    let last = image.rsplit('/').next()?;
    last.split_once(':').map(|(_, tag)| tag.to_owned())
}

/// Runs until aborted (the slice aborts it on drop).
pub(crate) async fn run(
    client: kube::Client,
    slice_id: String,
    kata_deploy_ns: String,
    scenario: Arc<Scenario>,
) {
    let node_prefix = format!("{slice_id}-");
    let kd_api: Api<Pod> = Api::namespaced(client.clone(), &kata_deploy_ns);
    let verify_api: Api<Pod> = Api::all(client.clone());

    let (verify_store, verify_writer) = reflector::store();
    let mut events = std::pin::pin!(
        reflector(
            verify_writer,
            watcher(
                verify_api,
                watcher::Config::default().labels(&format!("{VERIFICATION_LABEL}=true")),
            ),
        )
        .default_backoff()
    );

    // Pods labelled by us whose update may not have reached the store yet.
    let mut labelled: HashSet<String> = HashSet::new();
    // Timers of SucceedAfter pods; dropped (aborted) with this task.
    let mut finishers = tokio::task::JoinSet::new();
    let mut verify_listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => verify_listed = true,
            Err(e) => eprintln!("klm-testkit: verification controller watch: {e}"),
            _ => {}
        }
        // Decide only on a complete picture (the reflector swaps a re-list in whole).
        if !verify_listed {
            continue;
        }
        if !verify_store
            .state()
            .iter()
            .any(|p| undecided(p, &node_prefix, &labelled))
        {
            continue;
        }
        // The node's kata-deploy version from a fresh (quorum) read, not from a watch: the
        // product creates a verification pod only after the new kata-deploy pod is Ready, and
        // a watch of kata-deploy pods could still show the old one — the test's rule for the
        // new version would then be missed (seen: a node meant to fail verification passed).
        let kd_pods: Vec<Arc<Pod>> = match kd_api
            .list(&ListParams::default().labels("name=kata-deploy"))
            .await
        {
            Ok(list) => list.items.into_iter().map(Arc::new).collect(),
            Err(e) => {
                // The next event (at the latest the watch's re-list once the API is back)
                // brings the undecided pods round again.
                eprintln!("klm-testkit: cannot list kata-deploy pods: {e}");
                continue;
            }
        };
        for pod in verify_store.state() {
            if !undecided(&pod, &node_prefix, &labelled) {
                continue;
            }
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let version = kata_deploy_version_on(&kd_pods, &node);
            let outcome = scenario
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .decide(&node, version.as_deref());
            let name = pod.metadata.name.clone().unwrap_or_default();
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            // Conditioned on the version this controller saw: a test that set the outcome
            // itself meanwhile (the watch lags) is not overwritten; the next event shows its label.
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": pod.metadata.resource_version,
                "labels": {OUTCOME_LABEL: outcome.label()},
            }});
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    labelled.insert(uid);
                    if let Outcome::SucceedAfter(after) = outcome {
                        finishers.spawn(finish_after(api.clone(), name.clone(), after));
                    }
                    scenario
                        .decisions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Decision {
                            pod: format!("{ns}/{name}"),
                            node,
                            version,
                            outcome,
                        });
                }
                // Deleted meanwhile: nothing to decide. Changed meanwhile: decided on the next
                // event, which carries the change.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => eprintln!("klm-testkit: cannot label verification pod {ns}/{name}: {e}"),
            }
        }
    }
}

/// A verification pod of this slice, scheduled, not deleting, whose outcome nobody chose yet
/// (`labelled`: pods we labelled whose update may not have reached the store).
fn undecided(pod: &Pod, node_prefix: &str, labelled: &HashSet<String>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| n.starts_with(node_prefix))
        && pod.metadata.deletion_timestamp.is_none()
        && !labelled.contains(pod.metadata.uid.as_deref().unwrap_or_default())
        && !pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(OUTCOME_LABEL))
}

/// Lets kwok finish a [`Outcome::SucceedAfter`] pod once `after` has passed. The API server may
/// be down just then (fault tests stop it): retry each second until it answers, for two minutes.
async fn finish_after(api: Api<Pod>, name: String, after: Duration) {
    tokio::time::sleep(after).await;
    let patch = serde_json::json!({"metadata": {"labels": {FINISH_LABEL: "true"}}});
    for _ in 0..120 {
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            // Deleted meanwhile (the product gave up on it, or cancelled): nothing to finish.
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            Err(kube::Error::Api(e)) => {
                eprintln!("klm-testkit: cannot finish verification pod {name}: {e}");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    eprintln!("klm-testkit: gave up finishing verification pod {name}: API server unreachable");
}
