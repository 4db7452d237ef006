//! Rigid-body geometry in world millimetres: the six parameters, their 4×4 matrix, framewise
//! displacement, and trilinear resampling of a volume through a voxel-to-voxel map.
//!
//! Convention (SPM's `spm_matrix` order): `M = T(trans) · Rx(rot_x) · Ry(rot_y) · Rz(rot_z)`,
//! translations in mm, rotations in radians about the world origin. A volume that moved by `M`
//! satisfies `reference(p) = moving(M · p)` for every world point `p`.

use crate::volume::Affine;

/// The six rigid parameters, named as in fMRIPrep's confounds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RigidParams {
    /// `trans_x, trans_y, trans_z` in mm.
    pub trans: [f64; 3],
    /// `rot_x, rot_y, rot_z` in radians.
    pub rot: [f64; 3],
}

/// Column names of the six parameters, in order.
pub const PARAM_NAMES: [&str; 6] = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"];

/// Radius (mm) of the sphere on which rotations become displacements in FD (Power et al. 2012).
pub const FD_RADIUS_MM: f64 = 50.0;

impl RigidParams {
    /// The parameters as `[trans_x, trans_y, trans_z, rot_x, rot_y, rot_z]`.
    pub fn to_array(&self) -> [f64; 6] {
        let [tx, ty, tz] = self.trans;
        let [rx, ry, rz] = self.rot;
        [tx, ty, tz, rx, ry, rz]
    }

    /// The world-space matrix `T · Rx · Ry · Rz`.
    pub fn matrix(&self) -> Affine {
        let [rx, ry, rz] = self.rot;
        let (sx, cx) = rx.sin_cos();
        let (sy, cy) = ry.sin_cos();
        let (sz, cz) = rz.sin_cos();
        let r_x = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
        let r_y = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
        let r_z = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
        let r = mul3(&mul3(&r_x, &r_y), &r_z);
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            m[i][..3].copy_from_slice(&r[i]);
            m[i][3] = self.trans[i];
        }
        m[3][3] = 1.0;
        m
    }

    /// Framewise displacement from `prev` to `self`: the sum of absolute parameter changes, with
    /// rotations taken as arc lengths on a 50 mm sphere.
    pub fn framewise_displacement(&self, prev: &RigidParams) -> f64 {
        let t: f64 = (0..3).map(|i| (self.trans[i] - prev.trans[i]).abs()).sum();
        let r: f64 = (0..3).map(|i| (self.rot[i] - prev.rot[i]).abs()).sum();
        t + FD_RADIUS_MM * r
    }
}

fn mul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut o = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            o[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    o
}

/// Product of two 4×4 matrices.
pub fn mat_mul(a: &Affine, b: &Affine) -> Affine {
    let mut o = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            o[i][j] = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    o
}

/// Inverse of an affine 4×4 matrix (last row `0 0 0 1`), or `None` when singular.
pub fn affine_inverse(a: &Affine) -> Option<Affine> {
    let det = crate::volume::affine_det3(a);
    if det == 0.0 || !det.is_finite() {
        return None;
    }
    let m = |r: usize, c: usize| a[r][c];
    let mut inv = [[0.0; 4]; 4];
    inv[0][0] = (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1)) / det;
    inv[0][1] = (m(0, 2) * m(2, 1) - m(0, 1) * m(2, 2)) / det;
    inv[0][2] = (m(0, 1) * m(1, 2) - m(0, 2) * m(1, 1)) / det;
    inv[1][0] = (m(1, 2) * m(2, 0) - m(1, 0) * m(2, 2)) / det;
    inv[1][1] = (m(0, 0) * m(2, 2) - m(0, 2) * m(2, 0)) / det;
    inv[1][2] = (m(0, 2) * m(1, 0) - m(0, 0) * m(1, 2)) / det;
    inv[2][0] = (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0)) / det;
    inv[2][1] = (m(0, 1) * m(2, 0) - m(0, 0) * m(2, 1)) / det;
    inv[2][2] = (m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0)) / det;
    for r in 0..3 {
        inv[r][3] = -(0..3).map(|c| inv[r][c] * a[c][3]).sum::<f64>();
    }
    inv[3][3] = 1.0;
    Some(inv)
}

/// Resamples `src` (grid `src_dims`, x fastest) into `dst` (grid `dst_dims`), where output
/// voxel `v` takes the trilinear value of `src` at voxel coordinates `K · v`. Points outside
/// the source grid take `outside`. A `K` that is an exact integer shift copies voxels exactly.
pub fn resample_trilinear(
    src: &[f32],
    src_dims: [usize; 3],
    k: &Affine,
    outside: f32,
    dst: &mut [f32],
    dst_dims: [usize; 3],
) {
    let [nx, ny, nz] = dst_dims;
    debug_assert_eq!(src.len(), src_dims.iter().product::<usize>());
    debug_assert_eq!(dst.len(), nx * ny * nz);
    if src.len() != src_dims.iter().product::<usize>() || src.is_empty() {
        dst.fill(outside);
        return;
    }
    let stride = [1usize, src_dims[0], src_dims[0] * src_dims[1]];
    for z in 0..nz {
        for y in 0..ny {
            let row = &mut dst[nx * (y + ny * z)..nx * (y + ny * z) + nx];
            let base = [
                k[0][1] * y as f64 + k[0][2] * z as f64 + k[0][3],
                k[1][1] * y as f64 + k[1][2] * z as f64 + k[1][3],
                k[2][1] * y as f64 + k[2][2] * z as f64 + k[2][3],
            ];
            for (x, out) in row.iter_mut().enumerate() {
                let u = base[0] + k[0][0] * x as f64;
                let v = base[1] + k[1][0] * x as f64;
                let w = base[2] + k[2][0] * x as f64;
                *out = sample(src, src_dims, stride, u, v, w, outside);
            }
        }
    }
}

#[inline]
fn sample(src: &[f32], dims: [usize; 3], stride: [usize; 3], u: f64, v: f64, w: f64, outside: f32) -> f32 {
    // Snap coordinates within 1e-9 voxel of an integer so exact shifts stay exact.
    let snap = |c: f64| {
        let r = c.round();
        if (c - r).abs() < 1e-9 {
            r
        } else {
            c
        }
    };
    let (u, v, w) = (snap(u), snap(v), snap(w));
    let max = |n: usize| (n - 1) as f64;
    if !(u >= 0.0 && v >= 0.0 && w >= 0.0 && u <= max(dims[0]) && v <= max(dims[1]) && w <= max(dims[2])) {
        return outside;
    }
    let (i0, j0, k0) = (u.floor() as usize, v.floor() as usize, w.floor() as usize);
    let (fu, fv, fw) = (u - i0 as f64, v - j0 as f64, w - k0 as f64);
    let i1 = (i0 + 1).min(dims[0] - 1);
    let j1 = (j0 + 1).min(dims[1] - 1);
    let k1 = (k0 + 1).min(dims[2] - 1);
    let at = |i: usize, j: usize, k: usize| f64::from(src[i * stride[0] + j * stride[1] + k * stride[2]]);
    let c00 = at(i0, j0, k0) * (1.0 - fu) + at(i1, j0, k0) * fu;
    let c10 = at(i0, j1, k0) * (1.0 - fu) + at(i1, j1, k0) * fu;
    let c01 = at(i0, j0, k1) * (1.0 - fu) + at(i1, j0, k1) * fu;
    let c11 = at(i0, j1, k1) * (1.0 - fu) + at(i1, j1, k1) * fu;
    let c0 = c00 * (1.0 - fv) + c10 * fv;
    let c1 = c01 * (1.0 - fv) + c11 * fv;
    (c0 * (1.0 - fw) + c1 * fw) as f32
}

/// The voxel-to-voxel map `A⁻¹ · M⁻¹ · A` that samples a reference-space image to build the
/// image of a head moved by `M` (`moving(q) = reference(M⁻¹ q)`), or `None` for a singular grid.
pub fn moved_sampling_map(affine: &Affine, m: &Affine) -> Option<Affine> {
    let a_inv = affine_inverse(affine)?;
    let m_inv = affine_inverse(m)?;
    Some(mat_mul(&a_inv, &mat_mul(&m_inv, affine)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_matches_hand_rotation_and_inverse() {
        let p = RigidParams { trans: [1.0, -2.0, 3.0], rot: [0.0, 0.0, std::f64::consts::FRAC_PI_2] };
        let m = p.matrix();
        // Rz(90°) maps x to y, then translation.
        let x = [m[0][0] + m[0][3], m[1][0] + m[1][3], m[2][0] + m[2][3]];
        assert!((x[0] - 1.0).abs() < 1e-12 && (x[1] - -1.0).abs() < 1e-12 && (x[2] - 3.0).abs() < 1e-12);
        let p = RigidParams { trans: [0.3, 0.1, -0.7], rot: [0.02, -0.01, 0.03] };
        let id = mat_mul(&p.matrix(), &affine_inverse(&p.matrix()).unwrap());
        for (i, row) in id.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn framewise_displacement_by_hand() {
        let a = RigidParams::default();
        let b = RigidParams { trans: [0.1, -0.2, 0.3], rot: [0.001, 0.0, -0.002] };
        assert!((b.framewise_displacement(&a) - (0.6 + 50.0 * 0.003)).abs() < 1e-12);
    }

    #[test]
    fn whole_voxel_translation_is_exact() {
        let dims = [5, 4, 3];
        let src: Vec<f32> = (0..60).map(|i| i as f32 * 1.5 + 2.0).collect();
        // 3 mm voxels, LAS-like flip on x; head moves +3 mm in world y (one voxel).
        let affine =
            [[-3.0, 0.0, 0.0, 6.0], [0.0, 3.0, 0.0, -4.5], [0.0, 0.0, 3.0, -3.0], [0.0, 0.0, 0.0, 1.0]];
        let m = RigidParams { trans: [0.0, 3.0, 0.0], rot: [0.0; 3] }.matrix();
        let k = moved_sampling_map(&affine, &m).unwrap();
        let mut dst = vec![0f32; 60];
        resample_trilinear(&src, dims, &k, -1.0, &mut dst, dims);
        for z in 0..3 {
            for y in 0..4 {
                for x in 0..5 {
                    let want = if y == 0 { -1.0 } else { src[x + 5 * (y - 1 + 4 * z)] };
                    assert_eq!(dst[x + 5 * (y + 4 * z)], want);
                }
            }
        }
    }

    #[test]
    fn trilinear_midpoint_is_the_mean() {
        let src = vec![0f32, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0];
        let mut k = crate::volume::IDENTITY_AFFINE;
        k[0][3] = 0.5;
        k[1][3] = 0.5;
        k[2][3] = 0.5;
        let mut dst = vec![0f32; 8];
        resample_trilinear(&src, [2, 2, 2], &k, 0.0, &mut dst, [2, 2, 2]);
        assert_eq!(dst[0], 7.0);
        assert_eq!(dst[1], 0.0); // outside
    }
}
