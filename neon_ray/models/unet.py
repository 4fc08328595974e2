"""A small class-conditional convolutional U-Net for 28–64 px images (DDPM/ADM-style, much reduced).

At 28×28 a conv U-Net reaches recognisable samples on a CPU far sooner than a pixel DiT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. t: (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale-shift conditioning (ADM)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)  # (B, nh, hs, HW)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (B, nh, HW, hs)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """ε(x_t, t, y). Levels halve the resolution; `attention_levels` adds self-attention there."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64, 64),
        blocks_per_level: int = 1,
        attention_levels: tuple[int, ...] = (2,),
        dropout: float = 0.0,
        patch: int = 1,
    ):
        super().__init__()
        c0 = channels[0]
        self.patch = patch  # pixel-unshuffle p×p patches into channels: p² fewer positions, far cheaper on CPU
        emb_dim = 4 * c0
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # index num_classes = "no label" (CFG)
        self.stem = nn.Conv2d(in_channels * patch * patch, c0, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [c0]
        c = c0
        for level, c_out in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(ResBlock(c, c_out, emb_dim, dropout))
                c = c_out
                skip_channels.append(c)
                if level in attention_levels:
                    self.down.append(SelfAttention(c))
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_channels.append(c)

        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), SelfAttention(c), ResBlock(c, c, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            c_out = channels[level]
            for _ in range(blocks_per_level + 1):
                self.up.append(ResBlock(c + skip_channels.pop(), c_out, emb_dim, dropout))
                c = c_out
                if level in attention_levels:
                    self.up.append(SelfAttention(c))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels * patch * patch, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.stem.weight.dtype  # bf16 under DeepSpeed's bf16 engine; inputs follow the weights
        x = x.to(dtype)
        emb = self.time_mlp(timestep_embedding(t, self.stem.out_channels).to(dtype)) + self.label_emb(y)
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, SelfAttention):
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                skip = skips.pop()
                if skip.shape[-1] != h.shape[-1]:  # odd sizes (7 → 4 → 8): crop back
                    h = h[..., : skip.shape[-2], : skip.shape[-1]]
                h = layer(torch.cat([h, skip], dim=1), emb)
            else:
                h = layer(h)
        out = self.head(h)
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out
