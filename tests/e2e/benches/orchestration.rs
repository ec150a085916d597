//! Benchmark: per-node orchestration overhead and API requests per node, on 10 simulated
//! nodes of the real control plane. Run with `make bench` (or
//! `cargo bench -p klm-e2e --bench orchestration`). It reports figures; it asserts nothing
//! about time.
//!
//! Overhead of a node = its whole turn (Lease taken → turn finished, measured by its agent)
//! minus the verification pod's own runtime. Handoff = the gap between one node's `completed`
//! and the next node's `preparing`, as one watch on the Nodes delivers them (so it includes
//! the coordinator's reaction, the agent's Lease take-over and both watch latencies).
#[path = "../tests/product/mod.rs"]
mod product;

use klm_protocol::RunPhase;
use product::Product;

const NODES: usize = 10;

fn summary(name: &str, mut v: Vec<f64>, unit: &str) {
    if v.is_empty() {
        println!("{name:<40} n/a");
        return;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let p50 = v[v.len() / 2];
    let max = v[v.len() - 1];
    println!(
        "{name:<40} mean {mean:>8.1}{unit}  p50 {p50:>8.1}{unit}  max {max:>8.1}{unit}  (n={})",
        v.len()
    );
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let p = Product::start("bench", NODES, "3.27.0").await?;
        let all: Vec<String> = (1..=NODES).map(|i| format!("node-{i}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        p.opt_in(&refs).await?;
        let (mut overhead, mut handoff, mut verify, mut agent_req, mut coord_req, mut node_total) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for target in ["3.28.0", "3.29.0"] {
            let started = std::time::Instant::now();
            let seen_before = p.observed.lock().unwrap().transitions.len();
            let run = p.run(target, &[]).await?;
            anyhow::ensure!(
                run.phase == RunPhase::Succeeded,
                "benchmark run failed: {run:#?}"
            );
            println!(
                "run to {target}: {} nodes in {:.1}s wall",
                run.plan.len(),
                started.elapsed().as_secs_f64()
            );
            for n in &run.plan {
                let r = &run.nodes[n];
                let ev = r.evidence.clone().unwrap_or_default();
                if let (Some(node), Some(v)) = (ev.node_ms, ev.verification_ms) {
                    overhead.push(node.saturating_sub(v) as f64);
                    node_total.push(node as f64);
                    verify.push(v as f64);
                }
                if let Some(a) = ev.api_requests {
                    agent_req.push(a as f64);
                }
            }
            {
                let o = p.observed.lock().unwrap();
                let at = |node: &str, status: &str| {
                    (seen_before..o.transitions.len())
                        .find(|&i| o.transitions[i].0 == node && o.transitions[i].1 == status)
                        .map(|i| o.seen_at[i])
                };
                for pair in run.plan.windows(2) {
                    if let (Some(done), Some(next)) =
                        (at(&pair[0], "completed"), at(&pair[1], "preparing"))
                    {
                        handoff.push(next.saturating_duration_since(done).as_secs_f64() * 1000.0);
                    }
                }
            }
            if let Some(c) = run.coordinator_api_requests {
                coord_req.push(c as f64 / run.plan.len() as f64);
            }
        }
        println!();
        summary("node turn (agent, ms)", node_total, "ms");
        summary("verification pod runtime (ms)", verify, "ms");
        summary("orchestration overhead per node (ms)", overhead, "ms");
        summary("handoff completed -> next preparing (ms)", handoff, "ms");
        summary("agent API requests per node", agent_req, "");
        summary("coordinator API requests per node", coord_req, "");
        anyhow::Ok(())
    })
}
