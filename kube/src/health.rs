//! The process's HTTP endpoint (axum): `/healthz` and `/livez` for the liveness probe,
//! `/readyz` for the readiness probe, `/metrics` for Prometheus — one port, `--health-addr`.
//!
//! Liveness is "the main loop is not wedged", measured by a [`Heartbeat`]. The rule: a main
//! loop marks itself *busy* while it handles one wake-up (an event, a reconcile) and idle again
//! when it goes back to waiting. Waiting is never a fault — an idle agent may wait on its watch
//! for weeks — so age since the last iteration says nothing. Being busy on one wake-up for
//! longer than the loop's own bound (longer than any API call or helm call it makes can take)
//! does: the loop is stuck, and `/healthz` answers 503 so the kubelet restarts the process.
use crate::metrics::{self, Registry};
use crate::time::mono_ms;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// `busy_since` value of a loop that is waiting.
const IDLE: i64 = i64::MIN;

/// How long a main loop has been busy on its current wake-up (see the module comment).
#[derive(Debug, Clone)]
pub struct Heartbeat {
    busy_since_ms: Arc<AtomicI64>,
    max_busy: Duration,
}

/// Marks the loop busy until dropped.
#[must_use = "the loop is busy only while the guard lives"]
pub struct Busy(Arc<AtomicI64>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::Relaxed);
    }
}

impl Heartbeat {
    /// A heartbeat whose loop counts as wedged once busy for longer than `max_busy`.
    pub fn new(max_busy: Duration) -> Self {
        Heartbeat {
            busy_since_ms: Arc::new(AtomicI64::new(IDLE)),
            max_busy,
        }
    }

    /// Call when the loop wakes up; keep the guard until it waits again.
    pub fn busy(&self) -> Busy {
        self.busy_since_ms.store(mono_ms(), Ordering::Relaxed);
        Busy(self.busy_since_ms.clone())
    }

    /// `Some(how long)` when the loop has been busy past its bound at `now_ms` (monotonic).
    pub fn wedged_for(&self, now_ms: i64) -> Option<Duration> {
        let since = self.busy_since_ms.load(Ordering::Relaxed);
        if since == IDLE {
            return None;
        }
        let busy = Duration::from_millis(u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0));
        (busy > self.max_busy).then_some(busy)
    }
}

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Endpoints {
    /// Flips `/readyz` between 200 and 503.
    pub ready: watch::Receiver<bool>,
    pub heartbeat: Heartbeat,
    pub registry: Arc<Registry>,
}

/// Serves the endpoints on `addr` ("" disables). Returns the bound address (useful with port 0).
pub async fn serve(addr: &str, endpoints: Endpoints) -> std::io::Result<Option<SocketAddr>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(endpoints);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the health/metrics endpoint stopped");
        }
    });
    Ok(Some(bound))
}

/// The routes, apart from the listener (tests call it directly).
pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/healthz", get(live))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(scrape))
        .with_state(endpoints)
}

async fn live(State(e): State<Endpoints>) -> impl IntoResponse {
    match e.heartbeat.wedged_for(mono_ms()) {
        None => (StatusCode::OK, "ok".to_string()),
        Some(busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "main loop wedged: busy on one iteration for {}s (bound {}s)",
                busy.as_secs(),
                e.heartbeat.max_busy.as_secs()
            ),
        ),
    }
}

async fn ready(State(e): State<Endpoints>) -> impl IntoResponse {
    if *e.ready.borrow() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn scrape(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&e.registry),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        let resp = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn endpoints(max_busy: Duration) -> (Endpoints, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        let mut registry = Registry::default();
        metrics::register_api_requests(&mut registry, || 42);
        (
            Endpoints {
                ready: rx,
                heartbeat: Heartbeat::new(max_busy),
                registry: Arc::new(registry),
            },
            tx,
        )
    }

    #[tokio::test]
    async fn readyz_follows_the_flag_and_metrics_are_served() {
        let (e, tx) = endpoints(Duration::from_secs(60));
        let app = router(e);
        assert_eq!(
            get(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        tx.send(true).unwrap();
        assert_eq!(get(&app, "/readyz").await.0, StatusCode::OK);
        let (code, body) = get(&app, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("klm_api_requests_total 42"), "{body}");
        assert_eq!(get(&app, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn healthz_fails_only_while_busy_past_the_bound() {
        let (e, _tx) = endpoints(Duration::ZERO);
        let beat = e.heartbeat.clone();
        let app = router(e);
        // Idle (waiting) for any length of time is healthy.
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let busy = beat.busy();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (code, body) = get(&app, "/healthz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("wedged"), "{body}");
        assert_eq!(get(&app, "/livez").await.0, StatusCode::SERVICE_UNAVAILABLE);
        drop(busy);
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
    }

    #[test]
    fn busy_within_the_bound_is_healthy() {
        let beat = Heartbeat::new(Duration::from_secs(60));
        let _busy = beat.busy();
        assert_eq!(beat.wedged_for(mono_ms()), None);
        assert!(beat.wedged_for(mono_ms() + 61_000).is_some());
    }
}
