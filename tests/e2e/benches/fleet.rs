//! Fleet benchmark (issue 12): one upgrade over N simulated nodes of the real control plane, one
//! agent process per node, for N in `KLM_FLEET_SIZES` (default `100,300,1000`). Run with
//! `make bench-fleet` (release builds). It reports figures; it asserts nothing about time.
//!
//! Per N it prints: the run's wall time; each node's turn (Lease taken → turn finished, as its
//! agent measured it, read from the evidence on its Node) p50 and max; the handoff (one node's
//! `completed` → the next node's `preparing`, as one watch on the Nodes delivers them) averaged
//! over the first and the last 10 % of the plan; the CPU seconds the agents, the coordinator and
//! kube-apiserver used during the run; the idle RSS of one agent, the coordinator's peak RSS and
//! the sum of the agents' peak RSS; the bytes kube-apiserver sent on watches during the run
//! (`apiserver_watch_events_sizes_sum` of its `/metrics`) per node turn, in all and on the
//! resources this tool touches; and the size of the run record.
#[path = "../tests/product/mod.rs"]
mod product;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use klm_protocol::RunPhase;
use klm_protocol::keys::{status_data, trigger};
use klm_protocol::node_record::NodeRecord;
use kube::api::Api;
use product::{CM, Product};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A run over 1000 nodes one at a time takes minutes; this only bounds a stuck one.
const RUN_LIMIT: Duration = Duration::from_secs(3600);

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the command.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// A `/proc/<pid>/status` memory figure (`VmRSS`, `VmHWM`, `RssAnon`) in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    memory_kib_in(&format!("/proc/{pid}/status"), field)
}

/// A process's proportional set size in KiB (`/proc/<pid>/smaps_rollup`): its private pages
/// plus its share of the pages it shares (the agents' binary is one set of pages for all).
fn pss_kib(pid: u32) -> u64 {
    memory_kib_in(&format!("/proc/{pid}/smaps_rollup"), "Pss")
}

fn memory_kib_in(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("{field}:")))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The pids of this process's descendants named `comm` (the test cluster's kube-apiserver).
fn descendants_named(comm: &str) -> Vec<u32> {
    let mut parent: BTreeMap<u32, (u32, String)> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or(String::new(), |(n, _)| n.to_string());
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        parent.insert(pid, (ppid, name));
    }
    let me = std::process::id();
    let descends = |mut pid: u32| {
        while let Some((ppid, _)) = parent.get(&pid) {
            if *ppid == me {
                return true;
            }
            pid = *ppid;
        }
        false
    };
    parent
        .iter()
        .filter(|(pid, (_, name))| name == comm && descends(**pid))
        .map(|(pid, _)| *pid)
        .collect()
}

/// `apiserver_watch_events_sizes_sum` by resource: bytes sent on watches since the API server
/// started.
async fn watch_bytes(client: &kube::Client) -> Result<BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(req)
        .await
        .context("GET /metrics from kube-apiserver")?;
    let mut by_resource = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_watch_events_sizes_sum{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let resource = labels
            .split(',')
            .find_map(|l| l.strip_prefix("resource=\""))
            .map_or("?", |r| r.trim_end_matches('"'))
            .to_string();
        *by_resource.entry(resource).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(by_resource)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

struct Figures {
    nodes: usize,
    wall_s: f64,
    turn_p50_ms: f64,
    turn_max_ms: f64,
    handoff_first_ms: f64,
    handoff_last_ms: f64,
    cpu_agents_s: f64,
    cpu_coordinator_s: f64,
    cpu_apiserver_s: f64,
    agent_idle_rss_mib: f64,
    /// The private (anonymous) part of that RSS, the rest being the shared binary's pages.
    agent_idle_anon_mib: f64,
    agents_idle_pss_sum_mib: f64,
    coordinator_peak_mib: f64,
    agents_peak_sum_mib: f64,
    watch_bytes_per_turn: f64,
    watch_by_resource_per_turn: BTreeMap<String, f64>,
    record_bytes: usize,
}

async fn one_fleet(n: usize) -> Result<Figures> {
    let started = Instant::now();
    let p = Product::start(&format!("fleet{n}"), n, "3.27.0").await?;
    let all: Vec<String> = (1..=n).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    p.opt_in(&refs).await?;
    eprintln!(
        "fleet {n}: {n} nodes, agents and coordinator up in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let client = p.slice.client();
    let apiserver = descendants_named("kube-apiserver");
    let agents: Vec<u32> = p.agents.values().map(|a| a.pid()).collect();
    let coordinator = p.coordinator.as_ref().context("no coordinator")?.pid();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let idle_rss: Vec<u64> = agents.iter().map(|p| memory_kib(*p, "VmRSS")).collect();
    let idle_anon: Vec<u64> = agents.iter().map(|p| memory_kib(*p, "RssAnon")).collect();
    let idle_pss: u64 = agents.iter().map(|p| pss_kib(*p)).sum();
    let (agents0, coord0, api0) = (cpu(&agents), cpu(&[coordinator]), cpu(&apiserver));
    let bytes0 = watch_bytes(&client).await?;

    let before = p.current_run().await?.map(|r| r.id);
    let t0 = Instant::now();
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    let run = p
        .wait_run(
            |r| Some(&r.id) != before.as_ref() && r.phase.is_finished(),
            RUN_LIMIT,
        )
        .await?;
    let wall_s = t0.elapsed().as_secs_f64();
    ensure!(
        run.phase == RunPhase::Succeeded,
        "fleet run over {n} nodes ended {:?}: {}",
        run.phase,
        run.message
    );
    let (agents1, coord1, api1) = (cpu(&agents), cpu(&[coordinator]), cpu(&apiserver));
    let bytes1 = watch_bytes(&client).await?;
    let coordinator_peak = memory_kib(coordinator, "VmHWM");
    let agents_peak: u64 = agents.iter().map(|p| memory_kib(*p, "VmHWM")).sum();

    // Per-node turn, from the evidence each agent wrote on its Node.
    let nodes: Api<Node> = Api::all(client.clone());
    let mut turns = Vec::new();
    for name in &run.plan {
        let ev = NodeRecord::of(&nodes.get(name).await?).evidence;
        if let Some(ms) = ev.and_then(|e| e.node_ms) {
            turns.push(ms as f64);
        }
    }
    turns.sort_by(f64::total_cmp);
    // Handoffs in plan order, as the monitor's one watch on the Nodes saw them.
    let handoffs: Vec<f64> = {
        let o = p.observed.lock().unwrap();
        let at = |node: &str, status: &str| {
            (0..o.transitions.len())
                .find(|&i| o.transitions[i].0 == node && o.transitions[i].1 == status)
                .map(|i| o.seen_at[i])
        };
        run.plan
            .windows(2)
            .filter_map(|pair| {
                let done = at(&pair[0], "completed")?;
                let next = at(&pair[1], "preparing")?;
                Some(next.saturating_duration_since(done).as_secs_f64() * 1000.0)
            })
            .collect()
    };
    let tenth = (handoffs.len() / 10).max(1);
    let record_bytes = Api::<ConfigMap>::namespaced(client.clone(), &p.slice.namespace())
        .get(CM)
        .await?
        .data
        .and_then(|d| d.get(status_data::RUN).map(String::len))
        .unwrap_or(0);
    let turns_done = run.plan.len().max(1) as f64;
    let watch_by_resource_per_turn: BTreeMap<String, f64> = bytes1
        .iter()
        .map(|(r, b)| {
            (
                r.clone(),
                (b - bytes0.get(r).copied().unwrap_or(0.0)) / turns_done,
            )
        })
        .filter(|(_, b)| *b >= 1.0)
        .collect();
    let figures = Figures {
        nodes: run.plan.len(),
        wall_s,
        turn_p50_ms: percentile(&turns, 0.5),
        turn_max_ms: turns.last().copied().unwrap_or(f64::NAN),
        handoff_first_ms: mean(&handoffs[..tenth.min(handoffs.len())]),
        handoff_last_ms: mean(&handoffs[handoffs.len().saturating_sub(tenth)..]),
        cpu_agents_s: agents1 - agents0,
        cpu_coordinator_s: coord1 - coord0,
        cpu_apiserver_s: api1 - api0,
        agent_idle_rss_mib: idle_rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        agent_idle_anon_mib: idle_anon.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        agents_idle_pss_sum_mib: idle_pss as f64 / 1024.0,
        coordinator_peak_mib: coordinator_peak as f64 / 1024.0,
        agents_peak_sum_mib: agents_peak as f64 / 1024.0,
        watch_bytes_per_turn: watch_by_resource_per_turn.values().sum(),
        watch_by_resource_per_turn,
        record_bytes,
    };
    drop(p);
    Ok(figures)
}

fn print(f: &Figures) {
    println!("\n== {} nodes ==", f.nodes);
    println!(
        "run wall                               {:>10.1} s",
        f.wall_s
    );
    println!(
        "per-node turn p50 / max                {:>10.0} / {:.0} ms",
        f.turn_p50_ms, f.turn_max_ms
    );
    println!(
        "handoff, first vs last 10 % of the run {:>10.0} / {:.0} ms",
        f.handoff_first_ms, f.handoff_last_ms
    );
    println!(
        "CPU agents / coordinator / apiserver   {:>10.1} / {:.1} / {:.1} s",
        f.cpu_agents_s, f.cpu_coordinator_s, f.cpu_apiserver_s
    );
    println!(
        "RSS agent idle (max) / coordinator peak / agents' peaks summed {:.1} / {:.1} / {:.0} MiB",
        f.agent_idle_rss_mib, f.coordinator_peak_mib, f.agents_peak_sum_mib
    );
    println!(
        "agent idle: RSS of which private (anon), max / PSS summed over agents {:.1} / {:.1} / {:.0} MiB",
        f.agent_idle_rss_mib, f.agent_idle_anon_mib, f.agents_idle_pss_sum_mib
    );
    println!(
        "apiserver watch bytes per node turn    {:>10.0} B",
        f.watch_bytes_per_turn
    );
    for (r, b) in &f.watch_by_resource_per_turn {
        println!("  {r:<36} {b:>10.0} B");
    }
    println!(
        "run record (run.json)                  {:>10} B",
        f.record_bytes
    );
}

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("KLM_FLEET_SIZES")
        .unwrap_or_else(|_| "100,300,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut all = Vec::new();
        for n in sizes {
            let f = one_fleet(n).await?;
            print(&f);
            all.push(f);
        }
        println!(
            "\n| N | run wall | turn p50 / max | handoff first / last 10 % | CPU agents / coord / apiserver | agent idle RSS | coord peak RSS | agents' peak RSS sum | watch bytes per turn | run.json |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for f in &all {
            println!(
                "| {} | {:.1} s | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.1} / {:.1} / {:.1} s | {:.1} MiB | {:.1} MiB | {:.0} MiB | {:.0} B | {} B |",
                f.nodes,
                f.wall_s,
                f.turn_p50_ms,
                f.turn_max_ms,
                f.handoff_first_ms,
                f.handoff_last_ms,
                f.cpu_agents_s,
                f.cpu_coordinator_s,
                f.cpu_apiserver_s,
                f.agent_idle_rss_mib,
                f.coordinator_peak_mib,
                f.agents_peak_sum_mib,
                f.watch_bytes_per_turn,
                f.record_bytes
            );
        }
        anyhow::Ok(())
    })
}
