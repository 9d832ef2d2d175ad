//! The header lines of a parsed HTTP/1.1 head: which belong to the connection it came on, what
//! they say about framing, and the end-to-end rest, as a `HeaderMap` or as the received lines.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: the fixed list plus every header `Connection` names) are
//! read here and never passed on. The end-to-end rest stay spans of the received head
//! ([`RawHeaders`]) and are written to the other side as they came: building a `HeaderMap` and
//! serializing it again costs more than the rest of handling a small message. A map is built only
//! where one is needed (responses to HTTP/2 clients, coalesced writes).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Version};

use super::codec::{self, FramingError};

/// Where one header's name and value lie in a message head. (Offsets are `u32` to keep the
/// per-parse array of these small; a head is at most [`codec::MAX_HEAD`] bytes past its buffer's
/// start.)
#[derive(Debug, Clone, Copy, Default)]
pub struct HeaderSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl HeaderSpan {
    fn name<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    fn value<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.value.0 as usize..self.value.1 as usize]
    }
}

/// Records where httparse found each header in `buf`, so that the head can be frozen and shared.
pub fn header_spans(buf: &[u8], headers: &[httparse::Header<'_>], out: &mut [HeaderSpan]) -> usize {
    let base = buf.as_ptr() as usize;
    for (span, header) in out.iter_mut().zip(headers) {
        let name = (header.name.as_ptr() as usize - base) as u32;
        let value = (header.value.as_ptr() as usize - base) as u32;
        *span = HeaderSpan {
            name: (name, name + header.name.len() as u32),
            value: (value, value + header.value.len() as u32),
        };
    }
    headers.len().min(out.len())
}

/// What the codec does with a header, known from its name in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    EndToEnd,
    Date,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Belongs to one connection and is dropped; `Upgrade` too, as the proxy does not tunnel
    /// protocol switches.
    HopByHop,
}

/// A match on the length first: this runs for every header line.
fn role(name: &[u8]) -> Role {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 if is("te") => Role::HopByHop,
        4 if is("date") => Role::Date,
        7 if is("trailer") || is("upgrade") => Role::HopByHop,
        10 if is("connection") => Role::Connection,
        10 if is("keep-alive") => Role::HopByHop,
        14 if is("content-length") => Role::ContentLength,
        16 if is("proxy-connection") => Role::HopByHop,
        17 if is("transfer-encoding") => Role::TransferEncoding,
        18 if is("proxy-authenticate") => Role::HopByHop,
        19 if is("proxy-authorization") => Role::HopByHop,
        _ => Role::EndToEnd,
    }
}

/// True for the headers that are never passed on (for maps from elsewhere: HTTP/2).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        role(name.as_str().as_bytes()),
        Role::HopByHop | Role::Connection | Role::TransferEncoding
    )
}

/// What a head's connection and framing headers said, read as its lines are sorted.
#[derive(Debug, Clone)]
pub struct HeadFacts {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive`.
    pub keep_alive: bool,
    /// With `Transfer-Encoding`: whether `chunked` is its last coding.
    pub chunked_last: Option<bool>,
    /// `Transfer-Encoding` names some coding besides `chunked` (on any of its lines).
    pub other_codings: bool,
    /// Every `Content-Length` value, which must agree.
    pub content_length: Result<Option<u64>, FramingError>,
    pub has_date: bool,
    /// `Connection` names some other header, which must go too.
    names_others: bool,
}

impl Default for HeadFacts {
    fn default() -> HeadFacts {
        HeadFacts {
            close: false,
            keep_alive: false,
            chunked_last: None,
            other_codings: false,
            content_length: Ok(None),
            has_date: false,
            names_others: false,
        }
    }
}

impl HeadFacts {
    /// Notes one header line; false when the line is not passed on.
    fn note(&mut self, role: Role, value: &[u8]) -> bool {
        match role {
            Role::EndToEnd => return true,
            Role::Date => self.has_date = true,
            Role::ContentLength => {
                if let Ok(found) = self.content_length {
                    self.content_length = codec::content_length(found, value);
                }
            }
            Role::TransferEncoding => {
                let mut last = None;
                for coding in value.split(|&b| b == b',').map(codec::trim) {
                    let chunked = coding.eq_ignore_ascii_case(b"chunked");
                    self.other_codings |= !chunked;
                    last = Some(chunked);
                }
                self.chunked_last = Some(last == Some(true));
            }
            Role::Connection => {
                self.add_connection_options(value);
                return false;
            }
            Role::HopByHop => return false,
        }
        true
    }

    fn add_connection_options(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',').map(codec::trim) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() {
                self.names_others = true;
            }
        }
    }

    /// Whether a message of `version` lets its connection carry another message.
    pub fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        }
    }
}

/// The headers a `Connection` header names (rare: most name none). Framing headers are the
/// codec's to handle, whatever `Connection` says.
fn connection_named<'h>(head: &'h [u8], spans: &[HeaderSpan]) -> Vec<&'h [u8]> {
    spans
        .iter()
        .filter(|span| role(span.name(head)) == Role::Connection)
        .flat_map(|span| span.value(head).split(|&b| b == b',').map(codec::trim))
        .filter(|token| {
            !token.is_empty()
                && !matches!(role(token), Role::ContentLength | Role::TransferEncoding)
        })
        .collect()
}

/// A message's end-to-end header lines, as received (names in the sender's case).
#[derive(Debug, Clone)]
pub struct RawHeaders {
    head: Bytes,
    lines: Vec<HeaderSpan>,
    has_date: bool,
}

impl RawHeaders {
    /// Sorts the lines at `spans` of `head`: what the head says, and the lines passed on.
    pub fn new(head: Bytes, spans: &[HeaderSpan]) -> (RawHeaders, HeadFacts) {
        let mut facts = HeadFacts::default();
        let mut lines = Vec::with_capacity(spans.len());
        for span in spans {
            let role = role(span.name(&head));
            if facts.note(role, span.value(&head)) && role != Role::TransferEncoding {
                lines.push(*span);
            }
        }
        if facts.names_others {
            let named = connection_named(&head, spans);
            lines.retain(|line| {
                let name = line.name(&head);
                !named.iter().any(|n| n.eq_ignore_ascii_case(name))
            });
        }
        let has_date = facts.has_date;
        (
            RawHeaders {
                head,
                lines,
                has_date,
            },
            facts,
        )
    }

    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// Leaves out the lines named `name` (any case).
    pub fn remove(&mut self, name: &str) {
        let head = &self.head;
        self.lines
            .retain(|line| !line.name(head).eq_ignore_ascii_case(name.as_bytes()));
    }

    /// The lines as (name, value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.lines
            .iter()
            .map(|line| (line.name(&self.head), line.value(&self.head)))
    }

    /// The lines as a map, with room for `added` more.
    pub fn to_map(&self, added: usize) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(self.lines.len() + added);
        for line in &self.lines {
            let value = line.value;
            // httparse accepted these lines: its token and field-value rules are the ones
            // `HeaderName` and `HeaderValue` check, so neither conversion fails.
            let name = HeaderName::from_bytes(line.name(&self.head));
            let value =
                HeaderValue::from_maybe_shared(self.head.slice(value.0 as usize..value.1 as usize));
            if let (Ok(name), Ok(value)) = (name, value) {
                headers.append(name, value);
            }
        }
        headers
    }
}

/// The end-to-end lines of `head`, a whole request head.
#[cfg(test)]
pub(crate) fn request_lines(head: Bytes) -> RawHeaders {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut slots);
    assert!(request.parse(&head).is_ok_and(|s| s.is_complete()));
    let mut spans = [HeaderSpan::default(); 32];
    let count = header_spans(&head, request.headers, &mut spans);
    RawHeaders::new(head.clone(), &spans[..count]).0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans of every header in `head` (a complete response head).
    fn parse(head: &'static [u8]) -> (Bytes, Vec<HeaderSpan>) {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut slots);
        response.parse(head).unwrap();
        let mut spans = [HeaderSpan::default(); 16];
        let count = header_spans(head, response.headers, &mut spans);
        (Bytes::from_static(head), spans[..count].to_vec())
    }

    #[test]
    fn connection_headers_are_read_and_dropped() {
        let (head, spans) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: t=5\r\n\
              Transfer-Encoding: gzip, chunked\r\nContent-Length: 7\r\nX-Public: 2\r\n\r\n",
        );
        let (mut raw, facts) = RawHeaders::new(head, &spans);
        assert!(facts.close && !facts.keeps_alive(Version::HTTP_11));
        assert_eq!(facts.chunked_last, Some(true));
        assert!(facts.other_codings, "gzip is named besides chunked");
        assert_eq!(facts.content_length, Ok(Some(7)));
        let names: Vec<&[u8]> = raw.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"Content-Length"[..], b"X-Public"]);
        let map = raw.to_map(0);
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-public"]);
        raw.remove("content-length");
        let names: Vec<&[u8]> = raw.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"X-Public"[..]]);
    }

    #[test]
    fn lengths_must_agree_across_lines() {
        let (head, spans) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\ncontent-length: 8\r\n\r\n");
        let (_, facts) = RawHeaders::new(head, &spans);
        assert_eq!(facts.content_length, Err(FramingError::ConflictingLengths));
        let (head, spans) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nDate: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        );
        let (_, facts) = RawHeaders::new(head, &spans);
        assert_eq!(facts.chunked_last, Some(false));
        assert_eq!(facts.content_length, Ok(None));
        assert!(facts.has_date && facts.keeps_alive(Version::HTTP_10));
        let (head, spans) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let (_, facts) = RawHeaders::new(head, &spans);
        assert_eq!(facts.chunked_last, Some(true));
        assert!(!facts.other_codings);
    }
}
