//! The header lines of a parsed HTTP/1.1 head: which belong to the connection it came on, what
//! they say about framing, and the end-to-end rest, as a `HeaderMap` or as the received lines.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: the fixed list plus every header `Connection` names) are
//! read here and never passed on. A request's headers become a `HeaderMap`, which routing, keys and
//! rewriting need; a backend response's stay as spans of the received head and are written to the
//! client as they came (a map is built only for HTTP/2 clients and coalesced writes), since
//! building a map costs more than the rest of handling the response.

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
                let last = value.split(|&b| b == b',').next_back().map(codec::trim);
                self.chunked_last = Some(last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")));
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

/// The end-to-end headers at `spans` of `head` as a map, with room for `added` more (what the proxy
/// adds), so that adding them does not grow the map. Values share the head's bytes; names of
/// well-known headers allocate nothing. `Transfer-Encoding` stays for the request's framing to
/// check, which then removes it.
pub fn header_map(
    head: &Bytes,
    spans: &[HeaderSpan],
    added: usize,
) -> Result<(HeaderMap, HeadFacts), &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len() + added);
    let mut facts = HeadFacts::default();
    for span in spans {
        let name = span.name(head);
        if !facts.note(role(name), span.value(head)) {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
        let value = span.value;
        let value = HeaderValue::from_maybe_shared(head.slice(value.0 as usize..value.1 as usize))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    if facts.names_others {
        for named in connection_named(head, spans) {
            if let Ok(named) = HeaderName::from_bytes(named) {
                headers.remove(named);
            }
        }
    }
    Ok((headers, facts))
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

/// A backend response's end-to-end header lines, as received (names in the backend's case).
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
        let (raw, facts) = RawHeaders::new(head.clone(), &spans);
        assert!(facts.close && !facts.keeps_alive(Version::HTTP_11));
        assert_eq!(facts.chunked_last, Some(true));
        assert_eq!(facts.content_length, Ok(Some(7)));
        let names: Vec<&[u8]> = raw.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"Content-Length"[..], b"X-Public"]);
        let (map, _) = header_map(&head, &spans, 0).unwrap();
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "transfer-encoding", "x-public"]);
        assert_eq!(raw.to_map(0).len(), 2);
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
    }
}
