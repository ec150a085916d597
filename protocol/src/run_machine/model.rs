//! Model test: the whole run machine against a simulated cluster (agents, helm, watches) under
//! random interleavings: observations delivered late, twice or stale, helm answers delayed,
//! helm killed mid-operation, and the coordinator restarted from its persisted record at any
//! point. Runs with batch-size 1 to 4 (waves, with or without a canary), each wave slot with its
//! own Lease. Agents act only on the grant their own Node carries (written by the machine's
//! `WriteGrant`, refused when the Node changed since the version it names), never on the run
//! record. Invariants are checked after every effect batch and at the end.
use super::release::{
    DaemonSetObservation, KATA_DEPLOY_CHART, ReleaseObservation, ReleaseRead, ReleaseStatus,
};
use super::*;
use crate::keys::node::WINDOW_LABEL;
use proptest::prelude::*;
use std::collections::VecDeque;

const LEASE_SECONDS: i32 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    Succeeds,
    /// Verifies for longer than the turn-start timeout, renewing the Lease (issue 9.1).
    SlowSucceeds,
    FailsVerification,
    Absent,
    DiesMidTurn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpgradeFault {
    None,
    /// helm fails without writing a revision.
    FailsCleanly,
    /// helm writes a failed revision.
    FailsWithRevision,
    /// The coordinator (and its helm) is killed mid-upgrade: release left pending-upgrade.
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RollbackFault {
    None,
    FailsOnce,
    Killed,
    AlwaysFails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    Working(i64),
    Done,
}

struct Release {
    revision: u32,
    version: String,
    status: ReleaseStatus,
}

struct Sim {
    cfg: Config,
    m: Machine,
    now: i64,
    annotations: BTreeMap<String, String>,
    data: BTreeMap<String, String>,
    rv: u64,
    names: Vec<String>,
    agents: BTreeMap<String, Agent>,
    stage: BTreeMap<(String, crate::TurnKind), Stage>,
    truth: BTreeMap<String, ObservedNode>,
    /// Every version each Node went through (for stale deliveries).
    node_history: BTreeMap<String, Vec<NodeSnapshot>>,
    /// The grant annotation on each Node (written only by `WriteGrant`).
    grants: BTreeMap<String, String>,
    /// Each Node's `resourceVersion`, bumped by every write.
    node_rv: BTreeMap<String, u64>,
    /// Grant writes refused because the Node had changed (409).
    grant_conflicts: u32,
    /// The upgrade Lease of each wave slot (slot 0 is the upgrade Lease).
    leases: Vec<LeaseView>,
    /// Whether each slot's Lease exists (slot 0 does; the coordinator creates the others).
    lease_exists: Vec<bool>,
    lease_history: Vec<(u32, LeaseView)>,
    batch: usize,
    canary: bool,
    release: Release,
    upgrade_fault: UpgradeFault,
    rollback_fault: RollbackFault,
    rollback_failures: u32,
    inbox: VecDeque<Input>,
    // What happened, for the invariants.
    upgrades: BTreeMap<String, u32>,
    upgrade_turns: Vec<String>,
    restore_turns: Vec<String>,
    /// Every (node, kind) turn seen in a persisted record.
    granted: std::collections::BTreeSet<(String, crate::TurnKind)>,
    /// The most nodes seen mid-procedure at once.
    max_in_progress: usize,
    rolling_back_seen: bool,
    completed_observed: Vec<String>,
    restarts: u32,
}

fn cfg() -> Config {
    super::tests::config()
}

impl Sim {
    fn with_waves(
        agents: &[Agent],
        upgrade_fault: UpgradeFault,
        rollback_fault: RollbackFault,
        batch: usize,
        canary: bool,
    ) -> Self {
        let names: Vec<String> = (1..=agents.len()).map(|i| format!("n{i}")).collect();
        let truth = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    ObservedNode {
                        exists: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let lease = LeaseView {
            duration_seconds: LEASE_SECONDS,
            ..Default::default()
        };
        let mut s = Sim {
            cfg: cfg(),
            m: Machine::new(cfg()),
            now: 1_000_000,
            annotations: BTreeMap::new(),
            data: BTreeMap::new(),
            rv: 1,
            agents: names.iter().cloned().zip(agents.iter().copied()).collect(),
            names,
            stage: BTreeMap::new(),
            truth,
            node_history: BTreeMap::new(),
            grants: BTreeMap::new(),
            node_rv: BTreeMap::new(),
            grant_conflicts: 0,
            leases: vec![lease.clone(); batch],
            lease_exists: (0..batch).map(|s| s == 0).collect(),
            lease_history: vec![(0, lease)],
            batch,
            canary,
            release: Release {
                revision: 3,
                version: "3.27.0".into(),
                status: ReleaseStatus::Deployed,
            },
            upgrade_fault,
            rollback_fault,
            rollback_failures: 0,
            inbox: VecDeque::new(),
            upgrades: BTreeMap::new(),
            upgrade_turns: Vec::new(),
            restore_turns: Vec::new(),
            granted: Default::default(),
            max_in_progress: 0,
            rolling_back_seen: false,
            completed_observed: Vec::new(),
            restarts: 0,
        };
        s.boot();
        s
    }

    fn env(&self) -> Env {
        Env {
            now_ms: self.now,
            mono_ms: self.now,
            api_requests: 0,
        }
    }

    fn view(&self) -> TriggerView {
        TriggerView {
            resource_version: Some(self.rv.to_string()),
            annotations: self.annotations.clone(),
            data: self.data.clone(),
        }
    }

    fn snapshot(&self, n: &str) -> NodeSnapshot {
        NodeSnapshot {
            facts: NodeFacts {
                name: n.to_string(),
                labels: [(WINDOW_LABEL.to_string(), "true".to_string())].into(),
                taints: vec![],
            },
            observed: self.truth[n].clone(),
            grant: self.grants.get(n).cloned(),
            resource_version: Some(self.node_rv.get(n).copied().unwrap_or(0).to_string()),
        }
    }

    /// A (re)started coordinator: a new machine that first sees the stores' initial lists.
    fn boot(&mut self) {
        self.m = Machine::new(self.cfg.clone());
        self.inbox.clear();
        let listed = self
            .names
            .iter()
            .map(|n| (n.clone(), self.snapshot(n)))
            .collect();
        self.feed(Input::NodesListed(listed));
        self.feed(Input::Lease(Some(self.leases[0].clone())));
        for slot in 1..self.batch {
            if self.lease_exists[slot] {
                self.feed(self.slot_lease_input(slot));
            }
        }
        self.feed(Input::Trigger(Some(self.view())));
    }

    /// What the driver's Lease watch delivers for one slot now.
    fn slot_lease_input(&self, slot: usize) -> Input {
        let lease = self.lease_exists[slot].then(|| self.leases[slot].clone());
        match slot {
            0 => Input::Lease(lease),
            s => Input::SlotLease {
                slot: s as u32,
                lease,
            },
        }
    }

    fn restart(&mut self) {
        self.restarts += 1;
        self.boot();
    }

    fn record(&self) -> Option<RunRecord> {
        self.data
            .get(keys::RUN)
            .and_then(|s| RunRecord::from_json(s).ok())
    }

    fn feed(&mut self, input: Input) {
        if let Input::Node { node: Some(s), .. } = &input
            && s.observed.status == Some(NodeStatus::Completed)
            && let Some(id) = &s.observed.run_id
        {
            self.completed_observed
                .push(format!("{id}/{}", s.facts.name));
        }
        let effects = self.m.step(input, self.env());
        self.perform(effects);
    }

    /// Performs a batch in order, like the driver: answers that the driver gets inline (direct
    /// reads) are fed after the batch; a killed coordinator performs nothing more.
    fn perform(&mut self, effects: Vec<Effect>) {
        let mut follow_up = Vec::new();
        let mut killed = false;
        for e in effects {
            match e {
                Effect::Persist(d) => {
                    self.data.extend(d);
                    self.rv += 1;
                    self.check_record();
                }
                Effect::RemoveAnnotation(k) => {
                    self.annotations.remove(k);
                    self.rv += 1;
                }
                Effect::Event { .. } | Effect::WakeAt(_) | Effect::EnsureLease => {}
                Effect::WriteGrant {
                    node,
                    grant,
                    resource_version,
                } => {
                    let current = self.node_rv.get(&node).copied().unwrap_or(0).to_string();
                    if resource_version.is_some_and(|rv| rv != current) {
                        // 409: the Node changed since; the machine asks again once it sees it.
                        self.grant_conflicts += 1;
                        continue;
                    }
                    match grant {
                        Some(g) => self.grants.insert(node.clone(), g.to_json()),
                        None => self.grants.remove(&node),
                    };
                    self.node_changed(&node);
                }
                Effect::HelmInstall { .. } => {
                    panic!("the model's release is in daemonset mode: no scoped install")
                }
                Effect::EnsureSlotLease(slot) => {
                    let slot = slot as usize;
                    assert!(
                        slot < self.batch,
                        "slot {slot} beyond batch-size {}",
                        self.batch
                    );
                    self.lease_exists[slot] = true;
                    let input = self.slot_lease_input(slot);
                    self.inbox.push_back(input);
                }
                Effect::RevokeLease { node, slot } => {
                    let slot = slot as usize;
                    if self.leases[slot]
                        .holder
                        .as_deref()
                        .is_some_and(|h| crate::lease::holder_node(h) == node)
                    {
                        self.leases[slot].holder = None;
                        self.lease_history
                            .push((slot as u32, self.leases[slot].clone()));
                    }
                }
                Effect::ReadRelease { .. } => {
                    self.inbox
                        .push_back(Input::Release(ReleaseRead::Found(ReleaseObservation {
                            chart: KATA_DEPLOY_CHART.into(),
                            version: self.release.version.clone(),
                            revision: self.release.revision,
                            status: self.release.status.clone(),
                            deployment_mode: None,
                        })))
                }
                Effect::ReadDaemonSet { .. } => {
                    self.inbox
                        .push_back(Input::DaemonSet(Ok(DaemonSetObservation {
                            hash: format!("h{}", self.release.revision),
                            on_delete: true,
                        })))
                }
                Effect::HelmUpgrade { version, .. } => {
                    let id = self.record().expect("persisted before helm").id;
                    *self.upgrades.entry(id).or_default() += 1;
                    match self.upgrade_fault {
                        UpgradeFault::None => {
                            self.set_release(version, ReleaseStatus::Deployed);
                            self.inbox.push_back(Input::HelmFinished(Ok(())));
                        }
                        UpgradeFault::FailsCleanly => self
                            .inbox
                            .push_back(Input::HelmFinished(Err("timed out".into()))),
                        UpgradeFault::FailsWithRevision => {
                            self.set_release(version, ReleaseStatus::Failed);
                            self.inbox
                                .push_back(Input::HelmFinished(Err("failed".into())));
                        }
                        UpgradeFault::Killed => {
                            self.set_release(version, ReleaseStatus::PendingUpgrade);
                            killed = true;
                            break;
                        }
                    }
                }
                Effect::HelmRollback { revision, .. } => {
                    assert_eq!(revision, 3, "always back to the recorded revision");
                    // Waves: the release moves only once no node is mid-upgrade.
                    let id = self.record().map(|r| r.id).unwrap_or_default();
                    for (n, o) in &self.truth {
                        assert!(
                            !(o.run_id.as_deref() == Some(id.as_str())
                                && o.turn == Some(crate::TurnKind::Upgrade)
                                && o.status.is_some_and(
                                    |st| st.is_in_progress() && st != NodeStatus::RollingBack
                                )),
                            "helm rollback while {n} is mid-upgrade ({:?})",
                            o.status
                        );
                    }
                    let fail = match self.rollback_fault {
                        RollbackFault::None => false,
                        RollbackFault::FailsOnce => self.rollback_failures == 0,
                        RollbackFault::AlwaysFails => true,
                        RollbackFault::Killed if self.rollback_failures == 0 => {
                            self.rollback_failures += 1;
                            self.set_release("3.27.0".into(), ReleaseStatus::PendingRollback);
                            killed = true;
                            break;
                        }
                        RollbackFault::Killed => false,
                    };
                    if fail {
                        self.rollback_failures += 1;
                        self.inbox
                            .push_back(Input::HelmFinished(Err("conflict".into())));
                    } else {
                        self.set_release("3.27.0".into(), ReleaseStatus::Deployed);
                        self.inbox.push_back(Input::HelmFinished(Ok(())));
                    }
                }
                Effect::ReadNode(n) => {
                    // The driver reads the node's slot Lease and the Node directly and feeds
                    // both at once.
                    let slot = self
                        .record()
                        .and_then(|r| r.turn_of(&n).map(|t| t.slot as usize))
                        .unwrap_or(0);
                    follow_up.push(self.slot_lease_input(slot));
                    follow_up.push(Input::Node {
                        node: Some(self.snapshot(&n)),
                        name: n,
                        direct: true,
                    });
                }
                Effect::MarkNodeFailed {
                    node,
                    kind,
                    evidence,
                } => {
                    // (A restore turn after a completed upgrade turn may be lost: that is
                    // another turn.)
                    if kind == crate::TurnKind::Upgrade {
                        let completed = self
                            .completed_observed
                            .contains(&format!("{}/{node}", evidence.run_id));
                        assert!(
                            !completed,
                            "{node} declared lost after its `completed` was observed"
                        );
                    }
                    let truth = &self.truth[&node];
                    let finished = truth.run_id.as_deref() == Some(evidence.run_id.as_str())
                        && truth.turn == Some(kind)
                        && truth.status.is_some_and(NodeStatus::is_terminal);
                    assert!(
                        !finished,
                        "{node} declared lost after it finished its turn: {truth:?}"
                    );
                    self.write_node(&node, |o| {
                        o.status = Some(NodeStatus::Failed);
                        o.run_id = Some(evidence.run_id.clone());
                        o.turn = Some(kind);
                    });
                }
            }
        }
        if killed {
            return self.restart();
        }
        for input in follow_up {
            self.feed(input);
        }
    }

    fn set_release(&mut self, version: String, status: ReleaseStatus) {
        self.release = Release {
            revision: self.release.revision + 1,
            version,
            status,
        };
    }

    /// Invariants on every persisted record.
    fn check_record(&mut self) {
        let Some(r) = self.record() else { return };
        if r.phase == RunPhase::RollingBack {
            self.rolling_back_seen = true;
        }
        let mut new_turns: Vec<crate::Turn> = r
            .turns()
            .into_iter()
            .filter(|t| !self.granted.contains(&(t.node.clone(), t.kind)))
            .collect();
        // Turns granted together count in plan order.
        new_turns.sort_by_key(|t| r.plan.iter().position(|n| *n == t.node));
        for t in &new_turns {
            self.granted.insert((t.node.clone(), t.kind));
            let list = match t.kind {
                crate::TurnKind::Upgrade => &mut self.upgrade_turns,
                crate::TurnKind::Restore => &mut self.restore_turns,
            };
            list.push(t.node.clone());
            assert!(
                !((self.rolling_back_seen || r.phase == RunPhase::RollingBack)
                    && t.kind == crate::TurnKind::Upgrade),
                "upgrade turn after a failure: {:?} {t:?} {} restarts={}",
                r.phase,
                r.message,
                self.restarts
            );
        }
        if r.phase == RunPhase::RollingBack {
            self.rolling_back_seen = true;
        }
        let turns = r.turns();
        assert!(
            turns.len() <= self.batch,
            "{} turns with batch-size {}: {turns:?}",
            turns.len(),
            self.batch
        );
        let slots: std::collections::BTreeSet<u32> = turns.iter().map(|t| t.slot).collect();
        assert_eq!(
            slots.len(),
            turns.len(),
            "two turns share a slot: {turns:?}"
        );
        assert!(
            slots.iter().all(|s| (*s as usize) < self.batch),
            "slot beyond batch-size: {turns:?}"
        );
        if self.batch > 1 && self.canary && r.completed() == 0 {
            let upgrades = turns
                .iter()
                .filter(|t| t.kind == crate::TurnKind::Upgrade)
                .count();
            assert!(
                upgrades <= 1,
                "canary: {upgrades} upgrade turns before a node completed"
            );
        }
        // At most batch-size nodes in progress: every node mid-procedure has a turn. (A node
        // `rolling-back` after its upgrade turn ended waits for its restore turn, idle.)
        let mut in_progress = 0;
        for (n, o) in &self.truth {
            let mid = o.run_id.as_deref() == Some(r.id.as_str())
                && o.status.is_some_and(|st| {
                    st.is_in_progress()
                        && !(st == NodeStatus::RollingBack
                            && o.turn == Some(crate::TurnKind::Upgrade))
                });
            if !mid {
                continue;
            }
            in_progress += 1;
            assert!(
                turns.iter().any(|t| &t.node == n && Some(t.kind) == o.turn),
                "{n} still in progress ({:?}) without a turn (turns {turns:?}, {:?}, cancel {}, {}); restarts {}",
                o.status,
                r.phase,
                r.cancel_requested,
                r.message,
                self.restarts
            );
        }
        assert!(
            in_progress <= self.batch,
            "{in_progress} nodes in progress, batch-size {}",
            self.batch
        );
        self.max_in_progress = self.max_in_progress.max(in_progress);
    }

    fn write_node(&mut self, n: &str, f: impl FnOnce(&mut ObservedNode)) {
        let o = self.truth.get_mut(n).expect("node");
        f(o);
        o.read_at_ms = None;
        self.node_changed(n);
    }

    /// Every write moves the Node to a new version, kept for stale deliveries.
    fn node_changed(&mut self, n: &str) {
        *self.node_rv.entry(n.to_string()).or_default() += 1;
        let snap = self.snapshot(n);
        self.node_history
            .entry(n.to_string())
            .or_default()
            .push(snap);
    }

    fn set_lease(&mut self, slot: usize, holder: Option<&str>) {
        self.leases[slot].holder = holder.map(|h| format!("{h}/uid"));
        self.leases[slot].renew_ms = Some(self.now);
        self.lease_history
            .push((slot as u32, self.leases[slot].clone()));
    }

    fn lease_free_for(&self, slot: usize, n: &str) -> bool {
        let lease = &self.leases[slot];
        if !self.lease_exists[slot] {
            return false; // the agent waits for the coordinator to create it
        }
        match lease.holder.as_deref().map(crate::lease::holder_node) {
            None => true,
            Some(h) if h == n => true,
            Some(_) => self.now >= lease.renew_ms.unwrap_or(0) + i64::from(LEASE_SECONDS) * 1000,
        }
    }

    /// Every agent whose Node carries a grant does its next stage of that turn.
    /// The grants on the Nodes now, as the agents read them.
    fn granted(&self) -> Vec<(String, crate::grant::Grant)> {
        self.grants
            .iter()
            .map(|(n, g)| {
                let grant = crate::grant::Grant::from_json(g).expect("the machine writes grants");
                (n.clone(), grant)
            })
            .collect()
    }

    fn agent_acts(&mut self) {
        for (node, grant) in self.granted() {
            self.agent_turn(&node, grant);
        }
    }

    fn agent_turn(&mut self, node: &str, g: crate::grant::Grant) {
        let t = crate::Turn {
            node: node.to_string(),
            kind: g.kind,
            granted_at_ms: g.granted_at_ms,
            slot: g.slot,
        };
        let slot = t.slot as usize;
        if slot >= self.batch {
            return;
        }
        // The run stops (a cancel, or a failure elsewhere in the wave): an upgrade turn not
        // started does not start; one in progress ends at its next safe point, or (half of
        // the nodes) had passed its last one and completes.
        let stopping = g.cancel_requested;
        let completes_anyway = self.names.iter().position(|n| *n == t.node).unwrap_or(0) % 2 == 0;
        let agent = self.agents[&t.node];
        let key = (t.node.clone(), t.kind);
        let stage = *self.stage.get(&key).unwrap_or(&Stage::Idle);
        let dead =
            matches!(agent, Agent::Absent) || (agent == Agent::DiesMidTurn && stage != Stage::Idle);
        if dead || !self.lease_free_for(slot, &t.node) {
            return;
        }
        let id = g.run_id.clone();
        let set = |s: &mut Sim, st: NodeStatus, failure: Option<&str>| {
            s.write_node(&t.node, |o| {
                o.run_id = Some(id.clone());
                o.turn = Some(t.kind);
                o.status = Some(st);
                o.evidence = failure.map(|reason| Evidence {
                    run_id: id.clone(),
                    node: t.node.clone(),
                    step: "verifying".into(),
                    failure: Some(FailureCause {
                        reason: reason.into(),
                        message: "exit 1".into(),
                        exit_code: Some(1),
                    }),
                    ..Default::default()
                });
            })
        };
        match (t.kind, stage) {
            (_, Stage::Done) => {}
            (crate::TurnKind::Upgrade, Stage::Idle) if stopping => {}
            (_, Stage::Idle) => {
                self.set_lease(slot, Some(&t.node));
                let st = match t.kind {
                    crate::TurnKind::Upgrade => NodeStatus::Verifying,
                    crate::TurnKind::Restore => NodeStatus::RollingBack,
                };
                set(self, st, None);
                self.stage.insert(key, Stage::Working(self.now));
            }
            (crate::TurnKind::Upgrade, Stage::Working(since)) => {
                let (st, fail) = match agent {
                    _ if stopping && !completes_anyway => {
                        (NodeStatus::RollingBack, Some(crate::lifecycle::CANCELLED))
                    }
                    Agent::SlowSucceeds if self.now < since + 2 * 60_000 => {
                        self.set_lease(slot, Some(&t.node));
                        return;
                    }
                    Agent::FailsVerification => (NodeStatus::RollingBack, Some("NonZeroExit")),
                    _ => (NodeStatus::Completed, None),
                };
                // The outcome first, then the Lease goes (the order of issue 9.1).
                set(self, st, fail);
                self.set_lease(slot, None);
                self.stage.insert(key, Stage::Done);
            }
            (crate::TurnKind::Restore, Stage::Working(_)) => {
                set(self, NodeStatus::RolledBack, None);
                self.set_lease(slot, None);
                self.stage.insert(key, Stage::Done);
            }
        }
    }

    fn advance_time(&mut self, ms: i64) {
        // Living agents take a turn granted to them before the clock moves on: an agent that
        // does not take its turn within the turn-start timeout is rightly failed, so a schedule
        // that starves it that long is not a healthy run (proptest found one: four clock steps
        // summing 60 s with no agent step between them).
        for (node, grant) in self.granted() {
            let key = (node.clone(), grant.kind);
            if self.stage.get(&key).is_none_or(|s| *s == Stage::Idle) {
                self.agent_turn(&node, grant);
            }
        }
        self.now += ms;
        // Living agents renew the Lease they hold.
        for slot in 0..self.batch {
            let Some(h) = self.leases[slot].holder.clone() else {
                continue;
            };
            let n = crate::lease::holder_node(&h).to_string();
            let stage = self
                .stage
                .iter()
                .find(|((node, _), _)| *node == n)
                .map(|(_, s)| *s);
            let alive = self.agents[&n] != Agent::DiesMidTurn && stage != Some(Stage::Done);
            if alive {
                self.set_lease(slot, Some(&n));
            }
        }
        self.feed(Input::Tick);
    }

    fn deliver_node(&mut self, i: usize, stale: bool) {
        let n = self.names[i % self.names.len()].clone();
        let hist = self.node_history.get(&n).cloned().unwrap_or_default();
        let snap = if stale && !hist.is_empty() {
            hist[i % hist.len()].clone()
        } else {
            self.snapshot(&n)
        };
        self.feed(Input::Node {
            name: n,
            node: Some(snap),
            direct: false,
        });
    }

    fn deliver_lease(&mut self, i: usize, stale: bool) {
        let slot = i % self.batch;
        if !self.lease_exists[slot] {
            return;
        }
        let history: Vec<&LeaseView> = self
            .lease_history
            .iter()
            .filter(|(s, _)| *s as usize == slot)
            .map(|(_, l)| l)
            .collect();
        let l = if stale && !history.is_empty() {
            history[i % history.len()].clone()
        } else {
            self.leases[slot].clone()
        };
        self.feed(match slot {
            0 => Input::Lease(Some(l)),
            s => Input::SlotLease {
                slot: s as u32,
                lease: Some(l),
            },
        });
    }

    fn act(&mut self, op: u8, arg: usize) {
        match op % 12 {
            0 | 1 => {
                if let Some(i) = self.inbox.pop_front() {
                    self.feed(i);
                }
            }
            2 | 3 => self.deliver_node(arg, false),
            4 => self.deliver_node(arg, true),
            5 => self.deliver_lease(arg, false),
            6 => self.deliver_lease(arg, true),
            7 | 8 => self.agent_acts(),
            // `arg % 20` before the cast: a usize above i64::MAX would turn negative and move
            // the clock backwards, which the coordinator's clock never does.
            9 => self.advance_time(((arg % 20) as i64 + 1) * 1_000),
            10 => self.feed(Input::Trigger(Some(self.view()))),
            _ => {
                if arg.is_multiple_of(4) {
                    self.restart()
                } else {
                    self.feed(Input::Tick)
                }
            }
        }
    }

    /// Everything delivered promptly, time moving: the run must finish.
    fn settle(&mut self) {
        for _ in 0..3_000 {
            if self.record().is_some_and(|r| r.phase.is_finished()) {
                return;
            }
            while let Some(i) = self.inbox.pop_front() {
                self.feed(i);
            }
            for i in 0..self.names.len() {
                self.deliver_node(i, false);
            }
            for slot in 0..self.batch {
                self.deliver_lease(slot, false);
            }
            self.agent_acts();
            self.advance_time(2_000);
        }
    }
}

fn agent() -> impl Strategy<Value = Agent> {
    prop_oneof![
        5 => Just(Agent::Succeeds),
        2 => Just(Agent::SlowSucceeds),
        1 => Just(Agent::FailsVerification),
        1 => Just(Agent::Absent),
        1 => Just(Agent::DiesMidTurn),
    ]
}

fn upgrade_fault() -> impl Strategy<Value = UpgradeFault> {
    prop_oneof![
        6 => Just(UpgradeFault::None),
        1 => Just(UpgradeFault::FailsCleanly),
        1 => Just(UpgradeFault::FailsWithRevision),
        1 => Just(UpgradeFault::Killed),
    ]
}

fn rollback_fault() -> impl Strategy<Value = RollbackFault> {
    prop_oneof![
        3 => Just(RollbackFault::None),
        1 => Just(RollbackFault::FailsOnce),
        1 => Just(RollbackFault::Killed),
        1 => Just(RollbackFault::AlwaysFails),
    ]
}

/// Waves are real: with batch-size 3 and healthy agents, several nodes are in progress at
/// once, never more than three, and the canary goes alone.
#[test]
fn a_healthy_wave_run_has_several_nodes_in_progress_at_once() {
    for canary in [true, false] {
        let mut s = Sim::with_waves(
            &[Agent::Succeeds; 7],
            UpgradeFault::None,
            RollbackFault::None,
            3,
            canary,
        );
        s.annotations
            .insert(trigger::TARGET_VERSION.into(), "3.28.0".into());
        s.annotations.insert(trigger::BATCH_SIZE.into(), "3".into());
        s.annotations
            .insert(trigger::CANARY.into(), canary.to_string());
        s.rv += 1;
        s.feed(Input::Trigger(Some(s.view())));
        s.settle();
        let r = s.record().expect("a run");
        assert_eq!(r.phase, RunPhase::Succeeded, "{}", r.message);
        assert_eq!(s.max_in_progress, 3, "canary {canary}");
        assert_eq!(s.upgrade_turns, r.plan);
    }
}

/// A failure in the second wave: the rest of that wave ends its step, then every node the run
/// upgraded is restored (the failed one, the one that completed alongside it, and the first
/// wave), up to batch-size at once.
#[test]
fn a_failure_in_the_second_wave_restores_both_waves() {
    use Agent::*;
    let mut s = Sim::with_waves(
        &[
            Succeeds,
            Succeeds,
            FailsVerification,
            Succeeds,
            Succeeds,
            Succeeds,
        ],
        UpgradeFault::None,
        RollbackFault::None,
        2,
        false,
    );
    s.annotations
        .insert(trigger::TARGET_VERSION.into(), "3.28.0".into());
    s.annotations.insert(trigger::BATCH_SIZE.into(), "2".into());
    s.annotations.insert(trigger::CANARY.into(), "false".into());
    s.rv += 1;
    s.feed(Input::Trigger(Some(s.view())));
    s.settle();
    let r = s.record().expect("a run");
    assert_eq!(r.phase, RunPhase::Failed, "{}", r.message);
    assert_eq!(s.upgrade_turns, ["n1", "n2", "n3", "n4"]);
    let mut restored = s.restore_turns.clone();
    restored.sort();
    assert_eq!(restored, ["n1", "n2", "n3", "n4"], "{}", r.message);
    assert_eq!(s.max_in_progress, 2);
    assert_eq!(s.release.version, "3.27.0");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_the_run_safe(
        agents in proptest::collection::vec(agent(), 1..5),
        upgrade in upgrade_fault(),
        rollback in rollback_fault(),
        schedule in proptest::collection::vec((any::<u8>(), any::<usize>()), 0..250),
        cancel_at in proptest::option::of(0usize..250),
        batch in 1usize..=4,
        canary in any::<bool>(),
    ) {
        let mut s = Sim::with_waves(&agents, upgrade, rollback, batch, canary);
        s.annotations.insert(trigger::TARGET_VERSION.into(), "3.28.0".into());
        if batch > 1 {
            s.annotations.insert(trigger::BATCH_SIZE.into(), batch.to_string());
            s.annotations.insert(trigger::CANARY.into(), canary.to_string());
        }
        s.rv += 1;
        s.feed(Input::Trigger(Some(s.view())));
        for (i, (op, arg)) in schedule.iter().enumerate() {
            if cancel_at == Some(i) {
                s.annotations.insert(trigger::ACTION.into(), trigger::ACTION_CANCEL.into());
                s.rv += 1;
                s.feed(Input::Trigger(Some(s.view())));
            }
            s.act(*op, *arg);
        }
        s.settle();
        let r = s.record().expect("a run");
        prop_assert!(r.phase.is_finished(), "run did not finish: {:?} {}", r.phase, r.message);
        // A finished run leaves no grant on any Node (once every Node was seen as it is: a
        // refused removal is asked again on the newer version).
        for i in 0..s.names.len() {
            s.deliver_node(i, false);
        }
        prop_assert!(s.grants.is_empty(), "grants left after the run: {:?}", s.grants.keys());
        // At most one upgrade per run, across restarts.
        prop_assert!(s.upgrades.values().all(|n| *n <= 1), "{:?}", s.upgrades);
        // Upgrade turns follow the plan order, each node at most once.
        let expected: Vec<String> = r.plan.iter().take(s.upgrade_turns.len()).cloned().collect();
        prop_assert_eq!(&s.upgrade_turns, &expected);
        // Only nodes that had an upgrade turn are restored, each at most once.
        for n in &s.restore_turns {
            prop_assert!(s.upgrade_turns.contains(n), "{} restored, never upgraded", n);
        }
        let mut dedup = s.restore_turns.clone();
        dedup.sort();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), s.restore_turns.len());
        // A completed rollback restored every node the run touched whose agent is there: all
        // that completed their upgrade or stopped (or failed) with their agent alive.
        if r.phase != RunPhase::Succeeded
            && s.release.version == "3.27.0"
            && !r.message.contains("A human must")
        {
            for (n, o) in &s.truth {
                let touched = o.run_id.as_deref() == Some(r.id.as_str())
                    && o.turn == Some(crate::TurnKind::Upgrade)
                    && matches!(o.status, Some(NodeStatus::Completed | NodeStatus::RollingBack));
                prop_assert!(!touched, "{} left {:?} after the rollback: {}", n, o.status, r.message);
            }
        }
        // Success iff every node succeeded (and helm did not fail, nobody cancelled first).
        let agents_ok = agents.iter().all(|a| matches!(a, Agent::Succeeds | Agent::SlowSucceeds));
        if r.phase == RunPhase::Succeeded {
            prop_assert!(agents_ok, "succeeded with a failing agent: {}", r.message);
            prop_assert_eq!(r.completed(), r.plan.len());
            prop_assert_eq!(s.release.version.as_str(), "3.28.0");
        } else if agents_ok && upgrade == UpgradeFault::None && cancel_at.is_none() {
            prop_assert!(false, "healthy run ended {:?}: {}", r.phase, r.message);
        }
        // Never left pending; a failed rollback says what a human must do.
        if r.phase != RunPhase::Succeeded && !s.release.status.is_pending() {
            prop_assert!(
                s.release.version == "3.27.0" || r.message.contains("A human must"),
                "release {} at {} after {:?}: {}", s.release.status, s.release.version, r.phase, r.message
            );
        }
        prop_assert!(!s.release.status.is_pending() || r.message.contains("A human must"),
            "release left {}: {}", s.release.status, r.message);
        if rollback == RollbackFault::AlwaysFails && s.rollback_failures > 0 {
            prop_assert!(r.message.contains("A human must"), "{}", r.message);
        }
    }
}
