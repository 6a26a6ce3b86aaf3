//! The API described for tools, `GET /openapi.json` (OpenAPI 3.1), and for people, `GET /docs`
//! (Swagger UI, vendored under `swagger-ui/` with its licence, so it works offline).
//!
//! The document is written by hand next to the code it describes, not generated: the routes
//! are hand-written too (see [`crate::api`]), and `tests/openapi/` checks real answers of
//! every documented endpoint against it, so the two cannot drift apart unnoticed.

use std::sync::OnceLock;

use crate::assets::Asset;

/// The document as written; `info.version` is set to this build's version when served.
const DOCUMENT: &[u8] = include_bytes!("openapi.json");

/// `GET /openapi.json`.
pub fn document() -> &'static Asset {
    static SERVED: OnceLock<Asset> = OnceLock::new();
    SERVED.get_or_init(|| {
        let bytes: &'static [u8] = match versioned(DOCUMENT) {
            Some(text) => Box::leak(text.into_boxed_slice()),
            None => DOCUMENT,
        };
        Asset::file("openapi.json", "application/json", bytes)
    })
}

/// The document with `info.version` set to this build's; `None` when it does not parse (a
/// defect the unit test below catches, served as written rather than not at all).
fn versioned(document: &[u8]) -> Option<Vec<u8>> {
    let mut doc: serde_json::Value = serde_json::from_slice(document).ok()?;
    let info = doc.get_mut("info")?.as_object_mut()?;
    info.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    serde_json::to_vec(&doc).ok()
}

/// `GET /docs`. Swagger UI draws icons from `data:` images in its style sheet, and the styles
/// it sets on elements go through the DOM (`element.style`), which `style-src` does not
/// govern: it runs under the pages' strict [`crate::assets::PAGE_POLICY`] (checked in headless
/// Chromium: no violation while every operation, schema and the authorize dialog are opened
/// and requests executed).
pub static PAGE: Asset = Asset::page("docs", include_bytes!("swagger-ui/index.html"));

static FILES: [Asset; 4] = [
    Asset::file(
        "swagger-initializer.js",
        "text/javascript; charset=utf-8",
        include_bytes!("swagger-ui/swagger-initializer.js"),
    ),
    Asset::file(
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("swagger-ui/swagger-ui-bundle.js"),
    ),
    Asset::file(
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("swagger-ui/swagger-ui.css"),
    ),
    Asset::file(
        "favicon-32x32.png",
        "image/png",
        include_bytes!("swagger-ui/favicon-32x32.png"),
    ),
];

/// `GET /docs/{name}`: a file the page loads.
pub fn file(name: &str) -> Option<&'static Asset> {
    FILES.iter().find(|f| f.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_parses_and_carries_this_builds_version() {
        let served = versioned(DOCUMENT).expect("openapi.json is a JSON object with info");
        let doc: serde_json::Value = serde_json::from_slice(&served).expect("served JSON");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(document().bytes(), &served[..]);
    }
}
