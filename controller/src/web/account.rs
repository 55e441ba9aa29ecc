//! Account pages: API tokens (list, create shown once, revoke), plan and usage against the
//! plan's quotas, and (hosted) sign-up, throttled per source address like the gRPC sign-up.

use axum::extract::{Extension, Form, Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use canopy_proto::v1::Quotas;

use super::html::{self, esc, seg};
use super::pages::{FormData, csrf, field, render};
use super::{ClientAddr, Signed, Web, error_page, set_cookie};

pub(super) async fn api_tokens(State(web): State<Web>, Signed(s): Signed) -> Response {
    let tokens = match web.ctl.list_api_tokens(&s.caller).await {
        Ok(t) => t,
        Err(e) => return error_page(&e),
    };
    let admin = super::pages::viewer(&s).admin;
    let now = web.ctl.now_unix();
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let mut row = vec![
                esc(&t.id),
                esc(&t.name),
                esc(&t.scope),
                html::ago(now, t.created_at_unix),
            ];
            if admin {
                let what = format!("API token {}", t.name);
                let action = format!("/apitokens/{}/revoke", seg(&t.id));
                row.push(html::button(&action, &s.csrf, "Revoke", &what));
            }
            row
        })
        .collect();
    let mut header = vec!["Id", "Name", "Scope", "Created"];
    if admin {
        header.push("Actions");
    }
    let mut body = html::table("API tokens", &header, &rows);
    if admin {
        body.push_str(&format!(
            r#"<h2>Create an API token</h2><form method="post" action="/apitokens" class="card">{}
<label for="tname">Name</label><input id="tname" name="name" required maxlength="63">
<label for="scope">Scope</label><select id="scope" name="scope">
<option value="read">read: list and get only</option><option value="admin">admin: everything</option></select>
<button type="submit">Create API token</button></form>"#,
            html::csrf_field(&s.csrf)
        ));
    }
    render(&s, "API tokens", &body)
}

pub(super) async fn create_api_token(
    State(web): State<Web>,
    Signed(s): Signed,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let c = &s.caller;
    let made = web
        .ctl
        .create_api_token_for(c, field(&f, "name"), field(&f, "scope"));
    let (t, secret) = match made.await {
        Ok(x) => x,
        Err(e) => return error_page(&e),
    };
    let detail = format!("{} {}", t.name, t.scope);
    super::pages::audit(&web, &s, "apitoken.create", &t.id, &detail).await;
    let body = format!(
        r#"<p class="warn" role="status">This API token is shown once: copy it now.</p>
<pre id="secret" class="secret">{}</pre><button type="button" data-copy="secret">Copy API token</button>
<p><a href="/apitokens">Back to API tokens</a></p>"#,
        esc(secret.expose())
    );
    render(&s, "API token created", &body)
}

pub(super) async fn revoke_api_token(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let c = &s.caller;
    match web.ctl.revoke_api_token(c, &id).await {
        Ok(t) => {
            super::pages::audit(&web, &s, "apitoken.revoke", &t.id, &t.name).await;
            Redirect::to("/apitokens").into_response()
        }
        Err(e) => error_page(&e),
    }
}

fn of(n: u64, limit: u64) -> String {
    match limit {
        0 | 0xFFFF_FFFF => format!("{n} (no limit)"),
        l => format!("{n} of {l}"),
    }
}

pub(super) async fn usage(State(web): State<Web>, Signed(s): Signed) -> Response {
    let u = match web.ctl.usage(&s.caller).await {
        Ok(u) => u,
        Err(e) => return error_page(&e),
    };
    let q = u.quotas.unwrap_or(Quotas::default());
    let mib = u.relay_bytes_this_month / (1024 * 1024);
    let rows = vec![
        vec!["Networks".into(), of(u.networks.into(), q.networks.into())],
        vec![
            "Active join tokens".into(),
            of(u.active_join_tokens.into(), q.active_join_tokens.into()),
        ],
        vec![
            "Relayed this month (MiB)".into(),
            of(mib, q.relay_mib_per_month),
        ],
    ];
    let per: Vec<Vec<String>> = u
        .per_network
        .iter()
        .map(|n| {
            vec![
                esc(&n.name),
                of(n.peers.into(), q.peers_per_network.into()),
                n.agents_online.to_string(),
            ]
        })
        .collect();
    let body = format!(
        "<p>Plan: <strong>{}</strong></p>{}{}",
        esc(&u.plan),
        html::table("Usage against the plan's quotas", &["What", "Used"], &rows),
        html::table("Per network", &["Network", "Peers", "Agents online"], &per)
    );
    render(&s, "Plan and usage", &body)
}

fn signup_form(message: Option<&str>) -> Response {
    let body = format!(
        r#"{}<form method="post" action="/signup" class="card">
<label for="org">Organisation</label><input id="org" name="org" required maxlength="100">
<label for="email">Email</label><input id="email" name="email" type="email" required maxlength="254">
<label for="plan">Plan</label><select id="plan" name="plan"><option>free</option><option>team</option><option>business</option></select>
<button type="submit">Sign up</button></form><p><a href="/signin">Sign in instead</a></p>"#,
        message.map(html::alert).unwrap_or_default()
    );
    Html(html::page("Sign up", None, &body)).into_response()
}

pub(super) async fn signup_page() -> Response {
    signup_form(None)
}

/// Hosted sign-up: the tenant's first API token is shown once, and the browser is signed in.
pub(super) async fn signup(
    State(web): State<Web>,
    Extension(ClientAddr(from)): Extension<ClientAddr>,
    Form(f): FormData,
) -> Response {
    if let Err(e) = web.ctl.check_signup_rate(Some(from.ip())) {
        return error_page(&e);
    }
    let made = web
        .ctl
        .sign_up(field(&f, "org"), field(&f, "email"), field(&f, "plan"));
    let (tenant, secret, _) = match made.await {
        Ok(x) => x,
        Err(e @ crate::error::Error::InvalidArgument(_)) => {
            return signup_form(Some(&e.to_string()));
        }
        Err(e) => return error_page(&e),
    };
    let (cookie, s) = match web.ctl.sign_in(secret.expose()).await {
        Ok(x) => x,
        Err(e) => return error_page(&e),
    };
    let body = format!(
        r#"<p role="status">Tenant {} is ready. Its first API token (admin) is shown once: keep it
to sign in again and for the <code>canopy</code> console.</p>
<pre id="secret" class="secret">{}</pre><button type="button" data-copy="secret">Copy API token</button>
<p><a href="/networks">Go to your networks</a></p>"#,
        esc(&tenant),
        esc(secret.expose())
    );
    let mut r = render(&s, "Welcome to Canopy", &body);
    r.headers_mut()
        .insert(axum::http::header::SET_COOKIE, set_cookie(Some(&cookie)));
    r
}
