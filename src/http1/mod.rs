//! HTTP/1.1 on the wire, written for the proxy's hot path.
//!
//! Client connections and backend connections alike are served here for HTTP/1.1 (hyper still
//! serves HTTP/2 clients and the admin listener). hyper's HTTP/1 client runs each backend
//! connection on its own task and hands requests and responses over channels; for a proxy that is
//! two task switches and several allocations per request. Here a backend connection is a plain
//! value: the client's task writes the request on it, reads the response head, and streams the
//! response body straight from its read buffer, then puts the connection back in the pool. Parsing
//! is httparse's (as in hyper); header lines stay spans of the received head and are written on as
//! they came, with no `HeaderMap` in between.
//!
//! - [`client`]: one keep-alive connection to a backend.
//! - [`server`]: one client connection, from accept to close, holding no buffer while idle.
//! - [`idle`]: client connections that went quiet, waiting without a task of their own.

pub mod client;
mod encode;
pub mod idle;
pub mod server;
pub mod stop;

pub use client::{ExchangeTimeouts, Http1Error, ResponseHead, UpstreamConn, UpstreamStream};

/// Acknowledges what `socket` has received now rather than after the delayed-ACK timer (up to
/// 40 ms): for when part of a message has come and the rest is awaited. A peer that writes a
/// message in two writes with Nagle's algorithm on holds the second until the first is
/// acknowledged. Linux turns quick ACKs off again on its own, so this is asked for each time; a
/// failure only means the ACK waits, as it would have.
pub fn ack_now(socket: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket of ours and an int option of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
