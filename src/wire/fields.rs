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
/// per-message list of these small; a head is at most [`codec::MAX_HEAD`] bytes long.)
#[derive(Debug, Clone, Copy)]
struct HeaderSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl HeaderSpan {
    /// Where `header`, parsed out of a buffer starting at address `base`, lies in it.
    fn of(base: usize, header: &httparse::Header<'_>) -> HeaderSpan {
        let name = (header.name.as_ptr() as usize - base) as u32;
        let value = (header.value.as_ptr() as usize - base) as u32;
        HeaderSpan {
            name: (name, name + header.name.len() as u32),
            value: (value, value + header.value.len() as u32),
        }
    }

    fn name<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    fn value<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.value.0 as usize..self.value.1 as usize]
    }
}

/// Whether the header name `name` is `lower`, a lowercase name of letters and `-`, in any case.
/// Folds case with `| 0x20` and compares every byte without branching: the only other byte that
/// folds onto a letter or `-` is CR, which no header name holds.
pub fn name_is(name: &[u8], lower: &str) -> bool {
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower.as_bytes())
            .fold(0, |diff, (a, b)| diff | ((a | 0x20) ^ b))
            == 0
}

/// What the codec does with a header, known from its name in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    EndToEnd,
    Date,
    /// Passed on; counted and checked, as a request has exactly one.
    Host,
    /// Passed on, but a request's `100-continue` is the server's to answer.
    Expect,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Belongs to one connection and is dropped; `Upgrade` too, as the proxy does not tunnel
    /// protocol switches.
    HopByHop,
}

/// A match on the length first: this runs for every header line.
fn role(name: &[u8]) -> Role {
    let is = |known: &str| name_is(name, known);
    match name.len() {
        2 if is("te") => Role::HopByHop,
        4 if is("date") => Role::Date,
        4 if is("host") => Role::Host,
        6 if is("expect") => Role::Expect,
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

/// Whether `value` is `uri-host [":" port]` (RFC 9112 §3.2, RFC 3986 §3.2.2): an IP literal in
/// brackets or a reg-name (unreserved, percent-encoded and sub-delim characters, which covers
/// IPv4 addresses), then an optional port of digits. An empty host is allowed (§3.2 asks for an
/// empty Host when the target has no authority).
pub fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        let literal_ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        if !literal_ok {
            return false;
        }
        (&[][..], &value[close + 1..])
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &[][..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_ok && host.iter().all(|&b| is_reg_name_byte(b))
}

fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
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
    /// `Expect: 100-continue`.
    pub expects_continue: bool,
    /// How many `Host` lines, and whether each was a valid `uri-host [":" port]`.
    pub hosts: u8,
    pub host_valid: bool,
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
            expects_continue: false,
            hosts: 0,
            host_valid: true,
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
            Role::Host => {
                self.hosts = self.hosts.saturating_add(1);
                self.host_valid &= is_valid_host(value);
            }
            Role::Expect => self.expects_continue |= value.eq_ignore_ascii_case(b"100-continue"),
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

/// The end-to-end header lines of a head, sorted out of what httparse parsed; see [`sort_lines`].
#[derive(Debug)]
pub struct Lines {
    spans: Vec<HeaderSpan>,
    has_date: bool,
}

/// Sorts the header lines httparse found in `buf` (which the head starts): reads what they say
/// about the connection and framing, and keeps the end-to-end ones (`Content-Length` included,
/// `Transfer-Encoding` not) as spans, which stay valid once the head is split off `buf`.
pub fn sort_lines(buf: &[u8], headers: &[httparse::Header<'_>]) -> (Lines, HeadFacts) {
    let base = buf.as_ptr() as usize;
    let mut facts = HeadFacts::default();
    let mut spans = Vec::with_capacity(headers.len());
    for header in headers {
        let role = role(header.name.as_bytes());
        if facts.note(role, header.value) && role != Role::TransferEncoding {
            spans.push(HeaderSpan::of(base, header));
        }
    }
    if facts.names_others {
        let named = connection_named(headers);
        spans.retain(|span| {
            let name = span.name(buf);
            !named.iter().any(|n| n.eq_ignore_ascii_case(name))
        });
    }
    let has_date = facts.has_date;
    (Lines { spans, has_date }, facts)
}

/// The headers a `Connection` header names (rare: most name none). Framing headers are the
/// codec's to handle and `Host` the proxy's to forward, whatever `Connection` says: an HTTP/1.0
/// request with `Connection: Host` must not reach the backend without one.
fn connection_named<'h>(headers: &[httparse::Header<'h>]) -> Vec<&'h [u8]> {
    headers
        .iter()
        .filter(|header| role(header.name.as_bytes()) == Role::Connection)
        .flat_map(|header| header.value.split(|&b| b == b',').map(codec::trim))
        .filter(|token| {
            !token.is_empty()
                && !matches!(
                    role(token),
                    Role::ContentLength | Role::TransferEncoding | Role::Host
                )
        })
        .collect()
}

impl Lines {
    /// The lines, in `head`: the parsed buffer's front, split off and frozen.
    pub fn in_head(self, head: Bytes) -> RawHeaders {
        RawHeaders {
            head,
            lines: self.spans,
            has_date: self.has_date,
        }
    }
}

/// A message's end-to-end header lines, as received (names in the sender's case).
#[derive(Debug, Clone)]
pub struct RawHeaders {
    head: Bytes,
    lines: Vec<HeaderSpan>,
    has_date: bool,
}

impl RawHeaders {
    pub fn has_date(&self) -> bool {
        self.has_date
    }

    /// Leaves out the lines named `name` (lowercase letters and `-`), in any case.
    pub fn remove(&mut self, name: &str) {
        let head = &self.head;
        self.lines.retain(|line| !name_is(line.name(head), name));
    }

    /// The lines as (name, value) pairs.
    pub fn iter(&self) -> LineIter<'_> {
        LineIter {
            head: &self.head,
            lines: self.lines.iter(),
        }
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

/// The lines of a [`RawHeaders`], as (name, value).
pub struct LineIter<'h> {
    head: &'h [u8],
    lines: std::slice::Iter<'h, HeaderSpan>,
}

impl<'h> Iterator for LineIter<'h> {
    type Item = (&'h [u8], &'h [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let line = self.lines.next()?;
        Some((line.name(self.head), line.value(self.head)))
    }
}

/// The end-to-end lines of `head`, a whole request head.
#[cfg(test)]
pub(crate) fn request_lines(head: Bytes) -> RawHeaders {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut slots);
    assert!(request.parse(&head).is_ok_and(|s| s.is_complete()));
    let (lines, _) = sort_lines(&head, request.headers);
    lines.in_head(head.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sorted lines of `head`, a complete response head.
    fn parse(head: &'static [u8]) -> (RawHeaders, HeadFacts) {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut slots);
        response.parse(head).unwrap();
        let (lines, facts) = sort_lines(head, response.headers);
        (lines.in_head(Bytes::from_static(head)), facts)
    }

    #[test]
    fn connection_headers_are_read_and_dropped() {
        let (mut raw, facts) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: t=5\r\n\
              Transfer-Encoding: gzip, chunked\r\nContent-Length: 7\r\nX-Public: 2\r\n\r\n",
        );
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
    fn a_continue_expectation_is_noted_and_its_line_kept() {
        let (raw, facts) = parse(b"HTTP/1.1 200 OK\r\nEXPECT: 100-Continue\r\n\r\n");
        assert!(facts.expects_continue);
        assert_eq!(raw.iter().count(), 1);
        let (_, facts) = parse(b"HTTP/1.1 200 OK\r\nExpect: something-else\r\n\r\n");
        assert!(!facts.expects_continue);
    }

    #[test]
    fn names_compare_in_any_case() {
        assert!(name_is(b"Content-Length", "content-length"));
        assert!(name_is(b"X-FORWARDED-FOR", "x-forwarded-for"));
        assert!(!name_is(b"content-lengtx", "content-length"));
        assert!(!name_is(b"content_length", "content-length"));
        assert!(!name_is(b"via2", "via"));
        assert!(role(b"Content-length") == Role::ContentLength);
        assert!(role(b"Content-Lengthy") == Role::EndToEnd);
    }

    #[test]
    fn lengths_must_agree_across_lines() {
        let (_, facts) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\ncontent-length: 8\r\n\r\n");
        assert_eq!(facts.content_length, Err(FramingError::ConflictingLengths));
        let (_, facts) = parse(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nDate: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        );
        assert_eq!(facts.chunked_last, Some(false));
        assert_eq!(facts.content_length, Ok(None));
        assert!(facts.has_date && facts.keeps_alive(Version::HTTP_10));
        let (_, facts) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(facts.chunked_last, Some(true));
        assert!(!facts.other_codings);
    }
}
