//! Untrusted text is data. Anything a client can set (hostnames, org names, tags, names echoed
//! in errors) is escaped before it reaches a terminal or a log line, and clipped before it is
//! echoed back, the way `wg(8)` and systemd print such strings.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `s` with every control character (C0, DEL, C1), and the Unicode bidirectional and
/// zero-width format characters that can disguise text, written as `\xNN` / `\u{NNNN}`, and
/// backslashes doubled. Printable text comes back borrowed.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x100 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c as u32, 0x200b..=0x200f | 0x202a..=0x202e | 0x2066..=0x2069 | 0xfeff)
}

/// At most `max` bytes of `s` (cut at a character boundary), with `…` when something was cut.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// Untrusted input for an error message or a log line: clipped to 64 bytes, escaped, quoted.
pub fn quoted(s: &str) -> String {
    format!("\"{}\"", escape(&clip(s, 64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(escape("web-1.example"), "web-1.example");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(escape("x\r\nforged line"), "x\\x0d\\x0aforged line");
        assert_eq!(escape("bel\x07\x7f"), "bel\\x07\\x7f");
        assert_eq!(escape("c1\u{9b}"), "c1\\x9b");
        assert_eq!(escape("rtl\u{202e}txt"), "rtl\\u{202e}txt");
        assert_eq!(escape("back\\x1b"), "back\\\\x1b");
        assert_eq!(escape("naïve 東京"), "naïve 東京");
    }

    #[test]
    fn clipping_keeps_characters_whole() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("ééé", 3), "é…");
        let q = quoted(&"x".repeat(20_000));
        assert!(q.len() < 80, "{}", q.len());
    }
}
