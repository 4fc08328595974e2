"""The DDPM++ U-Net ("SongUNet", Song et al. 2021 as re-implemented in EDM, Karras et al. 2022) with IMM's
second time embedding for the target time s (Zhou et al. 2025), in pure torch.

State-dict keys and shapes are those of the official lumalabs/imm `training/unets.py` SongUNet (standard
encoder and decoder, positional noise embedding), so the released CIFAR-10 EMA loads strictly:

    map_layer{0,1}.{weight,bias}, map_layer{0,1}_s.*   noise-embedding MLPs for t and for s
    map_label.{weight,bias}                             label_dim → noise channels (conditional only)
    enc.{R}x{R}_conv                                    first 3×3 conv
    enc.{R}x{R}_down, enc.{R}x{R}_block{i}              U-Net blocks (down: 2×2 box filter, then conv)
    dec.{R}x{R}_in{0,1}, dec.{R}x{R}_up, dec.{R}x{R}_block{i}
    dec.{R}x{R}_aux_{norm,conv}                         output head at full resolution
    a block: norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj]
    `resample_filter` (1, 1, 2, 2) buffers on every up/down conv (the [1, 1] filter's outer product / 4)

GroupNorm uses min(32, C/4) groups; every skip connection and attention output is scaled by √½.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Conv2d(nn.Module):
    """A k×k conv (k = 0: none) after an optional 2× box-filter down- or upsampling (EDM's non-fused path)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, up: bool = False, down: bool = False, init_scale: float = 1.0):
        super().__init__()
        self.c_in, self.up, self.down = c_in, up, down
        if kernel:
            self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
            self.bias = nn.Parameter(torch.zeros(c_out))
            fan_in, fan_out = c_in * kernel * kernel, c_out * kernel * kernel
            nn.init.uniform_(self.weight, -1, 1)  # Xavier uniform: √(6 / (fan_in + fan_out)), times init_scale
            with torch.no_grad():
                self.weight.mul_(init_scale * math.sqrt(6 / (fan_in + fan_out)))
        else:
            self.weight = self.bias = None
        f = torch.tensor([1.0, 1.0])
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:  # nearest-neighbour 2× (the filter × 4 is all ones), one group per channel
            f = (self.resample_filter * 4).to(x.dtype).tile(self.c_in, 1, 1, 1)
            x = F.conv_transpose2d(x, f, groups=self.c_in, stride=2)
        if self.down:  # 2×2 mean
            x = F.conv2d(x, self.resample_filter.to(x.dtype).tile(self.c_in, 1, 1, 1), groups=self.c_in, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=self.weight.shape[-1] // 2)
        return x


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def linear(c_in: int, c_out: int) -> nn.Linear:
    layer = nn.Linear(c_in, c_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class UNetBlock(nn.Module):
    """DDPM++ residual block: additive embedding (no adaptive scale), dropout, optional one-head self-attention."""

    def __init__(self, c_in: int, c_out: int, emb: int, dropout: float, up: bool = False, down: bool = False, attention: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout, self.attention = c_in, c_out, dropout, attention
        self.norm0 = group_norm(c_in)
        self.conv0 = Conv2d(c_in, c_out, 3, up=up, down=down)
        self.affine = linear(emb, c_out)
        self.norm1 = group_norm(c_out)
        self.conv1 = Conv2d(c_out, c_out, 3, init_scale=1e-5)
        self.skip = Conv2d(c_in, c_out, 1, up=up, down=down) if c_in != c_out or up or down else None
        if attention:
            self.norm2 = group_norm(c_out)
            self.qkv = Conv2d(c_out, 3 * c_out, 1, init_scale=math.sqrt(0.2))
            self.proj = Conv2d(c_out, c_out, 1, init_scale=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None].to(x.dtype)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * math.sqrt(0.5)
        if self.attention:
            b, c, h, w = x.shape
            # The official layout interleaves q, k, v per channel: output channel 3·i + j is part j of channel i.
            q, k, v = self.qkv(self.norm2(x)).reshape(b, c, 3, h * w).unbind(2)  # 3 × (B, C, HW)
            attn = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c)).softmax(dim=2).to(q.dtype)  # (B, HW, HW)
            a = torch.einsum("nqk,nck->ncq", attn, v)  # (B, C, HW)
            x = (self.proj(a.reshape(b, c, h, w)) + x) * math.sqrt(0.5)
        return x


def positional_features(x: torch.Tensor, channels: int) -> torch.Tensor:
    """DDPM++ noise features with EDM's endpoint=True frequencies, laid out [sin, cos] (the official swap). (B,) → (B, channels)."""
    freqs = (1 / 10_000) ** (torch.arange(channels // 2, dtype=torch.float64, device=x.device) / (channels // 2 - 1))
    args = x.double()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1).float()


class SongUNet(nn.Module):
    """F(x, c_noise(t), c_noise(s), y) for IMM: the DDPM++ architecture on (C, R, R) inputs, R divisible by 2^(levels−1)."""

    def __init__(self, resolution: int, channels: int, label_dim: int, model_channels: int = 128, channel_mult=(2, 2, 2),
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.2, channel_mult_emb: int = 4):
        super().__init__()
        emb = model_channels * channel_mult_emb
        self.model_channels, self.label_dim = model_channels, label_dim
        self.map_label = linear(label_dim, model_channels) if label_dim else None
        self.map_layer0, self.map_layer1 = linear(model_channels, emb), linear(emb, emb)
        self.map_layer0_s, self.map_layer1_s = linear(model_channels, emb), linear(emb, emb)
        block = dict(emb=emb, dropout=dropout)

        self.enc = nn.ModuleDict()
        cout, skips = channels, []
        for level, mult in enumerate(channel_mult):
            res = resolution >> level
            if level == 0:
                cout, cin = model_channels, cout
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=i == num_blocks and res in attn_resolutions, **block)
        self.dec[f"{resolution}x{resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{resolution}x{resolution}_aux_conv"] = Conv2d(cout, channels, 3, init_scale=1e-5)

    def embed(self, noise: torch.Tensor, layer0: nn.Linear, layer1: nn.Linear) -> torch.Tensor:
        return layer1(F.silu(layer0(positional_features(noise, self.model_channels).to(layer0.weight.dtype))))

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, R, R); noise_t, noise_s (B,); y (B,) labels with index label_dim = unconditional (ignored if label_dim = 0)."""
        feats = positional_features(noise_t, self.model_channels).to(self.map_layer0.weight.dtype)
        if self.map_label is not None:  # one-hot × √label_dim as officially; the null label is the zero vector
            onehot = F.one_hot(y.clamp(max=self.label_dim), self.label_dim + 1)[:, : self.label_dim].to(feats.dtype)
            feats = feats + self.map_label(onehot * math.sqrt(self.label_dim))
        emb = self.map_layer1(F.silu(self.map_layer0(feats)))
        emb = F.silu(emb + self.embed(noise_s, self.map_layer0_s, self.map_layer1_s))  # (B, emb)

        x = x.to(self.map_layer0.weight.dtype)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
