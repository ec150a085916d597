//! Command-line arguments both binaries share (flatten them with `#[command(flatten)]`).
use crate::logging::LogFormat;
use clap::Args;

/// How a long-running binary reports: its health endpoint and its log format.
#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Address for /healthz and /readyz; empty disables the endpoint.
    #[arg(long, env = "KLM_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: String,
    /// Log format: json (clusters) or text (humans).
    #[arg(long, env = "KLM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        process: ProcessArgs,
    }

    #[test]
    fn formats_are_a_closed_set() {
        let c = Cli::try_parse_from(["x", "--log-format", "text"]).unwrap();
        assert_eq!(c.process.log_format, LogFormat::Text);
        let e = Cli::try_parse_from(["x", "--log-format", "yaml"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("json") && e.contains("text"), "{e}");
    }
}
