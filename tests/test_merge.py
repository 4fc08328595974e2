"""Merge math against θ_neon = θ_base − w·(θ_ft − θ_base), streamed over safetensors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neon_ray.errors import NeonError
from neon_ray.merge import merge_files, neon_tensor
from neon_ray.models.checkpoint import StreamingSafetensorsWriter


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(7, 5, generator=g),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
        "h": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([0.0, -math.inf, 1.0, math.inf]),
        "steps": torch.tensor([1234], dtype=torch.int64),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }
    ft = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v + 1 if v.dtype == torch.int64 else ~v)
          for k, v in base.items()}
    ft["mask"] = torch.tensor([5.0, 7.0, 9.0, 11.0])
    save_file(base, tmp_path / "base.safetensors", metadata={"family": "x"})
    save_file(ft, tmp_path / "ft.safetensors")
    return base, ft


@pytest.mark.parametrize("w", [0.3, 1.0, 2.0])
def test_merge_matches_formula(tmp_path, w):
    base, ft = _pair(tmp_path)
    info = merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "out.safetensors"), w)
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(base)
    for key in ("w", "b", "h", "scalar"):
        expected = (base[key].double() - w * (ft[key].double() - base[key].double())).to(base[key].dtype)
        assert out[key].dtype == base[key].dtype
        tol = 1e-2 if base[key].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out[key], expected, atol=tol, rtol=tol)
    # inf-holding, integer and bool tensors are copied from the base unchanged
    assert torch.equal(out["mask"], base["mask"])
    assert torch.equal(out["steps"], base["steps"])
    assert torch.equal(out["flag"], base["flag"])
    assert info == {"merged_tensors": 4, "copied_tensors": 3}
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["family"] == "x" and float(meta["neon_w"]) == w


def test_half_precision_is_computed_in_fp32():
    base = torch.full((4,), 60000.0, dtype=torch.float16)
    ft = torch.full((4,), 59000.0, dtype=torch.float16)
    # (1+w)·θ_base would overflow fp16 (65504); θ_base − w·(θ_ft − θ_base) stays finite
    out = neon_tensor(base, ft, 1.0)
    assert torch.isfinite(out).all() and out[0].item() == pytest.approx(61000.0, rel=1e-3)


def test_mismatched_checkpoints_list_the_problems(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(2)}, tmp_path / "base.safetensors")
    save_file({"a": torch.zeros(4), "b": torch.zeros(3, dtype=torch.float64), "d": torch.zeros(1)}, tmp_path / "ft.safetensors")
    with pytest.raises(NeonError) as err:
        merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "o.safetensors"), 1.0)
    msg = str(err.value)
    assert "missing in fine-tuned: ['c']" in msg and "missing in base: ['d']" in msg
    assert "a: shape [2] vs [4]" in msg and "b: dtype F32 vs F64" in msg


@pytest.mark.parametrize("w", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_w_is_refused(tmp_path, w):
    _pair(tmp_path)
    with pytest.raises(NeonError, match="merge.w"):
        merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "o.safetensors"), w)
    assert not (tmp_path / "o.safetensors").exists()


def test_negative_w_allowed_only_explicitly(tmp_path):
    base, ft = _pair(tmp_path)
    merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "o.safetensors"), -1.0, allow_negative=True)
    out = load_file(tmp_path / "o.safetensors")
    torch.testing.assert_close(out["w"], base["w"] + (ft["w"] - base["w"]))  # w = −1 gives θ_ft back


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 2), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.arange(4),
               "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "b": torch.tensor([True, False, True]), "s": torch.tensor(1.5),
               "empty": torch.zeros(0, 3)}
    w = StreamingSafetensorsWriter(str(tmp_path / "x.safetensors"), [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"k": "v"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    from neon_ray.models.checkpoint import SafetensorsReader

    with SafetensorsReader(str(tmp_path / "x.safetensors")) as reader:  # the merge reads what the writer wrote
        assert all(torch.equal(reader.get_tensor(k), v) for k, v in tensors.items())


def test_plain_read_reader_round_trips_every_dtype(tmp_path):
    """The merge's reader (plain reads, no file mapping) gives what safetensors itself loads."""
    from neon_ray.models.checkpoint import SafetensorsReader

    tensors = {"f32": torch.randn(3, 2), "bf16": torch.randn(5).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(4), "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
               "b": torch.tensor([True, False, True]), "s": torch.tensor(1.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    with SafetensorsReader(str(tmp_path / "x.safetensors")) as reader:
        for k, v in tensors.items():
            got = reader.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
        assert sorted(reader.keys()) == sorted(tensors) and reader.metadata() == {"k": "v"}
        assert reader.shape("u8") == (2, 3) and reader.dtype("bf16") == torch.bfloat16


def _header_only(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("content", [b"\x00\x01not a checkpoint", b"", (10**9).to_bytes(8, "little") + b"{}",
                                     _header_only(b"[]"), _header_only(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'),
                                     _header_only(b'{"a":{"dtype":"F32","data_offsets":[0,4]}}', bytes(4)),
                                     _header_only(b'{"a":{"dtype":"F32","shape":"4","data_offsets":[0,4]}}', bytes(4)),
                                     _header_only(b'{"a":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}', bytes(16))])
def test_unreadable_inputs_are_one_line_errors_and_write_nothing(tmp_path, content):
    """Garbage, an empty file, a header longer than the file, a header that is no object, offsets past the end,
    a tensor without a shape, a shape that is not a list, negative dimensions."""
    _pair(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(content)
    for pair in (("bad", "ft"), ("base", "bad")):
        paths = [str(tmp_path / f"{name}.safetensors") for name in pair]
        with pytest.raises(NeonError, match="unreadable checkpoint for merge") as err:
            merge_files(*paths, str(tmp_path / "o.safetensors"), 1.0)
        assert "\n" not in str(err.value) and "bad.safetensors" in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_keeps_the_base_metadata_and_records_w(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "base.safetensors"), metadata={"family": "dit", "preset": "DiT-XL/2"})
    save_file({"w": torch.zeros(3)}, str(tmp_path / "ft.safetensors"))
    merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "o.safetensors"), 0.5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"family": "dit", "preset": "DiT-XL/2", "neon_w": "0.5"}
        torch.testing.assert_close(fh.get_tensor("w"), torch.full((3,), 1.5))


def test_streamed_checkpoint_equals_the_one_written_whole(tmp_path):
    """The finetune stage's consolidation (a tensor at a time) gives the same file contents, metadata included,
    as save_checkpoint from a state dict in memory."""
    from neon_ray.models import ModelSpec
    from neon_ray.models.checkpoint import load_checkpoint, save_checkpoint, save_checkpoint_streaming

    spec = ModelSpec("xar", "xar-tiny", (1, 28, 28), 10)
    state = {"a.weight": torch.randn(3, 4), "mask": torch.full((1, 1, 2, 2), float("-inf")), "steps": torch.tensor(7)}
    save_checkpoint(str(tmp_path / "whole.safetensors"), state, spec, finetune_images=64)
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    save_checkpoint_streaming(str(tmp_path / "streamed.safetensors"), layout, iter(state.items()), spec, finetune_images=64)
    whole, whole_meta = load_checkpoint(str(tmp_path / "whole.safetensors"))
    streamed, streamed_meta = load_checkpoint(str(tmp_path / "streamed.safetensors"))
    assert streamed_meta == whole_meta and streamed_meta["finetune_images"] == "64"
    assert set(streamed) == set(whole) and all(torch.equal(streamed[k], whole[k]) for k in whole)
    with pytest.raises(AssertionError, match="layout order"):  # a tensor out of order never lands in the file
        save_checkpoint_streaming(str(tmp_path / "bad.safetensors"), layout, reversed(list(state.items())), spec)
    assert not (tmp_path / "bad.safetensors").exists()


def test_var_checkpoint_keeps_its_mask_and_level_index(tmp_path):
    """A VAR (var-tiny) state dict: the −inf block-causal bias and the int64 level index come through from θ_base
    unchanged, whatever θ_ft holds; every float weight is extrapolated (the official Neon merge skips the same)."""
    from neon_ray.models import ModelSpec, get_family
    from neon_ray.models.checkpoint import save_checkpoint

    family = get_family("var")(ModelSpec("var", "var-tiny", (1, 28, 28), 10, {"vae": None}))
    torch.manual_seed(0)
    base = family.build().state_dict()
    g = torch.Generator().manual_seed(1)
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    ft["lvl_1L"] = base["lvl_1L"] + 1  # even a θ_ft whose buffers moved: θ_base's are kept
    ft["attn_bias_for_masking"] = torch.zeros_like(base["attn_bias_for_masking"])
    save_checkpoint(str(tmp_path / "base.safetensors"), base, family.spec)
    save_checkpoint(str(tmp_path / "ft.safetensors"), ft, family.spec)
    info = merge_files(str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"), str(tmp_path / "neon.safetensors"), 0.7)
    out = load_file(tmp_path / "neon.safetensors")
    assert out["lvl_1L"].dtype == torch.int64 and torch.equal(out["lvl_1L"], base["lvl_1L"])
    mask = out["attn_bias_for_masking"]
    assert torch.equal(mask, base["attn_bias_for_masking"]) and torch.isneginf(mask).any() and (mask == 0).any()
    assert info == {"merged_tensors": len(base) - 2, "copied_tensors": 2}
    for key in ("head.weight", "blocks.1.ada_lin.1.weight", "blocks.0.attn.scale_mul_1H11", "pos_1LC", "blocks.0.attn.zero_k_bias"):
        torch.testing.assert_close(out[key], base[key] - 0.7 * (ft[key] - base[key]), atol=1e-6, rtol=1e-6)
