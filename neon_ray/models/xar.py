"""xAR: next-X prediction with flow matching (Ren et al. 2025, "Beyond Next-Token", arXiv:2502.20388).

Tokens are continuous: p×p patches of the image, or of its VAE latents (the official models use MAR's
KL-16 VAE at patch 1: 16×16 tokens of 16 channels at 256 px). The token grid is cut into a g×g grid of
cells, the clusters (4 clusters of 8×8 tokens at 256 px), and the sequence lists the tokens cluster by
cluster. Cluster k is generated after clusters < k: an encoder–decoder transformer with a block-causal
mask over clusters predicts the flow-matching velocity of every token of cluster k.

Path (official convention, reversed with respect to flow.py's SiT one): t = 0 at the data, t = 1 at the
noise, x_t = (1 − t)·x + t·ε, velocity u = ε − x. Training ("noisy context learning"): every cluster
of a sample at its own t ~ logit-normal, so the context an earlier cluster offers is noisy as well;
labels are dropped with p = 0.1 for CFG. Sampling: cluster after cluster, from t = 1 to 0 with the
already generated clusters as clean context (t = 0), Euler or the official Euler–Maruyama sampler, with
the CFG scale ramped linearly over clusters from 1 to γ as the official sampler does.

State-dict keys and shapes are those of OliverRensu/xAR `models/xar.py` (`xar_base/large/huge`), whose
released EMA checkpoints are plain state dicts loaded strictly, buffers included:

    class_emb.weight                          (num_classes + 1, D); row num_classes = the null label (CFG)
    time_embed.mlp.{0,2}.{weight,bias}        256-d sinusoidal features of ⌊1000·t⌋ → MLP (as DiT's)
    z_proj.{weight,bias}                      token (C·p·p) → D
    encoder_pos_embed_learned                 (1, N, D) learned, tokens in cluster order; then z_proj_ln.weight
    {encoder,decoder}_blocks.i.attn.qkv/proj  with biases; norm1/norm2 are weightless RMSNorms (no keys)
    {encoder,decoder}_blocks.i.attn.rope.{freqs,freqs_cos,freqs_sin}   2-D rotary tables (buffers)
    {encoder,decoder}_blocks.i.mlp.{fc1_g,fc1_x,fc2}                   gated MLP, hidden int(8·D/3)
    {encoder,decoder}_blocks.i.ada_lin.1.{weight,bias}                  6·D modulations per cluster
    encoder_norm.weight, decoder_embed.*, decoder_pos_embed_learned, decoder_norm.weight, pred.*
    mask                                      (1, 1, N, N) additive block-causal mask (0 / −inf), a buffer

The released MLP is timm's SwiGLU module built with act_layer=nn.GELU, so its gate is a GELU (a GEGLU,
Shazeer 2020); we compute the same so released weights mean what they were trained to mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError, NeonError
from .backbones import LATENT_FIELDS, DenoiserFamily
from .base import ModelSpec, SamplerSettings
from .dit import TimestepEmbedder, run_block, xavier_linears
from .guidance import classifier_free_guidance, tile
from .registry import register_family

# One line per size. The official ones run on 16×16×16 KL-16 latents (ImageNet 256²): give the family
# image_shape (16, 16, 16), or model.options.vae. FID-50K on ImageNet 256² (paper / neon-method.md).
XAR_PRESETS: dict[str, dict] = {
    "xAR-B": dict(width=768, encoder_depth=8, decoder_depth=8, heads=12, patch=1, clusters=4),      # 172M; FID 1.72 (CFG 2.7, 40 steps)
    "xAR-L": dict(width=1024, encoder_depth=16, decoder_depth=16, heads=16, patch=1, clusters=4),   # 608M; FID 1.28 (CFG 2.3, 50 steps)
    "xAR-H": dict(width=1280, encoder_depth=20, decoder_depth=20, heads=16, patch=1, clusters=4),   # 1.19B; FID 1.24
    # CPU size on Fashion-MNIST pixels: 2×2 patches → 14×14 tokens of 4 values, 4 clusters of 7×7 tokens.
    "xar-tiny": dict(width=64, encoder_depth=2, decoder_depth=2, heads=2, patch=2, clusters=4),     # 0.35M; tests, tiny_xar.yaml
    "xar-fmnist-cpu": dict(width=128, encoder_depth=3, decoder_depth=3, heads=4, patch=2, clusters=4),  # fmnist_xar.yaml
}
OFFICIAL_PRESETS = ("xAR-B", "xAR-L", "xAR-H")
XAR_FIELDS = {"width", "encoder_depth", "decoder_depth", "heads", "patch", "clusters"}

EM_LAST_T = 0.04  # the official Euler–Maruyama grid stops its noisy steps at t = 0.04, then takes one mean step to 0


class XARSampler(SamplerSettings):
    name: Literal["euler", "euler_maruyama"] = Field("euler_maruyama", description="euler (probability-flow ODE) or euler_maruyama (the official SDE sampler, used for the paper's FIDs).")
    steps: int = Field(50, ge=1, le=10_000, description="Network evaluations per cluster (official: 40 for xAR-B, 50 for xAR-L).")
    guidance: float = Field(1.0, ge=0, description="CFG scale γ: v = v_u + γ(v_c − v_u) at the last cluster; 1 = conditional only, 0 = unconditional.")
    guidance_ramp: Literal["linear", "constant"] = Field("linear", description="linear: cluster k of K at 1 + (γ − 1)·k/(K − 1), as the official sampler; constant: γ throughout.")


# -- tokens ------------------------------------------------------------------------------------


def cluster_order(grid: tuple[int, int], cells: int) -> torch.Tensor:
    """Raster index of each token in cluster order: (N,). cells × cells clusters, each listed in raster order."""
    gh, gw = grid
    ch, cw = gh // cells, gw // cells  # tokens per cluster along each axis
    raster = torch.arange(gh * gw).reshape(cells, ch, cells, cw)  # (cell row, row in cell, cell col, col in cell)
    return raster.permute(0, 2, 1, 3).reshape(-1)


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32 (Zhang & Sennrich 2019); a learned gain only where the release has one."""

    def __init__(self, width: int, weight: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x₀, x₁, x₂, x₃, …) → (−x₁, x₀, −x₃, x₂, …): rotation by 90° of each adjacent pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class Rotary2D(nn.Module):
    """2-D rotary position embedding (RoPE, Su et al. 2021; the 2-D form of EVA-02, Fang et al. 2023).

    The first half of each head rotates by the token's row, the second half by its column, with the
    frequencies θ^(−2i/(hs/2)) each applied to an adjacent pair of channels. Tables are in cluster order.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int], order: torch.Tensor, theta: float = 10_000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)  # (hs/4,)
        rows = (torch.arange(grid[0]).float()[:, None] * freqs).repeat_interleave(2, dim=-1)  # (gh, hs/2)
        cols = (torch.arange(grid[1]).float()[:, None] * freqs).repeat_interleave(2, dim=-1)  # (gw, hs/2)
        angles = torch.cat([rows[:, None].expand(-1, grid[1], -1), cols[None].expand(grid[0], -1, -1)], dim=-1)  # (gh, gw, hs)
        angles = angles.reshape(-1, head_dim)[order]  # (N, hs) in cluster order
        self.register_buffer("freqs", freqs)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, nh, n, hs) holding positions [start, start + n)."""
        n = x.shape[2]
        cos, sin = self.freqs_cos[start : start + n].to(x.dtype), self.freqs_sin[start : start + n].to(x.dtype)
        return x * cos + rotate_pairs(x) * sin


class ContextCache:
    """Keys and values of the context tokens [0, length) in every block (encoder blocks, then decoder blocks).

    The block-causal mask makes them independent of anything generated later, so a cluster's Euler
    steps run on its own tokens only, attending to these (the official sampler caches them the same way).
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0
        self.write = False

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's keys and values followed by the new ones (B, nh, length + n, hs); stored when writing."""
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        if self.write:
            self.keys[layer], self.values[layer] = k, v
        return k, v


# -- network -----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, grid: tuple[int, int], order: torch.Tensor):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rope = Rotary2D(self.head_dim, grid, order)

    def forward(self, x: torch.Tensor, start: int, mask: torch.Tensor | None, cache: ContextCache | None, layer: int) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, n, hs)
        q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.attend(layer, k, v)  # (B, nh, start + n, hs)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, n, hs)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GatedMlp(nn.Module):
    """fc2(GELU(fc1_g x) ⊙ fc1_x x): timm's SwiGLU layout with the GELU gate of the release."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1_g, self.fc1_x = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1_g(x)) * self.fc1_x(x))


class Block(nn.Module):
    """Pre-norm block, adaLN-modulated per cluster: each cluster carries its own time (and the label)."""

    def __init__(self, width: int, heads: int, grid: tuple[int, int], order: torch.Tensor):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads, grid, order)
        self.norm2 = RMSNorm(width)
        self.mlp = GatedMlp(width, int(width * 8 / 3))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, start: int, mask: torch.Tensor | None, cache: ContextCache | None,
                layer: int) -> torch.Tensor:
        b, n, d = x.shape
        k = c.shape[1]  # clusters in x: (B, k, D) conditions, n / k tokens each
        # Official order of the six modulations: gates, scales, shifts (attention, MLP each); 6 × (B, k, 1, D).
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada_lin(c)[:, :, None].chunk(6, dim=-1)

        def per_cluster(h: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            return fn(h.reshape(b, k, n // k, d)).reshape(b, n, d)

        h = per_cluster(self.norm1(x), lambda h: h * (1 + scale1) + shift1)
        x = x + per_cluster(self.attn(h, start, mask, cache, layer), lambda h: h * gate1)
        h = per_cluster(self.norm2(x), lambda h: h * (1 + scale2) + shift2)
        return x + per_cluster(self.mlp(h), lambda h: h * gate2)


class XAR(nn.Module):
    """v(x_t, t, y): tokens (B, n, C·p·p) of whole clusters in cluster order, t (B, clusters in x), y (B,) → velocities."""

    def __init__(self, grid: tuple[int, int], token_dim: int, num_classes: int, width: int, encoder_depth: int,
                 decoder_depth: int, heads: int, clusters: int):
        super().__init__()
        cells = math.isqrt(clusters)
        assert cells * cells == clusters and grid[0] % cells == 0 and grid[1] % cells == 0, (grid, clusters)
        self.grid, self.clusters = grid, clusters
        self.seq_len = grid[0] * grid[1]
        self.cluster_len = self.seq_len // clusters
        order = cluster_order(grid, cells)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # + the null label for CFG
        self.time_embed = TimestepEmbedder(width)
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = RMSNorm(width, weight=True)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.encoder_blocks = nn.ModuleList(Block(width, heads, grid, order) for _ in range(encoder_depth))
        self.encoder_norm = RMSNorm(width, weight=True)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.decoder_blocks = nn.ModuleList(Block(width, heads, grid, order) for _ in range(decoder_depth))
        self.decoder_norm = RMSNorm(width, weight=True)
        self.pred = nn.Linear(width, token_dim)
        # Block-causal: a token of cluster k attends to every token of clusters ≤ k. Additive (0 / −inf) as released.
        cluster = torch.arange(self.seq_len) // self.cluster_len
        allowed = cluster[None, :] <= cluster[:, None]  # (N, N) [query, key]
        self.register_buffer("mask", torch.zeros(self.seq_len, self.seq_len).masked_fill(~allowed, float("-inf"))[None, None])
        self.activation_checkpointing = False  # finetune.activation_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # As the release (MAE/MAR style): Xavier-uniform linears with zero biases, N(0, 0.02) embeddings.
        xavier_linears(self)
        for p in (self.class_emb.weight, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)

    def new_cache(self) -> ContextCache:
        return ContextCache()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cache: ContextCache | None = None,
                write: bool = False) -> torch.Tensor:
        """Velocities (B, n, C·p·p) of the tokens x, which continue the cached context (positions from cache.length).

        With `write`, the keys and values of x are appended to the cache (x becomes context).
        """
        b, n, _ = x.shape
        start = cache.length if cache is not None else 0
        m = self.cluster_len
        assert start % m == 0 and n % m == 0 and t.shape == (b, n // m), (start, n, tuple(t.shape))
        dtype = self.z_proj.weight.dtype  # bf16 under DeepSpeed's bf16 engine; inputs follow the weights
        # One condition per cluster: label + embedding of ⌊1000·t⌋ (the release embeds integer timesteps).
        time = self.time_embed(torch.floor(1000 * t.float()).flatten()).reshape(b, n // m, -1)
        c = (time + self.class_emb(y)[:, None]).to(dtype)  # (B, k, D)
        # Mask rows of x against keys [0, start + n); one cluster sees its whole context: no mask needed.
        mask = None if n == m else self.mask[0, 0, start : start + n, : start + n] == 0
        if cache is not None:
            cache.write = write
        h = self.z_proj(x.to(dtype)) + self.encoder_pos_embed_learned[:, start : start + n]
        h = self.z_proj_ln(h)  # (B, n, D)
        for i, block in enumerate(self.encoder_blocks):
            h = run_block(block, self.activation_checkpointing, h, c, start, mask, cache, i)
        h = self.decoder_embed(self.encoder_norm(h)) + self.decoder_pos_embed_learned[:, start : start + n]
        for i, block in enumerate(self.decoder_blocks, start=len(self.encoder_blocks)):
            h = run_block(block, self.activation_checkpointing, h, c, start, mask, cache, i)
        if cache is not None and write:
            cache.length += n
        return self.pred(self.decoder_norm(h))  # (B, n, C·p·p)


# -- the family --------------------------------------------------------------------------------


@register_family
class XARFamily(DenoiserFamily):
    name = "xar"
    presets = {name: dict(backbone="xar", **hp) for name, hp in XAR_PRESETS.items()}
    sampler_schema = XARSampler

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)  # latent space (model.options.vae), label dropout p = 0.1, data_shape
        h = self.hparams
        c, height, width = self.data_shape
        if self.latent and spec.preset in OFFICIAL_PRESETS:
            stride = spec.image_shape[1] // height
            if (c, stride) != (16, 16):
                raise ConfigError(f"model.options.vae: {spec.preset} runs on MAR's KL-16 latents (16 channels, stride 16); "
                                  f"this VAE gives {c} channels at stride {stride}")
        patch, clusters = int(h["patch"]), int(h["clusters"])
        cells = math.isqrt(clusters)
        if clusters < 1 or cells * cells != clusters:
            raise ConfigError(f"model.options.clusters: must be a square number (clusters form a g×g grid of cells), got {clusters}")
        if height % patch or width % patch:
            raise ConfigError(f"model.preset: patch {patch} does not divide the {height}×{width} network input; choose another patch")
        self.grid = (height // patch, width // patch)
        if self.grid[0] % cells or self.grid[1] % cells:
            raise ConfigError(f"model.options.clusters: {clusters} clusters ({cells}×{cells} cells) do not divide the {self.grid[0]}×{self.grid[1]} token grid")
        if int(h["width"]) % int(h["heads"]) or (int(h["width"]) // int(h["heads"])) % 4:
            raise ConfigError(f"model.options.heads: {h['heads']} heads must divide width {h['width']} into head sizes divisible by 4 (2-D RoPE)")
        self.patch, self.clusters = patch, clusters
        self.token_dim = c * patch * patch
        self.cluster_len = self.grid[0] * self.grid[1] // clusters
        self.order = cluster_order(self.grid, cells)

    @classmethod
    def option_fields(cls, preset: str) -> set[str]:
        return XAR_FIELDS | LATENT_FIELDS

    def build(self) -> nn.Module:
        h = self.hparams
        return XAR(self.grid, self.token_dim, self.spec.num_classes, int(h["width"]), int(h["encoder_depth"]),
                   int(h["decoder_depth"]), int(h["heads"]), self.clusters)

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, N, C·p·p) in cluster order; features (c, p, q) as the release's patchify."""
        b, c = x.shape[:2]
        (gh, gw), p = self.grid, self.patch
        tokens = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)  # raster order
        return tokens[:, self.order.to(x.device)]

    def untokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of `tokenize`: (B, N, C·p·p) → (B, C, H, W)."""
        b = tokens.shape[0]
        c = self.data_shape[0]
        (gh, gw), p = self.grid, self.patch
        raster = torch.empty_like(tokens)
        raster[:, self.order.to(tokens.device)] = tokens
        return raster.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)

    # -- the protocol --------------------------------------------------------------------------
    def training_loss(self, net, images, labels, generator):
        dev = images.device
        tokens = self.tokenize(self.to_data(images, generator).float())  # (B, N, d)
        b = tokens.shape[0]
        # Noisy context: one t per cluster and sample, logit-normal (sigmoid of a standard normal).
        t = torch.sigmoid(torch.randn(b, self.clusters, generator=generator)).to(dev)  # (B, K)
        noise = torch.randn(tokens.shape, generator=generator).to(dev)
        y = self.drop_labels(labels, generator)
        tt = t.repeat_interleave(self.cluster_len, dim=1)[..., None]  # (B, N, 1)
        x_t = (1 - tt) * tokens + tt * noise  # t = 1 at the noise (official convention)
        return F.mse_loss(net(x_t, t, y).float(), noise - tokens)  # velocity target u = ε − x

    def cluster_guidance(self, guidance: float, ramp: str) -> list[float]:
        """The CFG scale of each cluster: official linear ramp 1 → γ over clusters, or γ throughout."""
        k = self.clusters
        if ramp == "constant" or k == 1:
            return [guidance] * k
        return [1.0 + (guidance - 1.0) * i / (k - 1) for i in range(k)]

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        return self.to_images(self.untokenize(self.sample_tokens(net, labels, seeds, settings)))

    @torch.no_grad()
    def sample_tokens(self, net, labels, seeds, settings) -> torch.Tensor:
        """Generated tokens (B, N, C·p·p) in cluster order, cluster after cluster. All noise of sample i from seeds[i]."""
        s = self.validate_sampler(settings)
        core = getattr(net, "module", net)  # DDP/DeepSpeed wrappers keep the network in .module
        dev, b = labels.device, labels.shape[0]
        gens = self.sample_generators(seeds)

        def randn() -> torch.Tensor:  # one cluster's worth of noise per sample, each from its own generator
            return torch.stack([torch.randn(self.cluster_len, self.token_dim, generator=g) for g in gens]).to(dev)

        done = torch.zeros(b, 0, self.token_dim, device=dev)  # generated clusters (clean), cluster order
        for gamma in self.cluster_guidance(s.guidance, s.guidance_ramp):
            v = self._cluster_velocity(core, done, labels, gamma)
            x = randn()  # (B, m, d) at t = 1
            if s.name == "euler":
                grid = torch.linspace(1.0, 0.0, s.steps + 1, dtype=torch.float64).tolist()
                for t0, t1 in zip(grid[:-1], grid[1:]):
                    x = x + (t1 - t0) * v(x, t0)
            else:
                x = self._euler_maruyama(v, x, s.steps, randn)
            done = torch.cat([done, x], dim=1)
        return done

    def _cluster_velocity(self, net: XAR, context: torch.Tensor, labels: torch.Tensor, gamma: float) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """v(x, t) of the next cluster at time t given the clean context (B, start, d), CFG-guided at scale γ.

        The context's keys and values are computed once, at t = 0, for the label rows the guidance
        helper asks for (labels, null labels or both: fixed for a given γ), then reused by every step.
        """
        caches: dict[int, ContextCache] = {}

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            def forward(y: torch.Tensor, copies: int) -> torch.Tensor:
                rows = y.shape[0]
                if copies not in caches:
                    caches[copies] = cache = net.new_cache()
                    if context.shape[1]:
                        ctx = tile(context, copies)
                        net(ctx, torch.zeros(rows, ctx.shape[1] // self.cluster_len, device=x.device), y, cache, write=True)
                return net(tile(x, copies), torch.full((rows, 1), t, device=x.device), y, caches[copies]).float()

            return classifier_free_guidance(forward, labels, self.spec.num_classes, gamma)[0]

        return velocity

    @staticmethod
    def _euler_maruyama(v: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, steps: int,
                        randn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The official SDE sampler: t from 1 to 0.04 in steps − 1 noisy steps, then one mean step to 0.

        Reverse SDE with diffusion w(t) = 2t: drift f = v − ½·w·s, with the score of the linear path
        s = −(x + (1 − t)·v)/t (ε = x + (1 − t)·v, s = −ε/t), i.e. f = x + (2 − t)·v; the noisy step
        adds √(w·|Δt|)·z. CFG acts on v, which equals guiding f (f is affine in v with the same x).
        """
        grid = torch.linspace(1.0, EM_LAST_T, steps, dtype=torch.float64).tolist() + [0.0]
        for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
            drift = x + (2.0 - t0) * v(x, t0)
            x = x + (t1 - t0) * drift
            if i < steps - 1:  # every step but the last is noisy
                x = x + math.sqrt(2.0 * t0 * abs(t1 - t0)) * randn()
        return x

    # -- checkpoints ---------------------------------------------------------------------------
    def _check_input_fits(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Name another xAR size, token size or token count before the generic key/shape listing."""
        mine, theirs = _size_of(net.state_dict()), _size_of(state_dict)
        if theirs is not None and theirs != mine:
            width, enc, dec = theirs
            fits = [name for name, hp in XAR_PRESETS.items() if (hp["width"], hp["encoder_depth"], hp["decoder_depth"]) == theirs]
            hint = f" (preset {fits[0]})" if fits else ""
            raise NeonError(f"model.checkpoint: {source} is an xAR of width {width} with {enc} + {dec} blocks{hint}; "
                            f"model.preset {self.spec.preset} has width {mine[0]} with {mine[1]} + {mine[2]} blocks")
        where = "VAE latents" if self.latent else "images"
        w = state_dict.get("z_proj.weight")
        if w is not None and w.dim() == 2 and w.shape[1] != self.token_dim:
            raise NeonError(f"model.checkpoint: {source} takes {w.shape[1]}-value tokens; this run makes {self.token_dim}-value tokens "
                            f"({self.data_shape[0]} channels × patch {self.patch}²) from {where} of shape {self.data_shape}")
        pos = state_dict.get("encoder_pos_embed_learned")
        if pos is not None and pos.dim() == 3 and pos.shape[1] != self.grid[0] * self.grid[1]:
            raise NeonError(f"model.checkpoint: {source} has {pos.shape[1]} tokens; this run makes a {self.grid[0]}×{self.grid[1]} token grid "
                            f"from {where} of shape {self.data_shape} (check data / model.options.vae)")


def _size_of(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(width, encoder blocks, decoder blocks) of an xAR state dict, None when it is not one."""
    if "class_emb.weight" not in state_dict:
        return None

    def depth(prefix: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(prefix + ".")), default=-1)

    return int(state_dict["class_emb.weight"].shape[-1]), depth("encoder_blocks"), depth("decoder_blocks")
