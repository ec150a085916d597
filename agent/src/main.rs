//! kata-lifecycle-manager agent: runs on every node (DaemonSet) and does the node-local work of
//! an upgrade for its own node only — cordon, drain, restart kata-deploy, verify, uncordon, or
//! restore — when the coordinator's grant on this node's Node gives it its turn and the upgrade
//! Lease is ours. See the README, "How it works".
//!
//! Modules: `config` (flags), `turn` (reads the grant on our Node), `driver` (watches our own
//! Node, starts turns), `runner` (one turn: resume point, Lease, release, resume after a
//! lapse), `steps` (the walk and each step's observe → decide → act loop; the decisions are
//! `klm_protocol`'s), `ctx` (the process's handles and the turn's record, fencing,
//! interruption, Node writes and Events).
mod config;
mod ctx;
mod driver;
mod install;
mod metrics;
mod runner;
mod steps;
mod turn;

use anyhow::Context;
use clap::Parser;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let config = config::Config::parse();
    klm_kube::logging::init(config.log_format);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: config::Config) -> anyhow::Result<()> {
    info!(
        node = %config.node_name,
        namespace = %config.namespace,
        version = env!("CARGO_PKG_VERSION"),
        "kata-lifecycle-manager agent starting"
    );
    let (ready_tx, ready_rx) = watch::channel(false);
    let requests = ctx::RequestCounter::default();
    let mut registry = klm_kube::metrics::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let counted = requests.clone();
    klm_kube::metrics::register_api_requests(&mut registry, move || counted.get());
    let heartbeat = klm_kube::health::Heartbeat::new(MAX_BUSY);
    let endpoints = klm_kube::health::Endpoints {
        ready: ready_rx,
        heartbeat: heartbeat.clone(),
        registry: Arc::new(registry),
    };
    if let Some(addr) = klm_kube::health::serve(&config.health_addr, endpoints)
        .await
        .with_context(|| {
            format!(
                "binding the health endpoint on {:?} (set --health-addr, or empty to disable)",
                config.health_addr
            )
        })?
    {
        info!(%addr, "health endpoint listening (/healthz, /readyz, /metrics)");
    }
    let client = client(requests.clone(), metrics.clone()).await.context(
        "connecting to the Kubernetes API (in a pod: the service account; locally: KUBECONFIG)",
    )?;

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));

    let agent = Arc::new(ctx::Agent::new(client, requests, config, metrics));
    info!(identity = %agent.lease.identity(), "upgrade Lease identity");
    driver::run(agent, shutdown, ready_tx, heartbeat).await;
    info!("agent stopped");
    Ok(())
}

/// The main loop handles one watch event at a time (turns run in their own task); the longest
/// thing it does is one Lease check after start. Busy on one event for longer than this, it is
/// wedged (`klm_kube::health`).
const MAX_BUSY: std::time::Duration = std::time::Duration::from_secs(600);

/// The API client, from KUBECONFIG or the in-cluster service account, counting its requests
/// (for the evidence's `apiRequests`), with kube's built-in retry layer turned off: it retries
/// 429/503/504 up to 15 times with backoff growing to 1000 s inside one call, which would hide
/// a PodDisruptionBudget's refusal (429) from the drain and its deadline, and stall a Lease
/// renewal past the fence. Every caller here retries on its own terms (jittered backoff,
/// bounded by its step's deadline or the fence).
async fn client(
    counter: ctx::RequestCounter,
    metrics: metrics::Metrics,
) -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer().await?;
    config.default_retry = false;
    let inner = counter;
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        inner.add();
        req
    });
    // Every answer (or its absence) is classified for `klm_api_errors_total`.
    type Answer = Result<http::Response<Box<kube::client::DynBody>>, tower::BoxError>;
    let errors = tower::util::MapResultLayer::new(move |answer: Answer| {
        metrics.api_response(answer.as_ref().ok().map(|r| r.status().as_u16()));
        answer
    });
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&count)
        .with_layer(&errors)
        .build();
    Ok(client)
}

/// SIGTERM/SIGINT: stop between steps. A second signal exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping between steps"),
        _ = int.recv() => info!("SIGINT: stopping between steps"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    error!("second signal: exiting now");
    std::process::exit(130);
}
