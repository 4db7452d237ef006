//! The `--ingest` and `--publish` URIs: parsing, with errors that say what to write instead.

use std::path::PathBuf;

use crate::sim::SimConfig;

/// How fast a file or simulated run is played.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Speed {
    /// One volume per TR, as a scanner would.
    RealTime,
    /// As fast as the pipeline takes them.
    Max,
    /// `factor` times real time (2 = twice as fast).
    Factor(f64),
}

impl Speed {
    /// Parses `tr`, `realtime`, `max` or a positive factor.
    pub fn parse(s: &str) -> Result<Speed, String> {
        match s {
            "tr" | "realtime" => Ok(Speed::RealTime),
            "max" => Ok(Speed::Max),
            f => match f.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => Ok(Speed::Factor(x)),
                _ => Err(format!("speed={s:?}: use tr, max or a positive factor such as 2")),
            },
        }
    }

    /// Seconds between volumes for a repetition time `tr`, or `None` for as fast as possible.
    pub fn interval(self, tr: f64) -> Option<f64> {
        match self {
            Speed::RealTime => Some(tr),
            Speed::Max => None,
            Speed::Factor(f) => Some(tr / f),
        }
    }
}

/// How a file or simulated run is played back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Playback {
    /// Pace of the volumes.
    pub speed: Speed,
    /// Seconds to wait before the first volume (lets subscribers connect first).
    pub delay: f64,
}

impl Default for Playback {
    fn default() -> Playback {
        Playback { speed: Speed::RealTime, delay: 0.0 }
    }
}

impl Playback {
    /// Applies a `speed=` or `delay=` query pair; `Ok(false)` when the key is neither.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "speed" => self.speed = Speed::parse(value)?,
            "delay" => {
                self.delay = value
                    .parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or(format!("delay={value:?} must be a non-negative number of seconds"))?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A TCP endpoint of a ZeroMQ socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address (or `*` for every interface).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// The ZeroMQ address, `tcp://host:port`.
    pub fn zmq_address(&self) -> String {
        format!("tcp://{}:{}", self.host, self.port)
    }

    /// True when the endpoint listens beyond this machine.
    pub fn is_exposed(&self) -> bool {
        !(self.host.starts_with("127.") || self.host == "[::1]")
    }

    fn parse(scheme: &str, rest: &str) -> Result<Endpoint, String> {
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or(format!("{scheme}://{rest}: give HOST:PORT, e.g. {scheme}://127.0.0.1:5555"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or(format!("{scheme}://{rest}: port {port:?} is not a number in 1..65535"))?;
        let host = match host {
            "localhost" => "127.0.0.1".to_string(),
            "*" | "0.0.0.0" => "*".to_string(),
            h if h.parse::<std::net::Ipv4Addr>().is_ok() => h.to_string(),
            h if h.starts_with('[')
                && h.ends_with(']')
                && h[1..h.len() - 1].parse::<std::net::Ipv6Addr>().is_ok() =>
            {
                h.to_string()
            }
            h => return Err(format!("{scheme}://{rest}: host {h:?} must be an IP address, localhost or *")),
        };
        Ok(Endpoint { host, port })
    }
}

/// Where volumes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum IngestUri {
    /// `pyneal://HOST:PORT[?tr=SECONDS]`: pyneal-scanner's ZMQ PAIR protocol; we bind.
    Pyneal {
        /// Where we bind.
        endpoint: Endpoint,
        /// TR in seconds over the sender's headers.
        tr: Option<f64>,
    },
    /// `zmq://HOST:PORT[?tr=SECONDS]`: the native ZMQ PULL protocol; we bind, many senders may
    /// connect.
    Zmq {
        /// Where we bind.
        endpoint: Endpoint,
        /// TR in seconds over the sender's headers.
        tr: Option<f64>,
    },
    /// `lsl://NAME[?tr=SECONDS]`: an LSL stream of that name, one sample per volume.
    Lsl {
        /// Stream name to resolve.
        name: String,
        /// TR in seconds over the stream's description.
        tr: Option<f64>,
    },
    /// `file://PATH?speed=…&delay=…&tr=…`: replay of a 4-D NIfTI, or of a recorded session
    /// folder (every volume as it arrived).
    File {
        /// The series.
        path: PathBuf,
        /// Pace and start delay.
        playback: Playback,
        /// TR override in seconds (for files whose header TR is wrong).
        tr: Option<f64>,
    },
    /// `sim://?key=value&…` (plus `speed=` and `delay=`): the built-in simulator, in process.
    Sim {
        /// Simulation parameters (defaults overridden by the query).
        sim: Box<SimConfig>,
        /// Pace and start delay.
        playback: Playback,
    },
}

const SCHEMES: &str =
    "pyneal://HOST:PORT, zmq://HOST:PORT, lsl://NAME, file://PATH.nii.gz, file://SESSION_DIR or sim://?seed=1";

fn split_query(rest: &str) -> (&str, Vec<(&str, &str)>) {
    match rest.split_once('?') {
        Some((base, q)) => (
            base,
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
        None => (rest, Vec::new()),
    }
}

/// A `tr=` query value: a positive number of seconds.
fn parse_tr(scheme: &str, v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0 && *t <= super::IMPLAUSIBLE_TR_S)
        .ok_or(format!("{scheme}:// tr={v:?} is not a repetition time in seconds (above 0, at most 60)"))
}

/// The query of a network URI, which takes only `tr=`.
fn network_tr(scheme: &str, query: &[(&str, &str)]) -> Result<Option<f64>, String> {
    let mut tr = None;
    for (k, v) in query {
        match *k {
            "tr" => tr = Some(parse_tr(scheme, v)?),
            _ => return Err(format!("{scheme}:// does not take {k:?}; only tr=SECONDS")),
        }
    }
    Ok(tr)
}

impl IngestUri {
    /// Parses an ingest URI; `sim_defaults` are the simulator settings a `sim://` query refines.
    pub fn parse(uri: &str, sim_defaults: &SimConfig) -> Result<IngestUri, String> {
        let (scheme, rest) =
            uri.split_once("://").ok_or(format!("ingest URI {uri:?} has no scheme; use {SCHEMES}"))?;
        match scheme {
            "pyneal" | "zmq" => {
                let (base, query) = split_query(rest);
                let (endpoint, tr) = (Endpoint::parse(scheme, base)?, network_tr(scheme, &query)?);
                Ok(if scheme == "pyneal" {
                    IngestUri::Pyneal { endpoint, tr }
                } else {
                    IngestUri::Zmq { endpoint, tr }
                })
            }
            "lsl" => {
                let (base, query) = split_query(rest);
                let name = base.trim_end_matches('/');
                if name.is_empty() || name.contains(['\'', '"']) {
                    return Err(format!("lsl://{name}: give the stream name, e.g. lsl://mirage-volumes"));
                }
                Ok(IngestUri::Lsl { name: name.to_string(), tr: network_tr(scheme, &query)? })
            }
            "file" => {
                let (path, query) = split_query(rest);
                if path.is_empty() {
                    return Err("file:// needs a path, e.g. file://run.nii.gz?speed=max".into());
                }
                let (mut playback, mut tr) = (Playback::default(), None);
                for (k, v) in query {
                    if playback.set(k, v)? {
                        continue;
                    }
                    match k {
                        "tr" => tr = Some(parse_tr(scheme, v)?),
                        _ => return Err(format!("file:// does not take {k:?}; use speed=, delay= and tr=")),
                    }
                }
                Ok(IngestUri::File { path: PathBuf::from(path), playback, tr })
            }
            "sim" => {
                let (_, query) = split_query(rest);
                let mut sim = sim_defaults.clone();
                let mut playback = Playback::default();
                for (k, v) in query {
                    if !playback.set(k, v)? {
                        sim.set(k, v)?;
                    }
                }
                Ok(IngestUri::Sim { sim: Box::new(sim), playback })
            }
            other => Err(format!("unknown ingest scheme {other:?}; use {SCHEMES}")),
        }
    }

    /// The endpoint a listening source binds (`pyneal://`, `zmq://`).
    pub fn bound_endpoint(&self) -> Option<&Endpoint> {
        match self {
            IngestUri::Pyneal { endpoint, .. } | IngestUri::Zmq { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }

    /// The TR the URI sets over the sender's headers (`?tr=`).
    pub fn tr(&self) -> Option<f64> {
        match self {
            IngestUri::Pyneal { tr, .. } | IngestUri::Zmq { tr, .. } | IngestUri::Lsl { tr, .. } => *tr,
            IngestUri::File { tr, .. } => *tr,
            IngestUri::Sim { .. } => None,
        }
    }
}

/// Parses a publish URI: `tcp://HOST:PORT` (a ZMQ PUB socket we bind).
pub fn parse_publish_uri(uri: &str) -> Result<Endpoint, String> {
    match uri.split_once("://") {
        Some(("tcp", rest)) => Endpoint::parse("tcp", rest),
        _ => Err(format!("publish URI {uri:?}: use tcp://HOST:PORT, e.g. tcp://127.0.0.1:5560")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        let d = SimConfig::default();
        assert_eq!(
            IngestUri::parse("pyneal://localhost:5555", &d).unwrap(),
            IngestUri::Pyneal { endpoint: Endpoint { host: "127.0.0.1".into(), port: 5555 }, tr: None }
        );
        assert!(
            matches!(IngestUri::parse("zmq://*:6000", &d).unwrap(), IngestUri::Zmq { endpoint, .. } if endpoint.is_exposed())
        );
        assert_eq!(IngestUri::parse("pyneal://127.0.0.1:5555?tr=0.5", &d).unwrap().tr(), Some(0.5));
        assert_eq!(
            IngestUri::parse("lsl://mirage-volumes?tr=1.5", &d).unwrap(),
            IngestUri::Lsl { name: "mirage-volumes".into(), tr: Some(1.5) }
        );
        assert_eq!(
            IngestUri::parse("file://data/run.nii.gz?speed=max&tr=2", &d).unwrap(),
            IngestUri::File {
                path: "data/run.nii.gz".into(),
                playback: Playback { speed: Speed::Max, delay: 0.0 },
                tr: Some(2.0)
            }
        );
        match IngestUri::parse("sim://?seed=9&volumes=10&speed=4&delay=0.5", &d).unwrap() {
            IngestUri::Sim { sim, playback } => {
                assert_eq!((sim.seed, sim.volumes), (9, 10));
                assert_eq!(playback, Playback { speed: Speed::Factor(4.0), delay: 0.5 });
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_say_what_to_fix() {
        let d = SimConfig::default();
        for (uri, hint) in [
            ("5555", "no scheme"),
            ("http://x", "unknown ingest scheme"),
            ("pyneal://127.0.0.1", "HOST:PORT"),
            ("pyneal://127.0.0.1:99999", "port"),
            ("zmq://scanner.local:5555", "IP address"),
            ("file://?speed=max", "needs a path"),
            ("file://a.nii?speed=fast", "speed"),
            ("file://a.nii?delay=-1", "delay"),
            ("sim://?volumes=x", "volumes"),
            ("sim://?colour=red", "sim parameter colour=red: unknown field `colour`"),
            ("pyneal://127.0.0.1:5555?tr=500", "at most 60"),
            ("zmq://127.0.0.1:5555?speed=max", "only tr="),
        ] {
            let err = IngestUri::parse(uri, &d).unwrap_err();
            assert!(err.contains(hint), "{uri}: {err}");
        }
        assert!(parse_publish_uri("udp://1.2.3.4:5").is_err());
        assert_eq!(parse_publish_uri("tcp://127.0.0.1:5560").unwrap().port, 5560);
    }
}
