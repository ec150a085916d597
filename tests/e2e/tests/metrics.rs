//! Metrics end to end: the coordinator's and the agents' `/metrics` scraped during and after a
//! real run (real processes, real control plane, real helm), asserted on values; `/healthz`.
mod product;

use klm_protocol::RunPhase;
use klm_protocol::keys::trigger;
use klm_testkit::Outcome;
use product::{Product, health_addr};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 GET: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    sock.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {text}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (code, body) = get(addr, "/metrics").await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}: {body}");
    Ok(body)
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Scrapes until `series` shows `want`: the coordinator updates its gauges right after it
/// writes the run record, so a reader of the record may be a moment ahead of `/metrics`.
async fn scrape_until(addr: SocketAddr, series: &str, want: f64) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(addr).await?;
        if value(&text, series) == Some(want) {
            return Ok(text);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {want}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn coordinator_addr(p: &Product) -> SocketAddr {
    health_addr(p.coordinator.as_ref().expect("coordinator running"))
        .expect("the coordinator logged its health address")
}

fn agent_addr(p: &Product, suffix: &str) -> SocketAddr {
    health_addr(&p.agents[&p.node(suffix)]).expect("the agent logged its health address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_successful_run() -> anyhow::Result<()> {
    let p = Product::start("metrics", 3, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_run(|r| Some(&r.id) != before.as_ref(), product::RUN_TIMEOUT)
        .await?;
    // The run started, so the coordinator is past startup, where it logs its health address.
    let coord = coordinator_addr(&p);
    assert_eq!(get(coord, "/healthz").await?.0, 200);
    assert_eq!(get(coord, "/livez").await?.0, 200);
    assert_eq!(get(coord, "/readyz").await?.0, 200);

    // Scrape through the run, as Prometheus would, keeping (phase Running, nodes completed).
    let seen: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let scraper = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(text) = scrape(coord).await
                    && let (Some(running), Some(done)) = (
                        value(&text, "klm_run_phase{phase=\"Running\"}"),
                        value(&text, "klm_run_nodes{status=\"completed\"}"),
                    )
                {
                    seen.lock().unwrap().push((running, done));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let run = p.wait_finished_after(before).await?;
    scraper.abort();
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());

    let text = scrape_until(coord, "klm_run_last_result{result=\"Succeeded\"}", 1.0).await?;
    for (series, want) in [
        ("klm_run_phase{phase=\"Succeeded\"}", 1.0),
        ("klm_run_phase{phase=\"Running\"}", 0.0),
        ("klm_run_nodes{status=\"completed\"}", 2.0),
        ("klm_run_nodes{status=\"pending\"}", 0.0),
        ("klm_run_nodes{status=\"failed\"}", 0.0),
        ("klm_run_last_result{result=\"Failed\"}", 0.0),
        ("klm_run_paused", 0.0),
        ("klm_helm_call_duration_seconds_count{op=\"upgrade\"}", 1.0),
        ("klm_lease_events_total{event=\"granted\"}", 2.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    assert_eq!(
        value(&text, "klm_helm_call_failures_total{op=\"upgrade\"}"),
        None,
        "no failed helm upgrade:\n{text}"
    );
    assert!(
        !text.contains("klm_helm_call_duration_seconds_count{op=\"rollback\"}"),
        "no rollback in a successful run:\n{text}"
    );
    let finished = value(&text, "klm_run_last_finished_timestamp_seconds").expect("timestamp");
    let recorded = run.finished_at_ms.expect("finished") as f64 / 1000.0;
    assert!(
        (finished - recorded).abs() < 0.001,
        "{finished} vs {recorded}"
    );
    assert!(value(&text, "klm_api_requests_total").is_some_and(|n| n > 0.0));

    // During the run the progress moved: Running with one node done was scraped, and the
    // completed count never went down.
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&(1.0, 1.0)),
        "no scrape showed the run Running with 1 node completed: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "{seen:?}");

    // Each upgraded node's agent timed its steps and counted one passed verification and one
    // Lease hold; the node that did not opt in did nothing.
    for n in ["node-1", "node-2"] {
        let addr = agent_addr(&p, n);
        assert_eq!(get(addr, "/healthz").await?.0, 200, "{n}");
        let text = scrape(addr).await?;
        for (series, want) in [
            ("klm_node_step_duration_seconds_count{step=\"cordon\"}", 1.0),
            (
                "klm_node_step_duration_seconds_count{step=\"upgrade\"}",
                1.0,
            ),
            ("klm_node_step_duration_seconds_count{step=\"verify\"}", 1.0),
            ("klm_verification_outcomes_total{result=\"success\"}", 1.0),
            ("klm_lease_holds_total", 1.0),
            ("klm_lease_lost_total", 0.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{n}: {series} in\n{text}");
        }
        assert!(value(&text, "klm_api_requests_total").is_some_and(|n| n > 0.0));
    }
    let idle = scrape(agent_addr(&p, "node-3")).await?;
    assert_eq!(value(&idle, "klm_lease_holds_total"), Some(0.0), "{idle}");
    assert!(
        !idle.contains("klm_node_step_duration_seconds_count"),
        "{idle}"
    );
    p.assert_safe(&[p.node("node-1"), p.node("node-2")]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_failed_verification_and_the_rollback() -> anyhow::Result<()> {
    let p = Product::start("metrics-fail", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    p.slice
        .set_verification_outcome("node-2", "3.28.0", Outcome::Fail);
    let run = p.run("3.28.0", &[]).await?;
    assert_eq!(run.phase, RunPhase::Failed, "{run:#?}");

    let coord = coordinator_addr(&p);
    let text = scrape_until(coord, "klm_run_last_result{result=\"Failed\"}", 1.0).await?;
    for (series, want) in [
        ("klm_run_last_result{result=\"Succeeded\"}", 0.0),
        ("klm_run_phase{phase=\"Failed\"}", 1.0),
        ("klm_run_nodes{status=\"rolled-back\"}", 2.0),
        ("klm_run_nodes{status=\"failed\"}", 0.0),
        ("klm_helm_call_duration_seconds_count{op=\"upgrade\"}", 1.0),
        ("klm_helm_call_duration_seconds_count{op=\"rollback\"}", 1.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    let agent = scrape(agent_addr(&p, "node-2")).await?;
    for (series, want) in [
        (
            "klm_verification_outcomes_total{result=\"NonZeroExit\"}",
            1.0,
        ),
        ("klm_node_step_duration_seconds_count{step=\"verify\"}", 1.0),
        (
            "klm_node_step_duration_seconds_count{step=\"restore\"}",
            1.0,
        ),
        // The upgrade turn and the restore turn each took the Lease.
        ("klm_lease_holds_total", 2.0),
    ] {
        assert_eq!(value(&agent, series), Some(want), "{series} in\n{agent}");
    }
    assert!(!agent.contains("result=\"success\""), "{agent}");
    p.assert_safe(&[p.node("node-1"), p.node("node-2")]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_run_shows_in_the_metrics_until_resumed() -> anyhow::Result<()> {
    let p = Product::start("metrics-pause", 2, "3.27.0").await?;
    p.opt_in(&["node-1", "node-2"]).await?;
    let (before, paused) = p.trigger_then_pause("3.28.0").await?;
    let done = paused.completed() as f64;
    let coord = coordinator_addr(&p);
    scrape_until(coord, "klm_run_paused", 1.0).await?;
    // The pause is taken while a node is still in its turn: the gauges may show it paused
    // before they show that node completed (the record read above is ahead of /metrics).
    // Paused stays 1 and the completed count only grows until the resume, so wait for both.
    let text = scrape_until(coord, "klm_run_nodes{status=\"completed\"}", done).await?;
    assert_eq!(value(&text, "klm_run_paused"), Some(1.0), "{text}");
    for (series, want) in [
        ("klm_run_phase{phase=\"Running\"}", 1.0),
        ("klm_run_nodes{status=\"completed\"}", done),
        ("klm_run_nodes{status=\"pending\"}", 2.0 - done),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }

    p.annotate(&[(trigger::ACTION, Some(trigger::ACTION_RESUME))])
        .await?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}");
    let text = scrape_until(coord, "klm_run_last_result{result=\"Succeeded\"}", 1.0).await?;
    assert_eq!(value(&text, "klm_run_paused"), Some(0.0), "{text}");
    assert_eq!(
        value(&text, "klm_run_nodes{status=\"completed\"}"),
        Some(2.0)
    );
    Ok(())
}

/// Issue 14.1: the agent counts Lease takeovers (a restarted agent takes over the hold of its
/// node's killed process once it expired) and its failed API requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_counts_its_lease_takeover() -> anyhow::Result<()> {
    let mut p = Product::start("metrics-takeover", 1, "3.27.0").await?;
    p.opt_in(&["node-1"]).await?;
    let n1 = p.node("node-1");
    p.slice
        .set_default_verification_outcome(Outcome::SucceedAfter(Duration::from_secs(10)));
    let before = p.current_run().await?.map(|r| r.id);
    p.annotate(&[(trigger::TARGET_VERSION, Some("3.28.0"))])
        .await?;
    p.wait_node_status(&n1, klm_protocol::NodeStatus::Verifying)
        .await?;
    // The first process dies holding the Lease; the next one takes it over once it expired.
    let killed = scrape(agent_addr(&p, "node-1")).await?;
    assert_eq!(
        value(&killed, "klm_lease_holds_total"),
        Some(1.0),
        "{killed}"
    );
    assert_eq!(
        value(&killed, "klm_lease_takeovers_total"),
        Some(0.0),
        "{killed}"
    );
    p.kill_agent(&n1);
    p.start_agent(&n1)?;
    let run = p.wait_finished_after(before).await?;
    assert_eq!(run.phase, RunPhase::Succeeded, "{run:#?}\n{}", p.logs());

    let text = scrape(agent_addr(&p, "node-1")).await?;
    for (series, want) in [
        ("klm_lease_holds_total", 1.0),
        ("klm_lease_takeovers_total", 1.0),
        ("klm_lease_lost_total", 0.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    }
    // The one API failure of this run is the verification pod's log read when the simulated
    // node serves no logs (the API server answers 500): the evidence says so, and the counter
    // has exactly that one; nothing was denied, throttled or unanswered.
    // The log tail is on the Node (the run record keeps each node's evidence without it).
    let log_tail = p
        .node_evidence(&n1)
        .await?
        .filter(|e| e.run_id == run.id)
        .and_then(|e| e.log_tail)
        .unwrap_or_default();
    let log_read_failed = log_tail.starts_with("logs unavailable");
    assert_eq!(
        value(&text, "klm_api_errors_total{kind=\"server\"}"),
        log_read_failed.then_some(1.0),
        "log tail {log_tail:?}; metrics:\n{text}"
    );
    for kind in ["transport", "denied", "throttled"] {
        let series = format!("klm_api_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&text, &series), None, "{series} in\n{text}");
    }
    assert!(text.contains("# TYPE klm_api_errors counter"), "{text}");
    p.assert_safe(&run.plan).await?;
    Ok(())
}
