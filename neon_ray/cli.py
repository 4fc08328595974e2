"""`neon-ray` command line: one subcommand per stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from . import __version__
from .errors import NeonError



def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file, or a shipped config by name (`neon-ray configs`); defaults apply to missing fields")
    p.add_argument("--output", help="output root URI (overrides `output`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set finetune.lr=1e-4 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its manifest is current")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neon-ray", description="Neon: θ_neon = θ_base − w·(θ_ft − θ_base), as a Ray job.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"neon-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="pretrain (if needed) → generate → finetune (→ diagnose) → evaluate → tune, tracked in MLflow")
    _add_common(p)
    for name, text in [
        ("pretrain", "train the built-in base model on the real training split (Ray Train)"),
        ("generate", "sample the synthetic set S with Ray Data actors → Parquet"),
        ("finetune", "fine-tune θ_base on S with Ray Train + DeepSpeed → θ_ft"),
        ("evaluate", "FID of the base model (or --checkpoint) against the reference statistics"),
        ("tune", "Ray Tune over w and the sampler (tune.space): merge + score per trial and rung, then the rescored headline"),
        ("diagnose", "predict the sign of a helpful w and a bracket for the search from held-out real data (g·Δ, the loss along the line)"),
    ]:
        p = sub.add_parser(name, help=text)
        _add_common(p)
        if name == "evaluate":
            p.add_argument("--checkpoint", help="evaluate this safetensors file instead of the base model")
        if name == "diagnose":
            p.add_argument("--json", action="store_true", help="print one JSON object (one line, the last line of stdout)")
    p = sub.add_parser("merge", help="write θ_neon = θ_base − w·(θ_ft − θ_base) as safetensors (streamed)")
    _add_common(p)
    p.add_argument("--base", help="θ_base safetensors (default: the run's base model)")
    p.add_argument("--finetuned", help="θ_ft safetensors (default: the run's finetune output)")
    p.add_argument("--w", type=float, help="extrapolation weight (default: merge.w)")
    p.add_argument("--out", help="output safetensors URI (default: <output>/merge/model.safetensors)")
    p = sub.add_parser("review", help="read a run back from its output alone (any URI): stages, trials, headline, registered model")
    p.add_argument("output", help="the run's output root URI")
    p.add_argument("--json", action="store_true", help="print one JSON object (one line, the last line of stdout)")
    p.add_argument("--ui", action="store_true", help="start the MLflow UI (loopback) on a local copy of the run's MLflow store")
    p.add_argument("--port", type=int, default=5000, help="port of --ui (default 5000)")
    p = sub.add_parser("convert", help="read the tensors of an EDM/IMM network pickle (without running it) into safetensors")
    p.add_argument("source", help="the official .pkl (e.g. lumalabs/imm imagenet256_ts_a2.pkl)")
    p.add_argument("out", help="the safetensors file to write (then: model.checkpoint)")
    p.add_argument("--entry", default="ema", help="which entry of the pickled dict holds the network (default: ema)")
    p = sub.add_parser("show-config", help="print the resolved config as YAML")
    _add_common(p)
    sub.add_parser("configs", help="list the shipped configs (`neon-ray run NAME` runs one from any folder)")
    p = sub.add_parser("families", help="list the model families: presets and sampler settings (with defaults)")
    p.add_argument("family", nargs="?", help="one family (a registered name or module:attr plugin)")
    p = sub.add_parser("ref-stats", help="compute (once) or --import the reference statistics of the config's evaluate section")
    _add_scoring(p)
    p.add_argument("--import", dest="import_path", metavar="FILE.npz", help="import published ADM/EDM statistics (mu, sigma)")
    p.add_argument("--feature-space", default="inception", help="feature space of the imported file (default: inception = inception-2015-12-05/pool3)")
    p.add_argument("--force", action="store_true", help="recompute even if the cached statistics are current")
    p = sub.add_parser("fid", help="FID, precision/recall and the real-vs-real floor of a sample set against the reference statistics")
    _add_scoring(p)
    p.add_argument("--samples", required=True, metavar="URI", help="a Parquet sample set (from generate) or an image folder")
    return parser


def _add_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, or a shipped config by name (defaults apply to missing fields)")
    p.add_argument("--output", help="output root URI (overrides `output`; the reference cache defaults to <output>/reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--num-shards", type=int, metavar="K", help="split the feature pass into K Ray Data shards (same result for any K)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "filelock", "torch_fidelity", "DeepSpeed", "deepspeed", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_OUTPUT: list[str] = []  # the output root of the command, once known: its temporary files go on an interrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if not args.verbose:
        from .runtime.stderr import drop_ray_constructor_argument_lines

        drop_ray_constructor_argument_lines()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own loggers to INFO on import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the command as Ctrl-C does (also after Ray starts)
    ray_was_up = _ray_running()  # called from a program that already runs Ray: leave its Ray up
    try:
        return _dispatch(args)
    except NeonError as exc:
        print(f"neon-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not ray_was_up:
            _shutdown_ray()  # first: its actors (a sampler mid-write) must not leave a temporary after the clean-up
        _remove_temporaries()
        print("neon-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if not ray_was_up:
            _shutdown_ray()


def _remove_temporaries() -> None:
    if not _OUTPUT:
        return
    from .storage import remove_temporaries

    try:
        remove_temporaries(_OUTPUT[0])
    except Exception:  # noqa: BLE001 - best effort on the way out; a rerun ignores and replaces them anyway
        pass


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    if _ray_running():
        sys.modules["ray"].shutdown()


def _dispatch(args: argparse.Namespace) -> int:
    from . import storage
    from .config import load_config, to_yaml
    from .storage import ensure_writable

    if args.command == "convert":
        from .models.edm_pickle import convert_edm_pickle

        tensors = convert_edm_pickle(args.source, args.out, args.entry)
        print(f"{args.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e6:.2f}M values from {args.source}[{args.entry!r}]")
        return 0
    if args.command == "families":
        print(describe_families(args.family))
        return 0
    if args.command == "configs":
        print(describe_configs())
        return 0
    if args.command == "review":
        return _review(args)
    overrides = list(args.overrides)
    if args.command == "merge" and args.w is not None:
        overrides.append(f"merge.w={args.w!r}")  # validated with the config, like any other field
    cfg = load_config(args.config, overrides, args.output)
    if args.command == "show-config":
        print(to_yaml(cfg), end="")
        return 0
    if args.command == "diagnose":
        cfg.check_diagnose_data()  # held-out data: one line naming the field, before anything is set up
    if args.command in ("run", "finetune"):  # before anything is written: generation alone takes minutes
        from .runtime.deepspeed import check_deepspeed

        check_deepspeed(cfg.finetune.zero_stage)
    # Before any stage, Ray or MLflow set-up: the output must take writes and the tracking server must answer.
    ensure_writable(cfg.output, field="output")
    _OUTPUT[:] = [cfg.output]
    from .runtime.cluster import check_output_on_every_node

    check_output_on_every_node(cfg.output, cfg.ray, default=args.output is None)
    t0 = time.time()
    if args.command in ("ref-stats", "fid"):
        return _score_command(cfg, args)
    from . import pipeline
    from .tracking import check_tracking

    check_tracking(cfg)
    if args.command == "run":
        from .report import print_summary

        print_summary(pipeline.run(cfg, force=args.force), cfg.output)
        return 0
    files: dict[str, str] = {}
    options: dict[str, str] = {}
    given = {"evaluate": (("base", "--checkpoint"),), "merge": (("base", "--base"), ("finetune", "--finetuned"))}
    for dependency, flag in given.get(args.command, ()):
        if path := getattr(args, flag.removeprefix("--")):
            if not storage.exists(path):
                raise NeonError(f"{flag}: file not found: {storage.redact_uri(path)}")
            files[dependency] = path
    if args.command == "merge" and args.out:
        options["out"] = args.out
    manifest = pipeline.run_command(cfg, args.command, force=args.force, files=files, options=options)
    if args.command == "diagnose":
        return _print_diagnosis(manifest, args.json, time.time() - t0)
    print(json.dumps({"stage": manifest.stage, "metrics": manifest.metrics, "outputs": manifest.outputs,
                      "wall_seconds": round(time.time() - t0, 1)}, default=str))  # one line, like every --json
    return 0


def _print_diagnosis(manifest, as_json: bool, seconds: float) -> int:
    from .diagnosis import describe

    m = manifest.metrics
    if as_json:  # the prediction at the top level, the whole manifest's metrics beside it; one line, last on stdout
        print(json.dumps({k: m[k] for k in ("sign", "bracket", "cosine", "loss_argmin_w", "seconds", "bracket_open",
                                              "g_dot_delta", "g_dot_delta_se")}
                         | {"stage": manifest.stage, "metrics": m, "wall_seconds": round(seconds, 1)}, default=str))
    else:
        print(f"diagnose: {describe(m)}")
    return 0


def _review(args: argparse.Namespace) -> int:
    from . import review

    if args.ui:
        return review.ui(args.output, args.port)
    record = review.review(args.output)
    print(json.dumps(record, default=str) if args.json else review.render(record))
    return 0


def describe_configs() -> str:
    """One line per shipped config: its name and the first line of its header comment."""
    from .config import CONFIG_DIR, shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs))
    lines = [f"shipped configs ({CONFIG_DIR}); run one with `neon-ray run NAME`:"]
    for name, path in configs.items():
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        lines.append(f"  {name:<{width}}  {first.lstrip('# ').rstrip()}")
    return "\n".join(lines)


def describe_families(only: str | None = None) -> str:
    """A plain-text catalogue: each family's presets and its sampler fields (type, default, meaning)."""
    from .models.registry import get_family, known_families

    lines = []
    for name in [only] if only else known_families():
        family = get_family(name, field="family")
        lines.append(f"{family.name}  ({family.__module__}.{family.__qualname__})")
        for preset, hparams in family.presets.items():
            lines.append(f"  preset {preset}: " + ", ".join(f"{k}={v}" for k, v in hparams.items()))
        for field, info in family.sampler_schema.model_fields.items():
            kind = _type_name(info.annotation)
            lines.append(f"  sampler.{field}: {kind} = {info.default!r}  {info.description or ''}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def _type_name(annotation) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _score_command(cfg, args: argparse.Namespace) -> int:
    if args.num_shards is not None and args.num_shards < 1:
        raise NeonError(f"--num-shards: must be ≥ 1, got {args.num_shards}")
    if args.command == "ref-stats":
        from .scoring import ref_stats

        result = ref_stats(cfg, import_path=args.import_path, feature_space=args.feature_space, num_shards=args.num_shards,
                           force=args.force)
        line = f"reference statistics ({result['state']}): n={result['n']}, {result['feature_space']} → {result['reference']}"
    else:
        from .scoring import describe_scores, score_uri

        result = score_uri(cfg, args.samples, num_shards=args.num_shards)
        line = describe_scores(result)
    print(json.dumps(result, default=str) if args.json else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
