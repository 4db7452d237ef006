//! The NSD-Imagery evaluation metrics that need no pretrained network, with MindEye's
//! definitions: PixCorr, SSIM (skimage's, Gaussian σ = 1.5, `use_sample_covariance=False`,
//! data range 1), 2-way identification (Pearson) and top-1 retrieval (cosine).

/// Pearson correlation of two equal-length vectors (0 when either is constant).
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let ma = a.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let mb = b.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(*x) - ma, f64::from(*y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa > 0.0 && sbb > 0.0 {
        sab / (saa * sbb).sqrt()
    } else {
        0.0
    }
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    }
}

/// Mean over images of the Pearson correlation of the flattened pixels.
pub fn pixcorr(pred: &[Vec<f32>], truth: &[Vec<f32>]) -> f64 {
    pred.iter().zip(truth).map(|(p, t)| pearson(p, t)).sum::<f64>() / pred.len().max(1) as f64
}

/// For each sample, the other samples whose truth differs from its own: the candidates it is
/// told apart from. A stimulus shown on several trials is one candidate, not a rival of itself.
fn rivals(truth: &[Vec<f32>]) -> Vec<Vec<usize>> {
    (0..truth.len()).map(|j| (0..truth.len()).filter(|&i| truth[i] != truth[j]).collect()).collect()
}

/// 2-way identification: for each prediction, the fraction of other stimuli's truths that
/// correlate less with it than its own truth does; averaged (chance 0.5).
pub fn two_way(pred: &[Vec<f32>], truth: &[Vec<f32>]) -> f64 {
    let mut total = 0.0;
    let mut counted = 0;
    for (j, (p, others)) in pred.iter().zip(rivals(truth)).enumerate() {
        if others.is_empty() {
            continue;
        }
        let own = pearson(&truth[j], p);
        let lower = others.iter().filter(|&&i| pearson(&truth[i], p) < own).count();
        total += lower as f64 / others.len() as f64;
        counted += 1;
    }
    if counted == 0 {
        f64::NAN
    } else {
        total / f64::from(counted)
    }
}

/// Top-1 retrieval: the fraction of predictions whose most cosine-similar distinct truth is
/// their own.
pub fn top1(pred: &[Vec<f32>], truth: &[Vec<f32>]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    let hits = pred
        .iter()
        .zip(rivals(truth))
        .enumerate()
        .filter(|(j, (p, others))| {
            let own = cosine(p, &truth[*j]);
            others.iter().all(|&i| cosine(p, &truth[i]) < own)
        })
        .count();
    hits as f64 / pred.len() as f64
}

/// scipy's 1-D Gaussian kernel: radius `int(truncate·σ + 0.5)`, normalised.
fn gaussian_kernel(sigma: f64, truncate: f64) -> Vec<f64> {
    let radius = (truncate * sigma + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 * (x as f64 / sigma).powi(2)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// Separable filtering with scipy's `mode="reflect"` (`d c b a | a b c d | d c b a`).
fn filter2(img: &[f64], h: usize, w: usize, k: &[f64]) -> Vec<f64> {
    let r = (k.len() / 2) as i64;
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        let period = 2 * n;
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - 1 - m }) as usize
    };
    let mut tmp = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(i, kv)| kv * img[y * w + reflect(x as i64 + i as i64 - r, w)])
                .sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = k
                .iter()
                .enumerate()
                .map(|(i, kv)| kv * tmp[reflect(y as i64 + i as i64 - r, h) * w + x])
                .sum();
        }
    }
    out
}

/// skimage's `structural_similarity(truth, pred, gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, data_range=1.0)` for one `h × w` grayscale image.
pub fn ssim(pred: &[f32], truth: &[f32], h: usize, w: usize) -> f64 {
    let (sigma, truncate, data_range): (f64, f64, f64) = (1.5, 3.5, 1.0);
    let k = gaussian_kernel(sigma, truncate);
    let x: Vec<f64> = truth.iter().map(|v| f64::from(*v)).collect();
    let y: Vec<f64> = pred.iter().map(|v| f64::from(*v)).collect();
    let prod = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).collect::<Vec<f64>>();
    let ux = filter2(&x, h, w, &k);
    let uy = filter2(&y, h, w, &k);
    let uxx = filter2(&prod(&x, &x), h, w, &k);
    let uyy = filter2(&prod(&y, &y), h, w, &k);
    let uxy = filter2(&prod(&x, &y), h, w, &k);
    let (c1, c2) = ((0.01 * data_range).powi(2), (0.03 * data_range).powi(2));
    let pad = (k.len() - 1) / 2;
    let mut total = 0.0;
    let mut count = 0usize;
    for yy in pad..h.saturating_sub(pad) {
        for xx in pad..w.saturating_sub(pad) {
            let i = yy * w + xx;
            let (vx, vy, vxy) = (uxx[i] - ux[i] * ux[i], uyy[i] - uy[i] * uy[i], uxy[i] - ux[i] * uy[i]);
            let s = ((2.0 * ux[i] * uy[i] + c1) * (2.0 * vxy + c2))
                / ((ux[i] * ux[i] + uy[i] * uy[i] + c1) * (vx + vy + c2));
            total += s;
            count += 1;
        }
    }
    if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.9986).abs() < 1e-3);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
        let truth = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
        assert_eq!(two_way(&truth, &truth), 1.0);
        assert_eq!(top1(&truth, &truth), 1.0);
        let swapped = vec![truth[1].clone(), truth[0].clone(), truth[2].clone()];
        assert!((top1(&swapped, &truth) - 1.0 / 3.0).abs() < 1e-12);
        // A stimulus shown twice is one candidate: perfect predictions stay perfect.
        let repeated = vec![truth[0].clone(), truth[1].clone(), truth[0].clone()];
        assert_eq!(two_way(&repeated, &repeated), 1.0);
        assert_eq!(top1(&repeated, &repeated), 1.0);
        assert!(
            two_way(&[truth[0].clone(), truth[0].clone()], &[truth[0].clone(), truth[0].clone()]).is_nan()
        );
        let img: Vec<f32> = (0..256).map(|i| (i % 7) as f32 / 7.0).collect();
        assert!((ssim(&img, &img, 16, 16) - 1.0).abs() < 1e-12);
        assert!(ssim(&img, &img, 8, 8).is_nan(), "an 8×8 image has no interior for an 11×11 window");
    }
}
