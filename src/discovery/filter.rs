//! Which services a [`Watcher`](super::Watcher) follows: the list's filters as a query string.

use std::fmt;

/// The filter of a watch: the orchestrator's list filters (`display_name`, `url`,
/// `info.FIELD`), all of which must match. [`Filter::all`] follows every service.
///
/// ```
/// use servicekit::discovery::Filter;
/// let f = Filter::display_name("svca").info("zone", "eu west");
/// assert_eq!(f.query(), "display_name=svca&info.zone=eu%20west");
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pairs: Vec<(String, String)>,
}

impl Filter {
    /// Every registered service.
    pub fn all() -> Self {
        Filter::default()
    }

    /// The services registered under this `display_name`.
    pub fn display_name(name: impl Into<String>) -> Self {
        Filter::all().with("display_name", name.into())
    }

    /// Also require this `url`.
    pub fn url(self, url: impl Into<String>) -> Self {
        self.with("url", url.into())
    }

    /// Also require `info.FIELD == value` (as the list compares it: equality for strings,
    /// numbers and booleans, membership for arrays).
    pub fn info(self, field: impl AsRef<str>, value: impl Into<String>) -> Self {
        let key = format!("info.{}", field.as_ref());
        self.with(&key, value.into())
    }

    fn with(mut self, key: &str, value: String) -> Self {
        self.pairs.push((key.to_owned(), value));
        self
    }

    /// The filter as a URL query (percent-encoded, without `?`); empty for [`Filter::all`].
    pub fn query(&self) -> String {
        self.pairs
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.pairs.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl fmt::Display for Filter {
    /// The query, or `*` for every service (for log lines).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pairs.is_empty() {
            f.write_str("*")
        } else {
            f.write_str(&self.query())
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(Filter::all().query(), "");
        assert_eq!(Filter::all().to_string(), "*");
        assert_eq!(
            Filter::display_name("a&b=c é").url("http://x:1").query(),
            "display_name=a%26b%3Dc%20%C3%A9&url=http%3A%2F%2Fx%3A1"
        );
        assert_eq!(
            Filter::display_name("svca").info("zone", "eu").query(),
            "display_name=svca&info.zone=eu"
        );
    }
}
