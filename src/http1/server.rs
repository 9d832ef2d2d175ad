//! Client connections speaking HTTP/1.1, each served by one task while it is busy.
//!
//! The loop is: wait until the socket is readable (holding no buffer), read and parse a request
//! head within `header_read_timeout`, run the proxy service on it, write the response, repeat. A
//! client quiet for `park_after` ends the loop with [`Served::Idle`]: the caller parks the socket
//! (see [`super::idle`]) and serves it again when the client writes. The request body is read by
//! whoever polls it (the backend send) straight from this connection's buffer; a client that goes
//! away while its request is in progress cancels it, as with nginx's default, and one
//! that goes away while its request still waits (admission, its key's turn) is seen leaving too.
//!
//! Malformed requests get a 4xx with a one-line reason and the connection closes. A request with
//! both Transfer-Encoding and Content-Length is framed by Transfer-Encoding and its connection
//! closes after the response (RFC 9112 §6.3), so no second request can hide in its body. An
//! HTTP/2 prior-knowledge preface on a new connection hands it to hyper's HTTP/2 server.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::encode::{encode_head, rejection, rejection_text, ResponseFields};
pub use super::stop::StopSignal;
use super::stop::StopWatch;
use super::Http1Error;
use crate::wire::codec::{
    self, Decoded, Decoder, Framing, FramingError, HeadScan, MAX_HEAD, MAX_HEADERS,
};
use crate::wire::fields::{self, HeadFacts};
use crate::wire::{
    BodyError, BodySource, ClientBody, ClientHeaders, H1Body, InterimSink, OutgoingRequest,
    PendingHeaders, ProxyRequest, RequestBody,
};

/// What a connection hands each request to: the proxy, or a test's own handler. Like hyper's
/// `Service`, it is all this server knows of what lies above it.
pub trait Handler: Clone + Send + Sync + 'static {
    type Body: ResponseSource;
    /// Answers one request (its body is read through the connection as it is polled).
    fn handle(self, request: OutgoingRequest) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// A response body as the connection writes it. `Sync`: the writer holds it across awaits
/// inside a future that must be `Send`.
pub trait ResponseSource: Body<Data = Bytes, Error = Http1Error> + Send + Sync + Unpin {
    /// A backend's header lines not yet in the response's map, written as they came.
    fn take_pending_headers(&mut self) -> Option<PendingHeaders>;
    /// The one-line body of the 502 sent instead when this body fails before any of it left.
    fn failure_message(&self, error: &Http1Error) -> String;
}

/// The start of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Response bytes gathered before a write; larger body pieces are written as they are.
const GATHER: usize = 16 * 1024;
/// How much of a body not yet being read a connection buffers while watching for its client
/// leaving; a larger body's client is noticed leaving when its reader starts.
const BODY_READ_AHEAD: usize = 16 * 1024;
/// Interim (1xx) responses from a backend held for the client at once; more are dropped.
const MAX_INTERIM: usize = 16 * 1024;
/// Longest silence between two reads of a request body until the route sets its own.
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// A client transport: plain TCP or TLS.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once a read would find data or the end of the stream. Lets an idle connection wait
    /// without a read buffer; transports that cannot tell say ready at once.
    fn poll_idle_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Acknowledges what has arrived at once (see [`super::ack_now`]): called when part of a
    /// request has come and the rest is awaited.
    fn ack_now(&self) {}

    /// Whether the connection can end its task to wait parked while idle (a plain socket; a TLS
    /// session's state would have to be parked with it). Such a transport must tell readiness in
    /// `poll_idle_ready`.
    const PARKS: bool = false;

    /// The socket, for a transport that can wait parked in an [`super::idle::IdleSet`].
    fn into_parkable(self) -> Result<TcpStream, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

impl ClientIo for TcpStream {
    const PARKS: bool = true;

    fn into_parkable(self) -> Result<TcpStream, Self> {
        Ok(self)
    }

    fn poll_idle_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn ack_now(&self) {
        super::ack_now(self);
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn ack_now(&self) {
        super::ack_now(self.get_ref().0);
    }
}

/// The listener's timeouts, as one connection applies them.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From when the connection is ready for a request until its head is complete.
    pub header_read: Duration,
    /// Longest silence between requests.
    pub idle: Duration,
    /// Silence after which the connection ends its task to wait parked ([`Served::Idle`]);
    /// `None` keeps it in its task until `idle` passes.
    pub park_after: Option<Duration>,
}

/// How a connection ended.
pub enum Served<I> {
    Closed,
    /// The client opened with the HTTP/2 preface; `preface` holds the bytes already read.
    Http2 {
        io: I,
        preface: Bytes,
    },
    /// The client went quiet for `park_after`: the connection waits for its next request
    /// without a task, to be served again with `first` until `until`, when it closes.
    Idle {
        io: I,
        first: bool,
        until: Instant,
    },
}

/// The connection's socket and read buffer, shared with the body of the request in progress.
struct Wire<I> {
    io: I,
    buf: BytesMut,
    decoder: Decoder,
    /// Bytes of `100 Continue` still to write before the body is read.
    continue_owed: usize,
    /// The request's body reader has started: from then on it notices a close itself.
    body_started: bool,
    /// Where the next request head's end has been looked for.
    head_scan: HeadScan,
    /// A backend's interim responses, to be written before the final one.
    interim: Vec<u8>,
    /// Longest silence between two reads of a request body (the route's `client_body`).
    body_idle_ms: u32,
    /// Times that silence; made the first time a body read has to wait, then kept.
    body_clock: Option<Box<BodyClock>>,
}

type SharedWire<I> = Arc<Mutex<Wire<I>>>;

/// Times a request body's silences; made the first time a body read has to wait, then kept.
struct BodyClock {
    timer: Pin<Box<Sleep>>,
    /// When the body last made progress; `None` until this request's body first waits.
    progress: Option<Instant>,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn lock<I>(wire: &Mutex<Wire<I>>) -> MutexGuard<'_, Wire<I>> {
    wire.lock().unwrap_or_else(|e| e.into_inner())
}

/// A parsed request head, and what the connection must do around it.
struct Head {
    /// Boxed here, where it is built: the proxy keeps it boxed on its way to a backend.
    request: OutgoingRequest,
    keep_alive: bool,
}

enum NextRequest {
    Ready(Head),
    Close,
    Reject(StatusCode, &'static str),
    Http2,
    /// Quiet for `park_after`; the connection closes at the instant given.
    Park(Instant),
}

/// Serves HTTP/1.1 requests on `io` until the client leaves, a timeout passes, the request says
/// close, or `stop` flips. `first`: no request has come on the connection yet (an HTTP/2 preface
/// is still possible).
///
/// Not an `async fn`: those keep a second copy of their arguments for the whole call, and this
/// future is most of an idle connection's memory. The shared wire is built before the first poll.
pub fn serve<I: ClientIo, H: Handler>(
    io: I,
    service: H,
    timeouts: Timeouts,
    stop: Arc<StopSignal>,
    mut first: bool,
) -> impl Future<Output = Served<I>> + Send {
    let wire: SharedWire<I> = Arc::new(Mutex::new(Wire {
        io,
        buf: BytesMut::new(),
        decoder: Decoder::new(Framing::Empty),
        continue_owed: 0,
        body_started: false,
        head_scan: HeadScan::default(),
        interim: Vec::new(),
        body_idle_ms: millis(DEFAULT_CLIENT_BODY_TIMEOUT),
        body_clock: None,
    }));
    async move {
        let mut stop = StopWatch {
            signal: stop,
            registered: None,
        };
        // One timer for the connection's idle and header deadlines, moved on for each request:
        // moving a registered timer later is one atomic operation, while a fresh one takes the
        // timer wheel's lock to be inserted and again to be removed.
        let mut timer = std::pin::pin!(tokio::time::sleep(timeouts.header_read));
        // The rejection is written after the loop, so that no request head is kept across it.
        let rejected = loop {
            if stop.signal.is_stopped() {
                return Served::Closed;
            }
            let next = next_request(&wire, timeouts, &mut stop, timer.as_mut(), first);
            let head = match next.await {
                NextRequest::Ready(head) => head,
                NextRequest::Close => return Served::Closed,
                NextRequest::Reject(status, reason) => break rejection(status, reason),
                NextRequest::Http2 => return into_http2(wire),
                NextRequest::Park(until) => return into_idle(wire, first, until),
            };
            first = false;
            // One allocation per request holds all of its state, so that an idle connection's
            // task stays small.
            let exchange = Box::pin(exchange(&wire, service.clone(), head, &stop.signal));
            if !exchange.await {
                return Served::Closed;
            }
        };
        let _ = write_all(&wire, &rejected).await;
        Served::Closed
    }
}

/// Runs one request through the proxy and writes its response; true when the connection may
/// carry another request.
async fn exchange<I: ClientIo, H: Handler>(
    wire: &SharedWire<I>,
    service: H,
    head: Head,
    stop: &StopSignal,
) -> bool {
    let head_only = head.request.head.method == Method::HEAD;
    let version = head.request.head.version;
    // The service runs first in each poll, so that once it has read the whole body the watch
    // for the client leaving starts reading the socket in the same poll. (Not `select!`, which
    // moves the service's future around several times per request.)
    // A future of its own, so that the response writing below reuses its space.
    let handled = async {
        let mut handling = std::pin::pin!(service.handle(head.request));
        poll_fn(|cx| match handling.as_mut().poll(cx) {
            Poll::Ready(response) => Poll::Ready(Some(response)),
            Poll::Pending => {
                if poll_write_interim(wire, cx).is_ready() {
                    return Poll::Ready(None);
                }
                poll_client_gone(wire, cx).map(|()| None)
            }
        })
        .await
    }
    .await;
    let Some(response) = handled else {
        return false;
    };
    let body_read = lock(wire).decoder.is_done();
    let keep_alive = head.keep_alive && body_read && !stop.is_stopped();
    let reply = Reply {
        version,
        head_only,
        keep_alive,
    };
    let mut out = Vec::with_capacity(512);
    matches!(
        write_response(wire, &mut out, response, reply).await,
        Ok(true)
    )
}

fn into_http2<I>(wire: SharedWire<I>) -> Served<I> {
    match Arc::try_unwrap(wire) {
        Ok(wire) => {
            let wire = wire.into_inner().unwrap_or_else(|e| e.into_inner());
            Served::Http2 {
                io: wire.io,
                preface: wire.buf.freeze(),
            }
        }
        Err(_) => Served::Closed,
    }
}

/// The connection's socket, to wait parked; nothing is buffered when it parks.
fn into_idle<I>(wire: SharedWire<I>, first: bool, until: Instant) -> Served<I> {
    match Arc::try_unwrap(wire) {
        Ok(wire) => {
            let io = wire.into_inner().unwrap_or_else(|e| e.into_inner()).io;
            Served::Idle { io, first, until }
        }
        Err(_) => Served::Closed,
    }
}

/// Waits for the next request head: bufferless while idle, then within `header_read`, both
/// timed by the connection's `timer`. Quiet for `park_after`, it asks to park instead.
fn next_request<'w, I: ClientIo>(
    wire: &'w SharedWire<I>,
    timeouts: Timeouts,
    stop: &'w mut StopWatch,
    mut timer: Pin<&'w mut Sleep>,
    first: bool,
) -> impl Future<Output = NextRequest> + Send + 'w {
    let started = Instant::now();
    let head_deadline = started + timeouts.header_read;
    let idle_deadline = started + timeouts.idle.min(timeouts.header_read);
    let park_at = timeouts
        .park_after
        .map(|after| started + after)
        .filter(|&at| at < idle_deadline);
    async move {
        while lock(wire).buf.is_empty() {
            // Nothing pipelined: give the buffer back while the client thinks.
            lock(wire).buf = BytesMut::new();
            timer.as_mut().reset(park_at.unwrap_or(idle_deadline));
            let woken = poll_fn(|cx| {
                if stop.poll_stopped(cx).is_ready() {
                    return Poll::Ready(Some(false));
                }
                match lock(wire).io.poll_idle_ready(cx) {
                    Poll::Ready(ready) => Poll::Ready(Some(ready.is_ok())),
                    Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
                }
            });
            match woken.await {
                Some(true) => {}
                Some(false) => return NextRequest::Close,
                None if park_at.is_some() => return NextRequest::Park(idle_deadline),
                None => return NextRequest::Close,
            }
            if !I::PARKS {
                // A transport that cannot tell readiness waits in the read itself.
                break;
            }
            // Readiness can be stale (a new socket is reported readable before its client
            // writes): one read says, and finding nothing, the connection goes back to waiting.
            let read = poll_fn(|cx| {
                let mut guard = lock(wire);
                let w = &mut *guard;
                Poll::Ready(match codec::poll_read_buf(&mut w.io, cx, &mut w.buf) {
                    Poll::Pending => None,
                    Poll::Ready(read) => Some(read),
                })
            });
            match read.await {
                None => {}
                Some(Ok(0) | Err(_)) => return NextRequest::Close,
                Some(Ok(_)) => break,
            }
        }
        timer.as_mut().reset(head_deadline);
        let mut reading = std::pin::pin!(read_head(wire, first));
        poll_fn(|cx| match reading.as_mut().poll(cx) {
            Poll::Ready(next) => Poll::Ready(next),
            Poll::Pending => timer.as_mut().poll(cx).map(|()| NextRequest::Close),
        })
        .await
    }
}

async fn read_head<I: ClientIo>(wire: &SharedWire<I>, first: bool) -> NextRequest {
    loop {
        {
            let mut guard = lock(wire);
            let w = &mut *guard;
            if first && !w.buf.is_empty() {
                let seen = w.buf.len().min(H2_PREFACE.len());
                if H2_PREFACE[..seen] == w.buf[..seen] {
                    if seen == H2_PREFACE.len() {
                        return NextRequest::Http2;
                    }
                } else if let Some(next) = parse_head(w, Arc::clone(wire)) {
                    return next;
                }
            } else if let Some(next) = parse_head(w, Arc::clone(wire)) {
                return next;
            }
        }
        let read = poll_fn(|cx| {
            let mut guard = lock(wire);
            let w = &mut *guard;
            codec::poll_read_buf(&mut w.io, cx, &mut w.buf)
        });
        match read.await {
            Ok(0) | Err(_) => return NextRequest::Close,
            Ok(_) => {}
        }
    }
}

/// Parses a complete head in the buffer into a request; `None` when more bytes are needed.
fn parse_head<I: ClientIo>(w: &mut Wire<I>, shared: SharedWire<I>) -> Option<NextRequest> {
    // Empty lines before a request line are ignored (RFC 9112 §2.2), and dropped here so that a
    // stream of them neither grows the buffer nor makes every later look parse them again.
    let blank = w
        .buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(w.buf.len());
    let blank = if w.buf[..blank].ends_with(b"\r") {
        blank - 1
    } else {
        blank
    };
    if blank > 0 {
        bytes::Buf::advance(&mut w.buf, blank);
        w.head_scan.reset();
    }
    if w.buf.is_empty() || !w.head_scan.worth_parsing(&w.buf) {
        return None;
    }
    // Uninitialized: httparse fills what it parses, and zeroing 3 KiB per head is not free.
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match parsed.parse_with_uninit_headers(&w.buf, &mut slots) {
        // A read can bring more than MAX_HEAD at once: the limit applies to the head, however read.
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if w.buf.len() < MAX_HEAD => return None,
        Ok(_) if !w.buf[..MAX_HEAD.min(w.buf.len())].contains(&b'\n') => {
            return Some(NextRequest::Reject(
                StatusCode::URI_TOO_LONG,
                "the request line is too long",
            ))
        }
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Some(NextRequest::Reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request headers are too large",
            ))
        }
        Err(e) => {
            return Some(NextRequest::Reject(
                StatusCode::BAD_REQUEST,
                parse_reason(e),
            ))
        }
    };
    let method = parsed.method.unwrap_or_default();
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Some(bad_request("invalid method"));
    };
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let target = parsed.path.unwrap_or_default();
    let target_start = target.as_ptr() as usize - w.buf.as_ptr() as usize;
    let target_span = target_start..target_start + target.len();
    let (lines, facts) = fields::sort_lines(&w.buf, parsed.headers);
    let head = w.buf.split_to(head_len).freeze();
    w.head_scan.reset();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target_span)) else {
        return Some(bad_request("invalid request target"));
    };
    if let Err(reason) = check_host(version, &uri, &facts) {
        return Some(bad_request(reason));
    }
    let mut headers = lines.in_head(head);
    let (framing, mut keep_alive) = match request_framing(version, &facts) {
        Ok(framing) => framing,
        Err((status, reason)) => return Some(NextRequest::Reject(status, reason)),
    };
    keep_alive &= facts.keeps_alive(version);
    let expects_continue = facts.expects_continue;
    if expects_continue {
        // Answered here, when the body is first read; the backend is not asked.
        headers.remove("expect");
    }
    w.continue_owed =
        if expects_continue && version == Version::HTTP_11 && framing != Framing::Empty {
            CONTINUE.len()
        } else {
            0
        };
    w.decoder = Decoder::new(framing);
    w.body_started = false;
    if let Some(clock) = &mut w.body_clock {
        clock.progress = None;
    }
    w.body_idle_ms = millis(DEFAULT_CLIENT_BODY_TIMEOUT);
    let shared_sink: Arc<dyn InterimSink> = shared.clone();
    let body = if framing == Framing::Empty {
        H1Body::new(None)
    } else {
        H1Body::new(Some(shared))
    };
    let mut request = Box::new(ProxyRequest::new(
        method,
        uri,
        version,
        ClientHeaders::Lines(headers),
        RequestBody::streaming(ClientBody::H1(body), u64::MAX),
    ));
    // HTTP/1.0 clients cannot take interim responses (RFC 9110 §15.2).
    if version == Version::HTTP_11 {
        request.head.interim = Some(shared_sink);
    }
    Some(NextRequest::Ready(Head {
        request,
        keep_alive,
    }))
}

/// Host rules of RFC 9112 §3.2: at most one Host line, one in every HTTP/1.1 request, each a valid
/// `uri-host [":" port]`. An absolute-form target's authority stands in for Host (§3.2.2), so
/// it must be a valid one too, for `http` or `https`, without user information.
fn check_host(version: Version, uri: &Uri, facts: &HeadFacts) -> Result<(), &'static str> {
    match facts.hosts {
        0 if version == Version::HTTP_11 => return Err("an HTTP/1.1 request needs a Host header"),
        0 | 1 => {}
        _ => return Err("more than one Host header"),
    }
    if !facts.host_valid {
        return Err("the Host header is not a valid host[:port]");
    }
    if let Some(scheme) = uri.scheme_str() {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err("the request target's scheme is not http or https");
        }
        let valid = uri
            .authority()
            .is_some_and(|a| fields::is_valid_host(a.as_str().as_bytes()));
        if !valid {
            return Err("the request target's authority is not a valid host[:port]");
        }
    }
    Ok(())
}

fn bad_request(reason: &'static str) -> NextRequest {
    NextRequest::Reject(StatusCode::BAD_REQUEST, reason)
}

fn parse_reason(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "malformed header name",
        httparse::Error::HeaderValue => "malformed header value",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::Token | httparse::Error::NewLine => "malformed request line",
        _ => "malformed request head",
    }
}

/// The body's framing, and false when the connection must close after this request.
fn request_framing(
    version: Version,
    facts: &HeadFacts,
) -> Result<(Framing, bool), (StatusCode, &'static str)> {
    if let Some(chunked_last) = facts.chunked_last {
        if version == Version::HTTP_10 {
            return Err((
                StatusCode::BAD_REQUEST,
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if !chunked_last {
            return Err((
                StatusCode::BAD_REQUEST,
                "Transfer-Encoding must end with chunked",
            ));
        }
        if facts.other_codings {
            return Err((
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            ));
        }
        // A Content-Length beside Transfer-Encoding is ignored, but only a well-formed one: a
        // malformed one is a parser disagreement some hop may resolve the other way.
        if facts.content_length.is_err() {
            return Err((StatusCode::BAD_REQUEST, "invalid Content-Length"));
        }
        // With both, Transfer-Encoding wins and the connection closes after the response. (The
        // proxy frames the body itself toward the backend: neither header is passed on.)
        let both = facts.content_length != Ok(None);
        return Ok((Framing::Chunked, !both));
    }
    match facts.content_length {
        Ok(Some(len)) => Ok((Framing::Length(len), true)),
        Ok(None) => Ok((Framing::Empty, true)),
        Err(FramingError::ConflictingLengths) => {
            Err((StatusCode::BAD_REQUEST, "conflicting Content-Length values"))
        }
        Err(_) => Err((StatusCode::BAD_REQUEST, "invalid Content-Length")),
    }
}

/// Completes if the client closes the connection while its request is in progress, waiting
/// for admission included. Bytes it sends meanwhile (the rest of its body, or pipelined requests)
/// are kept for their reader.
fn poll_client_gone<I: ClientIo>(wire: &SharedWire<I>, cx: &mut Context<'_>) -> Poll<()> {
    let mut guard = lock(wire);
    let w = &mut *guard;
    // Before the body is read (waiting for admission, a key's turn or a backend connection), a
    // little of it may be read ahead to see the end of the stream; once its reader has started,
    // the reader notices a close itself.
    let limit = if w.decoder.is_done() {
        MAX_HEAD
    } else if !w.body_started {
        BODY_READ_AHEAD
    } else {
        return Poll::Pending;
    };
    loop {
        if w.buf.len() >= limit {
            return Poll::Pending;
        }
        // No buffer while the backend works, unless the client sends something.
        let read = codec::poll_read_when_ready(&mut w.io, cx, &mut w.buf, I::poll_idle_ready);
        match ready!(read) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(_) => {}
        }
    }
}

impl<I: ClientIo> std::fmt::Debug for Wire<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("buffered", &self.buf.len())
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl<I: ClientIo> BodySource for Mutex<Wire<I>> {
    fn poll_piece(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let mut guard = lock(self);
        let w = &mut *guard;
        w.body_started = true;
        while w.continue_owed > 0 {
            let start = CONTINUE.len() - w.continue_owed;
            match ready!(Pin::new(&mut w.io).poll_write(cx, &CONTINUE[start..])) {
                Ok(0) => return Poll::Ready(Some(Err(BodyError::Closed))),
                Ok(n) => w.continue_owed -= n,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            if w.continue_owed == 0 {
                if let Err(e) = ready!(Pin::new(&mut w.io).poll_flush(cx)) {
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
        loop {
            match w.decoder.decode(&mut w.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            let read = codec::poll_read_buf(&mut w.io, cx, &mut w.buf);
            match read {
                Poll::Pending => {
                    if w.body_progress().is_none() {
                        // The first wait for more of this body: a client with Nagle on holds
                        // the body until its head is acknowledged.
                        w.io.ack_now();
                    }
                    return w.poll_body_silence(cx).map(|e| Some(Err(e)));
                }
                Poll::Ready(Ok(0)) if w.decoder.at_eof() => return Poll::Ready(None),
                Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(BodyError::Closed))),
                Poll::Ready(Ok(_)) => {
                    if let Some(clock) = w.body_clock.as_mut().filter(|c| c.progress.is_some()) {
                        clock.progress = Some(Instant::now());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn remaining(&self) -> Option<u64> {
        lock(self).decoder.remaining()
    }

    fn set_idle_timeout(&self, idle: Duration) {
        lock(self).body_idle_ms = millis(idle);
    }
}

impl<I: ClientIo> Wire<I> {
    /// Called when a body read has to wait: ready with an error once the client has sent nothing
    /// for `body_idle`. The clock is read only once a read waits, and a timer that fires early
    /// (the body moved meanwhile) is moved on rather than reset on every read.
    fn poll_body_silence(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let idle = Duration::from_millis(u64::from(self.body_idle_ms));
        if self.body_progress().is_none() {
            // This request's body waits for the first time: start timing its silence.
            let now = Instant::now();
            match &mut self.body_clock {
                Some(clock) => {
                    clock.timer.as_mut().reset(now + idle);
                    clock.progress = Some(now);
                }
                None => {
                    self.body_clock = Some(Box::new(BodyClock {
                        timer: Box::pin(tokio::time::sleep_until(now + idle)),
                        progress: Some(now),
                    }))
                }
            }
        }
        let Some(clock) = self.body_clock.as_mut() else {
            return Poll::Pending;
        };
        let progress = clock.progress.unwrap_or_else(Instant::now);
        loop {
            ready!(clock.timer.as_mut().poll(cx));
            let deadline = progress + idle;
            if deadline <= Instant::now() {
                return Poll::Ready(BodyError::TimedOut(idle));
            }
            clock.timer.as_mut().reset(deadline);
        }
    }

    /// When the body last made progress, while its silence is being timed.
    fn body_progress(&self) -> Option<Instant> {
        self.body_clock.as_ref().and_then(|clock| clock.progress)
    }
}

impl<I: ClientIo> InterimSink for Mutex<Wire<I>> {
    fn push(&self, response: &[u8]) {
        let mut w = lock(self);
        if w.interim.len() + response.len() <= MAX_INTERIM {
            w.interim.extend_from_slice(response);
        }
    }
}

/// Writes what interim responses are waiting; ready only if the client connection failed.
fn poll_write_interim<I: ClientIo>(wire: &SharedWire<I>, cx: &mut Context<'_>) -> Poll<()> {
    let mut guard = lock(wire);
    let w = &mut *guard;
    while !w.interim.is_empty() {
        match ready!(Pin::new(&mut w.io).poll_write(cx, &w.interim)) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(n) => drop(w.interim.drain(..n)),
        }
        if w.interim.is_empty() {
            // The queue's memory goes back: interim responses are rare.
            w.interim = Vec::new();
            if ready!(Pin::new(&mut w.io).poll_flush(cx)).is_err() {
                return Poll::Ready(());
            }
        }
    }
    Poll::Pending
}

/// How a response is to be written.
#[derive(Clone, Copy)]
struct Reply {
    version: Version,
    head_only: bool,
    keep_alive: bool,
}

/// Writes `response`; true when all of it was written and the connection may go on.
///
/// The head is encoded before the returned future is first polled, and the future keeps only the
/// body: not an `async fn`, which would keep the whole response (and a second copy of it) for
/// the whole write, in every request's state. A backend body that fails before any byte went to
/// the client is answered 502 instead; one that fails later closes the connection. While the
/// backend is slow the client is watched, so that one that leaves stops the backend's read.
fn write_response<'a, I: ClientIo, B: ResponseSource + 'a>(
    wire: &'a SharedWire<I>,
    out: &'a mut Vec<u8>,
    response: Response<B>,
    reply: Reply,
) -> impl Future<Output = io::Result<bool>> + Send + 'a {
    let (parts, mut body) = response.into_parts();
    out.clear();
    let status = parts.status;
    let no_body = reply.head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else {
        match body.size_hint().exact() {
            Some(len) => Framing::Length(len),
            None if reply.version == Version::HTTP_11 => Framing::Chunked,
            None => Framing::UntilClose,
        }
    };
    let keep_alive = reply.keep_alive && framing != Framing::UntilClose;
    let pending = body.take_pending_headers();
    let fields = ResponseFields {
        map: &parts.headers,
        pending: pending.as_ref(),
    };
    take_interim(wire, out);
    encode_head(out, status, fields, framing, keep_alive, reply.version);
    drop(pending);
    drop(parts);
    let mut ended = no_body || body.is_end_stream();
    async move {
        let mut written = false;
        loop {
            // Gather what the body has ready, so that a small response leaves in one write.
            while !ended && out.len() < GATHER {
                let piece = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
                match piece {
                    Poll::Pending => break,
                    ready => match take_piece(wire, out, framing, ready, &body).await {
                        Ok(end) => ended = end,
                        Err(PieceError::Body(e)) if !written => {
                            let text = body.failure_message(&e);
                            out.clear();
                            out.extend_from_slice(&rejection_text(StatusCode::BAD_GATEWAY, &text));
                            write_all(wire, out).await?;
                            return Ok(false);
                        }
                        Err(e) => return Err(e.into()),
                    },
                }
            }
            if ended && framing == Framing::Chunked {
                out.extend_from_slice(codec::LAST_CHUNK);
            }
            write_all(wire, out).await?;
            written = true;
            out.clear();
            if ended {
                return Ok(keep_alive);
            }
            let piece = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(piece) => Poll::Ready(Some(piece)),
                Poll::Pending => poll_client_gone(wire, cx).map(|()| None),
            })
            .await;
            let Some(piece) = piece else {
                // The client left: dropping the body closes the backend connection unread.
                return Err(io::ErrorKind::ConnectionAborted.into());
            };
            ended = take_piece(wire, out, framing, Poll::Ready(piece), &body).await?;
        }
    }
}

/// Moves interim responses not yet written in front of the final response's head.
fn take_interim<I: ClientIo>(wire: &SharedWire<I>, out: &mut Vec<u8>) {
    let mut w = lock(wire);
    if !w.interim.is_empty() {
        out.append(&mut w.interim);
        w.interim = Vec::new();
    }
}

/// Why a response body stopped: the backend's side, or the write to the client.
enum PieceError {
    Body(Http1Error),
    Write(io::Error),
}

impl From<PieceError> for io::Error {
    fn from(error: PieceError) -> io::Error {
        match error {
            PieceError::Body(e) => io::Error::other(e),
            PieceError::Write(e) => e,
        }
    }
}

/// Adds one body piece to `out` (or writes a large one straight out); true at the body's end.
async fn take_piece<I: ClientIo, B: ResponseSource>(
    wire: &SharedWire<I>,
    out: &mut Vec<u8>,
    framing: Framing,
    piece: Poll<Option<Result<Frame<Bytes>, Http1Error>>>,
    body: &B,
) -> Result<bool, PieceError> {
    let frame = match piece {
        Poll::Pending | Poll::Ready(None) => return Ok(true),
        // The backend broke off: the client must not see a complete response.
        Poll::Ready(Some(Err(e))) => return Err(PieceError::Body(e)),
        Poll::Ready(Some(Ok(frame))) => frame,
    };
    if let Ok(data) = frame.into_data() {
        if framing == Framing::Chunked && !data.is_empty() {
            codec::chunk_header(out, data.len());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        } else if out.len() + data.len() <= GATHER {
            out.extend_from_slice(&data);
        } else {
            write_all(wire, out).await.map_err(PieceError::Write)?;
            out.clear();
            write_all(wire, &data).await.map_err(PieceError::Write)?;
        }
    }
    Ok(body.is_end_stream())
}

async fn write_all<I: ClientIo>(wire: &SharedWire<I>, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        let n =
            poll_fn(|cx| Pin::new(&mut lock(wire).io).poll_write(cx, &bytes[written..])).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    poll_fn(|cx| Pin::new(&mut lock(wire).io).poll_flush(cx)).await
}
