//! Listeners, connections and shutdown.
//!
//! [`Proxy::bind`] opens every listener (so tests can bind port 0 and read the real address), then
//! [`Proxy::run`] serves until the shutdown future completes. Shutdown is an explicit pipeline: stop
//! accepting, ask every connection to close gracefully (in-flight requests finish, idle keep-alive
//! connections close at once), wait for them up to `runtime.shutdown_timeout`, log what was left.
//! HTTP/1.1 connections are served by [`crate::http1::server`] (header read and idle timeouts
//! included); HTTP/2 ones (ALPN `h2`, or the prior-knowledge preface) by hyper's HTTP/2 server with
//! an idle timeout of our own, so a silent client cannot hold a connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::admin::AdminService;
use crate::config::{Config, ListenerConfig};
use crate::discovery::{self, Discovered};
use crate::http1;
use crate::http1::idle::{IdleSet, PARK_AFTER};
use crate::http1::server::{ClientIo, Served, StopSignal, Timeouts};
use crate::proxy::{ClientConn, ConnActivity, ProxyService};
use crate::reload::{DiscoveryWatch, ReloadState, Reloader, Triggers};
use crate::snapshot::Snapshot;
use crate::upstream::checks::HealthChecks;

/// Pending connections the kernel queues per listener before `accept`.
const LISTEN_BACKLOG: u32 = 4096;
/// Longest pause after a failed `accept` (for example, out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the buffer store {store} cannot be used: {reason}")]
    Buffer { store: String, reason: String },
}

struct BoundListener {
    config: ListenerConfig,
    listener: TcpListener,
}

/// A proxy whose sockets are bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    snapshots: Arc<ArcSwap<Snapshot>>,
    listeners: Vec<BoundListener>,
    admin: Option<TcpListener>,
    reload: Option<Triggers>,
    reload_state: Arc<ReloadState>,
}

impl Proxy {
    /// Builds the first snapshot and binds every listener of `config`.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let config = Arc::new(config);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let listener = bind(l.listen).map_err(|source| StartError::Bind {
                what: format!("listener {:?}", l.name),
                addr: l.listen,
                source,
            })?;
            listeners.push(BoundListener {
                config: l.clone(),
                listener,
            });
        }
        let admin = match &config.admin {
            Some(a) => Some(bind(a.listen).map_err(|source| StartError::Bind {
                what: "admin".to_string(),
                addr: a.listen,
                source,
            })?),
            None => None,
        };
        let snapshot =
            Snapshot::build_with(Arc::clone(&config), None, first_discovery(&config).await);
        for buffer in snapshot.buffers() {
            buffer
                .queue
                .ready()
                .await
                .map_err(|reason| StartError::Buffer {
                    store: buffer.queue.label().to_string(),
                    reason,
                })?;
        }
        Ok(Proxy {
            snapshots: Arc::new(ArcSwap::from_pointee(snapshot)),
            listeners,
            admin,
            reload: None,
            reload_state: Arc::default(),
        })
    }

    /// Reloads the config file on change and on SIGHUP while running. Changes made from this call
    /// on are seen. Call it inside the tokio runtime.
    pub fn enable_reload(&mut self) {
        self.reload = Some(Triggers::open(&self.snapshots.load().config));
    }

    /// What reloads have done, as `/status` shows it.
    pub fn reload_state(&self) -> Arc<ReloadState> {
        Arc::clone(&self.reload_state)
    }

    /// The bound address of each listener, by name, in config order.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.listener.local_addr().ok()?)))
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The current snapshot cell, for reloads and inspection.
    pub fn snapshots(&self) -> Arc<ArcSwap<Snapshot>> {
        Arc::clone(&self.snapshots)
    }

    /// Serves until `shutdown` completes, then drains connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_http1 = Arc::new(StopSignal::default());
        crate::proxy::buffered::ensure_delivery(&self.snapshots);
        let snapshot = self.snapshots.load();
        let checks = HealthChecks::start(&snapshot.config.upstreams, &snapshot.upstreams);
        // The reloader runs also without reloads: it applies DNS discovery's answers.
        let reloader = Reloader {
            path: snapshot.config.path.clone(),
            snapshots: Arc::clone(&self.snapshots),
            state: Arc::clone(&self.reload_state),
            checks,
            triggers: self.reload,
            discovery: DiscoveryWatch::default(),
        };
        tokio::spawn(reloader.run(stop_rx.clone()));
        // Every task holds a clone of `alive`; `drained` sees `None` once all have ended.
        let (alive, mut drained) = mpsc::channel::<()>(1);
        for (index, bound) in self.listeners.into_iter().enumerate() {
            let snapshots = Arc::clone(&self.snapshots);
            let builder = Arc::new(http2_builder());
            let settings = Arc::new(bound.config.clone());
            let addr = bound
                .listener
                .local_addr()
                .map_or(bound.config.listen, |a| a);
            let tls = if bound.config.tls.is_some() {
                "on"
            } else {
                "off"
            };
            tracing::info!(listener = %bound.config.name, %addr, tls, "listening");
            let shared = Arc::new(ListenerShared {
                index,
                snapshots: Arc::clone(&snapshots),
                builder: Arc::clone(&builder),
                settings,
                handshake_failures: metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "listener" => bound.config.name.clone()),
                stop_http1: Arc::clone(&stop_http1),
                idle: IdleSet::new(
                    metrics::gauge!(crate::metrics::PARKED_CONNECTIONS, "listener" => bound.config.name.clone()),
                ),
            });
            let resume = |io, parked: Parked| parked.resume(io);
            tokio::spawn(shared.idle.clone().watch(Arc::clone(&stop_http1), resume));
            tokio::spawn(accept_loop(
                bound.listener,
                stop_rx.clone(),
                alive.clone(),
                move |stream, peer, stop, alive| {
                    let serve = Serve {
                        listener: Arc::clone(&shared),
                        stop,
                        _alive: alive,
                    };
                    serve.connection(stream, peer)
                },
            ));
        }
        if let Some(listener) = self.admin {
            let snapshots = Arc::clone(&self.snapshots);
            let reload_state = Arc::clone(&self.reload_state);
            let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
            tokio::spawn(accept_loop(
                listener,
                stop_rx.clone(),
                alive.clone(),
                move |stream, peer, stop, alive| {
                    let conn = Arc::new(ClientConn::new(peer, false));
                    let service =
                        AdminService::new(Arc::clone(&snapshots), Arc::clone(&reload_state));
                    let builder = Arc::clone(&builder);
                    async move {
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        drive(connection, &conn.activity, Duration::from_secs(60), stop).await;
                        drop(alive);
                    }
                },
            ));
        }
        drop(alive);
        crate::notify::notify("READY=1\nSTATUS=serving");
        shutdown.await;
        crate::notify::notify("STOPPING=1");
        let deadline = self.snapshots.load().config.runtime.shutdown_timeout;
        tracing::info!(
            deadline_s = deadline.as_secs_f64(),
            "shutting down: no new connections, finishing in-flight requests"
        );
        let _ = stop_tx.send(true);
        stop_http1.stop();
        // Buffered writes not yet being delivered stay in their log for the next start.
        let last = self.snapshots.load_full();
        let deliveries = crate::proxy::buffered::stop_delivery(&last, deadline);
        let (drain, ()) = tokio::join!(tokio::time::timeout(deadline, drained.recv()), deliveries);
        match drain {
            Ok(_) => tracing::info!("shutdown complete"),
            Err(_) => {
                tracing::warn!("shutdown deadline passed; closing connections that are still busy")
            }
        }
    }
}

/// Resolves every discovery name once, at the same time, so that the proxy starts with the
/// backends DNS has (a name that does not resolve starts empty and is asked again soon).
async fn first_discovery(config: &Config) -> HashMap<Box<str>, Discovered> {
    let upstreams = config
        .upstreams
        .iter()
        .filter_map(|u| Some((u.name.as_str(), u.discovery.as_ref()?)));
    let peers = config.cluster.as_ref().and_then(|c| c.discovery.as_ref());
    let names = upstreams.chain(peers.map(|d| (discovery::CLUSTER_PEERS, d)));
    let lookups = names
        .map(|(name, d)| async move { (Box::<str>::from(name), discovery::first(name, d).await) });
    futures_util::future::join_all(lookups)
        .await
        .into_iter()
        .collect()
}

/// What every connection of one listener shares.
struct ListenerShared {
    index: usize,
    snapshots: Arc<ArcSwap<Snapshot>>,
    builder: Arc<http2::Builder<TokioExecutor>>,
    settings: Arc<ListenerConfig>,
    handshake_failures: metrics::Counter,
    /// Stops HTTP/1.1 connections (HTTP/2 ones and the accept loops watch `stop`).
    stop_http1: Arc<StopSignal>,
    /// Plain HTTP/1.1 connections waiting for a quiet client without a task.
    idle: IdleSet<Parked>,
}

/// What a parked connection keeps to be served again: its client's address rather than its
/// [`ClientConn`], which is made again when the client writes (a parked connection has nothing
/// in progress for it to track).
struct Parked {
    serve: Serve,
    peer: SocketAddr,
    first: bool,
}

impl Parked {
    fn resume(self, io: TcpStream) {
        let conn = Arc::new(ClientConn::new(self.peer, false));
        tokio::spawn(self.serve.http1(io, conn, self.first));
    }
}

/// One client connection's hold on its listener, for the connection's whole life.
///
/// The connection futures below are plain functions returning `async` blocks where that keeps
/// them small: an `async fn` keeps a second copy of its arguments, and an idle keep-alive
/// connection's memory is mostly its task.
struct Serve {
    listener: Arc<ListenerShared>,
    stop: watch::Receiver<bool>,
    /// Dropped when the connection ends: shutdown waits until every one is.
    _alive: mpsc::Sender<()>,
}

pin_project_lite::pin_project! {
    /// One of two futures, polled in place.
    #[project = EitherProjection]
    enum EitherFuture<A, B> {
        Left { #[pin] future: A },
        Right { #[pin] future: B },
    }
}

impl<A: Future<Output = ()>, B: Future<Output = ()>> Future for EitherFuture<A, B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            EitherProjection::Left { future } => future.poll(cx),
            EitherProjection::Right { future } => future.poll(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1.1 connection's task: serves it, then hands it to HTTP/2 if the client opened
    /// with HTTP/2's preface. Written out because an `async` block awaiting `serving` would keep
    /// it twice (where it was captured and where it is awaited), and this is most of an idle
    /// connection's memory.
    struct Http1Task<F> {
        #[pin]
        serving: F,
        upgrade: Option<(Serve, Arc<ClientConn>)>,
        // Boxed: hyper's HTTP/2 connection is large and rare here.
        http2: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    }
}

impl<F, I> Future for Http1Task<F>
where
    F: Future<Output = Served<I>>,
    I: ClientIo,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.http2.is_none() {
            let served = ready!(this.serving.as_mut().poll(cx));
            let Some((serve, conn)) = this.upgrade.take() else {
                return Poll::Ready(());
            };
            match served {
                Served::Closed => return Poll::Ready(()),
                Served::Idle { io, first, until } => {
                    let peer = conn.peer;
                    drop(conn);
                    park(io, Parked { serve, peer, first }, until);
                    return Poll::Ready(());
                }
                Served::Http2 { io, preface } => {
                    *this.http2 = Some(Box::pin(serve.http2(Prefixed { preface, io }, conn)));
                }
            }
        }
        match this.http2.as_mut() {
            Some(http2) => http2.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Hands a quiet connection's socket to its listener's idle set; one whose client wrote in the
/// meantime is served again on a new task.
fn park<I: ClientIo>(io: I, parked: Parked, until: tokio::time::Instant) {
    let Ok(socket) = io.into_parkable() else {
        return;
    };
    let idle = parked.serve.listener.idle.clone();
    if let Some((socket, parked)) = idle.park(socket, parked, until) {
        parked.resume(socket);
    }
}

impl Serve {
    /// The connection's task. Its futures are built here rather than in an `async` block, whose
    /// captured variables would keep room beside the future they move into: this is most of an
    /// idle connection's memory.
    fn connection(self, stream: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
        let tls = self.listener.settings.tls.is_some();
        let conn = Arc::new(ClientConn::new(peer, tls));
        if tls {
            // Boxed: the handshake and the TLS stream are large, and a plain connection's
            // task should not reserve room for them.
            EitherFuture::Left {
                future: Box::pin(self.tls(stream, conn)),
            }
        } else {
            EitherFuture::Right {
                future: self.http1(stream, conn, true),
            }
        }
    }

    /// The TLS handshake, with the listener's current certificate (a reload changes it for new
    /// connections), bounded by `header_read_timeout`. Failures cost a debug line and the connection.
    async fn handshake(&self, stream: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
        let listener = &*self.listener;
        let config = listener
            .snapshots
            .load()
            .config
            .listener_tls
            .get(listener.index)
            .cloned()
            .flatten()?;
        let accept = TlsAcceptor::from(config).accept(stream);
        match tokio::time::timeout(listener.settings.header_read_timeout, accept).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }

    async fn tls(self, stream: TcpStream, conn: Arc<ClientConn>) {
        let Some(stream) = self.handshake(stream, conn.peer).await else {
            self.listener.handshake_failures.increment(1);
            return;
        };
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            Box::pin(self.http2(stream, conn)).await;
        } else {
            self.http1(stream, conn, true).await;
        }
    }

    /// Serves HTTP/1.1 on `io`; `first`: no request has come on it yet.
    fn http1<I: ClientIo>(
        self,
        io: I,
        conn: Arc<ClientConn>,
        first: bool,
    ) -> impl Future<Output = ()> + Send {
        let settings = &self.listener.settings;
        let timeouts = Timeouts {
            header_read: settings.header_read_timeout,
            idle: settings.idle_timeout,
            park_after: I::PARKS.then_some(PARK_AFTER),
        };
        let service = ProxyService::new(Arc::clone(&self.listener.snapshots), Arc::clone(&conn));
        let stop = Arc::clone(&self.listener.stop_http1);
        Http1Task {
            serving: http1::server::serve(io, service, timeouts, stop, first),
            upgrade: Some((self, conn)),
            http2: None,
        }
    }

    async fn http2<I>(self, io: I, conn: Arc<ClientConn>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = ProxyService::new(Arc::clone(&self.listener.snapshots), Arc::clone(&conn));
        let connection = self
            .listener
            .builder
            .serve_connection(TokioIo::new(io), service);
        drive(
            connection,
            &conn.activity,
            self.listener.settings.idle_timeout,
            self.stop,
        )
        .await;
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    builder
}

/// A connection whose first bytes were already read (the HTTP/2 preface): they are read again first.
struct Prefixed<I> {
    preface: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.preface.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.preface.len().min(buf.remaining());
        buf.put_slice(&self.preface.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts until `stop` flips, handing each connection to `serve` on its own task.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>, mpsc::Sender<()>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // Small responses must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, peer, stop.clone(), alive.clone()));
            }
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Drives one connection to its end, closing it gracefully on shutdown or when idle too long.
async fn drive<C>(
    connection: C,
    activity: &ConnActivity,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut connection = pin!(connection);
    let mut idle = pin!(idle_expired(activity, idle_timeout));
    let mut closing = *stop.borrow();
    if closing {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = &mut idle, if !closing => {
                tracing::debug!("closing idle client connection");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Completes once the connection has had no request in progress for `timeout`.
async fn idle_expired(activity: &ConnActivity, timeout: Duration) {
    loop {
        let wait = match activity.idle_for() {
            Some(idle) if idle >= timeout => return,
            Some(idle) => timeout - idle,
            None => timeout,
        };
        tokio::time::sleep(wait).await;
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called, not
/// when the future is first polled: call it before binding, so that a signal arriving as soon as
/// the proxy listens is never met by the default action (which would kill the process unclean).
/// Must be called inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch {name}; it will not stop the proxy gracefully");
            None
        }
    };
    let mut terminate = install(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            _ = next_signal(&mut terminate) => tracing::info!("SIGTERM received"),
            _ = next_signal(&mut interrupt) => tracing::info!("SIGINT received"),
        }
    }
}

/// Waits for the signal, or forever when it could not be watched.
async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
