//! From DICOM slices (patient LPS coordinates) to a volume: slices sorted along their normal,
//! stacked x fastest, with the RAS+ affine of voxel centres that NIfTI and the daemon use.

use crate::volume::Affine;

/// One 2-D image placed in the scanner: DICOM's ImagePositionPatient, ImageOrientationPatient
/// and PixelSpacing.
#[derive(Clone, Debug)]
pub struct SliceImage {
    /// Centre of the first pixel (row 0, column 0), LPS mm.
    pub position: [f64; 3],
    /// Direction of increasing column index (the first three of ImageOrientationPatient).
    pub row_cos: [f64; 3],
    /// Direction of increasing row index (the last three).
    pub col_cos: [f64; 3],
    /// PixelSpacing: between rows, between columns (mm).
    pub spacing: [f64; 2],
    /// Rows and columns.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Pixel values, row by row.
    pub data: Vec<f32>,
}

/// `a × b`.
pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

/// `a · b`.
pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Stacks slices of one volume: sorted along `normal` (default: row × column direction), slice
/// step from the first to the last position (`thickness` when there is one slice). Returns the
/// grid, its RAS+ affine and the data, x (column) fastest.
pub fn stack(
    mut slices: Vec<SliceImage>,
    normal: Option<[f64; 3]>,
    thickness: f64,
) -> Result<([usize; 3], Affine, Vec<f32>), String> {
    let first = slices.first().ok_or("no slices")?;
    let (rows, cols, row_cos, col_cos, spacing) =
        (first.rows, first.cols, first.row_cos, first.col_cos, first.spacing);
    for s in &slices {
        if (s.rows, s.cols) != (rows, cols) || s.data.len() != rows * cols {
            return Err(format!("slices of {}×{} and {}×{} in one volume", rows, cols, s.rows, s.cols));
        }
        let same = |a: [f64; 3], b: [f64; 3]| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4);
        if !same(s.row_cos, row_cos) || !same(s.col_cos, col_cos) {
            return Err("slices of one volume have different orientations".into());
        }
    }
    let normal = normal.unwrap_or_else(|| cross(row_cos, col_cos));
    slices.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    let n = slices.len();
    let step = if n > 1 {
        let (p0, p1) = (slices[0].position, slices[n - 1].position);
        let d = [p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2]];
        let gap = dot(d, normal) / (n - 1) as f64;
        if gap.abs() < 1e-6 {
            return Err("two slices of one volume share a position".into());
        }
        [d[0] / (n - 1) as f64, d[1] / (n - 1) as f64, d[2] / (n - 1) as f64]
    } else {
        normal.map(|v| v * thickness)
    };
    let lps = [row_cos.map(|v| v * spacing[1]), col_cos.map(|v| v * spacing[0]), step, slices[0].position];
    let affine = lps_columns_to_ras(lps);
    if !affine.iter().flatten().all(|v| v.is_finite()) {
        return Err("non-finite geometry".into());
    }
    let mut data = Vec::with_capacity(rows * cols * n);
    for s in slices {
        data.extend(s.data);
    }
    Ok(([cols, rows, n], affine, data))
}

/// The RAS+ affine whose columns are `c` (three axis steps and the origin, LPS mm): DICOM's
/// patient coordinates with x and y negated.
pub fn lps_columns_to_ras(c: [[f64; 3]; 4]) -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (j, col) in c.iter().enumerate() {
        for i in 0..3 {
            a[i][j] = if i < 2 { -col[i] } else { col[i] };
        }
    }
    a[3][3] = 1.0;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(z: f64, v: f32) -> SliceImage {
        SliceImage {
            position: [10.0, 20.0, z],
            row_cos: [1.0, 0.0, 0.0],
            col_cos: [0.0, 1.0, 0.0],
            spacing: [2.0, 3.0],
            rows: 2,
            cols: 3,
            data: vec![v; 6],
        }
    }

    #[test]
    fn slices_stack_in_normal_order_with_an_ras_affine() {
        let (dims, a, data) = stack(vec![slice(8.0, 2.0), slice(4.0, 1.0)], None, 4.0).unwrap();
        assert_eq!(dims, [3, 2, 2]);
        assert_eq!(data[..6], [1.0; 6]);
        // Columns: +x LPS is −x RAS (3 mm), rows +y LPS is −y RAS (2 mm), 4 mm slices.
        assert_eq!(a[0], [-3.0, 0.0, 0.0, -10.0]);
        assert_eq!(a[1], [0.0, -2.0, 0.0, -20.0]);
        assert_eq!(a[2], [0.0, 0.0, 4.0, 4.0]);
        assert!(stack(vec![slice(4.0, 1.0), slice(4.0, 1.0)], None, 4.0).is_err());
    }
}
