//! Fitting the domain-alignment head: AdamW (candle-nn) on a loss that pulls each calibration
//! trial's head outputs to its stimulus targets, aligns the moments of the imagery latents
//! with the seen training statistics stored in the model (CORAL-style), and penalises the
//! distance from identity.
//!
//! Early stopping by cross-validation over *stimuli*: the stimuli are dealt into folds
//! (seeded); each fold is fitted on the others with early stopping; the step with the lowest
//! mean held-out loss is chosen, and the head is refitted on every trial for that many steps. A step whose loss is not finite or explodes rolls the head back to the last good
//! parameters and halves the learning rate, so the result never holds NaN.

use candle_core::{Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::Serialize;

use super::{CalibrateConfig, CalibrateError, CalibrationSet, HeadLoss, Progress};
use crate::decode::align::head::{apply, AlignmentHead};
use crate::decode::metrics::two_way;
use crate::decode::model::Decoder;
use crate::rng::Rng;

/// What a fit produced and how it went.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FitReport {
    /// Calibration trials used.
    pub n_trials: usize,
    /// Folds of stimuli the step count was chosen on (0: no selection, `steps` taken).
    pub folds: usize,
    /// Steps chosen (0: identity was best).
    pub steps: usize,
    /// Training loss at identity and at the end, on every trial.
    pub loss_identity: f64,
    /// Training loss of the final head on every trial.
    pub loss_final: f64,
    /// Held-out loss (mean over folds) at identity and at the chosen step.
    pub heldout_loss: Option<(f64, f64)>,
    /// Cross-validated 2-way identification (the moment-aligned head; each trial predicted by
    /// the fold that held its stimulus out) at identity and at the chosen step.
    pub heldout_two_way: Option<(f64, f64)>,
    /// Divergences caught and rolled back.
    pub rollbacks: usize,
    /// Wall time of the fit, s.
    pub seconds: f64,
}

/// Parameters of the head being fitted.
struct Params {
    gain: Var,
    offset: Var,
    u: Var,
    v: Var,
}

impl Params {
    fn from_head(h: &AlignmentHead) -> candle_core::Result<Params> {
        Ok(Params {
            gain: Var::from_tensor(&h.gain)?,
            offset: Var::from_tensor(&h.offset)?,
            u: Var::from_tensor(&h.u)?,
            v: Var::from_tensor(&h.v)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.gain.clone(), self.offset.clone(), self.u.clone(), self.v.clone()]
    }

    fn snapshot(&self) -> candle_core::Result<[Tensor; 4]> {
        Ok([self.gain.copy()?, self.offset.copy()?, self.u.copy()?, self.v.copy()?])
    }

    fn restore(&self, s: &[Tensor; 4]) -> candle_core::Result<()> {
        self.gain.set(&s[0])?;
        self.offset.set(&s[1])?;
        self.u.set(&s[2])?;
        self.v.set(&s[3])
    }

    fn finite(&self) -> candle_core::Result<bool> {
        for t in [&self.gain, &self.offset, &self.u, &self.v] {
            let s = t.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One cross-validation fold: its held-out trials, their loss after every step and the
/// scored head's predictions for them after every step.
struct FoldCurve {
    held: Vec<u32>,
    loss: Vec<f64>,
    predictions: Vec<Vec<Vec<f32>>>,
}

/// One head's part of the target loss.
struct Term {
    head: usize,
    weight: f64,
    loss: HeadLoss,
    targets: Tensor,
    target_norms: Tensor,
    target_var: f64,
}

/// The loss over a subset of trials, with everything that does not change precomputed.
struct Objective<'a> {
    decoder: &'a Decoder,
    z: Tensor,
    terms: Vec<Term>,
    coral: Vec<usize>,
    cfg: &'a CalibrateConfig,
    n_voxels: f64,
}

impl Objective<'_> {
    fn head_outputs(&self, y: &Tensor, head: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let h = &self.decoder.heads[head];
        let raw = h.forward(y)?;
        let out = h.renormalise(&raw, None)?;
        Ok((raw, out))
    }

    /// Target loss (and the scored head's outputs) of trials `idx` through `p`.
    fn target_loss(&self, p: &Params, idx: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.z.index_select(idx, 0)?;
        let y = apply(&z, &p.gain, &p.offset, &p.u, &p.v)?;
        let mut total = Tensor::zeros((), candle_core::DType::F32, z.device())?;
        for t in &self.terms {
            let (_, out) = self.head_outputs(&y, t.head)?;
            let target = t.targets.index_select(idx, 0)?;
            let l = match t.loss {
                HeadLoss::Cosine => {
                    let dot = (&out * &target)?.sum(D::Minus1)?;
                    let norms =
                        (out.sqr()?.sum(D::Minus1)?.sqrt()? * t.target_norms.index_select(idx, 0)?)?;
                    (1.0 - dot.broadcast_div(&(norms + 1e-8)?)?.mean_all()?)?
                }
                HeadLoss::Mse => ((&out - &target)?.sqr()?.mean_all()? / t.target_var)?,
            };
            total = (total + (l * t.weight)?)?;
        }
        let mut coral = Tensor::zeros((), candle_core::DType::F32, z.device())?;
        if self.cfg.coral_weight > 0.0 && z.dim(0)? >= 2 {
            for &hi in &self.coral {
                let h = &self.decoder.heads[hi];
                let raw = h.forward(&y)?;
                let s = match h.pred_stats() {
                    Some((m, sd)) => raw.broadcast_sub(m)?.broadcast_div(sd)?,
                    None => raw,
                };
                let mean = s.mean_keepdim(0)?;
                let c = s.broadcast_sub(&mean)?;
                let b = (s.dim(0)? - 1) as f64;
                let mean_term = mean.sqr()?.mean_all()?;
                let cov_term = match h.pred_corr() {
                    Some(r) => {
                        let cov = (c.t()?.matmul(&c)? / b)?;
                        (cov - r)?.sqr()?.mean_all()?
                    }
                    None => ((c.sqr()?.sum(0)? / b)? - 1.0)?.sqr()?.mean_all()?,
                };
                coral = (coral + (mean_term + cov_term)?)?;
            }
        }
        let ident = (p.gain.as_tensor() - 1.0)?.sqr()?.mean_all()?;
        let off = p.offset.sqr()?.mean_all()?;
        let low = (p.u.t()?.matmul(&p.u)? * p.v.t()?.matmul(&p.v)?)?.sum_all()?;
        let penalty = ((ident + off)? + (low / self.n_voxels)?)?;
        (total + (coral * self.cfg.coral_weight)?)? + (penalty * self.cfg.identity_penalty)?
    }

    /// Outputs of `head` for trials `idx` through `p`, one row per trial.
    fn predictions(&self, p: &Params, idx: &Tensor, head: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let z = self.z.index_select(idx, 0)?;
        let y = apply(&z, &p.gain, &p.offset, &p.u, &p.v)?;
        self.head_outputs(&y, head)?.1.to_vec2::<f32>()
    }
}

fn c(e: candle_core::Error) -> CalibrateError {
    CalibrateError::Compute(e.to_string())
}

/// One loss term per head with targets and a non-zero weight.
fn target_terms(
    decoder: &Decoder,
    set: &CalibrationSet,
    cfg: &CalibrateConfig,
) -> Result<Vec<Term>, CalibrateError> {
    let (n, dev) = (set.len(), &decoder.device);
    let mut terms = Vec::new();
    for (name, values) in &set.targets {
        let Some(hi) = decoder.heads.iter().position(|h| &h.cfg.name == name) else { continue };
        let hc = &decoder.heads[hi].cfg;
        let out = hc.n_outputs();
        let weight = cfg.head_weights.get(name).copied().unwrap_or(1.0);
        if weight == 0.0 {
            continue;
        }
        let loss = cfg.head_losses.get(name).copied().unwrap_or(if hc.shape.len() == 3 {
            HeadLoss::Mse
        } else {
            HeadLoss::Cosine
        });
        let mean = values.iter().map(|x| f64::from(*x)).sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|x| (f64::from(*x) - mean).powi(2)).sum::<f64>() / values.len() as f64;
        let targets = Tensor::from_slice(values, (n, out), dev).map_err(c)?;
        let target_norms = targets.sqr().and_then(|t| t.sum(1)).and_then(|t| t.sqrt()).map_err(c)?;
        terms.push(Term { head: hi, weight, loss, targets, target_norms, target_var: var.max(1e-12) });
    }
    if terms.is_empty() {
        return Err(CalibrateError::Input("no head has targets (and a non-zero weight)".into()));
    }
    Ok(terms)
}

/// The heads whose latents are moment-aligned: those named, else the fusion's image head
/// (else the first).
fn coral_heads(decoder: &Decoder, cfg: &CalibrateConfig) -> Result<Vec<usize>, CalibrateError> {
    let heads: Vec<usize> = if cfg.coral_heads.is_empty() {
        let image = decoder.cfg.fusion.image_head.as_ref();
        vec![decoder.heads.iter().position(|h| Some(&h.cfg.name) == image).unwrap_or(0)]
    } else {
        cfg.coral_heads
            .iter()
            .map(|name| {
                decoder.heads.iter().position(|h| &h.cfg.name == name).ok_or_else(|| {
                    CalibrateError::Input(format!("calibrate.coral_heads: no head {name:?} in the model"))
                })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(heads)
}

/// Held-out loss and 2-way per step (one fold's, pooled): the step count with the lowest mean
/// held-out loss, with the loss and 2-way at identity and at that step.
type Selection = (usize, Option<(f64, f64)>, Option<(f64, f64)>);

fn choose_steps(obj: &Objective, curves: &[FoldCurve], steps: usize) -> Result<Selection, CalibrateError> {
    let scored = obj.coral[0];
    let at = |v: &[f64], t: usize| v[t.min(v.len() - 1)];
    Ok(if curves.is_empty() {
        (steps, None, None)
    } else {
        let len = curves.iter().map(|f| f.loss.len()).max().unwrap_or(1);
        let mean = |t: usize| curves.iter().map(|f| at(&f.loss, t)).sum::<f64>() / curves.len() as f64;
        let best = (0..len).filter(|&t| mean(t).is_finite()).min_by(|&a, &b| mean(a).total_cmp(&mean(b)));
        let best = best.unwrap_or(0);
        // Cross-validated 2-way: every trial predicted by the fold that held it out.
        let truth_of = |i: u32| -> Result<Vec<f32>, CalibrateError> {
            let t = obj.terms.iter().find(|t| t.head == scored);
            match t {
                Some(t) => t.targets.get(i as usize).and_then(|x| x.to_vec1::<f32>()).map_err(c),
                None => Ok(Vec::new()),
            }
        };
        let pooled = |t: usize| -> Result<f64, CalibrateError> {
            let (mut pred, mut truth) = (Vec::new(), Vec::new());
            for f in curves {
                let p = &f.predictions[t.min(f.predictions.len() - 1)];
                for (row, &i) in p.iter().zip(&f.held) {
                    pred.push(row.clone());
                    truth.push(truth_of(i)?);
                }
            }
            Ok(two_way(&pred, &truth))
        };
        let scored_has_targets = obj.terms.iter().any(|t| t.head == scored);
        let score = if scored_has_targets { Some((pooled(0)?, pooled(best)?)) } else { None };
        (best, Some((mean(0), mean(best))), score)
    })
}

/// Fits an alignment head for `decoder` on `set`; `progress` hears every step.
pub fn fit(
    decoder: &Decoder,
    set: &CalibrationSet,
    cfg: &CalibrateConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(AlignmentHead, FitReport), CalibrateError> {
    let start = std::time::Instant::now();
    let n = set.len();
    let v = decoder.cfg.n_voxels;
    set.check(decoder, cfg.min_trials)?;
    let dev = &decoder.device;
    let terms = target_terms(decoder, set, cfg)?;
    let coral = coral_heads(decoder, cfg)?;
    let xs = Tensor::from_slice(&set.betas, (n, v), dev).map_err(c)?;
    let z = decoder.normalise(&xs).map_err(c)?;
    let obj = Objective { decoder, z, terms, coral, cfg, n_voxels: v as f64 };
    let scored = obj.coral[0];

    // Folds by stimulus: every stimulus is held out once.
    let mut rng = Rng::new(cfg.seed, 12);
    let mut stimuli: Vec<&String> = set.stimuli.iter().collect();
    stimuli.sort();
    stimuli.dedup();
    for i in (1..stimuli.len()).rev() {
        stimuli.swap(i, rng.below(i + 1));
    }
    let n_folds = if cfg.holdout > 0.0 {
        ((1.0 / cfg.holdout).round() as usize).clamp(2, 100).min(stimuli.len())
    } else {
        0
    };
    let fold_of = |s: &String| stimuli.iter().position(|x| *x == s).map_or(0, |i| i % n_folds.max(1));
    let all_idx: Vec<u32> = (0..n as u32).collect();
    let to_t = |i: &[u32]| Tensor::from_slice(i, i.len(), dev).map_err(c);
    let identity = AlignmentHead::identity(decoder, cfg.rank, cfg.seed)?;
    let mut rollbacks = 0;

    // Each fold's held-out loss and scored-head predictions after every step.
    let mut curves: Vec<FoldCurve> = Vec::new();
    for k in 0..n_folds {
        let held: Vec<u32> =
            all_idx.iter().copied().filter(|&i| fold_of(&set.stimuli[i as usize]) == k).collect();
        let train: Vec<u32> =
            all_idx.iter().copied().filter(|&i| fold_of(&set.stimuli[i as usize]) != k).collect();
        if held.is_empty() || train.len() < 2 {
            continue;
        }
        let (tr, he) = (to_t(&train)?, to_t(&held)?);
        let p = Params::from_head(&identity).map_err(c)?;
        let held_loss = |p: &Params| -> Result<f64, CalibrateError> {
            obj.target_loss(p, &he).and_then(|l| l.to_scalar::<f32>()).map(f64::from).map_err(c)
        };
        let mut curve = vec![held_loss(&p)?];
        let mut preds = vec![obj.predictions(&p, &he, scored).map_err(c)?];
        let mut best = (0, curve[0]);
        let mut on_step = |p: &Params, step: usize, loss: f64| -> Result<bool, CalibrateError> {
            let h = held_loss(p)?;
            let fold = Some((k + 1, n_folds));
            progress(&Progress {
                phase: "select",
                step,
                steps: cfg.steps,
                loss: Some(loss),
                heldout_loss: Some(h),
                fold,
            });
            curve.push(h);
            preds.push(obj.predictions(p, &he, scored).map_err(c)?);
            if h.is_finite() && h < best.1 {
                best = (step, h);
            }
            Ok(step - best.0 < cfg.patience)
        };
        rollbacks += descend(&obj, &p, &tr, cfg.steps, cfg.lr, &mut on_step)?;
        curves.push(FoldCurve { held, loss: curve, predictions: preds });
    }
    let (steps, heldout_loss, heldout_two_way) = choose_steps(&obj, &curves, cfg.steps)?;
    let p = Params::from_head(&identity).map_err(c)?;
    let all = to_t(&all_idx)?;
    let loss_of = |p: &Params| obj.target_loss(p, &all).and_then(|l| l.to_scalar::<f32>()).map_err(c);
    let loss_identity = f64::from(loss_of(&p)?);
    let mut on_step = |_: &Params, step: usize, loss: f64| -> Result<bool, CalibrateError> {
        progress(&Progress { phase: "refit", step, steps, loss: Some(loss), heldout_loss: None, fold: None });
        Ok(true)
    };
    rollbacks += descend(&obj, &p, &all, steps, cfg.lr, &mut on_step)?;
    if !p.finite().map_err(c)? {
        return Err(CalibrateError::Compute("the fit produced non-finite parameters".into()));
    }
    let loss_final = f64::from(loss_of(&p)?);
    let report = FitReport {
        n_trials: n,
        folds: curves.len(),
        steps,
        loss_identity,
        loss_final,
        heldout_loss,
        heldout_two_way,
        rollbacks,
        seconds: start.elapsed().as_secs_f64(),
    };
    let head = AlignmentHead {
        gain: p.gain.as_tensor().detach(),
        offset: p.offset.as_tensor().detach(),
        u: p.u.as_tensor().detach(),
        v: p.v.as_tensor().detach(),
        model: identity.model,
        fit: serde_json::to_value(&report).unwrap_or_default(),
    };
    Ok((head, report))
}

/// Most rollbacks before a fit gives up descending and keeps its last good parameters.
const MAX_ROLLBACKS: usize = 6;

/// Runs up to `steps` AdamW steps on trials `idx`; `on_step(params, step, loss)` after each
/// good step says whether to go on. A non-finite or exploding loss restores the last good
/// parameters and halves the learning rate. Returns the number of rollbacks.
fn descend(
    obj: &Objective,
    p: &Params,
    idx: &Tensor,
    steps: usize,
    lr: f64,
    on_step: &mut dyn FnMut(&Params, usize, f64) -> Result<bool, CalibrateError>,
) -> Result<usize, CalibrateError> {
    let params = |lr| ParamsAdamW { lr, weight_decay: 0.0, ..ParamsAdamW::default() };
    let mut lr = lr;
    let mut opt = AdamW::new(p.vars(), params(lr)).map_err(c)?;
    let mut good = p.snapshot().map_err(c)?;
    let mut first: Option<f64> = None;
    let mut rollbacks = 0;
    let mut step = 0;
    while step < steps {
        let loss = obj.target_loss(p, idx).map_err(c)?;
        let value = f64::from(loss.to_scalar::<f32>().map_err(c)?);
        let limit = 1e3 * first.unwrap_or(value).abs().max(1e-3);
        if !value.is_finite() || value > limit {
            rollbacks += 1;
            tracing::warn!(
                "calibrate: loss {value:e} at step {step}; rolling back, learning rate {:e}",
                lr / 2.0
            );
            p.restore(&good).map_err(c)?;
            if rollbacks > MAX_ROLLBACKS {
                break;
            }
            lr /= 2.0;
            opt = AdamW::new(p.vars(), params(lr)).map_err(c)?;
            continue;
        }
        first.get_or_insert(value);
        if step > 0 && !on_step(p, step, value)? {
            break;
        }
        good = p.snapshot().map_err(c)?;
        opt.backward_step(&loss).map_err(c)?;
        step += 1;
    }
    if step == steps {
        let value = obj.target_loss(p, idx).and_then(|l| l.to_scalar::<f32>()).map_err(c)?;
        if !f64::from(value).is_finite() {
            p.restore(&good).map_err(c)?;
            rollbacks += 1;
        } else {
            on_step(p, step, f64::from(value))?;
        }
    }
    Ok(rollbacks)
}
