#!/usr/bin/env python3
"""OpenNFT ROI-neurofeedback reference: numpy re-implementation, used only for comparison tests.

This is our own code. It re-implements the steps OpenNFT publishes for going from a per-volume
ROI mean to the feedback value it displays, so a test can give ours and this module the same
ROI means and compare them step by step and volume by volume. OpenNFT is not imported and no
OpenNFT code is copied. Each step says which OpenNFT source lines it follows; the full spec,
with file:line references, is tests/python/OPENNFT_STEPS.md.

Sources read (git commits):
  * OpenNFT/OpenNFT  master 7a7dc56480db105c35a75e487b7bb379d3f96779 (2025-09-24).
    On this default branch the signal path is still MATLAB, run from the Python GUI through
    the MATLAB engine: opennft/matlab/nfbPreprSig/{preprSig,modifKalman,scaleTimeSeries}.m,
    opennft/matlab/{nfbCalc,mainLoopEntry,setupProcParams,setupSPM}.m,
    opennft/matlab/utils/{arRegr,loadJsonProtocol}.m, opennft/matlab/nfbPreprVol/preprVol.m.
    This is flavor="matlab", the default.
  * OpenNFT/pyOpenNFT main 8317aecedee487c45c3f5d75cfd4bb3dea437356 (2025-07-11), the
    pure-Python port (MICCAI 2025): opennft/{mrtimeseries,modif_kalman,scale_time_series,
    nfbcalc,nftsession,utils}.py, projects/opennft_console_proj.py. This is flavor="python".
    It ports continuous PSC only (plus SVM). Intermittent PSC always uses the MATLAB rules.
  * OpenNFT/python-rtspm 087db3458799817f12de090b8aceceb7594d77ee rtspm/_spm_setup.py, and
    SPM12 spm_get_ons.m / spm_get_bf.m / spm_hrf.m / spm_Volterra.m / spm_fMRI_design.m,
    for the HRF-convolved task regressors (spm_block_design below).

Conventions: volumes are "normalized" (the nrSkipVol volumes are already dropped), so
roi_means[0] is OpenNFT's indVolNorm == 1. In every public argument, block on/offsets are
1-based and inclusive, as in OpenNFT's protocol JSON "OnOffsets". TR is in milliseconds
inside this module.

Script use:
  python3 tests/python/opennft_reference.py --in roi.json --out steps.json
  python3 tests/python/opennft_reference.py --self-test
"""

import argparse
import json
import math
import re
import sys

import numpy as np

OPENNFT_COMMIT = "7a7dc56480db105c35a75e487b7bb379d3f96779"
PYOPENNFT_COMMIT = "8317aecedee487c45c3f5d75cfd4bb3dea437356"
RTSPM_COMMIT = "087db3458799817f12de090b8aceceb7594d77ee"
FLAVORS = ("matlab", "python")

# OpenNFT defaults (setupProcParams.m, preprSig.m, GUI defaults in opennft.py)
DEFAULTS = {
    "flavor": "matlab",
    "ar1": 0.2,                 # P.aAR1 (setupProcParams.m:167), a_ar1 (opennft.config.yaml:5)
    "cglm_ar1": True,           # P.cglmAR1 (setupProcParams.m:155)
    "iglm_ar1": True,           # P.iglmAR1: task design columns are AR(1)-filtered (setupProcParams.m:229)
    "nr_blocks_in_sliding_window": 100,   # setupProcParams.m:86 ("i.e. disabled")
    "prot": "Cont",             # "Cont" | "ContTask" | "Inter"
    "feedback_type": "PSC",     # "PSC" | "Corr" (Corr only for Inter, MATLAB)
    "roi_anat_operation": "mean(norm_percValues)",   # GUI default (opennft.py:2258)
    "max_feedback_val": 100.0,  # GUI default (opennft.py:2289)
    "min_feedback_val": -100.0, # GUI default (opennft.py:2290)
    "feedback_val_dec": 0,      # GUI default (opennft.py:2291)
    "neg_feedback": False,      # GUI default (opennft.py:2292)
    "n_feedback_rois": None,    # loopNrROIs; None = all. With rtQA on, OpenNFT appends a
                                # whole-brain ROI that is processed but not used for feedback.
    "motion_subtract_first": True,  # preprVol.m:93-97 offsetMCParam
    "motion_missing": "zeros",  # motion None -> zeros (what OpenNFT would do) | "omit"
    "n_vols_total": None,       # NrOfVolumes - nrSkipVol; None = len(roi_means)
    "nr_bas_fct": None,         # P.nrBasFct; None = number of task columns
    "design_conditions": None,  # which block lists enter the SPM design; None = auto
    "nf_run_nr": 1,             # P.NFRunNr (intermittent reward shaping only)
    "prev_act_values": [],      # P.prev_actValue (intermittent reward shaping, NFRunNr > 1)
}


# ---------------------------------------------------------------------------------------------
# MATLAB-compatible numerics
# ---------------------------------------------------------------------------------------------

def matlab_round(x, n=0):
    """MATLAB round(x, n): rounds half away from zero (numpy rounds half to even)."""
    x = float(x)
    if not math.isfinite(x):
        return x
    s = 10.0 ** int(n)
    return math.copysign(math.floor(abs(x) * s + 0.5), x) / s


def round_half_even(x, n=0):
    """numpy.round(x, decimals=n), as used by pyOpenNFT."""
    return float(np.round(float(x), decimals=int(n)))


def std_flavor(x, flavor):
    """MATLAB std (N-1, and std of one value = 0) vs pyOpenNFT np.std (N)."""
    x = np.asarray(x, dtype=float).ravel()
    if flavor == "python":
        return float(np.std(x))
    if x.size <= 1:
        return 0.0
    return float(np.std(x, ddof=1))


def zscore_cols(x):
    """MATLAB zscore(X) along columns (N-1 std, zero std -> 1). utils.zscore in pyOpenNFT agrees."""
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[0] == 1:
        return np.zeros_like(x)
    mu = x.mean(axis=0)
    sd = x.std(axis=0, ddof=1)
    sd[sd == 0] = 1.0
    return (x - mu) / sd


def pinv_flavor(a, flavor):
    """MATLAB pinv (tol = max(m,n)*eps(max sv)) vs numpy pinv (rcond 1e-15 * max sv)."""
    a = np.asarray(a, dtype=float)
    if flavor == "python":
        return np.linalg.pinv(a)
    if a.size == 0:
        return np.zeros((a.shape[1], a.shape[0]))
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    tol = max(a.shape) * np.spacing(s.max()) if s.size else 0.0
    keep = s > tol
    return (vt[keep].T / s[keep]) @ u[:, keep].T


def ar_regr(a, x):
    """arRegr.m:15-23 / utils.ar_regr: y(1) = (1-a) x(1); y(t) = x(t) - a*y(t-1), per column.

    Note this is a recursive (IIR) filter on the output, not the usual x(t) - a*x(t-1).
    """
    x = np.asarray(x, dtype=float)
    one_d = x.ndim == 1
    if one_d:
        x = x[:, None]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        y[t] = (1.0 - a) * x[t] if t == 0 else x[t] - a * y[t - 1]
    return y[:, 0] if one_d else y


def n_vol_delay(tr_ms):
    """nfbCalc.m:40: nVolDelay = ceil(6000 / P.TR), TR in ms."""
    return int(math.ceil(6000.0 / float(tr_ms)))


# ---------------------------------------------------------------------------------------------
# SPM12 canonical-HRF block design (setupSPM.m -> spm_fMRI_design), used for the task regressors
# ---------------------------------------------------------------------------------------------

def _gamma_pdf(u, h, l):
    """spm_Gpdf(u, h, l) for h > 1 (shape h, rate l); 0 at u = 0."""
    u = np.asarray(u, dtype=float)
    f = np.zeros_like(u)
    q = u > 0
    f[q] = np.exp((h - 1.0) * np.log(u[q]) + h * np.log(l) - l * u[q] - math.lgamma(h))
    return f


def spm_hrf(rt, fmri_t=16, p=(6, 16, 1, 1, 6, 0, 32)):
    """spm_hrf.m (SPM12): canonical HRF sampled every `rt` seconds, sum 1."""
    dt = rt / fmri_t
    u = np.arange(0, int(math.ceil(p[6] / dt)) + 1, dtype=float) - p[5] / dt
    hrf = _gamma_pdf(u, p[0] / p[2], dt / p[2]) - _gamma_pdf(u, p[1] / p[3], dt / p[3]) / p[4]
    hrf = hrf[np.arange(0, int(math.floor(p[6] / rt)) + 1) * fmri_t]
    return hrf / hrf.sum()


def spm_block_design(condition_blocks, n_scans, tr_ms, fmri_t=16, fmri_t0=1):
    """SPM.xX.X without the constant column, as OpenNFT builds it (setupSPM.m:23-74).

    condition_blocks: list (one per condition) of [[on, off], ...], 1-based inclusive volumes
    as in the protocol JSON. OpenNFT passes ons = on (1-based) to SPM, which counts scans
    from 0, and dur = off - on + 1 (setupSPM.m:54-55), so the modelled box starts one TR
    later than the intended block. This is reproduced on purpose. Units 'scans', T = 16,
    T0 = 1, hrf basis, first-order Volterra. Returns (n_scans, n_conditions), not filtered.
    """
    rt = float(tr_ms) / 1000.0
    dt = rt / fmri_t
    bf = spm_hrf(dt, fmri_t)                     # spm_get_bf.m: spm_hrf(dt, [], fMRI_T)
    k = int(n_scans)
    tr_units = fmri_t * dt                       # spm_get_ons.m: UNITS 'scans' -> TR = T*dt
    cols = []
    for blocks in condition_blocks:
        blocks = np.asarray(blocks, dtype=float).reshape(-1, 2)
        ons = blocks[:, 0]
        dur = blocks[:, 1] - blocks[:, 0] + 1.0
        n_sf = k * fmri_t + 128
        sf = np.zeros(n_sf)
        ton = np.floor(ons * tr_units / dt + 0.5).astype(int) + 33      # 1-based bins
        tof = np.floor(dur * tr_units / dt + 0.5).astype(int) + ton + 1
        ton = np.maximum(ton, 1)
        tof = np.maximum(tof, 1)
        for j in range(len(ton)):
            if n_sf > ton[j]:
                sf[ton[j] - 1] += 1.0
            if n_sf > tof[j]:
                sf[tof[j] - 1] -= 1.0
        sf = np.cumsum(sf)[: k * fmri_t + 32]
        x = np.convolve(sf, bf)[: len(sf)]       # spm_Volterra.m: conv, keep 1:length(x)
        rows = np.arange(k) * fmri_t + fmri_t0 + 32   # 1-based (spm_fMRI_design.m)
        cols.append(x[rows - 1])
    if not cols:
        return np.zeros((k, 0))
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# Protocol handling (loadJsonProtocol.m / nftsession.set_protocol)
# ---------------------------------------------------------------------------------------------

def _blocks(lst):
    return [(int(a), int(b)) for a, b in (lst or [])]


def _runs(vols):
    """Group sorted 1-based volume numbers into contiguous runs (loadJsonProtocol.m:63-64)."""
    out = []
    for v in vols:
        if out and v == out[-1][-1] + 1:
            out[-1].append(v)
        else:
            out.append([v])
    return [np.array(r, dtype=int) for r in out]


def build_protocol(blocks, n_vols, prot="Cont", flavor="matlab", nr_blocks_in_sliding_window=100):
    """Encode the conditions as OpenNFT does.

    blocks: {"baseline": [[on,off],...] (optional), "regulation": [...],
             "display": [...] (Inter, condition 3) or "task": [...] (ContTask, condition 3)}.
    Returns dict with vect_enc_cond (index t-1 -> condition of volume t), baseline_blocks
    (list of arrays of 1-based volumes, ProtCond{1}), regulation_blocks (ProtCond{2}),
    third_blocks (ProtCond{3}), bas_block_length and sl_wind (scaleTimeSeries inputs).
    """
    reg = _blocks(blocks.get("regulation"))
    third = _blocks(blocks.get("display") or blocks.get("task"))
    bas_explicit = _blocks(blocks.get("baseline"))
    vec = np.ones(n_vols, dtype=int)
    for on, off in reg:
        vec[on - 1:off] = 2
    for on, off in third:
        vec[on - 1:off] = 3
    reg_arr = [np.arange(on, off + 1) for on, off in reg]
    third_arr = [np.arange(on, off + 1) for on, off in third]
    bas_inds = np.nonzero(vec == 1)[0] + 1
    if flavor == "python":
        # nftsession.py:99-115: baseline i = cond-1 volumes before regulation block i (after
        # block i-1), plus the trailing run after the last regulation block. Explicit
        # baselines are not supported by the port and are ignored.
        bas = []
        for i, (on, off) in enumerate(reg):
            if i == 0:
                bas.append(bas_inds[bas_inds < on])
            else:
                bas.append(bas_inds[(bas_inds > reg[i - 1][1]) & (bas_inds < on)])
        if reg:
            tail = bas_inds[bas_inds > reg[-1][1]]
            if len(tail):
                bas.append(tail)
        bas_block_length = (reg[0][0] - 1) if reg else 0   # nftsession.py:294-295
        sl_wind = bas_block_length * nr_blocks_in_sliding_window
    else:
        if bas_explicit:
            # explicit 'BAS' condition: ProtCond{1} = its blocks, basBlockLength = OnOffsets(1,2)
            for on, off in bas_explicit:
                vec[on - 1:off] = 1
            bas = [np.arange(on, off + 1) for on, off in bas_explicit]
            bas_block_length = bas_explicit[0][1]
        else:
            bas = _runs(list(bas_inds))
            bas_block_length = int(bas[0][-1]) if bas else 0   # loadJsonProtocol.m:68
        sl_wind = bas_block_length * nr_blocks_in_sliding_window
    return {
        "vect_enc_cond": vec,
        "baseline_blocks": bas,
        "regulation_blocks": reg_arr,
        "third_blocks": third_arr,
        "bas_block_length": int(bas_block_length),
        "sl_wind": int(sl_wind),
        "prot": prot,
    }


# ---------------------------------------------------------------------------------------------
# Step 2: cumulative GLM (preprSig.m:139-269 / mrtimeseries.py:110-194)
# ---------------------------------------------------------------------------------------------

def regressor_stage(t, regr_step):
    """Which regressors enter at 1-based volume t (preprSig.m:177-231).

    1: constant             t <  regr_step
    2: + linear trend       regr_step   <= t < 2*regr_step
    3: + 6 motion (zscored) 2*regr_step <= t < 3*regr_step
    4: + task design        t >= 3*regr_step (task betas fitted but not subtracted)
    """
    if t < regr_step:
        return 1
    if t < 2 * regr_step:
        return 2
    if t < 3 * regr_step:
        return 3
    return 4


def cglm_residual(y_upto_t, t, lin_regr, motion, task_ar, regr_step, ar1=0.2, cglm_ar1=True,
                  flavor="matlab", use_motion=True):
    """Residual at volume t of the cumulative nuisance GLM on y(1..t) (already AR(1)-filtered).

    lin_regr: zscore(1..N) column (N = planned run length); motion: (>=t, 6) with row 0 already
    1e-5; task_ar: (>=t, k) AR(1)-filtered design or None. Returns (residual_t, stage,
    n_columns, betas).
    """
    y = np.asarray(y_upto_t, dtype=float).reshape(-1, 1)
    stage = regressor_stage(t, regr_step)
    cols = [np.ones((t, 1))]
    if stage >= 2:
        cols.append(np.asarray(lin_regr[:t], dtype=float).reshape(-1, 1))
    if stage >= 3 and use_motion:
        cols.append(zscore_cols(np.asarray(motion[:t], dtype=float)))
    x = np.hstack(cols)
    if cglm_ar1:
        x = ar_regr(ar1, x)
    n_nuis = x.shape[1]
    if stage == 4 and task_ar is not None and task_ar.shape[1] > 0:
        full = np.hstack([x, np.asarray(task_ar[:t], dtype=float)])
        beta = pinv_flavor(full, flavor) @ y
        resid = y - x @ beta[:n_nuis]          # task betas replaced by zeros (preprSig.m:214-217)
        n_cols = full.shape[1]
    else:
        beta = pinv_flavor(x, flavor) @ y
        resid = y - x @ beta
        n_cols = n_nuis
    return float(resid[-1, 0]), stage, int(n_cols), beta[:, 0]


# ---------------------------------------------------------------------------------------------
# Step 3: modified Kalman filter (modifKalman.m / modif_kalman.py)
# ---------------------------------------------------------------------------------------------

def modified_kalman_step(kalm_th, kalm_in, state, f_pos, f_neg):
    """One call of modifKalman.m:28-69. state = {"x","P","Q","R"} (scalars, A = H = I = 1).

    Returns (kalm_out, new_state, f_pos, f_neg, diff). A spike is |diff| >= kalm_th. The
    first spike in a direction is rejected (output = prediction, x and P roll back to the
    prediction) and that direction's counter is incremented. A second consecutive spike
    in the same direction (counter >= 1) is accepted and resets that counter. A non-spike
    resets both counters.
    """
    s = dict(state)
    s["x"] = s["x"]
    s["P"] = s["P"] + s["Q"]
    denom = s["P"] + s["R"]
    k = s["P"] * (1.0 / denom if denom != 0 else 0.0)      # pinv of a scalar
    tmp_x, tmp_p = s["x"], s["P"]
    diff = k * (kalm_in - s["x"])
    s["x"] = s["x"] + diff
    s["P"] = (1.0 - k) * s["P"]
    if abs(diff) < kalm_th:
        out = s["x"]
        f_pos, f_neg = 0, 0
    elif diff > 0:
        if f_pos < 1:
            out = tmp_x
            s["x"], s["P"] = tmp_x, tmp_p
            f_pos += 1
        else:
            out = s["x"]
            f_pos = 0
    else:
        if f_neg < 1:
            out = tmp_x
            s["x"], s["P"] = tmp_x, tmp_p
            f_neg += 1
        else:
            out = s["x"]
            f_neg = 0
    return float(out), s, int(f_pos), int(f_neg), float(diff)


def modified_kalman(glm_series, flavor="matlab", sigma=None):
    """modifKalman applied online as preprSig.m:309-333 does it.

    At every volume t: sigma_t = std(glm(1..t)) (MATLAB N-1, so 0 at t=1; python: N),
    Q = 0.25 sigma^2, R = sigma^2, threshold = 0.9 sigma. The initial state is x = 0,
    P = 0, counters 0 (setupProcParams.m:88-99). If `sigma` is given (a number) it is used
    at every volume instead (for hand checks). Returns a dict of per-volume arrays.
    """
    g = np.asarray(glm_series, dtype=float).ravel()
    n = g.size
    out = {k: np.zeros(n) for k in ("kalman", "sigma", "Q", "R", "threshold", "diff", "x", "P")}
    out["spike_pos"] = np.zeros(n, dtype=int)
    out["spike_neg"] = np.zeros(n, dtype=int)
    st = {"x": 0.0, "P": 0.0, "Q": 0.0, "R": 0.0}
    fp = fn = 0
    for t in range(n):
        sd = float(sigma) if sigma is not None else std_flavor(g[: t + 1], flavor)
        st["Q"] = 0.25 * sd ** 2
        st["R"] = sd ** 2
        th = 0.9 * sd
        y, st, fp, fn, d = modified_kalman_step(th, g[t], st, fp, fn)
        out["kalman"][t], out["sigma"][t], out["Q"][t], out["R"][t] = y, sd, st["Q"], st["R"]
        out["threshold"][t], out["diff"][t], out["x"][t], out["P"][t] = th, d, st["x"], st["P"]
        out["spike_pos"][t], out["spike_neg"][t] = fp, fn
    return out


# ---------------------------------------------------------------------------------------------
# Step 4: scaling (scaleTimeSeries.m / scale_time_series.py)
# ---------------------------------------------------------------------------------------------

def scale_limits_raw(series, flavor="matlab"):
    """tmp_max / tmp_min of scaleTimeSeries.m:44-54 on kalman(1..t), t = len(series)."""
    s = np.sort(np.asarray(series, dtype=float).ravel())
    t = s.size
    if t < 21:                                   # MATLAB indVol < 21 == python ind_vol < 20
        return float(s.max()), float(s.min()), None
    v = 0.05 * t
    if flavor == "python":
        nr = int(np.round(v))                    # half to even
        top = s[-nr - 2:-1]                      # scale_time_series.py:56, excludes the maximum
    else:
        nr = int(math.floor(v + 0.5))            # MATLAB round, half away from zero
        top = s[t - nr - 1:]                     # s(end-nrElem:end)
    bottom = s[: nr + 1]                         # s(1:nrElem+1)
    return float(np.median(top)), float(np.median(bottom)), nr


def scale_time_series_step(kalman_upto_t, t, sl_wind, init_lim, tmp_pos_min, tmp_pos_max,
                           vect_enc_cond, bas_block_length, flavor="matlab", auto_rtqa=False):
    """scaleTimeSeries.m:44-107 at 1-based volume t. Returns (scaled, pos_min, pos_max, nr_elem)."""
    k = np.asarray(kalman_upto_t, dtype=float).ravel()
    tmp_max, tmp_min, nr = scale_limits_raw(k, flavor)
    cur = k[t - 1]
    if flavor == "python":
        idx = t - 1                               # 0-based ind_vol in the port
        first = (bas_block_length <= 0) or (idx <= bas_block_length) or (idx < sl_wind)
    else:
        idx = t
        first = auto_rtqa or (idx <= bas_block_length) or (idx < sl_wind)
    if first:
        pos_max = tmp_max if tmp_max > init_lim else init_lim
        pos_min = tmp_min if tmp_min < -init_lim else -init_lim
    else:
        if flavor == "python":
            win = k[idx - sl_wind + 1:idx]        # scale_time_series.py:74-75, excludes t
        else:
            win = k[t - sl_wind:t]
        chk_max, chk_min = float(np.max(win)), float(np.min(win))
        cond_changed = vect_enc_cond[t - 1] != vect_enc_cond[t - 2]
        if t - (1 if flavor == "python" else 0) > bas_block_length and cond_changed:
            pos_max = chk_max if tmp_max > chk_max else tmp_max
            pos_min = chk_min if tmp_min < chk_min else tmp_min
        else:
            pos_max, pos_min = tmp_pos_max, tmp_pos_min
            if cur > pos_max:
                pos_max = cur
            if flavor == "python":
                if cur > pos_min:                # scale_time_series.py:89 ('>' in the port)
                    pos_min = cur
            elif cur < pos_min:
                pos_min = cur
    with np.errstate(divide="ignore", invalid="ignore"):
        den = pos_max - pos_min
        out = (cur - pos_min) / den if den != 0 else (np.nan if cur - pos_min == 0 else
                                                      math.copysign(math.inf, cur - pos_min))
    if out != out:                               # isnan -> 0 (scaleTimeSeries.m:105-107)
        out = 0.0
    return float(out), float(pos_min), float(pos_max), nr


def scale_time_series(kalman_series, init_lim, vect_enc_cond=None, bas_block_length=None,
                      sl_wind=None, flavor="matlab"):
    """Online scaling of one ROI's Kalman series. init_lim: scalar or per-volume array."""
    k = np.asarray(kalman_series, dtype=float).ravel()
    n = k.size
    lim = np.broadcast_to(np.asarray(init_lim, dtype=float), (n,))
    vec = np.ones(n, dtype=int) if vect_enc_cond is None else np.asarray(vect_enc_cond)
    bbl = n if bas_block_length is None else bas_block_length
    slw = bbl * 100 if sl_wind is None else sl_wind
    res = {"scaled": np.zeros(n), "pos_min": np.zeros(n), "pos_max": np.zeros(n),
           "nr_elem": [None] * n}
    pmin = pmax = 0.0                            # setupProcParams.m:102-107
    for t in range(1, n + 1):
        y, pmin, pmax, nr = scale_time_series_step(k[:t], t, slw, lim[t - 1], pmin, pmax, vec,
                                                   bbl, flavor)
        res["scaled"][t - 1], res["pos_min"][t - 1], res["pos_max"][t - 1] = y, pmin, pmax
        res["nr_elem"][t - 1] = nr
    return res


# ---------------------------------------------------------------------------------------------
# Steps 1-4 composed: preprSig
# ---------------------------------------------------------------------------------------------

def _prepare_motion(motion, n, subtract_first, missing):
    if motion is None:
        if missing == "omit":
            return None
        m = np.zeros((n, 6))
    else:
        m = np.array(motion, dtype=float).reshape(-1, 6)[:n].copy()
        if subtract_first:
            m = m - m[0]                          # preprVol.m:93-97 (offsetMCParam)
    m[0, :] = 1e-5                                # preprSig.m:141 / mrtimeseries.py:135-136
    return m


def preprocess(roi_means, motion=None, task=None, ar1=0.2, cglm_ar1=True, iglm_ar1=True,
               n_vols_total=None, nr_bas_fct=None, bas_block_length=None, sl_wind=None,
               vect_enc_cond=None, nr_blocks_in_sliding_window=100, flavor="matlab",
               motion_subtract_first=True, motion_missing="zeros"):
    """preprSig.m for Type PSC, online, per volume and per ROI.

    roi_means: (T, n_rois) (or (T,)). motion: (T, 6) realignment parameters [x y z pitch roll
    yaw] (mm, rad) or None. task: raw SPM design columns (no constant, not filtered),
    (>=T, k), or None. Returns a dict of (T, n_rois) arrays: raw, displ_raw, init_lim,
    raw_ar1, glm, regr_stage, n_regressors, sigma, kalman_threshold, kalman_diff,
    kalman, kalman_x, kalman_P, spike_pos, spike_neg, pos_min, pos_max, scaled,
    scale_nr_elem. Also the (T,) arrays mpos_min / mpos_max, and "params".
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}")
    raw = np.asarray(roi_means, dtype=float)
    if raw.ndim == 1:
        raw = raw[:, None]
    n, nr = raw.shape
    n_total = int(n_vols_total or n)
    if n_total < n:
        raise ValueError("n_vols_total must be >= number of volumes")
    lin = zscore_cols(np.arange(1, n_total + 1, dtype=float))[:, 0]   # setupProcParams.m:187
    mot = _prepare_motion(motion, n, motion_subtract_first, motion_missing)
    if task is not None:
        task = np.asarray(task, dtype=float)
        if task.ndim == 1:
            task = task[:, None]
        task_ar = ar_regr(ar1, task) if iglm_ar1 else task
    else:
        task_ar = None
    nbf = int(nr_bas_fct if nr_bas_fct is not None else (0 if task is None else task.shape[1]))
    regr_step = nbf + 8                           # preprSig.m:54, 175
    vec = np.ones(n, dtype=int) if vect_enc_cond is None else np.asarray(vect_enc_cond)
    bbl = n_total if bas_block_length is None else int(bas_block_length)
    slw = bbl * nr_blocks_in_sliding_window if sl_wind is None else int(sl_wind)

    keys = ["raw", "displ_raw", "init_lim", "raw_ar1", "glm", "regr_stage", "n_regressors",
            "sigma", "kalman_threshold", "kalman_diff", "kalman", "kalman_x", "kalman_P",
            "spike_pos", "spike_neg", "pos_min", "pos_max", "scaled", "scale_nr_elem"]
    r = {k: np.full((n, nr), np.nan) for k in keys}
    r["raw"][:] = raw
    ar = np.zeros((n, nr))
    kal_state = [{"x": 0.0, "P": 0.0, "Q": 0.0, "R": 0.0} for _ in range(nr)]
    fpos = [0] * nr
    fneg = [0] * nr
    pmin = [0.0] * nr
    pmax = [0.0] * nr
    mpos_min = np.zeros(n)
    mpos_max = np.zeros(n)
    for t in range(1, n + 1):
        i = t - 1
        for j in range(nr):
            r["init_lim"][i, j] = 0.005 * float(np.mean(raw[:t, j]))       # preprSig.m:133
            r["displ_raw"][i, j] = raw[i, j] - raw[0, j]                  # preprSig.m:136-137
            if cglm_ar1:                                                  # preprSig.m:157-171
                ar[i, j] = (1 - ar1) * raw[0, j] if t == 1 else raw[i, j] - ar1 * ar[i - 1, j]
            else:
                ar[i, j] = raw[i, j]
            r["raw_ar1"][i, j] = ar[i, j]
            g, stage, ncol, _ = cglm_residual(ar[:t, j], t, lin, mot, task_ar, regr_step, ar1,
                                              cglm_ar1, flavor, use_motion=mot is not None)
            r["glm"][i, j], r["regr_stage"][i, j], r["n_regressors"][i, j] = g, stage, ncol
        for j in range(nr):                                               # preprSig.m:309-358
            sd = std_flavor(r["glm"][:t, j], flavor)
            kal_state[j]["Q"] = 0.25 * sd ** 2
            kal_state[j]["R"] = sd ** 2
            th = 0.9 * sd
            y, kal_state[j], fpos[j], fneg[j], d = modified_kalman_step(
                th, r["glm"][i, j], kal_state[j], fpos[j], fneg[j])
            r["sigma"][i, j], r["kalman_threshold"][i, j], r["kalman_diff"][i, j] = sd, th, d
            r["kalman"][i, j], r["kalman_x"][i, j] = y, kal_state[j]["x"]
            r["kalman_P"][i, j] = kal_state[j]["P"]
            r["spike_pos"][i, j], r["spike_neg"][i, j] = fpos[j], fneg[j]
            sc, pmin[j], pmax[j], nel = scale_time_series_step(
                r["kalman"][:t, j], t, slw, r["init_lim"][i, j], pmin[j], pmax[j], vec, bbl,
                flavor)
            r["scaled"][i, j], r["pos_min"][i, j], r["pos_max"][i, j] = sc, pmin[j], pmax[j]
            r["scale_nr_elem"][i, j] = np.nan if nel is None else nel
        mpos_min[i] = float(np.mean(r["pos_min"][i, :]))                 # preprSig.m:365-366
        mpos_max[i] = float(np.mean(r["pos_max"][i, :]))
    r["mpos_min"] = mpos_min
    r["mpos_max"] = mpos_max
    r["params"] = {"regr_step": regr_step, "nr_bas_fct": nbf, "n_vols_total": n_total,
                   "bas_block_length": bbl, "sl_wind": slw, "ar1": ar1, "flavor": flavor,
                   "motion_used": mot is not None}
    return r


# ---------------------------------------------------------------------------------------------
# Step 5: feedback (nfbCalc.m / nfbcalc.py)
# ---------------------------------------------------------------------------------------------

_FUNCS = {"mean": np.mean, "median": np.median, "sum": np.sum, "max": np.max, "min": np.min,
          "abs": np.abs, "std": lambda v: std_flavor(v, "matlab"), "sqrt": np.sqrt}


def roi_anat_operation(expr, norm_perc_values):
    """eval(P.RoiAnatOperation) (nfbCalc.m:78, 163) for the usual MATLAB expressions.

    Supports `norm_percValues` (the vector), `norm_percValues(k)` (1-based element),
    mean/median/sum/max/min/abs/std/sqrt, + - * / and numbers. Differential feedback is
    e.g. "norm_percValues(1) - norm_percValues(2)". expr may also be a Python callable.
    """
    v = np.asarray(norm_perc_values, dtype=float).ravel()
    if callable(expr):
        return float(expr(v))
    e = re.sub(r"norm_percValues\s*\(\s*(\d+)\s*\)", lambda m: f"_v[{int(m.group(1)) - 1}]", expr)
    e = re.sub(r"\bnorm_percValues\b", "_v", e)
    if re.search(r"[^\w\s\.\+\-\*/\(\)\[\],]", e):
        raise ValueError(f"unsupported RoiAnatOperation: {expr!r}")
    ns = dict(_FUNCS)
    ns["_v"] = v
    return float(eval(e, {"__builtins__": {}}, ns))  # noqa: S307 - restricted namespace


def display_value(fb_value, max_feedback_val=100.0, min_feedback_val=-100.0,
                  feedback_val_dec=0, neg_feedback=False, flavor="matlab"):
    """dispValue = round(Max*fb, dec), then clipped (nfbCalc.m:79-89 / nfbcalc.py:130-137).

    MATLAB: if ~NegFeedback && d < 0 -> 0; elseif NegFeedback && d < Min -> Min; d > Max -> Max.
    python: the second test reads `not neg_feedback and d < min` (so with NegFeedback there
    is no lower clip), and rounding is half to even.
    """
    x = max_feedback_val * fb_value
    if flavor == "python":
        d = round_half_even(x, feedback_val_dec)
        if not neg_feedback and d < 0:
            d = 0.0
        elif not neg_feedback and d < min_feedback_val:
            d = float(min_feedback_val)
    else:
        d = matlab_round(x, feedback_val_dec)
        if not neg_feedback and d < 0:
            d = 0.0
        elif neg_feedback and d < min_feedback_val:
            d = float(min_feedback_val)
    if d > max_feedback_val:
        d = float(max_feedback_val)
    return d


def _median_or_nan(x):
    x = np.asarray(x, dtype=float)
    return float(np.median(x)) if x.size else float("nan")


def continuous_baseline_vols(block_nf, baseline_blocks, tr_ms, flavor="matlab"):
    """Baseline volumes (1-based) used for the continuous-PSC reference.

    MATLAB (nfbCalc.m:60-69): ProtCond{1}{blockNF}(1)+nVolDelay : ProtCond{1}{blockNF}(end).
    For blockNF >= 2 the loop re-assigns rather than appends, so only baseline block #blockNF
    is used (the comment says "cumulated", but the code does not do that since commit 8db7aff).
    python (nfbcalc.py:119-121): the concatenation over i = 0..block_nf (0-based) of
    prot_cond[0][i][2:]. Those are 1-based volume numbers used as 0-based indices, so the
    volumes are (bas_start+3) .. (bas_end+1) of every baseline block so far.
    block_nf is 1-based for MATLAB and 0-based for python.
    """
    if flavor == "python":
        vols = []
        for i in range(0, block_nf + 1):
            vols.extend(int(v) + 1 for v in baseline_blocks[i][2:])   # 0-based idx -> 1-based vol
        return vols
    d = n_vol_delay(tr_ms)
    b = baseline_blocks[block_nf - 1]
    return list(range(int(b[0]) + d, int(b[-1]) + 1))


def continuous_psc(scaled_upto_t, t, condition, block_nf, baseline_blocks, regulation_blocks,
                   tr_ms, roi_operation="mean(norm_percValues)", n_feedback_rois=None,
                   max_feedback_val=100.0, min_feedback_val=-100.0, feedback_val_dec=0,
                   neg_feedback=False, flavor="matlab"):
    """Continuous PSC feedback at 1-based volume t (nfbCalc.m:43-114 / nfbcalc.py:108-152).

    scaled_upto_t: (>=t, n_rois) scalProcTimeSeries. block_nf: the state before this
    volume (MATLAB 1-based, 0 = none yet; python 0-based, initial 0). Returns a dict with
    block_nf (new state), norm_perc_values (None outside regulation), fb_value (vectNFBs(t)),
    disp_value, baseline_vols, error (str or None).
    """
    s = np.asarray(scaled_upto_t, dtype=float)
    if s.ndim == 1:
        s = s[:, None]
    nroi = s.shape[1] if n_feedback_rois is None else int(n_feedback_rois)
    out = {"block_nf": block_nf, "norm_perc_values": None, "fb_value": 0.0, "disp_value": 0.0,
           "baseline_vols": None, "error": None}
    if condition != 2:
        return out
    onsets = [int(b[0]) for b in regulation_blocks]
    if flavor == "python":
        if (t - 1) in [o - 1 for o in onsets]:
            block_nf = [o - 1 for o in onsets].index(t - 1)
    elif t in onsets:
        block_nf = onsets.index(t) + 1
    out["block_nf"] = block_nf
    try:
        if flavor == "matlab" and block_nf < 1:
            raise IndexError("regulation volume before any regulation onset (blockNF = 0)")
        vols = continuous_baseline_vols(block_nf, baseline_blocks, tr_ms, flavor)
    except IndexError as exc:
        out["error"] = f"baseline block missing: {exc}"
        out["fb_value"] = out["disp_value"] = float("nan")
        return out
    out["baseline_vols"] = vols
    if any(v > t or v < 1 for v in vols):
        out["error"] = "baseline volume not yet acquired (OpenNFT would fail with an index error)"
        out["fb_value"] = out["disp_value"] = float("nan")
        return out
    idx = [v - 1 for v in vols]
    norm = [float(s[t - 1, j] - _median_or_nan(s[idx, j])) for j in range(nroi)]
    out["norm_perc_values"] = norm
    fb = float(np.median(norm)) if flavor == "python" else roi_anat_operation(roi_operation, norm)
    out["fb_value"] = fb
    out["disp_value"] = display_value(fb, max_feedback_val, min_feedback_val, feedback_val_dec,
                                      neg_feedback, flavor)
    return out


def intermittent_psc(scaled_upto_t, t, condition, state, baseline_blocks, regulation_blocks,
                     mpos_min_t, mpos_max_t, tr_ms, roi_operation="mean(norm_percValues)",
                     n_feedback_rois=None, max_feedback_val=100.0, min_feedback_val=-100.0,
                     feedback_val_dec=0, neg_feedback=False, feedback_type="PSC", nf_run_nr=1,
                     prev_act_values=()):
    """Intermittent feedback at 1-based volume t (mainLoopEntry.m:81-97 + nfbCalc.m:117-239).

    MATLAB rules only (pyOpenNFT does not port it). state: {"block_nf", "first_nf",
    "disp_value", "flag_end_psc", "act_values": {}}, carried between volumes. The value is
    computed at the last volume of regulation block k:
      i_NF  = NF_k(1)+d : NF_k(end);  i_BAS = BAS_k(1)+d : BAS_k(end)
      (k >= 2: i_BAS += BAS_k(end)+1 : BAS_k(end)+d-1),  d = ceil(6000/TR)
      norm_r = (median(scal_r(i_NF)) - median(scal_r(i_BAS))) / (mposMax(t) - mposMin(t))
    It is shown at that volume and held through the following condition-3 (display) volumes.
    """
    st = dict(state)
    st["act_values"] = dict(state.get("act_values", {}))
    s = np.asarray(scaled_upto_t, dtype=float)
    if s.ndim == 1:
        s = s[:, None]
    nroi = s.shape[1] if n_feedback_rois is None else int(n_feedback_rois)
    # mainLoopEntry.m:81-97 (before the volume is processed)
    if condition in (1, 2):
        st["flag_end_psc"] = 0
        st["disp_value"] = 0.0
    elif condition == 3:
        st["flag_end_psc"] = 1
    res = {"norm_perc_values": None, "fb_value": 0.0, "baseline_vols": None, "cond_vols": None,
           "reg_success": None, "error": None}
    disp = st["disp_value"]
    if condition == 2:
        ends = [int(b[-1]) for b in regulation_blocks]
        if t in ends:
            st["block_nf"] = ends.index(t) + 1
            st["first_nf"] = t
            st["flag_end_psc"] = 1
        if st["first_nf"] == t:
            k = st["block_nf"]
            d = n_vol_delay(tr_ms)
            nf = regulation_blocks[k - 1]
            i_nf = list(range(int(nf[0]) + d, int(nf[-1]) + 1))
            try:
                b = baseline_blocks[k - 1]
            except IndexError:
                res["error"] = "baseline block missing"
                b = None
            if b is not None:
                i_bas = list(range(int(b[0]) + d, int(b[-1]) + 1))
                if k >= 2:
                    if not i_bas:
                        res["error"] = "empty baseline index (OpenNFT would fail at i_blockBAS(end))"
                    else:
                        i_bas += list(range(i_bas[-1] + 1, i_bas[-1] + d))
                res["baseline_vols"], res["cond_vols"] = i_bas, i_nf
                if any(v > t or v < 1 for v in i_bas + i_nf):
                    res["error"] = "volume not yet acquired (OpenNFT would fail with an index error)"
            if res["error"]:
                fb = float("nan")
                norm = None
            elif feedback_type == "Corr":
                ib = [v - 1 for v in res["baseline_vols"]]
                ic = [v - 1 for v in i_nf]
                rho_b = float(np.corrcoef(s[ib, 0], s[ib, 1])[0, 1])
                rho_c = float(np.corrcoef(s[ic, 0], s[ic, 1])[0, 1])
                fb = rho_c - rho_b
                norm = [fb] * nroi
            else:
                ib = [v - 1 for v in res["baseline_vols"]]
                ic = [v - 1 for v in i_nf]
                rng = mpos_max_t - mpos_min_t
                norm = []
                for j in range(nroi):
                    m_bas = _median_or_nan(s[ib, j])
                    m_cond = _median_or_nan(s[ic, j])
                    with np.errstate(divide="ignore", invalid="ignore"):
                        mb = np.float64(m_bas - mpos_min_t) / np.float64(rng)
                        mc = np.float64(m_cond - mpos_min_t) / np.float64(rng)
                    norm.append(float(mc - mb))
                fb = roi_anat_operation(roi_operation, norm)
            res["norm_perc_values"] = norm
            res["fb_value"] = fb
            disp = display_value(fb, max_feedback_val, min_feedback_val, feedback_val_dec,
                                 neg_feedback, "matlab")
            # reward shaping (nfbCalc.m:185-216), does not change the displayed value
            st["act_values"][k] = fb
            act = [st["act_values"].get(i, 0.0) for i in range(1, k + 1)]
            succ = 0
            if nf_run_nr == 1:
                if k == 1:
                    succ = int(act[0] > 0.5)
                else:
                    prev = act[k - 2] if k == 2 else (float(np.median(act[k - 3:k - 1])) if k == 3
                                                      else float(np.median(act[k - 4:k - 1])))
                    succ = int(0.9 * act[k - 1] >= prev)
            else:
                allv = list(prev_act_values) + act
                prev = float(np.median(allv[len(allv) - 4:len(allv) - 1]))
                succ = int(0.9 * act[k - 1] >= prev)
            res["reg_success"] = succ
    st["disp_value"] = disp if st["flag_end_psc"] else 0.0
    res["disp_value"] = st["disp_value"]
    res["block_nf"] = st["block_nf"]
    return res, st


# ---------------------------------------------------------------------------------------------
# Whole pipeline
# ---------------------------------------------------------------------------------------------

def run_opennft(roi_means, tr_ms, blocks, motion=None, task=None, options=None):
    """Preprocessing plus feedback per volume, online (the value at t uses only volumes <= t).

    Returns {"params":..., "per_roi": {name: (T, n_rois)}, "per_volume": {name: (T,) or list}}.
    The planned run length (n_vols_total) and the protocol are known in advance, as in OpenNFT.
    """
    o = dict(DEFAULTS)
    o.update(options or {})
    flavor = o["flavor"]
    raw = np.asarray(roi_means, dtype=float)
    if raw.ndim == 1:
        raw = raw[:, None]
    n = raw.shape[0]
    n_total = int(o["n_vols_total"] or n)
    prot = build_protocol(blocks, n_total, o["prot"], flavor, o["nr_blocks_in_sliding_window"])
    if task is None:
        names = o["design_conditions"]
        if names is None:
            names = ["regulation"] + [c for c in ("display", "task") if blocks.get(c)]
        cond_blocks = [blocks[c] for c in names if blocks.get(c)]
        task = spm_block_design(cond_blocks, n_total, tr_ms) if cond_blocks else None
    pre = preprocess(raw, motion=motion, task=task, ar1=o["ar1"], cglm_ar1=o["cglm_ar1"],
                     iglm_ar1=o["iglm_ar1"], n_vols_total=n_total, nr_bas_fct=o["nr_bas_fct"],
                     bas_block_length=prot["bas_block_length"], sl_wind=prot["sl_wind"],
                     vect_enc_cond=prot["vect_enc_cond"],
                     nr_blocks_in_sliding_window=o["nr_blocks_in_sliding_window"], flavor=flavor,
                     motion_subtract_first=o["motion_subtract_first"],
                     motion_missing=o["motion_missing"])
    fbk = {k: [None] * n for k in ("condition", "block_nf", "norm_perc_values", "fb_value",
                                   "disp_value", "baseline_vols", "cond_vols", "reg_success",
                                   "error")}
    common = dict(roi_operation=o["roi_anat_operation"], n_feedback_rois=o["n_feedback_rois"],
                  max_feedback_val=float(o["max_feedback_val"]),
                  min_feedback_val=float(o["min_feedback_val"]),
                  feedback_val_dec=int(o["feedback_val_dec"]), neg_feedback=bool(o["neg_feedback"]))
    block_nf = 0
    ist = {"block_nf": 0, "first_nf": 0, "disp_value": 0.0, "flag_end_psc": 0, "act_values": {}}
    for t in range(1, n + 1):
        c = int(prot["vect_enc_cond"][t - 1])
        fbk["condition"][t - 1] = c
        if o["prot"] in ("Cont", "ContTask"):
            r = continuous_psc(pre["scaled"][:t], t, c, block_nf, prot["baseline_blocks"],
                               prot["regulation_blocks"], tr_ms, flavor=flavor, **common)
            block_nf = r["block_nf"]
        elif o["prot"] == "Inter":
            r, ist = intermittent_psc(pre["scaled"][:t], t, c, ist, prot["baseline_blocks"],
                                      prot["regulation_blocks"], pre["mpos_min"][t - 1],
                                      pre["mpos_max"][t - 1], tr_ms,
                                      feedback_type=o["feedback_type"], nf_run_nr=o["nf_run_nr"],
                                      prev_act_values=o["prev_act_values"], **common)
        else:
            raise ValueError("prot must be Cont, ContTask or Inter")
        for k in fbk:
            if k != "condition" and k in r:
                fbk[k][t - 1] = r[k]
    params = dict(pre.pop("params"))
    params.update({"flavor": flavor, "prot": o["prot"], "tr_ms": tr_ms,
                   "n_vol_delay": n_vol_delay(tr_ms),
                   "intermittent_rules": "matlab",
                   "baseline_blocks": [[int(b[0]), int(b[-1])] if len(b) else [] for b in
                                       prot["baseline_blocks"]],
                   "opennft_commit": OPENNFT_COMMIT, "pyopennft_commit": PYOPENNFT_COMMIT,
                   "options": {k: v for k, v in o.items()}})
    per_volume = {"mpos_min": pre.pop("mpos_min"), "mpos_max": pre.pop("mpos_max")}
    per_volume.update(fbk)
    return {"params": params, "per_roi": pre, "per_volume": per_volume, "task_design": task}


# ---------------------------------------------------------------------------------------------
# JSON I/O
# ---------------------------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    return x


def run_from_json(doc):
    if "tr_ms" in doc:
        tr_ms = float(doc["tr_ms"])
    else:
        tr_ms = float(int(round(float(doc["tr"]) * 1000.0)))   # "tr" in seconds; OpenNFT TR is integer ms
    opts = dict(doc.get("options") or {})
    res = run_opennft(doc["roi_means"], tr_ms, doc.get("blocks") or {}, motion=doc.get("motion"),
                      task=doc.get("task"), options=opts)
    per_roi = {}
    for k, v in res["per_roi"].items():
        per_roi[k] = v
    for k in ("regr_stage", "n_regressors", "spike_pos", "spike_neg"):
        per_roi[k] = np.asarray(per_roi[k]).astype(int)
    nel = np.asarray(per_roi["scale_nr_elem"])
    per_roi["scale_nr_elem"] = [[None if np.isnan(v) else int(v) for v in row] for row in nel]
    out = {
        "reference": "mirage-rt numpy re-implementation of OpenNFT ROI feedback (tests only)",
        "params": res["params"],
        "per_roi": per_roi,
        "per_volume": res["per_volume"],
        "task_design": None if res["task_design"] is None else res["task_design"],
    }
    return _jsonable(out)


# ---------------------------------------------------------------------------------------------
# Self-test (hand-checkable numbers)
# ---------------------------------------------------------------------------------------------

def self_test():
    fails = []

    def close(name, got, want, tol=1e-9):
        ok = np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), atol=tol,
                         rtol=0, equal_nan=True)
        print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": got {got}, want {want}"))
        if not ok:
            fails.append(name)

    # AR(1) recursion: y = [0.8, 1-0.16, 1-0.168]
    close("ar_regr ones", ar_regr(0.2, np.ones(3)), [0.8, 0.84, 0.832])
    # haemodynamic delay in volumes
    close("nVolDelay TR=1970/2000/1000/700", [n_vol_delay(1970), n_vol_delay(2000),
                                              n_vol_delay(1000), n_vol_delay(700)], [4, 3, 6, 9])
    # rounding: MATLAB half away from zero vs numpy half-even
    close("matlab_round", [matlab_round(2.5), matlab_round(-2.5), matlab_round(0.125, 2)],
          [3.0, -3.0, 0.13])
    close("round_half_even", [round_half_even(2.5), round_half_even(3.5)], [2.0, 4.0])

    # Kalman, fixed sigma = 1 (Q = .25, R = 1, th = .9), constant input 1:
    #  t1: P=.25, K=.2, diff=.2 -> x=.2, P=.2
    #  t2: P=.45, K=.45/1.45, diff=K*.8 -> x=.2+.8*.45/1.45
    k = modified_kalman([1, 1], sigma=1.0)
    close("kalman fixed sigma const", k["kalman"], [0.2, 0.2 + 0.8 * 0.45 / 1.45])
    close("kalman fixed sigma P", k["P"], [0.2, (1 - 0.45 / 1.45) * 0.45])
    # Kalman with OpenNFT's cumulative sigma on a constant: sigma = 0 -> K = 0, diff = 0,
    # |0| < 0 is false -> negative-spike branch: output stays at the initial state 0, and
    # the negative counter alternates 1, 0, 1, 0.
    k = modified_kalman([5.0, 5.0, 5.0, 5.0])
    close("kalman cumulative sigma const -> 0", k["kalman"], [0, 0, 0, 0])
    close("kalman const neg counter", k["spike_neg"], [1, 0, 1, 0])
    # First-large-step rule, sigma fixed 1, input [0,0,5,5]:
    #  t1, t2: diff 0 -> accepted. t3: diff = K3*5 >= .9 -> first positive spike: output
    #  prediction 0, counter 1, state rolled back. t4: spike again -> accepted, counter 0.
    k = modified_kalman([0, 0, 5, 5], sigma=1.0)
    p2 = (1 - 0.45 / 1.45) * 0.45
    p3 = p2 + 0.25
    k4 = (p3 + 0.25) / (p3 + 0.25 + 1)
    close("kalman spike rule output", k["kalman"], [0, 0, 0, k4 * 5])
    close("kalman spike rule counter", k["spike_pos"], [0, 0, 1, 0])

    # Scaling on a ramp 1..40 with init_lim 0.1:
    #  t <= 20: posMax = t, posMin = -0.1 -> scaled = 1
    #  t = 21: nrElem = round(1.05) = 1; MATLAB top = median(20,21) = 20.5 -> 21.1/20.6;
    #          python top = median(19,20) = 19.5 -> 21.1/19.6 (slice excludes the max)
    #  t = 30: nrElem = 2 (1.5 -> 2 both); MATLAB top = median(28,29,30)=29 -> 30.1/29.1
    #  t = 50: 0.05*50 = 2.5: MATLAB nrElem 3 (median(47..50)=48.5), python 2 (median(47..49)=48)
    ramp = np.arange(1, 51, dtype=float)
    sm = scale_time_series(ramp, 0.1)
    sp = scale_time_series(ramp, 0.1, flavor="python")
    close("scale ramp t<=20", sm["scaled"][:20], np.ones(20))
    close("scale ramp t=21 matlab", sm["scaled"][20], 21.1 / 20.6)
    close("scale ramp t=21 python", sp["scaled"][20], 21.1 / 19.6)
    close("scale ramp t=30 matlab", sm["scaled"][29], 30.1 / 29.1)
    close("scale ramp t=50 nrElem", [sm["nr_elem"][49], sp["nr_elem"][49]], [3, 2])
    close("scale ramp t=50 matlab", sm["scaled"][49], 50.1 / 48.6)
    close("scale ramp t=50 python", sp["scaled"][49], 50.1 / 48.1)

    # cGLM at t = 2 (stage 1, constant only) on raw [100.5, 101]:
    #  y = AR = [80.4, 84.92], X = AR(ones) = [.8, .84], beta = X'y/X'X, resid = y2 - .84*beta
    y = np.array([80.4, 84.92])
    beta = (0.8 * 80.4 + 0.84 * 84.92) / (0.64 + 0.84 ** 2)
    g, stage, ncol, _ = cglm_residual(y, 2, zscore_cols(np.arange(1, 11.0))[:, 0], None, None, 9)
    close("cglm t=2 residual", g, 84.92 - 0.84 * beta, 1e-9)
    # A pure linear trend is removed exactly once the trend regressor enters (t >= regr_step),
    # with zero motion (rank-deficient impulse columns, handled by pinv).
    n = 40
    lin_sig = 100.0 + 0.5 * np.arange(1, n + 1)
    pre = preprocess(lin_sig, n_vols_total=n)
    close("linear trend stage>=2 residual 0", pre["glm"][7:, 0], np.zeros(n - 7), 1e-8)
    # regr_step = 0 task columns + 8: t = 1..7 -> 1, 8..15 -> 2, 16..23 -> 3, >= 24 -> 4
    close("regressor stages (regr_step 8)", pre["regr_stage"][[0, 6, 7, 14, 15, 22, 23], 0],
          [1, 1, 2, 2, 3, 3, 4])

    # Continuous PSC: baseline 1..10, NF 11..20, TR 2000 -> d = 3 -> baseline vols 4..10.
    scal = np.zeros((20, 2))
    scal[:10, 0] = np.arange(10) / 10.0      # baseline median over vols 4..10 = 0.6
    scal[10:, 0] = 0.9
    scal[:, 1] = 0.5
    bas = [np.arange(1, 11)]
    reg = [np.arange(11, 21)]
    r = continuous_psc(scal[:11], 11, 2, 0, bas, reg, 2000.0,
                       roi_operation="norm_percValues(1) - norm_percValues(2)",
                       feedback_val_dec=2)
    close("cont PSC baseline vols", r["baseline_vols"], list(range(4, 11)))
    close("cont PSC norm", r["norm_perc_values"], [0.9 - 0.6, 0.0])
    close("cont PSC differential disp", r["disp_value"], 30.0)
    close("display clip", [display_value(1.7), display_value(-0.2),
                           display_value(-0.2, neg_feedback=True),
                           display_value(-2.0, neg_feedback=True)], [100, 0, -20, -100])

    # Online property: feeding a prefix gives identical values on that prefix.
    rng = np.random.default_rng(0)
    nv = 60
    rois = 1000 + rng.normal(0, 2, size=(nv, 2)) + np.linspace(0, 5, nv)[:, None]
    mot = rng.normal(0, 0.05, size=(nv, 6))
    blocks = {"regulation": [[11, 20], [31, 40], [51, 60]]}
    for fl in FLAVORS:
        full = run_opennft(rois, 2000.0, blocks, motion=mot,
                           options={"flavor": fl, "n_vols_total": nv})
        part = run_opennft(rois[:45], 2000.0, blocks, motion=mot[:45],
                           options={"flavor": fl, "n_vols_total": nv})
        close(f"online prefix scaled ({fl})", part["per_roi"]["scaled"],
              full["per_roi"]["scaled"][:45], 0)
        close(f"online prefix disp ({fl})", part["per_volume"]["disp_value"],
              full["per_volume"]["disp_value"][:45], 0)
    inter_blocks = {"regulation": [[11, 20], [31, 40], [51, 58]], "display": [[21, 22], [41, 42],
                                                                              [59, 60]]}
    full = run_opennft(rois, 2000.0, inter_blocks, motion=mot, options={"prot": "Inter"})
    dv = full["per_volume"]["disp_value"]
    held = dv[19] == dv[20] == dv[21]
    zero_elsewhere = all(v == 0 for i, v in enumerate(dv) if i not in (19, 20, 21, 39, 40, 41,
                                                                        57, 58, 59))
    close("intermittent held over display, 0 elsewhere", [held, zero_elsewhere], [True, True])

    # SPM design: HRF sums to 1 and peaks near 5 s; design is 0 before the (shifted) onset.
    h = spm_hrf(0.125)
    close("spm_hrf sum", h.sum(), 1.0, 1e-12)
    close("spm_hrf peak ~5 s", abs(np.argmax(h) * 0.125 - 5.0) < 0.5, True)
    x = spm_block_design([[[11, 20]]], 40, 2000.0)
    close("design zero before onset", x[:11, 0], np.zeros(11), 1e-12)

    print(f"\n{len(fails)} failure(s)")
    return 1 if fails else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in", dest="inp", help="input JSON (tr, roi_means, motion, blocks, options)")
    ap.add_argument("--out", help="output JSON (every step per volume)")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args(argv)
    if a.self_test:
        return self_test()
    if not a.inp or not a.out:
        ap.error("--in and --out are required (or --self-test)")
    with open(a.inp) as f:
        doc = json.load(f)
    out = run_from_json(doc)
    with open(a.out, "w") as f:
        json.dump(out, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
