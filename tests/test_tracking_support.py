"""Test support for tracking (no tests here): a real `mlflow server` on 127.0.0.1 and small run configs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from omegaconf import OmegaConf

from trainer.config import RunConfig
from trainer.tracking import create_tracker, default_run_name

MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` with a sqlite backend and local artifact store, started and stopped by a test;
    ``db``: serve an existing store (its runs' artifacts where they are) instead of a new one."""

    def __init__(self, root: Path, port: int | None = None, db: Path | None = None) -> None:
        self.root = Path(root)
        self.db = Path(db) if db else self.root / "server.db"
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        """Start the server and wait until it answers its health endpoint."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [MLFLOW_BIN, "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
            # no background job runner: 7 huey consumers that outlive a SIGTERM are not what a test needs
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout} s")

    def stop(self) -> None:
        """Stop the server (its whole process group: gunicorn/uvicorn workers too)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        try:  # whatever of the group outlived the server (its workers) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


def run_cfg(out_dir: Path, uri: str | None = None, **tracking):
    """A RunConfig (OmegaConf) with a named task, writing under ``out_dir``."""
    cfg = OmegaConf.structured(RunConfig)
    cfg.task = {"name": "depth"}
    cfg.out_dir = str(out_dir)
    cfg.tracking.uri = uri
    for key, value in tracking.items():
        cfg.tracking[key] = value
    return cfg


def tracker_for(cfg, *, is_logging_rank: bool, run_id: str | None):
    """``create_tracker`` with the slices of a whole run config, split as the training loop splits them."""
    name = default_run_name(cfg.task.name, str(cfg.parallel.strategy), int(cfg.seed))
    return create_tracker(cfg.tracking, str(cfg.out_dir), default_name=name, data=cfg.data,
                          is_logging_rank=is_logging_rank, run_id=run_id)
