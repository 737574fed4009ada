"""Shared helpers for multi-process tests: run torchrun (one or several "nodes") on 127.0.0.1.

Every launch has a hard timeout (an error on one rank hangs the others) and a free port, so
tests can run side by side. Other test files reuse :func:`run_torchrun`
(import as ``from dist_helpers import run_torchrun``; pytest puts ``tests/`` on the path), and
:func:`build_synthetic` builds the small synthetic-world shards those runs read.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EAGER_LOSS = "task.photometric_impl=handwritten"
"""For whole-run tests about processes, signals, disks and tracking: the eager photometric loss, which
skips inductor's compile of the CPU loss (~3 s per process from a warm cache, ~20 s cold). The compiled
loss, the default, is tested by test_photometric_compiled.py and test_depth_resume.py's real runs."""


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for child processes: CPU only, one thread per rank, repo on the path."""
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
        # torchrun restarts: without this, restarted workers can read the previous attempt's
        # gloo/NCCL addresses from the shared rendezvous store (pytorch/pytorch#135712)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    })
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def build_synthetic(out: Path, *options: str, timeout: int = 120) -> Path:
    """``python -m data_shards build synthetic --out <out> --height 64 <options>`` (one worker, no
    progress bar) in a child process with :func:`child_env`; returns ``out``."""
    subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(out), "--height", "64",
                    "--workers", "1", "--no-progress", *options], check=True, env=child_env(), timeout=timeout,
                   capture_output=True, cwd=REPO_ROOT)
    return out


def torchrun_cmd(args: Sequence[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                 port: Optional[int] = None, rdzv: bool = False, max_restarts: int = 0,
                 run_id: str = "geoprime-test") -> list[str]:
    """The torchrun command line for ``args`` (``-m module ...`` or ``script.py ...``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    port = port or free_port()
    if rdzv or nnodes > 1 or max_restarts > 0:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}"]
        if nnodes > 1 and node_rank == 0:
            cmd += ["--rdzv-conf=is_host=1"]
        elif nnodes > 1:
            cmd += ["--rdzv-conf=is_host=0"]
    else:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port}", f"--node-rank={node_rank}"]
    return cmd + list(args)


def run_torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 120, env: Optional[dict] = None,
                 cwd: Optional[str] = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run torchrun with ``nproc`` local ranks and a hard timeout; on failure raise with the output.

    ``args``: e.g. ``["-m", "trainer", "parallel=ddp"]`` or ``["path/to/script.py", "x"]``.
    Extra keywords (``nnodes``, ``max_restarts``, ``rdzv``...) go to :func:`torchrun_cmd`.
    """
    cmd = torchrun_cmd(args, nproc, **kw)
    proc = subprocess.run(cmd, env=child_env(env), cwd=cwd or str(REPO_ROOT), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed (rc={proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_multinode(args: Sequence[str], nnodes: int = 2, nproc: int = 1, timeout: float = 180,
                  env: Optional[dict] = None, cwd: Optional[str] = None,
                  **kw) -> list[subprocess.CompletedProcess]:
    """Simulate ``nnodes`` nodes: one torchrun process per node, c10d rendezvous on 127.0.0.1."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = torchrun_cmd(args, nproc, nnodes=nnodes, node_rank=node, port=port, rdzv=True, **kw)
        procs.append(subprocess.Popen(cmd, env=child_env(env), cwd=cwd or str(REPO_ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for r in results:
        if r.returncode != 0:
            raise AssertionError(f"node failed (rc={r.returncode}): {' '.join(r.args)}\n"
                                 f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}")
    return results


def processes_naming(marker: str) -> dict[int, str]:
    """pid -> command line of every live process (not a zombie) whose command line contains ``marker``
    (e.g. a run's out_dir), read from /proc: ``ps`` cuts its lines at 80 columns under pytest, so a
    check through it can pass for want of seeing the process."""
    found: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found[int(entry.name)] = cmdline.strip()
    return found


def survivors(marker: str, wait: float = 5.0) -> dict[int, str]:
    """:func:`processes_naming` ``marker`` once none is left or ``wait`` s have passed (processes that
    were just told to end take a moment)."""
    import time

    end = time.monotonic() + wait
    while processes_naming(marker) and time.monotonic() < end:
        time.sleep(0.2)
    return processes_naming(marker)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Return once ``text`` is in the file ``path`` (a run's log); AssertionError when ``proc`` ended
    first or ``timeout`` s passed."""
    import time

    end = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text(errors="replace")):
        assert proc.poll() is None, f"the process ended (rc={proc.returncode}) before {text!r} was in {path}"
        assert time.monotonic() < end, f"{text!r} not in {path} within {timeout} s"
        time.sleep(0.2)


def signal_and_wait(proc: subprocess.Popen, sig: int, timeout: float) -> str:
    """Send ``sig`` to ``proc``, wait for it to exit and return its output (text, '' when not piped);
    a process still running when this raises is SIGKILLed."""
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=timeout)[0] or ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
