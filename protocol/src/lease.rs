//! Pure Lease arithmetic for the upgrade Lease and the coordinator's leader Lease: who holds it,
//! when a hold has expired as *this reader* measures it, who may take it, and what an agent
//! whose hold lapsed (an API outage) does when it can read the Lease again.
//!
//! Expiry is never judged by comparing the holder's `renewTime` with the reader's wall clock
//! (two machines' clocks disagree by any amount): as client-go's leader election does, a reader
//! notes on its own monotonic clock when it saw the Lease change, and the hold expires one
//! `leaseDurationSeconds` after that ([`LeaseClock`]).
use crate::keys::defaults::LEASE_DURATION_SECONDS;

/// The node a Lease holder identity names: `<node>/<instance>` (or a bare `<node>`).
pub fn holder_node(identity: &str) -> &str {
    identity.split_once('/').map_or(identity, |(node, _)| node)
}

/// The holder identity of one agent process: its node and its instance (the pod's uid, so a
/// container restarted in the same pod keeps it; a random id per process otherwise).
pub fn agent_identity(node: &str, instance: &str) -> String {
    format!("{node}/{instance}")
}

/// The upgrade Lease of wave slot `slot`: `<base>` for slot 0 (so batch-size 1 uses the one
/// Lease it always did), `<base>-<slot>` for the others. One Lease per slot keeps "at most
/// batch-size nodes in progress" a property of Lease holds, as with one Lease for one node.
pub fn slot_lease_name(base: &str, slot: u32) -> String {
    if slot == 0 {
        base.to_string()
    } else {
        format!("{base}-{slot}")
    }
}

/// Bounds on `leaseDurationSeconds` as read: a hand-edited Lease with 0 or 10 000 s would
/// otherwise make a hold expire at once, or never.
pub const MIN_DURATION_SECONDS: i32 = 5;
pub const MAX_DURATION_SECONDS: i32 = 120;

/// The longest an agent waits between attempts to go on with a turn it could not (API
/// unreachable, hold lapsed). A coordinator that first sees the Lease expired — e.g. one that
/// started as the API server came back — declares the node lost after the Lease's duration plus
/// its grace; an agent waiting longer than the shortest Lease could come back too late and a
/// healthy node would fail. Jittered waits run up to twice this, so it is half the shortest Lease.
pub const TURN_RETRY_MAX_WAIT_MS: u64 = MIN_DURATION_SECONDS as u64 * 1000 / 2;

/// The duration a reader uses: the Lease's own, clamped to sane bounds; the default when unset.
pub fn sane_duration_seconds(raw: Option<i32>) -> i32 {
    match raw {
        Some(d) if d > 0 => d.clamp(MIN_DURATION_SECONDS, MAX_DURATION_SECONDS),
        _ => LEASE_DURATION_SECONDS,
    }
}

/// What a reader saw in a Lease (times in unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub renew_ms: Option<i64>,
    pub duration_seconds: i32,
    pub transitions: i32,
}

impl LeaseView {
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.renew_ms
            .map(|r| r + i64::from(self.duration_seconds.max(1)) * 1000)
    }

    /// No holder, or its holder stopped renewing.
    pub fn is_free(&self, now_ms: i64) -> bool {
        match (&self.holder, self.expires_at_ms()) {
            (None, _) => true,
            (Some(h), _) if h.is_empty() => true,
            (Some(_), Some(exp)) => now_ms >= exp,
            (Some(_), None) => true,
        }
    }

    pub fn is_held_by(&self, who: &str, now_ms: i64) -> bool {
        self.holder.as_deref() == Some(who) && !self.is_free(now_ms)
    }

    /// `who` may take (or keep) the Lease.
    pub fn may_acquire(&self, who: &str, now_ms: i64) -> bool {
        self.holder.as_deref() == Some(who) || self.is_free(now_ms)
    }

    /// `leaseTransitions` after `who` takes it: unchanged when renewing our own.
    pub fn transitions_after_acquire(&self, who: &str) -> i32 {
        if self.holder.as_deref() == Some(who) {
            self.transitions
        } else {
            self.transitions + 1
        }
    }
}

/// When this reader saw the Lease last change, on its own monotonic clock (milliseconds). Fed
/// every view the reader gets; a change of holder, renewTime (compared only for equality, never
/// with our clock) or transitions restarts the hold's expiry from now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseClock {
    seen: Option<(Option<String>, Option<i64>, i32)>,
    changed_at_ms: i64,
}

impl LeaseClock {
    pub fn observe(&mut self, view: &LeaseView, now_ms: i64) {
        let key = (view.holder.clone(), view.renew_ms, view.transitions);
        if self.seen.as_ref() != Some(&key) {
            self.seen = Some(key);
            self.changed_at_ms = now_ms;
        }
    }

    /// When the current holder's hold expires as this reader measures it (`None`: no holder).
    pub fn expires_at(&self, view: &LeaseView) -> Option<i64> {
        view.holder.as_ref().filter(|h| !h.is_empty())?;
        let duration_ms = i64::from(view.duration_seconds.max(1)) * 1000;
        Some(self.changed_at_ms.saturating_add(duration_ms))
    }

    /// No holder, or the holder has not renewed for a full duration as this reader saw it.
    pub fn is_free(&self, view: &LeaseView, now_ms: i64) -> bool {
        self.expires_at(view).is_none_or(|exp| now_ms >= exp)
    }
}

/// Whether a process may take the Lease now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Take,
    /// Held by someone else: wait for a change, or until this local time when it expires.
    WaitUntil(i64),
}

/// The resume rule: process `me` (`<node>/<instance>`) may take the Lease when it is free, when
/// it is already its own (the same process after an API outage, or a container restarted in
/// the same pod), or when its node's previous process parked it on shutdown (holder = the bare
/// node name, see `parked`) — all without waiting, so a restarted agent resumes its node's turn
/// at once. Any other hold, including another live-looking process of the same node, is taken
/// over only once it expired as this reader measures it: two processes for one node never both
/// hold it.
pub fn claim(view: &LeaseView, clock: &LeaseClock, me: &str, now_ms: i64) -> Claim {
    match view.holder.as_deref() {
        None | Some("") => Claim::Take,
        Some(h) if h == me || h == holder_node(me) => Claim::Take,
        Some(_) => match clock.expires_at(view) {
            Some(exp) if now_ms < exp => Claim::WaitUntil(exp),
            _ => Claim::Take,
        },
    }
}

/// The holder a process leaves on graceful shutdown mid-turn: its bare node name. No process
/// holds a parked Lease, so nothing mutates under it; the node's next agent process takes it
/// without waiting ([`claim`]); it still expires (nobody renews it), so a node whose agent never
/// comes back is failed by the coordinator.
pub fn parked(me: &str) -> &str {
    holder_node(me)
}

/// What an agent whose hold lapsed mid-turn (it could not renew: the API was unreachable, or
/// the Lease was deleted) does once it can read the Lease again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterLapse {
    /// Nobody took it meanwhile (same holder, same transitions): take it again and resume the
    /// turn from the status on the Node.
    Retake,
    /// Nobody holds it (deleted — the coordinator recreates it free — or cleared): take it as
    /// any turn starts ([`claim`]) and resume from the status on the Node.
    Acquire,
    /// Someone else has it: stop mutating for good.
    Lost(String),
}

pub fn after_lapse(view: Option<&LeaseView>, me: &str, transitions: i32) -> AfterLapse {
    let Some(view) = view else {
        return AfterLapse::Acquire;
    };
    match view.holder.as_deref() {
        Some(h) if h == me && view.transitions == transitions => AfterLapse::Retake,
        Some(h) => AfterLapse::Lost(format!(
            "it is now held by {h:?} (leaseTransitions {transitions} -> {})",
            view.transitions
        )),
        None => AfterLapse::Acquire,
    }
}

/// Fencing token held by the agent: the Lease it owns and when it last renewed it (local
/// monotonic milliseconds). Every mutating step checks it, so an agent that lost its Lease
/// stops mutating even before it notices the loss from the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub transitions: i32,
    pub renewed_at_ms: i64,
    pub duration_ms: i64,
}

impl Fence {
    /// Valid until one full duration after the last confirmed renewal, minus a safety margin
    /// for clock-rate differences between us and the API server.
    pub fn is_valid(&self, now_ms: i64) -> bool {
        now_ms < self.renewed_at_ms + self.duration_ms - self.duration_ms / 10
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slot_leases_are_named_after_the_upgrade_lease() {
        use super::slot_lease_name;
        let base = "kata-lifecycle-manager-upgrade";
        assert_eq!(
            slot_lease_name(base, 0),
            base,
            "batch-size 1 keeps the one Lease"
        );
        assert_eq!(slot_lease_name(base, 3), "kata-lifecycle-manager-upgrade-3");
        // The chart's RBAC names exactly these (templates/agent-rbac.yaml).
        let names: std::collections::BTreeSet<String> = (0..crate::params::MAX_BATCH_SIZE)
            .map(|s| slot_lease_name(base, s))
            .collect();
        assert_eq!(names.len(), 50);
        assert!(names.contains("kata-lifecycle-manager-upgrade-49"));
    }

    use super::*;

    fn view(holder: Option<&str>, renew: Option<i64>) -> LeaseView {
        LeaseView {
            holder: holder.map(str::to_string),
            renew_ms: renew,
            duration_seconds: 30,
            transitions: 4,
        }
    }

    #[test]
    fn acquisition_table() {
        let now = 100_000;
        let cases = [
            (view(None, None), "a", true),
            (view(Some(""), Some(now)), "a", true),
            (view(Some("b"), Some(now - 1_000)), "a", false),
            (view(Some("b"), Some(now - 30_000)), "a", true),
            (view(Some("a"), Some(now - 1_000)), "a", true),
            (view(Some("b"), None), "a", true),
        ];
        for (v, who, want) in cases {
            assert_eq!(v.may_acquire(who, now), want, "{v:?}");
        }
        assert_eq!(view(Some("a"), Some(now)).transitions_after_acquire("a"), 4);
        assert_eq!(view(Some("b"), Some(now)).transitions_after_acquire("a"), 5);
    }

    #[test]
    fn holder_identities_name_their_node() {
        assert_eq!(holder_node("node-1/5f0c"), "node-1");
        assert_eq!(holder_node("node-1"), "node-1");
        assert_eq!(holder_node(""), "");
        assert_eq!(agent_identity("node-1", "uid"), "node-1/uid");
        assert_eq!(parked("node-1/uid"), "node-1");
    }

    #[test]
    fn durations_are_clamped_when_read() {
        assert_eq!(sane_duration_seconds(None), 30);
        assert_eq!(sane_duration_seconds(Some(0)), 30);
        assert_eq!(sane_duration_seconds(Some(-4)), 30);
        assert_eq!(sane_duration_seconds(Some(1)), 5);
        assert_eq!(sane_duration_seconds(Some(6)), 6);
        assert_eq!(sane_duration_seconds(Some(i32::MAX)), MAX_DURATION_SECONDS);
    }

    fn held(holder: &str, renew_ms: i64, transitions: i32) -> LeaseView {
        LeaseView {
            holder: Some(holder.into()),
            renew_ms: Some(renew_ms),
            duration_seconds: 30,
            transitions,
        }
    }

    /// The holder's clock is 45 s ahead of or behind ours: expiry is still one duration after
    /// we saw its last renewal, never "already expired" nor "valid for another 75 s".
    #[test]
    fn expiry_is_measured_from_when_we_saw_the_change_whatever_the_skew() {
        let wall_now = 1_000_000i64;
        for skew in [-45_000i64, 0, 45_000] {
            let mut clock = LeaseClock::default();
            let mono = 500i64;
            let v = held("node-1/a", wall_now + skew, 3);
            clock.observe(&v, mono);
            assert!(!clock.is_free(&v, mono + 29_999), "skew {skew}");
            assert!(clock.is_free(&v, mono + 30_000), "skew {skew}");
            assert_eq!(
                claim(&v, &clock, "node-2/b", mono + 1),
                Claim::WaitUntil(mono + 30_000)
            );
            // Seeing the same view again does not restart the clock...
            clock.observe(&v, mono + 10_000);
            assert!(clock.is_free(&v, mono + 30_000));
            // ...a renewal does.
            let renewed = held("node-1/a", wall_now + skew + 10_000, 3);
            clock.observe(&renewed, mono + 10_000);
            assert!(!clock.is_free(&renewed, mono + 30_000));
            assert!(clock.is_free(&renewed, mono + 40_000));
        }
    }

    #[test]
    fn claim_table() {
        let mut clock = LeaseClock::default();
        let free = LeaseView {
            duration_seconds: 30,
            ..Default::default()
        };
        clock.observe(&free, 0);
        assert_eq!(claim(&free, &clock, "n1/a", 0), Claim::Take);
        let cases = [
            // Our own hold (same process after an outage, or same pod restarted).
            ("n1/a", Claim::Take),
            // Parked by our node's previous process on shutdown.
            ("n1", Claim::Take),
            // Another process of our own node: only once expired.
            ("n1/b", Claim::WaitUntil(30_000)),
            ("n2/c", Claim::WaitUntil(30_000)),
        ];
        for (holder, want) in cases {
            let v = held(holder, 1, 0);
            let mut c = LeaseClock::default();
            c.observe(&v, 0);
            assert_eq!(claim(&v, &c, "n1/a", 10), want, "{holder}");
            assert_eq!(claim(&v, &c, "n1/a", 30_000), Claim::Take, "{holder}");
        }
    }

    #[test]
    fn after_a_lapse_a_lease_someone_else_took_is_never_taken_back() {
        let me = "n1/a";
        assert_eq!(
            after_lapse(Some(&held(me, 5, 4)), me, 4),
            AfterLapse::Retake
        );
        assert!(matches!(
            after_lapse(Some(&held(me, 5, 5)), me, 4),
            AfterLapse::Lost(_)
        ));
        assert!(
            matches!(after_lapse(Some(&held("coordinator", 5, 5)), me, 4), AfterLapse::Lost(m) if m.contains("coordinator"))
        );
        assert!(matches!(
            after_lapse(Some(&held("n1/b", 5, 4)), me, 4),
            AfterLapse::Lost(_)
        ));
        // Deleted (the coordinator recreates it free) or cleared: taken like any turn start.
        assert_eq!(
            after_lapse(Some(&LeaseView::default()), me, 4),
            AfterLapse::Acquire
        );
        assert_eq!(after_lapse(None, me, 4), AfterLapse::Acquire);
    }

    #[test]
    fn fence_expires_before_the_lease_does() {
        let f = Fence {
            transitions: 1,
            renewed_at_ms: 0,
            duration_ms: 30_000,
        };
        assert!(f.is_valid(26_000));
        assert!(!f.is_valid(27_000));
    }
}
