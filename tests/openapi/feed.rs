//! The watch feed, read message by message as it arrives: an SSE stream never ends, so it
//! cannot be fetched as one answer like the other cases.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::checker::Checker;

/// One message of the feed.
#[derive(Debug)]
pub enum Message {
    Retry(u64),
    Heartbeat,
    Event(Event),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub name: String,
    pub data: String,
}

/// An open watch feed.
pub struct Feed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
}

impl Feed {
    pub async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> Feed {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut request = Request::get(format!("{base}/services?{query}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::default()).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
            .await
            .expect("the feed answers within 10 s")
            .expect("the feed answers");
        let (parts, body) = response.into_parts();
        Feed {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: Vec::new(),
        }
    }

    /// The next message, within `within`.
    pub async fn next(&mut self, within: Duration) -> Message {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("UTF-8 feed");
                return parse_message(block.trim_end_matches('\n'));
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("no whole message within {within:?}"))
                .expect("the feed goes on")
                .expect("the feed reads");
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    /// Events until one of each of `names` arrived (checking each), within `within`.
    pub async fn events_until(
        &mut self,
        checker: &mut Checker,
        names: &[&str],
        within: Duration,
    ) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut missing: BTreeSet<&str> = names.iter().copied().collect();
        let mut events = Vec::new();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {missing:?} event within {within:?}");
            match self.next(left).await {
                Message::Event(event) => {
                    checker.check_event(&event);
                    missing.remove(event.name.as_str());
                    events.push(event);
                }
                Message::Heartbeat => {}
                Message::Retry(_) => panic!("retry: comes only first"),
            }
        }
        events
    }
}

fn parse_message(block: &str) -> Message {
    if block.starts_with(':') {
        assert_eq!(block, ": heartbeat", "the only comment is the heartbeat");
        return Message::Heartbeat;
    }
    if let Some(ms) = block.strip_prefix("retry: ") {
        return Message::Retry(ms.parse().expect("retry: milliseconds"));
    }
    let mut fields = BTreeMap::new();
    for line in block.lines() {
        let (name, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("a field line: {line:?}"));
        assert!(
            fields.insert(name, value.to_owned()).is_none(),
            "one {name} per event (data is one line): {block}"
        );
    }
    let take = |name: &str| {
        fields
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("an event has {name}: {block}"))
    };
    assert_eq!(fields.len(), 3, "id, event and data: {block}");
    Message::Event(Event {
        id: take("id"),
        name: take("event"),
        data: take("data"),
    })
}
