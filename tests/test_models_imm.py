"""IMM family: the official checkpoint layouts, the restricted EDM-pickle reader, the IMM loss and the pushforward sampler."""

from __future__ import annotations

import collections
import math
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from _support import assert_each_sample_depends_only_on_its_seed, assert_imports_no_distributed_stack
from neon_ray.errors import ConfigError, NeonError
from neon_ray.models import ModelSpec, get_family
from neon_ray.models.edm_pickle import convert_edm_pickle, edm_state_dict, read_edm_pickle
from neon_ray.runtime.seeds import balanced_labels, sample_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMNIST = (1, 28, 28)


def family(preset: str = "imm-tiny", shape=FMNIST, classes: int = 10, options: dict | None = None):
    return get_family("imm")(ModelSpec("imm", preset, shape, classes, options or {}))


def randomised(fam, scale: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    net = fam.build().eval()
    with torch.no_grad():  # the output layers start at zero: give the network a non-trivial output
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def meta_build(fam) -> nn.Module:
    with torch.device("meta"):
        return fam.build()


def meta_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


# -- the official layouts, written out by hand from lumalabs/imm training/{preconds,dit,unets}.py -------------


def official_dit_layout(depth=28, width=1152, patch=2, channels=4, tokens=256, classes=1000) -> dict[str, tuple[int, ...]]:
    """IMMPrecond(model=DiT_XL_2(s_embed=True)).state_dict(): timm Attention/Mlp, `pos_embed` a frozen Parameter."""
    keys = {"model.x_embedder.proj.weight": (width, channels, patch, patch), "model.x_embedder.proj.bias": (width,),
            "model.y_embedder.embedding_table.weight": (classes + 1, width), "model.pos_embed": (1, tokens, width),
            "model.final_layer.linear.weight": (patch * patch * channels, width), "model.final_layer.linear.bias": (patch * patch * channels,),
            "model.final_layer.adaLN_modulation.1.weight": (2 * width, width), "model.final_layer.adaLN_modulation.1.bias": (2 * width,)}
    for emb in ("t_embedder", "s_embedder"):
        keys |= {f"model.{emb}.mlp.0.weight": (width, 256), f"model.{emb}.mlp.0.bias": (width,),
                 f"model.{emb}.mlp.2.weight": (width, width), f"model.{emb}.mlp.2.bias": (width,)}
    for i in range(depth):
        b = f"model.blocks.{i}."
        keys |= {b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                 b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                 b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                 b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,),
                 b + "adaLN_modulation.1.weight": (6 * width, width), b + "adaLN_modulation.1.bias": (6 * width,)}
    return keys


def official_songunet_layout(res=32, channels=3, mc=128, mult=(2, 2, 2), blocks=4, attn=(16,)) -> dict[str, tuple[int, ...]]:
    """The CIFAR-10 config: DDPM++ (standard encoder/decoder), label_dim 0, s_embed, resample_filter [1, 1]."""
    emb = 4 * mc
    keys: dict[str, tuple[int, ...]] = {}

    def lin(name, i, o):
        keys.update({f"model.{name}.weight": (o, i), f"model.{name}.bias": (o,)})

    def conv(name, i, o, k, resample=False):
        keys.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})
        if resample:
            keys[f"{name}.resample_filter"] = (1, 1, 2, 2)

    def block(name, i, o, up=False, down=False, attention=False):
        n = f"model.{name}"
        keys.update({f"{n}.norm0.weight": (i,), f"{n}.norm0.bias": (i,), f"{n}.affine.weight": (o, emb), f"{n}.affine.bias": (o,),
                     f"{n}.norm1.weight": (o,), f"{n}.norm1.bias": (o,)})
        conv(f"{n}.conv0", i, o, 3, up or down)
        conv(f"{n}.conv1", o, o, 3)
        if i != o or up or down:
            conv(f"{n}.skip", i, o, 1, up or down)
        if attention:
            keys.update({f"{n}.norm2.weight": (o,), f"{n}.norm2.bias": (o,)})
            conv(f"{n}.qkv", o, 3 * o, 1)
            conv(f"{n}.proj", o, o, 1)

    for suffix in ("", "_s"):
        lin(f"map_layer0{suffix}", mc, emb)
        lin(f"map_layer1{suffix}", emb, emb)
    cout, skips = mc, [mc]
    conv(f"model.enc.{res}x{res}_conv", channels, mc, 3)
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            block(f"enc.{r}x{r}_down", cout, cout, down=True)
            skips.append(cout)
        for i in range(blocks):
            block(f"enc.{r}x{r}_block{i}", cout, mc * m, attention=r in attn)
            cout = mc * m
            skips.append(cout)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            block(f"dec.{r}x{r}_in0", cout, cout, attention=True)
            block(f"dec.{r}x{r}_in1", cout, cout)
        else:
            block(f"dec.{r}x{r}_up", cout, cout, up=True)
        for i in range(blocks + 1):
            block(f"dec.{r}x{r}_block{i}", cout + skips.pop(), mc * m, attention=i == blocks and r in attn)
            cout = mc * m
    keys.update({f"model.dec.{res}x{res}_aux_norm.weight": (cout,), f"model.dec.{res}x{res}_aux_norm.bias": (cout,)})
    conv(f"model.dec.{res}x{res}_aux_conv", cout, channels, 3)
    return keys


OFFICIAL = {  # preset → (data shape, classes, layout, parameters as the official module counts them)
    "IMM-DiT-XL/2-im256": ((4, 32, 32), 1000, official_dit_layout, 676_735_504),
    "IMM-SongUNet-cifar10": ((3, 32, 32), 10, official_songunet_layout, 56_061_443),
}


def test_model_modules_import_no_distributed_stack():
    assert_imports_no_distributed_stack("neon_ray.models.imm", "neon_ray.models.edm_pickle")


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_state_dict_layout_and_parameter_count(preset):
    shape, classes, layout_fn, n_params = OFFICIAL[preset]
    fam = family(preset, shape, classes)
    net = meta_build(fam)
    layout = layout_fn()
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(layout) - set(mine)) == [] and sorted(set(mine) - set(layout)) == []
    assert {k: s for k, s in mine.items() if layout[k] != s} == {}
    fam.load_state_dict(net, meta_state(layout), f"{preset}.pkl")  # strict: every key, every shape
    # Parameters as the official module counts them (its pos_embed is a frozen Parameter; the filters are buffers).
    assert sum(math.prod(s) for k, s in layout.items() if not k.endswith("resample_filter")) == n_params
    assert n_params == pytest.approx(677e6 if "DiT" in preset else 56e6, rel=0.01)
    buffers = {k for k, _ in net.named_buffers()}
    if "DiT" in preset:  # the fixed sin-cos table (officially a frozen Parameter): the only buffer
        assert buffers == {"model.pos_embed"} and sum(p.numel() for p in net.parameters()) == n_params - 256 * 1152
    else:  # the resampling filters of every up/down conv
        assert buffers == {k for k in layout if k.endswith("resample_filter")} and len(buffers) == 8
        assert sum(p.numel() for p in net.parameters()) == n_params


def test_resample_filters_and_the_unconditional_unet_ignore_labels():
    fam = family("IMM-SongUNet-cifar10", (3, 8, 8), 10, dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4]))
    net = randomised(fam)
    filt = dict(net.named_buffers())["model.enc.4x4_down.conv0.resample_filter"]
    torch.testing.assert_close(filt, torch.full((1, 1, 2, 2), 0.25))
    s = fam.sampler_schema(steps=2, guidance=3.0)
    a = fam.sample(net, torch.tensor([0, 1]), [5, 6], s)
    b = fam.sample(net, torch.tensor([7, 3]), [5, 6], s)
    torch.testing.assert_close(a, b)


def test_tampered_keys_and_shapes_name_them_and_the_fitting_preset():
    shape, classes, _, _ = OFFICIAL["IMM-DiT-XL/2-im256"]
    fam = family("IMM-DiT-XL/2-im256", shape, classes)
    net = meta_build(fam)
    layout = official_dit_layout()
    missing = {k: v for k, v in layout.items() if not k.startswith("model.s_embedder")}  # a DiT without the s embedding
    with pytest.raises(NeonError) as err:
        fam.load_state_dict(net, meta_state(missing), "dit.pkl")
    msg = str(err.value)
    assert "\n" not in msg and "missing keys [model.s_embedder.mlp.0.bias" in msg and "no imm preset" in msg
    wrong = dict(layout, **{"model.y_embedder.embedding_table.weight": (11, 1152)})
    with pytest.raises(NeonError, match=r"wrong shapes \[model\.y_embedder\.embedding_table\.weight \(11, 1152\)≠\(1001, 1152\)\]"):
        fam.load_state_dict(net, meta_state(wrong), "dit.pkl")
    with pytest.raises(NeonError) as err:  # the CIFAR-10 U-Net offered to the ImageNet DiT
        fam.load_state_dict(net, meta_state(official_songunet_layout()), "cifar10.pkl")
    msg = str(err.value)
    assert "\n" not in msg and "unexpected keys [model.dec." in msg and "preset 'IMM-SongUNet-cifar10' (3×32×32 inputs, unconditional)" in msg
    tiny = family()  # a checkpoint of another CPU preset at this run's shapes
    with pytest.raises(NeonError, match="preset 'imm-fmnist' \\(1×28×28 inputs, 10 classes\\)"):
        tiny.load_state_dict(tiny.build(), family("imm-fmnist").build().state_dict(), "fmnist.safetensors")


# -- network equations ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset,shape,options", [("imm-tiny", FMNIST, {}), ("IMM-SongUNet-cifar10", (3, 8, 8),
                                                  dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))])
def test_a_jump_of_zero_length_is_the_identity(preset, shape, options):
    fam = family(preset, shape, 10, options)
    net = randomised(fam)
    x, t = torch.randn(3, *shape), torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(net(x, t, t, torch.tensor([0, 1, 10])), x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(x, t, t * 0.5, torch.tensor([0, 1, 10])), x)


def test_second_time_input_follows_temb_type():
    fam = family()
    net = randomised(fam)
    seen = []
    net.model.s_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    net(torch.zeros(1, *FMNIST), torch.tensor([0.75]), torch.tensor([0.25]), torch.tensor([1]))
    torch.testing.assert_close(seen[-1], torch.tensor([500.0]))  # stride: 1000·(t − s)
    net.temb_type = "identity"
    net(torch.zeros(1, *FMNIST), torch.tensor([0.75]), torch.tensor([0.25]), torch.tensor([1]))
    torch.testing.assert_close(seen[-1], torch.tensor([250.0]))  # identity: 1000·s


def test_the_dit_backbone_is_dit_plus_a_second_time_embedding():
    """With the s-embedder's output layer at zero, the IMM DiT is the plain DiT (test_models_dit checks that against the
    official forward) on the same weights: s enters only through the conditioning sum t_emb + s_emb + y_emb."""
    from neon_ray.models.dit import DiT

    net = randomised(family()).model
    plain = DiT(input_size=(28, 28), in_channels=1, num_classes=10, depth=2, width=64, heads=2, patch=4)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("s_embedder")})
    x, nt, ns, y = torch.randn(2, *FMNIST), torch.tensor([900.0, 10.0]), torch.tensor([300.0, 5.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert not torch.allclose(net(x, nt, ns, y), plain(x, nt, y))
        net.s_embedder.mlp[2].weight.zero_()
        net.s_embedder.mlp[2].bias.zero_()
        torch.testing.assert_close(net(x, nt, ns, y), plain(x, nt, y))


def test_activation_checkpointing_on_the_dit_only():
    fam = family()
    net = fam.build()
    fam.enable_activation_checkpointing(net)
    assert net.model.activation_checkpointing
    unet_fam = family("imm-fmnist")
    with pytest.raises(ConfigError, match=r"^finetune\.activation_checkpointing: the imm network IMMNet \(imm-fmnist\) has no block stack"):
        unet_fam.enable_activation_checkpointing(unet_fam.build())


# -- objective -----------------------------------------------------------------------------------


def test_time_triples_and_weights_follow_the_reference():
    fam = family()
    t, r, s = fam.time_triples(2000, torch.Generator().manual_seed(0))
    assert ((0 <= s) & (s <= r) & (r <= t) & (t <= 0.994)).all()
    eta = t / (1 - t)
    gap = (0.994 / 0.006) / 2**12
    far = eta > gap + 1e-3  # away from ε and from s: r is exactly the η decrement (or the 1e-4 gap)
    expected = torch.minimum((eta - gap) / (1 + eta - gap), t - 1e-4)
    torch.testing.assert_close(r[far & (expected > s)], expected[far & (expected > s)])
    w, w_out = fam.kernel_weights(torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64))
    assert w.item() == pytest.approx(1 / 0.25 / 0.5)  # euler_fm: 1/(σ_d|t − s|)
    # α^a/(α² + σ²) · ½ · 2/(t(1 − t)) · sigmoid(b − λ), λ = 0 at t = ½, a = 2, b = 4
    assert w_out.item() == pytest.approx(0.25 / 0.5 * 0.5 * 8 * (1 / (1 + math.exp(-4))))


def test_mmd_is_zero_for_identical_groups_and_positive_otherwise():
    a = torch.randn(3, 4, 10)
    w = torch.ones(3)
    torch.testing.assert_close(get_family("imm").mmd(a, a, w), torch.zeros(3), atol=1e-6, rtol=0)
    assert (get_family("imm").mmd(a, a + 1, w) > 0).all()


def test_loss_decreases_on_a_tiny_set_and_shares_the_dropout_mask():
    fam = family("imm-fmnist", FMNIST, 10, dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.3))
    torch.manual_seed(0)
    net = fam.build().train()
    x = torch.rand(8, *FMNIST, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.arange(8) % 10
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = fam.training_loss(net, x, y, torch.Generator().manual_seed(0))  # the same (t, r, s), noise and labels each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.93 * losses[0], losses  # 0.89 here: a slow, steady descent
    # Student and teacher forwards see the same dropout draws: with t = r they are the same function of the same input.
    fam.time_triples = lambda groups, gen: (torch.full((groups,), 0.6, dtype=torch.float64),) * 2 + (torch.full((groups,), 0.2, dtype=torch.float64),)
    fam.label_dropout = 0.0
    assert fam.training_loss(net, x, y, torch.Generator().manual_seed(3)).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_uses_full_groups_only():
    fam = family()
    net = fam.build()
    loss = fam.training_loss(net, torch.zeros(6, *FMNIST), torch.arange(6), torch.Generator().manual_seed(0))  # one group of 4
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# -- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 8])
def test_each_sample_depends_only_on_its_seed(steps):
    fam = family()
    net = randomised(fam)
    s = fam.sampler_schema.model_validate({"steps": steps, "guidance": 1.5})
    labels = torch.from_numpy(balanced_labels(range(4), 10))
    together = assert_each_sample_depends_only_on_its_seed(fam, net, s, labels, sample_seeds(0, "eval", range(4)), sample_seeds(1, "eval", range(4)))
    assert together.shape == (4, *FMNIST) and together.abs().max() <= 1


def test_cfg_batches_both_halves_and_equals_the_guided_pushforward():
    fam = family()
    net = randomised(fam)
    labels, seeds, gamma = torch.tensor([1, 2, 3]), [11, 12, 13], 1.8
    calls = []
    net.model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    got = fam.sample(net, labels, seeds, fam.sampler_schema(steps=2, guidance=gamma))
    assert calls == [6, 6]  # one forward per step with the conditional and unconditional rows together
    x = torch.stack([torch.randn(FMNIST, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 0.5
    for t, s in [(0.994, 0.497), (0.497, 0.0)]:
        tt, ss = torch.full((3,), t), torch.full((3,), s)
        f_c, f_u = net(x, tt, ss, labels), net(x, tt, ss, torch.full_like(labels, 10))
        x = f_u + gamma * (f_c - f_u)  # f is affine in F: guiding f equals guiding F
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_time_grids():
    fam = family()
    assert fam.time_grid(4, "uniform") == pytest.approx([0.994, 0.7455, 0.497, 0.2485, 0.0])
    edm = fam.time_grid(4, "edm")
    assert edm[0] == pytest.approx(0.994) and edm[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(edm, edm[1:]))


@pytest.mark.parametrize("bad, field", [({"steps": 3}, "sampler.steps"), ({"steps": 16}, "sampler.steps"), ({"guidance": -1}, "sampler.guidance"),
                                         ({"discretization": "karras"}, "sampler.discretization"), ({"eta": 1}, "sampler.eta")])
def test_sampler_validation_names_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        get_family("imm").validate_sampler(bad)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_sampler_defaults_are_the_official_imagenet_ones():
    s = get_family("imm").validate_sampler({})
    assert (s.steps, s.guidance, s.discretization) == (8, 1.5, "uniform")


def test_bad_options_and_shapes_name_the_field():
    with pytest.raises(ConfigError, match=r"^model\.options\.depth: unknown option"):
        family("IMM-SongUNet-cifar10", (3, 32, 32), 10, {"depth": 3})
    with pytest.raises(ConfigError, match=r"^model\.preset: the DDPM\+\+ U-Net needs square inputs"):
        family("IMM-SongUNet-cifar10", (3, 30, 30), 10).build()


# -- the EDM network pickle ----------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):  # stands in for torch_utils.persistence's: pickled by name only
    raise AssertionError("the reader must never call the persistence hook")


class _Persisted:
    """What `persistence.persistent_class` pickles an instance as: the hook and a meta record with the source and state."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="import os\nos.system('touch /tmp/never')\n", class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,)


def _persist(module: nn.Module):
    """A module as the official release stores it: our classes as persistence records, torch.nn ones as themselves."""
    state = dict(module.__dict__)
    state["_modules"] = collections.OrderedDict((k, None if c is None else _persist(c)) for k, c in module._modules.items())
    if type(module).__module__.startswith("torch.nn.modules."):
        twin = type(module).__new__(type(module))
        twin.__dict__.update(state)
        return twin
    return _Persisted(type(module).__name__, state)


@pytest.fixture
def fake_edm_modules(monkeypatch):
    """`torch_utils.persistence` and `dnnlib.util` importable while the test pickle is written (as in the release's process)."""
    names = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "omegaconf", "omegaconf.listconfig")
    tu, per, dn, util, oc, lc = (types.ModuleType(n) for n in names)
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    per._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    # The release's constructor arguments came from a hydra config: omegaconf containers, pickled with their state.
    lc.ListConfig = type("ListConfig", (), {"__module__": "omegaconf.listconfig", "__init__": lambda self, v: setattr(self, "_content", v)})
    for name, mod in zip(names, (tu, per, dn, util, oc, lc)):
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(EasyDict=util.EasyDict, ListConfig=lc.ListConfig)


def _release_dict(net, fake):
    ema = _persist(net)
    ema.state["_init_kwargs"] = {"channel_mult": fake.ListConfig([2, 2, 2]), "mixed_precision": torch.float32}
    return dict(ema=ema, augment_pipe=None, dataset_kwargs=fake.EasyDict(path="imagenet.zip", use_labels=True))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_converter_reads_an_edm_pickle_into_the_strict_state_dict(tmp_path, fake_edm_modules, writer):
    fam = family()
    net = randomised(fam)
    src, dst = tmp_path / "imm.pkl", tmp_path / "imm.safetensors"
    data = _release_dict(net, fake_edm_modules)
    if writer == "pickle":
        with open(src, "wb") as fh:
            pickle.dump(data, fh)
    else:
        torch.save(data, src)
    sys.modules.pop("torch_utils.persistence")  # reading needs none of the release's code
    convert_edm_pickle(str(src), str(dst))
    from neon_ray.models.checkpoint import load_checkpoint

    state, _ = load_checkpoint(str(dst))
    fresh = fam.build()
    fam.load_state_dict(fresh, state, "imm.safetensors")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    raw = read_edm_pickle(str(src))
    assert raw["ema"].class_name == "IMMNet" and "os.system" in raw["ema"].module_src  # kept as text, never run
    assert raw["dataset_kwargs"].entries == {"path": "imagenet.zip", "use_labels": True}
    kwargs = raw["ema"].state["_init_kwargs"]
    assert kwargs["channel_mult"].state == {"_content": [2, 2, 2]} and kwargs["mixed_precision"] is torch.float32


def test_convert_command_line(tmp_path, fake_edm_modules, capsys):
    from neon_ray.cli import main

    src, dst = tmp_path / "cifar.pkl", tmp_path / "cifar.safetensors"
    fam = family("IMM-SongUNet-cifar10", (3, 8, 8), 10, dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4]))
    with open(src, "wb") as fh:
        pickle.dump(_release_dict(fam.build(), fake_edm_modules), fh)
    assert main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "tensors" in out and dst.exists()
    assert set(edm_state_dict(str(src))) == set(fam.build().state_dict())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "inside the ema state"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, fake_edm_modules, where, capsys):
    marker = tmp_path / "pwned"
    net = family().build()
    data = _release_dict(net, fake_edm_modules)
    if where == "top":
        data["augment_pipe"] = _Exploit(marker)
    else:
        data["ema"].state["_init_kwargs"] = {"hook": _Exploit(marker)}
    src = tmp_path / "evil.pkl"
    with open(src, "wb") as fh:
        pickle.dump(data, fh)
    with pytest.raises(NeonError) as err:
        edm_state_dict(str(src))
    msg = str(err.value)
    assert msg.startswith("evil.pkl: refused to unpickle global posix.system") and "\n" not in msg
    assert not marker.exists()
    from neon_ray.cli import main

    assert main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    assert "posix.system" in capsys.readouterr().err and not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_unreadable_or_foreign_files_are_one_line(tmp_path):
    bad = tmp_path / "x.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(NeonError, match=r"^x\.pkl: not a readable EDM network pickle"):
        read_edm_pickle(str(bad))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(NeonError, match=r"^plain\.pkl: no 'ema' entry \(has \['net'\]\)"):
        edm_state_dict(str(plain))


def test_official_latent_statistics_normalise_each_channel(tmp_path):
    """z = (E(x) − raw_mean)·(0.5/raw_std) per channel, as the release's StabilityVAEEncoder; decode inverts it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                  mid_block_add_attention=False).save_pretrained(tmp_path / "vae", safe_serialization=True)
    mean, std = [0.1, 0.2, -0.3, 0.4], [2.0, 4.0, 1.0, 0.5]
    fam = family("imm-tiny", (3, 32, 32), 10, {"vae": str(tmp_path / "vae"), "patch": 2, "latent_mean": mean, "latent_std": std,
                                               "vae_scaling_factor": 1.0})
    assert fam.data_shape == (4, 8, 8)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = fam.to_data(images, torch.Generator().manual_seed(0))
    raw = fam.latent.encode(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (raw - torch.tensor(mean)[:, None, None]) * (0.5 / torch.tensor(std))[:, None, None])
    decoded = fam.latent.decode(raw)
    torch.testing.assert_close(fam.to_images(z), decoded, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"^model\.options\.latent_std: 3 channel statistics for a 4-channel VAE"):
        family("imm-tiny", (3, 32, 32), 10, {"vae": str(tmp_path / "vae"), "patch": 2, "latent_mean": mean[:3], "latent_std": std[:3]})


def reference_songunet(sd: dict[str, torch.Tensor], x, noise_t, noise_s, mc: int, res: int, mult, blocks: int, attn) -> torch.Tensor:
    """The official SongUNet forward written out functionally from lumalabs/imm training/unets.py (DDPM++, standard
    encoder/decoder, no labels): nearest-neighbour up / 2×2 mean down, q/k/v interleaved per channel, √½ skips."""
    import torch.nn.functional as F

    def lin(n, v):
        return v @ sd[n + ".weight"].t() + sd[n + ".bias"]

    def conv(n, v):
        w = sd[n + ".weight"]
        return F.conv2d(v, w, sd[n + ".bias"], padding=w.shape[-1] // 2)

    def gn(n, v):
        return F.group_norm(v, min(32, v.shape[1] // 4), sd[n + ".weight"], sd[n + ".bias"], eps=1e-6)

    def pos(v):  # [cos, sin] with endpoint frequencies, then the official swap to [sin, cos]
        f = (1 / 10000) ** (torch.arange(mc // 2, dtype=torch.float64) / (mc // 2 - 1))
        a = v.double()[:, None] * f
        return torch.cat([a.sin(), a.cos()], 1).float()

    def block(n, v, emb, up=False, down=False, attention=False):
        resample = (lambda u: u.repeat_interleave(2, 2).repeat_interleave(2, 3)) if up else (lambda u: F.avg_pool2d(u, 2)) if down else (lambda u: u)
        h = conv(n + ".conv0", resample(F.silu(gn(n + ".norm0", v))))
        h = F.silu(gn(n + ".norm1", h + lin(n + ".affine", emb)[:, :, None, None]))
        h = conv(n + ".conv1", h)
        skip = conv(n + ".skip", resample(v)) if n + ".skip.weight" in sd else v
        h = (h + skip) / math.sqrt(2)
        if attention:
            qkv = conv(n + ".qkv", gn(n + ".norm2", h)).flatten(2)  # (B, 3C, HW), channel 3i + j = part j of channel i
            q, k, v_ = (qkv[:, j::3].transpose(1, 2)[:, None] for j in range(3))  # (B, 1, HW, C)
            a = F.scaled_dot_product_attention(q, k, v_)[:, 0].transpose(1, 2).reshape(h.shape)
            h = (conv(n + ".proj", a) + h) / math.sqrt(2)
        return h

    emb = lin("map_layer1", F.silu(lin("map_layer0", pos(noise_t))))
    emb = F.silu(emb + lin("map_layer1_s", F.silu(lin("map_layer0_s", pos(noise_s)))))
    skips, h = [], conv(f"enc.{res}x{res}_conv", x)
    skips.append(h)
    for level, m in enumerate(mult):
        r = res >> level
        if level:
            h = block(f"enc.{r}x{r}_down", h, emb, down=True)
            skips.append(h)
        for i in range(blocks):
            h = block(f"enc.{r}x{r}_block{i}", h, emb, attention=r in attn)
            skips.append(h)
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            h = block(f"dec.{r}x{r}_in1", block(f"dec.{r}x{r}_in0", h, emb, attention=True), emb)
        else:
            h = block(f"dec.{r}x{r}_up", h, emb, up=True)
        for i in range(blocks + 1):
            h = block(f"dec.{r}x{r}_block{i}", torch.cat([h, skips.pop()], 1), emb, attention=i == blocks and r in attn)
    return conv(f"dec.{res}x{res}_aux_conv", F.silu(gn(f"dec.{res}x{res}_aux_norm", h)))


def test_songunet_matches_the_official_forward_written_out():
    opts = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    fam = family("IMM-SongUNet-cifar10", (3, 8, 8), 10, opts)
    net = randomised(fam, scale=0.2)
    x, t, s = torch.randn(2, 3, 8, 8), torch.tensor([0.9, 0.4]), torch.tensor([0.3, 0.1])
    sd = {k.removeprefix("model."): v for k, v in net.state_dict().items()}
    with torch.no_grad():
        ours = net.model(x, 1000 * t, 1000 * s, torch.tensor([0, 0]))
        ref = reference_songunet(sd, x, 1000 * t, 1000 * s, 16, 8, (1, 2), 1, (4,))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_a_pkl_checkpoint_points_to_the_converter(tmp_path):
    from neon_ray.models.checkpoint import load_checkpoint

    src = tmp_path / "imagenet256_ts_a2.pkl"
    src.write_bytes(pickle.dumps({"ema": None}))
    with pytest.raises(NeonError, match=r"never unpickles checkpoints; .*`neon-ray convert .*imagenet256_ts_a2\.pkl OUT\.safetensors`"):
        load_checkpoint(str(src))


def test_fmnist_preset_runs_the_unet_on_pixel_patches():
    fam = family("imm-fmnist")
    net = randomised(fam)
    assert net.model.enc["14x14_conv"].weight.shape == (64, 4, 3, 3)  # 1×28×28 seen as 4×14×14
    x = torch.randn(2, *FMNIST)
    out = net(x, torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.2]), torch.tensor([3, 10]))
    assert out.shape == (2, *FMNIST) and sum(p.numel() for p in net.parameters()) == pytest.approx(1.3e6, rel=0.05)
    with pytest.raises(ConfigError, match=r"^model\.options\.pixel_patch: 3 does not divide the 28×28 inputs"):
        family("imm-fmnist", options={"pixel_patch": 3}).build()


@pytest.mark.parametrize("preset", ["imm-tiny", "imm-fmnist"])
def test_loss_on_bf16_weights_as_deepspeed_feeds_them(preset):
    fam = family(preset)
    torch.manual_seed(0)
    net = fam.build().to(torch.bfloat16)
    x = (torch.rand(4, *FMNIST) * 2 - 1).to(torch.bfloat16)
    loss = fam.training_loss(net, x, torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.float().abs().sum() > 0 for p in net.parameters())
