"""The layering of docs/architecture.md, checked on the source: imports only go down, no stage imports another, and no
import circle outside the registries."""

from __future__ import annotations

import ast
from pathlib import Path

from _support import ROOT

# Higher number = lower layer. A module may import its own layer or lower ones.
LAYERS = [
    ("neon_ray.cli", 0), ("neon_ray.__main__", 0),
    ("neon_ray.pipeline", 1),
    ("neon_ray.stages", 2),
    ("tuning", 3),
    ("neon_ray.scoring", 4), ("neon_ray.tracking", 4), ("neon_ray.context", 4), ("neon_ray.inputs", 4), ("neon_ray.report", 4), ("neon_ray.mlflow_model", 4), ("neon_ray.review", 4),
    ("neon_ray.runtime", 5),
    ("neon_ray.config", 6), ("neon_ray.manifest", 6),
    ("neon_ray", 7),  # models, data, fid, merge, storage, train_math, plugins, imageio, errors
]


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} has no layer")


def modules():
    for path in sorted([*(ROOT / "neon_ray").rglob("*.py"), *(ROOT / "tuning").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts), path


def imports(module: str, path: Path, is_package: bool):
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for a in node.names:  # `from . import storage` names a module
                yield f"{target}.{a.name}"


def test_imports_only_go_down_and_stages_stay_apart():
    ours = {m for m, _ in modules()}
    bad = []
    for module, path in modules():
        for target in imports(module, path, path.name == "__init__.py"):
            if target not in ours or target == module:
                continue
            if layer(target) < layer(module):
                bad.append(f"{module} → {target}")
            if module.startswith("neon_ray.stages.") and target.startswith("neon_ray.stages."):
                bad.append(f"{module} → {target} (a stage imports another stage)")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_stage_modules_expose_the_stage_protocol():
    from neon_ray.inputs import StageInputs
    from neon_ray.pipeline import GRAPH

    for name, stage in GRAPH.items():
        assert callable(stage.module.run) and isinstance(stage.module.INPUTS, StageInputs), name
        assert stage.module.__name__ == f"neon_ray.stages.{name}"


# The registries import their built-in members, which import the registry's base: the one accepted circle.
REGISTRIES = {"neon_ray.models", "neon_ray.models.registry", "neon_ray.data", "neon_ray.data.base"}


def test_no_import_circle_outside_the_registries():
    ours = dict(modules())
    graph = {m: {t for t in imports(m, p, p.name == "__init__.py") if t in ours and t != m and t not in REGISTRIES}
             for m, p in ours.items() if m not in REGISTRIES}
    circles = []
    for start in graph:  # a depth-first walk from each module back to itself
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" → ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles))[:10])


def test_no_function_or_class_is_defined_twice_in_one_scope():
    """A second `def` of a name silently replaces the first (a helper once shadowed another method of the tracker)."""
    twice = []
    for module, path in modules():
        for scope in ast.walk(ast.parse(path.read_text())):
            if isinstance(scope, (ast.Module, ast.ClassDef)):
                seen: set[str] = set()
                for node in scope.body:
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        setter = any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in node.decorator_list)
                        if node.name in seen and not setter:
                            twice.append(f"{module}: {getattr(scope, 'name', '<module>')}.{node.name} (line {node.lineno})")
                        seen.add(node.name)
    assert not twice, "defined twice:\n" + "\n".join(twice)
