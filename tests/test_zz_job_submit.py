"""`ray job submit` to a real two-node Ray cluster on loopback (conftest schedules it first: the longest test).

One head and one worker node, each a `ray start` of its own with 2 CPUs, with Ray's token authentication.
Ray cannot be told to listen on loopback only (`ray start --node-ip-address=127.0.0.1` is rewritten to the
machine's external address, ray._private.services.resolve_ip_for_localhost, and its gRPC servers bind the
wildcard address), so the cluster, the submitter and the jobs run in a network namespace of their own
whose only interface is loopback; there Ray finds no other address. Checked: the namespace has no
interface but `lo`, and every socket Ray listens on is bound to a loopback address; a tiny pipeline
submitted with the documented command finishes after `ray job stop` mid-tune and a resubmission
(nothing half-written in between, finished work reused); sampling actors and Ray Train workers (asked to
SPREAD) ran on both nodes, per Ray's state API. Then, on the same cluster, the node-loss drill: the worker
node is killed while its sampling actors sample S, and the job finishes on the head alone with every sample index
written once.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _servers import free_port
from _support import ROOT, cli_env
from test_e2e import check_mlflow

RAY = str(Path(sys.executable).with_name("ray"))
NETNS: list[str] = []  # ["ip", "netns", "exec", <name>]: every cluster command runs inside the namespace


def _in_netns(*cmd: str) -> list[str]:
    return [*NETNS, *cmd]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this test's nodes (processes whose command line names its temp dir or session), not other Rays."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _node_ports() -> list[str]:
    # Every port a free one: another Ray on the machine (the session's `ray_local`, a developer's) holds the defaults.
    return [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]


def _cluster_processes(temp_dir: str):
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _listening_addresses() -> set[str]:
    """Local addresses of every listening TCP socket in the namespace (all of them the cluster's)."""
    out = subprocess.run(_in_netns("ss", "-ltnH"), capture_output=True, text=True, timeout=30).stdout
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line.strip()}


def _interfaces() -> set[str]:
    out = subprocess.run(_in_netns("ip", "-o", "link"), capture_output=True, text=True, timeout=30).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def _submit(env: dict, dash: int, *entrypoint: str, wait: bool = True) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}"]
    cmd += [] if wait else ["--no-wait"]
    for _ in range(24):  # the head's job agent takes a few seconds to come up after `ray start`
        job = subprocess.run(_in_netns(*cmd, "--", *entrypoint), capture_output=True, text=True, env=env, timeout=1500)
        if "No available agent" not in job.stderr + job.stdout:
            return job
        time.sleep(5)
    return job


def _state(env: dict, api: str, what: str) -> list[dict]:
    """Ray's state API (`ray list`), with the cluster's token from `env`."""
    out = subprocess.run(_in_netns(RAY, "list", what, f"--address={api}", "--format=json", "--detail", "--limit=10000"),
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def cluster():
    """A head and a worker node (2 CPUs each) in a loopback-only network namespace, with token authentication."""
    bin_dir = Path(sys.executable).parent
    # Ray's token authentication, as on a real cluster: one secret shared by the nodes and the submitter.
    env = cli_env({"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "MLFLOW_TRACKING_URI": ""})
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="nrj-", dir="/tmp")
    namespace = os.path.basename(temp_dir)
    made = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, text=True)
    assert made.returncode == 0, f"cannot create a network namespace for the test cluster: {made.stderr}"
    NETNS[:] = ["ip", "netns", "exec", namespace]
    port, dash = free_port(), free_port()
    try:
        subprocess.run(_in_netns("ip", "link", "set", "lo", "up"), check=True, timeout=30)
        head = subprocess.run(_in_netns(RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                                        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
                                        f"--ray-client-server-port={free_port()}", "--disable-usage-stats", *_node_ports()),
                              capture_output=True, text=True, env=env, timeout=180)
        assert head.returncode == 0, head.stdout + head.stderr
        worker_dir = f"{temp_dir}-worker"  # its processes name it: found (and killed) apart from the head's
        worker = subprocess.run(_in_netns(RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--temp-dir={worker_dir}",
                                          "--disable-usage-stats", *_node_ports()), capture_output=True, text=True, env=env, timeout=180)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        api = f"http://127.0.0.1:{dash}"
        _wait_for(lambda: len([n for n in _state(env, api, "nodes") if n["state"] == "ALIVE"]) == 2, 60, "two nodes")
        yield {"env": env, "api": api, "dash": dash, "worker_dir": worker_dir}
    finally:
        _kill_cluster(temp_dir)
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
        NETNS.clear()


def _job_id(job: subprocess.CompletedProcess) -> str:
    found = re.search(r"raysubmit_\w+", job.stdout + job.stderr)
    assert found, job.stdout[-2000:] + job.stderr[-2000:]
    return found.group(0)


def _job_status(cluster: dict, job_id: str) -> str:
    out = subprocess.run(_in_netns(RAY, "job", "status", f"--address={cluster['api']}", job_id),
                         capture_output=True, text=True, env=cluster["env"], timeout=60)
    return out.stdout + out.stderr


def _job_logs(cluster: dict, job_id: str) -> str:
    return subprocess.run(_in_netns(RAY, "job", "logs", f"--address={cluster['api']}", job_id),
                          capture_output=True, text=True, env=cluster["env"], timeout=120).stdout


@pytest.mark.slow
def test_jobs_on_a_loopback_only_two_node_cluster(cluster, tmp_path, tiny_checkpoint, reference_cache):
    """One test, so that one pytest worker runs both parts in order on one cluster (the node-loss drill leaves it
    with one node): pytest-xdist 3.8's `--dist loadgroup` did not keep an `xdist_group` on one worker here."""
    job_stop_resubmit_and_spread(cluster, tmp_path, tiny_checkpoint, reference_cache)
    losing_the_worker_node_mid_generate(cluster, tmp_path, tiny_checkpoint)


def job_stop_resubmit_and_spread(cluster, tmp_path, tiny_checkpoint, reference_cache):
    env, api, dash = cluster["env"], cluster["api"], cluster["dash"]
    assert _interfaces() == {"lo"}, _interfaces()
    assert _listening_addresses() <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, _listening_addresses()  # loopback only

    # The documented command, stopped with `ray job stop` mid-search, then resubmitted.
    out = tmp_path / "job"
    # From a saved base: the pretrain stage is the fine-tune's Ray Train code, spread and resumed here already.
    run = ["python", "jobs/neon_job.py", "tiny", "--output", str(out), "--set", "finetune.placement_strategy=SPREAD",
           "--set", "finetune.budget_images=64", "--set", "finetune.checkpoint_every=2", "--set", f"model.checkpoint={tiny_checkpoint}",
           "--set", f"evaluate.reference_cache={reference_cache}"]
    job_id = _job_id(_submit(env, dash, *run, wait=False))
    _wait_for(lambda: any(out.glob("tune/trials/*/samples/part-*.parquet")), 900, "the search under way")
    stop = subprocess.run(_in_netns(RAY, "job", "stop", f"--address={api}", job_id), capture_output=True, text=True, env=env, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not (out / "tune" / "manifest.json").exists() and (out / "finetune" / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a stopped job leaves no half-written file"
    again = _submit(env, dash, *run)
    assert again.returncode == 0 and "succeeded" in again.stdout.lower(), again.stdout[-4000:] + again.stderr[-2000:]
    logs = _job_logs(cluster, _job_id(again))
    assert "finetune: up to date" in logs and "tune: resuming the search" in logs  # Tuner.restore from the output
    summary = json.loads((out / "summary.json").read_text())
    assert {"fid_base", "fid_neon", "best_w"} <= set(summary)
    check_mlflow(out, ("generate", "finetune", "evaluate", "tune"))

    actors = _state(env, api, "actors")
    nodes_of = lambda name: {a["node_id"] for a in actors if name in a["class_name"] and a["node_id"]}  # noqa: E731 (a never-placed actor has none)
    assert len(nodes_of("SamplerActor")) == 2 and len(nodes_of("RayTrainWorker")) == 2, (nodes_of("SamplerActor"), nodes_of("RayTrainWorker"))


def losing_the_worker_node_mid_generate(cluster, tmp_path, tiny_checkpoint):
    """Node-loss drill: every process of the worker node is killed (SIGKILL) while its sampling actors are sampling
    S; the generate job finishes on the head node alone and S holds every sample index exactly once (the job is
    the generate stage alone, from a saved base: the part before ran the stages after it on this cluster)."""
    import pyarrow.dataset as pads

    env, api, dash = cluster["env"], cluster["api"], cluster["dash"]
    out = tmp_path / "node-loss"
    n, items = 600, 60  # generate.batch_size 10: 60 work items, ~30 s of sampling on the two nodes
    run = ["python", "-m", "neon_ray", "generate", "tiny", "--output", str(out), "--set", f"generate.num_samples={n}",
           "--set", "generate.actors=4", "--set", "sampler.steps=20", "--set", f"model.checkpoint={tiny_checkpoint}"]
    worker_node = next(n["node_id"] for n in _state(env, api, "nodes") if not n["is_head_node"] and n["state"] == "ALIVE")
    job_id = _job_id(_submit(env, dash, *run, wait=False))
    samples = out / "generate" / "samples"
    # First a sampling actor alive on the worker node (the pool starts its actors before any item is done),
    # then the first finished part: the kill lands while the worker's actors are sampling.
    _wait_for(lambda: any("SamplerActor" in a["class_name"] and a["node_id"] == worker_node and a["state"] == "ALIVE"
                          for a in _state(env, api, "actors")), 900, "a sampling actor on the worker node")
    _wait_for(lambda: any(samples.glob("part-*.parquet")), 300, "the first finished work item")
    written = len(list(samples.glob("part-*.parquet")))
    _kill_cluster(cluster["worker_dir"])  # the whole node: raylet, object store, its actors
    assert written < items // 2 and not (out / "generate" / "manifest.json").exists(), f"{written} of {items} parts were done before the kill"

    _wait_for(lambda: any(s in _job_status(cluster, job_id).upper() for s in ("SUCCEEDED", "FAILED", "STOPPED")), 1500, "the job to end")
    status, logs = _job_status(cluster, job_id), _job_logs(cluster, job_id)
    assert "SUCCEEDED" in status.upper(), status + logs[-4000:]
    assert f"sampled {n} images" in logs, logs[-4000:]
    nodes = {n["node_id"]: n["state"] for n in _state(env, api, "nodes")}
    assert nodes[worker_node] == "DEAD", nodes
    index = pads.dataset(str(samples), format="parquet").to_table(columns=["index"]).column("index").to_pylist()
    assert sorted(index) == list(range(n)), "every sample index exactly once"
    assert json.loads((out / "generate" / "manifest.json").read_text())["stage"] == "generate"
