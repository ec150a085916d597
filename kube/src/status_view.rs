//! The run at a glance, for any cluster: the view behind `klm-coordinator status` and
//! `kubectl kata-lifecycle status` (`watch` follows it as it changes). Reads the trigger
//! ConfigMap's run record (a bounded summary) and, for the per-node detail, the planned Nodes:
//! their status and version labels and the evidence their agents wrote there; `render` is pure
//! and unit-tested.
use crate::time::now_ms;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_protocol::RunRecord;
use klm_protocol::keys::{node as node_keys, status_data};
use klm_protocol::node_record::NodeRecord;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::BTreeMap;

/// Where the run lives and how to show it.
#[derive(Debug, Clone)]
pub struct ViewArgs {
    /// Namespace of the trigger ConfigMap.
    pub namespace: String,
    /// Name of the trigger ConfigMap.
    pub configmap: String,
    /// Keep redrawing as the run changes; return once a run seen in progress has finished.
    pub watch: bool,
    /// Print the raw run record (JSON) instead of the table.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cannot read ConfigMap {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("watching ConfigMap {namespace}/{name} failed: {source}")]
    Watch {
        namespace: String,
        name: String,
        source: kube::runtime::watcher::Error,
    },
}

/// Prints the run once, or (with `watch`) on every change until a run seen in progress ends.
pub async fn show(client: kube::Client, args: &ViewArgs) -> Result<(), ViewError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let nodes: Api<Node> = Api::all(client);
    let name = args.configmap.clone();
    if !args.watch {
        let cm = cms.get(&name).await.map_err(|source| ViewError::Read {
            namespace: args.namespace.clone(),
            name: name.clone(),
            source,
        })?;
        print_once(&cm, &nodes, args.json).await;
        return Ok(());
    }
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(cms, cfg).default_backoff().applied_objects());
    // Follow runs as they happen: a run already finished when we start does not end the watch
    // (the user is usually about to trigger one); we stop once a run we saw in progress ends.
    let mut seen_in_progress: Option<String> = None;
    while let Some(cm) = stream.next().await {
        let cm = cm.map_err(|source| ViewError::Watch {
            namespace: args.namespace.clone(),
            name: name.clone(),
            source,
        })?;
        if !args.json {
            // Redraw in place; JSON output stays a plain stream of records for scripts.
            print!("\x1b[2J\x1b[H");
        }
        print_once(&cm, &nodes, args.json).await;
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

async fn print_once(cm: &ConfigMap, nodes: &Api<Node>, json: bool) {
    let Some(run) = read_run(cm) else {
        println!(
            "no run yet: trigger one with\n  kubectl annotate configmap {} -n {} lifecycle.katacontainers.io/target-version=<version> --overwrite",
            cm.metadata
                .name
                .as_deref()
                .unwrap_or("kata-lifecycle-manager"),
            cm.metadata.namespace.as_deref().unwrap_or("<ns>")
        );
        return;
    };
    if json {
        println!("{}", run.to_json());
        return;
    }
    print!("{}", render(&run, &live_nodes(nodes, &run).await, now_ms()));
    // The last request the coordinator refused outside a run (e.g. a rollback-node it cannot do).
    if let Some(notice) = cm
        .data
        .as_ref()
        .and_then(|d| d.get(status_data::NOTICE))
        .filter(|n| !n.is_empty())
    {
        println!("\nnotice:   {notice}");
    }
}

/// One planned node as its Node shows it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveNode {
    pub name: String,
    /// The status label.
    pub status: Option<String>,
    /// The kata-current-version label.
    pub version: Option<String>,
    /// The failure its agent recorded in its evidence on the Node during this run.
    pub failure: Option<String>,
}

/// The planned nodes as their Nodes show them, from one list of the Nodes.
async fn live_nodes(nodes: &Api<Node>, run: &RunRecord) -> Vec<LiveNode> {
    let listed: BTreeMap<String, Node> = nodes
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, n)))
        .collect();
    run.plan
        .iter()
        .map(|n| {
            let node = listed.get(n);
            let labels = node.and_then(|x| x.metadata.labels.as_ref());
            let label = |k: &str| labels.and_then(|l| l.get(k).cloned());
            let failure = node
                .and_then(|x| NodeRecord::of(x).evidence)
                .filter(|e| e.run_id == run.id)
                .and_then(|e| e.failure)
                .map(|f| format!("{}: {}", f.reason, f.message));
            LiveNode {
                name: n.clone(),
                status: label(node_keys::STATUS),
                version: label(node_keys::CURRENT_VERSION),
                failure,
            }
        })
        .collect()
}

/// The table users read. Pure, so it is unit-tested.
pub fn render(run: &RunRecord, live: &[LiveNode], now: i64) -> String {
    let mut s = String::new();
    s.push_str(&format!("run:      {} ({:?})\n", run.id, run.kind));
    s.push_str(&format!("phase:    {}\n", run.phase));
    s.push_str(&format!("target:   {}\n", run.target_version));
    s.push_str(&format!(
        "progress: {} {}\n",
        progress_bar(run.completed(), run.plan.len(), BAR_WIDTH),
        run.progress()
    ));
    s.push_str(&format!(
        "elapsed:  {}{}\n",
        elapsed(run.started_at_ms, run.finished_at_ms, now),
        if run.finished_at_ms.is_some() {
            ""
        } else {
            " (running)"
        }
    ));
    let turns = run.turns();
    match turns.as_slice() {
        [] => {}
        [t] if run.wave_size() == 1 => {
            s.push_str(&format!("current:  {} ({})\n", t.node, t.kind.as_str()));
        }
        // Waves: every node in progress, and how many the run allows at once.
        turns => s.push_str(&format!(
            "current:  {} (wave {} of at most {})\n",
            turns
                .iter()
                .map(|t| format!("{} ({})", t.node, t.kind.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            turns.len(),
            run.wave_size()
        )),
    }
    if let Some(h) = run.hold.as_ref().filter(|_| run.finished_at_ms.is_none()) {
        s.push_str(&format!("held:     {}\n", hold_line(h)));
    }
    s.push_str(&format!("message:  {}\n", run.message));
    for w in &run.warnings {
        s.push_str(&format!("warning:  {w}\n"));
    }
    s.push_str(&format!(
        "\n{:<28} {:<14} {:<12} {:>9}  {}\n",
        "NODE", "STATUS", "VERSION", "ELAPSED", "NOTE"
    ));
    for LiveNode {
        name,
        status,
        version,
        failure,
    } in live
    {
        let report = run.nodes.get(name);
        let elapsed = report
            .and_then(|r| r.started_at_ms.map(|st| elapsed(st, r.finished_at_ms, now)))
            .unwrap_or_else(|| "-".into());
        // The coordinator's note on the node, else the failure its agent recorded on the Node.
        let note = report
            .and_then(|r| r.note.clone())
            .or_else(|| failure.clone())
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

/// What holds the run, in one line: the gate's reason, the node held, until when (UTC) or by
/// which pods.
fn hold_line(h: &klm_protocol::grant_gate::Hold) -> String {
    let mut line = match h.reason {
        klm_protocol::grant_gate::HoldReason::MaintenanceWindow => "outside the maintenance window",
        klm_protocol::grant_gate::HoldReason::BlockingPod => "blocking pods",
        klm_protocol::grant_gate::HoldReason::PrometheusAlert => "Prometheus alerts",
    }
    .to_string();
    if let Some(node) = &h.node {
        line.push_str(&format!(", next node {node}"));
    }
    if let Some(ts) = h
        .until_ms
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
    {
        line.push_str(&format!(", until {ts}"));
    }
    if !h.blocking_pods.is_empty() {
        line.push_str(&format!(": {}", h.blocking_pods.join(", ")));
    }
    if !h.firing_alerts.is_empty() {
        line.push_str(&format!(": {} firing", h.firing_alerts.join(", ")));
    }
    line
}

/// Width of the progress bar, in cells.
const BAR_WIDTH: usize = 20;

/// `[#####.....]`: `done` of `total` as `width` cells (an empty plan shows an empty bar).
pub fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done.min(total) * width).checked_div(total).unwrap_or(0);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// Time from `start` to `end` (or to `now` while it runs): `1.5s` under a minute, then `2m05s`,
/// then `1h02m`, so a long run stays readable.
pub fn elapsed(start_ms: i64, end_ms: Option<i64>, now_ms: i64) -> String {
    let ms = (end_ms.unwrap_or(now_ms) - start_ms).max(0);
    let secs = ms / 1000;
    if secs < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
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
            LiveNode {
                name: "n1".to_string(),
                status: Some("rolled-back".to_string()),
                version: Some("3.27.0".to_string()),
                failure: None,
            },
            LiveNode {
                name: "n2".to_string(),
                status: Some("rolled-back".to_string()),
                version: None,
                failure: Some("NonZeroExit: container verify exited with code 1".to_string()),
            },
        ];
        let out = render(&r, &live, 10_000);
        // The per-node failure comes from the evidence on the Node, not from the record.
        assert!(
            out.lines()
                .any(|l| l.starts_with("n2") && l.contains("NonZeroExit: container verify")),
            "{out}"
        );
        assert!(
            out.contains("progress: [##########..........] 1/2"),
            "{out}"
        );
        assert!(out.contains("elapsed:  10.0s (running)"), "{out}");
        assert!(
            out.contains("n1") && out.contains("1.5s") && out.contains("3.27.0"),
            "{out}"
        );
        assert!(out.contains("failure: n2 — NonZeroExit"), "{out}");
    }

    #[test]
    fn a_held_run_says_why_and_until_when() {
        use klm_protocol::grant_gate::{Hold, HoldReason};
        let mut r = RunRecord::new("3-28-0-x".into(), "t".into(), "3.28.0".into(), 0);
        r.plan = vec!["a".into(), "b".into()];
        r.hold = Some(Hold {
            reason: HoldReason::MaintenanceWindow,
            until_ms: Some(1_796_162_400_000),
            node: Some("b".into()),
            blocking_pods: vec![],
            firing_alerts: vec![],
            message: String::new(),
        });
        let out = render(&r, &[], 1_000);
        assert!(
            out.contains(
                "held:     outside the maintenance window, next node b, until 2026-12-01T22:00:00Z"
            ),
            "{out}"
        );
        r.hold = Some(Hold {
            reason: HoldReason::BlockingPod,
            until_ms: None,
            node: Some("b".into()),
            blocking_pods: vec!["ops/backup".into()],
            firing_alerts: vec![],
            message: String::new(),
        });
        let out = render(&r, &[], 1_000);
        assert!(
            out.contains("held:     blocking pods, next node b: ops/backup"),
            "{out}"
        );
        r.hold = None;
        assert!(!render(&r, &[], 1_000).contains("held:"));
    }

    #[test]
    fn waves_show_every_node_in_progress() {
        use klm_protocol::{Turn, TurnKind};
        let mut r = RunRecord::new("3-28-0-x".into(), "t".into(), "3.28.0".into(), 0);
        r.phase = RunPhase::Running;
        r.plan = vec!["n1".into(), "n2".into(), "n3".into()];
        r.params = Some(klm_protocol::params::RunParams {
            batch_size: 3,
            ..Default::default()
        });
        for (slot, node) in ["n1", "n2"].into_iter().enumerate() {
            r.set_turn(Turn {
                node: node.into(),
                kind: TurnKind::Upgrade,
                granted_at_ms: 0,
                slot: slot as u32,
            });
        }
        let out = render(&r, &[], 10);
        assert!(
            out.contains("current:  n1 (upgrade), n2 (upgrade) (wave 2 of at most 3)"),
            "{out}"
        );
    }

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(3, 6, 10), "[#####.....]");
        assert_eq!(progress_bar(0, 4, 4), "[....]");
        assert_eq!(progress_bar(4, 4, 4), "[####]");
        assert_eq!(
            progress_bar(0, 0, 4),
            "[....]",
            "no planned node: nothing to fill"
        );
        assert_eq!(progress_bar(7, 4, 4), "[####]", "never overflows");
    }

    #[test]
    fn elapsed_uses_the_finish_time_or_now() {
        assert_eq!(elapsed(1_000, Some(2_500), 99_000), "1.5s");
        assert_eq!(elapsed(0, None, 125_000), "2m05s");
        assert_eq!(elapsed(0, None, 3_720_000), "1h02m");
        assert_eq!(
            elapsed(5_000, None, 1_000),
            "0.0s",
            "clock skew never goes negative"
        );
    }
}
