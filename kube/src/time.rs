//! Wall-clock helpers. Run records store unix milliseconds so the pure lifecycle can compare
//! them with Lease renew times (which the API server stores as wall-clock timestamps).

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}
