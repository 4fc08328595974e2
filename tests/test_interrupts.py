"""Stopping and breaking a command: SIGTERM/Ctrl-C, a Ray address that does not answer, a checkpoint that cannot
be used, a worker group that fails more often than allowed. One line each; nothing half-written; a rerun resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _servers import free_port
from _support import ROOT, TINY, cli_env, neon_ray_cli
from test_cli_errors import _assert_one_line_error


def _popen(*args: str) -> subprocess.Popen:
    import sys

    exe = Path(sys.executable).with_name("neon-ray")
    # Ctrl-C's default action in the command, whatever this process (a pytest worker) does with SIGINT.
    return subprocess.Popen([str(exe), *args], cwd=ROOT, env=cli_env({"MLFLOW_TRACKING_URI": ""}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.2)


def _descendant(pid: int, needle: str):
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if needle in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_sigterm_mid_generate_exits_130_and_a_rerun_samples_only_what_is_missing(tmp_path, tiny_checkpoint):
    out = tmp_path / "o"
    args = ("generate", str(TINY), "--output", str(out), "--set", f"model.checkpoint={tiny_checkpoint}", "--set", "generate.num_samples=240",
            "--set", "generate.batch_size=4", "--set", "mlflow.enabled=false")
    proc = _popen(*args)
    samples = out / "generate" / "samples"
    _wait_for(lambda: len(list(samples.glob("part-*.parquet"))) >= 3, 300, proc)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` and schedulers send
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if l.startswith("neon-ray:")]
    assert lines == ["neon-ray: interrupted; rerun the same command to resume"], stderr[-3000:]
    assert not (out / "generate" / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    kept = {p.name: p.stat().st_mtime_ns for p in samples.glob("part-*.parquet")}
    again = neon_ray_cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(kept)} of 60 work items reused" in again.stderr
    assert all((samples / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not sampled again


@pytest.mark.slow
def test_ctrl_c_mid_training_exits_130_and_a_rerun_resumes_from_the_checkpoint(tmp_path):
    """Ray Train's own Ctrl-C handler (installed when fit() runs on the main thread) made the command exit 1 without a
    word; now Ctrl-C is handled as SIGTERM is."""
    out = tmp_path / "o"
    args = ("pretrain", str(TINY), "--output", str(out), "--set", "pretrain.steps=80", "--set", "pretrain.checkpoint_every=10",
            "--set", "mlflow.enabled=false")
    proc = _popen(*args)
    # A checkpoint Ray Train has registered (its snapshot written), not only one whose folder is being filled.
    _wait_for(lambda: any((out / "pretrain" / "ray").glob("*/checkpoint_manager_snapshot.json")), 300, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert [l for l in stderr.splitlines() if l.startswith("neon-ray:")] == ["neon-ray: interrupted; rerun the same command to resume"]
    assert not (out / "pretrain" / "manifest.json").exists()
    again = neon_ray_cli(*args, timeout=600)
    assert again.returncode == 0 and "[pretrain] resuming at step" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]


def test_ray_address_that_does_not_answer_is_one_line_within_the_timeout(tmp_path, tiny_checkpoint):
    address = f"127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = neon_ray_cli("generate", str(TINY), "--output", str(tmp_path / "o"), "--set", f"model.checkpoint={tiny_checkpoint}",
                        "--set", f"ray.address={address}", "--set", "ray.connect_timeout_s=3", "--set", "mlflow.enabled=false")
    _assert_one_line_error(proc, "ray.address", address, "nothing answers")
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_a_search_stopped_after_some_trials_reruns_only_the_rest(tmp_path, undisturbed_tiny_run):
    """Ctrl-C (SIGINT) once a few trials of a widened search have scored: the command stops (Ray Tune, left to itself,
    would take it as "end the search" and return the trials so far as if the search were done); the same command
    again resumes Tune's experiment (Tuner.restore from the output) and scores only the trials that had not finished.
    SIGTERM mid-search, `ray job stop`'s signal, is test_zz_job_submit's."""
    import shutil

    done, _, sets = undisturbed_tiny_run
    out = tmp_path / "o"
    shutil.copytree(done, out, symlinks=True)  # generate and finetune as they are: only the search runs
    grid = [0.2, 0.3, 0.4, 0.5, 0.8, 1.0]  # 0.5 and 1.0 were scored by the undisturbed run
    args = ("tune", str(TINY), "--output", str(out), *[a for s in sets for a in ("--set", s)],
            "--set", f"tune.w_grid={grid}", "--set", "mlflow.enabled=false")
    results = lambda: {p.parent.name: p.stat().st_mtime_ns for p in (out / "tune" / "trials").glob("*/result.json")}  # noqa: E731
    before = results()
    proc = _popen(*args)
    _wait_for(lambda: len(results()) >= len(before) + 1, 600, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    scored = results()
    assert len(scored) < len(grid) and not (out / "tune" / "manifest.json").exists(), f"the search ended before the stop: {scored}"
    again = neon_ray_cli(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tune: resuming the search" in again.stdout + again.stderr
    final = results()
    assert sorted(final) == sorted(f"w={w:.6g}" for w in grid)
    assert all(final[name] == mtime for name, mtime in scored.items()), "a trial scored before the stop was scored again"
    trials = json.loads((out / "tune" / "manifest.json").read_text())["metrics"]["trials"]
    assert sorted(t["w"] for t in trials) == grid


@pytest.mark.slow
def test_unusable_checkpoint_means_a_fresh_start_and_exhausted_retries_one_line(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "o"
    args = ("pretrain", str(TINY), "--output", str(out), "--set", "pretrain.steps=20", "--set", "pretrain.checkpoint_every=10",
            "--set", "mlflow.enabled=false")
    first = neon_ray_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    theta = load_file(str(out / "pretrain" / "model.safetensors"))
    # As after a crash past the checkpoint at step 10, whose file is then damaged: it must not be used.
    (out / "pretrain" / "manifest.json").unlink()
    (state,) = (out / "pretrain" / "ray").glob("*/checkpoint_*/state.pt")
    state.write_bytes(b"torn" * 100)
    again = neon_ray_cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cannot be used" in again.stdout and "starting afresh" in again.stdout, again.stdout[-3000:]
    assert all((theta[k] == v).all() for k, v in load_file(str(out / "pretrain" / "model.safetensors")).items())  # same seed, same θ

    # No retry allowed and a worker killed: one line naming the stage and the worker's end.
    proc = _popen("pretrain", str(TINY), "--output", str(tmp_path / "p"), "--set", "pretrain.steps=400", "--set", "pretrain.checkpoint_every=10",
                  "--set", "pretrain.max_failures=0", "--set", "mlflow.enabled=false")
    _wait_for(lambda: any((tmp_path / "p" / "pretrain" / "ray").glob("*/checkpoint_*")), 300, proc)
    _descendant(proc.pid, "RayTrainWorker").send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    ours = [l for l in stderr.splitlines() if not l.startswith("\x1b[36m(")]  # Ray's own worker logs aside
    assert [l for l in ours if l.startswith("neon-ray:")] == [next(l for l in ours if l.startswith("neon-ray: error:"))]
    line = next(l for l in ours if l.startswith("neon-ray: error:"))
    assert "pretrain: training failed after 0 recovered failure(s)" in line and "last worker error" in line
    assert not [l for l in ours if "Traceback" in l], "\n".join(ours)[-3000:]
    assert not (tmp_path / "p" / "pretrain" / "manifest.json").exists()
