//! A small Server-Sent Events client for the tests: one HTTP/1.1 request over a raw TCP
//! socket, its chunked body decoded and parsed into SSE items as they arrive, every read
//! bounded by a deadline. Raw TCP on purpose: a test can stop reading (and shrink the
//! socket's receive buffer) to play a slow watcher, and sees exactly what went over the wire.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// One message of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message with data (or an event name, or an id).
    Event(Event),
    /// A comment line (`: text`), without the colon and the one space after it.
    Comment(String),
    /// A `retry:` hint on its own, in milliseconds.
    Retry(u64),
}

/// An SSE event: its `id:`, `event:` (default `message`) and `data:` (lines joined by `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Event {
    /// The data as JSON, panicking with the event when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }

    /// The id, panicking when the event has none.
    pub fn id(&self) -> &str {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("event without id: {self:?}"))
    }
}

/// Why the next item did not come.
#[derive(Debug)]
pub enum Failure {
    /// Nothing complete arrived before the deadline.
    Timeout,
    /// The connection broke (or the body was cut off, or the chunk encoding is wrong).
    Broken(String),
}

/// An open response: its head, and its body read as SSE.
pub struct SseStream {
    stream: TcpStream,
    pub status: u16,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Raw bytes read but not yet decoded from the transfer encoding.
    raw: Vec<u8>,
    /// Decoded body bytes not yet parsed into items.
    body: Vec<u8>,
    chunked: bool,
    /// Bytes of the current chunk (or of a Content-Length body) still to come.
    remaining: Option<usize>,
    /// The body ended cleanly (last chunk, or all of Content-Length).
    ended: bool,
    pending: std::collections::VecDeque<Item>,
}

/// Options of [`SseStream::open_with`].
#[derive(Debug, Default, Clone)]
pub struct Open<'a> {
    /// Extra request headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// SO_RCVBUF for the socket (the kernel may round it up), to fill it sooner.
    pub recv_buffer: Option<u32>,
}

const HEAD_WAIT: Duration = Duration::from_secs(10);

impl SseStream {
    /// `GET {path}` on `addr` with `headers`; waits for the response head.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseStream {
        Self::open_with(
            addr,
            path,
            Open {
                headers,
                ..Open::default()
            },
        )
        .await
    }

    /// [`SseStream::open`] with more options.
    pub async fn open_with(addr: SocketAddr, path: &str, open: Open<'_>) -> SseStream {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("socket");
        if let Some(size) = open.recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(HEAD_WAIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let mut request =
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (k, v) in open.headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("request sent");
        let mut raw = Vec::new();
        let deadline = Instant::now() + HEAD_WAIT;
        let end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .expect("read head");
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        SseStream {
            stream,
            status,
            headers,
            raw,
            body: Vec::new(),
            chunked,
            remaining: if chunked { None } else { length },
            ended: !chunked && length == Some(0),
            pending: Default::default(),
        }
    }

    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The whole (non-streaming) body as text, for error answers.
    pub async fn text(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        while !self.ended {
            match self.fill(deadline).await {
                Ok(()) => {}
                Err(e) => panic!("body not read: {e:?}"),
            }
        }
        String::from_utf8_lossy(&std::mem::take(&mut self.body)).into_owned()
    }

    /// The next item within `within`; `Ok(None)` when the body ended cleanly.
    pub async fn next(&mut self, within: Duration) -> Result<Option<Item>, Failure> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            if self.parse_block() {
                continue;
            }
            if self.ended {
                return Ok(None);
            }
            self.fill(deadline).await?;
        }
    }

    /// The next event within `within`, skipping comments and retry hints; panics on an end,
    /// a timeout or a broken connection.
    pub async fn next_event(&mut self, within: Duration) -> Event {
        loop {
            match self.next(within).await {
                Ok(Some(Item::Event(e))) => return e,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended while an event was expected"),
                Err(e) => panic!("no event within {within:?}: {e:?}"),
            }
        }
    }

    /// Waits for the body to end cleanly within `within`, ignoring what comes before.
    pub async fn expect_end(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(e) => panic!("the stream did not end cleanly within {within:?}: {e:?}"),
            }
        }
    }

    /// Reads more from the socket and decodes the transfer encoding into `body`.
    async fn fill(&mut self, deadline: Instant) -> Result<(), Failure> {
        if self.decode()? {
            return Ok(());
        }
        let mut buf = vec![0u8; 64 * 1024];
        let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => return Err(Failure::Broken(e.to_string())),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            if !self.chunked && self.remaining.is_none() {
                self.ended = true; // no length: the body ends with the connection
                return Ok(());
            }
            return Err(Failure::Broken("closed in the middle of the body".into()));
        }
        self.raw.extend_from_slice(&buf[..n]);
        self.decode()?;
        Ok(())
    }

    /// Moves decodable bytes from `raw` to `body`; whether it moved or ended anything.
    fn decode(&mut self) -> Result<bool, Failure> {
        let mut progressed = false;
        loop {
            if self.ended {
                return Ok(progressed);
            }
            match self.remaining {
                Some(0) if self.chunked => {
                    // The CRLF after a chunk's data.
                    if self.raw.len() < 2 {
                        return Ok(progressed);
                    }
                    if &self.raw[..2] != b"\r\n" {
                        return Err(Failure::Broken("no CRLF after a chunk".into()));
                    }
                    self.raw.drain(..2);
                    self.remaining = None;
                }
                Some(n) => {
                    if self.raw.is_empty() {
                        return Ok(progressed);
                    }
                    let take = n.min(self.raw.len());
                    self.body.extend(self.raw.drain(..take));
                    self.remaining = Some(n - take);
                    progressed = true;
                    if !self.chunked && n == take {
                        self.ended = true;
                    }
                }
                None if !self.chunked => {
                    self.body.append(&mut self.raw);
                    return Ok(progressed);
                }
                None => {
                    let Some(at) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                        return Ok(progressed);
                    };
                    let line = String::from_utf8_lossy(&self.raw[..at]).into_owned();
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16)
                        .map_err(|_| Failure::Broken(format!("bad chunk size {line:?}")))?;
                    self.raw.drain(..at + 2);
                    if size == 0 {
                        // Last chunk (no trailers from our server), then the final CRLF.
                        self.ended = true;
                        return Ok(true);
                    }
                    self.remaining = Some(size);
                }
            }
        }
    }

    /// Parses one complete block (up to a blank line) of `body` into `pending`.
    fn parse_block(&mut self) -> bool {
        let Some(at) = self.body.windows(2).position(|w| w == b"\n\n") else {
            return false;
        };
        let block = String::from_utf8_lossy(&self.body[..at]).into_owned();
        self.body.drain(..at + 2);
        let (mut id, mut event, mut data, mut retry) = (None, None, None::<String>, None);
        for line in block.split('\n') {
            if let Some(comment) = line.strip_prefix(':') {
                let text = comment.strip_prefix(' ').unwrap_or(comment);
                self.pending.push_back(Item::Comment(text.to_owned()));
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = Some(value.to_owned()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                "retry" => retry = value.parse().ok(),
                _ => {}
            }
        }
        if let Some(ms) = retry {
            self.pending.push_back(Item::Retry(ms));
        }
        if id.is_some() || event.is_some() || data.is_some() {
            self.pending.push_back(Item::Event(Event {
                id,
                event: event.unwrap_or_else(|| "message".into()),
                data: data.unwrap_or_default(),
            }));
        }
        true
    }
}
