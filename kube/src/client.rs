//! The API client, with a counter of the requests it sends (a watch counts once), so the
//! binaries can report how many API calls a node's turn or a whole run cost.
use kube::client::{Body, ClientBuilder};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tower::util::MapRequestLayer;

#[derive(Debug, Clone, Default)]
pub struct RequestCounter(Arc<AtomicU64>);

impl RequestCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no Kubernetes configuration ({0}); in a cluster check the pod's ServiceAccount, locally set KUBECONFIG"
    )]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build the API client: {0}")]
    Build(#[from] kube::Error),
}

/// A client from KUBECONFIG or the in-cluster ServiceAccount, counting its requests.
pub async fn counted() -> Result<(kube::Client, RequestCounter), ClientError> {
    let mut config = kube::Config::infer().await?;
    // kube's retry layer would retry 429/503 inside one call for minutes: a PDB's refusal must
    // reach the drain's own bounded backoff, and a Lease renewal must fail fast, not late.
    config.default_retry = false;
    let counter = RequestCounter::default();
    let inner = counter.0.clone();
    let count = MapRequestLayer::new(move |req: http::Request<Body>| {
        inner.fetch_add(1, Ordering::Relaxed);
        req
    });
    let client = ClientBuilder::try_from(config)?.with_layer(&count).build();
    Ok((client, counter))
}
