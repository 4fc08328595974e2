"""A class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) in pure torch.

State-dict keys and shapes follow the official facebookresearch/DiT release (also used by
willisma/SiT), so their EMA checkpoints (e.g. DiT-XL-2-256x256.pt) load strictly:

    x_embedder.proj.{weight,bias}            patch embedding, a p×p stride-p conv
    t_embedder.mlp.{0,2}.{weight,bias}       256-d sinusoidal timestep features → MLP
    y_embedder.embedding_table.weight        (num_classes + 1, D); row num_classes = null label (CFG)
    pos_embed                                (1, T, D) fixed 2-D sin-cos (a buffer here, a frozen Parameter there)
    blocks.i.attn.{qkv,proj}.{weight,bias}   timm-style attention (qkv laid out [3][heads][head_dim])
    blocks.i.mlp.{fc1,fc2}.{weight,bias}     GELU(tanh) MLP, ratio 4
    blocks.i.adaLN_modulation.1.*            6 modulations per block (adaLN-Zero)
    final_layer.{linear,adaLN_modulation.1}.*

Label dropout for CFG happens in the family (from its seeded generator), not inside the network.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .unet import timestep_embedding

# One line per size, as in Peebles & Xie 2023, Table 1 (depth, width, heads) × patch size 2/4/8.
DIT_PRESETS: dict[str, dict] = {
    "DiT-S/2": dict(depth=12, width=384, heads=6, patch=2),
    "DiT-S/4": dict(depth=12, width=384, heads=6, patch=4),
    "DiT-S/8": dict(depth=12, width=384, heads=6, patch=8),
    "DiT-B/2": dict(depth=12, width=768, heads=12, patch=2),
    "DiT-B/4": dict(depth=12, width=768, heads=12, patch=4),
    "DiT-B/8": dict(depth=12, width=768, heads=12, patch=8),
    "DiT-L/2": dict(depth=24, width=1024, heads=16, patch=2),
    "DiT-L/4": dict(depth=24, width=1024, heads=16, patch=4),
    "DiT-L/8": dict(depth=24, width=1024, heads=16, patch=8),
    "DiT-XL/2": dict(depth=28, width=1152, heads=16, patch=2),  # 675M; ImageNet-256 FID-50K 2.27 (CFG 1.5), 9.62 (none)
    "DiT-XL/4": dict(depth=28, width=1152, heads=16, patch=4),
    "DiT-XL/8": dict(depth=28, width=1152, heads=16, patch=8),
    # CPU-sized and Fashion-MNIST sizes (pixel space, 28×28×1).
    "dit-tiny": dict(depth=2, width=64, heads=2, patch=4),       # tests
    "dit-fmnist": dict(depth=6, width=256, heads=4, patch=2),    # 7.4M; classifier FD 0.62 at γ = 1 on an H100 (neon-method.md)
    "dit-fmnist-cpu": dict(depth=4, width=128, heads=4, patch=4),  # 1.3M; ~20× cheaper: what a 2-core CPU trains (fmnist_dit.yaml)
}


def sincos_pos_embed(width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT), (grid_h·grid_w, width), tokens in raster order.

    The first width/2 channels encode the column, the rest the row (the official code meshgrids
    w first), each half as [sin(pos·ω), cos(pos·ω)] with ω_k = 10000^(−k/(width/4)).
    """
    assert width % 4 == 0, "DiT width must be divisible by 4 for the 2-D sin-cos embedding"
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (width/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) → (T, width/2)
        angles = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (T, width)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, D) normalised, then scaled and shifted per sample (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]



def xavier_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in `module` (the DiT and MAE/MAR initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) → (B, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequencies)  # (B, 256): [cos, sin] as in GLIDE/DiT
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # + the null label for CFG

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, T, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (DiT §3.2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 × (B, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p·p·C_out)


class DiT(nn.Module):
    """f(x_t, t, y) → (B, C_out, H, W); C_out = 2·C with `learn_sigma` (ε and the variance interpolant v)."""

    def __init__(self, input_size: tuple[int, int], in_channels: int, num_classes: int, depth: int, width: int,
                 heads: int, patch: int, learn_sigma: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        h, w = input_size
        assert h % patch == 0 and w % patch == 0, (input_size, patch)
        self.grid = (h // patch, w // patch)
        self.patch = patch
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(in_channels, width, patch)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        # The fixed sin-cos table. Officially a frozen Parameter; a persistent buffer has the same state-dict
        # key and shape, and no optimizer, EMA lerp or ZeRO-3 partitioning ever touches it.
        self.register_buffer("pos_embed", sincos_pos_embed(width, *self.grid)[None])  # (1, T, D)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, patch, self.out_channels)
        self.activation_checkpointing = False  # finetune.activation_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT §3.2 / official initialize_weights: Xavier linears, N(0, 0.02) embeddings, adaLN-Zero.
        xavier_linears(self)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))  # like a Linear over the patch
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):  # output starts at 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p·p·C) → (B, C, H, W), channels innermost per patch as in the official layout."""
        (gh, gw), p, c = self.grid, self.patch, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.x_embedder.proj.weight.dtype  # bf16 under DeepSpeed's bf16 engine; inputs follow the weights
        x = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = run_block(block, self.activation_checkpointing, x, c)  # (B, T, D)
        return self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)


def run_block(block: nn.Module, checkpointed: bool, *args):
    """block(*args); with `checkpointed` in training, its activations are recomputed in the backward pass instead
    of stored (non-reentrant torch.utils.checkpoint: the same values and RNG draws, memory for compute)."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def check_patch_fits(size: tuple[int, int], patch: int, field: str) -> None:
    if size[0] % patch or size[1] % patch:
        raise ConfigError(f"{field}: patch {patch} does not divide the {size[0]}×{size[1]} network input; choose a preset whose patch divides it")
