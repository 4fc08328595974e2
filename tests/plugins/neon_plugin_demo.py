"""An out-of-tree model family, as a user would write it in their own package.

A tiny class-conditional rectified-flow model (x_t = (1 − t)·x + t·ε, velocity target ε − x) on a
two-layer conv net. neon-ray knows nothing about it: configs name it `neon_plugin_demo:TinyFlowFamily`
(the `module:attr` plugin path) or, once its distribution declares the entry point
`[neon_ray.models] tiny-flow-demo = neon_plugin_demo:TinyFlowFamily`, plainly `tiny-flow-demo`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neon_ray.models import ModelFamily
from neon_ray.models.base import SamplerSettings


class EulerSettings(SamplerSettings):
    steps: int = Field(4, ge=1, le=100)
    guidance: float = Field(1.0, ge=0)


class TinyVelocityNet(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__()
        self.label = nn.Embedding(num_classes + 1, width)  # index num_classes: the null label (CFG)
        self.time = nn.Linear(1, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, y):
        x = x.to(self.inp.weight.dtype)
        cond = self.label(y) + self.time(t[:, None].to(x.dtype))  # (B, width)
        return self.out(F.silu(self.inp(x) + cond[:, :, None, None]))


class TinyFlowFamily(ModelFamily):
    name = "tiny-flow-demo"
    presets = {"tiny": {"width": 16}}
    sampler_schema = EulerSettings

    def build(self):
        return TinyVelocityNet(self.spec.image_shape[0], self.spec.num_classes, self.hparams["width"])

    def training_loss(self, net, images, labels, generator):
        b = images.shape[0]
        t = torch.rand(b, generator=generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        x_t = (1 - t)[:, None, None, None] * images + t[:, None, None, None] * noise
        drop = torch.rand(b, generator=generator).to(images.device) < 0.1
        y = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        return F.mse_loss(net(x_t, t, y).float(), (noise - images).float())

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = EulerSettings.model_validate(settings) if isinstance(settings, dict) else settings
        x = torch.stack([torch.randn(self.spec.image_shape, generator=torch.Generator().manual_seed(int(k))) for k in seeds])
        x = x.to(labels.device)
        null = torch.full_like(labels, self.spec.num_classes)
        for i in range(s.steps, 0, -1):  # Euler from t = 1 (noise) to t = 0 (data)
            t = torch.full((len(x),), i / s.steps, device=x.device)
            v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
            x = x - (v_u + s.guidance * (v_c - v_u)) / s.steps
        return x.clamp(-1, 1)
