//! The plain-TCP listeners beside publish (Prometheus metrics, the results server): bound
//! non-blocking, each connection answered in turn on one thread until publish is done.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Binds `addr` (`IP:PORT`) for `what` (named in errors); warns when it is reachable from the
/// network. `example` is a valid address for the error message.
pub fn bind(addr: &str, what: &str, example: &str) -> Result<TcpListener, String> {
    let sock: std::net::SocketAddr =
        addr.parse().map_err(|_| format!("{what} {addr:?}: want IP:PORT, e.g. {example}"))?;
    if !sock.ip().is_loopback() {
        tracing::warn!("{what} {sock} is reachable from the network");
    }
    let l = TcpListener::bind(sock).map_err(|e| format!("{what} {sock}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| format!("{what} {sock}: {e}"))?;
    Ok(l)
}

/// Hands each connection to `answer` until `done` is set; a failed answer is logged at debug
/// level (the client went away), a failed accept at warn.
pub fn serve(
    listener: TcpListener,
    what: &str,
    done: &AtomicBool,
    mut answer: impl FnMut(TcpStream) -> std::io::Result<()>,
) {
    while !done.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream) {
                    tracing::debug!("{what}: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                tracing::warn!("{what}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
