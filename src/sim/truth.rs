//! Writing a simulated run to disk: the data a scanner would give (`bold.nii.gz`, BIDS
//! `events.tsv`) and, under `truth/`, every hidden quantity that made it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{SimError, Simulator};
use crate::io::nifti::{write_nifti, NiftiWriter};
use crate::io::npy::write_npy;
use crate::motion::rigid::{RigidParams, PARAM_NAMES};

/// Where a written run's files are.
#[derive(Clone, Debug)]
pub struct RunFiles {
    /// 4-D float32 series.
    pub bold: PathBuf,
    /// BIDS events (onset, duration, trial_type, stim_id, trial_id).
    pub events: PathBuf,
    /// Folder of ground truth.
    pub truth: PathBuf,
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

fn write_text(path: &Path, text: &str) -> Result<(), SimError> {
    std::fs::write(path, text).map_err(|e| write_err(path, e))
}

impl Simulator {
    /// Generates every volume into `dir/bold.nii.gz` and writes events and truth beside it.
    /// The simulator must not have produced any volume yet.
    pub fn write_run(mut self, dir: &Path) -> Result<RunFiles, SimError> {
        if self.position() != 0 {
            return Err(SimError::Config("write_run needs a simulator that has not started".into()));
        }
        let truth = dir.join("truth");
        std::fs::create_dir_all(&truth).map_err(|e| write_err(&truth, e))?;
        let dims = self.dims();
        let affine = *self.affine();
        let tr = self.config().tr;
        let bold = dir.join("bold.nii.gz");
        let mut writer = NiftiWriter::create(&bold, dims, self.n_volumes(), &affine, Some(tr))
            .map_err(|e| write_err(&bold, e))?;
        // Truth first (needs &self), then the volumes (consume the generator).
        let events = dir.join("events.tsv");
        write_text(&events, &self.events_tsv())?;
        self.write_truth(&truth)?;
        while let Some(v) = self.next_volume() {
            writer.write_volume(&v.data).map_err(|e| write_err(&bold, e))?;
        }
        writer.finish().map_err(|e| write_err(&bold, e))?;
        Ok(RunFiles { bold, events, truth })
    }

    /// The run's trials as BIDS `events.tsv` (`onset duration trial_type stim_id trial_id`).
    pub fn events_tsv(&self) -> String {
        let mut tsv = String::from("onset\tduration\ttrial_type\tstim_id\ttrial_id\n");
        for t in self.trials() {
            let _ = writeln!(
                tsv,
                "{:.3}\t{:.3}\t{}\t{}\t{}",
                t.onset,
                t.duration,
                t.condition.label(),
                t.stim,
                t.id
            );
        }
        tsv
    }

    fn write_truth(&self, dir: &Path) -> Result<(), SimError> {
        let anat = self.anatomy();
        let (dims, affine) = (anat.dims, anat.affine);
        let nifti = |name: &str, data: &[f32]| {
            let p = dir.join(name);
            write_nifti(&p, dims, &affine, None, &[data]).map_err(|e| write_err(&p, e))
        };
        nifti("anatomy.nii.gz", &anat.image)?;
        let head = dir.join("head.nii.gz");
        write_nifti(&head, anat.head.dims, &anat.head.affine, None, &[&anat.head.image])
            .map_err(|e| write_err(&head, e))?;
        let mask = |idx: &[usize]| {
            let mut m = vec![0f32; anat.image.len()];
            idx.iter().for_each(|&v| m[v] = 1.0);
            m
        };
        nifti("brain_mask.nii.gz", &mask(&anat.brain))?;
        nifti("roi_mask.nii.gz", &mask(&anat.roi))?;

        let mut params = PARAM_NAMES.join("\t");
        params.push_str("\tframewise_displacement\n");
        let mut matrices = (0..16).map(|i| format!("m{}{}", i / 4, i % 4)).collect::<Vec<_>>().join("\t");
        matrices.push('\n');
        let mut prev = RigidParams::default();
        for m in self.motion() {
            let p = m.to_array().map(|v| format!("{v:.9}"));
            let _ = writeln!(params, "{}\t{:.9}", p.join("\t"), m.framewise_displacement(&prev));
            let mat = m.matrix();
            let flat: Vec<String> = mat.iter().flatten().map(|v| format!("{v:.12}")).collect();
            let _ = writeln!(matrices, "{}", flat.join("\t"));
            prev = *m;
        }
        write_text(&dir.join("motion.tsv"), &params)?;
        write_text(&dir.join("motion_matrices.tsv"), &matrices)?;

        let stim = self.stimuli();
        let npy = |name: &str, shape: &[usize], data: Vec<f32>| {
            let p = dir.join(name);
            write_npy(&p, shape, &data).map_err(|e| write_err(&p, e))
        };
        npy("stimuli_pictures.npy", &[stim.pictures.len(), stim.size, stim.size], stim.pictures.concat())?;
        let dim = stim.embeddings.first().map_or(0, Vec::len);
        npy("stimuli_embeddings.npy", &[stim.embeddings.len(), dim], stim.embeddings.concat())?;
        npy("trial_amplitudes.npy", &[self.amplitudes().len(), anat.roi.len()], self.amplitudes().concat())?;

        // Decoder targets per stimulus and per trial (trial order), and the stimuli as a gallery.
        let targets = self.head_targets();
        for sub in ["targets/stimuli", "targets/trials"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| write_err(&dir.join(sub), e))?;
        }
        for t in &targets {
            let n = t.per_stimulus.len();
            npy(
                &format!("targets/stimuli/{}.npy", t.name),
                &[vec![n], t.shape.clone()].concat(),
                t.per_stimulus.concat(),
            )?;
            let rows: Vec<f32> =
                self.trials().iter().flat_map(|tr| t.per_stimulus[tr.stim].iter().copied()).collect();
            npy(
                &format!("targets/trials/{}.npy", t.name),
                &[vec![self.trials().len()], t.shape.clone()].concat(),
                rows,
            )?;
        }
        let gallery = crate::decode::gallery::Gallery {
            items: (0..stim.pictures.len())
                .map(|s| crate::decode::gallery::Item { id: s.to_string(), label: format!("stimulus {s}") })
                .collect(),
            embeddings: targets
                .iter()
                .filter(|t| t.name != "pixels")
                .map(|t| (t.name.to_string(), (t.shape.iter().product(), t.per_stimulus.concat())))
                .collect(),
            thumbnails: Some((vec![1, stim.size, stim.size], stim.pictures.concat())),
        };
        gallery.write(&dir.join("gallery")).map_err(|e| write_err(&dir.join("gallery"), e))?;

        let doc = serde_json::json!({
            "generator": concat!("mirage-rt ", env!("CARGO_PKG_VERSION")),
            "config": self.config(),
            "dims": dims,
            "affine": affine,
            "tr": self.config().tr,
            "n_volumes": self.n_volumes(),
            "acquisition_time": "volume i is acquired at i * tr seconds after run start",
            "n_brain_voxels": anat.brain.len(),
            "n_roi_voxels": anat.roi.len(),
            "roi_order": "trial_amplitudes columns follow roi_mask voxels in ascending NIfTI (x-fastest) index",
            "signal_model": "bold = moved(anatomy * (1 + 0.01 * sum_trials amplitude * boxcar_response(t; onset, duration))) + drift + ar1 noise",
            "hrf": "SPM canonical double gamma (shapes 6 and 16, ratio 6), unit area",
            "motion_convention": "M = T(trans) Rx Ry Rz, radians about the world origin; reference(p) = moving(M p)",
            "moving_head": "volume(q) = cubic B-spline (mirror boundaries) through the signal on head.nii.gz's padded grid, at M^-1 q",
            "trials": self.trials(),
            "categories": stim.categories,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| write_err(dir, e))?;
        write_text(&dir.join("truth.json"), &text)
    }
}
