//! A pyneal-style results server: a task script (PsychoPy, MATLAB's `getFromPyneal.m`, pyneal's
//! `endUser_sim.py`) connects over plain TCP, sends a volume's 0-based index as four characters
//! (`0024`), and gets one JSON line back, `{"foundResults": true, …}` or
//! `{"foundResults": false}`; then the server closes the connection.
//!
//! The [`ResultsBoard`] is filled from the messages publish sends, so a volume is found once it
//! has been published; a trial's decode joins the volume that closed the trial when it arrives.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::metrics::{Metrics, Reason};

/// A request the results server could not answer.
pub const BAD_REQUEST: Reason =
    Reason::new("results_bad_request", "results-server requests that were not a 4-digit volume index");

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
    /// Takes what a client may ask for from a published message's header.
    pub fn record(&self, topic: &str, header: &Value) {
        let Ok(mut b) = self.inner.lock() else { return };
        let run = header.get("run").and_then(Value::as_str).unwrap_or_default().to_string();
        let index = header.get("index").and_then(Value::as_u64);
        match (topic, index) {
            ("motion", Some(i)) => {
                let e = b.entry(&run, i);
                for key in crate::motion::rigid::PARAM_NAMES.iter().chain(["framewise_displacement"].iter()) {
                    e.insert((*key).into(), header.get(*key).cloned().unwrap_or(Value::Null));
                }
            }
            ("roi", Some(i)) => {
                let e = b.entry(&run, i);
                for r in header.get("rois").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(name) = r.get("name").and_then(Value::as_str) {
                        e.insert(name.into(), r.get("mean").cloned().unwrap_or(Value::Null));
                        e.insert(format!("{name}_psc"), r.get("psc").cloned().unwrap_or(Value::Null));
                    }
                }
            }
            ("volume", Some(i)) => {
                b.entry(&run, i).insert("published".into(), json!(true));
            }
            ("betas", Some(i)) => {
                if let Some(trial) = header.get("trial").and_then(Value::as_u64) {
                    b.entry(&run, i);
                    b.closed_by.insert((run, trial), i);
                }
            }
            ("decode", _) => {
                let trial = header.get("trial").and_then(Value::as_u64);
                let Some(i) = trial.and_then(|t| b.closed_by.get(&(run.clone(), t)).copied()) else { return };
                let top = header.get("top").and_then(|t| t.get(0));
                let decode = json!({
                    "trial": trial,
                    "stim": header.get("stim"),
                    "condition": header.get("condition"),
                    "top_id": top.and_then(|t| t.get("id")),
                    "top_score": top.and_then(|t| t.get("score")),
                });
                b.entry(&run, i).insert("decode".into(), decode);
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

/// Binds `addr` (`IP:PORT`) for [`serve`].
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    super::listener::bind(addr, "results server", "127.0.0.1:5556")
}

/// Answers requests until `done` is set; a malformed request is answered with an error line
/// and counted (`results_bad_request`).
pub fn serve(listener: TcpListener, board: Arc<ResultsBoard>, metrics: Arc<Metrics>, done: Arc<AtomicBool>) {
    super::listener::serve(listener, "results server", &done, |stream| answer(stream, &board, &metrics));
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

fn answer(mut stream: TcpStream, board: &ResultsBoard, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    // pyneal's clients send exactly four characters and then wait; read until four arrive.
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 4 {
        let got = stream.read(&mut buf[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let reply = match parse_request(&buf[..n]) {
        Ok(index) => board.lookup(index),
        Err(e) => {
            metrics.count(BAD_REQUEST);
            json!({"foundResults": false, "error": e})
        }
    };
    stream.write_all(format!("{reply}\n").as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_found_once_published_with_its_trial_decode() {
        let board = ResultsBoard::default();
        assert_eq!(board.lookup(3), json!({"foundResults": false}));
        board.record(
            "motion",
            &json!({"run": "r", "index": 3, "trans_x": 0.1, "framewise_displacement": 0.2}),
        );
        board.record(
            "roi",
            &json!({"run": "r", "index": 3, "rois": [{"name": "visual", "mean": 5.0, "psc": null}]}),
        );
        board.record("betas", &json!({"run": "r", "index": 3, "trial": 7}));
        // Not yet published: not found.
        assert_eq!(board.lookup(3)["foundResults"], false);
        board.record("volume", &json!({"run": "r", "index": 3}));
        let r = board.lookup(3);
        assert_eq!(
            (r["foundResults"].clone(), r["visual"].clone(), r["visual_psc"].clone()),
            (json!(true), json!(5.0), Value::Null)
        );
        assert_eq!((r["trans_x"].clone(), r["framewise_displacement"].clone()), (json!(0.1), json!(0.2)));
        assert!(r.get("decode").is_none());
        board.record("decode", &json!({"run": "r", "trial": 7, "stim": 2, "condition": "imagery", "top": [{"id": "s2", "score": 0.5}]}));
        assert_eq!(board.lookup(3)["decode"]["top_id"], "s2");
        // A new run starts over.
        board.record("volume", &json!({"run": "r2", "index": 0}));
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
