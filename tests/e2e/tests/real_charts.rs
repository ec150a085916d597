//! The product on the **upstream** kata-deploy charts (`../shared/kata-deploy-charts`, packaged
//! unmodified, served by a loopback chart repository): for each upgrade path users take, the
//! coordinator and one agent per node upgrade a node and, when the next node's verification
//! fails, restore both to the recorded chart — with the safety monitor on. kata-deploy's
//! cluster-scoped objects (its ClusterRole, RuntimeClasses) belong to one release at a time, so
//! the paths run one after another in this binary's single test.
mod product;

use anyhow::{Context, Result};
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase};
use klm_testkit::{Outcome, SLICE_LABEL};
use product::{Product, RELEASE};
use std::path::PathBuf;
use tokio::io::AsyncBufReadExt;

/// `python3 -m http.server` on a free loopback port over the upstream charts; dropped with
/// the test. Returns its URL.
async fn serve_upstream_charts() -> Result<(tokio::process::Child, String)> {
    let dir: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "..",
        "..",
        "shared",
        "kata-deploy-charts",
    ]
    .iter()
    .collect();
    anyhow::ensure!(
        dir.join("index.yaml").exists(),
        "the upstream kata-deploy charts are expected in {}",
        dir.display()
    );
    let mut child = tokio::process::Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start python3 -m http.server")?;
    let stdout = child.stdout.take().context("stdout")?;
    // "Serving HTTP on 127.0.0.1 port 41235 (http://127.0.0.1:41235/) ..."
    let line = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .context("http.server printed nothing")?;
    let port = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .context("no port in the http.server banner")?
        .to_string();
    Ok((child, format!("http://127.0.0.1:{port}")))
}

/// Replaces the slice's fixture release by the upstream chart at `version`.
async fn install_upstream(p: &Product, repo: &str, version: &str) -> Result<()> {
    let ns = p.slice.kata_deploy_namespace();
    p.slice
        .helm(&[
            "uninstall",
            RELEASE,
            "-n",
            &ns,
            "--ignore-not-found",
            "--no-hooks",
            "--wait",
        ])
        .await?;
    let on_slice = format!(r#"nodeSelector={{"{SLICE_LABEL}":"{}"}}"#, p.slice.id());
    p.slice
        .helm(&[
            "install",
            RELEASE,
            "kata-deploy",
            "--repo",
            repo,
            "--version",
            version,
            "-n",
            &ns,
            "--set-json",
            &on_slice,
            "--wait",
            "--timeout",
            "5m",
        ])
        .await?;
    p.slice.wait_kata_deploy(version).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_charts_upgrade_and_roll_back_node_by_node() -> Result<()> {
    let (_server, repo) = serve_upstream_charts().await?;
    let p = Product::start_with("upstream", 2, "3.27.0", &["--chart-repo", &repo]).await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let nodes = [p.node("node-1"), p.node("node-2")];
    for (from, to) in [
        ("3.27.0", "3.29.0"),
        ("3.29.0", "3.31.0"),
        ("3.31.0", "4.0.0"),
        ("4.0.0", "4.1.0"),
    ] {
        let path = format!("{from} -> {to}");
        install_upstream(&p, &repo, from)
            .await
            .with_context(|| path.clone())?;
        p.slice
            .set_verification_outcome("node-2", to, Outcome::Fail);
        let run = p.run(to, &[(trigger::DRAIN_ENABLED, "false")]).await?;
        assert_eq!(run.phase, RunPhase::Failed, "{path}: {run:#?}");
        assert_eq!(
            run.failure.as_ref().and_then(|f| f.node.as_deref()),
            Some(nodes[1].as_str()),
            "{path}"
        );
        // node-1 was upgraded to `to` and verified before node-2 failed; both are restored.
        assert_eq!(
            run.nodes[&nodes[0]].evidence.as_ref().map(|e| e.succeeded),
            Some(true),
            "{path}: node-1's verification at {to}"
        );
        for n in &nodes {
            assert_eq!(
                run.nodes[n].status,
                Some(NodeStatus::RolledBack),
                "{path}: {n}"
            );
        }
        let (_, version, status) = p.release().await?;
        assert_eq!(
            (version.as_str(), status.as_str()),
            (from, "deployed"),
            "{path}"
        );
        p.slice
            .wait_kata_deploy(from)
            .await
            .with_context(|| path.clone())?;
        p.assert_safe(&nodes).await.with_context(|| path.clone())?;
        // Off the trigger, so the next path's run is a new request even for the same version.
        p.annotate(&[(trigger::TARGET_VERSION, None)]).await?;
    }
    Ok(())
}
