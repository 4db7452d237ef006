//! ZeroMQ's authentication hook (ZAP, RFC 27) for a bound socket (the ingest, the PUB socket):
//! libzmq asks this handler about every connecting peer before the connection is accepted, and
//! a peer outside `ingest.allow`, or whose CURVE key the config does not list, is refused then,
//! so nothing it sends reaches the pipeline and nothing published reaches it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::allow::Allowlist;
use crate::curve::Curve;

/// Where libzmq sends its requests (fixed by the RFC), in the guarded socket's context.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// The ZAP domain set on guarded sockets: with a domain, libzmq consults the handler even for
/// the NULL mechanism senders use.
pub const DOMAIN: &str = "mirage-ingest";

/// Who a guarded socket lets in: peer addresses, and with CURVE the peers' public keys.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Addresses let in.
    pub allow: Allowlist,
    /// The socket's CURVE (its clients' keys), when it has one.
    pub curve: Option<Curve>,
}

impl Policy {
    /// Whether anyone may connect (no handler needed).
    pub fn is_open(&self) -> bool {
        self.allow.is_anyone() && self.curve.is_none()
    }
}

/// The handler's thread, stopped and joined on drop.
pub struct ZapGuard {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    reported: u64,
    thread: Option<JoinHandle<()>>,
}

impl ZapGuard {
    /// Starts the handler in `ctx`, before the socket it guards binds (that socket needs
    /// `set_zap_domain(DOMAIN)`: [`ZapGuard::protect`]). `peers` names the peers in its log.
    fn start(ctx: &zmq::Context, policy: Policy, peers: &'static str) -> Result<ZapGuard, String> {
        let socket = ctx.socket(zmq::REP).map_err(|e| format!("ZAP handler: {e}"))?;
        socket.bind(ZAP_ENDPOINT).map_err(|e| format!("ZAP handler: cannot bind: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), refused.clone());
        let thread = std::thread::Builder::new()
            .name("mirage/zap".into())
            .spawn(move || serve(socket, &policy, peers, &s, &r))
            .map_err(|e| format!("ZAP handler: {e}"))?;
        Ok(ZapGuard { stop, refused, reported: 0, thread: Some(thread) })
    }

    /// Guards `socket` (not yet bound) in `ctx` by `policy`: unless anyone may connect, starts
    /// the handler, sets the socket's ZAP domain and, with CURVE, makes it a CURVE server.
    /// The ingest and the PUB socket both come through here.
    pub fn protect(
        ctx: &zmq::Context,
        socket: &zmq::Socket,
        policy: &Policy,
        peers: &'static str,
    ) -> Result<Option<ZapGuard>, String> {
        if policy.is_open() {
            return Ok(None);
        }
        let guard = ZapGuard::start(ctx, policy.clone(), peers)?;
        socket.set_zap_domain(DOMAIN).map_err(|e| format!("ZAP domain: {e}"))?;
        if let Some(curve) = &policy.curve {
            curve.serve(socket).map_err(|e| format!("CURVE: {e}"))?;
        }
        Ok(Some(guard))
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

/// Answers requests until `stop`: 200 for an allowed peer, 400 otherwise (each refused peer
/// logged once).
fn serve(socket: zmq::Socket, policy: &Policy, peers: &str, stop: &AtomicBool, refused: &AtomicU64) {
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
        let (reply, why) = answer(&request, policy);
        if let Some(why) = why {
            refused.fetch_add(1, Ordering::Relaxed);
            if logged.insert(why.clone()) {
                tracing::warn!("refused {peers} at {why}");
            }
        }
        if let Err(e) = socket.send_multipart(reply, 0) {
            tracing::error!("ZAP handler: {e}");
        }
    }
}

/// The reply to one ZAP request, and when it is refused the peer's address and why.
pub fn answer(request: &[Vec<u8>], policy: &Policy) -> (Vec<Vec<u8>>, Option<String>) {
    let frame = |i: usize| request.get(i).cloned().unwrap_or_default();
    let address = String::from_utf8_lossy(&frame(3)).into_owned();
    let refusal = if frame(0) != b"1.0" {
        Some("not a ZAP 1.0 request")
    } else if !address.parse::<IpAddr>().is_ok_and(|ip| policy.allow.allows(ip)) {
        Some("address not in ingest.allow")
    } else {
        match &policy.curve {
            Some(_) if frame(5) != b"CURVE" => Some("no CURVE"),
            Some(curve) if !curve.lets_in(&frame(6)) => Some("CURVE key not among the clients"),
            _ => None,
        }
    };
    let (code, text) = match refusal {
        None => ("200", "OK"),
        Some(why) => ("400", why),
    };
    let reply = vec![b"1.0".to_vec(), frame(1), code.into(), text.into(), Vec::new(), Vec::new()];
    let why = refusal.map(|why| match (why, zmq::z85_encode(&frame(6))) {
        ("CURVE key not among the clients", Ok(key)) => {
            format!("{address}: CURVE key {key} not among the clients")
        }
        _ => format!("{address}: {why}"),
    });
    (reply, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(address: &str) -> Vec<Vec<u8>> {
        ["1.0", "7", DOMAIN, address, "", "NULL"].iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn a_peer_in_the_list_is_let_in_and_others_are_refused_with_the_request_id() {
        let policy = Policy { allow: Allowlist::parse(&["127.0.0.1".to_string()]).unwrap(), curve: None };
        let (ok, none) = answer(&request("127.0.0.1"), &policy);
        assert_eq!((ok[1].as_slice(), ok[2].as_slice(), none), (&b"7"[..], &b"200"[..], None));
        let (no, why) = answer(&request("127.0.0.2"), &policy);
        assert_eq!(
            (no[2].as_slice(), why.as_deref()),
            (&b"400"[..], Some("127.0.0.2: address not in ingest.allow"))
        );
        // Malformed requests are refused, never a panic.
        assert_eq!(answer(&[], &policy).0[2], b"400");
        assert_eq!(answer(&request("not an address"), &policy).0[2], b"400");
    }

    #[test]
    fn with_curve_only_listed_keys_are_let_in() {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, client) =
            (crate::curve::Certificate::generate().unwrap(), crate::curve::Certificate::generate().unwrap());
        let (_, secret) = daemon.write(&dir.path().join("daemon")).unwrap();
        let (public, _) = client.write(&dir.path().join("client")).unwrap();
        let cfg = crate::curve::CurveConfig { secret: Some(secret), clients: vec![public] };
        let policy =
            Policy { allow: Allowlist::default(), curve: Curve::load(&cfg, "ingest.curve").unwrap() };
        let curve_request = |key: Vec<u8>| {
            let mut r = request("127.0.0.1");
            r[5] = b"CURVE".to_vec();
            r.push(key);
            r
        };
        let listed = zmq::z85_decode(&client.public).unwrap();
        assert_eq!(answer(&curve_request(listed), &policy).0[2], b"200");
        let other = zmq::z85_decode(&daemon.public).unwrap();
        let (no, why) = answer(&curve_request(other), &policy);
        assert_eq!(no[2], b"400");
        assert!(why.unwrap().contains(&format!("CURVE key {} not among the clients", daemon.public)));
        assert_eq!(answer(&request("127.0.0.1"), &policy).1.as_deref(), Some("127.0.0.1: no CURVE"));
        assert_eq!(answer(&curve_request(Vec::new()), &policy).0[2], b"400");
    }
}
