//! An incremental Server-Sent Events parser (the WHATWG "event stream" rules): bytes go in as
//! they arrive, in chunks cut anywhere, and whole events come out.
//!
//! Lines end in LF, CRLF or CR (a CR at the end of one chunk and an LF at the start of the next
//! are one line end); `:` starts a comment; `data:` lines accumulate, joined by LF; `id:` is
//! remembered for every later event (it is what `Last-Event-ID` sends back); `retry:` is a
//! reconnection delay in milliseconds. A message larger than the bound is an error, so a broken
//! or hostile server cannot make the watcher buffer without end.

use std::time::Duration;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The last `id:` seen up to this event (in this stream or before), if any.
    pub id: Option<String>,
    /// `event:`, or `message` when the event named none.
    pub event: String,
    /// The `data:` lines joined by LF.
    pub data: String,
}

/// What the parser hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SseItem {
    /// A complete event.
    Event(SseEvent),
    /// A `retry:` field.
    Retry(Duration),
}

/// A message (or a line) longer than the parser's bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an event stream message is longer than {0} bytes")]
pub(crate) struct TooLong(pub usize);

/// The parser's state between chunks.
#[derive(Debug)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    max: usize,
}

impl SseParser {
    /// A parser for a new connection; `last_id` is the id carried over from the previous one.
    pub fn new(last_id: Option<String>, max: usize) -> Self {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            started: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            last_id,
            max,
        }
    }

    /// Feeds one chunk; complete items are appended to `out` in order.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<SseItem>) -> Result<(), TooLong> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&chunk[..pos]);
            self.check()?;
            let line = std::mem::take(&mut self.line);
            self.process(&line, out);
            let rest = &chunk[pos + 1..];
            chunk = if chunk[pos] == b'\r' {
                match rest.first() {
                    Some(b'\n') => &rest[1..],
                    Some(_) => rest,
                    None => {
                        self.after_cr = true;
                        rest
                    }
                }
            } else {
                rest
            };
        }
        self.line.extend_from_slice(chunk);
        self.check()
    }

    fn check(&self) -> Result<(), TooLong> {
        if self.line.len() + self.data.len() > self.max {
            return Err(TooLong(self.max));
        }
        Ok(())
    }

    fn process(&mut self, raw: &[u8], out: &mut Vec<SseItem>) {
        let text = String::from_utf8_lossy(raw);
        let mut line: &str = &text;
        if !self.started {
            self.started = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(ms) = value.parse::<u64>() {
                    out.push(SseItem::Retry(Duration::from_millis(ms)));
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseItem>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(SseItem::Event(SseEvent {
            id: self.last_id.clone(),
            event: if event.is_empty() {
                "message".into()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: Option<&str>, event: &str, data: &str) -> SseItem {
        SseItem::Event(SseEvent {
            id: id.map(str::to_owned),
            event: event.into(),
            data: data.into(),
        })
    }

    /// Parses `text` cut into chunks of every size from 1 byte up, and checks they all agree.
    fn parse_all_ways(text: &str) -> Vec<SseItem> {
        let bytes = text.as_bytes();
        let mut whole = Vec::new();
        SseParser::new(None, 1 << 20)
            .push(bytes, &mut whole)
            .unwrap();
        for size in 1..bytes.len().max(2) {
            let mut p = SseParser::new(None, 1 << 20);
            let mut got = Vec::new();
            for chunk in bytes.chunks(size) {
                p.push(chunk, &mut got).unwrap();
            }
            assert_eq!(got, whole, "chunks of {size} bytes");
        }
        whole
    }

    #[test]
    fn events_survive_any_chunking_and_line_ending() {
        let lf = "retry: 2000\nid: 1-0\nevent: snapshot\ndata: {\"count\":0}\n\n: heartbeat\n\nid: 2-0\nevent: registered\ndata: a\ndata:b\n\n";
        let want = vec![
            SseItem::Retry(Duration::from_millis(2000)),
            ev(Some("1-0"), "snapshot", "{\"count\":0}"),
            ev(Some("2-0"), "registered", "a\nb"),
        ];
        assert_eq!(parse_all_ways(lf), want);
        assert_eq!(parse_all_ways(&lf.replace('\n', "\r\n")), want);
        assert_eq!(parse_all_ways(&lf.replace('\n', "\r")), want);
    }

    #[test]
    fn comments_unknown_fields_and_empty_events_are_skipped() {
        let text =
            "\u{feff}: hello\nfoo: bar\nevent: nothing\n\nid: 7\nretry: soon\ndata\n\ndata: x\n\n";
        assert_eq!(
            parse_all_ways(text),
            vec![ev(Some("7"), "message", ""), ev(Some("7"), "message", "x")]
        );
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        let mut p = SseParser::new(Some("3-0".into()), 1 << 10);
        let mut out = Vec::new();
        p.push(b"event: updated\ndata: {}\n", &mut out).unwrap();
        assert!(out.is_empty());
        p.push(b"\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(Some("3-0"), "updated", "{}")]);
    }

    #[test]
    fn oversized_messages_are_refused() {
        let mut p = SseParser::new(None, 16);
        let mut out = Vec::new();
        assert_eq!(
            p.push(b"data: 0123456789abcdef", &mut out),
            Err(TooLong(16))
        );
        let mut p = SseParser::new(None, 16);
        assert!(p
            .push(b"data: 0123456789\ndata: 0123456789\n", &mut out)
            .is_err());
    }
}
