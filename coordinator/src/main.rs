//! klm-coordinator: one per cluster (leader-elected). Owns the run and the helm release;
//! grants node turns through the run record in the trigger ConfigMap.
mod config;
mod daemonset;
mod drainer;
mod driver;
mod gates;
mod helm;
mod metrics;
mod status_data;

use clap::Parser;
use config::{Cli, Command, RunArgs};
use klm_kube::lease::UpgradeLease;
use klm_kube::time;
use klm_protocol::lifecycle::Timing;
use klm_protocol::run_machine::{self, RetryPolicy};
use std::sync::Arc;
use tokio::sync::{Notify, watch};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Status(args) => {
            let client = kube::Client::try_default().await?;
            let view = klm_kube::status_view::ViewArgs {
                namespace: args.common.namespace,
                configmap: args.common.trigger_configmap,
                watch: args.watch,
                json: args.json,
            };
            Ok(klm_kube::status_view::show(client, &view).await?)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    klm_kube::logging::init(args.process.log_format);
    let (client, requests) = klm_kube::client::counted().await?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let mut registry = klm_kube::metrics::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let counted = requests.clone();
    klm_kube::metrics::register_api_requests(&mut registry, move || counted.get());
    // One reconcile may run a helm restore (bounded by --rollback-timeout), wait for the
    // DaemonSet's rollout (--rollout-observe-timeout) and a helm upgrade (helm's own 5 min hook
    // timeout) plus API calls: busy for longer than all of that together is a wedged loop.
    let heartbeat = klm_kube::health::Heartbeat::new(
        args.rollback_timeout + args.rollout_observe_timeout + WEDGE_MARGIN,
    );
    let endpoints = klm_kube::health::Endpoints {
        ready: ready_rx,
        heartbeat: heartbeat.clone(),
        registry: Arc::new(registry),
    };
    if let Some(addr) = klm_kube::health::serve(&args.process.health_addr, endpoints).await? {
        tracing::info!(%addr, "health endpoint listening (/healthz, /readyz, /metrics)");
    }
    let ns = args.common.namespace.clone();
    let me = args.identity.clone();
    // The leader Lease uses the same Lease client as the agents' upgrade Lease: acquisition by
    // a resourceVersion-carrying replace, renewal every third of the duration, loss detection.
    let leader = UpgradeLease::new(client.clone(), &ns, &args.leader_lease_name, &me);
    // Standby replicas are healthy and ready too (a Deployment rollout waits for them); being
    // ready means "reached the API", not "is the leader".
    leader.ensure_exists(args.lease_duration_seconds).await?;
    let _ = ready_tx.send(true);
    let held = tokio::select! {
        r = leader.acquire() => r?,
        _ = shutdown_signal() => return Ok(()),
    };
    tracing::info!(lease = %args.leader_lease_name, identity = %me, "became leader");
    let fence = held.fence();
    let settings = driver::Settings {
        namespace: ns.clone(),
        trigger_configmap: args.common.trigger_configmap.clone(),
        lease_name: args.lease_name.clone(),
        lease_duration_seconds: args.lease_duration_seconds,
        machine: run_machine::Config {
            timing: Timing {
                turn_start_timeout_ms: millis(args.turn_start_timeout),
                expiry_grace_ms: millis(args.lease_expiry_grace),
            },
            defaults: args.defaults.load(&args.prometheus_url),
            rollback_retry: RetryPolicy {
                attempts: args.rollback_retry_attempts.max(1),
                base: ROLLBACK_RETRY_BASE,
                cap: ROLLBACK_RETRY_CAP,
            },
            seed: rand::random(),
            issuer: format!("{ns}/{}", args.common.trigger_configmap),
        },
        rollout_observe_timeout: args.rollout_observe_timeout,
        rollback_timeout: args.rollback_timeout,
        helm: helm::Helm {
            bin: args.helm_bin.clone(),
            chart_ref: args.chart_ref.clone(),
            chart_repo: Some(args.chart_repo.clone()).filter(|s| !s.is_empty()),
        },
        leadership: Some(fence.clone()),
        metrics,
        prometheus_url: args.prometheus_url.clone(),
        prometheus_poll_interval: args.prometheus_poll_interval,
    };
    // Evictions are the coordinator's, not the agents' (chart README, RBAC): only the leader
    // drains, and only nodes the run has granted a draining turn.
    let _drainer = drainer::spawn(
        client.clone(),
        &ns,
        &args.common.trigger_configmap,
        klm_kube::events::Events::new(
            client.clone(),
            klm_protocol::keys::defaults::EVENT_REPORTER,
            Some(me.clone()),
        ),
        Some(fence.clone()),
    );
    let notify = Arc::new(Notify::new());
    let mut coordinator =
        driver::Coordinator::start(client, requests, settings, me.clone(), notify.clone()).await?;
    tracing::info!(namespace = %ns, "coordinator ready (leader)");
    let mut lost = std::pin::pin!(fence.lost());
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let busy = heartbeat.busy();
        let wake = match coordinator.reconcile().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed; retrying on the next change");
                Some(klm_protocol::lifecycle::Wake {
                    at_ms: time::mono_ms() + 2_000,
                    reason: klm_protocol::lifecycle::WakeReason::RetryAfterError,
                })
            }
        };
        drop(busy);
        // Each wake on its own clock (see `Wake::sleep_for`): a wall-clock step moves only a
        // maintenance window's opening, never a timeout.
        let sleep = wake
            .map(|w| w.sleep_for(time::now()))
            .unwrap_or(std::time::Duration::from_secs(3_600));
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            why = &mut lost => {
                anyhow::bail!("{why}; exiting so a fresh leader takes over from cluster state");
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down; releasing the leader Lease");
                if let Err(e) = held.release().await {
                    tracing::warn!(error = %e, "could not release the leader Lease; it expires on its own");
                }
                return Ok(());
            }
        }
    }
}

/// Added to the longest legitimate reconcile before `/healthz` calls the main loop wedged.
const WEDGE_MARGIN: std::time::Duration = std::time::Duration::from_secs(900);

/// First wait before retrying a failed `helm rollback`; doubles up to the cap.
const ROLLBACK_RETRY_BASE: std::time::Duration = std::time::Duration::from_secs(10);
const ROLLBACK_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(120);

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
