"""A MindEye2-shaped checkpoint and PyTorch's outputs for it, for the decoder's equality tests.

usage: mindeye2_fixture.py DIR [--voxels V]
       mindeye2_fixture.py DIR --reference BETAS.npy OUT   (PyTorch's outputs for given betas)
Builds, from the published layer list (our own PyTorch code, random init at reduced width, the
LayerNorms' and GroupNorms' weights and biases perturbed so none is the identity), `MindEyeModule`
with `ridge.linears.0/1` (two subjects) and `backbone` (mixer blocks, backbone_linear, clip_proj,
the blurry branch at its published shape: blin1, bnorm and diffusers' Decoder as bupsampler, and
b_maps_projector, which the exporter must skip), and a small diffusers AutoencoderKL in DIR/vae
(save_pretrained, safetensors). Saves DIR/last.pth ({"model_state_dict": …}), DIR/betas.npy
[3, V] and PyTorch's outputs for subject 1 in eval mode: backbone.npy, clip_voxels.npy [3, T, D],
blurry_latent.npy [3, 4, 28, 28], blurry_image.npy [3, 3, 56, 56] (the VAE's decode of
latent / scaling_factor) for the batch of 3, and the same names with _1 for the first trial alone.
With --voxels the subject-1 ridge reads V betas (a live run's mask). With --reference it loads
DIR's checkpoint and VAE and writes OUT/NAME.npy for the rows of BETAS.npy (subject 1).
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import safetensors.torch  # noqa: F401  (diffusers 0.23 saves through it without importing it)
from diffusers import AutoencoderKL
from diffusers.models.vae import Decoder

H, T, D, BLOCKS, SEQ = 64, 4, 24, 2, 1
V = int(sys.argv[sys.argv.index("--voxels") + 1]) if "--voxels" in sys.argv else 200


def mlp(width):
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(0.15), nn.Linear(width, width))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer_blocks1 = nn.ModuleList([nn.Sequential(nn.LayerNorm(H), mlp(H)) for _ in range(BLOCKS)])
        self.mixer_blocks2 = nn.ModuleList([nn.Sequential(nn.LayerNorm(SEQ), mlp(SEQ)) for _ in range(BLOCKS)])
        self.backbone_linear = nn.Linear(H * SEQ, T * D)
        self.clip_proj = nn.Sequential(nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D), nn.LayerNorm(D), nn.GELU(),
                                       nn.Linear(D, D), nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D))
        self.blin1 = nn.Linear(H * SEQ, 4 * 28 * 28)
        self.bdropout = nn.Dropout(0.3)
        self.bnorm = nn.GroupNorm(1, 64)
        self.bupsampler = Decoder(in_channels=64, out_channels=4, up_block_types=["UpDecoderBlock2D"] * 3,
                                  block_out_channels=[32, 64, 128], layers_per_block=1)
        self.b_maps_projector = nn.Sequential(nn.Conv2d(64, 512, 1, bias=False), nn.GroupNorm(1, 512), nn.ReLU(True))

    def forward(self, x):
        residual1, residual2 = x, x.permute(0, 2, 1)
        for block1, block2 in zip(self.mixer_blocks1, self.mixer_blocks2):
            x = block1(x) + residual1
            residual1 = x
            x = x.permute(0, 2, 1)
            x = block2(x) + residual2
            residual2 = x
            x = x.permute(0, 2, 1)
        x = x.reshape(x.size(0), -1)
        backbone = self.backbone_linear(x).reshape(len(x), -1, D)
        b = self.bnorm(self.bdropout(self.blin1(x)).reshape(len(x), 64, 7, 7))
        return backbone, self.clip_proj(backbone), self.bupsampler(b)


class Ridge(nn.Module):
    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(V + 37, H), nn.Linear(V, H)])


class MindEye(nn.Module):
    def __init__(self):
        super().__init__()
        self.ridge = Ridge()
        self.backbone = Backbone()


def outputs(model, vae, x):
    """PyTorch's outputs for subject 1's betas x [n, V], by name."""
    with torch.no_grad():
        backbone, clip, latent = model.backbone(model.ridge.linears[1](x).unsqueeze(1))
        image = vae.decode(latent / vae.config.scaling_factor).sample
    return {"backbone": backbone, "clip_voxels": clip, "blurry_latent": latent, "blurry_image": image}


def new_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=56).eval()


def reference(d, betas, out):
    global V
    state = torch.load(os.path.join(d, "last.pth"), map_location="cpu")["model_state_dict"]
    V = state["ridge.linears.1.weight"].shape[1]
    model = MindEye().eval()
    model.load_state_dict(state)
    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae")).eval()
    os.makedirs(out, exist_ok=True)
    for name, value in outputs(model, vae, torch.from_numpy(np.load(betas)).float()).items():
        np.save(os.path.join(out, f"{name}.npy"), value.numpy())
    print("ok")


def main():
    out = sys.argv[1]
    if "--reference" in sys.argv:
        i = sys.argv.index("--reference")
        return reference(out, sys.argv[i + 1], sys.argv[i + 2])
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = MindEye().eval()
    vae = new_vae()
    with torch.no_grad():
        for m in [*model.modules(), *vae.modules()]:
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, os.path.join(out, "last.pth"))
    betas = torch.randn(3, V)
    np.save(os.path.join(out, "betas.npy"), betas.numpy())
    for suffix, x in (("", betas), ("_1", betas[:1])):
        for name, value in outputs(model, vae, x).items():
            np.save(os.path.join(out, f"{name}{suffix}.npy"), value.numpy())
    print("ok")


if __name__ == "__main__":
    main()
