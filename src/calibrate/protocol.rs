//! Calibration protocols: which stimuli are cued for imagery, how often, and when.
//!
//! ```toml
//! stimuli = ["0", "1", "2", "3", "4", "5"]   # gallery ids of the cued stimuli
//! repeats = 2                                # cues per stimulus
//! order = "shuffled"                         # or "blocked" (all repeats of one stimulus together)
//! seed = 1                                   # of the shuffle
//! lead_in_s = 4.0                            # first cue onset after the run's first volume
//! cue_s = 4.0                                # imagery period
//! interval_s = 10.0                          # onset to onset
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CalibrateError;
use crate::rng::Rng;

/// Order of the cues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CueOrder {
    /// Every round of stimuli shuffled (seeded).
    Shuffled,
    /// The stimuli in the listed order, each repeated `repeats` times in a row.
    Blocked,
}

/// A calibration protocol (`calibration/*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// Gallery ids of the cued stimuli.
    pub stimuli: Vec<String>,
    /// Cues per stimulus.
    pub repeats: usize,
    /// Order of the cues.
    #[serde(default = "shuffled")]
    pub order: CueOrder,
    /// Seed of the shuffle.
    #[serde(default)]
    pub seed: u64,
    /// First onset, s after the run's first volume.
    #[serde(default = "lead_in")]
    pub lead_in_s: f64,
    /// Imagery period, s.
    pub cue_s: f64,
    /// Onset to onset, s.
    pub interval_s: f64,
}

fn shuffled() -> CueOrder {
    CueOrder::Shuffled
}

fn lead_in() -> f64 {
    4.0
}

/// One cue of the schedule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cue {
    /// Onset, s after the run's first volume.
    pub onset: f64,
    /// Duration, s.
    pub duration: f64,
    /// Gallery id of the stimulus.
    pub stim: String,
}

impl Protocol {
    /// Reads and checks a protocol file.
    pub fn load(path: &Path) -> Result<Protocol, CalibrateError> {
        let err = |m: String| CalibrateError::Protocol(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let p: Protocol = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let problems = p.validate();
        if !problems.is_empty() {
            return Err(err(problems.join("; ")));
        }
        Ok(p)
    }

    /// Every problem with the protocol.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.stimuli.is_empty() {
            e.push("stimuli is empty".to_string());
        }
        let mut seen = self.stimuli.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.stimuli.len() {
            e.push("stimuli lists an id twice (use repeats)".into());
        }
        if self.repeats == 0 || self.repeats > 1000 {
            e.push("repeats must be 1..1000".into());
        }
        if !(self.cue_s.is_finite() && self.cue_s > 0.0) {
            e.push("cue_s must be positive".into());
        }
        if !(self.interval_s.is_finite() && self.interval_s >= self.cue_s) {
            e.push("interval_s must be at least cue_s".into());
        }
        if !(self.lead_in_s.is_finite() && self.lead_in_s >= 0.0) {
            e.push("lead_in_s must be >= 0".into());
        }
        e
    }

    /// Number of cued trials.
    pub fn n_trials(&self) -> usize {
        self.stimuli.len() * self.repeats
    }

    /// The cue schedule.
    pub fn schedule(&self) -> Vec<Cue> {
        let order: Vec<&String> = match self.order {
            CueOrder::Blocked => {
                self.stimuli.iter().flat_map(|s| std::iter::repeat_n(s, self.repeats)).collect()
            }
            CueOrder::Shuffled => {
                let mut rng = Rng::new(self.seed, 21);
                let mut out = Vec::with_capacity(self.n_trials());
                for _ in 0..self.repeats {
                    let mut round: Vec<&String> = self.stimuli.iter().collect();
                    for i in (1..round.len()).rev() {
                        round.swap(i, rng.below(i + 1));
                    }
                    out.extend(round);
                }
                out
            }
        };
        order
            .into_iter()
            .enumerate()
            .map(|(i, s)| Cue {
                onset: ((self.lead_in_s + i as f64 * self.interval_s) * 1e3).round() / 1e3,
                duration: self.cue_s,
                stim: s.clone(),
            })
            .collect()
    }

    /// End of the last cue's response window: when calibration trials can all have closed.
    pub fn duration_s(&self, trial_window_s: f64) -> f64 {
        self.schedule().last().map_or(0.0, |c| c.onset + trial_window_s.max(c.duration))
    }

    /// The schedule as BIDS `events.tsv` (`trial_type` imagery, `stim_id`, `trial_id`).
    pub fn events_tsv(&self) -> String {
        let mut out = String::from("onset\tduration\ttrial_type\tstim_id\ttrial_id\n");
        for (i, c) in self.schedule().iter().enumerate() {
            out.push_str(&format!("{:.3}\t{:.3}\timagery\t{}\t{i}\n", c.onset, c.duration, c.stim));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protocol(order: CueOrder) -> Protocol {
        Protocol {
            stimuli: vec!["3".into(), "1".into(), "2".into()],
            repeats: 2,
            order,
            seed: 4,
            lead_in_s: 4.0,
            cue_s: 4.0,
            interval_s: 10.0,
        }
    }

    #[test]
    fn schedules_cue_every_stimulus_repeats_times() {
        for order in [CueOrder::Shuffled, CueOrder::Blocked] {
            let s = protocol(order).schedule();
            assert_eq!(s.len(), 6);
            for id in ["1", "2", "3"] {
                assert_eq!(s.iter().filter(|c| c.stim == id).count(), 2);
            }
            assert_eq!(s[5].onset, 54.0);
        }
        let blocked: Vec<String> =
            protocol(CueOrder::Blocked).schedule().into_iter().map(|c| c.stim).collect();
        assert_eq!(blocked, ["3", "3", "1", "1", "2", "2"]);
    }

    #[test]
    fn bad_protocols_are_refused_with_every_reason() {
        let mut p = protocol(CueOrder::Shuffled);
        p.stimuli.push("3".into());
        p.repeats = 0;
        p.interval_s = 1.0;
        assert_eq!(p.validate().len(), 3, "{:?}", p.validate());
    }
}
