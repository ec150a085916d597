//! Job mode (`deploymentMode: job`, kata-deploy ≥ 3.32.0): installing Kata on the nodes of a
//! turn. The chart has no long-running pod per node; its dispatcher hook (post-install /
//! post-upgrade) creates one install Job per node listed in `job.nodes`. So a run installs on a
//! node by one scoped `helm upgrade … --set job.nodes={<node>}` issued once that node's agent
//! cordoned (and drained) it, and the agent then waits for that node's install Job and the
//! `katacontainers.io/kata-runtime=true` label kata-deploy's `label` stage sets.
//!
//! Two pure decisions live here:
//! - [`InstallLedger`] / [`next_install`]: which scoped upgrade the coordinator issues, recorded
//!   in the run record before helm runs, so a restarted coordinator never issues one twice and
//!   tells from the release history whether the one it issued happened;
//! - [`judge`]: the agent's verdict on its node's install from the install Jobs and the label.
use crate::run::TurnKind;
use crate::verification::FailureCause;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Label of the per-node Jobs kata-deploy's dispatcher creates (from the chart's
/// `kata-deploy-job-templates` ConfigMap): `install` or `cleanup`.
pub const STAGE_LABEL: &str = "kata-deploy/stage";
/// Label of the dispatcher hook Job (`install` for the post-install/post-upgrade one).
pub const DISPATCHER_LABEL: &str = "kata-deploy/dispatcher";
/// The release a per-node Job belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

/// `job.nodes={a,b}` for `--set`: the chart's `job.nodes` is a list (the dispatcher hook passes
/// it as `--nodes={{ join "," $nodes }}`), which `--set` writes with braces. Node names are DNS
/// subdomains, so none contains `,`, `{` or `}`. Never called with an empty set: an empty
/// `job.nodes` means "every selected node" to the chart.
pub fn job_nodes_set_value(nodes: &BTreeSet<String>) -> String {
    let list: Vec<&str> = nodes.iter().map(String::as_str).collect();
    format!("job.nodes={{{}}}", list.join(","))
}

/// One scoped `helm upgrade` a run issued: install `version` on `nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallRequest {
    /// A set, so that a wave of nodes is one request.
    pub nodes: BTreeSet<String>,
    /// Upgrade turns install the target; restore turns the recorded version and values.
    pub kind: TurnKind,
    pub version: String,
    /// The release's latest revision when the request was issued: a deployed revision past it
    /// at `version` is this request done.
    pub issued_at_revision: u32,
    /// The revision it produced, once seen deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// Why it did not produce a deployed revision, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl InstallRequest {
    pub fn is_open(&self) -> bool {
        self.revision.is_none() && self.failed.is_none()
    }
}

/// Every scoped upgrade the run issued, in order (kept in the run record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallLedger {
    pub requests: Vec<InstallRequest>,
}

impl InstallLedger {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The open request covering `node` for this kind of turn.
    pub fn for_node_mut(&mut self, node: &str, kind: TurnKind) -> Option<&mut InstallRequest> {
        self.requests
            .iter_mut()
            .rev()
            .find(|r| r.kind == kind && r.nodes.contains(node))
    }

    /// The request covering `node` for this kind of turn, if one was issued.
    pub fn for_node(&self, node: &str, kind: TurnKind) -> Option<&InstallRequest> {
        self.requests
            .iter()
            .rev()
            .find(|r| r.kind == kind && r.nodes.contains(node))
    }

    /// Nodes an upgrade was installed on (or may have been: issued, not known to have failed
    /// before changing the release): the nodes a rollback must restore.
    pub fn upgraded_nodes(&self) -> BTreeSet<String> {
        self.requests
            .iter()
            .filter(|r| r.kind == TurnKind::Upgrade)
            .flat_map(|r| r.nodes.iter().cloned())
            .collect()
    }
}

/// The latest release revision, as helm reports it, for [`next_install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseAt {
    pub revision: u32,
    pub version: String,
    pub deployed: bool,
}

/// What the coordinator does for nodes whose agents wait for an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallStep {
    /// Record this request (persisted first), then issue its scoped `helm upgrade`.
    Issue(InstallRequest),
    /// The request for these nodes was issued and helm is (or may be) still running: wait for
    /// its answer, or, after a restart, for the release to show it.
    Wait,
    /// The release shows the request done at this revision: the agents judge their nodes.
    Done { revision: u32 },
    /// The request did not install (helm failed, or was interrupted before changing anything):
    /// the nodes' turns fail and the run rolls back.
    Failed {
        reason: String,
        /// The release never moved past the revision the request was issued at: helm changed
        /// nothing, so no dispatcher ran and no install Job will come for these nodes — their
        /// agents would only wait for their install until it times out. The coordinator fails
        /// their turns now (as for a lost node, the helm error as evidence). When the release
        /// moved, a dispatcher may have run: the agents judge from the install Jobs (a failed
        /// one at once). `false` for a failure recorded earlier: already acted upon.
        nothing_dispatched: bool,
    },
}

/// Decides the install for `nodes` (all waiting, same turn kind) from the ledger and a fresh
/// read of the release. `helm_running` says whether this process is waiting for the helm call
/// it made; `helm_error` is that call's error, once answered. Never a second request for a node
/// that has one: helm history, not a retry, says what became of it.
pub fn next_install(
    ledger: &InstallLedger,
    nodes: &BTreeSet<String>,
    kind: TurnKind,
    version: &str,
    release: &ReleaseAt,
    helm_running: bool,
    helm_error: Option<&str>,
) -> InstallStep {
    let issued = nodes.iter().filter_map(|n| ledger.for_node(n, kind)).next();
    let Some(request) = issued else {
        return InstallStep::Issue(InstallRequest {
            nodes: nodes.clone(),
            kind,
            version: version.to_string(),
            issued_at_revision: release.revision,
            revision: None,
            failed: None,
        });
    };
    if let Some(revision) = request.revision {
        return InstallStep::Done { revision };
    }
    if let Some(reason) = &request.failed {
        return InstallStep::Failed {
            reason: reason.clone(),
            nothing_dispatched: false,
        };
    }
    if helm_running {
        return InstallStep::Wait;
    }
    let moved = release.revision > request.issued_at_revision;
    if moved && release.deployed && release.version == request.version {
        return InstallStep::Done {
            revision: release.revision,
        };
    }
    let nodes_text = request.nodes.iter().cloned().collect::<Vec<_>>().join(", ");
    let reason = match (helm_error, moved) {
        (Some(e), _) => format!(
            "the scoped helm upgrade installing {} on {nodes_text} failed: {e}",
            request.version
        ),
        (None, true) => format!(
            "the scoped helm upgrade installing {} on {nodes_text} left the release at revision {} ({}, {}), \
             not a deployed {}",
            request.version,
            release.revision,
            release.version,
            if release.deployed {
                "deployed"
            } else {
                "not deployed"
            },
            request.version
        ),
        (None, false) => format!(
            "the scoped helm upgrade installing {} on {nodes_text} was interrupted before it changed the release \
             (still revision {})",
            request.version, release.revision
        ),
    };
    InstallStep::Failed {
        reason,
        nothing_dispatched: !moved,
    }
}

/// A per-node install Job of the release, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallJob {
    pub uid: String,
    pub name: String,
    /// `spec.template.spec.nodeName`: the dispatcher pins each Job to its node.
    pub node: String,
    pub complete: bool,
    /// The `Failed` condition's reason and message, when the Job failed.
    pub failed: Option<(String, String)>,
}

/// The agent's verdict on its node's install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallVerdict {
    /// Not finished; says what is awaited.
    Waiting(String),
    /// The install Job succeeded and the node is labelled installed.
    Installed {
        job: String,
    },
    Failed(FailureCause),
}

/// Judges `node`'s install from the release's per-node install Jobs and the node's
/// `katacontainers.io/kata-runtime` label. `stale` holds the uids of install Jobs that existed
/// before this install was requested (an earlier install's Job stays until its TTL): they say
/// nothing about this install. Clock-free on purpose: no creation time is compared with ours.
pub fn judge(
    node: &str,
    jobs: &[InstallJob],
    stale: &BTreeSet<String>,
    runtime_label: Option<&str>,
) -> InstallVerdict {
    let fresh: Vec<&InstallJob> = jobs
        .iter()
        .filter(|j| j.node == node && !stale.contains(&j.uid))
        .collect();
    if let Some(job) = fresh.iter().find(|j| j.failed.is_some()) {
        let (reason, message) = job.failed.clone().unwrap_or_default();
        return InstallVerdict::Failed(FailureCause {
            reason: "InstallJobFailed".into(),
            message: format!(
                "kata-deploy's install Job {} on {node} failed ({reason}): {message}",
                job.name
            ),
            exit_code: None,
        });
    }
    let Some(job) = fresh.iter().find(|j| j.complete) else {
        return InstallVerdict::Waiting(match fresh.first() {
            Some(j) => format!("install Job {} on {node} is running", j.name),
            None => format!("no install Job for {node} yet (kata-deploy's dispatcher creates it)"),
        });
    };
    if runtime_label != Some("true") {
        return InstallVerdict::Waiting(format!(
            "install Job {} completed; waiting for {}=true on {node} (now {})",
            job.name,
            crate::keys::node::KATA_RUNTIME_LABEL,
            runtime_label.map_or("absent".to_string(), |v| format!("{v:?}"))
        ));
    }
    InstallVerdict::Installed {
        job: job.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    fn at(revision: u32, version: &str, deployed: bool) -> ReleaseAt {
        ReleaseAt {
            revision,
            version: version.into(),
            deployed,
        }
    }

    #[test]
    fn job_nodes_is_a_list_value() {
        assert_eq!(
            job_nodes_set_value(&set(&["node-2", "node-1"])),
            "job.nodes={node-1,node-2}"
        );
        assert_eq!(job_nodes_set_value(&set(&["n"])), "job.nodes={n}");
    }

    #[test]
    fn an_install_request_is_issued_once_per_node_and_judged_from_the_history() {
        let mut ledger = InstallLedger::default();
        let n1 = set(&["n1"]);
        let up = TurnKind::Upgrade;
        let InstallStep::Issue(req) = next_install(
            &ledger,
            &n1,
            up,
            "4.0.0",
            &at(3, "3.32.0", true),
            false,
            None,
        ) else {
            panic!("first decision issues");
        };
        assert_eq!(req.issued_at_revision, 3);
        ledger.requests.push(req);
        // Issued, helm running: wait; never a second request.
        assert_eq!(
            next_install(
                &ledger,
                &n1,
                up,
                "4.0.0",
                &at(3, "3.32.0", true),
                true,
                None
            ),
            InstallStep::Wait
        );
        // A restarted coordinator (no helm running) reads the history: revision 4 deployed at
        // the target is the request done.
        assert_eq!(
            next_install(
                &ledger,
                &n1,
                up,
                "4.0.0",
                &at(4, "4.0.0", true),
                false,
                None
            ),
            InstallStep::Done { revision: 4 }
        );
        // Interrupted before it changed anything: a failure, not a second upgrade.
        let InstallStep::Failed { reason, .. } = next_install(
            &ledger,
            &n1,
            up,
            "4.0.0",
            &at(3, "3.32.0", true),
            false,
            None,
        ) else {
            panic!("no re-issue");
        };
        assert!(reason.contains("interrupted"), "{reason}");
        // The dispatcher hook failed (a node's install Job failed): helm says so.
        let InstallStep::Failed { reason, .. } = next_install(
            &ledger,
            &n1,
            up,
            "4.0.0",
            &at(4, "4.0.0", false),
            false,
            Some("post-upgrade hooks failed"),
        ) else {
            panic!("helm error");
        };
        assert!(
            reason.contains("hooks failed") && reason.contains("n1"),
            "{reason}"
        );
        // Once recorded done, done for good; the next node gets its own request.
        ledger.requests[0].revision = Some(4);
        assert_eq!(
            next_install(
                &ledger,
                &n1,
                up,
                "4.0.0",
                &at(6, "4.0.0", true),
                false,
                None
            ),
            InstallStep::Done { revision: 4 }
        );
        assert!(matches!(
            next_install(&ledger, &set(&["n2"]), up, "4.0.0", &at(4, "4.0.0", true), false, None),
            InstallStep::Issue(r) if r.nodes == set(&["n2"]) && r.issued_at_revision == 4
        ));
        // A restore of n1 is another kind of request.
        assert!(matches!(
            next_install(
                &ledger,
                &n1,
                TurnKind::Restore,
                "3.32.0",
                &at(5, "4.0.0", true),
                false,
                None
            ),
            InstallStep::Issue(r) if r.kind == TurnKind::Restore && r.version == "3.32.0"
        ));
    }

    /// Issue 10 (job mode limit): a scoped upgrade whose helm call failed before it changed the
    /// release dispatched nothing, so the node's turn fails now rather than when its agent's
    /// install wait times out; one that moved the release (e.g. its dispatcher hook failed) is
    /// judged by the agent from the install Jobs.
    #[test]
    fn a_helm_failure_that_changed_nothing_fails_the_nodes_at_once() {
        let n1 = set(&["n1"]);
        let mut ledger = InstallLedger::default();
        for kind in [TurnKind::Upgrade, TurnKind::Restore] {
            ledger.requests.push(InstallRequest {
                nodes: n1.clone(),
                kind,
                version: "4.0.0".into(),
                issued_at_revision: 3,
                revision: None,
                failed: None,
            });
            let decide = |ledger: &InstallLedger, release: ReleaseAt, error: Option<&str>| {
                next_install(ledger, &n1, kind, "4.0.0", &release, false, error)
            };
            // Chart not found, API refused, …: still revision 3.
            let step = decide(
                &ledger,
                at(3, "3.32.0", true),
                Some("chart \"kata-deploy\" not found"),
            );
            assert!(
                matches!(&step, InstallStep::Failed { reason, nothing_dispatched: true }
                    if reason.contains("not found") && reason.contains("n1")),
                "{kind:?}: {step:?}"
            );
            // Interrupted before it changed anything: no Job will come either.
            let step = decide(&ledger, at(3, "3.32.0", true), None);
            assert!(
                matches!(
                    step,
                    InstallStep::Failed {
                        nothing_dispatched: true,
                        ..
                    }
                ),
                "{kind:?}: {step:?}"
            );
            // The release moved (revision 4 failed: its hook failed): the agent judges the Jobs.
            let step = decide(
                &ledger,
                at(4, "4.0.0", false),
                Some("post-upgrade hooks failed"),
            );
            assert!(
                matches!(
                    step,
                    InstallStep::Failed {
                        nothing_dispatched: false,
                        ..
                    }
                ),
                "{kind:?}: {step:?}"
            );
            let step = decide(&ledger, at(4, "3.99.0", true), None);
            assert!(
                matches!(
                    step,
                    InstallStep::Failed {
                        nothing_dispatched: false,
                        ..
                    }
                ),
                "{kind:?}: {step:?}"
            );
            // A failure already recorded was acted upon when it was decided.
            ledger.requests.last_mut().unwrap().failed = Some("earlier".into());
            let step = decide(&ledger, at(3, "3.32.0", true), None);
            assert_eq!(
                step,
                InstallStep::Failed {
                    reason: "earlier".into(),
                    nothing_dispatched: false
                },
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_restore_covers_exactly_the_nodes_an_upgrade_was_requested_for() {
        let req = |nodes: &[&str], kind| InstallRequest {
            nodes: set(nodes),
            kind,
            version: "v".into(),
            issued_at_revision: 1,
            revision: None,
            failed: None,
        };
        let ledger = InstallLedger {
            requests: vec![
                req(&["n1"], TurnKind::Upgrade),
                req(&["n2"], TurnKind::Upgrade),
                req(&["n1"], TurnKind::Restore),
            ],
        };
        // n2's failed upgrade may have installed before failing: it is restored too; n3 never
        // had a request and is untouched.
        assert_eq!(ledger.upgraded_nodes(), set(&["n1", "n2"]));
    }

    fn job(uid: &str, node: &str, complete: bool, failed: bool) -> InstallJob {
        InstallJob {
            uid: uid.into(),
            name: format!("kata-deploy-install-{node}"),
            node: node.into(),
            complete,
            failed: failed.then(|| {
                (
                    "BackoffLimitExceeded".into(),
                    "Job has reached the specified backoff limit".into(),
                )
            }),
        }
    }

    #[test]
    fn the_install_judge() {
        let none = BTreeSet::new();
        // Nothing yet, running, then complete but the label not yet true.
        assert!(
            matches!(judge("n1", &[], &none, Some("true")), InstallVerdict::Waiting(w) if w.contains("no install Job"))
        );
        assert!(matches!(
            judge("n1", &[job("u1", "n1", false, false)], &none, Some("false")),
            InstallVerdict::Waiting(w) if w.contains("running")
        ));
        assert!(matches!(
            judge("n1", &[job("u1", "n1", true, false)], &none, Some("false")),
            InstallVerdict::Waiting(w) if w.contains("katacontainers.io/kata-runtime=true")
        ));
        assert_eq!(
            judge("n1", &[job("u1", "n1", true, false)], &none, Some("true")),
            InstallVerdict::Installed {
                job: "kata-deploy-install-n1".into()
            }
        );
        // A failed Job fails the install with evidence, whatever the label says.
        match judge("n1", &[job("u1", "n1", false, true)], &none, Some("true")) {
            InstallVerdict::Failed(c) => {
                assert_eq!(c.reason, "InstallJobFailed");
                assert!(c.message.contains("BackoffLimitExceeded"), "{}", c.message);
            }
            v => panic!("{v:?}"),
        }
        // An earlier install's completed Job, or another node's, says nothing.
        let stale: BTreeSet<String> = set(&["old"]);
        assert!(matches!(
            judge(
                "n1",
                &[job("old", "n1", true, false), job("u2", "n2", true, false)],
                &stale,
                Some("true")
            ),
            InstallVerdict::Waiting(_)
        ));
    }
}
