"""A MindEye2-shaped checkpoint and PyTorch's outputs for it, for the decoder's equality test.

usage: mindeye2_fixture.py DIR
Builds, from the published layer list (our own PyTorch code, random init at reduced width, the
LayerNorms' weights and biases perturbed so none is the identity), `MindEyeModule` with
`ridge.linears.0/1` (two subjects) and `backbone` (mixer blocks, backbone_linear, clip_proj, and
the blurry branch's blin1 the exporter must skip); saves DIR/last.pth ({"model_state_dict": …}),
DIR/betas.npy [3, V] and PyTorch's outputs for subject 1 in eval mode: DIR/backbone.npy,
DIR/clip_voxels.npy [3, T, D] (batch of 3) and DIR/backbone_1.npy, DIR/clip_voxels_1.npy (the
first trial alone).
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn

V, H, T, D, BLOCKS, SEQ = 200, 64, 4, 24, 2, 1


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
        return backbone, self.clip_proj(backbone)


class Ridge(nn.Module):
    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(V + 37, H), nn.Linear(V, H)])


class MindEye(nn.Module):
    def __init__(self):
        super().__init__()
        self.ridge = Ridge()
        self.backbone = Backbone()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = MindEye().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, os.path.join(out, "last.pth"))
    betas = torch.randn(3, V)
    np.save(os.path.join(out, "betas.npy"), betas.numpy())
    with torch.no_grad():
        for suffix, x in (("", betas), ("_1", betas[:1])):
            backbone, clip = model.backbone(model.ridge.linears[1](x).unsqueeze(1))
            np.save(os.path.join(out, f"backbone{suffix}.npy"), backbone.numpy())
            np.save(os.path.join(out, f"clip_voxels{suffix}.npy"), clip.numpy())
    print("ok")


if __name__ == "__main__":
    main()
