#!/usr/bin/env python3
"""Turns a MindEye2 checkpoint (`last.pth`) into a mirage-rt model folder (architecture mindeye2).

    export_mindeye2.py CHECKPOINT.pth OUT [--vae DIFFUSERS_VAE_DIR] [--subject K]

Reads the checkpoint's `model_state_dict` (or the state dict itself; DDP's `module.` prefixes
are dropped), keeps the subject's ridge `ridge.linears.K`, the backbone's mixer blocks,
`backbone_linear`, `clip_proj` and, when present, the blurry branch (`blin1`, `bnorm`,
`bupsampler`) under their own key names, infers the widths from their shapes (V and h from the
ridge, the blocks, T and D from `backbone_linear` and `clip_proj`, the upsampler's channels from
its convolutions) and writes OUT/model.safetensors (float32) and OUT/config.json. With --vae, a
diffusers AutoencoderKL folder (Stable Diffusion's VAE) is copied to OUT/vae (its decoder as
float32 safetensors) to turn the blurry latent into a picture. The diffusion prior and
`b_maps_projector` (a training loss's) are left out. Needs PyTorch and NumPy.
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_sklearn import write_safetensors  # noqa: E402


def blurry_config(tensors):
    """The blurry branch's shape from its tensors (diffusers' Decoder: 32 groups, as MindEye2 uses)."""
    need = ["backbone.bnorm.weight", "backbone.bupsampler.conv_in.weight", "backbone.bupsampler.conv_out.weight",
            "backbone.bupsampler.up_blocks.0.resnets.0.conv1.weight"]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise SystemExit(f"backbone.blin1 without the rest of the blurry branch: no {', '.join(missing)}")
    channels = tensors["backbone.bnorm.weight"].shape[0]
    side = math.isqrt(tensors["backbone.blin1.weight"].shape[0] // channels)
    if channels * side * side != tensors["backbone.blin1.weight"].shape[0]:
        raise SystemExit(f"blin1's {tensors['backbone.blin1.weight'].shape[0]} outputs are not {channels} square maps")
    up = "backbone.bupsampler."
    blocks = sorted({int(k[len(up):].split(".")[1]) for k in tensors if k.startswith(up + "up_blocks.")})
    # up_blocks run from the lowest resolution; block_out_channels lists them the other way.
    outs = [tensors[f"{up}up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in blocks][::-1]
    resnets = {int(k[len(up):].split(".")[3]) for k in tensors if k.startswith(up + "up_blocks.0.resnets.")}
    return {"channels": int(channels), "side": int(side), "upsampler": {
        "in_channels": int(tensors[up + "conv_in.weight"].shape[1]),
        "out_channels": int(tensors[up + "conv_out.weight"].shape[0]),
        "block_out_channels": [int(c) for c in outs], "layers_per_block": len(resnets) - 1, "norm_num_groups": 32}}


def copy_vae(src, out):
    """Copies a diffusers AutoencoderKL folder's config and decoder weights (float32 safetensors)."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    st = os.path.join(src, "diffusion_pytorch_model.safetensors")
    if os.path.exists(st):
        from safetensors.numpy import load_file
        weights = load_file(st)
    else:
        weights = {k: v.float().numpy() for k, v in
                   torch.load(os.path.join(src, "diffusion_pytorch_model.bin"), map_location="cpu").items()}
    keep = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()
            if k.startswith(("decoder.", "post_quant_conv."))}
    if not any(k.startswith("decoder.conv_in.") for k in keep):
        raise SystemExit(f"{src}: no decoder.conv_in weights: not an AutoencoderKL folder")
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "diffusion_pytorch_model.safetensors"), keep)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--subject", type=int, default=0, help="which ridge.linears.K reads this subject (default 0)")
    p.add_argument("--vae", help="a diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-mse) for pictures")
    a = p.parse_args()

    ckpt = torch.load(a.checkpoint, map_location="cpu")
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    ridge = f"ridge.linears.{a.subject}"
    if f"{ridge}.weight" not in state:
        have = sorted({k.rsplit(".", 2)[0] for k in state if k.startswith("ridge.linears.")})
        raise SystemExit(f"{a.checkpoint}: no {ridge}.weight (ridges: {have})")
    keep = re.compile(rf"^({re.escape(ridge)}|backbone\.(mixer_blocks[12]|backbone_linear|clip_proj|blin1|bnorm|bupsampler))\.")
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
    blurry = blurry_config(tensors) if "backbone.blin1.weight" in tensors else None
    if a.vae and blurry is None:
        raise SystemExit(f"--vae: {a.checkpoint} has no blurry branch (backbone.blin1) to make pictures from")
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    config = {"architecture": "mindeye2", "n_voxels": int(n_voxels), "hidden": int(hidden), "seq_len": int(seq_len),
              "n_blocks": int(n_blocks), "clip_tokens": int(out_features // clip_dim), "clip_dim": int(clip_dim),
              "subject": a.subject, "blurry": blurry, "vae": "vae" if a.vae else None,
              "provenance": {"tool": "tools/export_mindeye2.py", "checkpoint": os.path.basename(a.checkpoint)}}
    if a.vae:
        copy_vae(a.vae, os.path.join(a.out, "vae"))
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(json.dumps({k: v for k, v in config.items() if k != "provenance"}))


if __name__ == "__main__":
    main()
