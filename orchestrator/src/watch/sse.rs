//! The Server-Sent Events framing of the watch feed: one function per kind of message, so
//! the session never formats wire text by hand. Every message ends with a blank line; `data`
//! is JSON on one line (serde_json escapes line breaks inside strings).

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::HeaderMap;
use serde::Serialize;
use servicekit::protocol::{WatchEventKind, EVENT_STREAM};

use crate::store::Cursor;

/// How long a client waits before reconnecting, sent once at the start (`retry:`).
pub const RETRY_MS: u64 = 2000;

/// The comment line that keeps a quiet feed alive.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// The `retry:` hint.
pub fn retry() -> Bytes {
    Bytes::from(format!("retry: {RETRY_MS}\n\n"))
}

/// One whole event whose data is `data` as JSON.
pub fn event(
    id: Cursor,
    kind: WatchEventKind,
    data: &impl Serialize,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = event_head(id, kind);
    serde_json::to_writer(&mut out, data)?;
    out.extend_from_slice(b"\n\n");
    Ok(out)
}

/// One whole event whose data is already encoded JSON.
pub fn event_encoded(id: Cursor, kind: WatchEventKind, json: &[u8]) -> Vec<u8> {
    let mut out = event_head(id, kind);
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    out
}

/// The start of an event up to its data, for data written in parts (the snapshot).
pub fn event_head(id: Cursor, kind: WatchEventKind) -> Vec<u8> {
    format!("id: {id}\nevent: {}\ndata: ", kind.as_str()).into_bytes()
}

/// The end of an event started with [`event_head`].
pub const EVENT_END: &[u8] = b"\n\n";

/// The headers of a watch answer: the media type, no caching, and no buffering by a proxy
/// in front (nginx honours `x-accel-buffering`).
pub fn headers(headers: &mut HeaderMap) {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(EVENT_STREAM));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_three_fields_and_a_blank_line() {
        let id = Cursor { ms: 17, seq: 2 };
        let text = event(
            id,
            WatchEventKind::Updated,
            &serde_json::json!({"a": "x\ny"}),
        )
        .expect("json");
        assert_eq!(
            String::from_utf8(text).expect("utf-8"),
            "id: 17-2\nevent: updated\ndata: {\"a\":\"x\\ny\"}\n\n"
        );
    }
}
