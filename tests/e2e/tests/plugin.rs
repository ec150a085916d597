//! The kubectl plugin (`kubectl-kata_lifecycle`) as a user runs it: a child process with the
//! slice's KUBECONFIG, driving the real coordinator and agents through the trigger ConfigMap.
mod product;

use k8s_openapi::api::core::v1::ConfigMap;
use klm_protocol::keys::trigger;
use klm_protocol::{NodeStatus, RunPhase, RunRecord};
use klm_testkit::Outcome;
use product::Product;
use std::process::Output;

/// Runs the plugin against the product's namespace and returns what it printed.
async fn plugin(p: &Product, args: &[&str]) -> anyhow::Result<Output> {
    let bin = klm_testkit::paths::binary("kubectl-kata_lifecycle")?;
    let ns = p.slice.namespace();
    let out = tokio::process::Command::new(bin)
        .args(args)
        .args(["-n", &ns])
        .envs(p.slice.env())
        .output()
        .await?;
    Ok(out)
}

/// Runs the plugin and requires it to succeed; returns its stdout.
async fn plugin_ok(p: &Product, args: &[&str]) -> anyhow::Result<String> {
    let out = plugin(p, args).await?;
    anyhow::ensure!(
        out.status.success(),
        "plugin {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

async fn annotations(p: &Product) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let cm: ConfigMap = kube::Api::namespaced(p.slice.client(), &p.slice.namespace())
        .get(product::CM)
        .await?;
    Ok(cm.metadata.annotations.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_drives_a_full_run_and_shows_it() -> anyhow::Result<()> {
    let p = Product::start("plugin-run", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;

    // Bad input is refused locally, naming what is wrong, and writes nothing.
    let bad = plugin(&p, &["upgrade", "v3.28", "--drain-timeout", "5m"]).await?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("bad target version"), "{stderr}");
    let bad = plugin(&p, &["upgrade", "3.28.0", "--drain-timeout", "soon"]).await?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains(trigger::DRAIN_TIMEOUT), "{stderr}");
    assert_eq!(annotations(&p).await?, Default::default());

    let before = p.current_run().await?.map(|r| r.id);
    plugin_ok(&p, &["upgrade", "3.28.0", "--verification-timeout", "45s"]).await?;
    let ann = annotations(&p).await?;
    assert_eq!(
        ann.get(trigger::TARGET_VERSION).map(String::as_str),
        Some("3.28.0")
    );
    assert_eq!(
        ann.get(trigger::VERIFICATION_TIMEOUT).map(String::as_str),
        Some("45s")
    );
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());
    assert_eq!(run.progress(), "2/2");
    assert_eq!(
        run.params.as_ref().map(|p| p.verification_timeout_seconds),
        Some(45),
        "the parameter went in with the target"
    );
    for n in ["node-1", "node-2"] {
        assert_eq!(
            p.node_labels(n).await?,
            (Some("completed".into()), Some("3.28.0".into())),
            "{n}"
        );
    }

    // `status --json` prints the run record the coordinator wrote.
    let json = plugin_ok(&p, &["status", "--json"]).await?;
    let shown = RunRecord::from_json(&json)?;
    assert_eq!(shown, run);
    // The table shows the progress bar and per-node elapsed times.
    let table = plugin_ok(&p, &["status"]).await?;
    assert!(table.contains("[####################] 2/2"), "{table}");
    assert!(table.contains(&p.node("node-1")), "{table}");
    assert!(
        !table.contains("(running)"),
        "a finished run's time is fixed: {table}"
    );

    // The same request again is a new run (the plugin removes target-version first and waits
    // until the coordinator has seen that): the fleet is already there, so it succeeds at once.
    let out = plugin_ok(&p, &["upgrade", "3.28.0", "--verification-timeout", "45s"]).await?;
    assert!(out.contains("removed target-version first"), "{out}");
    let again = p.wait_finished_after(Some(run.id.clone())).await?;
    assert_eq!(again.phase, RunPhase::Succeeded, "{again:#?}");
    assert_ne!(again.id, run.id);
    p.assert_safe(&run.plan).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_cancels_a_run() -> anyhow::Result<()> {
    let p = Product::start("plugin-cancel", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    // node-1's verification pod never starts, so the run is mid-node when we cancel.
    p.slice
        .set_verification_outcome("node-1", "3.29.0", Outcome::Pending);
    let before = p.current_run().await?.map(|r| r.id);
    plugin_ok(&p, &["upgrade", "3.29.0"]).await?;
    let n1 = p.node("node-1");
    p.wait_node_status(&n1, NodeStatus::Verifying).await?;

    // A second trigger while the run is active is refused by the plugin and changes nothing.
    let busy = plugin(&p, &["upgrade", "3.28.0"]).await?;
    assert!(!busy.status.success());
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(stderr.contains("still"), "{stderr}");
    assert_eq!(
        annotations(&p)
            .await?
            .get(trigger::TARGET_VERSION)
            .map(String::as_str),
        Some("3.29.0")
    );

    plugin_ok(&p, &["cancel"]).await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Cancelled, "{run:#?}\n{}", p.logs());
    assert_eq!(
        p.node_labels("node-1").await?,
        (Some("rolled-back".into()), Some("3.27.0".into()))
    );
    assert_eq!(p.node_labels("node-2").await?, (None, None));
    assert_eq!(p.release().await?.1, "3.27.0");
    let json = plugin_ok(&p, &["status", "--json"]).await?;
    assert_eq!(RunRecord::from_json(&json)?.phase, RunPhase::Cancelled);
    p.assert_safe(&run.plan).await?;
    Ok(())
}
