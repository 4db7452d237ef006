//! ZeroMQ receivers: pyneal-scanner's PAIR protocol and our native PULL protocol.
//!
//! pyneal (`pyneal://`): we bind a PAIR socket; the sender's first message is a greeting string
//! that we echo; then each volume is a header frame and a data frame (see [`super::wire`]),
//! answered with `received volIdx N` once it is written to the session folder, or a TR has
//! passed (or `error volIdx N: …` when refused,
//! so the sender never hangs). The run's last volume is answered `received volIdx N - STOP`, and
//! anything sent while the daemon drains `STOP: …`, which pyneal's vendor loops stop on. A single-frame string later in the run is a reconnecting sender's
//! greeting and is echoed again.
//!
//! native (`zmq://`): we bind a PULL socket; any number of senders PUSH header + data frames;
//! nothing is answered. A single frame `{"marker": "trial=3;stim=1;cond=seen;dur=4"}` (with an
//! optional `"time"`, seconds on the LSL clock; default: when it arrived) is a trial event in
//! the grammar of [`crate::event`].

use std::time::Duration;

use super::uri::Endpoint;
use super::wire::{decode_volume, parse_header, peek_index, WireError};
use super::{Ack, IngestError, Source, SourceEvent, SourceLimits};
use crate::clock;

/// Which protocol a [`ZmqReceiver`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// pyneal-scanner's PAIR protocol with greeting and replies.
    Pyneal,
    /// Native PULL protocol, no replies.
    Native,
}

/// Most frames a message may have before it is refused unread.
const MAX_FRAMES: usize = 8;

/// A bound ZMQ socket yielding volumes.
pub struct ZmqReceiver {
    protocol: Protocol,
    socket: zmq::Socket,
    address: String,
    limits: SourceLimits,
    run: String,
    last_index: Option<u64>,
    /// The handler letting in only `ingest.allow` and `ingest.curve.clients` (none when anyone
    /// may connect).
    zap: Option<super::zap::ZapGuard>,
    _ctx: zmq::Context,
}

impl ZmqReceiver {
    /// Binds the socket for `protocol` at `endpoint`.
    pub fn bind(
        protocol: Protocol,
        endpoint: &Endpoint,
        limits: SourceLimits,
        run: &str,
        policy: &super::zap::Policy,
    ) -> Result<ZmqReceiver, IngestError> {
        let address = endpoint.zmq_address();
        let err = |reason: String| IngestError::Socket { endpoint: address.clone(), reason };
        let ctx = zmq::Context::new();
        let kind = match protocol {
            Protocol::Pyneal => zmq::PAIR,
            Protocol::Native => zmq::PULL,
        };
        let socket = ctx.socket(kind).map_err(|e| err(e.to_string()))?;
        socket.set_maxmsgsize(limits.max_message_bytes()).map_err(|e| err(e.to_string()))?;
        socket.set_linger(1000).map_err(|e| err(e.to_string()))?;
        socket.set_rcvhwm(64).map_err(|e| err(e.to_string()))?;
        // The handler is up before the socket binds, so no peer connects unchecked.
        let zap = super::zap::ZapGuard::protect(&ctx, &socket, policy, "a sender").map_err(err)?;
        socket.bind(&address).map_err(|e| err(format!("cannot bind: {e}")))?;
        Ok(ZmqReceiver {
            protocol,
            socket,
            address,
            limits,
            run: run.to_string(),
            last_index: None,
            zap,
            _ctx: ctx,
        })
    }

    /// Receives one whole multipart message, or `None` on timeout.
    fn recv_message(&mut self, timeout: Duration) -> Result<Option<Vec<zmq::Message>>, zmq::Error> {
        let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        if self.socket.poll(zmq::POLLIN, ms)? == 0 {
            return Ok(None);
        }
        let mut parts = Vec::with_capacity(2);
        loop {
            let msg = self.socket.recv_msg(zmq::DONTWAIT)?;
            let more = msg.get_more();
            if parts.len() < MAX_FRAMES {
                parts.push(msg);
            }
            if !more {
                break;
            }
        }
        Ok(Some(parts))
    }

    fn reply(&mut self, text: &str) {
        if self.protocol == Protocol::Pyneal {
            if let Err(e) = self.socket.send(text, zmq::DONTWAIT) {
                tracing::warn!("pyneal: could not answer the sender ({e}): {text}");
            }
        }
    }
}

/// A single-frame native message: `{"marker": "...", "time": seconds}`.
fn marker(frame: &[u8], recv_time: f64) -> Result<crate::event::Event, IngestError> {
    let v: serde_json::Value = serde_json::from_slice(frame).map_err(|_| WireError::Frames(1))?;
    let text = v.get("marker").and_then(|m| m.as_str()).ok_or(WireError::Frames(1))?;
    let time = v.get("time").and_then(|t| t.as_f64()).filter(|t| t.is_finite()).unwrap_or(recv_time);
    Ok(crate::event::parse_marker(text, time)?)
}

impl Source for ZmqReceiver {
    fn next(&mut self, timeout: Duration) -> SourceEvent {
        if let Some(n) = self.zap.as_mut().map(|z| z.newly_refused()).filter(|n| *n > 0) {
            return SourceEvent::Refused(n);
        }
        let parts = match self.recv_message(timeout) {
            Ok(Some(p)) => p,
            Ok(None) => return SourceEvent::Idle,
            Err(e) => {
                return SourceEvent::Rejected(IngestError::Socket {
                    endpoint: self.address.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let recv_time = clock::now();
        self.last_index = None;
        match parts.as_slice() {
            [greeting] if self.protocol == Protocol::Pyneal && !greeting.starts_with(b"{") => {
                tracing::info!("pyneal: sender connected: {:?}", String::from_utf8_lossy(greeting));
                let echo: &[u8] = greeting;
                if let Err(e) = self.socket.send(echo, zmq::DONTWAIT) {
                    tracing::warn!("pyneal: could not echo the greeting: {e}");
                }
                SourceEvent::Idle
            }
            [header, data] => {
                let decoded = parse_header(header, self.limits.max_voxels)
                    .and_then(|h| decode_volume(&h, data, recv_time, &self.run));
                match decoded {
                    Ok(v) => {
                        self.last_index = Some(v.index);
                        SourceEvent::Volume(v)
                    }
                    Err(e) => {
                        self.last_index = peek_index(header);
                        SourceEvent::Rejected(e.into())
                    }
                }
            }
            [single] if self.protocol == Protocol::Native => match marker(single, recv_time) {
                Ok(e) => SourceEvent::Marker(e),
                Err(e) => SourceEvent::Rejected(e),
            },
            other => SourceEvent::Rejected(WireError::Frames(other.len()).into()),
        }
    }

    fn answers_sender(&self) -> bool {
        self.protocol == Protocol::Pyneal
    }

    fn acknowledge(&mut self, ack: Ack<'_>) {
        let text = match (ack, self.last_index) {
            (Ack::Accepted { index, last: false }, _) => format!("received volIdx {index}"),
            (Ack::Accepted { index, last: true }, _) => format!("received volIdx {index} - STOP"),
            (Ack::Stopped { index: Some(i) }, _) => {
                format!("STOP: the run is over; volIdx {i} was not taken")
            }
            (Ack::Stopped { index: None }, _) => "STOP: the run is over".to_string(),
            (Ack::Rejected { reason }, Some(i)) => format!("error volIdx {i}: {reason}"),
            (Ack::Rejected { reason }, None) => format!("error: {reason}"),
        };
        self.reply(&text);
    }

    fn describe(&self) -> String {
        match self.protocol {
            Protocol::Pyneal => format!("pyneal (ZMQ PAIR) {}", self.address),
            Protocol::Native => format!("native (ZMQ PULL) {}", self.address),
        }
    }
}
