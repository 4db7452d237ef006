//! The guarded choices: the input candidate and each head's correction, kept only where the
//! held-out test passes, and the parts fitted on every trial.

use candle_core::Tensor;

use super::blocks::{Blocks, Ridge};
use super::folds::fold_weights;
use super::linalg::{argmax, c, to_tensor};
use super::materialise::materialise;
use super::pipeline::{Pipeline, WeightCache};
use super::report::{Estimate, HeadReport, InputReport, TwoWayReport};
use super::Problem;
use crate::calibrate::{CalibrateError, Progress};
use crate::decode::model::HeadAdjust;

pub(super) type Chosen = (
    usize,
    Option<InputReport>,
    Vec<HeadReport>,
    Option<TwoWayReport>,
    Vec<Option<HeadAdjust>>,
    Option<Tensor>,
);

/// The guarded choices: the input candidate (normalisation and modes) whose whole pipeline —
/// each head's guarded correction included — identifies held-out pairs best, kept only if it
/// reliably beats the baseline's pipeline; and the fitted parts.
pub(super) fn choose(p: &Problem, progress: &mut dyn FnMut(&Progress)) -> Result<Chosen, CalibrateError> {
    let cfg = p.cfg;
    let pairs = p.folds.pairs();
    let mut candidates = vec![(0, 0)];
    for input in 0..cfg.inputs.len() {
        for &k in &cfg.modes {
            if !candidates.contains(&(input, k)) && k + 1 < p.folds.n_cal {
                candidates.push((input, k));
            }
        }
    }
    let mut cache = WeightCache::new();
    let mut pipes = Vec::new();
    for (ci, &(input, k)) in candidates.iter().enumerate() {
        progress(&Progress::stage("inputs", ci + 1, candidates.len()));
        pipes.push(p.pipeline(&mut cache, input, k));
    }
    // For each pair, the candidate chosen on the pairs that hold neither of its stimuli.
    let best_without = |held: &[usize]| {
        let score = |pl: &Pipeline| {
            let v: Vec<f64> = pairs
                .iter()
                .zip(&pl.margin)
                .filter(|(q, _)| !q.iter().any(|s| held.contains(s)))
                .map(|(_, m)| *m)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        argmax(&pipes.iter().map(score).collect::<Vec<_>>())
    };
    let nested: Vec<usize> = pairs.iter().map(|pair| best_without(pair)).collect();
    let gain = |f: &dyn Fn(&Pipeline) -> &Vec<f64>| -> Estimate {
        let per_pair: Vec<f64> =
            (0..pairs.len()).map(|i| f(&pipes[nested[i]])[i] - f(&pipes[0])[i]).collect();
        p.folds.estimate(&pairs, &per_pair)
    };
    let (input_margin, input_two_way) = (gain(&|pl| &pl.margin), gain(&|pl| &pl.two_way));
    let best = best_without(&[]);
    // The best of several candidates is tested: Bonferroni over them, or a world with nothing
    // to learn keeps one by chance (and with it corrections its own test would refuse).
    let level = cfg.guard_p / (candidates.len() - 1).max(1) as f64;
    let kept = best != 0 && input_margin.reliable(level);
    let chosen = if kept { best } else { 0 };
    let (input, k) = candidates[chosen];
    let input_report = InputReport {
        baseline: cfg.inputs[0],
        input: cfg.inputs[input],
        modes: k,
        kept,
        best: (cfg.inputs[candidates[best].0], candidates[best].1),
        level,
        margin_gain: input_margin,
        two_way_gain: input_two_way,
    };
    let pipe = &pipes[chosen];
    let head_reports = p
        .heads
        .iter()
        .zip(&pipe.heads)
        .map(|(h, c)| HeadReport {
            head: p.decoder.heads[h.index].cfg.name.clone(),
            space: if h.latent { "latent" } else { "output" },
            kept: c.kept,
            alpha: c.kept.then_some(c.alpha),
            margin_gain: c.margin_gain,
            two_way_gain: c.two_way_gain,
        })
        .collect();

    // The chosen pipeline's held-out 2-way against the baseline's (no correction).
    let plain = p.pipeline_without_corrections(&mut cache);
    let gains: Vec<f64> = (0..pairs.len()).map(|i| pipe.two_way[i] - plain[i]).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let two_way_report = TwoWayReport {
        baseline: mean(&plain),
        calibrated: mean(&pipe.two_way),
        gain: p.folds.estimate(&pairs, &gains),
    };

    let (adjusts, modes) = fitted_parts(p, (input, k), pipe)?;
    Ok((input, Some(input_report), head_reports, Some(two_way_report), adjusts, modes))
}

/// The parts chosen, fitted on every calibration trial: input candidate `(input, k)`'s voxel
/// modes (as rows over voxels; none without modes) and the corrections `pipe` keeps.
fn fitted_parts(
    p: &Problem,
    (input, k): (usize, usize),
    pipe: &Pipeline,
) -> Result<(Vec<Option<HeadAdjust>>, Option<Tensor>), CalibrateError> {
    let cfg = p.cfg;
    let (n_cal, uses_run) = (p.folds.n_cal, cfg.inputs[input].uses_run());
    let (w, mu) = fold_weights(&p.run.gram[input], n_cal, &[], uses_run, k);
    let modes = if mu.nrows() > 0 {
        let zt = &p.run.z[input];
        Some(to_tensor(&mu, zt)?.matmul(zt).map_err(c)?)
    } else {
        None
    };
    let mut adjusts = vec![None; p.decoder.heads.len()];
    let all: Vec<usize> = (0..n_cal).collect();
    for (h, choice) in p.heads.iter().zip(&pipe.heads) {
        if !choice.kept {
            continue;
        }
        let b = Blocks::new(h, input, p.run.n_run, p.folds.n_stim, &w);
        let Some(ridge) = Ridge::fit(&b, &all, choice.alpha) else { continue };
        adjusts[h.index] = Some(materialise(p, h, input, &w, &ridge)?);
    }
    Ok((adjusts, modes))
}
