//! `cordoned`: make the node unschedulable, remembering whether the cordon is ours. A node
//! someone else cordoned is left as it is, now and afterwards.
use crate::ctx::{StepError, TurnCtx};
use klm_protocol::NodeStatus;
use klm_protocol::node_record::NodePatch;
use klm_protocol::procedure::{CordonPlan, cordon_plan};
use tracing::info;

pub const FOREIGN_CORDON_NOTE: &str = "node was already cordoned by someone else; left cordoned";

/// Adds the cordon (when needed) to `patch`, which carries this step's status.
pub fn with_cordon(ctx: &mut TurnCtx<'_>, patch: NodePatch) -> (NodePatch, CordonPlan) {
    let rec = ctx.rec.record();
    let plan = cordon_plan(rec.unschedulable, rec.cordoned_by_us);
    match plan {
        CordonPlan::Cordon => (patch.cordon(), plan),
        CordonPlan::AlreadyOurs => (patch, plan),
        CordonPlan::Foreign => {
            ctx.rec.note(FOREIGN_CORDON_NOTE);
            (patch, plan)
        }
    }
}

/// The upgrade turn's `cordoned` step: status and cordon in one patch.
pub async fn run(ctx: &mut TurnCtx<'_>) -> Result<(), StepError> {
    let status = ctx.rec.status(NodeStatus::Cordoned);
    let (patch, plan) = with_cordon(ctx, status);
    ctx.patch_node("cordoning the node", &patch).await?;
    let note = match plan {
        CordonPlan::Cordon => "cordoned the node",
        CordonPlan::AlreadyOurs => "node already cordoned by us",
        CordonPlan::Foreign => FOREIGN_CORDON_NOTE,
    };
    info!(plan = ?plan, "{note}");
    ctx.event(
        false,
        "Cordoned",
        format!("node {}: {note}", ctx.node_name()),
    );
    Ok(())
}
