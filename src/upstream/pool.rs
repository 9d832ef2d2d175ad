//! Keep-alive connections to one backend, and sending a request over them.
//!
//! Why not hyper-util's pooled client: writegate must know, for every failure, whether any byte of
//! the request may have reached the backend (a write must never be retried otherwise), must apply a
//! per-route connect timeout, and must keep warm connections in the backend's live state across
//! config reloads. A small LIFO stack per backend does all three: the most recently used connection
//! is the one least likely to have been closed by the backend's idle timer.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Backend;
use crate::http1::{ExchangeTimeouts, Http1Error, ResponseHead, UpstreamStream};
use crate::wire::OutgoingRequest;

/// Idle connections kept per backend; more are closed when returned.
const MAX_IDLE_PER_BACKEND: usize = 512;
/// A pooled connection idle longer than this is closed rather than reused, so that we rarely race a
/// backend closing it (hyper servers default to 30 s, nginx to 75 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::http1::UpstreamConn;

#[derive(Debug, Default)]
pub(super) struct Pool {
    idle: Mutex<Vec<(UpstreamConn, Instant)>>,
}

impl Pool {
    fn take(&self, now: Instant) -> Option<UpstreamConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((mut conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < POOL_IDLE_TIMEOUT && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, mut conn: UpstreamConn, idle_since: Instant) {
        conn.release_buffer();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push((conn, idle_since));
        }
    }

    pub(super) fn idle_len(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }
}

/// Why a request to a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("no response within the response timeout")]
    ResponseTimeout,
    /// `sent` is false only when no byte of the request was written.
    #[error("{error}")]
    Exchange { error: Http1Error, sent: bool },
}

impl SendError {
    /// True when no byte of the request can have reached the backend.
    pub fn nothing_sent(&self) -> bool {
        match self {
            SendError::Connect(_) | SendError::ConnectTimeout => true,
            SendError::ResponseTimeout => false,
            SendError::Exchange { sent, .. } => !sent,
        }
    }
}

/// A failed send; `unsent` gives the request back when no byte of it reached the backend.
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub unsent: Option<OutgoingRequest>,
}

impl Backend {
    /// Sends `request` on a pooled or new connection and waits for the response head.
    ///
    /// On success the connection comes back with the response; hand it to [`Backend::reuse`] once the
    /// response body has been read to its end. `now` is the time the caller last read; the
    /// response timeout runs from when the request's last byte was written. (Not an `async fn`, which would keep a second copy of the
    /// request for the whole exchange.)
    #[allow(clippy::manual_async_fn)] // see the doc comment
    pub fn send(
        &self,
        mut request: OutgoingRequest,
        connect_timeout: Duration,
        timeouts: ExchangeTimeouts,
        now: Instant,
    ) -> impl Future<Output = Result<(ResponseHead, UpstreamConn), SendFailure>> + Send + '_ {
        async move {
            loop {
                let (mut conn, sent_at) = match self.pool.take(now) {
                    Some(conn) => (conn, None),
                    // Boxed: connecting (TLS included) is rare, and its future would otherwise
                    // enlarge every request's future.
                    None => match Box::pin(self.connect(connect_timeout)).await {
                        Ok(conn) => (conn, Some(Instant::now())),
                        Err(error) => {
                            return Err(SendFailure {
                                error,
                                unsent: Some(request),
                            })
                        }
                    },
                };
                let fresh = sent_at.is_some();
                let answered = conn.send(request, timeouts, sent_at.unwrap_or(now)).await;
                match answered {
                    Ok(head) => return Ok((head, conn)),
                    Err(failure) if matches!(failure.error, Http1Error::ResponseTimeout) => {
                        return Err(SendFailure {
                            error: SendError::ResponseTimeout,
                            unsent: None,
                        })
                    }
                    Err(failure) => match failure.unsent {
                        // A pooled connection closed under us before the request was written: the
                        // request is handed back untouched, so another connection may carry it.
                        Some(unsent) if !fresh => request = unsent,
                        unsent => {
                            return Err(SendFailure {
                                error: SendError::Exchange {
                                    sent: unsent.is_none(),
                                    error: failure.error,
                                },
                                unsent,
                            })
                        }
                    },
                }
            }
        }
    }

    /// Returns a connection whose response was read to the end, for the next request. Its idle
    /// time counts from `responded`, when the response head came: a little early when the body
    /// took long, which errs toward closing a connection the backend may already have closed.
    pub fn reuse(&self, conn: UpstreamConn, responded: Instant) {
        self.pool.put(conn, responded);
    }

    /// Opens a new connection (TCP, then TLS for `https://` backends), both within
    /// `connect_timeout`. Nothing of any request has been sent when this fails.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<UpstreamConn, SendError> {
        let connecting = async {
            let stream = TcpStream::connect(self.address)
                .await
                .map_err(SendError::Connect)?;
            // Small writes (headers, then a small body) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(UpstreamStream::Tcp(stream)),
                Some((config, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                        .connect(name.clone(), stream)
                        .await
                        .map_err(SendError::Connect)?;
                    Ok(UpstreamStream::Tls(Box::new(tls)))
                }
            }
        };
        let stream = tokio::time::timeout(connect_timeout, connecting)
            .await
            .map_err(|_| SendError::ConnectTimeout)??;
        self.connections_opened.increment(1);
        Ok(UpstreamConn::new(stream))
    }
}
