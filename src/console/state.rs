//! What the console shows: published messages turned into page events, the run's history (so
//! a page opened mid-run, and the report at the end, see the whole run) and the decoding
//! quality against the known truth, per condition.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::decode::gallery::Gallery;
use crate::decode::metrics::{pearson, ssim};
use crate::message::Payload;
use crate::topic::{
    self, BetasHeader, CalibrationHeader, DecodeHeader, MotionHeader, PictureHeader, RoiHeader, StatusHeader,
    Topic,
};

/// Events kept for late-joining pages and the report; older ones are dropped first.
pub const MAX_HISTORY: usize = 200_000;

/// The marker in the page that the report replaces with the run's events.
pub const REPLAY_MARKER: &str = "<!--MIRAGE_REPLAY-->";

/// One published message, as the publish thread hands it to the console.
#[derive(Clone, Debug)]
pub struct ConsoleInput {
    /// Topic.
    pub topic: &'static str,
    /// Header as published.
    pub header: Value,
    /// Payloads (only those of `decode` messages are kept).
    pub payloads: Vec<Payload>,
}

/// The known truth a decode is scored against: the gallery's embeddings and thumbnails.
struct Truth {
    gallery: Arc<Gallery>,
    /// PNG data URL of each item's thumbnail.
    thumbs: Vec<Option<String>>,
}

/// Sums of one (condition, alignment) group's per-trial scores.
#[derive(Default)]
struct QualitySums {
    n: usize,
    top1: (f64, usize),
    two_way: (f64, usize),
    pixcorr: (f64, usize),
    ssim: (f64, usize),
}

impl QualitySums {
    fn add(&mut self, s: &TrialScores) {
        self.n += 1;
        let add = |acc: &mut (f64, usize), v: Option<f64>| {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                acc.0 += v;
                acc.1 += 1;
            }
        };
        add(&mut self.top1, s.top1.map(|t| if t { 1.0 } else { 0.0 }));
        add(&mut self.two_way, s.two_way);
        add(&mut self.pixcorr, s.pixcorr);
        add(&mut self.ssim, s.ssim);
    }

    fn means(&self) -> [Option<f64>; 4] {
        let mean = |(s, n): (f64, usize)| (n > 0).then(|| s / n as f64);
        [mean(self.top1), mean(self.two_way), mean(self.pixcorr), mean(self.ssim)]
    }
}

/// One decoded trial's scores against its true stimulus.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrialScores {
    /// Whether the best gallery match is the true stimulus.
    pub top1: Option<bool>,
    /// Fraction of the other gallery items the truth beats in Pearson correlation with the
    /// prediction (MindEye's 2-way identification, against the gallery).
    pub two_way: Option<f64>,
    /// Pearson correlation of the pixel reconstruction with the true picture.
    pub pixcorr: Option<f64>,
    /// SSIM of the pixel reconstruction with the true picture.
    pub ssim: Option<f64>,
}

/// The console's state; [`ConsoleState::process`] is pure: no sockets, no threads.
pub struct ConsoleState {
    hello: Map<String, Value>,
    truth: Option<Truth>,
    history: VecDeque<Arc<str>>,
    latest_status: Option<Arc<str>>,
    quality: BTreeMap<(String, String), QualitySums>,
    dropped: u64,
}

fn encode(v: &Value) -> Arc<str> {
    Arc::from(v.to_string())
}

/// A PNG as a data URL.
pub fn png_data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn payload_f32(payloads: &[Payload], name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    let p = payloads.iter().find(|p| p.name == name && p.dtype == "float32")?;
    let values = p.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Some((p.shape.clone(), values))
}

impl ConsoleState {
    /// A console for a run described by `hello` (source, mode, thresholds), scoring decodes
    /// against `gallery` when the truth is known.
    pub fn new(hello: Map<String, Value>, gallery: Option<Arc<Gallery>>) -> ConsoleState {
        let truth = gallery.map(|gallery| {
            let thumbs = match &gallery.thumbnails {
                Some((shape, values)) => {
                    let size: usize = shape.iter().product();
                    (0..gallery.items.len())
                        .map(|i| {
                            values
                                .get(i * size..(i + 1) * size)
                                .and_then(|v| crate::decode::image::png(v, shape).ok())
                                .map(|png| png_data_url(&png))
                        })
                        .collect()
                }
                None => vec![None; gallery.items.len()],
            };
            Truth { gallery, thumbs }
        });
        ConsoleState {
            hello,
            truth,
            history: VecDeque::new(),
            latest_status: None,
            quality: BTreeMap::new(),
            dropped: 0,
        }
    }

    fn keep(&mut self, event: Arc<str>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.pop_front();
            self.dropped += 1;
        }
        self.history.push_back(event);
    }

    /// Turns one published message into the page events it gives (none for volumes), and
    /// keeps them in the history. A page event is the topic's header (`crate::topic`), the
    /// decode's with its picture, truth and scores added.
    pub fn process(&mut self, input: &ConsoleInput) -> Vec<Arc<str>> {
        let h = &input.header;
        let fields = || h.as_object().cloned().unwrap_or_default();
        let mut out = Vec::new();
        match input.topic {
            MotionHeader::NAME | RoiHeader::NAME | BetasHeader::NAME | CalibrationHeader::NAME => {
                out.push(self.event(input.topic, fields(), true))
            }
            DecodeHeader::NAME => match topic::read::<DecodeHeader>(input.topic, h) {
                Ok(d) => {
                    let (fields, scores) = self.decode_event(fields(), &d, &input.payloads);
                    out.push(self.event(DecodeHeader::NAME, fields, true));
                    if let (Some(s), false) = (scores, d.trial.at_run_end) {
                        self.quality.entry((d.trial.condition, d.alignment)).or_default().add(&s);
                        out.push(self.event("summary", self.summary(), true));
                    }
                }
                Err(e) => tracing::warn!("console: {e}"),
            },
            PictureHeader::NAME => match topic::read::<PictureHeader>(input.topic, h) {
                Ok(_) => {
                    let mut fields = fields();
                    let png = input
                        .payloads
                        .iter()
                        .find(|p| p.name == "picture_png")
                        .map(|p| png_data_url(&p.bytes));
                    fields.insert("pixels".into(), json!(png));
                    out.push(self.event(PictureHeader::NAME, fields, true));
                }
                Err(e) => tracing::warn!("console: {e}"),
            },
            StatusHeader::NAME => {
                let fields = fields();
                // The history keeps what the latency plot needs; the page's counts come from
                // the latest status, sent after the history.
                let mut compact = Map::new();
                compact.insert("uptime_s".into(), fields.get("uptime_s").cloned().unwrap_or(Value::Null));
                if let Some(e2e) = fields.get("rolling_ms").and_then(|r| r.get("end_to_end")) {
                    compact.insert("rolling_ms".into(), json!({"end_to_end": e2e}));
                }
                self.event(StatusHeader::NAME, compact, true);
                let full = self.event(StatusHeader::NAME, fields, false);
                self.latest_status = Some(full.clone());
                out.push(full);
            }
            _ => {}
        }
        out
    }

    fn event(&mut self, topic: &str, mut fields: Map<String, Value>, keep: bool) -> Arc<str> {
        fields.insert("topic".into(), json!(topic));
        let e = encode(&Value::Object(fields));
        if keep {
            self.keep(e.clone());
        }
        e
    }

    /// The `decode` page event (the header with the reconstruction and thumbnails as data URLs,
    /// the truth and the trial's scores) and the scores, when the truth is known.
    fn decode_event(
        &self,
        mut fields: Map<String, Value>,
        d: &DecodeHeader,
        payloads: &[Payload],
    ) -> (Map<String, Value>, Option<TrialScores>) {
        let png = payloads.iter().find(|p| p.name == "pixels_png").map(|p| png_data_url(&p.bytes));
        fields.insert("pixels".into(), json!(png));
        let top: Vec<(usize, String)> = d.top.iter().map(|m| (m.index, m.id.clone())).collect();
        let Some(truth) = &self.truth else {
            fields.insert("truth".into(), Value::Null);
            return (fields, None);
        };
        let stim = d.trial.stim.map(|s| s.to_string());
        let truth_index = stim.and_then(|s| truth.gallery.items.iter().position(|i| i.id == s));
        let mut thumbs = Map::new();
        for &i in top.iter().map(|(i, _)| i).chain(truth_index.iter()) {
            if let (Some(item), Some(Some(url))) = (truth.gallery.items.get(i), truth.thumbs.get(i)) {
                thumbs.insert(item.id.clone(), json!(url));
            }
        }
        fields.insert("thumbs".into(), Value::Object(thumbs));
        let Some(t) = truth_index else {
            fields.insert("truth".into(), Value::Null);
            return (fields, None);
        };
        let item = &truth.gallery.items[t];
        fields.insert("truth".into(), json!({"id": item.id, "label": item.label}));
        let scores = score_trial(&truth.gallery, t, top.first().map(|(i, _)| *i), payloads);
        fields.insert(
            "scores".into(),
            json!({"top1": scores.top1, "two_way": scores.two_way, "pixcorr": scores.pixcorr, "ssim": scores.ssim}),
        );
        (fields, Some(scores))
    }

    /// Mean scores per (condition, alignment), and seen minus imagery per alignment.
    fn summary(&self) -> Map<String, Value> {
        let row = |m: [Option<f64>; 4]| json!({"top1": m[0], "two_way": m[1], "pixcorr": m[2], "ssim": m[3]});
        let mut conditions = Vec::new();
        for ((condition, alignment), q) in &self.quality {
            let mut r = row(q.means());
            r["condition"] = json!(condition);
            r["alignment"] = json!(alignment);
            r["n"] = json!(q.n);
            conditions.push(r);
        }
        let mut drops = Vec::new();
        let alignments: std::collections::BTreeSet<&String> = self.quality.keys().map(|(_, a)| a).collect();
        for a in alignments {
            let get = |c: &str| self.quality.get(&(c.to_string(), a.clone())).map(QualitySums::means);
            if let (Some(s), Some(i)) = (get("seen"), get("imagery")) {
                let d: Vec<Option<f64>> = s.iter().zip(&i).map(|(s, i)| Some((*s)? - (*i)?)).collect();
                let mut r = row([d[0], d[1], d[2], d[3]]);
                r["alignment"] = json!(a);
                drops.push(r);
            }
        }
        let mut m = Map::new();
        m.insert("conditions".into(), Value::Array(conditions));
        m.insert("seen_minus_imagery".into(), Value::Array(drops));
        m
    }

    /// What a page that connects now is sent first: the hello, the history, the latest status.
    pub fn backlog(&self) -> Vec<Arc<str>> {
        let mut hello = self.hello.clone();
        hello.insert("topic".into(), json!("hello"));
        hello.insert("history_dropped".into(), json!(self.dropped));
        let mut out = Vec::with_capacity(self.history.len() + 2);
        out.push(encode(&Value::Object(hello)));
        out.extend(self.history.iter().cloned());
        out.extend(self.latest_status.iter().cloned());
        out
    }

    /// The event that tells pages the run has ended (and where its report is).
    pub fn end_event(&self, report: Option<&std::path::Path>) -> Arc<str> {
        encode(&json!({"topic": "end", "report": report.map(|p| p.display().to_string())}))
    }

    /// The page with the whole run embedded: a report that opens offline in any browser.
    pub fn report_html(&self, page: &str, report: Option<&std::path::Path>) -> String {
        let mut events = self.backlog();
        let mut hello: Value = serde_json::from_str(&events[0]).unwrap_or_else(|_| json!({}));
        hello["report"] = json!(true);
        events[0] = encode(&hello);
        events.push(self.end_event(report));
        let mut script = String::from("<script>window.MIRAGE_REPLAY = [");
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                script.push_str(",\n");
            }
            // JSON never has "</" outside strings; inside them "<\/" reads back the same.
            script.push_str(&e.replace("</", "<\\/"));
        }
        script.push_str("];</script>");
        page.replacen(REPLAY_MARKER, &script, 1)
    }
}

/// Scores one decode against gallery item `truth`: top-1 from the best match, 2-way on the
/// first of the image/retrieval heads the gallery and the decode both have, PixCorr and SSIM
/// of the pixel head against the truth's thumbnail.
pub fn score_trial(
    gallery: &Gallery,
    truth: usize,
    best: Option<usize>,
    payloads: &[Payload],
) -> TrialScores {
    let mut s = TrialScores { top1: best.map(|b| b == truth), ..TrialScores::default() };
    for head in ["image", "retrieval"] {
        let (Some((size, emb)), Some((_, pred))) =
            (gallery.embeddings.get(head), payload_f32(payloads, head))
        else {
            continue;
        };
        let n = gallery.items.len();
        if pred.len() != *size || n < 2 || emb.len() != n * size {
            continue;
        }
        let row = |i: usize| &emb[i * size..(i + 1) * size];
        let own = pearson(&pred, row(truth));
        let beaten = (0..n).filter(|&j| j != truth && own > pearson(&pred, row(j))).count();
        s.two_way = Some(beaten as f64 / (n - 1) as f64);
        break;
    }
    if let (Some((shape, thumbs)), Some((pshape, pred))) =
        (&gallery.thumbnails, payload_f32(payloads, "pixels"))
    {
        let size: usize = shape.iter().product();
        let hw = |s: &[usize]| match s {
            [.., h, w] => Some((*h, *w)),
            _ => None,
        };
        if let (Some((h, w)), Some(truth_px)) = (hw(&pshape), thumbs.get(truth * size..(truth + 1) * size)) {
            if pred.len() == h * w && size == h * w {
                s.pixcorr = Some(pearson(&pred, truth_px));
                s.ssim = Some(ssim(&pred, truth_px, h, w));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::gallery::Item;

    fn gallery() -> Gallery {
        let n = 4;
        let items = (0..n).map(|i| Item { id: i.to_string(), label: format!("stimulus {i}") }).collect();
        let image: Vec<f32> = (0..n * 8).map(|k| ((k * 37 % 11) as f32).sin()).collect();
        let pictures: Vec<f32> = (0..n * 256).map(|k| ((k * 13 % 7) as f32) / 7.0).collect();
        let mut embeddings = BTreeMap::new();
        embeddings.insert("image".to_string(), (8, image));
        Gallery { items, embeddings, thumbnails: Some((vec![1, 16, 16], pictures)) }
    }

    fn decode_input(g: &Gallery, stim: usize, best: usize, condition: &str) -> ConsoleInput {
        let image = g.embeddings["image"].1[stim * 8..(stim + 1) * 8].to_vec();
        let pixels = g.thumbnails.as_ref().unwrap().1[stim * 256..(stim + 1) * 256].to_vec();
        ConsoleInput {
            topic: "decode",
            header: serde_json::to_value(DecodeHeader::sample(
                crate::topic::TrialHeader::sample(1, stim as u64, condition),
                best,
                0.9,
            ))
            .unwrap(),
            payloads: vec![
                Payload::f32("image", vec![8], "C", &image),
                Payload::f32("pixels", vec![1, 16, 16], "C", &pixels),
                Payload {
                    name: "pixels_png".into(),
                    dtype: "uint8",
                    shape: vec![3],
                    order: "C",
                    bytes: vec![1, 2, 3],
                },
            ],
        }
    }

    #[test]
    fn a_picture_that_follows_its_decode_becomes_a_page_event_with_its_png() {
        let mut c = ConsoleState::new(Map::new(), None);
        let header = crate::topic::PictureHeader {
            trial: crate::topic::TrialHeader::sample(1, 2, "seen"),
            device: "cpu".into(),
            latency_ms: 900.0,
            over_budget: true,
            closed_time: Some(1.0),
        };
        let png = Payload {
            name: "picture_png".into(),
            dtype: "uint8",
            shape: vec![3],
            order: "C",
            bytes: vec![1, 2, 3],
        };
        let out = c.process(&ConsoleInput {
            topic: "picture",
            header: serde_json::to_value(&header).unwrap(),
            payloads: vec![png],
        });
        let ev: Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!((ev["topic"].as_str(), ev["trial"].as_u64()), (Some("picture"), Some(1)));
        assert_eq!(ev["pixels"], json!(png_data_url(&[1, 2, 3])));
        assert_eq!(ev["latency_ms"], 900.0);
    }

    #[test]
    fn a_perfect_decode_scores_one_and_a_wrong_match_zero_top1() {
        let g = gallery();
        let mut c = ConsoleState::new(Map::new(), Some(Arc::new(g.clone())));
        let out = c.process(&decode_input(&g, 2, 2, "seen"));
        let ev: Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(ev["topic"], "decode");
        assert_eq!(ev["scores"]["top1"], true);
        assert_eq!(ev["scores"]["two_way"], 1.0);
        assert!((ev["scores"]["pixcorr"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert!((ev["scores"]["ssim"].as_f64().unwrap() - 1.0).abs() < 1e-6);
        assert_eq!(ev["truth"]["id"], "2");
        assert_eq!(ev["pixels"], png_data_url(&[1, 2, 3]));
        assert!(ev["thumbs"]["2"].as_str().unwrap().starts_with("data:image/png;base64,"));
        c.process(&decode_input(&g, 1, 3, "imagery"));
        let summary: Value = serde_json::from_str(c.backlog().last().unwrap()).unwrap();
        assert_eq!(summary["topic"], "summary");
        let rows = summary["conditions"].as_array().unwrap();
        let top1 =
            |cond: &str| rows.iter().find(|r| r["condition"] == cond).unwrap()["top1"].as_f64().unwrap();
        assert_eq!((top1("seen"), top1("imagery")), (1.0, 0.0));
        assert_eq!(summary["seen_minus_imagery"][0]["top1"], 1.0);
    }

    #[test]
    fn two_way_counts_the_items_the_truth_beats() {
        let g = gallery();
        let size = 8;
        let emb = &g.embeddings["image"].1;
        let pred: Vec<f32> =
            emb[..size].iter().zip(&emb[size..2 * size]).map(|(a, b)| 0.5 * a + 0.6 * b).collect();
        let expect = (0..4)
            .filter(|&j| {
                j != 0 && pearson(&pred, &emb[..size]) > pearson(&pred, &emb[j * size..(j + 1) * size])
            })
            .count() as f64
            / 3.0;
        let s = score_trial(&g, 0, Some(1), &[Payload::f32("image", vec![8], "C", &pred)]);
        assert_eq!(s.two_way, Some(expect));
        assert_eq!(s.top1, Some(false));
        assert_eq!(s.pixcorr, None);
    }

    #[test]
    fn a_late_page_gets_hello_history_and_the_latest_full_status() {
        let mut c = ConsoleState::new(Map::new(), None);
        c.process(&ConsoleInput {
            topic: "motion",
            header: json!({"index": 0, "framewise_displacement": 0.0}),
            payloads: vec![],
        });
        c.process(&ConsoleInput { topic: "volume", header: json!({"index": 0}), payloads: vec![] });
        for n in 0..3 {
            let header = json!({"received": n, "uptime_s": n, "rolling_ms": {"end_to_end": {"p50": 1.0}}});
            c.process(&ConsoleInput { topic: "status", header, payloads: vec![] });
        }
        let topics: Vec<Value> = c.backlog().iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        let names: Vec<&str> = topics.iter().map(|e| e["topic"].as_str().unwrap()).collect();
        assert_eq!(names, ["hello", "motion", "status", "status", "status", "status"]);
        assert!(topics[2].get("received").is_none(), "the history's statuses are compact");
        assert_eq!(topics[5]["received"], 2);
    }

    #[test]
    fn the_report_embeds_the_run_and_cannot_close_its_script_early() {
        let mut c = ConsoleState::new(Map::new(), None);
        c.process(&ConsoleInput {
            topic: "calibration",
            header: json!({"phase": "failed", "error": "</script><b>"}),
            payloads: vec![],
        });
        let html = c.report_html("<head><!--MIRAGE_REPLAY--></head>", None);
        assert_eq!(html.matches("</script>").count(), 1, "{html}");
        let json = html
            .trim_start_matches("<head><script>window.MIRAGE_REPLAY = ")
            .trim_end_matches(";</script></head>");
        let events: Vec<Value> = serde_json::from_str(json).unwrap();
        assert_eq!(events[0]["report"], true);
        assert_eq!(events[1]["error"], "</script><b>");
        assert_eq!(events.last().unwrap()["topic"], "end");
    }
}
