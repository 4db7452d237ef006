//! One input candidate's whole pipeline, scored on held-out pairs: each head's correction with
//! its penalty chosen on inner pairs, tested together, and the baseline's scores.

use std::collections::BTreeMap;

use faer::Mat;

use super::blocks::{Blocks, Ridge};
use super::folds::fold_weights;
use super::linalg::argmax;
use super::report::Estimate;
use super::space::HeadSide;
use super::Problem;

/// Fold weights by (input candidate, modes, held-out stimuli).
pub(super) type WeightCache = BTreeMap<(usize, usize, Vec<usize>), Mat<f64>>;

/// One head's correction under one input candidate.
pub(super) struct HeadChoice {
    pub(super) kept: bool,
    /// The penalty chosen on every held-out pair (used when kept).
    pub(super) alpha: f64,
    /// Per held-out pair: the penalty chosen without it (inner pairs).
    pub(super) nested: Vec<f64>,
    /// Per held-out pair: the correction's gain in identification margin.
    pub(super) margin: Vec<f64>,
    pub(super) margin_gain: Estimate,
    pub(super) two_way_gain: Estimate,
}

/// The whole pipeline under one input candidate: each head's (guarded) correction and, per
/// held-out pair, the weighted mean over heads of its identification with them.
pub(super) struct Pipeline {
    pub(super) heads: Vec<HeadChoice>,
    pub(super) margin: Vec<f64>,
    pub(super) two_way: Vec<f64>,
}

impl Problem<'_> {
    /// Fold weights of input candidate `(input, k)` with the trials of `stims` held out.
    pub(super) fn weights(
        &self,
        cache: &mut WeightCache,
        input: usize,
        k: usize,
        stims: &[usize],
    ) -> Mat<f64> {
        let mut key = stims.to_vec();
        key.sort_unstable();
        cache
            .entry((input, k, key))
            .or_insert_with(|| {
                let held = self.folds.trials_of(stims);
                fold_weights(
                    &self.run.gram[input],
                    self.folds.n_cal,
                    &held,
                    self.cfg.inputs[input].uses_run(),
                    k,
                )
                .0
            })
            .clone()
    }

    /// Head `h`'s identification (margin, 2-way) of held-out pair `pair` with everything fitted
    /// without `held` (which holds the pair): the correction with penalty `alpha` (or none).
    pub(super) fn pair_score(
        &self,
        b: &Blocks,
        held: &[usize],
        pair: [usize; 2],
        alpha: Option<f64>,
    ) -> (f64, f64) {
        let train = self.folds.trials_without(held);
        let ridge = alpha.and_then(|a| Ridge::fit(b, &train, a));
        let (mut m, mut t, mut n) = (0.0, 0.0, 0);
        for (own, other) in [(pair[0], pair[1]), (pair[1], pair[0])] {
            for j in self.folds.trials_of(&[own]) {
                let v = match &ridge {
                    Some(r) => r.correct(b, j, &self.folds.stim_of),
                    None => b.plain(j),
                };
                let (a, c) = b.identify(&v, own, other);
                m += a;
                t += c;
                n += 1;
            }
        }
        (m / n.max(1) as f64, t / n.max(1) as f64)
    }

    /// Each head's correction under `(input, k)`: per held-out pair, the penalty chosen on
    /// inner pairs (both pairs held out of the run's statistics and modes), the gain measured
    /// on the pair; the corrections kept together where the guard's test passes, on the heads
    /// whose own gain is positive; then the pipeline's scores per pair.
    pub(super) fn pipeline(&self, cache: &mut WeightCache, input: usize, k: usize) -> Pipeline {
        let (cfg, pairs) = (self.cfg, self.folds.pairs());
        let n_stim = self.folds.n_stim;
        let blocks = |cache: &mut WeightCache, h: &HeadSide, held: &[usize]| {
            Blocks::new(h, input, self.run.n_run, n_stim, &self.weights(cache, input, k, held))
        };
        let mut heads = Vec::new();
        for h in &self.heads {
            let (mut dm, mut dt, mut nested) = (Vec::new(), Vec::new(), Vec::new());
            let mut outer_by_alpha = vec![0.0; cfg.alphas.len()];
            for &pair in &pairs {
                let outer = blocks(cache, h, &pair);
                let mut inner = vec![0.0; cfg.alphas.len()];
                for q in self.folds.inner_pairs(&pair) {
                    let held = [pair[0], pair[1], q[0], q[1]];
                    let b = blocks(cache, h, &held);
                    for (ai, &a) in cfg.alphas.iter().enumerate() {
                        inner[ai] += self.pair_score(&b, &held, q, Some(a)).0;
                    }
                }
                let ai = argmax(&inner);
                let with = self.pair_score(&outer, &pair, pair, Some(cfg.alphas[ai]));
                let without = self.pair_score(&outer, &pair, pair, None);
                dm.push(with.0 - without.0);
                dt.push(with.1 - without.1);
                nested.push(cfg.alphas[ai]);
                for (bi, &a) in cfg.alphas.iter().enumerate() {
                    outer_by_alpha[bi] += self.pair_score(&outer, &pair, pair, Some(a)).0;
                }
            }
            heads.push(HeadChoice {
                kept: false,
                alpha: cfg.alphas[argmax(&outer_by_alpha)],
                nested,
                margin_gain: self.folds.estimate(&pairs, &dm),
                two_way_gain: self.folds.estimate(&pairs, &dt),
                margin: dm,
            });
        }
        // The corrections are one component: tested together (the heads' weighted mean gain
        // per stimulus), then kept on the heads whose own gain is positive.
        let total: f64 = self.heads.iter().map(|h| h.weight).sum();
        let joint: Vec<f64> = (0..pairs.len())
            .map(|i| self.heads.iter().zip(&heads).map(|(h, c)| h.weight * c.margin[i]).sum::<f64>() / total)
            .collect();
        let joint = self.folds.estimate(&pairs, &joint);
        for c in &mut heads {
            c.kept = joint.reliable(cfg.guard_p) && c.margin_gain.mean > 0.0;
        }
        let (mut margin, mut two_way) = (Vec::new(), Vec::new());
        for (pi, &pair) in pairs.iter().enumerate() {
            let (mut m, mut t) = (0.0, 0.0);
            for (h, c) in self.heads.iter().zip(&heads) {
                let b = blocks(cache, h, &pair);
                let (hm, ht) = self.pair_score(&b, &pair, pair, c.kept.then(|| c.nested[pi]));
                m += h.weight * hm / total;
                t += h.weight * ht / total;
            }
            margin.push(m);
            two_way.push(t);
        }
        Pipeline { heads, margin, two_way }
    }
}

impl Problem<'_> {
    /// Per held-out pair, the baseline's 2-way (the first input, no modes, no correction).
    pub(super) fn pipeline_without_corrections(&self, cache: &mut WeightCache) -> Vec<f64> {
        let total: f64 = self.heads.iter().map(|h| h.weight).sum();
        self.folds
            .pairs()
            .iter()
            .map(|&pair| {
                let w = self.weights(cache, 0, 0, &pair);
                self.heads
                    .iter()
                    .map(|h| {
                        let b = Blocks::new(h, 0, self.run.n_run, self.folds.n_stim, &w);
                        h.weight * self.pair_score(&b, &pair, pair, None).1 / total
                    })
                    .sum()
            })
            .collect()
    }
}
