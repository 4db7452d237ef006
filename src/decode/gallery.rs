//! A gallery of candidate items for retrieval: ids, labels, per-head embeddings and optional
//! thumbnails. Candidates are ranked by a weighted sum of per-head cosine similarities (with a
//! gallery of generated images, this is MIRAGE's best-of-N).
//!
//! ```text
//! gallery.json          {"format": "mirage-gallery/1", "items": [{"id": "...", "label": "..."}, …],
//!                        "heads": ["image", "retrieval"]}
//! gallery.safetensors   one [N, n_outputs] float32 tensor per head, named after it;
//!                       optional "thumbnails" [N, ...] (values in [0, 1])
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::metrics::cosine;
use super::DecodeError;

/// Format tag of `gallery.json`.
pub const FORMAT: &str = "mirage-gallery/1";

/// One candidate's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Identifier (e.g. the stimulus id).
    pub id: String,
    /// Human-readable label.
    pub label: String,
}

#[derive(Serialize, Deserialize)]
struct Index {
    format: String,
    items: Vec<Item>,
    heads: Vec<String>,
}

/// A ranked candidate (the `decode` topic's).
pub use crate::topic::Match;

/// A loaded gallery.
#[derive(Clone, Debug)]
pub struct Gallery {
    /// The candidates.
    pub items: Vec<Item>,
    /// Per head: output size and `[N × size]` embeddings.
    pub embeddings: BTreeMap<String, (usize, Vec<f32>)>,
    /// Thumbnail shape and `[N × prod(shape)]` pixels.
    pub thumbnails: Option<(Vec<usize>, Vec<f32>)>,
}

fn tensor_f32(st: &safetensors::SafeTensors, name: &str) -> Result<(Vec<usize>, Vec<f32>), DecodeError> {
    super::model::read_f32_tensor(st, name).map_err(DecodeError::Gallery)
}

impl Gallery {
    /// Reads a gallery folder.
    pub fn load(dir: &Path) -> Result<Gallery, DecodeError> {
        let err = |e: String| DecodeError::Gallery(format!("{}: {e}", dir.display()));
        let index: Index = serde_json::from_str(
            &std::fs::read_to_string(dir.join("gallery.json")).map_err(|e| err(e.to_string()))?,
        )
        .map_err(|e| err(e.to_string()))?;
        if index.format != FORMAT {
            return Err(err(format!("format {:?}, expected {FORMAT:?}", index.format)));
        }
        let bytes = std::fs::read(dir.join("gallery.safetensors")).map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let n = index.items.len();
        let mut embeddings = BTreeMap::new();
        for head in &index.heads {
            let (shape, values) = tensor_f32(&st, head)?;
            if shape.first() != Some(&n) {
                return Err(err(format!("{head}: {shape:?} does not start with {n} items")));
            }
            embeddings.insert(head.clone(), (values.len() / n.max(1), values));
        }
        let thumbnails = match st.tensor("thumbnails") {
            Ok(_) => {
                let (shape, values) = tensor_f32(&st, "thumbnails")?;
                Some((shape[1..].to_vec(), values))
            }
            Err(_) => None,
        };
        Ok(Gallery { items: index.items, embeddings, thumbnails })
    }

    /// Writes a gallery folder.
    pub fn write(&self, dir: &Path) -> Result<(), DecodeError> {
        let err = |e: String| DecodeError::Gallery(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let n = self.items.len();
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> =
            self.embeddings.iter().map(|(h, (d, v))| (h.as_str(), vec![n, *d], v.as_slice())).collect();
        if let Some((shape, v)) = &self.thumbnails {
            tensors.push(("thumbnails", [vec![n], shape.clone()].concat(), v.as_slice()));
        }
        super::model::write_f32_safetensors(&dir.join("gallery.safetensors"), &tensors, None).map_err(err)?;
        let index = Index {
            format: FORMAT.into(),
            items: self.items.clone(),
            heads: self.embeddings.keys().cloned().collect(),
        };
        std::fs::write(
            dir.join("gallery.json"),
            serde_json::to_string_pretty(&index).map_err(|e| err(e.to_string()))?,
        )
        .map_err(|e| err(e.to_string()))
    }

    /// How much each of its heads counts in retrieval: `weights` (empty: equal), only heads
    /// `available` says a trial has, none at zero.
    pub fn head_weights(
        &self,
        weights: &BTreeMap<String, f64>,
        available: impl Fn(&str) -> bool,
    ) -> Vec<(String, f64)> {
        self.embeddings
            .keys()
            .filter(|h| available(h))
            .map(|h| {
                (h.clone(), if weights.is_empty() { 1.0 } else { weights.get(h).copied().unwrap_or(0.0) })
            })
            .filter(|(_, w)| *w > 0.0)
            .collect()
    }

    /// Cosine similarity of a head's prediction with every candidate's embedding (`None`
    /// when the gallery lacks the head or the sizes differ).
    pub fn cosines(&self, head: &str, pred: &[f32]) -> Option<Vec<f64>> {
        let (d, emb) = self.embeddings.get(head)?;
        (pred.len() == *d && *d > 0).then(|| emb.chunks_exact(*d).map(|g| cosine(pred, g)).collect())
    }

    /// The best `top_k` candidates by the weighted mean of per-head cosine similarities
    /// (`(weight, one similarity per candidate)` per head).
    pub fn rank_by(&self, per_head: &[(f64, Vec<f64>)], top_k: usize) -> Vec<Match> {
        let total: f64 = per_head.iter().map(|(w, _)| w).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut scored: Vec<Match> = (0..self.items.len())
            .map(|i| {
                let score =
                    per_head.iter().map(|(w, c)| w * c.get(i).copied().unwrap_or(0.0)).sum::<f64>() / total;
                Match { index: i, id: self.items[i].id.clone(), label: self.items[i].label.clone(), score }
            })
            .collect();
        scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        scored.truncate(top_k);
        scored
    }

    /// Ranks every candidate for per-head predictions; `weights` (empty: equal) says how much
    /// each head's cosine similarity counts. Returns the best `top_k`.
    pub fn rank(
        &self,
        outputs: &BTreeMap<String, Vec<f32>>,
        weights: &BTreeMap<String, f64>,
        top_k: usize,
    ) -> Vec<Match> {
        let per_head: Vec<(f64, Vec<f64>)> = self
            .head_weights(weights, |h| outputs.contains_key(h))
            .into_iter()
            .map(|(h, w)| (w, self.cosines(&h, &outputs[&h]).unwrap_or_default()))
            .collect();
        self.rank_by(&per_head, top_k)
    }
}

/// One head's gallery embeddings `G` seen through a low-rank head's output map `y = A·l + c`:
/// cosine similarities come from the rank-r latent `l` in `O(N·r + r²)` instead of `O(N·out)`,
/// with no output formed — `g·y = (G·A)·l + G·c`, `|y|² = lᵀ(AᵀA)l + 2(Aᵀc)·l + |c|²`.
#[derive(Clone, Debug)]
pub struct LatentIndex {
    rank: usize,
    projected: Vec<f32>,
    offset: Vec<f64>,
    norms: Vec<f64>,
    gram: Vec<f32>,
    cross: Vec<f64>,
    bias_sq: f64,
}

impl LatentIndex {
    /// Precomputes the index of embeddings `[N × out]` for the map `a` `[out, r]`, `c` `[out]`
    /// (on `a`'s device), whose `AᵀA` is `gram` `[r, r]`.
    pub fn new(
        embeddings: &[f32],
        a: &Tensor,
        c: &Tensor,
        gram: &Tensor,
    ) -> candle_core::Result<LatentIndex> {
        let (out, rank) = a.dims2()?;
        let n = embeddings.len() / out.max(1);
        let g = Tensor::from_slice(embeddings, (n, out), a.device())?;
        let projected = g.matmul(a)?.flatten_all()?.to_vec1::<f32>()?;
        let c_col = c.unsqueeze(1)?;
        let offset = g.matmul(&c_col)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let gram = gram.flatten_all()?.to_vec1::<f32>()?;
        let cross =
            a.t()?.matmul(&c_col)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let c = c.to_vec1::<f32>()?;
        let bias_sq = c.iter().map(|v| f64::from(*v).powi(2)).sum();
        let norms = embeddings
            .chunks_exact(out)
            .map(|g| g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt())
            .collect();
        Ok(LatentIndex { rank, projected, offset, norms, gram, cross, bias_sq })
    }

    /// Cosine similarity of the output of latent `l` with every candidate (`None` when `l`
    /// is not of the head's rank).
    pub fn cosines(&self, l: &[f32]) -> Option<Vec<f64>> {
        let r = self.rank;
        if l.len() != r {
            return None;
        }
        let quad: f64 = self.gram.chunks_exact(r).zip(l).map(|(row, li)| dot(row, l) * f64::from(*li)).sum();
        let cross: f64 = self.cross.iter().zip(l).map(|(c, li)| c * f64::from(*li)).sum();
        let norm = (quad + 2.0 * cross + self.bias_sq).max(0.0).sqrt();
        Some(
            self.projected
                .chunks_exact(r)
                .zip(&self.offset)
                .zip(&self.norms)
                .map(
                    |((p, off), gn)| {
                        if norm > 0.0 && *gn > 0.0 {
                            (dot(p, l) + off) / (norm * gn)
                        } else {
                            0.0
                        }
                    },
                )
                .collect(),
        )
    }
}

/// `a · b` with sixteen float32 lanes (so that it vectorises), summed in float64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f64 =
        ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().map(|v| f64::from(*v)).sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_load_and_rank() {
        let dir = tempfile::tempdir().unwrap();
        let g = Gallery {
            items: (0..3).map(|i| Item { id: i.to_string(), label: format!("item {i}") }).collect(),
            embeddings: BTreeMap::from([
                ("image".to_string(), (2, vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7])),
                ("text".to_string(), (1, vec![1.0, -1.0, 1.0])),
            ]),
            thumbnails: Some((vec![2, 2], vec![0.5; 12])),
        };
        g.write(dir.path()).unwrap();
        let back = Gallery::load(dir.path()).unwrap();
        assert_eq!(back.items, g.items);
        assert_eq!(back.embeddings, g.embeddings);
        assert_eq!(back.thumbnails, g.thumbnails);
        let out = BTreeMap::from([("image".to_string(), vec![0.0, 2.0])]);
        let top = back.rank(&out, &BTreeMap::new(), 2);
        assert_eq!((top[0].id.as_str(), top[1].id.as_str()), ("1", "2"));
        assert!((top[0].score - 1.0).abs() < 1e-12);
        // Weighted: text alone prefers items 0 and 2 equally (ties break by position).
        let out = BTreeMap::from([("image".to_string(), vec![0.0, 2.0]), ("text".to_string(), vec![3.0])]);
        let w = BTreeMap::from([("text".to_string(), 1.0)]);
        assert_eq!(back.rank(&out, &w, 3).iter().map(|m| m.index).collect::<Vec<_>>(), vec![0, 2, 1]);
    }
}
