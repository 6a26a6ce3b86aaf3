//! Secrets out of anything printed: the password of a Valkey URL, wherever the URL is shown
//! (`--help`, `Debug`, connection errors, log lines). One implementation for the library and
//! the orchestrator, so both hide the same thing.

/// What a secret is shown as.
pub const REDACTED: &str = "***";

/// Where the password of `url` is, as a byte range of `url`: what follows the first `:` of the
/// user information, or the whole user information when it has no `:` (some clients read a
/// lone user name as a password, so it is treated as one). The user information ends at the
/// last `@` after the scheme, so a password holding an unescaped `@` or `/` is covered whole.
pub fn password_range(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = start + url[start..].rfind('@')?;
    let userinfo = &url[start..at];
    Some(match userinfo.find(':') {
        Some(colon) => start + colon + 1..at,
        None => start..at,
    })
}

/// `url` with its password (see [`password_range`]) replaced by `***`:
/// `redis://:secret@host:6379` becomes `redis://:***@host:6379`, `redis://user:secret@host`
/// becomes `redis://user:***@host`. Works on text that is not a valid URL too.
pub fn url(url: &str) -> String {
    let url = match password_range(url) {
        Some(range) => format!("{}{REDACTED}{}", &url[..range.start], &url[range.end..]),
        None => url.to_owned(),
    };
    password_parameters(&url)
}

/// Query parameters named like a password (`sentinelPassword=…`) with their value as `***`.
fn password_parameters(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut tail = url;
    while let Some(at) = tail.find(['?', '&']) {
        out.push_str(&tail[..=at]);
        tail = &tail[at + 1..];
        let end = tail.find(['&', '#']).unwrap_or(tail.len());
        let (param, after) = tail.split_at(end);
        match param.split_once('=') {
            Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(param),
        }
        tail = after;
    }
    out.push_str(tail);
    out
}

/// `%XX` sequences decoded (lossily), to find a password as a client library would print it.
pub fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        for (given, shown) in [
            ("redis://:secret@host:6379", "redis://:***@host:6379"),
            (
                "redis://user:secret@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("rediss://user:se%40cret@host", "rediss://user:***@host"),
            ("redis://:p@ss/w@rd@host:6379", "redis://:***@host:6379"),
            ("redis://secret@host", "redis://***@host"),
            (
                "redis-cluster://:secret@a:1,b:2",
                "redis-cluster://:***@a:1,b:2",
            ),
            ("not a url :secret@host", "not a url :***@host"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("valkey://host", "valkey://host"),
            ("", ""),
            (
                "redis-sentinel://h:1?sentinelPassword=hunter2&node=h2:2",
                "redis-sentinel://h:1?sentinelPassword=***&node=h2:2",
            ),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }
}
