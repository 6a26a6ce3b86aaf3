//! Files built into the binary and served as they are: the dashboard and the API docs.
//!
//! Embedded so the orchestrator serves its pages offline, with nothing to deploy beside the
//! binary and nothing fetched from a CDN. Every answer is revalidated (`no-cache` with an
//! `ETag`), so a new binary is never hidden behind a browser's cached copy of the old pages.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION, VARY,
    X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

/// The `Content-Security-Policy` of the pages: only this origin's scripts, styles, images
/// and connections; no inline script or style, no plugins, no frames, no form posts.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// A file served from the binary.
pub struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    /// An HTML page, served with [`PAGE_POLICY`]; else a file a page loads.
    page: bool,
    etag: OnceLock<HeaderValue>,
}

impl Asset {
    /// A file the pages load (script, style sheet, image).
    pub const fn file(
        name: &'static str,
        content_type: &'static str,
        bytes: &'static [u8],
    ) -> Self {
        Asset {
            name,
            content_type,
            bytes,
            page: false,
            etag: OnceLock::new(),
        }
    }

    /// An HTML page, served with [`PAGE_POLICY`] as its `Content-Security-Policy`.
    pub const fn page(name: &'static str, bytes: &'static [u8]) -> Self {
        Asset {
            name,
            content_type: "text/html; charset=utf-8",
            bytes,
            page: true,
            etag: OnceLock::new(),
        }
    }

    /// The file's name under its folder (`dashboard.js`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The file's content.
    pub fn bytes(&self) -> &'static [u8] {
        self.bytes
    }

    /// A strong validator of the content: FNV-1a over the bytes, computed once.
    fn etag(&self) -> &HeaderValue {
        self.etag.get_or_init(|| {
            let hash = self.bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            HeaderValue::from_maybe_shared(Bytes::from(format!("\"{hash:016x}\"")))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
        })
    }

    /// The answer to a `GET` of this file: the content, or `304 Not Modified` when the
    /// request's `If-None-Match` names the current content.
    pub fn respond(&self, request: &HeaderMap) -> Response<Full<Bytes>> {
        let etag = self.etag();
        let fresh = request
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| {
                let tag = tag.trim();
                tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag.as_bytes()
            });
        let mut response = if fresh {
            let mut r = Response::new(Full::default());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else {
            let mut r = Response::new(Full::new(Bytes::from_static(self.bytes)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
            r
        };
        let headers = response.headers_mut();
        headers.insert(ETAG, etag.clone());
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if self.page {
            headers.insert(
                http::header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(PAGE_POLICY),
            );
            headers.insert(
                http::header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
        }
        response
    }
}

impl fmt::Debug for Asset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Asset")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Assets are statics: two are the same when they are the same file.
impl PartialEq for Asset {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Asset {}

/// A `302 Found` to `location`, a URL relative to the request's (so it also holds behind a
/// proxy that serves the orchestrator under a path prefix).
pub fn redirect(location: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static(location));
    headers.insert(VARY, HeaderValue::from_static("accept"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Whether a request's `Accept` asks for HTML (`text/html` with a non-zero quality): what a
/// browser sends, and curl, tools and the reference client do not.
pub fn accepts_html(request: &HeaderMap) -> bool {
    request
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("text/html")
                && !parts.any(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    static PAGE: Asset = Asset::page("index.html", b"<!doctype html>");

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_page_comes_with_its_type_policy_and_validator() {
        let response = PAGE.respond(&HeaderMap::new());
        assert_eq!(response.status(), StatusCode::OK);
        let h = response.headers();
        assert_eq!(h[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[http::header::CONTENT_SECURITY_POLICY], PAGE_POLICY);
        assert_eq!(h[CACHE_CONTROL], "no-cache");
        assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h[ETAG]
            .to_str()
            .is_ok_and(|t| t.len() == 18 && t.starts_with('"')));
    }

    #[test]
    fn a_matching_if_none_match_is_not_modified_and_another_is_the_content() {
        let etag = PAGE.respond(&HeaderMap::new()).headers()[ETAG].clone();
        let mut request = HeaderMap::new();
        request.insert(IF_NONE_MATCH, etag);
        let same = PAGE.respond(&request);
        assert_eq!(same.status(), StatusCode::NOT_MODIFIED);
        let listed = PAGE.respond(&headers(&[("if-none-match", "\"x\", W/\"y\"")]));
        assert_eq!(listed.status(), StatusCode::OK);
        let other = PAGE.respond(&headers(&[("if-none-match", "\"0000000000000000\"")]));
        assert_eq!(other.status(), StatusCode::OK);
    }

    #[test]
    fn html_is_accepted_by_a_browser_and_not_by_curl() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(accepts_html(&headers(&[("accept", browser)])));
        assert!(accepts_html(&headers(&[("accept", "TEXT/HTML; q=0.5")])));
        assert!(!accepts_html(&headers(&[("accept", "*/*")])));
        assert!(!accepts_html(&headers(&[("accept", "application/json")])));
        assert!(!accepts_html(&headers(&[("accept", "text/html;q=0")])));
        assert!(!accepts_html(&HeaderMap::new()));
    }
}
