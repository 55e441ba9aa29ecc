//! The web console's pages and form handlers: each reads the session, calls the service
//! operation the gRPC console calls, audits a change the same way, and renders HTML.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use canopy_proto::v1::{JoinToken, Peer};

use super::html::{self, Viewer, esc, seg};
use super::{Signed, Web, error_page, session, set_cookie};
use super::{account, operator};
use crate::service::websessions::{WebSession, csrf_matches};

pub(super) type FormData = Form<HashMap<String, String>>;

pub(super) fn router() -> Router<Web> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/networks") }))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/networks", get(networks).post(create_network))
        .route("/networks/{net}", get(network))
        .route("/networks/{net}/peers", get(peers_fragment))
        .route("/networks/{net}/peers/events", get(peer_events))
        .route("/networks/{net}/tokens", post(create_token))
        .route("/peers/{id}/remove", post(remove_peer))
        .route("/tokens/{id}/revoke", post(revoke_token))
        .route("/audit", get(super::audit::audit))
        .route(
            "/apitokens",
            get(account::api_tokens).post(account::create_api_token),
        )
        .route("/apitokens/{id}/revoke", post(account::revoke_api_token))
        .route("/usage", get(account::usage))
        .route(
            "/networks/{net}/policy",
            get(super::policy::policy).post(super::policy::set_policy),
        )
        .route("/signup", get(account::signup_page).post(account::signup))
        .route("/operator", get(operator::tenants))
        .route(
            "/operator/signin",
            get(operator::signin_page).post(operator::signin),
        )
        .route("/operator/signout", post(operator::signout))
        .route(
            "/operator/tenants/{id}/{verb}",
            post(operator::set_suspended),
        )
        .route("/static/app.css", get(css))
        .route("/static/app.js", get(js))
        .layer(DefaultBodyLimit::max(16 * 1024))
}

pub(super) fn viewer(s: &WebSession) -> Viewer<'_> {
    Viewer {
        tenant: &s.caller.tenant,
        admin: s.caller.scope == crate::plans::Scope::Admin,
        csrf: &s.csrf,
    }
}

/// Audits a change made on a page as the gRPC console does (the detail says where).
pub(super) async fn audit(web: &Web, s: &WebSession, action: &str, object: &str, detail: &str) {
    let detail = match detail {
        "" => "(web console)".to_string(),
        d => format!("{d} (web console)"),
    };
    let c = &s.caller;
    (web.ctl
        .audit(&c.tenant, &c.token_id, action, object, &detail))
    .await;
}

pub(super) fn render(s: &WebSession, title: &str, body: &str) -> Response {
    Html(html::page(title, Some(&viewer(s)), body)).into_response()
}

/// The session of a form post, whose CSRF token must be the session's.
pub(super) async fn checked(
    web: &Web,
    headers: &HeaderMap,
    f: &HashMap<String, String>,
) -> Result<WebSession, Response> {
    let s = session(web, headers).await?;
    match csrf(&s, f) {
        Some(refused) => Err(refused),
        None => Ok(s),
    }
}

/// The refusal of a form whose CSRF token is not the session's; `None`: it is.
pub(super) fn csrf(s: &WebSession, f: &HashMap<String, String>) -> Option<Response> {
    let got = f.get("csrf").map_or("", String::as_str);
    if csrf_matches(&s.csrf, got) {
        return None;
    }
    let e = crate::error::Error::PermissionDenied(
        "the form is stale or forged: reload the page".into(),
    );
    Some(error_page(&e))
}

pub(super) fn field<'a>(f: &'a HashMap<String, String>, k: &str) -> &'a str {
    f.get(k).map_or("", |v| v.trim())
}

async fn css() -> Response {
    let h = [
        (header::CONTENT_TYPE, "text/css"),
        (header::CACHE_CONTROL, "max-age=3600"),
    ];
    (h, include_str!("static/app.css")).into_response()
}

async fn js() -> Response {
    let h = [
        (header::CONTENT_TYPE, "text/javascript"),
        (header::CACHE_CONTROL, "max-age=3600"),
    ];
    (h, include_str!("static/app.js")).into_response()
}

fn signin_form(message: Option<&str>, hosted: bool) -> Response {
    let signup = match hosted {
        true => r#"<p>New here? <a href="/signup">Sign up</a></p>"#,
        false => "",
    };
    let body = format!(
        r#"{}<form method="post" action="/signin" class="card">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" required placeholder="cat_…">
<p class="hint">An API token of your tenant (<code>canopy apitoken create</code>, or the admin token a
controller wrote to <code>DATA/admin-token</code>). The page acts with its scope.</p>
<button type="submit">Sign in</button></form>{signup}"#,
        message.map(html::alert).unwrap_or_default()
    );
    Html(html::page("Sign in", None, &body)).into_response()
}

async fn signin_page(State(web): State<Web>) -> Response {
    signin_form(None, web.ctl.hosted)
}

async fn signin(State(web): State<Web>, Form(f): FormData) -> Response {
    match web.ctl.sign_in(field(&f, "token")).await {
        Ok((cookie, s)) => {
            audit(&web, &s, "web.signin", "", "").await;
            let mut r = Redirect::to("/networks").into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(Some(&cookie)));
            r
        }
        Err(e @ crate::error::Error::Unauthenticated(_)) => {
            let page = signin_form(Some(&e.to_string()), web.ctl.hosted);
            (StatusCode::UNAUTHORIZED, page).into_response()
        }
        Err(e) => error_page(&e),
    }
}

async fn signout(State(web): State<Web>, headers: HeaderMap, Form(f): FormData) -> Response {
    if checked(&web, &headers, &f).await.is_ok()
        && let Some(c) = super::cookie(&headers)
    {
        let _ = web.ctl.sign_out(&c).await;
    }
    let mut r = Redirect::to("/signin").into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(None));
    r
}

async fn networks(State(web): State<Web>, Signed(s): Signed) -> Response {
    let nets = match web.ctl.list_networks(&s.caller).await {
        Ok(n) => n,
        Err(e) => return error_page(&e),
    };
    let mut rows = Vec::new();
    for n in &nets {
        let peers = web
            .ctl
            .list_peers(&s.caller, &n.id, false)
            .await
            .unwrap_or_default();
        let online = peers.iter().filter(|p| p.online).count();
        rows.push(vec![
            format!(
                r#"<a href="/networks/{}">{}</a>"#,
                seg(&n.name),
                esc(&n.name)
            ),
            esc(&n.cidrs.join(", ")),
            esc(&n.dns_domain),
            n.revision.to_string(),
            format!("{online} / {}", peers.len()),
        ]);
    }
    let mut body = html::table(
        "Your networks",
        &["Name", "CIDRs", "DNS zone", "Revision", "Online / peers"],
        &rows,
    );
    if viewer(&s).admin {
        body.push_str(&format!(
            r#"<h2>Create a network</h2><form method="post" action="/networks" class="card">{}
<label for="name">Name</label><input id="name" name="name" required pattern="[a-z0-9][a-z0-9-]*" maxlength="63">
<label for="cidrs">CIDRs (one IPv4 and/or one IPv6, comma-separated)</label>
<input id="cidrs" name="cidrs" required placeholder="100.64.0.0/24, fd7a:1::/64">
<button type="submit">Create network</button></form>"#,
            html::csrf_field(&s.csrf)
        ));
    }
    render(&s, "Networks", &body)
}

async fn create_network(State(web): State<Web>, Signed(s): Signed, Form(f): FormData) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let cidrs: Vec<String> = field(&f, "cidrs")
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    match web
        .ctl
        .create_network(&s.caller, field(&f, "name"), &cidrs)
        .await
    {
        Ok(n) => {
            let detail = format!("{} {}", n.name, n.cidrs.join(","));
            audit(&web, &s, "network.create", &n.id, &detail).await;
            Redirect::to(&format!("/networks/{}", seg(&n.name))).into_response()
        }
        Err(e) => error_page(&e),
    }
}

/// The peers table of a network (the live part of its page).
fn peers_table(s: &WebSession, peers: &[Peer], revision: i64, now: i64) -> String {
    let admin = viewer(s).admin;
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let status = match (p.online, p.quiet_secs) {
                (false, _) => "offline".to_string(),
                (true, 0) => "online".to_string(),
                (true, q) => format!("online, no handshake for {}m", q / 60),
            };
            let mut row = vec![
                esc(&p.hostname),
                esc(&p.dns_name),
                esc(&p.addresses.join(", ")),
                esc(&p.endpoints.join(", ")),
                format!(
                    r#"<span class="status {}">{}</span>"#,
                    if p.online { "on" } else { "off" },
                    esc(&status)
                ),
                if p.online {
                    format!("{} of {revision}", p.acked_revision)
                } else {
                    "-".into()
                },
                html::ago(now, p.last_handshake_unix),
                esc(&paths_text(p)),
            ];
            if admin {
                let what = format!("peer {}", p.hostname);
                row.push(html::button(
                    &format!("/peers/{}/remove", seg(&p.id)),
                    &s.csrf,
                    "Remove",
                    &what,
                ));
            }
            row
        })
        .collect();
    let mut header = vec![
        "Hostname",
        "DNS name",
        "Addresses",
        "Endpoints",
        "Status",
        "Revision",
        "Last handshake",
        "Paths",
    ];
    if admin {
        header.push("Actions");
    }
    html::table("Peers (live)", &header, &rows)
}

/// How a peer reaches its peers, as its agent reports them to its session here: "2 direct,
/// 1 relayed" (a summary kept in memory: a refresh reads no path records).
fn paths_text(p: &Peer) -> String {
    let parts: Vec<String> = [("direct", p.paths_direct), ("relayed", p.paths_relayed)]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    match (p.online, parts.is_empty()) {
        (false, _) => "-".into(),
        (true, true) => "none yet".into(),
        (true, false) => parts.join(", "),
    }
}

async fn peers_of(web: &Web, s: &WebSession, net: &str) -> Result<String, Response> {
    let n = web
        .ctl
        .get_network(&s.caller, net)
        .await
        .map_err(|e| error_page(&e))?;
    let peers = web
        .ctl
        .list_peers(&s.caller, &n.id, false)
        .await
        .map_err(|e| error_page(&e))?;
    Ok(peers_table(s, &peers, n.revision, web.ctl.now_unix()))
}

async fn peers_fragment(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(net): Path<String>,
) -> Response {
    match peers_of(&web, &s, &net).await {
        Ok(t) => Html(t).into_response(),
        Err(r) => r,
    }
}

/// Server-sent events: "changed" whenever the network's membership changes (and every 5 s,
/// for online status and handshakes), so the page refreshes its peers table.
async fn peer_events(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(net): Path<String>,
) -> Response {
    let n = match web.ctl.get_network(&s.caller, &net).await {
        Ok(n) => n,
        Err(e) => return error_page(&e),
    };
    let mut changes = web.ctl.cache.subscribe(&n.id);
    let stream = async_stream(move |tx| async move {
        loop {
            let tick = tokio::time::sleep(std::time::Duration::from_secs(5));
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tick => {}
            }
            let rev = *changes.borrow_and_update();
            if tx
                .send(Ok(Event::default().event("changed").data(rev.to_string())))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A stream fed by a task (`f` gets the sender); the task ends when the stream is dropped.
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, std::convert::Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn tokens_section(s: &WebSession, net: &str, tokens: &[JoinToken], now: i64) -> String {
    let admin = viewer(s).admin;
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = if t.revoked {
                "revoked"
            } else if t.expires_at_unix != 0 && t.expires_at_unix <= now {
                "expired"
            } else if t.max_uses != 0 && t.uses >= t.max_uses {
                "used up"
            } else {
                "usable"
            };
            let uses = match t.max_uses {
                0 => format!("{} of ∞", t.uses),
                m => format!("{} of {m}", t.uses),
            };
            let mut row = vec![esc(&t.id), uses, esc(state), esc(&t.tags.join(", "))];
            if admin && state == "usable" {
                row.push(html::button(
                    &format!("/tokens/{}/revoke", seg(&t.id)),
                    &s.csrf,
                    "Revoke",
                    &format!("token {}", t.id),
                ));
            } else if admin {
                row.push(String::new());
            }
            row
        })
        .collect();
    let mut header = vec!["Token", "Uses", "State", "Tags"];
    if admin {
        header.push("Actions");
    }
    let mut out = format!(
        "<h2>Join tokens</h2>{}",
        html::table("Join tokens", &header, &rows)
    );
    if admin {
        out.push_str(&format!(
            r#"<form method="post" action="/networks/{}/tokens" class="card">{}
<label for="uses">Uses (0: unlimited)</label><input id="uses" name="uses" type="number" min="0" value="1">
<label for="ttl">Valid for (hours)</label><input id="ttl" name="ttl_hours" type="number" min="1" value="24">
<label for="tags">Tags (comma-separated)</label><input id="tags" name="tags">
<button type="submit">Create join token</button></form>"#,
            seg(net),
            html::csrf_field(&s.csrf)
        ));
    }
    out
}

async fn network(State(web): State<Web>, Signed(s): Signed, Path(net): Path<String>) -> Response {
    let n = match web.ctl.get_network(&s.caller, &net).await {
        Ok(n) => n,
        Err(e) => return error_page(&e),
    };
    let peers = match peers_of(&web, &s, &n.id).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let tokens = web
        .ctl
        .list_join_tokens(&s.caller, &n.id)
        .await
        .unwrap_or_default();
    let body = format!(
        r#"<p>CIDRs {} · DNS zone {} · revision {} · <a href="/networks/{}/policy">Access policy</a></p>
<section id="peers" data-live="/networks/{}/peers" aria-live="polite">{peers}</section>{}"#,
        esc(&n.cidrs.join(", ")),
        esc(&n.dns_domain),
        n.revision,
        seg(&n.name),
        seg(&n.name),
        tokens_section(&s, &n.name, &tokens, web.ctl.now_unix())
    );
    render(&s, &format!("Network {}", n.name), &body)
}

async fn create_token(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(net): Path<String>,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let uses = field(&f, "uses").parse::<u32>().unwrap_or(1);
    let ttl = field(&f, "ttl_hours")
        .parse::<u64>()
        .unwrap_or(24)
        .saturating_mul(3600);
    let tags: Vec<String> = field(&f, "tags")
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let (t, join) = match web
        .ctl
        .create_join_token(&s.caller, &net, uses, ttl, &tags)
        .await
    {
        Ok(x) => x,
        Err(e) => return error_page(&e),
    };
    let detail = format!("network {} max uses {}", t.network_id, t.max_uses);
    audit(&web, &s, "token.create", &t.id, &detail).await;
    let body = format!(
        r#"<p class="warn" role="status">This join string is shown once: copy it now.</p>
<pre id="join" class="secret">{}</pre><button type="button" data-copy="join">Copy join string</button>
<p>On the host to join:</p><pre id="cmd">sudo canopy-agent join {}</pre>
<button type="button" data-copy="cmd">Copy command</button>
<p><a href="/networks/{}">Back to the network</a></p>"#,
        esc(&join),
        esc(&join),
        seg(&net)
    );
    render(&s, "Join token created", &body)
}

async fn remove_peer(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let p = match web.ctl.get_peer(&s.caller, &id).await {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    if let Err(e) = web.ctl.remove_peer(&s.caller, &id).await {
        return error_page(&e);
    }
    audit(&web, &s, "peer.remove", &id, "").await;
    Redirect::to(&format!("/networks/{}", seg(&p.network_id))).into_response()
}

async fn revoke_token(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    match web.ctl.revoke_join_token(&s.caller, &id).await {
        Ok(t) => {
            audit(&web, &s, "token.revoke", &t.id, "").await;
            Redirect::to(&format!("/networks/{}", seg(&t.network_id))).into_response()
        }
        Err(e) => error_page(&e),
    }
}

/// Query parameters, bounded.
pub(super) type Params = Query<HashMap<String, String>>;
