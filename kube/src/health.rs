//! `/healthz` and `/readyz` for kubelet probes. A few lines of HTTP/1.0 on a tokio listener:
//! the probes need a status code, not a web framework.
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves probes on `addr` ("" disables). `ready` flips /readyz between 200 and 503.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: &str,
    ready: watch::Receiver<bool>,
) -> std::io::Result<Option<SocketAddr>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let ready = *ready.borrow();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = match path {
                    "/healthz" | "/livez" => ("200 OK", "ok"),
                    "/readyz" if ready => ("200 OK", "ready"),
                    "/readyz" => ("503 Service Unavailable", "not ready"),
                    _ => ("404 Not Found", "not found"),
                };
                let reply = format!(
                    "HTTP/1.0 {code}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(Some(bound))
}
