//! How an HTTP/1.1 message body is delimited, and decoding it out of a read buffer.

use std::io;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncRead;

/// Longest message head accepted (request or status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in one message head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line accepted in a chunked body, extensions and CRLF included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Longest trailer section accepted in a chunked body: its field lines with their CRLFs (the
/// empty line that ends the section not counted).
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Most hex digits in a chunk size: 16 hold any `u64`.
const MAX_CHUNK_DIGITS: usize = 16;
/// Free space ensured in a read buffer before each read.
const READ_SPACE: usize = 8 * 1024;
/// The first read into an empty, unallocated buffer: most heads (and small bodies with them) fit,
/// and a request in flight should not hold 8 KiB per side (nginx starts heads at 1 KiB).
const FIRST_READ_SPACE: usize = 2 * 1024;

/// How a message body is delimited on the wire (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// The body ends when the connection does (responses only).
    UntilClose,
}

/// Why a message could not be read.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("invalid Content-Length")]
    BadLength,
    #[error("conflicting Content-Length values")]
    ConflictingLengths,
    #[error("invalid chunk size line")]
    BadChunkSize,
    #[error("chunk data not followed by CRLF")]
    BadChunkEnd,
    #[error("chunk size line too long")]
    ChunkLineTooLong,
    #[error("trailer section too long")]
    TrailersTooLong,
    #[error("line in chunked body not ended by CRLF")]
    BadLineEnd,
    #[error("malformed trailer field")]
    BadTrailer,
}

/// Adds one Content-Length header value to the length `found` so far; several values (in one line
/// or more) are allowed only when they agree.
pub fn content_length(found: Option<u64>, value: &[u8]) -> Result<Option<u64>, FramingError> {
    let mut found = found;
    for part in value.split(|&b| b == b',') {
        let len = parse_decimal(trim(part)).ok_or(FramingError::BadLength)?;
        match found {
            Some(previous) if previous != len => return Err(FramingError::ConflictingLengths),
            _ => found = Some(len),
        }
    }
    Ok(found)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

pub fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Tells when a message head arriving in pieces may be complete, looking at each byte once: a
/// head trickled a byte at a time would otherwise be parsed again from its start on every read,
/// quadratic in its length. The first look parses at once (most heads come in one read); after
/// that, only a blank line or a full buffer is worth a parse.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadScan {
    /// Bytes of the head looked at so far; 0 before the first look.
    scanned: usize,
}

impl HeadScan {
    /// Whether `head` (the head so far, from its first byte) should be parsed now.
    pub fn worth_parsing(&mut self, head: &[u8]) -> bool {
        let from = self.scanned;
        self.scanned = head.len();
        if from == 0 || head.len() >= MAX_HEAD {
            return true;
        }
        let Some(new) = head.get(from..) else {
            return true;
        };
        new.iter().enumerate().any(|(i, &b)| {
            let at = from + i;
            b == b'\n' && ends_blank_line(head, at)
        })
    }

    /// The head was taken out of the buffer: the next one starts afresh.
    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

/// Whether the LF at `lf` ends an empty line (`LF LF` or `LF CR LF`).
fn ends_blank_line(head: &[u8], lf: usize) -> bool {
    match lf.checked_sub(1).map(|i| head[i]) {
        Some(b'\n') => true,
        Some(b'\r') => lf.checked_sub(2).is_some_and(|i| head[i] == b'\n'),
        _ => false,
    }
}

/// Decodes one message body from a read buffer, a piece at a time.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers(usize),
    UntilClose,
    Done,
}

/// What the buffer held.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More bytes must be read first.
    NeedMore,
    /// The body has ended; what follows in the buffer belongs to the next message.
    End,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, FramingError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(n) | State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = n.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    let left = n - take;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FramingError::BadChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers(seen) => {
                    // Trailers are read and dropped: the proxy does not forward them. `seen` never
                    // passes MAX_TRAILERS, so the room left cannot wrap; the 2 is for the empty
                    // line that ends the section.
                    let room = MAX_TRAILERS.saturating_sub(seen) + 2;
                    let line = match take_line(buf, room) {
                        Ok(Some(line)) => line,
                        Ok(None) => return Ok(Decoded::NeedMore),
                        Err(FramingError::ChunkLineTooLong) => {
                            return Err(FramingError::TrailersTooLong)
                        }
                        Err(e) => return Err(e),
                    };
                    if line.is_empty() {
                        self.state = State::Done;
                        continue;
                    }
                    if !is_field_line(&line) {
                        return Err(FramingError::BadTrailer);
                    }
                    let seen = seen.saturating_add(line.len() + 2);
                    if seen > MAX_TRAILERS {
                        return Err(FramingError::TrailersTooLong);
                    }
                    self.state = State::Trailers(seen);
                }
            }
        }
    }

    /// The connection ended: the end of an until-close body, an error for any other unfinished one.
    pub fn at_eof(&mut self) -> bool {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                true
            }
            _ => false,
        }
    }
}

/// Splits one CRLF-terminated line (without the CRLF) off `buf`, if a whole one is there. The line
/// and its CRLF take at most `limit` bytes; a bare LF, or a CR anywhere but before the LF, is an
/// error (RFC 9112 §7.1 has no other line end in chunked framing; hyper agrees).
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<BytesMut>, FramingError> {
    let window = &buf[..buf.len().min(limit)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= limit {
            return Err(FramingError::ChunkLineTooLong);
        }
        return Ok(None);
    };
    let Some(cr) = lf.checked_sub(1).filter(|&cr| window[cr] == b'\r') else {
        return Err(FramingError::BadLineEnd);
    };
    if window[..cr].contains(&b'\r') {
        return Err(FramingError::BadLineEnd);
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(cr);
    Ok(Some(line))
}

/// Whether a trailer line is `token ":" field-value` (RFC 9110 §5): trailers are dropped, but one
/// that another parser would read differently (obs-fold, no name, control characters) is refused,
/// as hyper and httparse refuse it.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A chunk-size line: `1*HEXDIG [ *(SP / HTAB) ";" chunk-ext ]` (RFC 9112 §7.1). Leading
/// whitespace, a sign, and control characters in extensions are refused; so are more than 16
/// digits (hyper takes leading zeros past that; no sender needs them, and a short limit keeps
/// every parser in the chain agreeing).
fn parse_chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > MAX_CHUNK_DIGITS {
        return Err(FramingError::BadChunkSize);
    }
    let rest = &line[digits..];
    let after_space = rest.iter().position(|&b| b != b' ' && b != b'\t');
    match after_space {
        None => {}
        Some(at) if rest[at] == b';' => {
            let ext = &rest[at + 1..];
            if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(FramingError::BadChunkSize);
            }
        }
        Some(_) => return Err(FramingError::BadChunkSize),
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        // Hex digits checked above; 16 of them fit a u64, so neither step overflows.
        let v = (d as char).to_digit(16).unwrap_or(0);
        n << 4 | u64::from(v)
    }))
}

/// Writes the chunked-encoding frame header for `len` bytes of data.
pub fn chunk_header(out: &mut Vec<u8>, len: usize) {
    push_digits(out, len as u64, 16);
    out.extend_from_slice(b"\r\n");
}

/// Writes the header line that announces `framing`, if it needs one.
pub fn framing_header(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(len) => {
            out.extend_from_slice(b"content-length: ");
            push_digits(out, len, 10);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
}

/// Appends `n` in `radix` (10 or 16, lowercase). `write!` costs a formatter round trip per message.
fn push_digits(out: &mut Vec<u8>, mut n: u64, radix: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 20];
    let mut start = text.len();
    loop {
        start -= 1;
        text[start] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&text[start..]);
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Reads what the socket has into `buf`, keeping some free space first. `Ok(0)` is end of stream.
pub fn poll_read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    use std::future::Future;
    if buf.capacity() == 0 {
        buf.reserve(FIRST_READ_SPACE);
    } else if lacks_space(buf) {
        buf.reserve(READ_SPACE);
    }
    let read = std::pin::pin!(tokio::io::AsyncReadExt::read_buf(io, buf));
    let n = ready!(read.poll(cx))?;
    Poll::Ready(Ok(n))
}

/// Whether [`poll_read_buf`] would grow `buf` before reading.
fn lacks_space(buf: &BytesMut) -> bool {
    buf.capacity() - buf.len() < READ_SPACE / 4
}

/// [`poll_read_buf`] for a connection that may wait long for its peer: while the buffer is empty
/// it is released, and it is not allocated or grown until `ready` says a read will find data or
/// the end of the stream. A slow backend, a client between requests, or a client whose request
/// (with its unread body) waits for the backend then costs no more buffer than it already has.
pub fn poll_read_when_ready<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    ready: impl FnOnce(&R, &mut Context<'_>) -> Poll<io::Result<()>>,
) -> Poll<io::Result<usize>> {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
    if lacks_space(buf) {
        ready!(ready(io, cx))?;
    }
    poll_read_buf(io, cx, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(framing: Framing, wire: &[u8]) -> Result<(Vec<u8>, bool, Vec<u8>), FramingError> {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        // Feed one byte at a time: every state must cope with a split anywhere.
        for &b in wire {
            buf.extend_from_slice(&[b]);
            while let Decoded::Data(d) = decoder.decode(&mut buf)? {
                body.extend_from_slice(&d);
            }
        }
        Ok((body, decoder.is_done(), buf.to_vec()))
    }

    /// A request whose body waits in the buffer while the backend works must not make the watch
    /// for the client leaving grow that buffer: thousands of such requests are in flight at once.
    #[tokio::test]
    async fn a_waiting_buffer_grows_only_once_the_peer_sends() {
        use std::future::poll_fn;
        use tokio::io::AsyncWriteExt;
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = listener.accept().await.expect("accept");
        // The request: it fills most of a first read's buffer.
        let request = [b'w'; FIRST_READ_SPACE - 64];
        client.write_all(&request).await.expect("write");
        let mut buf = BytesMut::new();
        while buf.len() < request.len() {
            let n = poll_fn(|cx| poll_read_buf(&mut server, cx, &mut buf)).await;
            assert!(n.expect("read") > 0, "the request was cut short");
        }
        let capacity = buf.capacity();
        let waiting = poll_fn(|cx| {
            let read = poll_read_when_ready(&mut server, cx, &mut buf, TcpStream::poll_read_ready);
            Poll::Ready(read.is_pending())
        })
        .await;
        assert!(
            waiting,
            "the client sent nothing more, so the read must wait"
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "the buffer grew before the client sent"
        );
        client.write_all(b"next").await.expect("write");
        let n = poll_fn(|cx| {
            poll_read_when_ready(&mut server, cx, &mut buf, TcpStream::poll_read_ready)
        })
        .await
        .expect("read");
        assert_eq!(n, 4);
        assert!(buf.ends_with(b"next"), "the new bytes follow the kept ones");
        assert!(
            buf.capacity() > capacity,
            "the buffer grows once there is data"
        );
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (body, done, rest) = decode_all(Framing::Chunked, wire).unwrap();
        assert_eq!(body, b"hello0123456789");
        assert!(done);
        assert_eq!(rest, b"NEXT");
    }

    /// A head trickled a byte at a time is parsed on the first look and then only when a blank
    /// line may have ended it: a handful of parses, not one per byte.
    #[test]
    fn a_trickled_head_is_parsed_only_when_it_may_be_complete() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n";
        let mut scan = HeadScan::default();
        let parses: Vec<usize> = (1..=head.len())
            .filter(|&end| scan.worth_parsing(&head[..end]))
            .collect();
        assert_eq!(parses, [1, head.len()]);
        let mut scan = HeadScan::default();
        assert!(scan.worth_parsing(b"GET / HTTP/1.1\n"));
        assert!(!scan.worth_parsing(b"GET / HTTP/1.1\nHost: x\n"));
        assert!(
            scan.worth_parsing(b"GET / HTTP/1.1\nHost: x\n\n"),
            "bare LF heads too"
        );
        scan.reset();
        assert!(scan.worth_parsing(b"G"), "a reset scan looks at once");
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (body, done, rest) = decode_all(Framing::Length(3), b"abcdef").unwrap();
        assert_eq!(
            (body.as_slice(), done, rest.as_slice()),
            (&b"abc"[..], true, &b"def"[..])
        );
    }

    #[test]
    fn bad_chunks_are_errors() {
        assert_eq!(
            decode_all(Framing::Chunked, b"zz\r\n"),
            Err(FramingError::BadChunkSize)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"1\r\naXX"),
            Err(FramingError::BadChunkEnd)
        );
        assert_eq!(
            decode_all(Framing::Chunked, &[b'1'; 5000]),
            Err(FramingError::ChunkLineTooLong),
            "no line end within the limit"
        );
        let mut long_ext = b"1;".to_vec();
        long_ext.extend_from_slice(&[b'e'; 5000]);
        assert_eq!(
            decode_all(Framing::Chunked, &long_ext),
            Err(FramingError::ChunkLineTooLong)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"10000000000000000\r\n"),
            Err(FramingError::BadChunkSize)
        );
    }

    #[test]
    fn content_lengths_must_agree() {
        let one = |v: &[u8]| content_length(None, v);
        assert_eq!(one(b"42"), Ok(Some(42)));
        assert_eq!(one(b"7, 7"), Ok(Some(7)));
        assert_eq!(one(b"7, 8"), Err(FramingError::ConflictingLengths));
        assert_eq!(
            content_length(Some(7), b"8"),
            Err(FramingError::ConflictingLengths)
        );
        assert_eq!(one(b"+7"), Err(FramingError::BadLength));
        assert_eq!(one(b""), Err(FramingError::BadLength));
    }

    #[test]
    fn framing_lines_spell_their_numbers() {
        let line = |framing| {
            let mut out = Vec::new();
            framing_header(&mut out, framing);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(line(Framing::Length(0)), "content-length: 0\r\n");
        assert_eq!(line(Framing::Length(1907)), "content-length: 1907\r\n");
        assert_eq!(
            line(Framing::Length(u64::MAX)),
            format!("content-length: {}\r\n", u64::MAX)
        );
        let mut out = Vec::new();
        chunk_header(&mut out, 0x1f0a);
        chunk_header(&mut out, 0);
        assert_eq!(out, b"1f0a\r\n0\r\n");
    }
}
