//! The **upstream** kata-deploy charts (`../shared/kata-deploy-charts` next to the checkout:
//! 3.26.0 … 4.1.0, packaged unmodified) served as a classic chart repository on loopback, for
//! tests and the demo that upgrade what users run rather than the fixture chart.
use anyhow::{Context, Result, ensure};
use std::path::PathBuf;
use tokio::io::AsyncBufReadExt;

/// The upgrade paths users take, in order (each a supported step of the compatibility table).
pub const UPGRADE_PATHS: [(&str, &str); 4] = [
    ("3.27.0", "3.29.0"),
    ("3.29.0", "3.31.0"),
    ("3.31.0", "4.0.0"),
    ("4.0.0", "4.1.0"),
];

/// Where the upstream charts are: `KLM_UPSTREAM_CHARTS`, else `<workspace>/../shared/kata-deploy-charts`.
pub fn charts_dir() -> PathBuf {
    std::env::var_os("KLM_UPSTREAM_CHARTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::paths::workspace_root()
                .join("..")
                .join("shared")
                .join("kata-deploy-charts")
        })
}

/// A loopback chart repository over [`charts_dir`]; it stops when dropped.
pub struct UpstreamRepo {
    _server: tokio::process::Child,
    url: String,
}

impl UpstreamRepo {
    /// Serves the charts with `python3 -m http.server` on a port the kernel picks (read back
    /// from its banner, so no port is guessed).
    pub async fn serve() -> Result<UpstreamRepo> {
        UpstreamRepo::serve_on("127.0.0.1").await
    }

    /// Like [`UpstreamRepo::serve`], on `host`: the real node's pods reach this host at its
    /// bridge address, not at loopback ([`crate::RealNode::host_address`]).
    pub async fn serve_on(host: &str) -> Result<UpstreamRepo> {
        let dir = charts_dir();
        ensure!(
            dir.join("index.yaml").exists(),
            "the upstream kata-deploy charts are expected in {} (set KLM_UPSTREAM_CHARTS)",
            dir.display()
        );
        let mut server = tokio::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                host,
                "--directory",
            ])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start python3 -m http.server")?;
        let stdout = server.stdout.take().context("http.server stdout")?;
        // "Serving HTTP on 127.0.0.1 port 41235 (http://127.0.0.1:41235/) ..."
        let banner = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await?
            .context("http.server printed nothing")?;
        let port = banner
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .with_context(|| format!("no port in the http.server banner {banner:?}"))?
            .to_string();
        Ok(UpstreamRepo {
            _server: server,
            url: format!("http://{host}:{port}"),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}
