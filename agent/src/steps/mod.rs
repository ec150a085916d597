//! The walk through a turn's statuses (the pure order is `klm_protocol::procedure`), with the
//! bookkeeping steps that open and close a turn. Each step writes its status first (with the run
//! id and turn) and is idempotent, so a restarted agent resumes at the status the Node shows.
pub mod cordon;
pub mod drain;
pub mod restart;
pub mod verify;

use crate::ctx::{StepError, Stop, TurnCtx};
use crate::node_patch::{Bookkeeping, NodePatch};
use klm_kube::lease::transient;
use klm_protocol::backoff::jittered_with;
use klm_protocol::procedure::{may_uncordon, next_status};
use klm_protocol::verification::FailureCause;
use klm_protocol::{NodeStatus, TurnKind};
use std::time::Duration;
use tracing::{Instrument, error, info, info_span, warn};

/// Consecutive transient API failures of one step before the node is failed instead.
const MAX_TRANSIENT_RETRIES: u32 = 8;

/// How a walk ended (a `Stop` ends it without a final status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Final status written: `completed` / `rolled-back`.
    Succeeded,
    /// Final status written: `rolling-back` (upgrade) / `failed` (restore).
    Failed,
}

/// Walks the turn from `at` to its final status.
pub async fn execute(ctx: &mut TurnCtx<'_>, mut at: NodeStatus) -> Result<Outcome, Stop> {
    let mut retries = 0u32;
    loop {
        ctx.between_steps()?;
        let span = info_span!("step", step = %at);
        let result = run_step(ctx, at).instrument(span).await;
        match result {
            Ok(()) => {
                retries = 0;
                match next_status(ctx.a.kind, ctx.a.params.drain_enabled, at) {
                    Some(next) => at = next,
                    None => return Ok(Outcome::Succeeded),
                }
            }
            Err(StepError::Stop(stop)) => return Err(stop),
            Err(StepError::Failed(cause)) => {
                fail(ctx, at, cause).await?;
                return Ok(Outcome::Failed);
            }
            Err(StepError::Api { what, error })
                if transient(&error) && retries < MAX_TRANSIENT_RETRIES =>
            {
                let wait = jittered_with(
                    retries,
                    Duration::from_millis(250),
                    Duration::from_secs(8),
                    &mut rand::rng(),
                );
                retries += 1;
                warn!(step = %at, %what, error = %error, ?wait, "API call failed; retrying the step");
                tokio::select! {
                    stop = ctx.interrupted() => return Err(stop),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(StepError::Api { what, error }) => {
                error!(step = %at, %what, error = %error, "API call failed; failing the node");
                let cause = FailureCause {
                    reason: "ApiError".into(),
                    message: format!("{what}: {error}"),
                    exit_code: None,
                };
                fail(ctx, at, cause).await?;
                return Ok(Outcome::Failed);
            }
        }
    }
}

async fn run_step(ctx: &mut TurnCtx<'_>, at: NodeStatus) -> Result<(), StepError> {
    let kind = ctx.a.kind;
    match (kind, at) {
        (TurnKind::Upgrade, NodeStatus::Preparing) => prepare(ctx).await,
        (TurnKind::Upgrade, NodeStatus::Cordoned) => cordon::run(ctx).await,
        (TurnKind::Upgrade, NodeStatus::Draining) => {
            write_status(ctx, NodeStatus::Draining).await?;
            ctx.event(
                false,
                "Draining",
                format!("node {}: draining", ctx.node_name()),
            );
            drain::run(ctx).await
        }
        (TurnKind::Upgrade, NodeStatus::Upgrading) => {
            write_status(ctx, NodeStatus::Upgrading).await?;
            let want = ctx.a.want_hash().to_string();
            ctx.event(
                false,
                "RestartingKataDeploy",
                format!(
                    "node {}: restarting kata-deploy at revision {want} ({})",
                    ctx.node_name(),
                    ctx.a.target_version
                ),
            );
            let took = restart::run(ctx, &want).await?;
            ctx.evidence.restart_ms = Some(millis(took));
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

async fn write_status(ctx: &mut TurnCtx<'_>, status: NodeStatus) -> Result<(), StepError> {
    let patch = with_step_start(
        ctx,
        NodePatch::status(&ctx.a.run_id, ctx.a.kind, status),
        status,
    );
    ctx.patch_node(&format!("writing status {status}"), &patch)
        .await
}

/// Records when `status` began, unless the Node already records it for this turn (a resumed
/// step keeps its original start). Stored as `<status>@<RFC 3339>` so a start left by another
/// status or turn is never mistaken for this one.
fn with_step_start(ctx: &TurnCtx<'_>, patch: NodePatch, status: NodeStatus) -> NodePatch {
    if step_started(ctx, status).is_some() {
        patch
    } else {
        patch.step_started_at(&crate::node_patch::step_start_value(
            status,
            jiff::Timestamp::now(),
        ))
    }
}

/// When `status` began on this Node in this turn, if recorded.
fn step_started(ctx: &TurnCtx<'_>, status: NodeStatus) -> Option<jiff::Timestamp> {
    let bk = Bookkeeping::of(&ctx.node);
    if !bk.is_turn(&ctx.a.run_id, ctx.a.kind) {
        return None;
    }
    crate::node_patch::step_start_of(bk.step_started_at.as_deref()?, status)
}

/// When the time limit of the step the Node is in ends, counted from the step's recorded start
/// so an agent restarted mid-step does not get a fresh budget. Also returns the time already
/// spent.
pub fn step_deadline(ctx: &TurnCtx<'_>, limit: Duration) -> (tokio::time::Instant, Duration) {
    let status = Bookkeeping::of(&ctx.node).status;
    let elapsed = status
        .and_then(|st| step_started(ctx, st))
        .map(|t| {
            let ms = jiff::Timestamp::now().as_millisecond() - t.as_millisecond();
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        })
        .unwrap_or_default();
    (
        tokio::time::Instant::now() + limit.saturating_sub(elapsed),
        elapsed,
    )
}

/// The opening patch of a turn: status, run, turn, and started-at (kept when resuming).
fn opening(ctx: &TurnCtx<'_>, status: NodeStatus) -> NodePatch {
    let bk = Bookkeeping::of(&ctx.node);
    let patch = with_step_start(
        ctx,
        NodePatch::status(&ctx.a.run_id, ctx.a.kind, status).verification_pod(None),
        status,
    );
    let same_turn = bk.is_turn(&ctx.a.run_id, ctx.a.kind);
    match bk.started_at.filter(|_| same_turn) {
        Some(_) => patch,
        None => patch.started_at(&now_rfc3339()),
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
            ctx.a.target_version,
            ctx.a.run_id
        ),
    );
    Ok(())
}

/// Whole-turn duration: from the Node's started-at (survives agent restarts).
fn node_ms(ctx: &TurnCtx<'_>) -> u64 {
    let bk = Bookkeeping::of(&ctx.node);
    bk.started_at
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(|t| {
            u64::try_from(jiff::Timestamp::now().as_millisecond() - t.as_millisecond()).unwrap_or(0)
        })
        .unwrap_or_else(|| millis(ctx.began.elapsed()))
}

/// Adds the cordon outcome to the evidence and returns the closing patch's uncordon decision.
fn closing_cordon(ctx: &mut TurnCtx<'_>, patch: NodePatch, uncordon: bool) -> NodePatch {
    let bk = Bookkeeping::of(&ctx.node);
    if bk.foreign_cordon() {
        ctx.note(cordon::FOREIGN_CORDON_NOTE);
    }
    if uncordon && may_uncordon(bk.cordoned_by_us) {
        patch.uncordon()
    } else {
        patch
    }
}

/// `completed`: version, uncordon (only our cordon), evidence — one patch.
async fn complete(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    ctx.evidence.step = NodeStatus::Completed.as_str().into();
    ctx.evidence.succeeded = true;
    ctx.evidence.failure = None;
    ctx.evidence.node_ms = Some(node_ms(ctx));
    ctx.evidence.api_requests = Some(ctx.requests_so_far());
    let patch = NodePatch::status(&ctx.a.run_id, ctx.a.kind, NodeStatus::Completed)
        .current_version(&ctx.a.target_version)
        .verification_pod(None);
    let patch = closing_cordon(ctx, patch, true).evidence(&ctx.evidence.clone());
    ctx.patch_node("writing status completed", &patch).await?;
    info!(version = %ctx.a.target_version, node_ms = ctx.evidence.node_ms, "node upgraded and verified");
    ctx.event(
        false,
        "UpgradeCompleted",
        format!(
            "node {}: kata-deploy {} verified; node back in service",
            ctx.node_name(),
            ctx.a.target_version
        ),
    );
    Ok(())
}

/// Restore turn, `rolling-back`: claim the node, cordon it again if it is not, and restart
/// kata-deploy at the revision recorded before the run.
async fn restore(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let bk = Bookkeeping::of(&ctx.node);
    if let Some(prev) = bk.evidence.as_ref().filter(|e| {
        e.run_id == ctx.a.run_id && !e.succeeded && !bk.is_turn(&ctx.a.run_id, TurnKind::Restore)
    }) && let Some(f) = &prev.failure
    {
        ctx.note(format!(
            "upgrade turn failed at {}: {}: {}",
            prev.step, f.reason, f.message
        ));
    }
    let opening = opening(ctx, NodeStatus::RollingBack);
    let (patch, _) = cordon::with_cordon(ctx, opening);
    ctx.patch_node("writing status rolling-back", &patch)
        .await?;
    let want = ctx.a.want_hash().to_string();
    ctx.event(
        true,
        "Restoring",
        format!(
            "node {}: restoring kata-deploy to revision {want} ({})",
            ctx.node_name(),
            if ctx.a.release.recorded_version.is_empty() {
                "the recorded release"
            } else {
                &ctx.a.release.recorded_version
            }
        ),
    );
    let took = restart::run(ctx, &want).await?;
    ctx.evidence.restart_ms = Some(millis(took));
    Ok(())
}

/// Restore turn, `rolled-back`: recorded version, uncordon (only our cordon), evidence.
async fn restored(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    ctx.evidence.step = NodeStatus::RolledBack.as_str().into();
    ctx.evidence.succeeded = true;
    ctx.evidence.failure = None;
    ctx.evidence.node_ms = Some(node_ms(ctx));
    ctx.evidence.api_requests = Some(ctx.requests_so_far());
    let patch = NodePatch::status(&ctx.a.run_id, ctx.a.kind, NodeStatus::RolledBack)
        .current_version(&ctx.a.release.recorded_version)
        .verification_pod(None);
    let patch = closing_cordon(ctx, patch, true).evidence(&ctx.evidence.clone());
    ctx.patch_node("writing status rolled-back", &patch).await?;
    info!(version = %ctx.a.release.recorded_version, "node restored");
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
async fn fail(ctx: &mut TurnCtx<'_>, at: NodeStatus, cause: FailureCause) -> Result<(), Stop> {
    let end = match ctx.a.kind {
        TurnKind::Upgrade => NodeStatus::RollingBack,
        TurnKind::Restore => NodeStatus::Failed,
    };
    warn!(step = %at, reason = %cause.reason, message = %cause.message, "node failed");
    ctx.evidence.step = at.as_str().into();
    ctx.evidence.succeeded = false;
    ctx.evidence.node_ms = Some(node_ms(ctx));
    ctx.evidence.api_requests = Some(ctx.requests_so_far());
    let bk = Bookkeeping::of(&ctx.node);
    if bk.foreign_cordon() {
        ctx.note(cordon::FOREIGN_CORDON_NOTE);
    }
    let note = format!(
        "node {}: {} failed at {at}: {}: {}",
        ctx.node_name(),
        ctx.a.kind.as_str(),
        cause.reason,
        cause.message
    );
    ctx.evidence.failure = Some(cause);
    let patch = NodePatch::status(&ctx.a.run_id, ctx.a.kind, end)
        .verification_pod(None)
        .evidence(&ctx.evidence.clone());
    let mut attempt = 0u32;
    loop {
        match ctx
            .patch_node(&format!("writing status {end}"), &patch)
            .await
        {
            Ok(()) => break,
            Err(StepError::Stop(s)) => return Err(s),
            Err(StepError::Api { what, error }) if attempt < MAX_TRANSIENT_RETRIES => {
                let wait = jittered_with(
                    attempt,
                    Duration::from_millis(250),
                    Duration::from_secs(8),
                    &mut rand::rng(),
                );
                attempt += 1;
                warn!(%what, error = %error, ?wait, "could not record the failure; retrying");
                tokio::select! {
                    stop = ctx.interrupted() => return Err(stop),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(StepError::Api { what, error }) => {
                // Keep the Lease (not renewed) rather than hand over with no status: the
                // coordinator fails the node when the Lease expires.
                error!(%what, error = %error, "could not record the failure; giving up");
                return Err(Stop::Abandoned(format!(
                    "could not record the failure: {error}"
                )));
            }
            Err(StepError::Failed(_)) => unreachable!("patch_node does not judge"),
        }
    }
    ctx.event(
        true,
        match ctx.a.kind {
            TurnKind::Upgrade => "UpgradeFailed",
            TurnKind::Restore => "RestoreFailed",
        },
        note,
    );
    Ok(())
}
