//! Command-line flags, each with an environment variable (the chart sets the variables; tests
//! and humans may use either).
use clap::Parser;
use klm_kube::logging::LogFormat;
use klm_protocol::duration::parse_duration;
use klm_protocol::keys::defaults;
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "klm-agent",
    version,
    about = "kata-lifecycle-manager agent: upgrades, verifies and restores kata-deploy on its own node, one node at a time"
)]
pub struct Config {
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// This process's instance, the second half of its upgrade Lease identity
    /// `<node>/<instance>`. The DaemonSet passes the pod's uid, so a container restarted in
    /// the same pod resumes its hold at once; unset, every process draws a random id.
    #[arg(long, env = "POD_UID")]
    pub instance_id: Option<String>,

    /// Namespace of the upgrade Lease (the chart's release namespace). The agent reads no
    /// ConfigMap: its turn is the grant on its own Node.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,

    /// The upgrade Lease (created by the coordinator).
    #[arg(long, env = "KLM_LEASE_NAME", default_value = defaults::UPGRADE_LEASE)]
    pub lease_name: String,

    /// Address for /healthz and /readyz; empty disables the endpoint.
    #[arg(long, env = "KLM_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: String,

    /// Log format: json (clusters) or text (humans).
    #[arg(long, env = "KLM_LOG_FORMAT", default_value = "json", value_parser = parse_log_format)]
    pub log_format: LogFormat,

    /// How long the restarted kata-deploy pod on this node may take to be Ready at the wanted
    /// revision (e.g. 300s, 5m).
    #[arg(long, env = "KLM_POD_READY_TIMEOUT", default_value = "300s", value_parser = parse_timeout)]
    pub pod_ready_timeout: Duration,
}

impl Config {
    /// The upgrade Lease holder identity of this process: `<node>/<instance>`.
    pub fn identity(&self) -> String {
        let instance = match self.instance_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => random_instance(),
        };
        klm_protocol::lease::agent_identity(&self.node_name, &instance)
    }
}

/// A random instance id (16 hex digits) for a process started without `POD_UID`.
fn random_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::try_parse_from(["klm-agent", "--node-name", "n1", "--namespace", "klm"])
            .unwrap();
        assert_eq!(c.lease_name, "kata-lifecycle-manager-upgrade");
        assert_eq!(c.health_addr, "0.0.0.0:8080");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.pod_ready_timeout, Duration::from_secs(300));
        // Without POD_UID every process draws its own instance id.
        let (a, b) = (c.identity(), c.identity());
        assert!(a.starts_with("n1/") && a.len() == "n1/".len() + 16, "{a}");
        assert_ne!(a, b);

        let c = Config::try_parse_from([
            "klm-agent",
            "--node-name=n1",
            "--namespace=klm",
            "--health-addr=",
            "--log-format=text",
            "--pod-ready-timeout=90s",
            "--instance-id=0f1e-uid",
        ])
        .unwrap();
        assert_eq!(c.identity(), "n1/0f1e-uid");
        assert_eq!(c.health_addr, "");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.pod_ready_timeout, Duration::from_secs(90));
        assert!(
            Config::try_parse_from([
                "klm-agent",
                "--node-name=n1",
                "--namespace=k",
                "--log-format=xml"
            ])
            .is_err()
        );
    }
}
