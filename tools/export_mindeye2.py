#!/usr/bin/env python3
"""Turns a MindEye2 checkpoint (`last.pth`) into a mirage-rt model folder (architecture mindeye2).

    export_mindeye2.py CHECKPOINT.pth OUT [--subject K]

Reads the checkpoint's `model_state_dict` (or the state dict itself; DDP's `module.` prefixes
are dropped), keeps the subject's ridge `ridge.linears.K` and the backbone's mixer blocks,
`backbone_linear` and `clip_proj` under their own key names, infers the widths from their
shapes (V and h from the ridge, the blocks, T and D from `backbone_linear` and `clip_proj`) and
writes OUT/model.safetensors (float32) and OUT/config.json. The blurry-image branch and the
diffusion prior are left out. Needs PyTorch (to unpickle the checkpoint) and NumPy.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_sklearn import write_safetensors  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--subject", type=int, default=0, help="which ridge.linears.K reads this subject (default 0)")
    a = p.parse_args()

    ckpt = torch.load(a.checkpoint, map_location="cpu")
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    ridge = f"ridge.linears.{a.subject}"
    if f"{ridge}.weight" not in state:
        have = sorted({k.rsplit(".", 2)[0] for k in state if k.startswith("ridge.linears.")})
        raise SystemExit(f"{a.checkpoint}: no {ridge}.weight (ridges: {have})")
    keep = re.compile(rf"^({re.escape(ridge)}|backbone\.(mixer_blocks[12]|backbone_linear|clip_proj))\.")
    tensors = {k: v.float().numpy() for k, v in state.items() if keep.match(k)}
    hidden, n_voxels = tensors[f"{ridge}.weight"].shape
    n_blocks = len({k.split(".")[2] for k in tensors if k.startswith("backbone.mixer_blocks1.")})
    seq_len = tensors["backbone.mixer_blocks2.0.0.weight"].shape[0]
    clip_dim = tensors["backbone.clip_proj.0.weight"].shape[0]
    out_features = tensors["backbone.backbone_linear.weight"].shape[0]
    if out_features % clip_dim:
        raise SystemExit(f"backbone_linear has {out_features} outputs, not a multiple of clip_proj's width {clip_dim}")
    for k, v in tensors.items():
        if not np.isfinite(v).all():
            raise SystemExit(f"{k} is not finite")
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    config = {"architecture": "mindeye2", "n_voxels": int(n_voxels), "hidden": int(hidden), "seq_len": int(seq_len),
              "n_blocks": int(n_blocks), "clip_tokens": int(out_features // clip_dim), "clip_dim": int(clip_dim),
              "subject": a.subject,
              "provenance": {"tool": "tools/export_mindeye2.py", "checkpoint": os.path.basename(a.checkpoint)}}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(json.dumps({k: v for k, v in config.items() if k != "provenance"}))


if __name__ == "__main__":
    main()
