//! The Prometheus registry both binaries serve on `/metrics` (see `health`), in the text
//! exposition format, plus the metric they share: API requests sent by the process. Each binary
//! defines its own metrics (`coordinator/src/metrics.rs`, `agent/src/metrics.rs`) and registers
//! them here.
//!
//! Conventions: names start with `klm_`, base units (`_seconds`), counters end in `_total` (the
//! encoder appends it: register counters without it), label values come from bounded sets (step
//! names, phases, statuses, failure reasons) — never node names or run ids.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
pub use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Histogram buckets (seconds) for things that take from a second to half an hour: a step of a
/// node's turn (a drain may wait on PodDisruptionBudgets), a helm call.
pub fn slow_buckets() -> impl Iterator<Item = f64> {
    [
        0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    ]
    .into_iter()
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "could not encode the metrics");
    }
    out
}

/// Registers `klm_api_requests_total`, read on each scrape from the process's request counter
/// (the client layer that counts requests predates the registry and stays the one source).
pub fn register_api_requests(
    registry: &mut Registry,
    read: impl Fn() -> u64 + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(ApiRequests(Arc::new(read))));
}

struct ApiRequests(Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for ApiRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiRequests")
    }
}

impl Collector for ApiRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new((self.0)());
        let metric = encoder.encode_descriptor(
            "klm_api_requests",
            "Requests this process sent to the Kubernetes API (a watch counts once).",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn api_requests_are_read_at_scrape_time() {
        let n = Arc::new(AtomicU64::new(3));
        let mut reg = Registry::default();
        let read = n.clone();
        register_api_requests(&mut reg, move || read.load(Ordering::Relaxed));
        assert!(render(&reg).contains("klm_api_requests_total 3\n"));
        n.store(7, Ordering::Relaxed);
        let text = render(&reg);
        assert!(text.contains("klm_api_requests_total 7\n"), "{text}");
        assert!(text.contains("# TYPE klm_api_requests counter"), "{text}");
    }
}
