//! How one accepted connection is served, and how long it may stay without doing anything.
//!
//! hyper-util's HTTP/1-or-2 detection reads the first bytes with no deadline, and an HTTP/2
//! connection has no idle limit of its own, so a client that connects and sends nothing (or
//! half a request head, or only the HTTP/2 preface) would hold its connection permit for
//! ever. [`serve`] therefore watches every connection itself:
//!
//! - the first request must arrive within the header timeout of the accept (detection,
//!   HTTP/2 preface and settings included), or the connection is dropped;
//! - later, a connection with no request in flight for the idle timeout is shut down
//!   gracefully (HTTP/2: GOAWAY), and dropped if the client does not let it finish. For
//!   HTTP/1, hyper's own header timer already runs while a kept-alive connection waits for its
//!   next request, so HTTP/1 normally goes after the header timeout;
//! - HTTP/2 pings the client when it goes quiet and closes when it does not answer;
//! - a connection whose requests are in flight but make no progress (no response started, no
//!   body frame taken by the client) for the idle timeout plus [`STALL_GRACE`] is shut down the
//!   same way: a client that stops reading its answers (an HTTP/2 window of 0, an HTTP/1
//!   client that never reads) cannot hold its permit for ever either.
//!
//! hyper answers a malformed or oversized request head itself, with an empty body it lets no
//! one change. The head limits here are set below hyper's so that a long target (414) or a
//! large header section (431) gets a problem+json answer from us; only heads beyond hyper's
//! larger limits (and malformed ones, 400) still get hyper's bare answer.
//!
//! Also here: the per-peer connection count and the back-off of a failing `accept`.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;
use tokio::time::Instant;
use tower_http::BoxError;

use crate::problem::ApiError;

/// Longest request target (path and query) answered; longer ones get 414 problem+json.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest header section answered (each field counted as `name: value` plus its line end);
/// larger ones get 431 problem+json.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper's HTTP/1 read buffer, and so its own limit on a request head (its bare 431 beyond).
/// Well above [`MAX_HEADER_BYTES`] + [`MAX_URI_BYTES`], so those limits answer first; far below
/// hyper's default (~400 KiB), which bounds what one connection can make the server buffer.
const HTTP1_MAX_BUF: usize = 64 * 1024;
/// HTTP/2 header list size advertised to clients (hyper's default, 16 KiB, would answer
/// before [`MAX_HEADER_BYTES`] with h2's own bare 431).
const HTTP2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// An HTTP/2 connection quiet this long is pinged...
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and closed when the ping is not answered within this.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Added to the idle timeout for a connection whose requests are in flight but stalled: longer
/// than the 15 s request timeout, so a slow handler's own 408 or 503 still gets out.
pub const STALL_GRACE: Duration = Duration::from_secs(15);

/// The time limits of a connection (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From accept to the first request; for HTTP/1 also between requests.
    pub header_timeout: Duration,
    /// With no request in flight.
    pub idle_timeout: Duration,
}

impl Limits {
    /// How long requests in flight may make no progress.
    fn stall_timeout(&self) -> Duration {
        self.idle_timeout + STALL_GRACE
    }
}

/// The HTTP/1-and-2 connection builder with the limits above.
pub fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HTTP1_MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST);
    builder
}

/// Why a connection was closed by the server rather than ending normally.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("no request arrived within {0:?} of the connection")]
    NoRequest(Duration),
    #[error("the client did not let an idle or shutdown close finish")]
    CloseTimedOut,
    #[error(transparent)]
    Http(BoxError),
}

/// Serves one connection with `service` until it ends, is closed for idleness (see the
/// module docs), or `stop` turns true (then it finishes its requests and closes).
pub async fn serve<I, S, B>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    service: S,
    limits: Limits,
    accepted: Instant,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> Result<(), Ended>
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // Requests record what they do here; this loop reads it only when one of its timers
    // fires, so a request costs it no wake-up (it is on every request's path).
    let (activity, watched) = watch::channel(Activity {
        started: false,
        in_flight: 0,
        idle_since: accepted,
        progress: accepted,
    });
    let service = Tracked {
        inner: service,
        activity: Arc::new(activity),
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let head_deadline = accepted + limits.header_timeout;
    // Set once a graceful close began: past it, the connection is dropped.
    let mut close_deadline: Option<Instant> = None;
    // When the connection is due to close, as its requests stand.
    let due = |a: &Activity| {
        if !a.started {
            head_deadline
        } else if a.in_flight == 0 {
            a.idle_since + limits.idle_timeout
        } else {
            a.progress + limits.stall_timeout()
        }
    };
    // When to look again: never later than the due time of any state the requests can move
    // to from this one (their recorded times only grow, and every limit after the first
    // request is at least the idle timeout), so the loop needs no wake-up from them.
    let wake = |a: &Activity| {
        if !a.started {
            head_deadline.min(accepted + limits.idle_timeout)
        } else if a.in_flight == 0 {
            a.idle_since + limits.idle_timeout
        } else {
            a.progress + limits.idle_timeout
        }
    };
    loop {
        let wake_at = close_deadline.unwrap_or_else(|| wake(&watched.borrow()));
        tokio::select! {
            biased;
            ended = conn.as_mut() => return ended.map_err(Ended::Http),
            _ = stop.wait_for(|stopped| *stopped), if close_deadline.is_none() => {
                conn.as_mut().graceful_shutdown();
                close_deadline = Some(Instant::now() + drain_timeout);
            }
            _ = tokio::time::sleep_until(wake_at) => {
                if close_deadline.is_some() {
                    return Err(Ended::CloseTimedOut);
                }
                let now = *watched.borrow();
                if due(&now) > Instant::now() {
                    continue; // A request arrived, ended or progressed meanwhile.
                }
                if !now.started {
                    // Nothing to finish: close the socket now.
                    return Err(Ended::NoRequest(limits.header_timeout));
                }
                // Idle or stalled: let HTTP/2 say GOAWAY, and the client a header timeout to
                // take it.
                conn.as_mut().graceful_shutdown();
                close_deadline = Some(Instant::now() + limits.header_timeout);
            }
        }
    }
}

/// What the connection's requests are doing, as seen by [`serve`].
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// A request has reached the service.
    started: bool,
    /// Requests whose answer is not completely sent.
    in_flight: usize,
    /// When `in_flight` last became 0.
    idle_since: Instant,
    /// When a request last arrived, ended, or had a response body frame taken.
    progress: Instant,
}

/// The service wrapper that counts requests in flight (until their response body ends or
/// is dropped) and answers over-long heads itself.
struct Tracked<S> {
    inner: S,
    activity: Arc<watch::Sender<Activity>>,
}

/// Held by a request until its answer is sent (or abandoned).
struct InFlight(Arc<watch::Sender<Activity>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            a.progress = Instant::now();
            if a.in_flight == 0 {
                a.idle_since = a.progress;
            }
        });
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<TrackedBody<Either<B, Full<Bytes>>>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.activity.send_modify(|a| {
            a.started = true;
            a.in_flight += 1;
            a.progress = Instant::now();
        });
        let guard = Some(InFlight(self.activity.clone()));
        match head_too_large(&req) {
            Some(error) => {
                let mut response = error.into_response(req.uri().path());
                if req.method() == http::Method::HEAD {
                    *response.body_mut() = Full::new(Bytes::new());
                }
                TrackedFuture {
                    inner: None,
                    rejection: Some(response),
                    guard,
                }
            }
            None => TrackedFuture {
                inner: Some(self.inner.call(req)),
                rejection: None,
                guard,
            },
        }
    }
}

/// The 414 or 431 for a request head over [`MAX_URI_BYTES`] or [`MAX_HEADER_BYTES`].
fn head_too_large<B>(req: &Request<B>) -> Option<ApiError> {
    let target = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_URI_BYTES {
        return Some(ApiError::UriTooLong {
            limit: MAX_URI_BYTES,
        });
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (headers > MAX_HEADER_BYTES).then_some(ApiError::HeaderFieldsTooLarge {
        limit: MAX_HEADER_BYTES,
    })
}

pin_project_lite::pin_project! {
    /// The response future of [`Tracked`].
    struct TrackedFuture<F> {
        #[pin]
        inner: Option<F>,
        rejection: Option<Response<Full<Bytes>>>,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<Either<B, Full<Bytes>>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.inner.as_pin_mut() {
            Some(inner) => ready!(inner.poll(cx))?.map(Either::Left),
            None => match this.rejection.take() {
                Some(rejection) => rejection.map(Either::Right),
                // Polled again after it completed: a caller bug, never the network's doing.
                None => return Poll::Pending,
            },
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is dropped.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(InFlight(activity))) = (&frame, &this.guard) {
            // Silently: the serve loop reads it when its stall timer fires.
            activity.send_if_modified(|a| {
                a.progress = Instant::now();
                false
            });
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connections open per peer address, against `--max-connections-per-ip`. IPv6 peers count
/// per /64 (what one host or one customer usually gets), IPv4 per address.
#[derive(Debug)]
pub struct PeerLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A peer already has `--max-connections-per-ip` connections open.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many connections from one peer")]
pub struct PeerFull;

/// One connection's place in its peer's count, given back on drop.
#[derive(Debug)]
pub struct PeerSlot {
    limit: Arc<PeerLimit>,
    peer: IpAddr,
}

impl PeerLimit {
    /// `max` connections per peer; 0: unlimited (and nothing is counted).
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(PeerLimit {
            max: max as usize,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `peer` (`None` when there is no limit), or
    /// `Err` when it has `max` open already.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Option<PeerSlot>, PeerFull> {
        if self.max == 0 {
            return Ok(None);
        }
        let peer = peer_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_insert(0);
        if *count >= self.max {
            return Err(PeerFull);
        }
        *count += 1;
        Ok(Some(PeerSlot {
            limit: self.clone(),
            peer,
        }))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// The address a peer is counted under (see [`PeerLimit`]).
fn peer_key(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Back-off and log throttling for a failing `accept` (out of file descriptors, mostly): the
/// pause doubles from 10 ms up to 1 s, and one warning per 10 s says how many failed.
#[derive(Debug)]
pub struct AcceptErrors {
    delay: Duration,
    unlogged: u64,
    last_log: Option<Instant>,
}

const ACCEPT_DELAY_MIN: Duration = Duration::from_millis(10);
const ACCEPT_DELAY_MAX: Duration = Duration::from_secs(1);
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            delay: ACCEPT_DELAY_MIN,
            unlogged: 0,
            last_log: None,
        }
    }
}

impl AcceptErrors {
    /// An accept failed at `now`: how long to pause, and how many failures to report now
    /// (`None`: stay quiet, one was reported less than 10 s ago).
    pub fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_DELAY_MAX);
        self.unlogged += 1;
        let due = self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_LOG_EVERY);
        if !due {
            return (delay, None);
        }
        self.last_log = Some(now);
        (delay, Some(std::mem::take(&mut self.unlogged)))
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.delay = ACCEPT_DELAY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_per_address_and_ipv6_per_64() {
        let limit = PeerLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limit.admit(a).unwrap();
        let second = limit.admit(a).unwrap();
        assert!(limit.admit(a).is_err());
        assert!(limit.admit(b).unwrap().is_some());
        drop(first);
        let third = limit.admit(a).unwrap();
        assert!(third.is_some());
        drop((second, third));
        assert!(limit.open.lock().unwrap().is_empty(), "no peer left behind");

        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = limit.admit(v6a).unwrap();
        let _y = limit.admit(v6b).unwrap();
        assert!(limit.admit(v6a).is_err(), "same /64");
        assert!(limit.admit(v6c).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(peer_key(mapped), "10.0.0.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn no_per_peer_limit_counts_nothing() {
        let limit = PeerLimit::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            assert!(limit.admit(a).unwrap().is_none());
        }
        assert!(limit.open.lock().unwrap().is_empty());
    }

    #[test]
    fn failing_accepts_back_off_and_log_once_per_period() {
        let mut errors = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(errors.failed(t0), (Duration::from_millis(10), Some(1)));
        let mut slept = Duration::ZERO;
        let mut logged = Vec::new();
        for i in 1..=100u32 {
            let now = t0 + Duration::from_millis(100) * i;
            let (delay, log) = errors.failed(now);
            slept = delay;
            if let Some(n) = log {
                logged.push(n);
            }
        }
        assert_eq!(
            slept,
            Duration::from_secs(1),
            "the pause stops growing at 1 s"
        );
        // 100 failures over 9.9 s after the first report: one more report, with all of them.
        assert_eq!(logged, vec![100]);
        errors.succeeded();
        assert_eq!(
            errors.failed(t0 + Duration::from_secs(20)),
            (Duration::from_millis(10), Some(1))
        );
    }

    fn request(target: &str, header_bytes: usize) -> Request<()> {
        let mut builder = Request::get(target);
        if header_bytes > 0 {
            builder = builder.header("x-filler", "a".repeat(header_bytes));
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn head_limits() {
        assert!(head_too_large(&request("/health", 0)).is_none());
        let long = format!("/services?display_name={}", "a".repeat(MAX_URI_BYTES));
        assert!(matches!(
            head_too_large(&request(&long, 0)),
            Some(ApiError::UriTooLong { .. })
        ));
        assert!(head_too_large(&request("/health", MAX_HEADER_BYTES - 100)).is_none());
        assert!(matches!(
            head_too_large(&request("/health", MAX_HEADER_BYTES)),
            Some(ApiError::HeaderFieldsTooLarge { .. })
        ));
    }
}
