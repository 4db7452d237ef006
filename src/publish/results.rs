//! A pyneal-style results server: a task script (PsychoPy, MATLAB's `getFromPyneal.m`, pyneal's
//! `endUser_sim.py`) connects over plain TCP, sends a volume's 0-based index as four characters
//! (`0024`), and gets one JSON line back, `{"foundResults": true, …}` or
//! `{"foundResults": false}`; then the server closes the connection.
//!
//! The [`ResultsBoard`] is filled from the messages publish sends, so a volume is found once it
//! has been published; a trial's decode joins the volume that closed the trial when it arrives.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ingest::allow::Allowlist;
use crate::listen::Limits;
use crate::metrics::{Metrics, Reason};
use crate::topic::{self, BetasHeader, DecodeHeader, MotionHeader, RoiHeader, Topic, VolumeHeader};

/// A request the results server could not answer.
pub const BAD_REQUEST: Reason = Reason::new(
    "results_bad_request",
    "results-server requests that were not a 4-digit volume index in time",
);
/// A results client outside `ingest.allow`.
pub const REFUSED: Reason =
    Reason::new("results_refused", "results-server connections from outside ingest.allow, closed unanswered");
/// What the results server counts.
pub const REASONS: &[Reason] = &[BAD_REQUEST, REFUSED];

/// Volumes kept for lookup; older ones of a longer run are forgotten.
const MAX_VOLUMES: usize = 1 << 16;

/// The latest run's results by volume index.
#[derive(Default)]
pub struct ResultsBoard {
    inner: Mutex<Board>,
}

#[derive(Default)]
struct Board {
    run: Option<String>,
    volumes: BTreeMap<u64, Map<String, Value>>,
    /// The volume that closed each trial, by (run, trial).
    closed_by: HashMap<(String, u64), u64>,
}

impl Board {
    /// The entry of `index` in `run`; a new run clears the board (indices restart).
    fn entry(&mut self, run: &str, index: u64) -> &mut Map<String, Value> {
        if self.run.as_deref() != Some(run) {
            self.run = Some(run.to_string());
            self.volumes.clear();
            self.closed_by.clear();
        }
        if self.volumes.len() >= MAX_VOLUMES && !self.volumes.contains_key(&index) {
            self.volumes.pop_first();
        }
        self.volumes.entry(index).or_default()
    }
}

impl ResultsBoard {
    /// Takes what a client may ask for from a published message's header (read as its
    /// topic's type; a header that does not read is skipped).
    pub fn record(&self, topic: &str, header: &Value) {
        let Ok(mut b) = self.inner.lock() else { return };
        match topic {
            MotionHeader::NAME => {
                let Ok(m) = topic::read::<MotionHeader>(topic, header) else { return };
                let e = b.entry(&m.run, m.index);
                for (key, v) in crate::motion::rigid::PARAM_NAMES.iter().zip(m.params()) {
                    e.insert((*key).into(), json!(v));
                }
                e.insert("framewise_displacement".into(), json!(m.framewise_displacement));
            }
            RoiHeader::NAME => {
                let Ok(r) = topic::read::<RoiHeader>(topic, header) else { return };
                let e = b.entry(&r.run, r.index);
                if r.feedback.is_some() {
                    e.insert("feedback".into(), json!(r.feedback));
                }
                for roi in r.rois {
                    if roi.feedback.is_some() {
                        e.insert(format!("{}_feedback", roi.name), json!(roi.feedback));
                    }
                    e.insert(format!("{}_psc", roi.name), json!(roi.psc));
                    e.insert(roi.name, json!(roi.mean));
                }
            }
            VolumeHeader::NAME => {
                let Ok(v) = topic::read::<VolumeHeader>(topic, header) else { return };
                b.entry(&v.run, v.index).insert("published".into(), json!(true));
            }
            BetasHeader::NAME => {
                let Ok(t) = topic::read::<BetasHeader>(topic, header) else { return };
                b.entry(&t.trial.run, t.index);
                b.closed_by.insert((t.trial.run, t.trial.trial), t.index);
            }
            DecodeHeader::NAME => {
                let Ok(d) = topic::read::<DecodeHeader>(topic, header) else { return };
                let t = &d.trial;
                let Some(i) = b.closed_by.get(&(t.run.clone(), t.trial)).copied() else { return };
                let top = d.top.first();
                let decode = json!({
                    "trial": t.trial,
                    "stim": t.stim,
                    "condition": t.condition,
                    "top_id": top.map(|m| &m.id),
                    "top_score": top.map(|m| m.score),
                });
                b.entry(&t.run, i).insert("decode".into(), decode);
            }
            _ => {}
        }
    }

    /// The answer for volume `index`: its results once it has been published.
    pub fn lookup(&self, index: u64) -> Value {
        let Ok(b) = self.inner.lock() else { return json!({"foundResults": false}) };
        match b.volumes.get(&index).filter(|e| e.contains_key("published")) {
            Some(e) => {
                let mut out = Map::new();
                out.insert("foundResults".into(), json!(true));
                out.insert("volIdx".into(), json!(index));
                out.extend(
                    e.iter().filter(|(k, _)| k.as_str() != "published").map(|(k, v)| (k.clone(), v.clone())),
                );
                Value::Object(out)
            }
            None => json!({"foundResults": false}),
        }
    }
}

/// Task scripts connect once per volume and send four bytes at once: a few dozen connections
/// at a time is ample, and a request has a second to arrive, whatever pace it trickles in at.
const LIMITS: Limits = Limits {
    max_connections: 64,
    request_timeout: Duration::from_secs(1),
    connection_timeout: Some(Duration::from_secs(2)),
};

/// Binds `addr` (`IP:PORT`) for [`serve`].
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    crate::listen::bind(addr, "results server", "127.0.0.1:5556")
}

/// Answers requests, many clients at once, until `done` is set; a malformed or late request is
/// answered with an error line and counted (`results_bad_request`); a client outside `allow` is
/// closed unanswered and counted (`results_refused`).
pub fn serve(
    listener: TcpListener,
    board: Arc<ResultsBoard>,
    metrics: Arc<Metrics>,
    done: Arc<AtomicBool>,
    allow: Allowlist,
) {
    crate::listen::block_on("results server", || async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return tracing::error!("results server: {e}"),
        };
        let stop = crate::listen::when_set(done);
        let m = metrics.clone();
        crate::listen::serve(listener, LIMITS, metrics, "results server", stop, move |stream, requested| {
            let (board, metrics, allowed) =
                (board.clone(), m.clone(), stream.peer_addr().is_ok_and(|p| allow.allows(p.ip())));
            async move {
                if !allowed {
                    return metrics.count(REFUSED);
                }
                if let Err(e) = answer(stream, &board, &metrics, &requested).await {
                    tracing::debug!("results server: {e}");
                }
            }
        })
        .await;
    });
}

/// A request's volume index: four ASCII digits (pyneal's `str(volIdx).zfill(4)`; longer
/// all-digit requests are taken too, for runs past volume 9999).
pub fn parse_request(bytes: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the request is not text".to_string())?.trim();
    if text.len() < 4 || !text.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("request {text:?}: send the volume index as 4 digits, e.g. 0024"));
    }
    text.parse().map_err(|_| format!("request {text:?}: not a volume index"))
}

async fn answer(
    mut stream: TcpStream,
    board: &ResultsBoard,
    metrics: &Metrics,
    requested: &crate::listen::Requested,
) -> std::io::Result<()> {
    // pyneal's clients send exactly four characters and then wait; read until four arrive, or
    // the request's time is up.
    let mut buf = [0u8; 16];
    let mut n = 0;
    let read = async {
        while n < 4 {
            match stream.read(&mut buf[n..]).await? {
                0 => break,
                got => n += got,
            }
        }
        std::io::Result::Ok(())
    };
    let in_time = tokio::time::timeout(LIMITS.request_timeout, read).await;
    requested.mark();
    let reply = match in_time {
        Ok(read) => {
            read?;
            match parse_request(&buf[..n]) {
                Ok(index) => board.lookup(index),
                Err(e) => {
                    metrics.count(BAD_REQUEST);
                    json!({"foundResults": false, "error": e})
                }
            }
        }
        Err(_) => {
            metrics.count(BAD_REQUEST);
            json!({"foundResults": false, "error": "no 4-digit request within a second"})
        }
    };
    stream.write_all(format!("{reply}\n").as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const EYE: crate::volume::Affine =
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];

    /// A header as publish sends it.
    fn sent<T: Topic>(h: T) -> (&'static str, Value) {
        (T::NAME, h.message(Vec::new()).full_header())
    }

    fn volume(run: &str, index: u64) -> (&'static str, Value) {
        sent(VolumeHeader {
            seq: index,
            index,
            run: run.into(),
            shape: [2, 2, 2],
            affine: EYE,
            voxel_size: [1.0; 3],
            tr: Some(2.0),
            acq_time: None,
            recv_time: 0.0,
            flags: Default::default(),
            stage_errors: Vec::new(),
            latency_ms: Default::default(),
        })
    }

    #[test]
    fn a_volume_is_found_once_published_with_its_trial_decode() {
        let board = ResultsBoard::default();
        let record = |(topic, header): (&str, Value)| board.record(topic, &header);
        assert_eq!(board.lookup(3), json!({"foundResults": false}));
        record(sent(MotionHeader {
            seq: 3,
            index: 3,
            run: "r".into(),
            acq_time: None,
            trans_x: 0.1,
            trans_y: 0.0,
            trans_z: 0.0,
            rot_x: 0.0,
            rot_y: 0.0,
            rot_z: 0.0,
            matrix: EYE,
            framewise_displacement: 0.2,
            fd_exceeded: false,
            iterations: 3,
            cost: None,
            converged: true,
            reference_index: Some(0),
        }));
        let rois = vec![topic::RoiReading {
            name: "visual".into(),
            mean: Some(5.0),
            psc: None,
            feedback: Some(20.0),
        }];
        record(sent(RoiHeader {
            seq: 3,
            index: 3,
            run: "r".into(),
            acq_time: None,
            rois,
            feedback: Some(30.0),
        }));
        record(sent(BetasHeader {
            trial: topic::TrialHeader::sample(7, 2, "imagery"),
            index: 3,
            tr: Some(2.0),
            shape: [2, 2, 2],
        }));
        // Not yet published: not found; a header of the wrong shape changes nothing.
        assert_eq!(board.lookup(3)["foundResults"], false);
        board.record("volume", &json!({"run": "r", "index": 3}));
        assert_eq!(board.lookup(3)["foundResults"], false);
        record(volume("r", 3));
        let r = board.lookup(3);
        assert_eq!(
            (r["foundResults"].clone(), r["visual"].clone(), r["visual_psc"].clone()),
            (json!(true), json!(5.0), Value::Null)
        );
        assert_eq!((r["trans_x"].clone(), r["framewise_displacement"].clone()), (json!(0.1), json!(0.2)));
        assert_eq!((r["feedback"].clone(), r["visual_feedback"].clone()), (json!(30.0), json!(20.0)));
        assert!(r.get("decode").is_none());
        record(sent(DecodeHeader::sample(topic::TrialHeader::sample(7, 2, "imagery"), 2, 0.5)));
        assert_eq!(board.lookup(3)["decode"]["top_id"], "2");
        // A new run starts over.
        record(volume("r2", 0));
        assert_eq!(board.lookup(3)["foundResults"], false);
        assert_eq!(board.lookup(0)["foundResults"], true);
    }

    #[test]
    fn requests_are_four_digits() {
        assert_eq!(parse_request(b"0024"), Ok(24));
        assert_eq!(parse_request(b"12345"), Ok(12345));
        for bad in [&b"24"[..], b"00x4", b"", &[0xff, 0xfe, 0x30, 0x30]] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }
}
