"""VAR: next-scale prediction (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", arXiv:2404.02905).

An image is K token maps r_1 … r_K of growing size (var_vqvae.py: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 at 256² →
680 tokens). A decoder-only transformer predicts every token of map k at once from the class and maps < k
(Eq. 3: p(r_1, …, r_K) = Π_k p(r_k | r_<k)); inside the sequence a block-causal mask lets map k see maps ≤ k.
Objective: cross-entropy of the tokens under teacher forcing, the input of map k being the area-downsampled
f̂ of maps < k; labels dropped with p = 0.1 for CFG. Sampling: map after map with a KV cache, CFG on the
logits ramped over scales as the official sampler (scale k: l = l_c + t_k·(l_c − l_u), t_k = γ·k/(K − 1)),
then top-k and top-p.

State-dict keys and shapes are those of FoundationVision/VAR `models/var.py` built by `build_vae_var`
(depth d, width 64·d, d heads, MLP ratio 4, attn_l2_norm on), whose released `var_d{16,20,24,30,36}.pth` are
plain state dicts (the VQ-VAE is not among them: the network only keeps a proxy to it):

    word_embed.{weight,bias}             Cvae → C, the input of scales 2 … K
    class_emb.weight                     (num_classes + 1, C); row num_classes = the null label (CFG)
    pos_start (1, pn_1², C), pos_1LC (1, L, C), lvl_embed.weight (K, C)
    blocks.i.attn.{mat_qkv.weight (no bias), q_bias, v_bias, scale_mul_1H11 (1, H, 1, 1), proj.*}
    blocks.i.attn.zero_k_bias            (C,) zeros, a buffer (keys get no bias)
    blocks.i.ffn.{fc1,fc2}.*             GELU(tanh), hidden 4·C
    blocks.i.ada_lin.1.*                 6·C modulations from the class embedding; with shared AdaLN (d36-s512)
                                         one `shared_ada_lin.1.*` for all blocks plus a per-block `ada_gss` (1, 1, 6, C)
    head_nm.ada_lin.1.*, head.*          AdaLN before the head, head C → V
    lvl_1L (1, L) int64                  the scale of each position, a buffer
    attn_bias_for_masking (1, 1, L, L)   0 / −inf block-causal mask, a buffer
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError, NeonError
from .autoregressive import filter_logits, inverse_cdf
from .base import ModelFamily, ModelSpec, SamplerSettings
from .base import _abbrev, check_state_dict
from .dit import Mlp, run_block
from .registry import register_family
from .var_vqvae import TOKENIZERS, VQVAE, VQConfig

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 680 tokens
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens
PN_FMNIST = (1, 2, 3, 4, 5, 7)  # 104 tokens of the vq-fmnist tokenizer's 7×7 map
SHIPPED_TOKENIZER = "var-vq-fmnist.safetensors"  # neon_ray/configs/checkpoints/, made by scripts/train_var_tokenizer.py
CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "checkpoints")


def _official(depth: int, shared_aln: bool = False, patch_nums: tuple[int, ...] = PN_256) -> dict:
    # build_vae_var: width 64·d, d heads, stochastic depth 0.1·d/24 (kept in the fine-tune, as the Neon authors' copy)
    return dict(depth=depth, width=64 * depth, heads=depth, shared_aln=shared_aln, drop_path=round(0.1 * depth / 24, 6),
                patch_nums=patch_nums, tokenizer="vae_ch160v4096z32", vae=None)


# One line per size. FID-50K on ImageNet (official README, cfg 1.5, top-k 900, top-p 0.96) and Neon's (neon-method.md).
VAR_PRESETS: dict[str, dict] = {
    "VAR-d16": _official(16),  # 310M; FID 3.55 (Neon paper's base 3.30 → 2.01 at w 1.0, γ 2.8)
    "VAR-d20": _official(20),  # 601M; FID 2.95
    "VAR-d24": _official(24),  # 1.03B; FID 2.33
    "VAR-d30": _official(30),  # 2.01B; FID 1.97
    "VAR-d36-s512": _official(36, shared_aln=True, patch_nums=PN_512),  # 2.35B, 512²; FID 2.63 (Neon 1.70)
    # CPU sizes on Fashion-MNIST through the shipped vq-fmnist tokenizer (7×7×16 codes, 512 of them).
    "var-tiny": dict(depth=2, width=64, heads=2, shared_aln=False, drop_path=0.0, patch_nums=PN_FMNIST,
                     tokenizer="vq-fmnist", vae=SHIPPED_TOKENIZER),  # 0.2M; tests, tiny_var.yaml
    "var-fmnist-cpu": dict(depth=4, width=192, heads=3, shared_aln=False, drop_path=0.0, patch_nums=PN_FMNIST,
                           tokenizer="vq-fmnist", vae=SHIPPED_TOKENIZER),  # 2.0M; fmnist_var.yaml
}
OFFICIAL_PRESETS = ("VAR-d16", "VAR-d20", "VAR-d24", "VAR-d30", "VAR-d36-s512")
LABEL_DROPOUT = 0.1  # build_vae_var's cond_drop_rate


class VARSampler(SamplerSettings):
    guidance: float = Field(1.5, ge=0, description="The official cfg: scale k of K samples from l_c + t_k·(l_c − l_u) with "
                                                   "t_k = guidance·k/(K − 1) (ramped from 0); 0 = conditional only. "
                                                   "Official FIDs: 1.5; the Neon authors' S: 1.25.")
    top_k: int = Field(900, ge=1, description="Keep the k most likely codes at each token (official 900; ≥ the codebook size = off).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus: keep the smallest set of codes with mass ≥ p (Neon 0.95, VAR's FIDs 0.96; 1 = off).")


# -- network -----------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every block for the positions sampled so far (the scales before the current one)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class SelfAttention(nn.Module):
    """Attention with L2-normalised queries and keys and a learned per-head temperature (≤ 100), as the release."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.max_log_scale = math.log(100.0)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, n, hs)
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_log_scale).exp().to(q.dtype)
        k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, cached + n, hs)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # cosine attention: no 1/√hs
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block modulated by the class: weightless LayerNorms, 6 modulations (gates, scales, shifts)."""

    def __init__(self, width: int, heads: int, shared_aln: bool, drop_path: float):
        super().__init__()
        self.width, self.shared_aln, self.drop_path = width, shared_aln, drop_path
        self.attn = SelfAttention(width, heads)
        self.ffn = Mlp(width, round(width * 4.0))  # VAR's FFN is DiT's MLP (fc1, tanh-GELU, fc2)
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        # cond: the class embedding (B, C), or with shared AdaLN the shared modulations (B, 1, 6, C)
        mods = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)  # 6 × (B, 1, C)
        h = self.attn(self.ln_wo_grad(x) * (1 + scale1) + shift1, attn_bias, cache, layer)
        x = x + drop_path(h * gamma1, self.drop_path, self.training)
        h = self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2)
        return x + drop_path(h * gamma2, self.drop_path, self.training)


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(cond.shape[0], 1, 6, -1)  # (B, 1, 6, C)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift


class VAR(nn.Module):
    """Logits (B, L, V) of every token of the K maps from the class and the teacher-forcing input of maps 2 … K."""

    def __init__(self, vocab: int, code_dim: int, num_classes: int, depth: int, width: int, heads: int,
                 patch_nums: tuple[int, ...], shared_aln: bool, drop_path: float):
        super().__init__()
        self.patch_nums = tuple(patch_nums)
        self.seq_len = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.word_embed = nn.Linear(code_dim, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # + the null label for CFG
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.seq_len, width))
        self.lvl_embed = nn.Embedding(len(patch_nums), width)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(width, 6 * width)) if shared_aln else nn.Identity()
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # linearly increasing, as the release
        self.blocks = nn.ModuleList(AdaLNSelfAttn(width, heads, shared_aln, rates[i]) for i in range(depth))
        self.head_nm = AdaLNBeforeHead(width)
        self.head = nn.Linear(width, vocab)
        # Block-causal: a token of scale k attends to every token of scales ≤ k.
        level = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(patch_nums)])  # (L,)
        self.register_buffer("lvl_1L", level[None].clone())
        allowed = level[None, :] <= level[:, None]  # [query, key]
        self.register_buffer("attn_bias_for_masking", torch.zeros(self.seq_len, self.seq_len).masked_fill(~allowed, float("-inf"))[None, None])
        self.activation_checkpointing = False  # finetune.activation_checkpointing
        self._init_weights(depth, width)

    def _init_weights(self, depth: int, width: int, adaln: float = 0.5, adaln_gamma: float = 1e-5, head: float = 0.02) -> None:
        # As the release's init_weights (init_std = √(1/(3C)), init_adaln 0.5, init_adaln_gamma 1e-5, init_head 0.02).
        std = math.sqrt(1 / width / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head.weight.mul_(head)
            self.head_nm.ada_lin[-1].weight.mul_(adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                gates_scales = block.ada_gss[:, :, :2] if block.shared_aln else block.ada_lin[-1].weight[: 2 * width]
                rest = block.ada_gss[:, :, 2:] if block.shared_aln else block.ada_lin[-1].weight[2 * width :]
                gates_scales.mul_(adaln_gamma)  # the gates start near 0: every block starts near the identity
                rest.mul_(adaln)

    def _run(self, x: torch.Tensor, labels: torch.Tensor, start: int, attn_bias: torch.Tensor | None,
             cache: KVCache | None) -> torch.Tensor:
        """Blocks and head over positions [start, start + n) whose input embeddings are x (B, n, C)."""
        n = x.shape[1]
        cond = self.class_emb(labels)  # (B, C)
        x = x + self.lvl_embed(self.lvl_1L[:, start : start + n]) + self.pos_1LC[:, start : start + n]
        mods = self.shared_ada_lin(cond)
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.activation_checkpointing, x, mods, attn_bias, cache, i)
        return self.head(self.head_nm(x, cond)).float()  # (B, n, V)

    def _start_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        cond = self.class_emb(labels)
        return cond[:, None].expand(-1, self.first_l, -1) + self.pos_start  # (B, pn_1², C)

    def forward(self, x_rest: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x_rest (B, L − pn_1², Cvae): teacher-forcing input of maps 2 … K; labels (B,) → logits (B, L, V)."""
        dtype = self.word_embed.weight.dtype  # bf16 under DeepSpeed's bf16 engine: inputs follow the weights
        x = torch.cat([self._start_tokens(labels), self.word_embed(x_rest.to(dtype))], dim=1)  # (B, L, C)
        return self._run(x, labels, 0, self.attn_bias_for_masking[0, 0], None)

    def new_cache(self) -> KVCache:
        return KVCache()

    def next_scale(self, x: torch.Tensor | None, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Sampling: logits (B, n, V) of the next map, given its input x (B, n, Cvae) (None for map 1) after the cached maps."""
        h = self._start_tokens(labels) if x is None else self.word_embed(x.to(self.word_embed.weight.dtype))
        out = self._run(h, labels, cache.length, None, cache)  # a map sees all earlier maps and itself: no mask
        cache.length += h.shape[1]
        return out


# -- tokenizer files -----------------------------------------------------------------------------


def _read_tokenizer(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a VQ-VAE file: safetensors, or a weights-only torch file (the release's .pth)."""
    name = os.path.basename(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file, ...: one line either way
        raise ConfigError(f"model.options.vae: cannot read {name} as a weights-only checkpoint: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.options.vae: {name} is not a state dict of tensors")
    return state, {}


def check_tokenizer(state: dict[str, torch.Tensor], meta: dict[str, str], name: str, tokenizer: str,
                    patch_nums: tuple[int, ...]) -> None:
    """The file fits the tokenizer the preset names: codebook size and dimension, scale count and list, then every key."""
    cfg = TOKENIZERS[tokenizer]
    emb, hits = state.get("quantize.embedding.weight"), state.get("quantize.ema_vocab_hit_SV")
    if emb is not None and tuple(emb.shape) != (cfg.vocab, cfg.z):
        raise ConfigError(f"model.options.vae: {name} is a VQ-VAE of {emb.shape[0]} codes × {emb.shape[1]} dims; "
                          f"this preset reads {tokenizer} ({cfg.vocab} codes × {cfg.z} dims)")
    if hits is not None and hits.dim() == 2 and hits.shape[0] != len(patch_nums):
        raise ConfigError(f"model.options.vae: {name} was made for {hits.shape[0]} scales; this preset uses "
                          f"{len(patch_nums)} ({'_'.join(map(str, patch_nums))})")
    if "patch_nums" in meta and tuple(int(p) for p in meta["patch_nums"].split("_")) != tuple(patch_nums):
        raise ConfigError(f"model.options.vae: {name} quantizes the scales {meta['patch_nums']}; this preset uses "
                          f"{'_'.join(map(str, patch_nums))} (model.options.patch_nums)")
    with torch.device("meta"):
        expected = VQVAE(cfg, patch_nums)
    try:
        check_state_dict(expected, state, name)
    except NeonError as exc:
        raise ConfigError(f"model.options.vae: {name} is not a {tokenizer} VQ-VAE ({exc})") from None


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str, mtime_ns: int, tokenizer: str, patch_nums: tuple[int, ...]) -> VQVAE:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    state, meta = _read_tokenizer(path)
    check_tokenizer(state, meta, os.path.basename(path), tokenizer, patch_nums)
    vq = VQVAE(TOKENIZERS[tokenizer], patch_nums)
    vq.load_state_dict(state, strict=True)
    return vq.eval().requires_grad_(False)


def resolve_tokenizer_path(source: str) -> str | None:
    """`model.options.vae` as a local file: as given, else a file shipped in neon_ray/configs/checkpoints."""
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isfile(path):
        return path
    shipped = os.path.join(CHECKPOINTS, source)
    return shipped if os.sep not in source and os.path.isfile(shipped) else None


# -- the family --------------------------------------------------------------------------------


@register_family
class VARFamily(ModelFamily):
    name = "var"
    presets = VAR_PRESETS
    sampler_schema = VARSampler
    finetune_defaults = {"betas": (0.9, 0.95)}  # the Neon authors' VAR fine-tune (their AdamW)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = self.hparams
        self.patch_nums = tuple(int(p) for p in h["patch_nums"])
        if h["tokenizer"] not in TOKENIZERS:
            raise ConfigError(f"model.options.tokenizer: unknown VQ-VAE {h['tokenizer']!r}; known: {sorted(TOKENIZERS)}")
        self.vq_config: VQConfig = TOKENIZERS[h["tokenizer"]]
        if not self.patch_nums or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])) or self.patch_nums[0] < 1:
            raise ConfigError(f"model.options.patch_nums: must be increasing positive sizes, got {list(self.patch_nums)}")
        if int(h["width"]) % int(h["heads"]):
            raise ConfigError(f"model.options.heads: {h['heads']} heads do not divide width {h['width']}")
        c, height, width = spec.image_shape
        side = self.patch_nums[-1] * self.vq_config.downsample
        if c != self.vq_config.in_channels or (height, width) != (side, side):
            raise ConfigError(f"model.preset: {spec.preset} tokenizes {self.vq_config.in_channels}×{side}×{side} images "
                              f"({h['tokenizer']}, last scale {self.patch_nums[-1]} × stride {self.vq_config.downsample}); "
                              f"the data is {c}×{height}×{width}")
        self.vae_path = None
        if h.get("vae"):
            self.vae_path = resolve_tokenizer_path(str(h["vae"]))
            if self.vae_path is None:
                raise ConfigError(f"model.options.vae: not found: {h['vae']} (a {h['tokenizer']} VQ-VAE file)")

    @classmethod
    def option_fields(cls, preset: str) -> set[str]:
        return {"depth", "width", "heads", "shared_aln", "drop_path", "patch_nums", "tokenizer", "vae"}

    def build(self) -> nn.Module:
        h = self.hparams
        return VAR(self.vq_config.vocab, self.vq_config.z, self.spec.num_classes, int(h["depth"]), int(h["width"]),
                   int(h["heads"]), self.patch_nums, bool(h["shared_aln"]), float(h["drop_path"]))

    def use_tokenizer(self, vq: VQVAE) -> None:
        """Use this VQ-VAE instead of `model.options.vae` (benchmarks time the official shapes with random weights)."""
        self._vq = vq.eval().requires_grad_(False)

    def tokenizer(self, device: torch.device) -> VQVAE:
        """The frozen VQ-VAE (loaded strictly on first use, shared by families of the same file)."""
        if getattr(self, "_vq", None) is not None:
            return self._vq if self._vq.quantize.embedding.weight.device == device else self._vq.to(device)
        if self.vae_path is None:
            raise ConfigError(f"model.options.vae: {self.spec.preset} needs its VQ-VAE file ({self.hparams['tokenizer']}; "
                              "the official one is vae_ch160v4096z32.pth from huggingface.co/FoundationVision/var)")
        vq = _load_tokenizer(self.vae_path, os.stat(self.vae_path).st_mtime_ns, self.hparams["tokenizer"], self.patch_nums)
        if vq.quantize.embedding.weight.device != device:
            vq.to(device)
        return vq

    # -- the protocol --------------------------------------------------------------------------
    def training_loss(self, net, images, labels, generator):
        vq = self.tokenizer(images.device)
        with torch.no_grad():
            idx = vq.encode_indices(images.float())  # K × (B, pn_k²)
            x_rest = vq.teacher_input(idx)  # (B, L − pn_1², Cvae)
        drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < LABEL_DROPOUT
        y = torch.where(drop, torch.full_like(labels, self.spec.num_classes), labels)
        logits = net(x_rest, y)  # (B, L, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.cat(idx, dim=1).reshape(-1))

    def scale_guidance(self, guidance: float) -> list[float]:
        """t_k of each scale: the official ramp t_k = γ·k/(K − 1) (logits l_c + t_k·(l_c − l_u))."""
        k = len(self.patch_nums)
        return [guidance * i / (k - 1) for i in range(k)] if k > 1 else [guidance]

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        f_hat, _ = self.sample_tokens(net, labels, seeds, settings)
        return self.tokenizer(labels.device).decode(f_hat).float()

    @torch.no_grad()
    def sample_tokens(self, net, labels, seeds, settings) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f̂ (B, Cvae, pn_K, pn_K), the token maps r_1 … r_K each (B, pn_k²)), map after map. Sample i draws from seeds[i] only."""
        s = self.validate_sampler(settings)
        core = getattr(net, "module", net)  # DDP/DeepSpeed wrappers keep the network in .module
        dev, b = labels.device, labels.shape[0]
        vq = self.tokenizer(dev)
        # All randomness of sample i up front: one uniform per token from seeds[i] (inverse-CDF draws).
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        u = torch.stack([torch.rand(core.seq_len, generator=g, dtype=torch.float64) for g in gens]).to(dev)  # (B, L)
        guided = s.guidance != 0.0
        # Conditional and unconditional rows share every forward (and the cache) from the first scale on.
        y = torch.cat([labels, torch.full_like(labels, self.spec.num_classes)]) if guided else labels
        cache, x, start, maps = core.new_cache(), None, 0, []
        size = self.patch_nums[-1]
        f_hat = torch.zeros(b, self.vq_config.z, size, size, device=dev)
        for k, (pn, t) in enumerate(zip(self.patch_nums, self.scale_guidance(s.guidance))):
            logits = core.next_scale(x, y, cache)  # (rows, pn², V)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = cond + t * (cond - uncond)
            probs = filter_logits(logits.reshape(b * pn * pn, -1), s.top_k, s.top_p).softmax(-1)
            r = inverse_cdf(probs, u[:, start : start + pn * pn].reshape(-1)).view(b, pn * pn)
            f_hat, nxt = vq.next_input(k, f_hat, r)
            x = None if nxt is None else (torch.cat([nxt, nxt]) if guided else nxt)
            start += pn * pn
            maps.append(r)
        return f_hat, maps

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        self._check_size_fits(net, state_dict, source)
        super().load_state_dict(net, state_dict, source)

    def _check_size_fits(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Another VAR (depth, width, AdaLN kind, token count): one line naming the first keys and the preset that fits."""
        mine, theirs = _size_of(net.state_dict()), _size_of(state_dict)
        if theirs is None or theirs == mine:
            return
        fits = [name for name, hp in VAR_PRESETS.items()
                if (hp["depth"], hp["width"], hp["shared_aln"], sum(p * p for p in hp["patch_nums"])) == theirs]
        hint = f"preset {fits[0]}" if fits else "no preset"
        expected = net.state_dict()
        missing = sorted(set(expected) - set(state_dict), key=_natural)
        unexpected = sorted(set(state_dict) - set(expected), key=_natural)
        keys = "; ".join(f"{what} {_abbrev(k, 3)}" for what, k in (("missing keys", missing), ("unexpected keys", unexpected)) if k)
        raise NeonError(f"model.checkpoint: {source} is a VAR of {_describe(theirs)} ({hint} fits it); model.preset "
                        f"{self.spec.preset} is {_describe(mine)}" + (f"; {keys}" if keys else ""))


def _natural(key: str) -> tuple:
    """Model-level keys first, then blocks in numeric order (blocks.2 before blocks.10)."""
    return key.startswith("blocks."), [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def _describe(size: tuple[int, int, bool, int]) -> str:
    depth, width, shared, tokens = size
    return f"depth {depth}, width {width}{', shared AdaLN' if shared else ''}, {tokens} tokens"


def _size_of(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, bool, int] | None:
    """(depth, width, shared AdaLN, tokens) of a VAR state dict, None when it is not one."""
    if "class_emb.weight" not in state_dict or "pos_1LC" not in state_dict:
        return None
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    return (depth, int(state_dict["class_emb.weight"].shape[-1]), "shared_ada_lin.1.weight" in state_dict,
            int(state_dict["pos_1LC"].shape[1]))
