//! `mirage train`, `mirage decode` and `mirage eval`: the decoder's offline tools.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::decode::align::{Adapter, RunStats};
use crate::decode::metrics;
use crate::decode::model::{device, Decoder, FusionConfig};
use crate::decode::train::{train as fit, write_model, NamedTensor, Targets, TrainOptions};
use crate::io::npy::{read_npy, write_npy};
use crate::io::tsv;

/// Largest array read from an `.npy` (values).
const MAX_VALUES: usize = 1 << 31;

/// Reads every `NAME.npy` of a folder (sorted by name), or every array of an `.npz`.
pub fn read_arrays(path: &Path) -> anyhow::Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy"))
            .collect();
        files.sort();
        for f in files {
            let name = f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            let (shape, values) = read_npy(&f, MAX_VALUES).map_err(|e| anyhow::anyhow!(e))?;
            out.push(NamedTensor { name, shape, values });
        }
    } else {
        let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
        let mut zip = zip::ZipArchive::new(file)
            .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
        let mut names: Vec<String> = zip.file_names().map(String::from).collect();
        names.sort();
        for name in names {
            let mut entry = zip.by_name(&name)?;
            if entry.size() > 8 * MAX_VALUES as u64 {
                anyhow::bail!("{}: {name} is too large", path.display());
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            std::io::Read::read_to_end(&mut entry, &mut bytes)?;
            let (shape, values) = crate::io::npy::parse_npy(&bytes, MAX_VALUES)
                .map_err(|e| anyhow::anyhow!("{}: {name}: {e}", path.display()))?;
            out.push(NamedTensor { name: name.trim_end_matches(".npy").to_string(), shape, values });
        }
    }
    if out.is_empty() {
        anyhow::bail!("{}: no arrays", path.display());
    }
    Ok(out)
}

/// Reads a `trials × voxels` betas array.
pub fn read_betas(path: &Path) -> anyhow::Result<(usize, usize, Vec<f32>)> {
    let (shape, values) = read_npy(path, MAX_VALUES).map_err(|e| anyhow::anyhow!(e))?;
    match shape.as_slice() {
        [n, v] => Ok((*n, *v, values)),
        s => anyhow::bail!("{}: betas must be 2-D (trials × voxels), got {s:?}", path.display()),
    }
}

/// Peak resident memory of this process in MB (Linux `VmHWM`).
pub fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `mirage train` options.
#[derive(Clone, Debug)]
pub struct TrainArgs {
    /// Betas, trials × voxels.
    pub betas: PathBuf,
    /// Targets folder or `.npz`, one array per head with one row per trial.
    pub targets: PathBuf,
    /// Model folder to write.
    pub out: PathBuf,
    /// Mask NIfTI the betas' voxels come from (recorded so live masks are checked).
    pub mask: Option<PathBuf>,
    /// Ridge options.
    pub opts: TrainOptions,
}

/// Trains one ridge head per target array and writes the model folder.
pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (n, v, x) = read_betas(&args.betas)?;
    let arrays = read_arrays(&args.targets)?;
    let targets: Vec<Targets> = arrays
        .into_iter()
        .map(|NamedTensor { name, shape, values }| {
            if shape.first() != Some(&n) {
                anyhow::bail!("targets {name}: {shape:?} does not have {n} rows (one per trial)");
            }
            Ok(Targets { name, shape: shape[1..].to_vec(), values })
        })
        .collect::<anyhow::Result<_>>()?;
    let trained = fit(&x, n, v, &targets, &args.opts)?;
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let has = |h: &str| names.contains(&h).then(|| h.to_string());
    let mut weights = BTreeMap::new();
    for h in ["image", "retrieval"] {
        if names.contains(&h) {
            weights.insert(h.to_string(), 1.0);
        }
    }
    let fusion = FusionConfig {
        t: 0.5,
        image_head: has("image"),
        text_head: has("text"),
        pixel_head: has("pixels"),
        retrieval_weights: weights,
    };
    let provenance = serde_json::json!({
        "tool": concat!("mirage-rt ", env!("CARGO_PKG_VERSION"), " train"),
        "betas": args.betas.display().to_string(),
        "targets": args.targets.display().to_string(),
        "trials": n,
        "zscore": args.opts.zscore,
        "rank": args.opts.rank,
    });
    // Unconditional embeddings: the mean training target (no image, no caption).
    let mean_of = |name: &str| {
        targets.iter().find(|t| t.name == name).map(|t| {
            let out = t.values.len() / n;
            (0..out)
                .map(|j| (0..n).map(|i| t.values[i * out + j]).sum::<f32>() / n as f32)
                .collect::<Vec<f32>>()
        })
    };
    let (cfg, mut tensors) = trained.into_model(fusion, provenance);
    if let Some(u) = mean_of("image") {
        tensors.push(NamedTensor { name: "fusion.u_img".into(), shape: vec![u.len()], values: u });
    }
    if let Some(u) = mean_of("text") {
        tensors.push(NamedTensor { name: "fusion.u_txt".into(), shape: vec![u.len()], values: u });
    }
    if let Some(mask) = &args.mask {
        let img = crate::io::nifti::read_nifti(mask, 1 << 26)?;
        let voxels: Vec<f32> =
            img.volumes[0].iter().enumerate().filter(|(_, w)| **w > 0.0).map(|(i, _)| i as f32).collect();
        if voxels.len() != v {
            anyhow::bail!("--mask {} has {} voxels, the betas {v}", mask.display(), voxels.len());
        }
        tensors.push(NamedTensor { name: "input.voxels".into(), shape: vec![v], values: voxels });
    }
    write_model(&args.out, &cfg, tensors)?;
    eprintln!(
        "mirage: trained {} heads on {n} trials × {v} voxels in {:.1} s (peak memory {:.0} MB); wrote {}",
        cfg.heads.len(),
        started.elapsed().as_secs_f64(),
        peak_memory_mb().unwrap_or(f64::NAN),
        args.out.display()
    );
    Ok(())
}

/// How `mirage decode` renormalises outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Renorm {
    /// With the statistics stored in the model (what the live stage does).
    Stored,
    /// With this batch's prediction statistics (MIRAGE's `normalize_preds` exactly).
    Batch,
    /// Raw head outputs.
    None,
}

/// Where per-run statistics come from in an offline decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunStatsFrom {
    /// Every row of the file (one run).
    All,
    /// The rows up to and including each one, as the live stage has them.
    Running,
}

/// `mirage decode` with a MindEye2 model folder: `backbone.npy` and `clip_voxels.npy`
/// `[n, T, D]`; with the blurry branch `blurry_latent.npy` `[n, 4, 28, 28]`; with a VAE also
/// `blurry_image.npy` `[n, 3, H, W]` (unclamped) and `blurry_NNN.png` per trial.
fn decode_mindeye2(
    model: &Path,
    cfg: crate::decode::mindeye2::Config,
    betas: &Path,
    out: &Path,
    dev: &candle_core::Device,
) -> anyhow::Result<()> {
    let (n, v, x) = read_betas(betas)?;
    if v != cfg.n_voxels {
        anyhow::bail!("{}: {v} voxels, the model takes {}", betas.display(), cfg.n_voxels);
    }
    let net = crate::decode::mindeye2::MindEye2::load_dir(model, cfg, dev, candle_core::DType::F32)?;
    let outputs = net.forward(&net.input(&x, n)?)?;
    let picture = outputs.blurry_latent.as_ref().map(|l| net.picture(l)).transpose()?.flatten();
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let arrays = [
        ("backbone", Some(&outputs.backbone)),
        ("clip_voxels", Some(&outputs.clip_voxels)),
        ("blurry_latent", outputs.blurry_latent.as_ref()),
        ("blurry_image", picture.as_ref()),
    ];
    for (name, t) in arrays.into_iter().filter_map(|(name, t)| t.map(|t| (name, t))) {
        let shape = t.dims().to_vec();
        let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        write_npy(out.join(format!("{name}.npy")), &shape, &values)?;
    }
    if let Some(p) = &picture {
        for i in 0..n {
            let png = crate::decode::image::png_of_signed(&p.get(i)?)?;
            std::fs::write(out.join(format!("blurry_{i:03}.png")), png)?;
        }
    }
    eprintln!("mirage: {n} trials through mindeye2 -> {}", out.display());
    Ok(())
}

/// Decodes every row of a betas file (one run) and writes `HEAD.npy` per head; an adapter
/// that normalises with the run's statistics takes them from the file, as `run_stats` says.
pub fn decode(
    model: &Path,
    betas: &Path,
    out: &Path,
    renorm: Renorm,
    device_spec: &str,
    align: &str,
    run_stats: RunStatsFrom,
) -> anyhow::Result<()> {
    let dev = device(device_spec)?;
    if let Some(cfg) = crate::decode::mindeye2::Config::load_if_mindeye2(model)? {
        if align != "none" || renorm != Renorm::Stored {
            anyhow::bail!("a mindeye2 model decodes betas as given: --align none, --renorm stored");
        }
        return decode_mindeye2(model, cfg, betas, out, &dev);
    }
    let decoder = Decoder::load(model, &dev)?;
    let (n, v, x) = read_betas(betas)?;
    if v != decoder.cfg.n_voxels {
        anyhow::bail!("{}: {v} voxels, the model takes {}", betas.display(), decoder.cfg.n_voxels);
    }
    let adapter = Adapter::parse(align, &decoder)?;
    let adjusts = adapter.adjusts();
    if renorm != Renorm::Stored && adjusts.iter().any(Option::is_some) {
        anyhow::bail!("--align {align}: a calibrated alignment corrects the stored renormalisation; use --renorm stored");
    }
    // Normalised inputs, all rows at once or row by row with the statistics so far.
    let mut stats = RunStats::default();
    let z = if !adapter.uses_run_stats() {
        adapter.normalise(&decoder, &decoder.input(&x, n)?, None)?
    } else if run_stats == RunStatsFrom::All {
        x.chunks_exact(v).for_each(|row| stats.push("file", row));
        let s = stats.get();
        adapter.normalise(
            &decoder,
            &decoder.input(&x, n)?,
            s.as_ref().map(|(m, s)| (m.as_slice(), s.as_slice())),
        )?
    } else {
        let rows = x
            .chunks_exact(v)
            .map(|row| {
                stats.push("file", row);
                let s = stats.get();
                adapter
                    .normalise(
                        &decoder,
                        &decoder.input(row, 1)?,
                        s.as_ref().map(|(m, s)| (m.as_slice(), s.as_slice())),
                    )
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        candle_core::Tensor::cat(&rows, 0)?
    };
    std::fs::create_dir_all(out)?;
    for (i, head) in decoder.heads.iter().enumerate() {
        let y = match renorm {
            Renorm::None => head.forward(&z)?,
            Renorm::Stored => head.predict(&z, adjusts.get(i).and_then(Option::as_ref))?,
            Renorm::Batch => {
                let r = head.forward(&z)?;
                let mean = r.mean_keepdim(0)?;
                let centred = r.broadcast_sub(&mean)?;
                let std = (centred.sqr()?.sum_keepdim(0)? / (n.max(2) - 1) as f64)?.sqrt()?;
                head.renormalise(&r, Some((&mean.squeeze(0)?, &std.squeeze(0)?)))?
            }
        };
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        write_npy(
            out.join(format!("{}.npy", head.cfg.name)),
            &[vec![n], head.cfg.shape.clone()].concat(),
            &values,
        )?;
    }
    eprintln!("mirage: decoded {n} trials into {} heads in {}", decoder.heads.len(), out.display());
    Ok(())
}

/// Reads per-sample condition labels from a TSV with a `condition` or `trial_type` column.
fn read_conditions(path: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let table = tsv::read(path)?;
    if table.header.is_empty() {
        anyhow::bail!("{}: empty conditions file", path.display());
    }
    let col = table
        .header
        .iter()
        .position(|h| h == "condition" || h == "trial_type")
        .with_context(|| format!("{}: no condition or trial_type column", path.display()))?;
    let labels: Vec<String> = table.rows.iter().map(|r| r.get(col).unwrap_or("").to_string()).collect();
    if labels.len() != n {
        anyhow::bail!("{}: {} labels for {n} samples", path.display(), labels.len());
    }
    Ok(labels)
}

/// A grayscale `h × w` image from a `[h, w]`, `[1, h, w]` or `[3, h, w]` array (skimage's
/// `rgb2gray` weights), or `None` for other shapes.
fn grayscale(values: &[f32], shape: &[usize]) -> Option<(Vec<f32>, usize, usize)> {
    match shape {
        [h, w] | [1, h, w] if *h > 1 && *w > 1 => Some((values.to_vec(), *h, *w)),
        [3, h, w] if *h > 1 && *w > 1 => {
            let p = h * w;
            Some((
                (0..p)
                    .map(|i| 0.2125 * values[i] + 0.7154 * values[p + i] + 0.0721 * values[2 * p + i])
                    .collect(),
                *h,
                *w,
            ))
        }
        _ => None,
    }
}

/// Computes the metrics of predictions against truth per condition and writes a JSON report.
pub fn eval(
    pred: &Path,
    truth: &Path,
    conditions: Option<&Path>,
    out: &Path,
) -> anyhow::Result<serde_json::Value> {
    let preds = read_arrays(pred)?;
    let truths: BTreeMap<String, NamedTensor> =
        read_arrays(truth)?.into_iter().map(|t| (t.name.clone(), t)).collect();
    let n = preds[0].shape.first().copied().unwrap_or(0);
    let labels = match conditions {
        Some(c) => read_conditions(c, n)?,
        None => vec!["all".to_string(); n],
    };
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    labels.iter().enumerate().for_each(|(i, l)| groups.entry(l.clone()).or_default().push(i));
    let mut report = serde_json::Map::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<10} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "condition", "head", "n", "2-way", "top-1", "PixCorr", "SSIM"
    );
    for (cond, rows) in &groups {
        let mut heads = serde_json::Map::new();
        for NamedTensor { name, shape, values } in &preds {
            let Some(NamedTensor { shape: tshape, values: tvalues, .. }) = truths.get(name) else { continue };
            if tshape != shape || shape.first() != Some(&n) {
                anyhow::bail!(
                    "{name}: prediction shape {shape:?} and truth shape {tshape:?} must match, {n} rows each"
                );
            }
            let per: usize = shape[1..].iter().product();
            let pick =
                |v: &[f32]| rows.iter().map(|&i| v[i * per..(i + 1) * per].to_vec()).collect::<Vec<_>>();
            let (p, t) = (pick(values), pick(tvalues));
            let mut m = serde_json::Map::new();
            let (two, top) = (metrics::two_way(&p, &t), metrics::top1(&p, &t));
            m.insert("two_way".into(), serde_json::json!(two));
            m.insert("top1".into(), serde_json::json!(top));
            // Image-shaped heads also get PixCorr (all pixels) and SSIM (grayscale).
            let (mut pc, mut ss) = (f64::NAN, f64::NAN);
            let image_shape = &shape[1..];
            if !p.is_empty() && grayscale(&p[0], image_shape).is_some() {
                pc = metrics::pixcorr(&p, &t);
                let mut total = 0.0;
                for (a, b) in p.iter().zip(&t) {
                    if let (Some((a, h, w)), Some((b, _, _))) =
                        (grayscale(a, image_shape), grayscale(b, image_shape))
                    {
                        total += metrics::ssim(&a, &b, h, w);
                    }
                }
                ss = total / p.len() as f64;
                m.insert("pixcorr".into(), serde_json::json!(pc));
                m.insert("ssim".into(), serde_json::json!(ss));
            }
            let f = |x: f64| if x.is_nan() { "-".to_string() } else { format!("{x:.3}") };
            let _ = writeln!(
                table,
                "{:<10} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9}",
                cond,
                name,
                rows.len(),
                f(two),
                f(top),
                f(pc),
                f(ss)
            );
            heads.insert(name.clone(), serde_json::Value::Object(m));
        }
        report.insert(cond.clone(), serde_json::json!({ "n": rows.len(), "heads": heads }));
    }
    // The seen → imagery drop, metric by metric.
    if let (Some(seen), Some(imag)) = (report.get("seen").cloned(), report.get("imagery").cloned()) {
        let mut drop = serde_json::Map::new();
        if let Some(heads) = seen["heads"].as_object() {
            for (h, metrics) in heads {
                let mut d = serde_json::Map::new();
                for (k, v) in metrics.as_object().into_iter().flatten() {
                    if let (Some(a), Some(b)) = (v.as_f64(), imag["heads"][h][k].as_f64()) {
                        d.insert(k.clone(), serde_json::json!(a - b));
                    }
                }
                drop.insert(h.clone(), serde_json::Value::Object(d));
            }
        }
        report.insert("seen_minus_imagery".into(), serde_json::Value::Object(drop));
    }
    print!("{table}");
    let report = serde_json::Value::Object(report);
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}
