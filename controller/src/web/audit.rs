//! The audit log page: newest first, filtered by action prefix and object, 50 a page (the
//! newest 1000 are reachable, as `canopy audit` allows).

use axum::extract::State;
use axum::response::Response;

use super::html::{self, esc};
use super::pages::{Params, render};
use super::{Signed, Web, error_page};

const PAGE: usize = 50;

pub(super) async fn audit(State(web): State<Web>, Signed(s): Signed, q: Params) -> Response {
    let get = |k: &str| q.get(k).map_or("", |v| v.trim());
    let (action, object) = (clip(get("action")), clip(get("object")));
    let page = get("page")
        .parse::<usize>()
        .unwrap_or(0)
        .min(1000 / PAGE - 1);
    let want = (PAGE * (page + 1)) as u32;
    let entries = match web.ctl.list_audit(&s.caller, want, action, object).await {
        Ok(e) => e,
        Err(e) => return error_page(&e),
    };
    let now = web.ctl.now_unix();
    let rows: Vec<Vec<String>> = entries
        .iter()
        .skip(PAGE * page)
        .map(|e| {
            vec![
                html::ago(now, e.at_unix_ms / 1000),
                esc(&e.action),
                esc(&e.object),
                esc(&e.actor),
                esc(&e.detail),
            ]
        })
        .collect();
    let more = entries.len() == want as usize;
    let link = |p: usize, label: &str| {
        format!(
            r#"<a href="/audit?action={}&amp;object={}&amp;page={p}">{label}</a>"#,
            html::seg(action),
            html::seg(object)
        )
    };
    let mut nav = String::new();
    if page > 0 {
        nav.push_str(&link(page - 1, "Newer"));
    }
    if more && page + 1 < 1000 / PAGE {
        nav.push(' ');
        nav.push_str(&link(page + 1, "Older"));
    }
    let body = format!(
        r#"<form method="get" action="/audit" class="card filters">
<div><label for="action">Action starts with</label><input id="action" name="action" value="{}" placeholder="peer."></div>
<div><label for="object">Object id</label><input id="object" name="object" value="{}"></div>
<button type="submit">Filter</button></form>{}<nav aria-label="Pages" class="pages">{nav}</nav>"#,
        esc(action),
        esc(object),
        html::table(
            "Audit log, newest first",
            &["When", "Action", "Object", "By (API token)", "Detail"],
            &rows
        )
    );
    render(&s, "Audit log", &body)
}

/// A filter as typed, at most 100 bytes (on a character boundary).
fn clip(s: &str) -> &str {
    let mut end = s.len().min(100);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
