//! One keep-alive HTTP/1.1 connection to a backend, driven by the task of the request it carries.
//!
//! [`UpstreamConn::send`] writes the request (head and body, the head and a ready first piece of
//! body in one write) and reads the response head; the response body is then read through
//! [`UpstreamConn::poll_body`]. Every failure says whether any byte of the request was written, and
//! a request that was not is handed back whole, so the caller can send it elsewhere. A body that
//! is streamed is sent while watching for an early response: a backend that refuses the request
//! before reading all of it (a 413, a 401) is answered with its own response, not a 502.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::wire::codec::{
    self, Decoded, Decoder, Framing, FramingError, HeadScan, MAX_HEAD, MAX_HEADERS,
};
use crate::wire::fields::{self, HeadFacts, RawHeaders};
use crate::wire::headers;
use crate::wire::{
    InterimSink, OutgoingRequest, ProxyRequest, RequestBody, RequestBodyError, RequestHead,
};

/// Body data up to this size is copied next to the head so that both leave in one write.
const COALESCE_BODY: usize = 16 * 1024;

/// A scratch buffer larger than this (after an unusually large head) is not kept.
const MAX_SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Where request heads are encoded: one buffer per thread, not one per backend connection.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The transport of a backend connection.
#[derive(Debug)]
pub enum UpstreamStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Acknowledges what has arrived now rather than after the delayed-ACK timer (up to 40 ms).
    ///
    /// Called when part of a response has come and the rest is awaited. A backend that writes
    /// its head and its body in two writes with Nagle's algorithm on (Python's `http.server`,
    /// many small frameworks) holds the second write until the first is acknowledged, and a
    /// receiver with nothing to send delays that ACK: every such response took 44 ms. Linux
    /// turns quick ACKs off again on its own, so this is asked for each time.
    fn ack_now(&self) {
        match self {
            UpstreamStream::Tcp(stream) => super::ack_now(stream),
            UpstreamStream::Tls(stream) => super::ack_now(stream.get_ref().0),
        }
    }

    /// Ready once a read would find data or the end of the stream; TLS cannot tell, so at once.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            UpstreamStream::Tcp(stream) => stream.poll_read_ready(cx),
            UpstreamStream::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

/// Why an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed before the response head")]
    ClosedBeforeHead,
    #[error("connection closed before the response body ended")]
    ClosedInBody,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("malformed response body: {0}")]
    Framing(#[from] FramingError),
    #[error("response head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The client's request body failed while it was being sent.
    #[error("{0}")]
    RequestBody(RequestBodyError),
    #[error("no response head within the response timeout")]
    ResponseTimeout,
    /// The backend took no request bytes, or sent no response bytes, for this long.
    #[error("the backend stalled for {0:?}")]
    Stalled(Duration),
}

/// The timeouts of one exchange with a backend.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeTimeouts {
    /// From the request's last byte to the response head.
    pub response: Duration,
    /// Longest the backend may leave request bytes unread, or its response body unsent.
    pub idle: Duration,
}

/// A response head and how its body is framed.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end header lines, as received.
    pub headers: RawHeaders,
    pub framing: Framing,
    /// Whether the connection may carry another request once this body has been read.
    pub keep_alive: bool,
}

impl ResponseHead {
    /// This head, on a connection that cannot carry another request.
    fn closing(mut self) -> ResponseHead {
        self.keep_alive = false;
        self
    }
}

/// How streaming a request body to a backend ended.
enum Sent {
    /// All of it went, and maybe a successful response head came early.
    Whole(Option<ResponseHead>),
    /// The backend answered with a refusal (or said it closes) before it had all of it.
    Refused(ResponseHead),
    /// A write failed: the backend closed or reset the connection.
    WriteFailed(io::Error),
}

/// Request body bytes on their way to a backend: for a chunked body, a chunk's size line, its
/// data and its CRLF, which leave in one vectored write. Nothing is copied.
#[derive(Default)]
struct Pending {
    parts: [Bytes; 3],
}

impl Pending {
    fn data(framing: Framing, data: Bytes) -> Pending {
        if framing != Framing::Chunked || data.is_empty() {
            return Pending {
                parts: [data, Bytes::new(), Bytes::new()],
            };
        }
        let mut size_line = Vec::with_capacity(18);
        codec::chunk_header(&mut size_line, data.len());
        Pending {
            parts: [size_line.into(), data, Bytes::from_static(b"\r\n")],
        }
    }

    fn last_chunk() -> Pending {
        Pending {
            parts: [
                Bytes::from_static(codec::LAST_CHUNK),
                Bytes::new(),
                Bytes::new(),
            ],
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    /// Writes some of what is pending; ready once something was written.
    fn poll_write(
        &mut self,
        io: &mut UpstreamStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let slices = self.parts.each_ref().map(|part| IoSlice::new(part));
        let mut written = std::task::ready!(Pin::new(io).poll_write_vectored(cx, &slices))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        for part in &mut self.parts {
            let n = written.min(part.len());
            part.advance(n);
            written -= n;
        }
        Poll::Ready(Ok(()))
    }
}

/// A failed [`UpstreamConn::send`]; `unsent` gives the request back when no byte of it was written.
#[derive(Debug)]
pub struct ExchangeFailure {
    pub error: Http1Error,
    pub unsent: Option<OutgoingRequest>,
}

/// An open connection to a backend, with its read buffer.
#[derive(Debug)]
pub struct UpstreamConn {
    io: UpstreamStream,
    buf: BytesMut,
    /// The exchange's timer (response, then body silence), kept from one exchange to the next:
    /// moving a registered timer's deadline later is one atomic operation, while a fresh timer
    /// takes the timer wheel's lock to be inserted and again to be removed.
    response_timer: Option<Pin<Box<Sleep>>>,
    /// When the response body last made progress, while the timer watches it for silence.
    body_progress: Option<Instant>,
    /// Where the response head's end has been looked for.
    head_scan: HeadScan,
}

impl UpstreamConn {
    pub fn new(io: UpstreamStream) -> UpstreamConn {
        UpstreamConn {
            io,
            buf: BytesMut::new(),
            response_timer: None,
            body_progress: None,
            head_scan: HeadScan::default(),
        }
    }

    /// The connection's timer, set to `deadline` and lent out for one exchange.
    fn lend_timer(&mut self, deadline: Instant) -> Pin<Box<Sleep>> {
        match self.response_timer.take() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline.into());
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline.into())),
        }
    }

    /// Whether an idle connection can carry a request: the backend has neither closed it nor sent
    /// anything unasked. Costs no system call while the socket has no news.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Writes `request` and reads the response head. The response timeout runs from when the
    /// request's last byte was written (`sent_at` when it all went at once); while the body is
    /// still going, the backend may leave it unread for `timeouts.idle` at most (a slow client
    /// is its own timeout's business).
    ///
    /// Not an `async fn`: those keep a second copy of their arguments, and this future is part of
    /// every request's.
    pub fn send(
        &mut self,
        mut request: OutgoingRequest,
        timeouts: ExchangeTimeouts,
        sent_at: Instant,
    ) -> impl Future<Output = Result<ResponseHead, ExchangeFailure>> + Send + '_ {
        let head_request = request.head.method == Method::HEAD;
        let framing = request_framing(&request);
        let interim = request.head.interim.take();
        self.body_progress = None;
        async move {
            let mut timer = self.lend_timer(sent_at + timeouts.response);
            let exchange = Exchange {
                timer: &mut timer,
                timeouts,
                interim: interim.as_deref(),
                head_request,
            };
            let result = self.exchange(request, framing, exchange).await;
            self.response_timer = Some(timer);
            result
        }
    }

    async fn exchange(
        &mut self,
        mut request: OutgoingRequest,
        framing: Framing,
        mut x: Exchange<'_>,
    ) -> Result<ResponseHead, ExchangeFailure> {
        let first = match first_piece(&mut request.body).await {
            Ok(first) => first,
            Err(error) => {
                return Err(ExchangeFailure {
                    error: Http1Error::RequestBody(error),
                    unsent: None,
                })
            }
        };
        let ended = request.body.is_end_stream();
        let small_first = first.as_ref().filter(|d| d.len() <= COALESCE_BODY);
        let start = poll_fn(|cx| {
            Poll::Ready(self.start_write(cx, &request.head, framing, small_first, ended))
        })
        .await;
        let mut all_at_once = true;
        let written = match start {
            Ok((taken, rest)) if rest.is_empty() => Ok(taken),
            Ok((taken, rest)) => {
                // Rare: the socket took only part of the head. The backend gets `idle` to take
                // the rest; a timeout counts as sent, since some of it may have gone.
                let now = Instant::now();
                x.timer.as_mut().reset((now + x.timeouts.idle).into());
                let writing = write_counted(&mut self.io, &rest);
                all_at_once = false;
                match timed(x.timer.as_mut(), writing).await {
                    Some(Ok(())) => Ok(taken + rest.len()),
                    Some(Err((error, n))) => Err((error.into(), taken + n)),
                    None => Err((Http1Error::Stalled(x.timeouts.idle), usize::MAX)),
                }
            }
            Err(error) => Err((error.into(), 0)),
        };
        match written {
            Ok(_) => {}
            Err((error, 0)) => {
                request.body.unread(first);
                return Err(ExchangeFailure {
                    error,
                    unsent: Some(request),
                });
            }
            Err((error, _)) => return Err(sent_failure(error)),
        }
        // The head is on the wire. Its header values share the client's read buffer: let go
        // of them, so that a slow backend does not keep that buffer alive.
        let mut body = std::mem::replace(&mut request.body, RequestBody::Full(None));
        drop(request);
        let rest = first.filter(|d| d.len() > COALESCE_BODY);
        if rest.is_some() || !ended {
            // Boxed: a body that was not all there at once, or is large, is rarer.
            let rest = Pending::data(framing, rest.unwrap_or_default());
            let sending = self.send_rest(rest, &mut body, framing, ended, &mut x);
            return Box::pin(sending).await.map_err(sent_failure);
        }
        self.io.flush().await.map_err(|e| sent_failure(e.into()))?;
        if !all_at_once {
            x.timer
                .as_mut()
                .reset((Instant::now() + x.timeouts.response).into());
        }
        self.read_head(&mut x).await.map_err(sent_failure)
    }

    /// Encodes the head (with a small first piece of body, and the last chunk when the body has
    /// ended) into this thread's scratch buffer and writes what the socket takes at once: a
    /// connection keeps no buffer of its own for requests, in flight or in the pool. Returns how
    /// many bytes went and a copy of the rest (rarely any) for [`write_counted`]; an error means
    /// none went.
    fn start_write(
        &mut self,
        cx: &mut Context<'_>,
        head: &RequestHead,
        framing: Framing,
        first: Option<&Bytes>,
        ended: bool,
    ) -> io::Result<(usize, Vec<u8>)> {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            encode_head(scratch, head, framing);
            if let Some(data) = first {
                encode_data(scratch, framing, data);
            }
            if ended && framing == Framing::Chunked {
                scratch.extend_from_slice(codec::LAST_CHUNK);
            }
            let taken = match Pin::new(&mut self.io).poll_write(cx, scratch) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => 0,
            };
            let rest = scratch[taken..].to_vec();
            if scratch.capacity() > MAX_SCRATCH {
                *scratch = Vec::new();
            }
            Ok((taken, rest))
        })
    }

    /// Streams the rest of the body, `pending` first, then reads the response head, watching for
    /// an early one all along: a backend may answer before it has read the whole body (a 413, a
    /// 401) and stop reading. An early refusal ends the sending, and the connection, now holding
    /// half a request, is not reused; an early success lets the body go on, whole.
    async fn send_rest(
        &mut self,
        mut pending: Pending,
        body: &mut RequestBody,
        framing: Framing,
        mut body_ended: bool,
        x: &mut Exchange<'_>,
    ) -> Result<ResponseHead, Http1Error> {
        let mut early: Option<ResponseHead> = None;
        let mut last_chunk_queued = framing != Framing::Chunked;
        let idle = x.timeouts.idle;
        // The backend's stall clock: restarted whenever bytes move toward it, or come from the
        // client to be sent on (waiting for a slow client is not the backend's stall).
        let mut progress = Instant::now();
        x.timer.as_mut().reset((progress + idle).into());
        let sent = poll_fn(|cx| loop {
            if early.is_none() {
                // Watched while sending: a backend may answer before it has read the body.
                if let Poll::Ready(head) = self.poll_head(cx, x.head_request, x.interim) {
                    let head = head?;
                    if head.status.is_client_error()
                        || head.status.is_server_error()
                        || !head.keep_alive
                    {
                        return Poll::Ready(Ok(Sent::Refused(head)));
                    }
                    early = Some(head);
                }
            }
            if pending.is_empty() {
                if body_ended && last_chunk_queued {
                    return match Pin::new(&mut self.io).poll_flush(cx) {
                        Poll::Ready(flushed) => {
                            flushed?;
                            Poll::Ready(Ok(Sent::Whole(early.take())))
                        }
                        Poll::Pending => poll_stall(x.timer.as_mut(), progress, idle, cx),
                    };
                }
                if body_ended {
                    pending = Pending::last_chunk();
                    last_chunk_queued = true;
                    continue;
                }
                match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
                    None => body_ended = true,
                    Some(Err(e)) => return Poll::Ready(Err(Http1Error::RequestBody(e))),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            pending = Pending::data(framing, data);
                        }
                    }
                }
                progress = Instant::now();
                continue;
            }
            match pending.poll_write(&mut self.io, cx) {
                Poll::Ready(Ok(())) => progress = Instant::now(),
                Poll::Ready(Err(error)) => return Poll::Ready(Ok(Sent::WriteFailed(error))),
                Poll::Pending => return poll_stall(x.timer.as_mut(), progress, idle, cx),
            }
        })
        .await?;
        x.timer
            .as_mut()
            .reset((Instant::now() + x.timeouts.response).into());
        match sent {
            Sent::Whole(Some(head)) => Ok(head),
            Sent::Whole(None) => self.read_head(x).await,
            Sent::Refused(head) => Ok(head.closing()),
            // A backend that answered and closed makes the next write fail; its answer stands, and
            // may still be there to read. (A failed socket is readable at once: this cannot hang.)
            Sent::WriteFailed(error) => match early {
                Some(head) => Ok(head.closing()),
                None => match self.read_head(x).await {
                    Ok(head) => Ok(head.closing()),
                    Err(_) => Err(error.into()),
                },
            },
        }
    }

    /// The response head, within the exchange's timer.
    async fn read_head(&mut self, x: &mut Exchange<'_>) -> Result<ResponseHead, Http1Error> {
        let (head_request, interim) = (x.head_request, x.interim);
        let timer = &mut x.timer;
        poll_fn(|cx| match self.poll_head(cx, head_request, interim) {
            Poll::Ready(head) => Poll::Ready(head),
            Poll::Pending => timer
                .as_mut()
                .poll(cx)
                .map(|()| Err(Http1Error::ResponseTimeout)),
        })
        .await
    }

    /// The response head, once all of it has come; reads what the backend has sent meanwhile.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        interim: Option<&dyn InterimSink>,
    ) -> Poll<Result<ResponseHead, Http1Error>> {
        loop {
            if let Some(head) = self.parse_head(head_request, interim)? {
                return Poll::Ready(Ok(head));
            }
            if self.buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(Http1Error::HeadTooLarge));
            }
            let read = codec::poll_read_when_ready(
                &mut self.io,
                cx,
                &mut self.buf,
                UpstreamStream::poll_read_ready,
            );
            match read {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Http1Error::ClosedBeforeHead)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    if !self.buf.is_empty() {
                        self.io.ack_now();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Parses a complete response head out of the buffer. Interim (1xx) responses go to
    /// `interim`, re-encoded with their end-to-end lines, or are dropped without one.
    fn parse_head(
        &mut self,
        head_request: bool,
        interim: Option<&dyn InterimSink>,
    ) -> Result<Option<ResponseHead>, Http1Error> {
        loop {
            if self.buf.is_empty() || !self.head_scan.worth_parsing(&self.buf) {
                return Ok(None);
            }
            // Uninitialized: httparse fills what it parses, and zeroing 3 KiB per head is not free.
            let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                &self.buf,
                &mut slots,
            );
            let head_len = match parsed {
                Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
                Ok(httparse::Status::Complete(_)) => return Err(Http1Error::HeadTooLarge),
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Http1Error::Malformed("too many headers"))
                }
                Err(_) => return Err(Http1Error::Malformed("invalid status line or header")),
            };
            self.head_scan.reset();
            // RFC 9110 §15: a status is three digits, 100 to 599.
            let code = response.code.unwrap_or(0);
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|_| (100..=599).contains(&code))
                .ok_or(Http1Error::Malformed("invalid status code"))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Http1Error::Malformed("protocol switch is not supported"));
            }
            let version = if response.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            let (lines, facts) = fields::sort_lines(&self.buf, response.headers);
            if status.is_informational() {
                if let Some(sink) = interim {
                    let lines = lines.in_head(Bytes::copy_from_slice(&self.buf[..head_len]));
                    sink.push(&encode_interim(status, &lines));
                }
                self.buf.advance(head_len);
                continue;
            }
            let headers = lines.in_head(self.buf.split_to(head_len).freeze());
            let framing = response_framing(status, head_request, &facts)?;
            // With both Transfer-Encoding and Content-Length, the body is read as chunked, and
            // the connection is not trusted with another request (RFC 9112 §6.3).
            let both = facts.chunked_last.is_some() && facts.content_length != Ok(None);
            let keep_alive = framing != Framing::UntilClose && facts.keeps_alive(version) && !both;
            return Ok(Some(ResponseHead {
                status,
                version,
                headers,
                framing,
                keep_alive,
            }));
        }
    }

    /// Reads the next piece of the response body framed by `decoder`; an error once the backend
    /// has sent nothing for `idle`. The clock is read only once a read has to wait.
    pub fn poll_body(
        &mut self,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
        idle: Duration,
    ) -> Poll<Option<Result<Bytes, Http1Error>>> {
        loop {
            match decoder.decode(&mut self.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            match codec::poll_read_buf(&mut self.io, cx, &mut self.buf) {
                Poll::Ready(Ok(0)) if decoder.at_eof() => return Poll::Ready(None),
                Poll::Ready(Ok(0)) => return Poll::Ready(Some(Err(Http1Error::ClosedInBody))),
                Poll::Ready(Ok(_)) => {
                    if self.body_progress.is_some() {
                        self.body_progress = Some(Instant::now());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => {
                    if self.body_progress.is_none() {
                        // The first wait for more of this body: see `ack_now`.
                        self.io.ack_now();
                    }
                    return self.poll_body_silence(cx, idle).map(|e| Some(Err(e)));
                }
            }
        }
    }

    /// Ready with an error once the response body has been silent for `idle`.
    fn poll_body_silence(&mut self, cx: &mut Context<'_>, idle: Duration) -> Poll<Http1Error> {
        let progress = match self.body_progress {
            Some(at) => at,
            None => {
                let now = Instant::now();
                self.body_progress = Some(now);
                let timer = self.lend_timer(now + idle);
                self.response_timer = Some(timer);
                now
            }
        };
        match self.response_timer.as_mut() {
            Some(timer) => poll_stall::<()>(timer.as_mut(), progress, idle, cx)
                .map(|stalled| stalled.err().unwrap_or(Http1Error::Stalled(idle))),
            None => Poll::Pending,
        }
    }

    /// Frees the read buffer while it holds nothing, for a stay in the pool.
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Whether the connection holds no bytes past the response just read.
    pub fn is_clean(&self) -> bool {
        self.buf.is_empty()
    }
}

/// What one exchange needs besides the connection: its timer (lent by the connection) and where
/// interim responses go.
struct Exchange<'a> {
    timer: &'a mut Pin<Box<Sleep>>,
    timeouts: ExchangeTimeouts,
    interim: Option<&'a dyn InterimSink>,
    head_request: bool,
}

/// Runs `future` until `timer` fires; `None` if it fired first.
async fn timed<F: Future>(mut timer: Pin<&mut Sleep>, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
    })
    .await
}

/// For a wait on the backend that began when it last made `progress`: pending while that was
/// less than `idle` ago (moving `timer` on when it fired early), then a stall error.
fn poll_stall<T>(
    mut timer: Pin<&mut Sleep>,
    progress: Instant,
    idle: Duration,
    cx: &mut Context<'_>,
) -> Poll<Result<T, Http1Error>> {
    loop {
        std::task::ready!(timer.as_mut().poll(cx));
        let deadline = progress + idle;
        if deadline <= Instant::now() {
            return Poll::Ready(Err(Http1Error::Stalled(idle)));
        }
        timer.as_mut().reset(deadline.into());
    }
}

/// An interim response as the client gets it: status line and end-to-end lines.
fn encode_interim(status: StatusCode, lines: &RawHeaders) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in lines.iter() {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn sent_failure(error: Http1Error) -> ExchangeFailure {
    ExchangeFailure {
        error,
        unsent: None,
    }
}

/// The first piece of body when it is ready at once; more is streamed after the head.
async fn first_piece(body: &mut RequestBody) -> Result<Option<Bytes>, RequestBodyError> {
    poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending | Poll::Ready(None) => Ok(None),
            Poll::Ready(Some(Err(e))) => Err(e),
            Poll::Ready(Some(Ok(frame))) => Ok(frame.into_data().ok()),
        })
    })
    .await
}

/// Writes all of `bytes`; on failure also says how many were written.
async fn write_counted(io: &mut UpstreamStream, bytes: &[u8]) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while written < bytes.len() {
        match io.write(&bytes[written..]).await {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => written += n,
            Err(e) => return Err((e, written)),
        }
    }
    Ok(())
}

fn request_framing(request: &ProxyRequest) -> Framing {
    let head = &request.head;
    if let Some(len) = request.body.exact_len() {
        let needs_length = len > 0
            || matches!(head.method, Method::POST | Method::PUT | Method::PATCH)
            || head.headers.get("content-length").is_some();
        return if needs_length {
            Framing::Length(len)
        } else {
            Framing::Empty
        };
    }
    Framing::Chunked
}

fn encode_head(out: &mut Vec<u8>, head: &RequestHead, framing: Framing) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    headers::encode(out, &head.headers, head.forwarding.as_ref());
    codec::framing_header(out, framing);
    out.extend_from_slice(b"\r\n");
}

fn encode_data(out: &mut Vec<u8>, framing: Framing, data: &[u8]) {
    if framing == Framing::Chunked {
        codec::chunk_header(out, data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

fn response_framing(
    status: StatusCode,
    head_request: bool,
    facts: &HeadFacts,
) -> Result<Framing, Http1Error> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if let Some(chunked) = facts.chunked_last {
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    Ok(match facts.content_length? {
        Some(len) => Framing::Length(len),
        None => Framing::UntilClose,
    })
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::AsyncWriteExt as _;

    use http::{HeaderMap, Uri};

    use super::*;
    use crate::wire::ClientHeaders;

    const TEST_TIMEOUTS: ExchangeTimeouts = ExchangeTimeouts {
        response: Duration::from_secs(10),
        idle: Duration::from_secs(10),
    };

    /// A backend that answered and closed before the body went: writing the body fails (the
    /// closed socket resets), and the answer, already in our socket, is still what comes back.
    #[tokio::test]
    async fn an_answer_before_a_failed_body_write_is_still_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut backend, _) = listener.accept().unwrap();
        // The runtime learns that the socket is writable, and has nothing to read yet; it learns
        // of the answer only after the writes below have run.
        stream.writable().await.unwrap();
        backend
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        drop(backend);
        let mut conn = UpstreamConn::new(UpstreamStream::Tcp(stream));
        let body = RequestBody::Full(Some(Bytes::from(vec![b'x'; 4 * COALESCE_BODY])));
        let request = ProxyRequest::new(
            Method::PUT,
            Uri::from_static("/w"),
            Version::HTTP_11,
            ClientHeaders::Map(HeaderMap::new()),
            body,
        );
        let head = conn
            .send(Box::new(request), TEST_TIMEOUTS, Instant::now())
            .await
            .map_err(|failure| failure.error)
            .expect("the backend's answer, not the failed write");
        assert_eq!(head.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!head.keep_alive, "the connection holds half a request");
    }

    /// Socket buffers too small for the head and its body in one write: what the first write
    /// leaves is kept and sent after it, and the backend gets the request whole.
    #[tokio::test]
    async fn a_request_the_socket_takes_in_parts_arrives_whole() {
        use tokio::io::AsyncReadExt;
        let listening = tokio::net::TcpSocket::new_v4().unwrap();
        listening.set_recv_buffer_size(4096).unwrap();
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let sending = tokio::net::TcpSocket::new_v4().unwrap();
        sending.set_send_buffer_size(4096).unwrap();
        let stream = sending
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut backend, _) = listener.accept().await.unwrap();
        let body = Bytes::from(vec![b'x'; COALESCE_BODY]);
        let request = ProxyRequest::new(
            Method::PUT,
            Uri::from_static("/w"),
            Version::HTTP_11,
            ClientHeaders::Map(HeaderMap::new()),
            RequestBody::Full(Some(body.clone())),
        );
        let mut conn = UpstreamConn::new(UpstreamStream::Tcp(stream));
        let exchange = tokio::spawn(async move {
            conn.send(Box::new(request), TEST_TIMEOUTS, Instant::now())
                .await
                .map(|head| head.status)
                .map_err(|failure| failure.error.to_string())
        });
        let mut received = Vec::new();
        let whole = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !received.ends_with(&body) {
                let mut buf = [0u8; 1024];
                let n = backend.read(&mut buf).await.unwrap();
                assert!(n > 0, "the backend got {} bytes before EOF", received.len());
                received.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(
            whole.is_ok(),
            "the request did not arrive whole within 10 s"
        );
        assert!(received.starts_with(b"PUT /w HTTP/1.1\r\n"));
        let head_len = received.len() - body.len();
        assert!(
            received[..head_len].ends_with(b"\r\n\r\n"),
            "one head, then the body"
        );
        backend
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(exchange.await.unwrap(), Ok(StatusCode::NO_CONTENT));
        assert!(
            received.len() > 2 * 4096,
            "the test needs a write larger than the socket buffers"
        );
    }
}
