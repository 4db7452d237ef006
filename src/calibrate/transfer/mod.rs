//! The default calibration fit: closed form, cross-validated over stimuli, and guarded.
//!
//! Three components sit between imagery betas and the heads, each fitted in closed form:
//!
//! 1. the input normalisation (`calibrate.inputs`; the first, per-run z-scoring by default, is
//!    the baseline), composed with the live run's own statistics;
//! 2. removal of the `k` largest voxel modes of the calibration trials' betas
//!    (`calibrate.modes`; unsupervised: no labels);
//! 3. per head, identity plus a ridge-penalised linear map from the decoder's predictions to
//!    the calibration targets, in kernel form over the calibration trials' Gram matrix (so a
//!    263,168-output head costs no more than a small one), in the latent space of a low-rank
//!    head (metric `AᵀA` of its output map) and in the output space (around the training
//!    target mean) of a full head; the penalty is chosen from `calibrate.alphas`.
//!
//! Every choice is scored by 2-way identification cross-validated over *pairs of stimuli*:
//! both stimuli's trials are left out of everything fitted — the run's mean, the modes, the
//! correction — and each is told apart from the other (cosine with its own target against the
//! other's), so the two are exchangeable and nothing fitted has seen either. Choices made
//! inside (the penalty, the input candidate) are nested: made without the pair. A component's
//! mean gain in identification margin over the pairs, with its standard error (the larger of
//! the jackknife over stimuli and the corrected resampled estimate), enters a one-sided t-test
//! at `calibrate.guard_p` (the input candidate, the best of several, at `guard_p` over their
//! number); a component is kept only where it passes,
//! otherwise the baseline stays. The report gives those held-out estimates, never a score on
//! the trials a choice was fitted on.
//!
//! All of it works on Gram matrices: the run's normalised betas (`N × N`) and, per head, the
//! predictions of every run trial, of the zero input and every stimulus's target (`q × q`).

mod blocks;
mod choose;
mod folds;
mod guard;
mod linalg;
mod materialise;
mod pipeline;
mod report;
mod space;

pub use report::{Estimate, HeadReport, InputReport, TransferReport, TwoWayReport};

use super::{CalibrateConfig, CalibrateError, CalibrationSet, Progress};
use crate::decode::align::{Alignment, InputNorm};
use crate::decode::model::Decoder;
use choose::choose;
use folds::Folds;
use space::{head_side, HeadSide, RunSide};

/// Everything one fit needs, computed once.
struct Problem<'a> {
    decoder: &'a Decoder,
    cfg: &'a CalibrateConfig,
    folds: Folds,
    run: RunSide,
    heads: Vec<HeadSide>,
}

/// Fits the default (closed-form, guarded) alignment for `decoder` on `set`; `progress` hears
/// each stage.
pub fn fit(
    decoder: &Decoder,
    set: &CalibrationSet,
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Alignment, TransferReport), CalibrateError> {
    let start = std::time::Instant::now();
    let v = decoder.cfg.n_voxels;
    let n = set.len();
    set.check(decoder, cfg.min_trials)?;
    let n_other = set.others.len() / v;
    let n_run = n + n_other;

    let folds = Folds::of_stimuli(n, &set.stimuli);
    let n_stim = folds.n_stim;
    let run = RunSide::new(decoder, set, cfg, n_run)?;

    // Each head with targets: its alignment space and Gram matrix.
    let mut heads = Vec::new();
    let named: Vec<(usize, &Vec<f32>)> = decoder
        .heads
        .iter()
        .enumerate()
        .filter_map(|(i, h)| set.targets.get(&h.cfg.name).map(|t| (i, t)))
        .filter(|(i, _)| cfg.head_weights.get(&decoder.heads[*i].cfg.name).copied().unwrap_or(1.0) > 0.0)
        // The closed form's folds are affine in the input; an L2-normalised head keeps its baseline.
        .filter(|(i, _)| decoder.heads[*i].cfg.input.is_affine())
        .collect();
    if named.is_empty() {
        return Err(CalibrateError::Input(
            "no head has targets (and a non-zero weight, and an input affine in the betas: not l2)".into(),
        ));
    }
    let too_few = n_stim < cfg.min_stimuli;
    if !too_few {
        for (step, (i, targets)) in named.iter().enumerate() {
            progress(&Progress::stage("prepare", step + 1, named.len()));
            heads.push(head_side(decoder, *i, targets, &folds, &run, cfg)?);
        }
    }
    let mut problem = Problem { decoder, cfg, folds, run, heads };
    let (input_choice, input_report, heads_report, two_way, adjusts, modes) = if too_few {
        // Nothing is tested: the baseline, with every head left as it is.
        let untested = named
            .iter()
            .map(|(i, _)| HeadReport {
                head: decoder.heads[*i].cfg.name.clone(),
                space: if decoder.heads[*i].rank().is_some() { "latent" } else { "output" },
                kept: false,
                alpha: None,
                margin_gain: Estimate::default(),
                two_way_gain: Estimate::default(),
            })
            .collect();
        (0, None, untested, None, vec![None; decoder.heads.len()], None)
    } else {
        choose(&problem, progress)?
    };
    // With nothing tested, the run is z-scored as MIRAGE's zero-shot baseline does: no choice
    // of ours (not even centring alone) is applied without evidence for it.
    let input = if too_few { InputNorm::ZscoreRun } else { cfg.inputs[input_choice] };
    let note = too_few.then(|| {
        format!(
            "{n_stim} stimuli: at least {} (calibrate.min_stimuli) are needed to test a correction; \
             nothing is fitted and the run is z-scored ({}), MIRAGE's zero-shot baseline",
            cfg.min_stimuli,
            input.name()
        )
    });
    let report = TransferReport {
        method: "closed-form",
        n_trials: n,
        n_stimuli: n_stim,
        n_run_trials: n_run,
        guard_p: cfg.guard_p,
        input: input_report,
        heads: heads_report,
        two_way,
        note,
        seconds: start.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_value(&report).unwrap_or_default();
    let stats = std::mem::take(&mut problem.run.stats);
    let condition = set.condition.clone();
    let alignment = Alignment::new(decoder, input, stats, modes, adjusts, condition, json)?;
    Ok((alignment, report))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use serde_json::Value;

    use super::*;
    use crate::decode::align::Adapter;
    use crate::decode::metrics::two_way;
    use crate::decode::train::{train, Targets, TrainOptions};
    use crate::rng::Rng;

    const V: usize = 300;
    const D: usize = 8;

    /// A participant at the level of betas: latent stimuli, a linear encoding, two heads
    /// linear in the latent, and an imagery condition (`rotate`: a rotation of the whole
    /// latent space; else only weaker signal and more noise).
    struct World {
        stimuli: Vec<Vec<f64>>,
        encoding: Vec<f64>,
        heads: Vec<(String, Vec<usize>, Vec<f64>)>,
        rotation: Option<Vec<f64>>,
        rng: Rng,
        held_out: Option<Vec<f32>>,
    }

    impl World {
        fn new(seed: u64, rotate: bool) -> World {
            let mut rng = Rng::new(seed, 40);
            let stimuli = (0..80).map(|_| (0..D).map(|_| rng.normal()).collect()).collect();
            let encoding = (0..V * D).map(|_| rng.normal() * (0.3 / D as f64).sqrt()).collect();
            let heads = [("image", vec![24]), ("text", vec![3, 8])]
                .into_iter()
                .map(|(n, shape)| {
                    let out: usize = shape.iter().product();
                    (n.to_string(), shape, (0..D * out).map(|_| rng.normal() / (D as f64).sqrt()).collect())
                })
                .collect();
            // A random rotation: Gram–Schmidt of a Gaussian matrix.
            let rotation = rotate.then(|| {
                let mut q: Vec<Vec<f64>> = (0..D).map(|_| (0..D).map(|_| rng.normal()).collect()).collect();
                for i in 0..D {
                    for j in 0..i {
                        let d: f64 = (0..D).map(|k| q[i][k] * q[j][k]).sum();
                        for k in 0..D {
                            q[i][k] -= d * q[j][k];
                        }
                    }
                    let n = q[i].iter().map(|x| x * x).sum::<f64>().sqrt();
                    q[i].iter_mut().for_each(|x| *x /= n);
                }
                q.concat()
            });
            World { stimuli, encoding, heads, rotation, rng, held_out: None }
        }

        fn betas(&mut self, stims: &[usize], imagery: bool) -> Vec<f32> {
            let mut out = Vec::new();
            for &s in stims {
                let mut l = self.stimuli[s].clone();
                if let (true, Some(r)) = (imagery, &self.rotation) {
                    l = (0..D).map(|i| (0..D).map(|k| r[i * D + k] * self.stimuli[s][k]).sum()).collect();
                }
                let (scale, noise, offset) = if imagery { (0.6, 1.4, 2.0) } else { (1.0, 1.0, 0.0) };
                for v in 0..V {
                    let signal: f64 = (0..D).map(|k| self.encoding[v * D + k] * l[k]).sum();
                    out.push((offset + scale * signal + noise * self.rng.normal()) as f32);
                }
            }
            out
        }

        fn targets(&self, stims: &[usize], head: usize) -> Vec<f32> {
            let (_, shape, w) = &self.heads[head];
            let out: usize = shape.iter().product();
            stims
                .iter()
                .flat_map(|&s| {
                    (0..out)
                        .map(move |o| (0..D).map(|k| self.stimuli[s][k] * w[k * out + o]).sum::<f64>() as f32)
                })
                .collect()
        }

        /// A decoder trained on 48 stimuli seen three times (low-rank heads with `rank`).
        fn decoder(&mut self, rank: Option<usize>) -> Decoder {
            self.decoder_with(rank, BTreeMap::new())
        }

        /// [`World::decoder`] with heads reading their own inputs.
        fn decoder_with(
            &mut self,
            rank: Option<usize>,
            head_inputs: BTreeMap<String, crate::decode::model::HeadInput>,
        ) -> Decoder {
            let stims: Vec<usize> = (0..48).flat_map(|s| [s, s, s]).collect();
            let x = self.betas(&stims, false);
            let targets: Vec<Targets> = (0..self.heads.len())
                .map(|h| Targets {
                    name: self.heads[h].0.clone(),
                    shape: self.heads[h].1.clone(),
                    values: self.targets(&stims, h),
                })
                .collect();
            let opts = TrainOptions { alpha: 300.0, rank, head_inputs, ..TrainOptions::default() };
            let trained = train(&x, stims.len(), V, &targets, &opts).unwrap();
            let (cfg, tensors) = trained.into_model(Default::default(), serde_json::Value::Null);
            let dev = Device::Cpu;
            let map: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|t| (t.name, Tensor::from_vec(t.values, t.shape, &dev).unwrap()))
                .collect();
            Decoder::new(cfg, &VarBuilder::from_tensors(map, DType::F32, &dev), &dev).unwrap()
        }

        /// Twelve calibration trials of stimuli 48–59.
        fn calibration(&mut self) -> CalibrationSet {
            let stims: Vec<usize> = (48..60).collect();
            CalibrationSet {
                betas: self.betas(&stims, true),
                stimuli: stims.iter().map(|s| s.to_string()).collect(),
                targets: (0..self.heads.len())
                    .map(|h| (self.heads[h].0.clone(), self.targets(&stims, h)))
                    .collect(),
                others: Vec::new(),
                condition: None,
            }
        }

        /// Mean over heads of the 2-way identification of imagery trials of stimuli 60–79
        /// (twice each; the same trials at every call), decoded through `adapter` with the
        /// run's own statistics.
        fn held_out_two_way(&mut self, decoder: &Decoder, adapter: &Adapter) -> f64 {
            let stims: Vec<usize> = (60..80).flat_map(|s| [s, s]).collect();
            if self.held_out.is_none() {
                self.held_out = Some(self.betas(&stims, true));
            }
            let x = self.held_out.clone().unwrap_or_default();
            let mut stats = crate::decode::align::RunStats::default();
            x.chunks_exact(V).for_each(|r| stats.push("eval", r));
            let (m, s) = stats.get().unwrap();
            let z =
                adapter.normalise(decoder, &decoder.input(&x, stims.len()).unwrap(), Some((&m, &s))).unwrap();
            let preds = decoder.predict_normalised(&z, adapter.adjusts()).unwrap();
            let mut total = 0.0;
            for (h, p) in preds.iter().enumerate() {
                let out = p.len() / stims.len();
                let rows = |v: &[f32]| v.chunks_exact(out).map(<[f32]>::to_vec).collect::<Vec<_>>();
                total += two_way(&rows(p), &rows(&self.targets(&stims, h)));
            }
            total / preds.len() as f64
        }
    }

    /// The baseline: centring on the run's mean only (an alignment with nothing kept).
    fn centred(decoder: &Decoder) -> Adapter {
        let n = decoder.cfg.n_voxels;
        let run = (vec![0.0; n], vec![1.0; n]);
        let nothing = vec![None; decoder.heads.len()];
        Adapter::Calibrated(
            Alignment::new(decoder, InputNorm::CentreRun, run, None, nothing, None, Value::Null).unwrap(),
        )
    }

    fn fit_world(
        seed: u64,
        rotate: bool,
        rank: Option<usize>,
    ) -> (World, Decoder, Alignment, TransferReport) {
        let mut w = World::new(seed, rotate);
        let decoder = w.decoder(rank);
        let set = w.calibration();
        let (a, r) = fit(&decoder, &set, &CalibrateConfig::default(), &mut |_| {}).unwrap();
        (w, decoder, a, r)
    }

    #[test]
    fn a_rotation_of_the_latent_space_is_learnt_from_twelve_trials() {
        for rank in [None, Some(4)] {
            let (mut w, decoder, alignment, report) = fit_world(3, true, rank);
            assert!(report.heads.iter().all(|h| h.kept), "{report:?}");
            let space = if rank.is_some() { "latent" } else { "output" };
            assert!(report.heads.iter().all(|h| h.space == space));
            let baseline = w.held_out_two_way(&decoder, &Adapter::ZscoreRun);
            let aligned = w.held_out_two_way(&decoder, &Adapter::Calibrated(alignment));
            eprintln!("rank {rank:?}: per-run z-scoring {baseline:.3}, calibrated {aligned:.3}");
            assert!(aligned > baseline + 0.1, "rank {rank:?}: {baseline:.3} → {aligned:.3}");
            // The report's estimate is held out: it says there is a gain, with its uncertainty.
            let est = report.two_way.as_ref().unwrap();
            assert!(est.gain.mean > 0.0 && est.gain.se > 0.0 && est.gain.n == 12);
        }
    }

    #[test]
    fn a_head_reading_l2_normalised_betas_keeps_its_baseline() {
        use crate::decode::model::HeadInput;
        let mut w = World::new(3, true);
        let names: Vec<String> = w.heads.iter().map(|h| h.0.clone()).collect();
        // The closed form's folds are affine in the betas, an L2-normalised head is not.
        let first = BTreeMap::from([(names[0].clone(), HeadInput::L2)]);
        let decoder = w.decoder_with(None, first);
        let (alignment, report) =
            fit(&decoder, &w.calibration(), &CalibrateConfig::default(), &mut |_| {}).unwrap();
        assert!(report.heads.iter().all(|h| h.head != names[0]) && !report.heads.is_empty(), "{report:?}");
        assert!(alignment.adjusts[0].is_none());
        let all = names.iter().map(|n| (n.clone(), HeadInput::L2)).collect();
        let decoder = w.decoder_with(None, all);
        let refused = fit(&decoder, &w.calibration(), &CalibrateConfig::default(), &mut |_| {});
        assert!(matches!(refused, Err(CalibrateError::Input(m)) if m.contains("l2")));
    }

    #[test]
    fn the_guard_keeps_the_baseline_when_nothing_is_learnable() {
        for seed in 1..=3 {
            let (mut w, decoder, alignment, report) = fit_world(seed, false, None);
            assert!(report.heads.iter().all(|h| !h.kept), "seed {seed}: {report:?}");
            assert!(alignment.adjusts.iter().all(Option::is_none));
            let input = report.input.as_ref().unwrap();
            // Seven candidates besides the baseline (two inputs × modes 0, 1, 2, 4).
            assert!((input.level - CalibrateConfig::default().guard_p / 7.0).abs() < 1e-12, "{input:?}");
            let baseline = w.held_out_two_way(&decoder, &centred(&decoder));
            let calibrated = w.held_out_two_way(&decoder, &Adapter::Calibrated(alignment));
            if !input.kept {
                assert_eq!((input.input, input.modes), (InputNorm::CentreRun, 0));
                assert!(
                    (calibrated - baseline).abs() < 1e-9,
                    "seed {seed}: {baseline} vs {calibrated}: {input:?}"
                );
            }
            assert!(calibrated > baseline - 0.015, "seed {seed}: {baseline:.3} → {calibrated:.3}");
        }
    }

    #[test]
    fn too_few_stimuli_zscore_the_run_and_say_why() {
        let mut w = World::new(5, true);
        let decoder = w.decoder(None);
        let mut set = w.calibration();
        // Eight: where the held-out estimate stopped being trustworthy (BENCHMARKS.md).
        let keep = 8;
        set.betas.truncate(keep * V);
        set.stimuli.truncate(keep);
        for (h, t) in set.targets.iter_mut() {
            let out = decoder.heads.iter().find(|x| &x.cfg.name == h).unwrap().cfg.n_outputs();
            t.truncate(keep * out);
        }
        let (a, r) = fit(&decoder, &set, &CalibrateConfig::default(), &mut |_| {}).unwrap();
        assert!(r.note.as_deref().unwrap_or("").contains("8 stimuli: at least 10"), "{r:?}");
        assert!(
            a.adjusts.iter().all(Option::is_none) && a.input == InputNorm::ZscoreRun && a.modes.is_none()
        );
    }

    #[test]
    fn the_fit_is_deterministic_and_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut fitted = Vec::new();
        for k in 0..2 {
            let (_, decoder, alignment, mut report) = fit_world(3, true, Some(4));
            let path = dir.path().join(format!("a{k}.safetensors"));
            alignment.save(&path, &decoder).unwrap();
            let back = Alignment::load(&path, &decoder).unwrap();
            // Everything but the wall time is the same from one fit to the next.
            report.seconds = 0.0;
            let tensors: Vec<Vec<f32>> = back
                .adjusts
                .iter()
                .flatten()
                .flat_map(|a| {
                    let (l, s, r) = a.factors().unwrap();
                    [l, s, r].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                })
                .collect();
            fitted.push((format!("{report:?}"), tensors));
            let z = Tensor::ones((2, V), DType::F32, &Device::Cpu).unwrap();
            let (a, b) = (
                decoder.predict_normalised(&z, &alignment.adjusts).unwrap(),
                decoder.predict_normalised(&z, &back.adjusts).unwrap(),
            );
            assert!(a == b, "the loaded alignment decodes as the fitted one");
        }
        assert!(fitted[0] == fitted[1], "two fits differ");
        assert!(!fitted[0].1.is_empty(), "nothing was fitted");
    }
}
