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

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
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
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
