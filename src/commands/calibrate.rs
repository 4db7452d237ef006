//! `mirage calibrate` and `mirage protocol`: fit the domain-alignment head offline, and print
//! a calibration protocol's cue schedule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::calibrate::protocol::Protocol;
use crate::calibrate::{fit, CalibrateConfig, CalibrationSet, FitSummary};
use crate::commands::decode::{read_arrays, read_betas};
use crate::decode::model::{device, Decoder};

/// `mirage calibrate` arguments.
pub struct CalibrateArgs {
    /// Model folder.
    pub model: PathBuf,
    /// Betas `.npy`, trials × voxels.
    pub betas: PathBuf,
    /// Targets: folder of `HEAD.npy` (or `.npz`), one row per betas row.
    pub targets: PathBuf,
    /// Rows of the betas used for calibration.
    pub trials: Vec<usize>,
    /// Alignment head file to write.
    pub out: PathBuf,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Fit settings.
    pub cfg: CalibrateConfig,
    /// Show a progress bar.
    pub progress: bool,
}

/// Reads `0,3,5-9` as row numbers.
pub fn parse_trials(spec: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--trials {part:?}: write row numbers or ranges, e.g. 0,3,5-9");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if b < a || b - a > 1_000_000 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// Fits an alignment on the chosen trials (the file's other rows are the rest of the run and
/// enter its statistics) and writes it.
pub fn calibrate(args: &CalibrateArgs) -> anyhow::Result<FitSummary> {
    let dev = device(&args.device)?;
    let decoder = Decoder::load(&args.model, &dev)?;
    let (n, v, x) = read_betas(&args.betas)?;
    if v != decoder.cfg.n_voxels {
        anyhow::bail!(
            "{}: {v} voxels, the model takes {} (was it trained on this mask?)",
            args.betas.display(),
            decoder.cfg.n_voxels
        );
    }
    if args.trials.is_empty() {
        anyhow::bail!("--trials names no rows: give the calibration trials' rows, e.g. 0,3,5-9");
    }
    if let Some(bad) = args.trials.iter().find(|&&t| t >= n) {
        anyhow::bail!("--trials: row {bad} does not exist ({} has {n} trials)", args.betas.display());
    }
    if let Some(twice) = args.trials.iter().enumerate().find(|(i, t)| args.trials[..*i].contains(t)) {
        anyhow::bail!("--trials: row {} is named twice", twice.1);
    }
    let arrays = read_arrays(&args.targets)?;
    let mut targets = BTreeMap::new();
    let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n];
    for a in &arrays {
        if a.shape.first() != Some(&n) {
            anyhow::bail!(
                "{}: {} has {:?} rows, the betas {n}",
                args.targets.display(),
                a.name,
                a.shape.first()
            );
        }
        let out = a.values.len() / n;
        for (i, r) in rows.iter_mut().enumerate() {
            r.extend(a.values[i * out..(i + 1) * out].iter().map(|x| x.to_bits()));
        }
        let picked: Vec<f32> =
            args.trials.iter().flat_map(|&t| &a.values[t * out..(t + 1) * out]).copied().collect();
        targets.insert(a.name.clone(), picked);
    }
    // Trials with identical targets showed the same stimulus.
    let stimulus = |t: usize| rows.iter().position(|r| *r == rows[t]).unwrap_or(t).to_string();
    let set = CalibrationSet {
        betas: args.trials.iter().flat_map(|&t| &x[t * v..(t + 1) * v]).copied().collect(),
        stimuli: args.trials.iter().map(|&t| stimulus(t)).collect(),
        targets,
        others: (0..n)
            .filter(|t| !args.trials.contains(t))
            .flat_map(|t| &x[t * v..(t + 1) * v])
            .copied()
            .collect(),
        condition: None,
    };
    let bar = crate::decode::train::bar(args.progress, 1, "calibrate");
    let (adapter, report) = fit(&decoder, &set, &args.cfg, &mut |p| {
        if p.step == 1 {
            bar.set_length(p.steps as u64);
            bar.set_position(0);
        }
        match p.loss {
            Some(loss) => bar.set_message(format!("{} loss {loss:.4}", p.phase)),
            None => bar.set_message(p.phase),
        }
        bar.set_position(p.step as u64);
    })?;
    bar.finish_and_clear();
    adapter.save(&args.out, &decoder)?;
    Ok(report)
}

/// One line per fact of a fit, for people.
pub fn summary(r: &FitSummary, out: &Path) -> String {
    match r {
        FitSummary::ClosedForm(r) => closed_form_summary(r, out),
        FitSummary::Gradient(r) => gradient_summary(r, out),
    }
}

fn closed_form_summary(r: &crate::calibrate::transfer::TransferReport, out: &Path) -> String {
    let pct = |e: &crate::calibrate::transfer::Estimate| {
        format!("{:+.1} ± {:.1} points", 100.0 * e.mean, 100.0 * e.se)
    };
    let mut s = format!(
        "mirage: calibrated on {} trials of {} stimuli ({} trials in the run) in {:.2} s; wrote {}",
        r.n_trials,
        r.n_stimuli,
        r.n_run_trials,
        r.seconds,
        out.display()
    );
    if let Some(note) = &r.note {
        s.push_str(&format!("\nmirage: {note}"));
    }
    if let Some(i) = &r.input {
        let what = if i.kept { "kept" } else { "not kept: the baseline stays" };
        s.push_str(&format!(
            "\nmirage: input {} with {} voxel modes removed (best candidate {} with {} modes, tested at p {:.3}, {what}); held-out 2-way {}",
            i.input.name(),
            i.modes,
            i.best.0.name(),
            i.best.1,
            i.level,
            pct(&i.two_way_gain)
        ));
    }
    for h in &r.heads {
        let what = match (h.kept, h.alpha) {
            (true, Some(a)) => format!("corrected in its {} space (alpha {a})", h.space),
            _ => "left as it is".to_string(),
        };
        s.push_str(&format!("\nmirage: head {}: {what}; held-out 2-way {}", h.head, pct(&h.two_way_gain)));
    }
    if let Some(t) = &r.two_way {
        s.push_str(&format!(
            "\nmirage: leave-one-stimulus-out 2-way among the calibration stimuli {:.3} → {:.3} ({})",
            t.baseline,
            t.calibrated,
            pct(&t.gain)
        ));
    }
    s
}

fn gradient_summary(r: &crate::calibrate::fit::FitReport, out: &Path) -> String {
    let mut s = format!(
        "mirage: fitted the alignment head on {} trials in {:.2} s ({} steps, {} rollbacks); loss {:.4} → {:.4}; wrote {}",
        r.n_trials,
        r.seconds,
        r.steps,
        r.rollbacks,
        r.loss_identity,
        r.loss_final,
        out.display()
    );
    if let (Some((a, b)), Some((c, d))) = (r.heldout_loss, r.heldout_two_way) {
        s.push_str(&format!(
            "\nmirage: {}-fold cross-validation over stimuli: held-out loss {a:.4} → {b:.4}, 2-way {c:.3} → {d:.3}",
            r.folds
        ));
    }
    s
}

/// Prints a protocol's schedule as `events.tsv` (to `out`, or stdout).
pub fn protocol(path: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let p = Protocol::load(path)?;
    let tsv = p.events_tsv();
    match out {
        Some(o) => std::fs::write(o, tsv)?,
        None => print!("{tsv}"),
    }
    Ok(())
}
