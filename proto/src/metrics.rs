//! Prometheus metrics over HTTP/1: `GET /metrics` on a listener of its own (never the gRPC
//! port), the OpenMetrics text encoding of a registry. What is read from live state (sessions,
//! peers, counters kept elsewhere) is a [`Collector`](prometheus_client::collector::Collector)
//! that encodes at scrape time; [`put`] and [`put_family`] write its metrics.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::{Registry, Unit};

/// The labels of one row of a family.
pub type Labels = Vec<(&'static str, String)>;

/// Writes one metric without labels.
pub fn put<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    m: M,
) -> std::fmt::Result {
    m.encode(enc.encode_descriptor(name, help, unit, M::TYPE)?)
}

/// Writes one metric family: one row per label set.
pub fn put_family<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: Vec<(Labels, M)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, m) in rows {
        m.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The OpenMetrics text of `registry` now.
pub fn text(registry: &Registry) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, registry) {
        s = format!("# encoding failed: {e}\n# EOF\n");
    }
    s
}

/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS: usize = 32;
/// A client must send its request headers within this.
const HEADER_READ: std::time::Duration = std::time::Duration::from_secs(5);
/// No connection is held longer than this.
const CONNECTION_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. Bounded: 32 connections at
/// once, headers within 5 s, a connection at most 60 s (a slow or idle client lets go).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let scrape = move || {
        let r = registry.clone();
        async move {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text(&r),
            )
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            () = &mut shutdown => return Ok(()),
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, or a connection reset before it was taken.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let app = app.clone();
        tokio::spawn(async move {
            use tower::ServiceExt as _;
            let svc = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_MAX, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn silent_clients_are_let_go_and_do_not_starve_scrapes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(
            l,
            Arc::new(Registry::default()),
            std::future::pending(),
        ));
        // Every slot taken by a client that never sends a request.
        let mut idle = Vec::new();
        for _ in 0..CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let t = std::time::Instant::now();
        let out = tokio::time::timeout(HEADER_READ * 3, get(addr))
            .await
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("# EOF"), "{out}");
        assert!(t.elapsed() >= HEADER_READ / 2, "it waited for a slot");
        // The silent ones were let go by the server: a read ends (EOF, a 408 or a reset)
        // instead of waiting forever.
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(HEADER_READ, idle[0].read(&mut buf)).await;
        assert!(ended.is_ok(), "a silent client is still held");
    }
}
