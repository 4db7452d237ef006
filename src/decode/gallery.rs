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

/// A ranked candidate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Match {
    /// Position in the gallery.
    pub index: usize,
    /// Its id.
    pub id: String,
    /// Its label.
    pub label: String,
    /// Weighted mean cosine similarity.
    pub score: f64,
}

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

    /// Ranks every candidate for per-head predictions; `weights` (empty: equal) says how much
    /// each head's cosine similarity counts. Returns the best `top_k`.
    pub fn rank(
        &self,
        outputs: &BTreeMap<String, Vec<f32>>,
        weights: &BTreeMap<String, f64>,
        top_k: usize,
    ) -> Vec<Match> {
        let used: Vec<(&String, f64)> = self
            .embeddings
            .keys()
            .filter(|h| outputs.contains_key(*h))
            .map(|h| (h, if weights.is_empty() { 1.0 } else { weights.get(h).copied().unwrap_or(0.0) }))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        let total: f64 = used.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut scored: Vec<Match> = (0..self.items.len())
            .map(|i| {
                let score = used
                    .iter()
                    .map(|(h, w)| {
                        let (d, emb) = &self.embeddings[*h];
                        let pred = &outputs[*h];
                        if pred.len() == *d {
                            w * cosine(pred, &emb[i * d..(i + 1) * d])
                        } else {
                            0.0
                        }
                    })
                    .sum::<f64>()
                    / total;
                Match { index: i, id: self.items[i].id.clone(), label: self.items[i].label.clone(), score }
            })
            .collect();
        scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        scored.truncate(top_k);
        scored
    }
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
