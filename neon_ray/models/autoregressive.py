"""Autoregressive image model: a decoder-only transformer over quantized pixels, raster order.

Tokens: each pixel channel is quantized to `levels` uniform grey levels (one token per pixel-channel,
raster order, channels innermost as in PixelCNN, van den Oord et al. 2016). The sequence starts with
a class token (index `num_classes` = the null class for classifier-free guidance). Objective: next-
token cross-entropy (GPT, Radford et al. 2018), the original objective of AR image models (Image GPT,
Chen et al. 2020). Sampling: temperature, top-k, top-p (nucleus, Holtzman et al. 2020) and CFG on the
logits as in VAR (Tian et al. 2024), with a KV cache so an image costs one single-token forward per
token. Every categorical draw of sample i is an inverse-CDF lookup of a uniform drawn from seeds[i].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from .base import ModelFamily, SamplerSettings
from .guidance import classifier_free_guidance, tile
from .registry import register_family


class ARSampler(SamplerSettings):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature τ: logits / τ (< 1 sharpens, mode-seeking).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely levels (0 = off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: keep the smallest set of levels with mass ≥ p (1 = off).")
    guidance: float = Field(1.0, ge=0, description="CFG scale γ on logits: l = l_u + γ(l_c − l_u); 1 = conditional only.")


# -- tokenizer ---------------------------------------------------------------------------------


def quantize(images: torch.Tensor, levels: int) -> torch.Tensor:
    """[-1, 1] images (B, C, H, W) → tokens (B, H·W·C) in [0, levels), raster order, channels innermost."""
    q = ((images.float() + 1) * 0.5 * (levels - 1)).round().clamp(0, levels - 1).long()
    return q.permute(0, 2, 3, 1).reshape(images.shape[0], -1)


def dequantize(tokens: torch.Tensor, levels: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Tokens (B, H·W·C) → images (B, C, H, W) in [-1, 1] at the level centres."""
    c, h, w = image_shape
    x = tokens.float() * (2.0 / (levels - 1)) - 1.0
    return x.reshape(-1, h, w, c).permute(0, 3, 1, 2).contiguous()


# -- network -----------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for positions [0, length): (B, n_kv_heads, max_len, hs) each.

    Allocated at the first write, in the dtype the layer computes in (bf16 under autocast).
    """

    def __init__(self, depth: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * depth
        self.v: list[torch.Tensor | None] = [None] * depth
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, t, hs) at [length, length + t); return all keys and values so far."""
        if self.k[layer] is None:
            b, nh, _, hs = k.shape
            self.k[layer] = k.new_zeros(b, nh, self.max_len, hs)
            self.v[layer] = v.new_zeros(b, nh, self.max_len, hs)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Causal self-attention with `kv_heads` key/value heads shared by groups of query heads.

    kv_heads < heads is grouped-query attention (Ainslie et al. 2023; kv_heads = 1: multi-query,
    Shazeer 2019). Sampling is bound by reading the KV cache, so fewer KV heads sample proportionally faster.
    """

    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        nh, nkv, hs = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (z.view(b, t, nkv, hs).transpose(1, 2) for z in (k, v))  # (B, nkv, T, hs)
        group = nh // nkv  # query head h reads KV head h // group
        if cache is None:
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, T, hs)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New positions [length, length + t) attend to every cached one; t = 1 when decoding.
            start = cache.length
            k, v = cache.write(layer, k, v)  # (B, nkv, start + t, hs)
            # Plain matmuls, a group's queries stacked as rows: each cached key is read once per KV head
            # (for one query row this is also ~10× faster on CPU than SDPA's flash kernel).
            qg = q.reshape(b, nkv, group * t, hs)  # rows ordered (group, t)
            att = (qg @ k.transpose(-1, -2)) * hs**-0.5  # (B, nkv, group·t, start + t)
            if t > 1:
                keep = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start).repeat(group, 1)
                att = att.masked_fill(~keep, float("-inf"))
            out = (att.softmax(-1) @ v).view(b, nh, t, hs)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2)."""

    def __init__(self, width: int, heads: int, kv_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads, kv_heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class PixelTransformer(nn.Module):
    """p(token_n | class, token_<n). Position 0 holds the class token; position n > 0 the token n − 1."""

    def __init__(self, levels: int, num_classes: int, seq_len: int, width: int, depth: int, heads: int, kv_heads: int,
                 dropout: float = 0.0):
        super().__init__()
        self.levels, self.seq_len = levels, seq_len
        self.tok_emb = nn.Embedding(levels, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # index num_classes = "no label" (CFG)
        self.pos_emb = nn.Parameter(torch.zeros(seq_len, width))
        self.blocks = nn.ModuleList(Block(width, heads, kv_heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, levels)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/√(2·depth)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _inputs(self, tokens: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
        """Input embeddings of positions [start, start + n): the class token at 0, then the given tokens."""
        parts = [self.class_emb(labels)[:, None]] if start == 0 else []  # (B, 1, C)
        parts.append(self.tok_emb(tokens))  # (B, n', C)
        x = torch.cat(parts, dim=1)
        return x + self.pos_emb[start : start + x.shape[1]]

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits after the class token and each of `tokens` (B, n): (B, 1 + n, levels).

        With a cache, `tokens` continue the cached sequence from position `cache.length`; the class token
        is prepended only while the cache is empty (else the logits are (B, n, levels)).
        """
        start = 0 if cache is None else cache.length
        x = self._inputs(tokens, labels, start)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.ln_f(x))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.seq_len)


# -- sampling helpers --------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to −inf. logits: (B, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical draws from per-row uniforms u (B,) ∈ [0, 1): the first index whose CDF exceeds u·mass."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(1)  # (B,)
    # Rounding can land past the end: fall back to the last level with non-zero probability.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).long().argmax(-1)
    return torch.minimum(idx, last)


@register_family
class AutoregressiveFamily(ModelFamily):
    name = "autoregressive"
    presets = {
        "ar-tiny": dict(levels=8, width=32, depth=2, heads=2, kv_heads=1, dropout=0.0),
        "ar-fmnist": dict(levels=8, width=128, depth=4, heads=4, kv_heads=1, dropout=0.0),
    }
    sampler_schema = ARSampler
    label_dropout = 0.1  # p(null class) in training, for CFG

    @property
    def seq_len(self) -> int:
        c, h, w = self.spec.image_shape
        return c * h * w

    def build(self) -> nn.Module:
        h = self.hparams
        if int(h["levels"]) < 2:
            raise ConfigError(f"model.options.levels: need at least 2 levels, got {h['levels']}")
        if int(h["width"]) % int(h["heads"]):
            raise ConfigError(f"model.options.heads: {h['heads']} heads do not divide width {h['width']}")
        kv_heads = int(h.get("kv_heads", h["heads"]))
        if kv_heads < 1 or int(h["heads"]) % kv_heads:
            raise ConfigError(f"model.options.kv_heads: must divide heads={h['heads']}, got {kv_heads}")
        return PixelTransformer(int(h["levels"]), self.spec.num_classes, self.seq_len, int(h["width"]), int(h["depth"]),
                                int(h["heads"]), kv_heads, float(h.get("dropout", 0.0)))

    def training_loss(self, net, images, labels, generator):
        levels = int(self.hparams["levels"])
        tokens = quantize(images, levels).to(images.device)  # (B, N)
        drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < self.label_dropout
        y = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        logits = net(tokens[:, :-1], y)  # (B, N, levels): position n predicts token n
        return F.cross_entropy(logits.float().reshape(-1, levels), tokens.reshape(-1))

    def _next_logits(self, net, cache, prev, labels, guidance):
        """Guided logits (B, V) of the next token; conditional and unconditional rows share one forward."""
        return classifier_free_guidance(lambda y, k: net(tile(prev, k), y, cache)[:, -1].float(), labels,
                                        self.spec.num_classes, guidance)[0]

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = self.validate_sampler(settings)
        core = getattr(net, "module", net)  # DDP/DeepSpeed wrappers keep the network in .module
        dev, b, n = labels.device, labels.shape[0], self.seq_len
        # All randomness of sample i up front: one uniform per token from seeds[i].
        gens = self.sample_generators(seeds)
        u = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens]).to(dev)  # (B, N)
        cache = core.new_cache()
        tokens = torch.zeros(b, n, dtype=torch.long, device=dev)
        prev = torch.zeros(b, 0, dtype=torch.long, device=dev)  # the first step feeds only the class token
        for i in range(n):
            logits = self._next_logits(core, cache, prev, labels, s.guidance) / s.temperature  # (B, V)
            probs = filter_logits(logits, s.top_k, s.top_p).softmax(-1)
            tokens[:, i] = inverse_cdf(probs, u[:, i])
            prev = tokens[:, i : i + 1]
        return dequantize(tokens, int(self.hparams["levels"]), self.spec.image_shape)

