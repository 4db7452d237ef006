//! The design matrix, one named column at a time, grown as a run goes on.
//!
//! Every column is a function of the volume times (and of the motion estimates), so a row can
//! be computed for any volume at any time and a column added later (a trial that starts, a
//! late event) is the same column an offline fit would use.

use super::hrf::boxcar_response;

/// Length (s) of the canonical HRF's support after a boxcar ends, as SPM's 32 s kernel.
pub const HRF_SUPPORT_S: f64 = 32.0;

/// What the design needs to know about one volume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowInfo {
    /// Acquisition time in seconds after the run's first volume.
    pub time: f64,
    /// The six motion parameters (mm, rad), when the motion stage estimated them.
    pub motion: Option<[f64; 6]>,
}

/// One regressor.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    /// The constant.
    Intercept,
    /// Legendre polynomial of `order` in `t / scale − 1` (a drift that needs no run length).
    Polynomial {
        /// Degree, 1 or more.
        order: usize,
        /// Seconds mapped to the unit interval.
        scale: f64,
    },
    /// SPM's discrete cosine high-pass basis, `cos(π k (t + tr/2) / length)`.
    Cosine {
        /// Frequency index, 1 or more.
        k: usize,
        /// Run length in seconds.
        length: f64,
        /// Half a repetition time, s (sample centres).
        half_tr: f64,
    },
    /// One of the six motion parameters.
    Motion(usize),
    /// The backward difference of one motion parameter (0 at the first volume).
    MotionDerivative(usize),
    /// One trial convolved with the canonical HRF (least squares all).
    Trial {
        /// Trial id.
        id: u64,
        /// Onset, s after volume 0.
        onset: f64,
        /// Duration, s.
        duration: f64,
    },
    /// Every trial of one condition, summed.
    Condition {
        /// Condition label.
        label: String,
        /// `(onset, duration)` of its trials.
        trials: Vec<(f64, f64)>,
    },
    /// A column given as numbers, one per volume (from a design file); 0 beyond its end.
    Given {
        /// Column name.
        name: String,
        /// Values by volume.
        values: Vec<f64>,
    },
}

/// The response to one boxcar at time `t`, zero outside `[onset, onset + duration + 32 s]`.
fn trial_response(t: f64, onset: f64, duration: f64) -> f64 {
    let since = t - onset;
    if since <= 0.0 || since > duration + HRF_SUPPORT_S {
        0.0
    } else {
        boxcar_response(t, onset, duration)
    }
}

fn legendre(order: usize, s: f64) -> f64 {
    let (mut p0, mut p1) = (1.0, s);
    if order == 0 {
        return p0;
    }
    for n in 1..order {
        let n = n as f64;
        let p2 = ((2.0 * n + 1.0) * s * p1 - n * p0) / (n + 1.0);
        p0 = p1;
        p1 = p2;
    }
    p1
}

impl Column {
    /// The column's name in `design.tsv`.
    pub fn name(&self) -> String {
        const AXES: [&str; 6] = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"];
        match self {
            Column::Intercept => "intercept".into(),
            Column::Polynomial { order, .. } => format!("drift_poly{order}"),
            Column::Cosine { k, .. } => format!("drift_cosine{k:02}"),
            Column::Motion(a) => AXES[*a].into(),
            Column::MotionDerivative(a) => format!("{}_derivative1", AXES[*a]),
            Column::Trial { id, .. } => format!("trial_{id:04}"),
            Column::Condition { label, .. } => label.clone(),
            Column::Given { name, .. } => name.clone(),
        }
    }

    /// The column's value at row `t`.
    pub fn value(&self, rows: &[RowInfo], t: usize) -> f64 {
        let r = &rows[t];
        match self {
            Column::Intercept => 1.0,
            Column::Polynomial { order, scale } => legendre(*order, r.time / scale - 1.0),
            Column::Cosine { k, length, half_tr } => {
                (std::f64::consts::PI * *k as f64 * (r.time + half_tr) / length).cos()
            }
            Column::Motion(a) => r.motion.map_or(0.0, |m| m[*a]),
            Column::MotionDerivative(a) => match (t.checked_sub(1).map(|p| rows[p].motion), r.motion) {
                (Some(Some(prev)), Some(cur)) => cur[*a] - prev[*a],
                _ => 0.0,
            },
            Column::Trial { onset, duration, .. } => trial_response(r.time, *onset, *duration),
            Column::Condition { trials, .. } => {
                trials.iter().map(|(o, d)| trial_response(r.time, *o, *d)).sum()
            }
            Column::Given { values, .. } => values.get(t).copied().unwrap_or(0.0),
        }
    }

    /// True for drift and motion columns: the nuisance removed from ROI feedback.
    pub fn is_nuisance(&self) -> bool {
        matches!(
            self,
            Column::Polynomial { .. }
                | Column::Cosine { .. }
                | Column::Motion(_)
                | Column::MotionDerivative(_)
        )
    }
}

/// Reads a design matrix: a TSV or CSV (a header row of names is optional), a whitespace-
/// separated text matrix (numpy's `savetxt`, FSL's `.txt`), or FSL's VEST `design.mat`
/// (`/NumWaves`, `/NumPoints`, … then `/Matrix` and the rows).
///
/// Tab- and comma-separated files go through [`crate::io::tsv`]; runs of spaces are no
/// delimiter the `csv` crate knows, so whitespace matrices are split here.
pub fn read_design(path: &std::path::Path) -> Result<Vec<Column>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let rows = design_rows(&text, &path.display().to_string())?;
    let (_, first) = rows.first().ok_or("the design has no rows")?;
    let has_header = first.iter().any(|c| c.parse::<f64>().is_err());
    let names: Vec<String> = if has_header {
        first.clone()
    } else {
        (1..=first.len()).map(|i| format!("regressor_{i:02}")).collect()
    };
    let mut cols = vec![Vec::new(); names.len()];
    for (line, cells) in rows.iter().skip(usize::from(has_header)) {
        if cells.len() != names.len() {
            return Err(format!("design line {line} has {} values, expected {}", cells.len(), names.len()));
        }
        for (c, cell) in cells.iter().enumerate() {
            let v = cell
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or(format!("design line {line}: {cell:?} is not a number"))?;
            cols[c].push(v);
        }
    }
    Ok(names.into_iter().zip(cols).map(|(name, values)| Column::Given { name, values }).collect())
}

/// A design's non-blank rows, header included, each with its 1-based line in the file.
fn design_rows(text: &str, what: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let lines = || text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    let Some((_, first)) = lines().next() else { return Ok(Vec::new()) };
    let split_whitespace =
        |(n, l): (usize, &str)| (n, l.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    if first.starts_with('/') {
        let matrix =
            lines().position(|(_, l)| l.starts_with("/Matrix")).ok_or("VEST file without /Matrix")?;
        return Ok(lines().skip(matrix + 1).map(split_whitespace).collect());
    }
    let table = if first.contains('\t') {
        crate::io::tsv::parse(text, what)
    } else if first.contains(',') {
        crate::io::tsv::parse_csv(text, what)
    } else {
        return Ok(lines().map(split_whitespace).collect());
    };
    let table = table.map_err(|e| e.to_string())?;
    let header_line = lines().next().map_or(1, |(n, _)| n);
    Ok(std::iter::once((header_line, table.header))
        .chain(table.rows.into_iter().map(|r| (r.line, r.cells)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legendre_and_cosine_by_hand() {
        assert!((legendre(2, 0.5) - (3.0 * 0.25 - 1.0) / 2.0).abs() < 1e-15);
        assert!((legendre(3, -0.3) - (5.0 * -0.027 - 3.0 * -0.3) / 2.0).abs() < 1e-15);
        let rows = [
            RowInfo { time: 0.0, motion: None },
            RowInfo { time: 2.0, motion: Some([1.0, 0.0, 0.0, 0.0, 0.0, 0.5]) },
        ];
        let c = Column::Cosine { k: 1, length: 4.0, half_tr: 1.0 };
        assert!((c.value(&rows, 1) - (std::f64::consts::PI * 3.0 / 4.0).cos()).abs() < 1e-15);
        assert_eq!(Column::Motion(5).value(&rows, 0), 0.0);
        assert_eq!(Column::MotionDerivative(0).value(&rows, 1), 0.0);
        assert_eq!(Column::Motion(5).value(&rows, 1), 0.5);
    }

    #[test]
    fn design_files_plain_and_vest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.tsv");
        std::fs::write(&p, "a\tb\n1\t0.5\n2\t-1\n").unwrap();
        let cols = read_design(&p).unwrap();
        assert_eq!(cols[1], Column::Given { name: "b".into(), values: vec![0.5, -1.0] });
        std::fs::write(&p, "/NumWaves 2\n/NumPoints 2\n/PPheights 1 1\n\n/Matrix\n1.0 2.0\n3.0 4.0\n")
            .unwrap();
        let cols = read_design(&p).unwrap();
        assert_eq!(cols[0], Column::Given { name: "regressor_01".into(), values: vec![1.0, 3.0] });
        std::fs::write(&p, "1 2\n3\n").unwrap();
        assert!(read_design(&p).unwrap_err().contains("line 2"));
        std::fs::write(&p, "a,b\n1,0.5\n\n2,-1\n").unwrap();
        assert_eq!(read_design(&p).unwrap()[1], Column::Given { name: "b".into(), values: vec![0.5, -1.0] });
        std::fs::write(&p, "1\t2\n3\t4\n").unwrap();
        assert_eq!(
            read_design(&p).unwrap()[1],
            Column::Given { name: "regressor_02".into(), values: vec![2.0, 4.0] }
        );
        std::fs::write(&p, "a\tb\n1\t0.5\n2\n").unwrap();
        let e = read_design(&p).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        std::fs::write(&p, "a\tb\n1\tx\n").unwrap();
        assert!(read_design(&p).unwrap_err().contains("line 2: \"x\""));
    }

    #[test]
    fn trials_respond_after_onset_only() {
        let rows: Vec<RowInfo> = (0..60).map(|i| RowInfo { time: i as f64, motion: None }).collect();
        let c = Column::Trial { id: 3, onset: 10.0, duration: 4.0 };
        assert_eq!(c.value(&rows, 10), 0.0);
        assert!(c.value(&rows, 16) > 0.3);
        assert_eq!(c.value(&rows, 47), 0.0);
        let both = Column::Condition { label: "seen".into(), trials: vec![(10.0, 4.0), (20.0, 4.0)] };
        let other = Column::Trial { id: 4, onset: 20.0, duration: 4.0 };
        assert!((both.value(&rows, 25) - c.value(&rows, 25) - other.value(&rows, 25)).abs() < 1e-15);
        assert_eq!(c.name(), "trial_0003");
    }
}
