//! A network's access policy in the browser: the document in an editor, checked on save (the
//! same check `canopy policy set` makes; a refused document stays in the editor with the
//! reason, nothing is saved), saved only over the revision it was edited from, and the
//! `canopy policy test` question with its explanation.

use std::collections::HashMap;

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};

use super::html::{self, esc, seg};
use super::pages::{FormData, Params, csrf, field, render, viewer};
use super::{Signed, Web, error_page};
use crate::service::websessions::WebSession;

/// The editor (read-only for a read-scope token) and the test form.
fn editor(s: &WebSession, net: &str, text: &str, revision: i64, note: &str) -> String {
    let admin = viewer(s).admin;
    let (ro, save) = match admin {
        true => (
            "",
            r#"<button type="submit" name="do" value="save">Check and save</button>
<button type="submit" name="do" value="remove">Remove the policy</button>"#,
        ),
        false => (" readonly", ""),
    };
    format!(
        r#"{note}<form method="post" action="/networks/{n}/policy" class="card wide">{csrf}
<input type="hidden" name="revision" value="{revision}">
<label for="text">Policy (TOML; empty: no policy, every peer reaches every other)</label>
<textarea id="text" name="text" rows="18" spellcheck="false"{ro}>{text}</textarea>
{save}</form>
<h2>Test the policy in force</h2>
<form method="get" action="/networks/{n}/policy" class="card filters">
<div><label for="from">From (peer id or hostname)</label><input id="from" name="from" required></div>
<div><label for="to">To (peer, or an address)</label><input id="to" name="to" required></div>
<div><label for="proto">Protocol</label><select id="proto" name="proto"><option>tcp</option><option>udp</option><option>icmp</option></select></div>
<div><label for="port">Port</label><input id="port" name="port" type="number" min="0" max="65535" value="443"></div>
<button type="submit">Test</button></form>"#,
        n = seg(net),
        csrf = html::csrf_field(&s.csrf),
        text = esc(text),
    )
}

pub(super) async fn policy(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(net): Path<String>,
    q: Params,
) -> Response {
    let p = match web.ctl.get_policy(&s.caller, &net).await {
        Ok(p) => p,
        Err(e) => return error_page(&e),
    };
    let mut note = match p.revision {
        0 => "<p>No policy: every peer reaches every other.</p>".to_string(),
        r => format!("<p>Revision {r}, set by {}.</p>", esc(&p.updated_by)),
    };
    if let Some(result) = test_result(&web, &s, &net, &q).await {
        note.push_str(&result);
    }
    let body = editor(&s, &net, &p.text, p.revision, &note);
    render(&s, &format!("Policy of {net}"), &body)
}

/// The answer to a test asked in the query (`from`, `to`, `proto`, `port`), as HTML.
async fn test_result(
    web: &Web,
    s: &WebSession,
    net: &str,
    q: &HashMap<String, String>,
) -> Option<String> {
    let (from, to) = (q.get("from")?, q.get("to")?);
    let proto = q.get("proto").map_or("tcp", String::as_str);
    let port = q.get("port").and_then(|p| p.parse().ok()).unwrap_or(0);
    let asked = format!("{from} → {to} {proto}/{port}");
    let r = match web
        .ctl
        .test_policy(&s.caller, net, from, to, proto, port)
        .await
    {
        Ok(r) => r,
        Err(e) => return Some(html::alert(&format!("{asked}: {e}"))),
    };
    let verdict = if r.allowed { "allowed" } else { "denied" };
    let lines: String = r
        .explanation
        .iter()
        .map(|l| format!("<li>{}</li>", esc(l)))
        .collect();
    Some(format!(
        r#"<section class="card wide" role="status" aria-label="Test result"><p><strong>{}</strong>: {}</p><ul>{lines}</ul></section>"#,
        esc(verdict),
        esc(&asked)
    ))
}

pub(super) async fn set_policy(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(net): Path<String>,
    Form(f): FormData,
) -> Response {
    if let Some(r) = csrf(&s, &f) {
        return r;
    }
    let remove = field(&f, "do") == "remove";
    // Browsers send a textarea's lines with CRLF: stored as the console would send them.
    let text = &f
        .get("text")
        .map_or(String::new(), |t| t.replace("\r\n", "\n"));
    let text = text.as_str();
    let revision = field(&f, "revision").parse::<i64>().ok();
    let doc = (!remove && !text.trim().is_empty()).then_some(text);
    // A locked network's policy is signed by the tenant's key, which the browser does not hold.
    match web
        .ctl
        .set_policy(&s.caller, &net, doc, revision, None)
        .await
    {
        Ok((p, diff)) => {
            let action = if doc.is_none() {
                "policy.remove"
            } else {
                "policy.update"
            };
            super::pages::audit(&web, &s, action, &p.network_id, &diff).await;
            Redirect::to(&format!("/networks/{}/policy", seg(&net))).into_response()
        }
        // Refused (a bad document, or edited from an older revision): the text stays.
        Err(
            e @ (crate::error::Error::InvalidArgument(_)
            | crate::error::Error::FailedPrecondition(_)),
        ) => {
            let note = html::alert(&e.to_string());
            let body = editor(&s, &net, text, revision.unwrap_or(0), &note);
            let page = render(&s, &format!("Policy of {net}"), &body);
            (StatusCode::BAD_REQUEST, page).into_response()
        }
        Err(e) => error_page(&e),
    }
}
