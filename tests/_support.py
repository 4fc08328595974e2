"""Helpers shared by the tests (importable thanks to `pythonpath = ["tests"]` in pyproject)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "neon_ray" / "configs" / "tiny.yaml"


def fault_drills():
    """benchmarks/fault_drills.py as a module (the tests run its drills and its undisturbed run)."""
    import importlib.util

    if "fault_drills" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fault_drills", ROOT / "benchmarks" / "fault_drills.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fault_drills"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["fault_drills"]


def tiny_config(output: Path, *overrides: str):
    from neon_ray.config import load_config

    return load_config(TINY, list(overrides), str(output))


def cli_env(env: dict | None = None) -> dict:
    """The environment of a `neon-ray` subprocess: this checkout first on PYTHONPATH, as scripts/with_env.sh sets it."""
    merged = {**os.environ, **(env or {})}
    paths = [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    merged["PYTHONPATH"] = os.pathsep.join(paths + ([] if str(ROOT) in paths else [str(ROOT)]))
    return merged


def neon_ray_cli(*args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `neon-ray` command (the venv's launcher, `python -m neon_ray`) as a user would."""
    exe = Path(sys.executable).with_name("neon-ray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "neon_ray"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cli_env(env))


def neon_ray_inprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`neon-ray` called in this process (`neon_ray.cli.main`): the same exit code and output as the command, without
    an interpreter start per call. For commands that stop before Ray starts (bad input); `env` is set meanwhile."""
    import contextlib
    import io

    from neon_ray.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["neon-ray", *args], code, out.getvalue(), err.getvalue())


def without_checkout(env: dict, home) -> dict:
    """An environment with the dependencies (this venv) but no neon-ray: no PYTHONPATH, a fresh home folder."""
    home.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return {**clean, **env, "HOME": str(home)}


def load_and_predict(uri: str, env: dict, folder) -> dict:
    """`mlflow.pyfunc.load_model(uri)` and a prediction on its own input example, in a new process started in
    an empty folder where `import neon_ray` fails."""
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import importlib.util, json, sys, mlflow\n"
        "assert importlib.util.find_spec('neon_ray') is None, 'neon_ray is importable before loading'\n"
        f"model = mlflow.pyfunc.load_model({uri!r})\n"
        "example = model.input_example\n"
        "out = model.predict(example)\n"
        "column = out.columns[0]\n"
        "print(json.dumps({'rows': len(out), 'column': column, 'head': out[column][0][:4].hex(),\n"
        "                  'inputs': list(example.columns), 'signature': model.metadata.signature is not None}))\n"
    )
    proc = subprocess.run([dependencies_python(), "-c", code], capture_output=True, text=True, cwd=folder, env=env, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dependencies_python() -> str:
    """The interpreter of the dependencies alone: scripts/setup_env.sh's shared venv, which this clone's venv layers
    over with a .pth file (`site.addsitedir(...)`) and an editable install of the clone; else this interpreter."""
    import glob
    import re
    import site

    for folder in site.getsitepackages():
        for pth in glob.glob(os.path.join(folder, "*.pth")):
            found = re.search(r"addsitedir\((['\"])(.+?)\1\)", Path(pth).read_text())
            if found and (python := Path(found.group(2)).parents[2] / "bin" / "python").exists():
                return str(python)
    return sys.executable


def meta_build(family):
    """The family's network on the meta device: shapes only (the official presets hold up to billions of parameters)."""
    import torch

    with torch.device("meta"):
        return family.build()


def meta_state(layout: dict):
    """A state dict of meta tensors of the given key → shape listing."""
    import torch

    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def randomised(family, scale: float = 0.05):
    """The family's network (eval mode) at torch seed 0, every parameter moved by scale·N(0, 1): outputs that
    depend on every weight, as an untrained initialisation (zero gates, zero heads) would not."""
    import torch

    torch.manual_seed(0)
    net = family.build().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def assert_imports_no_distributed_stack(*modules: str) -> None:
    """`modules` imported in a fresh interpreter load none of ray, deepspeed, mlflow, diffusers (model math stays apart)."""
    code = (f"import sys, {', '.join(modules)};"
            "bad=[m for m in ('ray','deepspeed','mlflow','diffusers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def check_official_layout(family, layout: dict, n_params: int, buffer_suffixes: tuple[str, ...], source: str) -> int:
    """The family's network (on the meta device) has exactly the hand-written key → shape `layout`, loads it strictly,
    counts `n_params` parameters (the layout's entries less the buffers) and has exactly the layout's buffers.
    Returns the parameter count."""
    import math

    net = meta_build(family)
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(layout) - set(mine)) == [] and sorted(set(mine) - set(layout)) == []
    assert {k: s for k, s in mine.items() if layout[k] != s} == {}
    family.load_state_dict(net, meta_state(layout), source)  # strict: every key, every shape
    counted = sum(p.numel() for p in net.parameters())
    assert counted == n_params == sum(math.prod(s) for k, s in layout.items() if not k.endswith(buffer_suffixes))
    assert {k for k, _ in net.named_buffers()} == {k for k in layout if k.endswith(buffer_suffixes)}
    return counted


def assert_tampering_is_one_line(family, net, layout: dict, cases: dict, source: str) -> None:
    """Each tampering of the `layout` (cases: expected message part → function editing the listing) makes the
    family's strict load fail with one line that starts with the generic listing and names the key."""
    import pytest

    from neon_ray.errors import NeonError

    for expected, tamper in cases.items():
        bad = dict(layout)
        tamper(bad)
        with pytest.raises(NeonError) as err:
            family.load_state_dict(net, meta_state(bad), source)
        msg = str(err.value)
        assert msg.startswith(f"checkpoint {source} does not fit the model: ") and expected in msg and "\n" not in msg, msg


def assert_each_sample_depends_only_on_its_seed(family, net, settings, labels, seeds, other_seeds, atol: float = 1e-5):
    """Sampling a batch equals sampling its rows one at a time, and other seeds give other samples. Returns the batch."""
    import torch

    together = family.sample(net, labels, seeds, settings)
    alone = torch.cat([family.sample(net, labels[i : i + 1], seeds[i : i + 1], settings) for i in range(len(seeds))])
    torch.testing.assert_close(together, alone, atol=atol, rtol=atol)
    assert not torch.allclose(together, family.sample(net, labels, other_seeds, settings))
    return together
