//! The Lease object as the protocol sees it: reading a [`LeaseView`] (durations clamped), the
//! object as taken, released or parked, the process-local monotonic clock fences and expiry run
//! on, and which API errors are worth retrying.
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use klm_protocol::lease::{LeaseView, parked, sane_duration_seconds};

pub(crate) fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// What a Lease says, for the pure decisions (`renewTime`, else `acquireTime`, as the renewal
/// mark; `leaseDurationSeconds` clamped to sane bounds, 30 when unset).
pub fn view_of(lease: &Lease) -> LeaseView {
    let spec = lease.spec.as_ref();
    LeaseView {
        holder: spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        renew_ms: spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| t.0.as_millisecond()),
        duration_seconds: sane_duration_seconds(spec.and_then(|s| s.lease_duration_seconds)),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    }
}

/// The Lease as `who` takes it from `lease` (holder, times, duration kept, transitions counted).
pub fn taken_by(lease: &Lease, who: &str) -> Lease {
    let view = view_of(lease);
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    let now = now_micro();
    if view.holder.as_deref() != Some(who) || spec.acquire_time.is_none() {
        spec.acquire_time = Some(now.clone());
    }
    spec.holder_identity = Some(who.to_string());
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(view.duration_seconds);
    spec.lease_transitions = Some(view.transitions_after_acquire(who));
    next
}

/// The Lease with its holder cleared (duration and transitions kept).
pub fn released(lease: &Lease) -> Lease {
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    next
}

/// The Lease as process `who` parks it on graceful shutdown mid-turn: held by its bare node
/// name (no process), renewed now so it expires one duration from now if nobody resumes.
pub fn parked_by(lease: &Lease, who: &str) -> Lease {
    let mut next = lease.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(parked(who).to_string());
    spec.renew_time = Some(now_micro());
    next
}

/// A new, free Lease (what the coordinator creates).
pub fn new_lease(name: &str, duration_seconds: i32) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            lease_duration_seconds: Some(duration_seconds),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

/// The Lease was lost (or could not be confirmed in time): stop mutating.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lost the Lease: {0}")]
pub struct LeaseLost(pub String);

/// Network trouble, throttling or a server error: worth retrying.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 408 | 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use klm_protocol::keys::defaults::LEASE_DURATION_SECONDS;

    pub(crate) fn lease(holder: Option<&str>, transitions: i32) -> Lease {
        let mut l = new_lease("up", 30);
        let spec = l.spec.as_mut().unwrap();
        spec.holder_identity = holder.map(str::to_string);
        spec.lease_transitions = Some(transitions);
        if holder.is_some() {
            spec.renew_time = Some(now_micro());
            spec.acquire_time = Some(MicroTime(jiff::Timestamp::UNIX_EPOCH));
        }
        l
    }

    #[test]
    fn taking_counts_transitions_and_keeps_duration() {
        let free = lease(None, 3);
        let taken = taken_by(&free, "n1/a");
        let v = view_of(&taken);
        assert_eq!(v.holder.as_deref(), Some("n1/a"));
        assert_eq!(v.transitions, 4);
        assert_eq!(v.duration_seconds, 30);
        assert!(taken.spec.as_ref().unwrap().acquire_time.is_some());

        // Re-taking our own Lease (after an API outage) is not a transition and keeps acquireTime.
        let ours = lease(Some("n1/a"), 7);
        let again = taken_by(&ours, "n1/a");
        assert_eq!(view_of(&again).transitions, 7);
        assert_eq!(
            again.spec.as_ref().unwrap().acquire_time,
            ours.spec.as_ref().unwrap().acquire_time
        );
        // Taking a parked hold is one.
        let parked = parked_by(&ours, "n1/a");
        assert_eq!(view_of(&parked).holder.as_deref(), Some("n1"));
        assert_eq!(view_of(&taken_by(&parked, "n1/b")).transitions, 8);
    }

    #[test]
    fn releasing_clears_only_the_holder() {
        let r = released(&lease(Some("n1/a"), 2));
        let v = view_of(&r);
        assert_eq!(v.holder, None);
        assert_eq!(v.transitions, 2);
        assert!(v.is_free(0));
    }

    #[test]
    fn view_defaults_and_clamps() {
        let mut l = new_lease("up", 0);
        l.spec.as_mut().unwrap().holder_identity = Some(String::new());
        let v = view_of(&l);
        assert_eq!(v.duration_seconds, LEASE_DURATION_SECONDS);
        assert_eq!(v.holder, None);
        assert_eq!(view_of(&Lease::default()).transitions, 0);
        assert_eq!(
            view_of(&new_lease("up", 100_000)).duration_seconds,
            klm_protocol::lease::MAX_DURATION_SECONDS
        );
        assert_eq!(view_of(&new_lease("up", 1)).duration_seconds, 5);
    }

    #[test]
    fn transient_errors() {
        let api = |code| {
            kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(transient(&api(503)));
        assert!(transient(&api(429)));
        assert!(!transient(&api(403)));
        assert!(!transient(&api(404)));
    }
}
