//! The canonical haemodynamic response function (SPM's double gamma) and its convolution
//! with a boxcar, in closed form.
//!
//! `h(t) = (g(t; 6) − g(t; 16) / 6) / (5/6)` for `t ≥ 0`, where `g(t; k)` is the gamma density
//! with shape `k` and unit scale: SPM's defaults (peak delay 6 s, undershoot 16 s, dispersion 1,
//! ratio 6), scaled to unit area so a sustained unit input settles at 1. Both shapes are
//! integers, so the response to a boxcar uses the exact gamma CDF and needs no sampling grid.

/// Shape of the response gamma (peak delay, s).
const PEAK_SHAPE: u32 = 6;
/// Shape of the undershoot gamma (s).
const UNDERSHOOT_SHAPE: u32 = 16;
/// Response-to-undershoot ratio.
const RATIO: f64 = 6.0;
/// Area of the unnormalised double gamma.
const AREA: f64 = 1.0 - 1.0 / RATIO;

/// Gamma density with integer shape `k` and unit scale at `t` (0 for `t ≤ 0`).
fn gamma_pdf(t: f64, k: u32) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    let ln = f64::from(k - 1) * t.ln() - t - ln_factorial(k - 1);
    ln.exp()
}

/// Gamma CDF with integer shape `k`, unit scale: `1 − e^{−t} Σ_{n<k} tⁿ/n!`.
fn gamma_cdf(t: f64, k: u32) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..k {
        term *= t / f64::from(n);
        sum += term;
    }
    (1.0 - (-t).exp() * sum).clamp(0.0, 1.0)
}

fn ln_factorial(n: u32) -> f64 {
    (2..=n).map(|i| f64::from(i).ln()).sum()
}

/// The canonical HRF at `t` seconds after an impulse (unit area).
pub fn canonical(t: f64) -> f64 {
    (gamma_pdf(t, PEAK_SHAPE) - gamma_pdf(t, UNDERSHOOT_SHAPE) / RATIO) / AREA
}

/// Integral of the canonical HRF from 0 to `t`.
fn canonical_integral(t: f64) -> f64 {
    (gamma_cdf(t, PEAK_SHAPE) - gamma_cdf(t, UNDERSHOOT_SHAPE) / RATIO) / AREA
}

/// Response at time `t` to a unit boxcar that starts at `onset` and lasts `duration` seconds
/// (an impulse of unit area when `duration` is 0).
pub fn boxcar_response(t: f64, onset: f64, duration: f64) -> f64 {
    let since = t - onset;
    if duration <= 0.0 {
        return canonical(since);
    }
    canonical_integral(since) - canonical_integral(since - duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_area_peak_and_undershoot() {
        // Riemann sum of the density matches the closed-form area.
        let dt = 1e-3;
        let area: f64 = (0..60_000).map(|i| canonical((i as f64 + 0.5) * dt) * dt).sum();
        assert!((area - 1.0).abs() < 1e-6, "{area}");
        // Peak near 5 s (mode of the difference), undershoot negative around 15 s.
        let peak = (0..30_000)
            .map(|i| i as f64 * 1e-3)
            .max_by(|a, b| canonical(*a).total_cmp(&canonical(*b)))
            .unwrap();
        assert!((4.5..5.5).contains(&peak), "{peak}");
        assert!(canonical(15.0) < 0.0);
        assert_eq!(canonical(-1.0), 0.0);
    }

    #[test]
    fn boxcar_is_the_integral_of_impulses() {
        let (onset, dur) = (3.0, 4.0);
        for t in [2.0, 5.0, 9.3, 20.0, 60.0] {
            let dt = 1e-3;
            let n = (dur / dt) as usize;
            let numeric: f64 = (0..n).map(|m| canonical(t - onset - (m as f64 + 0.5) * dt) * dt).sum();
            assert!((numeric - boxcar_response(t, onset, dur)).abs() < 1e-7, "t={t}");
        }
        // A long block settles at 1 while it lasts.
        assert!((boxcar_response(150.0, 0.0, 190.0) - 1.0).abs() < 1e-6);
    }
}
