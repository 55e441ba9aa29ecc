//! The web console (`canopy serve --web ADDR`): pages rendered by the controller over the same
//! service operations the gRPC console uses (the same authorization, tenant isolation, rate
//! limits and audit), on a TLS listener of its own with the controller's certificate. Static
//! assets are compiled into the binary. A browser signs in with an API token
//! ([`crate::service::websessions`]); forms carry a CSRF token; every response carries a
//! strict Content-Security-Policy. Live updates: server-sent events per network.

mod account;
mod audit;
mod html;
mod operator;
mod pages;
mod policy;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use crate::error::Error;
use crate::service::Controller;
use crate::service::websessions::WebSession;

/// Connections served at once (server-sent event streams stay open).
const CONNECTIONS: usize = 512;
/// A client must send its request headers within this.
const HEADER_READ: Duration = Duration::from_secs(10);

/// The cookie that holds a session.
const COOKIE: &str = "canopy_session";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Clone)]
struct Web {
    ctl: Controller,
}

/// Where a request came from (the TCP peer): sign-up is throttled by it.
#[derive(Clone, Copy, Debug)]
struct ClientAddr(std::net::SocketAddr);

/// A TLS configuration for browsers (HTTP/1.1) from the controller's PEM chain and key.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, String> {
    let mut cfg = crate::server::listener::server_config(chain_pem, key_pem)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves the web console on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    ctl: Controller,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = pages::router()
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(Web { ctl });
    let limits = crate::server::listener::ListenerLimits::default();
    let mut conns = crate::server::listener::incoming(listener, tls, limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            c = conns.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let app = app.clone();
        let from = {
            use tonic::transport::server::Connected as _;
            conn.connect_info().remote_addr()
        };
        let from = ClientAddr(from.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()));
        tokio::spawn(async move {
            use tower::ServiceExt as _;
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(from);
                app.clone().oneshot(req)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ)
                .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                .await;
            drop(permit);
        });
    }
}

/// Headers on every response: the CSP, no sniffing, no framing, no referrer, and no caching
/// of pages (they hold a tenant's data).
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The session cookie's value in `headers`, if any.
fn cookie(headers: &HeaderMap) -> Option<String> {
    let all = headers.get_all(header::COOKIE);
    all.iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The signed-in session of a request, or the way to the sign-in page.
async fn session(web: &Web, headers: &HeaderMap) -> Result<WebSession, Response> {
    let Some(c) = cookie(headers) else {
        return Err(Redirect::to("/signin").into_response());
    };
    match web.ctl.web_session(&c).await {
        Ok(s) => Ok(s),
        Err(Error::Unauthenticated(_)) => Err(Redirect::to("/signin").into_response()),
        Err(e) => Err(error_page(&e)),
    }
}

/// A signed-in session, as a handler argument: a request without one is sent to sign in.
struct Signed(WebSession);

impl axum::extract::FromRequestParts<Web> for Signed {
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        web: &Web,
    ) -> Result<Self, Response> {
        session(web, &parts.headers).await.map(Signed)
    }
}

/// The page an error becomes: its status and its message (escaped); an internal error only
/// says that one happened (the log has it).
fn error_page(e: &Error) -> Response {
    let status = match e {
        Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::AlreadyExists(_) | Error::FailedPrecondition(_) => StatusCode::CONFLICT,
        Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) | Error::PeerRemoved { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match e {
        Error::Internal(m) => {
            tracing::error!(error = %m, "web console");
            "internal error (logged)".to_string()
        }
        e => e.to_string(),
    };
    let body = format!(
        r#"{}<p><a href="/networks">Back to networks</a></p>"#,
        html::alert(&message)
    );
    (
        status,
        axum::response::Html(html::page("Error", None, &body)),
    )
        .into_response()
}

/// The `Set-Cookie` value for a session (or its removal, with `None`).
fn set_cookie(value: Option<&str>) -> HeaderValue {
    let v = match value {
        Some(v) => format!(
            "{COOKIE}={v}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
            crate::service::websessions::SESSION_SECS
        ),
        None => format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
    };
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_set_locked_down() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; canopy_session=cws_x; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("cws_x"));
        let set = set_cookie(Some("cws_x"));
        let set = set.to_str().unwrap();
        for part in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
        assert!(set_cookie(None).to_str().unwrap().contains("Max-Age=0"));
    }
}
