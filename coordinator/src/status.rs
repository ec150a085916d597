//! `klm-coordinator status`: the run at a glance, for any cluster (`--watch` follows it).
use crate::config::StatusArgs;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_kube::time::now_ms;
use klm_protocol::RunRecord;
use klm_protocol::keys::{node as node_keys, status_data};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

pub async fn show(args: StatusArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &args.common.namespace);
    let nodes: Api<Node> = Api::all(client);
    let name = args.common.trigger_configmap.clone();
    if !args.watch {
        let cm = cms.get(&name).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot read ConfigMap {}/{name}: {e}",
                args.common.namespace
            )
        })?;
        return print_once(&cm, &nodes, args.json).await;
    }
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(cms, cfg).default_backoff().applied_objects());
    // Follow runs as they happen: a run already finished when we start does not end the watch
    // (the user is usually about to trigger one); we stop once a run we saw in progress ends.
    let mut seen_in_progress: Option<String> = None;
    while let Some(cm) = stream.next().await {
        let cm = cm?;
        print!("\x1b[2J\x1b[H");
        print_once(&cm, &nodes, args.json).await?;
        if let Some(run) = read_run(&cm) {
            if !run.phase.is_finished() {
                seen_in_progress = Some(run.id.clone());
            } else if seen_in_progress.as_deref() == Some(run.id.as_str()) {
                break;
            }
        }
    }
    Ok(())
}

fn read_run(cm: &ConfigMap) -> Option<RunRecord> {
    cm.data
        .as_ref()?
        .get(status_data::RUN)
        .and_then(|s| RunRecord::from_json(s).ok())
}

async fn print_once(cm: &ConfigMap, nodes: &Api<Node>, json: bool) -> anyhow::Result<()> {
    let Some(run) = read_run(cm) else {
        println!(
            "no run yet: trigger one with\n  kubectl annotate configmap {} -n {} lifecycle.katacontainers.io/target-version=<version> --overwrite",
            cm.metadata
                .name
                .as_deref()
                .unwrap_or("kata-lifecycle-manager"),
            cm.metadata.namespace.as_deref().unwrap_or("<ns>")
        );
        return Ok(());
    };
    if json {
        println!("{}", run.to_json());
        return Ok(());
    }
    print!(
        "{}",
        render(&run, &live_versions(nodes, &run).await, now_ms())
    );
    Ok(())
}

/// Status and version labels of the planned nodes, from one list of the Nodes.
async fn live_versions(
    nodes: &Api<Node>,
    run: &RunRecord,
) -> Vec<(String, Option<String>, Option<String>)> {
    let listed = nodes
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    run.plan
        .iter()
        .map(|n| {
            let labels = listed
                .iter()
                .find(|x| x.metadata.name.as_deref() == Some(n.as_str()))
                .and_then(|x| x.metadata.labels.as_ref());
            let label = |k: &str| labels.and_then(|l| l.get(k).cloned());
            (
                n.clone(),
                label(node_keys::STATUS),
                label(node_keys::CURRENT_VERSION),
            )
        })
        .collect()
}

/// The table users read. Pure, so it is unit-tested.
pub fn render(
    run: &RunRecord,
    live: &[(String, Option<String>, Option<String>)],
    now: i64,
) -> String {
    let mut s = String::new();
    s.push_str(&format!("run:      {} ({:?})\n", run.id, run.kind));
    s.push_str(&format!("phase:    {}\n", run.phase));
    s.push_str(&format!("target:   {}\n", run.target_version));
    s.push_str(&format!("progress: {}\n", run.progress()));
    if let Some(t) = &run.turn {
        s.push_str(&format!("current:  {} ({})\n", t.node, t.kind.as_str()));
    }
    s.push_str(&format!("message:  {}\n", run.message));
    for w in &run.warnings {
        s.push_str(&format!("warning:  {w}\n"));
    }
    s.push_str(&format!(
        "\n{:<28} {:<14} {:<12} {:>9}  {}\n",
        "NODE", "STATUS", "VERSION", "ELAPSED", "NOTE"
    ));
    for (name, status, version) in live {
        let report = run.nodes.get(name);
        let elapsed = report
            .and_then(|r| {
                r.started_at_ms
                    .map(|st| r.finished_at_ms.unwrap_or(now) - st)
            })
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let note = report
            .and_then(|r| {
                r.note.clone().or_else(|| {
                    r.evidence
                        .as_ref()
                        .and_then(|e| e.failure.as_ref())
                        .map(|f| format!("{}: {}", f.reason, f.message))
                })
            })
            .unwrap_or_default();
        s.push_str(&format!(
            "{:<28} {:<14} {:<12} {:>9}  {}\n",
            name,
            status.as_deref().unwrap_or("-"),
            version.as_deref().unwrap_or("-"),
            elapsed,
            note
        ));
    }
    if let Some(f) = &run.failure {
        s.push_str(&format!(
            "\nfailure: {} — {}\n",
            f.node.as_deref().unwrap_or("(release)"),
            f.reason
        ));
        if let Some(e) = &f.evidence {
            if let Some(pod) = &e.pod {
                s.push_str(&format!(
                    "  pod:       {pod} (phase {})\n",
                    e.phase.as_deref().unwrap_or("?")
                ));
            }
            if let Some(code) = e.failure.as_ref().and_then(|f| f.exit_code) {
                s.push_str(&format!("  exit code: {code}\n"));
            }
            if let Some(ms) = e.verification_ms {
                s.push_str(&format!("  verified for {:.1}s\n", ms as f64 / 1000.0));
            }
            if let Some(tail) = &e.log_tail {
                s.push_str("  log tail:\n");
                for line in tail.lines() {
                    s.push_str(&format!("    {line}\n"));
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use klm_protocol::run::NodeReport;
    use klm_protocol::{NodeStatus, RunPhase};

    #[test]
    fn renders_progress_table_and_failure() {
        let mut r = RunRecord::new("3-28-0-x".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = RunPhase::Failed;
        r.plan = vec!["n1".into(), "n2".into()];
        r.nodes.insert(
            "n1".into(),
            NodeReport {
                status: Some(NodeStatus::Completed),
                started_at_ms: Some(0),
                finished_at_ms: Some(1500),
                ..Default::default()
            },
        );
        r.failure = Some(klm_protocol::run::RunFailure {
            node: Some("n2".into()),
            reason: "NonZeroExit at verifying: exit 1".into(),
            evidence: None,
        });
        let live = vec![
            (
                "n1".to_string(),
                Some("rolled-back".to_string()),
                Some("3.27.0".to_string()),
            ),
            ("n2".to_string(), Some("rolled-back".to_string()), None),
        ];
        let out = render(&r, &live, 10_000);
        assert!(out.contains("progress: 1/2"), "{out}");
        assert!(
            out.contains("n1") && out.contains("1.5s") && out.contains("3.27.0"),
            "{out}"
        );
        assert!(out.contains("failure: n2 — NonZeroExit"), "{out}");
    }
}
