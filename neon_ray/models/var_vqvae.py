"""VAR's multi-scale VQ-VAE tokenizer (Tian et al. 2024, "Visual Autoregressive Modeling", §3.2, Algorithms 1–2).

An image is encoded once to a feature map f (B, Cvae, h, w) and quantized as a pyramid of K token maps r_1 … r_K
of sizes pn_k × pn_k (pn_K = h): token map k quantizes the area-downsampled residual of f, its code vectors are
upsampled (bicubic) to h × w, passed through φ_k (a 3×3 conv mixed half-and-half with the identity) and
subtracted from the residual. The decoder sees f̂ = Σ_k φ_k(up(e(r_k))). The transformer is taught on the same
pyramid (`teacher_input`) and samples it scale by scale (`next_input`).

State-dict keys and shapes are those of FoundationVision/VAR `models/vqvae.py` (`VQVAE`), so the released
`vae_ch160v4096z32.pth` (ch 160, ch_mult (1, 1, 2, 2, 4), 2 res blocks per level, 4096 codes of 32 dims,
partially shared φ with 4 convs, ~109M parameters) loads strictly:

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}, encoder.down.{last}.attn.{j}
    .{norm,qkv,proj_out} (one 1×1 conv for q, k, v), encoder.down.{i}.downsample.conv, encoder.mid.{block_1,attn_1,
    block_2}, encoder.norm_out, encoder.conv_out; the decoder mirrored (up.{i}.block has one block more,
    up.{i}.upsample.conv); quant_conv, post_quant_conv (3×3, Cvae → Cvae);
    quantize.embedding.weight (V, Cvae), quantize.quant_resi.qresi_ls.{0..3}.{weight,bias},
    quantize.ema_vocab_hit_SV (K, V): the codebook-usage statistics of training, a buffer.

The tokenizer is held by the family, never by the network it trains, so it is never merged or saved with θ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    """One tokenizer architecture. `groups`: GroupNorm groups (32 in the release)."""

    vocab: int
    z: int  # Cvae, the code dimension
    ch: int
    ch_mult: tuple[int, ...]
    res_blocks: int
    in_channels: int
    attention: bool = True  # self-attention at the lowest resolution and in the middle (the release: both)
    groups: int = 32
    share_quant_resi: int = 4
    quant_resi: float = 0.5

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


TOKENIZERS: dict[str, VQConfig] = {
    # The official release (HF FoundationVision/var): 256² RGB → 16×16×32; also used by the 512² d36 model.
    "vae_ch160v4096z32": VQConfig(vocab=4096, z=32, ch=160, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, in_channels=3),
    # Ours, for 28×28 grayscale Fashion-MNIST → 7×7×16 (0.29M parameters, 1.1 MB); trained by scripts/train_var_tokenizer.py.
    "vq-fmnist": VQConfig(vocab=512, z=16, ch=16, ch_mult=(1, 2, 2), res_blocks=1, in_channels=1, groups=8),
}


# -- encoder / decoder (the LDM layout, Rombach et al. 2022, with one qkv conv per attention block) ----------------


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # 3 × (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√C)·v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom, as the release


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution: `block` (res blocks), `attn` (one per block at the lowest resolution), a resampler."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, *resample)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _middle(c: int, cfg: VQConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, cfg.groups)
    mid.attn_1 = AttnBlock(c, cfg.groups) if cfg.attention else nn.Identity()
    mid.block_2 = ResnetBlock(c, c, cfg.groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, cout in enumerate(widths):
            blocks = [ResnetBlock(c if j == 0 else cout, cout, cfg.groups) for j in range(cfg.res_blocks)]
            attn = [AttnBlock(cout, cfg.groups) for _ in range(cfg.res_blocks)] if i == last and cfg.attention else []
            self.down.append(Level(blocks, attn, ("downsample", Downsample(cout)) if i != last else None))
            c = cout
        self.mid = _middle(c, cfg)
        self.norm_out = nn.GroupNorm(cfg.groups, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.z, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z, c, 3, padding=1)
        self.mid = _middle(c, cfg)
        levels: list[nn.Module] = [nn.Identity()] * len(widths)
        for i in reversed(range(len(widths))):  # built from the lowest resolution up; stored by level index
            cout = widths[i]
            blocks = [ResnetBlock(c if j == 0 else cout, cout, cfg.groups) for j in range(cfg.res_blocks + 1)]
            attn = [AttnBlock(cout, cfg.groups) for _ in range(cfg.res_blocks + 1)] if i == last and cfg.attention else []
            levels[i] = Level(blocks, attn, ("upsample", Upsample(cout)) if i != 0 else None)
            c = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.groups, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -- the multi-scale quantizer -------------------------------------------------------------------------------------


class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·conv3×3(h), r = 0.5 (the release's quant_resi)."""

    def __init__(self, z: int, ratio: float):
        super().__init__(z, z, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (1 - self.ratio) * h + self.ratio * super().forward(h)


class SharedPhi(nn.Module):
    """n φ convs shared by the K scales: scale k uses the conv whose tick is nearest to k/(K − 1)."""

    def __init__(self, z: int, n: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(z, ratio) for _ in range(n))
        # The release's ticks: evenly spaced inside (0, 1), with a margin of 1/(3n) for n = 4, else 1/(2n).
        margin = 1 / (3 * n) if n == 4 else 1 / (2 * n)
        self.ticks = np.linspace(margin, 1 - margin, n)

    def at(self, k: int, scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - k / (scales - 1))))]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig, scales: int):
        super().__init__()
        self.quant_resi = SharedPhi(cfg.z, cfg.share_quant_resi, cfg.quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(scales, cfg.vocab))  # training statistics only
        self.embedding = nn.Embedding(cfg.vocab, cfg.z)

    def nearest(self, z_nc: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) of each row of z_nc (N, Cvae): (N,)."""
        e = self.embedding.weight
        d = z_nc.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * z_nc @ e.T  # (N, V)
        return d.argmin(1)

    def residual_pyramid(self, f: torch.Tensor, patch_nums: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(token maps r_k (B, pn_k²) for every scale, f̂ (B, C, h, w)): Algorithm 1 of the paper, on f (no grad)."""
        b, c, h, w = f.shape
        assert patch_nums[-1] == h == w, (patch_nums, f.shape)
        scales = len(patch_nums)
        rest, f_hat, idx = f.detach().clone(), torch.zeros_like(f), []
        for k, pn in enumerate(patch_nums):
            down = F.interpolate(rest, size=(pn, pn), mode="area") if k != scales - 1 else rest
            r = self.nearest(down.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            h_k = self.upsampled_codes(r, pn, h, k, scales)
            f_hat = f_hat + h_k
            rest = rest - h_k
            idx.append(r)
        return idx, f_hat

    def upsampled_codes(self, r: torch.Tensor, pn: int, size: int, k: int, scales: int) -> torch.Tensor:
        """φ_k(up(e(r_k))): token map r (B, pn²) → (B, C, size, size)."""
        h = self.embedding(r).transpose(1, 2).reshape(r.shape[0], -1, pn, pn)
        if k != scales - 1:
            h = F.interpolate(h, size=(size, size), mode="bicubic")
        return self.quant_resi.at(k, scales)(h)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig, patch_nums: tuple[int, ...]):
        super().__init__()
        self.cfg, self.patch_nums = cfg, tuple(patch_nums)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg, len(patch_nums))
        self.quant_conv = nn.Conv2d(cfg.z, cfg.z, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z, cfg.z, 3, padding=1)

    # -- what VAR reads --------------------------------------------------------------------------
    def encode_indices(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [−1, 1] → token maps r_1 … r_K, each (B, pn_k²) int64."""
        return self.quantize.residual_pyramid(self.quant_conv(self.encoder(images)), self.patch_nums)[0]

    def teacher_input(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of scales 2 … K: the area-downsampled running f̂ after each scale (B, L − pn_1², C)."""
        pns, size, scales = self.patch_nums, self.patch_nums[-1], len(self.patch_nums)
        f_hat = torch.zeros(idx[0].shape[0], self.cfg.z, size, size, device=idx[0].device)
        inputs = []
        for k in range(scales - 1):
            f_hat = f_hat + self.quantize.upsampled_codes(idx[k], pns[k], size, k, scales)
            nxt = F.interpolate(f_hat, size=(pns[k + 1], pns[k + 1]), mode="area")
            inputs.append(nxt.flatten(2).transpose(1, 2))  # (B, pn_{k+1}², C)
        return torch.cat(inputs, dim=1)

    def next_input(self, k: int, f_hat: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampling: add token map k (B, pn_k²) to f̂; return (f̂, the next scale's input (B, pn_{k+1}², C) or None)."""
        pns, scales = self.patch_nums, len(self.patch_nums)
        f_hat = f_hat + self.quantize.upsampled_codes(r, pns[k], pns[-1], k, scales)
        if k == scales - 1:
            return f_hat, None
        return f_hat, F.interpolate(f_hat, size=(pns[k + 1], pns[k + 1]), mode="area").flatten(2).transpose(1, 2)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    # -- tokenizer training (scripts/train_var_tokenizer.py) ------------------------------------------
    def forward(self, images: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(reconstruction, VQ loss, token maps): the codebook and φ learn from ‖f̂ − sg(f)‖², the encoder from
        β·‖sg(f̂) − f‖², averaged over the scales' running f̂ (as the release's quantizer); the decoder sees f̂
        straight-through."""
        f = self.quant_conv(self.encoder(images))
        b, c, h, w = f.shape
        pns, scales = self.patch_nums, len(self.patch_nums)
        rest, f_hat, loss, idx = f.detach().clone(), torch.zeros_like(f), f.new_zeros(()), []
        for k, pn in enumerate(pns):
            down = F.interpolate(rest, size=(pn, pn), mode="area") if k != scales - 1 else rest
            with torch.no_grad():
                r = self.quantize.nearest(down.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            h_k = self.quantize.upsampled_codes(r, pn, h, k, scales)
            f_hat = f_hat + h_k
            rest = rest - h_k.detach()
            idx.append(r)
            loss = loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        f_st = f + (f_hat - f).detach()  # straight-through: the value of f̂, the gradient of f
        return self.decoder(self.post_quant_conv(f_st)), loss / scales, idx
