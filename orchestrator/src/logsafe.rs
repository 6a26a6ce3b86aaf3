//! Untrusted text in log lines. Display names, URLs and paths come from clients; written raw,
//! a newline in one would start a forged log line in the pretty format, and an escape
//! sequence would drive the terminal showing it. [`Untrusted`] writes such text with every
//! control and bidirectional-control character escaped (as Rust's `escape_debug` does), so
//! one event stays one line in both log formats. Display names are also refused at
//! validation when they contain such characters ([`is_forbidden_in_names`]); this is the
//! second line of defence, for records written by something else and for URLs.

use std::fmt;

/// Whether `c` is refused in a display name: C0 controls, DEL, C1 controls (all of which
/// `char::is_control` covers), and the bidirectional embeddings, overrides and isolates
/// (U+202A-U+202E, U+2066-U+2069), which reorder the text shown after them.
pub fn is_forbidden_in_names(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Untrusted text, displayed with control characters, bidirectional controls, line and
/// paragraph separators and backslashes escaped (`\n`, `\u{1b}`, `\u{202e}`, `\\`), so it can
/// neither break a log line nor be mistaken for an escape it did not contain.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        let mut clean = 0;
        for (i, c) in text.char_indices() {
            if needs_escape(c) {
                f.write_str(&text[clean..i])?;
                write!(f, "{}", c.escape_debug())?;
                clean = i + c.len_utf8();
            }
        }
        f.write_str(&text[clean..])
    }
}

fn needs_escape(c: char) -> bool {
    is_forbidden_in_names(c) || matches!(c, '\\' | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        let forged = "x\n2026-01-01T00:00:00Z INFO service.deregistered id=forged";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert_eq!(
            shown,
            r"x\n2026-01-01T00:00:00Z INFO service.deregistered id=forged"
        );
        assert_eq!(
            Untrusted("a\u{1b}[31mb\r\u{85}\u{7f}\u{202e}\u{2066}\u{2028}\\").to_string(),
            r"a\u{1b}[31mb\r\u{85}\u{7f}\u{202e}\u{2066}\u{2028}\\"
        );
        // Everything else is left alone, quotes and non-ASCII letters included.
        let plain = "http://svc:8000/it's/\"ok\"/Zürich/日本";
        assert_eq!(Untrusted(plain).to_string(), plain);
    }

    #[test]
    fn names_refuse_controls_and_bidi_only() {
        for c in [
            '\0', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
        ] {
            assert!(is_forbidden_in_names(c), "{c:?}");
        }
        for c in ('\u{202A}'..='\u{202E}').chain('\u{2066}'..='\u{2069}') {
            assert!(is_forbidden_in_names(c), "{c:?}");
        }
        for c in [
            ' ', 'a', 'é', '日', '\u{200D}', '\u{2065}', '\u{206A}', '\u{2029}',
        ] {
            assert!(!is_forbidden_in_names(c), "{c:?}");
        }
    }
}
