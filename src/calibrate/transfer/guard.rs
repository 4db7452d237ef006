//! The guard's one-sided test: a component is kept only where its held-out gain is reliably
//! above zero (Student's t, from the normal quantile).

use super::report::Estimate;

impl Estimate {
    /// Whether the one-sided t-test at level `p` says the mean is above zero.
    pub(super) fn reliable(&self, p: f64) -> bool {
        if self.n < 2 || self.mean <= 0.0 {
            return false;
        }
        self.se == 0.0 || self.mean / self.se > student_t_quantile(1.0 - p, (self.n - 1) as f64)
    }
}

/// The quantile `q` of Student's t with `df` degrees of freedom (Cornish–Fisher expansion
/// around the normal quantile; within 0.01 of the exact value for df ≥ 3, q ≤ 0.99).
pub(super) fn student_t_quantile(q: f64, df: f64) -> f64 {
    let z = normal_quantile(q);
    let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
    z + (z3 + z) / (4.0 * df)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * df * df)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * df.powi(3))
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_t_quantile_matches_tables() {
        // One-sided 0.9 and 0.95 quantiles (scipy.stats.t.ppf).
        for (q, df, want) in
            [(0.9, 4.0, 1.5332), (0.9, 11.0, 1.3634), (0.95, 5.0, 2.0150), (0.95, 23.0, 1.7139)]
        {
            let got = student_t_quantile(q, df);
            assert!((got - want).abs() < 0.01, "t({q}, {df}) = {got}, want {want}");
        }
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-6);
    }
}
