//! Writing response heads: the status line, the backend's lines as they came, the proxy's own,
//! framing and `Connection`; the proxy's one-line refusals; the `Date` value.

use http::header::{HeaderValue, DATE};
use http::{HeaderMap, StatusCode, Version};

use crate::wire::codec::{self, Framing};
use crate::wire::PendingHeaders;

/// The header lines of a response: its map, and a backend's lines not yet in it.
pub(super) struct ResponseFields<'a> {
    pub(super) map: &'a HeaderMap,
    pub(super) pending: Option<&'a PendingHeaders>,
}

pub(super) fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: ResponseFields<'_>,
    framing: Framing,
    keep_alive: bool,
    version: Version,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = fields.map.contains_key(DATE);
    for (name, value) in fields.map {
        if !written_by_codec(name.as_str().as_bytes(), framing, status) {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(pending) = fields.pending {
        has_date |= pending.lines.has_date();
        let mut backend_via = false;
        for (name, value) in pending.lines.iter() {
            if name.eq_ignore_ascii_case(b"via") {
                backend_via = true;
            } else if !written_by_codec(name, framing, status) {
                header_line(out, name, value);
            }
        }
        if let Some((name, value)) = &pending.added {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
        // The backend's Via values and the proxy's, folded into one line.
        out.extend_from_slice(b"via: ");
        if backend_via {
            for (name, value) in pending.lines.iter() {
                if name.eq_ignore_ascii_case(b"via") {
                    out.extend_from_slice(value);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(pending.via().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    codec::framing_header(out, framing);
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

pub(super) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Headers this server writes itself: `Connection`, and the framing ones unless there is no body.
/// A 204 carries no Content-Length at all (RFC 9110 §8.6); a 304 or a HEAD response keeps the
/// length of the body it stands for.
pub(super) fn written_by_codec(name: &[u8], framing: Framing, status: StatusCode) -> bool {
    match name.len() {
        10 => name.eq_ignore_ascii_case(b"connection"),
        14 => {
            (framing != Framing::Empty || status == StatusCode::NO_CONTENT)
                && name.eq_ignore_ascii_case(b"content-length")
        }
        17 => framing != Framing::Empty && name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// A complete response refusing a malformed request, in the proxy's one-line error format.
pub(super) fn rejection(status: StatusCode, reason: &str) -> Vec<u8> {
    let text = format!(
        "{} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    rejection_text(status, &text)
}

/// A complete response with `text` as its plain-text body; the connection closes after it.
pub(super) fn rejection_text(status: StatusCode, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + text.len());
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let framing = Framing::Length(text.len() as u64);
    let fields = ResponseFields {
        map: &headers,
        pending: None,
    };
    encode_head(&mut out, status, fields, framing, false, Version::HTTP_11);
    out.extend_from_slice(text.as_bytes());
    out
}

/// The current time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once a second.
pub(super) fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let (second, text) = cache.get();
        if second == now {
            return text;
        }
        let text = format_http_date(now);
        cache.set((now, text));
        text
    })
}

pub(super) fn format_http_date(unix: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let text = format!(
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    let mut out = [b' '; 29];
    let len = text.len().min(29);
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(
            &format_http_date(784_111_777),
            b"Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            &format_http_date(951_782_400),
            b"Tue, 29 Feb 2000 00:00:00 GMT"
        );
        assert_eq!(&format_http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
