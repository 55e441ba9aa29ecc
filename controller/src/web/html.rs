//! HTML for the web console (pure): escaping, the page layout, and small pieces (tables,
//! forms). Everything that came from outside (names, hostnames, tags, messages) goes through
//! [`esc`]; the pages run no inline script or style (the CSP forbids both).

use std::fmt::Write as _;

/// `s` safe inside HTML text and double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` safe as one URL path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Who is signed in, for the header and for forms.
pub struct Viewer<'a> {
    pub tenant: &'a str,
    pub admin: bool,
    pub csrf: &'a str,
}

/// A whole page: `title`, the navigation (when signed in), `body` (already HTML).
pub fn page(title: &str, viewer: Option<&Viewer>, body: &str) -> String {
    let nav = match viewer {
        Some(v) => format!(
            r#"<header><nav aria-label="Main"><a class="brand" href="/networks">Canopy</a>
<a href="/networks">Networks</a> <a href="/apitokens">API tokens</a> <a href="/usage">Plan and usage</a>
<a href="/audit">Audit log</a>
<span class="who">{} · {}</span>
<form method="post" action="/signout" class="inline">{}<button type="submit">Sign out</button></form>
</nav></header>"#,
            esc(v.tenant),
            if v.admin { "admin" } else { "read only" },
            csrf_field(v.csrf)
        ),
        None => {
            r#"<header><nav aria-label="Main"><span class="brand">Canopy</span></nav></header>"#
                .to_string()
        }
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · Canopy</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head><body>{nav}<main id="main"><h1>{}</h1>
{body}</main></body></html>"#,
        esc(title),
        esc(title)
    )
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(csrf))
}

/// A table with a caption; cells are HTML already.
pub fn table(caption: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("<table><caption>{}</caption><thead><tr>", esc(caption));
    for h in header {
        let _ = write!(s, r#"<th scope="col">{}</th>"#, esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(s, r#"<tr><td colspan="{}">none</td></tr>"#, header.len());
    }
    s.push_str("</tbody></table>");
    s
}

/// A one-button form posting to `action` (a write: only shown to admins).
pub fn button(action: &str, csrf: &str, label: &str, what: &str) -> String {
    format!(
        r#"<form method="post" action="{}" class="inline">{}<button type="submit" aria-label="{} {}">{}</button></form>"#,
        esc(action),
        csrf_field(csrf),
        esc(label),
        esc(what),
        esc(label)
    )
}

/// An error box.
pub fn alert(message: &str) -> String {
    format!(r#"<p class="error" role="alert">{}</p>"#, esc(message))
}

/// "12s ago", "3m ago", "never".
pub fn ago(now: i64, unix: i64) -> String {
    if unix <= 0 {
        return "never".into();
    }
    match (now - unix).max(0) {
        s @ 0..60 => format!("{s}s ago"),
        s @ 60..3600 => format!("{}m ago", s / 60),
        s @ 3600..86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_cannot_become_markup_or_leave_an_attribute() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'q'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;q&#39;"
        );
        assert_eq!(esc("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(seg("web/../x y"), "web%2F..%2Fx%20y");
        let t = table("Peers", &["NAME"], &[vec![esc("<b>")]]);
        assert!(t.contains("<td>&lt;b&gt;</td>"));
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(ago(1000, 0), "never");
        assert_eq!(ago(1000, 990), "10s ago");
        assert_eq!(ago(10_000, 10_000 - 7200), "2h ago");
    }
}
