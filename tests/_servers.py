"""Real servers on loopback for the tests: an S3-protocol object store (moto's server mode) with IAM-checked
credentials, and an MLflow tracking server. Each binds 127.0.0.1 on a free port and is stopped after use."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BUCKET = "neon"
READ_ONLY_PREFIX = "readonly"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    # Generous: a server starting on a loaded 2-core machine (two pytest workers and their Ray) took over 90 s.
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"no answer from {url} within {seconds} s")


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        """The credentials and endpoint as every AWS client (s3fs, boto3, Ray workers) reads them: from the environment."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_s3() -> S3Server:
    """moto in server mode with IAM enforcement after the set-up calls: one user may write bucket `neon`
    except under `neon/readonly/`; any other key or secret is refused."""
    import boto3

    port = free_port()
    setup_calls = 4  # create_user, create_access_key, put_user_policy, create_bucket; authenticated from then on
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_calls)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    anonymous = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **anonymous)
    iam.create_user(UserName="neon-ray")
    key = iam.create_access_key(UserName="neon-ray")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"], "Resource": f"arn:aws:s3:::{BUCKET}/{READ_ONLY_PREFIX}/*"},
    ]}
    iam.put_user_policy(UserName="neon-ray", PolicyName="neon-ray", PolicyDocument=json.dumps(policy))
    boto3.client("s3", **anonymous).create_bucket(Bucket=BUCKET)
    return S3Server(proc, endpoint, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass
class MLflowServer:
    proc: subprocess.Popen
    url: str
    root: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_mlflow(root: Path, port: int | None = None) -> MLflowServer:
    """`mlflow server` on loopback: sqlite backend, artifacts proxied into `root/artifacts` (a given port: a restart)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "a")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    _wait_for(f"{url}/health", proc)
    return MLflowServer(proc, url, root)


def planted_secret() -> str:
    return "planted-" + secrets.token_hex(12)
