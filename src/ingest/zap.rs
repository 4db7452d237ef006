//! ZeroMQ's authentication hook (ZAP, RFC 27) for a bound ingest socket: libzmq asks this
//! handler about every connecting peer before the connection is accepted, and a peer outside
//! `ingest.allow` is refused then, so nothing it sends reaches the pipeline.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::allow::Allowlist;

/// Where libzmq sends its requests (fixed by the RFC), in the guarded socket's context.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The ZAP domain set on guarded sockets: with a domain, libzmq consults the handler even for
/// the NULL mechanism senders use.
pub const DOMAIN: &str = "mirage-ingest";

/// The handler's thread, stopped and joined on drop.
pub struct ZapGuard {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    reported: u64,
    thread: Option<JoinHandle<()>>,
}

impl ZapGuard {
    /// Starts the handler in `ctx`; call it before binding the socket it guards (which then
    /// needs `set_zap_domain(DOMAIN)`).
    pub fn start(ctx: &zmq::Context, allow: Allowlist) -> Result<ZapGuard, String> {
        let socket = ctx.socket(zmq::REP).map_err(|e| format!("ZAP handler: {e}"))?;
        socket.bind(ZAP_ENDPOINT).map_err(|e| format!("ZAP handler: cannot bind: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), refused.clone());
        let thread = std::thread::Builder::new()
            .name("mirage/zap".into())
            .spawn(move || serve(socket, &allow, &s, &r))
            .map_err(|e| format!("ZAP handler: {e}"))?;
        Ok(ZapGuard { stop, refused, reported: 0, thread: Some(thread) })
    }

    /// Connections refused since the last call.
    pub fn newly_refused(&mut self) -> u64 {
        let total = self.refused.load(Ordering::Relaxed);
        let new = total - self.reported;
        self.reported = total;
        new
    }
}

impl Drop for ZapGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers requests until `stop`: 200 for an allowed peer, 400 otherwise (each refused
/// address logged once).
fn serve(socket: zmq::Socket, allow: &Allowlist, stop: &AtomicBool, refused: &AtomicU64) {
    let mut logged = HashSet::new();
    while !stop.load(Ordering::Acquire) {
        match socket.poll(zmq::POLLIN, 100) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!("ZAP handler: {e}");
                return;
            }
        }
        let Ok(request) = socket.recv_multipart(0) else { continue };
        let (reply, peer) = answer(&request, allow);
        if let Some(peer) = peer {
            refused.fetch_add(1, Ordering::Relaxed);
            if logged.insert(peer.clone()) {
                tracing::warn!("ingest: refused a sender at {peer}: not in ingest.allow");
            }
        }
        if let Err(e) = socket.send_multipart(reply, 0) {
            tracing::error!("ZAP handler: {e}");
        }
    }
}

/// The reply to one ZAP request, and the peer's address when it is refused.
pub fn answer(request: &[Vec<u8>], allow: &Allowlist) -> (Vec<Vec<u8>>, Option<String>) {
    let frame = |i: usize| request.get(i).cloned().unwrap_or_default();
    let address = String::from_utf8_lossy(&frame(3)).into_owned();
    let ok = frame(0) == b"1.0" && address.parse::<IpAddr>().is_ok_and(|ip| allow.allows(ip));
    let (code, text) = if ok { ("200", "OK") } else { ("400", "address not allowed") };
    let reply = vec![b"1.0".to_vec(), frame(1), code.into(), text.into(), Vec::new(), Vec::new()];
    (reply, (!ok).then_some(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(address: &str) -> Vec<Vec<u8>> {
        ["1.0", "7", DOMAIN, address, "", "NULL"].iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    /// The vendored libzmq has no CURVE (zmq-sys builds it without libsodium): the README's
    /// Security section says so, and this fails first if that changes.
    #[test]
    fn the_vendored_libzmq_has_no_curve() {
        assert_eq!(zmq::has("curve"), Some(false));
    }

    #[test]
    fn a_peer_in_the_list_is_let_in_and_others_are_refused_with_the_request_id() {
        let allow = Allowlist::parse(&["127.0.0.1".to_string()]).unwrap();
        let (ok, none) = answer(&request("127.0.0.1"), &allow);
        assert_eq!((ok[1].as_slice(), ok[2].as_slice(), none), (&b"7"[..], &b"200"[..], None));
        let (no, peer) = answer(&request("127.0.0.2"), &allow);
        assert_eq!((no[2].as_slice(), peer.as_deref()), (&b"400"[..], Some("127.0.0.2")));
        // Malformed requests are refused, never a panic.
        assert_eq!(answer(&[], &allow).0[2], b"400");
        assert_eq!(answer(&request("not an address"), &allow).0[2], b"400");
    }
}
