//! Pure Lease arithmetic for the upgrade Lease and the coordinator's leader Lease.

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

/// The node a Lease holder identity names: `<node>/<instance>` (or a bare `<node>`).
pub fn holder_node(identity: &str) -> &str {
    identity.split_once('/').map_or(identity, |(node, _)| node)
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
