//! systemd's readiness protocol: one datagram per state change to `$NOTIFY_SOCKET`.
//!
//! `READY=1` once the listeners are serving, `RELOADING=1` then `READY=1` around a reload,
//! `STOPPING=1` when a graceful shutdown starts. Without `NOTIFY_SOCKET` (not under systemd's
//! `Type=notify`) every call does nothing. Failures are logged and otherwise ignored: a missing
//! supervisor must never stop the proxy.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (for example `"READY=1"`) to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let target = target.as_encoded_bytes();
        match target.strip_prefix(b"@") {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => {
                use std::os::unix::ffi::OsStrExt;
                socket.send_to(state.as_bytes(), std::ffi::OsStr::from_bytes(target))
            }
        }
    });
    if let Err(e) = sent {
        tracing::warn!(state, error = %e, "cannot notify the service manager");
    }
}
