//! Wall-clock helpers. Run records store unix milliseconds so the pure lifecycle can compare
//! them with Lease renew times (which the API server stores as wall-clock timestamps).

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Unix milliseconds of a Kubernetes `MicroTime`/`Time` timestamp.
pub fn ts_ms(ts: &jiff::Timestamp) -> i64 {
    ts.as_millisecond()
}

/// RFC 3339 for humans.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}
