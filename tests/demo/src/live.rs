//! The live table: reflectors on the demo's Nodes, its kata-deploy pods and the trigger
//! ConfigMap, redrawn on every watch event (never a sleep-and-poll loop).
//!
//! On a terminal the table is redrawn in place; otherwise (CI, a pipe) every row that changed is
//! printed once, with the time since the act started, and the whole table at the end of the act.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use klm_protocol::RunRecord;
use klm_protocol::keys::{node as node_keys, status_data};
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::Notify;

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub node: String,
    pub opted_in: bool,
    pub status: String,
    pub version: String,
    /// The kata-deploy pod serving the node: image tag and readiness.
    pub pod: String,
    pub cordoned: bool,
    pub elapsed: String,
}

pub struct Snapshot {
    pub run: Option<RunRecord>,
    pub rows: Vec<Row>,
}

pub struct Live {
    nodes: Store<Node>,
    pods: Store<Pod>,
    configmaps: Store<ConfigMap>,
    changed: Arc<Notify>,
    node_selector: String,
    window_label: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Live {
    /// Starts the three watches and waits for their initial lists.
    pub async fn start(
        client: kube::Client,
        node_selector: &str,
        kata_deploy_ns: &str,
        trigger_ns: &str,
        trigger_name: &str,
    ) -> Result<Live> {
        let changed = Arc::new(Notify::new());
        let (nodes, t1) = klm_kube::watch::reflect(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(node_selector),
            changed.clone(),
        );
        let (pods, t2) = klm_kube::watch::reflect(
            Api::<Pod>::namespaced(client.clone(), kata_deploy_ns),
            watcher::Config::default().labels(klm_protocol::keys::kata_deploy::POD_SELECTOR),
            changed.clone(),
        );
        let (configmaps, t3) = klm_kube::watch::reflect(
            Api::<ConfigMap>::namespaced(client, trigger_ns),
            watcher::Config::default().fields(&format!("metadata.name={trigger_name}")),
            changed.clone(),
        );
        nodes.wait_until_ready().await?;
        pods.wait_until_ready().await?;
        configmaps.wait_until_ready().await?;
        Ok(Live {
            nodes,
            pods,
            configmaps,
            changed,
            node_selector: node_selector.to_owned(),
            window_label: node_keys::WINDOW_LABEL.to_owned(),
            tasks: vec![t1, t2, t3],
        })
    }

    /// The run record the coordinator last wrote into the trigger ConfigMap.
    pub fn run(&self) -> Option<RunRecord> {
        self.configmaps
            .state()
            .first()
            .and_then(|cm| cm.data.as_ref()?.get(status_data::RUN).cloned())
            .and_then(|s| RunRecord::from_json(&s).ok())
    }

    pub fn snapshot(&self) -> Snapshot {
        let run = self.run();
        let now = now_ms();
        let mut nodes = self.nodes.state();
        nodes.sort_by_key(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            (name.len(), name)
        });
        let pods = self.pods.state();
        let rows = nodes
            .iter()
            .map(|n| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let labels = n.metadata.labels.clone().unwrap_or_default();
                let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
                let elapsed = run
                    .as_ref()
                    .and_then(|r| r.nodes.get(&name))
                    .and_then(|r| Some(r.finished_at_ms.unwrap_or(now) - r.started_at_ms?))
                    .map(|ms| format!("{:.1}s", ms.max(0) as f64 / 1000.0))
                    .unwrap_or_default();
                Row {
                    opted_in: labels.get(&self.window_label).is_some_and(|v| v == "true"),
                    status: label(node_keys::STATUS),
                    version: label(node_keys::CURRENT_VERSION),
                    pod: pod_on(&pods, &name),
                    cordoned: n
                        .spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false),
                    elapsed,
                    node: name,
                }
            })
            .collect();
        Snapshot { run, rows }
    }

    /// Shows the table until `done(run)` holds for the run record, at most `timeout`.
    /// Returns that run record.
    pub async fn follow(
        &self,
        title: &str,
        timeout: Duration,
        done: impl Fn(&RunRecord) -> bool,
    ) -> Result<RunRecord> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut view = View::new();
        println!("{title}");
        loop {
            let snap = self.snapshot();
            view.show(&snap, started.elapsed());
            if let Some(run) = snap.run.as_ref().filter(|r| done(r)) {
                view.finish(&snap);
                return Ok(run.clone());
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                view.finish(&snap);
                bail!(
                    "no result after {timeout:?} (nodes selected by {}); last run record: {}",
                    self.node_selector,
                    snap.run
                        .map(|r| format!("{} phase {} — {}", r.id, r.phase, r.message))
                        .unwrap_or_else(|| "none".into())
                );
            }
        }
    }

    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// "3.28.0 Ready", "3.29.0 starting", "restarting" (only a terminating pod), or "-".
fn pod_on(pods: &[Arc<Pod>], node: &str) -> String {
    let on_node: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .collect();
    let current = on_node
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .max_by_key(|p| p.metadata.creation_timestamp.clone());
    match current {
        Some(p) => format!(
            "{} {}",
            klm_testkit::verification::image_tag(p).unwrap_or_else(|| "?".into()),
            if klm_testkit::wait::is_pod_ready(p) {
                "Ready"
            } else {
                "starting"
            }
        ),
        None if !on_node.is_empty() => "restarting".into(),
        None => "-".into(),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const HEADER: [&str; 7] = [
    "NODE",
    "OPTED-IN",
    "STATUS",
    "VERSION",
    "KATA-DEPLOY POD",
    "SCHEDULING",
    "ELAPSED",
];

fn cells(r: &Row) -> [String; 7] {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    [
        r.node.clone(),
        if r.opted_in { "yes" } else { "no" }.to_owned(),
        dash(&r.status),
        dash(&r.version),
        r.pod.clone(),
        if r.cordoned { "cordoned" } else { "ok" }.to_owned(),
        dash(&r.elapsed),
    ]
}

/// The table as lines: a run header, the column header and one line per node.
pub fn render(snap: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    match &snap.run {
        Some(r) => {
            let current = r
                .turn
                .as_ref()
                .map(|t| format!("   current: {} ({})", t.node, t.kind.as_str()))
                .unwrap_or_default();
            out.push(format!(
                "  run {}   phase: {}   target: {}   progress: {}{current}",
                r.id,
                r.phase,
                r.target_version,
                r.progress()
            ));
            out.push(format!("  {}", truncate(&r.message, 150)));
        }
        None => {
            out.push("  no run yet".into());
            out.push(String::new());
        }
    }
    let rows: Vec<[String; 7]> = snap.rows.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::from("  ");
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned()
    };
    out.push(line(&HEADER.map(str::to_owned)));
    for r in &rows {
        out.push(line(r));
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize struct we own; stdout is a terminal here.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        120
    }
}

/// What identifies a run's visible state: id, phase, progress.
type RunKey = (String, String, String);

/// How the table reaches the screen.
struct View {
    tty: bool,
    drawn: usize,
    last: Option<(Option<RunKey>, BTreeMap<String, Row>)>,
}

impl View {
    fn new() -> View {
        View {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last: None,
        }
    }

    fn show(&mut self, snap: &Snapshot, t: Duration) {
        let run_key = snap
            .run
            .as_ref()
            .map(|r| (r.id.clone(), r.phase.to_string(), r.progress()));
        let (last_run, mut last_rows) = match self.last.take() {
            Some((r, rows)) => (r, rows),
            None => (None, BTreeMap::new()),
        };
        // One log line per change of the run, and per change of a node's status, version,
        // cordon or Ready kata-deploy pod (a pod between two Ready states is not news).
        let stamp = format!("  +{:>5.1}s", t.as_secs_f64());
        let mut events = Vec::new();
        if run_key != last_run
            && let Some(r) = &snap.run
        {
            events.push(format!(
                "{stamp}  run {}: {} {} — {}",
                r.id,
                r.phase,
                r.progress(),
                truncate(&r.message, 110)
            ));
        }
        for row in &snap.rows {
            let mut row = row.clone();
            let old = last_rows.get(&row.node);
            if !row.pod.ends_with("Ready")
                && let Some(old) = old
            {
                row.pod = old.pod.clone();
            }
            let changed = old.is_none_or(|old| {
                (&old.status, &old.version, &old.pod, old.cordoned)
                    != (&row.status, &row.version, &row.pod, row.cordoned)
            });
            if changed {
                let c = cells(&row);
                events.push(format!(
                    "{stamp}  {:<22} status={:<13} version={:<7} pod={:<13} {}",
                    c[0], c[2], c[3], c[4], c[5]
                ));
            }
            last_rows.insert(row.node.clone(), row);
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            // The log scrolls above the table, which is redrawn in place below it. Lines must
            // not wrap, or moving the cursor up by `drawn` lines would miss.
            let width = terminal_width().saturating_sub(1).max(40);
            if self.drawn > 0 {
                let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn);
            }
            for l in &events {
                let _ = writeln!(out, "{}", truncate(l, width));
            }
            let lines: Vec<String> = render(snap).iter().map(|l| truncate(l, width)).collect();
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            self.drawn = lines.len();
        } else {
            for l in &events {
                let _ = writeln!(out, "{l}");
            }
        }
        let _ = out.flush();
        self.last = Some((run_key, last_rows));
    }

    /// Leaves the final table on screen (already there on a terminal).
    fn finish(&mut self, snap: &Snapshot) {
        if !self.tty {
            for l in render(snap) {
                println!("{l}");
            }
        }
        println!();
    }
}
