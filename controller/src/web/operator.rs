//! The provider's pages (hosted): sign in with the operator credential, every tenant with its
//! plan and usage, suspend and resume. An operator session sees no tenant's pages, and a
//! tenant's session none of these.

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::html::{self, esc, seg};
use super::pages::{FormData, field};
use super::{Web, cookie, error_page, set_cookie};
use crate::error::Error;
use crate::service::websessions::csrf_matches;

fn page(title: &str, csrf: Option<&str>, body: &str) -> Response {
    let out = csrf.map_or(String::new(), |c| {
        format!(
            r#"<form method="post" action="/operator/signout" class="inline">{}<button type="submit">Sign out</button></form>"#,
            html::csrf_field(c)
        )
    });
    let body = format!("{out}{body}");
    Html(html::page(title, None, &body)).into_response()
}

fn signin_form(message: Option<&str>) -> Response {
    let body = format!(
        r#"{}<form method="post" action="/operator/signin" class="card">
<label for="credential">Operator credential</label>
<input id="credential" name="credential" type="password" autocomplete="off" required>
<button type="submit">Sign in as operator</button></form>"#,
        message.map(html::alert).unwrap_or_default()
    );
    page("Operator sign in", None, &body)
}

pub(super) async fn signin_page() -> Response {
    signin_form(None)
}

pub(super) async fn signin(State(web): State<Web>, Form(f): FormData) -> Response {
    match web.ctl.sign_in_operator(field(&f, "credential")).await {
        Ok((cookie, _)) => {
            let mut r = Redirect::to("/operator").into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(Some(&cookie)));
            r
        }
        Err(e @ (Error::Unauthenticated(_) | Error::PermissionDenied(_))) => {
            (StatusCode::UNAUTHORIZED, signin_form(Some(&e.to_string()))).into_response()
        }
        Err(e) => error_page(&e),
    }
}

/// The operator session's CSRF token, or the way to the operator's sign-in.
async fn session(web: &Web, headers: &HeaderMap) -> Result<String, Response> {
    let c = cookie(headers).unwrap_or_default();
    match web.ctl.operator_session(&c).await {
        Ok(csrf) => Ok(csrf),
        Err(Error::Unauthenticated(_)) => Err(Redirect::to("/operator/signin").into_response()),
        Err(e) => Err(error_page(&e)),
    }
}

async fn checked(web: &Web, headers: &HeaderMap, f: &FormData) -> Result<(), Response> {
    let csrf = session(web, headers).await?;
    if !csrf_matches(&csrf, field(f, "csrf")) {
        let e = Error::PermissionDenied("the form is stale or forged: reload the page".into());
        return Err(error_page(&e));
    }
    Ok(())
}

pub(super) async fn tenants(State(web): State<Web>, headers: HeaderMap) -> Response {
    let csrf = match session(&web, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let list = match web.ctl.list_tenants().await {
        Ok(l) => l,
        Err(e) => return error_page(&e),
    };
    let now = web.ctl.now_unix();
    let rows: Vec<Vec<String>> = list
        .iter()
        .filter_map(|t| {
            let s = t.subscription.as_ref()?;
            let (verb, label) = match s.suspended {
                true => ("resume", "Resume"),
                false => ("suspend", "Suspend"),
            };
            let action = format!("/operator/tenants/{}/{verb}", seg(&s.tenant_id));
            Some(vec![
                esc(&s.org),
                esc(&t.email),
                esc(&s.plan),
                t.networks.to_string(),
                t.peers.to_string(),
                (if s.suspended { "suspended" } else { "active" }).to_string(),
                html::ago(now, t.created_at_unix),
                html::button(&action, &csrf, label, &format!("tenant {}", s.org)),
            ])
        })
        .collect();
    let header = [
        "Organisation",
        "Email",
        "Plan",
        "Networks",
        "Peers",
        "State",
        "Signed up",
        "Actions",
    ];
    page(
        "Tenants",
        Some(&csrf),
        &html::table("Tenants", &header, &rows),
    )
}

pub(super) async fn set_suspended(
    State(web): State<Web>,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    f: FormData,
) -> Response {
    if let Err(r) = checked(&web, &headers, &f).await {
        return r;
    }
    let suspend = match verb.as_str() {
        "suspend" => true,
        "resume" => false,
        _ => return error_page(&Error::NotFound("no such action".into())),
    };
    match web.ctl.set_suspended(&id, suspend).await {
        Ok(_) => Redirect::to("/operator").into_response(),
        Err(e) => error_page(&e),
    }
}

pub(super) async fn signout(State(web): State<Web>, headers: HeaderMap, f: FormData) -> Response {
    if checked(&web, &headers, &f).await.is_ok()
        && let Some(c) = cookie(&headers)
    {
        let _ = web.ctl.sign_out(&c).await;
    }
    let mut r = Redirect::to("/operator/signin").into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(None));
    r
}
