"""Inductive Moment Matching (IMM; Zhou, Ermon & Song 2025, "Inductive Moment Matching"): a few-step
generator trained by matching the distributions of one-step jumps t → s and r → s with an MMD.

Network (official lumalabs/imm `IMMPrecond`, flow-matching schedule x_t = (1 − t)·x + t·σ_d·ε):
- f(x_t, t, s, y) moves x_t from time t to an earlier time s in one step. The backbone F sees
  c_in·x_t with c_in = 1/(σ_d·√(α_t² + σ_t²)), the noise labels 1000·t and, as its second time
  embedding, 1000·(t − s) (`temb_type: stride`, the ImageNet release `imagenet256_ts_a2.pkl` the Neon
  runs use) or 1000·s (`identity`, the CIFAR-10 release);
- `euler_fm`: f = x_t − (t − s)·σ_d·F (ImageNet); `simple_edm`: f = c_skip·x_t + c_out·F with
  c_skip = (α_tα_s + σ_tσ_s)/(α_t² + σ_t²), c_out = −(α_sσ_t − α_tσ_s)·σ_d/√(α_t² + σ_t²) (CIFAR-10);
- the backbone is a DiT with a second timestep embedder `s_embedder` (ImageNet 256², SD-VAE latents)
  or the DDPM++ U-Net (songunet.py). Keys carry the official `model.` prefix.

Objective (the IMM loss as in the Neon authors' `imm/training/loss.py`, the official repository having none):
- per group of M images: t ~ U[ε, T], s ~ U[ε, t], and r from η_r = η_t − (η_max − η_min)/2^k with
  η = t/(1 − t) (the "constant decrement in η" mapping), r ≤ t − min_tr_gap, s ≤ r;
- x_t and x_r share the noise (DDIM interpolation); the student f_θ(x_t, t, s) sees labels dropped
  with p = 0.1, the stop-gradient teacher f_θ(x_r, r, s) the true labels, both the same dropout mask;
- MMD² over the group with the Laplace kernel k(a, b) = exp(−w(t, s)·‖a − b‖₂ / D) (D: elements per
  image), w = 1/(σ_d|t − s|) for euler_fm and √(α_t² + σ_t²)/(σ_d|α_sσ_t − α_tσ_s|) for simple_edm;
  the three kernel means are V-statistics (diagonal included) as in the reference;
- weighted by w_out(t) = α_t^a/(α_t² + σ_t²) · ½·(−dλ/dt) · sigmoid(b − λ_t), λ = log-SNR
  (defaults a = 2, b = 4, k = 12, M = 4, min_tr_gap 1e-4: the Neon fine-tune config `im256.yaml`).

Sampling: the official pushforward sampler, x ← f(x, t_i, t_{i+1}) over t from T = 0.994 to ε with
`uniform` (official ImageNet) or `edm` (ρ = 7 in η) spacing, 1, 2, 4 or 8 steps, starting from σ_d·ε.
CFG: F_u + γ(F_c − F_u), conditional and unconditional rows in one forward (the null label is index
num_classes; the official code's all-zero one-hot). The s-embedder, the kernel, the time pairs and
the sampler are ours, written from the paper and the official code's equations.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError, NeonError
from .backbones import LATENT_FIELDS, DenoiserFamily
from .base import ModelSpec, SamplerSettings
from .dit import DiT, TimestepEmbedder, run_block
from .guidance import classifier_free_guidance, tile
from .registry import register_family
from .songunet import SongUNet


class IMMSampler(SamplerSettings):
    steps: Literal[1, 2, 4, 8] = Field(8, description="Pushforward steps from t = T to ε: 1, 2, 4 or 8 (the official settings).")
    guidance: float = Field(1.5, ge=0, description="CFG scale γ on the network output: F = F_u + γ(F_c − F_u); 1 = conditional only; ignored by unconditional presets.")
    discretization: Literal["uniform", "edm"] = Field("uniform", description="Time grid: uniform in t (official ImageNet) or EDM's ρ = 7 grid in η = t/(1 − t).")


class IMMDiT(DiT):
    """DiT whose conditioning is t_emb(1000·t) + s_emb(second time) + y_emb (official `DiT` with `s_embed: true`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_embedder = TimestepEmbedder(self.t_embedder.mlp[2].out_features)
        nn.init.normal_(self.s_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.s_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.s_embedder.mlp[0].bias)
        nn.init.zeros_(self.s_embedder.mlp[2].bias)

    def forward(self, x: torch.Tensor, noise_t: torch.Tensor, noise_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)  # (B, T, D)
        c = self.t_embedder(noise_t) + self.s_embedder(noise_s) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = run_block(block, self.activation_checkpointing, x, c)
        return self.unpatchify(self.final_layer(x, c))  # (B, C, H, W)


class IMMNet(nn.Module):
    """f(x_t, t, s, y): the official IMMPrecond around a backbone held as `model` (so keys read `model.…`)."""

    def __init__(self, model: nn.Module, *, f_type: str, temb_type: str, sigma_data: float, T: float, eps: float, time_scale: float = 1000.0,
                 pixel_patch: int = 1):
        super().__init__()
        self.model = model
        self.f_type, self.temb_type, self.sigma_data, self.T, self.eps, self.time_scale = f_type, temb_type, sigma_data, T, eps, time_scale
        self.pixel_patch = pixel_patch  # ours (CPU presets): the backbone sees p×p patches as channels, (C·p², H/p, W/p)

    @property
    def activation_checkpointing(self) -> bool:  # DiT backbones only: the U-Net has none (AttributeError, so hasattr is False)
        return self.model.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.model.activation_checkpointing = value

    def raw(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The backbone output F. x (B, C, H, W); t, s (B,) float; y (B,) int64."""
        alpha, sigma = alpha_sigma(t.float())
        c_in = (alpha**2 + sigma**2).rsqrt() / self.sigma_data
        second = (t - s) if self.temb_type == "stride" else s
        p = self.pixel_patch
        x = F.pixel_unshuffle(c_in[:, None, None, None] * x.float(), p) if p > 1 else c_in[:, None, None, None] * x.float()
        out = self.model(x, (t * self.time_scale).float(), (second * self.time_scale).float(), y)
        return F.pixel_shuffle(out, p) if p > 1 else out

    def step(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """f from the backbone output `out`."""
        x, out = x.float(), out.float()
        t4, s4 = t.float()[:, None, None, None], s.float()[:, None, None, None]
        if self.f_type == "euler_fm":
            return x - (t4 - s4) * self.sigma_data * out
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t4), alpha_sigma(s4)
        c_skip = (a_t * a_s + s_t * s_s) / (a_t**2 + s_t**2)
        c_out = -(a_s * s_t - a_t * s_s) * (a_t**2 + s_t**2).rsqrt() * self.sigma_data
        return c_skip * x + c_out * out

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(x, self.raw(x, t, s, y), t, s)


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching schedule: α_t = 1 − t, σ_t = t."""
    return 1 - t, t


def eta_of(t: torch.Tensor | float) -> torch.Tensor:
    """η_t = σ_t/α_t = t/(1 − t) (exp of −½ log-SNR)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


def t_of(eta: torch.Tensor) -> torch.Tensor:
    return eta / (1 + eta)


# Network and objective constants of the official configs (lumalabs/imm configs/*_generate_images.yaml, Neon imm/configs).
_IM256 = dict(f_type="euler_fm", temb_type="stride", sigma_data=0.5, T=0.994, eps=0.0)
_CIFAR = dict(f_type="simple_edm", temb_type="identity", sigma_data=0.5, T=0.994, eps=0.006)
_LOSS = dict(group_size=4, kernel_a=2.0, kernel_b=4.0, k=12, min_tr_gap=1e-4)
# SD-VAE (ft-EMA) latents normalised per channel to std 0.5 (official StabilityVAEEncoder raw_mean / raw_std).
_SD_VAE_STATS = dict(latent_mean=(0.86488, -0.27787343, 0.21616915, 0.3738409), latent_std=(4.85503674, 5.31922414, 3.93725398, 3.9870003),
                     vae_scaling_factor=1.0, vae_shift_factor=0.0)

IMM_PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet 256² on 4×32×32 SD-VAE latents: DiT-XL/2 + s-embedder, 676.7M. FID 1.99 at 8 steps, CFG 1.5 (paper);
    # Neon 1.46 at w = 3.6, γ = 1.8.
    "IMM-DiT-XL/2-im256": dict(backbone="dit", depth=28, width=1152, heads=16, patch=2, **_IM256,
                               **_LOSS, **_SD_VAE_STATS),
    # CIFAR-10 32² unconditional DDPM++ (EDM's SongUNet) + s-embedding, 56.1M; FID 1.98 at 2 steps (paper).
    "IMM-SongUNet-cifar10": dict(backbone="songunet", model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                                 dropout=0.2, conditional=False, **_CIFAR, **{**_LOSS, "kernel_a": 1.0, "k": 15, "min_tr_gap": None}),
    # CPU sizes (Fashion-MNIST 28×28, class-conditional, ImageNet's euler_fm / stride settings).
    "imm-tiny": dict(backbone="dit", depth=2, width=64, heads=2, patch=4, **_IM256, **_LOSS),
    # 1.3M DDPM++ on 2×2 pixel patches (4×14×14): a training step costs what fewstep-fmnist's does (~0.9 s CPU at batch 64).
    "imm-fmnist": dict(backbone="songunet", model_channels=64, channel_mult=(1, 1), num_blocks=1, attn_resolutions=(7,), dropout=0.0,
                       conditional=True, pixel_patch=2, **_IM256, **_LOSS),
}
# The data each official preset was trained on: (C, H, W), classes (0: unconditional). Named when a checkpoint fits it.
NATIVE_DATA = {"IMM-DiT-XL/2-im256": ((4, 32, 32), 1000), "IMM-SongUNet-cifar10": ((3, 32, 32), 0)}
IMM_FIELDS = {"f_type", "temb_type", "sigma_data", "T", "eps", "group_size", "kernel_a", "kernel_b", "k", "min_tr_gap", "dropout",
              "latent_mean", "latent_std"}


def build_imm_network(h: dict[str, Any], data_shape: tuple[int, int, int], num_classes: int) -> IMMNet:
    """The IMM network for hyperparameters `h` on inputs of `data_shape` with `num_classes` labels (+ the null label)."""
    p = int(h.get("pixel_patch", 1))
    c, height, width = data_shape
    if h["backbone"] != "dit" and p > 1:
        if height % p or width % p:
            raise ConfigError(f"model.options.pixel_patch: {p} does not divide the {height}×{width} inputs")
        c, height, width = c * p * p, height // p, width // p
    if h["backbone"] == "dit":
        model: nn.Module = IMMDiT(input_size=(height, width), in_channels=c, num_classes=num_classes, depth=h["depth"], width=h["width"],
                                  heads=h["heads"], patch=h["patch"])
    else:
        if height != width or height % 2 ** (len(h["channel_mult"]) - 1):
            raise ConfigError(f"model.preset: the DDPM++ U-Net needs square inputs whose side 2^{len(h['channel_mult']) - 1} divides; got {data_shape}")
        model = SongUNet(height, c, num_classes if h["conditional"] else 0, model_channels=h["model_channels"], channel_mult=tuple(h["channel_mult"]),
                         num_blocks=h["num_blocks"], attn_resolutions=tuple(h["attn_resolutions"]), dropout=h["dropout"])
    return IMMNet(model, f_type=h["f_type"], temb_type=h["temb_type"], sigma_data=float(h["sigma_data"]), T=float(h["T"]), eps=float(h["eps"]),
                  pixel_patch=p)


@register_family
class IMMFamily(DenoiserFamily):
    name = "imm"
    presets = IMM_PRESETS
    sampler_schema = IMMSampler
    label_dropout = 0.1  # the reference loss's label_dropout
    # The Neon authors' IMM fine-tune (ImageNet 256², the official checkpoint): AdamW at lr 1e-6, betas (0.9, 0.999),
    # no weight decay. A config that sets finetune.lr keeps its own (the CPU-trained bases here move too little at 1e-6).
    finetune_defaults = {"lr": 1e-6, "betas": (0.9, 0.999), "weight_decay": 0.0}

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        h = self.hparams
        self.conditional = h["backbone"] == "dit" or bool(h.get("conditional", True))
        self.latent_norm = None
        if self.latent is not None and h.get("latent_std") is not None:
            mean, std = torch.tensor(h["latent_mean"]), torch.tensor(h["latent_std"])
            if mean.numel() != self.data_shape[0] or std.numel() != self.data_shape[0]:
                raise ConfigError(f"model.options.latent_std: {std.numel()} channel statistics for a {self.data_shape[0]}-channel VAE")
            self.latent_norm = (mean[:, None, None], 0.5 / std[:, None, None])  # z = (raw − mean)·(0.5/std), per channel

    @classmethod
    def option_fields(cls, preset: str) -> set[str]:
        h = cls.presets[preset]
        arch = {"depth", "width", "heads", "patch"} if h["backbone"] == "dit" else {"model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                                                                   "pixel_patch"}
        return arch | IMM_FIELDS | LATENT_FIELDS

    def build(self) -> nn.Module:
        return build_imm_network(self.hparams, self.data_shape, self.spec.num_classes)

    # -- data ------------------------------------------------------------------------------------
    def to_data(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = super().to_data(images, generator)
        if self.latent_norm is None:
            return z
        mean, scale = (v.to(z.device) for v in self.latent_norm)
        return (z - mean) * scale

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent_norm is not None:
            mean, scale = (v.to(x.device) for v in self.latent_norm)
            x = x / scale + mean
        return super().to_images(x)

    # -- training --------------------------------------------------------------------------------
    def time_triples(self, groups: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, r, s) per group, float64 (G,), ε ≤ s ≤ r ≤ t ≤ T (reference `sample_trs`, uniform mode)."""
        h = self.hparams
        eps, T = float(h["eps"]), float(h["T"])
        eta_lo, eta_hi = float(eta_of(eps)), float(eta_of(T))
        t = eps + torch.rand(groups, generator=generator, dtype=torch.float64) * (T - eps)
        s = eps + torch.rand(groups, generator=generator, dtype=torch.float64) * (t - eps)
        eta_r = (eta_of(t) - (eta_hi - eta_lo) * 0.5 ** int(h["k"])).clamp(min=eta_lo, max=eta_hi)
        r = t_of(eta_r)
        if h.get("min_tr_gap") is not None:  # as in the reference: the bound is clamped at η_min (= ε to first order)
            r = torch.minimum(r, (t - float(h["min_tr_gap"])).clamp(min=eta_lo))
        r = torch.maximum(r, s).clamp(min=eps)
        return t, r, s

    def kernel_weights(self, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, w_out) per group (reference `get_kernel_weight`): the kernel's inverse bandwidth and the time weighting."""
        h = self.hparams
        sd = float(h["sigma_data"])
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
        if h["f_type"] == "euler_fm":
            w = 1 / (t - s).abs() / sd
        else:
            w = (a_t**2 + s_t**2).sqrt() / (a_s * s_t - a_t * s_s).abs() / sd
        logsnr = 2 * (torch.log(1 - t) - torch.log(t))
        neg_dlogsnr_dt = 2 / ((1 - t) * t)
        w_out = a_t ** float(h["kernel_a"]) / (a_t**2 + s_t**2) * 0.5 * neg_dlogsnr_dt * torch.sigmoid(float(h["kernel_b"]) - logsnr)
        return w, w_out

    @staticmethod
    def mmd(student: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-group MMD² with the Laplace kernel exp(−w·‖a − b‖/D). student, teacher (G, M, D); w (G,) → (G,)."""
        dim = student.shape[-1]

        def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (G, M, M), V-statistic means
            dist = ((a[:, :, None] - b[:, None]) ** 2).sum(-1).clamp_min(1e-8).sqrt() / dim
            return torch.exp(-dist * w[:, None, None]).mean((1, 2))

        return k(student, student) + k(teacher, teacher) - 2 * k(student, teacher)

    def training_loss(self, net, images, labels, generator):
        h = self.hparams
        core = getattr(net, "module", net)  # DDP/DeepSpeed wrappers keep the network in .module
        dtype = next(core.parameters()).dtype
        x = self.to_data(images, generator).float()
        b, dev = x.shape[0], x.device
        m = min(int(h["group_size"]), b)
        groups = b // m  # a remainder that fills no group is left out
        x, labels = x[: groups * m], labels[: groups * m]

        # Step 1: one (t, r, s) per group; x_t and x_r share the noise (DDIM interpolation to r).
        t, r, s = (v.repeat_interleave(m) for v in self.time_triples(groups, generator))  # (G·M,) float64
        noise = torch.randn(x.shape, generator=generator).to(dev) * float(h["sigma_data"])
        (a_t, s_t), (a_r, s_r) = alpha_sigma(t.to(dev)[:, None, None, None]), alpha_sigma(r.to(dev)[:, None, None, None])
        x_t, x_r = (a_t * x + s_t * noise).float(), (a_r * x + s_r * noise).float()
        y_student = self.drop_labels(labels, generator) if self.conditional else labels

        # Step 2: student and stop-gradient teacher under the same dropout mask (the global RNG is rewound).
        tf, rf, sf = (v.float().to(dev) for v in (t, r, s))
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        student = net(x_t.to(dtype), tf, sf, y_student).float()
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, dev)
        with torch.no_grad():
            teacher = net(x_r.to(dtype), rf, sf, labels).float()

        # Step 3: MMD² per group, weighted in time.
        w, w_out = self.kernel_weights(t[::m], s[::m])
        loss = w_out.to(dev).float() * self.mmd(student.reshape(groups, m, -1), teacher.reshape(groups, m, -1), w.to(dev).float())
        return loss.mean()

    # -- sampling --------------------------------------------------------------------------------
    def time_grid(self, steps: int, discretization: str) -> list[float]:
        """steps + 1 times from T down to ε (official `pushforward_generator_fn`)."""
        h = self.hparams
        eps, T = float(h["eps"]), float(h["T"])
        if discretization == "uniform":
            return torch.linspace(T, eps, steps + 1, dtype=torch.float64).tolist()
        rho, lo, hi = 7.0, float(eta_of(eps)), float(eta_of(T))
        ramp = torch.arange(steps + 1, dtype=torch.float64) / steps
        return t_of((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho).tolist()

    def _jump(self, net, x, t: float, s: float, labels, guidance: float) -> torch.Tensor:
        """x_s = f(x_t, t, s) with CFG. f is affine in F with label-free coefficients, so guiding f, as here (both label
        sets in one forward), is the official guidance of F: f_u + γ(f_c − f_u) = c_skip·x + c_out·(F_u + γ(F_c − F_u))."""
        tt, ss = torch.full((x.shape[0],), t, device=x.device), torch.full((x.shape[0],), s, device=x.device)
        if not self.conditional:
            return net(x, tt, ss, labels).float()
        return classifier_free_guidance(lambda y, k: net(tile(x, k), tile(tt, k), tile(ss, k), y).float(), labels,
                                        self.spec.num_classes, guidance)[0]

    @torch.no_grad()
    def sample(self, net, labels, seeds, settings):
        s = self.validate_sampler(settings)
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        x = self.noise_like_data(gens, labels.device) * float(self.hparams["sigma_data"])  # (B, C, H, W)
        grid = self.time_grid(s.steps, s.discretization)
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            x = self._jump(net, x, t_cur, t_next, labels, s.guidance)
        return self.to_images(x)

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, net: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        from .base import check_state_dict

        try:
            check_state_dict(net, state_dict, source)
        except NeonError as exc:
            raise NeonError(f"{exc}; {self.fitting_preset(state_dict)}") from None
        net.load_state_dict(state_dict, strict=True)

    def fitting_preset(self, state_dict: dict[str, torch.Tensor]) -> str:
        """Which IMM preset (at this run's data shape and classes, or the preset's own) has exactly these keys and shapes."""
        want = {k: tuple(v.shape) for k, v in state_dict.items()}
        for name, h in self.presets.items():
            native = NATIVE_DATA.get(name)
            for shape, classes in [(self.data_shape, self.spec.num_classes)] + ([tuple(native)] if native else []):
                try:
                    with torch.device("meta"):
                        net = build_imm_network(h, tuple(shape), classes)
                except ConfigError:
                    continue
                if {k: tuple(v.shape) for k, v in net.state_dict().items()} == want:
                    what = f"{'×'.join(map(str, shape))} inputs, " + (f"{classes} classes" if classes else "unconditional")
                    return f"its keys and shapes are those of preset {name!r} ({what})"
        return "no imm preset has these keys and shapes"
