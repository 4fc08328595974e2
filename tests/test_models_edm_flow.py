"""EDM and flow-matching families: preconditioning, losses, samplers, per-seed determinism, CFG batching, bf16, compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.edm import karras_sigmas
from neon_ray.models.flow import dopri5


def family_of(name: str, preset: str = "dit-tiny", options: dict | None = None, shape=(1, 28, 28)):
    return get_family(name)(ModelSpec(name, preset, shape, 10, options or {}))


def randomised(family):
    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():  # leave the zero-initialised output layers: samples must depend on the network
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


class Counting(nn.Module):
    """Counts forward calls and rows (network evaluations) of the wrapped network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls, self.rows = net, 0, 0

    def forward(self, x, t, y):
        self.calls += 1
        self.rows += x.shape[0]
        return self.net(x, t, y)


# -- EDM -----------------------------------------------------------------------------------------


def test_karras_sigma_schedule():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002) and s[18] == 0
    assert (s[:-1] > s[1:]).all()
    assert karras_sigmas(1, 0.002, 80.0, 7.0).tolist() == pytest.approx([80.0, 0.0])


def test_edm_preconditioning_and_loss_scale():
    fam = family_of("edm")
    net = fam.build()  # adaLN-Zero: F ≡ 0, so D(x; σ) = c_skip(σ)·x
    x = torch.randn(2, 1, 28, 28)
    d = fam.denoise(net, x, torch.tensor([1e-3, 0.5]), torch.tensor([0, 1]))
    torch.testing.assert_close(d[0], x[0], atol=1e-5, rtol=1e-5)  # c_skip → 1 as σ → 0
    torch.testing.assert_close(d[1], 0.5 * x[1])  # c_skip(σ_data) = 1/2
    # λ(σ) normalises the effective target to unit variance (EDM §B.6): with F ≡ 0 and data of second
    # moment σ_data² the expected loss is exactly 1 for every σ.
    images = torch.where(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.5, -0.5, 0.5)
    loss = fam.training_loss(net, images, torch.arange(64) % 10, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("preset,settings,nfe", [
    ("dit-tiny", {"steps": 4, "guidance": 2.0}, 2 * 4 - 1),
    ("unet-tiny", {"name": "euler", "steps": 3, "guidance": 1.0}, 3),
])
def test_edm_sampler_nfe_cfg_and_seeds(preset, settings, nfe):
    fam = family_of("edm", preset)
    net = Counting(randomised(fam))
    s = fam.sampler_schema.model_validate(settings)
    labels, seeds = torch.tensor([2, 5, 9]), [7, 8, 9]
    together = fam.sample(net, labels, seeds, s)
    cfg = 2 if s.guidance not in (0.0, 1.0) else 1
    assert net.calls == nfe and net.rows == nfe * 3 * cfg  # CFG: both passes in the same forward
    alone = torch.cat([fam.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (3, 1, 28, 28) and together.abs().max() <= 1
    assert not torch.allclose(together, fam.sample(net, labels, [1, 2, 3], s))


def test_edm_loss_is_differentiable_on_unet():
    fam = family_of("edm", "unet-tiny")
    net = fam.build()
    loss = fam.training_loss(net, torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# -- flow matching -------------------------------------------------------------------------------


def test_flow_loss_targets_the_velocity():
    fam = family_of("flow")
    net = fam.build()  # F ≡ 0: loss = E‖x − ε‖² = E x² + 1
    images = torch.where(torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    loss = fam.training_loss(net, images, torch.arange(32) % 10, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(2.0, abs=0.03)


def test_dopri5_controls_each_sample_on_its_own():
    """dx/dt = λ_i·x with per-sample stiffness: each sample meets its tolerance with its own number of steps."""
    lam = torch.tensor([0.5, -3.0, 8.0])
    x0 = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    counts = torch.zeros(3)

    def v(x, t, rows):
        counts[rows] += 1
        return lam[rows].double()[:, None, None, None] * x

    x, _ = dopri5(v, x0, rtol=1e-6, atol=1e-9, max_steps=1000)
    exact = torch.exp(lam).double()[:, None, None, None] * x0
    assert ((x - exact).abs() / exact.abs()).max() < 1e-4
    assert counts[2] > counts[0]  # the stiffer sample took more steps, alone
    for i in range(3):  # sample i alone follows exactly the same grid
        counts_before = counts.clone()
        xi, _ = dopri5(lambda x_, t, rows: v(x_, t, rows + i), x0[i : i + 1], rtol=1e-6, atol=1e-9, max_steps=1000)
        assert torch.equal(xi, x[i : i + 1])
        assert counts[i] - counts_before[i] == counts_before[i]  # as many evaluations as in the batch
    with pytest.raises(NeonError, match=r"^sampler\.max_steps"):
        dopri5(v, x0, rtol=1e-9, atol=1e-12, max_steps=3)


@pytest.mark.parametrize("settings", [
    {"name": "euler", "steps": 4, "guidance": 2.0},
    {"name": "heun", "steps": 3, "guidance": 1.0},
    {"name": "adaptive", "rtol": 1e-3, "atol": 1e-4, "guidance": 1.5},
])
def test_flow_batch_equals_samples_one_by_one(settings):
    fam = family_of("flow")
    net = randomised(fam)
    s = fam.sampler_schema.model_validate(settings)
    labels, seeds = torch.tensor([1, 4, 8]), [31, 32, 33]
    together = fam.sample(net, labels, seeds, s)
    alone = torch.cat([fam.sample(net, labels[i : i + 1], seeds[i : i + 1], s) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.shape == (3, 1, 28, 28) and together.abs().max() <= 1
    assert not torch.allclose(together, fam.sample(net, labels, [1, 2, 3], s))


def test_flow_adaptive_agrees_with_a_fine_fixed_grid():
    fam = family_of("flow", "dit-tiny")
    net = randomised(fam)
    labels, seeds = torch.tensor([3, 6]), [5, 6]
    adaptive = fam.sample(net, labels, seeds, fam.sampler_schema(name="adaptive", rtol=1e-5, atol=1e-6))
    heun = fam.sample(net, labels, seeds, fam.sampler_schema(name="heun", steps=30))
    euler = fam.sample(net, labels, seeds, fam.sampler_schema(name="euler", steps=4))
    assert (adaptive - heun).abs().max() < 1e-3 < (euler - heun).abs().max()


# -- shared: validation, bf16, compile -----------------------------------------------------------


@pytest.mark.parametrize("family,settings,field", [
    ("edm", {"steps": 0}, "sampler.steps"),
    ("edm", {"guidance": -0.5}, "sampler.guidance"),
    ("edm", {"sigma_min": 1.0, "sigma_max": 0.5}, "sampler.sigma_max"),
    ("edm", {"rho": 0}, "sampler.rho"),
    ("edm", {"name": "dpm"}, "sampler.name"),
    ("flow", {"rtol": 0}, "sampler.rtol"),
    ("flow", {"atol": -1e-6}, "sampler.atol"),
    ("flow", {"steps": 0}, "sampler.steps"),
    ("flow", {"temperature": 0.5}, "sampler.temperature"),
])
def test_sampler_settings_out_of_range_name_the_field(family, settings, field):
    with pytest.raises(ConfigError) as err:
        get_family(family).validate_sampler(settings)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_unknown_family_option_names_the_field():
    with pytest.raises(ConfigError, match=r"^model\.options\.schedule: unknown option"):
        family_of("edm", options={"schedule": "linear"})
    with pytest.raises(ConfigError, match=r"^model\.preset: unknown preset"):
        family_of("flow", "DiT-XXL/2")


@pytest.mark.parametrize("name,settings", [("diffusion", {"steps": 2, "guidance": 2.0}), ("edm", {"steps": 2, "guidance": 2.0}),
                                           ("flow", {"name": "heun", "steps": 2, "guidance": 2.0})])
def test_sampling_under_bf16_autocast(name, settings):
    fam = family_of(name)
    net = randomised(fam)
    s = fam.sampler_schema.model_validate(settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fam.sample(net, torch.tensor([0, 1]), [1, 2], s)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.shape == (2, 1, 28, 28)


def test_compile_option_is_accepted_and_cached():
    fam = family_of("flow")
    net = fam.build()
    s = fam.sampler_schema.model_validate({"compile": True})
    assert s.compile and fam.network(net, False) is net
    compiled = fam.network(net, True)  # compiles lazily, at the first call (not exercised on CPU here)
    assert compiled is not net and fam.network(net, True) is compiled
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)


# -- every sampler against the exact solution on Gaussian data -----------------------------------

MU, S = 0.3, 0.2  # data ~ N(μ, s²) in every pixel


class GaussianOracle(nn.Module):
    """The exact minimiser of each family's objective for data N(μ, s²), read from the family's own
    network inputs (VP: integer timestep; EDM: c_in·x and c_noise = ln σ / 4; flow: t ∈ [0, 1], data at 1)."""

    def __init__(self, family, variance_v: float | None = None):
        super().__init__()
        self.family, self.variance_v = family, variance_v  # variance_v: the learned-variance channel's value, if any
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        name = self.family.name
        if name == "diffusion":
            ab = self.family.alpha_bar[t].float()[:, None, None, None]
            out = (1 - ab).sqrt() / (ab * S**2 + 1 - ab) * (x - ab.sqrt() * MU)  # E[ε | x_t]
            return out if self.variance_v is None else torch.cat([out, torch.full_like(out, self.variance_v)], 1)
        if name == "edm":
            sigma, sd = torch.exp(4 * t)[:, None, None, None], self.family.sigma_data
            x_noisy = x * (sigma**2 + sd**2).sqrt()  # undo c_in
            d = MU + S**2 / (S**2 + sigma**2) * (x_noisy - MU)  # E[x | x + σn]
            return (d - sd**2 / (sigma**2 + sd**2) * x_noisy) / (sigma * sd / (sigma**2 + sd**2).sqrt())  # F = (D − c_skip·x)/c_out
        tt = t[:, None, None, None]
        return MU + (tt * S**2 - (1 - tt)) / (tt**2 * S**2 + (1 - tt) ** 2) * (x - tt * MU)  # E[x − ε | x_t]


def initial_noise(fam, seeds):
    return torch.stack([torch.randn(fam.data_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("name,options,settings", [
    ("diffusion", {"schedule": "cosine"}, {"steps": 1000, "clip_denoised": False}),
    ("diffusion", {"schedule": "linear"}, {"steps": 1000, "clip_denoised": False}),
    ("edm", {}, {"steps": 200}),  # Heun's error here: 0.038 at 18 levels, 0.0066 at 40, 2e-4 at 200 (2nd order)
    ("flow", {}, {"name": "heun", "steps": 50}),
    ("flow", {}, {"name": "adaptive", "rtol": 1e-6, "atol": 1e-8}),
])
def test_deterministic_samplers_solve_the_gaussian_flow_exactly(name, options, settings):
    """For Gaussian data the probability-flow ODE maps noise z to μ + s·(z − m_T)/s_T (m_T, s_T: the prior's moments).

    The oracle reads the family's own network inputs, so a wrong time convention or preconditioning fails here."""
    fam = family_of(name, "unet-tiny", options, shape=(1, 4, 4))
    seeds = [3, 4, 5]
    z = initial_noise(fam, seeds)
    out = fam.sample(GaussianOracle(fam), torch.zeros(3, dtype=torch.long), seeds, fam.sampler_schema.model_validate(settings))
    if name == "diffusion":  # DDIM is exact up to its own discretisation: r_prev = k_t·r_t for r_t = x_t − √ᾱ_t·μ
        ab = fam.alpha_bar.tolist()[::-1] + [1.0]
        gain = math.prod((math.sqrt(a_prev * a) * S**2 + math.sqrt((1 - a_prev) * (1 - a))) / (a * S**2 + 1 - a) for a, a_prev in zip(ab[:-1], ab[1:]))
        m, sd = math.sqrt(ab[0]) * MU, S / gain
    elif name == "edm":
        z, m, sd = 80.0 * z, MU, math.sqrt(S**2 + 80.0**2)
    else:
        m, sd = 0.0, 1.0
    torch.testing.assert_close(out, MU + S * (z - m) / sd, atol=2e-3, rtol=0)


def test_learned_variance_ancestral_sampler_matches_the_gaussian():
    """DDPM with Σ = σ̃² (v = −1) under-disperses and Σ = β (v = +1) over-disperses on a coarse grid
    (the reason IDDPM learns Σ); both converge to the data's s as the grid gets fine."""
    fam = family_of("diffusion", "unet-tiny", {"schedule": "linear"}, shape=(1, 4, 4))
    fam.learn_sigma = True  # the oracle supplies the variance channels

    def spread(v: float, steps: int, n: int = 128) -> tuple[float, float]:
        settings = fam.sampler_schema(name="ancestral", steps=steps, clip_denoised=False)
        out = fam.sample(GaussianOracle(fam, variance_v=v), torch.zeros(n, dtype=torch.long), list(range(n)), settings)
        return out.mean().item(), out.std().item()

    (m_small, s_small), (m_large, s_large) = spread(-1.0, 100), spread(1.0, 100)
    assert s_small < 0.95 * S and s_large > 1.03 * S and m_small == pytest.approx(MU, abs=0.01) == m_large
    assert spread(-1.0, 1000, 64)[1] == pytest.approx(S, rel=0.05) and spread(1.0, 1000, 64)[1] == pytest.approx(S, rel=0.05)


def test_sampling_benchmark_prints_a_row_per_family_and_precision():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    out = subprocess.run([sys.executable, str(script), "--batch", "2", "--steps", "1", "--presets", "dit-tiny", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "dit-tiny" in line]
    assert [(r.split("|")[1].strip(), r.split("|")[5].strip(), r.split("|")[6].strip()) for r in rows] == [
        ("diffusion", "1", "fp32"), ("diffusion", "1", "bf16"), ("edm", "1", "fp32"), ("edm", "1", "bf16"), ("flow", "2", "fp32"), ("flow", "2", "bf16")]
    others = subprocess.run([sys.executable, str(script), "--batch", "2", "--families", "autoregressive,fewstep,toy-ddpm", "--presets",
                             "ar-tiny,fewstep-tiny,mlp-tiny", "--precisions", "fp32", "--repeats", "1", "--threads", "1"],
                            capture_output=True, text=True, timeout=300)
    assert others.returncode == 0, others.stderr[-2000:]
    rows = [line.split("|") for line in others.stdout.splitlines() if line.startswith("| ") and "tiny" in line]
    assert [(r[1].strip(), r[4].strip(), r[5].strip()) for r in rows] == [
        ("autoregressive", "top-p 0.95", "784"), ("fewstep", "1-step", "1"), ("fewstep", "2-step", "2"), ("fewstep", "4-step", "4"),
        ("fewstep", "8-step", "8"), ("toy-ddpm", "ancestral", "20")]
