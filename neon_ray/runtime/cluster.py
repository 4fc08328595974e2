"""Joining or starting Ray, and what every Ray worker of a run inherits (no model math here)."""

from __future__ import annotations

import logging
import os

from .progress import INTERACTIVE_ENV, interactive

log = logging.getLogger("neon_ray")
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def worker_env() -> dict[str, str]:
    """Environment for every worker of this run: quiet warnings, and progress bars only for a terminal.

    Ray Data draws tqdm bars in whichever process runs a dataset (Tune trials run sampling and
    scoring in workers); in a non-TTY log those bars are thousands of lines, so they are switched off
    there and the stages' own throttled lines (neon_ray.runtime.progress) remain.
    """
    tty = interactive()
    env = {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning", INTERACTIVE_ENV: "1" if tty else "0",
           "RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING, "RAY_AIR_NEW_OUTPUT": "0"}  # Tune's classic output obeys verbose=0
    if not tty:
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


def ensure_ray(cfg) -> None:
    """Join the configured/ambient cluster (`ray.address`, else $RAY_ADDRESS), or start an embedded local Ray.

    One line instead of Ray's retries or tracebacks: an address that does not answer within
    `ray.connect_timeout_s`, a cluster that refuses the connection, a local Ray that does not start.
    """
    env = worker_env()
    os.environ.update(env)  # before Ray Data is imported: the driver runs datasets too (generate, feature passes)
    import ray
    from ray.data import DataContext

    from ..errors import NeonError

    if ray.is_initialized():
        return
    # Ray's notice that token authentication is on (its default) asks nothing of the user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    data = DataContext.get_current()
    data.enable_progress_bars = env[INTERACTIVE_ENV] == "1"
    # Ray Data's high-memory detector prints a ten-line warning every 30 s while an actor holds a large extractor
    # (the Inception network's 2.5 GiB): it advises a memory request that a small cluster could not grant.
    data.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    field = "ray.address" if cfg.address else "RAY_ADDRESS"
    if address:
        _check_answers(address, field, cfg.connect_timeout_s)
        log.info("connecting to Ray at %s", address)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env}, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise NeonError(f"{field}: cannot join the Ray cluster at {address} ({_first_line(exc)})") from None
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves. Its port is
        # chosen here and named to every worker (RAY_API_SERVER_ADDRESS), so that state queries reach this Ray
        # even when another Ray runs on the machine (they would otherwise stop at "multiple active Ray instances").
        port = _free_port()
        env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        try:
            # Ray's own INFO lines ("Started a local Ray instance", Tune's "Wrote the latest version of all result
            # files") repeat what the stage lines say; its warnings and errors stay.
            ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, log_to_driver=True, runtime_env={"env_vars": env},
                     include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise NeonError(f"ray: the local Ray did not start ({_first_line(exc)}); try `ray stop --force` (a stale "
                            "session), free space under /tmp, or a smaller ray.num_cpus") from None
        log.info("started a local Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
    _interrupt_on_sigterm()


def _interrupt_on_sigterm() -> None:
    """Ray's driver set-up installs a SIGTERM handler that aborts the process; turn SIGTERM (`ray job stop`, a
    scheduler's preemption) into KeyboardInterrupt instead, so the caller cleans up as on Ctrl-C."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:240]


def _check_answers(address: str, field: str, timeout: float) -> None:
    """Fail within `timeout` seconds, naming the field, when nothing listens at a host:port address
    (Ray itself would retry for minutes without a word). `auto` and `local` are Ray's to resolve."""
    import socket
    import time

    from ..errors import NeonError

    target = address.split("://", 1)[-1].rstrip("/")
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise NeonError(f"{field}: {address!r} is not host:port, ray://host:port, auto or local") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port_number), timeout=min(5.0, timeout)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise NeonError(f"{field}: nothing answers at {address} within {timeout:.0f} s ({exc.strerror or exc}); "
                                "check the head node is up and the address") from None
            time.sleep(1.0)


PROBE_TIMEOUT_S = 120.0  # a node whose worker has not answered by then is left unchecked (with a warning)


def joins_a_cluster(cfg) -> bool:
    """Whether `ensure_ray(cfg)` joins a running cluster (`ray.address`, $RAY_ADDRESS: `ray job submit`, a RayJob)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def check_output_on_every_node(output: str, cfg, *, default: bool = False) -> None:
    """Before any stage: on a joined Ray cluster of several nodes, a local output folder must be the same folder on
    every node (a shared mount), since every node's workers write stage outputs and Ray Train/Tune state there.

    A probe file written here is looked for by a zero-CPU task pinned to each other node; a node that does not see
    it stops the run with one line. `default`: the output is the config's own (no --output was given).
    """
    from .. import storage
    from ..errors import NeonError

    if not storage.is_local(output) or not joins_a_cluster(cfg):
        return
    ensure_ray(cfg)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others:
        return
    token = os.urandom(16).hex()
    probe = os.path.join(storage.filesystem(output)[1], f".node-probe-{token}")  # a plain path, also for file://
    with open(probe, "w") as fh:
        fh.write(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        pending = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probe): node
                   for node in others}
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        blind, unchecked = [], len(late)
        for ref in done:
            try:
                blind += [pending[ref]] if ray.get(ref) != token else []
            except ray.exceptions.RayError:  # the node went away, or its worker did not start: not ours to judge
                unchecked += 1
        for ref in late:
            ray.cancel(ref, force=True)
        if unchecked:
            log.warning("output: %d node(s) did not answer within %.0f s; not checked whether they see %s",
                        unchecked, PROBE_TIMEOUT_S, output)
    finally:
        os.remove(probe)
    if blind:
        given = "no --output was given, so the config's default " if default else ""
        raise NeonError(f"output: {given}{output} is a local folder that {len(blind)} of the {len(others) + 1} nodes of "
                        "this Ray cluster do not see, and their workers write there too; give shared storage, "
                        "--output s3://BUCKET/PATH or gs://BUCKET/PATH (or a folder mounted on every node)")


def _read_probe(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(flag: bool | None) -> bool:
    return cluster_has_gpus() if flag is None else flag


def actor_gpus(gpus_per_actor: float | None) -> float:
    """GPUs per actor: the configured number, else 1 when the cluster has GPUs, else 0."""
    use_gpu = resolve_use_gpu(None if gpus_per_actor is None else gpus_per_actor > 0)
    return (gpus_per_actor if gpus_per_actor is not None else 1.0) if use_gpu else 0.0


def ray_storage(uri: str) -> dict:
    """`storage_path`/`storage_filesystem` for Ray Train and Tune run configs: their state lives under `uri`
    (on the run's output, never in the driver's temp dir), through the same filesystem as every other output."""
    from .. import storage

    if storage.is_local(uri):
        return {"storage_path": storage.filesystem(uri)[1]}
    fs, path = storage.pyarrow_filesystem(uri)
    return {"storage_path": path, "storage_filesystem": fs}
