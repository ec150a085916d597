//! Command line and environment (the chart sets the environment from its values).
use clap::{Args, Parser, Subcommand};
use klm_kube::cli::ProcessArgs;
use klm_protocol::duration::parse_timeout;
use klm_protocol::kata_deploy::RequestedMode;
use klm_protocol::keys::defaults;
use klm_protocol::params::Defaults;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "klm-coordinator",
    version,
    about = "Upgrades kata-deploy node by node (coordinator)",
    // A flag given twice takes its last value (the environment and wrappers can then be
    // overridden on the command line).
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator (leader-elected).
    Run(Box<RunArgs>),
    /// Show the current run: phase, progress, node table, failure evidence.
    Status(StatusArgs),
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Namespace of the trigger ConfigMap and the Leases.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long, env = "KLM_TRIGGER_CONFIGMAP", default_value = defaults::TRIGGER_CONFIGMAP)]
    pub trigger_configmap: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep refreshing as the run changes.
    #[arg(long)]
    pub watch: bool,
    /// Print the raw run record (JSON) instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Identity in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "klm-coordinator")]
    pub identity: String,
    #[arg(long, env = "KLM_LEASE_NAME", default_value = defaults::UPGRADE_LEASE)]
    pub lease_name: String,
    #[arg(long, env = "KLM_LEADER_LEASE_NAME", default_value = defaults::LEADER_LEASE)]
    pub leader_lease_name: String,
    #[arg(long, env = "KLM_LEASE_DURATION_SECONDS", default_value_t = defaults::LEASE_DURATION_SECONDS)]
    pub lease_duration_seconds: i32,
    /// How long an agent has to take its turn (or take the Lease back after letting go of it
    /// mid-turn) before its node counts as failed.
    #[arg(long, env = "KLM_TURN_START_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub turn_start_timeout: Duration,
    /// Once an agent holds the upgrade Lease, its node counts as lost this long after the Lease
    /// expired (measured from when the coordinator last saw it renewed).
    #[arg(long, env = "KLM_LEASE_EXPIRY_GRACE", default_value = "10s", value_parser = duration)]
    pub lease_expiry_grace: Duration,
    /// How many times a failed `helm rollback` is tried before the run ends asking a human.
    #[arg(long, env = "KLM_ROLLBACK_RETRY_ATTEMPTS", default_value_t = 5)]
    pub rollback_retry_attempts: u32,
    /// How long to wait for the DaemonSet controller to observe a new template.
    #[arg(long, env = "KLM_ROLLOUT_OBSERVE_TIMEOUT", default_value = "120s", value_parser = duration)]
    pub rollout_observe_timeout: Duration,
    /// `helm rollback --wait` timeout.
    #[arg(long, env = "KLM_ROLLBACK_TIMEOUT", default_value = "300s", value_parser = duration)]
    pub rollback_timeout: Duration,
    #[arg(long, env = "KLM_CHART_REF", default_value = defaults::CHART_REF)]
    pub chart_ref: String,
    /// `--repo` URL for classic chart repositories (empty for OCI references).
    #[arg(long, env = "KLM_CHART_REPO", default_value = "")]
    pub chart_repo: String,
    #[arg(long = "helm", env = "KLM_HELM_BIN", default_value = "helm")]
    pub helm_bin: String,
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub defaults: DefaultArgs,
    /// Prometheus base URL (http) for the alert gate, e.g. http://prometheus.monitoring:9090;
    /// empty: no alert gate.
    #[arg(long, env = "KLM_PROMETHEUS_URL", default_value = "")]
    pub prometheus_url: String,
    /// How often Prometheus's alerts are asked while a run with the alert gate is active (an
    /// HTTP API offers no watch).
    #[arg(long, env = "KLM_PROMETHEUS_POLL_INTERVAL", default_value = "30s", value_parser = duration)]
    pub prometheus_poll_interval: Duration,
}

/// The chart's `defaults.*` values.
#[derive(Debug, Args)]
pub struct DefaultArgs {
    #[arg(long, env = "KLM_DEFAULT_HELM_RELEASE", default_value = defaults::HELM_RELEASE)]
    pub default_helm_release: String,
    #[arg(long, env = "KLM_DEFAULT_HELM_NAMESPACE", default_value = defaults::HELM_NAMESPACE)]
    pub default_helm_namespace: String,
    #[arg(long, env = "KLM_DEFAULT_NODE_SELECTOR", default_value = "")]
    pub default_node_selector: String,
    #[arg(long, env = "KLM_DEFAULT_NODE_TAINT_KEY", default_value = "")]
    pub default_node_taint_key: String,
    #[arg(long, env = "KLM_DEFAULT_NODE_TAINT_VALUE", default_value = "")]
    pub default_node_taint_value: String,
    #[arg(long, env = "KLM_DEFAULT_VERIFICATION_NAMESPACE", default_value = defaults::VERIFICATION_NAMESPACE)]
    pub default_verification_namespace: String,
    /// File holding the default verification pod YAML (the chart mounts it).
    #[arg(long, env = "KLM_DEFAULT_VERIFICATION_POD_FILE")]
    pub default_verification_pod_file: Option<String>,
    #[arg(long, env = "KLM_DEFAULT_DRAIN_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub default_drain_enabled: bool,
    #[arg(long, env = "KLM_DEFAULT_DRAIN_TIMEOUT", default_value = "300s", value_parser = duration)]
    pub default_drain_timeout: Duration,
    /// Extra `key=value` values for every run's `helm upgrade`, separated by newlines or `;`
    /// (validated per run; the trigger annotation `helm-set-values` replaces them).
    #[arg(long, env = "KLM_DEFAULT_HELM_SET_VALUES", default_value = "")]
    pub default_helm_set_values: String,
    /// `auto` (follow the release's `deploymentMode`), `daemonset` or `job`.
    #[arg(long, env = "KLM_DEFAULT_DEPLOYMENT_MODE", default_value = "auto", value_parser = deployment_mode)]
    pub default_deployment_mode: RequestedMode,
    #[arg(long, env = "KLM_DEFAULT_VERIFICATION_TIMEOUT", default_value = "300s", value_parser = duration)]
    pub default_verification_timeout: Duration,
    /// When node turns may start, e.g. `Mon-Fri 22:00-06:00 Europe/Berlin` (validated per
    /// run; the trigger annotation `maintenance-window` replaces it). Empty: always.
    #[arg(long, env = "KLM_DEFAULT_MAINTENANCE_WINDOW", default_value = "")]
    pub default_maintenance_window: String,
    /// Label selector of pods that hold their node's turn (validated per run; the trigger
    /// annotation `blocking-pod-selector` replaces it). Empty: no pod gate.
    #[arg(long, env = "KLM_DEFAULT_BLOCKING_POD_SELECTOR", default_value = "")]
    pub default_blocking_pod_selector: String,
    /// Regex (whole name) of the firing Prometheus alerts that hold a run (with
    /// --prometheus-url); empty: no alert gate.
    #[arg(long, env = "KLM_PROMETHEUS_ALERT_FILTER", default_value = "")]
    pub prometheus_alert_filter: String,
    /// Waves: nodes in progress at once (1 = one by one; validated per run, 1 to 50).
    #[arg(long, env = "KLM_DEFAULT_BATCH_SIZE", default_value_t = 1)]
    pub default_batch_size: u32,
    /// Waves: with a batch size above 1, the first wave is one node.
    #[arg(long, env = "KLM_DEFAULT_CANARY", default_value_t = true, action = clap::ArgAction::Set)]
    pub default_canary: bool,
    /// ServiceAccounts a verification pod may name besides `default` (comma-separated).
    #[arg(
        long,
        env = "KLM_VERIFICATION_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub verification_service_accounts: Vec<String>,
}

fn deployment_mode(s: &str) -> Result<RequestedMode, String> {
    RequestedMode::parse(s)
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_timeout(s).map_err(|e| e.to_string())
}

impl DefaultArgs {
    /// Reads the verification pod file now; a missing file is reported per run, not at start,
    /// so a coordinator installed without one still reports *why* runs cannot start.
    pub fn load(&self, prometheus_url: &str) -> Defaults {
        let verification_pod = self
            .default_verification_pod_file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        Defaults {
            helm_release: self.default_helm_release.clone(),
            helm_namespace: self.default_helm_namespace.clone(),
            node_selector: self.default_node_selector.clone(),
            node_taint_key: self.default_node_taint_key.clone(),
            node_taint_value: self.default_node_taint_value.clone(),
            verification_namespace: self.default_verification_namespace.clone(),
            verification_pod,
            drain_enabled: self.default_drain_enabled,
            drain_timeout: self.default_drain_timeout,
            verification_timeout: self.default_verification_timeout,
            verification_service_accounts: self
                .verification_service_accounts
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            helm_set_values: self.default_helm_set_values.clone(),
            maintenance_window: self.default_maintenance_window.clone(),
            blocking_pod_selector: self.default_blocking_pod_selector.clone(),
            // The filter means nothing without a Prometheus to ask.
            alert_filter: if prometheus_url.trim().is_empty() {
                String::new()
            } else {
                self.prometheus_alert_filter.clone()
            },
            batch_size: self.default_batch_size,
            canary: self.default_canary,
            deployment_mode: self.default_deployment_mode,
        }
    }
}
