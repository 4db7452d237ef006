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

    /// The parameters of a rigid matrix `T · Rx · Ry · Rz` (the inverse of [`RigidParams::matrix`]
    /// for rotations within ±90° about y).
    pub fn from_matrix(m: &Affine) -> RigidParams {
        let ry = m[0][2].clamp(-1.0, 1.0).asin();
        let rx = (-m[1][2]).atan2(m[2][2]);
        let rz = (-m[0][1]).atan2(m[0][0]);
        RigidParams { trans: [m[0][3], m[1][3], m[2][3]], rot: [rx, ry, rz] }
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

/// Applies an affine to a point.
#[inline]
pub fn transform(m: &Affine, p: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|r| m[r][0] * p[0] + m[r][1] * p[1] + m[r][2] * p[2] + m[r][3])
}

/// Mean distance (mm) between where two world transforms send the given points.
pub fn mean_displacement(a: &Affine, b: &Affine, points: &[[f64; 3]]) -> f64 {
    if points.is_empty() {
        return 0.0;
    }
    let total: f64 = points
        .iter()
        .map(|p| {
            let (u, v) = (transform(a, *p), transform(b, *p));
            ((u[0] - v[0]).powi(2) + (u[1] - v[1]).powi(2) + (u[2] - v[2]).powi(2)).sqrt()
        })
        .sum();
    total / points.len() as f64
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
    if src.len() != src_dims.iter().product::<usize>() || src.is_empty() || dst.len() != nx * ny * nz {
        dst.fill(outside);
        return;
    }
    if dst.is_empty() {
        return;
    }
    let job = Resampling { src, src_dims, k, outside, nx, ny };
    if super::split_here() && nz > 1 {
        let (low, high) = dst.split_at_mut(nx * ny * (nz / 2));
        rayon::join(|| job.slices(low, 0), || job.slices(high, nz / 2));
    } else {
        job.slices(dst, 0);
    }
}

/// One [`resample_trilinear`], for the output slices a part of `dst` holds.
struct Resampling<'a> {
    src: &'a [f32],
    src_dims: [usize; 3],
    k: &'a Affine,
    outside: f32,
    nx: usize,
    ny: usize,
}

impl Resampling<'_> {
    /// Fills `dst`, whole output slices from slice `z0` on.
    fn slices(&self, dst: &mut [f32], z0: usize) {
        let Resampling { src, src_dims, k, outside, nx, ny } = *self;
        let stride = [1usize, src_dims[0], src_dims[0] * src_dims[1]];
        let upper = |a: usize| if src_dims[a] > 1 { stride[a] } else { 0 };
        let (dx, dy, dz) = (upper(0), upper(1), upper(2));
        // Coordinates clamp to [0, n − 1]; the lower corner to n − 2, so the upper one is inside.
        let top = src_dims.map(|n| (n - 1) as f32);
        let last = src_dims.map(|n| n.saturating_sub(2));
        let step = [k[0][0], k[1][0], k[2][0]];
        for (slab, slice) in dst.chunks_exact_mut(nx * ny).enumerate() {
            let z = z0 + slab;
            for y in 0..ny {
                let base = [
                    k[0][1] * y as f64 + k[0][2] * z as f64 + k[0][3],
                    k[1][1] * y as f64 + k[1][2] * z as f64 + k[1][3],
                    k[2][1] * y as f64 + k[2][2] * z as f64 + k[2][3],
                ];
                let (a, b) = inside_span(src_dims, base, step, nx);
                let out = &mut slice[nx * y..nx * y + nx];
                out[..a].fill(outside);
                out[b..].fill(outside);
                // One pass in float32 from the row's first inside voxel: positions within 1e-5
                // voxel, and exact for integer shifts.
                let origin = [0, 1, 2].map(|i| (base[i] + step[i] * a as f64) as f32);
                let row = Row {
                    src,
                    origin,
                    step: step.map(|v| v as f32),
                    top,
                    last,
                    stride,
                    corner: [dx, dy, dz],
                };
                row.blend(&mut out[a..b]);
            }
        }
    }
}

/// One output row's trilinear samples: voxel `t` of the row reads `src` at `origin + t · step`,
/// clamped to `[0, top]`, with lower corners at most `last`.
struct Row<'a> {
    src: &'a [f32],
    origin: [f32; 3],
    step: [f32; 3],
    top: [f32; 3],
    last: [usize; 3],
    stride: [usize; 3],
    /// Offsets of the upper neighbour along x, y, z (0 on a one-voxel axis).
    corner: [usize; 3],
}

impl Row<'_> {
    /// Fills `out` (the inside span of a row), eight voxels at a time where the CPU has AVX2.
    fn blend(&self, out: &mut [f32]) {
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.src.len() < i32::MAX as usize
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            done = unsafe { self.blend_avx2(out) };
        }
        for (t, o) in out.iter_mut().enumerate().skip(done) {
            *o = self.sample(t as f32);
        }
    }

    #[inline(always)]
    fn sample(&self, t: f32) -> f32 {
        let mut corner = 0usize;
        let mut f = [0f32; 3];
        for axis in 0..3 {
            let c = (self.origin[axis] + self.step[axis] * t).clamp(0.0, self.top[axis]);
            let i = (c as usize).min(self.last[axis]);
            corner += i * self.stride[axis];
            f[axis] = c - i as f32;
        }
        let [dx, dy, dz] = self.corner;
        let Some(s) = self.src.get(corner..=corner + dz + dy + dx) else { return 0.0 };
        let lerp = |a: f32, b: f32, f: f32| a + (b - a) * f;
        let c00 = lerp(s[0], s[dx], f[0]);
        let c10 = lerp(s[dy], s[dy + dx], f[0]);
        let c01 = lerp(s[dz], s[dz + dx], f[0]);
        let c11 = lerp(s[dz + dy], s[dz + dy + dx], f[0]);
        lerp(lerp(c00, c10, f[1]), lerp(c01, c11, f[1]), f[2])
    }

    /// [`Row::sample`] for eight voxels at once with gathers; returns how many it filled (all
    /// of a row of eight or more: its last eight are done as one block that overlaps the one
    /// before, the same values computed twice). Indices stay in bounds: coordinates are
    /// clamped (NaN to 0) before the corner, so the farthest read is `src`'s last voxel.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn blend_avx2(&self, out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let n = out.len();
        if n < 8 {
            return 0;
        }
        let full = n / 8 * 8;
        let lanes = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let zero = _mm256_setzero_ps();
        let [dx, dy, dz] = self.corner.map(|c| c as i32);
        let lerp = |a: __m256, b: __m256, f: __m256| _mm256_fmadd_ps(_mm256_sub_ps(b, a), f, a);
        for first in (0..full).step_by(8).chain((full < n).then_some(n - 8)) {
            let o = &mut out[first..first + 8];
            let t = _mm256_add_ps(_mm256_set1_ps(first as f32), lanes);
            let mut idx = _mm256_setzero_si256();
            let mut f = [zero; 3];
            for axis in 0..3 {
                let c =
                    _mm256_fmadd_ps(_mm256_set1_ps(self.step[axis]), t, _mm256_set1_ps(self.origin[axis]));
                // max_ps returns its second operand for a NaN first one.
                let c = _mm256_min_ps(_mm256_max_ps(c, zero), _mm256_set1_ps(self.top[axis]));
                let i = _mm256_min_epi32(_mm256_cvttps_epi32(c), _mm256_set1_epi32(self.last[axis] as i32));
                f[axis] = _mm256_sub_ps(c, _mm256_cvtepi32_ps(i));
                idx =
                    _mm256_add_epi32(idx, _mm256_mullo_epi32(i, _mm256_set1_epi32(self.stride[axis] as i32)));
            }
            let p = self.src.as_ptr();
            // SAFETY: every index is at most last·stride summed plus dx + dy + dz, which is
            // the source's last voxel (len < i32::MAX, checked by the caller).
            let g = |off: i32| unsafe {
                _mm256_i32gather_ps::<4>(p, _mm256_add_epi32(idx, _mm256_set1_epi32(off)))
            };
            let c00 = lerp(g(0), g(dx), f[0]);
            let c10 = lerp(g(dy), g(dy + dx), f[0]);
            let c01 = lerp(g(dz), g(dz + dx), f[0]);
            let c11 = lerp(g(dz + dy), g(dz + dy + dx), f[0]);
            let v = lerp(lerp(c00, c10, f[1]), lerp(c01, c11, f[1]), f[2]);
            // SAFETY: `o` holds exactly eight floats.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
        }
        n
    }
}

/// How far (in voxels) beyond an edge a coordinate still counts as on it: rounding in a
/// near-identity transform must not blank the first and last slices.
pub const EDGE_TOLERANCE: f64 = 1e-4;

/// Whether voxel coordinates `(u, v, w)` lie within a grid (edges included, within
/// [`EDGE_TOLERANCE`]).
#[inline(always)]
pub fn inside(dims: [usize; 3], u: f64, v: f64, w: f64) -> bool {
    let (lo, hi) = (-EDGE_TOLERANCE, |n: usize| (n - 1) as f64 + EDGE_TOLERANCE);
    u >= lo && v >= lo && w >= lo && u <= hi(dims[0]) && v <= hi(dims[1]) && w <= hi(dims[2])
}

/// Trilinear value of `src` (grid `dims`, strides `stride`) at voxel coordinates `(u, v, w)`,
/// or `None` outside the grid.
#[inline(always)]
pub fn trilinear_at(
    src: &[f32],
    dims: [usize; 3],
    stride: [usize; 3],
    u: f64,
    v: f64,
    w: f64,
) -> Option<f32> {
    if !inside(dims, u, v, w) {
        return None;
    }
    // Lower corner clamped so the upper one is always inside (the fraction may then be 1);
    // truncation is the floor for c ≥ 0. A one-voxel axis has no upper neighbour.
    let corner = |c: f64, n: usize, s: usize| {
        let c = c.clamp(0.0, (n - 1) as f64);
        let i = (c as i32 as usize).min(n.saturating_sub(2));
        (i * s, (c - i as f64) as f32, if n > 1 { s } else { 0 })
    };
    let (bx, fu, dx) = corner(u, dims[0], stride[0]);
    let (by, fv, dy) = corner(v, dims[1], stride[1]);
    let (bz, fw, dz) = corner(w, dims[2], stride[2]);
    let b = bx + by + bz;
    let s = src.get(b..=b + dz + dy + dx)?;
    let (a000, a100, a010, a110) = (s[0], s[dx], s[dy], s[dy + dx]);
    let (a001, a101, a011, a111) = (s[dz], s[dz + dx], s[dz + dy], s[dz + dy + dx]);
    let c00 = a000 + (a100 - a000) * fu;
    let c10 = a010 + (a110 - a010) * fu;
    let c01 = a001 + (a101 - a001) * fu;
    let c11 = a011 + (a111 - a011) * fu;
    let c0 = c00 + (c10 - c00) * fv;
    let c1 = c01 + (c11 - c01) * fv;
    Some(c0 + (c1 - c0) * fw)
}

/// The range of `x` in `0..n` for which `c[a] + d[a] · x` lies within the grid on every axis.
fn inside_span(dims: [usize; 3], c: [f64; 3], d: [f64; 3], n: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (0.0f64, n as f64 - 1.0);
    for a in 0..3 {
        let (min, max) = (-EDGE_TOLERANCE, (dims[a] - 1) as f64 + EDGE_TOLERANCE);
        if d[a] == 0.0 {
            if !(c[a] >= min && c[a] <= max) {
                return (0, 0);
            }
            continue;
        }
        let (t0, t1) = ((min - c[a]) / d[a], (max - c[a]) / d[a]);
        lo = lo.max(t0.min(t1));
        hi = hi.min(t0.max(t1));
    }
    if hi < lo {
        return (0, 0);
    }
    // Rounding can put the ends one voxel off; settle them with the exact test.
    let at = |x: usize| inside(dims, c[0] + d[0] * x as f64, c[1] + d[1] * x as f64, c[2] + d[2] * x as f64);
    let (mut a, mut b) = (lo.ceil().max(0.0) as usize, (hi.floor() as usize + 1).min(n));
    while a > 0 && at(a - 1) {
        a -= 1;
    }
    while a < b && !at(a) {
        a += 1;
    }
    while b < n && at(b) {
        b += 1;
    }
    while b > a && !at(b - 1) {
        b -= 1;
    }
    (a, b)
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
    fn params_survive_a_round_trip_through_the_matrix() {
        let p = RigidParams { trans: [1.5, -0.25, 3.0], rot: [0.05, -0.04, 0.03] };
        let q = RigidParams::from_matrix(&p.matrix());
        for i in 0..6 {
            assert!((p.to_array()[i] - q.to_array()[i]).abs() < 1e-12);
        }
        let pts = [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]];
        let shifted = RigidParams { trans: [0.0, 0.0, 2.0], rot: [0.0; 3] }.matrix();
        assert!((mean_displacement(&crate::volume::IDENTITY_AFFINE, &shifted, &pts) - 2.0).abs() < 1e-12);
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

    #[test]
    fn row_resampling_equals_the_pointwise_trilinear_value_everywhere() {
        // Odd row lengths exercise both the eight-voxel and the one-voxel paths.
        let dims = [29, 11, 7];
        let src: Vec<f32> =
            (0..dims.iter().product::<usize>()).map(|i| ((i * 7919) % 1013) as f32 / 97.0).collect();
        let k = RigidParams { trans: [0.37, -0.81, 0.23], rot: [0.05, -0.03, 0.08] }.matrix();
        let mut dst = vec![0f32; src.len()];
        resample_trilinear(&src, dims, &k, -1.0, &mut dst, dims);
        let stride = [1, dims[0], dims[0] * dims[1]];
        let (mut inside, mut outside) = (0, 0);
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let [u, v, w] = transform(&k, [x as f64, y as f64, z as f64]);
                    let got = dst[x + dims[0] * (y + dims[1] * z)];
                    match trilinear_at(&src, dims, stride, u, v, w) {
                        Some(want) => {
                            inside += 1;
                            assert!(
                                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                                "({x},{y},{z}): {got} vs {want}"
                            );
                        }
                        None => {
                            outside += 1;
                            assert_eq!(got, -1.0, "({x},{y},{z})");
                        }
                    }
                }
            }
        }
        assert!(inside > 1000 && outside > 100, "{inside} inside, {outside} outside");
    }
}
