//! The dashboard, `GET /ui`: one page that shows the registry live.
//!
//! Plain HTML, CSS and JavaScript with no build step and no library, embedded in the binary.
//! The page only reads, through the same public endpoints as any client (the watch feed,
//! `GET /services`, `/health` and `/metrics`); it never asks for or holds a key, so it is
//! read-only whatever keys the orchestrator is configured with. Design notes: `docs/dashboard.md`.

use crate::assets::Asset;

/// `GET /ui`.
pub static PAGE: Asset = Asset::page("ui", include_bytes!("index.html"));

static FILES: [Asset; 3] = [
    Asset::file(
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("dashboard.js"),
    ),
    Asset::file(
        "dashboard.css",
        "text/css; charset=utf-8",
        include_bytes!("dashboard.css"),
    ),
    Asset::file(
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("favicon.svg"),
    ),
];

/// `GET /ui/{name}`: a file the page loads.
pub fn file(name: &str) -> Option<&'static Asset> {
    FILES.iter().find(|f| f.name() == name)
}
