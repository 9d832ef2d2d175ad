//! Durable write buffering: writes taken into a log on disk, answered `202 Accepted` with a
//! receipt, and delivered to the backends later, at their pace, in per-key order.
//!
//! This module owns the buffered write and its receipt ([`BufferedWrite`], [`Receipt`]), the log
//! that keeps them ([`log`]: redb, group commit) and the delivery schedule ([`deliver`]: per-key
//! lanes, retries with backoff, dead letters). How a write is sent is the proxy's: it implements
//! [`deliver::Deliver`] with the normal request path.

pub mod deliver;
pub mod log;
pub mod queue;
pub mod rabbit;

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;

use crate::byte_form::{hex, put_field, Corrupt, Reader};
use crate::config::{BufferConfig, BufferStore};
use deliver::{Deliver, Dispatcher};
use log::{Log, LogError};
use queue::Queue;

/// An open store and, once the proxy has started it, its delivery.
pub struct Buffer {
    pub queue: Arc<dyn Queue>,
    dispatcher: OnceLock<Arc<Dispatcher>>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("queue", &self.queue.label())
            .finish()
    }
}

impl Buffer {
    /// Opens the store `config` names (its settings hold for every route sharing it).
    pub fn open(config: &BufferConfig) -> Result<Arc<Buffer>, String> {
        let queue: Arc<dyn Queue> = match &config.store {
            BufferStore::Log { dir } => {
                let limits = log::Limits {
                    max_bytes: config.max_bytes,
                    min_free: config.min_free,
                };
                Arc::new(Log::open(dir, config.sync, limits)?)
            }
            BufferStore::RabbitMq(settings) => rabbit::Rabbit::open(settings)?,
        };
        Ok(Arc::new(Buffer {
            queue,
            dispatcher: OnceLock::new(),
        }))
    }

    /// Starts delivering (once; later calls do nothing): first what the store already holds.
    pub fn start_delivery(&self, deliver: Arc<dyn Deliver>) -> Result<(), String> {
        if self.dispatcher.get().is_some() {
            return Ok(());
        }
        Dispatcher::start(Arc::clone(&self.queue), deliver, |dispatcher| {
            if self.dispatcher.set(dispatcher).is_err() {
                tracing::debug!(store = self.queue.label(), "delivery was started twice");
            }
        })
    }

    pub fn dispatcher(&self) -> Option<&Arc<Dispatcher>> {
        self.dispatcher.get()
    }

    /// Keeps `write` safely and queues it for delivery.
    pub async fn accept(&self, write: BufferedWrite) -> Result<(), LogError> {
        let (route, key) = (write.route.clone(), write.key.clone());
        let seq = self.queue.append(write).await?;
        if let (Some(seq), Some(dispatcher)) = (seq, self.dispatcher()) {
            dispatcher.enqueue(seq, &route, key);
        }
        Ok(())
    }

    /// Puts the dead letter of `id` back at the end of the store and queues it for delivery;
    /// `false` if this buffer has no such dead letter.
    pub async fn replay(&self, id: ReceiptId) -> Result<bool, String> {
        let Some((seq, route, key)) = self.queue.replay(id).await? else {
            return Ok(false);
        };
        tracing::info!(store = self.queue.label(), receipt = %hex(&id), "dead letter replayed by hand");
        if let Some(dispatcher) = self.dispatcher() {
            dispatcher.enqueue(seq, &route, key);
        }
        Ok(true)
    }

    /// The store's state for the admin API: depth, bytes, oldest age and (the first
    /// `dead_letters` of) the dead-letter list.
    pub async fn state(&self, dead_letters: usize) -> serde_json::Value {
        let mut state = self.queue.state(dead_letters).await;
        state["delivering"] = serde_json::json!(self.dispatcher().is_some());
        state
    }

    /// Sets the depth, bytes and oldest-age gauges (at each scrape).
    pub fn record_gauges(&self) {
        self.queue.record_gauges();
    }
}

/// A route's buffering: its settings and its log (or why the log could not be opened).
#[derive(Debug)]
pub struct BufferPolicy {
    pub config: BufferConfig,
    pub buffer: Result<Arc<Buffer>, String>,
}

/// The receipt `id` as its URL serves it, from whichever of `buffers` holds it.
pub async fn find_receipt(
    buffers: &[Arc<Buffer>],
    id: &ReceiptId,
) -> Result<Option<Bytes>, String> {
    for buffer in buffers {
        if let Some(json) = buffer.queue.receipt(*id).await? {
            return Ok(Some(json));
        }
    }
    Ok(None)
}

/// A receipt's id: 128 random bits, so that a receipt reveals nothing about other writes.
pub type ReceiptId = [u8; 16];

/// The path prefix under which receipts are served, on the proxy's listeners and the admin one.
pub const RECEIPTS_PREFIX: &str = "/_writegate/receipts/";

/// A write as the backend would have seen it synchronously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferedWrite {
    pub receipt: ReceiptId,
    pub route: String,
    /// The route's request key, when it has one: writes with one key are delivered in order.
    pub key: Option<Bytes>,
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// The client's end-to-end headers.
    pub headers: HeaderMap,
    /// The client's address and scheme, for the forwarding headers of the delivery.
    pub client_ip: String,
    pub tls: bool,
    pub body: Bytes,
    /// Unix ms.
    pub accepted_ms: u64,
}

impl BufferedWrite {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(256 + self.body.len());
        out.put_slice(&self.receipt);
        put_field(&mut out, self.route.as_bytes());
        match &self.key {
            Some(key) => {
                out.put_u8(1);
                put_field(&mut out, key);
            }
            None => out.put_u8(0),
        }
        put_field(&mut out, self.method.as_str().as_bytes());
        put_field(&mut out, self.target.as_bytes());
        out.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            put_field(&mut out, name.as_str().as_bytes());
            put_field(&mut out, value.as_bytes());
        }
        put_field(&mut out, self.client_ip.as_bytes());
        out.put_u8(u8::from(self.tls));
        put_field(&mut out, &self.body);
        out.put_u64(self.accepted_ms);
        out.to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<BufferedWrite, Corrupt> {
        let mut r = Reader::new(bytes);
        let receipt = r.array()?;
        let route = text(r.field()?)?;
        let key = match r.u8()? {
            0 => None,
            1 => Some(Bytes::copy_from_slice(r.field()?)),
            _ => return Err(Corrupt("key flag")),
        };
        let method = Method::from_bytes(r.field()?).map_err(|_| Corrupt("method"))?;
        let target = text(r.field()?)?;
        let count = r.u32()? as usize;
        let mut headers = HeaderMap::with_capacity(count.min(64));
        for _ in 0..count {
            let name = HeaderName::from_bytes(r.field()?).map_err(|_| Corrupt("header name"))?;
            let value = HeaderValue::from_bytes(r.field()?).map_err(|_| Corrupt("header value"))?;
            headers.append(name, value);
        }
        let client_ip = text(r.field()?)?;
        let tls = r.u8()? == 1;
        let body = Bytes::copy_from_slice(r.field()?);
        let accepted_ms = r.u64()?;
        r.finish()?;
        Ok(BufferedWrite {
            receipt,
            route,
            key,
            method,
            target,
            headers,
            client_ip,
            tls,
            body,
            accepted_ms,
        })
    }
}

fn text(bytes: &[u8]) -> Result<String, Corrupt> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Corrupt("text"))
}

/// Where a buffered write stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In the log, waiting or being delivered.
    Pending,
    Delivered {
        status: StatusCode,
        body: Bytes,
    },
    /// A final 4xx, or attempts or age exhausted; the write is on the dead-letter list.
    Failed {
        status: Option<StatusCode>,
        reason: String,
    },
}

/// What a receipt URL tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub route: String,
    /// The write's place in the log (while pending) or on the dead-letter list (once failed).
    pub seq: u64,
    pub accepted_ms: u64,
    pub updated_ms: u64,
    pub attempts: u32,
    pub last_error: String,
    pub outcome: Outcome,
}

impl Receipt {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(128);
        put_field(&mut out, self.route.as_bytes());
        out.put_u64(self.seq);
        out.put_u64(self.accepted_ms);
        out.put_u64(self.updated_ms);
        out.put_u32(self.attempts);
        put_field(&mut out, self.last_error.as_bytes());
        match &self.outcome {
            Outcome::Pending => out.put_u8(0),
            Outcome::Delivered { status, body } => {
                out.put_u8(1);
                out.put_u16(status.as_u16());
                put_field(&mut out, body);
            }
            Outcome::Failed { status, reason } => {
                out.put_u8(2);
                out.put_u16(status.map_or(0, |s| s.as_u16()));
                put_field(&mut out, reason.as_bytes());
            }
        }
        out.to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Receipt, Corrupt> {
        let mut r = Reader::new(bytes);
        let route = text(r.field()?)?;
        let (seq, accepted_ms, updated_ms) = (r.u64()?, r.u64()?, r.u64()?);
        let attempts = r.u32()?;
        let last_error = text(r.field()?)?;
        let outcome = match r.u8()? {
            0 => Outcome::Pending,
            1 => Outcome::Delivered {
                status: r.status()?,
                body: Bytes::copy_from_slice(r.field()?),
            },
            2 => {
                let status = r.u16()?;
                Outcome::Failed {
                    status: StatusCode::from_u16(status).ok(),
                    reason: text(r.field()?)?,
                }
            }
            _ => return Err(Corrupt("receipt state")),
        };
        r.finish()?;
        Ok(Receipt {
            route,
            seq,
            accepted_ms,
            updated_ms,
            attempts,
            last_error,
            outcome,
        })
    }

    /// The receipt as its URL serves it; `position` is the number of writes ahead of a pending one.
    pub fn to_json(&self, id: &ReceiptId, position: Option<u64>, now_ms: u64) -> Bytes {
        #[derive(Serialize)]
        struct View<'a> {
            receipt: String,
            route: &'a str,
            state: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            position: Option<u64>,
            age_seconds: f64,
            attempts: u32,
            #[serde(skip_serializing_if = "str::is_empty")]
            last_error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<u16>,
            #[serde(skip_serializing_if = "Option::is_none")]
            body: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
        }
        let (state, status, body, reason) = match &self.outcome {
            Outcome::Pending if self.attempts == 0 => ("queued", None, None, None),
            Outcome::Pending => ("delivering", None, None, None),
            Outcome::Delivered { status, body } => (
                "delivered",
                Some(status.as_u16()),
                Some(String::from_utf8_lossy(body).into_owned()),
                None,
            ),
            Outcome::Failed { status, reason } => (
                "failed",
                status.map(|s| s.as_u16()),
                None,
                Some(reason.as_str()),
            ),
        };
        let view = View {
            receipt: hex(id),
            route: &self.route,
            state,
            position: position.filter(|_| state == "queued"),
            age_seconds: now_ms.saturating_sub(self.accepted_ms) as f64 / 1000.0,
            attempts: self.attempts,
            last_error: &self.last_error,
            status,
            body,
            reason,
        };
        let mut text = serde_json::to_string_pretty(&view).unwrap_or_default();
        text.push('\n');
        Bytes::from(text)
    }
}

/// Parses a receipt id from its hex form.
pub fn parse_receipt(text: &str) -> Option<ReceiptId> {
    if text.len() != 32 {
        return None;
    }
    let mut id = [0; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_receipts_survive_their_byte_form() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let write = BufferedWrite {
            receipt: [3; 16],
            route: "orders".into(),
            key: Some(Bytes::from_static(b"k1")),
            method: Method::POST,
            target: "/orders/k1?x=1".into(),
            headers,
            client_ip: "10.0.0.7".into(),
            tls: true,
            body: Bytes::from_static(b"{\"n\":1}"),
            accepted_ms: 1_700_000_000_000,
        };
        assert_eq!(BufferedWrite::decode(&write.encode()).unwrap(), write);
        let bytes = write.encode();
        for cut in 0..bytes.len() {
            assert!(BufferedWrite::decode(&bytes[..cut]).is_err());
        }
        for outcome in [
            Outcome::Pending,
            Outcome::Delivered {
                status: StatusCode::CREATED,
                body: Bytes::from_static(b"ok"),
            },
            Outcome::Failed {
                status: Some(StatusCode::BAD_REQUEST),
                reason: "final 400".into(),
            },
        ] {
            let receipt = Receipt {
                route: "orders".into(),
                seq: 9,
                accepted_ms: 1,
                updated_ms: 2,
                attempts: 3,
                last_error: "502".into(),
                outcome,
            };
            assert_eq!(Receipt::decode(&receipt.encode()).unwrap(), receipt);
        }
    }

    #[test]
    fn receipt_ids_round_trip_through_hex() {
        let id = [0xab; 16];
        assert_eq!(parse_receipt(&hex(&id)), Some(id));
        assert_eq!(parse_receipt("xyz"), None);
        assert_eq!(parse_receipt(&"g".repeat(32)), None);
    }
}
