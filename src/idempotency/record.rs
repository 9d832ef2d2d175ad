//! What a store keeps per entry, and its byte form for the stores that keep bytes.
//!
//! The byte form starts with a one-letter state (`F` in flight, `I` indeterminate, `D` done) so
//! that the Redis scripts can tell states apart without decoding; an in-flight entry's claim token
//! follows at once, for the same reason. Every length read back is checked: a store's bytes are
//! input like any other.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::{Digest, Token};

/// An entry's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Claimed by the request holding `token`; `lease_until_ms` (Unix ms) is when its holder is
    /// presumed gone (0 where the store keeps the lease itself, as Redis does).
    InFlight {
        token: Token,
        head: Digest,
        lease_until_ms: u64,
    },
    /// The first attempt's bytes may have reached a backend, and no response came.
    Indeterminate {
        head: Digest,
    },
    Done(Arc<Record>),
}

/// The recorded result of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Method and target of the request.
    pub head: Digest,
    /// The request body's digest; `None` when the backend answered before reading all of it.
    pub body: Option<Digest>,
    pub outcome: Outcome,
}

/// A backend's answer as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response {
        status: StatusCode,
        /// End-to-end headers, without the framing ones (the replay is framed anew).
        headers: HeaderMap,
        body: Bytes,
    },
    /// The body was larger than `max_response_body` (or broke off): only the status is kept.
    NotKept { status: StatusCode },
}

pub use crate::byte_form::Corrupt;
use crate::byte_form::{put_field, Reader};

const IN_FLIGHT: u8 = b'F';
const INDETERMINATE: u8 = b'I';
const DONE: u8 = b'D';
const RESPONSE: u8 = b'R';
const NOT_KEPT: u8 = b'N';

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        match self {
            Entry::InFlight {
                token,
                head,
                lease_until_ms,
            } => {
                out.put_u8(IN_FLIGHT);
                out.put_slice(token);
                out.put_slice(head);
                out.put_u64(*lease_until_ms);
            }
            Entry::Indeterminate { head } => {
                out.put_u8(INDETERMINATE);
                out.put_slice(head);
            }
            Entry::Done(record) => {
                out.put_u8(DONE);
                out.put_slice(&record.head);
                match &record.body {
                    Some(digest) => {
                        out.put_u8(1);
                        out.put_slice(digest);
                    }
                    None => out.put_u8(0),
                }
                match &record.outcome {
                    Outcome::Response {
                        status,
                        headers,
                        body,
                    } => {
                        out.put_u8(RESPONSE);
                        out.put_u16(status.as_u16());
                        out.put_u32(headers.len() as u32);
                        for (name, value) in headers {
                            put_field(&mut out, name.as_str().as_bytes());
                            put_field(&mut out, value.as_bytes());
                        }
                        put_field(&mut out, body);
                    }
                    Outcome::NotKept { status } => {
                        out.put_u8(NOT_KEPT);
                        out.put_u16(status.as_u16());
                    }
                }
            }
        }
        out.to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, Corrupt> {
        let mut r = Reader::new(bytes);
        let entry = match r.u8()? {
            IN_FLIGHT => Entry::InFlight {
                token: r.array()?,
                head: r.array()?,
                lease_until_ms: r.u64()?,
            },
            INDETERMINATE => Entry::Indeterminate { head: r.array()? },
            DONE => {
                let head = r.array()?;
                let body = match r.u8()? {
                    0 => None,
                    1 => Some(r.array()?),
                    _ => return Err(Corrupt("body digest flag")),
                };
                let outcome = match r.u8()? {
                    RESPONSE => {
                        let status = r.status()?;
                        let count = r.u32()? as usize;
                        let mut headers = HeaderMap::with_capacity(count.min(64));
                        for _ in 0..count {
                            let name = HeaderName::from_bytes(r.field()?)
                                .map_err(|_| Corrupt("header name"))?;
                            let value = HeaderValue::from_bytes(r.field()?)
                                .map_err(|_| Corrupt("header value"))?;
                            headers.append(name, value);
                        }
                        let body = Bytes::copy_from_slice(r.field()?);
                        Outcome::Response {
                            status,
                            headers,
                            body,
                        }
                    }
                    NOT_KEPT => Outcome::NotKept {
                        status: r.status()?,
                    },
                    _ => return Err(Corrupt("outcome")),
                };
                Entry::Done(Arc::new(Record {
                    head,
                    body,
                    outcome,
                }))
            }
            _ => return Err(Corrupt("state")),
        };
        r.finish()?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Entry> {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        vec![
            Entry::InFlight {
                token: [7; 16],
                head: [1; 32],
                lease_until_ms: 1_700_000_000_000,
            },
            Entry::Indeterminate { head: [2; 32] },
            Entry::Done(Arc::new(Record {
                head: [3; 32],
                body: Some([4; 32]),
                outcome: Outcome::Response {
                    status: StatusCode::CREATED,
                    headers,
                    body: Bytes::from_static(b"{\"id\":42}"),
                },
            })),
            Entry::Done(Arc::new(Record {
                head: [5; 32],
                body: None,
                outcome: Outcome::NotKept {
                    status: StatusCode::OK,
                },
            })),
        ]
    }

    #[test]
    fn entries_survive_their_byte_form() {
        for entry in samples() {
            assert_eq!(Entry::decode(&entry.encode()).unwrap(), entry);
        }
    }

    #[test]
    fn the_state_and_token_lead_the_byte_form() {
        let bytes = samples()[0].encode();
        assert_eq!(bytes[0], b'F');
        assert_eq!(&bytes[1..17], &[7; 16]);
    }

    #[test]
    fn damaged_bytes_are_refused_not_trusted() {
        for entry in samples() {
            let bytes = entry.encode();
            for cut in 0..bytes.len() {
                assert!(Entry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Entry::decode(&longer).is_err());
        }
        assert!(Entry::decode(b"X").is_err());
        // A length far beyond the bytes there.
        let mut lying = samples()[2].encode();
        let at = 1 + 32 + 1 + 32 + 1 + 2;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Entry::decode(&lying).is_err());
    }
}
