"""The docs name only what exists: every config field (`section.field`) and every `neon-ray` flag that README.md and
docs/*.md mention in code spans is one the code has."""

from __future__ import annotations

import argparse
import re

import pytest
from _support import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SPAN = re.compile(r"`([^`\n]+)`")
FIELD = re.compile(r"(?<![\w./-])([a-z_]+(?:\.[a-z_0-9]+)+)(?=[\s=:,)]|$)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
# Config fields that hold a dict of the family's or the dataset's own keys: what follows them is theirs.
OPEN_FIELDS = ("model.options.", "data.options.", "tune.space.", "evaluate.sampler.")
FILES = (".py", ".json", ".db", ".yaml", ".md", ".png", ".npz", ".safetensors", ".parquet", ".lease")
# Dotted names in the docs that are code, not config (a section's name is also a module's).
CODE_NAMES = {"merge.check_w"}
# Fields the docs mention as gone (results measured before they were removed).
REMOVED = {"finetune.cache_shard"}


def spans():
    for path in DOCS:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for span in SPAN.findall(line):
                yield f"{path.relative_to(ROOT)}:{line_no}", span


def config_fields() -> set[str]:
    """Every field path of the run config, the sampler's being those of any built-in family."""
    from pydantic import BaseModel

    from neon_ray.config import RunConfig
    from neon_ray.models.registry import get_family, known_families

    out: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            out.add(prefix + name)
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")

    walk(RunConfig, "")
    for family in known_families():
        out |= {f"sampler.{f}" for f in get_family(family).sampler_schema.model_fields}
    return out


def parser_flags() -> dict[str, set[str]]:
    """Each `neon-ray` command's flags (the top-level ones under "")."""
    from neon_ray.cli import build_parser

    parser = build_parser()
    flags = {"": {o for a in parser._actions for o in a.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = flags[""] | {o for a in sub._actions for o in a.option_strings}
    return flags


def test_every_config_field_named_in_the_docs_exists():
    sections = {name for name in config_fields() if "." not in name}
    known = config_fields()
    missing = []
    for where, span in spans():
        if span.startswith(("neon-ray ", "python ", "pip ", "ray ", "make ", "http", "s3:", "gs:")):
            continue
        for path in FIELD.findall(span):
            if (path.split(".")[0] not in sections or path.startswith(OPEN_FIELDS) or path.count(".") > 1
                    or path.endswith(FILES) or path in CODE_NAMES | REMOVED):
                continue
            if path not in known:
                missing.append(f"{where}: `{span}` names {path}")
    assert not missing, "config fields the code does not have:\n" + "\n".join(missing)


def test_every_neon_ray_flag_named_in_the_docs_exists():
    flags = parser_flags()
    missing = []
    for where, span in spans():
        if not span.startswith("neon-ray "):
            continue
        words = span.split()
        command = words[1] if len(words) > 1 and words[1] in flags else ""
        for flag in FLAG.findall(span):
            if flag not in flags[command]:
                missing.append(f"{where}: `{span}`: {flag} is not a flag of neon-ray {command}".rstrip())
    assert not missing, "flags the CLI does not have:\n" + "\n".join(missing)


@pytest.mark.parametrize("text, found", [("`evaluate.num_samples: 5000`", "evaluate.num_samples"),
                                         ("`finetune.cache_shard`", "finetune.cache_shard")])
def test_the_field_pattern_sees_a_field_in_a_span(text, found):
    assert found in FIELD.findall(SPAN.findall(text)[0])
