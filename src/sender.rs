//! The sending side of the ingest protocols: what `mirage simulate --stream` (and any
//! scanner-side tool of ours) uses to deliver volumes to a daemon.

use lsl::ExPushable;

use crate::ingest::wire::{encode_header, encode_payload, Dialect};
use crate::ingest::IngestUri;
use crate::volume::Volume;

/// Why a volume could not be delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The URI is not one a sender can use.
    #[error("send: {0}")]
    Uri(String),
    /// A ZeroMQ operation failed.
    #[error("send: {address}: {reason}")]
    Zmq {
        /// The daemon's address.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The daemon did not answer in time.
    #[error("send: {address}: no reply from the daemon within {seconds} s")]
    Timeout {
        /// The daemon's address.
        address: String,
        /// How long we waited.
        seconds: f64,
    },
    /// The LSL outlet failed.
    #[error("send: lsl: {0}")]
    Lsl(String),
    /// The daemon's run is over; it did not take the volume.
    #[error("send: {address}: the daemon's run is over ({reply})")]
    RunOver {
        /// The daemon's address.
        address: String,
        /// Its reply.
        reply: String,
    },
}

/// What the daemon said of a delivered volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Taken (or, without replies, sent).
    Taken,
    /// Taken as the run's last volume: send no more.
    Last,
}

/// A connection to a daemon's ingest endpoint.
pub enum VolumeSender {
    /// pyneal-scanner's PAIR protocol (greeting, then header + C-order data, wait for reply).
    Pyneal {
        /// Connected PAIR socket.
        socket: zmq::Socket,
        /// Its context.
        ctx: zmq::Context,
        /// The daemon's address.
        address: String,
        /// Reply timeout, s.
        timeout: f64,
    },
    /// Native PUSH protocol (header + F-order data, no reply).
    Native {
        /// Connected PUSH socket.
        socket: zmq::Socket,
        /// Its context.
        ctx: zmq::Context,
        /// The daemon's address.
        address: String,
    },
    /// An LSL outlet, created at the first volume (its geometry goes into the stream's desc).
    Lsl {
        /// Stream name.
        name: String,
        /// The outlet once created.
        outlet: Option<lsl::StreamOutlet>,
        /// Seconds to wait for the daemon's inlet before the first sample.
        wait_consumer: f64,
    },
}

impl VolumeSender {
    /// Connects to `uri`; `timeout` bounds every wait for the daemon, in seconds.
    pub fn connect(uri: &IngestUri, timeout: f64) -> Result<VolumeSender, SendError> {
        VolumeSender::connect_with(uri, timeout, None)
    }

    /// Connects to `uri`, over CURVE when `curve` is given (ZeroMQ destinations only).
    pub fn connect_with(
        uri: &IngestUri,
        timeout: f64,
        curve: Option<&crate::curve::ClientCurve>,
    ) -> Result<VolumeSender, SendError> {
        let secure = |socket: &zmq::Socket| curve.map_or(Ok(()), |c| c.apply(socket));
        match uri {
            IngestUri::Pyneal { endpoint: ep, .. } => {
                let address = ep.zmq_address();
                let zerr = |e: zmq::Error| SendError::Zmq { address: address.clone(), reason: e.to_string() };
                let ctx = zmq::Context::new();
                let socket = ctx.socket(zmq::PAIR).map_err(zerr)?;
                socket.set_rcvtimeo((timeout * 1e3) as i32).map_err(zerr)?;
                socket.set_linger(1000).map_err(zerr)?;
                secure(&socket).map_err(zerr)?;
                socket.connect(&address).map_err(zerr)?;
                let greeting = "hello from mirage-rt scanner";
                socket.send(greeting, 0).map_err(zerr)?;
                match socket.recv_string(0) {
                    Ok(Ok(echo)) if echo == greeting => {}
                    Ok(_) => {
                        return Err(SendError::Zmq { address, reason: "greeting was not echoed".into() })
                    }
                    Err(zmq::Error::EAGAIN) => return Err(SendError::Timeout { address, seconds: timeout }),
                    Err(e) => return Err(zerr(e)),
                }
                Ok(VolumeSender::Pyneal { socket, ctx, address, timeout })
            }
            IngestUri::Zmq { endpoint: ep, .. } => {
                let address = ep.zmq_address();
                let zerr = |e: zmq::Error| SendError::Zmq { address: address.clone(), reason: e.to_string() };
                let ctx = zmq::Context::new();
                let socket = ctx.socket(zmq::PUSH).map_err(zerr)?;
                socket.set_sndtimeo((timeout * 1e3) as i32).map_err(zerr)?;
                socket.set_linger((timeout * 1e3) as i32).map_err(zerr)?;
                secure(&socket).map_err(zerr)?;
                socket.connect(&address).map_err(zerr)?;
                Ok(VolumeSender::Native { socket, ctx, address })
            }
            IngestUri::Lsl { .. } if curve.is_some() => {
                Err(SendError::Uri("CURVE is ZeroMQ's: lsl:// has no encryption".into()))
            }
            IngestUri::Lsl { name, .. } => {
                Ok(VolumeSender::Lsl { name: name.clone(), outlet: None, wait_consumer: timeout })
            }
            other => Err(SendError::Uri(format!(
                "{other:?} is not a network destination; use pyneal://, zmq:// or lsl://"
            ))),
        }
    }

    /// `v`'s data frame in this sender's protocol (empty for LSL, which pushes the floats): a
    /// scanner has it in hand at acquisition, so a paced sender makes it before the slot.
    pub fn payload(&self, v: &Volume) -> Vec<u8> {
        match self {
            VolumeSender::Pyneal { .. } => encode_payload(v, Dialect::Pyneal),
            VolumeSender::Native { .. } => encode_payload(v, Dialect::Native),
            VolumeSender::Lsl { .. } => Vec::new(),
        }
    }

    /// Delivers one volume; for pyneal, waits for the daemon's reply, which may end the run.
    pub fn send(&mut self, v: &Volume) -> Result<Delivered, SendError> {
        let payload = self.payload(v);
        self.send_payload(v, &payload)
    }

    /// [`VolumeSender::send`] with `v`'s data frame made beforehand by [`VolumeSender::payload`].
    pub fn send_payload(&mut self, v: &Volume, data: &[u8]) -> Result<Delivered, SendError> {
        match self {
            VolumeSender::Pyneal { socket, address, timeout, .. } => {
                let header = encode_header(v, Dialect::Pyneal);
                let zerr = |e: zmq::Error| SendError::Zmq { address: address.clone(), reason: e.to_string() };
                socket.send(header.as_bytes(), zmq::SNDMORE).map_err(zerr)?;
                socket.send(data, 0).map_err(zerr)?;
                match socket.recv_string(0) {
                    Ok(Ok(reply)) if reply.starts_with("received volIdx") && reply.contains("STOP") => {
                        Ok(Delivered::Last)
                    }
                    Ok(Ok(reply)) if reply.starts_with("received volIdx") => Ok(Delivered::Taken),
                    Ok(Ok(reply)) if reply.starts_with("STOP") => {
                        Err(SendError::RunOver { address: address.clone(), reply })
                    }
                    Ok(Ok(reply)) => Err(SendError::Zmq {
                        address: address.clone(),
                        reason: format!("daemon refused: {reply}"),
                    }),
                    Ok(Err(_)) => {
                        Err(SendError::Zmq { address: address.clone(), reason: "reply is not UTF-8".into() })
                    }
                    Err(zmq::Error::EAGAIN) => {
                        Err(SendError::Timeout { address: address.clone(), seconds: *timeout })
                    }
                    Err(e) => Err(zerr(e)),
                }
            }
            VolumeSender::Native { socket, address, .. } => {
                let header = encode_header(v, Dialect::Native);
                let zerr = |e: zmq::Error| SendError::Zmq { address: address.clone(), reason: e.to_string() };
                socket.send(header.as_bytes(), zmq::SNDMORE).map_err(zerr)?;
                socket.send(data, 0).map_err(zerr)?;
                Ok(Delivered::Taken)
            }
            VolumeSender::Lsl { name, outlet, wait_consumer } => {
                if outlet.is_none() {
                    *outlet = Some(create_outlet(name, v, *wait_consumer)?);
                }
                let o = outlet.as_ref().ok_or_else(|| SendError::Lsl("no outlet".into()))?;
                let stamp = v.acq_time.unwrap_or_else(lsl::local_clock);
                o.push_sample_ex(&v.data, stamp, true).map_err(|e| SendError::Lsl(format!("{e:?}")))?;
                Ok(Delivered::Taken)
            }
        }
    }
}

impl VolumeSender {
    /// Sends a trial marker (native ZMQ only: other protocols have no channel for it, and
    /// `false` says it was not sent).
    pub fn send_marker(&mut self, marker: &str) -> Result<bool, SendError> {
        match self {
            VolumeSender::Native { socket, address, .. } => {
                let msg = serde_json::json!({ "marker": marker }).to_string();
                socket
                    .send(msg.as_bytes(), 0)
                    .map_err(|e| SendError::Zmq { address: address.clone(), reason: e.to_string() })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Ends the connection so that what was sent is delivered. LSL has no delivery
    /// acknowledgement, so its outlet is kept open one more second for inlets to drain it.
    pub fn finish(self) {
        if let VolumeSender::Lsl { outlet: Some(_), .. } = &self {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// An outlet whose desc carries the volume geometry (see [`crate::ingest::lsl`]).
fn create_outlet(name: &str, v: &Volume, wait_consumer: f64) -> Result<lsl::StreamOutlet, SendError> {
    let rate = v.tr.map_or(lsl::IRREGULAR_RATE, |t| 1.0 / t);
    let err = |e: lsl::Error| SendError::Lsl(format!("{e:?}"));
    let mut info = lsl::StreamInfo::new(
        name,
        "fMRI",
        v.n_voxels() as u32,
        rate,
        lsl::ChannelFormat::Float32,
        &format!("mirage-{name}"),
    )
    .map_err(err)?;
    let mut desc = info.desc();
    let mut vol = desc.append_child("volume");
    vol.append_child_value("dims", &v.dims.map(|d| d.to_string()).join(" "));
    let affine: Vec<String> = v.affine.iter().flatten().map(|x| x.to_string()).collect();
    vol.append_child_value("affine", &affine.join(" "));
    if let Some(tr) = v.tr {
        vol.append_child_value("tr", &tr.to_string());
    }
    vol.append_child_value("run", &v.run);
    vol.append_child_value("first_index", &v.index.to_string());
    // 600 s of buffering at the nominal rate (each sample a whole volume): a sender faster
    // than real time, or a consumer that stalls for minutes, loses nothing.
    let outlet = lsl::StreamOutlet::new(&info, 0, 600).map_err(err)?;
    if !outlet.wait_for_consumers(wait_consumer) {
        return Err(SendError::Lsl(format!("no inlet connected to {name:?} within {wait_consumer} s")));
    }
    Ok(outlet)
}
