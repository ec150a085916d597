//! The walk through a turn's statuses (the pure order is `klm_protocol::procedure`), with the
//! bookkeeping steps that open and close a turn. Each step writes its status first (with the run
//! id and turn) and is idempotent, so a restarted agent resumes at the status the Node shows.
//! The work of each step is a pure machine in `klm_protocol` (`drain`, `restart`,
//! `verification`) driven by a short observe → decide → act loop in the step's file here.
pub mod cordon;
pub mod drain;
pub mod restart;
pub mod verify;

use crate::ctx::{StepError, Stop, TurnCtx};
use backon::BackoffBuilder;
use klm_kube::lease::transient;
use klm_kube::time::mono_ms;
use klm_protocol::node_record::NodePatch;
use klm_protocol::procedure::{Attempt, Walk, WalkNext, after_attempt, cancelled, may_uncordon};
use klm_protocol::verification::FailureCause;
use klm_protocol::{NodeStatus, TurnKind};
use std::time::Duration;
use tracing::{Instrument, error, info, info_span, warn};

/// Consecutive transient API failures of one step before the node is failed instead.
const MAX_TRANSIENT_RETRIES: usize = 8;

/// How a walk ended (a `Stop` ends it without a final status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Final status written: `completed` / `rolled-back`.
    Succeeded,
    /// Final status written: `rolling-back` (upgrade) / `failed` (restore).
    Failed,
}

fn retries() -> impl Iterator<Item = Duration> {
    klm_kube::retry::backoff(Duration::from_millis(250), Duration::from_secs(8))
        .with_max_times(MAX_TRANSIENT_RETRIES)
        .build()
}

/// Walks the turn from `at` to its final status: run the move, let
/// `procedure::after_attempt` decide the next one (next status, record the failure, retry a
/// transient API error after a backoff, or abandon), perform it.
pub async fn execute(ctx: &mut TurnCtx<'_>, at: NodeStatus) -> Result<Outcome, Stop> {
    let mut backoff = retries();
    let mut walk = Walk::Step(at);
    loop {
        let result = match &walk {
            Walk::Step(at) => {
                ctx.between_steps()?;
                if ctx.cancel_requested() {
                    Err(StepError::Failed(cancelled(format!(
                        "the run was cancelled; stopped before {at}"
                    ))))
                } else {
                    let began = std::time::Instant::now();
                    let result = run_step(ctx, *at)
                        .instrument(info_span!("step", step = %at))
                        .await;
                    measure(ctx, *at, began.elapsed(), &result);
                    result
                }
            }
            Walk::Failing(at, cause) => fail(ctx, *at, cause.clone()).await,
        };
        let attempt = match result {
            Ok(()) => Attempt::Done,
            Err(StepError::Stop(stop)) => return Err(stop),
            Err(StepError::Failed(cause)) => Attempt::Failed(cause),
            Err(StepError::Api { what, error }) => {
                warn!(%what, error = %error, "API call failed");
                Attempt::ApiError {
                    message: format!("{what}: {error}"),
                    transient: transient(&error),
                }
            }
        };
        let wait = backoff.next();
        match after_attempt(
            ctx.kind(),
            ctx.rec.a.params.drain_enabled,
            walk,
            attempt,
            wait.is_some(),
        ) {
            WalkNext::Go(next) => {
                backoff = retries();
                walk = next;
            }
            WalkNext::Retry(same) => {
                let wait = wait.unwrap_or_default();
                info!(?wait, "retrying after a transient API error");
                ctx.pause(wait).await?;
                walk = same;
            }
            WalkNext::Finished { succeeded: true } => return Ok(Outcome::Succeeded),
            WalkNext::Finished { succeeded: false } => return Ok(Outcome::Failed),
            // Keep the Lease (not renewed) rather than hand over with no status: the
            // coordinator fails the node when the Lease expires.
            WalkNext::Abandon(why) => {
                error!(%why, "giving up on the turn");
                return Err(Stop::Abandoned(why));
            }
        }
    }
}

async fn run_step(ctx: &mut TurnCtx<'_>, at: NodeStatus) -> Result<(), StepError> {
    match (ctx.kind(), at) {
        (TurnKind::Upgrade, NodeStatus::Preparing) => prepare(ctx).await,
        (TurnKind::Upgrade, NodeStatus::Cordoned) => cordon::run(ctx).await,
        (TurnKind::Upgrade, NodeStatus::Draining) => {
            // The status and the request to the coordinator's drainer in one write.
            let status = ctx.rec.status(NodeStatus::Draining);
            let patch = with_step_start(ctx, status, NodeStatus::Draining)
                .drain_request(Some(&drain::request(ctx)));
            ctx.patch_node("writing status draining", &patch).await?;
            ctx.event(
                false,
                "Draining",
                format!("node {}: draining", ctx.node_name()),
            );
            drain::run(ctx).await
        }
        (TurnKind::Upgrade, NodeStatus::Upgrading) if job_mode(ctx) => {
            // Listed before the node says it waits: the coordinator's install comes after.
            let earlier = crate::install::earlier_jobs(ctx).await?;
            write_status(ctx, NodeStatus::Upgrading).await?;
            let version = ctx.rec.a.target_version.clone();
            ctx.event(
                false,
                "AwaitingInstall",
                format!(
                    "node {}: waiting for kata-deploy's install of {version} on it (job mode)",
                    ctx.node_name()
                ),
            );
            let took = crate::install::wait(ctx, &earlier, &version).await?;
            ctx.rec.evidence.restart_ms = Some(millis(took));
            Ok(())
        }
        (TurnKind::Upgrade, NodeStatus::Upgrading) => {
            write_status(ctx, NodeStatus::Upgrading).await?;
            let want = ctx.rec.a.want_hash().to_string();
            ctx.event(
                false,
                "RestartingKataDeploy",
                format!(
                    "node {}: restarting kata-deploy at revision {want} ({})",
                    ctx.node_name(),
                    ctx.rec.a.target_version
                ),
            );
            let took = restart::run(ctx, &want).await?;
            ctx.rec.evidence.restart_ms = Some(millis(took));
            Ok(())
        }
        (TurnKind::Upgrade, NodeStatus::Verifying) => verify::run(ctx).await,
        (TurnKind::Upgrade, NodeStatus::Completed) => complete(ctx).await,
        (TurnKind::Restore, NodeStatus::RollingBack) => restore(ctx).await,
        (TurnKind::Restore, NodeStatus::RolledBack) => restored(ctx).await,
        (kind, at) => Err(crate::ctx::failure(
            "UnexpectedStatus",
            format!(
                "a {} turn cannot run from status {at}; this is a bug in kata-lifecycle-manager",
                kind.as_str()
            ),
        )),
    }
}

/// Metrics of a step that ran to an end: its duration, and a verification's outcome. A step
/// stopped (shutdown, revoked, Lease lost) or retried after an API error did not end.
fn measure(ctx: &TurnCtx<'_>, at: NodeStatus, took: Duration, result: &Result<(), StepError>) {
    let failure = match result {
        Ok(()) => None,
        Err(StepError::Failed(cause)) => Some(cause),
        Err(StepError::Stop(_) | StepError::Api { .. }) => return,
    };
    let metrics = &ctx.agent.metrics;
    if let Some(step) = crate::metrics::step_label(at) {
        metrics.step(step, took);
    }
    if at == NodeStatus::Verifying {
        metrics.verification(failure);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// kata-deploy runs in job mode: installs are per-node Jobs, not a DaemonSet pod restart.
fn job_mode(ctx: &TurnCtx<'_>) -> bool {
    ctx.rec.a.release.mode == klm_protocol::kata_deploy::DeploymentMode::Job
}

async fn write_status(ctx: &mut TurnCtx<'_>, status: NodeStatus) -> Result<(), StepError> {
    let patch = with_step_start(ctx, ctx.rec.status(status), status);
    ctx.patch_node(&format!("writing status {status}"), &patch)
        .await
}

/// Records when `status` began, unless the Node already records it for this turn (a resumed
/// step keeps its original start).
fn with_step_start(ctx: &TurnCtx<'_>, patch: NodePatch, status: NodeStatus) -> NodePatch {
    if ctx.rec.step_started(status).is_some() {
        patch
    } else {
        patch.step_started_at(status, jiff::Timestamp::now())
    }
}

/// The opening patch of a turn: status, run, turn, and started-at (kept when resuming).
fn opening(ctx: &TurnCtx<'_>, status: NodeStatus) -> NodePatch {
    let rec = ctx.rec.record();
    let patch = with_step_start(ctx, ctx.rec.status(status).verification_pod(None), status);
    let same_turn = rec.is_turn(&ctx.rec.a.run_id, ctx.kind());
    match rec.started_at.filter(|_| same_turn) {
        Some(_) => patch,
        None => patch.started_at(jiff::Timestamp::now()),
    }
}

/// `preparing`: claim the node for this run's upgrade turn.
async fn prepare(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let patch = opening(ctx, NodeStatus::Preparing);
    ctx.patch_node("writing status preparing", &patch).await?;
    ctx.event(
        false,
        "UpgradeStarted",
        format!(
            "node {}: upgrading kata-deploy to {} (run {})",
            ctx.node_name(),
            ctx.rec.a.target_version,
            ctx.rec.a.run_id
        ),
    );
    Ok(())
}

/// Whole-turn duration: from the Node's started-at (survives agent restarts).
fn node_ms(ctx: &TurnCtx<'_>) -> u64 {
    match ctx.rec.record().started_at {
        Some(t) => u64::try_from(
            jiff::Timestamp::now()
                .as_millisecond()
                .saturating_sub(t.as_millisecond()),
        )
        .unwrap_or(0),
        None => u64::try_from(mono_ms().saturating_sub(ctx.rec.began_ms)).unwrap_or(0),
    }
}

/// Adds the cordon outcome to the evidence and returns the closing patch's uncordon decision.
fn closing_cordon(ctx: &mut TurnCtx<'_>, patch: NodePatch) -> NodePatch {
    let rec = ctx.rec.record();
    if rec.foreign_cordon() {
        ctx.rec.note(cordon::FOREIGN_CORDON_NOTE);
    }
    if may_uncordon(rec.cordoned_by_us) {
        patch.uncordon()
    } else {
        patch
    }
}

/// The evidence of a turn that ends at `step`.
fn close_evidence(ctx: &mut TurnCtx<'_>, step: NodeStatus, failure: Option<FailureCause>) {
    ctx.rec.evidence.step = step.as_str().into();
    ctx.rec.evidence.succeeded = failure.is_none();
    ctx.rec.evidence.failure = failure;
    ctx.rec.evidence.node_ms = Some(node_ms(ctx));
    ctx.rec.evidence.api_requests = Some(ctx.requests_so_far());
}

/// `completed`: version, uncordon (only our cordon), evidence — one patch.
async fn complete(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    close_evidence(ctx, NodeStatus::Completed, None);
    let patch = ctx
        .rec
        .status(NodeStatus::Completed)
        .current_version(&ctx.rec.a.target_version)
        .verification_pod(None);
    let patch = closing_cordon(ctx, patch).evidence(&ctx.rec.evidence);
    ctx.patch_node("writing status completed", &patch).await?;
    info!(version = %ctx.rec.a.target_version, node_ms = ctx.rec.evidence.node_ms, "node upgraded and verified");
    ctx.event(
        false,
        "UpgradeCompleted",
        format!(
            "node {}: kata-deploy {} verified; node back in service",
            ctx.node_name(),
            ctx.rec.a.target_version
        ),
    );
    Ok(())
}

/// Restore turn, `rolling-back`: claim the node, cordon it again if it is not, and restart
/// kata-deploy at the revision recorded before the run.
async fn restore(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let rec = ctx.rec.record();
    let run_id = ctx.rec.a.run_id.clone();
    if let Some(prev) = rec
        .evidence
        .as_ref()
        .filter(|e| e.run_id == run_id && !e.succeeded && !rec.is_turn(&run_id, TurnKind::Restore))
        && let Some(f) = &prev.failure
    {
        ctx.rec.note(format!(
            "upgrade turn failed at {}: {}: {}",
            prev.step, f.reason, f.message
        ));
        // The restore's evidence replaces the upgrade's on the Node: keep what the failed
        // verification showed (pod, phase, log tail, duration) so the reason for the rollback
        // stays readable.
        let ev = &mut ctx.rec.evidence;
        ev.pod = prev.pod.clone();
        ev.phase = prev.phase.clone();
        ev.log_tail = prev.log_tail.clone();
        ev.verification_ms = prev.verification_ms;
    }
    let earlier = if job_mode(ctx) {
        Some(crate::install::earlier_jobs(ctx).await?)
    } else {
        None
    };
    let opening = opening(ctx, NodeStatus::RollingBack);
    let (patch, _) = cordon::with_cordon(ctx, opening);
    ctx.patch_node("writing status rolling-back", &patch)
        .await?;
    if let Some(earlier) = earlier {
        let version = ctx.rec.a.release.recorded_version.clone();
        ctx.event(
            true,
            "Restoring",
            format!(
                "node {}: waiting for kata-deploy's reinstall of {version} on it (job mode)",
                ctx.node_name()
            ),
        );
        let took = crate::install::wait(ctx, &earlier, &version).await?;
        ctx.rec.evidence.restart_ms = Some(millis(took));
        return Ok(());
    }
    let want = ctx.rec.a.want_hash().to_string();
    let release = &ctx.rec.a.release;
    let version = if release.recorded_version.is_empty() {
        "the recorded release".to_string()
    } else {
        release.recorded_version.clone()
    };
    ctx.event(
        true,
        "Restoring",
        format!(
            "node {}: restoring kata-deploy to revision {want} ({version})",
            ctx.node_name()
        ),
    );
    let took = restart::run(ctx, &want).await?;
    ctx.rec.evidence.restart_ms = Some(millis(took));
    Ok(())
}

/// Restore turn, `rolled-back`: recorded version, uncordon (only our cordon), evidence.
async fn restored(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    close_evidence(ctx, NodeStatus::RolledBack, None);
    let patch = ctx
        .rec
        .status(NodeStatus::RolledBack)
        .current_version(&ctx.rec.a.release.recorded_version)
        .verification_pod(None);
    let patch = closing_cordon(ctx, patch).evidence(&ctx.rec.evidence);
    ctx.patch_node("writing status rolled-back", &patch).await?;
    info!(version = %ctx.rec.a.release.recorded_version, "node restored");
    ctx.event(
        false,
        "Restored",
        format!(
            "node {}: kata-deploy restored to the recorded revision; node back in service",
            ctx.node_name()
        ),
    );
    Ok(())
}

/// A step failed: evidence and the failure status in one patch, keeping the node cordoned.
/// Upgrade turns end in `rolling-back` (the coordinator rolls the release back and grants a
/// restore turn); restore turns end in `failed` (left cordoned for a human).
async fn fail(ctx: &mut TurnCtx<'_>, at: NodeStatus, cause: FailureCause) -> Result<(), StepError> {
    let end = match ctx.kind() {
        TurnKind::Upgrade => NodeStatus::RollingBack,
        TurnKind::Restore => NodeStatus::Failed,
    };
    warn!(step = %at, reason = %cause.reason, message = %cause.message, "node failed");
    if ctx.rec.record().foreign_cordon() {
        ctx.rec.note(cordon::FOREIGN_CORDON_NOTE);
    }
    let note = format!(
        "node {}: {} failed at {at}: {}: {}",
        ctx.node_name(),
        ctx.kind().as_str(),
        cause.reason,
        cause.message
    );
    close_evidence(ctx, at, Some(cause));
    let patch = ctx
        .rec
        .status(end)
        .verification_pod(None)
        .evidence(&ctx.rec.evidence);
    ctx.patch_node(&format!("writing status {end}"), &patch)
        .await?;
    ctx.event(
        true,
        match ctx.kind() {
            TurnKind::Upgrade => "UpgradeFailed",
            TurnKind::Restore => "RestoreFailed",
        },
        note,
    );
    Ok(())
}
