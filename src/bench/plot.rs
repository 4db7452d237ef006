//! A self-contained SVG of a bench run: latency over time per stage and end to end, and the
//! trigger-to-feedback histogram. No fonts or scripts from outside: it opens offline.

use std::fmt::Write;

use super::BenchReport;

const W: f64 = 900.0;
const H: f64 = 620.0;
const COLOURS: [&str; 6] = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#e45756"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" upper bound for an axis.
fn nice(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|v| *v >= max).unwrap_or(10.0 * p)
}

/// The SVG document.
pub fn svg(r: &BenchReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let rate = r.setup.rate_hz.map_or("max".into(), |x| format!("{x} Hz"));
    let title = format!(
        "mirage bench {:?}, {} volumes via {} at {rate}, decode {} voxels — {}",
        r.setup.shape, r.setup.volumes, r.setup.ingest, r.setup.voxels_decoded, r.setup.date
    );
    let _ = write!(s, r#"<text x="20" y="22" font-size="14">{}</text>"#, escape(&title));

    // Panel 1: latency over time.
    let (x0, y0, pw, ph) = (70.0, 50.0, W - 110.0, 300.0);
    let mut series: Vec<(String, Vec<(f64, f64)>)> = r
        .stages
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let pts = r.volumes.iter().map(|v| (v.index as f64, v.stage_ms[k])).filter(|p| p.1.is_finite());
            (name.to_string(), pts.collect())
        })
        .collect();
    series.push((
        "trigger to feedback".into(),
        r.volumes.iter().filter_map(|v| v.trigger_to_feedback_ms().map(|t| (v.index as f64, t))).collect(),
    ));
    let xmax = r.volumes.iter().map(|v| v.index as f64).fold(1.0, f64::max);
    let ymax = nice(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)).fold(0.0, f64::max));
    axes(&mut s, x0, y0, pw, ph, xmax, ymax, "volume", "ms");
    for (k, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x0 + x / xmax * pw, y0 + ph - (y / ymax).min(1.0) * ph))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1" points="{}"/>"#,
                path.join(" ")
            );
        }
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            x0 + 10.0 + 130.0 * k as f64,
            y0 + ph + 36.0,
            x0 + 24.0 + 130.0 * k as f64,
            y0 + ph + 45.0,
            escape(name)
        );
    }

    // Panel 2: histogram of trigger-to-feedback.
    let (x0, y0, pw, ph) = (70.0, 430.0, W - 110.0, 150.0);
    let t2f: Vec<f64> = r.volumes.iter().filter_map(|v| v.trigger_to_feedback_ms()).collect();
    let hmax = nice(t2f.iter().copied().fold(0.0, f64::max));
    let bins = 60;
    let mut counts = vec![0usize; bins];
    for v in &t2f {
        counts[((v / hmax * bins as f64) as usize).min(bins - 1)] += 1;
    }
    let cmax = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    axes(&mut s, x0, y0, pw, ph, hmax, cmax, "trigger to feedback (ms)", "volumes");
    for (i, c) in counts.iter().enumerate() {
        let h = *c as f64 / cmax * ph;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#e45756"/>"##,
            x0 + i as f64 * pw / bins as f64,
            y0 + ph - h,
            pw / bins as f64 - 1.0,
            h
        );
    }
    let l = &r.trigger_to_feedback_ms;
    let _ = write!(
        s,
        r#"<text x="{}" y="{}">p50 {:.2} · p99 {:.2} · max {:.2} ms</text>"#,
        x0 + pw - 260.0,
        y0 + 14.0,
        l.p50,
        l.p99,
        l.max
    );
    s.push_str("</svg>\n");
    s
}

#[allow(clippy::too_many_arguments)]
fn axes(s: &mut String, x0: f64, y0: f64, w: f64, h: f64, xmax: f64, ymax: f64, xl: &str, yl: &str) {
    let _ = write!(
        s,
        r#"<g stroke="black" fill="none"><line x1="{x0}" y1="{}" x2="{}" y2="{}"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}"/></g>"#,
        y0 + h,
        x0 + w,
        y0 + h,
        y0 + h
    );
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x0 - 6.0,
            y0 + h - f * h + 4.0,
            fmt(f * ymax),
            x0 + f * w,
            y0 + h + 16.0,
            fmt(f * xmax)
        );
    }
    let _ =
        write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + w / 2.0, y0 + h + 30.0, xl);
    let _ = write!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        y0 + h / 2.0,
        y0 + h / 2.0,
        yl
    );
}

fn fmt(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
