//! Every user-facing name: labels, annotations and object names. These are the public API of the
//! tool (users type them into kubectl), so they live in one place and never change casually.

/// Prefix of every trigger annotation (the reference's workflow parameter names follow it).
pub const TRIGGER_PREFIX: &str = "lifecycle.katacontainers.io/";

/// Trigger ConfigMap annotations (per-run parameters).
pub mod trigger {
    pub const TARGET_VERSION: &str = "lifecycle.katacontainers.io/target-version";
    pub const HELM_RELEASE: &str = "lifecycle.katacontainers.io/helm-release";
    pub const HELM_NAMESPACE: &str = "lifecycle.katacontainers.io/helm-namespace";
    pub const NODE_SELECTOR: &str = "lifecycle.katacontainers.io/node-selector";
    pub const NODE_TAINT_KEY: &str = "lifecycle.katacontainers.io/node-taint-key";
    pub const NODE_TAINT_VALUE: &str = "lifecycle.katacontainers.io/node-taint-value";
    pub const VERIFICATION_NAMESPACE: &str = "lifecycle.katacontainers.io/verification-namespace";
    pub const VERIFICATION_POD: &str = "lifecycle.katacontainers.io/verification-pod";
    pub const VERIFICATION_TIMEOUT: &str = "lifecycle.katacontainers.io/verification-timeout";
    pub const DRAIN_ENABLED: &str = "lifecycle.katacontainers.io/drain-enabled";
    pub const DRAIN_TIMEOUT: &str = "lifecycle.katacontainers.io/drain-timeout";
    /// Extra `key=value` values for the run's `helm upgrade`, separated by newlines or `;`,
    /// each passed as its own `--set` (see `helm_values`).
    pub const HELM_SET_VALUES: &str = "lifecycle.katacontainers.io/helm-set-values";
    /// When node turns may start, e.g. `Mon-Fri 22:00-06:00 Europe/Berlin` (see
    /// `maintenance_window`); empty: always.
    pub const MAINTENANCE_WINDOW: &str = "lifecycle.katacontainers.io/maintenance-window";
    /// Label selector of pods that hold a node's turn while one runs (or is pending) on that
    /// node (kured's `--blocking-pod-selector`).
    pub const BLOCKING_POD_SELECTOR: &str = "lifecycle.katacontainers.io/blocking-pod-selector";
    /// Waves: at most this many nodes in progress at once (1, the default, is one by one).
    pub const BATCH_SIZE: &str = "lifecycle.katacontainers.io/batch-size";
    /// Waves: with `batch-size` > 1, the first wave is one node (default `true`).
    pub const CANARY: &str = "lifecycle.katacontainers.io/canary";
    /// `auto` (follow the release's `deploymentMode`) | `daemonset` | `job`.
    pub const DEPLOYMENT_MODE: &str = "lifecycle.katacontainers.io/deployment-mode";
    /// Roll one node back by hand to the revision recorded before the run that upgraded it.
    pub const ROLLBACK_NODE: &str = "lifecycle.katacontainers.io/rollback-node";
    /// Steers a run: `cancel` stops granting turns (a node already mid-procedure finishes
    /// first) and rolls back what the run did, so the fleet ends on one version. The
    /// coordinator removes the annotation once it has acted on it.
    pub const ACTION: &str = "lifecycle.katacontainers.io/action";
    pub const ACTION_CANCEL: &str = "cancel";
    /// Stops granting turns once the nodes in progress finish; the run waits, visibly.
    pub const ACTION_PAUSE: &str = "pause";
    /// Continues a paused run from where it stopped.
    pub const ACTION_RESUME: &str = "resume";

    /// The annotations that define a run; a change to any of them is a new run request.
    pub const RUN_DEFINING: [&str; 17] = [
        TARGET_VERSION,
        HELM_RELEASE,
        HELM_NAMESPACE,
        NODE_SELECTOR,
        NODE_TAINT_KEY,
        NODE_TAINT_VALUE,
        VERIFICATION_NAMESPACE,
        VERIFICATION_POD,
        VERIFICATION_TIMEOUT,
        DRAIN_ENABLED,
        DRAIN_TIMEOUT,
        HELM_SET_VALUES,
        MAINTENANCE_WINDOW,
        BLOCKING_POD_SELECTOR,
        BATCH_SIZE,
        CANARY,
        DEPLOYMENT_MODE,
    ];
}

/// Keys the coordinator writes into the trigger ConfigMap's `data`, so one
/// `kubectl get configmap kata-lifecycle-manager -o yaml` shows the run.
pub mod status_data {
    /// The full machine-readable run record (JSON). Agents read their turn from it.
    pub const RUN: &str = "run.json";
    pub const PHASE: &str = "phase";
    pub const TARGET_VERSION: &str = "targetVersion";
    pub const PROGRESS: &str = "progress";
    pub const CURRENT_NODE: &str = "currentNode";
    pub const MESSAGE: &str = "message";
    /// Fingerprint of the last trigger the coordinator acted on (started or ignored).
    pub const OBSERVED_TRIGGER: &str = "observedTrigger";
    /// The last `rollback-node` value acted on.
    pub const OBSERVED_ROLLBACK: &str = "observedRollbackNode";
    /// The last request the coordinator refused outside a run, or why it paused.
    pub const NOTICE: &str = "notice";
}

/// Labels and annotations on Nodes.
pub mod node {
    /// Written as a label AND an annotation so `kubectl get nodes -L` shows it.
    pub const STATUS: &str = "katacontainers.io/kata-lifecycle-manager-status";
    /// Written as a label AND an annotation on success (and on rollback, the restored version).
    pub const CURRENT_VERSION: &str = "katacontainers.io/kata-current-version";
    /// Default opt-in label (selector `katacontainers.io/kata-lifecycle-manager-window=true`).
    pub const WINDOW_LABEL: &str = "katacontainers.io/kata-lifecycle-manager-window";
    pub const DEFAULT_SELECTOR: &str = "katacontainers.io/kata-lifecycle-manager-window=true";
    /// Set by kata-deploy: "false" while installing, "true" when done.
    pub const KATA_RUNTIME_LABEL: &str = "katacontainers.io/kata-runtime";

    /// The run the node's status belongs to (so a restarted agent resumes the right run).
    pub const RUN_ID: &str = "lifecycle.katacontainers.io/run";
    /// Which turn of the run the status belongs to (`upgrade` or `restore`).
    pub const TURN: &str = "lifecycle.katacontainers.io/turn";
    /// Present only when WE cordoned the node; we never uncordon a node without it.
    pub const CORDONED_BY: &str = "lifecycle.katacontainers.io/cordoned-by";
    /// Name of the verification pod in flight, so a restarted agent adopts it.
    pub const VERIFICATION_POD: &str = "lifecycle.katacontainers.io/verification-pod";
    /// JSON evidence of the last step outcome on this node.
    pub const EVIDENCE: &str = "lifecycle.katacontainers.io/evidence";
    /// RFC 3339 time the current step (status) started, so a resumed step keeps its deadline.
    pub const STEP_STARTED_AT: &str = "lifecycle.katacontainers.io/step-started-at";
    /// RFC 3339 time the node's turn started (for durations that survive restarts).
    pub const STARTED_AT: &str = "lifecycle.katacontainers.io/started-at";
    /// The agent's request that the coordinator drain its node: `<turn>/<run id>`
    /// (`drain_request`). The agent holds no eviction right; the coordinator checks the request
    /// against the run record before it evicts anything.
    pub const DRAIN_REQUEST: &str = "lifecycle.katacontainers.io/drain-request";
    /// The coordinator's report on that drain (JSON `drain_request::DrainResult`).
    pub const DRAIN_RESULT: &str = "lifecycle.katacontainers.io/drain-result";
    /// The node's turn, written by the coordinator only (JSON `grant::Grant`): its agent learns
    /// about its turn from its own Node, not from a record every agent receives.
    pub const GRANT: &str = "lifecycle.katacontainers.io/grant";
    /// Value of CORDONED_BY.
    pub const CORDON_OWNER: &str = "kata-lifecycle-manager";
}

/// Labels on the verification pods we create.
pub mod verification {
    pub const RUN_LABEL: &str = "lifecycle.katacontainers.io/run";
    pub const NODE_LABEL: &str = "lifecycle.katacontainers.io/node";
    pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY: &str = "kata-lifecycle-manager";
}

/// kata-deploy facts.
pub mod kata_deploy {
    pub const POD_SELECTOR: &str = "name=kata-deploy";
    pub const DAEMONSET: &str = "kata-deploy";
    pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";
}

/// Default object names (the chart's defaults for release `kata-lifecycle-manager`).
pub mod defaults {
    pub const TRIGGER_CONFIGMAP: &str = "kata-lifecycle-manager";
    pub const UPGRADE_LEASE: &str = "kata-lifecycle-manager-upgrade";
    pub const LEADER_LEASE: &str = "kata-lifecycle-manager-coordinator";
    pub const LEASE_DURATION_SECONDS: i32 = 30;
    pub const CHART_REF: &str = "oci://ghcr.io/kata-containers/kata-deploy-charts/kata-deploy";
    pub const HELM_RELEASE: &str = "kata-deploy";
    pub const HELM_NAMESPACE: &str = "kube-system";
    pub const VERIFICATION_NAMESPACE: &str = "default";
    pub const DRAIN_TIMEOUT_SECONDS: u64 = 300;
    pub const VERIFICATION_TIMEOUT_SECONDS: u64 = 300;
    /// Component name used as the Event reporting controller.
    pub const EVENT_REPORTER: &str = "kata-lifecycle-manager";
}
